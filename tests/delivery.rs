//! Delivery through the whole pipeline, against the mock Kafka cluster and the
//! Salesforce sandbox: what the CRM receives, and what Kafka holds afterwards.

mod common;

use std::time::Duration;

use common::*;
use crm_sync::consume::StopMode;
use crm_sync::pipeline;
use crm_sync::sandbox::salesforce::{Faults, Scripted};

const WAIT: Duration = Duration::from_secs(60);

/// The test config with batching off: every record gets its own call, so the answer's
/// HTTP status is the record's own.
fn single_record_calls(env: &Env) -> crm_sync::config::Config {
    let mut config = env.config();
    config.tenants[0].batch_size = 1;
    config
}

#[test]
fn delivers_creates_updates_and_deletes() {
    let env = Env::new(3);
    // 1. Create three contacts, update one, delete another.
    env.produce(&[
        upsert("e1", "C-1", 1, "Ada", "Lovelace"),
        upsert("e2", "C-2", 1, "Grace", "Hopper"),
        upsert("e3", "C-3", 1, "Alan", "Turing"),
        upsert("e4", "C-1", 2, "Ada", "King"),
        contact_event("e5", "C-2", "delete", 2, None),
    ]);
    let service = pipeline::start(env.config()).unwrap();
    // 2. Everything is committed only once every event has its outcome.
    assert!(env.wait_all_committed(WAIT), "not all offsets committed");
    assert_eq!(env.contact("C-1").unwrap()["LastName"], "King");
    assert!(env.contact("C-2").is_none(), "deleted contact still present");
    assert_eq!(env.contact("C-3").unwrap()["FirstName"], "Alan");
    // 3. A delete of a record the CRM does not have is done, not an error.
    env.produce(&[contact_event("e6", "C-404", "delete", 1, None)]);
    assert!(env.wait_all_committed(WAIT));
    assert!(env.read_dlq().is_empty(), "nothing should be dead-lettered");
    assert!(service.stop(StopMode::Graceful).committed);
}

#[test]
fn duplicate_unchanged_and_stale_events_cost_no_api_call() {
    let env = Env::new(2);
    let service = pipeline::start(env.config()).unwrap();
    // 1. Version 2 of a record is delivered.
    let v2 = upsert("e2", "C-1", 2, "Ada", "Lovelace");
    env.produce(std::slice::from_ref(&v2));
    assert!(env.wait_all_committed(WAIT));
    let before = env.sf.stats().api_requests;
    assert_eq!(before, 1);
    // 2. The same event again, the same payload under version 3, and a late version 1.
    env.produce(&[
        v2,
        upsert("e3", "C-1", 3, "Ada", "Lovelace"),
        upsert("e1", "C-1", 1, "Old", "Version"),
    ]);
    assert!(env.wait_all_committed(WAIT));
    // 3. None of them reached the CRM, and the CRM still holds version 2's data.
    assert_eq!(env.sf.stats().api_requests, before);
    assert_eq!(env.contact("C-1").unwrap()["FirstName"], "Ada");
    // 4. A real change is still sent.
    env.produce(&[upsert("e4", "C-1", 4, "Ada", "Byron")]);
    assert!(env.wait_all_committed(WAIT));
    assert_eq!(env.sf.stats().api_requests, before + 1);
    assert_eq!(env.contact("C-1").unwrap()["LastName"], "Byron");
    service.stop(StopMode::Graceful);
}

#[test]
fn retries_server_errors_and_row_locks_then_delivers() {
    let env = Env::new(1);
    env.sf
        .script([Scripted::ServerError, Scripted::LockError, Scripted::ServerError]);
    env.produce(&[upsert("e1", "C-1", 1, "Ada", "Lovelace")]);
    let service = pipeline::start(env.config()).unwrap();
    assert!(env.wait_all_committed(WAIT));
    let stats = env.sf.stats();
    assert_eq!(stats.rejected.get(&503), Some(&2));
    assert_eq!(stats.rejected.get(&400), Some(&1));
    assert_eq!(stats.upserts_applied, 1);
    assert_eq!(env.contact("C-1").unwrap()["LastName"], "Lovelace");
    assert!(env.read_dlq().is_empty());
    service.stop(StopMode::Graceful);
}

#[test]
fn pauses_on_request_limit_exceeded_then_delivers() {
    let env = Env::new(1);
    env.sf.script([Scripted::RequestLimit]);
    env.produce(&[upsert("e1", "C-1", 1, "Ada", "Lovelace")]);
    let service = pipeline::start(env.config()).unwrap();
    assert!(env.wait_all_committed(WAIT));
    assert_eq!(env.sf.stats().rejected.get(&403), Some(&1));
    assert!(env.contact("C-1").is_some());
    // The tenant was paused and slowed down (and recovers as calls succeed).
    let (_, text) = http_get(format!("http://{}/metrics", service.http_addr()));
    assert!(crm_sync::demo::metric_total(&text, "crm_sync_tenant_throttles_total", Some(("tenant", "acme"))) >= 1.0);
    service.stop(StopMode::Graceful);
}

#[test]
fn refreshes_an_expired_token_and_replays_the_request() {
    let env = Env::new(1);
    let service = pipeline::start(env.config()).unwrap();
    env.produce(&[upsert("e1", "C-1", 1, "Ada", "Lovelace")]);
    assert!(env.wait_all_committed(WAIT));
    assert_eq!(env.sf.stats().token_requests, 1);
    // 1. The org's session times out.
    env.sf.expire_tokens();
    env.produce(&[upsert("e2", "C-1", 2, "Ada", "King")]);
    assert!(env.wait_all_committed(WAIT));
    // 2. One 401, one new token, one replay, delivered; nothing dead-lettered.
    let stats = env.sf.stats();
    assert_eq!(stats.token_requests, 2);
    assert_eq!(stats.rejected.get(&401), Some(&1));
    assert_eq!(env.contact("C-1").unwrap()["LastName"], "King");
    assert!(env.read_dlq().is_empty());
    service.stop(StopMode::Graceful);
}

#[test]
fn dead_letters_permanent_errors_and_malformed_input_while_later_events_flow() {
    let env = Env::new(1);
    env.produce(&[
        (String::from("garbage"), b"{not json".to_vec()),
        // Salesforce requires Contact.LastName.
        contact_event("e1", "C-1", "upsert", 1, Some(&contact_data("Ada", None))),
        upsert("e2", "C-2", 1, "Grace", "Hopper"),
    ]);
    let service = pipeline::start(single_record_calls(&env)).unwrap();
    assert!(env.wait_all_committed(WAIT));
    // 1. The good event behind both failures was delivered.
    assert_eq!(env.contact("C-2").unwrap()["LastName"], "Hopper");
    assert!(env.contact("C-1").is_none());
    // 2. Both failures are in the DLQ with their original key, value and context.
    let dlq = env.read_dlq();
    assert_eq!(dlq.len(), 2, "{dlq:?}");
    let malformed = dlq
        .iter()
        .find(|m| m.key.as_deref() == Some(b"garbage".as_slice()))
        .unwrap();
    assert_eq!(malformed.payload.as_deref(), Some(b"{not json".as_slice()));
    assert_eq!(malformed.header("crm-sync.error.code"), Some("invalid_json"));
    assert_eq!(malformed.header("crm-sync.stage"), Some("decode"));
    assert_eq!(malformed.header("crm-sync.source.topic"), Some(env.topic.as_str()));
    assert_eq!(malformed.header("crm-sync.source.offset"), Some("0"));
    let rejected = dlq
        .iter()
        .find(|m| m.header("crm-sync.stage") == Some("deliver"))
        .unwrap();
    assert_eq!(rejected.header("crm-sync.error.code"), Some("crm_validation"));
    assert_eq!(rejected.header("crm-sync.error.class"), Some("permanent"));
    assert_eq!(rejected.header("crm-sync.crm.code"), Some("REQUIRED_FIELD_MISSING"));
    assert_eq!(rejected.header("crm-sync.crm.status"), Some("400"));
    assert_eq!(rejected.header("crm-sync.attempts"), Some("1"));
    assert_eq!(rejected.header("crm-sync.source.offset"), Some("1"));
    assert!(rejected.header("crm-sync.first-failure").is_some() && rejected.header("crm-sync.last-failure").is_some());
    // 3. One failure event each, and no secret anywhere.
    let failures = env.read_failures();
    assert_eq!(failures.len(), 2);
    let event: serde_json::Value = serde_json::from_slice(
        failures
            .iter()
            .find(|f| {
                String::from_utf8_lossy(f.payload.as_deref().unwrap_or_default()).contains("REQUIRED_FIELD_MISSING")
            })
            .unwrap()
            .payload
            .as_deref()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(event["key"], "C-1");
    assert_eq!(event["error_code"], "crm_validation");
    assert_eq!(event["source"]["offset"], 1);
    for m in dlq.iter().chain(&failures) {
        let all = format!(
            "{:?} {:?}",
            m.headers,
            String::from_utf8_lossy(m.payload.as_deref().unwrap_or_default())
        );
        assert!(!all.contains(CLIENT_SECRET), "secret leaked: {all}");
    }
    service.stop(StopMode::Graceful);
}

#[test]
/// A record whose own write keeps failing transiently (a row it cannot lock) is
/// dead-lettered once its retries are used up. (A CRM that fails every call is an outage,
/// not the record's failure: tenant_health.rs.)
fn exhausted_retries_are_dead_lettered() {
    let env = Env::new(1);
    env.sf.set_faults(Faults {
        lock_error_rate: 1.0,
        ..Faults::default()
    });
    env.produce(&[upsert("e1", "C-1", 1, "Ada", "Lovelace")]);
    let service = pipeline::start(env.config()).unwrap();
    assert!(env.wait_all_committed(WAIT));
    let dlq = env.read_dlq();
    assert_eq!(dlq.len(), 1);
    assert_eq!(dlq[0].header("crm-sync.error.class"), Some("retryable"));
    assert_eq!(dlq[0].header("crm-sync.error.code"), Some("crm_row_lock"));
    // max_attempts = 6 in the test config.
    assert_eq!(dlq[0].header("crm-sync.attempts"), Some("6"));
    assert_eq!(env.sf.stats().rejected.get(&400), Some(&6));
    service.stop(StopMode::Graceful);
}

#[test]
fn serves_prometheus_metrics_and_health() {
    let env = Env::new(1);
    env.produce(&[upsert("e1", "C-1", 1, "Ada", "Lovelace")]);
    let service = pipeline::start(env.config()).unwrap();
    assert!(env.wait_all_committed(WAIT));
    let base = format!("http://{}", service.http_addr());
    assert_eq!(http_get(format!("{base}/health/live")).0, 200);
    assert_eq!(http_get(format!("{base}/health/ready")).0, 200);
    let (status, text) = http_get(format!("{base}/metrics"));
    assert_eq!(status, 200);
    // 1. Every line is a comment or `name{labels} value` with a numeric value.
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(comment) = line.strip_prefix("# ") {
            assert!(
                comment.starts_with("HELP ") || comment.starts_with("TYPE "),
                "bad comment: {line}"
            );
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value: {line}"));
        assert!(
            value.parse::<f64>().is_ok() || ["+Inf", "-Inf", "NaN"].contains(&value),
            "bad value: {line}"
        );
        let name = series.split('{').next().unwrap();
        assert!(
            name.starts_with("crm_sync_") || name.starts_with("process_"),
            "unexpected metric: {line}"
        );
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "bad name: {line}"
        );
    }
    // 2. The metrics the operator needs are there.
    for name in [
        "crm_sync_events_consumed_total",
        "crm_sync_outcomes_total",
        "crm_sync_crm_requests_total",
        "crm_sync_crm_request_duration_seconds_bucket",
        "crm_sync_crm_api_usage_ratio",
        "crm_sync_in_flight_events",
        "crm_sync_committed_offset",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics");
    }
    assert!(
        text.contains(r#"crm_sync_outcomes_total{tenant="acme",outcome="delivered"}"#),
        "{text}"
    );
    // 3. No secret in the exposition.
    assert!(!text.contains(CLIENT_SECRET));
    // 4. Consumer lag comes from librdkafka's statistics, every 5 s.
    assert!(
        wait_until(Duration::from_secs(15), || http_get(format!("{base}/metrics"))
            .1
            .contains(r#"crm_sync_consumer_lag_messages{topic=""#)),
        "no consumer lag reported"
    );
    service.stop(StopMode::Graceful);
}

#[test]
fn dead_letters_an_ambiguous_external_id_without_touching_either_record() {
    let env = Env::new(1);
    for first in ["Twin", "Other"] {
        let fields = serde_json::json!({"External_Id__c": "C-DUP", "FirstName": first, "LastName": "Doe"});
        let fields = fields.as_object().unwrap().clone();
        env.sf.seed_record("Contact", fields);
    }
    env.produce(&[
        upsert("e1", "C-DUP", 1, "Ada", "Lovelace"),
        upsert("e2", "C-OK", 1, "Grace", "Hopper"),
    ]);
    let service = pipeline::start(single_record_calls(&env)).unwrap();
    assert!(env.wait_all_committed(WAIT));
    let dlq = env.read_dlq();
    assert_eq!(dlq.len(), 1);
    assert_eq!(dlq[0].header("crm-sync.error.code"), Some("crm_multiple_matches"));
    assert_eq!(dlq[0].header("crm-sync.crm.status"), Some("300"));
    assert_eq!(
        env.sf.stats().rejected.get(&300),
        Some(&1),
        "a permanent error is not retried"
    );
    assert!(env
        .sf
        .records("Contact")
        .iter()
        .all(|r| r.fields["LastName"] == "Doe" || r.fields["LastName"] == "Hopper"));
    service.stop(StopMode::Graceful);
}

#[test]
fn refuses_to_start_when_a_topic_it_writes_to_is_missing() {
    let env = Env::new(1);
    let mut config = env.config();
    config.kafka.dlq_topic = "no-such-dlq".into();
    let err = pipeline::start(config).err().expect("start should fail").to_string();
    assert!(err.contains("kafka.dlq_topic"), "{err}");
    let mut config = env.config();
    config.kafka.state_topic = env.dlq.clone() + "-missing";
    let err = pipeline::start(config).err().expect("start should fail").to_string();
    assert!(err.contains("kafka.state_topic"), "{err}");
}

#[test]
fn batches_upserts_and_dead_letters_only_the_bad_record_of_a_batch() {
    let env = Env::new(1);
    let mut config = env.config();
    // Long enough for all five to meet in one batch, however they arrive.
    config.tenants[0].batch_linger_ms = 2_000;
    config.tenants[0].batch_size = 5;
    env.produce(&[
        upsert("e1", "C-1", 1, "Ada", "Lovelace"),
        upsert("e2", "C-2", 1, "Grace", "Hopper"),
        contact_event("e3", "C-3", "upsert", 1, Some(&contact_data("Alan", None))),
        upsert("e4", "C-4", 1, "Edsger", "Dijkstra"),
        upsert("e5", "C-5", 1, "Barbara", "Liskov"),
    ]);
    let service = pipeline::start(config).unwrap();
    assert!(env.wait_all_committed(WAIT));
    // 1. One sObject Collections call for the five records.
    assert_eq!(env.sf.stats().api_requests, 1);
    // 2. The record without a LastName failed alone; its batch-mates are in the CRM.
    for key in ["C-1", "C-2", "C-4", "C-5"] {
        assert!(env.contact(key).is_some(), "{key} missing");
    }
    assert!(env.contact("C-3").is_none());
    let dlq = env.read_dlq();
    assert_eq!(dlq.len(), 1);
    assert_eq!(dlq[0].key.as_deref(), Some(b"acme/contact/C-3".as_slice()));
    assert_eq!(dlq[0].header("crm-sync.crm.code"), Some("REQUIRED_FIELD_MISSING"));
    assert_eq!(dlq[0].header("crm-sync.error.class"), Some("permanent"));
    service.stop(StopMode::Graceful);
}

#[test]
fn retries_only_the_locked_record_of_a_batch() {
    let env = Env::new(1);
    let mut config = env.config();
    config.tenants[0].batch_linger_ms = 2_000;
    config.tenants[0].batch_size = 3;
    // The first record of the next call meets a row lock.
    env.sf.script([crm_sync::sandbox::salesforce::Scripted::LockError]);
    env.produce(&[
        upsert("e1", "C-1", 1, "Ada", "Lovelace"),
        upsert("e2", "C-2", 1, "Grace", "Hopper"),
        upsert("e3", "C-3", 1, "Alan", "Turing"),
    ]);
    let service = pipeline::start(config).unwrap();
    assert!(env.wait_all_committed(WAIT));
    // One call for the three, then one retry for the locked record alone.
    let stats = env.sf.stats();
    assert_eq!(stats.api_requests, 2);
    assert_eq!(stats.upserts_applied, 3);
    assert!(env.read_dlq().is_empty());
    service.stop(StopMode::Graceful);
}

/// `.` and `..` are URL dot segments: in a by-external-id URL they are removed on the
/// way, so a delete of `.` addressed the field, was answered 404 and counted as done
/// while the record stayed. Such keys are upserted with the key in the body, and a delete
/// of one is dead-lettered with its reason, never taken for "already gone".
#[test]
fn dot_segment_keys_are_never_normalised_away() {
    let env = Env::new(1);
    env.produce(&[upsert("e1", ".", 1, "Dot", "One"), upsert("e2", "..", 1, "Dot", "Two")]);
    let service = pipeline::start(single_record_calls(&env)).unwrap();
    assert!(env.wait_all_committed(WAIT));
    assert_eq!(env.contact(".").expect("`.` upserted")["LastName"], "One");
    assert_eq!(env.contact("..").expect("`..` upserted")["LastName"], "Two");
    env.produce(&[contact_event("e3", ".", "delete", 2, None)]);
    assert!(env.wait_all_committed(WAIT));
    let dlq = env.read_dlq();
    assert_eq!(dlq.len(), 1, "the delete of `.` is dead-lettered");
    assert_eq!(dlq[0].header("crm-sync.error.code"), Some("crm_unaddressable_key"));
    assert!(
        env.contact(".").is_some(),
        "the record is still there, and the DLQ says why"
    );
    service.stop(StopMode::Graceful);
}

/// The in-flight window bounds what a partition holds in memory: its undecided events and
/// the messages handed to its actor, not yet taken in, with at most one intake batch
/// (512 messages) begun while there was room. Before it counted the messages handed over,
/// a partition behind a slow tenant held up to three batches past a window of 20.
#[test]
fn a_partition_holds_no_more_than_its_window_and_a_batch_behind_a_slow_tenant() {
    const WINDOW: usize = 20;
    const BOUND: usize = WINDOW + 512;
    const EVENTS: usize = 2_000;
    let env = Env::new(1);
    let mut config = single_record_calls(&env);
    config.kafka.max_in_flight_per_partition = WINDOW;
    config.tenants[0].max_concurrency = 1;
    // 1. Everything is waiting in Kafka (so the first fetch brings far more than a
    //    window) and the CRM takes half a second a call, one call at a time.
    let events: Vec<_> = (0..EVENTS)
        .map(|i| upsert(&format!("w{i}"), &format!("W-{i}"), 1, "Win", "Dow"))
        .collect();
    env.produce(&events);
    env.slow_crm(500);
    let service = pipeline::start(config).unwrap();
    let series = format!("crm_sync_in_flight_events{{topic=\"{}\",partition=\"0\"}} ", env.topic);
    let in_flight = || {
        crm_sync::telemetry::partitions()
            .render()
            .lines()
            .find_map(|l| l.strip_prefix(&series).and_then(|v| v.parse::<f64>().ok()))
            .unwrap_or(0.0) as usize
    };
    // 2. While the first calls go through, the partition never holds more than its
    //    window and a batch.
    let mut most = 0;
    assert!(
        wait_until(WAIT, || {
            most = most.max(in_flight());
            env.sf.records("Contact").len() >= 4
        }),
        "the slow CRM received nothing"
    );
    assert!(most > 0, "the window was never seen in use");
    assert!(
        most <= BOUND,
        "the partition held {most} undecided events, past its window of {WINDOW} and a batch"
    );
    // 3. The partition actor restarts with its window full (it panics in its next batch)
    //    and the partition neither stalls nor loses anything: at full speed again, every
    //    event is delivered.
    let restarts = || {
        crm_sync::demo::metric_total(
            &crm_sync::telemetry::prometheus().render(),
            crm_sync::telemetry::metric::ACTOR_RESTARTS,
            Some(("actor", "partition")),
        )
    };
    let before = restarts();
    service.inject_panic(crm_sync::pipeline::ActorKind::Partition);
    env.slow_crm(0);
    assert!(
        env.wait_all_committed(Duration::from_secs(120)),
        "not all offsets committed"
    );
    assert!(restarts() > before, "the partition actor was not restarted");
    assert_eq!(env.sf.records("Contact").len(), EVENTS);
    assert!(env.read_dlq().is_empty());
    service.stop(StopMode::Graceful);
}
