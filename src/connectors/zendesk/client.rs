//! Zendesk Support API calls for one record.
//!
//! - Users and organizations: `POST /api/v2/{users|organizations}/create_or_update` with
//!   `{"user": {...}}` / `{"organization": {...}}`, matched by `external_id` (users also
//!   by `email`, docs/crm-apis.md §2.2: a mapped email that belongs to another user
//!   updates that user): 201 created, 200 updated. A repeat is an update: safe to retry.
//! - Tickets have no upsert and their `external_id` need not be unique: look the ticket up
//!   (`GET /api/v2/tickets?external_id=`), `PUT /api/v2/tickets/{id}` when found, else
//!   `POST /api/v2/tickets` with an `Idempotency-Key` derived from the event, so a retried
//!   create (within Zendesk's two hours) returns the first ticket instead of a second one.
//!   A ticket's first comment is its description: a mapped `description` becomes the
//!   create's `comment`, and is left out of updates, where a comment would be appended on
//!   every write.
//! - Deletes: find the record by external id (users and organizations through their
//!   `search` endpoints, tickets as above), then `DELETE /api/v2/{object}/{id}`; nothing
//!   found, or a 404, means already gone.
//! - Every answer's rate-limit headers, in either spelling, are the tenant's quota.

use std::sync::Arc;
use std::time::Duration;

use percent_encoding::utf8_percent_encode;
use reqwest::header::{HeaderValue, AUTHORIZATION};
use reqwest::{Method, StatusCode};
use serde_json::{json, Map, Value};

use super::auth::Auth;
use super::errors;
use crate::config::Secret;
use crate::connectors::http::{header_u64, Answer, Meter, Quota, QuotaCell, SEGMENT};
use crate::connectors::{DeliveryError, ErrorCode, WriteOk, WriteRequest};
use crate::event::Op;

pub struct ZendeskClient {
    pub(super) http: reqwest::Client,
    pub(super) base_url: String,
    pub(super) auth: Auth,
    pub(super) meter: Meter,
    pub(super) quota: QuotaCell,
    pub(super) job_poll_interval: Duration,
    pub(super) job_timeout: Duration,
    /// The account's open `create_or_update_many` jobs, polled together.
    pub(super) jobs: super::batching::Jobs,
}

/// The JSON wrapper key of one record of `object`: `user`, `organization`, `ticket`.
pub fn singular(object: &str) -> &str {
    object.strip_suffix('s').unwrap_or(object)
}

impl ZendeskClient {
    /// Sends one API request (`path` from `/api/v2`); a 401 with renewable credentials
    /// gets a new token and one replay.
    pub(super) async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        idempotency_key: Option<&str>,
    ) -> Result<Answer, DeliveryError> {
        let url = format!("{}/api/v2{path}", self.base_url);
        let (method, url) = (&method, &url);
        let send = |auth: Arc<Secret>| async move {
            let mut builder = self
                .http
                .request(method.clone(), url)
                .header(AUTHORIZATION, authorization(&auth)?)
                .header("Accept", "application/json");
            match body {
                Some(b) => builder = builder.json(b),
                // Required on PUT, POST and DELETE, body or not (docs/crm-apis.md §2.1).
                None if method != Method::GET => builder = builder.header("Content-Type", "application/json"),
                None => {}
            }
            if let Some(key) = idempotency_key {
                builder = builder.header("Idempotency-Key", key);
            }
            let answer = self.meter.send(builder).await?;
            if let Some(q) = parse_rate_limit(&answer.headers) {
                self.quota.report(q);
            }
            Ok(answer)
        };
        let refused = |answer: &Answer| {
            let refused = answer.status == StatusCode::UNAUTHORIZED && self.auth.renewable();
            if refused {
                tracing::debug!(tenant = %self.meter.tenant, "Zendesk token refused; fetching a new one.");
            }
            refused
        };
        crate::connectors::token::send_with_token(
            || self.auth.header(),
            |stale| async move { self.auth.invalidate(&stale).await },
            send,
            refused,
        )
        .await
    }

    pub(super) fn classify(&self, answer: &Answer) -> DeliveryError {
        errors::classify(
            answer.status.as_u16(),
            &answer.body,
            answer.retry_after,
            self.auth.renewable(),
        )
    }

    pub async fn write(&self, req: WriteRequest) -> Result<WriteOk, DeliveryError> {
        match (req.op, req.object.as_str()) {
            (Op::Upsert, "tickets") => self.upsert_ticket(req).await,
            (Op::Upsert, _) => self.create_or_update(req).await,
            (Op::Delete, _) => self.delete(req).await,
        }
    }

    async fn create_or_update(&self, req: WriteRequest) -> Result<WriteOk, DeliveryError> {
        let path = format!("/{}/create_or_update", req.object);
        let body = json!({ singular(&req.object): record_body(&req) });
        let answer = self.call(Method::POST, &path, Some(&body), None).await?;
        match answer.status {
            StatusCode::CREATED => Ok(WriteOk::Created),
            StatusCode::OK => Ok(WriteOk::Updated),
            _ => Err(self.classify(&answer)),
        }
    }

    async fn upsert_ticket(&self, req: WriteRequest) -> Result<WriteOk, DeliveryError> {
        let found = self.find_ids(&req).await?;
        let mut fields = req.fields.clone();
        match found.as_slice() {
            [] => {
                if let Some(description) = fields.remove("description") {
                    fields.entry("comment").or_insert(json!({ "body": description }));
                }
                fields.insert("external_id".into(), Value::String(req.external_id.clone()));
                let key = req.idempotency_key();
                let body = json!({ "ticket": fields });
                let answer = self.call(Method::POST, "/tickets", Some(&body), Some(&key)).await?;
                match answer.status {
                    StatusCode::CREATED => Ok(WriteOk::Created),
                    _ => Err(self.classify(&answer)),
                }
            }
            [id] => {
                fields.remove("description");
                fields.remove("comment");
                let body = json!({ "ticket": fields });
                let answer = self
                    .call(Method::PUT, &format!("/tickets/{id}"), Some(&body), None)
                    .await?;
                match answer.status {
                    StatusCode::OK => Ok(WriteOk::Updated),
                    _ => Err(self.classify(&answer)),
                }
            }
            several => Err(multiple_matches(several.len())),
        }
    }

    /// Deletes the one record with the external id. Several (tickets do not have to carry
    /// unique external ids) are the record's permanent error, as for an update: which one
    /// is ours cannot be told, and deleting them all would remove records that are not.
    async fn delete(&self, req: WriteRequest) -> Result<WriteOk, DeliveryError> {
        let id = match self.find_ids(&req).await?.as_slice() {
            [] => return Ok(WriteOk::AlreadyAbsent),
            [id] => *id,
            several => return Err(multiple_matches(several.len())),
        };
        let answer = self
            .call(Method::DELETE, &format!("/{}/{id}", req.object), None, None)
            .await?;
        if answer.status.is_success() || answer.status == StatusCode::NOT_FOUND {
            Ok(WriteOk::Deleted)
        } else {
            Err(self.classify(&answer))
        }
    }

    /// Ids of the records of `req.object` with `req.external_id`.
    async fn find_ids(&self, req: &WriteRequest) -> Result<Vec<u64>, DeliveryError> {
        let value = utf8_percent_encode(&req.external_id, SEGMENT);
        // Users and organizations are found through their search endpoints (`external_id`
        // parameter, docs/crm-apis.md §2.10); tickets through the list's `external_id`
        // filter (§2.5).
        let path = match req.object.as_str() {
            "tickets" => format!("/tickets?external_id={value}"),
            object => format!("/{object}/search?external_id={value}"),
        };
        let answer = self.call(Method::GET, &path, None, None).await?;
        if answer.status != StatusCode::OK {
            return Err(self.classify(&answer));
        }
        let list: Value = serde_json::from_slice(&answer.body)
            .map_err(|e| DeliveryError::unexpected_retryable(format!("Zendesk lookup answer not understood: {e}")))?;
        Ok(list
            .get(&req.object)
            .and_then(Value::as_array)
            .map(|items| {
                items
                    .iter()
                    .filter_map(|i| i.get("id").and_then(Value::as_u64))
                    .collect()
            })
            .unwrap_or_default())
    }
}

/// Several records carry the external id: which one is this record cannot be told.
fn multiple_matches(n: usize) -> DeliveryError {
    DeliveryError {
        class: crate::connectors::ErrorClass::Permanent,
        code: ErrorCode::CrmMultipleMatches,
        http_status: None,
        crm_code: None,
        message: format!("{n} records carry this external_id"),
        retry_after: None,
    }
}

/// The `Authorization` header value, marked sensitive so that no debug output of the
/// request (reqwest's, hyper's) can show it, as `bearer_auth` does for the other CRMs.
fn authorization(auth: &Secret) -> Result<HeaderValue, DeliveryError> {
    let mut value = HeaderValue::from_str(auth.expose()).map_err(|_| DeliveryError {
        class: crate::connectors::ErrorClass::Permanent,
        code: crate::connectors::ErrorCode::CrmAuth,
        http_status: None,
        crm_code: None,
        message: "Zendesk credentials hold characters an HTTP header cannot carry".into(),
        retry_after: None,
    })?;
    value.set_sensitive(true);
    Ok(value)
}

/// A record's fields with its `external_id`.
pub fn record_body(req: &WriteRequest) -> Value {
    let mut fields: Map<String, Value> = req.fields.clone();
    fields.insert("external_id".into(), Value::String(req.external_id.clone()));
    Value::Object(fields)
}

/// The quota in a Zendesk answer's rate-limit headers: `X-Rate-Limit` /
/// `X-Rate-Limit-Remaining`, or `ratelimit-*` (documented) / `rate-limit-*` (seen in live
/// answers) with a reset in seconds.
pub fn parse_rate_limit(headers: &reqwest::header::HeaderMap) -> Option<Quota> {
    let first = |names: &[&str]| names.iter().find_map(|n| header_u64(headers, n));
    let remaining = first(&["ratelimit-remaining", "rate-limit-remaining", "x-rate-limit-remaining"])?;
    Some(Quota {
        remaining,
        limit: first(&["ratelimit-limit", "rate-limit", "x-rate-limit"]),
        resets_in: first(&["ratelimit-reset", "rate-limit-reset"]).map(Duration::from_secs),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::{HeaderMap, HeaderValue};

    #[test]
    fn the_authorization_header_is_sensitive() {
        let value = authorization(&Secret::new("Bearer token-value")).unwrap();
        assert!(value.is_sensitive());
        assert!(!format!("{value:?}").contains("token-value"));
    }

    #[test]
    fn reads_either_spelling_of_the_rate_limit_headers() {
        let mut documented = HeaderMap::new();
        documented.insert("ratelimit-limit", HeaderValue::from_static("700"));
        documented.insert("ratelimit-remaining", HeaderValue::from_static("699"));
        documented.insert("ratelimit-reset", HeaderValue::from_static("41"));
        assert_eq!(
            parse_rate_limit(&documented),
            Some(Quota {
                remaining: 699,
                limit: Some(700),
                resets_in: Some(Duration::from_secs(41))
            })
        );
        let mut legacy = HeaderMap::new();
        legacy.insert("x-rate-limit", HeaderValue::from_static("400"));
        legacy.insert("x-rate-limit-remaining", HeaderValue::from_static("12"));
        assert_eq!(
            parse_rate_limit(&legacy),
            Some(Quota {
                remaining: 12,
                limit: Some(400),
                resets_in: None
            })
        );
        assert_eq!(parse_rate_limit(&HeaderMap::new()), None);
    }
}
