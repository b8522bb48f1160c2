//! Tenant health: a circuit breaker per tenant. Pure: the caller passes the time in.
//!
//! A failure is either the record's (its data was refused: retried if transient,
//! dead-lettered if permanent) or the tenant's: the CRM, or our access to it, is broken.
//! [`tenant_failure`] tells them apart. The tenant's failures are never a record's reason
//! to be dead-lettered:
//! - **Outage**: 5xx, timeouts, connections refused or lost. A run of
//!   `breaker.failure_threshold` of them with no call getting through opens the breaker.
//!   A single one while the breaker is closed stays the record's (a record the CRM
//!   always answers with 500 while others go through is still dead-lettered in the end).
//! - **Auth**: credentials refused (a 401 after a fresh token, a token endpoint that
//!   refuses the client, a 403 for credentials that may not write). One is enough: the
//!   tenant is `auth_failed` and waits for a new secret.
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
    Auth,
    Throttled,
}

/// Whether a failed write is the tenant's failure, and which.
pub fn tenant_failure(e: &DeliveryError) -> Option<TenantFailure> {
    match e.code {
        // A token endpoint that is down or throttling is not a refusal of the credentials.
        ErrorCode::CrmAuth if e.http_status == Some(429) => Some(TenantFailure::Throttled),
        ErrorCode::CrmAuth if e.http_status.is_some_and(|s| s >= 500) => Some(TenantFailure::Outage),
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
    threshold: u32,
    base: Duration,
    max: Duration,
    /// The wait before the next probe once open.
    interval: Duration,
    probe_at: Instant,
}

impl Breaker {
    pub fn new(threshold: u32, base: Duration, max: Duration, now: Instant) -> Self {
        Breaker {
            health: Health::Closed,
            run: 0,
            threshold: threshold.max(1),
            base,
            max: max.max(base),
            interval: base,
            probe_at: now,
        }
    }

    pub fn health(&self) -> Health {
        self.health
    }

    /// Whether calls flow normally.
    pub fn is_closed(&self) -> bool {
        self.health == Health::Closed
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
    /// among its results (auth before outage), throttling aside.
    pub fn on_call(&mut self, now: Instant, answered: bool, failure: Option<TenantFailure>) -> Option<Transition> {
        if answered {
            self.run = 0;
            self.interval = self.base;
            return (self.health != Health::Closed).then(|| self.move_to(Health::Closed));
        }
        let failure = failure.filter(|f| *f != TenantFailure::Throttled)?;
        self.run = self.run.saturating_add(1);
        let to = match (self.health, failure) {
            (_, TenantFailure::Auth) => Health::AuthFailed,
            (Health::Closed, _) if self.run >= self.threshold => Health::Open,
            (Health::Closed, _) => return None,
            (Health::HalfOpen, _) => Health::Open,
            // Calls sent before the breaker opened, answered after it.
            (Health::Open | Health::AuthFailed, _) => return None,
        };
        // A probe that failed: twice as long before the next one.
        if self.health == Health::HalfOpen {
            self.interval = self.interval.saturating_mul(2).min(self.max);
        }
        self.probe_at = now + self.interval;
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

    const BASE: Duration = Duration::from_secs(1);
    const MAX: Duration = Duration::from_secs(8);

    fn breaker(now: Instant) -> Breaker {
        Breaker::new(3, BASE, MAX, now)
    }

    #[test]
    fn a_run_of_outages_opens_then_probes_at_growing_intervals_until_a_call_gets_through() {
        let t0 = Instant::now();
        let mut b = breaker(t0);
        assert_eq!(b.on_call(t0, false, Some(TenantFailure::Outage)), None);
        assert_eq!(b.on_call(t0, false, Some(TenantFailure::Outage)), None);
        let opened = b.on_call(t0, false, Some(TenantFailure::Outage)).unwrap();
        assert_eq!((opened.from, opened.to), (Health::Closed, Health::Open));
        assert_eq!(b.gate(t0), Err(BASE));
        let probe = b.gate(t0 + BASE).unwrap().unwrap();
        assert_eq!(probe.to, Health::HalfOpen);
        assert_eq!(b.in_flight_limit(8), 1);
        let reopened = b.on_call(t0 + BASE, false, Some(TenantFailure::Outage)).unwrap();
        assert_eq!(reopened.to, Health::Open);
        assert_eq!(b.until_probe(t0 + BASE), 2 * BASE, "twice as long");
        let mut at = t0 + BASE;
        for _ in 0..5 {
            at += MAX;
            b.gate(at).unwrap();
            b.on_call(at, false, Some(TenantFailure::Outage));
        }
        assert_eq!(b.until_probe(at), MAX, "capped");
        b.gate(t0 + Duration::from_secs(200)).unwrap();
        let closed = b.on_call(t0 + Duration::from_secs(200), true, None).unwrap();
        assert_eq!(closed.to, Health::Closed);
        assert_eq!(b.in_flight_limit(8), 8);
    }

    #[test]
    fn one_auth_failure_is_enough_and_a_record_refusal_is_not_the_tenant_s() {
        let t0 = Instant::now();
        let mut b = breaker(t0);
        assert_eq!(
            b.on_call(t0, false, Some(TenantFailure::Auth)).unwrap().to,
            Health::AuthFailed
        );
        assert!(b.gate(t0).is_err());
        let mut b = breaker(t0);
        b.on_call(t0, false, Some(TenantFailure::Outage));
        b.on_call(t0, false, Some(TenantFailure::Outage));
        // The CRM answered for a record (even with a refusal): the run is broken.
        assert_eq!(b.on_call(t0, true, None), None);
        assert_eq!(b.on_call(t0, false, Some(TenantFailure::Outage)), None);
        assert_eq!(
            b.on_call(t0, false, Some(TenantFailure::Throttled)),
            None,
            "the pacer's"
        );
        assert!(b.is_closed());
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
                        b.on_call(now, answered, failure);
                        if answered {
                            prop_assert!(b.is_closed());
                        }
                    }
                }
            }
        }
    }
}
