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

impl SalesforceClient {
    pub async fn write(&self, req: WriteRequest) -> Result<WriteOk, DeliveryError> {
        let mut replayed = false;
        loop {
            let token = self.auth.get().await?;
            let url = format!(
                "{}/services/data/v{}/sobjects/{}/{}/{}",
                token.instance_url,
                self.api_version,
                utf8_percent_encode(&req.object, SEGMENT),
                utf8_percent_encode(&req.external_id_field, SEGMENT),
                utf8_percent_encode(&req.external_id, SEGMENT),
            );
            let method = match req.op {
                Op::Upsert => Method::PATCH,
                Op::Delete => Method::DELETE,
            };
            let mut builder = self
                .http
                .request(method, &url)
                .bearer_auth(token.access_token.expose())
                .header("Accept", "application/json");
            if req.op == Op::Upsert {
                builder = builder.json(&req.fields);
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
            let body = response.bytes().await.map_err(DeliveryError::from_transport)?;
            match (req.op, status) {
                (Op::Upsert, StatusCode::CREATED) => return Ok(WriteOk::Created),
                (Op::Upsert, StatusCode::OK | StatusCode::NO_CONTENT) => return Ok(WriteOk::Updated),
                (Op::Delete, StatusCode::OK | StatusCode::NO_CONTENT) => return Ok(WriteOk::Deleted),
                (Op::Delete, StatusCode::NOT_FOUND) => return Ok(WriteOk::AlreadyAbsent),
                (_, StatusCode::UNAUTHORIZED) if !replayed && errors::is_expired_session(&body) => {
                    tracing::debug!(tenant = %self.tenant, "Salesforce session expired; fetching a new token.");
                    self.auth.invalidate(&token).await;
                    replayed = true;
                }
                _ => return Err(errors::classify(status.as_u16(), &body, retry_after, self.limit_pause)),
            }
        }
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
