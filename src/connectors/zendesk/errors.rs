//! Zendesk failure classification, by the `error` value of its bodies.
//!
//! Error bodies are `{"error","description","details"}`, where `details` maps a field to
//! a list of `{description, error}` (422 `RecordInvalid`); the OAuth token endpoint and
//! expired OAuth tokens answer `{"error","error_description"}`. A 429 carries
//! `Retry-After`; its body shape is not documented (docs/crm-apis.md §2.7, UNVERIFIED), so
//! only the status and the header are read. Without the header, 60 s, as the Zendesk
//! clients do.

use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use crate::connectors::{DeliveryError, ErrorClass, ErrorCode};

/// Pause after a 429 that came without `Retry-After`.
pub const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(60);

#[derive(Debug, Default, Deserialize)]
pub struct ErrorBody {
    /// Usually a string (`RecordInvalid`); a few endpoints nest an object here.
    #[serde(default)]
    pub error: Value,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub error_description: Option<String>,
    #[serde(default)]
    pub details: Value,
}

impl ErrorBody {
    pub fn parse(body: &[u8]) -> ErrorBody {
        serde_json::from_slice(body).unwrap_or_default()
    }

    pub fn code(&self) -> Option<String> {
        match &self.error {
            Value::String(s) if !s.is_empty() => Some(s.clone()),
            Value::Object(o) => o.get("title").and_then(Value::as_str).map(str::to_string),
            _ => None,
        }
    }

    /// The description followed by every detail, e.g. `Record validation errors; email:
    /// DuplicateValue (Email: x@y.com is already being used by another user)`, so the
    /// DLQ's message header keeps what the CRM said was wrong.
    pub fn message(&self) -> String {
        let mut out = self
            .description
            .clone()
            .or_else(|| self.error_description.clone())
            .unwrap_or_default();
        out.push_str(&details_text(&self.details));
        out
    }
}

/// `details` of a 422, or of a failed bulk-job item, as text.
pub fn details_text(details: &Value) -> String {
    let mut out = String::new();
    match details {
        Value::Object(fields) => {
            for (field, problems) in fields {
                for p in problems.as_array().map(Vec::as_slice).unwrap_or_default() {
                    let code = p.get("error").and_then(Value::as_str).unwrap_or("invalid");
                    let text = p.get("description").and_then(Value::as_str).unwrap_or_default();
                    out.push_str(&format!("; {field}: {code} ({text})"));
                }
            }
        }
        Value::String(s) if !s.is_empty() => out.push_str(&format!("; {s}")),
        _ => {}
    }
    out
}

/// Classifies a non-success answer. `renewable`: whether the tenant's credentials can be
/// renewed (OAuth client credentials); a 401 for fixed credentials needs an operator.
pub fn classify(status: u16, body: &[u8], retry_after: Option<Duration>, renewable: bool) -> DeliveryError {
    use ErrorClass::*;
    use ErrorCode::*;
    let parsed = ErrorBody::parse(body);
    let crm_code = parsed.code();
    let mut message = parsed.message();
    if message.is_empty() {
        message = String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned();
    }
    let e = |class, code| DeliveryError::crm(class, code, status, crm_code.clone(), message.clone());
    match status {
        429 => e(Retryable, CrmRateLimited).with_retry_after(Some(retry_after.unwrap_or(DEFAULT_RETRY_AFTER))),
        401 if renewable => e(Retryable, CrmAuth),
        401 | 403 => e(Permanent, CrmAuth),
        404 => e(Permanent, CrmNotFound),
        // A safe update lost a race, or a concurrent create of the same user: try again.
        409 => e(Retryable, CrmRowLock),
        408 => e(Retryable, CrmTimeout),
        400 | 413 | 422 => e(Permanent, CrmValidation),
        500..=599 => e(Retryable, CrmServerError).with_retry_after(retry_after),
        _ => e(Permanent, CrmUnexpected),
    }
}

/// Classifies a failed item of a bulk job (`{"status":"Failed","error","details"}`):
/// the record's own problem, permanent.
pub fn classify_item(error: Option<&str>, details: &Value) -> DeliveryError {
    let code = error.unwrap_or("Failed").to_string();
    DeliveryError {
        class: ErrorClass::Permanent,
        code: ErrorCode::CrmValidation,
        http_status: None,
        message: format!("{code}{}", details_text(details)),
        crm_code: Some(code),
        retry_after: None,
    }
}

/// Classifies a failed token request: wrong credentials need an operator; a server
/// failure passes.
pub fn classify_token_error(status: u16, body: &[u8]) -> DeliveryError {
    let parsed = ErrorBody::parse(body);
    let message = format!("token request refused: {}", parsed.message());
    let class = if status >= 500 || status == 429 {
        ErrorClass::Retryable
    } else {
        ErrorClass::Permanent
    };
    DeliveryError::crm(class, ErrorCode::CrmAuth, status, parsed.code(), message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_invalid_is_permanent_and_keeps_its_details() {
        let body = br#"{"error":"RecordInvalid","description":"Record validation errors","details":{"email":[{"description":"Email: x@y.com is already being used by another user","error":"DuplicateValue"}]}}"#;
        let e = classify(422, body, None, false);
        assert_eq!((e.class, e.code), (ErrorClass::Permanent, ErrorCode::CrmValidation));
        assert_eq!(e.crm_code.as_deref(), Some("RecordInvalid"));
        assert_eq!(
            e.message,
            "Record validation errors; email: DuplicateValue (Email: x@y.com is already being used by another user)"
        );
    }

    #[test]
    fn throttles_wait_as_told_or_a_minute() {
        let told = classify(429, b"", Some(Duration::from_secs(7)), false);
        assert_eq!(
            (told.class, told.code, told.retry_after),
            (
                ErrorClass::Retryable,
                ErrorCode::CrmRateLimited,
                Some(Duration::from_secs(7))
            )
        );
        assert_eq!(classify(429, b"", None, false).retry_after, Some(DEFAULT_RETRY_AFTER));
    }

    #[test]
    fn auth_failures_are_retryable_only_when_a_new_token_can_help() {
        let body = br#"{"error":"invalid_token","error_description":"The access token provided is expired, revoked, malformed or invalid for other reasons."}"#;
        assert_eq!(classify(401, body, None, true).class, ErrorClass::Retryable);
        let fixed = classify(401, br#"{"error":"Couldn't authenticate you"}"#, None, false);
        assert_eq!((fixed.class, fixed.code), (ErrorClass::Permanent, ErrorCode::CrmAuth));
        let idem = classify(
            400,
            br#"{"error":"IdempotentRequestError","description":"Request parameters don't match the given idempotency key"}"#,
            None,
            false,
        );
        assert_eq!(
            (idem.class, idem.crm_code.as_deref()),
            (ErrorClass::Permanent, Some("IdempotentRequestError"))
        );
        assert_eq!(classify(503, b"", None, false).class, ErrorClass::Retryable);
    }
}
