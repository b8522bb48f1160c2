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
//! wholesale when the newer fills half the capacity (an approximate LRU; a hit in the old
//! generation moves the record to the new one). A forgotten record costs one extra write.

pub mod store;

use actix::prelude::*;

use crate::event::{Op, PayloadHash, RecordKey, RecordMap};
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

/// Bounded two-generation map of confirmed states.
#[derive(Debug)]
pub struct DiffCache {
    capacity: usize,
    young: RecordMap<RecordState>,
    old: RecordMap<RecordState>,
}

impl DiffCache {
    pub fn new(capacity: usize) -> Self {
        DiffCache {
            capacity: capacity.max(2),
            young: RecordMap::default(),
            old: RecordMap::default(),
        }
    }

    pub fn get(&mut self, key: &RecordKey) -> Option<RecordState> {
        if let Some(s) = self.young.get(key) {
            return Some(*s);
        }
        let s = self.old.remove(key)?;
        self.insert(key.clone(), s);
        Some(s)
    }

    fn insert(&mut self, key: RecordKey, state: RecordState) {
        if self.young.len() >= self.capacity / 2 && !self.young.contains_key(&key) {
            self.old = std::mem::take(&mut self.young);
        }
        self.young.insert(key, state);
    }

    /// Records a confirmed write; never moves a record back to an older version.
    pub fn confirm(&mut self, key: &RecordKey, state: RecordState) {
        match self.get(key) {
            Some(current) if current.version > state.version => {}
            _ => self.insert(key.clone(), state),
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
        let current = self.get(key);
        let verdict = verdict(current.as_ref(), mode, op, version, event, payload);
        let mut changed = None;
        match (verdict, current) {
            (Verdict::Skip(SkipReason::Unchanged), Some(mut s)) if version > s.version => {
                s.version = version;
                s.event = event;
                self.insert(key.clone(), s);
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
}
