//! Salesforce batches: sObject Collections upsert.
//!
//! `PATCH /composite/sobjects/{SObject}/{ExtIdField}` with `allOrNone: false` upserts up
//! to 200 records of one sObject by one external id field (API v46 and later) and answers
//! 200 with one result per record, in order: `success`, `created`, and
//! `errors[].statusCode` for a record that failed. Deletes by external id have no
//! collection form and go one by one.

use percent_encoding::utf8_percent_encode;
use reqwest::{Method, StatusCode};
use serde::Deserialize;

use super::client::{is_dot_segment, SalesforceClient};
use super::errors;
use crate::connectors::http::SEGMENT;
use crate::connectors::{DeliveryError, WriteOk, WriteRequest};
use crate::event::Op;

/// Most records one sObject Collections call may carry.
pub const COLLECTION_LIMIT: usize = 200;

#[derive(Deserialize)]
struct CollectionResult {
    #[serde(default)]
    success: bool,
    #[serde(default)]
    created: bool,
    #[serde(default)]
    errors: Vec<CollectionError>,
}

#[derive(Deserialize)]
struct CollectionError {
    #[serde(default, rename = "statusCode")]
    status_code: String,
    #[serde(default)]
    message: String,
}

/// Most records one call may carry for `op`.
pub fn max_batch(client: &SalesforceClient, op: Op) -> usize {
    match op {
        Op::Upsert if client.supports_collections() => COLLECTION_LIMIT,
        _ => 1,
    }
}

/// Writes records that share op, sObject and external id field: upserts in collections
/// of up to [`COLLECTION_LIMIT`], anything else one by one. One result per request, in
/// order.
pub async fn write_batch(
    client: &SalesforceClient,
    requests: Vec<WriteRequest>,
) -> Vec<Result<WriteOk, DeliveryError>> {
    let mut out = Vec::with_capacity(requests.len());
    if requests.len() == 1 || max_batch(client, Op::Upsert) == 1 || requests.iter().any(|r| r.op != Op::Upsert) {
        for r in requests {
            out.push(write_one(client, r).await);
        }
        return out;
    }
    let mut rest = requests;
    while !rest.is_empty() {
        let chunk: Vec<WriteRequest> = rest.drain(..rest.len().min(COLLECTION_LIMIT)).collect();
        out.extend(upsert_collection(client, chunk).await);
    }
    out
}

/// Writes one record: by its external-id URL, or, for a key no URL can carry (see
/// [`is_dot_segment`]), an upsert through a one-record collection, where the key goes in
/// the body. Such a key cannot be deleted by external id: that is the record's permanent
/// error.
pub async fn write_one(client: &SalesforceClient, request: WriteRequest) -> Result<WriteOk, DeliveryError> {
    if request.op == Op::Upsert && is_dot_segment(&request.external_id) && client.supports_collections() {
        let mut results = upsert_collection(client, vec![request]).await;
        return results
            .pop()
            .unwrap_or_else(|| Err(DeliveryError::unexpected_retryable("no collection result".into())));
    }
    client.write(request).await
}

/// One collections call. A failure of the whole request is every record's failure.
async fn upsert_collection(
    client: &SalesforceClient,
    requests: Vec<WriteRequest>,
) -> Vec<Result<WriteOk, DeliveryError>> {
    let n = requests.len();
    let Some(first) = requests.first() else {
        return Vec::new();
    };
    let path = format!(
        "/composite/sobjects/{}/{}",
        utf8_percent_encode(&first.object, SEGMENT),
        utf8_percent_encode(&first.external_id_field, SEGMENT),
    );
    let records: Vec<serde_json::Value> = requests
        .into_iter()
        .map(|r| {
            let mut record = r.fields;
            record.insert("attributes".into(), serde_json::json!({"type": r.object}));
            record.insert(r.external_id_field, serde_json::Value::String(r.external_id));
            serde_json::Value::Object(record)
        })
        .collect();
    let body = serde_json::json!({"allOrNone": false, "records": records});
    let answer = match client.call(Method::PATCH, &path, Some(&body)).await {
        Ok(a) => a,
        Err(e) => return vec![Err(e); n],
    };
    if answer.status != StatusCode::OK {
        return vec![Err(client.classify(&answer)); n];
    }
    let results: Vec<CollectionResult> = match serde_json::from_slice(&answer.body) {
        Ok(r) => r,
        Err(e) => {
            let e = DeliveryError::unexpected_retryable(format!("collection results not understood: {e}"));
            return vec![Err(e); n];
        }
    };
    if results.len() != n {
        let message = format!("{} results for {n} records", results.len());
        return vec![Err(DeliveryError::unexpected_retryable(message)); n];
    }
    results
        .into_iter()
        .map(|r| match (r.success, r.created) {
            (true, true) => Ok(WriteOk::Created),
            (true, false) => Ok(WriteOk::Updated),
            (false, _) => {
                let (code, message) = r
                    .errors
                    .into_iter()
                    .next()
                    .map(|e| (e.status_code, e.message))
                    .unwrap_or_default();
                Err(errors::classify_record(&code, message))
            }
        })
        .collect()
}
