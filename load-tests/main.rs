//! Load-test harness: runs the real pipeline against the sandboxes and reports figures.
//!
//! The broker (`crm-sync sandbox kafka`) and the Salesforce sandbox (`crm-sync sandbox
//! salesforce`) run as child processes, so the CPU time and memory reported here are the
//! pipeline's own (plus the test's producer, which runs before the timed window).
//!
//! Scenarios:
//! - `throughput`: every event a real change (one single-record upsert each), diff on.
//! - `latency`: batched upserts against a sandbox answering after 50 ms, against the
//!   ideal concurrency × batch size ÷ latency.
//! - `diff`: 80% of events repeat an unchanged payload; the same stream with diffing on
//!   and off, so the saving is a ratio measured in one run.
//! - `backlog`: a large backlog waits in Kafka while a rate-limited tenant drains it
//!   slowly; resident memory is sampled to show it stays flat.
//! - `crms`: per CRM (Salesforce, Zendesk, Dynamics 365), batched upserts of changed
//!   records: API calls against the minimum the CRM's batch limit allows, events/s at
//!   zero sandbox latency, and events/s at 50 ms latency against the ideal.
//! - `diff-memory`: resident bytes per record the diff cache remembers, against the same
//!   records kept in a map keyed by their strings (`diff_memory.rs`).
//! - `isolation`: p50/p99 delivery latency of a fast tenant, alone and beside a
//!   saturated slow tenant on the same partitions, in one run (`isolation.rs`).
//! - `grpc`: WatchOutcomes beside the pipeline, and GetRecordStatus latency (`grpc.rs`).
//! - `trail`: batched upserts with the status and audit topics off, then on, in one run.
//! - `notifier`: webhook notifications/s to a local receiver that checks signatures, how
//!   a storm coalesces, and the pipeline's throughput with the notifier on and off
//!   (`notifier.rs`).
//! - `traces` (not part of `all`, which runs without a trace layer): batched upserts with
//!   OTLP traces off, then on (every span exported to a local receiver), in one run
//!   (`traces.rs`).
//! - `chaos` (not part of `all`): `crm-sync run` members of one group killed with SIGKILL
//!   and started again at random moments, under CRM faults, with a slow tenant and
//!   hostile messages; figures, and exit status 1 when an invariant failed (`chaos.rs`).
//!
//! Run: `cargo run --release --bin load-test -- --scenario all` (see load-tests/README.md).

mod chaos;
mod diff_memory;
mod grpc;
mod isolation;
mod notifier;
mod traces;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use crm_sync::config::Config;
use crm_sync::consume::StopMode;
use crm_sync::demo::metric_total;
use crm_sync::demo::workload::{envelope, kafka_key, RecordId};
use crm_sync::pipeline;
use crm_sync::sandbox::kafka::tools;
use crm_sync::telemetry::{self, metric};
use serde_json::{json, Map, Value};

/// mimalloc: the pipeline allocates per event (messages, payload maps, actor envelopes)
/// across threads; measured against the system allocator in load-tests/README.md.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(about = "crm-sync load tests: figures, not pass/fail")]
struct Args {
    #[arg(long, value_enum, default_value_t = Scenario::All)]
    scenario: Scenario,
    /// Events in the throughput and diff scenarios.
    #[arg(long, default_value_t = 100_000)]
    events: usize,
    /// Events in the backlog scenario.
    #[arg(long, default_value_t = 500_000)]
    backlog_events: usize,
    /// How long to sample memory in the backlog scenario.
    #[arg(long, default_value_t = 30)]
    backlog_seconds: u64,
    /// The tenant's requests per second in the backlog scenario (one record a request).
    #[arg(long, default_value_t = 2000.0)]
    backlog_rate: f64,
    /// Diff cache capacity in the backlog scenario (default: the service's), so that a
    /// run can fill it and show memory once it turns over.
    #[arg(long)]
    backlog_diff_capacity: Option<usize>,
    /// `kafka.max_in_flight_per_partition` in the backlog scenario (default 1,000): the
    /// undecided events a member holds are at most this many per partition.
    #[arg(long)]
    backlog_in_flight: Option<usize>,
    /// Changed records per CRM in the `crms` scenario.
    #[arg(long, default_value_t = 10_000)]
    crm_records: usize,
    /// Diff cache capacity in the `diff-memory` scenario.
    #[arg(long, default_value_t = 1_000_000)]
    diff_capacity: usize,
    /// Fast-tenant events per run in the `isolation` scenario (produced at 200/s).
    #[arg(long, default_value_t = 3_000)]
    isolation_events: usize,
    /// Failure events in the notifier scenario's throughput run (about 550 bytes each:
    /// the mock broker keeps 5 MB of a partition's log, and these are on one partition).
    #[arg(long, default_value_t = 8_000)]
    notifications: usize,
    #[command(flatten)]
    chaos: chaos::ChaosArgs,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    All,
    Throughput,
    Latency,
    Diff,
    Backlog,
    Crms,
    DiffMemory,
    Isolation,
    Notifier,
    Trail,
    Grpc,
    /// Not part of `all`.
    Traces,
    /// Not part of `all`.
    Chaos,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Crm {
    Salesforce,
    Zendesk,
    Dynamics,
}

impl Crm {
    fn name(self) -> &'static str {
        match self {
            Crm::Salesforce => "salesforce",
            Crm::Zendesk => "zendesk",
            Crm::Dynamics => "dynamics",
        }
    }

    /// Records one write call may carry: sObject Collections, create_or_update_many,
    /// `$batch`.
    fn batch_limit(self) -> usize {
        match self {
            Crm::Salesforce => 200,
            Crm::Zendesk => 100,
            Crm::Dynamics => 1000,
        }
    }
}

/// A child process killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sibling_binary() -> std::path::PathBuf {
    let me = std::env::current_exe().expect("current exe");
    me.with_file_name("crm-sync")
}

/// Starts a child and returns it with the first line it prints.
fn spawn_reading_first_line(args: &[&str], env: &[(&str, &str)]) -> (Proc, String) {
    let (child, mut lines) = spawn_reading(args, env, false);
    (child, lines.remove(0))
}

/// Starts a child and returns it with the first line it prints, or, with `block`, the
/// lines up to the first empty one (a CRM sandbox prints its URL and a tenant block).
fn spawn_reading(args: &[&str], env: &[(&str, &str)], block: bool) -> (Proc, Vec<String>) {
    let mut child = Command::new(sibling_binary())
        .args(args)
        .envs(env.iter().copied())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("crm-sync binary next to load-test (build with --release --bins)");
    let mut stdout = BufReader::new(child.stdout.take().expect("piped"));
    let mut lines = Vec::new();
    loop {
        let mut line = String::new();
        stdout.read_line(&mut line).expect("a line");
        let line = line.trim_end().to_string();
        if line.is_empty() || !block {
            if !line.is_empty() {
                lines.push(line);
            }
            break;
        }
        lines.push(line);
    }
    // Drain what else it prints, so its writes never meet a closed pipe.
    std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
    (Proc(child), lines)
}

struct Sandboxes {
    broker: Proc,
    bootstrap: String,
    sandbox: Proc,
    url: String,
    /// The tenant block the sandbox printed for itself (CRM section, contact mapping),
    /// and the variable its secret is read from.
    tenant_toml: String,
    secret_env: &'static str,
}

impl Sandboxes {
    fn child_cpu(&self) -> (f64, f64) {
        (
            cpu_seconds_of(&self.broker.0.id().to_string()),
            cpu_seconds_of(&self.sandbox.0.id().to_string()),
        )
    }
}

const TOPIC: &str = "load-events";

fn start_sandboxes(partitions: i32, latency_ms: u64) -> Sandboxes {
    start_crm_sandboxes(partitions, latency_ms, Crm::Salesforce)
}

/// The broker and `crm`'s sandbox, each its own process.
fn start_crm_sandboxes(partitions: i32, latency_ms: u64, crm: Crm) -> Sandboxes {
    let partitions = partitions.to_string();
    let (broker, bootstrap) = spawn_reading_first_line(
        &[
            "sandbox",
            "kafka",
            "--partitions",
            &partitions,
            "--topic",
            TOPIC,
            "--topic",
            "load-dlq",
            "--topic",
            "load-failures",
            "--topic",
            "load-state",
            "--topic",
            "load-status",
            "--topic",
            "load-audit",
            "--topic",
            "load-watch-none",
            "--topic",
            "load-lookups-none",
        ],
        &[],
    );
    let secret_env = match crm {
        Crm::Salesforce => "SANDBOX_SF_CLIENT_SECRET",
        Crm::Zendesk => "SANDBOX_ZD_SECRET",
        Crm::Dynamics => "SANDBOX_D365_CLIENT_SECRET",
    };
    let (sandbox, lines) = spawn_reading(
        &["sandbox", crm.name(), "--port", "0", "--client-id", "load"],
        &[(secret_env, "load-secret")],
        true,
    );
    let url = lines[0].rsplit(' ').next().unwrap_or_default().to_string();
    // "[[tenants]]" and its "name = ..." line are the load test's own.
    let tenant_toml = lines
        .iter()
        .skip_while(|l| !l.starts_with("name = "))
        .skip(1)
        .map(|l| format!("{l}\n"))
        .collect();
    if latency_ms > 0 {
        let rt = runtime();
        rt.block_on(async {
            reqwest::Client::new()
                .post(format!("{url}/__sandbox/faults"))
                .json(&json!({"latency_ms": latency_ms}))
                .send()
                .await
                .expect("set faults");
        });
    }
    Sandboxes {
        broker,
        bootstrap,
        sandbox,
        url,
        tenant_toml,
        secret_env,
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// API requests the sandbox at `url` has received.
fn api_requests(url: &str) -> u64 {
    runtime().block_on(async {
        let stats: Value = reqwest::get(format!("{url}/__sandbox/stats"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        stats["api_requests"].as_u64().unwrap_or_default()
    })
}

/// `batch_size` 1 makes every record its own call (single-record upserts).
fn config(s: &Sandboxes, group: &str, diff: bool, rate: f64, concurrency: usize, batch_size: usize) -> Config {
    let text = format!(
        r#"
[service]
http_addr = "127.0.0.1:0"
[kafka]
bootstrap_servers = "{bootstrap}"
group_id = "{group}"
input_topics = ["{TOPIC}"]
dlq_topic = "load-dlq"
failures_topic = "load-failures"
state_topic = "load-state"
session_timeout_ms = 6000
drain_timeout_ms = 4000
commit_interval_ms = 500
max_in_flight_per_partition = 1000
create_topics = false
[diff]
enabled = {diff}
[[tenants]]
name = "bench"
rate_limit_per_sec = {rate}
max_concurrency = {concurrency}
batch_size = {batch_size}
batch_linger_ms = {linger}
{tenant}"#,
        linger = if batch_size > 200 { 100 } else { 20 },
        bootstrap = s.bootstrap,
        tenant = s.tenant_toml,
    );
    Config::from_toml_with_env(&text, |v| (v == s.secret_env).then(|| "load-secret".to_string()))
        .expect("load-test config")
}

/// `records` records, `versions` events each, interleaved; in `unchanged` mode every
/// version after the first repeats the first payload.
fn stream(records: usize, versions: usize, unchanged: bool) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::with_capacity(records * versions);
    for v in 1..=versions {
        out.extend(stream_part(0..records, v, unchanged));
    }
    out
}

/// Version `v` of the records in `records`: one part of [`stream`].
fn stream_part(records: std::ops::Range<usize>, v: usize, unchanged: bool) -> impl Iterator<Item = (String, Vec<u8>)> {
    records.map(move |r| {
        let id: RecordId = ("bench".into(), "contact".into(), format!("B-{r:07}"));
        let n = if unchanged { 1 } else { v };
        let mut data = Map::new();
        data.insert("first_name".into(), json!(format!("First{n}")));
        data.insert("last_name".into(), json!(format!("Last{r}")));
        data.insert("email".into(), json!(format!("b{r}.{n}@example.com")));
        (
            kafka_key(&id.0, &id.1, &id.2),
            envelope(&format!("ev-{r}-{v}"), &id, "upsert", v as u64, Some(&data)),
        )
    })
}

fn cpu_seconds() -> f64 {
    cpu_seconds_of("self")
}

/// utime + stime of a process, from /proc, in seconds (clock ticks, USER_HZ = 100).
fn cpu_seconds_of(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after_name = stat.rsplit(')').next().unwrap_or_default();
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

fn status_kib(key: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix(key)
                .map(|v| v.trim().trim_end_matches(" kB").trim().parse().unwrap_or(0))
        })
        .unwrap_or(0)
}

struct RunFigures {
    events: usize,
    seconds: f64,
    cpu_seconds: f64,
    crm_calls: u64,
    skipped: f64,
    delivered: f64,
    rss_peak_mib: f64,
    broker_cpu_seconds: f64,
    sandbox_cpu_seconds: f64,
    /// Delivery rate between 10% and 90% of the events delivered (no start-up, no tail).
    steady_events_per_sec: Option<f64>,
    /// When the first event was delivered (start-up: group join, first fetch), and when
    /// the last one was; the run ends when every offset is committed.
    first_delivered: Option<Duration>,
    all_delivered: Option<Duration>,
}

/// Runs the pipeline on the topic from the start until every offset is committed.
fn run_pipeline(s: &Sandboxes, config: Config, partitions: i32, events: usize) -> RunFigures {
    let group = config.kafka.group_id.clone();
    let prometheus = telemetry::prometheus();
    let before = prometheus.render();
    let calls_before = api_requests(&s.url);
    let ends = tools::end_offsets(&s.bootstrap, TOPIC, partitions).expect("end offsets");
    let cpu0 = cpu_seconds();
    let (broker0, sandbox0) = s.child_cpu();
    let t0 = Instant::now();
    let service = pipeline::start(config).expect("start");
    let delivered_before = metric_total(&before, metric::OUTCOMES, Some(("outcome", "delivered")));
    let (mut t10, mut t90, mut first, mut all) = (None, None, None, None);
    loop {
        let delivered =
            metric_total(&prometheus.render(), metric::OUTCOMES, Some(("outcome", "delivered"))) - delivered_before;
        if first.is_none() && delivered > 0.0 {
            first = Some(t0.elapsed());
        }
        if all.is_none() && delivered >= events as f64 {
            all = Some(t0.elapsed());
        }
        if t10.is_none() && delivered >= 0.1 * events as f64 {
            t10 = Some(t0.elapsed());
        }
        if t90.is_none() && delivered >= 0.9 * events as f64 {
            t90 = Some(t0.elapsed());
        }
        let committed = tools::committed(&s.bootstrap, &group, TOPIC, partitions).unwrap_or_default();
        if committed.len() == ends.len()
            && committed
                .iter()
                .zip(&ends)
                .all(|(c, e)| *e == 0 || c.is_some_and(|c| c >= *e))
        {
            break;
        }
        if t0.elapsed() > Duration::from_secs(900) {
            panic!("pipeline did not finish within 900 s");
        }
        std::thread::sleep(Duration::from_millis(20)); // progress sampling cadence
    }
    let seconds = t0.elapsed().as_secs_f64();
    let steady_events_per_sec = match (t10, t90) {
        // Fewer than five progress samples apart: too short to call a rate.
        (Some(a), Some(b)) if b >= a + Duration::from_millis(100) => Some(0.8 * events as f64 / (b - a).as_secs_f64()),
        _ => None,
    };
    let cpu = cpu_seconds() - cpu0;
    let (broker1, sandbox1) = s.child_cpu();
    service.stop(StopMode::Graceful);
    let after = prometheus.render();
    let delta = |name: &str, label: Option<(&str, &str)>| {
        metric_total(&after, name, label) - metric_total(&before, name, label)
    };
    let skipped = ["duplicate", "unchanged", "stale", "superseded"]
        .iter()
        .map(|r| delta(metric::OUTCOMES, Some(("outcome", r))))
        .sum();
    RunFigures {
        events,
        seconds,
        cpu_seconds: cpu,
        crm_calls: api_requests(&s.url) - calls_before,
        skipped,
        delivered: delta(metric::OUTCOMES, Some(("outcome", "delivered"))),
        rss_peak_mib: status_kib("VmHWM:") as f64 / 1024.0,
        broker_cpu_seconds: broker1 - broker0,
        sandbox_cpu_seconds: sandbox1 - sandbox0,
        steady_events_per_sec,
        first_delivered: first,
        all_delivered: all,
    }
}

fn print_run(name: &str, f: &RunFigures, changed_records: usize) {
    println!(
        "| {name} | {} | {:.1} | {:.0} | {:.2} | {:.0} | {} | {:.3} | {:.1}% |",
        f.events,
        f.seconds,
        f.events as f64 / f.seconds,
        f.cpu_seconds * 100_000.0 / f.events as f64,
        f.rss_peak_mib,
        f.crm_calls,
        f.crm_calls as f64 / changed_records.max(1) as f64,
        100.0 * f.skipped / f.events as f64,
    );
    eprintln!("  ({name}: delivered {} skipped {})", f.delivered, f.skipped);
    println!(
        "|   ↳ steady {} events/s; first event delivered at {}, all at {}; CPU: pipeline {:.1} s, CRM sandbox {:.1} s, Kafka broker {:.1} s (of {:.1} s × 2 cores) | | | | | | | | |",
        f.steady_events_per_sec.map_or("n/a".into(), |r| format!("{r:.0}")),
        f.first_delivered.map_or("n/a".into(), |t| format!("{:.2} s", t.as_secs_f64())),
        f.all_delivered.map_or("n/a".into(), |t| format!("{:.2} s", t.as_secs_f64())),
        f.cpu_seconds,
        f.sandbox_cpu_seconds,
        f.broker_cpu_seconds,
        f.seconds
    );
}

const HEADER: &str = "| run | events | seconds | events/s | CPU s per 100k events | peak RSS MiB | CRM calls | calls per changed record | skipped |\n|---|---|---|---|---|---|---|---|---|";

fn throughput(args: &Args) {
    let partitions = 12;
    // Every event a change to a different record, none superseded by a newer version.
    let messages = stream(args.events, 1, false);
    println!("\n### throughput: every event changes its record (zero sandbox latency)\n\n{HEADER}");
    for (name, batch_size) in [("single-record upserts", 1), ("batched upserts (≤200 a call)", 200)] {
        // A fresh broker and org per run, so each starts from nothing.
        let s = start_sandboxes(partitions, 0);
        runtime()
            .block_on(tools::produce(&s.bootstrap, TOPIC, &messages))
            .expect("produce");
        let config = config(&s, "load-throughput", true, 1e6, 32, batch_size);
        let f = run_pipeline(&s, config, partitions, messages.len());
        print_run(name, &f, messages.len());
        if batch_size > 1 {
            let minimum = messages.len().div_ceil(200);
            println!(
                "\nBatched: {} CRM calls for {} changed records; the minimum Salesforce's 200-record limit allows is {minimum} ({:.2}× the minimum).",
                f.crm_calls,
                messages.len(),
                f.crm_calls as f64 / minimum as f64
            );
        }
    }
}

/// Batched upserts with the status and audit topics off and on: what the trail costs.
fn trail(args: &Args) {
    let partitions = 12;
    let messages = stream(args.events, 1, false);
    println!("\n### trail: batched upserts (≤200 a call) with the status and audit topics off and on\n\n{HEADER}");
    let mut figures = Vec::new();
    for (name, on) in [
        ("warm-up, not compared", false),
        ("trail off", false),
        ("status + audit on", true),
        ("trail off again", false),
    ] {
        let s = start_sandboxes(partitions, 0);
        runtime()
            .block_on(tools::produce(&s.bootstrap, TOPIC, &messages))
            .expect("produce");
        let mut config = config(&s, "load-trail", true, 1e6, 32, 200);
        if on {
            config.kafka.status_topic = Some("load-status".into());
            config.kafka.audit_topic = Some("load-audit".into());
        }
        let f = run_pipeline(&s, config, partitions, messages.len());
        print_run(name, &f, messages.len());
        figures.push(f);
    }
    let rate = |f: &RunFigures| f.events as f64 / f.seconds;
    let cpu = |f: &RunFigures| f.cpu_seconds / f.events as f64;
    let (off, on, again) = (&figures[1], &figures[2], &figures[3]);
    println!(
        "\nStatus + audit on, against the mean of the runs without: events/s {:.2}×, CPU per event {:.2}× (the two runs without differ by {:.2}×).",
        rate(on) / ((rate(off) + rate(again)) / 2.0),
        cpu(on) / ((cpu(off) + cpu(again)) / 2.0),
        rate(again) / rate(off)
    );
}

/// `traces`: the trail scenario's shape, with OTLP traces off and on.
fn traced(args: &Args, exporter: &crm_sync::traces::Traces, received: &traces::Received) {
    use std::sync::atomic::Ordering;
    let partitions = 12;
    let messages = stream(args.events, 1, false);
    println!("\n### traces: batched upserts (≤200 a call) with OTLP traces off and on\n\n{HEADER}");
    let mut figures = Vec::new();
    for (name, on) in [
        ("warm-up, not compared", false),
        ("traces off", false),
        ("traces on (every span)", true),
        ("traces off again", false),
    ] {
        let s = start_sandboxes(partitions, 0);
        runtime()
            .block_on(tools::produce(&s.bootstrap, TOPIC, &messages))
            .expect("produce");
        let config = config(&s, "load-traces", true, 1e6, 32, 200);
        let before = received.requests.load(Ordering::Relaxed);
        traces::ON.store(on, Ordering::Relaxed);
        let mut f = run_pipeline(&s, config, partitions, messages.len());
        traces::ON.store(false, Ordering::Relaxed);
        if on {
            // The batch exporter sends every 5 s, so a short run ends before it has sent
            // its spans: they are flushed now, and the CPU that takes counts in the run's.
            let cpu0 = cpu_seconds();
            exporter.flush();
            f.cpu_seconds += cpu_seconds() - cpu0;
        }
        print_run(name, &f, messages.len());
        if on {
            let requests = received.requests.load(Ordering::Relaxed) - before;
            println!(
                "\n(the run's spans: {requests} export requests, {} bytes of OTLP JSON, to the receiver)\n",
                received.bytes.load(Ordering::Relaxed)
            );
            assert!(requests > 0, "traces on, and no span reached the receiver");
        }
        figures.push(f);
    }
    let rate = |f: &RunFigures| f.events as f64 / f.seconds;
    let cpu = |f: &RunFigures| f.cpu_seconds / f.events as f64;
    let (off, on, again) = (&figures[1], &figures[2], &figures[3]);
    println!(
        "\nTraces on, against the mean of the runs without: events/s {:.2}×, CPU per event {:.2}× (the two runs without differ by {:.2}×).",
        rate(on) / ((rate(off) + rate(again)) / 2.0),
        cpu(on) / ((cpu(off) + cpu(again)) / 2.0),
        rate(again) / rate(off)
    );
}

/// Batched upserts against a sandbox that answers every call after 50 ms: throughput
/// against the ideal concurrency × batch size ÷ latency.
fn latency(args: &Args) {
    let partitions = 12;
    let (latency_ms, concurrency, batch) = (50u64, 2usize, 200usize);
    let messages = stream(args.events, 1, false);
    let s = start_sandboxes(partitions, latency_ms);
    runtime()
        .block_on(tools::produce(&s.bootstrap, TOPIC, &messages))
        .expect("produce");
    let config = config(&s, "load-latency", true, 1e6, concurrency, batch);
    let f = run_pipeline(&s, config, partitions, messages.len());
    println!("\n### latency: batched upserts, {latency_ms} ms per CRM call, {concurrency} calls in flight\n\n{HEADER}");
    print_run("batched, 50 ms latency", &f, messages.len());
    let ideal = (concurrency * batch) as f64 / (latency_ms as f64 / 1000.0);
    let measured = f.events as f64 / f.seconds;
    println!(
        "\nIdeal concurrency × batch ÷ latency = {ideal:.0} events/s; measured {measured:.0} events/s = {:.0}% of ideal.",
        100.0 * measured / ideal
    );
}

fn diff(args: &Args) {
    let partitions = 12;
    // 80% of events repeat an unchanged payload: each record 1 create + 4 repeats.
    let records = args.events / 5;
    let messages = stream(records, 5, true);
    println!("\n### diff: 80% of events repeat an unchanged payload (same stream, diff on vs off)\n\n{HEADER}");
    let mut figures = Vec::new();
    for enabled in [true, false] {
        // A fresh sandbox per run, so each starts with an empty org.
        let s = start_sandboxes(partitions, 0);
        runtime()
            .block_on(tools::produce(&s.bootstrap, TOPIC, &messages))
            .expect("produce");
        let f = run_pipeline(
            &s,
            config(&s, "load-diff", enabled, 1e6, 32, 1),
            partitions,
            messages.len(),
        );
        print_run(
            if enabled {
                "80% unchanged, diff on"
            } else {
                "80% unchanged, diff off"
            },
            &f,
            records,
        );
        figures.push(f);
    }
    println!(
        "\nCRM calls with diff off ÷ with diff on: {:.2}× ({} vs {}); records changed: {records}",
        figures[1].crm_calls as f64 / figures[0].crm_calls.max(1) as f64,
        figures[1].crm_calls,
        figures[0].crm_calls
    );
}

fn backlog(args: &Args) {
    // ~5 MiB retention per mock partition: 500k × ~220 B needs ≥ 25 partitions.
    let partitions = 48;
    let s = start_sandboxes(partitions, 0);
    // Produced a part at a time: the whole stream in this process (about 300 MB) would be
    // freed before the pipeline starts, but not always returned to the system by then, and
    // the pipeline's resident memory is what this scenario measures.
    let records = args.backlog_events / 2;
    let mut produced = 0;
    for v in 1..=2 {
        for from in (0..records).step_by(50_000) {
            let part: Vec<_> = stream_part(from..records.min(from + 50_000), v, false).collect();
            runtime()
                .block_on(tools::produce(&s.bootstrap, TOPIC, &part))
                .expect("produce");
            produced += part.len();
        }
    }
    let ends: i64 = tools::end_offsets(&s.bootstrap, TOPIC, partitions)
        .expect("ends")
        .iter()
        .sum();
    let mut config = config(&s, "load-backlog", true, args.backlog_rate, 16, 1);
    if let Some(capacity) = args.backlog_diff_capacity {
        config.diff.capacity = capacity;
    }
    if let Some(window) = args.backlog_in_flight {
        config.kafka.max_in_flight_per_partition = window;
    }
    println!(
        "\n### backlog: {produced} events wait in Kafka ({ends} retained), tenant limited to {} requests/s, diff cache capacity {}, in-flight window {} per partition\n",
        args.backlog_rate, config.diff.capacity, config.kafka.max_in_flight_per_partition
    );
    let rss_before = status_kib("VmRSS:");
    let service = pipeline::start(config).expect("start");
    println!("| second | RSS MiB | diff cache records | committed | lag | undecided |\n|---|---|---|---|---|---|");
    let mut samples = Vec::new();
    // The second the diff cache first turned a generation over (it was full).
    let (mut cache_full_at, mut last_cached) = (None, 0.0);
    for second in 1..=args.backlog_seconds {
        std::thread::sleep(Duration::from_secs(1)); // sampling cadence
        let committed: i64 = tools::committed(&s.bootstrap, "load-backlog", TOPIC, partitions)
            .unwrap_or_default()
            .iter()
            .map(|c| c.unwrap_or(0))
            .sum();
        let rss = status_kib("VmRSS:") as f64 / 1024.0;
        let cached = metric_total(&telemetry::prometheus().render(), metric::DIFF_RECORDS, None);
        if cache_full_at.is_none() && cached < last_cached {
            cache_full_at = Some(samples.len());
        }
        last_cached = cached;
        samples.push(rss);
        if second % 5 == 0 || second == 1 {
            println!(
                "| {second} | {rss:.1} | {cached:.0} | {committed} | {} | {:.0} |",
                ends - committed,
                metric_total(&telemetry::partitions().render(), metric::IN_FLIGHT, None)
            );
        }
    }
    let text = telemetry::prometheus().render();
    if std::env::var_os("LOAD_TEST_DEBUG").is_some() {
        for line in telemetry::partitions()
            .render()
            .lines()
            .filter(|l| l.starts_with(metric::IN_FLIGHT))
            .take(6)
        {
            eprintln!("  {line}");
        }
    }
    eprintln!(
        "  (backlog: in flight {} | partition pauses {} | delivered {} | skipped {})",
        metric_total(&telemetry::partitions().render(), metric::IN_FLIGHT, None),
        metric_total(&text, metric::PARTITION_PAUSES, None),
        metric_total(&text, metric::OUTCOMES, Some(("outcome", "delivered"))),
        metric_total(&text, metric::OUTCOMES, Some(("outcome", "superseded")))
    );
    service.stop(StopMode::Graceful);
    let warm = &samples[samples.len().min(5)..];
    let (min, max) = warm
        .iter()
        .fold((f64::MAX, 0.0f64), |(lo, hi), v| (lo.min(*v), hi.max(*v)));
    println!(
        "\nRSS before start {:.1} MiB; after 5 s warm-up min {:.1} MiB, max {:.1} MiB (growth {:.1} MiB) while the backlog drained at the tenant's rate",
        rss_before as f64 / 1024.0,
        min,
        max,
        max - min
    );
    match cache_full_at {
        Some(from) => {
            let full = &samples[from..];
            let mean = full.iter().sum::<f64>() / full.len() as f64;
            let (lo, hi) = full
                .iter()
                .fold((f64::MAX, 0.0f64), |(lo, hi), v| (lo.min(*v), hi.max(*v)));
            println!(
                "Once the diff cache was full (second {} on, {} s): RSS mean {mean:.1} MiB, min {lo:.1} ({:+.1}%), max {hi:.1} ({:+.1}%)",
                from + 1,
                full.len(),
                100.0 * (lo - mean) / mean,
                100.0 * (hi - mean) / mean
            );
        }
        None => println!("The diff cache never filled in this run: no steady-state figure."),
    }
}

/// Batch size of the latency runs: the CRM's limit, at most 200 (Dataverse's 1000 at two
/// calls in flight would ask 40,000 events/s of the pipeline, which measures the pipeline,
/// not its use of concurrency; Microsoft also advises small batches).
fn latency_batch(crm: Crm) -> usize {
    crm.batch_limit().min(200)
}

/// Per CRM: calls per changed record against the minimum, and batched throughput at
/// zero and at 50 ms sandbox latency.
fn crms(args: &Args) {
    let partitions = 12;
    let messages = stream(args.crm_records, 1, false);
    let (latency_ms, concurrency) = (50u64, 2usize);
    println!(
        "\n### crms: {} changed records per CRM, batched at each CRM's limit\n\n{HEADER}",
        messages.len()
    );
    let mut summary = Vec::new();
    for crm in [Crm::Salesforce, Crm::Zendesk, Crm::Dynamics] {
        let limit = crm.batch_limit();
        let s = start_crm_sandboxes(partitions, 0, crm);
        runtime()
            .block_on(tools::produce(&s.bootstrap, TOPIC, &messages))
            .expect("produce");
        let fast = run_pipeline(
            &s,
            config(&s, "load-crms", true, 1e6, 32, limit),
            partitions,
            messages.len(),
        );
        print_run(&format!("{}, zero latency", crm.name()), &fast, messages.len());
        drop(s);
        let s = start_crm_sandboxes(partitions, latency_ms, crm);
        runtime()
            .block_on(tools::produce(&s.bootstrap, TOPIC, &messages))
            .expect("produce");
        let slow = run_pipeline(
            &s,
            config(&s, "load-crms", true, 1e6, concurrency, latency_batch(crm)),
            partitions,
            messages.len(),
        );
        print_run(
            &format!("{}, {latency_ms} ms latency, {concurrency} in flight", crm.name()),
            &slow,
            messages.len(),
        );
        summary.push((crm, fast, slow));
    }
    println!("\n| CRM | batch limit | API calls | minimum | ratio | events/s at zero latency (whole run / steady) | batch at {latency_ms} ms | events/s at {latency_ms} ms (whole run / steady) | ideal | steady % of ideal |\n|---|---|---|---|---|---|---|---|---|---|");
    for (crm, fast, slow) in &summary {
        let limit = crm.batch_limit();
        let writes = messages.len().div_ceil(limit);
        // A Zendesk job's result takes a status poll after its write; one `show_many`
        // poll answers for up to 30 open jobs (the account's job limit).
        let minimum = if *crm == Crm::Zendesk {
            writes + writes.div_ceil(30)
        } else {
            writes
        };
        let batch = latency_batch(*crm);
        let ideal = (concurrency * batch) as f64 / (latency_ms as f64 / 1000.0);
        let steady = |f: &RunFigures| f.steady_events_per_sec.unwrap_or(0.0);
        println!(
            "| {} | {limit} | {} | {minimum} | {:.2}× | {:.0} / {:.0} | {batch} | {:.0} / {:.0} | {ideal:.0} | {:.0}% |",
            crm.name(),
            fast.crm_calls,
            fast.crm_calls as f64 / minimum as f64,
            fast.events as f64 / fast.seconds,
            steady(fast),
            slow.events as f64 / slow.seconds,
            steady(slow),
            100.0 * steady(slow) / ideal
        );
    }
}

fn main() {
    let args = Args::parse();
    // Warnings and errors of the service under test, to standard error (RUST_LOG to change).
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,librdkafka=error,rdkafka=error"));
    let exporter = if args.scenario == Scenario::Traces {
        Some(traces::install(filter))
    } else {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .init();
        None
    };
    println!(
        "crm-sync load test — {} cores, {}",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC")
    );
    if matches!(args.scenario, Scenario::All | Scenario::Throughput) {
        throughput(&args);
    }
    if matches!(args.scenario, Scenario::All | Scenario::Latency) {
        latency(&args);
    }
    if matches!(args.scenario, Scenario::All | Scenario::Diff) {
        diff(&args);
    }
    if matches!(args.scenario, Scenario::All | Scenario::Backlog) {
        backlog(&args);
    }
    if matches!(args.scenario, Scenario::All | Scenario::Crms) {
        crms(&args);
    }
    if matches!(args.scenario, Scenario::All | Scenario::DiffMemory) {
        diff_memory::run(args.diff_capacity);
    }
    if matches!(args.scenario, Scenario::All | Scenario::Isolation) {
        isolation::run(args.isolation_events);
    }
    if matches!(args.scenario, Scenario::All | Scenario::Grpc) {
        grpc::run(args.events);
    }
    if matches!(args.scenario, Scenario::All | Scenario::Trail) {
        trail(&args);
    }
    if let Some((exporter, received)) = exporter {
        traced(&args, &exporter, &received);
        exporter.shutdown();
    }
    if matches!(args.scenario, Scenario::All | Scenario::Notifier) {
        notifier::run(args.notifications, args.events);
    }
    if args.scenario == Scenario::Chaos && !chaos::run(&args.chaos, sibling_binary()) {
        std::process::exit(1);
    }
}
