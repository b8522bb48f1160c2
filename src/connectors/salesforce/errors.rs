//! Salesforce failure classification, by the REST API's own error codes.
//!
//! REST errors are a JSON array of `{"message", "errorCode", "fields"}`; the token
//! endpoint answers `{"error", "error_description"}`. Row locks, server errors and the
//! org's API limit are retryable; validation errors, ambiguous external ids and missing
//! objects or fields are permanent. Salesforce sends no `Retry-After` for its API limit
//! (403 `REQUEST_LIMIT_EXCEEDED`), so that case carries the connector's own long pause.

use std::time::Duration;

use serde::Deserialize;

use crate::connectors::{DeliveryError, ErrorClass, ErrorCode};

#[derive(Debug, Deserialize)]
pub struct RestError {
    #[serde(default)]
    pub message: String,
    #[serde(default, rename = "errorCode")]
    pub error_code: String,
}

#[derive(Debug, Deserialize)]
struct TokenError {
    #[serde(default)]
    error: String,
    #[serde(default)]
    error_description: String,
}

/// The first error of a REST error body, if the body is one.
pub fn first_error(body: &[u8]) -> Option<RestError> {
    serde_json::from_slice::<Vec<RestError>>(body).ok()?.into_iter().next()
}

/// Whether a 401 means "get a new token and replay" (expired session), as opposed to
/// "this app may not use the REST API", which a new token does not cure.
pub fn is_expired_session(body: &[u8]) -> bool {
    first_error(body).is_some_and(|e| e.error_code == "INVALID_SESSION_ID" && !blocked_for_rest(&e.message))
}

/// Whether a 404 to a DELETE by external id says that no record has this value, as
/// opposed to a request that named something that does not exist (an sObject or an
/// external-id field): only the former means "already deleted".
///
/// UNVERIFIED: the documentation gives `NOT_FOUND` "The requested resource does not
/// exist" for an unknown external-id field, and Salesforce is reported to answer the
/// same for a value that matches no record; a message naming the field or the sObject
/// type ("Provided external ID field does not exist or is not accessible", "sObject type
/// … is not supported") is the configuration error. Anything that is not a `NOT_FOUND`
/// error array (an HTML page from a proxy, another code) is not taken as absence either;
/// `ENTITY_IS_DELETED` is.
pub fn is_record_absent(body: &[u8]) -> bool {
    first_error(body).is_some_and(|e| {
        let m = e.message.to_ascii_lowercase();
        let named_something_else = m.contains("external id field") || m.contains("sobject type");
        (e.error_code == "NOT_FOUND" && !named_something_else) || e.error_code == "ENTITY_IS_DELETED"
    })
}

fn blocked_for_rest(message: &str) -> bool {
    message.contains("not valid for use with the REST API")
}

pub fn unexpected(status: u16, message: String) -> DeliveryError {
    DeliveryError::crm(ErrorClass::Permanent, ErrorCode::CrmUnexpected, status, None, message)
}

/// Classifies one record's failure inside an sObject Collections result
/// (`errors[].statusCode`): a row lock is retryable, anything else is the record's own
/// permanent problem.
pub fn classify_record(status_code: &str, message: String) -> DeliveryError {
    let (class, code) = match status_code {
        "UNABLE_TO_LOCK_ROW" => (ErrorClass::Retryable, ErrorCode::CrmRowLock),
        "REQUEST_LIMIT_EXCEEDED" => (ErrorClass::Retryable, ErrorCode::CrmRateLimited),
        "DUPLICATE_EXTERNAL_ID" => (ErrorClass::Permanent, ErrorCode::CrmMultipleMatches),
        _ => (ErrorClass::Permanent, ErrorCode::CrmValidation),
    };
    DeliveryError {
        class,
        code,
        http_status: None,
        crm_code: Some(status_code.to_string()).filter(|c| !c.is_empty()),
        message,
        retry_after: None,
    }
}

/// Classifies a non-success answer of a REST call.
pub fn classify(status: u16, body: &[u8], retry_after: Option<Duration>, limit_pause: Duration) -> DeliveryError {
    use ErrorClass::*;
    use ErrorCode::*;
    let first = first_error(body);
    let crm_code = first.as_ref().map(|e| e.error_code.clone()).filter(|c| !c.is_empty());
    let message = match &first {
        Some(e) => e.message.clone(),
        None => crate::connectors::http::unparsed_body(body),
    };
    let code_is = |c: &str| crm_code.as_deref() == Some(c);
    let err = match status {
        300 => DeliveryError::crm(
            Permanent,
            CrmMultipleMatches,
            status,
            Some("MULTIPLE_CHOICES".into()),
            format!("external id matches several records: {message}"),
        ),
        400 if code_is("UNABLE_TO_LOCK_ROW") => DeliveryError::crm(Retryable, CrmRowLock, status, crm_code, message),
        400 => DeliveryError::crm(Permanent, CrmValidation, status, crm_code, message),
        401 if blocked_for_rest(&message) => DeliveryError::crm(Permanent, CrmAuth, status, crm_code, message),
        // Still expired right after a fresh token: treat as a passing fault.
        401 => DeliveryError::crm(Retryable, CrmAuth, status, crm_code, message),
        403 if code_is("REQUEST_LIMIT_EXCEEDED") => {
            let mut e = DeliveryError::crm(Retryable, CrmRateLimited, status, crm_code, message);
            e.retry_after = Some(limit_pause);
            e
        }
        403 => DeliveryError::crm(Permanent, CrmAuth, status, crm_code, message),
        404 => DeliveryError::crm(Permanent, CrmNotFound, status, crm_code, message),
        408 => DeliveryError::crm(Retryable, CrmTimeout, status, crm_code, message),
        429 => DeliveryError::crm(Retryable, CrmRateLimited, status, crm_code, message),
        500..=599 => DeliveryError::crm(Retryable, CrmServerError, status, crm_code, message),
        _ => DeliveryError::crm(Permanent, CrmUnexpected, status, crm_code, message),
    };
    err.with_retry_after(retry_after)
}

/// Classifies a failed token request.
pub fn classify_token_error(status: u16, body: &[u8]) -> DeliveryError {
    let parsed: Option<TokenError> = serde_json::from_slice(body).ok();
    let (crm_code, description) = match parsed {
        Some(t) => (Some(t.error).filter(|e| !e.is_empty()), t.error_description),
        None => (None, String::new()),
    };
    let message = format!("token request refused: {description}");
    if status >= 500 {
        return DeliveryError::crm(
            ErrorClass::Retryable,
            ErrorCode::CrmServerError,
            status,
            crm_code,
            message,
        );
    }
    // Wrong credentials or an app without the flow enabled: an operator must act.
    DeliveryError::crm(ErrorClass::Permanent, ErrorCode::CrmAuth, status, crm_code, message)
}

#[cfg(test)]
mod tests {

    #[test]
    fn only_a_not_found_for_the_record_means_already_absent() {
        assert!(is_record_absent(
            br#"[{"message":"The requested resource does not exist","errorCode":"NOT_FOUND"}]"#
        ));
        assert!(!is_record_absent(
            br#"[{"message":"Provided external ID field does not exist or is not accessible: Ext__c","errorCode":"NOT_FOUND"}]"#
        ));
        assert!(!is_record_absent(
            br#"[{"message":"sObject type 'Contct' is not supported.","errorCode":"NOT_FOUND"}]"#
        ));
        assert!(!is_record_absent(b"<html>Not Found</html>"));
        assert!(is_record_absent(
            br#"[{"message":"entity is deleted","errorCode":"ENTITY_IS_DELETED"}]"#
        ));
        assert!(!is_record_absent(br#"[{"message":"x","errorCode":"INVALID_FIELD"}]"#));
    }

    use super::*;

    const PAUSE: Duration = Duration::from_secs(60);

    fn body(code: &str, msg: &str) -> Vec<u8> {
        format!(r#"[{{"message":"{msg}","errorCode":"{code}","fields":[]}}]"#).into_bytes()
    }

    #[test]
    fn classifies_by_salesforce_error_code() {
        let lock = classify(
            400,
            &body("UNABLE_TO_LOCK_ROW", "unable to obtain exclusive access"),
            None,
            PAUSE,
        );
        assert_eq!((lock.class, lock.code), (ErrorClass::Retryable, ErrorCode::CrmRowLock));
        let missing = classify(
            400,
            &body("REQUIRED_FIELD_MISSING", "Required fields are missing: [LastName]"),
            None,
            PAUSE,
        );
        assert_eq!(
            (missing.class, missing.code),
            (ErrorClass::Permanent, ErrorCode::CrmValidation)
        );
        assert_eq!(missing.crm_code.as_deref(), Some("REQUIRED_FIELD_MISSING"));
        let limit = classify(
            403,
            &body("REQUEST_LIMIT_EXCEEDED", "TotalRequests Limit exceeded."),
            None,
            PAUSE,
        );
        assert_eq!((limit.class, limit.retry_after), (ErrorClass::Retryable, Some(PAUSE)));
        let multi = classify(
            300,
            br#"["/services/data/v60.0/sobjects/Contact/003A","/services/data/v60.0/sobjects/Contact/003B"]"#,
            None,
            PAUSE,
        );
        assert_eq!(
            (multi.class, multi.code),
            (ErrorClass::Permanent, ErrorCode::CrmMultipleMatches)
        );
        let down = classify(503, b"", Some(Duration::from_secs(3)), PAUSE);
        assert_eq!(
            (down.class, down.retry_after),
            (ErrorClass::Retryable, Some(Duration::from_secs(3)))
        );
    }

    #[test]
    fn tells_expired_session_from_blocked_app() {
        assert!(is_expired_session(&body(
            "INVALID_SESSION_ID",
            "Session expired or invalid"
        )));
        let blocked = body(
            "INVALID_SESSION_ID",
            "This session is not valid for use with the REST API",
        );
        assert!(!is_expired_session(&blocked));
        assert_eq!(classify(401, &blocked, None, PAUSE).class, ErrorClass::Permanent);
    }

    #[test]
    fn token_errors_are_permanent_unless_the_server_failed() {
        let bad = classify_token_error(
            400,
            br#"{"error":"invalid_grant","error_description":"authentication failure"}"#,
        );
        assert_eq!(
            (bad.class, bad.crm_code.as_deref()),
            (ErrorClass::Permanent, Some("invalid_grant"))
        );
        assert_eq!(classify_token_error(503, b"").class, ErrorClass::Retryable);
    }
}
