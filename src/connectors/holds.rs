//! Records whose earlier write may still land at the CRM, and the rule that keeps an
//! older version from landing after a newer one: **no write of a record starts while an
//! older write of it may still land** (but the replay of a timed-out event itself).
//!
//! A write we stopped waiting for is not a write that did not happen:
//! - a request our client timed out (`request_timeout_ms`), or that a gateway answered
//!   504, may still be running at the CRM, for up to `tenants[].late_write_window_ms`.
//!   Its default of 10 minutes is Salesforce's documented limit ("The timeout limit for
//!   REST and SOAP API calls is 10 minutes"); Dataverse and Zendesk document none
//!   (UNVERIFIED: third parties cite 2 minutes for a Dataverse message), so the same is
//!   assumed for them;
//! - a Zendesk job past `job_timeout_ms` cannot be cancelled: it holds its records until
//!   its status says it has run, or has expired (`zendesk::batching`).
//!
//! A held record's writes get a [`CrmWritePending`](super::ErrorCode::CrmWritePending)
//! answer without a call: the tenant parks them without counting an attempt or age, and
//! tries again. After a timeout, a replay of the very event that timed out goes ahead: it
//! carries the same data, so whichever lands last, the record ends the same. A late
//! Zendesk job lets nothing through, not even its own event: a replay would queue
//! another job, which could go late too and take another of the account's 30 job slots.
//!
//! Holds live in the member's memory. A record whose partition moves to another member,
//! or whose member is killed, while a hold is on, is not held by the new owner (README,
//! known limits).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;

use super::{CallsDone, Connector, DeliveryError, ErrorCode, Quota, WriteOk, WriteRequest};
use crate::event::Op;

/// Shortest and longest wait of a held record's write before it asks again: a timeout's
/// hold ends at a known time, waited for in steps of at most the longest; a late job's
/// hold ends when the job has run, asked after every `RECHECK_JOB`.
const RECHECK_MIN: Duration = Duration::from_secs(2);
const RECHECK_MAX: Duration = Duration::from_secs(60);
const RECHECK_JOB: Duration = Duration::from_secs(5);

/// The tag of the holds placed after a timeout or a 504.
const TIMEOUT: &str = "timeout";

/// Expired holds are swept once the map holds this many records.
const SWEEP_AT: usize = 1024;

/// A record as the CRMs match it: object and external id, ignoring case (Zendesk
/// matches external ids so, crm-apis.md §2.2; for the others this only holds more).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RecordRef {
    object: String,
    external_id: String,
}

impl RecordRef {
    pub fn of(req: &WriteRequest) -> Self {
        RecordRef {
            object: req.object.clone(),
            external_id: req.external_id.to_lowercase(),
        }
    }
}

/// What keeps a record held.
#[derive(Debug, Clone)]
struct Hold {
    /// The version whose write may still land (for the answer's message).
    version: u64,
    /// The event whose replay may go through (it carries the same data); `None`: none.
    passes: Option<String>,
    /// Tells holds apart for [`Holds::release`]: a job id, or `timeout`.
    by: String,
    /// Shown in the answer to a held write.
    why: String,
    /// Over then, whatever happened; `None`: until released.
    until: Option<Instant>,
}

/// The holds of one tenant's connector.
#[derive(Default)]
pub struct Holds {
    held: Mutex<HashMap<RecordRef, Vec<Hold>>>,
}

impl Holds {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<RecordRef, Vec<Hold>>> {
        // Never held across an await or a call that can panic.
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Holds `record`: its write of `version` may still land; `passes`, the event whose
    /// replay may go through anyway.
    pub fn hold(
        &self,
        record: RecordRef,
        version: u64,
        passes: Option<String>,
        by: &str,
        why: String,
        until: Option<Instant>,
    ) {
        let mut held = self.lock();
        if held.len() >= SWEEP_AT && held.len().is_power_of_two() {
            // Records never written again would keep their expired holds for good.
            let now = Instant::now();
            held.retain(|_, holds| {
                holds.retain(|h| h.until.is_none_or(|t| t > now));
                !holds.is_empty()
            });
        }
        held.entry(record).or_default().push(Hold {
            version,
            passes,
            by: by.to_string(),
            why,
            until,
        });
    }

    /// Ends the holds placed `by` (a finished job) on `records`.
    pub fn release<'a>(&self, records: impl IntoIterator<Item = &'a RecordRef>, by: &str) {
        let mut held = self.lock();
        for r in records {
            if let Some(holds) = held.get_mut(r) {
                holds.retain(|h| h.by != by);
                if holds.is_empty() {
                    held.remove(r);
                }
            }
        }
    }

    /// The answer for `req` while an earlier write of its record may still land; `None`
    /// when it may go.
    pub fn check(&self, req: &WriteRequest) -> Option<DeliveryError> {
        let mut held = self.lock();
        let key = RecordRef::of(req);
        let holds = held.get_mut(&key)?;
        let now = Instant::now();
        holds.retain(|h| h.until.is_none_or(|t| t > now));
        if holds.is_empty() {
            held.remove(&key);
            return None;
        }
        let blocking = holds
            .iter()
            .find(|h| h.passes.as_deref() != Some(req.event_id.as_str()))?;
        // A timeout's hold ends at a known time; a job's when it has run (its `until` is
        // only the day after which no status is kept).
        let wait = match blocking.until {
            Some(t) if blocking.by == TIMEOUT => t.saturating_duration_since(now),
            _ => RECHECK_JOB,
        }
        .clamp(RECHECK_MIN, RECHECK_MAX);
        Some(DeliveryError::write_pending(
            format!(
                "an earlier write of this record (version {}) may still land: {}",
                blocking.version, blocking.why
            ),
            wait,
        ))
    }

    /// Records held now (for tests and the README's figures).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Whether a failed write may still land at the CRM: we timed out, or a gateway did.
fn may_still_land(e: &DeliveryError) -> bool {
    e.code == ErrorCode::CrmTimeout || e.http_status == Some(504)
}

/// A connector whose writes respect [`Holds`]: held records are answered without a call,
/// and a write that may still land holds its record for the late-write window.
pub struct Held {
    inner: Arc<dyn Connector>,
    holds: Arc<Holds>,
    /// How long a call we gave up on may still run at the CRM.
    window: Duration,
}

impl Held {
    pub fn new(inner: Arc<dyn Connector>, holds: Arc<Holds>, window: Duration) -> Self {
        Held { inner, holds, window }
    }

    fn note(holds: &Holds, window: Duration, req: &WriteRequest, result: &Result<WriteOk, DeliveryError>) {
        if let Err(e) = result {
            if may_still_land(e) && !window.is_zero() {
                let why = format!(
                    "the write of it we gave up on ({}) may still be running",
                    e.code.as_str()
                );
                let until = Some(Instant::now() + window);
                let passes = Some(req.event_id.clone());
                holds.hold(RecordRef::of(req), req.version, passes, TIMEOUT, why, until);
            }
        }
    }
}

impl Connector for Held {
    fn crm(&self) -> &'static str {
        self.inner.crm()
    }

    fn write(&self, request: WriteRequest) -> BoxFuture<'static, Result<WriteOk, DeliveryError>> {
        if let Some(held) = self.holds.check(&request) {
            return Box::pin(async move { Err(held) });
        }
        let (holds, window) = (self.holds.clone(), self.window);
        let write = self.inner.write(request.clone());
        Box::pin(async move {
            let result = write.await;
            Held::note(&holds, window, &request, &result);
            result
        })
    }

    fn max_batch(&self, op: Op, object: &str) -> usize {
        self.inner.max_batch(op, object)
    }

    fn write_batch(
        &self,
        requests: Vec<WriteRequest>,
        calls_done: CallsDone,
    ) -> BoxFuture<'static, Vec<Result<WriteOk, DeliveryError>>> {
        // Held records are answered at once; the others are written, and the answers
        // put back in the requests' order.
        let mut answers: Vec<Option<Result<WriteOk, DeliveryError>>> =
            requests.iter().map(|r| self.holds.check(r).map(Err)).collect();
        let free: Vec<WriteRequest> = requests
            .iter()
            .zip(&answers)
            .filter(|(_, a)| a.is_none())
            .map(|(r, _)| r.clone())
            .collect();
        let (holds, window) = (self.holds.clone(), self.window);
        let write = (!free.is_empty()).then(|| self.inner.write_batch(free.clone(), calls_done));
        Box::pin(async move {
            let written = match write {
                Some(w) => w.await,
                None => Vec::new(),
            };
            for (req, result) in free.iter().zip(&written) {
                Held::note(&holds, window, req, result);
            }
            let mut written = written.into_iter();
            answers
                .iter_mut()
                .map(|a| {
                    a.take()
                        .or_else(|| written.next())
                        .unwrap_or_else(|| Err(DeliveryError::unexpected_retryable("no result for this record".into())))
                })
                .collect()
        })
    }

    fn quota(&self) -> Option<Quota> {
        self.inner.quota()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(key: &str, version: u64) -> WriteRequest {
        WriteRequest {
            op: Op::Upsert,
            object: "users".into(),
            external_id_field: "external_id".into(),
            external_id: key.into(),
            fields: Default::default(),
            event_id: format!("e-{key}-{version}"),
            version,
        }
    }

    #[test]
    fn a_hold_stops_other_writes_of_its_record_until_released_or_over() {
        let holds = Holds::default();
        let a = || RecordRef::of(&request("A", 0));
        let later = Some(Instant::now() + Duration::from_secs(60));
        holds.hold(a(), 1, Some("e-A-1".into()), "timeout", "timed out".into(), later);
        holds.hold(
            RecordRef::of(&request("a", 0)),
            2,
            None,
            "job-2",
            "job 2 is still queued".into(),
            None,
        );
        assert!(holds.check(&request("B", 5)).is_none(), "another record goes");
        let e = holds.check(&request("A", 3)).expect("held, ignoring case");
        assert!(e.is_wait() && e.message.contains("version 1"), "{e}");
        // The event that timed out may go again (the same data), but the job stops it,
        // and the job's own event too.
        assert!(holds.check(&request("A", 1)).is_some());
        assert!(holds.check(&request("A", 2)).is_some());
        holds.release([&a()], "job-2");
        assert!(
            holds.check(&request("A", 1)).is_none(),
            "the timed-out event itself goes"
        );
        assert!(
            holds.check(&request("A", 2)).is_some(),
            "another version waits out the window"
        );

        let past = Instant::now();
        holds.hold(
            RecordRef::of(&request("C", 0)),
            1,
            None,
            "timeout",
            "timed out".into(),
            Some(past),
        );
        assert!(holds.check(&request("C", 2)).is_none(), "an expired hold is over");
    }
}
