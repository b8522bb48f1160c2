//! Tenant stage: one supervised [`TenantActor`] per CRM tenant.
//!
//! Promises:
//! - **One write per record in flight.** A record's active write (sending, or waiting
//!   for a retry) holds its slot; the newest version that arrives meanwhile waits behind
//!   it and supersedes older waiting ones, so two versions never race to the CRM, and an
//!   older version than the active one is stale. These rules are the pure state machine
//!   of [`slots`], property-tested there; this actor carries out its decisions.
//! - **No call for what the CRM has.** Before a record's write starts, the diff actor is
//!   asked with [`CheckMode::Full`]; after the CRM accepts a write, it is told
//!   ([`Confirm`]) — never before.
//! - **Paced.** Requests go out through the rate limit, then the concurrency limit, then
//!   the connector (whose client applies the per-attempt timeout); retries go through the
//!   retry queue and the same path again. A CRM that asks for a pause pauses only this
//!   tenant.
//! - **Every event ends.** Each event handed in gets exactly one final outcome sent back
//!   to its partition (delivered, skipped with a reason, parked on the retry topic, or
//!   dead-lettered).
//! - **A stuck tenant lets go.** With a retry topic, a retry that would wait long (past
//!   `retry.in_memory_attempts`, or at least `retry.park_after_ms`) and writes waiting out
//!   a long pause are parked there, releasing their input offsets; they come back
//!   through the retry topic with their attempts and age, and wait there until due.
//!
//! On restart the actor forgets everything and asks every partition to hand its
//! undecided events for this tenant in again ([`Redispatch`](crate::messages::Redispatch)); nothing of them was
//! committed, so nothing is lost.

pub mod board;
pub mod breaker;
pub mod mapping;
pub mod pacing;
pub mod pauses;
pub mod slots;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use actix::prelude::*;
use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::config::{EntityConfig, TenantConfig};
use crate::connectors::{CallsDone, Connector, DeliveryError, WriteOk, WriteRequest};
use crate::dead_letter::{DeadLetters, Failure, SourceMessage};
use crate::diff::store::StateStore;
use crate::diff::{Check, CheckMode, CheckResult, Checks, Confirm, DiffActor, RecordState, SkipReason, Verdict};
use crate::event::{canonical_hash, event_id_fingerprint, Event, Op, PayloadHash, RecordKey};
use crate::messages::{Deliver, OutcomeKind, PartitionLink, Partitions, Sending, Work};
use crate::retry::topic::RetryState;
use crate::retry::{RearmRetries, RetryDecision, RetryDue, RetryPolicy, RetryQueueActor, Schedule};
use crate::supervise::{self, InjectPanic};
use crate::telemetry::{metric, outcome};
use crate::trail::Status;
use breaker::{tenant_failure, Breaker, Health, TenantFailure, Transition};
use pacing::Pacer;
use slots::{Arrival, Liveness, Phase, Slots};

/// Sends what this turn queued to other actors, in one message each: the diff checks of
/// records just started, and outcomes by partition.
#[derive(Debug, Message)]
#[rtype(result = "()")]
struct Flush;

/// What a tenant actor needs from the rest of the pipeline.
#[derive(Clone)]
pub struct TenantDeps {
    pub diff: Addr<DiffActor>,
    pub retry: Addr<RetryQueueActor>,
    pub dead_letters: DeadLetters,
    /// Where confirmed states become durable before an outcome is reported.
    pub state: StateStore,
    /// Every live partition, to ask for re-dispatch after a restart.
    pub partitions: Arc<dyn Partitions>,
    pub policy: RetryPolicy,
    pub breaker: crate::config::BreakerConfig,
    /// The status and audit topics, written before an outcome is reported.
    pub trail: crate::trail::Trail,
    /// Where the tenant shows its health, pace and outcomes.
    pub board: board::Board,
    /// This member's share of the group's limits (`rate_limit_per_sec` and
    /// `max_concurrency` are for the whole group).
    pub share: Arc<crate::messages::MemberShare>,
}

/// An event and the copies of it that arrived meanwhile (a re-delivered copy of the
/// same event joins the one already here instead of being written twice).
type Pending = slots::Pending<Work>;

impl slots::Item for Work {
    fn same_event(&self, other: &Self) -> bool {
        same_event(&self.event, &other.event)
    }
    fn version(&self) -> u64 {
        self.event.version
    }
}

/// What the tenant keeps of a record's active write, beside its [`Phase`]. The request
/// itself is built from the event each time it is sent: kept here, its mapped fields
/// doubled what a record waiting for a permit holds.
struct Write {
    payload: Option<PayloadHash>,
    attempts: u32,
    first_failure: Option<(Instant, SystemTime)>,
    last_error: Option<DeliveryError>,
    /// When it was last sent to the CRM.
    last_attempt: Option<SystemTime>,
    /// The tenant's state when the write was parked because of it (not `closed`).
    paused_as: Option<&'static str>,
    /// When the write last joined the queue for a permit (for the batch linger).
    ready_since: Instant,
}

pub struct TenantActor {
    name: Arc<str>,
    config: Arc<TenantConfig>,
    connector: Arc<dyn Connector>,
    deps: TenantDeps,
    /// Every record with a write under way: the per-record state machine.
    records: Slots<Work, Write>,
    /// Records whose write waits for a permit, oldest first.
    ready: VecDeque<RecordKey>,
    requests_in_flight: usize,
    pacer: Pacer,
    /// The tenant's health; kept across restarts of this actor.
    breaker: Breaker,
    /// The `crm_sync_tenant_state` last published.
    shown_state: Option<&'static str>,
    /// When the earliest timer to pump again (after a linger, a pacing wait, or to park
    /// long waits) fires, if one is set.
    wake_at: Option<Instant>,
    next_ticket: u64,
    rng: StdRng,
    /// Set by [`InjectPanic`]; the next delivery panics.
    panic_next: bool,
    /// `crm_sync_outcomes_total` handles of this tenant by outcome, registered once.
    outcome_counters: HashMap<&'static str, metrics::Counter>,
    /// Confirmed states to make durable (record, state, outcome, state partition).
    to_persist: Vec<(RecordKey, RecordState, OutcomeKind, i32)>,
    /// Checks of records whose slot was just taken, sent together by [`Flush`].
    to_check: Vec<Check>,
    /// Offsets of decided events, by partition generation, sent together by [`Flush`].
    to_report: Vec<(PartitionLink, Vec<i64>)>,
    /// Their lines of the status and audit topics, written before they are sent.
    to_trail: Vec<crate::trail::Entry>,
    /// Whether a [`Flush`] is already on its way.
    flush_scheduled: bool,
    /// States the CRM just confirmed, for the diff actor, sent once per batch result.
    to_confirm: Vec<(RecordKey, RecordState)>,
}

impl TenantActor {
    pub fn new(config: Arc<TenantConfig>, connector: Arc<dyn Connector>, deps: TenantDeps) -> Self {
        TenantActor {
            name: config.name.as_str().into(),
            pacer: Pacer::new(config.rate_limit_per_sec, config.max_concurrency, Instant::now()),
            breaker: Breaker::new(
                deps.breaker.failure_threshold,
                Duration::from_millis(deps.breaker.probe_interval_ms),
                Duration::from_millis(deps.breaker.max_probe_interval_ms),
                Instant::now(),
            ),
            shown_state: None,
            config,
            connector,
            deps,
            records: Slots::default(),
            ready: VecDeque::new(),
            requests_in_flight: 0,
            wake_at: None,
            next_ticket: 0,
            rng: StdRng::from_entropy(),
            panic_next: false,
            outcome_counters: HashMap::new(),
            to_persist: Vec::new(),
            to_check: Vec::new(),
            to_report: Vec::new(),
            to_trail: Vec::new(),
            flush_scheduled: false,
            to_confirm: Vec::new(),
        }
    }

    /// Counts one `outcome` of this tenant's events.
    fn count_outcome(&mut self, outcome: &'static str) {
        self.deps.board.outcome(&self.name, outcome);
        let name = &self.name;
        self.outcome_counters
            .entry(outcome)
            .or_insert_with(|| metrics::counter!(metric::OUTCOMES, "tenant" => name.to_string(), "outcome" => outcome))
            .increment(1);
    }

    /// Runs a step; a panic in it stops the actor so that its supervisor restarts it.
    fn guarded(&mut self, ctx: &mut Context<Self>, step: impl FnOnce(&mut Self, &mut Context<Self>)) -> bool {
        match supervise::catch("tenant", || step(self, ctx)) {
            Ok(()) => true,
            Err(_) => {
                ctx.stop();
                false
            }
        }
    }

    fn deliver(&mut self, work: Work, ctx: &mut Context<Self>) {
        if std::mem::take(&mut self.panic_next) {
            panic!("injected panic in tenant actor");
        }
        let key = work.event.record.clone();
        match self.records.arrive(&key, work) {
            Arrival::Free(pending) => {
                if pending.work.over_share && self.saturated() && self.parkable(&pending.work.source) {
                    self.count_window_park("share");
                    self.take_slot(key.clone(), pending);
                    self.park(key, Duration::ZERO, ctx);
                } else {
                    self.start(key, pending, ctx);
                }
            }
            Arrival::Joined | Arrival::Queued => {}
            Arrival::Ends(pending, reason) => {
                if self.deps.trail.is_on() {
                    let all = std::iter::once(&pending.work).chain(&pending.also);
                    let entries: Vec<_> = all
                        .filter(|w| w.reply.is_live())
                        .map(|w| trail_entry(w, Status::Skipped(reason), None))
                        .collect();
                    self.to_trail.extend(entries);
                }
                self.report(pending, OutcomeKind::Skipped(reason), ctx)
            }
        }
    }

    /// Takes a record's slot for `pending` and queues the question to the diff actor
    /// whether to write; the questions of one turn go out together.
    fn start(&mut self, key: RecordKey, pending: Pending, ctx: &mut Context<Self>) {
        let event = pending.work.event.clone();
        let payload = self.take_slot(key.clone(), pending);
        let check = Check {
            record: key,
            mode: CheckMode::Full,
            op: event.op,
            version: event.version,
            event: event_id_fingerprint(&event.event_id),
            payload,
        };
        // This record's slot is taken (state `Checking`), so its later versions queue
        // behind the check.
        self.to_check.push(check);
        self.schedule_flush(ctx);
    }

    /// Takes a record's slot for `pending` (state `Checking`); returns the hash of the
    /// payload it would write.
    fn take_slot(&mut self, key: RecordKey, pending: Pending) -> Option<PayloadHash> {
        let payload = self.payload_hash(&pending.work.event);
        // An event back from the retry topic goes on counting its attempts and age.
        let retried = pending.work.source.retried;
        let first_failure = retried.map(|r| {
            let age = SystemTime::now().duration_since(r.first_failure).unwrap_or_default();
            (
                Instant::now().checked_sub(age).unwrap_or_else(Instant::now),
                r.first_failure,
            )
        });
        let write = Write {
            payload,
            attempts: retried.map_or(0, |r| r.attempts),
            first_failure,
            last_error: None,
            last_attempt: None,
            paused_as: None,
            ready_since: Instant::now(),
        };
        self.records.start(key, pending, write);
        payload
    }

    /// Whether an event can be parked: read from an input topic (a parked event is held
    /// where it is, not parked again) and with a retry partition to go to.
    fn parkable(&self, source: &SourceMessage) -> bool {
        source.retried.is_none() && self.deps.dead_letters.can_park(&source.origin)
    }

    /// Whether this tenant holds more writes than one round of its calls can carry
    /// (concurrency × batch size), or the CRM paused it. Only then is an event past its
    /// share of a window parked: a tenant that keeps up with a burst keeps its events
    /// (parking them made a burst of 1,500 three times slower), a slow one does not.
    fn saturated(&self) -> bool {
        let one_round = self.pacer.concurrency().max(1) * self.config.batch_size.max(1);
        self.records.len() >= one_round || self.pacer.is_paused(Instant::now())
    }

    /// Counts an event parked so that it does not hold its partition's window.
    fn count_window_park(&self, reason: &'static str) {
        metrics::counter!(metric::TENANT_WINDOW_PARKS, "tenant" => self.name.to_string(), "reason" => reason)
            .increment(1);
    }

    fn schedule_flush(&mut self, ctx: &mut Context<Self>) {
        if !self.flush_scheduled {
            self.flush_scheduled = true;
            ctx.notify(Flush);
        }
    }

    /// Sends each partition its outcomes of this turn in one message, once their lines of
    /// the status and audit topics are written (on the I/O runtime, off this actor's
    /// thread).
    fn flush_reports(&mut self) {
        let reports = std::mem::take(&mut self.to_report);
        let lines = std::mem::take(&mut self.to_trail);
        if lines.is_empty() {
            for (link, offsets) in reports {
                link.send_all(offsets);
            }
            return;
        }
        let trail = self.deps.trail.clone();
        drop(crate::offload::spawn(async move {
            trail.record(&lines).await;
            for (link, offsets) in reports {
                link.send_all(offsets);
            }
        }));
    }

    /// Asks the diff actor about every queued check in one message (`spawn`, not `wait`:
    /// other records go on meanwhile), then pumps once for all that became ready.
    fn flush_checks(&mut self, ctx: &mut Context<Self>) {
        if self.to_check.is_empty() {
            return;
        }
        let checks = std::mem::take(&mut self.to_check);
        let keys: Vec<RecordKey> = checks.iter().map(|c| c.record.clone()).collect();
        ctx.spawn(
            self.deps
                .diff
                .send(Checks(checks))
                .into_actor(self)
                .map(move |results, act, ctx| {
                    // Without an answer, write: writes are idempotent, skipping might lose one.
                    let results = results.unwrap_or_default();
                    for (i, key) in keys.into_iter().enumerate() {
                        let result = results.get(i).copied().unwrap_or(CheckResult {
                            verdict: Verdict::Write,
                            changed: None,
                        });
                        if !act.guarded(ctx, |act, ctx| act.after_check(key, result, ctx)) {
                            return;
                        }
                    }
                    act.guarded(ctx, |act, ctx| {
                        act.flush_persists(ctx);
                        act.pump(ctx);
                    });
                }),
        );
    }

    /// The hash of what an upsert would write: its mapped fields.
    fn payload_hash(&self, event: &Event) -> Option<PayloadHash> {
        (event.op == Op::Upsert).then(|| canonical_hash(&mapped_fields(&self.config, event)))
    }

    fn after_check(&mut self, key: RecordKey, result: CheckResult, ctx: &mut Context<Self>) {
        match result.verdict {
            Verdict::Skip(reason) => match result.changed {
                // An unchanged newer version moved the record's version, or a duplicate
                // repeats a state whose write may have been lost with a restart: durable
                // first. (The caller writes the queued states once for the whole answer.)
                Some(state) => self.queue_persist(key, state, OutcomeKind::Skipped(reason)),
                None => self.complete(key, OutcomeKind::Skipped(reason), ctx),
            },
            Verdict::Write => {
                let not_before = self
                    .records
                    .get(&key)
                    .and_then(|s| s.active.work.source.retried)
                    .and_then(|r| r.not_before.duration_since(SystemTime::now()).ok());
                match not_before {
                    // Back from the retry topic before it is due: wait for it here.
                    Some(delay) if !delay.is_zero() => self.back_off(key, delay),
                    // The caller pumps once for the whole answer.
                    _ => self.make_ready(key, ctx),
                }
            }
        }
    }

    /// Waits `delay` (through the retry queue) before the record's next attempt.
    fn back_off(&mut self, key: RecordKey, delay: Duration) {
        let Some(slot) = self.records.get_mut(&key) else {
            return;
        };
        self.next_ticket += 1;
        let ticket = self.next_ticket;
        slot.phase = Phase::Backoff { ticket };
        self.deps.retry.do_send(Schedule {
            tenant: self.name.clone(),
            delay,
            due: RetryDue { record: key, ticket },
        });
    }

    /// Whether the record's active event can be parked (see [`parkable`](Self::parkable)).
    fn parkable_from_input(&self, key: &RecordKey) -> bool {
        self.records
            .get(key)
            .is_some_and(|s| self.parkable(&s.active.work.source))
    }

    /// Writes the record's event to the retry topic, due in `delay`, then releases its
    /// offset: a tenant that cannot write for a while does not hold its partitions.
    fn park(&mut self, key: RecordKey, delay: Duration, ctx: &mut Context<Self>) {
        // A revoke waits for this write too: made after the hand-over, it would be made
        // again by the next owner.
        let Some(guard) = self.claim(&key, ctx) else {
            return;
        };
        let Some(slot) = self.records.get_mut(&key) else {
            return;
        };
        if slot.phase == Phase::Parking {
            // The ready queue can name a record twice; it is parked once.
            return;
        }
        slot.phase = Phase::Parking;
        // Waiting for its tenant: the breaker is not closed, or the tenant is paused and
        // this record has no failure of its own to wait out.
        let for_tenant = !self.breaker.is_closed() || slot.data.last_error.is_none();
        slot.data.paused_as = self.shown_state.filter(|s| *s != "closed" && for_tenant);
        let parked = slot.active.work.event.clone();
        let now = SystemTime::now();
        let not_before = now.checked_add(delay).unwrap_or(now);
        // A version parked without having failed (waiting for room, or for an older write
        // to land) starts its age when it is due, not now; one parked while its tenant's
        // breaker is open does not age while it is parked.
        let frozen = !self.breaker.is_closed();
        let first_failure = match slot.data.first_failure {
            None => not_before,
            Some((_, at)) if frozen => at.checked_add(delay).unwrap_or(at),
            Some((_, at)) => at,
        };
        let state = RetryState {
            attempts: slot.data.attempts,
            first_failure,
            not_before,
        };
        tracing::debug!(tenant = %self.name, record = %key, ?delay, "Parking event on the retry topic.");
        let sink = self.deps.dead_letters.clone();
        let source = slot.active.work.source.clone();
        // On the I/O runtime: it is finished (and counted until then) even if this actor
        // restarts meanwhile.
        let write = crate::offload::spawn(async move {
            let parked = sink.park(&source, state).await;
            drop(guard);
            parked
        });
        ctx.spawn(write.into_actor(self).map(move |written, act, ctx| {
            let written = written.unwrap_or(Err(crate::dead_letter::Unwritable::NoRetryTopic));
            // Only the event that was parked ends as parked, never a newer one that has
            // taken the record's slot since.
            let still_parking = act.records.get(&key).is_some_and(|s| {
                matches!(s.phase, Phase::Parking) && Arc::ptr_eq(&s.active.work.event, &parked)
            });
            if !still_parking {
                return;
            }
            match written {
                Ok(()) => {
                    act.guarded(ctx, |act, ctx| act.complete(key, OutcomeKind::Parked, ctx));
                }
                Err(why) => {
                    // It can never be parked: it waits here instead, holding its offset.
                    tracing::warn!(tenant = %act.name, error = %why, "Cannot park an event on the retry topic; it waits in memory.");
                    act.back_off(key, delay);
                }
            }
        }));
    }

    /// Whether writes waiting for a permit now should be parked rather than held: the
    /// tenant is in a pause set for at least `retry.park_after_ms` (a CRM's `Retry-After`).
    fn parking_pause(&self, now: Instant) -> Option<Duration> {
        let long = self.deps.dead_letters.parks() && self.pacer.pause_length(now) >= self.deps.policy.park_after;
        long.then(|| self.pacer.pause_remaining(now))
    }

    /// When such a pause begins: parks the writes read from input topics that wait for a
    /// permit, due when the pause ends, so that they do not hold their partitions
    /// meanwhile. Writes that become ready during the pause are parked by `make_ready`.
    fn park_waiting(&mut self, ctx: &mut Context<Self>) {
        let Some(remaining) = self.parking_pause(Instant::now()) else {
            return;
        };
        let waiting: Vec<RecordKey> = self
            .ready
            .iter()
            .filter(|k| self.parkable_from_input(k))
            .filter(|k| self.records.get(k).is_some_and(|s| matches!(s.phase, Phase::Ready)))
            .cloned()
            .collect();
        let parked: std::collections::HashSet<RecordKey> = waiting.iter().cloned().collect();
        self.ready.retain(|k| !parked.contains(k));
        for key in waiting {
            self.park(key, remaining, ctx);
        }
    }

    /// Puts a record's write in the queue for a permit, or, while a long pause is on and
    /// the event was read from an input topic, parks it.
    fn make_ready(&mut self, key: RecordKey, ctx: &mut Context<Self>) {
        if let Some(remaining) = self.parking_pause(Instant::now()) {
            if self.parkable_from_input(&key) {
                self.park(key, remaining, ctx);
                return;
            }
        }
        if let Some(slot) = self.records.get_mut(&key) {
            slot.phase = Phase::Ready;
            slot.data.ready_since = Instant::now();
            self.ready.push_back(key);
        }
    }

    /// Starts as many batches of ready writes as the rate and concurrency limits allow.
    /// A batch holds records of one op, object and external id field, up to the smaller
    /// of `batch_size` and the CRM's limit; it leaves when full, or when its oldest record
    /// has waited `batch_linger_ms`. Each record has one slot, so two versions of a record
    /// never share a batch.
    fn pump(&mut self, ctx: &mut Context<Self>) {
        let now = Instant::now();
        if self.breaker.is_held() && !self.pacer.is_paused(now) {
            // The hold outlasts the pause it set: set it again, and park what waits.
            self.pacer
                .pause(now, Duration::from_millis(self.deps.breaker.max_probe_interval_ms));
            self.park_waiting(ctx);
        }
        self.park_long_waits(ctx);
        self.publish_state(Instant::now());
        while self.requests_in_flight < self.breaker.in_flight_limit(self.pacer.concurrency()) {
            let Some(front) = self.ready.front() else { break };
            if !self.breaker.is_closed() && self.requests_in_flight > 0 {
                // A probe is one call, made once nothing sent before is still out.
                break;
            }
            let Some(first) = self.records.get(front).filter(|s| matches!(s.phase, Phase::Ready)) else {
                self.ready.pop_front();
                continue;
            };
            // Events of partitions handed over since they were queued are dropped before
            // they take a permit: after a revoke, a member would otherwise spend its pace
            // on them, one permit each, while its own partitions wait.
            let live = first.active.work.reply.is_live() || first.active.also.iter().any(|w| w.reply.is_live());
            if !live {
                if let Some(key) = self.ready.pop_front() {
                    self.still_owned(&key, ctx);
                }
                continue;
            }
            let group = batch_group(&self.config, &first.active.work.event);
            let max = self
                .config
                .batch_size
                .min(self.connector.max_batch(group.0, &group.1))
                .max(1);
            let now = Instant::now();
            let linger_ends = first.data.ready_since + Duration::from_millis(self.config.batch_linger_ms);
            // Count the group's ready records only when a full batch is possible and the
            // linger has not run out: this runs each time a record becomes ready.
            let must_wait = now < linger_ends && (self.ready.len() < max || self.count_ready(&group, max) < max);
            if must_wait {
                self.wake_in(linger_ends - now, ctx);
                break;
            }
            match self.breaker.gate(now) {
                Err(wait) => {
                    self.wake_in(wait, ctx);
                    break;
                }
                Ok(Some(probing)) => self.announce(probing, "probing the CRM with one call", ctx),
                Ok(None) => {}
            }
            self.pacer.set_share(self.deps.share.get());
            if let Err(wait) = self.pacer.try_acquire(now) {
                self.wake_in(wait, ctx);
                break;
            }
            let keys = self.take_batch_keys(&group, max);
            self.send_batch(keys, ctx);
        }
    }

    /// Parks writes that have waited `retry.park_after_ms` or longer for a permit while
    /// their partition's window is under pressure, so that a slow tenant's queue does not
    /// fill the window and pause the partition for the others. The queue is in the order
    /// records became ready, so the longest waits are at its front; at most
    /// [`LONG_WAIT_SCAN`] entries are looked at per call.
    fn park_long_waits(&mut self, ctx: &mut Context<Self>) {
        if !self.deps.dead_letters.parks() || self.ready.is_empty() {
            return;
        }
        let now = Instant::now();
        let limit = self.deps.policy.park_after;
        let mut kept = Vec::new();
        let mut to_park = Vec::new();
        for _ in 0..LONG_WAIT_SCAN {
            let Some(key) = self.ready.pop_front() else { break };
            let Some(slot) = self.records.get(&key).filter(|s| matches!(s.phase, Phase::Ready)) else {
                continue; // a stale entry: the record left the queue
            };
            if now.saturating_duration_since(slot.data.ready_since) < limit {
                kept.push(key);
                break;
            }
            let work = &slot.active.work;
            if work.reply.partition.under_pressure() && self.parkable(&work.source) {
                to_park.push(key);
            } else {
                kept.push(key);
            }
        }
        for key in kept.into_iter().rev() {
            self.ready.push_front(key);
        }
        for key in to_park {
            self.count_window_park("permit_wait");
            self.park(key, Duration::ZERO, ctx);
        }
        if !self.ready.is_empty() {
            // Look again once the next write in line has waited long enough.
            self.wake_in(limit, ctx);
        }
    }

    /// Counts (without taking) the ready records of `group` among the first few in line.
    fn count_ready(&self, group: &BatchGroup, max: usize) -> usize {
        self.ready
            .iter()
            .take(max.saturating_mul(4))
            .filter(|k| {
                self.records.get(k).is_some_and(|s| {
                    matches!(s.phase, Phase::Ready) && in_group(&self.config, &s.active.work.event, group)
                })
            })
            .take(max)
            .count()
    }

    /// Takes up to `max` ready records of `group` out of the first `4 × max` in line,
    /// oldest first; the rest keep their places. Only the head of the queue is touched, so
    /// a long queue costs nothing per batch.
    fn take_batch_keys(&mut self, group: &BatchGroup, max: usize) -> Vec<RecordKey> {
        let scan = max.saturating_mul(4).min(self.ready.len());
        let head: Vec<RecordKey> = self.ready.drain(..scan).collect();
        let mut taken = Vec::with_capacity(max);
        let mut kept = Vec::with_capacity(scan);
        for key in head {
            let slot = self.records.get_mut(&key).filter(|s| {
                taken.len() < max
                    && matches!(s.phase, Phase::Ready)
                    && in_group(&self.config, &s.active.work.event, group)
            });
            match slot {
                Some(slot) => {
                    // Taken now, so that a second entry for the record in the queue
                    // cannot put it in this batch twice.
                    slot.phase = Phase::Sending;
                    taken.push(key);
                }
                None => kept.push(key),
            }
        }
        for key in kept.into_iter().rev() {
            self.ready.push_front(key);
        }
        taken
    }

    /// Lowers the pace when the CRM throttled this call, raises it when the call went
    /// through, parks what waits when a long pause begins, and publishes the limits in
    /// force.
    fn adapt_pace(&mut self, results: &[Result<WriteOk, DeliveryError>], ctx: &mut Context<Self>) {
        let now = Instant::now();
        let was_paused = self.pacer.is_paused(now);
        let throttle = results
            .iter()
            .filter_map(|r| r.as_ref().err())
            .find(|e| tenant_failure(e) == Some(TenantFailure::Throttled));
        let tenant = self.name.to_string();
        match throttle {
            Some(e) => {
                self.pacer.on_throttle(now, e.retry_after);
                metrics::counter!(metric::TENANT_THROTTLES, "tenant" => tenant.clone()).increment(1);
            }
            None if results.iter().any(Result::is_ok) => self.pacer.on_success(),
            None => {}
        }
        if let Some(quota) = self.connector.quota() {
            self.pacer.on_quota(now, quota);
        }
        if !was_paused && self.pacer.is_paused(now) {
            metrics::counter!(metric::TENANT_PAUSES, "tenant" => tenant.clone()).increment(1);
            self.park_waiting(ctx);
            self.publish_state(now);
            // The state shown goes back when the pause is over, even if nothing is sent.
            ctx.run_later(self.pacer.pause_remaining(now), |act, _| {
                act.publish_state(Instant::now())
            });
        }
        self.deps
            .board
            .pace(&self.name, self.pacer.rate(), self.pacer.concurrency());
        metrics::gauge!(metric::TENANT_RATE_LIMIT, "tenant" => tenant.clone()).set(self.pacer.rate());
        metrics::gauge!(metric::TENANT_CONCURRENCY_LIMIT, "tenant" => tenant).set(self.pacer.concurrency() as f64);
    }

    /// Pumps again in `wait`, unless a timer already set fires sooner. A later timer
    /// never delays an earlier one: a batch's 20 ms linger must not wait for the one
    /// second after which long waits are parked (it did, and every write of a fast
    /// tenant waited long enough to be parked).
    fn wake_in(&mut self, wait: Duration, ctx: &mut Context<Self>) {
        let at = Instant::now() + wait;
        if self.wake_at.is_some_and(|set| set <= at) {
            return;
        }
        self.wake_at = Some(at);
        ctx.run_later(wait, move |act, ctx| {
            if act.wake_at == Some(at) {
                act.wake_at = None;
            }
            act.guarded(ctx, |act, ctx| act.pump(ctx));
        });
    }

    /// Sends one batch (one CRM call, or as few as the connector needs) and hands each
    /// record its own result.
    fn send_batch(&mut self, keys: Vec<RecordKey>, ctx: &mut Context<Self>) {
        let mut sent = Vec::with_capacity(keys.len());
        let mut requests = Vec::with_capacity(keys.len());
        let mut guards = Vec::with_capacity(keys.len());
        let mut attempt = 0;
        for key in keys {
            let Some(guard) = self.claim(&key, ctx) else {
                continue;
            };
            let Some(slot) = self.records.get_mut(&key) else {
                continue;
            };
            slot.phase = Phase::Sending;
            slot.data.attempts = slot.data.attempts.saturating_add(1);
            attempt = attempt.max(slot.data.attempts);
            slot.data.last_attempt = Some(SystemTime::now());
            let request = build_request(
                &self.config,
                &slot.active.work.event,
                slot.active.work.source.origin.partition,
            );
            // What is confirmed on success is what this request writes: the lead copy
            // may have changed since the check (a copy of the same event id and version
            // whose data differs would otherwise be recorded under the other's hash).
            slot.data.payload = (request.op == Op::Upsert).then(|| canonical_hash(&request.fields));
            requests.push(request);
            guards.push(guard);
            sent.push(key);
        }
        if sent.is_empty() {
            return;
        }
        metrics::histogram!(metric::BATCH_SIZE, "tenant" => self.name.to_string()).record(sent.len() as f64);
        // The permit goes back when the batch's calls are answered, which for a Zendesk
        // job is before its results are known.
        self.requests_in_flight += 1;
        let (calls_done, answered) = CallsDone::pair();
        // The partitions of these events count them as at the CRM until the write's task
        // on the I/O runtime ends (even if this actor stops waiting for it, a restart),
        // and then until the accepted ones' states are on their way (`flush_persists`).
        let n = requests.len();
        let span = tracing::info_span!(
            "crm.write",
            tenant = %self.name,
            crm = self.config.crm.as_str(),
            records = n,
            attempt,
            status = tracing::field::Empty
        );
        // Made in the span: the connectors start their calls at once, on the I/O runtime.
        let write = span.in_scope(|| self.connector.write_batch(requests, calls_done));
        let write = async move {
            let done = crate::offload::spawn(async move { (write.await, guards) }).await;
            // The runtime is shutting down: so is the service, and nothing was committed.
            done.unwrap_or_else(|e| {
                let lost = DeliveryError::unexpected_retryable(format!("write task ended: {e}"));
                (vec![Err(lost); n], Vec::new())
            })
        };
        ctx.spawn(answered.into_actor(self).map(|(), act, ctx| {
            act.requests_in_flight -= 1;
            act.guarded(ctx, |act, ctx| act.pump(ctx));
        }));
        ctx.spawn(write.into_actor(self).map(move |(results, guards), act, ctx| {
            let failed = results.iter().filter(|r| r.is_err()).count();
            span.record(
                "status",
                match failed {
                    0 => "ok",
                    f if f == results.len() => "failed",
                    _ => "partial",
                },
            );
            drop(span);
            if !act.guarded(ctx, |act, ctx| {
                act.observe_health(&sent, &results, ctx);
                act.adapt_pace(&results, ctx);
            }) {
                return;
            }
            for (key, result) in sent.into_iter().zip(results) {
                if !act.guarded(ctx, |act, ctx| act.on_result(key, result, ctx)) {
                    return;
                }
            }
            // Sent before these records' next checks (which wait for their states to be
            // durable), in the same mailbox: in order.
            let confirmed = std::mem::take(&mut act.to_confirm);
            if !confirmed.is_empty() {
                act.deps.diff.do_send(Confirm(confirmed));
            }
            act.guarded(ctx, |act, ctx| {
                act.flush_persists(ctx);
                act.pump(ctx);
            });
            // The states of the accepted writes now count as writes in flight instead.
            drop(guards);
        }));
    }

    fn on_result(&mut self, key: RecordKey, result: Result<WriteOk, DeliveryError>, ctx: &mut Context<Self>) {
        let Some(slot) = self.records.get_mut(&key).filter(|s| matches!(s.phase, Phase::Sending)) else {
            return;
        };
        match result {
            Ok(_) => {
                let event = &slot.active.work.event;
                let state = RecordState {
                    version: event.version,
                    payload: slot.data.payload,
                    event: event_id_fingerprint(&event.event_id),
                };
                slot.phase = Phase::Persisting;
                self.to_confirm.push((key.clone(), state));
                self.queue_persist(key, state, OutcomeKind::Delivered);
            }
            Err(error) => {
                let now = Instant::now();
                let write = &mut slot.data;
                let kind = tenant_failure(&error);
                let tenant_wait = match kind {
                    Some(TenantFailure::Throttled) => true,
                    Some(_) => !self.breaker.is_closed(),
                    None => false,
                };
                let decision = if tenant_wait || error.is_wait() {
                    // Not this record's failure: the CRM, or our access to it, is broken
                    // (it waits for the next probe, or for the CRM's pause, however long
                    // that takes), or an earlier write of it may still land. It costs no
                    // attempt, and its age stands still while it waits.
                    write.attempts = write.attempts.saturating_sub(1);
                    let mut delay = error.retry_after.unwrap_or(self.deps.policy.base_delay);
                    if tenant_wait {
                        delay = delay.max(self.breaker.until_probe(now));
                    }
                    if let Some((at, wall)) = write.first_failure.as_mut() {
                        *at += delay;
                        *wall += delay;
                    }
                    Some(RetryDecision::RetryAfter(delay))
                } else if kind.is_some() {
                    // The tenant's kind of failure while its breaker is closed: retried
                    // like any (even a refusal that would be permanent), so that it is
                    // dead-lettered only once a record alone has used up its retries,
                    // and a tenant whose calls all fail opens its breaker before that.
                    let (first, _) = *write.first_failure.get_or_insert((now, SystemTime::now()));
                    Some(
                        self.deps
                            .policy
                            .decide(write.attempts, first, now, error.retry_after, &mut self.rng),
                    )
                } else {
                    let (first, _) = *write.first_failure.get_or_insert((now, SystemTime::now()));
                    error.is_retryable().then(|| {
                        self.deps
                            .policy
                            .decide(write.attempts, first, now, error.retry_after, &mut self.rng)
                    })
                };
                tracing::debug!(tenant = %self.name, error = %error, "CRM write failed.");
                write.last_error = Some(error);
                if slot.waiting.is_some() {
                    // A newer version is waiting: it replaces this one, failed or not.
                    self.complete(key, OutcomeKind::Skipped(SkipReason::Superseded), ctx);
                    return;
                }
                let attempts = slot.data.attempts;
                let code = slot.data.last_error.as_ref().map_or("", |e| e.code.as_str());
                let source = slot.active.work.source.clone();
                if matches!(decision, Some(RetryDecision::RetryAfter(_))) && slot.active.work.reply.is_live() {
                    let entry = trail_entry(&slot.active.work, Status::Retrying, Some(&slot.data));
                    self.deps.trail.note(entry);
                }
                match decision {
                    Some(RetryDecision::RetryAfter(delay)) => {
                        self.count_outcome(outcome::RETRIED);
                        let parkable = self.deps.dead_letters.can_park(&source.origin);
                        let parked = parkable && self.deps.policy.should_park(attempts, delay);
                        drop(tracing::info_span!(
                            "retry",
                            tenant = %self.name,
                            crm = self.config.crm.as_str(),
                            attempt = attempts,
                            delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                            parked,
                            code
                        ));
                        if parked {
                            self.park(key, delay, ctx);
                        } else {
                            self.back_off(key, delay);
                        }
                    }
                    Some(RetryDecision::GiveUp(_)) | None => self.dead_letter(key, ctx),
                }
            }
        }
    }

    /// Feeds a call's results to the tenant's breaker, and announces a change of health.
    fn observe_health(
        &mut self,
        keys: &[RecordKey],
        results: &[Result<WriteOk, DeliveryError>],
        ctx: &mut Context<Self>,
    ) {
        let answered = results.iter().any(|r| match r {
            Ok(_) => true,
            Err(e) => tenant_failure(e).is_none() && !e.is_wait(),
        });
        let worst = results
            .iter()
            .filter_map(|r| r.as_ref().err())
            .filter_map(|e| tenant_failure(e).map(|f| (f, e)))
            .max_by_key(|(f, _)| f.weight());
        let reason = worst.map_or_else(|| "the CRM answered".to_string(), |(_, e)| e.to_string());
        // The records whose calls failed for a tenant reason, hashed.
        let failed: Vec<u64> = keys
            .iter()
            .zip(results)
            .filter(|(_, r)| r.as_ref().err().and_then(tenant_failure).is_some())
            .map(|(k, _)| {
                use std::hash::{Hash, Hasher};
                // Fixed keys: the same record hashes the same from call to call.
                let mut h = std::collections::hash_map::DefaultHasher::new();
                k.hash(&mut h);
                h.finish()
            })
            .collect();
        if let Some(t) = self
            .breaker
            .on_call(Instant::now(), answered, worst.map(|(f, _)| f), &failed)
        {
            self.announce(t, &reason, ctx);
        }
    }

    /// A change of the tenant's health, made visible: an ERROR log line, the
    /// `crm_sync_tenant_state` gauge, and an event on the failures topic. Opening (or
    /// refused credentials) pauses the tenant until the next probe, and parks what waits.
    fn announce(&mut self, t: Transition, reason: &str, ctx: &mut Context<Self>) {
        let now = Instant::now();
        let (from, to) = (t.from.as_str(), t.to.as_str());
        match t.to {
            Health::Open | Health::AuthFailed => {
                let probe = self.breaker.until_probe(now);
                tracing::error!(tenant = %self.name, from, to, next_probe_in = ?probe, reason, "Tenant stops writing to its CRM; its events are parked, not dead-lettered, until a probe gets through.");
                self.pacer.pause(now, probe);
                self.park_waiting(ctx);
            }
            Health::HalfOpen => tracing::error!(tenant = %self.name, from, to, "Tenant probes its CRM with one call."),
            Health::Closed => {
                tracing::error!(tenant = %self.name, from, to, "Tenant's CRM answers again; its events flow.");
                self.unfreeze_ages(now);
            }
        }
        metrics::counter!(metric::TENANT_TRANSITIONS, "tenant" => self.name.to_string(), "state" => to).increment(1);
        self.publish_state(now);
        let sink = self.deps.dead_letters.clone();
        let (tenant, reason) = (self.name.to_string(), reason.to_string());
        drop(crate::offload::spawn(async move {
            sink.tenant_state(&tenant, from, to, &reason).await;
        }));
    }

    /// The records that waited while the tenant did not write did not age meanwhile: the
    /// time since the breaker left `closed` is taken off their ages.
    fn unfreeze_ages(&mut self, now: Instant) {
        let spell = now.saturating_duration_since(self.breaker.left_closed());
        for (_, slot) in self.records.iter_mut() {
            if let Some((at, wall)) = slot.data.first_failure.as_mut() {
                let shift = spell.min(now.saturating_duration_since(*at));
                *at += shift;
                *wall += shift;
            }
        }
        self.breaker.unfrozen(now);
    }

    /// Sets `crm_sync_tenant_state` when the tenant's health (or a pause the CRM asked
    /// for) changed since it was last set.
    fn publish_state(&mut self, now: Instant) {
        let state = match self.breaker.health() {
            Health::Closed if self.pacer.is_paused(now) || self.breaker.is_held() => "paused",
            health => health.as_str(),
        };
        if self.shown_state == Some(state) {
            return;
        }
        self.shown_state = Some(state);
        self.deps.board.state(&self.name, state);
        for s in Health::ALL.iter().map(|h| h.as_str()).chain(["paused"]) {
            metrics::gauge!(metric::TENANT_STATE, "tenant" => self.name.to_string(), "state" => s).set(if s == state {
                1.0
            } else {
                0.0
            });
        }
    }

    /// Counts the record's event as a write in flight for its partitions, then checks that
    /// this instance still owns it (see [`still_owned`](Self::still_owned)). In this order:
    /// a revoke marks its partition retired, then waits for the count to reach zero, so
    /// either the revoke sees this write or this write sees the revoke.
    fn claim(&mut self, key: &RecordKey, ctx: &mut Context<Self>) -> Option<Sending> {
        let slot = self.records.get(key)?;
        let partitions = std::iter::once(&slot.active.work)
            .chain(&slot.active.also)
            .map(|w| w.reply.partition.clone())
            .collect();
        let guard = Sending::new(partitions);
        self.still_owned(key, ctx).then_some(guard)
    }

    /// Whether the record's active event still belongs to a partition this instance
    /// owns. If its partition was handed over, the event is dropped here (the new owner
    /// re-reads it from the committed offset) — unless a copy of it came in through a
    /// partition that is live, which then takes over.
    fn still_owned(&mut self, key: &RecordKey, ctx: &mut Context<Self>) -> bool {
        // Copies (and a dropped event) of partitions that were handed over need no
        // outcome: those partitions are gone from this instance.
        match self.records.keep_live(key, |w| w.reply.is_live()) {
            Liveness::Live { .. } => true,
            Liveness::HandedOver { waiting, .. } => {
                self.count_outcome(outcome::HANDED_OVER);
                if let Some(next) = waiting {
                    self.start(key.clone(), next, ctx);
                }
                false
            }
            Liveness::Absent => false,
        }
    }

    fn dead_letter(&mut self, key: RecordKey, ctx: &mut Context<Self>) {
        // A revoke waits for this write too: written after the hand-over, it would be
        // written again by the next owner.
        let Some(guard) = self.claim(&key, ctx) else {
            return;
        };
        let Some(slot) = self.records.get_mut(&key) else {
            return;
        };
        slot.phase = Phase::DeadLettering;
        let Some(error) = slot.data.last_error.clone() else {
            return;
        };
        let (_, first_failure) = slot.data.first_failure.unwrap_or((Instant::now(), SystemTime::now()));
        let failure = Failure {
            stage: "deliver",
            code: error.code.as_str(),
            class: error.class.as_str(),
            http_status: error.http_status,
            crm_code: error.crm_code.clone(),
            message: error.message.clone(),
            attempts: slot.data.attempts,
            first_failure,
            last_failure: SystemTime::now(),
        };
        tracing::debug!(tenant = %self.name, record = %key, error = %error, "Dead-lettering event.");
        let sink = self.deps.dead_letters.clone();
        let source = slot.active.work.source.clone();
        let event = slot.active.work.event.clone();
        let (partition, offset) = (slot.active.work.reply.partition.clone(), slot.active.work.reply.offset);
        // On the I/O runtime: finished (and counted until then) even if this actor
        // restarts meanwhile. An offset dead-lettered before (by a previous owner that
        // crashed before committing, or by this one before a partition restart) is not
        // dead-lettered again.
        let write = crate::offload::spawn(async move {
            if !partition.was_dead_lettered(offset) {
                sink.dead_letter(&source, Some(&event), &failure).await;
                partition.remember_dead_lettered([offset]);
            }
            drop(guard);
        });
        ctx.spawn(write.into_actor(self).map(move |_, act, ctx| {
            act.guarded(ctx, |act, ctx| act.complete(key, OutcomeKind::DeadLettered, ctx));
        }));
    }

    /// Queues a record's new confirmed state for [`flush_persists`](Self::flush_persists).
    fn queue_persist(&mut self, key: RecordKey, state: RecordState, kind: OutcomeKind) {
        let Some(slot) = self.records.get(&key) else { return };
        // The input partition the record's states belong to, also for an event that came
        // back from the retry topic.
        let partition = slot.active.work.source.origin.partition;
        self.to_persist.push((key, state, kind, partition));
    }

    /// Writes the queued states to the state topic in one task on the I/O runtime (a
    /// batch's worth at once, off this actor's thread), then ends each record's active
    /// event with its outcome: an offset is freed only once its state is durable.
    fn flush_persists(&mut self, ctx: &mut Context<Self>) {
        if self.to_persist.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.to_persist);
        let store = self.deps.state.clone();
        let states: Vec<_> = batch
            .iter()
            .map(|(key, state, _, partition)| (*partition, key.clone(), *state))
            .collect();
        // A revoke waits for these writes too: an old owner's state landing after the new
        // owner's would, once compacted, be what a later owner reads back.
        let partitions = batch
            .iter()
            .filter_map(|(key, ..)| self.records.get(key))
            .map(|slot| slot.active.work.reply.partition.clone())
            .collect();
        let guard = Sending::new(partitions);
        let persist = crate::offload::spawn(async move {
            store.persist_all(states).await;
            drop(guard);
        });
        ctx.spawn(persist.into_actor(self).map(move |written, act, ctx| {
            if let Err(e) = written {
                // Not durable, so no outcome: a restart hands these events in again.
                tracing::error!(tenant = %act.name, error = %e, "State write task failed; restarting the tenant.");
                ctx.stop();
                return;
            }
            for (key, _, kind, _) in batch {
                if !act.guarded(ctx, |act, ctx| act.complete(key, kind, ctx)) {
                    return;
                }
            }
        }));
    }

    /// Ends the record's active event with `kind` and starts the one waiting, if any.
    fn complete(&mut self, key: RecordKey, kind: OutcomeKind, ctx: &mut Context<Self>) {
        if self.deps.trail.is_on() {
            if let Some(slot) = self.records.get(&key) {
                // A handed-over partition's next owner writes its events' lines.
                let all = std::iter::once(&slot.active.work).chain(&slot.active.also);
                let entries: Vec<_> = all
                    .filter(|w| w.reply.is_live())
                    .map(|w| trail_entry(w, kind.into(), Some(&slot.data)))
                    .collect();
                self.to_trail.extend(entries);
            }
        }
        let Some((active, waiting)) = self.records.finish(&key) else {
            return;
        };
        self.report(active, kind, ctx);
        if let Some(next) = waiting {
            self.start(key, next, ctx);
        }
    }

    /// Queues the event's outcome for every partition that handed it in; [`Flush`] sends
    /// them.
    fn report(&mut self, pending: Pending, kind: OutcomeKind, ctx: &mut Context<Self>) {
        self.count_outcome(kind.as_str());
        for link in std::iter::once(pending.work).chain(pending.also).map(|w| w.reply) {
            match self.to_report.iter_mut().find(|(l, _)| l.same_partition(&link)) {
                Some((_, offsets)) => offsets.push(link.offset),
                None => {
                    let offset = link.offset;
                    self.to_report.push((link, vec![offset]));
                }
            }
        }
        self.schedule_flush(ctx);
    }
}

/// The trail's line for one event, with what its record's write (if it got one) tried.
fn trail_entry(work: &Work, status: Status, write: Option<&Write>) -> crate::trail::Entry {
    // Parked because its tenant is not writing: that is what the customer should see.
    let status = match (status, write.and_then(|w| w.paused_as)) {
        (Status::Parked, Some(state)) => Status::TenantPaused(state),
        _ => status,
    };
    let error = match status {
        Status::Retrying | Status::DeadLettered => write
            .and_then(|w| w.last_error.as_ref())
            .map(|e| (e.code.as_str(), e.message.clone())),
        _ => None,
    };
    crate::trail::Entry {
        event: Some(work.event.clone()),
        source: work.source.origin.clone(),
        status,
        attempts: write.map_or(0, |w| w.attempts),
        first_seen: work.source.read_at,
        last_attempt: write.and_then(|w| w.last_attempt),
        error,
        at: SystemTime::now(),
    }
}

/// Most entries of the ready queue [`TenantActor::park_long_waits`] looks at per call.
const LONG_WAIT_SCAN: usize = 256;

/// What records must share to go in one batch: op, object, external id field.
type BatchGroup = (Op, String, String);

fn batch_group(config: &TenantConfig, event: &Event) -> BatchGroup {
    let entity = entity_of(config, event);
    (event.op, entity.object.clone(), entity.external_id_field.clone())
}

fn in_group(config: &TenantConfig, event: &Event, group: &BatchGroup) -> bool {
    let entity = entity_of(config, event);
    event.op == group.0 && entity.object == group.1 && entity.external_id_field == group.2
}

/// The write of `event` as it goes to the CRM; `state_partition`: the input partition of
/// the record's state (its origin's).
fn build_request(config: &TenantConfig, event: &Event, state_partition: i32) -> WriteRequest {
    let entity = entity_of(config, event);
    let fields = match event.op {
        Op::Upsert => mapped_fields(config, event),
        Op::Delete => serde_json::Map::new(),
    };
    WriteRequest {
        op: event.op,
        object: entity.object.clone(),
        external_id_field: entity.external_id_field.clone(),
        external_id: event.record.key.to_string(),
        fields,
        event_id: event.event_id.clone(),
        version: event.version,
        state_partition,
    }
}

/// The tenant's mapping of the event's entity. Indexing cannot fail: decode only accepts
/// entities this tenant maps.
fn entity_of<'a>(config: &'a TenantConfig, event: &Event) -> &'a EntityConfig {
    &config.entities[&*event.record.entity]
}

/// The CRM fields an upsert of `event` sets.
fn mapped_fields(config: &TenantConfig, event: &Event) -> serde_json::Map<String, serde_json::Value> {
    mapping::map_fields(&event.data, &entity_of(config, event).fields)
}

fn same_event(a: &Event, b: &Event) -> bool {
    a.event_id == b.event_id && a.version == b.version
}

/// The tenant's pause flags changed (see [`pauses`]): it follows them, paused while
/// either is set. While paused its writes wait as when its breaker is open (parked,
/// without ageing), and nothing is sent or probed. The flags are read when this is
/// handled, so that however such messages interleave, the last one leaves the actor as
/// the flags are.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "()")]
pub struct Hold;

impl Handler<Hold> for TenantActor {
    type Result = ();

    fn handle(&mut self, _: Hold, ctx: &mut Self::Context) {
        let held = self.deps.board.paused(&self.name);
        if held == self.breaker.is_held() {
            return;
        }
        let now = Instant::now();
        let before = self.shown_state.unwrap_or("closed");
        if held {
            self.breaker.hold(now);
            tracing::warn!(tenant = %self.name, "The tenant is paused (AdminService); its events wait, without ageing, until it is resumed.");
            // As when its breaker opens: the waiting writes are parked, due again after a
            // while (then parked again while the hold lasts).
            self.pacer
                .pause(now, Duration::from_millis(self.deps.breaker.max_probe_interval_ms));
            self.park_waiting(ctx);
        } else {
            self.pacer.end_pause();
            if self.breaker.release() {
                self.unfreeze_ages(now);
            }
            tracing::warn!(tenant = %self.name, "The tenant is resumed (AdminService).");
        }
        self.publish_state(now);
        let after = self.shown_state.unwrap_or("closed");
        if before != after {
            metrics::counter!(metric::TENANT_TRANSITIONS, "tenant" => self.name.to_string(), "state" => after)
                .increment(1);
            let sink = self.deps.dead_letters.clone();
            let tenant = self.name.to_string();
            let reason = if held {
                "paused through the AdminService"
            } else {
                "resumed through the AdminService"
            };
            drop(crate::offload::spawn(async move {
                sink.tenant_state(&tenant, before, after, reason).await;
            }));
        }
        if !held {
            self.pump(ctx);
        }
    }
}

impl Actor for TenantActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(1024);
        self.deps
            .board
            .pace(&self.name, self.pacer.rate(), self.pacer.concurrency());
        self.publish_state(Instant::now());
        if self.deps.board.paused(&self.name) {
            // At once, before any message in the mailbox is handled.
            <Self as Handler<Hold>>::handle(self, Hold, ctx);
        }
    }
}

impl Supervised for TenantActor {
    fn restarting(&mut self, _: &mut Self::Context) {
        supervise::restarted("tenant");
        // Outcomes decided before the failure still hold.
        self.flush_reports();
        self.records.clear();
        self.ready.clear();
        self.to_check.clear();
        self.flush_scheduled = false;
        self.to_confirm.clear();
        // Their records' slots are gone: the events come in again by re-dispatch.
        self.to_persist.clear();
        self.requests_in_flight = 0;
        self.wake_at = None;
        self.panic_next = false;
        let now = Instant::now();
        self.pacer = Pacer::new(self.config.rate_limit_per_sec, self.config.max_concurrency, now);
        if !self.breaker.is_closed() {
            // Still open: writes handed in again wait for the probe (parked).
            self.pacer.pause(now, self.breaker.until_probe(now));
        }
        self.shown_state = None;
        // Everything this actor held is still undecided at its partitions.
        self.deps.partitions.redispatch_all(&self.name);
    }
}

impl Handler<Deliver> for TenantActor {
    type Result = ();

    fn handle(&mut self, Deliver(works): Deliver, ctx: &mut Self::Context) {
        self.guarded(ctx, |act, ctx| {
            for work in works {
                act.deliver(work, ctx);
            }
        });
    }
}

impl Handler<Flush> for TenantActor {
    type Result = ();

    fn handle(&mut self, _: Flush, ctx: &mut Self::Context) {
        self.flush_scheduled = false;
        self.flush_reports();
        self.guarded(ctx, |act, ctx| act.flush_checks(ctx));
    }
}

impl Handler<RetryDue> for TenantActor {
    type Result = ();

    fn handle(&mut self, msg: RetryDue, ctx: &mut Self::Context) {
        self.guarded(ctx, |act, ctx| {
            let Some(slot) = act.records.get_mut(&msg.record) else {
                return;
            };
            if !matches!(slot.phase, Phase::Backoff { ticket } if ticket == msg.ticket) {
                return;
            }
            if slot.waiting.is_some() {
                act.complete(msg.record, OutcomeKind::Skipped(SkipReason::Superseded), ctx);
            } else {
                act.make_ready(msg.record, ctx);
                act.pump(ctx);
            }
        });
    }
}

impl Handler<RearmRetries> for TenantActor {
    type Result = ();

    fn handle(&mut self, _: RearmRetries, _: &mut Self::Context) {
        for (key, slot) in self.records.iter_mut() {
            if let Phase::Backoff { ticket } = &mut slot.phase {
                self.next_ticket += 1;
                *ticket = self.next_ticket;
                self.deps.retry.do_send(Schedule {
                    tenant: self.name.clone(),
                    delay: self.deps.policy.base_delay,
                    due: RetryDue {
                        record: key.clone(),
                        ticket: self.next_ticket,
                    },
                });
            }
        }
    }
}

impl Handler<InjectPanic> for TenantActor {
    type Result = ();

    fn handle(&mut self, _: InjectPanic, _: &mut Self::Context) {
        self.panic_next = true;
    }
}
