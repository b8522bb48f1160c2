//! Dataverse Web API calls for one record, by alternate key.
//!
//! `PATCH /api/data/v9.2/{entityset}({keycolumn}='{value}')` with the columns to set is an
//! upsert: it creates the record or updates it, and answers 204 either way (it cannot
//! tell which). It carries neither `If-Match: *` (update only) nor `If-None-Match: *`
//! (create only): the operation needs both behaviours. `DELETE` on the same URL removes
//! the record; 404 means it is already gone. The key value is an OData string literal
//! (quotes doubled) and percent-encoded, so it cannot change the URL's shape; key columns
//! are taken to be strings, as event keys are. A 401 gets a new token and one replay.
//! `x-ms-ratelimit-burst-remaining-xrm-requests` is the tenant's quota, against the
//! documented default of 6000 requests per 5 minutes per web server.

use std::time::Duration;

use percent_encoding::utf8_percent_encode;
use reqwest::{Method, StatusCode};

use super::auth::TokenSource;
use super::errors;
use crate::connectors::http::{header_u64, Answer, Meter, Quota, QuotaCell, SEGMENT};
use crate::connectors::{DeliveryError, WriteOk, WriteRequest};
use crate::event::Op;

/// Dataverse's documented default request limit per 5-minute window and web server.
pub const DEFAULT_REQUEST_LIMIT: u64 = 6000;

pub struct DynamicsClient {
    pub(super) http: reqwest::Client,
    /// `{org_url}/api/data/v{version}`.
    pub(super) api_url: String,
    pub(super) auth: TokenSource,
    pub(super) meter: Meter,
    pub(super) quota: QuotaCell,
}

impl DynamicsClient {
    /// The record URL of `req`: `{api}/{set}({column}='{value}')`.
    pub fn record_url(&self, req: &WriteRequest) -> String {
        let literal = req.external_id.replace('\'', "''");
        format!(
            "{}/{}({}='{}')",
            self.api_url,
            utf8_percent_encode(&req.object, SEGMENT),
            utf8_percent_encode(&req.external_id_field, SEGMENT),
            utf8_percent_encode(&literal, SEGMENT),
        )
    }

    /// Sends a request built by `build` (given the bearer token) with the OData headers;
    /// a 401 gets a new token and one replay.
    pub(super) async fn call(&self, build: impl Fn(&str) -> reqwest::RequestBuilder) -> Result<Answer, DeliveryError> {
        let build = &build;
        let send = |token: std::sync::Arc<crate::config::Secret>| async move {
            let request = build(token.expose())
                .header("Accept", "application/json")
                .header("OData-MaxVersion", "4.0")
                .header("OData-Version", "4.0");
            let answer = self.meter.send(request).await?;
            if let Some(remaining) = header_u64(&answer.headers, "x-ms-ratelimit-burst-remaining-xrm-requests") {
                self.quota.report(Quota {
                    remaining,
                    limit: Some(DEFAULT_REQUEST_LIMIT),
                    resets_in: None,
                });
            }
            Ok(answer)
        };
        let refused = |answer: &Answer| {
            let refused = answer.status == StatusCode::UNAUTHORIZED;
            if refused {
                tracing::debug!(tenant = %self.meter.tenant, "Dataverse refused the token; fetching a new one.");
            }
            refused
        };
        crate::connectors::token::send_with_token(
            || self.auth.get(),
            |stale| async move { self.auth.invalidate(&stale).await },
            send,
            refused,
        )
        .await
    }

    pub async fn write(&self, req: WriteRequest) -> Result<WriteOk, DeliveryError> {
        let url = self.record_url(&req);
        let answer = match req.op {
            Op::Upsert => {
                let body = serde_json::Value::Object(req.fields);
                self.call(|token| self.http.request(Method::PATCH, &url).bearer_auth(token).json(&body))
                    .await?
            }
            Op::Delete => {
                self.call(|token| self.http.request(Method::DELETE, &url).bearer_auth(token))
                    .await?
            }
        };
        outcome(req.op, answer.status.as_u16(), &answer.body, answer.retry_after)
    }
}

/// A record's outcome from the status and body of its answer (or of its `$batch` part).
pub fn outcome(op: Op, status: u16, body: &[u8], retry_after: Option<Duration>) -> Result<WriteOk, DeliveryError> {
    match (op, status) {
        (Op::Upsert, 201) => Ok(WriteOk::Created),
        (Op::Upsert, 200 | 204) => Ok(WriteOk::Updated),
        (Op::Delete, 200 | 204) => Ok(WriteOk::Deleted),
        (Op::Delete, 404) if errors::is_record_absent(body) => Ok(WriteOk::AlreadyAbsent),
        _ => Err(errors::classify(status, body, retry_after)),
    }
}
