//! The failure notifier: tells people what the failures topic says.
//!
//! It reads the failures topic in a consumer group of its own (`notifier.group_id`, by
//! default `{kafka.group_id}.notifier`, so its members share the partitions as the
//! service's do), folds the events into notifications ([`coalesce`]) and hands each to
//! the endpoints concerned: the tenant's `webhooks` and the operators'
//! `notifier.endpoints`. Each endpoint has its own delivery task ([`delivery`]), which
//! signs per Standard Webhooks ([`signing`]), retries, and dead-letters what it cannot
//! deliver.
//!
//! Promise: a failure event's offset is committed only once every notification that
//! stands for it has been delivered to, or dead-lettered for, every endpoint concerned.
//! Each event is held by a count of what still stands for it ([`Holds`]); the committed
//! offset of a partition is its lowest held offset. A crash re-reads what was not
//! committed: a receiver may get a notification twice, with the same `webhook-id`.
//!
//! Memory is bounded: endpoint queues are bounded (see [`delivery`]; a failing endpoint
//! sheds what it holds past its share of [`MAX_HELD`]), summaries keep a few samples,
//! and reading waits while [`MAX_HELD`] failure events are undecided or a working
//! endpoint has its fill.
//!
//! Supervision: the notifier runs as one task that a loop restarts (fresh state, from the
//! committed offsets) after a panic or an error in it or in a delivery task.

pub mod coalesce;
pub mod delivery;
pub mod signing;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::producer::FutureProducer;
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};
use tokio::task::JoinSet;

use crate::config::{Config, WebhookConfig};
use crate::consume;
use crate::telemetry::{self, metric, Health};
use coalesce::{Coalescer, Limits, Notification, Source};
use delivery::{Delivery, Endpoint, Load};
use signing::SigningKey;

/// Failure events held (undecided) at most before reading pauses.
pub const MAX_HELD: usize = 100_000;

/// How often held offsets are committed.
const COMMIT_INTERVAL: Duration = Duration::from_secs(1);

/// Counts, per failure-topic partition, of what still stands for each event read.
///
/// A partition that is revoked is forgotten and its generation goes up: what was held in
/// the earlier assignment (a summary still folding, a delivery still under way) neither
/// holds nor releases anything in the next one, so it can neither pin nor advance the
/// commit point of a partition that came back; the next owner re-reads what was not
/// committed.
#[derive(Debug, Default)]
struct Holds {
    partitions: HashMap<i32, PartitionHolds>,
    generations: HashMap<i32, u64>,
}

#[derive(Debug, Default)]
struct PartitionHolds {
    counts: BTreeMap<i64, u32>,
    /// One past the highest offset read.
    next: i64,
}

impl Holds {
    /// The generation of `partition`'s current assignment.
    fn generation(&self, partition: i32) -> u64 {
        self.generations.get(&partition).copied().unwrap_or(0)
    }

    fn hold(&mut self, (partition, offset, generation): Source) {
        if generation != self.generation(partition) {
            return;
        }
        let p = self.partitions.entry(partition).or_default();
        *p.counts.entry(offset).or_default() += 1;
        p.next = p.next.max(offset + 1);
    }

    /// Holds a message just read, unless this assignment has read it already: whatever
    /// the consumer hands out twice, one assignment holds it once.
    fn read(&mut self, source: Source) -> bool {
        let (partition, offset, _) = source;
        if self.partitions.get(&partition).is_some_and(|p| offset < p.next) {
            return false;
        }
        self.hold(source);
        true
    }

    fn release(&mut self, (partition, offset, generation): Source) {
        if generation != self.generation(partition) {
            return;
        }
        if let Some(p) = self.partitions.get_mut(&partition) {
            if let Some(n) = p.counts.get_mut(&offset) {
                *n -= 1;
                if *n == 0 {
                    p.counts.remove(&offset);
                }
            }
        }
    }

    fn len(&self) -> usize {
        self.partitions.values().map(|p| p.counts.len()).sum()
    }

    /// Forgets a partition (revoked), returning its commit point.
    fn forget(&mut self, partition: i32) -> Option<i64> {
        *self.generations.entry(partition).or_default() += 1;
        let p = self.partitions.remove(&partition)?;
        Some(p.counts.keys().next().copied().unwrap_or(p.next))
    }

    /// Each partition read with its commit point: the lowest held offset, or one past the
    /// highest read when nothing is held.
    fn commit_points(&self) -> Vec<(i32, i64)> {
        self.partitions
            .iter()
            .map(|(&partition, p)| (partition, p.counts.keys().next().copied().unwrap_or(p.next)))
            .collect()
    }
}

fn lock(holds: &Mutex<Holds>) -> MutexGuard<'_, Holds> {
    holds.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The notifier consumer's rebalance hook: a partition that goes to another member has
/// its commit point committed, and its holds are forgotten (see [`Holds`]), so that a
/// commit point of the earlier assignment is never committed over the next owner's
/// progress.
struct Rebalancing {
    holds: Arc<Mutex<Holds>>,
    topic: String,
}

impl ClientContext for Rebalancing {}

impl ConsumerContext for Rebalancing {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(revoked) = rebalance else {
            return;
        };
        let mut holds = lock(&self.holds);
        let mut list = TopicPartitionList::new();
        for element in revoked.elements_for_topic(&self.topic) {
            if let Some(point) = holds.forget(element.partition()) {
                let _ = list.add_partition_offset(&self.topic, element.partition(), Offset::Offset(point));
            }
        }
        if list.count() > 0 {
            if let Err(e) = consumer.commit(&list, CommitMode::Sync) {
                tracing::warn!(error = %e, "Could not commit the notifier's revoked partitions.");
            }
        }
    }
}

/// Who is told about what.
struct Routes {
    /// Endpoints of each tenant.
    tenants: HashMap<String, Vec<usize>>,
    /// The operators' endpoints: told about everything.
    operators: Vec<usize>,
    senders: Vec<(UnboundedSender<Arc<Notification>>, Arc<Load>)>,
    max_queued: usize,
}

impl Routes {
    fn of(&self, tenant: Option<&str>) -> impl Iterator<Item = &(UnboundedSender<Arc<Notification>>, Arc<Load>)> {
        let own = tenant.and_then(|t| self.tenants.get(t)).into_iter().flatten();
        own.chain(&self.operators).map(|&i| &self.senders[i])
    }

    fn any(&self, tenant: Option<&str>) -> bool {
        self.of(tenant).next().is_some()
    }

    /// A configured tenant's name as the routes know it; `None` for any other (input
    /// that named no tenant, or one this configuration does not have), so that what is
    /// kept per tenant stays bounded by the configuration.
    fn tenant(&self, tenant: Option<String>) -> Option<String> {
        tenant.filter(|t| self.tenants.contains_key(t))
    }

    /// Whether reading should wait for an endpoint: one that is not failing has its fill
    /// (it is slow), or any has twice its fill (its task is stuck in a long attempt or in
    /// writing to the dead-letter topic).
    fn slow(&self) -> bool {
        self.senders.iter().any(|(_, load)| {
            let outstanding = load.outstanding.load(Ordering::SeqCst);
            (outstanding >= self.max_queued && !load.failing.load(Ordering::SeqCst))
                || outstanding >= 2 * self.max_queued
        })
    }
}

/// What the handle, the supervisor and each life of the notifier share.
#[derive(Default)]
struct Control {
    stop: tokio::sync::Notify,
    stopping: AtomicBool,
    /// Fault injection: the next message read panics the notifier.
    inject_panic: AtomicBool,
    /// Ready while a life of the notifier runs.
    health: Health,
}

/// A running notifier.
pub struct NotifierHandle {
    control: Arc<Control>,
    thread: std::thread::JoinHandle<()>,
    http_addr: Option<std::net::SocketAddr>,
}

impl NotifierHandle {
    /// Makes the notifier panic at the next message it reads (fault injection); its
    /// supervisor starts it again from the committed offsets.
    pub fn inject_panic(&self) {
        self.control.inject_panic.store(true, Ordering::SeqCst);
    }

    /// Whether a life of the notifier is running (not between a failure and its restart).
    pub fn is_ready(&self) -> bool {
        self.control.health.is_ready()
    }

    /// Address of `/metrics` and the health endpoints when it serves them (alone).
    pub fn http_addr(&self) -> Option<std::net::SocketAddr> {
        self.http_addr
    }

    /// Stops reading, commits what is decided, and waits for the thread up to `deadline`.
    /// Notifications still queued are read again on the next start.
    pub fn stop(self, deadline: Duration) -> bool {
        self.control.stopping.store(true, Ordering::SeqCst);
        self.control.stop.notify_one();
        let until = Instant::now() + deadline;
        while !self.thread.is_finished() {
            if Instant::now() >= until {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20)); // polling cadence; the deadline bounds the wait
        }
        self.thread.join().is_ok()
    }
}

/// Starts the notifier on its own thread; `None` if no endpoint is configured.
/// `serve_http` serves `/metrics` and the health endpoints (for `crm-sync notify`, where
/// the pipeline does not).
pub fn start(config: &Config, serve_http: bool) -> anyhow::Result<Option<NotifierHandle>> {
    if !config.notifier.has_endpoints(&config.tenants) {
        tracing::info!("No webhook endpoint configured; the notifier does not run.");
        return Ok(None);
    }
    crate::telemetry::prometheus();
    for kind in ["dead_lettered", "tenant_state", "unreadable", "read_error"] {
        metrics::counter!(metric::NOTIFIER_EVENTS, "kind" => kind).increment(0);
    }
    let config = Arc::new(config.clone());
    let control = Arc::new(Control::default());
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let thread_control = control.clone();
    let thread = std::thread::Builder::new()
        .name("crm-sync-notifier".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(r) => r,
                Err(e) => {
                    let _ = started_tx.send(Err(anyhow::anyhow!("cannot start the notifier's runtime: {e}")));
                    return;
                }
            };
            runtime.block_on(supervise(config, serve_http, thread_control, started_tx));
        })?;
    let http_addr = started_rx
        .recv()
        .map_err(|_| anyhow::anyhow!("the notifier thread ended before it started"))??;
    Ok(Some(NotifierHandle {
        control,
        thread,
        http_addr,
    }))
}

type Started = std::sync::mpsc::Sender<anyhow::Result<Option<std::net::SocketAddr>>>;

/// Runs the notifier, restarting it after a panic or an error, until stopped.
async fn supervise(config: Arc<Config>, serve_http: bool, control: Arc<Control>, started: Started) {
    let http = if serve_http {
        match telemetry::serve(&config.service.http_addr, control.health.clone()).await {
            Ok((addr, task)) => Some((addr, task)),
            Err(e) => {
                let _ = started.send(Err(anyhow::anyhow!(
                    "cannot serve metrics on {}: {e}",
                    config.service.http_addr
                )));
                return;
            }
        }
    } else {
        None
    };
    if config.kafka.create_topics {
        let topics = [config.notifier.dlq_topic.as_str()];
        if let Err(e) = crate::pipeline::create_topics(&config.kafka, &topics).await {
            tracing::warn!(error = %e, "Could not check or create the notifier's dead-letter topic.");
        }
    }
    let _ = started.send(Ok(http.as_ref().map(|(addr, _)| *addr)));
    loop {
        let task = tokio::spawn(run(config.clone(), control.clone()));
        let end = task.await;
        control.health.set_ready(false);
        if control.stopping.load(Ordering::SeqCst) {
            break;
        }
        match end {
            Ok(Ok(())) => break,
            Ok(Err(e)) => tracing::error!(error = %e, "The notifier failed; restarting it."),
            Err(_) => tracing::error!("The notifier panicked; restarting it."),
        }
        metrics::counter!(metric::ACTOR_RESTARTS, "actor" => "notifier").increment(1);
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            () = control.stop.notified() => break,
        }
    }
    if let Some((_, task)) = http {
        task.abort();
    }
}

fn endpoint(label: String, hook: &WebhookConfig) -> anyhow::Result<Endpoint> {
    let keys = hook
        .secrets
        .iter()
        .map(|s| SigningKey::parse(s.expose()).map_err(|why| anyhow::anyhow!("{label}: {why}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let url = reqwest::Url::parse(&hook.url).map_err(|_| anyhow::anyhow!("{label}: not a URL"))?;
    Ok(Endpoint { label, url, keys })
}

/// One life of the notifier: fresh state, from the committed offsets.
async fn run(config: Arc<Config>, control: Arc<Control>) -> anyhow::Result<()> {
    let n = &config.notifier;
    let kafka = &config.kafka;
    let group = n
        .group_id
        .clone()
        .unwrap_or_else(|| format!("{}.notifier", kafka.group_id));
    let holds = Arc::new(Mutex::new(Holds::default()));
    let context = Rebalancing {
        holds: holds.clone(),
        topic: kafka.failures_topic.clone(),
    };
    let consumer: StreamConsumer<Rebalancing> = consume::client_config(kafka)
        .set("group.id", &group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("session.timeout.ms", kafka.session_timeout_ms.to_string())
        .create_with_context(context)?;
    consumer.subscribe(&[kafka.failures_topic.as_str()])?;
    let producer: FutureProducer = consume::client_config(kafka)
        .set("acks", "all")
        .set("message.timeout.ms", "30000")
        .create()?;
    let delivery = Arc::new(Delivery {
        client: reqwest::Client::builder()
            .timeout(Duration::from_millis(n.request_timeout_ms))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("crm-sync/", env!("CARGO_PKG_VERSION")))
            .build()?,
        producer,
        dlq_topic: n.dlq_topic.clone(),
        base_delay: Duration::from_millis(n.retry_base_delay_ms),
        max_delay: Duration::from_millis(n.retry_max_delay_ms),
        give_up_after: Duration::from_millis(n.give_up_after_ms),
        max_queued: n.max_queued_per_endpoint,
        // A failing endpoint keeps no more than its share of what may be held, so that
        // failing endpoints alone never stop the reading.
        max_sources: MAX_HELD
            / (n.endpoints.len() + config.tenants.iter().map(|t| t.webhooks.len()).sum::<usize>() + 1),
    });

    let (done_tx, mut done_rx) = unbounded_channel::<Vec<Source>>();
    let mut tasks = JoinSet::new();
    let mut routes = Routes {
        tenants: HashMap::new(),
        operators: Vec::new(),
        senders: Vec::new(),
        max_queued: n.max_queued_per_endpoint,
    };
    let mut add = |label: String, hook: &WebhookConfig, routes: &mut Routes| -> anyhow::Result<usize> {
        let (tx, rx) = unbounded_channel();
        let load = Arc::new(Load::default());
        tasks.spawn(delivery::run(
            endpoint(label, hook)?,
            rx,
            done_tx.clone(),
            delivery.clone(),
            load.clone(),
        ));
        routes.senders.push((tx, load));
        Ok(routes.senders.len() - 1)
    };
    for (j, hook) in n.endpoints.iter().enumerate() {
        let i = add(format!("operators#{j}"), hook, &mut routes)?;
        routes.operators.push(i);
    }
    for tenant in &config.tenants {
        for (j, hook) in tenant.webhooks.iter().enumerate() {
            let i = add(format!("{}#{j}", tenant.name), hook, &mut routes)?;
            routes.tenants.entry(tenant.name.clone()).or_default().push(i);
        }
    }

    let mut coalescer = Coalescer::new(Limits {
        window: Duration::from_millis(n.coalesce_window_ms),
        per_record_limit: n.per_record_limit,
        samples: n.summary_samples,
        dlq_rate_per_minute: n.dlq_rate_per_minute,
    });
    let mut commit_tick = tokio::time::interval(COMMIT_INTERVAL);
    let dispatch = |notification: Notification, holds: &mut Holds| {
        let notification = Arc::new(notification);
        for (sender, load) in routes.of(notification.tenant.as_deref()) {
            for &source in &notification.sources {
                holds.hold(source);
            }
            load.outstanding.fetch_add(1, Ordering::SeqCst);
            load.sources.fetch_add(notification.sources.len(), Ordering::SeqCst);
            let _ = sender.send(notification.clone());
        }
    };
    control.health.set_ready(true);

    // Reading waits while too much is undecided or a working endpoint has its fill, and
    // for a second after a read error. While it waits the consumer is not polled, so a
    // rebalance is answered at the next read: a working endpoint frees a place within a
    // request timeout or becomes failing (and sheds), so the wait stays far below
    // max.poll.interval.ms. (Pausing the partitions instead, to go on polling, made the
    // mock broker time the group session out when done at every delivery.)
    let mut read_again_at: Option<tokio::time::Instant> = None;
    loop {
        let waiting = lock(&holds).len() >= MAX_HELD || routes.slow();
        let flush_at = coalescer.next_flush().map(tokio::time::Instant::from_std);
        tokio::select! {
            () = control.stop.notified() => break,
            () = async { tokio::time::sleep_until(read_again_at.expect("guarded")).await }, if read_again_at.is_some() => {
                read_again_at = None;
            }
            message = consumer.recv(), if read_again_at.is_none() && !waiting => {
                let message = match message {
                    Ok(m) => m,
                    Err(e) => {
                        // A missing topic, a broker away: librdkafka recovers; keep what
                        // is being delivered and read again in a second.
                        metrics::counter!(metric::NOTIFIER_EVENTS, "kind" => "read_error").increment(1);
                        tracing::warn!(error = %e, "The notifier could not read the failures topic; retrying.");
                        read_again_at = Some(tokio::time::Instant::now() + Duration::from_secs(1));
                        continue;
                    }
                };
                if control.inject_panic.swap(false, Ordering::SeqCst) {
                    panic!("injected fault in the notifier");
                }
                let mut holds = lock(&holds);
                let source = (message.partition(), message.offset(), holds.generation(message.partition()));
                if !holds.read(source) {
                    continue;
                }
                match coalesce::parse(message.payload().unwrap_or_default()) {
                    Err(why) => {
                        metrics::counter!(metric::NOTIFIER_EVENTS, "kind" => "unreadable").increment(1);
                        tracing::warn!(partition = source.0, offset = source.1, why, "A failures-topic message that is not a failure event; skipped.");
                        holds.release(source);
                    }
                    Ok(event) => {
                        let event = event.with_tenant(|t| routes.tenant(t));
                        metrics::counter!(metric::NOTIFIER_EVENTS, "kind" => event.kind()).increment(1);
                        if !routes.any(event.tenant()) {
                            holds.release(source);
                            continue;
                        }
                        let (now, folded) = coalescer.add(Instant::now(), source, event);
                        for notification in now {
                            dispatch(notification, &mut holds);
                        }
                        // A folded event stays held by its summary-to-be.
                        if !folded {
                            holds.release(source);
                        }
                    }
                }
            }
            Some(sources) = done_rx.recv() => {
                let mut holds = lock(&holds);
                for source in sources {
                    holds.release(source);
                }
            }
            () = async { tokio::time::sleep_until(flush_at.expect("guarded")).await }, if flush_at.is_some() => {
                let mut holds = lock(&holds);
                for summary in coalescer.flush_due(Instant::now()) {
                    let sources = summary.sources.clone();
                    dispatch(summary, &mut holds);
                    for source in sources {
                        holds.release(source);
                    }
                }
            }
            _ = commit_tick.tick() => commit(&consumer, &kafka.failures_topic, &lock(&holds), CommitMode::Async),
            ended = tasks.join_next() => {
                anyhow::bail!("a webhook delivery task ended: {:?}", ended.map(|r| r.err()));
            }
        }
        metrics::gauge!(metric::NOTIFIER_HELD).set(lock(&holds).len() as f64);
    }
    commit(&consumer, &kafka.failures_topic, &lock(&holds), CommitMode::Sync);
    Ok(())
}

/// Commits the commit points of the partitions this member owns. Every tick, moved or
/// not: an asynchronous commit that failed at the broker is then made good by the next.
fn commit(consumer: &StreamConsumer<Rebalancing>, topic: &str, holds: &Holds, mode: CommitMode) {
    let Ok(assigned) = consumer.assignment() else {
        return;
    };
    let mut list = TopicPartitionList::new();
    for (partition, offset) in holds.commit_points() {
        if assigned.find_partition(topic, partition).is_some() {
            let _ = list.add_partition_offset(topic, partition, Offset::Offset(offset));
        }
    }
    if list.count() == 0 {
        return;
    }
    if let Err(e) = consumer.commit(&list, mode) {
        metrics::counter!(metric::COMMIT_FAILURES).increment(1);
        tracing::warn!(error = %e, "Could not commit the notifier's offsets; retrying.");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_is_committed_past_only_when_nothing_stands_for_it() {
        let mut h = Holds::default();
        for o in 0..3 {
            h.hold((0, o, 0));
        }
        // Offset 1 goes to two endpoints.
        h.hold((0, 1, 0));
        h.release((0, 0, 0));
        h.release((0, 2, 0));
        assert_eq!(h.commit_points(), [(0, 1)]);
        h.release((0, 1, 0));
        assert_eq!(h.commit_points(), [(0, 1)], "still held for the other endpoint");
        h.release((0, 1, 0));
        assert_eq!(h.commit_points(), [(0, 3)]);
        assert_eq!(h.len(), 0);
    }

    #[test]
    fn what_an_earlier_assignment_held_neither_holds_nor_releases_after_it() {
        let mut h = Holds::default();
        // Offset 5 is on its way to two endpoints when the partition is revoked.
        h.hold((0, 5, 0));
        h.hold((0, 5, 0));
        assert_eq!(h.forget(0), Some(5));
        // The partition comes back; 5 is read again, to the same two endpoints.
        let g = h.generation(0);
        assert_eq!(g, 1);
        h.hold((0, 5, g));
        h.hold((0, 5, g));
        // The old copy reaches one endpoint, and an old summary is dispatched and released.
        h.release((0, 5, 0));
        h.hold((0, 9, 0));
        h.release((0, 9, 0));
        assert_eq!(h.commit_points(), [(0, 5)], "the new copies still hold 5");
        h.release((0, 5, g));
        assert_eq!(h.commit_points(), [(0, 5)]);
        h.release((0, 5, g));
        assert_eq!(h.commit_points(), [(0, 6)]);
        // A message this assignment has read already is not read twice.
        assert!(!h.read((0, 4, g)));
        assert!(h.read((0, 6, g)));
        assert_eq!(h.commit_points(), [(0, 6)]);
    }
}
