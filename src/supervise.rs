//! Supervision: turning a failure inside an actor into a restart with fresh state.
//!
//! actix's `Supervisor` restarts an actor that *stopped*; a panic in a handler would
//! instead unwind through the arbiter and take the actor (and its mailbox) down for good.
//! Every handler therefore runs its body through [`catch`] (or its future through
//! [`catch_future`]); a caught panic is counted, logged, and turned into `ctx.stop()`, and
//! the actor's `Supervised::restarting` resets it and recovers what it held.

use std::future::Future;
use std::panic::AssertUnwindSafe;

use actix::Message;
use futures::FutureExt;

use crate::telemetry::metric;

/// A handler panicked; the actor should stop so that its supervisor restarts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Panicked;

/// Runs a handler body, catching a panic.
pub fn catch<R>(actor: &'static str, body: impl FnOnce() -> R) -> Result<R, Panicked> {
    std::panic::catch_unwind(AssertUnwindSafe(body)).map_err(|payload| report(actor, payload.as_ref()))
}

/// Runs a handler future, catching a panic in any of its polls.
pub async fn catch_future<R>(actor: &'static str, fut: impl Future<Output = R>) -> Result<R, Panicked> {
    AssertUnwindSafe(fut)
        .catch_unwind()
        .await
        .map_err(|payload| report(actor, payload.as_ref()))
}

fn report(actor: &'static str, payload: &(dyn std::any::Any + Send)) -> Panicked {
    let reason = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".into());
    tracing::error!(actor, reason = %reason, "Actor handler panicked; restarting the actor.");
    Panicked
}

/// Counts a restart of one actor kind; called from each `Supervised::restarting`.
pub fn restarted(actor: &'static str) {
    metrics::counter!(metric::ACTOR_RESTARTS, "actor" => actor).increment(1);
    tracing::warn!(actor, "Actor restarted with fresh state.");
}

/// Fault injection: makes the receiving actor panic inside its next handler. Tests use it
/// to prove that every actor kind is restarted and that nothing is lost; it is part of the
/// public API so that integration tests and operators' chaos drills can reach it.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "()")]
pub struct InjectPanic;
