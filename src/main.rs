//! `crm-sync`: the command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use crm_sync::config::{Config, LogFormat, ServiceConfig};
use crm_sync::consume::StopMode;
use crm_sync::demo::workload::kafka_key;
use crm_sync::grpc::{client, pb};
use crm_sync::sandbox::dynamics::{DynamicsSandbox, DynamicsSetup};
use crm_sync::sandbox::kafka::{tools, KafkaSandbox};
use crm_sync::sandbox::salesforce::{SalesforceSandbox, SandboxOrg};
use crm_sync::sandbox::zendesk::{ZendeskSandbox, ZendeskSetup};
use crm_sync::sandbox::CrmSandbox;
use crm_sync::{demo, notifier, pipeline, shutdown, traces};

/// mimalloc: the pipeline allocates per event (messages, payload maps, actor envelopes)
/// across threads; measured against the system allocator in load-tests/README.md.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Keeps Salesforce in step with business change events flowing through Apache Kafka.
#[derive(Parser)]
#[command(name = "crm-sync", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service: consume the input topics and keep the configured CRMs in step.
    ///
    /// Stops gracefully on SIGTERM or SIGINT: stops fetching, drains in-flight events
    /// within service.shutdown_deadline_ms, commits, leaves the consumer group.
    Run {
        /// Path to the TOML configuration (see config/crm-sync.toml).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run the whole pipeline on this machine with an embedded Kafka-protocol broker and
    /// embedded Salesforce, Zendesk and Dynamics 365 sandboxes (one tenant each), on a
    /// synthetic stream, and check the result.
    Demo {
        /// Number of distinct records in the synthetic stream.
        #[arg(long, default_value_t = 2_000)]
        records: usize,
        /// Address for /metrics while the demo runs.
        #[arg(long, default_value = "127.0.0.1:9464")]
        metrics_addr: String,
    },
    /// Run only the failure notifier: read the failures topic and deliver signed webhook
    /// notifications to the endpoints in the configuration (`crm-sync run` runs it too,
    /// unless notifier.enabled = false). Serves /metrics on service.http_addr.
    Notify {
        /// Path to the service's TOML configuration.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Check a configuration file and report every problem with the key at fault: keys and
    /// types, cross-field rules, addresses, secret references, and the Kafka consumer and
    /// producer settings (both clients are built, without waiting for a broker). Warns
    /// about secrets written in the file. Exits 1 when there is a problem.
    CheckConfig {
        /// Path to the TOML configuration.
        file: PathBuf,
        /// Check the structure without the secrets: `${VAR}` and `${file:/path}`
        /// references are not resolved, so this runs where the secrets are not (CI).
        #[arg(long)]
        no_secrets: bool,
    },
    /// Send dead-lettered events back to their input topic after a fix: reads the DLQ with
    /// the service's Kafka settings, keeps what the filters select, skips events whose
    /// record already holds their version or a newer one (so it never moves a record
    /// backwards, and a second run redrives nothing twice), and marks each with a
    /// crm-sync.redriven header.
    Redrive {
        /// Path to the service's TOML configuration.
        #[arg(long, short)]
        config: PathBuf,
        /// Only count, by reason: produce nothing.
        #[arg(long)]
        dry_run: bool,
        /// Only events of this tenant.
        #[arg(long)]
        tenant: Option<String>,
        /// Only events of this entity.
        #[arg(long)]
        entity: Option<String>,
        /// Only this crm-sync.error.code, e.g. crm_validation.
        #[arg(long)]
        error_code: Option<String>,
        /// Only this stage: decode or deliver.
        #[arg(long)]
        stage: Option<String>,
        /// Only events whose last failure is at or after this time (RFC 3339).
        #[arg(long)]
        since: Option<String>,
        /// Only events whose last failure is at or before this time (RFC 3339).
        #[arg(long)]
        until: Option<String>,
    },
    /// The latest status of one record, from any crm-sync member's gRPC interface (token
    /// in CRM_SYNC_TOKEN).
    Status {
        /// The member's gRPC address (grpc.addr), host:port.
        #[arg(long, default_value = "127.0.0.1:50051")]
        addr: String,
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        entity: String,
        #[arg(long)]
        key: String,
    },
    /// Outcomes of a tenant's records as they happen, one line each, until interrupted
    /// (token in CRM_SYNC_TOKEN).
    Watch {
        #[arg(long, default_value = "127.0.0.1:50051")]
        addr: String,
        #[arg(long)]
        tenant: String,
        /// Only these statuses (comma-separated), e.g. dead_lettered,tenant_paused.
        #[arg(long, value_delimiter = ',')]
        status: Vec<String>,
    },
    /// Pause a tenant: its events wait, without ageing, until it is resumed. With
    /// kafka.pause_topic the pause is the group's; without it, it acts on the members
    /// named: give every member's --addr (token in CRM_SYNC_TOKEN).
    Pause {
        #[arg(long = "addr", default_value = "127.0.0.1:50051")]
        addrs: Vec<String>,
        tenant: String,
    },
    /// Resume a paused tenant: the group's with kafka.pause_topic, otherwise on the members
    /// named (token in CRM_SYNC_TOKEN).
    Resume {
        #[arg(long = "addr", default_value = "127.0.0.1:50051")]
        addrs: Vec<String>,
        tenant: String,
    },
    /// The tenants a member serves: health, pace and outcomes (token in CRM_SYNC_TOKEN).
    Tenants {
        #[arg(long, default_value = "127.0.0.1:50051")]
        addr: String,
    },
    /// Produce change events, one JSON envelope per line, to a topic: for trying the
    /// service. Each message is keyed by its record identity (tenant/entity/key), as the
    /// service expects.
    Produce {
        /// Comma-separated host:port list of brokers.
        #[arg(long)]
        bootstrap: String,
        /// Topic to produce to.
        #[arg(long)]
        topic: String,
        /// File with one event per line; standard input when left out.
        file: Option<PathBuf>,
    },
    /// Run a local stand-in for a system crm-sync talks to.
    #[command(subcommand)]
    Sandbox(SandboxCommand),
}

#[derive(Subcommand)]
enum SandboxCommand {
    /// A Salesforce REST sandbox (OAuth token endpoint, upsert/delete by external id,
    /// faults, /__sandbox/records and /__sandbox/stats). Runs until stopped.
    Salesforce {
        /// Port to listen on (0 picks a free one).
        #[arg(long, default_value_t = 8443)]
        port: u16,
        /// Address to bind.
        #[arg(long, default_value = "127.0.0.1")]
        bind: String,
        /// Connected-app client id the token endpoint accepts.
        #[arg(long, default_value = "sandbox-client-id")]
        client_id: String,
        /// Environment variable holding the client secret the token endpoint accepts
        /// (the secret itself is never taken on the command line).
        #[arg(long, default_value = "SANDBOX_SF_CLIENT_SECRET")]
        client_secret_env: String,
    },
    /// A Zendesk Support API sandbox (OAuth client credentials and API token, users and
    /// organizations create_or_update, users create_or_update_many with job statuses, tickets with
    /// Idempotency-Key, rate-limit headers, faults, /__sandbox/*). Runs until stopped.
    Zendesk {
        /// Port to listen on (0 picks a free one).
        #[arg(long, default_value_t = 8444)]
        port: u16,
        /// Address to bind.
        #[arg(long, default_value = "127.0.0.1")]
        bind: String,
        /// OAuth client id the token endpoint accepts.
        #[arg(long, default_value = "sandbox-client-id")]
        client_id: String,
        /// Environment variable holding the secret: the OAuth client secret, and the API
        /// token of agent sync@example.com.
        #[arg(long, default_value = "SANDBOX_ZD_SECRET")]
        client_secret_env: String,
    },
    /// A Dynamics 365 / Dataverse Web API sandbox with its Entra ID token endpoint
    /// (upsert/delete by alternate key, $batch, service-protection limits, faults,
    /// /__sandbox/*). Runs until stopped.
    Dynamics {
        /// Port to listen on (0 picks a free one).
        #[arg(long, default_value_t = 8445)]
        port: u16,
        /// Address to bind.
        #[arg(long, default_value = "127.0.0.1")]
        bind: String,
        /// Application (client) id the token endpoint accepts.
        #[arg(long, default_value = "sandbox-client-id")]
        client_id: String,
        /// Environment variable holding the client secret the token endpoint accepts.
        #[arg(long, default_value = "SANDBOX_D365_CLIENT_SECRET")]
        client_secret_env: String,
    },
    /// librdkafka's in-memory mock Kafka cluster in this process. Prints its bootstrap
    /// address and stays up until stopped (SIGTERM/SIGINT). Data is not persisted.
    Kafka {
        /// Partitions of each topic created at start.
        #[arg(long, default_value_t = 6)]
        partitions: i32,
        /// Topics to create at start.
        #[arg(long = "topic", default_values_t = ["crm-events".to_string(), "crm-sync.dlq".to_string(), "crm-sync.failures".to_string(), "crm-sync.state".to_string(), "crm-sync.retry".to_string()])]
        topics: Vec<String>,
        /// Number of mock brokers.
        #[arg(long, default_value_t = 1)]
        brokers: u32,
    },
}

/// Logs on stdout, filtered by `RUST_LOG` (else `default`): JSON lines when the format
/// says so, or when stdout is not a terminal and it says `auto`; text otherwise, coloured
/// only on a terminal (no ANSI codes in files). With `service.otlp_endpoint`, spans go
/// there too ([`traces`]); the exporter is returned, to be flushed at exit.
fn init_logging(default: &str, service: &ServiceConfig) -> anyhow::Result<Option<traces::Traces>> {
    use std::io::IsTerminal;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let terminal = std::io::stdout().is_terminal();
    let json = match service.log_format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !terminal,
    };
    let logs = tracing_subscriber::fmt::layer().with_target(false);
    let logs = if json {
        logs.json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .boxed()
    } else {
        logs.with_ansi(terminal).boxed()
    };
    let registry = tracing_subscriber::registry().with(logs.with_filter(filter));
    match traces::layer(service)? {
        Some((spans, exporter)) => {
            registry.with(spans).init();
            Ok(Some(exporter))
        }
        None => {
            registry.init();
            Ok(None)
        }
    }
}

/// The service settings (log format, traces) a command's configuration asks for; the
/// defaults when it has none or it cannot be read (the command reports that itself, once
/// logging is set up).
fn service_settings(command: &Command) -> ServiceConfig {
    let path = match command {
        Command::Run { config } | Command::Notify { config } | Command::Redrive { config, .. } => config,
        _ => return ServiceConfig::default(),
    };
    crm_sync::config::read(path)
        .and_then(|text| Config::parse(&text))
        .map_or_else(|_| ServiceConfig::default(), |c| c.service)
}

/// Exit status of `run` when the service died on its own (EX_SOFTWARE): an
/// orchestrator restarts it, and the next owner of its partitions re-reads what it had.
const EXIT_DIED: u8 = 70;
/// How long a stopping notifier may take to commit what it delivered.
const NOTIFIER_STOP: std::time::Duration = std::time::Duration::from_secs(5);

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo prints its own progress; its logs would only interleave with it.
    let traces = init_logging(
        match cli.command {
            Command::Demo { .. } => "warn,librdkafka=error,rdkafka=error",
            // check-config reports what it finds itself; librdkafka's own lines about the
            // clients it builds would only interleave with the report.
            Command::CheckConfig { .. } => "error,librdkafka=off,rdkafka=off",
            _ => "info,librdkafka=warn,rdkafka=warn",
        },
        &service_settings(&cli.command),
    );
    let traces = match traces {
        Ok(traces) => traces,
        Err(e) => {
            eprintln!("error: service.otlp_endpoint: {e:#}");
            return ExitCode::from(2);
        }
    };
    let code = match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    };
    if let Some(traces) = traces {
        traces.shutdown();
    }
    code
}

/// Pauses or resumes `tenant` through each member at `addrs` (one is enough with
/// kafka.pause_topic: the pause is the group's).
fn hold(addrs: &[String], tenant: String, pause: bool) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        for addr in addrs {
            let mut admin = client::admin(addr).await?;
            let answer = if pause {
                admin
                    .pause_tenant(pb::PauseTenantRequest { tenant: tenant.clone() })
                    .await
            } else {
                admin
                    .resume_tenant(pb::ResumeTenantRequest { tenant: tenant.clone() })
                    .await
            };
            let t = answer.map_err(client::explain)?;
            println!("{addr}: {} is {}", t.get_ref().name, t.get_ref().state);
        }
        Ok(ExitCode::SUCCESS)
    })
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run { config } => {
            let config = Config::load(&config)?;
            // The notifier after the service, which creates the topics it reads.
            let service = pipeline::start(config.clone()).context("starting the service")?;
            let notifier = if config.notifier.enabled {
                notifier::start(&config, false).context("starting the notifier")?
            } else {
                None
            };
            tracing::info!(http = %service.http_addr(), "crm-sync running.");
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let signal = runtime.block_on(async {
                tokio::select! {
                    signal = shutdown::signal() => signal.map(Some),
                    () = service.died() => Ok(None),
                }
            })?;
            let Some(signal) = signal else {
                tracing::error!("The service died (its Kafka consumer stopped); exiting so that it is restarted.");
                let _ = service.stop(StopMode::Abort);
                return Ok(ExitCode::from(EXIT_DIED));
            };
            tracing::info!(signal, "Stopping: draining and committing.");
            let report = service.stop(StopMode::Graceful);
            if let Some(notifier) = notifier {
                notifier.stop(NOTIFIER_STOP);
            }
            if !report.closed {
                tracing::warn!("The Kafka client did not close within the deadline; exiting anyway.");
            }
            Ok(if report.committed {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Demo { records, metrics_addr } => {
            let converged = demo::run(&demo::DemoOptions { records, metrics_addr })?;
            Ok(if converged {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Notify { config } => {
            let config = Config::load(&config).map_err(|e| anyhow::anyhow!("{}: {e}", config.display()))?;
            let Some(notifier) = notifier::start(&config, true)? else {
                anyhow::bail!("no webhook endpoint is configured (notifier.endpoints, tenants[].webhooks)");
            };
            if let Some(addr) = notifier.http_addr() {
                tracing::info!(http = %addr, "crm-sync notifier running.");
            }
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let signal = runtime.block_on(shutdown::signal())?;
            tracing::info!(signal, "Stopping the notifier: committing what was delivered.");
            Ok(if notifier.stop(NOTIFIER_STOP) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Status {
            addr,
            tenant,
            entity,
            key,
        } => {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(async {
                let (mut status, _) = client::connect(&addr).await?;
                let found = status
                    .get_record_status(pb::GetRecordStatusRequest { tenant, entity, key })
                    .await
                    .map_err(client::explain)?;
                println!("{}", client::describe(found.get_ref()));
                Ok(ExitCode::SUCCESS)
            })
        }
        Command::Watch { addr, tenant, status } => {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(async {
                let (mut client, _) = client::connect(&addr).await?;
                let mut stream = client
                    .watch_outcomes(pb::WatchOutcomesRequest {
                        tenant,
                        statuses: status,
                        entity: String::new(),
                    })
                    .await
                    .map_err(client::explain)?
                    .into_inner();
                loop {
                    tokio::select! {
                        next = stream.message() => match next.map_err(client::explain)? {
                            Some(pb::WatchOutcomesResponse { kind: Some(pb::watch_outcomes_response::Kind::Outcome(o)) }) => {
                                println!("{}", client::describe(&o))
                            }
                            Some(pb::WatchOutcomesResponse { kind: Some(pb::watch_outcomes_response::Kind::Missed(n)) }) => {
                                println!("(fell behind: {n} outcome(s) not shown)")
                            }
                            Some(_) => {}
                            None => return Ok(ExitCode::SUCCESS),
                        },
                        _ = shutdown::signal() => return Ok(ExitCode::SUCCESS),
                    }
                }
            })
        }
        Command::Pause { addrs, tenant } => hold(&addrs, tenant, true),
        Command::Resume { addrs, tenant } => hold(&addrs, tenant, false),
        Command::Tenants { addr } => {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(async {
                let (_, mut tenants) = client::connect(&addr).await?;
                let listed = tenants
                    .list_tenants(pb::ListTenantsRequest {})
                    .await
                    .map_err(client::explain)?;
                for t in &listed.get_ref().tenants {
                    let outcomes: Vec<String> = t.outcomes.iter().map(|(k, v)| format!("{k} {v}")).collect();
                    println!(
                        "{:<12} {:<10} {:<11} {:.1} calls/s, {} in flight; {}",
                        t.name,
                        t.crm,
                        t.state,
                        t.pace_per_sec,
                        t.max_concurrency,
                        outcomes.join(", ")
                    );
                }
                Ok(ExitCode::SUCCESS)
            })
        }
        Command::Produce { bootstrap, topic, file } => {
            let text = match &file {
                Some(path) => std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
                None => std::io::read_to_string(std::io::stdin()).context("reading standard input")?,
            };
            let messages: Vec<(String, Vec<u8>)> = text
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(|line| (record_key_of(line), line.as_bytes().to_vec()))
                .collect();
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(tools::produce(&bootstrap, &topic, &messages))?;
            println!("produced {} message(s) to {topic}", messages.len());
            Ok(ExitCode::SUCCESS)
        }
        Command::Redrive {
            config,
            dry_run,
            tenant,
            entity,
            error_code,
            stage,
            since,
            until,
        } => {
            let config = Config::load(&config).map_err(|e| anyhow::anyhow!("{}: {e}", config.display()))?;
            let time = |flag: &str, v: Option<String>| -> anyhow::Result<_> {
                v.map(|t| {
                    chrono::DateTime::parse_from_rfc3339(&t)
                        .map(|t| t.with_timezone(&chrono::Utc))
                        .map_err(|e| anyhow::anyhow!("--{flag} {t:?}: not an RFC 3339 time ({e})"))
                })
                .transpose()
            };
            let filter = crm_sync::redrive::Filter {
                tenant,
                entity,
                error_code,
                stage,
                since: time("since", since)?,
                until: time("until", until)?,
            };
            let r = crm_sync::redrive::redrive(&config, &filter, dry_run)?;
            let verb = if dry_run { "would redrive" } else { "redrove" };
            println!(
                "read {} dead-lettered record(s); {} selected; {verb} {}; skipped {} already delivered, {} superseded by a newer version, {} duplicates in this run, {} that are not events, {} from a topic that is not an input topic",
                r.read, r.selected, r.redriven, r.already_delivered, r.superseded, r.duplicate, r.not_an_event, r.unknown_source
            );
            for (reason, n) in &r.by_reason {
                println!("  {reason:<24} {n}");
            }
            match r.error {
                None => Ok(ExitCode::SUCCESS),
                Some(e) => {
                    eprintln!("error: stopped early: {e}");
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        Command::CheckConfig { file, no_secrets } => {
            let report = crm_sync::check::check(&file, no_secrets);
            // A key or value in the file may hold control characters: shown escaped, so
            // that the report cannot drive the terminal.
            let shown = |line: &str| -> String {
                line.chars()
                    .flat_map(|c| {
                        let escaped: Vec<char> = if c.is_control() {
                            c.escape_unicode().collect()
                        } else {
                            vec![c]
                        };
                        escaped
                    })
                    .collect()
            };
            for warning in &report.warnings {
                eprintln!("{}: warning: {}", file.display(), shown(warning));
            }
            for problem in &report.problems {
                eprintln!("{}: {}", file.display(), shown(problem));
            }
            match (&report.summary, report.problems.len()) {
                (Some(summary), 0) => {
                    let secrets = if no_secrets { ", secrets not resolved" } else { "" };
                    println!("{}: OK ({summary}{secrets})", file.display());
                    Ok(ExitCode::SUCCESS)
                }
                (_, n) => {
                    eprintln!("{}: {n} problem(s)", file.display());
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        Command::Sandbox(SandboxCommand::Salesforce {
            port,
            bind,
            client_id,
            client_secret_env,
        }) => {
            let secret = sandbox_secret(&client_secret_env)?;
            let sandbox =
                SalesforceSandbox::start(&format!("{bind}:{port}"), SandboxOrg::standard(&client_id, &secret))?;
            serve_sandbox(&sandbox, &client_secret_env)
        }
        Command::Sandbox(SandboxCommand::Zendesk {
            port,
            bind,
            client_id,
            client_secret_env,
        }) => {
            let secret = sandbox_secret(&client_secret_env)?;
            let sandbox =
                ZendeskSandbox::start(&format!("{bind}:{port}"), ZendeskSetup::standard(&client_id, &secret))?;
            serve_sandbox(&sandbox, &client_secret_env)
        }
        Command::Sandbox(SandboxCommand::Dynamics {
            port,
            bind,
            client_id,
            client_secret_env,
        }) => {
            let secret = sandbox_secret(&client_secret_env)?;
            let sandbox =
                DynamicsSandbox::start(&format!("{bind}:{port}"), DynamicsSetup::standard(&client_id, &secret))?;
            serve_sandbox(&sandbox, &client_secret_env)
        }
        Command::Sandbox(SandboxCommand::Kafka {
            partitions,
            topics,
            brokers,
        }) => {
            if partitions < 1 {
                anyhow::bail!("--partitions must be at least 1");
            }
            let kafka = KafkaSandbox::start(brokers)?;
            for topic in &topics {
                kafka.create_topic(topic, partitions)?;
            }
            println!("{}", kafka.bootstrap_servers());
            wait_for_signal()?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The Kafka key for an event line: its record identity, or "unkeyed" when the line is
/// not an envelope (the service will dead-letter it with the reason).
fn record_key_of(line: &str) -> String {
    let parsed: Option<serde_json::Value> = serde_json::from_str(line).ok();
    let field = |name: &str| parsed.as_ref().and_then(|v| v[name].as_str().map(str::to_string));
    match (field("tenant"), field("entity"), field("key")) {
        (Some(t), Some(e), Some(k)) => kafka_key(&t, &e, &k),
        _ => "unkeyed".to_string(),
    }
}

fn wait_for_signal() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(shutdown::signal())?;
    Ok(())
}

fn sandbox_secret(var: &str) -> anyhow::Result<String> {
    std::env::var(var).with_context(|| format!("environment variable {var} (the sandbox's secret) is not set"))
}

/// Prints where a CRM sandbox listens and the tenant config that points at it, then
/// serves until SIGTERM/SIGINT.
fn serve_sandbox(sandbox: &dyn CrmSandbox, secret_var: &str) -> anyhow::Result<ExitCode> {
    println!("{} sandbox listening on {}", sandbox.crm(), sandbox.base_url());
    println!("# A tenant on it (the secret is read from ${secret_var}):");
    println!(
        "[[tenants]]\nname = \"{}-sandbox\"\n{}",
        sandbox.crm(),
        sandbox.tenant_toml(secret_var)
    );
    wait_for_signal()?;
    Ok(ExitCode::SUCCESS)
}
