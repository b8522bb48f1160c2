//! One scenario suite, written once and run against every connector and its sandbox:
//! Salesforce, Zendesk and Dynamics 365. Each scenario drives the whole pipeline (mock
//! Kafka cluster → crm-sync → sandbox) and checks what the CRM holds, what the sandbox
//! received, and what Kafka holds afterwards.

mod common;

use std::time::{Duration, Instant};

use common::*;
use crm_sync::config::Config;
use crm_sync::consume::StopMode;
use crm_sync::pipeline;
use crm_sync::sandbox::common::Faults;
use crm_sync::sandbox::dynamics::{DynamicsSandbox, DynamicsSetup};
use crm_sync::sandbox::salesforce::{SalesforceSandbox, SandboxOrg};
use crm_sync::sandbox::zendesk::{ZendeskSandbox, ZendeskSetup};
use crm_sync::sandbox::CrmSandbox;

const WAIT: Duration = Duration::from_secs(60);

fn salesforce() -> Box<dyn CrmSandbox> {
    Box::new(SalesforceSandbox::start("127.0.0.1:0", SandboxOrg::standard(CLIENT_ID, CLIENT_SECRET)).unwrap())
}

fn zendesk() -> Box<dyn CrmSandbox> {
    Box::new(ZendeskSandbox::start("127.0.0.1:0", ZendeskSetup::standard(CLIENT_ID, CLIENT_SECRET)).unwrap())
}

fn dynamics() -> Box<dyn CrmSandbox> {
    Box::new(DynamicsSandbox::start("127.0.0.1:0", DynamicsSetup::standard(CLIENT_ID, CLIENT_SECRET)).unwrap())
}

/// How long the CRM's throttle makes a tenant wait: the sandboxes' `Retry-After` of 1 s,
/// or, for Salesforce's `REQUEST_LIMIT_EXCEEDED` (which has none), the configured pause
/// (`retry.max_delay_ms`, 200 ms in the test config).
fn throttle_pause(crm: &dyn CrmSandbox) -> Duration {
    match crm.crm() {
        "salesforce" => Duration::from_millis(200),
        _ => Duration::from_secs(1),
    }
}

fn rejected(crm: &dyn CrmSandbox) -> u64 {
    crm.stats().rejected.values().sum()
}

fn start(config: Config) -> pipeline::ServiceHandle {
    pipeline::start(config).expect("service starts")
}

fn create_update_delete(crm: Box<dyn CrmSandbox>) {
    let env = Env::new(2);
    let service = start(env.config_for(crm.as_ref()));
    env.produce(&[
        upsert("e1", "C-1", 1, "Ada", "Lovelace"),
        upsert("e2", "C-2", 1, "Grace", "Hopper"),
        upsert("e3", "C-1", 2, "Ada", "King"),
        contact_event("e4", "C-2", "delete", 2, None),
        contact_event("e5", "C-404", "delete", 1, None),
    ]);
    assert!(env.wait_all_committed(WAIT), "not all offsets committed");
    let ada = crm.contact("C-1").expect("C-1 created");
    assert_eq!(
        (ada["first_name"].as_str(), ada["last_name"].as_str()),
        (Some("Ada"), Some("King"))
    );
    assert!(crm.contact("C-2").is_none(), "C-2 was deleted");
    assert!(
        env.read_dlq().is_empty(),
        "a delete of an absent record is done, not an error"
    );
    service.stop(StopMode::Graceful);
}

fn unchanged_costs_no_call(crm: Box<dyn CrmSandbox>) {
    let env = Env::new(1);
    let service = start(env.config_for(crm.as_ref()));
    env.produce(&[upsert("e1", "C-1", 1, "Ada", "Lovelace")]);
    assert!(env.wait_all_committed(WAIT));
    let before = crm.stats().api_requests;
    assert!(before >= 1);
    // The same payload under a newer version, and the same event again.
    env.produce(&[
        upsert("e2", "C-1", 2, "Ada", "Lovelace"),
        upsert("e1", "C-1", 1, "Ada", "Lovelace"),
    ]);
    assert!(env.wait_all_committed(WAIT));
    assert_eq!(crm.stats().api_requests, before, "unchanged payloads cost no call");
    service.stop(StopMode::Graceful);
}

fn batch_with_one_bad_record(crm: Box<dyn CrmSandbox>) {
    let env = Env::new(1);
    let mut config = env.config_for(crm.as_ref());
    config.tenants[0].batch_linger_ms = 200;
    let service = start(config);
    let names = ["Ada", "Grace", "Alan", "Edsger", "Barbara"];
    let mut events: Vec<_> = names
        .iter()
        .enumerate()
        .map(|(i, n)| upsert(&format!("e{i}"), &format!("C-{i}"), 1, n, "Example"))
        .collect();
    events[2] = contact_event("e2", "C-2", "upsert", 1, Some(&crm.invalid_contact()));
    env.produce(&events);
    assert!(env.wait_all_committed(WAIT));
    for i in [0, 1, 3, 4] {
        assert!(
            crm.contact(&format!("C-{i}")).is_some(),
            "C-{i} delivered despite its bad batch-mate"
        );
    }
    assert!(crm.contact("C-2").is_none());
    let dlq = env.read_dlq();
    assert_eq!(dlq.len(), 1, "only the bad record is dead-lettered");
    assert_eq!(dlq[0].key.as_deref(), Some(events[2].0.as_bytes()));
    assert_eq!(dlq[0].header("crm-sync.error.class"), Some("permanent"));
    // One batch: a single write call (Zendesk adds its job-status poll).
    assert!(crm.stats().api_requests <= 3, "{:?}", crm.stats());
    service.stop(StopMode::Graceful);
}

fn throttle_storm_honours_retry_after(crm: Box<dyn CrmSandbox>) {
    let env = Env::new(1);
    crm.set_faults(Faults {
        retry_after_secs: 1,
        ..Faults::default()
    });
    let service = start(env.config_for(crm.as_ref()));
    crm.script_throttles(2);
    let started = Instant::now();
    env.produce(&[upsert("e1", "C-1", 1, "Ada", "Lovelace")]);
    assert!(env.wait_all_committed(WAIT));
    let elapsed = started.elapsed();
    assert!(crm.contact("C-1").is_some());
    assert_eq!(rejected(crm.as_ref()), 2, "{:?}", crm.stats());
    assert!(
        elapsed >= throttle_pause(crm.as_ref()) * 2,
        "two throttles should have paused the tenant twice: {elapsed:?}"
    );
    assert!(env.read_dlq().is_empty());
    service.stop(StopMode::Graceful);
}

fn token_expiry(crm: Box<dyn CrmSandbox>) {
    let env = Env::new(1);
    let service = start(env.config_for(crm.as_ref()));
    env.produce(&[upsert("e1", "C-1", 1, "Ada", "Lovelace")]);
    assert!(env.wait_all_committed(WAIT));
    assert_eq!(crm.stats().token_requests, 1);
    crm.expire_tokens();
    env.produce(&[upsert("e2", "C-2", 1, "Grace", "Hopper")]);
    assert!(env.wait_all_committed(WAIT));
    assert!(crm.contact("C-2").is_some());
    assert_eq!(crm.stats().token_requests, 2, "one new token after expiry");
    assert!(env.read_dlq().is_empty());
    service.stop(StopMode::Graceful);
}

fn permanent_validation_error(crm: Box<dyn CrmSandbox>) {
    let env = Env::new(1);
    let service = start(env.config_for(crm.as_ref()));
    let bad = contact_event("e1", "C-1", "upsert", 1, Some(&crm.invalid_contact()));
    env.produce(std::slice::from_ref(&bad));
    assert!(env.wait_all_committed(WAIT));
    let dlq = env.read_dlq();
    assert_eq!(dlq.len(), 1);
    assert_eq!(
        dlq[0].payload.as_deref(),
        Some(bad.1.as_slice()),
        "the original event is kept"
    );
    assert_eq!(dlq[0].header("crm-sync.error.class"), Some("permanent"));
    assert_eq!(dlq[0].header("crm-sync.error.code"), Some("crm_validation"));
    assert_eq!(
        dlq[0].header("crm-sync.attempts"),
        Some("1"),
        "a permanent error is not retried"
    );
    assert!(
        dlq[0].header("crm-sync.crm.code").is_some(),
        "the CRM's own code is kept"
    );
    assert!(crm.contact("C-1").is_none());
    assert_eq!(env.read_failures().len(), 1);
    service.stop(StopMode::Graceful);
}

fn crm_down_then_back(crm: Box<dyn CrmSandbox>) {
    let env = Env::new(2);
    let mut config = env.config_for(crm.as_ref());
    config.retry.max_attempts = 40;
    crm.set_faults(Faults {
        server_error_rate: 1.0,
        ..Faults::default()
    });
    let service = start(config);
    let events: Vec<_> = (0..20)
        .map(|i| upsert(&format!("e{i}"), &format!("C-{i}"), 1, &format!("Name{i}"), "Down"))
        .collect();
    env.produce(&events);
    // Down long enough for several failed attempts, then back.
    assert!(wait_until(WAIT, || rejected(crm.as_ref()) >= 4));
    assert!(!env.all_committed(), "nothing can be committed while the CRM is down");
    crm.set_faults(Faults::default());
    assert!(env.wait_all_committed(WAIT));
    for i in 0..20 {
        assert!(crm.contact(&format!("C-{i}")).is_some(), "C-{i} lost");
    }
    assert!(env.read_dlq().is_empty());
    service.stop(StopMode::Graceful);
}

/// The CRM down for a while with a retry topic: the events are parked there, their input
/// offsets committed, and delivered from there once the CRM is back.
fn crm_down_then_back_through_the_retry_topic(crm: Box<dyn CrmSandbox>) {
    let env = Env::new(2);
    let mut config = env.config_for(crm.as_ref());
    config.kafka.retry_topic = Some(env.retry.clone());
    config.retry.max_attempts = 40;
    config.retry.in_memory_attempts = 1;
    crm.set_faults(Faults {
        server_error_rate: 1.0,
        ..Faults::default()
    });
    let service = start(config);
    let events: Vec<_> = (0..20)
        .map(|i| upsert(&format!("e{i}"), &format!("C-{i}"), 1, &format!("Name{i}"), "Parked"))
        .collect();
    env.produce(&events);
    // While it is down, the input is committed all the same: the events wait on the
    // retry topic, not in the partitions' windows.
    assert!(
        env.wait_all_committed(WAIT),
        "parked events still hold the input partitions"
    );
    assert!(!env.retry_drained(), "the parked events are on the retry topic");
    crm.set_faults(Faults::default());
    assert!(env.wait_drained(WAIT));
    for i in 0..20 {
        assert!(crm.contact(&format!("C-{i}")).is_some(), "C-{i} lost");
    }
    assert!(env.read_dlq().is_empty());
    service.stop(StopMode::Graceful);
}

/// Dataverse tokens announce `expires_in`: the connector fetches a new one before it runs
/// out, so no request meets an expired token.
#[test]
fn dynamics_tokens_are_renewed_before_they_expire() {
    let env = Env::new(1);
    let mut setup = DynamicsSetup::standard(CLIENT_ID, CLIENT_SECRET);
    setup.token_expires_in_secs = 2;
    let d = DynamicsSandbox::start("127.0.0.1:0", setup).unwrap();
    let service = start(env.config_for(&d));
    // Write one record after another, across the first token's two seconds, until the
    // connector has fetched its second token.
    let mut written = 0;
    let renewed = wait_until(Duration::from_secs(10), || {
        written += 1;
        env.produce(&[upsert(
            &format!("e{written}"),
            &format!("C-{written}"),
            1,
            "Ada",
            "Lovelace",
        )]);
        assert!(env.wait_all_committed(WAIT));
        d.stats().token_requests >= 2
    });
    assert!(renewed, "no second token within 10 s");
    for i in 1..=written {
        assert!(CrmSandbox::contact(&d, &format!("C-{i}")).is_some(), "C-{i}");
    }
    assert_eq!(d.stats().token_requests, 2, "a new token before the old one expired");
    assert_eq!(d.stats().rejected.get(&401), None, "no request met an expired token");
    service.stop(StopMode::Graceful);
}

macro_rules! scenarios {
    ($($crm:ident),*) => {$(
        mod $crm {
            #[test]
            fn create_update_delete() {
                super::create_update_delete(super::$crm())
            }
            #[test]
            fn unchanged_costs_no_call() {
                super::unchanged_costs_no_call(super::$crm())
            }
            #[test]
            fn batch_with_one_bad_record() {
                super::batch_with_one_bad_record(super::$crm())
            }
            #[test]
            fn throttle_storm_honours_retry_after() {
                super::throttle_storm_honours_retry_after(super::$crm())
            }
            #[test]
            fn token_expiry() {
                super::token_expiry(super::$crm())
            }
            #[test]
            fn permanent_validation_error() {
                super::permanent_validation_error(super::$crm())
            }
            #[test]
            fn crm_down_then_back() {
                super::crm_down_then_back(super::$crm())
            }
            #[test]
            fn crm_down_then_back_through_the_retry_topic() {
                super::crm_down_then_back_through_the_retry_topic(super::$crm())
            }
        }
    )*};
}

scenarios!(salesforce, zendesk, dynamics);
