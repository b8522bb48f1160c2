//! The failure notifier (issue: people are told): failure events become signed webhook
//! notifications that a receiver using the reference Standard Webhooks library verifies;
//! they survive the receiver being down, a receiver that cannot verify them holds up no
//! other and ends in the notifier's dead-letter topic, storms are folded into a bounded
//! number of summaries, and offsets are committed only behind what was delivered.

mod common;

use std::time::Duration;

use common::webhooks::{secret, Receiver};
use common::*;
use crm_sync::config::Config;
use crm_sync::consume::StopMode;
use crm_sync::notifier;
use crm_sync::pipeline;
use crm_sync::sandbox::common::Faults;
use crm_sync::sandbox::kafka::tools;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(60);

/// The environment's config, with its tenant renamed to `tenant`, the given webhook
/// endpoints (url, secrets) for it and for the operators, and `notifier` settings.
fn config(
    env: &Env,
    tenant: &str,
    tenant_hooks: &[(String, Vec<String>)],
    operator_hooks: &[(String, Vec<String>)],
    notifier: &str,
    ndlq: &str,
) -> Config {
    let hook = |table: &str, (url, secrets): &(String, Vec<String>)| {
        format!("\n[[{table}]]\nurl = \"{url}\"\nsecrets = {secrets:?}\n")
    };
    let mut text = env
        .config_toml()
        .replace("name = \"acme\"", &format!("name = \"{tenant}\""));
    for h in tenant_hooks {
        text += &hook("tenants.webhooks", h);
    }
    text += &format!(
        "\n[notifier]\ndlq_topic = \"{ndlq}\"\ngroup_id = \"{}\"\n{notifier}\n",
        unique("notifier")
    );
    for h in operator_hooks {
        text += &hook("notifier.endpoints", h);
    }
    Config::from_toml_with_env(&text, |_| Some(CLIENT_SECRET.to_string())).expect("valid config")
}

fn dead_lettered(tenant: &str, key: &str, code: &str) -> (String, Vec<u8>) {
    let event = json!({
        "kind": "dead_lettered", "stage": "deliver", "error_code": code, "error_class": "permanent",
        "crm_status": 400, "crm_code": "FIELD_CUSTOM_VALIDATION_EXCEPTION", "message": "Email is not valid",
        "attempts": 1, "first_failure_at": "2026-11-30T12:00:00.000Z", "last_failure_at": chrono::Utc::now().to_rfc3339(),
        "tenant": tenant, "entity": "contact", "key": key, "event_id": format!("e-{key}"), "version": 1,
        "source": {"topic": "events", "partition": 0, "offset": 7}, "dlq_topic": "dlq",
    });
    (key.to_string(), event.to_string().into_bytes())
}

fn tenant_state(tenant: &str, from: &str, to: &str) -> (String, Vec<u8>) {
    let event = json!({"kind": "tenant_state", "tenant": tenant, "from": from, "to": to, "reason": "crm_unavailable", "at": "2026-11-30T12:00:00.000Z"});
    (tenant.to_string(), event.to_string().into_bytes())
}

fn types(entries: &[Value]) -> Vec<String> {
    entries
        .iter()
        .map(|e| e["body"]["type"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn committed(env: &Env, config: &Config) -> Option<i64> {
    let group = config.notifier.group_id.clone().unwrap();
    tools::committed(&env.bootstrap, &group, &env.failures, 1).ok()?[0]
}

fn metric(name: &str, endpoint: &str) -> f64 {
    let text = crm_sync::telemetry::prometheus().render();
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(&format!("endpoint=\"{endpoint}\"")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn signed_notifications_verify_with_the_reference_library_and_survive_the_receiver_being_down() {
    let env = Env::new(1);
    let dir = tempfile::tempdir().unwrap();
    let (old, new) = (secret(), secret());
    // The receiver still knows only the old secret: we are in the middle of a rotation.
    let mut receiver = Receiver::start(&old, dir.path(), false);
    let tenant = unique("t").replace('-', "_");
    let ndlq = unique("ndlq");
    env.kafka.as_ref().unwrap().create_topic(&ndlq, 1).unwrap();
    let config = config(
        &env,
        &tenant,
        &[(receiver.url(), vec![new.clone(), old.clone()])],
        &[],
        "retry_base_delay_ms = 100\nretry_max_delay_ms = 400",
        &ndlq,
    );
    env.produce_failures(&[
        tenant_state(&tenant, "closed", "open"),
        dead_lettered(&tenant, "C-1", "crm_validation"),
        dead_lettered(&tenant, "C-2", "crm_duplicate"),
        tenant_state(&tenant, "open", "closed"),
    ]);
    let n = notifier::start(&config, false)
        .unwrap()
        .expect("an endpoint is configured");

    assert!(
        wait_until(WAIT, || receiver.verified().len() == 4),
        "{:?}",
        receiver.entries()
    );
    assert_eq!(
        types(&receiver.verified()),
        [
            "tenant.state_changed",
            "record.dead_lettered",
            "record.dead_lettered",
            "tenant.state_changed"
        ],
        "in the order they happened"
    );
    let first = &receiver.verified()[0]["body"];
    assert_eq!(first["data"]["to"], "open");
    assert_eq!(first["data"]["tenant"], tenant.as_str());
    assert_eq!(receiver.verified()[1]["body"]["data"]["key"], "C-1");
    assert!(receiver.with("rejected").is_empty());
    assert!(
        wait_until(WAIT, || committed(&env, &config) == Some(4)),
        "committed once delivered"
    );

    // The receiver goes down; what fails meanwhile waits for it, uncommitted.
    receiver.kill();
    env.produce_failures(&[
        tenant_state(&tenant, "closed", "auth_failed"),
        dead_lettered(&tenant, "C-3", "crm_validation"),
    ]);
    let endpoint = format!("{tenant}#0");
    assert!(
        wait_until(WAIT, || metric(
            "crm_sync_notification_attempt_failures_total",
            &endpoint
        ) >= 3.0),
        "retried while down"
    );
    assert_eq!(
        committed(&env, &config),
        Some(4),
        "nothing is committed past an undelivered notification"
    );
    receiver.restart();
    assert!(
        wait_until(WAIT, || receiver.verified().len() == 6),
        "{:?}",
        receiver.entries()
    );
    assert_eq!(
        types(&receiver.verified()[4..]),
        ["tenant.state_changed", "record.dead_lettered"]
    );
    let ids: std::collections::HashSet<_> = receiver.verified().iter().map(|e| e["id"].to_string()).collect();
    assert_eq!(ids.len(), 6, "one webhook-id per notification");
    assert!(wait_until(WAIT, || committed(&env, &config) == Some(6)));
    assert_eq!(tools::end_offsets(&env.bootstrap, &ndlq, 1).unwrap(), [0]);
    assert!(n.stop(Duration::from_secs(10)));
}

#[test]
fn a_retry_keeps_its_webhook_id_and_a_receiver_that_cannot_verify_holds_up_no_one() {
    let env = Env::new(1);
    let dir = tempfile::tempdir().unwrap();
    let ops_secret = secret();
    // Answers 503 to the first request of each id: every notification is retried once.
    let operators = Receiver::start(&ops_secret, dir.path(), true);
    // Knows a secret the tenant's endpoint does not sign with.
    let wrong = Receiver::start(&secret(), dir.path(), false);
    let tenant = unique("t").replace('-', "_");
    let ndlq = unique("ndlq");
    env.kafka.as_ref().unwrap().create_topic(&ndlq, 1).unwrap();
    let signing = secret();
    let config = config(
        &env,
        &tenant,
        &[(wrong.url(), vec![signing.clone()])],
        &[(operators.url(), vec![ops_secret.clone()])],
        "retry_base_delay_ms = 50\nretry_max_delay_ms = 200\ngive_up_after_ms = 1500",
        &ndlq,
    );
    env.produce_failures(&[
        dead_lettered(&tenant, "K-1", "crm_validation"),
        dead_lettered("", "", "invalid_json"),
        tenant_state(&tenant, "closed", "open"),
    ]);
    let n = notifier::start(&config, false).unwrap().unwrap();

    assert!(
        wait_until(WAIT, || operators.verified().len() == 3),
        "{:?}",
        operators.entries()
    );
    for e in operators.verified() {
        let first_try = operators.with("failed_on_purpose");
        assert!(
            first_try.iter().any(|f| f["id"] == e["id"]),
            "the retry carried the webhook-id of the first attempt"
        );
    }
    // The tenant's endpoint rejects every attempt, and they end in the dead-letter topic.
    assert!(wait_until(WAIT, || {
        tools::end_offsets(&env.bootstrap, &ndlq, 1).unwrap()[0] == 2
    }));
    assert!(wrong.verified().is_empty());
    assert!(
        wrong.with("rejected").len() >= 4,
        "retried before giving up: {:?}",
        wrong.entries()
    );
    let dead = tools::read_all(&env.bootstrap, &ndlq, 1, Duration::from_secs(10)).unwrap();
    for d in &dead {
        assert_eq!(d.header("crm-sync.notify.reason"), Some("gave_up"));
        assert_eq!(
            d.header("crm-sync.webhook.endpoint"),
            Some(format!("{tenant}#0").as_str())
        );
        assert_eq!(d.header("crm-sync.notify.last-error"), Some("HTTP 401"));
        let body: Value = serde_json::from_slice(d.payload.as_deref().unwrap()).unwrap();
        assert!(body["type"].as_str().is_some());
        let all = format!("{d:?}");
        assert!(
            !all.contains(&signing) && !all.contains(&wrong.url()),
            "no secret or URL in {all}"
        );
    }
    assert!(wait_until(WAIT, || committed(&env, &config) == Some(3)));
    assert!(n.stop(Duration::from_secs(10)));
}

#[test]
fn a_storm_is_a_bounded_number_of_summaries_that_count_every_record() {
    const STORM: usize = 5_000;
    let env = Env::new(1);
    let dir = tempfile::tempdir().unwrap();
    let key = secret();
    let receiver = Receiver::start(&key, dir.path(), false);
    let tenant = unique("t").replace('-', "_");
    let ndlq = unique("ndlq");
    env.kafka.as_ref().unwrap().create_topic(&ndlq, 1).unwrap();
    let config = config(
        &env,
        &tenant,
        &[(receiver.url(), vec![key.clone()])],
        &[],
        "coalesce_window_ms = 1000\nper_record_limit = 3\nsummary_samples = 5\ndlq_rate_per_minute = 1000",
        &ndlq,
    );
    let storm: Vec<_> = (0..STORM)
        .map(|i| dead_lettered(&tenant, &format!("S-{i}"), "crm_validation"))
        .collect();
    let n = notifier::start(&config, false).unwrap().unwrap();
    let started = std::time::Instant::now();
    env.produce_failures(&storm);
    let counted = || -> u64 {
        receiver
            .verified()
            .iter()
            .map(|e| match e["body"]["type"].as_str() {
                Some("record.dead_lettered") => 1,
                Some("records.dead_lettered") => e["body"]["data"]["count"].as_u64().unwrap(),
                _ => 0,
            })
            .sum()
    };
    assert!(wait_until(WAIT, || counted() == STORM as u64), "counted {}", counted());
    let seconds = started.elapsed().as_secs() + 1;
    let got = types(&receiver.verified());
    let individual = got.iter().filter(|t| *t == "record.dead_lettered").count();
    let summaries = got.iter().filter(|t| *t == "records.dead_lettered").count();
    assert_eq!(individual, 3);
    assert!(
        summaries as u64 <= seconds + 1,
        "{summaries} summaries in {seconds} s of 1 s windows"
    );
    assert_eq!(
        got.iter().filter(|t| *t == "tenant.dlq_rate_exceeded").count(),
        1,
        "{got:?}"
    );
    for e in receiver.verified() {
        if e["body"]["type"] == "records.dead_lettered" {
            let samples = e["body"]["data"]["samples"].as_array().unwrap();
            assert!(!samples.is_empty() && samples.len() <= 5);
            assert_eq!(e["body"]["data"]["error_code"], "crm_validation");
        }
    }
    assert!(wait_until(WAIT, || committed(&env, &config) == Some(STORM as i64)));
    assert!(n.stop(Duration::from_secs(10)));
}

/// In the service: a tenant's outage and recovery, and a record the CRM rejects, reach
/// the tenant's receiver as verified notifications.
#[test]
fn the_running_service_tells_the_tenants_receiver_about_its_health_and_its_rejected_records() {
    let env = Env::new(1);
    let dir = tempfile::tempdir().unwrap();
    let key = secret();
    let receiver = Receiver::start(&key, dir.path(), false);
    let ndlq = unique("ndlq");
    env.kafka.as_ref().unwrap().create_topic(&ndlq, 1).unwrap();
    let mut config = config(&env, "acme", &[(receiver.url(), vec![key.clone()])], &[], "", &ndlq);
    config.kafka.retry_topic = Some(env.retry.clone());
    config.retry.max_attempts = 3;
    config.breaker.failure_threshold = 3;
    config.breaker.probe_interval_ms = 200;
    config.breaker.max_probe_interval_ms = 400;
    env.sf.set_faults(Faults {
        server_error_rate: 1.0,
        rejected_keys: vec!["R-1".into()],
        ..Faults::default()
    });
    let n = notifier::start(&config, false).unwrap().unwrap();
    let service = pipeline::start(config).unwrap();
    let events: Vec<_> = (0..10)
        .map(|i| upsert(&format!("n{i}"), &format!("R-{i}"), 1, &format!("R{i}"), "Told"))
        .collect();
    env.produce(&events);
    let state_changes = || -> Vec<String> {
        receiver
            .verified()
            .iter()
            .filter(|e| e["body"]["type"] == "tenant.state_changed")
            .map(|e| e["body"]["data"]["to"].as_str().unwrap_or_default().to_string())
            .collect()
    };
    assert!(
        wait_until(WAIT, || state_changes().contains(&"open".to_string())),
        "{:?}",
        receiver.entries()
    );
    env.sf.set_faults(Faults {
        rejected_keys: vec!["R-1".into()],
        ..Faults::default()
    });
    assert!(
        wait_until(WAIT, || state_changes().contains(&"closed".to_string())),
        "{:?}",
        state_changes()
    );
    assert!(env.wait_drained(WAIT));
    assert!(
        wait_until(WAIT, || receiver.verified().iter().any(|e| e["body"]["type"]
            == "record.dead_lettered"
            && e["body"]["data"]["key"] == "R-1")),
        "{:?}\n{:?}\n{:?}",
        receiver.entries(),
        env.read_dlq().len(),
        env.read_failures()
            .iter()
            .map(|m| String::from_utf8_lossy(m.payload.as_deref().unwrap_or_default()).to_string())
            .collect::<Vec<_>>()
    );
    assert!(receiver.with("rejected").is_empty());
    service.stop(StopMode::Graceful);
    assert!(n.stop(Duration::from_secs(10)));
}

/// A panic inside the notifier restarts it from the committed offsets: nothing it had
/// read is lost, and what it had delivered may come again under the same webhook-id.
#[test]
fn a_panic_in_the_notifier_loses_no_notification() {
    crm_sync::telemetry::prometheus();
    let env = Env::new(1);
    let dir = tempfile::tempdir().unwrap();
    let key = secret();
    let receiver = Receiver::start(&key, dir.path(), false);
    let tenant = unique("t").replace('-', "_");
    let ndlq = unique("ndlq");
    env.kafka.as_ref().unwrap().create_topic(&ndlq, 1).unwrap();
    let config = config(&env, &tenant, &[(receiver.url(), vec![key.clone()])], &[], "", &ndlq);
    env.produce_failures(&[tenant_state(&tenant, "closed", "open")]);
    let n = notifier::start(&config, false).unwrap().unwrap();
    assert!(wait_until(WAIT, || receiver.verified().len() == 1));
    n.inject_panic();
    env.produce_failures(&[
        dead_lettered(&tenant, "P-1", "crm_validation"),
        tenant_state(&tenant, "open", "closed"),
    ]);
    let ids =
        || -> std::collections::HashSet<String> { receiver.verified().iter().map(|e| e["id"].to_string()).collect() };
    assert!(wait_until(WAIT, || ids().len() == 3), "{:?}", receiver.entries());
    assert!(wait_until(WAIT, || committed(&env, &config) == Some(3)));
    assert!(wait_until(WAIT, || n.is_ready()), "ready again after the restart");
    assert!(
        crm_sync::telemetry::prometheus()
            .render()
            .lines()
            .any(|l| l.starts_with("crm_sync_actor_restarts_total{actor=\"notifier\"}")),
        "the restart is counted"
    );
    assert!(n.stop(Duration::from_secs(10)));
}

/// An endpoint's queue is bounded two ways: one that keeps failing sheds its oldest
/// waiting notifications to the dead-letter topic (and holds up no other endpoint), one
/// that works gets everything, however small its bound, because reading waits for it.
#[test]
fn a_failing_endpoint_sheds_its_oldest_and_a_working_one_with_a_small_bound_loses_none() {
    const EVENTS: usize = 30;
    let env = Env::new(1);
    let dir = tempfile::tempdir().unwrap();
    let key = secret();
    let working = Receiver::start(&key, dir.path(), false);
    let mut down = Receiver::start(&key, dir.path(), false);
    let down_url = down.url();
    down.kill();
    let tenant = unique("t").replace('-', "_");
    let ndlq = unique("ndlq");
    env.kafka.as_ref().unwrap().create_topic(&ndlq, 1).unwrap();
    let config = config(
        &env,
        &tenant,
        &[(down_url, vec![key.clone()])],
        &[(working.url(), vec![key.clone()])],
        "max_queued_per_endpoint = 3\nretry_base_delay_ms = 200\nretry_max_delay_ms = 400\ngive_up_after_ms = 600000\nper_record_limit = 1000",
        &ndlq,
    );
    let events: Vec<_> = (0..EVENTS)
        .map(|i| dead_lettered(&tenant, &format!("Q-{i}"), "crm_validation"))
        .collect();
    env.produce_failures(&events);
    let n = notifier::start(&config, false).unwrap().unwrap();
    assert!(
        wait_until(WAIT, || working.verified().len() == EVENTS),
        "the working endpoint got everything: {}",
        working.verified().len()
    );
    // The failing endpoint keeps its head and two behind it; the rest went to the DLQ.
    assert!(wait_until(
        WAIT,
        || tools::end_offsets(&env.bootstrap, &ndlq, 1).unwrap()[0] as usize == EVENTS - 3
    ));
    let dead = tools::read_all(&env.bootstrap, &ndlq, 1, Duration::from_secs(10)).unwrap();
    assert!(dead
        .iter()
        .all(|d| d.header("crm-sync.notify.reason") == Some("queue_full")));
    assert_eq!(
        dead.iter()
            .map(|d| d.key.clone())
            .collect::<std::collections::HashSet<_>>()
            .len(),
        EVENTS - 3
    );
    assert!(
        matches!(committed(&env, &config), None | Some(0)),
        "the three still queued (the first, the two newest) hold the commit point"
    );
    assert!(n.stop(Duration::from_secs(10)));
}

/// Two notifiers in one group share the failures topic's partitions; when one stops
/// (revoking its partitions) while the receiver is down, the other takes them over, and
/// every failure event is still notified once the receiver is back, with the group's
/// offsets committed to the end.
#[test]
fn a_partition_that_changes_notifier_loses_no_notification() {
    const EVENTS: usize = 40;
    let env = Env::new(1);
    let dir = tempfile::tempdir().unwrap();
    let key = secret();
    let mut receiver = Receiver::start(&key, dir.path(), false);
    let tenant = unique("t").replace('-', "_");
    let ndlq = unique("ndlq");
    let failures = unique("failures2");
    let kafka = env.kafka.as_ref().unwrap();
    kafka.create_topic(&ndlq, 1).unwrap();
    kafka.create_topic(&failures, 2).unwrap();
    let mut config = config(
        &env,
        &tenant,
        &[(receiver.url(), vec![key.clone()])],
        &[],
        "retry_base_delay_ms = 100\nretry_max_delay_ms = 300\nper_record_limit = 1000",
        &ndlq,
    );
    config.kafka.failures_topic = failures.clone();
    let first = notifier::start(&config, false).unwrap().unwrap();
    let second = notifier::start(&config, false).unwrap().unwrap();
    let produce = |from: usize, to: usize| {
        let events: Vec<_> = (from..to)
            .map(|i| dead_lettered(&tenant, &format!("M-{i}"), "crm_validation"))
            .collect();
        block(tools::produce(&env.bootstrap, &failures, &events)).unwrap();
    };
    let keys = |r: &Receiver| -> std::collections::HashSet<String> {
        r.verified()
            .iter()
            .filter_map(|e| e["body"]["data"]["key"].as_str().map(str::to_string))
            .collect()
    };
    produce(0, EVENTS / 2);
    assert!(
        wait_until(WAIT, || keys(&receiver).len() == EVENTS / 2),
        "{}",
        keys(&receiver).len()
    );
    // The receiver goes down; more fail; one notifier leaves the group with its
    // notifications undelivered.
    receiver.kill();
    produce(EVENTS / 2, EVENTS);
    assert!(
        wait_until(WAIT, || metric(
            "crm_sync_notification_attempt_failures_total",
            &format!("{tenant}#0")
        ) >= 2.0),
        "tried while down"
    );
    assert!(first.stop(Duration::from_secs(10)));
    receiver.restart();
    assert!(
        wait_until(WAIT, || keys(&receiver).len() == EVENTS),
        "every record notified: {} of {EVENTS}",
        keys(&receiver).len()
    );
    let group = config.notifier.group_id.clone().unwrap();
    let ends = tools::end_offsets(&env.bootstrap, &failures, 2).unwrap();
    assert!(wait_until(WAIT, || {
        let committed = tools::committed(&env.bootstrap, &group, &failures, 2).unwrap_or_default();
        committed.iter().zip(&ends).all(|(c, e)| *e == 0 || *c == Some(*e))
    }));
    assert!(second.stop(Duration::from_secs(10)));
}
