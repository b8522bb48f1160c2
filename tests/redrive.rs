//! Redrive: dead-lettered events go back to the input topic after a fix, filtered, never
//! moving a record backwards, and a second run redrives nothing twice.

mod common;

use std::time::Duration;

use common::*;
use crm_sync::consume::StopMode;
use crm_sync::pipeline;
use crm_sync::redrive::{redrive, Filter, REDRIVEN};
use crm_sync::sandbox::common::Faults;
use crm_sync::sandbox::kafka::tools;

const WAIT: Duration = Duration::from_secs(60);

#[test]
fn redrive_after_a_fix_delivers_what_was_dead_lettered_and_never_an_older_version() {
    let env = Env::new(1);
    let mut config = env.config();
    config.tenants[0].batch_size = 1;
    // A validation rule in the CRM refuses these three records, for now.
    env.sf.set_faults(Faults {
        rejected_keys: vec!["P-1".into(), "P-2".into(), "P-3".into()],
        ..Faults::default()
    });
    let service = pipeline::start(config.clone()).unwrap();
    env.produce(&[
        upsert("p1", "P-1", 1, "Ada", "One"),
        upsert("p2", "P-2", 1, "Bob", "Two"),
        upsert("p3", "P-3", 1, "Cy", "Old"),
        upsert("g1", "G-1", 1, "Good", "Record"),
    ]);
    assert!(env.wait_all_committed(WAIT));
    assert_eq!(env.read_dlq().len(), 3);
    // A redrive too early: P-1, P-2 and P-3 fail again and are in the DLQ twice now.
    let early = redrive(&config, &Filter::default(), false).unwrap();
    assert_eq!(early.redriven, 3);
    assert!(wait_until(WAIT, || env.read_dlq().len() == 6));
    assert!(env.wait_all_committed(WAIT));

    // The rule is lifted; meanwhile P-3 gets a newer version, which goes through.
    env.sf.set_faults(Faults::default());
    env.produce(&[upsert("p3b", "P-3", 2, "Cy", "New")]);
    assert!(env.wait_all_committed(WAIT));
    assert_eq!(env.contact("P-3").unwrap()["LastName"], "New");

    // A dry run counts and produces nothing.
    let input_end = || tools::end_offsets(&env.bootstrap, &env.topic, env.partitions).unwrap()[0];
    let before = input_end();
    let dry = redrive(&config, &Filter::default(), true).unwrap();
    assert_eq!(
        (dry.read, dry.selected, dry.redriven, dry.superseded, dry.duplicate),
        (6, 6, 2, 1, 3),
        "each record once, and not P-3's older version"
    );
    assert_eq!(dry.by_reason.get("crm_validation"), Some(&6));
    assert_eq!(input_end(), before, "a dry run produces nothing");
    let other_tenant = Filter {
        tenant: Some("nobody".into()),
        ..Filter::default()
    };
    assert_eq!(redrive(&config, &other_tenant, true).unwrap().selected, 0);

    // The run: P-1 and P-2 go back and are delivered; P-3's older version does not.
    let done = redrive(&config, &Filter::default(), false).unwrap();
    assert_eq!((done.redriven, done.superseded), (2, 1));
    assert_eq!(input_end(), before + 2);
    assert!(env.wait_all_committed(WAIT));
    assert_eq!(env.contact("P-1").unwrap()["LastName"], "One");
    assert_eq!(env.contact("P-2").unwrap()["LastName"], "Two");
    assert_eq!(env.contact("P-3").unwrap()["LastName"], "New", "never backwards");
    let redriven = tools::read_all(&env.bootstrap, &env.topic, env.partitions, WAIT).unwrap();
    assert_eq!(
        redriven.iter().filter(|m| m.headers.contains_key(REDRIVEN)).count(),
        3 + 2
    );

    // Twice is once.
    let again = redrive(&config, &Filter::default(), false).unwrap();
    assert_eq!(
        (
            again.redriven,
            again.already_delivered,
            again.superseded,
            again.duplicate
        ),
        (0, 2, 1, 3)
    );
    assert_eq!(input_end(), before + 2);
    service.stop(StopMode::Graceful);
}
