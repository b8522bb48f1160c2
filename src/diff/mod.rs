//! Diff stage: spends no API call on a change the CRM already has.
//!
//! The [`DiffActor`] remembers, per record, what the CRM last *confirmed*: the newest
//! version applied, the hash of the mapped payload it holds (none after a delete: a
//! tombstone that keeps the version), and a fingerprint of the event that did it. State is
//! written only after the CRM accepted a write ([`Confirm`]); a check never writes,
//! except that an unchanged newer version advances the version (the CRM already holds
//! that payload).
//!
//! Checks come in two strengths. Partitions ask early ([`CheckMode::Early`]) and drop
//! exact duplicates and versions older than the confirmed one. Whether a payload is
//! unchanged is only decided by the tenant, when no other write of the record is in
//! flight ([`CheckMode::Full`]), because an earlier write still on its way could change
//! what the CRM holds.
//!
//! Confirmed states are also written to a compacted state topic ([`store`]) before the
//! event's offset is released, and read back when a partition changes owner, so a new
//! owner still recognises stale versions and unchanged payloads.
//!
//! Memory is bounded by `capacity` records: two generations of maps, the older dropped
//! wholesale when the newer is full (an approximate LRU; a hit in the old generation
//! moves the record to the new one). A forgotten record costs one extra write.
//!
//! Each remembered record costs 56 to 75 bytes: the maps are keyed by a 128-bit hash of
//! the record identity (seeded per process; a collision is as likely as guessing a
//! random 128-bit number), not by its strings, and each generation is sized up front to
//! fill, and never outgrow, one power-of-two table (see [`DiffCache::new`]).

pub mod store;

use actix::prelude::*;

use crate::event::{Op, PayloadHash, RecordKey};
use crate::supervise::{self, InjectPanic};
use crate::telemetry::metric;

/// What the CRM last confirmed for one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordState {
    pub version: u64,
    /// `None` is a tombstone: the record was deleted at `version`.
    pub payload: Option<PayloadHash>,
    pub event: u64,
}

/// Why an event needs no write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    /// The same event was already applied.
    Duplicate,
    /// The CRM already holds exactly this payload (or the record is already deleted).
    Unchanged,
    /// A newer version was already applied.
    Stale,
    /// A newer version of the record arrived while this one waited.
    Superseded,
}

impl SkipReason {
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::Duplicate => "duplicate",
            SkipReason::Unchanged => "unchanged",
            SkipReason::Stale => "stale",
            SkipReason::Superseded => "superseded",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Write,
    Skip(SkipReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckMode {
    /// Duplicates and stale versions only.
    Early,
    /// Also unchanged payloads; only valid when no write of the record is in flight.
    Full,
}

/// Whether an event at `version`, not the one that set `current`, is stale against it.
/// The one rule for version ties, shared by the diff cache and the tenant's slots.
pub fn is_stale(version: u64, current: u64) -> bool {
    version <= current
}

/// The pure decision, given what was confirmed.
pub fn verdict(
    confirmed: Option<&RecordState>,
    mode: CheckMode,
    op: Op,
    version: u64,
    event: u64,
    payload: Option<PayloadHash>,
) -> Verdict {
    let Some(state) = confirmed else {
        return Verdict::Write;
    };
    if state.event == event {
        return Verdict::Skip(SkipReason::Duplicate);
    }
    // A different event at the same version is stale too: of two events that claim one
    // version, the first decided wins, here as in the tenant's slots (`is_stale`).
    if is_stale(version, state.version) {
        return Verdict::Skip(SkipReason::Stale);
    }
    if mode == CheckMode::Full {
        let unchanged = match op {
            Op::Upsert => payload.is_some() && state.payload == payload,
            Op::Delete => state.payload.is_none(),
        };
        if unchanged {
            return Verdict::Skip(SkipReason::Unchanged);
        }
    }
    Verdict::Write
}

/// A record identity as the cache keys it: a 128-bit hash (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct RecordId(u128);

/// What the cache keeps of a [`RecordState`]: the same, without `Option`'s padding
/// (48 bytes an entry with its key, instead of 64).
#[derive(Debug, Clone, Copy)]
struct Packed {
    version: u64,
    event: u64,
    payload: [u8; 16],
    tombstone: bool,
}

impl From<RecordState> for Packed {
    fn from(s: RecordState) -> Self {
        Packed {
            version: s.version,
            event: s.event,
            payload: s.payload.map_or([0; 16], |p| p.0),
            tombstone: s.payload.is_none(),
        }
    }
}

impl From<Packed> for RecordState {
    fn from(p: Packed) -> Self {
        RecordState {
            version: p.version,
            payload: (!p.tombstone).then_some(PayloadHash(p.payload)),
            event: p.event,
        }
    }
}

type Generation = std::collections::HashMap<RecordId, Packed, foldhash::fast::RandomState>;

/// Bounded two-generation map of confirmed states.
#[derive(Debug)]
pub struct DiffCache {
    /// Records one generation holds before it becomes the old one.
    generation: usize,
    young: Generation,
    old: Generation,
    /// Seeds of the two 64-bit halves of a [`RecordId`], drawn per process.
    seeds: [foldhash::quality::FixedState; 2],
}

impl DiffCache {
    /// A cache of at most `capacity` records, and at least three quarters of that. The
    /// hash map's tables are powers of two, at most 7/8 full, so a generation of
    /// `capacity / 2` records may need a table almost twice its size. Each generation is
    /// therefore sized to fill a table exactly: the one below, if it holds at least three
    /// quarters of `capacity / 2`, else the one that holds `capacity / 2`. It is allocated
    /// once and never grows (about 56 bytes a record when full, 75 at most).
    pub fn new(capacity: usize) -> Self {
        let half = (capacity / 2).max(1);
        let mut buckets = 8usize;
        while buckets / 8 * 7 < half {
            buckets *= 2;
        }
        let smaller = buckets / 2 / 8 * 7;
        let generation = if 4 * smaller >= 3 * half { smaller } else { half };
        DiffCache {
            generation,
            young: Generation::with_capacity_and_hasher(generation, Default::default()),
            old: Generation::default(),
            seeds: [
                foldhash::quality::FixedState::with_seed(rand::random()),
                foldhash::quality::FixedState::with_seed(rand::random()),
            ],
        }
    }

    fn id(&self, key: &RecordKey) -> RecordId {
        use std::hash::BuildHasher;
        let [a, b] = &self.seeds;
        RecordId(u128::from(a.hash_one(key)) << 64 | u128::from(b.hash_one(key)))
    }

    pub fn get(&mut self, key: &RecordKey) -> Option<RecordState> {
        let id = self.id(key);
        self.get_id(id)
    }

    fn get_id(&mut self, id: RecordId) -> Option<RecordState> {
        if let Some(s) = self.young.get(&id) {
            return Some((*s).into());
        }
        let s = self.old.remove(&id)?;
        self.insert(id, s.into());
        Some(s.into())
    }

    fn insert(&mut self, id: RecordId, state: RecordState) {
        if self.young.len() >= self.generation && !self.young.contains_key(&id) {
            let fresh = Generation::with_capacity_and_hasher(self.generation, Default::default());
            self.old = std::mem::replace(&mut self.young, fresh);
        }
        self.young.insert(id, state.into());
    }

    /// Records a confirmed write; never moves a record back to an older version.
    pub fn confirm(&mut self, key: &RecordKey, state: RecordState) {
        let id = self.id(key);
        match self.get_id(id) {
            Some(current) if current.version > state.version => {}
            _ => self.insert(id, state),
        }
    }

    /// Checks an event; an unchanged newer version advances the stored version, and the
    /// new state is returned so that it can be made durable too.
    pub fn check(
        &mut self,
        key: &RecordKey,
        mode: CheckMode,
        op: Op,
        version: u64,
        event: u64,
        payload: Option<PayloadHash>,
    ) -> CheckResult {
        let id = self.id(key);
        let current = self.get_id(id);
        let verdict = verdict(current.as_ref(), mode, op, version, event, payload);
        let mut changed = None;
        match (verdict, current) {
            (Verdict::Skip(SkipReason::Unchanged), Some(mut s)) if version > s.version => {
                s.version = version;
                s.event = event;
                self.insert(id, s);
                changed = Some(s);
            }
            // The tenant re-checks an event it was handed again (after its restart): the
            // state it repeats was confirmed here, but its write to the state topic may
            // have died with the old actor, so it is written again before the outcome.
            (Verdict::Skip(SkipReason::Duplicate), Some(s)) if mode == CheckMode::Full => changed = Some(s),
            _ => {}
        }
        CheckResult { verdict, changed }
    }

    pub fn len(&self) -> usize {
        self.young.len() + self.old.len()
    }

    /// Records held when the cache is full: at most the capacity, at least three
    /// quarters of it.
    pub fn limit(&self) -> usize {
        2 * self.generation
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The answer to a [`Check`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckResult {
    pub verdict: Verdict,
    /// A confirmed state to make durable before the event's outcome: the record's new
    /// one when the check changed it, or, for a duplicate found by a full check, the one
    /// it repeats (see [`DiffCache::check`]).
    pub changed: Option<RecordState>,
}

/// Whether an event needs a write.
#[derive(Debug)]
pub struct Check {
    pub record: RecordKey,
    pub mode: CheckMode,
    pub op: Op,
    pub version: u64,
    pub event: u64,
    pub payload: Option<PayloadHash>,
}

/// Ask about several events at once (one message, one answer per check, in order).
#[derive(Debug, Message)]
#[rtype(result = "Vec<CheckResult>")]
pub struct Checks(pub Vec<Check>);

/// The CRM accepted writes: remember what it now holds (records of one batch).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Confirm(pub Vec<(RecordKey, RecordState)>);

/// States read back from the state topic for a partition this instance now owns.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Restore(pub Vec<(RecordKey, RecordState)>);

pub struct DiffActor {
    /// `false` turns every check into `Write` (benchmarks measure the saving this way).
    enabled: bool,
    cache: DiffCache,
    /// Set by [`InjectPanic`]; the next check panics.
    panic_next: bool,
}

impl DiffActor {
    pub fn new(enabled: bool, capacity: usize) -> Self {
        DiffActor {
            enabled,
            cache: DiffCache::new(capacity),
            panic_next: false,
        }
    }
}

impl Actor for DiffActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(4096);
    }
}

impl Supervised for DiffActor {
    fn restarting(&mut self, _: &mut Self::Context) {
        supervise::restarted("diff");
        // The cache survives the restart on purpose. It is not scratch state of one
        // handler but the service's memory of what the CRM confirmed, and nothing in
        // Kafka can rebuild it; each change to it is one map operation, so a panic cannot
        // leave an entry half-written. Wiping it would let a late stale version through.
        self.panic_next = false;
    }
}

const WRITE: CheckResult = CheckResult {
    verdict: Verdict::Write,
    changed: None,
};

impl Handler<Checks> for DiffActor {
    type Result = MessageResult<Checks>;

    fn handle(&mut self, Checks(checks): Checks, ctx: &mut Self::Context) -> Self::Result {
        let result = supervise::catch("diff", || {
            if std::mem::take(&mut self.panic_next) {
                panic!("injected panic in diff actor");
            }
            if !self.enabled {
                return vec![WRITE; checks.len()];
            }
            checks
                .iter()
                .map(|c| self.cache.check(&c.record, c.mode, c.op, c.version, c.event, c.payload))
                .collect()
        });
        match result {
            Ok(v) => MessageResult(v),
            Err(_) => {
                ctx.stop();
                // Writing is always safe (writes are idempotent); skipping might not be.
                MessageResult(vec![WRITE; checks.len()])
            }
        }
    }
}

impl Handler<Restore> for DiffActor {
    type Result = ();

    fn handle(&mut self, msg: Restore, ctx: &mut Self::Context) {
        let restored = msg.0.len();
        let applied = supervise::catch("diff", || {
            for (record, state) in &msg.0 {
                self.cache.confirm(record, *state);
            }
        });
        if applied.is_err() {
            ctx.stop();
            return;
        }
        metrics::counter!(metric::STATE_RESTORED).increment(restored as u64);
        metrics::gauge!(metric::DIFF_RECORDS).set(self.cache.len() as f64);
    }
}

impl Handler<Confirm> for DiffActor {
    type Result = ();

    fn handle(&mut self, Confirm(confirmed): Confirm, ctx: &mut Self::Context) {
        let applied = supervise::catch("diff", || {
            for (record, state) in &confirmed {
                self.cache.confirm(record, *state);
            }
        });
        if applied.is_err() {
            ctx.stop();
        }
        metrics::gauge!(metric::DIFF_RECORDS).set(self.cache.len() as f64);
    }
}

impl Handler<InjectPanic> for DiffActor {
    type Result = ();

    fn handle(&mut self, _: InjectPanic, _: &mut Self::Context) {
        self.panic_next = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(k: &str) -> RecordKey {
        RecordKey {
            tenant: "t".into(),
            entity: "contact".into(),
            key: k.into(),
        }
    }
    const A: Option<PayloadHash> = Some(PayloadHash([1; 16]));
    const B: Option<PayloadHash> = Some(PayloadHash([2; 16]));

    #[test]
    fn duplicate_stale_and_unchanged_are_skipped() {
        let mut c = DiffCache::new(100);
        let k = key("1");
        assert_eq!(
            c.check(&k, CheckMode::Full, Op::Upsert, 1, 10, A).verdict,
            Verdict::Write
        );
        c.confirm(
            &k,
            RecordState {
                version: 1,
                payload: A,
                event: 10,
            },
        );
        assert_eq!(
            c.check(&k, CheckMode::Full, Op::Upsert, 1, 10, A).verdict,
            Verdict::Skip(SkipReason::Duplicate)
        );
        assert_eq!(
            c.check(&k, CheckMode::Full, Op::Upsert, 2, 11, A).verdict,
            Verdict::Skip(SkipReason::Unchanged)
        );
        // The unchanged v2 advanced the version: a late v1' is now stale.
        assert_eq!(
            c.check(&k, CheckMode::Full, Op::Upsert, 1, 12, B).verdict,
            Verdict::Skip(SkipReason::Stale)
        );
        assert_eq!(
            c.check(&k, CheckMode::Full, Op::Upsert, 3, 13, B).verdict,
            Verdict::Write
        );
    }

    #[test]
    fn a_version_tie_is_stale_and_a_full_duplicate_returns_the_state_to_make_durable() {
        let mut c = DiffCache::new(100);
        let k = key("1");
        let confirmed = RecordState {
            version: 3,
            payload: A,
            event: 10,
        };
        c.confirm(&k, confirmed);
        // Another event claiming version 3: the first decided wins, as in the tenant.
        for mode in [CheckMode::Early, CheckMode::Full] {
            assert_eq!(
                c.check(&k, mode, Op::Upsert, 3, 11, B).verdict,
                Verdict::Skip(SkipReason::Stale)
            );
        }
        let early = c.check(&k, CheckMode::Early, Op::Upsert, 3, 10, A);
        assert_eq!(early.verdict, Verdict::Skip(SkipReason::Duplicate));
        assert_eq!(early.changed, None);
        let full = c.check(&k, CheckMode::Full, Op::Upsert, 3, 10, A);
        assert_eq!(full.verdict, Verdict::Skip(SkipReason::Duplicate));
        assert_eq!(full.changed, Some(confirmed), "written again before the outcome");
    }

    #[test]
    fn early_check_never_decides_unchanged() {
        let mut c = DiffCache::new(100);
        let k = key("1");
        c.confirm(
            &k,
            RecordState {
                version: 1,
                payload: A,
                event: 10,
            },
        );
        assert_eq!(
            c.check(&k, CheckMode::Early, Op::Upsert, 2, 11, A).verdict,
            Verdict::Write
        );
    }

    #[test]
    fn tombstone_keeps_version_but_not_payload() {
        let mut c = DiffCache::new(100);
        let k = key("1");
        c.confirm(
            &k,
            RecordState {
                version: 1,
                payload: A,
                event: 10,
            },
        );
        c.confirm(
            &k,
            RecordState {
                version: 2,
                payload: None,
                event: 11,
            },
        );
        // A late older upsert cannot resurrect the record...
        assert_eq!(
            c.check(&k, CheckMode::Full, Op::Upsert, 1, 12, A).verdict,
            Verdict::Skip(SkipReason::Stale)
        );
        // ...a repeated delete costs nothing...
        assert_eq!(
            c.check(&k, CheckMode::Full, Op::Delete, 3, 13, None).verdict,
            Verdict::Skip(SkipReason::Unchanged)
        );
        // ...and a re-create with the old payload is sent.
        assert_eq!(
            c.check(&k, CheckMode::Full, Op::Upsert, 4, 14, A).verdict,
            Verdict::Write
        );
    }

    #[test]
    fn confirm_never_moves_back_a_version() {
        let mut c = DiffCache::new(100);
        let k = key("1");
        c.confirm(
            &k,
            RecordState {
                version: 5,
                payload: A,
                event: 1,
            },
        );
        c.confirm(
            &k,
            RecordState {
                version: 4,
                payload: B,
                event: 2,
            },
        );
        assert_eq!(c.get(&k).unwrap().payload, A);
    }

    #[test]
    fn memory_is_bounded_by_capacity() {
        let mut c = DiffCache::new(100);
        for i in 0..10_000 {
            c.confirm(
                &key(&i.to_string()),
                RecordState {
                    version: 1,
                    payload: A,
                    event: i,
                },
            );
            assert!(c.len() <= 100, "{} records held", c.len());
        }
        // The most recent records are still known.
        assert!(c.get(&key("9999")).is_some());
    }

    #[test]
    fn each_generation_is_one_table_that_never_grows() {
        for capacity in [2, 10, 100, 1_000, 100_000] {
            let mut c = DiffCache::new(capacity);
            assert!(
                c.generation >= 1 && 2 * c.generation <= capacity,
                "{capacity}: {}",
                c.generation
            );
            if capacity >= 100 {
                // At least three quarters of what the capacity allows is used.
                assert!(8 * c.generation >= 3 * capacity, "{capacity}: {}", c.generation);
            }
            let allocated = c.young.capacity();
            for i in 0..c.generation as u64 {
                c.confirm(
                    &key(&i.to_string()),
                    RecordState {
                        version: 1,
                        payload: None,
                        event: i,
                    },
                );
            }
            assert_eq!(c.young.capacity(), allocated, "{capacity}: the table grew");
        }
    }

    proptest::proptest! {
        /// Whatever is confirmed, what comes back is what went in (tombstones included),
        /// and never more than `capacity` records are held.
        #[test]
        fn states_round_trip_within_capacity(
            writes in proptest::collection::vec((0u8..40, 0u64..5, proptest::option::of(proptest::array::uniform16(0u8..3))), 1..200),
            capacity in 2usize..50,
        ) {
            let mut c = DiffCache::new(capacity);
            for (k, version, payload) in writes {
                let state = RecordState { version, payload: payload.map(PayloadHash), event: version * 7 + u64::from(k) };
                let before = c.get(&key(&k.to_string()));
                c.confirm(&key(&k.to_string()), state);
                let after = c.get(&key(&k.to_string())).unwrap();
                match before {
                    Some(b) if b.version > version => proptest::prop_assert_eq!(after, b),
                    _ => proptest::prop_assert_eq!(after, state),
                }
                proptest::prop_assert!(c.len() <= capacity);
            }
        }
    }
}
