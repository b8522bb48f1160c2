//! Telemetry: metric names in one place, the Prometheus recorder, and the HTTP server for
//! `/metrics`, `/health/live` and `/health/ready`.
//!
//! Labels come from bounded sets only (tenant, crm, outcome, error code, actor kind,
//! topic and partition), never record keys, event ids or messages.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Every metric name the service emits.
pub mod metric {
    pub const EVENTS_CONSUMED: &str = "crm_sync_events_consumed_total";
    pub const OUTCOMES: &str = "crm_sync_outcomes_total";
    pub const DECODE_ERRORS: &str = "crm_sync_decode_errors_total";
    pub const CRM_REQUESTS: &str = "crm_sync_crm_requests_total";
    pub const CRM_REQUEST_DURATION: &str = "crm_sync_crm_request_duration_seconds";
    pub const CRM_API_USAGE: &str = "crm_sync_crm_api_usage_ratio";
    pub const CRM_QUOTA_REMAINING: &str = "crm_sync_crm_quota_remaining";
    pub const BATCH_SIZE: &str = "crm_sync_batch_records";
    pub const TENANT_RATE_LIMIT: &str = "crm_sync_tenant_rate_limit_per_second";
    pub const TENANT_CONCURRENCY_LIMIT: &str = "crm_sync_tenant_concurrency_limit";
    pub const TENANT_THROTTLES: &str = "crm_sync_tenant_throttles_total";
    pub const TENANT_PAUSES: &str = "crm_sync_tenant_pauses_total";
    pub const TENANT_STATE: &str = "crm_sync_tenant_state";
    pub const TENANT_TRANSITIONS: &str = "crm_sync_tenant_state_transitions_total";
    pub const TENANT_WINDOW_PARKS: &str = "crm_sync_tenant_window_parks_total";
    pub const TOKEN_REFRESHES: &str = "crm_sync_crm_token_refreshes_total";
    pub const IN_FLIGHT: &str = "crm_sync_in_flight_events";
    pub const CONSUMER_LAG: &str = "crm_sync_consumer_lag_messages";
    pub const COMMITTED_OFFSET: &str = "crm_sync_committed_offset";
    pub const PARTITION_PAUSES: &str = "crm_sync_partition_pauses_total";
    pub const ACTOR_RESTARTS: &str = "crm_sync_actor_restarts_total";
    pub const DIFF_RECORDS: &str = "crm_sync_diff_cache_records";
    pub const DLQ_WRITE_FAILURES: &str = "crm_sync_dlq_write_failures_total";
    pub const DLQ_TRIMMED: &str = "crm_sync_dlq_trimmed_records_total";
    pub const COMMIT_FAILURES: &str = "crm_sync_commit_failures_total";
    pub const STATE_WRITE_FAILURES: &str = "crm_sync_state_write_failures_total";
    pub const STATE_RESTORED: &str = "crm_sync_state_restored_records_total";
    pub const STATE_RESTORE_FAILURES: &str = "crm_sync_state_restore_failures_total";
    pub const TRAIL_WRITE_FAILURES: &str = "crm_sync_trail_write_failures_total";
    pub const NOTIFIER_EVENTS: &str = "crm_sync_notifier_events_total";
    pub const NOTIFICATIONS: &str = "crm_sync_notifications_total";
    pub const NOTIFICATION_ATTEMPT_FAILURES: &str = "crm_sync_notification_attempt_failures_total";
    pub const NOTIFIER_QUEUED: &str = "crm_sync_notifier_queued_notifications";
    pub const NOTIFIER_HELD: &str = "crm_sync_notifier_held_events";
    pub const BUILD_INFO: &str = "crm_sync_build_info";
}

/// Final and intermediate outcomes of an event (the `outcome` label of
/// `crm_sync_outcomes_total`).
pub mod outcome {
    pub const DELIVERED: &str = "delivered";
    pub const RETRIED: &str = "retried";
    pub const DEAD_LETTERED: &str = "dead_lettered";
    /// Written to the retry topic; it comes back from there.
    pub const PARKED: &str = "parked";
    /// Dropped because its partition went to another instance, which re-reads it.
    pub const HANDED_OVER: &str = "handed_over";
}

fn describe() {
    use metric::*;
    describe_gauge!(BUILD_INFO, "1, labelled with the version of crm-sync running.");
    describe_counter!(EVENTS_CONSUMED, Unit::Count, "Messages read from the input topics.");
    describe_counter!(
        OUTCOMES,
        Unit::Count,
        "Event outcomes by tenant and outcome: delivered, duplicate, unchanged, stale, superseded, retried (one per retry), parked (written to the retry topic, read back later), dead_lettered, handed_over (partition revoked; its next owner re-reads the event)."
    );
    describe_counter!(
        DECODE_ERRORS,
        Unit::Count,
        "Messages dead-lettered before routing, by reason code."
    );
    describe_counter!(
        CRM_REQUESTS,
        Unit::Count,
        "CRM HTTP requests by tenant, crm and status class (2xx, 4xx, 5xx, error)."
    );
    describe_histogram!(
        CRM_REQUEST_DURATION,
        Unit::Seconds,
        "CRM HTTP request duration by tenant and crm."
    );
    describe_histogram!(BATCH_SIZE, Unit::Count, "Records per CRM write batch, by tenant.");
    describe_gauge!(
        TENANT_RATE_LIMIT,
        "CRM calls per second a tenant may make now (lowered under pressure)."
    );
    describe_gauge!(
        TENANT_CONCURRENCY_LIMIT,
        Unit::Count,
        "CRM calls a tenant may have in flight now (lowered under pressure)."
    );
    describe_counter!(
        TENANT_THROTTLES,
        Unit::Count,
        "Times a CRM signalled pressure (429, REQUEST_LIMIT_EXCEEDED), pausing and slowing its tenant."
    );
    describe_counter!(
        TENANT_PAUSES,
        Unit::Count,
        "Times a tenant stopped calling its CRM for a while (Retry-After, an exhausted quota, REQUEST_LIMIT_EXCEEDED)."
    );
    describe_gauge!(
        TENANT_STATE,
        "1 for a tenant's current health, 0 for the others: closed, open (its CRM is down), half_open (probing), auth_failed (its credentials are refused), paused (its CRM asked for a pause)."
    );
    describe_counter!(
        TENANT_TRANSITIONS,
        Unit::Count,
        "Changes of a tenant's health, by tenant and the state entered."
    );
    describe_gauge!(
        CRM_API_USAGE,
        "Share of the CRM's API allocation used, as the CRM last reported it (Sforce-Limit-Info, Zendesk rate-limit headers, Dataverse x-ms-ratelimit-* against its documented 6000 per 5 minutes)."
    );
    describe_gauge!(
        CRM_QUOTA_REMAINING,
        Unit::Count,
        "API requests the CRM says the tenant has left in its current window."
    );
    describe_counter!(TOKEN_REFRESHES, Unit::Count, "Access tokens fetched, by tenant.");
    describe_counter!(
        PARTITION_PAUSES,
        Unit::Count,
        "Times a partition was paused because its in-flight window was full."
    );
    describe_counter!(ACTOR_RESTARTS, Unit::Count, "Supervised actor restarts by actor kind.");
    describe_gauge!(
        DIFF_RECORDS,
        Unit::Count,
        "Records whose confirmed state the diff cache holds."
    );
    describe_counter!(
        DLQ_WRITE_FAILURES,
        Unit::Count,
        "Failed attempts to write the DLQ or failures topic (retried until they succeed)."
    );
    describe_counter!(
        TENANT_WINDOW_PARKS,
        Unit::Count,
        "Events parked so that a tenant does not hold its partition's window: over its share (reason share) or waiting for a permit past retry.park_after_ms (reason permit_wait)."
    );
    describe_counter!(
        DLQ_TRIMMED,
        Unit::Count,
        "Dead-letter records written trimmed because the original could never be written whole."
    );
    describe_counter!(
        COMMIT_FAILURES,
        Unit::Count,
        "Offset commits the broker refused (the events will be re-delivered, not lost)."
    );
    describe_counter!(
        STATE_WRITE_FAILURES,
        Unit::Count,
        "Failed attempts to write a confirmed state to the state topic (retried until they succeed)."
    );
    describe_counter!(
        STATE_RESTORED,
        Unit::Count,
        "Confirmed states read back from the state topic when partitions were assigned."
    );
    describe_counter!(
        STATE_RESTORE_FAILURES,
        Unit::Count,
        "Failed reads of confirmed states; the partitions stay paused until a read succeeds."
    );
    describe_counter!(
        TRAIL_WRITE_FAILURES,
        Unit::Count,
        "Failed writes to the status and audit topics, by topic (retried; given up only when the broker can never take them)."
    );
    describe_counter!(
        NOTIFIER_EVENTS,
        Unit::Count,
        "Failure events read by the notifier, by kind (dead_lettered, tenant_state, unreadable)."
    );
    describe_counter!(
        NOTIFICATIONS,
        Unit::Count,
        "Webhook notifications by endpoint label, type and outcome (delivered, or dead_lettered to the notifier's dead-letter topic)."
    );
    describe_counter!(
        NOTIFICATION_ATTEMPT_FAILURES,
        Unit::Count,
        "Webhook delivery attempts that failed (retried), by endpoint label."
    );
    describe_gauge!(
        NOTIFIER_QUEUED,
        Unit::Count,
        "Notifications waiting for an endpoint, by endpoint label."
    );
    describe_gauge!(
        NOTIFIER_HELD,
        Unit::Count,
        "Failure events read whose notifications are not yet delivered or dead-lettered (their offsets uncommitted)."
    );
}

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The per-partition gauges (in-flight events, consumer lag, committed offset). They are
/// kept here and rendered beside the recorder's output, because the recorder cannot drop
/// a series: a partition that leaves this member must leave its `/metrics`, or
/// `sum(crm_sync_consumer_lag_messages)` over the group counts it twice.
pub fn partitions() -> &'static PartitionGauges {
    static GAUGES: OnceLock<PartitionGauges> = OnceLock::new();
    GAUGES.get_or_init(PartitionGauges::default)
}

type SeriesKey = (&'static str, Arc<str>, i32);

/// See [`partitions`].
#[derive(Default)]
pub struct PartitionGauges {
    series: std::sync::Mutex<std::collections::BTreeMap<SeriesKey, PartitionGauge>>,
}

/// One per-partition gauge: an `f64` set without a lock.
#[derive(Clone, Default)]
pub struct PartitionGauge(Arc<std::sync::atomic::AtomicU64>);

impl PartitionGauge {
    pub fn set(&self, value: f64) {
        self.0.store(value.to_bits(), Ordering::Relaxed);
    }
    fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }
}

impl PartitionGauges {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<SeriesKey, PartitionGauge>> {
        self.series.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The gauge `metric` of `topic`/`partition`, shown (from 0) until [`forget`](Self::forget).
    pub fn gauge(&self, metric: &'static str, topic: &str, partition: i32) -> PartitionGauge {
        self.lock()
            .entry((metric, topic.into(), partition))
            .or_default()
            .clone()
    }

    /// Drops every series of `topic`/`partition`.
    pub fn forget(&self, topic: &str, partition: i32) {
        self.lock().retain(|(_, t, p), _| !(&**t == topic && *p == partition));
    }

    /// The series in Prometheus's text format, each metric with its HELP and TYPE.
    pub fn render(&self) -> String {
        let series = self.lock();
        let mut out = String::new();
        let mut current = "";
        for ((metric, topic, partition), gauge) in series.iter() {
            if *metric != current {
                current = metric;
                let help = PARTITION_GAUGE_HELP
                    .iter()
                    .find(|(m, _)| m == metric)
                    .map_or("", |(_, h)| *h);
                out.push_str(&format!("# HELP {metric} {help}\n# TYPE {metric} gauge\n"));
            }
            let topic = topic.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
            out.push_str(&format!(
                "{metric}{{topic=\"{topic}\",partition=\"{partition}\"}} {}\n",
                gauge.get()
            ));
        }
        out
    }
}

/// The standard process metrics (as Prometheus's client libraries name them), read from
/// `/proc/self` at each scrape; nothing where there is no `/proc`.
fn process_metrics() -> String {
    let mut out = String::new();
    let mut put = |name: &str, kind: &str, help: &str, value: f64| {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"));
    };
    // SAFETY: sysconf only reads a system constant.
    let (ticks, page) = unsafe { (libc::sysconf(libc::_SC_CLK_TCK), libc::sysconf(libc::_SC_PAGESIZE)) };
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
        // Fields after the command name, which is in parentheses and may hold spaces.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map_or(Vec::new(), |(_, rest)| rest.split_whitespace().collect());
        let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<f64>().ok());
        if let (Some(user), Some(system)) = (field(14), field(15)) {
            if ticks > 0 {
                put(
                    "process_cpu_seconds_total",
                    "counter",
                    "User and system CPU time spent, in seconds.",
                    (user + system) / ticks as f64,
                );
            }
        }
        if let (Some(rss), true) = (field(24), page > 0) {
            put(
                "process_resident_memory_bytes",
                "gauge",
                "Resident memory size in bytes.",
                rss * page as f64,
            );
        }
        if let Some(vsize) = field(23) {
            put(
                "process_virtual_memory_bytes",
                "gauge",
                "Virtual memory size in bytes.",
                vsize,
            );
        }
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        put(
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
            fds.count() as f64,
        );
    }
    out
}

/// Registers every counter at zero for the label sets known at start (the configured
/// tenants and topics, every outcome, state, reason and actor kind), so that `rate()` and
/// `increase()` see them before their first event.
pub fn register_counters(config: &crate::config::Config) {
    use metric::*;
    let zero = |name: &'static str, labels: Vec<(&'static str, String)>| {
        metrics::counter!(name, &labels).increment(0);
    };
    for name in [
        COMMIT_FAILURES,
        STATE_WRITE_FAILURES,
        STATE_RESTORED,
        STATE_RESTORE_FAILURES,
        DLQ_TRIMMED,
    ] {
        zero(name, Vec::new());
    }
    for actor in ["partition", "tenant", "diff", "retry_queue", "notifier"] {
        zero(ACTOR_RESTARTS, vec![("actor", actor.into())]);
    }
    for reason in crate::event::DecodeError::CODES {
        zero(DECODE_ERRORS, vec![("reason", reason.into())]);
    }
    let k = &config.kafka;
    for topic in &k.input_topics {
        zero(EVENTS_CONSUMED, vec![("topic", topic.clone())]);
        zero(PARTITION_PAUSES, vec![("topic", topic.clone())]);
    }
    let notifier_dlq = (config.notifier.enabled && config.notifier.has_endpoints(&config.tenants))
        .then_some(&config.notifier.dlq_topic);
    for topic in [
        Some(&k.dlq_topic),
        Some(&k.failures_topic),
        k.retry_topic.as_ref(),
        notifier_dlq,
    ]
    .into_iter()
    .flatten()
    {
        zero(DLQ_WRITE_FAILURES, vec![("topic", topic.clone())]);
    }
    for topic in [k.status_topic.as_ref(), k.audit_topic.as_ref()].into_iter().flatten() {
        zero(TRAIL_WRITE_FAILURES, vec![("topic", topic.clone())]);
    }
    let outcomes = [
        outcome::DELIVERED,
        outcome::RETRIED,
        outcome::DEAD_LETTERED,
        outcome::PARKED,
        outcome::HANDED_OVER,
        "duplicate",
        "unchanged",
        "stale",
        "superseded",
    ];
    for t in &config.tenants {
        let tenant = || ("tenant", t.name.clone());
        let crm = || ("crm", t.crm.as_str().to_string());
        for o in outcomes {
            zero(OUTCOMES, vec![tenant(), ("outcome", o.into())]);
        }
        for status in ["2xx", "3xx", "4xx", "5xx", "error"] {
            zero(CRM_REQUESTS, vec![tenant(), crm(), ("status", status.into())]);
        }
        zero(TOKEN_REFRESHES, vec![tenant(), crm()]);
        zero(TENANT_THROTTLES, vec![tenant()]);
        zero(TENANT_PAUSES, vec![tenant()]);
        for reason in ["share", "permit_wait"] {
            zero(TENANT_WINDOW_PARKS, vec![tenant(), ("reason", reason.into())]);
        }
        for state in ["closed", "open", "half_open", "auth_failed", "paused"] {
            zero(TENANT_TRANSITIONS, vec![tenant(), ("state", state.into())]);
        }
    }
}

/// HELP texts of the per-partition gauges.
const PARTITION_GAUGE_HELP: [(&str, &str); 3] = [
    (
        metric::IN_FLIGHT,
        "Events received and not yet final, by topic and partition.",
    ),
    (
        metric::CONSUMER_LAG,
        "High watermark minus committed position, by topic and partition (from assignment on; gone when the partition leaves this member).",
    ),
    (
        metric::COMMITTED_OFFSET,
        "Offset committed (next to consume), by topic and partition.",
    ),
];

/// Installs the process-wide Prometheus recorder once and returns its handle.
pub fn prometheus() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            // Histograms everywhere (buckets aggregate across members; summaries do not).
            let builder = PrometheusBuilder::new()
                .set_buckets(&[1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0])
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        metrics_exporter_prometheus::Matcher::Suffix("_seconds".into()),
                        &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0],
                    )
                })
                .expect("the bucket lists are non-empty constants");
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (a test harness); ours still renders.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            metrics::gauge!(metric::BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
            handle
        })
        .clone()
}

/// Readiness: set once the consumer has joined its group, cleared on shutdown.
#[derive(Clone, Default)]
pub struct Health {
    ready: Arc<AtomicBool>,
    /// Set for good when a part of the service that supervision cannot restart (the
    /// consumer thread) has died: liveness fails, and `crm-sync run` exits.
    dead: Arc<AtomicBool>,
}

impl Health {
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed) && !self.is_dead()
    }
    /// Marks the service dead: neither ready nor live from now on.
    pub fn set_dead(&self) {
        self.dead.store(true, Ordering::SeqCst);
    }
    pub fn is_dead(&self) -> bool {
        self.dead.load(Ordering::SeqCst)
    }
}

/// Serves `/metrics` and the health endpoints until the returned task is aborted.
pub async fn serve(addr: &str, health: Health) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let handle = prometheus();
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let h = handle.clone();
                async move {
                    h.run_upkeep();
                    let text = h.render() + &partitions().render() + &process_metrics();
                    ([("content-type", "text/plain; version=0.0.4")], text)
                }
            }),
        )
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
        .with_state(health);
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "Metrics server stopped.");
        }
    });
    Ok((local, task))
}

async fn live(State(health): State<Health>) -> (StatusCode, &'static str) {
    if health.is_dead() {
        (StatusCode::SERVICE_UNAVAILABLE, "dead")
    } else {
        (StatusCode::OK, "ok")
    }
}

async fn ready(State(health): State<Health>) -> (StatusCode, &'static str) {
    if health.is_ready() {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

#[cfg(test)]
mod tests {
    /// Names in `text` that look like crm-sync metrics, without a histogram's suffixes.
    fn names(text: &str) -> std::collections::BTreeSet<String> {
        let mut out = std::collections::BTreeSet::new();
        let mut rest = text;
        while let Some(i) = rest.find("crm_sync_") {
            let tail = &rest[i..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            let name = &tail[..end];
            let name = ["_bucket", "_count", "_sum"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name);
            out.insert(name.to_string());
            rest = &tail[end..];
        }
        out
    }

    #[test]
    fn a_partition_that_leaves_leaves_the_exposition() {
        let gauges = super::PartitionGauges::default();
        let lag = super::metric::CONSUMER_LAG;
        gauges.gauge(lag, "in", 0).set(5.0);
        gauges.gauge(lag, "in", 1).set(7.0);
        gauges.gauge(super::metric::IN_FLIGHT, "in", 1).set(2.0);
        let text = gauges.render();
        assert!(
            text.contains("crm_sync_consumer_lag_messages{topic=\"in\",partition=\"1\"} 7"),
            "{text}"
        );
        assert_eq!(
            text.matches("# TYPE crm_sync_consumer_lag_messages gauge").count(),
            1,
            "{text}"
        );
        gauges.forget("in", 1);
        let text = gauges.render();
        assert!(!text.contains("partition=\"1\""), "{text}");
        assert!(
            text.contains("crm_sync_consumer_lag_messages{topic=\"in\",partition=\"0\"} 5"),
            "{text}"
        );
    }

    #[test]
    fn the_dashboard_and_the_alert_rules_use_only_metrics_the_service_emits() {
        let emitted = names(include_str!("telemetry.rs"));
        for (file, text) in [
            (
                "deploy/grafana/crm-sync.json",
                include_str!("../deploy/grafana/crm-sync.json"),
            ),
            (
                "deploy/prometheus/alerts.yml",
                include_str!("../deploy/prometheus/alerts.yml"),
            ),
        ] {
            let used = names(text);
            assert!(!used.is_empty(), "{file} uses no metric");
            let unknown: Vec<_> = used.difference(&emitted).collect();
            assert!(
                unknown.is_empty(),
                "{file} uses metrics the service does not emit: {unknown:?}"
            );
        }
    }
}
