//! Records whose earlier write may still land at the CRM, and the rule that keeps an
//! older version from landing after a newer one: **no write of a record starts while an
//! older write of it may still land** (but the replay of a timed-out event itself).
//!
//! A write we stopped waiting for is not a write that did not happen:
//! - a request our client timed out (`request_timeout_ms`), that a gateway answered 504,
//!   or whose connection broke after it was sent, may still be running at the CRM, for up to `tenants[].late_write_window_ms`.
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
//! A hold is written to the state topic ([`HoldLog`]) before the write's answer goes
//! back (the answer lets the event's offset be committed); a Zendesk job's, from the
//! moment the job is queued. The record's next owner reads it back with the confirmed
//! states ([`Holds::restore`]) and holds the record too; a Zendesk job it names is taken
//! over and followed ([`Holds::set_adopter`]). A synchronous call still in flight when its
//! member dies leaves no hold.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

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
/// matches external ids so, docs/crm-apis.md §2.2; for the others this only holds more).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RecordRef {
    object: String,
    external_id: String,
}

impl RecordRef {
    pub fn new(object: &str, external_id: &str) -> Self {
        RecordRef {
            object: object.to_string(),
            external_id: external_id.to_lowercase(),
        }
    }

    pub fn of(req: &WriteRequest) -> Self {
        RecordRef::new(&req.object, &req.external_id)
    }
}

/// A hold as it is recorded on the state topic (in the partition of the record's
/// state), so that the record's next owner, after a crash or a rebalance, holds it too.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldMarker {
    pub tenant: String,
    /// The state topic partition: the record's input partition.
    pub partition: i32,
    pub object: String,
    /// As the CRMs match it (lower-cased).
    pub external_id: String,
    /// The version whose write may still land.
    pub version: u64,
    /// The event whose replay may go through (it carries the same data); `None`: none.
    pub passes: Option<String>,
    /// Tells holds apart: a job id, or `timeout`.
    pub by: String,
    /// Shown in the answer to a held write.
    pub why: String,
    /// Milliseconds since the Unix epoch after which the hold is over, whatever happened.
    pub until_ms: u64,
    /// The Zendesk job that holds the record, which the next owner polls.
    pub job: Option<String>,
}

impl HoldMarker {
    /// A marker for `req`'s record, held `by` until `until`.
    pub fn of(tenant: &str, req: &WriteRequest, passes: Option<String>, by: &str, why: String, until: Instant) -> Self {
        let record = RecordRef::of(req);
        HoldMarker {
            tenant: tenant.to_string(),
            partition: req.state_partition,
            object: record.object,
            external_id: record.external_id,
            version: req.version,
            passes,
            by: by.to_string(),
            why,
            until_ms: epoch_ms(until),
            job: None,
        }
    }

    fn record(&self) -> RecordRef {
        RecordRef::new(&self.object, &self.external_id)
    }

    /// How long the hold has left by this process's clock, at most `cap`; `None` if it
    /// is over.
    fn left(&self, cap: Duration) -> Option<Duration> {
        let now_ms = epoch_ms(Instant::now());
        let left = self.until_ms.checked_sub(now_ms).filter(|ms| *ms > 0)?;
        Some(Duration::from_millis(left).min(cap))
    }
}

/// An instant as milliseconds since the Unix epoch.
fn epoch_ms(at: Instant) -> u64 {
    let now = Instant::now();
    let wall = if at >= now {
        SystemTime::now() + (at - now)
    } else {
        SystemTime::now() - (now - at)
    };
    wall.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Where holds are recorded (the state topic), each write until it is acknowledged.
pub trait HoldLog: Send + Sync {
    fn record(&self, markers: Vec<HoldMarker>) -> BoxFuture<'static, ()>;
    /// Deletes the markers of holds that are over (tombstones).
    fn forget(&self, markers: Vec<HoldMarker>) -> BoxFuture<'static, ()>;
}

/// No hold read back lasts longer than this from the moment it is read: a Zendesk job's
/// status lives a day, and a late-write window of more than a day is not believed.
const MAX_RESTORED_HOLD: Duration = Duration::from_secs(24 * 3600);

/// Whether a job id read back from the state topic looks like one Zendesk gives
/// (`V3-<hex>`): anything else is not put into a poll's URL.
fn plausible_job_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Takes over a Zendesk job a hold read back from the state topic names: follows it and
/// ends the hold when it has run (its records, and when its status expires).
pub type Adopter = Box<dyn Fn(String, Vec<RecordRef>, Instant) + Send + Sync>;

/// What keeps a record held: its marker, and when it is over on this process's clock.
#[derive(Debug, Clone)]
struct Hold {
    marker: HoldMarker,
    until: Instant,
}

/// Takes the holds `pred` picks out of `holds`, and returns their markers.
fn take_where(holds: &mut Vec<Hold>, pred: impl Fn(&Hold) -> bool) -> Vec<HoldMarker> {
    let (taken, kept): (Vec<Hold>, Vec<Hold>) = std::mem::take(holds).into_iter().partition(|h| pred(h));
    *holds = kept;
    taken.into_iter().map(|h| h.marker).collect()
}

/// The holds of one tenant's connector.
#[derive(Default)]
pub struct Holds {
    held: Mutex<HashMap<RecordRef, Vec<Hold>>>,
    tenant: String,
    log: Option<Arc<dyn HoldLog>>,
    adopter: std::sync::OnceLock<Adopter>,
}

impl Holds {
    /// The holds of `tenant`, recorded in `log`.
    pub fn new(tenant: &str, log: Option<Arc<dyn HoldLog>>) -> Self {
        Holds {
            tenant: tenant.to_string(),
            log,
            ..Holds::default()
        }
    }

    pub fn tenant(&self) -> &str {
        &self.tenant
    }

    /// Sets who takes over the Zendesk jobs named by holds read back (once).
    pub fn set_adopter(&self, adopter: Adopter) {
        let _ = self.adopter.set(adopter);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<RecordRef, Vec<Hold>>> {
        // Never held across an await or a call that can panic.
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Holds the marker's record in memory until `until` (see [`record`](Self::record)
    /// for the state topic). The same hold twice is kept once.
    pub fn hold(&self, marker: &HoldMarker, until: Instant) {
        let mut expired = Vec::new();
        {
            let mut held = self.lock();
            if held.len() >= SWEEP_AT && held.len() % SWEEP_AT == 0 {
                // Records never written again would keep their expired holds for good.
                let now = Instant::now();
                held.retain(|_, holds| {
                    expired.extend(take_where(holds, |h| h.until <= now));
                    !holds.is_empty()
                });
            }
            let holds = held.entry(marker.record()).or_default();
            if !holds
                .iter()
                .any(|h| h.marker.by == marker.by && h.marker.version == marker.version)
            {
                holds.push(Hold {
                    marker: marker.clone(),
                    until,
                });
            }
        }
        self.forget(expired);
    }

    /// Writes holds to the state topic; returns once they are acknowledged there.
    pub async fn record(&self, markers: Vec<HoldMarker>) {
        if let (Some(log), false) = (&self.log, markers.is_empty()) {
            log.record(markers).await;
        }
    }

    /// Deletes the markers of holds that are over from the state topic, in the
    /// background: one left behind only holds its record again, briefly, after a restore
    /// (a timeout's is over by then; a job's is released at its first poll).
    pub fn forget(&self, markers: Vec<HoldMarker>) {
        if let (Some(log), false) = (&self.log, markers.is_empty()) {
            drop(crate::offload::spawn(log.forget(markers)));
        }
    }

    /// Takes up holds read back from the state topic: those not over yet hold their
    /// records (for a day at most), and the Zendesk jobs they name are followed. A
    /// marker naming a job id Zendesk would not give is ignored.
    pub fn restore(&self, markers: &[HoldMarker]) {
        let mut jobs: HashMap<String, (Vec<RecordRef>, Instant)> = HashMap::new();
        for m in markers.iter().filter(|m| m.tenant == self.tenant) {
            if m.job.as_deref().is_some_and(|j| !plausible_job_id(j)) {
                tracing::warn!(tenant = %self.tenant, "A hold read back names a job id that is not Zendesk's; ignored.");
                continue;
            }
            let Some(left) = m.left(MAX_RESTORED_HOLD) else {
                continue;
            };
            let until = Instant::now() + left;
            self.hold(m, until);
            if let Some(job) = &m.job {
                let entry = jobs.entry(job.clone()).or_insert_with(|| (Vec::new(), until));
                entry.0.push(m.record());
            }
        }
        if let Some(adopt) = self.adopter.get() {
            for (job, (records, until)) in jobs {
                adopt(job, records, until);
            }
        }
    }

    /// Ends the holds placed `by` (a finished job) on `records`, and deletes their markers.
    pub fn release<'a>(&self, records: impl IntoIterator<Item = &'a RecordRef>, by: &str) {
        let mut ended = Vec::new();
        {
            let mut held = self.lock();
            for r in records {
                if let Some(holds) = held.get_mut(r) {
                    ended.extend(take_where(holds, |h| h.marker.by == by));
                    if holds.is_empty() {
                        held.remove(r);
                    }
                }
            }
        }
        self.forget(ended);
    }

    /// The answer for `req` while an earlier write of its record may still land; `None`
    /// when it may go.
    pub fn check(&self, req: &WriteRequest) -> Option<DeliveryError> {
        let key = RecordRef::of(req);
        let now = Instant::now();
        let (answer, expired) = {
            let mut held = self.lock();
            let holds = held.get_mut(&key)?;
            let expired: Vec<HoldMarker> = take_where(holds, |h| h.until <= now);
            let blocking = holds
                .iter()
                .find(|h| h.marker.passes.as_deref() != Some(req.event_id.as_str()));
            let answer = blocking.map(|h| {
                // A timeout's hold ends at a known time; a job's when it has run (its
                // `until` is only the day after which no status is kept).
                let wait = if h.marker.by == TIMEOUT {
                    h.until.saturating_duration_since(now)
                } else {
                    RECHECK_JOB
                };
                DeliveryError::write_pending(
                    format!(
                        "an earlier write of this record (version {}) may still land: {}",
                        h.marker.version, h.marker.why
                    ),
                    wait.clamp(RECHECK_MIN, RECHECK_MAX),
                )
            });
            if holds.is_empty() {
                held.remove(&key);
            }
            (answer, expired)
        };
        self.forget(expired);
        answer
    }

    /// Records held now (for tests and the README's figures).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Whether a failed write may still land at the CRM: we timed out, or a gateway did, or
/// the connection broke after the request was sent.
fn may_still_land(e: &DeliveryError) -> bool {
    matches!(e.code, ErrorCode::CrmTimeout | ErrorCode::CrmConnectionLost) || e.http_status == Some(504)
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

    /// The hold a failed write leaves on its record, if it may still land.
    fn hold_after(
        holds: &Holds,
        window: Duration,
        req: &WriteRequest,
        result: &Result<WriteOk, DeliveryError>,
    ) -> Option<HoldMarker> {
        let e = result
            .as_ref()
            .err()
            .filter(|e| may_still_land(e) && !window.is_zero())?;
        let why = format!(
            "the write of it we gave up on ({}) may still be running",
            e.code.as_str()
        );
        let passes = Some(req.event_id.clone());
        let until = Instant::now() + window;
        let marker = HoldMarker::of(holds.tenant(), req, passes, TIMEOUT, why, until);
        holds.hold(&marker, until);
        Some(marker)
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
            // Recorded before the answer goes back: the answer lets the event's offset be
            // committed, after which only the state topic tells the next owner.
            let markers = Held::hold_after(&holds, window, &request, &result)
                .into_iter()
                .collect();
            holds.record(markers).await;
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
            let markers = free
                .iter()
                .zip(&written)
                .filter_map(|(req, result)| Held::hold_after(&holds, window, req, result))
                .collect();
            holds.record(markers).await;
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
            state_partition: 0,
        }
    }

    fn marker(key: &str, version: u64, passes: bool, by: &str, until: Instant) -> HoldMarker {
        let req = request(key, version);
        let passes = passes.then(|| req.event_id.clone());
        HoldMarker::of("acme", &req, passes, by, format!("held by {by}"), until)
    }

    #[test]
    fn a_hold_stops_other_writes_of_its_record_until_released_or_over() {
        let holds = Holds::new("acme", None);
        let later = Instant::now() + Duration::from_secs(60);
        holds.hold(&marker("A", 1, true, TIMEOUT, later), later);
        holds.hold(&marker("a", 2, false, "job-2", later), later);
        holds.hold(&marker("a", 2, false, "job-2", later), later);
        assert!(holds.check(&request("B", 5)).is_none(), "another record goes");
        let e = holds.check(&request("A", 3)).expect("held, ignoring case");
        assert!(e.is_wait() && e.message.contains("version 1"), "{e}");
        // The event that timed out may go again (the same data), but the job stops it,
        // and the job's own event too.
        assert!(holds.check(&request("A", 1)).is_some());
        assert!(holds.check(&request("A", 2)).is_some());
        holds.release([&RecordRef::new("users", "A")], "job-2");
        assert!(
            holds.check(&request("A", 1)).is_none(),
            "the timed-out event itself goes"
        );
        assert!(
            holds.check(&request("A", 2)).is_some(),
            "another version waits out the window"
        );

        let now = Instant::now();
        holds.hold(&marker("C", 1, false, TIMEOUT, now), now);
        assert!(holds.check(&request("C", 2)).is_none(), "an expired hold is over");
        assert!(holds.check(&request("A", 2)).is_some());
    }

    #[test]
    fn holds_read_back_hold_their_records_and_hand_their_jobs_over() {
        let later = Instant::now() + Duration::from_secs(60);
        let mut job = marker("J", 1, false, "V3-1", later);
        job.job = Some("V3-1".into());
        let other_tenant = HoldMarker {
            tenant: "globex".into(),
            ..marker("K", 1, false, TIMEOUT, later)
        };
        let expired = marker("L", 1, false, TIMEOUT, Instant::now() - Duration::from_secs(1));
        let mut hostile = marker("M", 1, false, "x", later);
        hostile.job = Some("V3-1,V3-2&x=1".into());
        let mut forever = marker("N", 1, false, TIMEOUT, later);
        forever.until_ms = u64::MAX;
        let round_trip: Vec<HoldMarker> = [job, other_tenant, expired, hostile, forever]
            .iter()
            .map(|m| serde_json::from_slice(&serde_json::to_vec(m).unwrap()).unwrap())
            .collect();
        let holds = Holds::new("acme", None);
        let adopted = Arc::new(Mutex::new(Vec::new()));
        let seen = adopted.clone();
        holds.set_adopter(Box::new(move |job, records, _| {
            seen.lock().unwrap().push((job, records));
        }));
        holds.restore(&round_trip);
        assert!(holds.check(&request("J", 2)).is_some(), "held by the job");
        assert!(holds.check(&request("K", 2)).is_none(), "another tenant's hold");
        assert!(holds.check(&request("L", 2)).is_none(), "over already");
        assert!(
            holds.check(&request("M", 2)).is_none(),
            "a job id Zendesk would not give"
        );
        let capped = holds.check(&request("N", 2)).expect("held");
        assert_eq!(capped.retry_after, Some(RECHECK_MAX), "asked again within the minute");
        let held_for = holds.lock()[&RecordRef::new("users", "N")][0].until - Instant::now();
        assert!(held_for <= MAX_RESTORED_HOLD, "a day at most: {held_for:?}");
        assert_eq!(
            *adopted.lock().unwrap(),
            vec![("V3-1".to_string(), vec![RecordRef::new("users", "J")])]
        );
    }
}
