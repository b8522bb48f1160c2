//! `notifier`: the failure notifier's throughput, and what running it costs the pipeline.
//!
//! 1. Throughput: `notifications` dead-lettered events wait on the failures topic; the
//!    notifier, with coalescing off (every record its own notification), delivers them
//!    to a local receiver that checks every signature (`demo::receiver`, in this
//!    process). Figures: notifications/s delivered and verified, CPU per notification
//!    (the receiver's included). Then the same events with the default coalescing: how
//!    many requests they become, and how long until all are committed.
//! 2. Overhead: the pipeline on `events` changed records, one in ten rejected by a
//!    validation rule (so a tenth of the events are dead-lettered and described on the
//!    failures topic), once with the notifier off and once with it on in the same
//!    process, each on a fresh broker and sandbox.

use std::time::{Duration, Instant};

use crm_sync::config::{Config, Secret, WebhookConfig};
use crm_sync::demo::receiver::Receiver;
use crm_sync::notifier;
use crm_sync::sandbox::kafka::tools;
use serde_json::json;

use super::{config, cpu_seconds, print_run, run_pipeline, runtime, start_sandboxes, stream, HEADER};

const SECRET: &str = "whsec_bG9hZC10ZXN0LXdlYmhvb2sta2V5IQ==";

fn with_webhook(mut config: Config, receiver: &Receiver, group: &str) -> Config {
    config.notifier.group_id = Some(group.to_string());
    config.notifier.dlq_topic = "load-dlq".into();
    config.tenants[0].webhooks = vec![WebhookConfig {
        url: format!("http://{}/hooks/bench", receiver.addr),
        secrets: vec![Secret::new(SECRET)],
    }];
    config
}

fn dead_lettered(i: usize) -> (String, Vec<u8>) {
    let event = json!({
        "kind": "dead_lettered", "stage": "deliver", "error_code": "crm_validation", "error_class": "permanent",
        "crm_status": 400, "crm_code": "FIELD_CUSTOM_VALIDATION_EXCEPTION", "message": "Records of this kind are not accepted for now.",
        "attempts": 1, "first_failure_at": chrono::Utc::now().to_rfc3339(), "last_failure_at": chrono::Utc::now().to_rfc3339(),
        "tenant": "bench", "entity": "contact", "key": format!("B-{i:07}"), "event_id": format!("ev-{i}"), "version": 1,
        "source": {"topic": "load-events", "partition": 0, "offset": i}, "dlq_topic": "load-dlq",
    });
    (format!("B-{i:07}"), event.to_string().into_bytes())
}

fn committed_all(bootstrap: &str, group: &str, end: i64) -> bool {
    tools::committed(bootstrap, group, "load-failures", 1)
        .ok()
        .and_then(|c| c[0])
        .is_some_and(|c| c >= end)
}

pub fn run(notifications: usize, events: usize) {
    crm_sync::telemetry::prometheus();
    println!("\n### notifier: webhook notifications to a local receiver that checks every signature\n");
    let s = start_sandboxes(1, 0);
    let failures: Vec<_> = (0..notifications).map(dead_lettered).collect();
    runtime()
        .block_on(tools::produce(&s.bootstrap, "load-failures", &failures))
        .expect("produce");
    let receiver = Receiver::start(SECRET, false).expect("receiver");
    let mut one_by_one = with_webhook(config(&s, "load-notifier", true, 1e6, 8, 200), &receiver, "notifier-1");
    one_by_one.notifier.per_record_limit = u32::MAX;
    one_by_one.notifier.dlq_rate_per_minute = 0;
    let cpu0 = cpu_seconds();
    let t0 = Instant::now();
    let n = notifier::start(&one_by_one, false)
        .expect("start")
        .expect("an endpoint");
    while receiver.verified_count() < notifications {
        if t0.elapsed() > Duration::from_secs(600) {
            let text = crm_sync::telemetry::prometheus().render();
            let notifier_lines: Vec<&str> = text.lines().filter(|l| l.starts_with("crm_sync_notif")).collect();
            panic!(
                "{} of {notifications} delivered in time: {notifier_lines:#?}; failures topic ends at {:?}, notifier committed {:?}",
                receiver.verified_count(),
                tools::end_offsets(&s.bootstrap, "load-failures", 1),
                tools::committed(&s.bootstrap, "notifier-1", "load-failures", 1)
            );
        }
        std::thread::sleep(Duration::from_millis(10)); // progress sampling cadence
    }
    let seconds = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    n.stop(Duration::from_secs(10));
    println!(
        "One notification per record: {notifications} delivered and verified in {seconds:.2} s = **{:.0} notifications/s** (one endpoint, one request at a time); CPU {:.0} µs per notification, the receiver's included.",
        notifications as f64 / seconds,
        cpu * 1e6 / notifications as f64
    );

    let coalescing = Receiver::start(SECRET, false).expect("receiver");
    let coalesced = with_webhook(
        config(&s, "load-notifier", true, 1e6, 8, 200),
        &coalescing,
        "notifier-2",
    );
    let t0 = Instant::now();
    let n = notifier::start(&coalesced, false).expect("start").expect("an endpoint");
    while !committed_all(&s.bootstrap, "notifier-2", notifications as i64) {
        assert!(t0.elapsed() < Duration::from_secs(600), "not committed within 600 s");
        std::thread::sleep(Duration::from_millis(10)); // progress sampling cadence
    }
    let seconds = t0.elapsed().as_secs_f64();
    n.stop(Duration::from_secs(10));
    let got = coalescing.received();
    let counted: u64 = got
        .verified
        .iter()
        .map(|v| match v["type"].as_str() {
            Some("records.dead_lettered") => v["data"]["count"].as_u64().unwrap_or(0),
            Some("record.dead_lettered") => 1,
            _ => 0,
        })
        .sum();
    println!(
        "Default coalescing (10 s windows, 3 one by one): the same {notifications} failures became {} requests counting {counted} records, all committed after {seconds:.1} s (the last window's end).",
        got.verified.len()
    );
    drop(s);

    println!("\nThe pipeline on {events} changed records, one in ten rejected by the CRM (dead-lettered), batched upserts:\n\n{HEADER}");
    let messages = stream(events, 1, false);
    let rejected: Vec<String> = (0..events).step_by(10).map(|r| format!("B-{r:07}")).collect();
    // A first run warms the process up (measured: 1.3× slower than the next); then off
    // first and last, so that a drift of the shared machine shows.
    let runs: [(&str, Option<u32>); 5] = [
        ("warm-up, not compared", None),
        ("notifier off", None),
        ("notifier on (default coalescing)", Some(3)),
        ("notifier on (one request per dead letter)", Some(u32::MAX)),
        ("notifier off again", None),
    ];
    let mut figures = Vec::new();
    for (i, (name, per_record_limit)) in runs.into_iter().enumerate() {
        let s = start_sandboxes(12, 0);
        runtime().block_on(async {
            reqwest::Client::new()
                .post(format!("{}/__sandbox/faults", s.url))
                .json(&json!({"rejected_keys": rejected}))
                .send()
                .await
                .expect("set faults");
        });
        runtime()
            .block_on(tools::produce(&s.bootstrap, super::TOPIC, &messages))
            .expect("produce");
        let receiver = Receiver::start(SECRET, false).expect("receiver");
        let group = format!("load-notifier-{i}");
        let mut config = with_webhook(config(&s, &group, true, 1e6, 32, 200), &receiver, &format!("{group}.n"));
        let n = per_record_limit.map(|limit| {
            config.notifier.per_record_limit = limit;
            notifier::start(&config, false).expect("start").expect("an endpoint")
        });
        let f = run_pipeline(&s, config, 12, messages.len());
        print_run(name, &f, messages.len());
        if let Some(n) = n {
            n.stop(Duration::from_secs(10));
            println!(
                "|   ↳ {} notifications verified by the receiver by the end of the run | | | | | | | | |",
                receiver.verified_count()
            );
        }
        figures.push(f);
    }
    let rate = |f: &super::RunFigures| f.events as f64 / f.seconds;
    let cpu = |f: &super::RunFigures| f.cpu_seconds / f.events as f64;
    let figures = &figures[1..];
    let off_rate = (rate(&figures[0]) + rate(&figures[3])) / 2.0;
    let off_cpu = (cpu(&figures[0]) + cpu(&figures[3])) / 2.0;
    println!(
        "\nAgainst the mean of the two runs without it: events/s {:.2}× (default coalescing) and {:.2}× (one request per dead letter); CPU per event {:.2}× and {:.2}×. The two runs without it differ by {:.2}× in events/s.",
        rate(&figures[1]) / off_rate,
        rate(&figures[2]) / off_rate,
        cpu(&figures[1]) / off_cpu,
        cpu(&figures[2]) / off_cpu,
        rate(&figures[3]) / rate(&figures[0])
    );
}
