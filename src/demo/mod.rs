//! `crm-sync demo`: the real pipeline on this machine, with nothing installed.
//!
//! An embedded Kafka-protocol broker (librdkafka's mock cluster) and one CRM sandbox per
//! tenant — Salesforce, Zendesk and Dynamics 365 side by side — with faults injected
//! (server errors, row locks, throttles, expiring tokens),
//! a synthetic stream ([`workload`]) with a known answer, the service as `crm-sync run`
//! would start it (the failure notifier included, telling a webhook [`receiver`] that
//! verifies each notification's signature), live progress read from its own `/metrics`,
//! and a final check that every sandbox holds the newest version of every record.

pub mod chaos;
pub mod receiver;
pub mod workload;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use crate::config::{Config, CrmKind, TenantConfig};
use crate::consume::StopMode;
use crate::sandbox::common::Faults;
use crate::sandbox::dynamics::{DynamicsSandbox, DynamicsSetup};
use crate::sandbox::kafka::{tools, KafkaSandbox};
use crate::sandbox::salesforce::{SalesforceSandbox, SandboxOrg};
use crate::sandbox::zendesk::{ZendeskSandbox, ZendeskSetup};
use crate::sandbox::CrmSandbox;
use crate::telemetry::{self, metric};
use crate::tenant::mapping::map_fields;
use crate::{notifier, pipeline};
use workload::{Expected, RecordId, TenantSpec, Workload, WorkloadSpec};

/// The demo's configuration, embedded so the demo needs no file.
pub const DEMO_CONFIG: &str = include_str!("../../config/demo.toml");

const INPUT_PARTITIONS: i32 = 6;

#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub records: usize,
    pub metrics_addr: String,
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("demo setup failed: {0}")]
    Setup(String),
    #[error("the pipeline did not finish the stream within {0:?}")]
    Timeout(Duration),
}

fn setup<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> DemoError + '_ {
    move |e| DemoError::Setup(format!("{what}: {e}"))
}

/// A record the CRM does not hold as it should.
#[derive(Debug, Clone, PartialEq)]
pub struct Mismatch {
    pub record: RecordId,
    pub problem: String,
}

/// Compares what each tenant's sandbox holds with what the stream says it must hold:
/// every mapped field the newest version carries, with the value it carries.
pub fn verify(
    config: &Config,
    expected: &BTreeMap<RecordId, Expected>,
    sandboxes: &HashMap<String, &dyn CrmSandbox>,
) -> Vec<Mismatch> {
    let mut out = Vec::new();
    for (id, want) in expected {
        let mismatch = |problem: String| Mismatch {
            record: id.clone(),
            problem,
        };
        let (Some(tenant), Some(sandbox)) = (config.tenant(&id.0), sandboxes.get(&id.0)) else {
            out.push(mismatch("tenant has no sandbox or config".into()));
            continue;
        };
        let Some(entity) = tenant.entities.get(&id.1) else {
            out.push(mismatch("entity not mapped".into()));
            continue;
        };
        match (want, sandbox.record(&entity.object, &id.2)) {
            (Expected::Absent, None) => {}
            (Expected::Absent, Some(_)) => out.push(mismatch("present but should be absent".into())),
            (Expected::Present(_), None) => out.push(mismatch("missing".into())),
            (Expected::Present(data), Some(held)) => {
                let wanted = map_fields(data, &entity.fields);
                let differs = wanted.iter().any(|(field, value)| held.get(field) != Some(value));
                if differs {
                    out.push(mismatch(format!(
                        "holds {} but the newest version is {}",
                        serde_json::Value::Object(held),
                        serde_json::Value::Object(wanted)
                    )));
                }
            }
        }
    }
    out
}

/// Sum of a metric's samples in a Prometheus exposition, optionally only those with
/// `label="value"`.
pub fn metric_total(exposition: &str, name: &str, label: Option<(&str, &str)>) -> f64 {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric_name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest),
                None => (series, ""),
            };
            if metric_name != name {
                return None;
            }
            if let Some((k, v)) = label {
                if !labels.contains(&format!("{k}=\"{v}\"")) {
                    return None;
                }
            }
            value.parse::<f64>().ok()
        })
        .fold(0.0, |a, b| a + b)
}

/// The webhook secret the demo's notifier signs with and its receiver verifies with.
const DEMO_WEBHOOK_SECRET: &str = "whsec_Y3JtLXN5bmMtZGVtby13ZWJob29rLWtleSE=";

fn demo_secret(var: &str) -> Option<String> {
    // The demo's sandboxes accept these made-up credentials; nothing real is involved.
    if var == "DEMO_WEBHOOK_SECRET" {
        return Some(DEMO_WEBHOOK_SECRET.to_string());
    }
    Some(format!("demo-{}", var.to_lowercase()))
}

/// How long the demo's Dynamics 365 tenant's CRM is down, from when the service has its
/// partitions.
const OUTAGE: Duration = Duration::from_secs(6);

/// The Dynamics 365 sandbox's everyday faults.
fn dynamics_faults() -> Faults {
    Faults {
        server_error_rate: 0.05,
        token_lifetime_ms: Some(500),
        retry_after_secs: 1,
        seed: 3,
        ..Faults::default()
    }
}

/// Runs the demo; `Ok(true)` when every sandbox converged to the newest versions.
pub fn run(options: &DemoOptions) -> Result<bool, DemoError> {
    let started = Instant::now();
    println!("crm-sync demo: embedded Kafka broker + one CRM sandbox per tenant (Salesforce, Zendesk, Dynamics 365)\n");

    // 1. The broker and the topics.
    let kafka = KafkaSandbox::start(1).map_err(setup("starting the mock Kafka cluster"))?;
    let mut config = Config::from_toml_with_env(DEMO_CONFIG, demo_secret).map_err(setup("demo config"))?;
    let bootstrap = kafka.bootstrap_servers();
    config.kafka.bootstrap_servers = bootstrap.clone();
    config.service.http_addr = options.metrics_addr.clone();
    let input = config.kafka.input_topics[0].clone();
    kafka
        .create_topic(&input, INPUT_PARTITIONS)
        .map_err(setup("creating topics"))?;
    kafka
        .create_topic(&config.kafka.dlq_topic, 1)
        .map_err(setup("creating topics"))?;
    kafka
        .create_topic(&config.kafka.failures_topic, 1)
        .map_err(setup("creating topics"))?;
    kafka
        .create_topic(&config.notifier.dlq_topic, 1)
        .map_err(setup("creating topics"))?;
    kafka
        .create_topic(&config.kafka.state_topic, INPUT_PARTITIONS)
        .map_err(setup("creating topics"))?;
    if let Some(retry) = &config.kafka.retry_topic {
        kafka
            .create_topic(retry, INPUT_PARTITIONS)
            .map_err(setup("creating topics"))?;
    }
    for trail in [&config.kafka.status_topic, &config.kafka.audit_topic]
        .into_iter()
        .flatten()
    {
        kafka.create_topic(trail, 3).map_err(setup("creating topics"))?;
    }
    if let Some(pauses) = &config.kafka.pause_topic {
        kafka.create_topic(pauses, 1).map_err(setup("creating topics"))?;
    }

    // 2. One sandbox per tenant, on the tenant's CRM, each with its own faults.
    let mut sandboxes: Vec<(String, Box<dyn CrmSandbox>)> = Vec::new();
    for tenant in config.tenants.iter_mut() {
        let (sandbox, faults) = start_sandbox(tenant)?;
        println!(
            "  tenant {:<8} → {:<10} sandbox {} ({})",
            tenant.name,
            tenant.crm.as_str(),
            sandbox.base_url(),
            faults
        );
        sandboxes.push((tenant.name.clone(), sandbox));
    }

    // Each tenant's webhook endpoint is the demo's receiver.
    let receiver =
        receiver::Receiver::start(DEMO_WEBHOOK_SECRET, true).map_err(setup("starting the webhook receiver"))?;
    for tenant in config.tenants.iter_mut() {
        for hook in tenant.webhooks.iter_mut() {
            hook.url = format!("http://{}/hooks/{}", receiver.addr, tenant.name);
        }
    }
    println!(
        "  webhooks → receiver http://{}/hooks/{{tenant}} (checks every Standard Webhooks signature)",
        receiver.addr
    );

    // 3. The stream.
    let spec = WorkloadSpec {
        tenants: config
            .tenants
            .iter()
            .map(|t| TenantSpec {
                name: t.name.clone(),
                entities: t.entities.keys().cloned().collect(),
            })
            .collect(),
        records_per_tenant: options.records.max(1),
        updates_per_record: 3,
        unchanged_ratio: 0.3,
        duplicate_ratio: 0.05,
        stale_ratio: 0.1,
        delete_ratio: 0.05,
        invalid_ratio: 0.01,
        invalid_contacts: sandboxes
            .iter()
            .map(|(name, sandbox)| (name.clone(), sandbox.invalid_contact()))
            .collect(),
        malformed: 12,
        seed: 42,
    };
    let Workload {
        messages,
        expected,
        counts,
    } = workload::generate(&spec);
    println!(
        "\n  producing {} messages: {} records, {} unchanged repeats, {} exact duplicates, {} late stale versions, {} deletes, {} records the CRM will reject, {} malformed",
        counts.messages,
        expected.len(),
        counts.unchanged,
        counts.duplicates,
        counts.stale,
        counts.deletes,
        counts.invalid_records,
        counts.malformed
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(setup("runtime"))?;
    runtime
        .block_on(tools::produce(&bootstrap, &input, &messages))
        .map_err(setup("producing the stream"))?;

    // 4. The service, exactly as `crm-sync run` starts it. Tenant initech's CRM is down
    // (every call 503) for longer than an event may be retried.
    let outage = sandboxes.iter().find(|(_, s)| s.crm() == "dynamics").map(|(name, s)| {
        s.set_faults(Faults {
            server_error_rate: 1.0,
            ..dynamics_faults()
        });
        name.clone()
    });
    let mut outage_ends: Option<Instant> = None;
    let mut outage_over = outage.is_none();
    let notifier = notifier::start(&config, false).map_err(setup("starting the notifier"))?;
    let service = pipeline::start(config.clone()).map_err(setup("starting the service"))?;
    println!("  service running; metrics at http://{}/metrics\n", service.http_addr());
    let prometheus = telemetry::prometheus();
    let deadline = Duration::from_secs(120);
    let mut last_print = Instant::now() - Duration::from_secs(1);
    let group = config.kafka.group_id.clone();
    let finished = loop {
        // Input first, then the retry topic: an event parked on the retry topic has its
        // input offset committed but is not done until its retry copy is.
        let done = outage_over
            && drained(&bootstrap, &group, &input, INPUT_PARTITIONS)
            && config.kafka.retry_topic.as_ref().is_none_or(|retry| {
                drained(
                    &bootstrap,
                    &crate::consume::retry_group_id(&group),
                    retry,
                    INPUT_PARTITIONS,
                )
            });
        if outage_ends.is_none() && service.assigned_partitions() > 0 {
            // The outage counts from when the service can see it.
            outage_ends = Some(Instant::now() + OUTAGE);
        }
        if !outage_over && outage_ends.is_some_and(|t| Instant::now() >= t) {
            if let Some((name, sandbox)) = sandboxes.iter().find(|(n, _)| Some(n) == outage.as_ref()) {
                sandbox.set_faults(dynamics_faults());
                println!("  -- {name}'s CRM is back after {:.0} s --", OUTAGE.as_secs_f64());
            }
            outage_over = true;
        }
        if last_print.elapsed() >= Duration::from_secs(1) || done {
            print_progress(&prometheus.render(), &sandboxes);
            last_print = Instant::now();
        }
        if done {
            break true;
        }
        if started.elapsed() > deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(250)); // polling cadence of the progress display
    };
    if !finished {
        service.stop(StopMode::Graceful);
        return Err(DemoError::Timeout(deadline));
    }
    let grpc_addr = service.grpc_addr();
    // The notifier has told the receiver about every failure once it has committed the
    // failures topic to its end (a summary waits for the end of its window).
    let notifier_group = config
        .notifier
        .group_id
        .clone()
        .unwrap_or_else(|| format!("{group}.notifier"));
    let told = Instant::now();
    while !drained(&bootstrap, &notifier_group, &config.kafka.failures_topic, 1)
        && told.elapsed() < Duration::from_secs(30)
    {
        std::thread::sleep(Duration::from_millis(100)); // polling cadence; the deadline bounds the wait
    }
    if let Some(n) = notifier {
        n.stop(Duration::from_secs(5));
    }

    // 5. The summary and the check.
    let text = prometheus.render();
    let dlq = tools::read_all(&bootstrap, &config.kafka.dlq_topic, 1, Duration::from_secs(20))
        .map_err(setup("reading the DLQ"))?;
    let failures = tools::read_all(&bootstrap, &config.kafka.failures_topic, 1, Duration::from_secs(20))
        .map_err(setup("reading the failures topic"))?;
    let refs: HashMap<String, &dyn CrmSandbox> = sandboxes.iter().map(|(n, s)| (n.clone(), s.as_ref())).collect();
    let mismatches = verify(&config, &expected, &refs);

    println!("\nSummary ({:.1} s)", started.elapsed().as_secs_f64());
    println!(
        "  consumed          {:>8}",
        metric_total(&text, metric::EVENTS_CONSUMED, None)
    );
    println!(
        "  delivered         {:>8}",
        metric_total(&text, metric::OUTCOMES, Some(("outcome", "delivered")))
    );
    for reason in ["duplicate", "unchanged", "stale", "superseded"] {
        println!(
            "  skipped {:<10}{:>8}",
            reason,
            metric_total(&text, metric::OUTCOMES, Some(("outcome", reason)))
        );
    }
    println!(
        "  retries           {:>8}  (parked on the retry topic {})",
        metric_total(&text, metric::OUTCOMES, Some(("outcome", "retried"))),
        metric_total(&text, metric::OUTCOMES, Some(("outcome", "parked")))
    );
    println!(
        "  dead-lettered     {:>8}  (DLQ topic holds {}, failures topic {})",
        metric_total(&text, metric::OUTCOMES, Some(("outcome", "dead_lettered")))
            + metric_total(&text, metric::DECODE_ERRORS, None),
        dlq.len(),
        failures.len()
    );
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    for m in &dlq {
        *reasons
            .entry(m.header("crm-sync.error.code").unwrap_or("?").to_string())
            .or_default() += 1;
    }
    println!("  DLQ reasons       {reasons:?}");
    let events: Vec<serde_json::Value> = failures
        .iter()
        .filter_map(|m| serde_json::from_slice(m.payload.as_deref()?).ok())
        .collect();
    for (name, _) in &sandboxes {
        let states: Vec<&str> = events
            .iter()
            .filter(|e| e["kind"] == "tenant_state" && e["tenant"] == name.as_str())
            .filter_map(|e| e["to"].as_str())
            .collect();
        if states.is_empty() {
            continue;
        }
        // Failed probes (half_open → open) are counted, not listed.
        let mut shown = vec!["closed".to_string()];
        let mut i = 0;
        while i < states.len() {
            let failed_probes = states[i..]
                .chunks(2)
                .take_while(|pair| pair == &["half_open", "open"])
                .count();
            if failed_probes > 0 {
                shown.push(format!("(half_open → open) ×{failed_probes}"));
                i += 2 * failed_probes;
            } else {
                shown.push(states[i].to_string());
                i += 1;
            }
        }
        println!("  {name:<8} health   {}", shown.join(" → "));
    }
    if let Some(name) = &outage {
        let lost_to_outage = events
            .iter()
            .filter(|e| e["kind"] == "dead_lettered" && e["tenant"] == name.as_str())
            .filter(|e| {
                matches!(
                    e["error_code"].as_str(),
                    Some("crm_server_error" | "crm_timeout" | "crm_connection" | "crm_connection_lost")
                )
            })
            .count();
        println!(
            "  {name:<8} outage   CRM down {:.0} s ({:.0}× retry.max_age_ms): {lost_to_outage} events dead-lettered for it",
            OUTAGE.as_secs_f64(),
            OUTAGE.as_secs_f64() * 1000.0 / config.retry.max_age_ms as f64
        );
    }
    let heard = receiver.received();
    let of_type = |t: &str| heard.verified.iter().filter(|n| n["type"] == t).count();
    let summarised: u64 = heard
        .verified
        .iter()
        .filter(|n| n["type"] == "records.dead_lettered")
        .filter_map(|n| n["data"]["count"].as_u64())
        .sum();
    println!(
        "  webhooks          {} verified ({} health changes, {} records dead-lettered one by one, {} summaries of {} more, {} DLQ-rate alerts), {} rejected",
        heard.verified.len(),
        of_type("tenant.state_changed"),
        of_type("record.dead_lettered"),
        of_type("records.dead_lettered"),
        summarised,
        of_type("tenant.dlq_rate_exceeded"),
        heard.rejected
    );
    for (name, sandbox) in &sandboxes {
        let s = sandbox.stats();
        println!(
            "  {:<8} {:<10} CRM calls {:>6} (+{} token requests), applied {} upserts / {} deletes, rejected {:?}",
            name,
            sandbox.crm(),
            s.api_requests,
            s.token_requests,
            s.upserts_applied,
            s.deletes_applied,
            s.rejected
        );
    }
    let token = config.grpc.as_ref().and_then(|g| g.admin_token.as_ref());
    if let (Some(addr), Some(token)) = (grpc_addr, token) {
        let rejected = events
            .iter()
            .find(|e| e["kind"] == "dead_lettered" && e["stage"] == "deliver")
            .and_then(|e| {
                let s = |k: &str| e[k].as_str().map(str::to_string);
                Some((s("tenant")?, s("entity")?, s("key")?))
            });
        let delivered = expected
            .iter()
            .find(|(_, want)| matches!(want, Expected::Present(_)))
            .map(|(id, _)| id.clone());
        let superseded = config
            .kafka
            .audit_topic
            .as_deref()
            .and_then(|audit| superseded_version(&bootstrap, audit));
        let superseded_note = superseded.as_ref().map(|(_, version)| {
            format!("  (the audit topic says version {version} of the superseded one was superseded by a newer version before it was written)")
        });
        let asked = [
            ("delivered", delivered),
            ("rejected", rejected),
            ("superseded", superseded.map(|(id, _)| id)),
        ]
        .into_iter()
        .filter_map(|(what, id)| Some((what, id?)))
        .collect();
        lookups(&runtime, addr, token.expose(), asked);
        if let Some(note) = superseded_note {
            println!("{note}");
        }
    }
    let report = service.stop(StopMode::Graceful);
    println!("  shutdown: committed={} closed={}", report.committed, report.closed);
    if mismatches.is_empty() {
        println!(
            "\nCHECK PASSED: every sandbox holds the newest version of every one of {} records.",
            expected.len()
        );
        Ok(true)
    } else {
        println!(
            "\nCHECK FAILED: {} of {} records differ, e.g.:",
            mismatches.len(),
            expected.len()
        );
        for m in mismatches.iter().take(10) {
            println!("  {:?}: {}", m.record, m.problem);
        }
        Ok(false)
    }
}

fn print_progress(text: &str, sandboxes: &[(String, Box<dyn CrmSandbox>)]) {
    let calls: u64 = sandboxes.iter().map(|(_, s)| s.stats().api_requests).sum();
    let skipped: f64 = ["duplicate", "unchanged", "stale", "superseded"]
        .iter()
        .map(|r| metric_total(text, metric::OUTCOMES, Some(("outcome", r))))
        .sum();
    println!(
        "  consumed {:>7} | delivered {:>7} | skipped {:>7} | retries {:>5} | dead-lettered {:>4} | in flight {:>5} | CRM calls {:>7}",
        metric_total(text, metric::EVENTS_CONSUMED, None),
        metric_total(text, metric::OUTCOMES, Some(("outcome", "delivered"))),
        skipped,
        metric_total(text, metric::OUTCOMES, Some(("outcome", "retried"))),
        metric_total(text, metric::OUTCOMES, Some(("outcome", "dead_lettered"))) + metric_total(text, metric::DECODE_ERRORS, None),
        metric_total(text, metric::IN_FLIGHT, None),
        calls,
    );
}

/// Looks records up over gRPC as a support engineer would (`crm-sync status`): one
/// delivered (its older versions superseded or stale), one the CRM rejected. The status
/// view reads the topic on its own, so a lookup is tried again for up to 5 s.
fn lookups(
    runtime: &tokio::runtime::Runtime,
    addr: std::net::SocketAddr,
    token: &str,
    asked: Vec<(&str, (String, String, String))>,
) {
    println!("  gRPC lookups at {addr} (crmsync.v1.StatusService/GetRecordStatus):");
    runtime.block_on(async {
        let mut client = match crate::grpc::client::connect_as(&addr.to_string(), token).await {
            Ok((status, _)) => status,
            Err(e) => {
                println!("    {e}");
                return;
            }
        };
        for (what, (tenant, entity, key)) in asked {
            let request = crate::grpc::pb::GetRecordStatusRequest { tenant, entity, key };
            let deadline = Instant::now() + Duration::from_secs(5);
            let answer = loop {
                let answer = client.get_record_status(request.clone()).await;
                if answer.is_ok() || Instant::now() > deadline {
                    break answer;
                }
                tokio::time::sleep(Duration::from_millis(100)).await; // retry cadence; the deadline bounds it
            };
            match answer {
                Ok(s) => println!("    {what:<10} {}", crate::grpc::client::describe(s.get_ref())),
                Err(e) => println!("    {what:<10} {:?}: {}", e.code(), e.message()),
            }
        }
    });
}

/// A record one of whose versions was superseded (a newer version arrived while it
/// waited, so it was never written), from the audit topic: its identity and that version.
fn superseded_version(bootstrap: &str, audit: &str) -> Option<((String, String, String), u64)> {
    let lines = tools::read_all(bootstrap, audit, 3, Duration::from_secs(20)).ok()?;
    lines.iter().find_map(|m| {
        let line: serde_json::Value = serde_json::from_slice(m.payload.as_deref()?).ok()?;
        if line["status"] != "skipped" || line["reason"] != "superseded" {
            return None;
        }
        let s = |k: &str| line[k].as_str().map(str::to_string);
        Some(((s("tenant")?, s("entity")?, s("key")?), line["version"].as_u64()?))
    })
}

/// Whether `group` has committed every message of `topic`. Committed offsets are read
/// before end offsets, so a message written by an event before that event's own offset
/// was committed is always seen.
fn drained(bootstrap: &str, group: &str, topic: &str, partitions: i32) -> bool {
    let committed = tools::committed(bootstrap, group, topic, partitions).unwrap_or_default();
    let Ok(ends) = tools::end_offsets(bootstrap, topic, partitions) else {
        return false;
    };
    committed.len() == ends.len()
        && committed
            .iter()
            .zip(&ends)
            .all(|(c, e)| *e == 0 || c.is_some_and(|c| c >= *e))
}

/// Starts the sandbox of `tenant`'s CRM with the demo's faults for it, and points the
/// tenant at it. Returns the sandbox and a description of its faults.
fn start_sandbox(tenant: &mut TenantConfig) -> Result<(Box<dyn CrmSandbox>, String), DemoError> {
    let missing = || DemoError::Setup(format!("tenant {} has no section for its CRM", tenant.name));
    let started = setup("starting a CRM sandbox");
    Ok(match tenant.crm {
        CrmKind::Salesforce => {
            let sf = tenant.salesforce.as_mut().ok_or_else(missing)?;
            let mut org = SandboxOrg::standard(sf.client_id.expose(), sf.client_secret.expose());
            org.faults = Faults {
                server_error_rate: 0.02,
                lock_error_rate: 0.02,
                token_lifetime_ms: Some(400),
                seed: 1,
                ..Faults::default()
            };
            let faults = org.faults.describe();
            let sandbox = SalesforceSandbox::start("127.0.0.1:0", org).map_err(started)?;
            sf.base_url = sandbox.base_url();
            (Box::new(sandbox), faults)
        }
        CrmKind::Zendesk => {
            let zd = tenant.zendesk.as_mut().ok_or_else(missing)?;
            let (Some(id), Some(secret)) = (&zd.oauth_client_id, &zd.oauth_client_secret) else {
                return Err(DemoError::Setup(
                    "the demo's Zendesk tenant uses OAuth client credentials".into(),
                ));
            };
            let mut setup = ZendeskSetup::standard(id.expose(), secret.expose());
            setup.job_duration_ms = 60;
            setup.faults = Faults {
                latency_ms: 2,
                server_error_rate: 0.01,
                token_lifetime_ms: Some(600),
                retry_after_secs: 1,
                seed: 2,
                ..Faults::default()
            };
            let faults = format!("{}, jobs take 60 ms, a 429 storm at the start", setup.faults.describe());
            let sandbox = ZendeskSandbox::start("127.0.0.1:0", setup).map_err(started)?;
            sandbox.script(std::iter::repeat_n(
                crate::sandbox::zendesk::Scripted::TooManyRequests,
                3,
            ));
            zd.base_url = sandbox.base_url();
            (Box::new(sandbox), faults)
        }
        CrmKind::Dynamics => {
            let d = tenant.dynamics.as_mut().ok_or_else(missing)?;
            let mut setup = DynamicsSetup::standard(d.client_id.expose(), d.client_secret.expose());
            setup.directory_id = d.directory_id.clone();
            setup.faults = dynamics_faults();
            let faults = format!(
                "{}, 429 0x80072322 twice, down for the first {:.0} s",
                setup.faults.describe(),
                OUTAGE.as_secs_f64()
            );
            let sandbox = DynamicsSandbox::start("127.0.0.1:0", setup).map_err(started)?;
            sandbox.script(std::iter::repeat_n(
                crate::sandbox::dynamics::Scripted::TooManyRequests,
                2,
            ));
            d.org_url = sandbox.base_url();
            d.authority_url = sandbox.base_url();
            (Box::new(sandbox), faults)
        }
    })
}
