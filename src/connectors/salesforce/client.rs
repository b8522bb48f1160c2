//! Salesforce REST calls: upsert and delete by external id.
//!
//! `PATCH /services/data/vNN.N/sobjects/{SObject}/{ExtIdField}/{value}` creates (201) or
//! updates (200 from v46, 204 before) the record whose external id is `value`; `DELETE`
//! on the same URL removes it, and a 404 there means it is already gone. A 401
//! `INVALID_SESSION_ID` ("Session expired or invalid") gets a new token and one replay.
//! Every response's `Sforce-Limit-Info: api-usage=USED/MAX` feeds a gauge.

use std::sync::Arc;
use std::time::{Duration, Instant};

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use reqwest::{Method, StatusCode};
use serde::Deserialize;

use super::auth::TokenSource;
use super::errors;
use crate::connectors::{DeliveryError, WriteOk, WriteRequest};
use crate::event::Op;
use crate::telemetry::metric;

/// Characters left as they are in a path segment (RFC 3986 unreserved); everything else,
/// `/` included, is percent-encoded, so an external id cannot change the URL's shape.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~');

pub struct SalesforceClient {
    pub(super) http: reqwest::Client,
    pub(super) api_version: String,
    pub(super) auth: TokenSource,
    pub(super) tenant: Arc<str>,
    /// Pause after 403 `REQUEST_LIMIT_EXCEEDED`, which comes without `Retry-After`.
    pub(super) limit_pause: Duration,
}

/// Most records one sObject Collections call may carry.
pub const COLLECTION_LIMIT: usize = 200;

/// An answer from the REST API, after at most one token replay.
struct Answer {
    status: StatusCode,
    retry_after: Option<Duration>,
    body: Vec<u8>,
}

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

impl SalesforceClient {
    /// sObject Collections upsert exists from API v46.
    pub fn supports_collections(&self) -> bool {
        self.api_version
            .split_once('.')
            .and_then(|(major, _)| major.parse::<u32>().ok())
            .is_some_and(|major| major >= 46)
    }

    /// Sends one REST request (`path` below `/services/data/vNN.N`); a 401 for an expired
    /// session gets a new token and one replay.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<Answer, DeliveryError> {
        let mut replayed = false;
        loop {
            let token = self.auth.get().await?;
            let url = format!("{}/services/data/v{}{path}", token.instance_url, self.api_version);
            let mut builder = self
                .http
                .request(method.clone(), &url)
                .bearer_auth(token.access_token.expose())
                .header("Accept", "application/json");
            if let Some(b) = body {
                builder = builder.json(b);
            }
            let started = Instant::now();
            let result = builder.send().await;
            let elapsed = started.elapsed().as_secs_f64();
            metrics::histogram!(metric::CRM_REQUEST_DURATION, "tenant" => self.tenant.to_string(), "crm" => "salesforce")
                .record(elapsed);
            let response = match result {
                Ok(r) => r,
                Err(e) => {
                    self.count(None);
                    return Err(DeliveryError::from_transport(e));
                }
            };
            let status = response.status();
            self.count(Some(status));
            self.record_limit_info(response.headers());
            let retry_after =
                errors::parse_retry_after(response.headers().get("retry-after").and_then(|v| v.to_str().ok()));
            let body_bytes = response.bytes().await.map_err(DeliveryError::from_transport)?.to_vec();
            if status == StatusCode::UNAUTHORIZED && !replayed && errors::is_expired_session(&body_bytes) {
                tracing::debug!(tenant = %self.tenant, "Salesforce session expired; fetching a new token.");
                self.auth.invalidate(&token).await;
                replayed = true;
                continue;
            }
            return Ok(Answer {
                status,
                retry_after,
                body: body_bytes,
            });
        }
    }

    /// Upserts or deletes one record by external id.
    pub async fn write(&self, req: WriteRequest) -> Result<WriteOk, DeliveryError> {
        let path = format!(
            "/sobjects/{}/{}/{}",
            utf8_percent_encode(&req.object, SEGMENT),
            utf8_percent_encode(&req.external_id_field, SEGMENT),
            utf8_percent_encode(&req.external_id, SEGMENT),
        );
        let answer = match req.op {
            Op::Upsert => {
                let body = serde_json::Value::Object(req.fields);
                self.call(Method::PATCH, &path, Some(&body)).await?
            }
            Op::Delete => self.call(Method::DELETE, &path, None).await?,
        };
        match (req.op, answer.status) {
            (Op::Upsert, StatusCode::CREATED) => Ok(WriteOk::Created),
            (Op::Upsert, StatusCode::OK | StatusCode::NO_CONTENT) => Ok(WriteOk::Updated),
            (Op::Delete, StatusCode::OK | StatusCode::NO_CONTENT) => Ok(WriteOk::Deleted),
            (Op::Delete, StatusCode::NOT_FOUND) => Ok(WriteOk::AlreadyAbsent),
            _ => Err(errors::classify(
                answer.status.as_u16(),
                &answer.body,
                answer.retry_after,
                self.limit_pause,
            )),
        }
    }

    /// Upserts up to [`COLLECTION_LIMIT`] records of one sObject by one external id field
    /// with `allOrNone: false`: one result per record, in order. A failure of the whole
    /// request is every record's failure.
    pub async fn upsert_collection(&self, requests: Vec<WriteRequest>) -> Vec<Result<WriteOk, DeliveryError>> {
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
            .iter()
            .map(|r| {
                let mut record = r.fields.clone();
                record.insert("attributes".into(), serde_json::json!({"type": r.object}));
                record.insert(
                    r.external_id_field.clone(),
                    serde_json::Value::String(r.external_id.clone()),
                );
                serde_json::Value::Object(record)
            })
            .collect();
        let body = serde_json::json!({"allOrNone": false, "records": records});
        let answer = match self.call(Method::PATCH, &path, Some(&body)).await {
            Ok(a) => a,
            Err(e) => return vec![Err(e); n],
        };
        if answer.status != StatusCode::OK {
            let e = errors::classify(
                answer.status.as_u16(),
                &answer.body,
                answer.retry_after,
                self.limit_pause,
            );
            return vec![Err(e); n];
        }
        let results: Vec<CollectionResult> = match serde_json::from_slice(&answer.body) {
            Ok(r) => r,
            Err(e) => {
                let e = errors::unexpected_retryable(format!("collection results not understood: {e}"));
                return vec![Err(e); n];
            }
        };
        if results.len() != n {
            let message = format!("{} results for {n} records", results.len());
            return vec![Err(errors::unexpected_retryable(message)); n];
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

    fn count(&self, status: Option<StatusCode>) {
        let class = match status.map(|s| s.as_u16()) {
            Some(200..=299) => "2xx",
            Some(300..=399) => "3xx",
            Some(400..=499) => "4xx",
            Some(_) => "5xx",
            None => "error",
        };
        metrics::counter!(metric::CRM_REQUESTS, "tenant" => self.tenant.to_string(), "crm" => "salesforce", "status" => class)
            .increment(1);
    }

    fn record_limit_info(&self, headers: &reqwest::header::HeaderMap) {
        let usage = headers
            .get("sforce-limit-info")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_api_usage);
        if let Some((used, max)) = usage {
            if max > 0 {
                metrics::gauge!(metric::CRM_API_USAGE, "tenant" => self.tenant.to_string(), "crm" => "salesforce")
                    .set(used as f64 / max as f64);
            }
        }
    }
}

/// Reads `api-usage=USED/MAX` out of a `Sforce-Limit-Info` header value.
pub fn parse_api_usage(value: &str) -> Option<(u64, u64)> {
    value.split(';').find_map(|part| {
        let (used, max) = part.trim().strip_prefix("api-usage=")?.split_once('/')?;
        Some((used.trim().parse().ok()?, max.trim().parse().ok()?))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sforce_limit_info() {
        assert_eq!(parse_api_usage("api-usage=18/5000"), Some((18, 5000)));
        assert_eq!(
            parse_api_usage("api-usage=10018/100000; per-app-api-usage=17/250(appName=sample)"),
            Some((10018, 100000))
        );
        assert_eq!(parse_api_usage("per-app-api-usage=17/250"), None);
    }

    #[test]
    fn external_id_cannot_change_the_url_shape() {
        let encoded = utf8_percent_encode("A/B?c#d e", SEGMENT).to_string();
        assert_eq!(encoded, "A%2FB%3Fc%23d%20e");
        assert_eq!(utf8_percent_encode("C-1001_x.y~", SEGMENT).to_string(), "C-1001_x.y~");
    }
}
