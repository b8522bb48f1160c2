//! `isolation`: delivery latency of a fast tenant, alone and beside a saturated slow
//! tenant on the same partitions, measured in one run.
//!
//! Two Salesforce sandboxes in this process: `fast` answers in 20 ms, `slow` in 2 s and
//! one call at a time (one record a call), so its backlog can never drain during the
//! run. The fast tenant's events are produced at a steady rate; each one's latency is
//! the time from its production to its appearance in the fast sandbox (polled every
//! 5 ms). The same fast stream runs twice on one service: alone, then after the slow
//! tenant has been handed far more events than its share of the partitions' windows.
//! The ratio of the two p99s is the figure (target: within 2×).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crm_sync::config::Config;
use crm_sync::consume::StopMode;
use crm_sync::demo::workload::{envelope, kafka_key, RecordId};
use crm_sync::pipeline;
use crm_sync::sandbox::common::Faults;
use crm_sync::sandbox::kafka::{tools, KafkaSandbox};
use crm_sync::sandbox::salesforce::{SalesforceSandbox, SandboxOrg};
use crm_sync::sandbox::CrmSandbox;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::json;

use super::runtime;

const PARTITIONS: i32 = 4;
const WINDOW: usize = 100;

fn event(tenant: &str, i: usize) -> (String, Vec<u8>) {
    let id: RecordId = (tenant.into(), "contact".into(), format!("K-{i}"));
    let data = json!({"first_name": format!("F{i}"), "last_name": tenant, "email": format!("k{i}@example.com")});
    let data = data.as_object().cloned().unwrap_or_default();
    (
        kafka_key(&id.0, &id.1, &id.2),
        envelope(&format!("{tenant}-{i}"), &id, "upsert", 1, Some(&data)),
    )
}

/// Produces the fast tenant's events `from..from + n` at `rate` per second and returns
/// each one's delivery latency, in milliseconds, sorted.
fn fast_latencies(
    bootstrap: &str,
    topic: &str,
    fast: &SalesforceSandbox,
    from: usize,
    n: usize,
    rate: f64,
) -> Vec<f64> {
    let rt = runtime();
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", "0")
        .create()
        .expect("producer");
    let mut produced_at: HashMap<usize, Instant> = HashMap::new();
    let mut latencies = Vec::with_capacity(n);
    let started = Instant::now();
    let mut next = from;
    let deadline = started + Duration::from_secs_f64(n as f64 / rate) + Duration::from_secs(120);
    while latencies.len() < n && Instant::now() < deadline {
        // Produce what is due by now, at the steady rate.
        let due = from + ((started.elapsed().as_secs_f64() * rate) as usize).min(n);
        if next < due {
            let batch: Vec<_> = (next..due).map(|i| event("fast", i)).collect();
            let at = Instant::now();
            rt.block_on(async {
                let sends = batch.iter().map(|(key, value)| {
                    producer.send(FutureRecord::to(topic).key(key).payload(value), Duration::from_secs(30))
                });
                for sent in futures::future::join_all(sends).await {
                    sent.map_err(|(e, _)| e).expect("produce");
                }
            });
            for i in next..due {
                produced_at.insert(i, at);
            }
            next = due;
        }
        let now = Instant::now();
        produced_at.retain(|i, at| {
            let delivered = fast.find("Contact", "External_Id__c", &format!("K-{i}")).is_some();
            if delivered {
                latencies.push(now.duration_since(*at).as_secs_f64() * 1000.0);
            }
            !delivered
        });
        // Polling cadence of the sandbox; the run's deadline bounds the loop.
        std::thread::sleep(Duration::from_millis(5));
    }
    latencies.sort_by(f64::total_cmp);
    latencies
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

pub fn run(events: usize) {
    let kafka = KafkaSandbox::start(1).expect("mock cluster");
    let bootstrap = kafka.bootstrap_servers();
    let topic = "isolation-events";
    for (t, n) in [
        (topic, PARTITIONS),
        ("isolation-dlq", 1),
        ("isolation-failures", 1),
        ("isolation-state", PARTITIONS),
        ("isolation-retry", PARTITIONS),
    ] {
        kafka.create_topic(t, n).expect("topic");
    }
    let fast = SalesforceSandbox::start("127.0.0.1:0", SandboxOrg::standard("id", "fast-secret")).expect("sandbox");
    let slow = SalesforceSandbox::start("127.0.0.1:0", SandboxOrg::standard("id", "slow-secret")).expect("sandbox");
    fast.set_faults(Faults {
        latency_ms: 20,
        ..Faults::default()
    });
    slow.set_faults(Faults {
        latency_ms: 2_000,
        ..Faults::default()
    });
    let text = format!(
        r#"
[service]
http_addr = "127.0.0.1:0"
[kafka]
bootstrap_servers = "{bootstrap}"
group_id = "isolation"
input_topics = ["{topic}"]
dlq_topic = "isolation-dlq"
failures_topic = "isolation-failures"
state_topic = "isolation-state"
retry_topic = "isolation-retry"
session_timeout_ms = 6000
drain_timeout_ms = 1000
commit_interval_ms = 500
max_in_flight_per_partition = {WINDOW}
create_topics = false
[retry]
max_age_ms = 600000
[[tenants]]
name = "fast"
max_concurrency = 8
batch_size = 50
batch_linger_ms = 10
{fast_toml}
[[tenants]]
name = "slow"
max_concurrency = 1
batch_size = 1
{slow_toml}"#,
        fast_toml = fast.tenant_toml("FAST_SECRET"),
        slow_toml = slow.tenant_toml("SLOW_SECRET"),
    );
    let config = Config::from_toml_with_env(&text, |v| match v {
        "FAST_SECRET" => Some("fast-secret".into()),
        "SLOW_SECRET" => Some("slow-secret".into()),
        _ => None,
    })
    .expect("isolation config");
    let service = pipeline::start(config).expect("start");
    let rate = 200.0;
    println!(
        "\n### isolation: fast tenant (20 ms calls) alone and beside a saturated slow one (2 s a call, one at a time), {PARTITIONS} partitions, window {WINDOW}\n"
    );

    // 1. Warm-up (joining the group, first token), then the fast tenant alone.
    let _ = fast_latencies(&bootstrap, topic, &fast, 0, 200, rate);
    let alone = fast_latencies(&bootstrap, topic, &fast, 1_000_000, events, rate);

    // 2. The slow tenant gets 20 windows' worth of events, then the same fast stream.
    let backlog: Vec<_> = (0..20 * WINDOW).map(|i| event("slow", i)).collect();
    runtime()
        .block_on(tools::produce(&bootstrap, topic, &backlog))
        .expect("produce");
    let beside = fast_latencies(&bootstrap, topic, &fast, 2_000_000, events, rate);
    let slow_done = (0..backlog.len())
        .filter(|i| CrmSandbox::contact(&slow, &format!("K-{i}")).is_some())
        .count();

    // 3. The slow tenant's CRM goes down altogether (every call 503): its breaker opens,
    //    with its backlog and 2,000 more events waiting; the same fast stream again.
    slow.set_faults(Faults {
        server_error_rate: 1.0,
        ..Faults::default()
    });
    let more: Vec<_> = (20 * WINDOW..40 * WINDOW).map(|i| event("slow", i)).collect();
    runtime()
        .block_on(tools::produce(&bootstrap, topic, &more))
        .expect("produce");
    let beside_down = fast_latencies(&bootstrap, topic, &fast, 3_000_000, events, rate);

    println!("| fast tenant | events delivered | p50 ms | p90 ms | p99 ms | max ms |");
    println!("|---|---|---|---|---|---|");
    for (name, l) in [
        ("alone", &alone),
        ("beside the saturated slow tenant", &beside),
        ("beside a tenant whose CRM is down (breaker open)", &beside_down),
    ] {
        println!(
            "| {name} | {} of {events} | {:.0} | {:.0} | {:.0} | {:.0} |",
            l.len(),
            percentile(l, 0.5),
            percentile(l, 0.9),
            percentile(l, 0.99),
            l.last().copied().unwrap_or(f64::NAN)
        );
    }
    println!(
        "\np99 beside ÷ p99 alone: {:.2} (target ≤ 2); the slow tenant delivered {slow_done} of its {} events meanwhile.",
        percentile(&beside, 0.99) / percentile(&alone, 0.99),
        backlog.len()
    );
    println!(
        "p99 beside the down tenant ÷ p99 alone: {:.2} (target ≤ 2).",
        percentile(&beside_down, 0.99) / percentile(&alone, 0.99)
    );
    service.stop(StopMode::Abort);
}
