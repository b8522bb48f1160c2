//! The connectors against sandboxes that behave as the vendors document, where an earlier
//! crm-sync and its own sandboxes agreed on something the real APIs do not do
//! (docs/crm-apis.md §2.3, §2.4, §3.4):
//! - Zendesk has no `organizations/create_or_update_many`;
//! - a Zendesk job cannot be cancelled, and lands whenever it runs;
//! - a Zendesk 403 means either "no bulk import" or "these credentials may not write";
//! - a Dataverse `$batch` part without a body still ends its header block.

mod common;

use std::time::Duration;

use common::*;
use crm_sync::config::Config;
use crm_sync::connectors::holds::Holds;
use crm_sync::connectors::{self, CallsDone, Connector, DeliveryError, ErrorCode, WriteOk, WriteRequest};
use crm_sync::consume::StopMode;
use crm_sync::event::Op;
use crm_sync::pipeline;
use crm_sync::sandbox::dynamics::{DynamicsSandbox, DynamicsSetup, Scripted as DynamicsScripted};
use crm_sync::sandbox::kafka::tools;
use crm_sync::sandbox::zendesk::{Scripted, ZendeskSandbox, ZendeskSetup};
use crm_sync::sandbox::CrmSandbox;
use serde_json::{json, Map, Value};

const WAIT: Duration = Duration::from_secs(30);

/// A config with tenant `acme` on `crm` (no broker is contacted: only the connector is
/// built from it).
fn config_for(crm: &dyn CrmSandbox) -> Config {
    let text = format!(
        r#"
[kafka]
bootstrap_servers = "127.0.0.1:9"
group_id = "fidelity"
input_topics = ["in"]
dlq_topic = "dlq"
failures_topic = "failures"
state_topic = "state"

[[tenants]]
name = "acme"
request_timeout_ms = 5000
{}"#,
        crm.tenant_toml("CRM_SECRET")
    );
    let secret = crm.secret();
    Config::from_toml_with_env(&text, |v| (v == "CRM_SECRET").then(|| secret.clone())).expect("valid config")
}

fn connector(config: &Config) -> std::sync::Arc<dyn Connector> {
    let holds = std::sync::Arc::new(Holds::new("acme", None));
    connectors::build(config, &config.tenants[0], holds).expect("connector builds")
}

fn request(op: Op, object: &str, field: &str, key: &str, version: u64, fields: Value) -> WriteRequest {
    WriteRequest {
        op,
        object: object.into(),
        external_id_field: field.into(),
        external_id: key.into(),
        fields: fields.as_object().cloned().unwrap_or_default(),
        event_id: format!("e-{key}-{version}"),
        version,
        state_partition: 0,
    }
}

fn user(key: &str, version: u64, name: &str) -> WriteRequest {
    request(
        Op::Upsert,
        "users",
        "external_id",
        key,
        version,
        json!({ "name": name }),
    )
}

fn write_batch(c: &dyn Connector, requests: Vec<WriteRequest>) -> Vec<Result<WriteOk, DeliveryError>> {
    let (calls_done, _) = CallsDone::pair();
    block(c.write_batch(requests, calls_done))
}

fn name_of(zd: &ZendeskSandbox, object: &str, key: &str) -> Option<String> {
    let found: Vec<Map<String, Value>> = zd.find(object, key);
    found.first().and_then(|r| r["name"].as_str()).map(str::to_string)
}

fn zendesk() -> ZendeskSandbox {
    ZendeskSandbox::start("127.0.0.1:0", ZendeskSetup::standard(CLIENT_ID, CLIENT_SECRET)).unwrap()
}

#[test]
fn zendesk_organizations_are_written_through_calls_that_exist() {
    let zd = zendesk();
    // The sandbox answers the missing bulk endpoint as Zendesk does.
    let missing = block(async {
        reqwest::Client::new()
            .post(format!("{}/api/v2/organizations/create_or_update_many", zd.base_url()))
            .basic_auth(format!("{}/token", zd.api_token().0), Some(zd.api_token().1))
            .json(&json!({"organizations": [{"name": "Acme", "external_id": "o-0"}]}))
            .send()
            .await
            .unwrap()
            .status()
    });
    assert_eq!(missing, 404);
    let rejected_before = zd.stats().rejected;

    let config = config_for(&zd);
    let c = connector(&config);
    assert_eq!(
        c.max_batch(Op::Upsert, "organizations"),
        1,
        "no bulk upsert for organizations"
    );
    let orgs: Vec<WriteRequest> = (1..=3)
        .map(|i| {
            request(
                Op::Upsert,
                "organizations",
                "external_id",
                &format!("o-{i}"),
                1,
                json!({ "name": format!("Org {i}") }),
            )
        })
        .collect();
    let results = write_batch(c.as_ref(), orgs);
    assert_eq!(results, vec![Ok(WriteOk::Created); 3]);
    assert_eq!(name_of(&zd, "organizations", "o-2").as_deref(), Some("Org 2"));
    assert_eq!(zd.stats().rejected, rejected_before, "no call was refused");
}

#[test]
fn a_zendesk_403_for_a_scope_is_the_tenant_s_auth_failure_not_a_missing_bulk_import() {
    let zd = zendesk();
    let mut config = config_for(&zd);
    config.tenants[0].zendesk.as_mut().unwrap().oauth_scope = "read".into();
    let read_only = connector(&config);
    let results = write_batch(read_only.as_ref(), vec![user("u-1", 1, "A"), user("u-2", 1, "B")]);
    for r in &results {
        let e = r.as_ref().expect_err("a read-only token cannot write");
        assert_eq!((e.code, e.http_status), (ErrorCode::CrmAuth, Some(403)), "{e}");
    }
    assert_eq!(
        read_only.max_batch(Op::Upsert, "users"),
        100,
        "a scope refusal does not switch the tenant to single calls"
    );
    assert!(zd.records("users").is_empty());

    // The same 403 from an account without bulk import: single calls, which work.
    zd.set_bulk_enabled(false);
    let no_bulk = connector(&config_for(&zd));
    let results = write_batch(no_bulk.as_ref(), vec![user("u-1", 1, "A"), user("u-2", 1, "B")]);
    assert_eq!(results, vec![Ok(WriteOk::Created); 2]);
    assert_eq!(no_bulk.max_batch(Op::Upsert, "users"), 1);
}

#[test]
fn a_late_zendesk_job_holds_its_record_until_it_has_run() {
    let zd = zendesk();
    // A slow job queue: jobs stay queued until it moves again.
    zd.set_job_queue_stalled(true);
    let mut config = config_for(&zd);
    config.tenants[0].zendesk.as_mut().unwrap().job_timeout_ms = 200;
    let c = connector(&config);

    // The job outlives the timeout: its records are told to wait, not failed.
    let first = write_batch(c.as_ref(), vec![user("u-1", 1, "Old"), user("u-2", 1, "Two")]);
    for r in &first {
        assert!(r.as_ref().is_err_and(DeliveryError::is_wait), "{r:?}");
    }
    let second = write_batch(c.as_ref(), vec![user("u-1", 2, "New"), user("u-3", 1, "Three")]);
    assert!(second[0].as_ref().is_err_and(DeliveryError::is_wait), "{:?}", second[0]);
    assert_eq!(second[1], Ok(WriteOk::Created), "a record no job holds is written");
    let single = block(c.write(user("u-1", 2, "New")));
    assert!(
        single.as_ref().is_err_and(DeliveryError::is_wait),
        "a single write waits too: {single:?}"
    );
    // Not even the job's own event goes again: its replay would queue a second job,
    // which could go late too and take another of the account's 30 job slots.
    let replay = write_batch(c.as_ref(), vec![user("u-1", 1, "Old"), user("u-2", 1, "Two")]);
    assert!(
        replay.iter().all(|r| r.as_ref().is_err_and(DeliveryError::is_wait)),
        "{replay:?}"
    );
    assert_eq!(zd.open_jobs(), 1, "no second job was queued");
    assert!(name_of(&zd, "users", "u-1").is_none());

    // Once the late job has run (and been polled), the record is free again.
    zd.set_job_queue_stalled(false);
    zd.run_stalled_jobs();
    assert_eq!(name_of(&zd, "users", "u-1").as_deref(), Some("Old"));
    assert!(wait_until(WAIT, || write_batch(
        c.as_ref(),
        vec![user("u-1", 2, "New")]
    )[0]
    .is_ok()));
    assert_eq!(name_of(&zd, "users", "u-1").as_deref(), Some("New"));
}

#[test]
fn a_job_whose_status_cannot_be_read_still_holds_its_records() {
    let zd = zendesk();
    zd.set_job_queue_stalled(true);
    let mut config = config_for(&zd);
    // May write users, may not read job statuses: every poll is refused (403).
    config.tenants[0].zendesk.as_mut().unwrap().oauth_scope = "users:write".into();
    let c = connector(&config);
    let first = write_batch(c.as_ref(), vec![user("u-1", 1, "Old"), user("u-2", 1, "Two")]);
    for r in &first {
        assert!(
            r.as_ref().is_err_and(DeliveryError::is_wait),
            "not the records' failure: {r:?}"
        );
    }
    let newer = block(c.write(user("u-1", 2, "New")));
    assert!(newer.as_ref().is_err_and(DeliveryError::is_wait), "{newer:?}");
}

#[test]
fn a_403_probe_that_is_throttled_decides_nothing() {
    let zd = zendesk();
    zd.set_bulk_enabled(false);
    // The bulk call is let through (and refused, 403); the probe after it is throttled.
    zd.set_rate_limit_per_minute(1);
    let c = connector(&config_for(&zd));
    let results = write_batch(c.as_ref(), vec![user("u-1", 1, "A"), user("u-2", 1, "B")]);
    for r in &results {
        let e = r.as_ref().expect_err("throttled");
        assert!(e.is_retryable() && e.http_status == Some(429), "{e}");
    }
    assert_eq!(
        c.max_batch(Op::Upsert, "users"),
        100,
        "bulk is decided on a probe that answered"
    );
}

#[test]
fn a_write_that_may_still_land_holds_its_record_against_other_versions() {
    let zd = zendesk();
    let c = connector(&config_for(&zd));
    let org = |key: &str, version: u64| {
        request(
            Op::Upsert,
            "organizations",
            "external_id",
            key,
            version,
            json!({ "name": format!("{key} v{version}") }),
        )
    };
    // Zendesk carries the write out, but the answer is lost at a gateway (504).
    zd.script([Scripted::LostResponse]);
    let lost = block(c.write(org("o-1", 1))).expect_err("the answer was lost");
    assert_eq!(lost.http_status, Some(504));
    let newer = block(c.write(org("o-1", 2)));
    assert!(newer.as_ref().is_err_and(DeliveryError::is_wait), "{newer:?}");
    assert_ne!(name_of(&zd, "organizations", "o-1").as_deref(), Some("o-1 v2"));
    // The same version carries the same data: it goes, as do other records.
    assert_eq!(block(c.write(org("o-1", 1))), Ok(WriteOk::Updated));
    assert_eq!(block(c.write(org("o-2", 1))), Ok(WriteOk::Created));
}

/// A connection that breaks after the request was sent may have delivered it; one that
/// could not be made did not.
#[test]
fn a_write_whose_connection_broke_after_sending_holds_its_record() {
    // Reads each request, then closes the connection without an answer.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut buf = [0u8; 4096];
            let _ = std::io::Read::read(&mut stream, &mut buf);
        }
    });
    let config_at = |url: &str| {
        let text = format!(
            "[kafka]\nbootstrap_servers = \"127.0.0.1:9\"\ngroup_id = \"g\"\ninput_topics = [\"in\"]\ndlq_topic = \"d\"\nfailures_topic = \"f\"\nstate_topic = \"s\"\n\n[[tenants]]\nname = \"acme\"\ncrm = \"zendesk\"\nrequest_timeout_ms = 5000\n[tenants.zendesk]\nbase_url = \"{url}\"\nemail = \"a@b.c\"\napi_token = \"t\"\n[tenants.entities.org]\nobject = \"organizations\"\nexternal_id_field = \"external_id\"\nfields = {{ name = \"name\" }}\n"
        );
        Config::from_toml_with_env(&text, |_| None).expect("valid config")
    };
    let org = |version: u64| {
        request(
            Op::Upsert,
            "organizations",
            "external_id",
            "o-1",
            version,
            json!({"name": "O"}),
        )
    };

    let broken = connector(&config_at(&format!("http://{addr}")));
    let lost = block(broken.write(org(1))).expect_err("no answer");
    assert_eq!(lost.code, ErrorCode::CrmConnectionLost, "{lost}");
    let newer = block(broken.write(org(2)));
    assert!(newer.as_ref().is_err_and(DeliveryError::is_wait), "{newer:?}");

    // Nothing listens here: the request never left.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let refused = connector(&config_at(&format!("http://{closed}")));
    let never_sent = block(refused.write(org(1))).expect_err("refused");
    assert_eq!(never_sent.code, ErrorCode::CrmConnection, "{never_sent}");
    let newer = block(refused.write(org(2))).expect_err("refused again");
    assert_eq!(newer.code, ErrorCode::CrmConnection, "not held: {newer}");
}

/// Through the whole pipeline: an older version's job that lands late does not leave the
/// record on the older version.
#[test]
fn the_pipeline_never_lets_a_late_job_overwrite_a_newer_version() {
    let zd = ZendeskSandbox::start("127.0.0.1:0", ZendeskSetup::standard(CLIENT_ID, CLIENT_SECRET)).unwrap();
    zd.set_job_duration_ms(2_000);
    let env = Env::new(1);
    let mut config = env.config_for(&zd);
    config.tenants[0].batch_linger_ms = 300;
    config.tenants[0].zendesk.as_mut().unwrap().job_timeout_ms = 300;
    let service = pipeline::start(config).expect("service starts");
    // Two records, so that they travel in one job.
    env.produce(&[
        upsert("e1", "Z-1", 1, "Ada", "Old"),
        upsert("e2", "Z-2", 1, "Bob", "Two"),
    ]);
    assert!(wait_until(WAIT, || zd.open_jobs() == 1), "the first job was queued");
    zd.set_job_duration_ms(0);
    env.produce(&[
        upsert("e3", "Z-1", 2, "Ada", "New"),
        upsert("e4", "Z-3", 1, "Cy", "Three"),
    ]);
    assert!(wait_until(WAIT, || zd.open_jobs() == 0), "the late job ran");
    assert!(env.wait_drained(WAIT), "every event has an outcome");
    assert!(
        wait_until(WAIT, || name_of(&zd, "users", "Z-1").as_deref() == Some("New")),
        "Z-1 holds {:?}",
        name_of(&zd, "users", "Z-1")
    );
    assert_eq!(name_of(&zd, "users", "Z-3").as_deref(), Some("Three"));
    assert!(env.read_dlq().is_empty(), "waiting for a job dead-letters nothing");
    service.stop(StopMode::Graceful);
}

/// A Zendesk sandbox whose job queue is stalled, and the config of a pipeline on it with
/// a retry topic, a 300 ms linger (two records share a job) and `job_timeout_ms`.
fn stalled_zendesk_pipeline(job_timeout_ms: u64) -> (ZendeskSandbox, Env, Config) {
    let zd = zendesk();
    zd.set_job_queue_stalled(true);
    let env = Env::new(1);
    let mut config = env.config_for(&zd);
    config.kafka.retry_topic = Some(env.retry.clone());
    config.tenants[0].batch_linger_ms = 300;
    config.tenants[0].zendesk.as_mut().unwrap().job_timeout_ms = job_timeout_ms;
    (zd, env, config)
}

/// Messages written to `topic` so far, all partitions.
fn messages_on(env: &Env, topic: &str) -> i64 {
    tools::end_offsets(&env.bootstrap, topic, env.partitions)
        .map(|ends| ends.iter().sum::<i64>())
        .unwrap_or(0)
}

/// Waiting for a late job is not a failure: a version parked for it carries no age, so
/// a retryable failure after a long job does not find it past `retry.max_age_ms`.
#[test]
fn a_version_parked_behind_a_late_job_starts_no_age_clock() {
    let (zd, env, config) = stalled_zendesk_pipeline(300);
    let service = pipeline::start(config).expect("service starts");
    env.produce(&[
        upsert("e1", "Z-1", 1, "Ada", "Old"),
        upsert("e2", "Z-2", 1, "Bob", "Two"),
    ]);
    let parked = || messages_on(&env, &env.retry);
    assert!(wait_until(WAIT, || parked() >= 2), "the waiting versions were parked");
    let headers = |m: &tools::ReadMessage, name: &str| -> u64 { m.headers[name].parse().unwrap() };
    for m in tools::read_all(&env.bootstrap, &env.retry, env.partitions, WAIT).unwrap() {
        let first_failure = headers(&m, "crm-sync.retry.first-failure-ms");
        let not_before = headers(&m, "crm-sync.retry.not-before-ms");
        assert!(
            first_failure >= not_before,
            "a version that never failed ages from when it is due, not from its park: {first_failure} < {not_before}"
        );
        assert_eq!(m.headers["crm-sync.retry.attempts"], "0", "waiting is no attempt");
    }
    zd.set_job_queue_stalled(false);
    zd.run_stalled_jobs();
    assert!(env.wait_drained(WAIT), "every event has an outcome");
    assert_eq!(name_of(&zd, "users", "Z-1").as_deref(), Some("Old"));
    assert!(env.read_dlq().is_empty());
    service.stop(StopMode::Graceful);
}

/// A late job's hold is on the state topic: the record's next owner (here, after a
/// restart) holds the record too, follows the job, and writes the newer version only once
/// the job has run.
#[test]
fn the_next_owner_holds_a_record_whose_late_job_may_still_land() {
    let (zd, env, config) = stalled_zendesk_pipeline(300);
    let first = pipeline::start(config.clone()).expect("service starts");
    env.produce(&[
        upsert("e1", "Z-1", 1, "Ada", "Old"),
        upsert("e2", "Z-2", 1, "Bob", "Two"),
    ]);
    let parked = || messages_on(&env, &env.retry);
    assert!(
        wait_until(WAIT, || parked() >= 2),
        "the job went late and its events were parked"
    );
    first.stop(StopMode::Graceful);
    // The late job is still queued at Zendesk; jobs queued from now on run at once.
    zd.set_job_queue_stalled(false);

    let second = pipeline::start(config).expect("service starts again");
    env.produce(&[
        upsert("e3", "Z-1", 2, "Ada", "New"),
        upsert("e4", "Z-3", 1, "Cy", "Three"),
    ]);
    assert!(wait_until(WAIT, || name_of(&zd, "users", "Z-3").as_deref() == Some("Three")));
    assert_eq!(name_of(&zd, "users", "Z-1"), None, "Z-1 waits for the late job");
    zd.run_stalled_jobs();
    assert!(
        wait_until(WAIT, || name_of(&zd, "users", "Z-1").as_deref() == Some("New")),
        "Z-1 holds {:?}",
        name_of(&zd, "users", "Z-1")
    );
    assert!(env.wait_drained(WAIT), "every event has an outcome");
    assert_eq!(name_of(&zd, "users", "Z-1").as_deref(), Some("New"));
    assert_eq!(name_of(&zd, "users", "Z-2").as_deref(), Some("Two"));
    assert!(env.read_dlq().is_empty());
    second.stop(StopMode::Graceful);
}

/// A job's hold is on the state topic from the moment it is queued: a member that dies
/// while it waits for the job leaves the hold to the record's next owner.
#[test]
fn a_member_killed_while_its_job_runs_leaves_the_hold_to_the_next_owner() {
    // Long: the first member is still waiting for its job when it dies.
    let (zd, env, config) = stalled_zendesk_pipeline(60_000);
    let state_messages = || messages_on(&env, &env.state);
    let first = pipeline::start(config.clone()).expect("service starts");
    env.produce(&[
        upsert("e1", "Z-1", 1, "Ada", "Old"),
        upsert("e2", "Z-2", 1, "Bob", "Two"),
    ]);
    assert!(
        wait_until(WAIT, || zd.open_jobs() == 1 && state_messages() >= 2),
        "the job is queued and its holds are on the state topic"
    );
    first.stop(StopMode::Abort);
    zd.set_job_queue_stalled(false);

    let second = pipeline::start(config).expect("service starts again");
    env.produce(&[
        upsert("e3", "Z-1", 2, "Ada", "New"),
        upsert("e4", "Z-3", 1, "Cy", "Three"),
    ]);
    assert!(wait_until(WAIT, || name_of(&zd, "users", "Z-3").as_deref() == Some("Three")));
    assert_eq!(
        name_of(&zd, "users", "Z-1"),
        None,
        "Z-1 waits for the dead member's job"
    );
    zd.run_stalled_jobs();
    assert!(
        wait_until(WAIT, || name_of(&zd, "users", "Z-1").as_deref() == Some("New")),
        "Z-1 holds {:?}",
        name_of(&zd, "users", "Z-1")
    );
    assert!(env.wait_drained(WAIT), "every event has an outcome");
    assert_eq!(name_of(&zd, "users", "Z-1").as_deref(), Some("New"));
    assert!(env.read_dlq().is_empty());
    second.stop(StopMode::Graceful);
}

#[test]
fn dataverse_batches_of_deletes_are_well_formed() {
    let d = DynamicsSandbox::start("127.0.0.1:0", DynamicsSetup::standard(CLIENT_ID, CLIENT_SECRET)).unwrap();
    let c = connector(&config_for(&d));
    let contact = |op, key: &str| request(op, "contacts", "crm_externalid", key, 1, json!({ "lastname": key }));
    let upserts = write_batch(c.as_ref(), vec![contact(Op::Upsert, "D-1"), contact(Op::Upsert, "D-2")]);
    assert!(upserts.iter().all(Result::is_ok), "{upserts:?}");
    // The sandbox reads `$batch` bodies as a strict RFC 2046 parser does
    // (sandbox_crms.rs: a part without a body and without its blank line is refused).
    let deletes = write_batch(c.as_ref(), vec![contact(Op::Delete, "D-1"), contact(Op::Delete, "D-2")]);
    assert_eq!(deletes, vec![Ok(WriteOk::Deleted); 2]);
    assert!(d.find("contacts", "D-1").is_none() && d.find("contacts", "D-2").is_none());
    assert!(
        d.stats().rejected.is_empty(),
        "no batch was refused: {:?}",
        d.stats().rejected
    );
}

/// A 404 to a delete means "already gone" only when it says the record does not exist;
/// an entity set the environment lacks is a mapping error, not a deleted record.
#[test]
fn a_dataverse_404_for_a_missing_entity_set_is_not_a_deleted_record() {
    let d = DynamicsSandbox::start("127.0.0.1:0", DynamicsSetup::standard(CLIENT_ID, CLIENT_SECRET)).unwrap();
    let c = connector(&config_for(&d));
    let delete = |set: &str| request(Op::Delete, set, "crm_externalid", "N-1", 1, json!({}));
    assert_eq!(block(c.write(delete("contacts"))), Ok(WriteOk::AlreadyAbsent));
    let wrong_set = block(c.write(delete("contactz"))).expect_err("no such entity set");
    assert_eq!(
        (wrong_set.code, wrong_set.http_status),
        (ErrorCode::CrmNotFound, Some(404)),
        "{wrong_set}"
    );
    assert!(!wrong_set.is_retryable());
}

#[test]
fn a_dataverse_batch_refused_as_a_whole_fails_none_of_its_records() {
    let d = DynamicsSandbox::start("127.0.0.1:0", DynamicsSetup::standard(CLIENT_ID, CLIENT_SECRET)).unwrap();
    let c = connector(&config_for(&d));
    let contact = |key: &str| {
        request(
            Op::Upsert,
            "contacts",
            "crm_externalid",
            key,
            1,
            json!({ "lastname": key }),
        )
    };
    // A 400 for the batch names no record: each is written alone instead.
    d.script([DynamicsScripted::BadRequest]);
    let results = write_batch(c.as_ref(), vec![contact("W-1"), contact("W-2")]);
    assert_eq!(results, vec![Ok(WriteOk::Updated); 2]);
    assert!(d.find("contacts", "W-1").is_some() && d.find("contacts", "W-2").is_some());
    assert_eq!(d.stats().rejected.get(&400), Some(&1));

    // A throttle on the way is every remaining record's: no further calls.
    d.script([DynamicsScripted::BadRequest, DynamicsScripted::TooManyRequests]);
    let calls = d.stats().api_requests;
    let results = write_batch(c.as_ref(), vec![contact("W-3"), contact("W-4"), contact("W-5")]);
    assert!(
        results
            .iter()
            .all(|r| r.as_ref().is_err_and(DeliveryError::is_retryable)),
        "{results:?}"
    );
    assert_eq!(
        d.stats().api_requests - calls,
        2,
        "the batch and one record, then no more"
    );
}
