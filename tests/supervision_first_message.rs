//! A panic on the very first message a partition actor handles — before it has
//! published any watermark — still loses nothing. Its own test binary, so the restart
//! counter it reads is its own.

mod common;

use std::time::Duration;

use common::*;
use crm_sync::consume::StopMode;
use crm_sync::demo::metric_total;
use crm_sync::pipeline::{self, ActorKind};
use crm_sync::telemetry::metric;

#[test]
fn a_panic_on_a_partitions_very_first_message_loses_nothing() {
    let env = Env::new(1);
    let service = pipeline::start(env.config()).unwrap();
    assert!(wait_until(Duration::from_secs(20), || service.assigned_partitions() == 1));
    // 1. The partition actor will panic on the first message it ever handles.
    service.inject_panic(ActorKind::Partition);
    let before = metric_total(
        &scrape(service.http_addr()),
        metric::ACTOR_RESTARTS,
        Some(("actor", "partition")),
    );
    env.produce(&[
        upsert("e1", "C-1", 1, "Ada", "Lovelace"),
        upsert("e2", "C-2", 1, "Grace", "Hopper"),
    ]);
    // 2. It is restarted, re-reads from the start, and both events arrive.
    assert!(env.wait_all_committed(Duration::from_secs(30)));
    let after = metric_total(
        &scrape(service.http_addr()),
        metric::ACTOR_RESTARTS,
        Some(("actor", "partition")),
    );
    assert_eq!(after - before, 1.0);
    assert_eq!(env.contact("C-1").unwrap()["LastName"], "Lovelace");
    assert_eq!(env.contact("C-2").unwrap()["LastName"], "Hopper");
    service.stop(StopMode::Graceful);
}
