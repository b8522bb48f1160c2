//! The per-record state machine of a tenant: pure, no actor, no I/O.
//!
//! Promises, proved by the property test below over random interleavings of arrivals,
//! results, retries, parks, hand-overs and restarts:
//! - **One write per record in flight.** A record has at most one *active* event (being
//!   checked, waiting for a permit, at the CRM, waiting for a retry, being made durable,
//!   dead-lettered or parked) and at most one *waiting* event behind it.
//! - **Newer supersedes.** An event arriving while the record is busy waits only if it
//!   is newer than both the active and the waiting event (ties are stale, as in the diff
//!   cache, [`is_stale`]); a waiting event it replaces ends as superseded. A copy of the
//!   same event (re-delivered, or read again from the retry topic) joins the one already
//!   here and ends with it.
//! - **Every event ends exactly once**: through [`Arrival::Ends`], or with its active
//!   event when the caller [`finish`](Slots::finish)es the record, or, when its partition
//!   was handed over, by [`keep_live`](Slots::keep_live) dropping it.
//!
//! Whether a write is needed at all (duplicates, stale versions against what the CRM
//! confirmed, unchanged payloads, delete tombstones) is the diff cache's decision, asked
//! before each active event is written; the test models it too, to check that the CRM
//! ends on the newest version and never goes back to an older one.

use crate::diff::{is_stale, SkipReason};
use crate::event::{RecordKey, RecordMap};

/// What the state machine needs to know of an event.
pub trait Item {
    /// Whether both are copies of one event (same id and version).
    fn same_event(&self, other: &Self) -> bool;
    fn version(&self) -> u64;
}

/// An event and the copies of it that arrived while it was here.
#[derive(Debug, Clone)]
pub struct Pending<W> {
    pub work: W,
    pub also: Vec<W>,
}

impl<W> Pending<W> {
    pub fn new(work: W) -> Self {
        Pending { work, also: Vec::new() }
    }
}

/// Where a record's active event is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Asking the diff actor whether a write is needed.
    Checking,
    /// Waiting for a rate/concurrency permit.
    Ready,
    /// At the CRM.
    Sending,
    /// Waiting for the retry queue; `ticket` tells this wait from an older one.
    Backoff { ticket: u64 },
    /// The CRM accepted it; its new state is being written to the state topic.
    Persisting,
    /// Being written to the DLQ.
    DeadLettering,
    /// Being written to the retry topic.
    Parking,
}

/// A record with a write under way. `data` is the caller's own (the request, attempts…).
#[derive(Debug)]
pub struct Slot<W, D> {
    pub active: Pending<W>,
    pub phase: Phase,
    pub data: D,
    /// The newest event that arrived while `active` was under way.
    pub waiting: Option<Pending<W>>,
}

/// What became of an arriving event.
#[derive(Debug)]
pub enum Arrival<W> {
    /// Nothing of the record is under way: the caller [`start`](Slots::start)s it.
    Free(Pending<W>),
    /// A copy of the active or the waiting event: it ends with that one.
    Joined,
    /// Waits behind the active event.
    Queued,
    /// Ends now, for this reason: the arriving event (stale), or the waiting one it
    /// replaced (superseded).
    Ends(Pending<W>, SkipReason),
}

/// Whether a record's active event is still owned (see [`Slots::keep_live`]).
#[derive(Debug)]
pub enum Liveness<W> {
    /// Owned. If the lead copy's partition was handed over, a live copy took the lead,
    /// and the copies whose partitions were handed over are given back as `dropped`
    /// (they end here).
    Live {
        dropped: Vec<W>,
    },
    /// Its partition (and that of every copy) was handed over: it is given back as
    /// `dropped` (it ends here; the next owner reads it again), with the waiting event,
    /// if any, to be started.
    HandedOver {
        dropped: Pending<W>,
        waiting: Option<Pending<W>>,
    },
    Absent,
}

/// Every record of a tenant with a write under way.
///
/// Each slot is boxed: the table then holds a key and a pointer per bucket (56 bytes)
/// instead of the whole slot (over 500 bytes with the tenant's data). The table grows by
/// doubling and never shrinks, so with slots inline, a backlog that took a tenant past
/// 57,344 records under way at once (48 partitions' windows) allocated a 72 MB table at
/// that moment and kept it: a step in resident memory at a random second of the run.
pub struct Slots<W, D> {
    map: RecordMap<Box<Slot<W, D>>>,
}

impl<W, D> Default for Slots<W, D> {
    fn default() -> Self {
        Slots {
            map: RecordMap::default(),
        }
    }
}

impl<W: Item, D> Slots<W, D> {
    /// Decides what an arriving event does (see [`Arrival`]).
    pub fn arrive(&mut self, key: &RecordKey, work: W) -> Arrival<W> {
        let Some(slot) = self.map.get_mut(key) else {
            return Arrival::Free(Pending::new(work));
        };
        if slot.active.work.same_event(&work) {
            if slot.phase != Phase::Parking {
                slot.active.also.push(work);
                return Arrival::Joined;
            }
            // The copy just written to the retry topic can be read back before the write
            // is acknowledged. It must not end with the original (as parked): it goes on
            // after it.
            return match &slot.waiting {
                None => {
                    slot.waiting = Some(Pending::new(work));
                    Arrival::Queued
                }
                Some(_) => Arrival::Ends(Pending::new(work), SkipReason::Stale),
            };
        }
        if is_stale(work.version(), slot.active.work.version()) {
            return Arrival::Ends(Pending::new(work), SkipReason::Stale);
        }
        match &mut slot.waiting {
            None => {
                slot.waiting = Some(Pending::new(work));
                Arrival::Queued
            }
            Some(w) if w.work.same_event(&work) => {
                w.also.push(work);
                Arrival::Joined
            }
            Some(w) if !is_stale(work.version(), w.work.version()) => {
                let replaced = std::mem::replace(w, Pending::new(work));
                Arrival::Ends(replaced, SkipReason::Superseded)
            }
            Some(_) => Arrival::Ends(Pending::new(work), SkipReason::Stale),
        }
    }

    /// Makes `pending` the record's active event, in [`Phase::Checking`].
    pub fn start(&mut self, key: RecordKey, pending: Pending<W>, data: D) {
        self.map.insert(
            key,
            Box::new(Slot {
                active: pending,
                phase: Phase::Checking,
                data,
                waiting: None,
            }),
        );
    }

    /// Ends the record's active event: gives it back, with the waiting one (which the
    /// caller starts next).
    pub fn finish(&mut self, key: &RecordKey) -> Option<(Pending<W>, Option<Pending<W>>)> {
        self.map.remove(key).map(|s| {
            let Slot { active, waiting, .. } = *s;
            (active, waiting)
        })
    }

    /// Keeps the record's active event only if it, or a copy of it, came through a
    /// partition this instance still owns (`is_live`); a live copy takes the lead. If
    /// none did, the event is dropped: the partition's next owner reads it again.
    pub fn keep_live(&mut self, key: &RecordKey, is_live: impl Fn(&W) -> bool) -> Liveness<W> {
        let Some(slot) = self.map.get_mut(key) else {
            return Liveness::Absent;
        };
        if is_live(&slot.active.work) {
            return Liveness::Live { dropped: Vec::new() };
        }
        let (mut live, dead): (Vec<W>, Vec<W>) = std::mem::take(&mut slot.active.also).into_iter().partition(&is_live);
        if let Some(lead) = live.pop() {
            let mut dropped = dead;
            dropped.push(std::mem::replace(&mut slot.active.work, lead));
            slot.active.also = live;
            return Liveness::Live { dropped };
        }
        slot.active.also = dead;
        match self.map.remove(key) {
            Some(s) => Liveness::HandedOver {
                dropped: s.active,
                waiting: s.waiting,
            },
            None => Liveness::Absent,
        }
    }

    pub fn get(&self, key: &RecordKey) -> Option<&Slot<W, D>> {
        self.map.get(key).map(|s| &**s)
    }

    pub fn get_mut(&mut self, key: &RecordKey) -> Option<&mut Slot<W, D>> {
        self.map.get_mut(key).map(|s| &mut **s)
    }

    /// The record's slot, if its active event is in `phase`.
    pub fn in_phase(&self, key: &RecordKey, phase: Phase) -> Option<&Slot<W, D>> {
        self.get(key).filter(|s| s.phase == phase)
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&RecordKey, &mut Slot<W, D>)> {
        self.map.iter_mut().map(|(key, slot)| (key, &mut **slot))
    }

    /// Forgets everything (a restart: the events come in again from their partitions).
    pub fn clear(&mut self) {
        self.map.clear();
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};
    use std::sync::Arc;

    use proptest::prelude::*;

    use super::*;

    /// A test event: which copy of which event of which record.
    #[derive(Debug, Clone, PartialEq)]
    struct Ev {
        record: u8,
        version: u64,
        delete: bool,
        copy: u32,
        /// The partition generation it came through; dead ones are handed over.
        partition_live: bool,
    }

    impl Item for Ev {
        fn same_event(&self, other: &Self) -> bool {
            self.record == other.record && self.version == other.version
        }
        fn version(&self) -> u64 {
            self.version
        }
    }

    fn key(record: u8) -> RecordKey {
        RecordKey {
            tenant: Arc::from("t"),
            entity: Arc::from("e"),
            key: Arc::from(record.to_string().as_str()),
        }
    }

    /// What the test can do next.
    #[derive(Debug, Clone)]
    enum Op {
        /// An event (or a copy of one) arrives.
        Arrive { record: u8, version: u64, delete: bool },
        /// The diff check of the record's active event comes back.
        Checked(u8),
        /// Its write is sent.
        Send(u8),
        /// The CRM answers: accepted, or a retryable failure.
        Answer(u8, bool),
        /// The state write of an accepted write is durable.
        Persisted(u8),
        /// A retry is due.
        RetryDue(u8),
        /// The failed write is parked instead (written to the retry topic, read back later).
        Parked(u8),
        /// Given up: dead-lettered.
        DeadLettered(u8),
        /// The record's partition is handed over.
        HandOver(u8),
        /// The tenant restarts: everything undecided is handed in again.
        Restart,
    }

    fn op() -> impl Strategy<Value = Op> {
        let r = 0u8..3;
        prop_oneof![
            // One event per (record, version): version 4 is a delete.
            4 => (r.clone(), 1u64..6).prop_map(|(record, version)| Op::Arrive { record, version, delete: version == 4 }),
            2 => r.clone().prop_map(Op::Checked),
            2 => r.clone().prop_map(Op::Send),
            2 => (r.clone(), prop::bool::weighted(0.7)).prop_map(|(r, ok)| Op::Answer(r, ok)),
            2 => r.clone().prop_map(Op::Persisted),
            1 => r.clone().prop_map(Op::RetryDue),
            1 => r.clone().prop_map(Op::Parked),
            1 => r.clone().prop_map(Op::DeadLettered),
            1 => r.clone().prop_map(Op::HandOver),
            1 => Just(Op::Restart),
        ]
    }

    /// The world around the state machine: the CRM, the diff cache, the retry topic, and
    /// what each event copy ended as.
    #[derive(Default)]
    struct World {
        slots: Slots<Ev, ()>,
        /// What the CRM holds per record: (version, deleted).
        crm: HashMap<u8, (u64, bool)>,
        /// The diff cache's confirmed version per record.
        confirmed: HashMap<u8, u64>,
        /// Every copy handed in, by copy number, and how often it ended.
        ended: BTreeMap<u32, u32>,
        /// Copies that came back from the retry topic or a restart, still to hand in.
        redelivered: Vec<Ev>,
        next_copy: u32,
        /// Records that may legitimately not end on their newest version.
        lost_newest: std::collections::HashSet<u8>,
    }

    impl World {
        fn end(&mut self, p: Pending<Ev>) {
            for w in std::iter::once(p.work).chain(p.also) {
                *self.ended.entry(w.copy).or_default() += 1;
            }
        }

        fn hand_in(&mut self, mut ev: Ev) {
            ev.copy = self.next_copy;
            self.next_copy += 1;
            self.ended.entry(ev.copy).or_default();
            let k = key(ev.record);
            match self.slots.arrive(&k, ev) {
                Arrival::Free(p) => self.start(k, p),
                Arrival::Joined | Arrival::Queued => {}
                Arrival::Ends(p, _) => self.end(p),
            }
        }

        fn start(&mut self, k: RecordKey, p: Pending<Ev>) {
            self.slots.start(k, p, ());
        }

        /// Ends the active event and starts the waiting one.
        fn finish(&mut self, record: u8) {
            if let Some((active, waiting)) = self.slots.finish(&key(record)) {
                self.end(active);
                if let Some(w) = waiting {
                    self.start(key(record), w);
                }
            }
        }

        fn step(&mut self, op: Op) {
            match op {
                Op::Arrive {
                    record,
                    version,
                    delete,
                } => self.hand_in(Ev {
                    record,
                    version,
                    delete,
                    copy: 0,
                    partition_live: true,
                }),
                Op::Checked(r) => {
                    let Some(slot) = self.slots.in_phase(&key(r), Phase::Checking) else {
                        return;
                    };
                    // The diff cache: duplicates and stale versions need no write.
                    let v = slot.active.work.version;
                    if self.confirmed.get(&r).is_some_and(|c| is_stale(v, *c)) {
                        self.finish(r);
                    } else if let Some(s) = self.slots.get_mut(&key(r)) {
                        s.phase = Phase::Ready;
                    }
                }
                Op::Send(r) => {
                    if let Some(s) = self.slots.get_mut(&key(r)).filter(|s| s.phase == Phase::Ready) {
                        s.phase = Phase::Sending;
                    }
                }
                Op::Answer(r, ok) => {
                    let Some(slot) = self.slots.get_mut(&key(r)).filter(|s| s.phase == Phase::Sending) else {
                        return;
                    };
                    if ok {
                        let w = &slot.active.work;
                        let (v, deleted) = (w.version, w.delete);
                        let held = self.crm.entry(r).or_insert((0, true));
                        // The same version again is a repeat (writes are idempotent).
                        assert!(v >= held.0, "record {r}: version {v} written over {}", held.0);
                        *held = (v, deleted);
                        slot.phase = Phase::Persisting;
                        // The tenant tells the diff cache at once (`Confirm`); the state
                        // topic follows (`Persisted`).
                        let c = self.confirmed.entry(r).or_default();
                        *c = (*c).max(v);
                    } else if slot.waiting.is_some() {
                        // A newer version is waiting: it replaces this one.
                        self.finish(r);
                    } else {
                        slot.phase = Phase::Backoff { ticket: 0 };
                    }
                }
                Op::Persisted(r) => {
                    if self.slots.in_phase(&key(r), Phase::Persisting).is_some() {
                        self.finish(r);
                    }
                }
                Op::RetryDue(r) => {
                    let Some(slot) = self.slots.get_mut(&key(r)) else {
                        return;
                    };
                    if !matches!(slot.phase, Phase::Backoff { .. }) {
                        return;
                    }
                    if slot.waiting.is_some() {
                        self.finish(r);
                    } else {
                        slot.phase = Phase::Ready;
                    }
                }
                Op::Parked(r) => {
                    let Some(slot) = self.slots.get_mut(&key(r)) else {
                        return;
                    };
                    if !matches!(slot.phase, Phase::Backoff { .. }) {
                        return;
                    }
                    slot.phase = Phase::Parking;
                    // The copy on the retry topic comes back later as a new copy.
                    let mut copy = slot.active.work.clone();
                    copy.partition_live = true;
                    self.redelivered.push(copy);
                    self.finish(r);
                }
                Op::DeadLettered(r) => {
                    let Some(slot) = self.slots.get_mut(&key(r)) else {
                        return;
                    };
                    if !matches!(slot.phase, Phase::Backoff { .. }) {
                        return;
                    }
                    slot.phase = Phase::DeadLettering;
                    self.lost_newest.insert(r);
                    self.finish(r);
                }
                Op::HandOver(r) => {
                    let k = key(r);
                    if let Some(s) = self.slots.get_mut(&k) {
                        s.active.work.partition_live = false;
                        for w in &mut s.active.also {
                            w.partition_live = false;
                        }
                        if s.phase == Phase::Sending || s.phase == Phase::Persisting {
                            // At the CRM already: a revoke waits for it (`consume`).
                            return;
                        }
                    }
                    match self.slots.keep_live(&k, |w| w.partition_live) {
                        Liveness::HandedOver { dropped, waiting } => {
                            // It ends here; the next owner reads it again (here: handed in
                            // again, a new copy).
                            self.redelivered.push(Ev {
                                partition_live: true,
                                ..dropped.work.clone()
                            });
                            self.end(dropped);
                            if let Some(w) = waiting {
                                self.start(k, w);
                            }
                        }
                        Liveness::Live { dropped } => {
                            for w in dropped {
                                self.end(Pending::new(w));
                            }
                        }
                        Liveness::Absent => {}
                    }
                }
                Op::Restart => {
                    // Everything undecided is handed in again by its partitions (an
                    // answer in flight is lost with the actor): each copy ends here and
                    // comes back as a new one.
                    let mut again = Vec::new();
                    for (_, s) in self.slots.iter_mut() {
                        again.push(s.active.clone());
                        again.extend(s.waiting.clone());
                    }
                    self.slots.clear();
                    for p in again {
                        self.redelivered.push(p.work.clone());
                        self.redelivered.extend(p.also.iter().cloned());
                        self.end(p);
                    }
                }
            }
        }

        /// Runs every write to the end: checks, sends, accepted answers, durable states,
        /// due retries, and whatever was redelivered.
        fn settle(&mut self) {
            for _ in 0..200 {
                let records: Vec<u8> = (0..3).collect();
                let pending = std::mem::take(&mut self.redelivered);
                for ev in pending {
                    self.hand_in(ev);
                }
                for r in &records {
                    for op in [
                        Op::Checked(*r),
                        Op::Send(*r),
                        Op::Answer(*r, true),
                        Op::Persisted(*r),
                        Op::RetryDue(*r),
                    ] {
                        self.step(op);
                    }
                }
                if self.slots.is_empty() && self.redelivered.is_empty() {
                    return;
                }
            }
            panic!("did not settle: {} records busy", self.slots.len());
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        /// Whatever the interleaving: never an older version over a newer one (checked
        /// at every accepted write), every copy handed in ends exactly once, and once
        /// everything settles each record holds its newest version, unless that version
        /// was dead-lettered.
        #[test]
        fn one_write_per_record_newest_wins_every_event_ends_once(ops in prop::collection::vec(op(), 1..120)) {
            let mut world = World::default();
            let mut newest: HashMap<u8, (u64, bool)> = HashMap::new();
            for op in ops {
                if let Op::Arrive { record, version, delete } = op {
                    let n = newest.entry(record).or_insert((0, true));
                    if version > n.0 {
                        *n = (version, delete);
                    }
                }
                world.step(op);
            }
            world.settle();
            for (copy, times) in &world.ended {
                prop_assert_eq!(*times, 1, "copy {} ended {} times", copy, times);
            }
            for (record, (version, deleted)) in newest {
                if world.lost_newest.contains(&record) {
                    continue;
                }
                let held = world.crm.get(&record).copied();
                prop_assert_eq!(held, Some((version, deleted)), "record {} does not hold its newest version", record);
            }
        }
    }
}
