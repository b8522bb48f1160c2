//! Crashes, restarts and group membership changes: re-delivery, never loss.

mod common;

use std::time::Duration;

use common::*;
use crm_sync::consume::StopMode;
use crm_sync::demo::verify;
use crm_sync::demo::workload::{generate, TenantSpec, WorkloadSpec};
use crm_sync::pipeline;
use crm_sync::sandbox::salesforce::Faults;

fn workload(records: usize, seed: u64) -> crm_sync::demo::workload::Workload {
    generate(&WorkloadSpec {
        seed,
        ..WorkloadSpec::small(
            vec![TenantSpec {
                name: "acme".into(),
                entities: vec!["contact".into()],
            }],
            records,
        )
    })
}

#[test]
fn resumes_from_committed_offsets_after_an_abrupt_stop() {
    let env = Env::new(3);
    let w = workload(800, 11);
    env.produce(&w.messages);
    env.slow_crm(3);
    // 1. The service dies mid-stream without draining or committing.
    let service = pipeline::start(env.config()).unwrap();
    assert!(wait_until(Duration::from_secs(30), || env.sf.stats().upserts_applied > 200));
    let report = service.stop(StopMode::Abort);
    assert!(!report.committed);
    assert!(!env.all_committed(), "the stop came too late to be mid-stream");
    env.slow_crm(0);
    // 2. A new instance in the same group picks up from the committed offsets.
    let service = pipeline::start(env.config()).unwrap();
    assert!(env.wait_all_committed(Duration::from_secs(60)));
    let mismatches = verify(&env.config(), &w.expected, &env.sandboxes());
    assert!(mismatches.is_empty(), "{:?}", &mismatches[..mismatches.len().min(5)]);
    service.stop(StopMode::Graceful);
}

#[test]
fn two_instances_split_partitions_and_the_survivor_finishes_when_one_leaves() {
    let env = Env::new(4);
    let w = workload(1500, 12);
    // 1. Two members of one group share the partitions.
    let a = pipeline::start(env.config()).unwrap();
    assert!(wait_until(Duration::from_secs(20), || a.assigned_partitions() == 4));
    let b = pipeline::start(env.config()).unwrap();
    assert!(
        wait_until(Duration::from_secs(30), || a.assigned_partitions() == 2
            && b.assigned_partitions() == 2),
        "partitions not split: a={} b={}",
        a.assigned_partitions(),
        b.assigned_partitions()
    );
    // 2. The stream flows through both; then one leaves mid-stream.
    env.slow_crm(2);
    env.produce(&w.messages);
    assert!(wait_until(Duration::from_secs(30), || env.sf.stats().upserts_applied > 100));
    assert!(!env.all_committed(), "the stream was over before the member left");
    let report = b.stop(StopMode::Graceful);
    env.slow_crm(0);
    assert!(report.committed);
    // 3. The other takes its partitions back and finishes; nothing is lost.
    assert!(wait_until(Duration::from_secs(30), || a.assigned_partitions() == 4));
    assert!(env.wait_all_committed(Duration::from_secs(60)));
    let mismatches = verify(&env.config(), &w.expected, &env.sandboxes());
    assert!(mismatches.is_empty(), "{:?}", &mismatches[..mismatches.len().min(5)]);
    a.stop(StopMode::Graceful);
}

#[test]
fn a_member_that_loses_partitions_drops_their_waiting_retries_and_nothing_is_lost() {
    let env = Env::new(4);
    let w = workload(400, 13);
    env.produce(&w.messages);
    // Retries that outlast the rebalance: the CRM fails everything for now.
    let mut config = env.config();
    config.retry.max_attempts = 10_000;
    config.retry.max_delay_ms = 100;
    config.retry.max_age_ms = 120_000;
    // The breaker stays closed: this is about retries waiting in memory, not about a
    // tenant that stops writing (tenant_health.rs).
    config.breaker.failure_threshold = 1_000_000;
    env.sf.set_faults(Faults {
        server_error_rate: 1.0,
        ..Faults::default()
    });
    // 1. B owns all partitions; its events wait for retries.
    let b = pipeline::start(config.clone()).unwrap();
    assert!(wait_until(Duration::from_secs(20), || b.assigned_partitions() == 4));
    assert!(wait_until(Duration::from_secs(20), || env
        .sf
        .stats()
        .rejected
        .get(&503)
        .copied()
        .unwrap_or(0)
        > 200));
    // 2. A joins and takes half of them; B drains (its retries do not finish), commits, hands over.
    let a = pipeline::start(config).unwrap();
    assert!(wait_until(Duration::from_secs(30), || a.assigned_partitions() == 2
        && b.assigned_partitions() == 2));
    // 3. The CRM recovers; B must not write the events of partitions it no longer owns.
    env.sf.set_faults(Faults::default());
    assert!(env.wait_all_committed(Duration::from_secs(90)));
    let text = scrape(b.http_addr());
    assert!(
        crm_sync::demo::metric_total(
            &text,
            crm_sync::telemetry::metric::OUTCOMES,
            Some(("outcome", "handed_over"))
        ) > 0.0,
        "no waiting retry was handed over"
    );
    let mismatches = verify(&env.config(), &w.expected, &env.sandboxes());
    assert!(mismatches.is_empty(), "{:?}", &mismatches[..mismatches.len().min(5)]);
    a.stop(StopMode::Graceful);
    b.stop(StopMode::Graceful);
}

/// A message dead-lettered just before a crash, whose offset was not committed yet, is
/// read again by the next owner: it must not be dead-lettered a second time. (The DLQ
/// write leaves a marker on the state topic, read back with the partition's states.)
#[test]
fn a_message_dead_lettered_before_a_crash_is_not_dead_lettered_again() {
    let env = Env::new(1);
    // 1. A valid event whose write is slow holds the watermark at offset 0; the bad
    //    message behind it, at offset 1, is dead-lettered at once.
    env.slow_crm(5_000);
    env.produce(&[
        upsert("e1", "C-1", 1, "Ada", "Lovelace"),
        ("junk".into(), b"{not json".to_vec()),
    ]);
    let service = pipeline::start(env.config()).unwrap();
    let state_written = || crm_sync::sandbox::kafka::tools::end_offsets(&env.bootstrap, &env.state, 1).unwrap()[0] >= 1;
    assert!(wait_until(Duration::from_secs(30), || env.read_dlq().len() == 1 && state_written()));
    // 2. The service dies before anything is committed.
    assert!(!service.stop(StopMode::Abort).committed);
    assert!(!env.all_committed());
    // 3. The next owner reads both messages again: delivers one, and does not
    //    dead-letter the other twice.
    env.slow_crm(0);
    let service = pipeline::start(env.config()).unwrap();
    assert!(env.wait_all_committed(Duration::from_secs(60)));
    assert!(env.contact("C-1").is_some());
    assert_eq!(env.read_dlq().len(), 1, "dead-lettered again after the crash");
    assert_eq!(env.read_failures().len(), 1);
    service.stop(StopMode::Graceful);
}

/// A member killed between a message's DLQ record and the marker that says it is done
/// leaves only the marker that it began: the next owner looks in the DLQ, finds the
/// record (by the id the marker and the record's last `crm-sync.dead-letter.id` share)
/// and writes no second one. Killed before the record, it leaves the begun marker alone:
/// the next owner finds no record and dead-letters the message, once. Both markers are
/// then settled, so that no later restore looks in the DLQ for them again.
#[test]
fn a_crash_between_a_dlq_record_and_its_marker_neither_repeats_nor_loses_it() {
    use crm_sync::diff::store::{DeadLettered, DeadLettering};
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord};

    let env = Env::new(1);
    env.produce(&[
        ("junk-0".into(), b"{not json".to_vec()),
        ("junk-1".into(), b"{not json".to_vec()),
    ]);
    // What the killed member left: a begun marker for both messages, and the DLQ record
    // of the first (with the source headers a DLQ record carries).
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &env.bootstrap)
        .create()
        .unwrap();
    block(async {
        for offset in [0, 1] {
            let begun = DeadLettering {
                message: DeadLettered {
                    topic: env.topic.clone(),
                    partition: 0,
                    offset,
                },
                id: format!("dead-lettering-{offset}"),
                dlq_partition: 0,
                from_offset: 0,
            };
            let (key, value) = begun.encode();
            producer
                .send(
                    FutureRecord::to(&env.state).partition(0).key(&key).payload(&value),
                    Duration::from_secs(10),
                )
                .await
                .unwrap();
        }
        // The message's own headers come first, and may forge crm-sync's: this one
        // names the other message's dead-lettering.
        let headers = [
            ("crm-sync.dead-letter.id", "dead-lettering-1"),
            ("crm-sync.source.topic", env.topic.as_str()),
            ("crm-sync.source.partition", "0"),
            ("crm-sync.source.offset", "0"),
            ("crm-sync.dead-letter.id", "dead-lettering-0"),
        ]
        .into_iter()
        .fold(OwnedHeaders::new(), |h, (key, value)| {
            h.insert(Header {
                key,
                value: Some(value),
            })
        });
        producer
            .send(
                FutureRecord::to(&env.dlq)
                    .partition(0)
                    .key("junk-0")
                    .payload("{not json")
                    .headers(headers),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
    });

    let service = pipeline::start(env.config()).unwrap();
    assert!(env.wait_all_committed(Duration::from_secs(60)));
    let mut sources: Vec<String> = env
        .read_dlq()
        .iter()
        .map(|m| m.header("crm-sync.source.offset").unwrap_or("none").to_string())
        .collect();
    sources.sort();
    assert_eq!(sources, ["0", "1"], "one DLQ record per message");
    assert_eq!(
        env.read_failures().len(),
        1,
        "the failure event of the message dead-lettered now"
    );
    service.stop(StopMode::Graceful);
    // Read back as the next owner would: no dead-lettering is left begun.
    let client = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &env.bootstrap)
        .clone();
    let mut markers = crm_sync::diff::store::Markers::default();
    crm_sync::diff::store::restore(&client, &env.state, &[0], Duration::from_secs(20), |_| {}, &mut markers).unwrap();
    assert!(markers.dead_lettering.is_empty(), "{:?}", markers.dead_lettering);
    assert_eq!(markers.dead_lettered.len(), 2, "{:?}", markers.dead_lettered);
}

/// The same without a crash: a partition actor that restarts re-reads its undecided
/// messages from its watermark, among them one it had already dead-lettered. It must
/// not dead-letter it twice.
#[test]
fn a_restarted_partition_does_not_dead_letter_a_message_twice() {
    let env = Env::new(1);
    env.slow_crm(3_000);
    env.produce(&[
        upsert("e1", "C-1", 1, "Ada", "Lovelace"),
        ("junk".into(), b"{not json".to_vec()),
    ]);
    let service = pipeline::start(env.config()).unwrap();
    assert!(wait_until(Duration::from_secs(30), || env.read_dlq().len() == 1));
    // 1. The partition actor panics at its next batch, while the slow event holds its
    //    watermark at 0.
    service.inject_panic(crm_sync::pipeline::ActorKind::Partition);
    env.produce(&[upsert("e2", "C-2", 1, "Grace", "Hopper")]);
    let restarted = || {
        crm_sync::demo::metric_total(
            &scrape(service.http_addr()),
            crm_sync::telemetry::metric::ACTOR_RESTARTS,
            Some(("actor", "partition")),
        ) >= 1.0
    };
    assert!(
        wait_until(Duration::from_secs(30), restarted),
        "the partition actor did not restart"
    );
    env.slow_crm(0);
    // 2. It re-reads the messages: delivers the events, and does not dead-letter the
    //    bad one again.
    assert!(env.wait_all_committed(Duration::from_secs(60)));
    assert!(env.contact("C-1").is_some() && env.contact("C-2").is_some());
    assert_eq!(env.read_dlq().len(), 1, "dead-lettered again after the restart");
    service.stop(StopMode::Graceful);
}
