//! The messages and shared types that the stages exchange: what a partition hands a
//! tenant ([`Work`], [`Deliver`]), what comes back ([`Outcomes`] of an [`OutcomeKind`],
//! through a [`PartitionLink`]), and the state a partition shares with the tenants that
//! hold its events ([`PartitionShared`], [`Sending`]), and this member's share of the
//! group's CRM limits ([`MemberShare`]). Both stages import this module and neither
//! imports the other.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use actix::prelude::*;
use actix::WeakRecipient;

use crate::dead_letter::SourceMessage;
use crate::diff::SkipReason;
use crate::event::Event;
use crate::telemetry::outcome;

/// An event on its way to the CRM, and where its outcome goes.
#[derive(Debug, Clone)]
pub struct Work {
    pub event: Arc<Event>,
    pub source: Arc<SourceMessage>,
    pub reply: PartitionLink,
    /// Handed in while its tenant held more than its share of the partition's window
    /// under pressure: parked at once (when it can be), so that it does not hold the
    /// window (see `PartitionDeps::tenant_share`).
    pub over_share: bool,
}

/// Hand events to their tenant, in the order their partition read them.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Deliver(pub Vec<Work>);

/// The final outcome of one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutcomeKind {
    Delivered,
    Skipped(SkipReason),
    DeadLettered,
    /// Written to the retry topic, where it lives on.
    Parked,
}

impl OutcomeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            OutcomeKind::Delivered => outcome::DELIVERED,
            OutcomeKind::Skipped(r) => r.as_str(),
            OutcomeKind::DeadLettered => outcome::DEAD_LETTERED,
            OutcomeKind::Parked => outcome::PARKED,
        }
    }
}

/// Offsets whose events have their final outcome, back at their partition.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct Outcomes {
    pub generation: u64,
    pub offsets: Vec<i64>,
}

/// Where an event's outcome goes. Weak, so a retired partition is not kept alive (or
/// restarted by its supervisor) by events still out with a tenant.
#[derive(Debug, Clone)]
pub struct PartitionLink {
    pub recipient: WeakRecipient<Outcomes>,
    pub generation: u64,
    pub offset: i64,
    /// Tells whether this instance still owns the partition.
    pub partition: Arc<PartitionShared>,
}

impl PartitionLink {
    /// False once the partition was revoked (or the service is stopping): its next owner
    /// reads the event again from the committed offset, so this instance must not write
    /// it any more — an old write landing after the new owner's newer one would undo it.
    pub fn is_live(&self) -> bool {
        !self.partition.retired.load(Ordering::SeqCst)
    }

    /// Whether both links lead to the same partition generation.
    pub fn same_partition(&self, other: &PartitionLink) -> bool {
        Arc::ptr_eq(&self.partition, &other.partition) && self.generation == other.generation
    }

    /// Tells this link's partition generation that the events at `offsets` are decided.
    /// `do_send`: outcomes must never wait on the partition's mailbox (the partition may
    /// itself be waiting on the tenant's); their number is bounded by the in-flight window.
    pub fn send_all(&self, offsets: Vec<i64>) {
        if let Some(r) = self.recipient.upgrade() {
            r.do_send(Outcomes {
                generation: self.generation,
                offsets,
            });
        }
    }
}

/// A tenant restarted: hand it this partition's undecided events again.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct Redispatch {
    pub tenant: Arc<str>,
}

/// State a partition actor shares with the consumer thread (watermark, pause) and with
/// the tenants that hold its events (ownership, pressure, writes in flight).
#[derive(Debug, Default)]
pub struct PartitionShared {
    /// Next offset to commit; -1 before the first outcome.
    pub watermark: AtomicI64,
    /// Undecided events (see `OffsetTracker`), published by the partition actor.
    pub in_flight: AtomicUsize,
    /// Messages the consumer thread has handed to the actor that it has not taken in yet
    /// (in its mailbox): with `in_flight`, what the partition's window holds.
    pub queued: AtomicUsize,
    /// Set by the consumer thread when the partition is handed back.
    pub retired: AtomicBool,
    /// Set while the window is half full or more and more than one tenant is configured:
    /// a tenant's long waits for a permit are then parked, not held.
    pub pressure: AtomicBool,
    /// Events of this partition whose write is at the CRM, or whose dead-letter or park
    /// write is under way (counted by [`Sending`]). A revoke waits for it to reach zero
    /// before it commits and hands the partition over, so that no write of this member
    /// can land after the new owner's, nor be made again by it.
    pub sending: AtomicUsize,
    /// Offsets of this partition a previous owner already dead-lettered (markers on the
    /// state topic): read again after a crash, they are not dead-lettered twice. Those
    /// below the first offset read are dropped then (see [`PartitionActor`]).
    dead_lettered: std::sync::Mutex<std::collections::BTreeSet<i64>>,
}

/// This member's share of the group's work: the input partitions it holds over all the
/// input topics' partitions, set by the consumer thread at every rebalance and read by
/// the tenants, whose rate and concurrency limits are for the whole group (each member
/// paces its calls at its share of them). 1 until the first assignment.
#[derive(Debug)]
pub struct MemberShare(AtomicU64);

impl Default for MemberShare {
    fn default() -> Self {
        MemberShare(AtomicU64::new(1.0_f64.to_bits()))
    }
}

impl MemberShare {
    /// `held` of `total` partitions (none known yet: the whole).
    pub fn set(&self, held: usize, total: usize) {
        let share = if total == 0 {
            1.0
        } else {
            (held as f64 / total as f64).clamp(0.0, 1.0)
        };
        self.0.store(share.to_bits(), Ordering::Relaxed);
    }
    pub fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }
}

/// Counts events as being written at the CRM, for their partitions' `sending`, until
/// dropped: it travels with the write to the I/O runtime and is dropped when the write's
/// task ends, whoever was waiting for it.
pub struct Sending(Vec<Arc<PartitionShared>>);

impl Sending {
    /// Counts the events. SeqCst, as the revoke's `retired` store and `sending` load: a
    /// claim that counts first and then checks `retired` either sees the revoke or is
    /// seen by it.
    pub fn new(partitions: Vec<Arc<PartitionShared>>) -> Self {
        for p in &partitions {
            p.sending.fetch_add(1, Ordering::SeqCst);
        }
        Sending(partitions)
    }
}

impl Drop for Sending {
    fn drop(&mut self) {
        for p in &self.0 {
            p.sending.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl PartitionShared {
    /// What the partition's window holds: undecided events and messages on their way in.
    ///
    /// `queued` is read first: the actor counts a batch as undecided before it lowers
    /// `queued` ([`taken_in`](Self::taken_in), release), so a lowered `queued` seen here
    /// comes with the raised `in_flight`, and the sum never misses a batch.
    pub fn in_window(&self) -> usize {
        let queued = self.queued.load(Ordering::Acquire);
        queued + self.in_flight.load(Ordering::Acquire)
    }

    /// `n` messages handed to the actor were taken in (or dropped by it).
    pub fn taken_in(&self, n: usize) {
        let _ = self
            .queued
            .fetch_update(Ordering::Release, Ordering::Relaxed, |q| Some(q.saturating_sub(n)));
    }

    /// Adds offsets that were already dead-lettered.
    pub fn remember_dead_lettered(&self, offsets: impl IntoIterator<Item = i64>) {
        self.dead_lettered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(offsets);
    }

    /// Whether the message at `offset` was already dead-lettered by a previous owner.
    pub fn was_dead_lettered(&self, offset: i64) -> bool {
        self.dead_lettered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&offset)
    }

    /// Forgets (in memory only) the offsets below the watermark: this member never reads
    /// them again. Their markers stay on the state topic until the partition's next owner
    /// finds them committed (see `forget_dead_lettered_below`).
    pub fn drop_dead_lettered_below(&self, watermark: i64) {
        let mut set = self.dead_lettered.lock().unwrap_or_else(|p| p.into_inner());
        if set.first().is_some_and(|first| *first < watermark) {
            *set = set.split_off(&watermark);
        }
    }

    /// Forgets the markers below `first` (the first offset read: those are committed) and
    /// returns them, to be deleted from the state topic.
    pub fn forget_dead_lettered_below(&self, first: i64) -> Vec<i64> {
        let mut set = self.dead_lettered.lock().unwrap_or_else(|p| p.into_inner());
        let kept = set.split_off(&first);
        std::mem::replace(&mut *set, kept).into_iter().collect()
    }

    /// Whether the window is under pressure (see `pressure`).
    pub fn under_pressure(&self) -> bool {
        self.pressure.load(Ordering::Relaxed)
    }
}

/// The live partitions, as a tenant sees them: whom to ask to hand its undecided events
/// in again after it restarted.
pub trait Partitions: Send + Sync {
    fn redispatch_all(&self, tenant: &Arc<str>);
}
