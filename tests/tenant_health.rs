//! An outage is not bad data (DESIGN promise 9): a CRM that is down longer than every
//! retry bound, or that refuses our credentials, stops its tenant's writes — parked, never
//! dead-lettered — while the other tenants flow; when it recovers (or gets the right
//! secret), everything is delivered.

mod common;

use std::time::{Duration, Instant};

use common::*;
use crm_sync::config::Config;
use crm_sync::consume::StopMode;
use crm_sync::demo::workload::{envelope, kafka_key, RecordId};
use crm_sync::pipeline;
use crm_sync::sandbox::common::Faults;
use crm_sync::sandbox::zendesk::{ZendeskSandbox, ZendeskSetup};
use crm_sync::sandbox::CrmSandbox;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);
const MAX_AGE: Duration = Duration::from_millis(2_000);
const RECORDS: usize = 40;

/// Retry bounds far shorter than the outages below, a retry topic, and a breaker that
/// probes every 200 ms to 800 ms.
fn tighten(config: &mut Config, env: &Env) {
    config.kafka.retry_topic = Some(env.retry.clone());
    config.retry.max_attempts = 3;
    config.retry.base_delay_ms = 50;
    config.retry.max_delay_ms = 500;
    config.retry.max_age_ms = MAX_AGE.as_millis() as u64;
    config.breaker.failure_threshold = 3;
    config.breaker.probe_interval_ms = 200;
    config.breaker.max_probe_interval_ms = 800;
}

fn noisy(i: usize) -> (String, Vec<u8>) {
    let id: RecordId = ("down".into(), "contact".into(), format!("N-{i}"));
    let data = contact_data(&format!("N{i}"), Some("Down"));
    (
        kafka_key(&id.0, &id.1, &id.2),
        envelope(&format!("n{i}"), &id, "upsert", 1, Some(&data)),
    )
}

/// The tenant-state events of the failures topic, as (tenant, to).
fn transitions(env: &Env) -> Vec<(String, String)> {
    env.read_failures()
        .iter()
        .filter_map(|m| serde_json::from_slice::<Value>(m.payload.as_deref()?).ok())
        .filter(|e| e["kind"] == "tenant_state")
        .map(|e| {
            (
                e["tenant"].as_str().unwrap_or_default().into(),
                e["to"].as_str().unwrap_or_default().into(),
            )
        })
        .collect()
}

#[test]
fn an_outage_three_times_max_age_dead_letters_nothing_and_holds_up_no_other_tenant() {
    let env = Env::new(2);
    let zd = ZendeskSandbox::start("127.0.0.1:0", ZendeskSetup::standard(CLIENT_ID, CLIENT_SECRET)).unwrap();
    let text = env.config_toml_for(&env.sf, "SF_SECRET")
        + "\n[[tenants]]\nname = \"down\"\nrequest_timeout_ms = 5000\n"
        + &zd.tenant_toml("ZD_SECRET");
    let mut config = Config::from_toml_with_env(&text, |v| match v {
        "SF_SECRET" => Some(CLIENT_SECRET.to_string()),
        "ZD_SECRET" => Some(zd.secret()),
        _ => None,
    })
    .unwrap();
    tighten(&mut config, &env);
    // Enough attempts that only age could dead-letter a record after the outage.
    config.retry.max_attempts = 50;
    // Every data call of tenant `down` fails with 503.
    zd.set_faults(Faults {
        server_error_rate: 1.0,
        ..Faults::default()
    });
    let service = pipeline::start(config).unwrap();
    let outage = Instant::now();
    let mut mixed = Vec::new();
    for i in 0..RECORDS {
        mixed.push(noisy(i));
        mixed.push(upsert(
            &format!("q{i}"),
            &format!("Q-{i}"),
            1,
            &format!("Q{i}"),
            "Quiet",
        ));
    }
    env.produce(&mixed);
    assert!(
        wait_until(WAIT, || (0..RECORDS).all(|i| env.contact(&format!("Q-{i}")).is_some())),
        "the other tenant's events were delivered during the outage"
    );
    // The outage lasts three times the longest an event may be retried.
    assert!(wait_until(WAIT, || outage.elapsed() >= 3 * MAX_AGE));
    assert!(zd.records("users").is_empty(), "nothing got through the outage");
    assert!(
        transitions(&env).contains(&("down".into(), "open".into())),
        "the breaker opened: {:?}",
        transitions(&env)
    );
    // It recovers, shakily: one call in five still fails. A record that failed before the
    // outage and fails once more now must not be found too old.
    zd.set_faults(Faults {
        server_error_rate: 0.2,
        ..Faults::default()
    });
    assert!(env.wait_drained(WAIT), "every event has an outcome");
    let users = zd.records("users");
    assert_eq!(users.len(), RECORDS, "every record of the outage converged");
    assert!(env.read_dlq().is_empty(), "the outage dead-lettered nothing");
    assert!(transitions(&env).contains(&("down".into(), "closed".into())));
    service.stop(StopMode::Graceful);
}

#[test]
fn a_wrong_secret_dead_letters_nothing_and_the_right_one_delivers_everything() {
    let env = Env::new(1);
    // Beside it, a tenant whose credentials are right goes on flowing.
    let zd = ZendeskSandbox::start("127.0.0.1:0", ZendeskSetup::standard(CLIENT_ID, CLIENT_SECRET)).unwrap();
    let text = env.config_toml_for(&env.sf, "SF_SECRET")
        + "\n[[tenants]]\nname = \"down\"\nrequest_timeout_ms = 5000\n"
        + &zd.tenant_toml("ZD_SECRET");
    let zd_secret = zd.secret();
    let config_with = |secret: &'static str| {
        let mut config = Config::from_toml_with_env(&text, |v| match v {
            "ZD_SECRET" => Some(zd_secret.clone()),
            _ => Some(secret.to_string()),
        })
        .unwrap();
        tighten(&mut config, &env);
        config
    };
    let service = pipeline::start(config_with("not-the-secret")).unwrap();
    let events: Vec<_> = (0..30)
        .map(|i| upsert(&format!("w{i}"), &format!("W-{i}"), 1, &format!("W{i}"), "Secret"))
        .collect();
    env.produce(&events);
    assert!(
        wait_until(WAIT, || transitions(&env)
            .contains(&("acme".into(), "auth_failed".into()))),
        "{:?}",
        transitions(&env)
    );
    // While acme waits for a secret, the other tenant's events on the same partition flow.
    env.produce(&(0..RECORDS).map(noisy).collect::<Vec<_>>());
    assert!(
        wait_until(WAIT, || zd.records("users").len() == RECORDS),
        "the other tenant delivered while acme was auth_failed"
    );
    // Refused, probed again and refused again, for longer than any event may be retried.
    let start = Instant::now();
    assert!(wait_until(WAIT, || start.elapsed() >= 2 * MAX_AGE));
    assert!(env.read_dlq().is_empty(), "a wrong secret dead-lettered nothing");
    assert!(env.sf.stats().token_requests >= 3, "probed: {:?}", env.sf.stats());
    assert!(env.sf.records("Contact").is_empty());
    service.stop(StopMode::Graceful);

    let service = pipeline::start(config_with(CLIENT_SECRET)).unwrap();
    assert!(env.wait_drained(WAIT), "every event has an outcome");
    assert!(
        (0..30).all(|i| env.contact(&format!("W-{i}")).is_some()),
        "every record converged"
    );
    assert!(env.read_dlq().is_empty());
    service.stop(StopMode::Graceful);
}

/// One record the CRM cannot process, among others that go through, is that record's
/// failure: it is dead-lettered once its retries are used up, and the tenant stays closed.
#[test]
fn a_record_the_crm_alone_keeps_failing_is_still_dead_lettered() {
    let env = Env::new(1);
    let mut config = env.config();
    tighten(&mut config, &env);
    config.tenants[0].batch_size = 1;
    env.sf.set_faults(Faults {
        failing_keys: vec!["P-1".into()],
        ..Faults::default()
    });
    let service = pipeline::start(config).unwrap();
    let mut events = vec![upsert("p1", "P-1", 1, "Poison", "Record")];
    events.extend((0..10).map(|i| upsert(&format!("g{i}"), &format!("G-{i}"), 1, "Good", "Record")));
    env.produce(&events);
    // Drained: also the retry topic, where the record waits between its attempts.
    assert!(env.wait_drained(WAIT), "every event has an outcome");
    let dlq = env.read_dlq();
    assert_eq!(dlq.len(), 1, "only the record the CRM cannot process");
    assert_eq!(dlq[0].header("crm-sync.error.code"), Some("crm_server_error"));
    assert!((0..10).all(|i| env.contact(&format!("G-{i}")).is_some()));
    assert!(
        !transitions(&env).iter().any(|(_, to)| to == "open"),
        "one record's failures are not an outage: {:?}",
        transitions(&env)
    );
    service.stop(StopMode::Graceful);
}
