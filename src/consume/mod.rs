//! Consume stage: the Kafka consumer thread and the partition actors it feeds.
//!
//! The consumer runs on its own OS thread (a librdkafka `BaseConsumer` polled in a loop),
//! so that rebalance callbacks may block while partitions drain without stalling any
//! actor. The thread:
//! - on assign, reads the new partitions' confirmed states back from the state topic
//!   into the diff cache, then starts a supervised [`PartitionActor`] per partition;
//! - takes what librdkafka has fetched (up to [`INTAKE_BATCH`] messages a round) and
//!   hands each partition actor its share in one message (`send`, so a busy partition
//!   slows intake), and pauses/resumes partitions whose in-flight window is full;
//! - stores each partition's watermark (`enable.auto.offset.store=false`) and commits
//!   every `commit_interval_ms`;
//! - on revoke, drains the revoked partitions (bounded by `drain_timeout_ms`, which is
//!   below the session timeout), commits them synchronously, then retires them: tenants
//!   drop whatever of theirs is still waiting, since the next owner re-reads it;
//! - on shutdown, stops fetching, drains everything within the deadline, commits and
//!   leaves the group.
//!
//! Cooperative-sticky assignment keeps partitions where they are when members come and go.

pub mod offsets;
mod partition;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use actix::dev::SendError;
use actix::prelude::*;
use dashmap::DashMap;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, Offset, TopicPartitionList};

pub use partition::{
    Drain, OutcomeKind, Outcomes, PartitionActor, PartitionDeps, PartitionLink, PartitionShared, Records, Redispatch,
    Resync, Retire,
};

use crate::config::KafkaConfig;
use crate::diff::store;
use crate::diff::Restore;
use crate::notify::SourceMessage;
use crate::supervise::InjectPanic;
use crate::telemetry::{metric, Health};

/// A partition: (topic, partition number).
pub type PartitionKey = (Arc<str>, i32);

/// A live partition as the rest of the service sees it.
pub struct PartitionEntry {
    pub addr: Addr<PartitionActor>,
    pub shared: Arc<PartitionShared>,
    pub redispatch: Recipient<Redispatch>,
}

/// Live partitions by (topic, partition); shared by the consumer thread (which adds and
/// removes them) and the tenants (which ask them for re-dispatch).
pub type PartitionDirectory = Arc<DashMap<PartitionKey, PartitionEntry>>;

/// Requests from partition actors to the consumer thread.
#[derive(Debug)]
pub enum ConsumerCommand {
    /// Re-read the partition from `offset` (a restarted actor recovering what it held),
    /// then tell the actor with a `Resync` for `generation`.
    Seek {
        topic: Arc<str>,
        partition: i32,
        offset: i64,
        generation: u64,
    },
    /// Fault injection: make one live partition actor panic.
    InjectPanic,
}

/// How the consumer thread ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    /// Drain, commit, leave the group.
    Graceful,
    /// Stop at once, commit nothing (tests use it to simulate a crash).
    Abort,
}

/// Signals shared with whoever stops the service.
#[derive(Clone, Default)]
pub struct StopSignal {
    requested: Arc<AtomicBool>,
    abort: Arc<AtomicBool>,
}

impl StopSignal {
    pub fn request(&self, mode: StopMode) {
        if mode == StopMode::Abort {
            self.abort.store(true, Ordering::SeqCst);
        }
        self.requested.store(true, Ordering::SeqCst);
    }
    fn mode(&self) -> Option<StopMode> {
        if self.abort.load(Ordering::SeqCst) {
            Some(StopMode::Abort)
        } else if self.requested.load(Ordering::SeqCst) {
            Some(StopMode::Graceful)
        } else {
            None
        }
    }
}

/// The consumer's callbacks: rebalances, commits, statistics.
pub struct LoopContext {
    directory: PartitionDirectory,
    deps: Arc<PartitionDeps>,
    /// Arbiter the partition actors run on.
    arbiter: ArbiterHandle,
    drain_timeout: Duration,
    health: Health,
    /// Where confirmed states are read back from when input partitions are assigned.
    state_topic: String,
    input_topics: Vec<String>,
    /// Connection settings for the state-restore reader.
    client: ClientConfig,
    /// Partitions currently paused because their window is full, each with the first
    /// offset that arrived after the pause (librdkafka still hands out what it had
    /// prefetched). Such messages are not delivered; the partition is seeked back to that
    /// offset before it resumes, so the window really bounds memory and nothing is skipped.
    paused: Mutex<HashMap<PartitionKey, Option<i64>>>,
}

impl ClientContext for LoopContext {
    fn stats(&self, statistics: Statistics) {
        for (topic, t) in &statistics.topics {
            for (partition, p) in &t.partitions {
                if *partition < 0 || p.consumer_lag < 0 {
                    continue;
                }
                metrics::gauge!(metric::CONSUMER_LAG, "topic" => topic.clone(), "partition" => partition.to_string())
                    .set(p.consumer_lag as f64);
            }
        }
    }
}

impl ConsumerContext for LoopContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => {
                let revoked = keys_of(tpl);
                tracing::info!(partitions = revoked.len(), "Partitions revoked; draining them.");
                self.drain_commit_retire(consumer, &revoked, self.drain_timeout);
            }
            Rebalance::Assign(_) => {}
            Rebalance::Error(e) => tracing::warn!(error = %e, "Rebalance error."),
        }
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let assigned = keys_of(tpl);
            tracing::info!(partitions = assigned.len(), "Partitions assigned.");
            self.restore_state(&assigned);
            for (topic, partition) in assigned {
                self.start_partition(topic, partition);
            }
            self.health.set_ready(true);
        }
    }

    fn commit_callback(&self, result: rdkafka::error::KafkaResult<()>, _: &TopicPartitionList) {
        if let Err(e) = result {
            if !is_no_offset(&e) {
                metrics::counter!(metric::COMMIT_FAILURES).increment(1);
                tracing::warn!(error = %e, "Offset commit refused; the events after the last commit will be re-delivered.");
            }
        }
    }
}

fn is_no_offset(e: &KafkaError) -> bool {
    matches!(e, KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset))
}

fn keys_of(tpl: &TopicPartitionList) -> Vec<PartitionKey> {
    tpl.elements()
        .iter()
        .map(|e| (Arc::<str>::from(e.topic()), e.partition()))
        .collect()
}

impl LoopContext {
    /// Reads back the confirmed states of the newly assigned partitions (before any of
    /// their messages is handled: this runs on the consumer thread, inside the rebalance).
    fn restore_state(&self, assigned: &[PartitionKey]) {
        // Retry-topic partitions carry no states of their own: a parked event's state
        // goes to its input partition's.
        let partitions: std::collections::BTreeSet<i32> = assigned
            .iter()
            .filter(|(topic, _)| self.input_topics.iter().any(|t| **t == **topic))
            .map(|(_, p)| *p)
            .collect();
        let partitions: Vec<i32> = partitions.into_iter().collect();
        if partitions.is_empty() {
            return;
        }
        match store::restore(&self.client, &self.state_topic, &partitions, Duration::from_secs(60)) {
            Ok(states) => {
                tracing::debug!(
                    partitions = partitions.len(),
                    records = states.len(),
                    "Restored confirmed states."
                );
                self.deps.diff.do_send(Restore(states));
            }
            Err(e) => tracing::error!(
                topic = %self.state_topic,
                error = %e,
                "Could not read confirmed states back; stale versions of these partitions' records may be written."
            ),
        }
    }

    fn start_partition(&self, topic: Arc<str>, partition: i32) {
        let key = (topic.clone(), partition);
        if self.directory.contains_key(&key) {
            return;
        }
        let shared = Arc::new(PartitionShared::default());
        shared.watermark.store(-1, Ordering::Relaxed);
        let deps = self.deps.clone();
        let actor_shared = shared.clone();
        let addr = Supervisor::start_in_arbiter(&self.arbiter, move |_| {
            PartitionActor::new(topic, partition, deps, actor_shared)
        });
        let redispatch = addr.clone().recipient();
        self.directory.insert(
            key,
            PartitionEntry {
                addr,
                shared,
                redispatch,
            },
        );
    }

    /// Waits (up to `timeout` in all) for the partitions to finish their in-flight events,
    /// commits their watermarks synchronously, and retires their actors.
    fn drain_commit_retire(&self, consumer: &BaseConsumer<Self>, keys: &[PartitionKey], timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut waiting = Vec::new();
        for key in keys {
            if let Some(entry) = self.directory.get(key) {
                let (tx, rx) = mpsc::channel();
                // do_send: the mailbox may be full of records; the drain request must not wait.
                entry.addr.do_send(Drain { done: tx });
                waiting.push((key.clone(), rx));
            }
        }
        for ((topic, partition), rx) in &waiting {
            let left = deadline.saturating_duration_since(Instant::now());
            if rx.recv_timeout(left).is_err() {
                tracing::warn!(topic = %topic, partition, "Drain deadline passed; undecided events will be re-delivered to the next owner.");
            }
        }
        let mut tpl = TopicPartitionList::new();
        for key in keys {
            if let Some(entry) = self.directory.get(key) {
                let wm = entry.shared.watermark.load(Ordering::Acquire);
                if wm >= 0 {
                    let _ = tpl.add_partition_offset(&key.0, key.1, Offset::Offset(wm));
                }
            }
        }
        if tpl.count() > 0 {
            if let Err(e) = consumer.store_offsets(&tpl) {
                tracing::warn!(error = %e, "Could not store offsets of drained partitions.");
            }
            match consumer.commit(&tpl, CommitMode::Sync) {
                Ok(()) => record_committed(&tpl),
                // Rejected during a rebalance: the next owner re-reads from the last commit.
                Err(e) => {
                    metrics::counter!(metric::COMMIT_FAILURES).increment(1);
                    tracing::warn!(error = %e, "Commit of drained partitions refused; their events will be re-delivered.");
                }
            }
        }
        let mut paused = self.paused.lock().unwrap_or_else(|p| p.into_inner());
        for key in keys {
            paused.remove(key);
            if let Some((_, entry)) = self.directory.remove(key) {
                entry.shared.retired.store(true, Ordering::Release);
                entry.addr.do_send(Retire);
            }
        }
    }
}

fn record_committed(tpl: &TopicPartitionList) {
    for e in tpl.elements() {
        if let Offset::Offset(o) = e.offset() {
            metrics::gauge!(metric::COMMITTED_OFFSET, "topic" => e.topic().to_string(), "partition" => e.partition().to_string())
                .set(o as f64);
        }
    }
}

/// Everything the consumer thread needs to start.
pub struct ConsumerSetup {
    pub kafka: KafkaConfig,
    pub directory: PartitionDirectory,
    pub deps: Arc<PartitionDeps>,
    pub arbiter: ArbiterHandle,
    pub health: Health,
    pub commands: mpsc::Receiver<ConsumerCommand>,
    pub stop: StopSignal,
    /// Upper bound on the graceful drain at shutdown.
    pub shutdown_drain: Duration,
}

/// Connection settings every Kafka client of the service shares.
pub fn client_config(kafka: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    for (k, v) in &kafka.client {
        c.set(k, v.expose());
    }
    c.set("bootstrap.servers", &kafka.bootstrap_servers);
    c
}

/// librdkafka settings of the service's consumer.
pub fn consumer_config(kafka: &KafkaConfig) -> ClientConfig {
    let mut c = client_config(kafka);
    let heartbeat = (kafka.session_timeout_ms / 3).max(100);
    c.set("group.id", &kafka.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("session.timeout.ms", kafka.session_timeout_ms.to_string())
        .set("heartbeat.interval.ms", heartbeat.to_string())
        .set("statistics.interval.ms", "5000")
        // Bound librdkafka's prefetch; the in-flight windows bound the rest.
        .set("queued.max.messages.kbytes", "16384")
        .set("queued.min.messages", "10000")
        // When the prefetch queue is over those bounds, librdkafka postpones the next
        // fetch by this much (default 1 s): measured, the consumer then sat with nothing
        // to hand out for 0.3–0.7 s at a time, a third of a batched load test.
        .set("fetch.queue.backoff.ms", "10");
    c
}

/// Creates the consumer, subscribes, and runs the loop on the calling thread until stopped.
/// `committed` is set once the final drain and commit of a graceful stop are done.
pub fn run(setup: ConsumerSetup, committed: &AtomicBool) -> Result<(), KafkaError> {
    let context = LoopContext {
        directory: setup.directory.clone(),
        deps: setup.deps.clone(),
        arbiter: setup.arbiter.clone(),
        drain_timeout: setup.kafka.drain_timeout(),
        health: setup.health.clone(),
        state_topic: setup.kafka.state_topic.clone(),
        input_topics: setup.kafka.input_topics.clone(),
        client: client_config(&setup.kafka),
        paused: Mutex::new(HashMap::new()),
    };
    let consumer: BaseConsumer<LoopContext> = consumer_config(&setup.kafka).create_with_context(context)?;
    let topics: Vec<&str> = setup
        .kafka
        .input_topics
        .iter()
        .chain(setup.kafka.retry_topic.as_ref())
        .map(String::as_str)
        .collect();
    consumer.subscribe(&topics)?;
    tracing::info!(topics = ?topics, group = %setup.kafka.group_id, "Consumer subscribed.");

    let mut intake = Intake::default();
    let commit_interval = Duration::from_millis(setup.kafka.commit_interval_ms);
    let mut last_commit = Instant::now();
    let mode = loop {
        if let Some(mode) = setup.stop.mode() {
            break mode;
        }
        for command in setup.commands.try_iter() {
            handle_command(&consumer, command);
        }
        sync_pauses(&consumer);
        if last_commit.elapsed() >= commit_interval {
            store_and_commit(&consumer);
            last_commit = Instant::now();
        }
        // Wait for one message, then take what else is already fetched (up to
        // `INTAKE_BATCH`), and hand each partition its share in one message.
        let mut timeout = Duration::from_millis(100);
        for _ in 0..INTAKE_BATCH {
            match consumer.poll(timeout) {
                None => break,
                Some(Err(e)) => tracing::warn!(error = %e, "Kafka consumer error."),
                Some(Ok(message)) => intake.add(&consumer, &message),
            }
            timeout = Duration::ZERO;
        }
        intake.hand_off(&consumer);
    };

    let ctx = consumer.context();
    let keys: Vec<PartitionKey> = ctx.directory.iter().map(|e| e.key().clone()).collect();
    match mode {
        StopMode::Graceful => {
            tracing::info!(partitions = keys.len(), "Shutting down: draining partitions.");
            if let Ok(assignment) = consumer.assignment() {
                let _ = consumer.pause(&assignment);
            }
            ctx.drain_commit_retire(&consumer, &keys, setup.shutdown_drain);
            committed.store(true, Ordering::SeqCst);
            consumer.unsubscribe();
        }
        StopMode::Abort => {
            for key in keys {
                if let Some((_, entry)) = ctx.directory.remove(&key) {
                    entry.shared.retired.store(true, Ordering::Release);
                    entry.addr.do_send(Retire);
                }
            }
        }
    }
    ctx.health.set_ready(false);
    // Dropping the consumer leaves the group; it can hang inside librdkafka, which is why
    // the caller bounds the wait for this thread.
    drop(consumer);
    Ok(())
}

/// Most messages taken from the consumer before they are handed to partition actors.
const INTAKE_BATCH: usize = 512;

/// Messages taken from the consumer, by partition, waiting to be handed off.
#[derive(Default)]
struct Intake {
    batches: Vec<(PartitionKey, Vec<SourceMessage>)>,
}

impl Intake {
    fn add(&mut self, consumer: &BaseConsumer<LoopContext>, message: &BorrowedMessage<'_>) {
        let index = match self
            .batches
            .iter()
            .position(|((t, p), _)| *p == message.partition() && **t == *message.topic())
        {
            Some(i) => i,
            None => {
                let key = (Arc::<str>::from(message.topic()), message.partition());
                self.batches.push((key, Vec::new()));
                self.batches.len() - 1
            }
        };
        let (key, batch) = &mut self.batches[index];
        if hold_back(consumer, key, message.offset()) {
            return;
        }
        batch.push(SourceMessage {
            topic: key.0.clone(),
            partition: message.partition(),
            offset: message.offset(),
            key: message.key().map(<[u8]>::to_vec),
            payload: message.payload().map(<[u8]>::to_vec),
            headers: message
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec)))
                        .collect()
                })
                .unwrap_or_default(),
        });
    }

    /// Hands each partition actor its messages, in one message per partition.
    fn hand_off(&mut self, consumer: &BaseConsumer<LoopContext>) {
        for (key, batch) in self.batches.drain(..) {
            if batch.is_empty() {
                continue;
            }
            // The entry's own `Addr`, not a clone: every clone is a new sender, and each
            // sender may put one message past the mailbox's capacity, which would make the
            // mailbox (and the in-flight window behind it) unbounded. Holding the read
            // guard while blocking is safe: only this thread changes the map.
            if let Some(entry) = consumer.context().directory.get(&key) {
                // Fast path without a thread park; when the partition's mailbox is full,
                // block until it has room, so intake follows processing.
                if let Err(SendError::Full(records)) = entry.addr.try_send(Records(batch)) {
                    let _ = futures::executor::block_on(entry.addr.send(records));
                }
            }
        }
    }
}

fn handle_command(consumer: &BaseConsumer<LoopContext>, command: ConsumerCommand) {
    match command {
        ConsumerCommand::Seek {
            topic,
            partition,
            offset,
            generation,
        } => {
            let Some(addr) = consumer
                .context()
                .directory
                .get(&(topic.clone(), partition))
                .map(|e| e.addr.clone())
            else {
                return;
            };
            // This seek supersedes a resume position held back while paused.
            if let Some(first) = consumer
                .context()
                .paused
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_mut(&(topic.clone(), partition))
            {
                *first = Some(offset);
            }
            if let Err(e) = consumer.seek(&topic, partition, Offset::Offset(offset), Duration::from_secs(5)) {
                tracing::error!(topic = %topic, partition, error = %e, "Seek after partition restart failed.");
            }
            // Everything sent to the actor before this marker predates the seek.
            addr.do_send(Resync { generation });
        }
        ConsumerCommand::InjectPanic => {
            if let Some(entry) = consumer.context().directory.iter().next() {
                entry.addr.do_send(InjectPanic);
            }
        }
    }
}

fn sync_pauses(consumer: &BaseConsumer<LoopContext>) {
    let ctx = consumer.context();
    let mut paused = ctx.paused.lock().unwrap_or_else(|p| p.into_inner());
    for entry in ctx.directory.iter() {
        let key = entry.key().clone();
        let wanted = entry.shared.pause_wanted.load(Ordering::Relaxed);
        if wanted == paused.contains_key(&key) {
            continue;
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&key.0, key.1);
        if wanted {
            if consumer.pause(&tpl).is_ok() {
                metrics::counter!(metric::PARTITION_PAUSES, "topic" => key.0.to_string()).increment(1);
                paused.insert(key, None);
            }
        } else {
            if let Some(Some(first_held_back)) = paused.get(&key) {
                let at = Offset::Offset(*first_held_back);
                if let Err(e) = consumer.seek(&key.0, key.1, at, Duration::from_secs(5)) {
                    // Resuming without the seek would skip what was held back: stay paused.
                    tracing::warn!(topic = %key.0, partition = key.1, error = %e, "Seek before resume failed; retrying.");
                    continue;
                }
            }
            if consumer.resume(&tpl).is_ok() {
                paused.remove(&key);
            }
        }
    }
}

/// Whether a message must be held back because its partition is paused; remembers the
/// first such offset so the partition resumes from there.
fn hold_back(consumer: &BaseConsumer<LoopContext>, key: &PartitionKey, offset: i64) -> bool {
    let mut paused = consumer.context().paused.lock().unwrap_or_else(|p| p.into_inner());
    match paused.get_mut(key) {
        Some(first) => {
            if first.is_none() {
                *first = Some(offset);
            }
            true
        }
        None => false,
    }
}

/// Stores every partition's watermark and commits them (asynchronously; a refused commit
/// is reported by `commit_callback` and repeated at the next interval).
fn store_and_commit(consumer: &BaseConsumer<LoopContext>) {
    let mut tpl = TopicPartitionList::new();
    for entry in consumer.context().directory.iter() {
        let wm = entry.shared.watermark.load(Ordering::Acquire);
        if wm >= 0 {
            let _ = tpl.add_partition_offset(&entry.key().0, entry.key().1, Offset::Offset(wm));
        }
    }
    if tpl.count() == 0 {
        return;
    }
    if let Err(e) = consumer.store_offsets(&tpl) {
        tracing::debug!(error = %e, "Could not store offsets (partition no longer assigned?).");
        return;
    }
    match consumer.commit(&tpl, CommitMode::Async) {
        Ok(()) => record_committed(&tpl),
        Err(e) if is_no_offset(&e) => {}
        Err(e) => {
            metrics::counter!(metric::COMMIT_FAILURES).increment(1);
            tracing::warn!(error = %e, "Offset commit refused; will retry with the next commit.");
        }
    }
}
