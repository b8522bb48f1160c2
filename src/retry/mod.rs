//! Retry stage: when to try a retryable CRM write again, and the actor that waits.
//!
//! Classification (is this failure retryable?) belongs to each connector; the policy here
//! decides when and how often, for every CRM alike. Backoff is exponential with jitter, a
//! CRM's `Retry-After` wins over it, and an event that has used half its attempts is not
//! retried past `max_age_ms` from its first failure. A retry waiting in memory holds its
//! partition's committed offset, so with no retry topic, commits can fall behind by the
//! age bound plus the backoffs of the first half of the attempts.
//!
//! Retries that would wait long are parked on the retry topic instead ([`topic`]: its
//! format, and how it is co-partitioned with the input so that the owner of a record's
//! partition is the one that reads its parked versions back).
//!
//! The [`RetryQueueActor`] only keeps timers. The tenant keeps the event itself (the write
//! stays "in flight" for its record), so a restart of this actor loses nothing: it asks
//! every tenant to re-arm its waiting retries.

pub mod topic;

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix::SpawnHandle;
use dashmap::DashMap;
use rand::Rng;

use crate::config::RetryConfig;
use crate::event::RecordKey;
use crate::supervise::{self, InjectPanic};

/// The shared backoff policy.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
    pub max_age: Duration,
    /// Attempts made before further retries are parked on the retry topic.
    pub in_memory_attempts: u32,
    /// Waits at least this long are parked at once.
    pub park_after: Duration,
}

impl From<&RetryConfig> for RetryPolicy {
    fn from(c: &RetryConfig) -> Self {
        RetryPolicy {
            max_attempts: c.max_attempts,
            base_delay: Duration::from_millis(c.base_delay_ms),
            max_delay: Duration::from_millis(c.max_delay_ms),
            max_age: Duration::from_millis(c.max_age_ms),
            in_memory_attempts: c.in_memory_attempts,
            park_after: Duration::from_millis(c.park_after_ms),
        }
    }
}

/// What to do after a retryable failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryDecision {
    RetryAfter(Duration),
    /// Dead-letter: the attempts or the age bound are used up.
    GiveUp(GiveUpReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GiveUpReason {
    Attempts,
    MaxAge,
}

impl RetryPolicy {
    /// Backoff before attempt `attempts_made + 1`: exponential from `base_delay`, capped
    /// at `max_delay`, with "equal jitter" (half fixed, half random) so that many records
    /// failing together do not retry together.
    pub fn backoff(&self, attempts_made: u32, rng: &mut impl Rng) -> Duration {
        let exp = attempts_made.saturating_sub(1).min(30);
        let ceiling = self.base_delay.saturating_mul(1u32 << exp).min(self.max_delay);
        let half = ceiling / 2;
        half + half.mul_f64(rng.gen::<f64>())
    }

    /// Decides after `attempts_made` failed attempts, the first of which failed at
    /// `first_failure`. A `retry_after` from the CRM replaces the backoff. The age bound
    /// gives up on an event only once it has used half its attempts.
    pub fn decide(
        &self,
        attempts_made: u32,
        first_failure: Instant,
        now: Instant,
        retry_after: Option<Duration>,
        rng: &mut impl Rng,
    ) -> RetryDecision {
        if attempts_made >= self.max_attempts {
            return RetryDecision::GiveUp(GiveUpReason::Attempts);
        }
        let delay = retry_after.unwrap_or_else(|| self.backoff(attempts_made, rng));
        // Age alone (a backlog on the retry topic, a starved machine) does not end a record
        // that was barely tried: the age bound applies from half the attempts on.
        let tried_enough = attempts_made >= self.max_attempts.div_ceil(2);
        if tried_enough && now.saturating_duration_since(first_failure).saturating_add(delay) > self.max_age {
            return RetryDecision::GiveUp(GiveUpReason::MaxAge);
        }
        RetryDecision::RetryAfter(delay)
    }

    /// Whether a retry after `attempts_made` attempts, due in `delay`, should wait on the
    /// retry topic rather than in memory (when there is a retry topic).
    pub fn should_park(&self, attempts_made: u32, delay: Duration) -> bool {
        attempts_made >= self.in_memory_attempts || delay >= self.park_after
    }
}

/// A retry that is due: the tenant looks the record up and writes its newest waiting
/// version. `ticket` tells a current retry from one armed before a restart.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct RetryDue {
    pub record: RecordKey,
    pub ticket: u64,
}

/// Sent to every tenant when the retry queue restarted and forgot its timers.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "()")]
pub struct RearmRetries;

/// How the retry queue reaches a tenant.
#[derive(Clone)]
pub struct TenantLink {
    pub due: Recipient<RetryDue>,
    pub rearm: Recipient<RearmRetries>,
}

/// Tenants by name; filled as tenant actors start, read by the retry queue.
pub type TenantDirectory = Arc<DashMap<Arc<str>, TenantLink>>;

/// Wait `delay`, then hand `due` to `tenant`.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Schedule {
    pub tenant: Arc<str>,
    pub delay: Duration,
    pub due: RetryDue,
}

pub struct RetryQueueActor {
    /// Where due retries go. Shared with the pipeline, which adds each tenant.
    tenants: TenantDirectory,
    /// Waiting retries, earliest first. One timer serves them all: actix polls every
    /// timer of an actor's context on each wake-up, so a timer per retry would cost
    /// quadratic time when a CRM is down and many retries wait.
    queue: BinaryHeap<Reverse<Waiting>>,
    /// The one armed timer and when it fires; replaced when an earlier retry arrives.
    timer: Option<(Instant, SpawnHandle)>,
    /// Tie-breaker that keeps retries due at the same instant in arrival order.
    seq: u64,
    /// Set by [`InjectPanic`]; the next `Schedule` panics.
    panic_next: bool,
}

/// A retry in the queue.
struct Waiting {
    due_at: Instant,
    seq: u64,
    tenant: Arc<str>,
    due: RetryDue,
}

impl PartialEq for Waiting {
    fn eq(&self, other: &Self) -> bool {
        (self.due_at, self.seq) == (other.due_at, other.seq)
    }
}
impl Eq for Waiting {}
impl PartialOrd for Waiting {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Waiting {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.due_at, self.seq).cmp(&(other.due_at, other.seq))
    }
}

impl RetryQueueActor {
    pub fn new(tenants: TenantDirectory) -> Self {
        RetryQueueActor {
            tenants,
            queue: BinaryHeap::new(),
            timer: None,
            seq: 0,
            panic_next: false,
        }
    }

    /// Hands every due retry to its tenant and arms the timer for the next one.
    fn fire(&mut self, ctx: &mut Context<Self>) {
        let now = Instant::now();
        while self.queue.peek().is_some_and(|Reverse(w)| w.due_at <= now) {
            let Some(Reverse(w)) = self.queue.pop() else { break };
            if let Some(link) = self.tenants.get(&w.tenant) {
                link.due.do_send(w.due);
            }
        }
        self.timer = None;
        self.arm(ctx);
    }

    /// Makes sure the timer fires when the earliest retry is due.
    fn arm(&mut self, ctx: &mut Context<Self>) {
        let Some(Reverse(next)) = self.queue.peek() else { return };
        let due_at = next.due_at;
        if let Some((at, handle)) = self.timer {
            if at <= due_at {
                return;
            }
            ctx.cancel_future(handle);
        }
        let handle = ctx.run_later(due_at.saturating_duration_since(Instant::now()), |act, ctx| {
            act.fire(ctx)
        });
        self.timer = Some((due_at, handle));
    }
}

impl Actor for RetryQueueActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(1024);
    }
}

impl Supervised for RetryQueueActor {
    fn restarting(&mut self, _ctx: &mut Self::Context) {
        supervise::restarted("retry_queue");
        self.panic_next = false;
        // Fresh state; the tenants still hold the events and arm their retries again.
        self.queue.clear();
        self.timer = None;
        for link in self.tenants.iter() {
            link.rearm.do_send(RearmRetries);
        }
    }
}

impl Handler<Schedule> for RetryQueueActor {
    type Result = ();

    fn handle(&mut self, msg: Schedule, ctx: &mut Self::Context) {
        let outcome = supervise::catch("retry_queue", || {
            if std::mem::take(&mut self.panic_next) {
                panic!("injected panic in retry queue");
            }
            self.seq += 1;
            self.queue.push(Reverse(Waiting {
                // A delay no clock can hold waits as long as it can instead.
                due_at: Instant::now()
                    .checked_add(msg.delay)
                    .unwrap_or_else(|| Instant::now() + crate::connectors::http::MAX_CRM_WAIT),
                seq: self.seq,
                tenant: msg.tenant,
                due: msg.due,
            }));
        });
        if outcome.is_err() {
            // The message is lost with the panic; the restart re-arms every tenant's retries.
            ctx.stop();
            return;
        }
        self.arm(ctx);
    }
}

impl Handler<InjectPanic> for RetryQueueActor {
    type Result = ();

    fn handle(&mut self, _: InjectPanic, _: &mut Self::Context) {
        self.panic_next = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 5,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(2_000),
            max_age: Duration::from_secs(60),
            in_memory_attempts: 2,
            park_after: Duration::from_secs(1),
        }
    }

    #[test]
    fn short_early_retries_wait_in_memory_and_the_rest_are_parked() {
        let p = policy();
        assert!(!p.should_park(1, Duration::from_millis(100)));
        assert!(
            p.should_park(2, Duration::from_millis(100)),
            "past the in-memory attempts"
        );
        assert!(p.should_park(1, Duration::from_secs(7)), "a long Retry-After");
    }

    #[test]
    fn retry_after_wins_over_backoff() {
        let now = Instant::now();
        let d = policy().decide(1, now, now, Some(Duration::from_secs(7)), &mut StdRng::seed_from_u64(1));
        assert_eq!(d, RetryDecision::RetryAfter(Duration::from_secs(7)));
    }

    #[test]
    fn gives_up_after_max_attempts_or_max_age() {
        let now = Instant::now();
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(
            policy().decide(5, now, now, None, &mut rng),
            RetryDecision::GiveUp(GiveUpReason::Attempts)
        );
        let later = now + Duration::from_secs(59);
        assert_eq!(
            policy().decide(3, now, later, Some(Duration::from_secs(5)), &mut rng),
            RetryDecision::GiveUp(GiveUpReason::MaxAge)
        );
    }

    /// A record that failed twice, an hour apart (a starved machine, a backlog on the
    /// retry topic), is tried again: of five attempts it has used fewer than half.
    #[test]
    fn age_alone_does_not_end_a_record_tried_fewer_than_half_its_attempts() {
        let now = Instant::now();
        let later = now + Duration::from_secs(3_600);
        let mut rng = StdRng::seed_from_u64(1);
        for attempts in 1..=2 {
            assert!(matches!(
                policy().decide(attempts, now, later, None, &mut rng),
                RetryDecision::RetryAfter(_)
            ));
        }
        assert_eq!(
            policy().decide(3, now, later, None, &mut rng),
            RetryDecision::GiveUp(GiveUpReason::MaxAge)
        );
    }

    proptest! {
        #[test]
        fn backoff_grows_within_bounds(attempt in 1u32..40, seed in any::<u64>()) {
            let p = policy();
            let mut rng = StdRng::seed_from_u64(seed);
            let d = p.backoff(attempt, &mut rng);
            let ceiling = (p.base_delay * 2u32.pow((attempt - 1).min(30))).min(p.max_delay);
            prop_assert!(d >= ceiling / 2 && d <= ceiling, "{:?} not in [{:?}, {:?}]", d, ceiling / 2, ceiling);
        }
    }
}
