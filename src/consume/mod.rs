//! Consume stage: the Kafka consumer thread and the partition actors it feeds.
//!
//! The consumer runs on its own OS thread (a librdkafka `BaseConsumer` polled in a loop),
//! so that rebalance callbacks may block while partitions drain without stalling any
//! actor. The input topics are consumed through the consumer group. The retry topic is
//! not: a second consumer (the *retry reader*, group `{group_id}.retry`, which never
//! joins) is assigned retry partition `r` exactly while this member owns the input
//! partition whose parked events go to `r` ([`crate::retry::topic`]). So whoever acts on a
//! parked event owns its record's partition, has that partition's confirmed states, and
//! sees its other versions in flight. The thread:
//! - on assign, reads the new partitions' confirmed states back from the state topic
//!   into the diff cache, then starts a supervised [`PartitionActor`] per partition and
//!   one for its retry partition; a partition whose states cannot be read stays paused,
//!   and the read is tried again, since without them stale versions would be written;
//! - takes what librdkafka has fetched (up to [`INTAKE_BATCH`] messages a round) and
//!   hands each partition actor its share in one message (`send`, so a busy partition
//!   slows intake), and pauses/resumes partitions whose in-flight window is full;
//! - stores each partition's watermark (`enable.auto.offset.store=false`) and commits
//!   every `commit_interval_ms`;
//! - on revoke, drains the revoked partitions and their retry partitions (bounded by
//!   `drain_timeout_ms`, which is below the session timeout), commits them
//!   synchronously, then retires them and gives the retry partitions up: tenants
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
use rdkafka::error::KafkaResult;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, Offset, TopicPartitionList};

pub use partition::{Drain, PartitionActor, PartitionDeps, Records, Resync, Retire};

use crate::config::KafkaConfig;
use crate::dead_letter::SourceMessage;
use crate::diff::store::{self, DeadLettered};
use crate::diff::Restore;
use crate::messages::{PartitionShared, Partitions, Redispatch};
use crate::retry::topic::RetryRoute;
use crate::supervise::InjectPanic;
use crate::telemetry::{self, metric, Health};

/// A partition: (topic, partition number).
pub type PartitionKey = (Arc<str>, i32);

/// A live partition as the rest of the service sees it.
pub struct PartitionEntry {
    pub addr: Addr<PartitionActor>,
    pub shared: Arc<PartitionShared>,
    pub redispatch: Recipient<Redispatch>,
}

/// Live partitions by (topic, partition); shared by the consumer thread (which adds and
/// removes them) and the tenants (which ask them for re-dispatch, as [`Partitions`]).
pub type PartitionDirectory = Arc<DashMap<PartitionKey, PartitionEntry>>;

impl Partitions for DashMap<PartitionKey, PartitionEntry> {
    fn redispatch_all(&self, tenant: &Arc<str>) {
        for entry in self.iter() {
            entry.redispatch.do_send(Redispatch { tenant: tenant.clone() });
        }
    }
}

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
    /// Fault injection: make one live partition actor panic. Answered once the request is
    /// in that actor's mailbox, ahead of any message the consumer thread hands it later.
    InjectPanic(mpsc::Sender<()>),
    /// Fault injection: make the consumer thread itself panic.
    InjectConsumerPanic,
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
    /// The stop asked for, if any.
    pub fn mode(&self) -> Option<StopMode> {
        if self.abort.load(Ordering::SeqCst) {
            Some(StopMode::Abort)
        } else if self.requested.load(Ordering::SeqCst) {
            Some(StopMode::Graceful)
        } else {
            None
        }
    }
}

/// The partition-level calls the service makes, on either of its two consumers.
trait PartitionControl {
    fn pause_partitions(&self, tpl: &TopicPartitionList) -> KafkaResult<()>;
    fn resume_partitions(&self, tpl: &TopicPartitionList) -> KafkaResult<()>;
    fn seek_partition(&self, topic: &str, partition: i32, offset: Offset) -> KafkaResult<()>;
    fn store_and_commit(&self, tpl: &TopicPartitionList, mode: CommitMode) -> KafkaResult<()>;
}

impl<C: ConsumerContext> PartitionControl for BaseConsumer<C> {
    fn pause_partitions(&self, tpl: &TopicPartitionList) -> KafkaResult<()> {
        self.pause(tpl)
    }
    fn resume_partitions(&self, tpl: &TopicPartitionList) -> KafkaResult<()> {
        self.resume(tpl)
    }
    fn seek_partition(&self, topic: &str, partition: i32, offset: Offset) -> KafkaResult<()> {
        self.seek(topic, partition, offset, Duration::from_secs(5))
    }
    fn store_and_commit(&self, tpl: &TopicPartitionList, mode: CommitMode) -> KafkaResult<()> {
        self.store_offsets(tpl)?;
        self.commit(tpl, mode)
    }
}

/// The consumer of the retry topic. It never joins a group: it is assigned the retry
/// partitions of the input partitions this member owns, and commits under its own group
/// id, which no member subscribes with.
struct RetryReader {
    consumer: BaseConsumer,
    route: RetryRoute,
}

/// The consumer group id under which the retry reader commits its offsets.
pub fn retry_group_id(group_id: &str) -> String {
    format!("{group_id}.retry")
}

/// Input partitions assigned to this member whose confirmed states could not be read
/// yet: paused, without actors, until a read succeeds.
#[derive(Default)]
struct Restoring {
    partitions: Vec<PartitionKey>,
    next_attempt: Option<Instant>,
    backoff: Duration,
}

/// The consumer's callbacks: rebalances, commits, statistics.
pub struct LoopContext {
    directory: PartitionDirectory,
    /// This member's share of the group's CRM limits, and the input topics' partition
    /// count it was last computed from.
    share: Arc<crate::messages::MemberShare>,
    input_topics: Vec<String>,
    input_partitions: Mutex<usize>,
    /// Set while the input partitions could not be counted (the broker's metadata did not
    /// answer): the share is then tried again every [`PARTITION_COUNT_WAIT`].
    share_unknown_since: Mutex<Option<Instant>>,
    /// The input partitions assigned to this member, live or held back (a restore that
    /// has not succeeded yet): their lag is shown.
    assigned: Mutex<std::collections::HashSet<PartitionKey>>,
    deps: Arc<PartitionDeps>,
    /// Arbiter the partition actors run on.
    arbiter: ArbiterHandle,
    drain_timeout: Duration,
    /// How long a revoke waits, after the drain, for writes still at the CRM (the
    /// longest write of any tenant).
    write_timeout: Duration,
    health: Health,
    /// Where confirmed states are read back from when input partitions are assigned.
    state_topic: String,
    /// Connection settings for the state-restore reader.
    client: ClientConfig,
    /// The retry topic's own consumer, when there is a retry topic. Owned here so that
    /// the rebalance callbacks can hand it the retry partitions; dropped with the main
    /// consumer.
    retry: Option<RetryReader>,
    /// Partitions currently paused, because their window is full or while their restore
    /// has not succeeded, each with the first offset held back: the message that found the
    /// window full, or one librdkafka still handed out from what it had prefetched (or,
    /// after an actor's restart, where it re-reads from). Such messages are not delivered;
    /// the partition is seeked back to that offset before it resumes, so the window really
    /// bounds memory and nothing is skipped.
    paused: Mutex<HashMap<PartitionKey, Option<i64>>>,
    restoring: Mutex<Restoring>,
}

impl ClientContext for LoopContext {
    fn stats(&self, statistics: Statistics) {
        for (topic, t) in &statistics.topics {
            for (partition, p) in &t.partitions {
                if *partition < 0 || p.consumer_lag < 0 {
                    continue;
                }
                self.show(metric::CONSUMER_LAG, topic, *partition, p.consumer_lag as f64);
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
                let mut assigned = self.assigned.lock().unwrap_or_else(|p| p.into_inner());
                for key in &revoked {
                    assigned.remove(key);
                }
                drop(assigned);
                self.forget_restoring(consumer, &revoked);
                let mut keys = revoked.clone();
                keys.extend(revoked.iter().filter_map(|k| self.retry_key(k)));
                self.drain_commit_retire(consumer, &keys, self.drain_timeout, self.write_timeout);
                self.release_retry_partitions(&revoked);
            }
            Rebalance::Assign(_) => {}
            Rebalance::Error(e) => tracing::warn!(error = %e, "Rebalance error."),
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if !matches!(rebalance, Rebalance::Error(_)) {
            self.update_share(consumer);
        }
        if let Rebalance::Assign(tpl) = rebalance {
            let assigned = keys_of(tpl);
            tracing::info!(partitions = assigned.len(), "Partitions assigned.");
            self.assigned
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(assigned.iter().cloned());
            self.activate(consumer, assigned.clone());
            self.show_lag(consumer, &assigned);
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

fn tpl_of(keys: &[PartitionKey]) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    for (topic, partition) in keys {
        tpl.add_partition(topic, *partition);
    }
    tpl
}

impl LoopContext {
    /// The retry partition that belongs to input partition `key`.
    fn retry_key(&self, key: &PartitionKey) -> Option<PartitionKey> {
        let route = &self.retry.as_ref()?.route;
        Some((route.topic.clone(), route.partition_for(&key.0, key.1)?))
    }

    fn is_retry_topic(&self, topic: &str) -> bool {
        self.retry.as_ref().is_some_and(|r| *r.route.topic == *topic)
    }

    /// The consumer that reads `topic`.
    fn client<'a>(&'a self, main: &'a BaseConsumer<LoopContext>, topic: &str) -> &'a dyn PartitionControl {
        match &self.retry {
            Some(r) if *r.route.topic == *topic => &r.consumer,
            _ => main,
        }
    }

    /// Starts newly assigned input partitions (and their retry partitions) once their
    /// confirmed states are read back; those whose states cannot be read stay paused and
    /// are tried again from the loop.
    fn activate(&self, consumer: &BaseConsumer<LoopContext>, assigned: Vec<PartitionKey>) {
        let unroutable: Vec<&PartitionKey> = assigned
            .iter()
            .filter(|k| self.retry.is_some() && self.retry_key(k).is_none())
            .collect();
        if !unroutable.is_empty() {
            // Started without a retry partition, its parked events would have nowhere to
            // go: its retries wait in memory instead (see `DeadLetters::can_park`).
            tracing::error!(partitions = ?unroutable, "Input partitions beyond the retry topic's partitions; their retries wait in memory. Add retry-topic partitions and restart.");
        }
        match self.restore_state(&assigned) {
            Ok(markers) => {
                let unstarted: Vec<PartitionKey> = assigned
                    .into_iter()
                    .filter(|key| !self.start_with_retry(key.clone(), &markers))
                    .collect();
                if !unstarted.is_empty() {
                    self.hold_back_partitions(consumer, unstarted);
                }
            }
            Err(e) => {
                tracing::error!(
                    topic = %self.state_topic,
                    error = %e,
                    partitions = assigned.len(),
                    "Could not read confirmed states back; the partitions stay paused until they can be read."
                );
                metrics::counter!(metric::STATE_RESTORE_FAILURES).increment(1);
                self.hold_back_partitions(consumer, assigned);
            }
        }
    }

    /// Pauses assigned partitions that could not start, and has the loop try again (see
    /// `retry_restores`).
    fn hold_back_partitions(&self, consumer: &BaseConsumer<LoopContext>, keys: Vec<PartitionKey>) {
        let mut paused = self.paused.lock().unwrap_or_else(|p| p.into_inner());
        if consumer.pause(&tpl_of(&keys)).is_ok() {
            for key in &keys {
                paused.entry(key.clone()).or_insert(None);
            }
        }
        drop(paused);
        let mut restoring = self.restoring.lock().unwrap_or_else(|p| p.into_inner());
        restoring.partitions.extend(keys);
        restoring.backoff = Duration::from_millis(500);
        restoring.next_attempt = Some(Instant::now() + restoring.backoff);
    }

    /// Tries again to read the states of partitions still waiting for them; those that
    /// succeed start, and resume where they were paused.
    fn retry_restores(&self) {
        let mut restoring = self.restoring.lock().unwrap_or_else(|p| p.into_inner());
        if restoring.partitions.is_empty() || restoring.next_attempt.is_some_and(|at| Instant::now() < at) {
            return;
        }
        let keys: Vec<PartitionKey> = restoring.partitions.to_vec();
        match self.restore_state(&keys) {
            Ok(markers) => {
                tracing::info!(
                    partitions = keys.len(),
                    "Confirmed states read back; starting the partitions."
                );
                // A started partition's pause is lifted by `sync_pauses`, which seeks back
                // to the first message held back meanwhile; one that still cannot start
                // waits for the next attempt.
                let waiting = std::mem::take(&mut restoring.partitions);
                restoring.partitions = waiting
                    .into_iter()
                    .filter(|key| !self.start_with_retry(key.clone(), &markers))
                    .collect();
                if restoring.partitions.is_empty() {
                    restoring.next_attempt = None;
                } else {
                    restoring.backoff = (restoring.backoff * 2).min(Duration::from_secs(30));
                    restoring.next_attempt = Some(Instant::now() + restoring.backoff);
                }
            }
            Err(e) => {
                metrics::counter!(metric::STATE_RESTORE_FAILURES).increment(1);
                tracing::error!(topic = %self.state_topic, error = %e, "Could not read confirmed states back; retrying.");
                restoring.backoff = (restoring.backoff * 2).min(Duration::from_secs(30));
                restoring.next_attempt = Some(Instant::now() + restoring.backoff);
            }
        }
    }

    /// Revoked partitions that never started: nothing to drain, just forget them.
    fn forget_restoring(&self, consumer: &BaseConsumer<LoopContext>, revoked: &[PartitionKey]) {
        let mut restoring = self.restoring.lock().unwrap_or_else(|p| p.into_inner());
        restoring.partitions.retain(|k| !revoked.contains(k));
        let mut paused = self.paused.lock().unwrap_or_else(|p| p.into_inner());
        for key in revoked {
            if !self.directory.contains_key(key) && paused.remove(key).is_some() {
                let _ = consumer.resume(&tpl_of(std::slice::from_ref(key)));
            }
        }
    }

    /// Reads back the confirmed states of input partitions (before any of their messages
    /// is handled: this runs on the consumer thread, inside the rebalance or before the
    /// partitions start), streaming them into the diff cache. Returns the dead-letter
    /// markers found beside them.
    fn restore_state(&self, keys: &[PartitionKey]) -> KafkaResult<Vec<DeadLettered>> {
        let mut partitions: Vec<i32> = keys.iter().map(|(_, p)| *p).collect();
        partitions.sort_unstable();
        partitions.dedup();
        let mut markers = store::Markers::default();
        if partitions.is_empty() {
            return Ok(markers.dead_lettered);
        }
        let diff = &self.deps.diff;
        let records = store::restore(
            &self.client,
            &self.state_topic,
            &partitions,
            Duration::from_secs(60),
            |chunk| diff.do_send(Restore(chunk)),
            &mut markers,
        )?;
        // Dead-letterings an earlier owner began and did not mark done, of these
        // partitions (a state partition also holds those of other input topics' partitions
        // of the same number, which other members may own): those whose DLQ record it
        // wrote are marked done, the others are decided afresh. A DLQ that cannot be read
        // decides them all afresh: a second DLQ record at worst, and no partition held.
        let ours = |topic: &str, partition: i32| {
            keys.iter().any(|k| {
                (*k.0 == *topic && k.1 == partition)
                    || self.retry_key(k).is_some_and(|r| *r.0 == *topic && r.1 == partition)
            })
        };
        let begun: Vec<_> = std::mem::take(&mut markers.dead_lettering)
            .into_iter()
            .filter(|b| ours(&b.message.topic, b.message.partition))
            .collect();
        let (written, unwritten) = match crate::dead_letter::find_written(
            &self.client,
            self.deps.dead_letters.dlq_topic(),
            begun.clone(),
            Duration::from_secs(60),
        ) {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!(topic = %self.deps.dead_letters.dlq_topic(), error = %e, "Could not look in the DLQ for dead-letterings a crashed owner began; they are decided afresh (a second DLQ record at worst).");
                (Vec::new(), begun)
            }
        };
        self.deps.dead_letters.settle_begun(&written, &unwritten);
        tracing::debug!(
            partitions = partitions.len(),
            records,
            dead_lettered = markers.dead_lettered.len(),
            begun_and_written = written.len(),
            begun_and_unwritten = unwritten.len(),
            holds = markers.holds.len(),
            "Restored confirmed states."
        );
        markers.dead_lettered.extend(written);
        // Before any of these partitions' events is handed to a tenant: a write that an
        // earlier owner gave up on may still land, and its record is held here too.
        for holds in self.deps.holds.values() {
            holds.restore(&markers.holds);
        }
        Ok(markers.dead_lettered)
    }

    /// Starts an input partition's actor, and its retry partition's (assigned to the retry
    /// reader at its committed offset).
    /// Returns false, starting nothing, if the retry partition cannot be assigned: its
    /// parked events would never be read back while the input's offsets move on.
    fn start_with_retry(&self, key: PartitionKey, markers: &[DeadLettered]) -> bool {
        if let (Some(reader), Some(retry_key)) = (&self.retry, self.retry_key(&key)) {
            if !self.directory.contains_key(&retry_key) {
                if let Err(e) = reader
                    .consumer
                    .incremental_assign(&tpl_of(std::slice::from_ref(&retry_key)))
                {
                    tracing::error!(topic = %retry_key.0, partition = retry_key.1, error = %e, "Could not assign the retry partition; its input partition stays paused and this is tried again.");
                    return false;
                }
                self.start_partition(retry_key.0, retry_key.1, markers);
            }
        }
        self.start_partition(key.0, key.1, markers);
        true
    }

    /// Gives up the retry partitions of revoked input partitions (already drained,
    /// committed and retired).
    fn release_retry_partitions(&self, revoked: &[PartitionKey]) {
        let Some(reader) = &self.retry else { return };
        let keys: Vec<PartitionKey> = revoked.iter().filter_map(|k| self.retry_key(k)).collect();
        if keys.is_empty() {
            return;
        }
        if let Err(e) = reader.consumer.incremental_unassign(&tpl_of(&keys)) {
            tracing::warn!(error = %e, "Could not unassign retry partitions.");
        }
    }

    /// Starts a partition's actor; `markers` may name offsets of it that were already
    /// dead-lettered.
    fn start_partition(&self, topic: Arc<str>, partition: i32, markers: &[DeadLettered]) {
        let key = (topic.clone(), partition);
        if self.directory.contains_key(&key) {
            return;
        }
        let shared = Arc::new(PartitionShared::default());
        shared.watermark.store(-1, Ordering::Relaxed);
        shared.remember_dead_lettered(
            markers
                .iter()
                .filter(|m| m.partition == partition && *m.topic == *topic)
                .map(|m| m.offset),
        );
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

    /// Stores and commits the watermarks of `keys` (all live partitions when `None`),
    /// each through the consumer that reads it.
    fn commit_watermarks(&self, main: &BaseConsumer<LoopContext>, keys: Option<&[PartitionKey]>, mode: CommitMode) {
        let mut input = TopicPartitionList::new();
        let mut retry = TopicPartitionList::new();
        let mut add = |key: &PartitionKey, wm: i64| {
            if wm >= 0 {
                let tpl = if self.is_retry_topic(&key.0) {
                    &mut retry
                } else {
                    &mut input
                };
                let _ = tpl.add_partition_offset(&key.0, key.1, Offset::Offset(wm));
            }
        };
        match keys {
            Some(keys) => {
                for key in keys {
                    if let Some(entry) = self.directory.get(key) {
                        add(key, entry.shared.watermark.load(Ordering::Acquire));
                    }
                }
            }
            None => {
                for entry in self.directory.iter() {
                    add(entry.key(), entry.shared.watermark.load(Ordering::Acquire));
                }
            }
        }
        for tpl in [input, retry] {
            let Some(first) = tpl.elements().first().map(|e| e.topic().to_string()) else {
                continue;
            };
            match self.client(main, &first).store_and_commit(&tpl, mode) {
                Ok(()) => self.record_committed(&tpl),
                Err(e) if is_no_offset(&e) => {}
                // Rejected during a rebalance: the next owner re-reads from the last commit.
                Err(e) => {
                    metrics::counter!(metric::COMMIT_FAILURES).increment(1);
                    tracing::warn!(error = %e, "Offset commit refused; the events after the last commit will be re-delivered.");
                }
            }
        }
    }

    /// Waits (up to `timeout` in all) for the partitions to finish their in-flight events;
    /// then stops their events from going to the CRM (what is undecided is the next
    /// owner's), waits (up to `write_timeout`) for the writes already at the CRM to be
    /// answered, commits the watermarks synchronously, and retires the actors. So no write
    /// of this member for these partitions can land after the next owner's.
    fn drain_commit_retire(
        &self,
        consumer: &BaseConsumer<Self>,
        keys: &[PartitionKey],
        timeout: Duration,
        write_timeout: Duration,
    ) {
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
        let shared: Vec<Arc<PartitionShared>> = keys
            .iter()
            .filter_map(|k| self.directory.get(k).map(|e| e.shared.clone()))
            .collect();
        for s in &shared {
            s.retired.store(true, Ordering::SeqCst);
        }
        let deadline = Instant::now() + write_timeout;
        let answered = || shared.iter().all(|s| s.sending.load(Ordering::SeqCst) == 0);
        while !answered() && Instant::now() < deadline {
            // Polled: the writes end on the I/O runtime, which has no way to wake this
            // thread; the deadline bounds the wait.
            std::thread::sleep(Duration::from_millis(10));
        }
        if !answered() {
            tracing::error!(
                partitions = keys.len(),
                "Writes still at the CRM past the longest a write can take; handing the partitions over anyway."
            );
        }
        self.commit_watermarks(consumer, Some(keys), CommitMode::Sync);
        let mut paused = self.paused.lock().unwrap_or_else(|p| p.into_inner());
        for key in keys {
            if paused.remove(key).is_some() {
                // librdkafka keeps an application's pause across an unassign: assigned
                // here again later, the partition would never be fetched.
                let _ = self
                    .client(consumer, &key.0)
                    .resume_partitions(&tpl_of(std::slice::from_ref(key)));
            }
            // No longer this member's to report: its series go, so that the group's sum
            // counts the partition once, from its new owner.
            telemetry::partitions().forget(&key.0, key.1);
            if let Some((_, entry)) = self.directory.remove(key) {
                entry.shared.retired.store(true, Ordering::Release);
                entry.addr.do_send(Retire);
            }
        }
    }
}

/// How long an assignment may spend reading the new partitions' lag.
const LAG_AT_ASSIGNMENT: Duration = Duration::from_secs(2);
/// How long a rebalance may wait for an input topic's partition count.
const PARTITION_COUNT_WAIT: Duration = Duration::from_secs(1);

impl LoopContext {
    /// Sets this member's share of the group's CRM limits: the input partitions it holds
    /// over all the input topics' partitions (counted from the broker's metadata at each
    /// rebalance; the last count when the broker does not answer in time).
    fn update_share(&self, consumer: &BaseConsumer<Self>) {
        let counts: Option<Vec<usize>> = self
            .input_topics
            .iter()
            .map(|topic| {
                let metadata = consumer.fetch_metadata(Some(topic), PARTITION_COUNT_WAIT).ok()?;
                let t = metadata.topics().first()?;
                t.error().is_none().then(|| t.partitions().len())
            })
            .collect();
        let mut total = self.input_partitions.lock().unwrap_or_else(|p| p.into_inner());
        let mut unknown = self.share_unknown_since.lock().unwrap_or_else(|p| p.into_inner());
        match counts {
            Some(counts) => {
                *total = counts.iter().sum();
                *unknown = None;
            }
            None => *unknown = Some(Instant::now()),
        }
        let held = consumer.assignment().map_or(0, |a| {
            a.elements()
                .iter()
                .filter(|e| self.input_topics.iter().any(|t| t == e.topic()))
                .count()
        });
        if *total == 0 {
            // Never counted: no share is known to be safe, so the least until it is.
            self.share.set(0, 1);
            tracing::warn!(
                "The input topics' partitions could not be counted; the tenants pace at their floor until they are."
            );
        } else {
            self.share.set(held, *total);
            tracing::info!(
                held,
                of = *total,
                "This member's share of the tenants' rate and concurrency limits."
            );
        }
    }

    /// Counts the input partitions again when the last count failed, once per
    /// [`PARTITION_COUNT_WAIT`].
    fn retry_share(&self, consumer: &BaseConsumer<Self>) {
        let due = self
            .share_unknown_since
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|since| since.elapsed() >= PARTITION_COUNT_WAIT);
        if due {
            self.update_share(consumer);
        }
    }

    /// Sets a per-partition gauge of a partition this member holds, live or held back
    /// (one that has left shows nothing, whatever a late statistics tick or commit answer
    /// says).
    fn show(&self, metric: &'static str, topic: &str, partition: i32, value: f64) {
        let key: PartitionKey = (Arc::from(topic), partition);
        let held =
            self.directory.contains_key(&key) || self.assigned.lock().unwrap_or_else(|p| p.into_inner()).contains(&key);
        if held {
            telemetry::partitions().gauge(metric, topic, partition).set(value);
        }
    }

    fn record_committed(&self, tpl: &TopicPartitionList) {
        for e in tpl.elements() {
            if let Offset::Offset(o) = e.offset() {
                self.show(metric::COMMITTED_OFFSET, e.topic(), e.partition(), o as f64);
            }
        }
    }

    /// The lag of newly assigned partitions from the start, not from the first statistics
    /// tick: high watermark minus the committed offset (the low watermark when none is
    /// committed: reading starts at the earliest). What is not known within
    /// [`LAG_AT_ASSIGNMENT`] shows from the next tick.
    fn show_lag(&self, consumer: &BaseConsumer<Self>, assigned: &[PartitionKey]) {
        let deadline = Instant::now() + LAG_AT_ASSIGNMENT;
        let mut tpl = TopicPartitionList::new();
        for (topic, partition) in assigned {
            tpl.add_partition(topic, *partition);
        }
        // Unknown committed offsets leave the lag to the statistics tick: taking none for
        // "nothing committed" would show the whole retained log.
        let Ok(committed) = consumer.committed_offsets(tpl, LAG_AT_ASSIGNMENT) else {
            return;
        };
        let gauges = telemetry::partitions();
        for (topic, partition) in assigned {
            let position = committed
                .find_partition(topic, *partition)
                .and_then(|e| match e.offset() {
                    Offset::Offset(o) => Some(o),
                    _ => None,
                });
            if let Some(o) = position {
                gauges.gauge(metric::COMMITTED_OFFSET, topic, *partition).set(o as f64);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            if let Ok((low, high)) = consumer.fetch_watermarks(topic, *partition, left) {
                let lag = high - position.unwrap_or(low);
                gauges
                    .gauge(metric::CONSUMER_LAG, topic, *partition)
                    .set(lag.max(0) as f64);
            }
        }
    }
}

/// Everything the consumer thread needs to start.
pub struct ConsumerSetup {
    pub kafka: KafkaConfig,
    /// This member's share of the group's CRM limits, set at every rebalance.
    pub share: Arc<crate::messages::MemberShare>,
    /// How parked events map onto the retry topic, when there is one.
    pub retry: Option<RetryRoute>,
    pub directory: PartitionDirectory,
    pub deps: Arc<PartitionDeps>,
    pub arbiter: ArbiterHandle,
    pub health: Health,
    pub commands: mpsc::Receiver<ConsumerCommand>,
    pub stop: StopSignal,
    /// Upper bound on the graceful drain at shutdown.
    pub shutdown_drain: Duration,
    /// The longest write of any tenant (`TenantConfig::longest_write`).
    pub write_timeout: Duration,
}

/// Connection settings every Kafka client of the service shares.
pub fn client_config(kafka: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    for (k, v) in &kafka.client {
        c.set(k, v.expose());
    }
    if probe_for_cas(kafka, |var| std::env::var_os(var).is_some()) {
        c.set("ssl.ca.location", "probe");
    }
    c.set("bootstrap.servers", &kafka.bootstrap_servers);
    c
}

/// Whether the brokers' certificates are to be checked against the CA certificates
/// librdkafka finds in the system's usual places (`ssl.ca.location = probe`): over TLS
/// when no CA is named in the configuration nor by `SSL_CERT_FILE` or `SSL_CERT_DIR`
/// (which OpenSSL's default paths honour). The OpenSSL built into the binary would
/// otherwise look where it was built to, which holds none, and refuse every broker.
fn probe_for_cas(kafka: &KafkaConfig, env_set: impl Fn(&str) -> bool) -> bool {
    let tls = kafka
        .client
        .get("security.protocol")
        .is_some_and(|p| p.expose().to_ascii_uppercase().contains("SSL"));
    let ca_named = ["ssl.ca.location", "ssl.ca.pem", "ssl.ca.certificate.stores"]
        .iter()
        .any(|k| kafka.client.contains_key(*k));
    tls && !ca_named && !env_set("SSL_CERT_FILE") && !env_set("SSL_CERT_DIR")
}

/// librdkafka settings of the service's producer (retry, DLQ, failures, state and trail
/// topics): acknowledged by every in-sync replica.
pub fn producer_config(kafka: &KafkaConfig) -> ClientConfig {
    let mut c = client_config(kafka);
    c.set("acks", "all")
        .set("linger.ms", "5")
        .set("message.timeout.ms", "30000");
    c
}

/// Settings of both of the service's consumers: offsets stored by the service, and
/// librdkafka's prefetch bounded.
fn reader_config(kafka: &KafkaConfig, group_id: &str) -> ClientConfig {
    let mut c = client_config(kafka);
    c.set("group.id", group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        // Bound librdkafka's prefetch; the in-flight windows bound the rest.
        .set("queued.max.messages.kbytes", "16384")
        .set("queued.min.messages", "10000")
        // When the prefetch queue is over those bounds, librdkafka postpones the next
        // fetch by this much (default 1 s): measured, the consumer then sat with nothing
        // to hand out for 0.3–0.7 s at a time, a third of a batched load test.
        .set("fetch.queue.backoff.ms", "10");
    c
}

/// librdkafka settings of the service's group consumer (the input topics).
pub fn consumer_config(kafka: &KafkaConfig) -> ClientConfig {
    let mut c = reader_config(kafka, &kafka.group_id);
    let heartbeat = (kafka.session_timeout_ms / 3).max(100);
    c.set("partition.assignment.strategy", "cooperative-sticky")
        .set("session.timeout.ms", kafka.session_timeout_ms.to_string())
        .set("heartbeat.interval.ms", heartbeat.to_string())
        .set("statistics.interval.ms", "5000");
    c
}

/// Creates the consumers, subscribes, and runs the loop on the calling thread until
/// stopped. `committed` is set once the final drain and commit of a graceful stop are done.
pub fn run(setup: ConsumerSetup, committed: &AtomicBool) -> Result<(), KafkaError> {
    let retry = match setup.retry.clone() {
        Some(route) => Some(RetryReader {
            consumer: reader_config(&setup.kafka, &retry_group_id(&setup.kafka.group_id)).create()?,
            route,
        }),
        None => None,
    };
    let context = LoopContext {
        directory: setup.directory.clone(),
        share: setup.share.clone(),
        input_topics: setup.kafka.input_topics.clone(),
        input_partitions: Mutex::new(0),
        share_unknown_since: Mutex::new(None),
        assigned: Mutex::new(std::collections::HashSet::new()),
        deps: setup.deps.clone(),
        arbiter: setup.arbiter.clone(),
        drain_timeout: setup.kafka.drain_timeout(),
        write_timeout: setup.write_timeout,
        health: setup.health.clone(),
        state_topic: setup.kafka.state_topic.clone(),
        client: client_config(&setup.kafka),
        retry,
        paused: Mutex::new(HashMap::new()),
        restoring: Mutex::new(Restoring::default()),
    };
    let consumer: BaseConsumer<LoopContext> = consumer_config(&setup.kafka).create_with_context(context)?;
    let topics: Vec<&str> = setup.kafka.input_topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics)?;
    tracing::info!(topics = ?topics, group = %setup.kafka.group_id, "Consumer subscribed.");

    let mut intake = Intake::default();
    let mut deferred: Vec<ConsumerCommand> = Vec::new();
    let commit_interval = Duration::from_millis(setup.kafka.commit_interval_ms);
    let mut last_commit = Instant::now();
    let mode = loop {
        if let Some(mode) = setup.stop.mode() {
            break mode;
        }
        let commands: Vec<ConsumerCommand> = deferred.drain(..).chain(setup.commands.try_iter()).collect();
        for command in commands {
            if let Err(again) = handle_command(&consumer, command) {
                deferred.push(again);
            }
        }
        consumer.context().retry_restores();
        consumer.context().retry_share(&consumer);
        sync_pauses(&consumer);
        if last_commit.elapsed() >= commit_interval {
            consumer.context().commit_watermarks(&consumer, None, CommitMode::Async);
            last_commit = Instant::now();
        }
        // Take what the retry reader has fetched, then wait for one message of the input
        // (not at all if the retry reader had some), take what else is already fetched
        // (up to `INTAKE_BATCH` each), and hand each partition its share in one message.
        let mut timeout = Duration::from_millis(100);
        if let Some(reader) = &consumer.context().retry {
            for _ in 0..INTAKE_BATCH {
                match reader.consumer.poll(Duration::ZERO) {
                    None => break,
                    Some(Err(e)) => tracing::warn!(error = %e, "Kafka consumer error (retry topic)."),
                    Some(Ok(message)) => {
                        intake.add(&consumer, &message);
                        timeout = Duration::ZERO;
                    }
                }
            }
        }
        for _ in 0..INTAKE_BATCH {
            match consumer.poll(timeout) {
                None => break,
                Some(Err(e)) => tracing::warn!(error = %e, "Kafka consumer error."),
                Some(Ok(message)) => intake.add(&consumer, &message),
            }
            timeout = Duration::ZERO;
        }
        intake.hand_off(consumer.context());
    };

    let ctx = consumer.context();
    let keys: Vec<PartitionKey> = ctx.directory.iter().map(|e| e.key().clone()).collect();
    match mode {
        StopMode::Graceful => {
            tracing::info!(partitions = keys.len(), "Shutting down: draining partitions.");
            if let Ok(assignment) = consumer.assignment() {
                let _ = consumer.pause(&assignment);
            }
            if let Some(reader) = &ctx.retry {
                if let Ok(assignment) = reader.consumer.assignment() {
                    let _ = reader.consumer.pause(&assignment);
                }
            }
            // At shutdown, the writes at the CRM get what is left of the deadline.
            ctx.drain_commit_retire(&consumer, &keys, setup.shutdown_drain / 2, setup.shutdown_drain / 2);
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

/// Messages taken from the consumers, by partition, waiting to be handed off, each batch
/// with the partition actor's shared state it was taken for: a rebalance inside the
/// round (callbacks run inside `poll`) may have replaced that actor, and the new one
/// must not get messages from before its own start.
#[derive(Default)]
struct Intake {
    batches: Vec<(PartitionKey, Option<Arc<PartitionShared>>, Vec<SourceMessage>)>,
}

impl Intake {
    /// Takes `message` into its partition's batch, unless the partition is paused or its
    /// window has no room left: then it is held back (and the partition paused), to be
    /// read again when the window has room.
    fn add(&mut self, consumer: &BaseConsumer<LoopContext>, message: &BorrowedMessage<'_>) {
        let ctx = consumer.context();
        let index = match self
            .batches
            .iter()
            .rposition(|((t, p), _, _)| *p == message.partition() && **t == *message.topic())
        {
            // A rebalance since this batch was begun may have replaced its actor: what is
            // read now belongs to the new one, in a batch of its own (added to the old
            // one, it would be dropped with it while the new actor went on past it).
            Some(i) => {
                let (key, taken_for, _) = &self.batches[i];
                let entry = ctx.directory.get(key);
                let same = match (taken_for, &entry) {
                    (Some(a), Some(e)) => Arc::ptr_eq(a, &e.shared),
                    (None, None) => true,
                    _ => false,
                };
                if same {
                    i
                } else {
                    let (key, current) = (key.clone(), entry.map(|e| e.shared.clone()));
                    self.batches.push((key, current, Vec::new()));
                    self.batches.len() - 1
                }
            }
            None => {
                let key = (Arc::<str>::from(message.topic()), message.partition());
                let shared = ctx.directory.get(&key).map(|e| e.shared.clone());
                self.batches.push((key, shared, Vec::new()));
                self.batches.len() - 1
            }
        };
        let (key, taken_for, batch) = &mut self.batches[index];
        if hold_back(ctx, key, message.offset()) {
            return;
        }
        // The window counts what waits in the actor's mailbox: counted only once the actor
        // had taken them in, a window of 1,000 held up to 2,500. A batch begun while there
        // is room is finished, though, so a partition holds at most its window and one
        // batch: cut at the window, each round after a resume (a seek and a fetch) would
        // take in only what a quarter of the window frees, and a partition churning
        // through a slow tenant's events (parking them) kept a fast tenant's waiting for
        // seconds (measured: p99 ×3.7 against the fast tenant alone, ×1.1 with the batch).
        let full = taken_for
            .as_ref()
            .is_some_and(|shared| shared.in_window() >= ctx.deps.max_in_flight);
        if full && pause(consumer, key) && hold_back(ctx, key, message.offset()) {
            return;
        }
        batch.push(SourceMessage::new(
            key.0.clone(),
            message.partition(),
            message.offset(),
            message.key().map(<[u8]>::to_vec),
            message.payload().map(<[u8]>::to_vec),
            crate::headers::read(message.headers()),
        ));
    }

    /// Hands each partition actor its messages, in one message per partition.
    fn hand_off(&mut self, ctx: &LoopContext) {
        for (key, taken_for, batch) in self.batches.drain(..) {
            if batch.is_empty() {
                continue;
            }
            // The entry's own `Addr`, not a clone: every clone is a new sender, and each
            // sender may put one message past the mailbox's capacity, which would make the
            // mailbox (and the in-flight window behind it) unbounded. Holding the read
            // guard while blocking is safe: only this thread changes the map.
            let same_actor = |entry: &PartitionEntry| taken_for.as_ref().is_some_and(|t| Arc::ptr_eq(t, &entry.shared));
            if let Some(entry) = ctx.directory.get(&key).filter(|e| same_actor(e)) {
                let n = batch.len();
                entry.shared.queued.fetch_add(n, Ordering::Relaxed);
                // Fast path without a thread park; when the partition's mailbox is full,
                // block until it has room, so intake follows processing.
                let sent = match entry.addr.try_send(Records(batch)) {
                    Err(SendError::Full(records)) => futures::executor::block_on(entry.addr.send(records)).is_ok(),
                    other => other.is_ok(),
                };
                if !sent {
                    entry.shared.taken_in(n);
                }
            }
        }
    }
}

/// Carries out a command; gives it back when it must be tried again.
fn handle_command(consumer: &BaseConsumer<LoopContext>, command: ConsumerCommand) -> Result<(), ConsumerCommand> {
    let ctx = consumer.context();
    match command {
        ConsumerCommand::Seek {
            topic,
            partition,
            offset,
            generation,
        } => {
            let Some(addr) = ctx.directory.get(&(topic.clone(), partition)).map(|e| e.addr.clone()) else {
                return Ok(());
            };
            if let Err(e) = ctx
                .client(consumer, &topic)
                .seek_partition(&topic, partition, Offset::Offset(offset))
            {
                // Without the seek, what follows in the partition is not what the actor
                // lost: it stays waiting for its `Resync` (publishing nothing), and the
                // seek is tried again.
                tracing::warn!(topic = %topic, partition, error = %e, "Seek after partition restart failed; retrying.");
                return Err(ConsumerCommand::Seek {
                    topic,
                    partition,
                    offset,
                    generation,
                });
            }
            // This seek supersedes a resume position held back while paused.
            if let Some(first) = ctx
                .paused
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_mut(&(topic.clone(), partition))
            {
                *first = Some(offset);
            }
            // Everything sent to the actor before this marker predates the seek.
            addr.do_send(Resync { generation });
        }
        ConsumerCommand::InjectPanic(queued) => {
            if let Some(entry) = ctx.directory.iter().next() {
                entry.addr.do_send(InjectPanic);
                let _ = queued.send(());
            }
        }
        ConsumerCommand::InjectConsumerPanic => panic!("injected panic in the consumer thread"),
    }
    Ok(())
}

/// Pauses the partitions whose window is full and resumes those whose window is a
/// quarter free again. This thread alone pauses and resumes (here and in
/// [`Intake::add`]), from the counts the partition actors publish: with a flag that both
/// sides set, an actor's "resume" could be overwritten by a "pause" decided from an older
/// count, and nothing would ask again.
///
/// Not half empty: a slow tenant may hold its share of the window (half of it with two
/// tenants, `PartitionDeps::tenant_share`), and the others' events would then wait for
/// its calls to end before the partition resumed.
fn sync_pauses(consumer: &BaseConsumer<LoopContext>) {
    let ctx = consumer.context();
    let max = ctx.deps.max_in_flight;
    let resume_at = max - max.div_ceil(4);
    let mut paused = ctx.paused.lock().unwrap_or_else(|p| p.into_inner());
    for entry in ctx.directory.iter() {
        let key = entry.key().clone();
        let in_window = entry.shared.in_window();
        if !paused.contains_key(&key) {
            if in_window >= max {
                pause_in(consumer, &key, &mut paused);
            }
            continue;
        }
        if in_window > resume_at {
            continue;
        }
        let client = ctx.client(consumer, &key.0);
        if let Some(Some(first_held_back)) = paused.get(&key) {
            if let Err(e) = client.seek_partition(&key.0, key.1, Offset::Offset(*first_held_back)) {
                // Resuming without the seek would skip what was held back: stay paused.
                tracing::warn!(topic = %key.0, partition = key.1, error = %e, "Seek before resume failed; retrying.");
                continue;
            }
        }
        if client.resume_partitions(&tpl_of(std::slice::from_ref(&key))).is_ok() {
            paused.remove(&key);
        }
    }
}

/// Pauses a partition whose window is full (not paused yet: its messages would have been
/// held back); whether it is paused now.
fn pause(consumer: &BaseConsumer<LoopContext>, key: &PartitionKey) -> bool {
    let mut paused = consumer.context().paused.lock().unwrap_or_else(|p| p.into_inner());
    pause_in(consumer, key, &mut paused)
}

/// [`pause`] with the paused partitions at hand.
fn pause_in(
    consumer: &BaseConsumer<LoopContext>,
    key: &PartitionKey,
    paused: &mut HashMap<PartitionKey, Option<i64>>,
) -> bool {
    let client = consumer.context().client(consumer, &key.0);
    if client.pause_partitions(&tpl_of(std::slice::from_ref(key))).is_err() {
        return false;
    }
    metrics::counter!(metric::PARTITION_PAUSES, "topic" => key.0.to_string()).increment(1);
    paused.insert(key.clone(), None);
    true
}

/// Whether a message must be held back because its partition is paused; remembers the
/// first such offset so the partition resumes from there.
fn hold_back(ctx: &LoopContext, key: &PartitionKey, offset: i64) -> bool {
    let mut paused = ctx.paused.lock().unwrap_or_else(|p| p.into_inner());
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

#[cfg(test)]
mod tests {
    use super::*;

    fn kafka(client: &str) -> KafkaConfig {
        let text = format!(
            r#"
            [kafka]
            bootstrap_servers = "b1:9093"
            group_id = "g"
            input_topics = ["in"]
            dlq_topic = "dlq"
            failures_topic = "failures"
            state_topic = "state"
            [kafka.client]
            {client}
            [[tenants]]
            name = "acme"
            crm = "salesforce"
            [tenants.salesforce]
            base_url = "https://acme.my.salesforce.com"
            client_id = "i"
            client_secret = "s"
            [tenants.entities.contact]
            object = "Contact"
            external_id_field = "External_Id__c"
            fields = {{ LastName = "last_name" }}
            "#
        );
        crate::config::Config::from_toml(&text).unwrap().kafka
    }

    #[test]
    fn tls_without_a_named_ca_trusts_the_systems_cas() {
        let probe = |client: &str| probe_for_cas(&kafka(client), |_| false);
        assert!(probe(r#""security.protocol" = "SASL_SSL""#));
        assert!(probe(r#""security.protocol" = "ssl""#));
        assert!(!probe(
            "\"security.protocol\" = \"SSL\"\n\"ssl.ca.location\" = \"/etc/ca.pem\""
        ));
        assert!(!probe("\"security.protocol\" = \"SSL\"\n\"ssl.ca.pem\" = \"PEM\""));
        assert!(!probe(r#""security.protocol" = "SASL_PLAINTEXT""#));
        assert!(!probe(""));
        // A bundle named by OpenSSL's variables is used as OpenSSL would.
        let sasl_ssl = kafka(r#""security.protocol" = "SASL_SSL""#);
        assert!(!probe_for_cas(&sasl_ssl, |var| var == "SSL_CERT_FILE"));
        assert!(!probe_for_cas(&sasl_ssl, |var| var == "SSL_CERT_DIR"));
        // What is named reaches the client's settings.
        let explicit = kafka("\"security.protocol\" = \"SSL\"\n\"ssl.ca.location\" = \"/etc/ca.pem\"");
        assert_eq!(client_config(&explicit).get("ssl.ca.location"), Some("/etc/ca.pem"));
    }
}
