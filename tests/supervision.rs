//! A panic inside any actor kind restarts that actor; the pipeline keeps going and nothing
//! is lost. Its own test binary, so the restart counters it reads are its own.

mod common;

use std::time::Duration;

use common::*;
use crm_sync::consume::StopMode;
use crm_sync::demo::workload::{generate, TenantSpec, WorkloadSpec};
use crm_sync::demo::{metric_total, verify};
use crm_sync::pipeline::{self, ActorKind};
use crm_sync::sandbox::salesforce::Faults;
use crm_sync::telemetry::metric;

#[test]
fn restarts_each_actor_kind_after_an_injected_panic_and_loses_nothing() {
    let env = Env::new(3);
    // Retryable faults, so that the retry queue has work to panic in.
    env.sf.set_faults(Faults {
        server_error_rate: 0.1,
        seed: 9,
        ..Faults::default()
    });
    let spec = WorkloadSpec {
        stale_ratio: 0.1,
        ..WorkloadSpec::small(
            vec![TenantSpec {
                name: "acme".into(),
                entities: vec!["contact".into()],
            }],
            600,
        )
    };
    let workload = generate(&spec);
    let (first, second) = workload.messages.split_at(workload.messages.len() / 2);

    // 1. Half the stream, and the service working on it.
    env.produce(first);
    let service = pipeline::start(env.config()).unwrap();
    assert!(wait_until(Duration::from_secs(30), || env.sf.stats().upserts_applied > 100));

    // 2. A panic in each actor kind, mid-stream.
    for kind in [
        ActorKind::Partition,
        ActorKind::Tenant("acme".into()),
        ActorKind::Diff,
        ActorKind::RetryQueue,
    ] {
        service.inject_panic(kind);
    }

    // 3. The rest of the stream; every offset gets committed.
    env.produce(second);
    assert!(
        env.wait_all_committed(Duration::from_secs(90)),
        "pipeline stalled after the panics"
    );

    // 4. Every actor kind was restarted...
    let text = scrape(service.http_addr());
    for actor in ["partition", "tenant", "diff", "retry_queue"] {
        assert!(
            metric_total(&text, metric::ACTOR_RESTARTS, Some(("actor", actor))) >= 1.0,
            "{actor} was not restarted:\n{text}"
        );
    }
    // 5. ...and the CRM holds the newest version of every record.
    let mismatches = verify(&env.config(), &workload.expected, &env.sandboxes());
    assert!(
        mismatches.is_empty(),
        "{} records differ: {:?}",
        mismatches.len(),
        &mismatches[..mismatches.len().min(5)]
    );
    service.stop(StopMode::Graceful);
}
