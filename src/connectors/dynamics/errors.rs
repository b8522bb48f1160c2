//! Dataverse failure classification, by the hex `code` of `{"error":{"code","message"}}`
//! bodies first (it is often empty), then by HTTP status.
//!
//! Service protection (429 with `Retry-After`): `0x80072322` request count, `0x80072321`
//! execution time, `0x80072326` concurrent requests, and `0x80072327` concurrency
//! throttling. Entra ID token errors are `{"error","error_description","error_codes"}`.

use serde::Deserialize;
use serde_json::Value;

use crate::connectors::{DeliveryError, ErrorClass, ErrorCode};

/// Service-protection and throttling codes: pause and retry.
const THROTTLE_CODES: [&str; 4] = ["0x80072322", "0x80072321", "0x80072326", "0x80072327"];
/// `DuplicateRecord`: a record with matching key values already exists.
const DUPLICATE_RECORD: &str = "0x80040237";
/// `RecordNotFoundByEntityKey`.
const NOT_FOUND_BY_KEY: &str = "0x80060891";

#[derive(Debug, Default, Deserialize)]
struct Envelope {
    #[serde(default)]
    error: Value,
    #[serde(default)]
    error_description: Option<String>,
}

/// The `(code, message)` of an error body, either shape.
pub fn parse(body: &[u8]) -> (Option<String>, String) {
    let envelope: Envelope = serde_json::from_slice(body).unwrap_or_default();
    match envelope.error {
        Value::Object(o) => (
            o.get("code")
                .and_then(Value::as_str)
                .filter(|c| !c.is_empty())
                .map(str::to_string),
            o.get("message").and_then(Value::as_str).unwrap_or_default().to_string(),
        ),
        Value::String(code) => (Some(code), envelope.error_description.unwrap_or_default()),
        _ => (None, crate::connectors::http::unparsed_body(body)),
    }
}

/// `ObjectDoesNotExist`.
const OBJECT_DOES_NOT_EXIST: &str = "0x80040217";

/// Whether a 404 says the record is not there, as opposed to anything else not being
/// found (an entity set the environment lacks, a wrong URL): `RecordNotFoundByEntityKey`,
/// `ObjectDoesNotExist`, or an empty code with "Does Not Exist" (docs/crm-apis.md §3.2,
/// §3.3).
pub fn is_record_absent(body: &[u8]) -> bool {
    let (code, message) = parse(body);
    match code.as_deref() {
        Some(NOT_FOUND_BY_KEY | OBJECT_DOES_NOT_EXIST) => true,
        None => message.contains("Does Not Exist"),
        Some(_) => false,
    }
}

/// Classifies a failed answer (of a request, or of one part of a `$batch`).
pub fn classify(status: u16, body: &[u8], retry_after: Option<std::time::Duration>) -> DeliveryError {
    use ErrorClass::*;
    use ErrorCode::*;
    let (crm_code, message) = parse(body);
    let code = crm_code.as_deref().unwrap_or_default();
    let e = |class, kind| DeliveryError::crm(class, kind, status, crm_code.clone(), message.clone());
    let err = if status == 429 || THROTTLE_CODES.contains(&code) {
        e(Retryable, CrmRateLimited)
    } else if code == DUPLICATE_RECORD {
        e(Permanent, CrmValidation)
    } else if code == NOT_FOUND_BY_KEY {
        e(Permanent, CrmNotFound)
    } else {
        match status {
            // Still refused right after a fresh token: a passing fault of the directory.
            401 => e(Retryable, CrmAuth),
            403 => e(Permanent, CrmAuth),
            404 => e(Permanent, CrmNotFound),
            408 => e(Retryable, CrmTimeout),
            400 | 405 | 412 | 413 => e(Permanent, CrmValidation),
            500..=599 => e(Retryable, CrmServerError),
            _ => e(Permanent, CrmUnexpected),
        }
    };
    err.with_retry_after(retry_after)
}

/// Classifies a failed Entra ID token request.
pub fn classify_token_error(status: u16, body: &[u8]) -> DeliveryError {
    let (crm_code, description) = parse(body);
    let class = if status >= 500 || status == 429 {
        ErrorClass::Retryable
    } else {
        ErrorClass::Permanent
    };
    DeliveryError::crm(
        class,
        ErrorCode::CrmAuth,
        status,
        crm_code,
        format!("token request refused: {description}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn service_protection_codes_pause_and_retry() {
        let body = br#"{"error":{"code":"0x80072322","message":"Number of requests exceeded the limit of 6000 over time window of 300 seconds."}}"#;
        let e = classify(429, body, Some(Duration::from_secs(5)));
        assert_eq!(
            (e.class, e.code, e.retry_after, e.crm_code.as_deref()),
            (
                ErrorClass::Retryable,
                ErrorCode::CrmRateLimited,
                Some(Duration::from_secs(5)),
                Some("0x80072322")
            )
        );
    }

    #[test]
    fn classifies_by_code_then_status() {
        let dup = classify(
            412,
            br#"{"error":{"code":"0x80040237","message":"A record with matching key values already exists."}}"#,
            None,
        );
        assert_eq!((dup.class, dup.code), (ErrorClass::Permanent, ErrorCode::CrmValidation));
        let invalid = classify(400, br#"{"error":{"code":"0x80044331","message":"The length of the 'subject' attribute exceeded the maximum allowed length of '200'."}}"#, None);
        assert_eq!(invalid.class, ErrorClass::Permanent);
        let down = classify(503, b"", None);
        assert_eq!(down.class, ErrorClass::Retryable);
        let token = classify_token_error(400, br#"{"error":"unauthorized_client","error_description":"AADSTS700016: Application not found","error_codes":[700016]}"#);
        assert_eq!(
            (token.class, token.crm_code.as_deref()),
            (ErrorClass::Permanent, Some("unauthorized_client"))
        );
    }
}
