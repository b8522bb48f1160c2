//! The status and audit topics (issue: customer-visible status and audit trail): each
//! record's latest status, and one audit record per final outcome of every event read,
//! written before the event's offset is committed.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use crm_sync::consume::StopMode;
use crm_sync::pipeline;
use crm_sync::sandbox::common::Faults;
use crm_sync::sandbox::kafka::tools;
use crm_sync::sandbox::salesforce::Scripted;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);

fn read(env: &Env, topic: &str) -> Vec<(String, Value)> {
    tools::read_all(&env.bootstrap, topic, 1, Duration::from_secs(20))
        .unwrap()
        .into_iter()
        .map(|m| {
            let key = String::from_utf8(m.key.unwrap_or_default()).unwrap();
            (key, serde_json::from_slice(m.payload.as_deref().unwrap()).unwrap())
        })
        .collect()
}

/// The last status written for each record.
fn latest(statuses: &[(String, Value)]) -> HashMap<String, Value> {
    statuses.iter().cloned().collect()
}

fn key(k: &str) -> String {
    serde_json::json!(["acme", "contact", k]).to_string()
}

#[test]
fn every_outcome_leaves_its_trail_and_each_record_its_latest_status() {
    let env = Env::new(1);
    let kafka = env.kafka.as_ref().unwrap();
    let (status, audit) = (unique("status"), unique("audit"));
    kafka.create_topic(&status, 1).unwrap();
    kafka.create_topic(&audit, 1).unwrap();
    let mut config = env.config();
    config.kafka.status_topic = Some(status.clone());
    config.kafka.audit_topic = Some(audit.clone());
    config.kafka.retry_topic = Some(env.retry.clone());
    config.tenants[0].batch_size = 1;
    env.sf.set_faults(Faults {
        rejected_keys: vec!["R-1".into()],
        ..Faults::default()
    });
    // The first call fails once: S-1 is retried, then delivered.
    env.sf.script([Scripted::ServerError]);
    let service = pipeline::start(config).unwrap();
    env.produce(&[upsert("s1", "S-1", 1, "Sam", "Retried")]);
    assert!(wait_until(WAIT, || env.contact("S-1").is_some()));
    env.produce(&[
        upsert("a1", "A-1", 1, "Ada", "Lovelace"),
        upsert("a1", "A-1", 1, "Ada", "Lovelace"), // a copy while it is written: joins it
        upsert("b1", "B-1", 1, "Bob", "Same"),
        upsert("b2", "B-1", 2, "Bob", "Same"), // a newer version, the same data: unchanged
        upsert("c2", "C-1", 2, "Cy", "New"),
        upsert("c1", "C-1", 1, "Cy", "Old"), // late and older: stale
        upsert("r1", "R-1", 1, "Rex", "Rejected"),
        ("junk".to_string(), b"{not json".to_vec()),
    ]);
    assert!(env.wait_drained(WAIT));
    // The same event once more, after it was delivered: a duplicate.
    env.produce(&[upsert("a1", "A-1", 1, "Ada", "Lovelace")]);
    assert!(env.wait_drained(WAIT));
    service.stop(StopMode::Graceful);

    let statuses = read(&env, &status);
    let now = latest(&statuses);
    let of = |k: &str| &now[&key(k)];
    assert_eq!(of("A-1")["status"], "delivered");
    assert_eq!(of("A-1")["version"], 1);
    assert_eq!(of("A-1")["event_id"], "a1");
    assert_eq!(of("B-1")["status"], "skipped");
    assert_eq!(of("B-1")["reason"], "unchanged");
    assert_eq!(of("B-1")["version"], 2);
    assert_eq!(of("C-1")["status"], "delivered", "the stale v1 leaves v2's status");
    assert_eq!(of("C-1")["version"], 2);
    assert_eq!(of("R-1")["status"], "dead_lettered");
    assert_eq!(of("R-1")["error_code"], "crm_validation");
    assert_eq!(of("S-1")["status"], "delivered");
    assert!(of("S-1")["attempts"].as_u64().unwrap() >= 2, "{}", of("S-1"));
    assert!(
        statuses
            .iter()
            .any(|(k, v)| *k == key("S-1") && v["status"] == "retrying" && v["error_code"] == "crm_server_error"),
        "S-1 was retrying before it was delivered"
    );
    assert!(
        !statuses
            .iter()
            .any(|(_, v)| v["reason"] == "duplicate" || v["reason"] == "stale"),
        "events that say nothing new about their record leave the status alone"
    );

    // One audit record per final outcome of every input message, bad input included.
    let audited = read(&env, &audit);
    let ends = tools::end_offsets(&env.bootstrap, &env.topic, 1).unwrap()[0];
    let mut offsets: Vec<i64> = audited
        .iter()
        .filter(|(_, v)| v["source"]["topic"] == env.topic.as_str())
        .map(|(_, v)| v["source"]["offset"].as_i64().unwrap())
        .collect();
    offsets.sort();
    assert_eq!(offsets, (0..ends).collect::<Vec<_>>(), "each input offset once");
    let reasons: Vec<&str> = audited.iter().filter_map(|(_, v)| v["reason"].as_str()).collect();
    for reason in ["duplicate", "unchanged", "stale"] {
        assert!(reasons.contains(&reason), "{reason} in {reasons:?}");
    }
    let junk = audited
        .iter()
        .find(|(_, v)| v["error_code"] == "invalid_json")
        .expect("the malformed message is in the audit trail");
    assert_eq!(junk.1["status"], "dead_lettered");
    assert!(junk.1["tenant"].is_null());
}

/// A record whose tenant's CRM is down is `tenant_paused` (not `retrying` for ever, not
/// dead-lettered), and `delivered` once the CRM is back.
#[test]
fn a_record_waiting_for_its_tenant_says_so() {
    let env = Env::new(1);
    let status = unique("status");
    env.kafka.as_ref().unwrap().create_topic(&status, 1).unwrap();
    let mut config = env.config();
    config.kafka.status_topic = Some(status.clone());
    config.kafka.retry_topic = Some(env.retry.clone());
    config.retry.base_delay_ms = 50;
    config.retry.max_delay_ms = 500;
    config.breaker.failure_threshold = 3;
    config.breaker.probe_interval_ms = 200;
    config.breaker.max_probe_interval_ms = 800;
    env.sf.set_faults(Faults {
        server_error_rate: 1.0,
        ..Faults::default()
    });
    let service = pipeline::start(config).unwrap();
    let events: Vec<_> = (0..10)
        .map(|i| upsert(&format!("p{i}"), &format!("P-{i}"), 1, &format!("P{i}"), "Paused"))
        .collect();
    env.produce(&events);
    let paused = || {
        read(&env, &status)
            .iter()
            .any(|(_, v)| v["status"] == "tenant_paused" && v["reason"] == "open")
    };
    assert!(wait_until(WAIT, paused), "{:?}", read(&env, &status));
    env.sf.set_faults(Faults::default());
    assert!(env.wait_drained(WAIT));
    service.stop(StopMode::Graceful);
    let now = latest(&read(&env, &status));
    for i in 0..10 {
        assert_eq!(now[&key(&format!("P-{i}"))]["status"], "delivered");
    }
}

/// An event whose status cannot be written is not committed: its outcome waits for its
/// trail. The status topic lives on a broker of its own, which goes down; the CRM gets the
/// write, the offset stays where it was, and once the broker is back the status is
/// written and the offset committed.
#[test]
fn an_offset_waits_for_its_status_line() {
    let kafka = crm_sync::sandbox::kafka::KafkaSandbox::start(2).unwrap();
    let bootstrap = kafka.bootstrap_servers();
    let env = Env::with_broker(kafka, bootstrap, 1);
    let kafka = env.kafka.as_ref().unwrap();
    let status = unique("status");
    kafka.create_topic(&status, 1).unwrap();
    for topic in [&env.topic, &env.dlq, &env.failures, &env.state, &env.retry] {
        kafka.set_leader(topic, 1, 1).unwrap();
    }
    kafka.set_leader(&status, 1, 2).unwrap();
    kafka.set_group_coordinator(&env.group, 1).unwrap();
    kafka.set_group_coordinator(&format!("{}.retry", env.group), 1).unwrap();
    let mut config = env.config();
    config.kafka.status_topic = Some(status.clone());
    let service = pipeline::start(config).unwrap();
    assert!(wait_until(WAIT, || service.assigned_partitions() == 1));
    kafka.set_broker_up(2, false).unwrap();
    env.produce(&[upsert("w1", "W-1", 1, "Wait", "ForStatus")]);
    assert!(
        wait_until(WAIT, || env.contact("W-1").is_some()),
        "the CRM got the write"
    );
    let committed = || tools::committed(&env.bootstrap, &env.group, &env.topic, 1).unwrap_or_default();
    assert!(
        !wait_until(Duration::from_secs(3), || committed() == [Some(1)]),
        "committed while its status could not be written"
    );
    kafka.set_broker_up(2, true).unwrap();
    assert!(
        wait_until(WAIT, || committed() == [Some(1)]),
        "committed once the status is written"
    );
    let now = latest(&read(&env, &status));
    assert_eq!(now[&key("W-1")]["status"], "delivered");
    service.stop(StopMode::Graceful);
}
