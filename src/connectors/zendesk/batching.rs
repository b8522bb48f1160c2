//! Zendesk batches: `create_or_update_many` jobs for users and organizations.
//!
//! `POST /api/v2/{users|organizations}/create_or_update_many` with up to 100 records
//! queues a background job and answers with its `job_status`; `GET
//! /api/v2/job_statuses/{id}` is polled until the job is `completed` (or `failed`). Each
//! item of its `results` becomes its record's outcome: `Created`, `Updated`, or `Failed`
//! with `error` and `details`. A record's outcome (and so its event's offset) is only
//! known once the job's result is. Tickets and deletes go one by one.
//!
//! Which result belongs to which record is not fully documented (crm-apis.md §2.3,
//! UNVERIFIED): an item is matched by its `index` when it has one, else by its
//! `external_id`, else by position when the job reports one item per record. A record no
//! item matches is retried: a replay is safe, records are matched by external id.
//! A 403 (bulk import not enabled for the account) switches the tenant to one call per
//! record.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use reqwest::{Method, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};

use super::client::{record_body, ZendeskClient};
use super::errors;
use crate::connectors::{DeliveryError, WriteOk, WriteRequest};
use crate::event::Op;

/// Most records one `create_or_update_many` call may carry.
pub const MANY_LIMIT: usize = 100;

const BULK_REFUSED_NOTE: &str = "bulk import is not enabled for this Zendesk account; writing one record per call";

#[derive(Debug, Deserialize)]
struct JobEnvelope {
    job_status: JobStatus,
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
        (Op::Upsert, "users" | "organizations") if !bulk_refused.load(Ordering::Relaxed) => MANY_LIMIT,
        _ => 1,
    }
}

/// Writes records that share op and object, in jobs of up to [`MANY_LIMIT`] when the
/// object has one, else one by one. One result per request, in order.
pub async fn write_batch(
    client: &ZendeskClient,
    bulk_refused: &AtomicBool,
    requests: Vec<WriteRequest>,
) -> Vec<Result<WriteOk, DeliveryError>> {
    let mut out = Vec::with_capacity(requests.len());
    let batchable = requests
        .first()
        .map(|r| max_batch(bulk_refused, r.op, &r.object))
        .unwrap_or(1)
        > 1;
    if requests.len() == 1 || !batchable {
        for r in requests {
            out.push(client.write(r).await);
        }
        return out;
    }
    let mut rest = requests;
    while !rest.is_empty() {
        let chunk: Vec<WriteRequest> = rest.drain(..rest.len().min(MANY_LIMIT)).collect();
        match create_or_update_many(client, &chunk).await {
            Some(results) => out.extend(results),
            None => {
                tracing::warn!(tenant = %client.meter.tenant, "{BULK_REFUSED_NOTE}.");
                bulk_refused.store(true, Ordering::Relaxed);
                for r in chunk {
                    out.push(client.write(r).await);
                }
            }
        }
    }
    out
}

/// One job. `None` when the account refuses bulk calls (403).
async fn create_or_update_many(
    client: &ZendeskClient,
    requests: &[WriteRequest],
) -> Option<Vec<Result<WriteOk, DeliveryError>>> {
    let n = requests.len();
    let object = &requests[0].object;
    let records: Vec<Value> = requests.iter().map(record_body).collect();
    let body = json!({ object.as_str(): records });
    let path = format!("/{object}/create_or_update_many");
    let answer = match client.call(Method::POST, &path, Some(&body), None).await {
        Ok(a) => a,
        Err(e) => return Some(vec![Err(e); n]),
    };
    if answer.status == StatusCode::FORBIDDEN {
        return None;
    }
    if !answer.status.is_success() {
        return Some(vec![Err(client.classify(&answer)); n]);
    }
    let job = match serde_json::from_slice::<JobEnvelope>(&answer.body) {
        Ok(j) => j.job_status,
        Err(e) => {
            let e = DeliveryError::unexpected_retryable(format!("job status not understood: {e}"));
            return Some(vec![Err(e); n]);
        }
    };
    Some(match follow(client, job).await {
        Ok(job) => outcomes(requests, &job),
        Err(e) => vec![Err(e); n],
    })
}

/// Polls the job until it has finished, or the job timeout passes.
async fn follow(client: &ZendeskClient, mut job: JobStatus) -> Result<JobStatus, DeliveryError> {
    let deadline = Instant::now() + client.job_timeout;
    loop {
        if matches!(job.status.as_str(), "completed" | "failed" | "killed") {
            return Ok(job);
        }
        if Instant::now() >= deadline {
            return Err(DeliveryError::unexpected_retryable(format!(
                "job {} still {} after {:?}",
                job.id, job.status, client.job_timeout
            )));
        }
        // The poll cadence; the job timeout bounds the wait.
        tokio::time::sleep(client.job_poll_interval).await;
        let answer = client
            .call(Method::GET, &format!("/job_statuses/{}", job.id), None, None)
            .await?;
        if answer.status != StatusCode::OK {
            return Err(client.classify(&answer));
        }
        job = serde_json::from_slice::<JobEnvelope>(&answer.body)
            .map_err(|e| DeliveryError::unexpected_retryable(format!("job status not understood: {e}")))?
            .job_status;
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
                    items.iter().find(|i| {
                        i.index.is_none()
                            && i.external_id
                                .as_deref()
                                .is_some_and(|x| x.eq_ignore_ascii_case(&req.external_id))
                    })
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

        let by_position = job(json!([{"status": "Created"}, {"status": "Updated"}, {"status": "Created"}]));
        assert_eq!(outcomes(&reqs, &by_position)[1], Ok(WriteOk::Updated));
    }
}
