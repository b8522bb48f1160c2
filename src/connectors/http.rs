//! What every CRM client shares: sending a request with its metrics, reading
//! `Retry-After`, and keeping the API quota the CRM last reported.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC};
use reqwest::StatusCode;

use super::DeliveryError;
use crate::telemetry::metric;

/// Characters left as they are in a path segment (RFC 3986 unreserved); everything else,
/// `/` included, is percent-encoded, so an external id cannot change the URL's shape.
pub const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~');

/// The HTTP client of one tenant's connector (the per-attempt timeout, a pool sized to
/// its concurrency) and the meter for its requests.
pub fn tenant_client(
    tenant: &crate::config::TenantConfig,
    crm: &'static str,
) -> Result<(reqwest::Client, Meter), reqwest::Error> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_millis(tenant.request_timeout_ms))
        .pool_max_idle_per_host(tenant.max_concurrency)
        .build()?;
    Ok((
        http,
        Meter {
            tenant: tenant.name.as_str().into(),
            crm,
        },
    ))
}

/// One HTTP answer, read to the end.
pub struct Answer {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub retry_after: Option<Duration>,
    pub body: Vec<u8>,
}

/// Request metrics of one tenant's client: a count by status class and a duration
/// histogram, labelled with the tenant and the CRM.
#[derive(Clone)]
pub struct Meter {
    pub tenant: Arc<str>,
    pub crm: &'static str,
}

impl Meter {
    /// Sends `request`, records its metrics, and reads the whole answer.
    pub async fn send(&self, request: reqwest::RequestBuilder) -> Result<Answer, DeliveryError> {
        let started = Instant::now();
        let span = tracing::info_span!(
            "crm.http",
            tenant = %self.tenant,
            crm = self.crm,
            http.status_code = tracing::field::Empty,
            error = tracing::field::Empty
        );
        let result = tracing::Instrument::instrument(fetch(request), span.clone()).await;
        match &result {
            Ok(answer) => span.record("http.status_code", answer.status.as_u16()),
            Err(e) => span.record("error", e.code.as_str()),
        };
        metrics::histogram!(metric::CRM_REQUEST_DURATION, "tenant" => self.tenant.to_string(), "crm" => self.crm)
            .record(started.elapsed().as_secs_f64());
        self.count(match result.as_ref().map(|a| a.status.as_u16()) {
            Ok(200..=299) => "2xx",
            Ok(300..=399) => "3xx",
            Ok(400..=499) => "4xx",
            Ok(_) => "5xx",
            Err(_) => "error",
        });
        result
    }

    fn count(&self, class: &'static str) {
        metrics::counter!(metric::CRM_REQUESTS, "tenant" => self.tenant.to_string(), "crm" => self.crm, "status" => class)
            .increment(1);
    }

    /// Counts a token fetch.
    pub fn token_refresh(&self) {
        metrics::counter!(metric::TOKEN_REFRESHES, "tenant" => self.tenant.to_string(), "crm" => self.crm).increment(1);
    }
}

/// Sends `request` and reads the whole answer, without request metrics (token fetches).
pub async fn fetch(request: reqwest::RequestBuilder) -> Result<Answer, DeliveryError> {
    let response = request.send().await.map_err(DeliveryError::from_transport)?;
    let status = response.status();
    let headers = response.headers().clone();
    let retry_after = parse_retry_after(headers.get("retry-after").and_then(|v| v.to_str().ok()));
    let body = response.bytes().await.map_err(DeliveryError::from_transport)?.to_vec();
    Ok(Answer {
        status,
        headers,
        retry_after,
        body,
    })
}

/// The longest wait a CRM can impose with one `Retry-After` (or a token can claim to
/// live): a day. A larger value is read as this one, so that no header can overflow a
/// clock (`Instant + Duration` panics) or park a tenant for good.
pub const MAX_CRM_WAIT: Duration = Duration::from_secs(86_400);

/// What a failure's message says of an answer body that is not in the CRM's error
/// format (a proxy's HTML page, say). The body itself is left out: it is not the CRM's
/// word, and whatever it echoes (request headers included) would reach DLQ headers.
pub fn unparsed_body(body: &[u8]) -> String {
    format!("answer body not in the CRM's error format ({} bytes)", body.len())
}

/// Parses a `Retry-After` header given in seconds (the form the CRMs use), capped at
/// [`MAX_CRM_WAIT`].
pub fn parse_retry_after(value: Option<&str>) -> Option<Duration> {
    value?
        .trim()
        .parse::<u64>()
        .ok()
        .map(|s| Duration::from_secs(s).min(MAX_CRM_WAIT))
}

/// The API quota a CRM reported on its latest answer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Quota {
    /// Requests left.
    pub remaining: u64,
    /// Requests the window allows, when the CRM says.
    pub limit: Option<u64>,
    /// When the window resets, when the CRM says.
    pub resets_in: Option<Duration>,
}

impl Quota {
    /// Remaining share of the window, when the limit is known.
    pub fn fraction_left(&self) -> Option<f64> {
        self.limit.filter(|l| *l > 0).map(|l| self.remaining as f64 / l as f64)
    }
}

/// The latest [`Quota`] of one tenant, written by its client on every answer that
/// carries one and read by the tenant's pacing; also exported as gauges.
pub struct QuotaCell {
    meter: Meter,
    latest: Mutex<Option<Quota>>,
}

impl QuotaCell {
    pub fn new(meter: Meter) -> Self {
        QuotaCell {
            meter,
            latest: Mutex::new(None),
        }
    }

    pub fn report(&self, quota: Quota) {
        let labels = [
            ("tenant", self.meter.tenant.to_string()),
            ("crm", self.meter.crm.to_string()),
        ];
        metrics::gauge!(metric::CRM_QUOTA_REMAINING, &labels).set(quota.remaining as f64);
        if let Some(used) = self.usage(quota) {
            metrics::gauge!(metric::CRM_API_USAGE, &labels).set(used);
        }
        *self.latest.lock().unwrap_or_else(|p| p.into_inner()) = Some(quota);
    }

    /// The share of the window used, 0 to 1. More left than the limit (a documented
    /// default the CRM's real allocation exceeds, as Dataverse's can) is none used.
    fn usage(&self, quota: Quota) -> Option<f64> {
        quota.fraction_left().map(|left| (1.0 - left).clamp(0.0, 1.0))
    }

    pub fn latest(&self) -> Option<Quota> {
        *self.latest.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A header's value as a number.
pub fn header_u64(headers: &reqwest::header::HeaderMap, name: &str) -> Option<u64> {
    headers.get(name)?.to_str().ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use percent_encoding::utf8_percent_encode;

    #[test]
    fn api_usage_stays_a_share_when_the_crm_reports_more_than_the_assumed_limit() {
        let cell = QuotaCell::new(Meter {
            tenant: "acme".into(),
            crm: "dynamics",
        });
        let quota = |remaining| Quota {
            remaining,
            limit: Some(6000),
            resets_in: None,
        };
        assert_eq!(cell.usage(quota(4500)), Some(0.25));
        // Dataverse reported a million left against its documented 6000: was -166665.67.
        assert_eq!(cell.usage(quota(1_000_000)), Some(0.0));
        // An outlier leaves nothing behind: the next answers read as they are.
        assert_eq!(cell.usage(quota(4500)), Some(0.25));
        assert_eq!(cell.usage(quota(0)), Some(1.0));
    }

    #[test]
    fn retry_after_in_seconds() {
        assert_eq!(parse_retry_after(Some(" 7 ")), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after(Some("Wed, 21 Oct 2015 07:28:00 GMT")), None);
        assert_eq!(parse_retry_after(None), None);
        assert_eq!(parse_retry_after(Some(&u64::MAX.to_string())), Some(MAX_CRM_WAIT));
    }

    #[test]
    fn external_id_cannot_change_the_url_shape() {
        let encoded = utf8_percent_encode("A/B?c#d e", SEGMENT).to_string();
        assert_eq!(encoded, "A%2FB%3Fc%23d%20e");
        assert_eq!(utf8_percent_encode("C-1001_x.y~", SEGMENT).to_string(), "C-1001_x.y~");
    }
}
