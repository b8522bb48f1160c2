//! Salesforce REST calls: upsert and delete by external id.
//!
//! `PATCH /services/data/vNN.N/sobjects/{SObject}/{ExtIdField}/{value}` creates (201) or
//! updates (200 from v46, 204 before) the record whose external id is `value`; `DELETE`
//! on the same URL removes it, and a 404 there means it is already gone. A 401
//! `INVALID_SESSION_ID` ("Session expired or invalid") gets a new token and one replay.
//! Every response's `Sforce-Limit-Info: api-usage=USED/MAX` is the tenant's quota.

use std::sync::Arc;
use std::time::Duration;

use percent_encoding::utf8_percent_encode;
use reqwest::{Method, StatusCode};

use super::auth::TokenSource;
use super::errors;
use crate::connectors::http::{Answer, Meter, Quota, QuotaCell, SEGMENT};
use crate::connectors::{DeliveryError, WriteOk, WriteRequest};
use crate::event::Op;

pub struct SalesforceClient {
    pub(super) http: reqwest::Client,
    pub(super) api_version: String,
    pub(super) auth: TokenSource,
    pub(super) meter: Meter,
    pub(super) quota: QuotaCell,
    /// Pause after 403 `REQUEST_LIMIT_EXCEEDED`, which comes without `Retry-After`.
    pub(super) limit_pause: Duration,
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
    pub(super) async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<Answer, DeliveryError> {
        let method = &method;
        let send = |token: Arc<super::auth::Token>| async move {
            let url = format!("{}/services/data/v{}{path}", token.instance_url, self.api_version);
            let mut builder = self
                .http
                .request(method.clone(), &url)
                .bearer_auth(token.access_token.expose())
                .header("Accept", "application/json");
            if let Some(b) = body {
                builder = builder.json(b);
            }
            let answer = self.meter.send(builder).await?;
            self.record_limit_info(&answer.headers);
            Ok(answer)
        };
        let expired = |answer: &Answer| {
            let expired = answer.status == StatusCode::UNAUTHORIZED && errors::is_expired_session(&answer.body);
            if expired {
                tracing::debug!(tenant = %self.meter.tenant, "Salesforce session expired; fetching a new token.");
            }
            expired
        };
        crate::connectors::token::send_with_token(
            || self.auth.get(),
            |stale| async move { self.auth.invalidate(&stale).await },
            send,
            expired,
        )
        .await
    }

    /// Upserts or deletes one record by external id.
    pub async fn write(&self, req: WriteRequest) -> Result<WriteOk, DeliveryError> {
        if is_dot_segment(&req.external_id) {
            return Err(unaddressable(&req.external_id));
        }
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
            (Op::Delete, StatusCode::NOT_FOUND) if errors::is_record_absent(&answer.body) => Ok(WriteOk::AlreadyAbsent),
            _ => Err(self.classify(&answer)),
        }
    }

    /// Classifies a failed answer by the Salesforce error it carries.
    pub(super) fn classify(&self, answer: &Answer) -> DeliveryError {
        errors::classify(
            answer.status.as_u16(),
            &answer.body,
            answer.retry_after,
            self.limit_pause,
        )
    }

    /// `Sforce-Limit-Info` counts the org's rolling 24-hour allocation: the quota left,
    /// with no reset time.
    fn record_limit_info(&self, headers: &reqwest::header::HeaderMap) {
        let usage = headers
            .get("sforce-limit-info")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_api_usage);
        if let Some((used, max)) = usage {
            self.quota.report(Quota {
                remaining: max.saturating_sub(used),
                limit: Some(max),
                resets_in: None,
            });
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

/// Whether an external id is a URL dot segment. `.` and `..` in a path are removed by
/// every URL parser on the way (reqwest's, the server's), percent-encoded or not (`%2E` is
/// a dot segment too), so `/sobjects/Contact/Ext__c/.` would address the field, not the
/// record: a delete of it was answered 404 and taken for "already gone". Such a key can
/// only go in a request body (sObject Collections upsert).
pub fn is_dot_segment(external_id: &str) -> bool {
    external_id == "." || external_id == ".."
}

/// The record-level error for a key no URL can carry.
pub fn unaddressable(external_id: &str) -> DeliveryError {
    DeliveryError {
        class: crate::connectors::ErrorClass::Permanent,
        code: crate::connectors::ErrorCode::CrmUnaddressableKey,
        http_status: None,
        crm_code: None,
        message: format!(
            "external id `{external_id}` is a URL dot segment, which Salesforce's by-external-id URLs cannot address"
        ),
        retry_after: None,
    }
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
}
