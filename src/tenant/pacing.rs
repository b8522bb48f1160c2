//! Pacing of one tenant's CRM calls: a request rate and a concurrency limit, both with
//! the configured values as ceilings, lowered when the CRM signals pressure and raised
//! again while it accepts calls (additive increase, multiplicative decrease), plus a
//! pause the CRM can impose (`Retry-After`, an exhausted API allocation), and a cap
//! from the remaining quota the CRM reports in its headers.
//!
//! Pure: the caller passes the time in, so tests control it.

use std::time::{Duration, Instant};

use crate::connectors::http::MAX_CRM_WAIT;
use crate::connectors::Quota;

/// The lowest rate pressure can push a tenant to, in calls per second.
const MIN_RATE_PER_SEC: f64 = 0.5;

/// Share of the CRM's window below which its reported quota caps the rate.
const LOW_QUOTA: f64 = 0.1;

#[derive(Debug, Clone)]
pub struct Pacer {
    /// The limits configured for the whole group.
    group_rate: f64,
    group_concurrency: usize,
    /// This member's share of them (see [`set_share`](Self::set_share)).
    share: f64,
    ceiling_rate: f64,
    rate_per_sec: f64,
    tokens: f64,
    last_refill: Instant,
    paused_until: Option<Instant>,
    /// How long the current pause was set for.
    pause_length: Duration,
    ceiling_concurrency: usize,
    /// Fractional, so that each successful call can add `1 / concurrency` to it.
    concurrency: f64,
    /// Rate cap from a low remaining quota, while it lasts.
    quota_cap: Option<f64>,
}

impl Pacer {
    /// At most `rate_per_sec` calls per second on average (bursts of up to one second's
    /// worth) and `max_concurrency` calls at once.
    pub fn new(rate_per_sec: f64, max_concurrency: usize, now: Instant) -> Self {
        Pacer {
            group_rate: rate_per_sec,
            group_concurrency: max_concurrency.max(1),
            share: 1.0,
            ceiling_rate: rate_per_sec,
            rate_per_sec,
            tokens: rate_per_sec.max(1.0),
            last_refill: now,
            paused_until: None,
            pause_length: Duration::ZERO,
            ceiling_concurrency: max_concurrency.max(1),
            concurrency: max_concurrency.max(1) as f64,
            quota_cap: None,
        }
    }

    /// Paces at `share` (0 to 1) of the group's limits: the rate in proportion (a member
    /// with no share at a thousandth of the group's rate, so that it is slowed, not
    /// stopped), the concurrency rounded down (at least one call: the group can then
    /// exceed a concurrency limit smaller than its member count). What pressure has taken
    /// off the current values stays off, in proportion. Nothing changes when the share is
    /// the same.
    pub fn set_share(&mut self, share: f64) {
        let share = if share.is_finite() { share.clamp(0.0, 1.0) } else { 1.0 };
        if share == self.share {
            return;
        }
        self.share = share;
        let rate = (self.group_rate * share).max(self.group_rate / 1000.0);
        let concurrency = ((self.group_concurrency as f64 * share).floor() as usize).max(1);
        let (rate_left, concurrency_left) = (
            self.rate_per_sec / self.ceiling_rate,
            self.concurrency / self.ceiling_concurrency as f64,
        );
        self.ceiling_rate = rate;
        self.ceiling_concurrency = concurrency;
        self.rate_per_sec = (rate * rate_left).clamp(MIN_RATE_PER_SEC.min(rate), rate);
        self.concurrency = (concurrency as f64 * concurrency_left).clamp(1.0, concurrency as f64);
        self.tokens = self.tokens.min(self.rate().max(1.0));
    }

    /// Takes a permit for one call, or says how long to wait for one.
    pub fn try_acquire(&mut self, now: Instant) -> Result<(), Duration> {
        if let Some(until) = self.paused_until {
            if now < until {
                return Err(until - now);
            }
            self.paused_until = None;
        }
        let rate = self.rate();
        let burst = rate.max(1.0);
        let elapsed = now.saturating_duration_since(self.last_refill).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        self.last_refill = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            let wait = (1.0 - self.tokens) / rate;
            Err(Duration::from_secs_f64(wait).max(Duration::from_millis(1)))
        }
    }

    /// Calls that may be in flight at once now.
    pub fn concurrency(&self) -> usize {
        (self.concurrency.floor() as usize).clamp(1, self.ceiling_concurrency)
    }

    /// Calls per second allowed now.
    pub fn rate(&self) -> f64 {
        match self.quota_cap {
            Some(cap) => self.rate_per_sec.min(cap),
            None => self.rate_per_sec,
        }
    }

    /// The CRM reported its remaining quota. While less than [`LOW_QUOTA`] of the window
    /// is left, the rate is capped so that the rest lasts until the window resets
    /// (`remaining / resets_in`), or, with no reset time, in proportion to what is left;
    /// an empty window with a known reset pauses until then. A healthy quota lifts the cap.
    pub fn on_quota(&mut self, now: Instant, quota: Quota) {
        let Some(left) = quota.fraction_left() else {
            return;
        };
        if left >= LOW_QUOTA {
            self.quota_cap = None;
            return;
        }
        let floor = MIN_RATE_PER_SEC.min(self.ceiling_rate);
        let cap = match quota.resets_in.filter(|r| !r.is_zero()) {
            Some(reset) if quota.remaining == 0 => {
                self.pause(now, reset);
                floor
            }
            // The quota is the whole group's: this member's share of what is left.
            Some(reset) => quota.remaining as f64 / reset.as_secs_f64() * self.share,
            None => self.ceiling_rate * left / LOW_QUOTA,
        };
        self.quota_cap = Some(cap.clamp(floor, self.ceiling_rate));
    }

    /// The CRM accepted a call: recover towards the ceilings.
    pub fn on_success(&mut self) {
        self.rate_per_sec = (self.rate_per_sec + self.ceiling_rate / 20.0).min(self.ceiling_rate);
        self.concurrency = (self.concurrency + 1.0 / self.concurrency).min(self.ceiling_concurrency as f64);
    }

    /// The CRM signalled pressure (429, `REQUEST_LIMIT_EXCEEDED`, …): halve the rate and
    /// the concurrency, and pause for as long as it asked.
    pub fn on_throttle(&mut self, now: Instant, pause: Option<Duration>) {
        self.rate_per_sec = (self.rate_per_sec / 2.0).max(MIN_RATE_PER_SEC.min(self.ceiling_rate));
        self.tokens = self.tokens.min(self.rate_per_sec.max(1.0));
        self.concurrency = (self.concurrency / 2.0).max(1.0);
        if let Some(p) = pause {
            self.pause(now, p);
        }
    }

    /// Stops all calls until `now + pause` (a later pause wins over an earlier one).
    /// A pause is at most [`MAX_CRM_WAIT`] long.
    pub fn pause(&mut self, now: Instant, pause: Duration) {
        let pause = pause.min(MAX_CRM_WAIT);
        let until = now + pause;
        if self.paused_until.is_none_or(|u| u < until) {
            self.paused_until = Some(until);
            self.pause_length = pause;
        }
    }

    /// Ends the pause in force (an operator resumed the tenant).
    pub fn end_pause(&mut self) {
        self.paused_until = None;
    }

    /// How long the pause in force has left to run; zero when not paused.
    pub fn pause_remaining(&self, now: Instant) -> Duration {
        self.paused_until
            .map_or(Duration::ZERO, |u| u.saturating_duration_since(now))
    }

    /// How long the pause in force was set for (the CRM's `Retry-After`, say); zero
    /// when not paused.
    pub fn pause_length(&self, now: Instant) -> Duration {
        if self.is_paused(now) {
            self.pause_length
        } else {
            Duration::ZERO
        }
    }

    pub fn is_paused(&self, now: Instant) -> bool {
        self.paused_until.is_some_and(|u| now < u)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_share_of_the_group_limits_paces_at_that_share() {
        let t0 = Instant::now();
        let mut p = Pacer::new(30.0, 8, t0);
        p.set_share(1.0 / 3.0);
        assert_eq!((p.rate(), p.concurrency()), (10.0, 2));
        // The burst is a second of the share, not of the group's rate.
        let burst = (0..100).take_while(|_| p.try_acquire(t0).is_ok()).count();
        assert!(burst <= 10, "{burst}");
        // Pressure taken off stays off, in proportion, when the share changes.
        p.on_throttle(t0, None);
        p.set_share(2.0 / 3.0);
        assert_eq!((p.rate(), p.concurrency()), (10.0, 2));
        for _ in 0..1_000 {
            p.on_success();
        }
        assert_eq!((p.rate(), p.concurrency()), (20.0, 5));
        // A member holding nothing is slowed to a thousandth, not stopped; one call at a time.
        p.set_share(0.0);
        assert!((p.rate() - 0.03).abs() < 1e-9 && p.concurrency() == 1, "{}", p.rate());
        // Six members of a group limited to 1 call/s: a sixth each, no floor above it.
        let mut low = Pacer::new(1.0, 1, t0);
        low.set_share(1.0 / 6.0);
        assert!((low.rate() - 1.0 / 6.0).abs() < 1e-9, "{}", low.rate());
        p.set_share(f64::NAN);
        assert_eq!((p.rate(), p.concurrency()), (30.0, 8));
    }

    #[test]
    fn a_pause_no_clock_can_hold_is_capped_instead_of_panicking() {
        let now = Instant::now();
        let mut p = Pacer::new(10.0, 2, now);
        p.on_throttle(now, Some(Duration::MAX));
        assert!(p.is_paused(now));
        assert_eq!(p.pause_remaining(now), MAX_CRM_WAIT);
    }

    #[test]
    fn allows_a_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut p = Pacer::new(10.0, 4, t0);
        for _ in 0..10 {
            assert!(p.try_acquire(t0).is_ok());
        }
        let wait = p.try_acquire(t0).unwrap_err();
        assert!(wait <= Duration::from_millis(100) && wait > Duration::ZERO, "{wait:?}");
        assert!(p.try_acquire(t0 + Duration::from_millis(100)).is_ok());
    }

    #[test]
    fn a_pause_blocks_until_it_ends() {
        let t0 = Instant::now();
        let mut p = Pacer::new(1000.0, 4, t0);
        p.pause(t0, Duration::from_secs(5));
        assert_eq!(p.try_acquire(t0 + Duration::from_secs(1)), Err(Duration::from_secs(4)));
        assert!(p.try_acquire(t0 + Duration::from_secs(5)).is_ok());
    }

    #[test]
    fn pressure_halves_rate_and_concurrency_and_success_restores_them() {
        let t0 = Instant::now();
        let mut p = Pacer::new(100.0, 16, t0);
        p.on_throttle(t0, Some(Duration::from_secs(2)));
        assert_eq!((p.rate(), p.concurrency()), (50.0, 8));
        assert!(p.is_paused(t0 + Duration::from_secs(1)));
        p.on_throttle(t0, None);
        assert_eq!((p.rate(), p.concurrency()), (25.0, 4));
        // Never below one call at a time, or below the minimum rate.
        for _ in 0..20 {
            p.on_throttle(t0, None);
        }
        assert_eq!((p.rate(), p.concurrency()), (MIN_RATE_PER_SEC, 1));
        // Recovery: back to the ceilings, never past them.
        for _ in 0..1_000 {
            p.on_success();
        }
        assert_eq!((p.rate(), p.concurrency()), (100.0, 16));
    }

    #[test]
    fn a_low_quota_caps_the_rate_until_it_recovers() {
        let t0 = Instant::now();
        let mut p = Pacer::new(100.0, 4, t0);
        let quota = |remaining, resets_in: Option<u64>| Quota {
            remaining,
            limit: Some(700),
            resets_in: resets_in.map(Duration::from_secs),
        };
        // Plenty left: no cap.
        p.on_quota(t0, quota(600, Some(30)));
        assert_eq!(p.rate(), 100.0);
        // 60 left for 30 s: 2 calls a second, whatever successes say.
        p.on_quota(t0, quota(60, Some(30)));
        p.on_success();
        assert_eq!(p.rate(), 2.0);
        // None left: paused until the window resets.
        p.on_quota(t0, quota(0, Some(20)));
        assert!(p.is_paused(t0 + Duration::from_secs(19)));
        assert!(!p.is_paused(t0 + Duration::from_secs(20)));
        // Without a reset time, in proportion: 5% left of a 10% threshold is half the ceiling.
        p.on_quota(t0, quota(35, None));
        assert_eq!(p.rate(), 50.0);
        // The window refilled: the cap goes.
        p.on_quota(t0, quota(700, Some(60)));
        assert_eq!(p.rate(), 100.0);
    }
}
