//! Tenant health: a circuit breaker per tenant. Pure: the caller passes the time in.
//!
//! A failure is either the record's (its data was refused: retried if transient,
//! dead-lettered if permanent) or the tenant's: the CRM, or our access to it, is broken.
//! [`tenant_failure`] tells them apart. The tenant's failures are never a record's reason
//! to be dead-lettered:
//! - **Outage**: 5xx, timeouts, connections refused or lost. A run of
//!   `breaker.failure_threshold` of them, with no call getting through and of at least
//!   two different records, opens the breaker. Failures of one record alone stay that
//!   record's: a record the CRM always answers with 500 is dead-lettered once its retries
//!   are used up (a tenant with a single record in flight cannot tell that from an
//!   outage, and treats it as the record's).
//! - **Auth**: credentials refused (a 401 after a fresh token, a token endpoint that
//!   refuses the client): one is enough, the tenant is `auth_failed` and waits for a new
//!   secret. A 403 may be the credentials' (an OAuth scope) or one record's (no access
//!   to it): like an outage, it takes a run of `breaker.failure_threshold`, of two
//!   records or more, to make the tenant `auth_failed`.
//!
//! While the breaker is closed, a failure of these kinds is retried like any other (even
//! a refusal that would otherwise be permanent), so that a record that alone keeps
//! failing is dead-lettered once its retries are used up, and a tenant whose calls all
//! fail opens the breaker before that.
//! - Throttling (429, an exhausted allocation) is the pacer's: it pauses the tenant for
//!   the CRM's `Retry-After` (the `paused` state), and the throttled writes wait without
//!   ageing.
//!
//! While the breaker is open (or `auth_failed`) nothing is sent: the tenant's writes are
//! parked without ageing until the next probe. Probes come at growing intervals (from
//! `breaker.probe_interval_ms`, doubling, capped at `breaker.max_probe_interval_ms`): the
//! breaker goes half-open and lets one call through. Any call the CRM answers for a record
//! (accepted or refused for the record's own reasons) closes it; a tenant failure opens it
//! again for twice as long.

use std::time::{Duration, Instant};

use crate::connectors::{DeliveryError, ErrorCode};

/// A tenant's health, as the `crm_sync_tenant_state` gauge shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Closed,
    Open,
    HalfOpen,
    AuthFailed,
}

impl Health {
    pub const ALL: [Health; 4] = [Health::Closed, Health::Open, Health::HalfOpen, Health::AuthFailed];

    pub fn as_str(self) -> &'static str {
        match self {
            Health::Closed => "closed",
            Health::Open => "open",
            Health::HalfOpen => "half_open",
            Health::AuthFailed => "auth_failed",
        }
    }
}

/// Why a call failed for the tenant rather than for the record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TenantFailure {
    Outage,
    /// Credentials refused outright (401, a token endpoint's refusal).
    Auth,
    /// A 403: the credentials' scope, or one record's access.
    Forbidden,
    Throttled,
}

impl TenantFailure {
    /// Which of several failures of one call says most about the tenant.
    pub fn weight(self) -> u8 {
        match self {
            TenantFailure::Auth => 3,
            TenantFailure::Forbidden => 2,
            TenantFailure::Outage => 1,
            TenantFailure::Throttled => 0,
        }
    }
}

/// Whether a failed write is the tenant's failure, and which.
pub fn tenant_failure(e: &DeliveryError) -> Option<TenantFailure> {
    match e.code {
        // A token endpoint that is down or throttling is not a refusal of the credentials.
        ErrorCode::CrmAuth if e.http_status == Some(429) => Some(TenantFailure::Throttled),
        ErrorCode::CrmAuth if e.http_status.is_some_and(|s| s >= 500) => Some(TenantFailure::Outage),
        ErrorCode::CrmAuth if e.http_status == Some(403) => Some(TenantFailure::Forbidden),
        ErrorCode::CrmAuth => Some(TenantFailure::Auth),
        ErrorCode::CrmRateLimited => Some(TenantFailure::Throttled),
        ErrorCode::CrmServerError | ErrorCode::CrmTimeout | ErrorCode::CrmConnection | ErrorCode::CrmConnectionLost => {
            Some(TenantFailure::Outage)
        }
        _ => None,
    }
}

/// A change of health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    pub from: Health,
    pub to: Health,
}

#[derive(Debug, Clone)]
pub struct Breaker {
    health: Health,
    /// Tenant failures in a row with no call getting through.
    run: u32,
    /// The first record of the run, and whether another one has failed in it since.
    run_first: Option<u64>,
    run_of_several: bool,
    threshold: u32,
    base: Duration,
    max: Duration,
    /// The wait before the next probe once open.
    interval: Duration,
    probe_at: Instant,
    /// When the breaker last left `closed`.
    left_closed: Instant,
    /// Paused by an operator: nothing is sent, as when open, but nothing is probed either.
    held: bool,
}

impl Breaker {
    pub fn new(threshold: u32, base: Duration, max: Duration, now: Instant) -> Self {
        Breaker {
            health: Health::Closed,
            run: 0,
            run_first: None,
            run_of_several: false,
            threshold: threshold.max(1),
            base,
            max: max.max(base),
            interval: base,
            probe_at: now,
            left_closed: now,
            held: false,
        }
    }

    /// An operator pauses the tenant: its writes wait, without ageing, until [`release`].
    pub fn hold(&mut self, now: Instant) {
        if self.is_closed() {
            self.left_closed = now;
        }
        self.held = true;
    }

    /// An operator resumes the tenant; whether that makes it closed again (its records'
    /// ages then skip the time since [`left_closed`](Self::left_closed)).
    pub fn release(&mut self) -> bool {
        let was = std::mem::replace(&mut self.held, false);
        was && self.health == Health::Closed
    }

    pub fn is_held(&self) -> bool {
        self.held
    }

    /// The time until `now` has been taken off the waiting records' ages: a later
    /// unfreeze counts from here, not again from when the breaker left `closed`.
    pub fn unfrozen(&mut self, now: Instant) {
        self.left_closed = now;
    }

    /// When the breaker last left `closed`: the time since then, when it closes again,
    /// is time the tenant's records did not age.
    pub fn left_closed(&self) -> Instant {
        self.left_closed
    }

    pub fn health(&self) -> Health {
        self.health
    }

    /// Whether calls flow normally (closed, and not paused by an operator).
    pub fn is_closed(&self) -> bool {
        self.health == Health::Closed && !self.held
    }

    /// How long until the next probe (zero unless open or `auth_failed`).
    pub fn until_probe(&self, now: Instant) -> Duration {
        match self.health {
            Health::Open | Health::AuthFailed => self.probe_at.saturating_duration_since(now),
            Health::Closed | Health::HalfOpen => Duration::ZERO,
        }
    }

    /// Before a call: `Ok` if it may go (with the transition to half-open if this call is
    /// the probe), or how long to wait.
    pub fn gate(&mut self, now: Instant) -> Result<Option<Transition>, Duration> {
        if self.held {
            // Released by a message, which pumps again; this only bounds the wait.
            return Err(Duration::from_secs(60));
        }
        match self.health {
            Health::Closed | Health::HalfOpen => Ok(None),
            Health::Open | Health::AuthFailed if now < self.probe_at => Err(self.probe_at - now),
            Health::Open | Health::AuthFailed => Ok(Some(self.move_to(Health::HalfOpen))),
        }
    }

    /// Calls that may be in flight at once: one while probing.
    pub fn in_flight_limit(&self, pacing: usize) -> usize {
        if self.health == Health::HalfOpen {
            1
        } else {
            pacing
        }
    }

    /// After a call: `answered` if the CRM answered for at least one record (accepted it,
    /// or refused it for the record's own reasons); `failure`, the worst tenant failure
    /// among its results ([`TenantFailure::weight`]), throttling aside. Once open, only a
    /// probe's answer changes anything: late answers of calls sent before are ignored.
    /// `records`: the (hashed) records the failures were of.
    pub fn on_call(
        &mut self,
        now: Instant,
        answered: bool,
        failure: Option<TenantFailure>,
        records: &[u64],
    ) -> Option<Transition> {
        if answered {
            if matches!(self.health, Health::Open | Health::AuthFailed) {
                // A call sent before the breaker opened: the probe decides.
                return None;
            }
            self.run = 0;
            self.run_first = None;
            self.run_of_several = false;
            self.interval = self.base;
            return (self.health != Health::Closed).then(|| self.move_to(Health::Closed));
        }
        let failure = failure.filter(|f| *f != TenantFailure::Throttled)?;
        self.run = self.run.saturating_add(1);
        for r in records {
            match self.run_first {
                None => self.run_first = Some(*r),
                Some(first) if first != *r => self.run_of_several = true,
                Some(_) => {}
            }
        }
        let run = self.run >= self.threshold && self.run_of_several;
        let to = match (self.health, failure) {
            // Calls sent before the breaker opened, answered after it.
            (Health::Open | Health::AuthFailed, _) => return None,
            (_, TenantFailure::Auth) => Health::AuthFailed,
            (Health::HalfOpen, TenantFailure::Forbidden) => Health::AuthFailed,
            (Health::Closed, TenantFailure::Forbidden) if run => Health::AuthFailed,
            (Health::Closed, _) if run => Health::Open,
            (Health::Closed, _) => return None,
            (Health::HalfOpen, _) => Health::Open,
        };
        // A probe that failed: twice as long before the next one.
        if self.health == Health::HalfOpen {
            self.interval = self.interval.saturating_mul(2).min(self.max);
        }
        self.probe_at = now + self.interval;
        // Held, it left `closed` when the hold began: its records have not aged since.
        if self.health == Health::Closed && !self.held {
            self.left_closed = now;
        }
        (to != self.health).then(|| self.move_to(to))
    }

    fn move_to(&mut self, to: Health) -> Transition {
        let from = self.health;
        self.health = to;
        Transition { from, to }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Failures of two records, as in an outage.
    const REC: &[u64] = &[1, 2];
    const BASE: Duration = Duration::from_secs(1);
    const MAX: Duration = Duration::from_secs(8);

    fn breaker(now: Instant) -> Breaker {
        Breaker::new(3, BASE, MAX, now)
    }

    #[test]
    fn an_operator_hold_stops_calls_and_probes_until_released() {
        let t0 = Instant::now();
        let mut b = breaker(t0);
        b.hold(t0 + BASE);
        assert!(!b.is_closed() && b.is_held());
        assert!(b.gate(t0 + 10 * MAX).is_err(), "no probe while held");
        assert_eq!(b.left_closed(), t0 + BASE);
        assert!(b.release());
        assert!(b.is_closed() && b.gate(t0).is_ok());
        // Released while open: still open, probed as before.
        b.on_call(t0, false, Some(TenantFailure::Auth), REC);
        b.hold(t0);
        assert!(!b.release());
        assert_eq!(b.health(), Health::AuthFailed);
    }

    #[test]
    fn a_run_of_outages_opens_then_probes_at_growing_intervals_until_a_call_gets_through() {
        let t0 = Instant::now();
        let mut b = breaker(t0);
        assert_eq!(b.on_call(t0, false, Some(TenantFailure::Outage), REC), None);
        assert_eq!(b.on_call(t0, false, Some(TenantFailure::Outage), REC), None);
        let opened = b.on_call(t0, false, Some(TenantFailure::Outage), REC).unwrap();
        assert_eq!((opened.from, opened.to), (Health::Closed, Health::Open));
        assert_eq!(b.gate(t0), Err(BASE));
        let probe = b.gate(t0 + BASE).unwrap().unwrap();
        assert_eq!(probe.to, Health::HalfOpen);
        assert_eq!(b.in_flight_limit(8), 1);
        let reopened = b.on_call(t0 + BASE, false, Some(TenantFailure::Outage), REC).unwrap();
        assert_eq!(reopened.to, Health::Open);
        assert_eq!(b.until_probe(t0 + BASE), 2 * BASE, "twice as long");
        let mut at = t0 + BASE;
        for _ in 0..5 {
            at += MAX;
            b.gate(at).unwrap();
            b.on_call(at, false, Some(TenantFailure::Outage), REC);
        }
        assert_eq!(b.until_probe(at), MAX, "capped");
        b.gate(t0 + Duration::from_secs(200)).unwrap();
        let closed = b.on_call(t0 + Duration::from_secs(200), true, None, REC).unwrap();
        assert_eq!(closed.to, Health::Closed);
        assert_eq!(b.in_flight_limit(8), 8);
    }

    #[test]
    fn one_auth_failure_is_enough_and_a_record_refusal_is_not_the_tenant_s() {
        let t0 = Instant::now();
        let mut b = breaker(t0);
        assert_eq!(
            b.on_call(t0, false, Some(TenantFailure::Auth), REC).unwrap().to,
            Health::AuthFailed
        );
        assert!(b.gate(t0).is_err());
        let mut b = breaker(t0);
        b.on_call(t0, false, Some(TenantFailure::Outage), REC);
        b.on_call(t0, false, Some(TenantFailure::Outage), REC);
        // The CRM answered for a record (even with a refusal): the run is broken.
        assert_eq!(b.on_call(t0, true, None, REC), None);
        assert_eq!(b.on_call(t0, false, Some(TenantFailure::Outage), REC), None);
        assert_eq!(
            b.on_call(t0, false, Some(TenantFailure::Throttled), REC),
            None,
            "the pacer's"
        );
        assert!(b.is_closed());
    }

    #[test]
    fn failures_of_one_record_alone_never_open_it() {
        let t0 = Instant::now();
        let mut b = breaker(t0);
        for _ in 0..10 {
            assert_eq!(b.on_call(t0, false, Some(TenantFailure::Outage), &[7]), None);
            assert_eq!(b.on_call(t0, false, Some(TenantFailure::Forbidden), &[7]), None);
        }
        assert!(b.is_closed());
        let opened = b.on_call(t0, false, Some(TenantFailure::Outage), &[8]).unwrap();
        assert_eq!(opened.to, Health::Open, "a second record joins the run");
    }

    #[test]
    fn a_403_takes_a_run_and_late_answers_do_not_decide() {
        let t0 = Instant::now();
        let mut b = breaker(t0);
        // One record without access, among others that go through: not the tenant's.
        assert_eq!(b.on_call(t0, false, Some(TenantFailure::Forbidden), REC), None);
        assert_eq!(b.on_call(t0, true, None, REC), None);
        assert_eq!(b.on_call(t0, false, Some(TenantFailure::Forbidden), REC), None);
        assert_eq!(b.on_call(t0, false, Some(TenantFailure::Forbidden), REC), None);
        let refused = b.on_call(t0, false, Some(TenantFailure::Forbidden), REC).unwrap();
        assert_eq!(refused.to, Health::AuthFailed, "a run of them is the credentials'");
        // A call sent before, answered now, neither closes it nor moves the probe.
        let probe_in = b.until_probe(t0);
        assert_eq!(b.on_call(t0, true, None, REC), None);
        assert_eq!(b.on_call(t0, false, Some(TenantFailure::Auth), REC), None);
        assert_eq!(b.until_probe(t0), probe_in);
        assert_eq!(b.health(), Health::AuthFailed);
    }

    proptest! {
        /// Whatever the calls' outcomes: no call goes while open before the probe time,
        /// at most one goes while half-open, and the wait to a probe never exceeds the cap.
        #[test]
        fn probes_are_bounded(steps in proptest::collection::vec((0u64..20_000, 0u8..4), 1..200)) {
            let t0 = Instant::now();
            let mut b = breaker(t0);
            let mut now = t0;
            for (ms, what) in steps {
                now += Duration::from_millis(ms);
                prop_assert!(b.until_probe(now) <= MAX);
                match b.gate(now) {
                    Err(wait) => {
                        prop_assert!(matches!(b.health(), Health::Open | Health::AuthFailed));
                        prop_assert!(wait <= MAX && !wait.is_zero());
                    }
                    Ok(_) => {
                        prop_assert!(b.in_flight_limit(8) == 8 || b.health() == Health::HalfOpen);
                        let (answered, failure) = match what {
                            0 => (true, None),
                            1 => (false, Some(TenantFailure::Outage)),
                            2 => (false, Some(TenantFailure::Auth)),
                            _ => (false, Some(TenantFailure::Throttled)),
                        };
                        b.on_call(now, answered, failure, REC);
                        if answered {
                            prop_assert!(b.is_closed());
                        }
                    }
                }
            }
        }
    }
}
