//! The running service: wires the stages together and bounds how it stops.
//!
//! [`start`] runs the actor system on its own thread (one arbiter for all actors, so
//! that their messages never wake another thread), the Kafka consumer on another, CRM
//! HTTP calls on the connectors' I/O runtime, and returns a [`ServiceHandle`]. The same entry point serves `crm-sync run`, the demo, the tests and
//! the load tests.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use actix::prelude::*;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::FutureProducer;

use crate::config::{Config, KafkaConfig, TenantConfig};
use crate::consume::{self, ConsumerCommand, ConsumerSetup, PartitionDeps, PartitionDirectory, StopMode, StopSignal};
use crate::dead_letter::DeadLetters;
use crate::diff::store::StateStore;
use crate::diff::DiffActor;
use crate::event::Routes;
use crate::retry::topic::RetryRoute;
use crate::retry::{RetryPolicy, RetryQueueActor, TenantDirectory, TenantLink};
use crate::supervise::InjectPanic;
use crate::telemetry::{self, Health};
use crate::tenant::board::Board;
use crate::tenant::pauses::Pauses;
use crate::tenant::{TenantActor, TenantDeps};
use crate::trail::Trail;

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot serve metrics on {addr}: {source}")]
    Http { addr: String, source: std::io::Error },
    #[error("cannot create Kafka client: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("cannot build HTTP client for tenant {tenant}: {source}")]
    HttpClient { tenant: String, source: reqwest::Error },
    #[error("{0}")]
    Topic(String),
    #[error("cannot start a thread: {0}")]
    Thread(std::io::Error),
    #[error("the service thread ended before it started")]
    Vanished,
    #[error("cannot start the gRPC server: {0}")]
    Grpc(String),
}

/// Tenants and the entities each maps, for the decoder.
pub(crate) struct RouteTable(HashMap<String, HashSet<String>>);

impl RouteTable {
    /// The configured tenants and their entities.
    pub(crate) fn of(config: &Config) -> RouteTable {
        RouteTable(
            config
                .tenants
                .iter()
                .map(|t| (t.name.clone(), t.entities.keys().cloned().collect()))
                .collect(),
        )
    }
}

impl Routes for RouteTable {
    fn has_tenant(&self, tenant: &str) -> bool {
        self.0.contains_key(tenant)
    }
    fn has_entity(&self, tenant: &str, entity: &str) -> bool {
        self.0.get(tenant).is_some_and(|e| e.contains(entity))
    }
}

/// Which actor a fault is injected into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ActorKind {
    /// One of the live partition actors.
    Partition,
    Tenant(String),
    Diff,
    RetryQueue,
    /// The Kafka consumer thread, which no supervisor restarts: the service dies.
    Consumer,
}

/// How a stop went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StopReport {
    /// Partitions were drained (or their deadline passed) and their offsets committed.
    pub committed: bool,
    /// The consumer closed and the actor system ended within the deadline.
    pub closed: bool,
}

/// Handles on the running service, for the `ServiceHandle`'s owner.
struct Control {
    /// Live partitions, read for `assigned_partitions`.
    partitions: PartitionDirectory,
    /// Actor addresses, used only for fault injection.
    diff: Addr<DiffActor>,
    retry: Addr<RetryQueueActor>,
    tenants: HashMap<String, Addr<TenantActor>>,
    /// Requests to the consumer thread; it exits (and drops the receiver) on stop.
    commands: mpsc::Sender<ConsumerCommand>,
    http_addr: SocketAddr,
}

/// A running service.
pub struct ServiceHandle {
    control: Control,
    /// The gRPC server, when `[grpc]` is configured.
    grpc: Option<crate::grpc::GrpcHandle>,
    stop: StopSignal,
    /// Set by the consumer thread once its final commit is done.
    committed: Arc<AtomicBool>,
    /// Receives once the service thread has ended; never received if librdkafka's close
    /// hangs, which is why `stop` waits on it with a deadline.
    finished: mpsc::Receiver<()>,
    stop_deadline: Duration,
    /// Notified when the service died on its own (see [`ServiceHandle::died`]).
    died: Arc<tokio::sync::Notify>,
    health: Health,
}

impl ServiceHandle {
    /// Address of the gRPC server, when `[grpc]` is configured.
    pub fn grpc_addr(&self) -> Option<SocketAddr> {
        self.grpc.as_ref().map(|g| g.addr())
    }

    /// Address of the `/metrics` and health server.
    pub fn http_addr(&self) -> SocketAddr {
        self.control.http_addr
    }

    /// Resolves if the service dies on its own: its consumer thread ended without being
    /// asked to (a panic, or a fatal Kafka error). Readiness and liveness fail first; the
    /// owner should then exit non-zero so that an orchestrator restarts the process.
    pub async fn died(&self) {
        if self.health.is_dead() {
            return;
        }
        self.died.notified().await
    }

    /// Whether the service has died (see [`died`](Self::died)).
    pub fn is_dead(&self) -> bool {
        self.health.is_dead()
    }

    /// Partitions this instance currently owns.
    pub fn assigned_partitions(&self) -> usize {
        self.control.partitions.len()
    }

    /// Makes one actor panic inside its next handler (fault injection).
    pub fn inject_panic(&self, target: ActorKind) {
        match target {
            ActorKind::Partition => {
                // Queued ahead of whatever the partition is handed next (bounded wait).
                let (queued, ack) = mpsc::channel();
                if self.control.commands.send(ConsumerCommand::InjectPanic(queued)).is_ok() {
                    let _ = ack.recv_timeout(Duration::from_secs(5));
                }
            }
            ActorKind::Tenant(name) => {
                if let Some(t) = self.control.tenants.get(&name) {
                    t.do_send(InjectPanic);
                }
            }
            ActorKind::Consumer => {
                let _ = self.control.commands.send(ConsumerCommand::InjectConsumerPanic);
            }
            ActorKind::Diff => self.control.diff.do_send(InjectPanic),
            ActorKind::RetryQueue => self.control.retry.do_send(InjectPanic),
        }
    }

    /// Stops the service: `Graceful` drains, commits and leaves the group; `Abort` stops
    /// at once and commits nothing. Returns within the shutdown deadline plus a margin,
    /// even if librdkafka's close hangs.
    pub fn stop(self, mode: StopMode) -> StopReport {
        // The gRPC server stops beside the service, within the same deadline.
        let grpc = self.grpc.map(|g| g.stop_in_background());
        self.stop.request(mode);
        let closed = self
            .finished
            .recv_timeout(self.stop_deadline + Duration::from_secs(3))
            .is_ok();
        if let Some(grpc) = grpc {
            let _ = grpc.join_within(Duration::from_secs(3));
        }
        StopReport {
            committed: self.committed.load(Ordering::SeqCst),
            closed,
        }
    }
}

/// Creates missing topics through the Admin API (the state topic compacted). A broker
/// that refuses (or, like the mock cluster, does not implement it) is logged, not fatal:
/// the topics may be managed elsewhere.
async fn ensure_topics(kafka: &KafkaConfig) -> Result<(), rdkafka::error::KafkaError> {
    let topics: Vec<&str> = kafka
        .input_topics
        .iter()
        .chain([&kafka.dlq_topic, &kafka.failures_topic, &kafka.state_topic])
        .chain(kafka.retry_topic.as_ref())
        .chain(kafka.status_topic.as_ref())
        .chain(kafka.audit_topic.as_ref())
        .chain(kafka.pause_topic.as_ref())
        .map(String::as_str)
        .collect();
    create_topics(kafka, &topics).await
}

/// Creates those of `topics` that do not exist, with `kafka.topic_partitions` and
/// `kafka.topic_replication` (the retry topic with a partition per input partition, the
/// state topic compacted).
pub(crate) async fn create_topics(kafka: &KafkaConfig, topics: &[&str]) -> Result<(), rdkafka::error::KafkaError> {
    let admin: AdminClient<DefaultClientContext> = consume::client_config(kafka).create()?;
    let metadata = admin.inner().fetch_metadata(None, Duration::from_secs(10))?;
    let existing: HashSet<&str> = metadata.topics().iter().map(|t| t.name()).collect();
    let wanted: Vec<&str> = topics.iter().copied().filter(|t| !existing.contains(t)).collect();
    if wanted.is_empty() {
        return Ok(());
    }
    let new: Vec<NewTopic<'_>> = wanted
        .iter()
        .map(|t| {
            // The retry topic has a partition for every input partition (co-partitioned);
            // the pause topic, a few records, has one.
            let partitions = if kafka.retry_topic.as_deref() == Some(*t) {
                kafka.topic_partitions * kafka.input_topics.len() as i32
            } else if kafka.pause_topic.as_deref() == Some(*t) {
                1
            } else {
                kafka.topic_partitions
            };
            let topic = NewTopic::new(t, partitions, TopicReplication::Fixed(kafka.topic_replication));
            let compacted = [
                Some(&kafka.state_topic),
                kafka.status_topic.as_ref(),
                kafka.pause_topic.as_ref(),
            ];
            if compacted.contains(&Some(&t.to_string())) {
                topic.set("cleanup.policy", "compact")
            } else {
                topic
            }
        })
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for result in admin.create_topics(&new, &opts).await? {
        match result {
            Ok(topic) => tracing::info!(topic, "Created topic."),
            Err((topic, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {
                tracing::debug!(topic, "Topic already exists.")
            }
            Err((topic, code)) => tracing::warn!(topic, error = %code, "Could not create topic."),
        }
    }
    Ok(())
}

/// What the start learns of the topics: the retry topic's route, and how many
/// partitions the DLQ topic has.
struct Topics {
    retry: Option<RetryRoute>,
    dlq_partitions: i32,
}

/// The topics crm-sync writes to must exist (a write to a missing one would be retried
/// forever, holding its partition), the state topic needs a partition for every input
/// partition number, since each record's state goes to its source partition's, and the
/// retry topic one for every input partition (see [`RetryRoute`]), which is returned.
fn check_topics(kafka: &KafkaConfig, max_wait: Duration) -> Result<Topics, StartError> {
    let admin: AdminClient<DefaultClientContext> = consume::client_config(kafka).create()?;
    let metadata = admin.inner().fetch_metadata(None, Duration::from_secs(10))?;
    let partitions = |name: &str| {
        metadata
            .topics()
            .iter()
            .find(|t| t.name() == name && t.error().is_none())
            .map(|t| t.partitions().len())
    };
    let optional = [
        ("kafka.retry_topic", &kafka.retry_topic),
        ("kafka.status_topic", &kafka.status_topic),
        ("kafka.audit_topic", &kafka.audit_topic),
        ("kafka.pause_topic", &kafka.pause_topic),
    ]
    .into_iter()
    .filter_map(|(key, topic)| topic.as_ref().map(|t| (key, t)));
    for (key, topic) in [
        ("kafka.dlq_topic", &kafka.dlq_topic),
        ("kafka.failures_topic", &kafka.failures_topic),
    ]
    .into_iter()
    .chain(optional)
    {
        if partitions(topic).is_none() {
            return Err(StartError::Topic(format!(
                "`{key}` ({topic}) does not exist; create it or set kafka.create_topics"
            )));
        }
    }
    for topic in &kafka.input_topics {
        if partitions(topic).is_none() {
            tracing::warn!(topic = %topic, "Input topic does not exist (yet); waiting for it.");
        }
    }
    let needed = kafka
        .input_topics
        .iter()
        .filter_map(|t| partitions(t))
        .max()
        .unwrap_or(0);
    let route = match &kafka.retry_topic {
        Some(topic) => Some(
            RetryRoute::new(
                topic,
                &kafka.input_topics,
                partitions(topic).unwrap_or(0) as i32,
                needed as i32,
                max_wait,
            )
            .map_err(StartError::Topic)?,
        ),
        None => None,
    };
    let dlq_partitions = partitions(&kafka.dlq_topic).map_or(1, |n| i32::try_from(n).unwrap_or(i32::MAX));
    match partitions(&kafka.state_topic) {
        Some(have) if have >= needed => Ok(Topics {
            retry: route,
            dlq_partitions,
        }),
        Some(have) => Err(StartError::Topic(format!(
            "`kafka.state_topic` ({}) has {have} partitions; it needs at least {needed}, as many as the largest input topic",
            kafka.state_topic
        ))),
        None => Err(StartError::Topic(format!(
            "`kafka.state_topic` ({}) does not exist; create it (compacted) or set kafka.create_topics",
            kafka.state_topic
        ))),
    }
}

/// Starts the service described by `config` (which must have passed `validate`).
pub fn start(config: Config) -> Result<ServiceHandle, StartError> {
    telemetry::prometheus();
    telemetry::register_counters(&config);
    let (started_tx, started_rx) = mpsc::channel::<Result<Control, StartError>>();
    let (finished_tx, finished_rx) = mpsc::channel();
    let stop = StopSignal::default();
    let committed = Arc::new(AtomicBool::new(false));
    let stop_deadline = Duration::from_millis(config.service.shutdown_deadline_ms);
    let thread_stop = stop.clone();
    let thread_committed = committed.clone();
    let health = Health::default();
    let died = Arc::new(tokio::sync::Notify::new());
    let (thread_health, thread_died) = (health.clone(), died.clone());
    let board = Board::default();
    let pauses = Pauses::new(&config.kafka, board.clone())?;
    // Before the service: a gRPC address that cannot be had stops the start, not a
    // service already consuming.
    let grpc =
        crate::grpc::start(&config, board.clone(), pauses.clone()).map_err(|e| StartError::Grpc(e.to_string()))?;
    let thread_pauses = pauses.clone();
    std::thread::Builder::new()
        .name("crm-sync-actors".into())
        .spawn(move || {
            let system = System::new();
            let end = run_service(
                config,
                thread_pauses,
                thread_health,
                thread_stop,
                thread_committed,
                started_tx,
            );
            if system.block_on(end) == End::Died {
                thread_died.notify_one();
            }
            drop(system);
            let _ = finished_tx.send(());
        })
        .map_err(StartError::Thread)?;
    let control = match started_rx.recv().map_err(|_| StartError::Vanished) {
        Ok(Ok(control)) => control,
        Ok(Err(e)) | Err(e) => {
            if let Some(grpc) = grpc {
                grpc.stop();
            }
            return Err(e);
        }
    };
    Ok(ServiceHandle {
        grpc,
        control,
        stop,
        committed,
        finished: finished_rx,
        stop_deadline,
        died,
        health,
    })
}

/// How the service thread ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// Asked to stop, or never started.
    Stopped,
    /// Its consumer thread ended on its own.
    Died,
}

async fn run_service(
    config: Config,
    pauses: Pauses,
    health: Health,
    stop: StopSignal,
    committed: Arc<AtomicBool>,
    started: mpsc::Sender<Result<Control, StartError>>,
) -> End {
    let (http_addr, http_task) = match telemetry::serve(&config.service.http_addr, health.clone()).await {
        Ok(v) => v,
        Err(source) => {
            let _ = started.send(Err(StartError::Http {
                addr: config.service.http_addr.clone(),
                source,
            }));
            return End::Stopped;
        }
    };
    if config.kafka.create_topics {
        if let Err(e) = ensure_topics(&config.kafka).await {
            tracing::warn!(error = %e, "Could not check or create topics.");
        }
    }
    let topics = match check_topics(&config.kafka, Duration::from_millis(config.retry.max_age_ms)) {
        Ok(topics) => topics,
        Err(e) => {
            let _ = started.send(Err(e));
            http_task.abort();
            return End::Stopped;
        }
    };
    let mut end = End::Stopped;
    match wire(
        &config,
        topics,
        pauses,
        health.clone(),
        stop.clone(),
        committed,
        http_addr,
    ) {
        Ok((control, consumer_thread, arbiters)) => {
            let _ = started.send(Ok(control));
            let joined = tokio::task::spawn_blocking(move || consumer_thread.join()).await;
            if stop.mode().is_none() {
                // Nobody asked it to stop: nothing consumes any more. Fail the health
                // checks first, then let the owner exit so that the process is restarted.
                health.set_dead();
                end = End::Died;
            }
            match joined {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => tracing::error!(error = %e, "Kafka consumer failed; the service is dead."),
                _ => tracing::error!("Kafka consumer thread panicked; the service is dead."),
            }
            for arbiter in arbiters {
                arbiter.stop();
            }
        }
        Err(e) => {
            // What the start did spawn (the pause topic's reader) ends with it.
            stop.request(StopMode::Abort);
            let _ = started.send(Err(e));
        }
    }
    http_task.abort();
    end
}

type Wired = (
    Control,
    std::thread::JoinHandle<Result<(), rdkafka::error::KafkaError>>,
    Vec<Arbiter>,
);

fn wire(
    config: &Config,
    topics: Topics,
    pauses: Pauses,
    health: Health,
    stop: StopSignal,
    committed: Arc<AtomicBool>,
    http_addr: SocketAddr,
) -> Result<Wired, StartError> {
    let board = pauses.board().clone();
    let producer: FutureProducer = consume::producer_config(&config.kafka).create()?;
    let state = StateStore::new(producer.clone(), &config.kafka.state_topic);
    let trail = Trail::new(
        producer.clone(),
        config.kafka.status_topic.as_deref(),
        config.kafka.audit_topic.as_deref(),
    );
    let retry_route = topics.retry;
    let dead_letters = DeadLetters::new(
        producer,
        (&config.kafka.dlq_topic, topics.dlq_partitions),
        &config.kafka.failures_topic,
        retry_route.clone(),
        &config.kafka.state_topic,
    );
    if retry_route.is_none() {
        tracing::warn!("No kafka.retry_topic: retries wait in memory, and a tenant whose CRM is down holds up the others on its partitions.");
    }

    // One arbiter for every actor: their messages to each other then cost a queue push,
    // not a thread wake-up. CRM HTTP traffic runs on the connectors' own I/O runtime.
    let actors = Arbiter::new();

    let (enabled, capacity) = (config.diff.enabled, config.diff.capacity);
    let diff = Supervisor::start_in_arbiter(&actors.handle(), move |_| DiffActor::new(enabled, capacity));
    let tenant_directory = TenantDirectory::default();
    let directory_for_retry = tenant_directory.clone();
    let retry = Supervisor::start_in_arbiter(&actors.handle(), move |_| RetryQueueActor::new(directory_for_retry));
    let partitions = PartitionDirectory::default();
    let share = Arc::new(crate::messages::MemberShare::default());

    let mut tenants = HashMap::new();
    let mut holds = HashMap::new();
    for tenant in &config.tenants {
        // Recorded on the state topic, read back by the next owner of a held record.
        let log: Arc<dyn crate::connectors::holds::HoldLog> = Arc::new(state.clone());
        let tenant_holds = Arc::new(crate::connectors::holds::Holds::new(&tenant.name, Some(log)));
        holds.insert(Arc::<str>::from(tenant.name.as_str()), tenant_holds.clone());
        let connector =
            crate::connectors::build(config, tenant, tenant_holds).map_err(|source| StartError::HttpClient {
                tenant: tenant.name.clone(),
                source,
            })?;
        let deps = TenantDeps {
            diff: diff.clone(),
            retry: retry.clone(),
            dead_letters: dead_letters.clone(),
            state: state.clone(),
            partitions: partitions.clone(),
            policy: RetryPolicy::from(&config.retry),
            breaker: config.breaker.clone(),
            trail: trail.clone(),
            board: board.clone(),
            share: share.clone(),
        };
        let tenant_config = Arc::new(tenant.clone());
        let addr = Supervisor::start_in_arbiter(&actors.handle(), move |_| {
            TenantActor::new(tenant_config, connector, deps)
        });
        board.register(&tenant.name, addr.clone().recipient());
        let name: Arc<str> = tenant.name.as_str().into();
        tenant_directory.insert(
            name.clone(),
            TenantLink {
                due: addr.clone().recipient(),
                rearm: addr.clone().recipient(),
            },
        );
        tenants.insert(name, addr);
    }

    let (commands_tx, commands_rx) = mpsc::channel();
    let deps = Arc::new(PartitionDeps {
        routes: Arc::new(RouteTable::of(config)),
        tenants: tenants
            .iter()
            .map(|(k, v)| (k.clone(), v.clone().recipient()))
            .collect(),
        diff: diff.clone(),
        dead_letters,
        trail,
        retry: retry_route.clone(),
        max_message_bytes: config.kafka.max_message_bytes,
        max_in_flight: config.kafka.max_in_flight_per_partition,
        // An equal share of the window each; a lone tenant has nobody to make room for.
        tenant_share: match config.tenants.len() {
            0 | 1 => config.kafka.max_in_flight_per_partition,
            n => (config.kafka.max_in_flight_per_partition / n).max(1),
        },
        commands: commands_tx.clone(),
        holds,
    });
    // Before any event: the tenants paused on the group's pause topic are paused here.
    pauses
        .follow(&config.kafka, stop.clone())
        .map_err(|e| StartError::Topic(format!("`kafka.pause_topic`: {e}")))?;
    let deadline = Duration::from_millis(config.service.shutdown_deadline_ms);
    let setup = ConsumerSetup {
        kafka: config.kafka.clone(),
        share,
        retry: retry_route,
        directory: partitions.clone(),
        deps,
        arbiter: actors.handle(),
        health,
        commands: commands_rx,
        stop,
        // Leave time for the commit and the close after the drain.
        shutdown_drain: deadline
            .saturating_sub(Duration::from_secs(2))
            .max(Duration::from_millis(500)),
        write_timeout: config
            .tenants
            .iter()
            .map(TenantConfig::longest_write)
            .max()
            .unwrap_or_default(),
    };
    let consumer_thread = std::thread::Builder::new()
        .name("crm-sync-consumer".into())
        .spawn(move || consume::run(setup, &committed))
        .map_err(StartError::Thread)?;
    let control = Control {
        partitions,
        diff,
        retry,
        tenants: tenants.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
        commands: commands_tx,
        http_addr,
    };
    Ok((control, consumer_thread, vec![actors]))
}
