//! `/metrics` as Prometheus scrapes it: every family the README's table names, with the
//! type and labels it says, and nothing else; counters there from the start; histograms,
//! not summaries; per-partition series from assignment on; `promtool check metrics`
//! clean where promtool is installed.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::*;
use crm_sync::consume::StopMode;
use crm_sync::pipeline;

const WAIT: Duration = Duration::from_secs(60);

/// Families in the exposition: name → (type, label names).
fn families(text: &str) -> BTreeMap<String, (String, BTreeSet<String>)> {
    let mut out: BTreeMap<String, (String, BTreeSet<String>)> = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            out.insert(name.to_string(), (kind.to_string(), BTreeSet::new()));
        }
    }
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        let series = line.split(' ').next().unwrap();
        let (name, labels) = series.split_once('{').unwrap_or((series, ""));
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| out.contains_key(*f)))
            .unwrap_or(name);
        let Some((_, names)) = out.get_mut(family) else {
            continue;
        };
        for pair in labels.trim_end_matches('}').split(',').filter(|p| !p.is_empty()) {
            let label = pair.split_once('=').unwrap().0;
            if label != "le" && label != "quantile" {
                names.insert(label.to_string());
            }
        }
    }
    out
}

/// The README's metric table: name → (type, label names).
fn readme_table() -> BTreeMap<String, (String, BTreeSet<String>)> {
    let readme = include_str!("../README.md");
    let start = readme
        .find("| metric | type | labels | what |")
        .expect("the metric table");
    readme[start..]
        .lines()
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .map(|row| {
            let cells: Vec<&str> = row.split('|').map(str::trim).collect();
            let labels = cells[3]
                .split(',')
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect();
            (cells[1].trim_matches('`').to_string(), (cells[2].to_string(), labels))
        })
        .collect()
}

#[test]
fn the_exposition_is_what_the_readme_says_and_promtool_accepts_it() {
    let env = Env::new(2);
    let service = pipeline::start(env.config()).unwrap();
    let addr = service.http_addr();
    // Before any event: every counter of the configured tenant is there, at 0, and the
    // lag of each assigned partition (the statistics tick is 5 s away).
    // Within 4 s of the start: librdkafka's first statistics tick comes 5 s after it, so
    // only the assignment can have shown them.
    let lag = |p: i32| {
        format!(
            "crm_sync_consumer_lag_messages{{topic=\"{}\",partition=\"{p}\"}}",
            env.topic
        )
    };
    assert!(
        wait_until(Duration::from_secs(4), || {
            let text = scrape(addr);
            text.contains(&lag(0)) && text.contains(&lag(1))
        }),
        "no lag for both partitions before the first statistics tick:\n{}",
        scrape(addr)
    );
    let first = scrape(addr);
    for series in [
        "crm_sync_outcomes_total{tenant=\"acme\",outcome=\"dead_lettered\"} 0",
        "crm_sync_crm_requests_total{tenant=\"acme\",crm=\"salesforce\",status=\"5xx\"} 0",
        "crm_sync_decode_errors_total{reason=\"not_utf8\"} 0",
        "crm_sync_commit_failures_total 0",
        "crm_sync_build_info{version=\"",
    ] {
        assert!(first.contains(series), "{series} missing from:\n{first}");
    }

    env.produce(&[
        upsert("e-1", "M-1", 1, "Ada", "Lovelace"),
        upsert("e-2", "M-2", 1, "Alan", "Turing"),
        ("acme/contact/M-3".into(), b"\xff not json".to_vec()),
    ]);
    assert!(wait_until(WAIT, || env.contact("M-1").is_some() && env.contact("M-2").is_some()));
    assert!(env.wait_all_committed(WAIT));
    let text = scrape(addr);
    service.stop(StopMode::Graceful);

    let exposed = families(&text);
    let readme = readme_table();
    assert!(!text.contains("quantile="), "a summary is exposed:\n{text}");
    for (name, (kind, labels)) in &exposed {
        let listed = readme.get(name);
        assert!(listed.is_some(), "{name} is exposed but not in the README's table");
        assert_eq!(
            listed.unwrap(),
            &(kind.clone(), labels.clone()),
            "{name}: README vs exposition"
        );
    }
    // Families that only exist once something happens that this run does not do.
    let conditional: BTreeSet<&str> = [
        "crm_sync_crm_api_usage_ratio",
        "crm_sync_crm_quota_remaining",
        "crm_sync_notifications_total",
        "crm_sync_notification_attempt_failures_total",
        "crm_sync_notifier_queued_notifications",
        "crm_sync_notifier_held_events",
        "crm_sync_notifier_events_total",
        // Registered only where kafka.status_topic or kafka.audit_topic is set.
        "crm_sync_trail_write_failures_total",
    ]
    .into();
    for name in readme.keys() {
        assert!(
            exposed.contains_key(name) || conditional.contains(name.as_str()),
            "{name} is in the README's table but not exposed"
        );
    }

    if std::process::Command::new("promtool").arg("--version").output().is_ok() {
        let checked = promtool_check(&text);
        assert!(
            checked.status.success(),
            "promtool check metrics:\n{}{}",
            String::from_utf8_lossy(&checked.stdout),
            String::from_utf8_lossy(&checked.stderr)
        );
    }
}

/// `promtool check metrics` on `text`.
fn promtool_check(text: &str) -> std::process::Output {
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}
