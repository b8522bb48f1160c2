//! Promises that must hold with several members of one consumer group, the way operators
//! scale out: a parked event comes back to the member that owns its record's input
//! partition, so no member writes a version older than one another member delivered.

mod common;

use std::time::Duration;

use common::*;
use crm_sync::config::Config;
use crm_sync::consume::StopMode;
use crm_sync::pipeline::{self, ServiceHandle};
use crm_sync::sandbox::kafka::tools;
use crm_sync::sandbox::salesforce::Faults;

const RECORDS: usize = 150;

fn parking_config(env: &Env) -> Config {
    let mut config = env.config();
    config.kafka.retry_topic = Some(env.retry.clone());
    // Every failure parks at once, and a parked event comes back about a second later:
    // long enough for the next version to be delivered from the input topic meanwhile.
    config.retry.in_memory_attempts = 1;
    config.retry.base_delay_ms = 800;
    config.retry.max_delay_ms = 1_500;
    config.retry.max_attempts = 60;
    config.retry.max_age_ms = 120_000;
    config
}

fn version_data(key: usize, version: u64) -> (String, String) {
    (format!("N{key}"), format!("v{version}"))
}

/// Produces one version of every record: an upsert, or a delete for every fourth record's
/// third version.
fn produce_wave(env: &Env, version: u64) {
    let events: Vec<_> = (0..RECORDS)
        .map(|i| {
            let id = format!("e{i}-{version}");
            let key = format!("C-{i}");
            if version == 3 && i % 4 == 0 {
                contact_event(&id, &key, "delete", version, None)
            } else {
                let (first, last) = version_data(i, version);
                upsert(&id, &key, version, &first, &last)
            }
        })
        .collect();
    env.produce(&events);
}

fn wait_for_split(members: &[&ServiceHandle]) {
    assert!(
        wait_until(Duration::from_secs(40), || members
            .iter()
            .all(|m| m.assigned_partitions() > 0)),
        "partitions not shared: {:?}",
        members.iter().map(|m| m.assigned_partitions()).collect::<Vec<_>>()
    );
}

/// Records whose CRM copy is not their newest version: (key, what the CRM holds).
fn diverged(env: &Env) -> Vec<(String, Option<String>)> {
    (0..RECORDS)
        .filter_map(|i| {
            let key = format!("C-{i}");
            let held = env
                .contact(&key)
                .map(|c| c["LastName"].as_str().unwrap_or("?").to_string());
            let expected = if i % 4 == 0 { None } else { Some("v3".to_string()) };
            (held != expected).then_some((key, held))
        })
        .collect()
}

/// Two members, a CRM that fails a third of its calls, and three versions of every record
/// produced one after another. Each failure is parked on the retry topic; meanwhile the
/// next version is usually delivered straight from the input topic. Whoever reads a
/// parked version back must know about that delivery, or it writes the old version over
/// the new one (and a later version with the same payload is then skipped as unchanged).
#[test]
fn parked_versions_never_overwrite_newer_ones_delivered_by_another_member() {
    let env = Env::new(4);
    let config = parking_config(&env);
    // 1. Two members share the input and retry partitions.
    let a = pipeline::start(config.clone()).unwrap();
    assert!(wait_until(Duration::from_secs(20), || a.assigned_partitions() > 0));
    let b = pipeline::start(config.clone()).unwrap();
    wait_for_split(&[&a, &b]);
    // 2. Three waves of versions through a CRM failing a third of its calls.
    env.sf.set_faults(Faults {
        server_error_rate: 0.33,
        seed: 7,
        ..Faults::default()
    });
    for version in 1..=3 {
        produce_wave(&env, version);
        assert!(
            env.wait_all_committed(Duration::from_secs(60)),
            "wave {version} not committed"
        );
    }
    let parked: i64 = tools::end_offsets(&env.bootstrap, &env.retry, env.partitions)
        .unwrap()
        .iter()
        .sum();
    assert!(parked > 20, "too few versions were parked ({parked}) to test anything");
    // 3. The CRM recovers; every parked version comes back and is decided.
    env.sf.set_faults(Faults::default());
    assert!(env.wait_drained(Duration::from_secs(120)), "retry topic not drained");
    let wrong = diverged(&env);
    assert!(
        wrong.is_empty(),
        "{} of {RECORDS} records diverged, e.g. {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(5)]
    );
    a.stop(StopMode::Graceful);
    b.stop(StopMode::Graceful);
}

/// A write still at the CRM when its partition is revoked is answered before the
/// partition's offsets are committed and it is handed over: otherwise the new owner
/// writes the same record while the old write is still on its way, and the old one can
/// land last. Two members, a CRM that takes 6 s to answer (longer than B takes to join)
/// and a drain of 0.3 s: the sandbox must never see two writes of one record at once.
#[test]
fn a_write_in_flight_at_a_revoke_is_answered_before_the_handover() {
    let env = Env::new(2);
    let mut config = env.config();
    config.kafka.drain_timeout_ms = 300;
    config.tenants[0].max_concurrency = 2;
    config.tenants[0].batch_size = 1;
    config.tenants[0].request_timeout_ms = 20_000;
    env.slow_crm(6_000);
    // 1. A alone, with two records on each partition: on each, one write at the CRM and
    //    one waiting, whichever partition B takes.
    let a = pipeline::start(config.clone()).unwrap();
    assert!(wait_until(Duration::from_secs(20), || a.assigned_partitions() == 2));
    for i in 0..4 {
        let event = upsert(&format!("e{i}"), &format!("C-{i}"), 1, "Ada", "Lovelace");
        env.produce_to(i % 2, &[event]);
    }
    assert!(wait_until(Duration::from_secs(20), || env
        .sf
        .stats()
        .max_concurrent_writes_of_one_record
        >= 1));
    // 2. B joins while that write is at the CRM and takes one of the partitions.
    let b = pipeline::start(config.clone()).unwrap();
    wait_for_split(&[&a, &b]);
    assert!(env.wait_all_committed(Duration::from_secs(90)));
    // 3. No record was written by both members at once.
    assert_eq!(env.sf.stats().max_concurrent_writes_of_one_record, 1);
    for i in 0..4 {
        assert!(
            env.contact(&format!("C-{i}")).is_some(),
            "C-{i}: {:?}, DLQ {:?}",
            env.sf.stats(),
            env.read_dlq().iter().map(|m| m.headers.clone()).collect::<Vec<_>>()
        );
    }
    a.stop(StopMode::Graceful);
    b.stop(StopMode::Graceful);
}

/// A member beyond the input topic's partition count is ready (its assignment is empty,
/// and librdkafka still hands it over), so a rollout does not wait on a standby; it takes
/// the partition over when the holder leaves. One partition, two members.
#[test]
fn a_standby_member_is_ready_and_takes_over_when_the_holder_leaves() {
    let env = Env::new(1);
    let first = pipeline::start(env.config()).unwrap();
    assert!(wait_until(Duration::from_secs(40), || first.assigned_partitions() == 1));
    let second = pipeline::start(env.config()).unwrap();
    let ready = |m: &ServiceHandle| http_get(format!("http://{}/health/ready", m.http_addr())).0 == 200;
    assert!(
        wait_until(Duration::from_secs(40), || ready(&second)),
        "the standby never became ready"
    );
    assert_eq!(first.assigned_partitions() + second.assigned_partitions(), 1);
    let (holder, standby) = if first.assigned_partitions() == 1 {
        (first, second)
    } else {
        (second, first)
    };
    holder.stop(StopMode::Graceful);
    assert!(wait_until(Duration::from_secs(40), || standby.assigned_partitions() == 1));
    standby.stop(StopMode::Graceful);
}

/// A partition that is paused (its window full behind a slow CRM) when it is revoked, and
/// that comes back to the same member later, is fetched again: librdkafka keeps an
/// application's pause across an unassign, so the member has to lift it as it hands the
/// partition over.
#[test]
fn a_partition_paused_at_a_revoke_is_fetched_again_when_it_comes_back() {
    let env = Env::new(2);
    let mut config = env.config();
    config.kafka.max_in_flight_per_partition = 5;
    config.tenants[0].batch_size = 1;
    config.tenants[0].max_concurrency = 1;
    let wave = |from: usize, to: usize| {
        for i in from..to {
            let event = upsert(&format!("p{i}"), &format!("P-{i}"), 1, "Pau", "Sed");
            env.produce_to((i % 2) as i32, &[event]);
        }
    };
    // 1. A alone, both windows full behind a CRM that takes 2 s a call: both partitions
    //    paused.
    wave(0, 60);
    env.slow_crm(2_000);
    let a = pipeline::start(config.clone()).unwrap();
    let pauses = || {
        crm_sync::demo::metric_total(
            &crm_sync::telemetry::prometheus().render(),
            crm_sync::telemetry::metric::PARTITION_PAUSES,
            Some(("topic", env.topic.as_str())),
        )
    };
    assert!(
        wait_until(Duration::from_secs(40), || a.assigned_partitions() == 2
            && pauses() >= 2.0),
        "the partitions were not both paused"
    );
    // 2. B joins and takes one partition, paused at A, then leaves: it comes back to A.
    let b = pipeline::start(config.clone()).unwrap();
    wait_for_split(&[&a, &b]);
    b.stop(StopMode::Graceful);
    assert!(wait_until(Duration::from_secs(40), || a.assigned_partitions() == 2));
    // 3. More events on both partitions, and the CRM at full speed: A delivers all of
    //    them, those of the partition that went away and came back too.
    wave(60, 80);
    env.slow_crm(0);
    assert!(
        env.wait_all_committed(Duration::from_secs(120)),
        "a partition was never fetched again"
    );
    for i in 0..80 {
        assert!(env.contact(&format!("P-{i}")).is_some(), "P-{i} never delivered");
    }
    a.stop(StopMode::Graceful);
}
