//! Crashes, restarts and group membership changes: re-delivery, never loss.

mod common;

use std::time::Duration;

use common::*;
use crm_sync::consume::StopMode;
use crm_sync::demo::verify;
use crm_sync::demo::workload::{generate, TenantSpec, WorkloadSpec};
use crm_sync::pipeline;

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
