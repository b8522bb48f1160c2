//! Zendesk beyond the shared scenarios: tickets (no upsert, `Idempotency-Key`), API-token
//! auth, and an account without bulk import.

mod common;

use std::time::Duration;

use common::*;
use crm_sync::config::Config;
use crm_sync::consume::StopMode;
use crm_sync::demo::workload::{envelope, kafka_key, RecordId};
use crm_sync::pipeline;
use crm_sync::sandbox::zendesk::{Scripted, ZendeskSandbox, ZendeskSetup};
use serde_json::{json, Map, Value};

const WAIT: Duration = Duration::from_secs(60);

fn sandbox() -> ZendeskSandbox {
    ZendeskSandbox::start("127.0.0.1:0", ZendeskSetup::standard(CLIENT_ID, CLIENT_SECRET)).unwrap()
}

/// The scenario config plus a `ticket` entity.
fn config_with_tickets(env: &Env, zd: &ZendeskSandbox) -> Config {
    let text = env.config_toml_for(zd, "CRM_SECRET")
        + r#"[tenants.entities.ticket]
object = "tickets"
external_id_field = "external_id"
fields = { subject = "subject", description = "description", priority = "priority" }
"#;
    Config::from_toml_with_env(&text, |v| (v == "CRM_SECRET").then(|| CLIENT_SECRET.to_string())).unwrap()
}

fn ticket_event(event_id: &str, key: &str, version: u64, subject: &str) -> (String, Vec<u8>) {
    let id: RecordId = ("acme".into(), "ticket".into(), key.into());
    let mut data = Map::new();
    data.insert("subject".into(), json!(subject));
    data.insert("description".into(), json!("My order never arrived."));
    data.insert("priority".into(), json!("high"));
    (
        kafka_key(&id.0, &id.1, &id.2),
        envelope(event_id, &id, "upsert", version, Some(&data)),
    )
}

#[test]
fn tickets_are_created_once_then_updated_in_place() {
    let env = Env::new(1);
    let zd = sandbox();
    let mut config = config_with_tickets(&env, &zd);
    // The lost answer (504) holds the ticket against newer versions for this long
    // (`connectors::holds`, tested in crm_fidelity.rs); short here, so that step 2 is
    // written within the test.
    config.tenants[0].late_write_window_ms = 500;
    let service = pipeline::start(config).unwrap();
    // 1. The create's answer is lost after Zendesk made the ticket: the retry must not
    //    make a second one.
    zd.script([Scripted::ServerError, Scripted::LostResponse]);
    env.produce(&[ticket_event("t1", "T-1", 1, "Order 1 missing")]);
    assert!(env.wait_all_committed(WAIT));
    let tickets = zd.find("tickets", "T-1");
    assert_eq!(tickets.len(), 1, "one ticket, whatever the retries: {tickets:?}");
    assert_eq!(
        tickets[0]["description"], "My order never arrived.",
        "the description is the first comment"
    );
    // 2. A new version updates that ticket, without appending a comment.
    env.produce(&[ticket_event("t2", "T-1", 2, "Order 1 found")]);
    assert!(env.wait_all_committed(WAIT));
    let tickets = zd.find("tickets", "T-1");
    assert_eq!(tickets.len(), 1);
    assert_eq!(tickets[0]["subject"], "Order 1 found");
    assert_eq!(tickets[0]["comment_count"], 1, "updates add no comment");
    assert!(env.read_dlq().is_empty());
    // 3. A delete finds it by external id.
    let id: RecordId = ("acme".into(), "ticket".into(), "T-1".into());
    env.produce(&[(kafka_key(&id.0, &id.1, &id.2), envelope("t3", &id, "delete", 3, None))]);
    assert!(env.wait_all_committed(WAIT));
    assert!(zd.find("tickets", "T-1").is_empty());
    service.stop(StopMode::Graceful);
}

#[test]
fn api_token_auth_delivers_and_a_wrong_token_pauses_the_tenant_without_dead_lettering() {
    let env = Env::new(1);
    let zd = sandbox();
    let (email, token) = zd.api_token();
    let good = env.config_toml_for(&zd, "UNUSED").replace(
        &format!("oauth_client_id = \"{CLIENT_ID}\"\noauth_client_secret = \"${{UNUSED}}\""),
        &format!("email = \"{email}\"\napi_token = \"${{ZD_TOKEN}}\""),
    );
    assert!(good.contains("api_token"), "{good}");
    let config = |t: &str| {
        let t = t.to_string();
        Config::from_toml_with_env(&good, move |v| (v == "ZD_TOKEN").then(|| t.clone())).unwrap()
    };
    let service = pipeline::start(config(&token)).unwrap();
    env.produce(&[upsert("e1", "C-1", 1, "Ada", "Lovelace")]);
    assert!(env.wait_all_committed(WAIT));
    assert_eq!(zd.find("users", "C-1").len(), 1);
    service.stop(StopMode::Graceful);

    // A wrong token: the tenant is auth_failed, probes now and then, and waits for the
    // right one; the event is not dead-lettered.
    let service = pipeline::start(config("not-the-token")).unwrap();
    env.produce(&[upsert("e2", "C-2", 1, "Grace", "Hopper")]);
    assert!(wait_until(WAIT, || zd.stats().rejected.get(&401).copied().unwrap_or(0) >= 2));
    assert!(env.read_dlq().is_empty());
    assert!(zd.find("users", "C-2").is_empty());
    let failures: String = env
        .read_failures()
        .iter()
        .filter_map(|m| m.payload.as_deref().map(|p| String::from_utf8_lossy(p).into_owned()))
        .collect();
    assert!(failures.contains("auth_failed"), "{failures}");
    assert!(
        !failures.contains("not-the-token"),
        "the token never reaches the failures topic"
    );
    service.stop(StopMode::Graceful);
    // The right token again: the waiting event is delivered.
    let service = pipeline::start(config(&token)).unwrap();
    assert!(env.wait_all_committed(WAIT));
    assert_eq!(zd.find("users", "C-2").len(), 1);
    assert!(env.read_dlq().is_empty());
    service.stop(StopMode::Graceful);
}

#[test]
fn an_account_without_bulk_import_gets_one_call_per_record() {
    let env = Env::new(1);
    let zd = sandbox();
    zd.set_bulk_enabled(false);
    let mut config = env.config_for(&zd);
    config.tenants[0].batch_linger_ms = 200;
    let service = pipeline::start(config).unwrap();
    let names = ["Ada", "Grace", "Alan", "Edsger"];
    let events: Vec<_> = names
        .iter()
        .enumerate()
        .map(|(i, n)| upsert(&format!("e{i}"), &format!("C-{i}"), 1, n, "Example"))
        .collect();
    env.produce(&events);
    assert!(env.wait_all_committed(WAIT));
    for i in 0..names.len() {
        assert_eq!(zd.find("users", &format!("C-{i}")).len(), 1, "C-{i}");
    }
    assert!(env.read_dlq().is_empty());
    assert_eq!(
        zd.stats().rejected.get(&403),
        Some(&1),
        "one refused bulk call, then singles"
    );
    service.stop(StopMode::Graceful);
}

#[test]
fn open_jobs_are_polled_together_without_holding_the_concurrency_permit() {
    let env = Env::new(1);
    let mut setup = ZendeskSetup::standard(CLIENT_ID, CLIENT_SECRET);
    let job_ms = 1000;
    setup.job_duration_ms = job_ms;
    let zd = ZendeskSandbox::start("127.0.0.1:0", setup).unwrap();
    let mut config = env.config_for(&zd);
    let tenant = &mut config.tenants[0];
    // One call at a time, five records a job: three jobs for fifteen users.
    tenant.max_concurrency = 1;
    tenant.batch_size = 5;
    let poll_ms = tenant.zendesk.as_ref().unwrap().job_poll_interval_ms;
    let service = pipeline::start(config).unwrap();
    let events: Vec<_> = (0..15)
        .map(|i| upsert(&format!("e{i}"), &format!("C-{i}"), 1, &format!("N{i}"), "Jobs"))
        .collect();
    env.produce(&events);
    assert!(env.wait_all_committed(WAIT));
    assert!(env.read_dlq().is_empty());
    assert_eq!(zd.records("users").len(), 15);
    // Had each job kept the one permit until its result, the jobs would have run one
    // after another, each polled on its own: at least 3 × job_ms / poll_ms polls. Open
    // together and polled together, they cost about one job's worth of polls.
    let requests = zd.stats().api_requests;
    let one_job_of_polls = job_ms / poll_ms;
    assert!(
        requests < 2 * one_job_of_polls,
        "{requests} requests; one job's worth of polls is {one_job_of_polls}"
    );
    service.stop(StopMode::Graceful);
}

#[test]
fn a_slow_job_is_followed_to_its_result() {
    let env = Env::new(1);
    let mut setup = ZendeskSetup::standard(CLIENT_ID, CLIENT_SECRET);
    setup.job_duration_ms = 300;
    let zd = ZendeskSandbox::start("127.0.0.1:0", setup).unwrap();
    let mut config = env.config_for(&zd);
    config.tenants[0].batch_linger_ms = 200;
    let service = pipeline::start(config).unwrap();
    let events: Vec<_> = (0..3)
        .map(|i| upsert(&format!("e{i}"), &format!("C-{i}"), 1, &format!("N{i}"), "Job"))
        .collect();
    env.produce(&events);
    assert!(env.wait_all_committed(WAIT));
    // One job, polled (every 20 ms) while queued and working, until completed.
    let requests = zd.stats().api_requests;
    assert!(requests >= 4, "the job was polled until done: {requests} requests");
    assert!(env.read_dlq().is_empty());
    let user: Value = Value::Object(zd.find("users", "C-1").remove(0));
    assert_eq!(user["name"], "Job");
    // The rate-limit headers' remaining quota is exported for the tenant.
    let (_, text) = http_get(format!("http://{}/metrics", service.http_addr()));
    let remaining = crm_sync::demo::metric_total(&text, "crm_sync_crm_quota_remaining", Some(("tenant", "acme")));
    assert!(remaining > 0.0 && remaining < 1_000_000.0, "{remaining}");
    service.stop(StopMode::Graceful);
}
