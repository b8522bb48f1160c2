//! Pacing of one tenant's CRM requests: a token bucket for the request rate, plus a pause
//! the CRM can impose (`Retry-After`, an exhausted API allocation).
//!
//! Pure: the caller passes the time in, so tests control it.

use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct Pacer {
    rate_per_sec: f64,
    burst: f64,
    tokens: f64,
    last_refill: Instant,
    paused_until: Option<Instant>,
}

impl Pacer {
    /// `rate_per_sec` requests per second on average, bursts of up to one second's worth.
    pub fn new(rate_per_sec: f64, now: Instant) -> Self {
        let burst = rate_per_sec.max(1.0);
        Pacer {
            rate_per_sec,
            burst,
            tokens: burst,
            last_refill: now,
            paused_until: None,
        }
    }

    /// Takes a permit for one request, or says how long to wait for one.
    pub fn try_acquire(&mut self, now: Instant) -> Result<(), Duration> {
        if let Some(until) = self.paused_until {
            if now < until {
                return Err(until - now);
            }
            self.paused_until = None;
        }
        let elapsed = now.saturating_duration_since(self.last_refill).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate_per_sec).min(self.burst);
        self.last_refill = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            let wait = (1.0 - self.tokens) / self.rate_per_sec;
            Err(Duration::from_secs_f64(wait).max(Duration::from_millis(1)))
        }
    }

    /// Stops all requests until `now + pause` (a later pause wins over an earlier one).
    pub fn pause(&mut self, now: Instant, pause: Duration) {
        let until = now + pause;
        if self.paused_until.is_none_or(|u| u < until) {
            self.paused_until = Some(until);
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
    fn allows_a_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut p = Pacer::new(10.0, t0);
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
        let mut p = Pacer::new(1000.0, t0);
        p.pause(t0, Duration::from_secs(5));
        assert_eq!(p.try_acquire(t0 + Duration::from_secs(1)), Err(Duration::from_secs(4)));
        assert!(p.try_acquire(t0 + Duration::from_secs(5)).is_ok());
    }
}
