//! Zendesk batches: `create_or_update_many` jobs for users.
//!
//! `POST /api/v2/users/create_or_update_many` with up to 100 records queues a background
//! job and answers with its `job_status`. Once that call is answered the batch's
//! concurrency permit goes back ([`CallsDone`]): the job runs on Zendesk's side. The
//! account's open jobs are followed together ([`Jobs`]): while any is open, one
//! `GET /api/v2/job_statuses/show_many?ids=…` per poll interval asks for all of them, so
//! polling costs one call per interval, not one per job, and at most [`JOB_LIMIT`] jobs
//! are open at once (Zendesk's per-account job limit). Each item of a finished job's
//! `results` becomes its record's outcome: `Created`, `Updated`, or `Failed` with `error`
//! and `details`. A record's outcome (and so its event's offset) is only known once the
//! job's result is. Organizations, tickets and deletes go one by one: Zendesk has no bulk
//! upsert for organizations (docs/crm-apis.md §2.4).
//!
//! **Late jobs.** Zendesk jobs cannot be cancelled. A job still unfinished at
//! `job_timeout_ms` gives its records a [`CrmWritePending`] answer (their events park
//! without ageing), but it is followed on, and until it has finished it holds its
//! records ([`Holds`]): no write of them starts. A record is released when its job
//! reports `completed` or `failed`, or once the job's status has expired (a day after it
//! was queued, [`JOB_STATUS_LIFETIME`]): no job outlives that. The holds are on the state
//! topic from the moment the job is queued until it has run, so that if this member dies
//! meanwhile, the records' next owner holds them and follows the job.
//!
//! Which result belongs to which record is not fully documented (docs/crm-apis.md §2.3,
//! UNVERIFIED): an item is matched by its `index` when it has one, else by its
//! `external_id`, else by position when the job reports one item per record. A record no
//! item matches is retried: a replay is safe, records are matched by external id.
//!
//! **403.** "Forbidden" answers both a bulk call on an account without bulk import and a
//! token that may not write (an OAuth scope, an agent's role), and the documentation
//! shows no body that tells them apart (docs/crm-apis.md §2.4, §2.8). So a 403 to a job
//! is followed by the first record alone through `users/create_or_update`: if that single
//! call is refused too, the credentials are at fault and every record of the batch gets
//! the 403 (`crm_auth`, the tenant's failure, not the records'); otherwise bulk import is
//! off, and the tenant switches to one call per record for good.
//!
//! [`CrmWritePending`]: crate::connectors::ErrorCode::CrmWritePending

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::channel::oneshot;

use reqwest::{Method, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};

use super::client::{record_body, ZendeskClient};
use super::errors;
use crate::connectors::holds::{HoldMarker, Holds, RecordRef};
use crate::connectors::{CallsDone, DeliveryError, ErrorCode, WriteOk, WriteRequest};
use crate::event::Op;

/// Most records one `create_or_update_many` call may carry.
pub const MANY_LIMIT: usize = 100;

/// Most jobs queued or running at once per account (docs/crm-apis.md §2.3); also the most
/// ids one `show_many` poll asks for.
pub const JOB_LIMIT: usize = 30;

/// How often late jobs are polled when no job has a waiter: 20 poll intervals, from 1 to
/// 10 seconds (10 s with the default interval).
fn late_poll_interval(poll_interval: Duration) -> Duration {
    poll_interval
        .saturating_mul(20)
        .clamp(Duration::from_secs(1), Duration::from_secs(10))
}

/// The jobs to poll: all open ones, and whether only late ones are left.
struct OpenIds {
    ids: Vec<String>,
    only_late: bool,
}

/// How long Zendesk keeps a job's status (docs/crm-apis.md §2.3): a job is over by then.
pub const JOB_STATUS_LIFETIME: Duration = Duration::from_secs(24 * 3600);

const BULK_REFUSED_NOTE: &str = "bulk import is not enabled for this Zendesk account; writing one record per call";

#[derive(Debug, Deserialize)]
struct JobEnvelope {
    job_status: JobStatus,
}

#[derive(Debug, Deserialize)]
struct JobStatuses {
    job_statuses: Vec<JobStatus>,
}

#[derive(Debug, Deserialize)]
pub struct JobStatus {
    id: String,
    #[serde(default)]
    status: String,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    results: Option<Vec<JobItem>>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct JobItem {
    #[serde(default)]
    pub index: Option<usize>,
    #[serde(default)]
    pub external_id: Option<String>,
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default)]
    pub success: Option<bool>,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub details: Value,
}

pub fn max_batch(bulk_refused: &AtomicBool, op: Op, object: &str) -> usize {
    match (op, object) {
        (Op::Upsert, "users") if !bulk_refused.load(Ordering::Relaxed) => MANY_LIMIT,
        _ => 1,
    }
}

/// Writes records that share op and object, in jobs of up to [`MANY_LIMIT`] when the
/// object has one, else one by one. One result per request, in order. `calls_done` is
/// dropped once no more write calls are to come: jobs are followed without it.
pub async fn write_batch(
    client: &Arc<ZendeskClient>,
    bulk_refused: &AtomicBool,
    requests: Vec<WriteRequest>,
    calls_done: CallsDone,
) -> Vec<Result<WriteOk, DeliveryError>> {
    let batchable = requests
        .first()
        .map(|r| max_batch(bulk_refused, r.op, &r.object))
        .unwrap_or(1)
        > 1;
    let mut out = Vec::with_capacity(requests.len());
    let mut rest = requests;
    let mut calls_done = Some(calls_done);
    if rest.len() > 1 && batchable {
        while !rest.is_empty() {
            let chunk: Vec<WriteRequest> = rest.drain(..rest.len().min(MANY_LIMIT)).collect();
            // The last chunk's write is the batch's last call.
            let mut not_last = None;
            let done = if rest.is_empty() {
                &mut calls_done
            } else {
                &mut not_last
            };
            match create_or_update_many(client, &chunk, done).await {
                Ok(results) => out.extend(results),
                Err(refusal) => {
                    // One record alone tells a refused bulk call from refused credentials.
                    let mut chunk = chunk.into_iter();
                    let first = chunk.next().expect("a chunk has a record");
                    let probe = client.write(first).await;
                    if matches!(&probe, Err(e) if e.http_status == Some(403)) {
                        tracing::error!(
                            tenant = %client.meter.tenant,
                            "Zendesk refuses this tenant's writes (403 Forbidden to a bulk and to a single call): the credentials lack the scope or role to write users."
                        );
                        let e = refused_credentials(refusal);
                        out.push(Err(e.clone()));
                        out.extend(chunk.map(|_| Err(e.clone())));
                        out.extend(rest.drain(..).map(|_| Err(e.clone())));
                        return out;
                    }
                    let inconclusive = probe
                        .as_ref()
                        .err()
                        .filter(|e| e.is_retryable() || e.code == ErrorCode::CrmAuth);
                    if let Some(e) = inconclusive {
                        // The probe told nothing (a throttle, an outage): decide next time.
                        let e = e.clone();
                        out.push(Err(e.clone()));
                        out.extend(chunk.chain(rest.drain(..)).map(|_| Err(e.clone())));
                        return out;
                    }
                    tracing::warn!(tenant = %client.meter.tenant, "{BULK_REFUSED_NOTE}.");
                    bulk_refused.store(true, Ordering::Relaxed);
                    out.push(probe);
                    rest.splice(0..0, chunk);
                    break;
                }
            }
        }
    }
    for r in rest {
        out.push(client.write(r).await);
    }
    out
}

/// A 403 to a bulk call and to a single one: the credentials may not write.
fn refused_credentials(refusal: DeliveryError) -> DeliveryError {
    DeliveryError {
        message: format!(
            "the credentials may not write (403 to a bulk and to a single call; check the OAuth scope or the agent's role): {}",
            refusal.message
        ),
        ..refusal
    }
}

/// One job. `Err` with the 403 when Zendesk refuses the bulk call: the caller finds out
/// why; `calls_done` is only let go once the job was accepted.
async fn create_or_update_many(
    client: &Arc<ZendeskClient>,
    requests: &[WriteRequest],
    calls_done: &mut Option<CallsDone>,
) -> Result<Vec<Result<WriteOk, DeliveryError>>, DeliveryError> {
    let n = requests.len();
    let object = &requests[0].object;
    let records: Vec<Value> = requests.iter().map(record_body).collect();
    let body = json!({ object.as_str(): records });
    let path = format!("/{object}/create_or_update_many");
    // Held until the job's result is known, or it has run: at most JOB_LIMIT jobs are
    // open.
    let slot = client
        .jobs
        .slots
        .clone()
        .acquire_owned()
        .await
        .expect("the job slots are never closed");
    let answer = match client.call(Method::POST, &path, Some(&body), None).await {
        Ok(a) => a,
        Err(e) => return Ok(vec![Err(e); n]),
    };
    if answer.status == StatusCode::FORBIDDEN {
        return Err(client.classify(&answer));
    }
    // Dropped: the job runs on Zendesk's side from here.
    calls_done.take();
    if !answer.status.is_success() {
        return Ok(vec![Err(client.classify(&answer)); n]);
    }
    let job = match serde_json::from_slice::<JobEnvelope>(&answer.body) {
        Ok(j) => j.job_status,
        Err(e) => {
            // Queued or not, it cannot be followed without its id: its records wait for
            // a job that cannot be named, so they are retried (a replay is safe).
            let e = DeliveryError::unexpected_retryable(format!("job status not understood: {e}"));
            return Ok(vec![Err(e); n]);
        }
    };
    Ok(match Jobs::follow(client, job, requests, slot).await {
        Ok(job) => outcomes(requests, &job),
        Err(e) => vec![Err(e); n],
    })
}

fn finished(job: &JobStatus) -> bool {
    matches!(job.status.as_str(), "completed" | "failed" | "killed")
}

/// The account's open jobs, followed together by one poller task that runs while any
/// job is open: those whose records wait for them, and late ones (past `job_timeout_ms`)
/// whose records are held until they finish.
pub struct Jobs {
    open: Mutex<OpenJobs>,
    /// Where a late job holds its records.
    holds: Arc<Holds>,
    /// Wakes a poller that waits the longer late-job interval when a new job comes.
    wake: tokio::sync::Notify,
    /// One permit per open job, held from its submission until its result is known:
    /// Zendesk runs at most [`JOB_LIMIT`] jobs per account, and a further write waits
    /// here (holding its concurrency permit) instead of being refused.
    slots: Arc<tokio::sync::Semaphore>,
}

impl Jobs {
    pub fn new(holds: Arc<Holds>) -> Self {
        Jobs {
            open: Mutex::new(OpenJobs::default()),
            holds,
            wake: tokio::sync::Notify::new(),
            slots: Arc::new(tokio::sync::Semaphore::new(JOB_LIMIT)),
        }
    }
}

#[derive(Default)]
struct OpenJobs {
    waiting: HashMap<String, Waiter>,
    /// Jobs given up on at `job_timeout_ms` that may still run.
    late: HashMap<String, Late>,
    /// Whether the poller task runs; it ends when no job is open.
    polling: bool,
}

struct Waiter {
    /// Where the finished job goes; dropped unanswered only if the poller dies.
    done: oneshot::Sender<Result<JobStatus, DeliveryError>>,
    deadline: Instant,
    /// When the job was queued (as far as we know: when its answer came).
    queued: Instant,
    /// The status last reported, for the timeout's message.
    status: String,
    /// The job's holds: on the state topic since it was queued, held in memory too once
    /// it is late.
    records: Vec<HoldMarker>,
    /// The job's slot among the account's [`JOB_LIMIT`]: a late job keeps it.
    slot: Option<tokio::sync::OwnedSemaphorePermit>,
}

struct Late {
    /// Its status expires then, and the job with it.
    expires: Instant,
    records: Vec<RecordRef>,
    _slot: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Jobs {
    fn lock(&self) -> std::sync::MutexGuard<'_, OpenJobs> {
        // The lock is never held across an await or a call that can panic.
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until the job has finished, or the job timeout passes; in the latter case
    /// the job is followed on and its records held (see the module's "Late jobs").
    async fn follow(
        client: &Arc<ZendeskClient>,
        job: JobStatus,
        requests: &[WriteRequest],
        slot: tokio::sync::OwnedSemaphorePermit,
    ) -> Result<JobStatus, DeliveryError> {
        if finished(&job) {
            return Ok(job);
        }
        let now = Instant::now();
        // Its status expires a day after it was queued: no hold outlasts that.
        let expires = now + JOB_STATUS_LIFETIME;
        let why = format!("Zendesk job {} with it may still run", job.id);
        let records: Vec<HoldMarker> = requests
            .iter()
            .map(|r| HoldMarker {
                job: Some(job.id.clone()),
                ..HoldMarker::of(client.jobs.holds.tenant(), r, None, &job.id, why.clone(), expires)
            })
            .collect();
        // On the state topic from the moment the job is queued until it has run: if this
        // member dies meanwhile, the records' next owner holds them and follows the job.
        // In this member the record's write is in flight until then: nothing else of it
        // is written, no hold in memory is needed yet.
        client.jobs.holds.record(records.clone()).await;
        let (done, result) = oneshot::channel();
        let start_poller = {
            let mut open = client.jobs.lock();
            open.waiting.insert(
                job.id.clone(),
                Waiter {
                    done,
                    deadline: now + client.job_timeout,
                    queued: now,
                    status: job.status,
                    records,
                    slot: Some(slot),
                },
            );
            !std::mem::replace(&mut open.polling, true)
        };
        if start_poller {
            tokio::spawn(poll_open_jobs(client.clone()));
        } else {
            client.jobs.wake.notify_one();
        }
        result
            .await
            .unwrap_or_else(|_| Err(DeliveryError::unexpected_retryable("job status poller ended".into())))
    }

    /// Takes the waits past their job timeout out of the waiting ones.
    fn take_timed_out(&self) -> Vec<(String, Waiter)> {
        let mut open = self.lock();
        let now = Instant::now();
        let ids: Vec<String> = open
            .waiting
            .iter()
            .filter(|(_, w)| now >= w.deadline)
            .map(|(id, _)| id.clone())
            .collect();
        ids.into_iter()
            .filter_map(|id| open.waiting.remove(&id).map(|w| (id, w)))
            .collect()
    }

    /// Gives up waiting for jobs past their timeout: their records are held (their
    /// markers have been on the state topic since the job was queued), the jobs are
    /// followed on as late ones, and their waiters get a
    /// [`CrmWritePending`](crate::connectors::ErrorCode::CrmWritePending) answer.
    fn give_up(&self, timed_out: Vec<(String, Waiter)>, poll_interval: Duration, tenant: &str) {
        for (id, mut w) in timed_out {
            tracing::warn!(
                tenant,
                job = %id,
                records = w.records.len(),
                "Zendesk job still {} at the job timeout; its records wait until it has run.",
                w.status
            );
            let expires = w.queued + JOB_STATUS_LIFETIME;
            for m in &w.records {
                self.holds.hold(m, expires);
            }
            self.lock().late.insert(
                id.clone(),
                Late {
                    expires,
                    records: w
                        .records
                        .iter()
                        .map(|m| RecordRef::new(&m.object, &m.external_id))
                        .collect(),
                    // A late job keeps its place among the account's jobs.
                    _slot: w.slot.take(),
                },
            );
            let e = DeliveryError::write_pending(
                format!(
                    "Zendesk job {id} still {} at the job timeout; it may still run",
                    w.status
                ),
                poll_interval.saturating_mul(4).max(Duration::from_secs(1)),
            );
            let _ = w.done.send(Err(e));
        }
    }

    /// Follows a job named by a hold read back from the state topic (its records are
    /// held already): as a late job, until it has run or `expires`.
    pub fn adopt(client: &Arc<ZendeskClient>, job: String, records: Vec<RecordRef>, expires: Instant) {
        let start_poller = {
            let mut open = client.jobs.lock();
            if open.waiting.contains_key(&job) {
                // Ours, still waited on (its partition came back to this member): it ends
                // the holds read back for it when it finishes.
            } else {
                let late = open.late.entry(job).or_insert_with(|| Late {
                    expires,
                    records: Vec::new(),
                    // It counts among the account's jobs if a place is free; it is
                    // running already, whether or not one is.
                    _slot: client.jobs.slots.clone().try_acquire_owned().ok(),
                });
                for r in records {
                    if !late.records.contains(&r) {
                        late.records.push(r);
                    }
                }
            }
            !std::mem::replace(&mut open.polling, true)
        };
        if start_poller {
            // Called from the consumer thread: the poller runs on the I/O runtime.
            drop(crate::offload::spawn(poll_open_jobs(client.clone())));
        } else {
            client.jobs.wake.notify_one();
        }
    }

    /// Drops late jobs whose status has expired, and returns the ids still open, or
    /// `None` (and the poller ends) when none is.
    fn open_ids(&self, tenant: &str) -> Option<OpenIds> {
        let mut open = self.lock();
        let now = Instant::now();
        let expired: Vec<String> = open
            .late
            .iter()
            .filter(|(_, l)| now >= l.expires)
            .map(|(id, _)| id.clone())
            .collect();
        for id in expired {
            tracing::warn!(tenant, job = %id, "Zendesk job's status expired before it reported an end; its records are released.");
            self.release(&mut open, &id);
        }
        if open.waiting.is_empty() && open.late.is_empty() {
            open.polling = false;
            return None;
        }
        Some(OpenIds {
            ids: open.waiting.keys().chain(open.late.keys()).cloned().collect(),
            only_late: open.waiting.is_empty(),
        })
    }

    /// Hands a reported status to its waiter if the job has finished, or releases the
    /// records of a late job that has.
    fn report(&self, job: JobStatus, tenant: &str) {
        let mut open = self.lock();
        if finished(&job) {
            if let Some(w) = open.waiting.remove(&job.id) {
                // Holds read back for it (see `adopt`) end with it, and so do its markers.
                let records: Vec<RecordRef> = w
                    .records
                    .iter()
                    .map(|m| RecordRef::new(&m.object, &m.external_id))
                    .collect();
                self.holds.release(&records, &job.id);
                self.holds.forget(w.records);
                let _ = w.done.send(Ok(job));
            } else if open.late.contains_key(&job.id) {
                tracing::info!(tenant, job = %job.id, status = %job.status, "Late Zendesk job has run; its records are released.");
                self.release(&mut open, &job.id);
            }
        } else if let Some(w) = open.waiting.get_mut(&job.id) {
            w.status = job.status;
        }
    }

    /// Zendesk refuses to tell the status of `ids` (a permanent error): the jobs may
    /// still run, so waiting ones are given up on as at the job timeout (their records
    /// held), and late ones stay held until their status would have expired.
    fn fail(&self, ids: &[String], error: &DeliveryError, tenant: &str) {
        tracing::debug!(tenant, jobs = ids.len(), error = %error, "Zendesk job statuses cannot be read; their records stay held.");
        let mut open = self.lock();
        for id in ids {
            if let Some(w) = open.waiting.get_mut(id) {
                w.deadline = Instant::now();
            }
        }
    }
}

impl Jobs {
    /// Forgets a late job and ends its holds.
    fn release(&self, open: &mut OpenJobs, id: &str) {
        if let Some(late) = open.late.remove(id) {
            self.holds.release(&late.records, id);
        }
    }
}

/// The poller: every poll interval, one `show_many` call per [`JOB_LIMIT`] open jobs.
/// A job the answer leaves out, or a poll that fails retryably, is asked about again at
/// the next interval (its timeout bounds that); a `Retry-After` delays the next poll; a
/// permanent refusal ends its jobs' waits with that error.
async fn poll_open_jobs(client: Arc<ZendeskClient>) {
    // The poll cadence, counted from one poll's start to the next (a slow answer does not
    // stretch it); each job's timeout bounds its wait. The first tick, which an interval
    // yields at once, is skipped: a job just queued is not done yet.
    let mut cadence = tokio::time::interval(client.job_poll_interval);
    cadence.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    cadence.tick().await;
    loop {
        cadence.tick().await;
        let tenant = client.meter.tenant.as_ref();
        let timed_out = client.jobs.take_timed_out();
        client.jobs.give_up(timed_out, client.job_poll_interval, tenant);
        let Some(OpenIds { ids, only_late }) = client.jobs.open_ids(tenant) else {
            return;
        };

        for chunk in ids.chunks(JOB_LIMIT) {
            let path = format!("/job_statuses/show_many?ids={}", chunk.join(","));
            let answer = match client.call(Method::GET, &path, None, None).await {
                Ok(a) => a,
                Err(e) => {
                    tracing::debug!(tenant = %client.meter.tenant, error = %e, "Job status poll failed; polling again.");
                    continue;
                }
            };
            if answer.status != StatusCode::OK {
                let e = client.classify(&answer);
                if e.is_retryable() {
                    if let Some(pause) = e.retry_after {
                        // Zendesk asked for a pause: the next poll waits it out.
                        cadence.reset_after(pause);
                    }
                } else {
                    client.jobs.fail(chunk, &e, tenant);
                }
                continue;
            }
            match serde_json::from_slice::<JobStatuses>(&answer.body) {
                Ok(statuses) => statuses
                    .job_statuses
                    .into_iter()
                    .for_each(|j| client.jobs.report(j, tenant)),
                Err(e) => {
                    tracing::debug!(tenant = %client.meter.tenant, error = %e, "Job statuses not understood; polling again.")
                }
            }
        }
        if only_late {
            // Nobody waits on an answer: late jobs are asked about less often, so that one
            // that runs for hours does not spend the account's rate limit; a new job wakes
            // the poller.
            let late = late_poll_interval(client.job_poll_interval);
            let _ = tokio::time::timeout(late, client.jobs.wake.notified()).await;
        }
    }
}

/// Each record's outcome from a finished job.
fn outcomes(requests: &[WriteRequest], job: &JobStatus) -> Vec<Result<WriteOk, DeliveryError>> {
    let items = job.results.as_deref().unwrap_or_default();
    let by_position =
        items.len() == requests.len() && items.iter().all(|i| i.index.is_none() && i.external_id.is_none());
    requests
        .iter()
        .enumerate()
        .map(|(position, req)| {
            let item = items
                .iter()
                .find(|i| i.index == Some(position))
                .or_else(|| {
                    let by_id = |i: &&JobItem| i.index.is_none() && i.external_id.as_deref() == Some(&req.external_id);
                    items.iter().find(by_id)
                })
                .or_else(|| {
                    // Zendesk's external-id lookup ignores case (docs/crm-apis.md §2.2),
                    // so a result may name the record in the case it had: accepted only
                    // when no other record of the batch has the same id in another case,
                    // which would make the result ambiguous.
                    let folds = |x: &str| x.eq_ignore_ascii_case(&req.external_id);
                    let unique = requests.iter().filter(|r| folds(&r.external_id)).count() == 1;
                    let by_folded = |i: &&JobItem| i.index.is_none() && i.external_id.as_deref().is_some_and(folds);
                    items.iter().find(by_folded).filter(|_| unique)
                })
                .or_else(|| by_position.then(|| &items[position]));
            match item {
                Some(item) => item_outcome(item),
                None => Err(DeliveryError::unexpected_retryable(format!(
                    "job {} ({}) reported no result for this record{}",
                    job.id,
                    job.status,
                    job.message.as_deref().map(|m| format!(": {m}")).unwrap_or_default()
                ))),
            }
        })
        .collect()
}

fn item_outcome(item: &JobItem) -> Result<WriteOk, DeliveryError> {
    let status = item.status.as_deref().unwrap_or_default();
    let failed = item.success == Some(false) || item.error.is_some() || status.eq_ignore_ascii_case("failed");
    if failed {
        return Err(errors::classify_item(item.error.as_deref(), &item.details));
    }
    Ok(if status.eq_ignore_ascii_case("created") {
        WriteOk::Created
    } else {
        WriteOk::Updated
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connectors::ErrorClass;

    fn request(key: &str) -> WriteRequest {
        WriteRequest {
            op: Op::Upsert,
            object: "users".into(),
            external_id_field: "external_id".into(),
            external_id: key.into(),
            fields: Default::default(),
            event_id: format!("e-{key}"),
            version: 1,
            state_partition: 0,
        }
    }

    fn job(results: Value) -> JobStatus {
        serde_json::from_value(json!({"id": "V3-1", "status": "completed", "results": results})).unwrap()
    }

    #[test]
    fn matches_results_by_index_then_external_id_then_position() {
        let reqs = [request("A"), request("B"), request("C")];
        let by_index = job(json!([
            {"index": 2, "status": "Created", "id": 12},
            {"index": 0, "status": "Updated", "id": 10},
            {"index": 1, "status": "Failed", "error": "UserUpdateError", "details": "Name: is too short"}
        ]));
        let out = outcomes(&reqs, &by_index);
        assert_eq!(out[0], Ok(WriteOk::Updated));
        assert_eq!(out[2], Ok(WriteOk::Created));
        let failed = out[1].as_ref().unwrap_err();
        assert_eq!(failed.class, ErrorClass::Permanent);
        assert_eq!(failed.message, "UserUpdateError; Name: is too short");

        let by_external_id = job(json!([
            {"external_id": "c", "status": "Created"},
            {"external_id": "a", "status": "Updated"}
        ]));
        let out = outcomes(&reqs, &by_external_id);
        assert_eq!(out[0], Ok(WriteOk::Updated));
        assert_eq!(out[2], Ok(WriteOk::Created));
        assert!(out[1].as_ref().unwrap_err().is_retryable(), "no result: retried");

        // Two records whose ids differ only in case: each gets its own result, and a
        // result in a third case is nobody's.
        let reqs2 = [request("abc"), request("ABC"), request("Abc")];
        let cased = job(json!([
            {"external_id": "ABC", "status": "Failed", "error": "X"},
            {"external_id": "abc", "status": "Updated"},
            {"external_id": "aBC", "status": "Created"}
        ]));
        let out = outcomes(&reqs2, &cased);
        assert_eq!(out[0], Ok(WriteOk::Updated));
        assert!(out[1].is_err() && !out[1].as_ref().unwrap_err().is_retryable());
        assert!(
            out[2].as_ref().unwrap_err().is_retryable(),
            "ambiguous: no result, retried"
        );

        let by_position = job(json!([{"status": "Created"}, {"status": "Updated"}, {"status": "Created"}]));
        assert_eq!(outcomes(&reqs, &by_position)[1], Ok(WriteOk::Updated));
    }
}
