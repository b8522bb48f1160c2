//! One supervised [`PartitionActor`] per assigned partition.
//!
//! It takes the partition's messages in offset order, a batch ([`Records`]) at a time:
//! decode (a bad message is dead-lettered and the partition moves on), an early diff
//! check of the whole batch in one message (duplicates and stale versions end here), then
//! hand-off of each tenant's events in one message with `send().await`, so a slow tenant
//! slows intake instead of growing memory. A batch costs the same few actor messages as
//! a single event did; per event they were the ceiling of the pipeline. Outcomes come
//! back in any order; the [`OffsetTracker`] turns them into the watermark the consumer
//! thread stores and commits. The window, `max_in_flight_per_partition`, counts the
//! undecided events and the messages handed to the actor and not yet taken in: the
//! consumer thread starts no batch (≤ 512 messages) without room for one more message,
//! pauses the partition when the window is full and resumes it once a quarter of it is
//! free (it alone decides, from the counts this actor publishes).
//!
//! On restart the actor forgets what it held and asks the consumer thread to seek the
//! partition back to its last watermark: everything undecided is read from Kafka again
//! (messages still in the mailbox from before the seek are ignored until the consumer's
//! [`Resync`] marker arrives).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::SystemTime;

use actix::prelude::*;

use super::offsets::OffsetTracker;
use super::ConsumerCommand;
use crate::dead_letter::{DeadLetters, Failure, SourceMessage};
use crate::diff::{Check, CheckMode, CheckResult, Checks, DiffActor, Verdict};
use crate::event::{self, event_id_fingerprint, DecodeError, Event, Routes};
use crate::messages::{Deliver, OutcomeKind, Outcomes, PartitionLink, PartitionShared, Redispatch, Sending, Work};
use crate::offload;
use crate::retry::topic::{header as retry_header, BadRetryHeader, Parked, RetryRoute};
use crate::supervise::{self, InjectPanic};
use crate::telemetry::metric;
use crate::trail::{Entry, Status};

/// Messages from Kafka for this partition, in offset order.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Records(pub Vec<SourceMessage>);

/// Sent by the consumer thread after it seeked the partition for generation `generation`;
/// messages before it predate the seek.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "()")]
pub struct Resync {
    pub generation: u64,
}

/// Answer on `done` once nothing is undecided (the consumer thread bounds the wait).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Drain {
    pub done: mpsc::Sender<()>,
}

/// Stop for good: the partition was revoked or the service is shutting down.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "()")]
pub struct Retire;

/// What every partition actor needs.
pub struct PartitionDeps {
    pub routes: Arc<dyn Routes + Send + Sync>,
    /// Where each tenant's events go.
    pub tenants: HashMap<Arc<str>, Recipient<Deliver>>,
    pub diff: Addr<DiffActor>,
    pub dead_letters: DeadLetters,
    /// The status and audit topics, written before an outcome is published.
    pub trail: crate::trail::Trail,
    /// The retry topic's route: its partitions' messages are checked against it.
    pub retry: Option<RetryRoute>,
    pub max_message_bytes: usize,
    pub max_in_flight: usize,
    /// Undecided events of one partition that one tenant may hold while the window is
    /// under pressure (half full or more); past it, its new events are handed in marked
    /// [`Work::over_share`], and the tenant parks them instead of holding them, so that a
    /// slow tenant cannot fill the window and pause the partition for the others.
    pub tenant_share: usize,
    /// Requests to the consumer thread (seek after restart).
    pub commands: mpsc::Sender<ConsumerCommand>,
    /// Each tenant's held records (`connectors::holds`), where holds read back from the
    /// state topic are taken up.
    pub holds: HashMap<Arc<str>, Arc<crate::connectors::holds::Holds>>,
}

pub struct PartitionActor {
    topic: Arc<str>,
    partition: i32,
    deps: Arc<PartitionDeps>,
    shared: Arc<PartitionShared>,
    /// Bumped on every restart; outcomes of an older generation are ignored.
    generation: u64,
    /// After a restart: ignore messages until the consumer's `Resync` for this generation.
    awaiting_resync: bool,
    tracker: OffsetTracker,
    /// Undecided events already handed to a tenant, for re-dispatch after its restart.
    dispatched: BTreeMap<i64, Work>,
    /// Events of `dispatched` by tenant: what each tenant holds of the window.
    held: HashMap<Arc<str>, usize>,
    /// Drain requests to answer once nothing is undecided. Dropping them answers "gone".
    drain_waiters: Vec<mpsc::Sender<()>>,
    retired: bool,
    panic_next: bool,
    /// Metric handles of this partition, registered once (not per event).
    consumed: metrics::Counter,
    in_flight_gauge: crate::telemetry::PartitionGauge,
}

impl PartitionActor {
    pub fn new(topic: Arc<str>, partition: i32, deps: Arc<PartitionDeps>, shared: Arc<PartitionShared>) -> Self {
        PartitionActor {
            partition,
            deps,
            shared,
            generation: 0,
            awaiting_resync: false,
            tracker: OffsetTracker::new(),
            dispatched: BTreeMap::new(),
            held: HashMap::new(),
            drain_waiters: Vec::new(),
            retired: false,
            panic_next: false,
            consumed: metrics::counter!(metric::EVENTS_CONSUMED, "topic" => topic.to_string()),
            in_flight_gauge: crate::telemetry::partitions().gauge(metric::IN_FLIGHT, &topic, partition),
            topic,
        }
    }

    /// Where the outcomes of this generation's events go; `intake` sets each event's
    /// offset.
    fn link(&self, ctx: &Context<Self>) -> PartitionLink {
        PartitionLink {
            recipient: ctx.address().downgrade().recipient(),
            generation: self.generation,
            offset: -1,
            partition: self.shared.clone(),
        }
    }

    /// Records a final outcome; the caller publishes the new watermark.
    fn finish(&mut self, offset: i64) {
        if self.tracker.finished(offset) {
            if let Some(work) = self.dispatched.remove(&offset) {
                if let Some(n) = self.held.get_mut(&work.event.record.tenant) {
                    *n = n.saturating_sub(1);
                }
            }
        }
    }

    fn publish(&mut self) {
        if let Some(wm) = self.tracker.watermark() {
            self.shared.watermark.store(wm, Ordering::Release);
            self.shared.drop_dead_lettered_below(wm);
        }
        let in_flight = self.tracker.in_flight();
        self.shared.in_flight.store(in_flight, Ordering::Relaxed);
        // With one tenant there is nobody to make room for. With more, a window held by
        // one of them pauses the partition for all, and their events wait unseen in
        // Kafka (so whether they hold events here says nothing).
        let shared_window = self.deps.tenant_share < self.deps.max_in_flight;
        self.shared.pressure.store(
            shared_window && 2 * in_flight >= self.deps.max_in_flight,
            Ordering::Relaxed,
        );
        self.in_flight_gauge.set(in_flight as f64);
        if in_flight == 0 {
            for waiter in self.drain_waiters.drain(..) {
                let _ = waiter.send(());
            }
        }
    }
}

impl Actor for PartitionActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // One batch waiting, and one more past capacity from the consumer thread (its
        // only sender); both count in the window (`PartitionShared::queued`).
        ctx.set_mailbox_capacity(1);
    }
}

impl Supervised for PartitionActor {
    fn restarting(&mut self, _: &mut Self::Context) {
        if self.retired {
            return;
        }
        supervise::restarted("partition");
        self.generation += 1;
        self.tracker = OffsetTracker::new();
        self.dispatched.clear();
        self.held.clear();
        self.panic_next = false;
        let watermark = self.shared.watermark.load(Ordering::Acquire);
        self.shared.in_flight.store(0, Ordering::Relaxed);
        if watermark >= 0 {
            // Read everything undecided again from Kafka.
            self.awaiting_resync = true;
            let _ = self.deps.commands.send(ConsumerCommand::Seek {
                topic: self.topic.clone(),
                partition: self.partition,
                offset: watermark,
                generation: self.generation,
            });
        }
    }
}

impl Handler<Records> for PartitionActor {
    type Result = AtomicResponse<Self, ()>;

    /// One batch at a time, in offset order: decode each message, ask the diff actor about
    /// all of them in one message, then hand each tenant its events in one message.
    fn handle(&mut self, Records(messages): Records, ctx: &mut Self::Context) -> Self::Result {
        let handed = messages.len();
        if self.awaiting_resync || self.retired {
            self.shared.taken_in(handed);
            return AtomicResponse::new(Box::pin(fut::ready(())));
        }
        let messages: Vec<SourceMessage> = messages
            .into_iter()
            .filter(|m| self.tracker.received(m.offset))
            .collect();
        // Counted as undecided before they stop counting as on their way in, so that the
        // window never looks emptier than it is to the consumer thread (the batch is
        // published again once handled).
        self.shared.in_flight.store(self.tracker.in_flight(), Ordering::Release);
        self.shared.taken_in(handed);
        if messages.is_empty() {
            return AtomicResponse::new(Box::pin(fut::ready(())));
        }
        self.consumed.increment(messages.len() as u64);
        if self.shared.watermark.load(Ordering::Acquire) < 0 {
            // Dead-letter markers below the first offset read are of committed messages:
            // deleted, so that the state topic does not keep one for every message ever
            // dead-lettered.
            let obsolete = self.shared.forget_dead_lettered_below(messages[0].offset);
            // The first messages: publish where this partition starts, so that a restart
            // before any outcome still knows where to re-read from.
            self.publish();
            if !obsolete.is_empty() {
                let (sink, topic, partition) = (self.deps.dead_letters.clone(), self.topic.clone(), self.partition);
                // Fire and forget: a marker left behind is only read and dropped again.
                drop(offload::spawn(async move {
                    sink.forget_dead_lettered(&topic, partition, obsolete).await
                }));
            }
        }
        let inject_panic = std::mem::take(&mut self.panic_next);
        let from_retry = self.deps.retry.as_ref().is_some_and(|r| *r.topic == *self.topic);
        let window = Window {
            in_flight: self.tracker.in_flight(),
            held: self.held.clone(),
        };
        let span = tracing::info_span!(
            "intake",
            topic = %self.topic,
            partition = self.partition,
            messages = messages.len(),
            from_retry
        );
        let work = tracing::Instrument::instrument(
            intake(
                messages,
                from_retry,
                window,
                self.link(ctx),
                self.deps.clone(),
                inject_panic,
            ),
            span,
        );
        let guarded = supervise::catch_future("partition", work);
        AtomicResponse::new(Box::pin(guarded.into_actor(self).map(|steps, act, ctx| {
            let Ok(steps) = steps else {
                ctx.stop();
                return;
            };
            for (offset, step) in steps {
                match step {
                    Step::Done(kind, event) => {
                        if let (OutcomeKind::Skipped(_), Some(e)) = (kind, event) {
                            metrics::counter!(metric::OUTCOMES, "tenant" => e.record.tenant.to_string(), "outcome" => kind.as_str())
                                .increment(1);
                        }
                        act.finish(offset);
                    }
                    Step::Dispatched(work) => {
                        if act.tracker.is_pending(offset) {
                            *act.held.entry(work.event.record.tenant.clone()).or_default() += 1;
                            act.dispatched.insert(offset, work);
                        }
                    }
                }
            }
            act.publish();
        })))
    }
}

/// The partition's window when a batch came in: undecided events (the batch included),
/// and how many of them each tenant holds.
struct Window {
    in_flight: usize,
    held: HashMap<Arc<str>, usize>,
}

impl Window {
    /// Counts one more event for `tenant`; whether it is past the tenant's share while
    /// the window is under pressure.
    fn take(&mut self, tenant: &Arc<str>, deps: &PartitionDeps) -> bool {
        let held = self.held.entry(tenant.clone()).or_default();
        *held += 1;
        *held > deps.tenant_share && 2 * self.in_flight >= deps.max_in_flight
    }
}

/// What became of one offset of a batch.
enum Step {
    Done(OutcomeKind, Option<Arc<Event>>),
    Dispatched(Work),
}

/// One batch on its way in: decoded (on the I/O runtime, off the actor thread), bad
/// messages dead-lettered, duplicates and stale versions ended, the rest handed to their
/// tenants. Messages of a retry partition are first checked against the retry route
/// (their origin and retry state are only trusted from there); one parked for another
/// retry partition is forwarded to it. Returns each offset's step.
async fn intake(
    messages: Vec<SourceMessage>,
    from_retry: bool,
    mut window: Window,
    link: PartitionLink,
    deps: Arc<PartitionDeps>,
    inject_panic: bool,
) -> Vec<(i64, Step)> {
    if inject_panic {
        panic!("injected panic in partition actor");
    }
    let (routes, max_bytes) = (deps.routes.clone(), deps.max_message_bytes);
    let route = deps.retry.clone().filter(|_| from_retry);
    let items = offload::spawn(async move {
        let now = SystemTime::now();
        messages
            .into_iter()
            .map(|mut m| {
                let parked = match &route {
                    Some(route) => route.read(&m.headers, m.partition, now).map(Some),
                    None => Ok(None),
                };
                // `Ok(None)`: parked for another retry partition, to be forwarded there.
                // Size counts key and headers too: all of it is written again if the
                // event is parked or dead-lettered.
                let size = m.wire_size();
                let decoded = match parked {
                    _ if size > max_bytes => Err(DecodeError::TooLarge { size, limit: max_bytes }),
                    Err(e) => Err(e.into()),
                    Ok(None) => event::decode(m.payload.as_deref(), max_bytes, &*routes).map(Some),
                    Ok(Some(Parked::Here(origin, state))) => {
                        (m.origin, m.retried) = (origin, Some(state));
                        event::decode(m.payload.as_deref(), max_bytes, &*routes).map(Some)
                    }
                    Ok(Some(Parked::Elsewhere(origin, state))) => {
                        (m.origin, m.retried) = (origin, Some(state));
                        Ok(None)
                    }
                };
                (Arc::new(m), decoded)
            })
            .collect::<Vec<_>>()
    })
    .await
    // The runtime is shutting down: so is the service; nothing here was committed.
    .unwrap_or_else(|e| panic!("decode task failed: {e}"));
    let mut steps = Vec::with_capacity(items.len());
    // Final outcomes decided here, for the status and audit topics.
    let mut trail: Vec<Entry> = Vec::new();
    let mut decoded = Vec::with_capacity(items.len());
    for (source, result) in items {
        let link = PartitionLink {
            offset: source.offset,
            ..link.clone()
        };
        match result {
            Ok(Some(e)) => decoded.push((Arc::new(e), source, link)),
            Ok(None) => {
                // Parked for another retry partition: forwarded there. One that cannot be
                // written there (its origin has no retry partition any more) is
                // dead-lettered, as a retry message with a bad origin.
                // Counted first, then checked (see `Sending`): a revoke waits for it.
                let guard = Sending::new(vec![link.partition.clone()]);
                let forwarded = match source.retried {
                    _ if !link.is_live() => true, // handed over: the next owner forwards it
                    Some(state) => deps.dead_letters.park(&source, state).await.is_ok(),
                    None => false,
                };
                drop(guard);
                if forwarded {
                    steps.push((link.offset, Step::Done(OutcomeKind::Parked, None)));
                } else {
                    let e = DecodeError::from(BadRetryHeader(retry_header::ORIGIN_PARTITION));
                    dead_letter_undecodable(&deps, &source, &link, &e).await;
                    steps.push((link.offset, Step::Done(OutcomeKind::DeadLettered, None)));
                    if link.is_live() {
                        trail.push(undecodable(&source, &e));
                    }
                }
            }
            Err(e) => {
                dead_letter_undecodable(&deps, &source, &link, &e).await;
                steps.push((link.offset, Step::Done(OutcomeKind::DeadLettered, None)));
                if link.is_live() {
                    trail.push(undecodable(&source, &e));
                }
            }
        }
    }
    if decoded.is_empty() {
        deps.trail.record(&trail).await;
        return steps;
    }
    let checks = decoded
        .iter()
        .map(|(event, _, _)| Check {
            record: event.record.clone(),
            mode: CheckMode::Early,
            op: event.op,
            version: event.version,
            event: event_id_fingerprint(&event.event_id),
            payload: None,
        })
        .collect();
    // Without an answer (the diff actor restarting), every event goes on: the tenant
    // checks again before writing.
    let verdicts = deps.diff.send(Checks(checks)).await.unwrap_or_default();
    // Per tenant, in offset order; a partition feeds few tenants.
    let mut by_tenant: Vec<(&Arc<str>, &Recipient<Deliver>, Vec<Work>)> = Vec::new();
    for (i, (event, source, link)) in decoded.into_iter().enumerate() {
        if let Some(CheckResult {
            verdict: Verdict::Skip(reason),
            ..
        }) = verdicts.get(i)
        {
            if link.is_live() {
                trail.push(Entry {
                    event: Some(event.clone()),
                    source: source.origin.clone(),
                    status: Status::Skipped(*reason),
                    attempts: source.retried.map_or(0, |r| r.attempts),
                    first_seen: source.read_at,
                    last_attempt: None,
                    error: None,
                    at: SystemTime::now(),
                });
            }
            steps.push((link.offset, Step::Done(OutcomeKind::Skipped(*reason), Some(event))));
            continue;
        }
        let Some((name, tenant)) = deps.tenants.get_key_value(&event.record.tenant) else {
            unreachable!("decode only accepts configured tenants")
        };
        let over_share = window.take(&event.record.tenant, &deps);
        let work = Work {
            event,
            source,
            reply: link,
            over_share,
        };
        match by_tenant.iter_mut().find(|(n, _, _)| *n == name) {
            Some((_, _, works)) => works.push(work),
            None => by_tenant.push((name, tenant, vec![work])),
        }
    }
    for (_, tenant, works) in by_tenant {
        // send().await: a full tenant mailbox holds this partition back. An error means
        // the tenant is restarting; it will ask for a re-dispatch.
        let _ = tenant.send(Deliver(works.clone())).await;
        steps.extend(works.into_iter().map(|w| (w.reply.offset, Step::Dispatched(w))));
    }
    deps.trail.record(&trail).await;
    steps
}

/// The trail's line for a message that did not become an event.
fn undecodable(source: &SourceMessage, e: &DecodeError) -> Entry {
    Entry {
        event: None,
        source: source.origin.clone(),
        status: Status::DeadLettered,
        attempts: 0,
        first_seen: source.read_at,
        last_attempt: None,
        error: Some((e.code(), e.to_string())),
        at: SystemTime::now(),
    }
}

/// Dead-letters a message that could not become an event, unless it was dead-lettered
/// before (by a previous owner that crashed before committing, or by this partition
/// before a restart) or its partition was just handed over (the next owner does it).
async fn dead_letter_undecodable(deps: &PartitionDeps, source: &SourceMessage, link: &PartitionLink, e: &DecodeError) {
    // Counted first, then checked (see `Sending`): a revoke waits for this write.
    let _guard = Sending::new(vec![link.partition.clone()]);
    if !link.is_live() || link.partition.was_dead_lettered(link.offset) {
        return;
    }
    metrics::counter!(metric::DECODE_ERRORS, "reason" => e.code()).increment(1);
    let now = SystemTime::now();
    let failure = Failure {
        stage: "decode",
        code: e.code(),
        class: "permanent",
        http_status: None,
        crm_code: None,
        message: e.to_string(),
        attempts: 0,
        first_failure: now,
        last_failure: now,
    };
    deps.dead_letters.dead_letter(source, None, &failure).await;
    link.partition.remember_dead_lettered([link.offset]);
}

impl Handler<Outcomes> for PartitionActor {
    type Result = ();

    fn handle(&mut self, msg: Outcomes, _: &mut Self::Context) {
        if msg.generation != self.generation {
            return;
        }
        for offset in msg.offsets {
            self.finish(offset);
        }
        self.publish();
    }
}

impl Handler<Redispatch> for PartitionActor {
    type Result = ();

    fn handle(&mut self, msg: Redispatch, _: &mut Self::Context) {
        let Some(tenant) = self.deps.tenants.get(&msg.tenant) else {
            return;
        };
        let works: Vec<Work> = self
            .dispatched
            .values()
            .filter(|w| w.event.record.tenant == msg.tenant)
            .cloned()
            .collect();
        if !works.is_empty() {
            // do_send: this is recovery of a bounded set, not intake.
            tenant.do_send(Deliver(works));
        }
    }
}

impl Handler<Resync> for PartitionActor {
    type Result = ();

    fn handle(&mut self, msg: Resync, _: &mut Self::Context) {
        if msg.generation == self.generation {
            self.awaiting_resync = false;
        }
    }
}

impl Handler<Drain> for PartitionActor {
    type Result = ();

    fn handle(&mut self, msg: Drain, _: &mut Self::Context) {
        if self.tracker.in_flight() == 0 {
            let _ = msg.done.send(());
        } else {
            self.drain_waiters.push(msg.done);
        }
    }
}

impl Handler<Retire> for PartitionActor {
    type Result = ();

    fn handle(&mut self, _: Retire, ctx: &mut Self::Context) {
        self.retired = true;
        ctx.stop();
    }
}

impl Handler<InjectPanic> for PartitionActor {
    type Result = ();

    fn handle(&mut self, _: InjectPanic, _: &mut Self::Context) {
        self.panic_next = true;
    }
}
