//! `crm-sync demo`: the real pipeline on this machine, with nothing installed.
//!
//! An embedded Kafka-protocol broker (librdkafka's mock cluster) and one Salesforce
//! sandbox per tenant, with faults injected (server errors, row locks, expiring tokens),
//! a synthetic stream ([`workload`]) with a known answer, the service as `crm-sync run`
//! would start it, live progress read from its own `/metrics`, and a final check that
//! every sandbox holds the newest version of every record.

pub mod workload;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::consume::StopMode;
use crate::pipeline;
use crate::sandbox::kafka::{tools, KafkaSandbox};
use crate::sandbox::salesforce::{Faults, SalesforceSandbox, SandboxOrg};
use crate::telemetry::{self, metric};
use crate::tenant::mapping::map_fields;
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

/// Compares what each tenant's sandbox holds with what the stream says it must hold.
pub fn verify(
    config: &Config,
    expected: &BTreeMap<RecordId, Expected>,
    sandboxes: &HashMap<String, &SalesforceSandbox>,
) -> Vec<Mismatch> {
    let mut out = Vec::new();
    for (id, want) in expected {
        let (Some(tenant), Some(sandbox)) = (config.tenant(&id.0), sandboxes.get(&id.0)) else {
            out.push(Mismatch {
                record: id.clone(),
                problem: "tenant has no sandbox or config".into(),
            });
            continue;
        };
        let Some(entity) = tenant.entities.get(&id.1) else {
            out.push(Mismatch {
                record: id.clone(),
                problem: "entity not mapped".into(),
            });
            continue;
        };
        let held = sandbox.find(&entity.object, &entity.external_id_field, &id.2);
        match (want, held) {
            (Expected::Absent, None) => {}
            (Expected::Absent, Some(_)) => out.push(Mismatch {
                record: id.clone(),
                problem: "present but should be absent".into(),
            }),
            (Expected::Present(_), None) => out.push(Mismatch {
                record: id.clone(),
                problem: "missing".into(),
            }),
            (Expected::Present(data), Some(record)) => {
                let mut held = record.fields.clone();
                held.remove(&entity.external_id_field);
                let wanted = map_fields(data, &entity.fields);
                if held != wanted {
                    out.push(Mismatch {
                        record: id.clone(),
                        problem: format!(
                            "holds {} but the newest version is {}",
                            serde_json::Value::Object(held),
                            serde_json::Value::Object(wanted)
                        ),
                    });
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

fn demo_secret(var: &str) -> Option<String> {
    // The demo's sandboxes accept these made-up credentials; nothing real is involved.
    Some(format!("demo-{}", var.to_lowercase()))
}

/// Runs the demo; `Ok(true)` when every sandbox converged to the newest versions.
pub fn run(options: &DemoOptions) -> Result<bool, DemoError> {
    let started = Instant::now();
    println!("crm-sync demo: embedded Kafka broker + one Salesforce sandbox per tenant\n");

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
        .create_topic(&config.kafka.state_topic, INPUT_PARTITIONS)
        .map_err(setup("creating topics"))?;

    // 2. One sandbox org per tenant, each with its own faults.
    let fault_plan = [
        (
            "acme",
            Faults {
                server_error_rate: 0.02,
                lock_error_rate: 0.02,
                token_lifetime_ms: Some(400),
                seed: 1,
                ..Faults::default()
            },
        ),
        (
            "globex",
            Faults {
                latency_ms: 2,
                server_error_rate: 0.01,
                seed: 2,
                ..Faults::default()
            },
        ),
        (
            "initech",
            Faults {
                server_error_rate: 0.05,
                lock_error_rate: 0.03,
                seed: 3,
                ..Faults::default()
            },
        ),
    ];
    let mut sandboxes = Vec::new();
    for tenant in config.tenants.iter_mut() {
        let sf = tenant
            .salesforce
            .as_mut()
            .ok_or_else(|| DemoError::Setup("demo tenants are Salesforce tenants".into()))?;
        let mut org = SandboxOrg::standard(sf.client_id.expose(), sf.client_secret.expose());
        org.faults = fault_plan
            .iter()
            .find(|(n, _)| *n == tenant.name)
            .map(|(_, f)| f.clone())
            .unwrap_or_default();
        let sandbox = SalesforceSandbox::start("127.0.0.1:0", org).map_err(setup("starting a Salesforce sandbox"))?;
        sf.base_url = sandbox.base_url();
        let faults = fault_plan
            .iter()
            .find(|(n, _)| *n == tenant.name)
            .map(|(_, f)| f.describe());
        println!(
            "  tenant {:<8} → Salesforce sandbox {} ({})",
            tenant.name,
            sandbox.base_url(),
            faults.unwrap_or_else(|| "no faults".into())
        );
        sandboxes.push((tenant.name.clone(), sandbox));
    }

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

    // 4. The service, exactly as `crm-sync run` starts it.
    let service = pipeline::start(config.clone()).map_err(setup("starting the service"))?;
    println!("  service running; metrics at http://{}/metrics\n", service.http_addr());
    let ends = tools::end_offsets(&bootstrap, &input, INPUT_PARTITIONS).map_err(setup("reading end offsets"))?;
    let prometheus = telemetry::prometheus();
    let deadline = Duration::from_secs(120);
    let mut last_print = Instant::now() - Duration::from_secs(1);
    let finished = loop {
        let committed =
            tools::committed(&bootstrap, &config.kafka.group_id, &input, INPUT_PARTITIONS).unwrap_or_default();
        let done = committed.len() == ends.len()
            && committed
                .iter()
                .zip(&ends)
                .all(|(c, e)| *e == 0 || c.is_some_and(|c| c >= *e));
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
    let report = service.stop(StopMode::Graceful);
    if !finished {
        return Err(DemoError::Timeout(deadline));
    }

    // 5. The summary and the check.
    let text = prometheus.render();
    let dlq = tools::read_all(&bootstrap, &config.kafka.dlq_topic, 1, Duration::from_secs(20))
        .map_err(setup("reading the DLQ"))?;
    let failures = tools::read_all(&bootstrap, &config.kafka.failures_topic, 1, Duration::from_secs(20))
        .map_err(setup("reading the failures topic"))?;
    let refs: HashMap<String, &SalesforceSandbox> = sandboxes.iter().map(|(n, s)| (n.clone(), s)).collect();
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
        "  retries           {:>8}",
        metric_total(&text, metric::OUTCOMES, Some(("outcome", "retried")))
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
    for (name, sandbox) in &sandboxes {
        let s = sandbox.stats();
        println!(
            "  {:<8} CRM calls {:>6} (+{} token requests), applied {} upserts / {} deletes, rejected {:?}",
            name, s.api_requests, s.token_requests, s.upserts_applied, s.deletes_applied, s.rejected
        );
    }
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

fn print_progress(text: &str, sandboxes: &[(String, SalesforceSandbox)]) {
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
