//! The sandbox's HTTP API: the token endpoint, upsert/delete by external id, and the
//! `/__sandbox` admin endpoints.

use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Map, Value};

use super::org::{lock, Org, Shared};
use super::{Faults, Scripted, Stats, StoredRecord};
use crate::sandbox::common::{admin_routes, basic_credentials, delay, form_fields, AdminState};

pub(super) fn router(org: Shared) -> Router {
    Router::new()
        .route("/services/oauth2/token", post(token))
        .route(
            "/services/data/{version}/sobjects/{sobject}/{field}/{value}",
            axum::routing::patch(by_external_id).delete(by_external_id),
        )
        .route(
            "/services/data/{version}/composite/sobjects/{sobject}/{field}",
            axum::routing::patch(collection_upsert),
        )
        .merge(admin_routes())
        .with_state(org)
}

fn rest_error(status: StatusCode, code: &str, message: &str, fields: &[String], limit: Option<String>) -> Response {
    let body = json!([{ "message": message, "errorCode": code, "fields": fields }]);
    let mut response = (status, Json(body)).into_response();
    if let Some(l) = limit.and_then(|l| HeaderValue::from_str(&l).ok()) {
        response.headers_mut().insert("sforce-limit-info", l);
    }
    response
}

async fn token(State(org): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let Some(mut form) = form_fields(&body) else {
        return token_error("invalid_request", "malformed form body");
    };
    let mut org = lock(&org);
    org.stats.token_requests += 1;
    let host = headers.get("host").and_then(|h| h.to_str().ok()).unwrap_or_default();
    if host.starts_with("login.salesforce.com") || host.starts_with("test.salesforce.com") {
        return token_error("invalid_grant", "request not supported on this domain");
    }
    if form.get("grant_type").map(String::as_str) != Some("client_credentials") {
        return token_error("unsupported_grant_type", "grant type not supported");
    }
    let (id, secret) = match (form.remove("client_id"), form.remove("client_secret")) {
        (Some(i), Some(s)) => (i, s),
        _ => match basic_credentials(&headers) {
            Some(pair) => pair,
            None => return token_error("invalid_client_id", "client identifier invalid"),
        },
    };
    if id != org.setup.client_id || secret != org.setup.client_secret {
        return token_error("invalid_grant", "authentication failure");
    }
    let access_token = format!("00DSBX0000000001!{:032x}", org.rng.gen::<u128>());
    org.tokens.insert(access_token.clone(), Instant::now());
    let issued_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default();
    Json(json!({
        "access_token": access_token,
        "instance_url": org.base_url,
        "id": format!("{}/id/00DSBX0000000001AAA/005SBX0000000001AAA", org.base_url),
        "token_type": "Bearer",
        "issued_at": issued_at.to_string(),
        "signature": "c2FuZGJveA==",
        "scope": "api",
    }))
    .into_response()
}

fn token_error(error: &str, description: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({"error": error, "error_description": description})),
    )
        .into_response()
}

async fn by_external_id(
    State(shared): State<Shared>,
    method: Method,
    Path((version, sobject, field, value)): Path<(String, String, String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let record = (sobject.clone(), field.clone(), value.clone());
    serve_data(&shared, Some(record), |org| {
        handle_record(org, &method, &version, &sobject, &field, &value, &headers, &body)
    })
    .await
}

/// Waits the injected latency, runs a data API handler on the org, and counts an answer
/// other than 2xx as rejected.
async fn serve_data(
    shared: &Shared,
    record: Option<(String, String, String)>,
    handle: impl FnOnce(&mut Org) -> Response,
) -> Response {
    let latency = {
        let mut org = lock(shared);
        if let Some(r) = &record {
            let n = org.in_progress.entry(r.clone()).or_default();
            *n += 1;
            let n = *n;
            org.stats.max_concurrent_writes_of_one_record = org.stats.max_concurrent_writes_of_one_record.max(n);
        }
        org.setup.faults.latency_ms
    };
    // Counted out however the request ends, also when the client gives up during the
    // latency and the handler is dropped.
    let _in_progress = InProgress(shared.clone(), record);
    delay(latency).await;
    let mut org = lock(shared);
    let response = handle(&mut org);
    let status = response.status().as_u16();
    if !(200..300).contains(&status) {
        *org.stats.rejected.entry(status).or_default() += 1;
    }
    response
}

/// One request by external id in progress, counted out when dropped.
struct InProgress(Shared, Option<(String, String, String)>);

impl Drop for InProgress {
    fn drop(&mut self) {
        if let Some(r) = &self.1 {
            let mut org = lock(&self.0);
            if let Some(n) = org.in_progress.get_mut(r) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    org.in_progress.remove(r);
                }
            }
        }
    }
}

/// A data API request that got past authentication, the allocation and the injected
/// request-level faults.
struct Admitted {
    /// The `Sforce-Limit-Info` value to send back.
    limit: String,
    scripted: Option<Scripted>,
    lock_rate: f64,
    lock_roll: f64,
}

impl Admitted {
    /// Whether the (first) record of this request meets a row lock.
    fn lock_error(&self) -> bool {
        self.scripted == Some(Scripted::LockError) || (self.scripted.is_none() && self.lock_roll < self.lock_rate)
    }
}

/// Authentication (which does not count against the allocation), the daily allocation,
/// then the injected server errors and request limits that refuse a whole request.
fn admit(org: &mut Org, headers: &HeaderMap) -> Result<Admitted, Box<Response>> {
    let refuse = |status, code, message, limit| Err(Box::new(rest_error(status, code, message, &[], limit)));
    let bearer = crate::sandbox::common::bearer(headers);
    let lifetime = org.setup.faults.token_lifetime_ms.map(Duration::from_millis);
    let valid = bearer
        .and_then(|t| org.tokens.get(t))
        .is_some_and(|issued| lifetime.is_none_or(|l| issued.elapsed() < l));
    if !valid {
        return refuse(
            StatusCode::UNAUTHORIZED,
            "INVALID_SESSION_ID",
            "Session expired or invalid",
            None,
        );
    }
    let limit_exceeded = "TotalRequests Limit exceeded.";
    if org.stats.api_requests >= org.setup.daily_limit {
        return refuse(
            StatusCode::FORBIDDEN,
            "REQUEST_LIMIT_EXCEEDED",
            limit_exceeded,
            Some(org.limit_info()),
        );
    }
    org.stats.api_requests += 1;
    let limit = org.limit_info();
    let scripted = org.script.pop_front();
    let faults = org.setup.faults.clone();
    let roll_server: f64 = org.rng.gen();
    let lock_roll: f64 = org.rng.gen();
    if scripted == Some(Scripted::ServerError) || (scripted.is_none() && roll_server < faults.server_error_rate) {
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "SERVER_UNAVAILABLE",
            "Server unavailable",
            Some(limit),
        );
    }
    if scripted == Some(Scripted::RequestLimit) {
        return refuse(
            StatusCode::FORBIDDEN,
            "REQUEST_LIMIT_EXCEEDED",
            limit_exceeded,
            Some(limit),
        );
    }
    Ok(Admitted {
        limit,
        scripted,
        lock_rate: faults.lock_error_rate,
        lock_roll,
    })
}

/// The major version of a `vNN.N` path segment.
fn api_major(version: &str) -> Option<u32> {
    version.strip_prefix('v')?.split_once('.')?.0.parse().ok()
}

/// Most records one sObject Collections request may carry.
const COLLECTION_LIMIT: usize = 200;

async fn collection_upsert(
    State(shared): State<Shared>,
    Path((version, sobject, field)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    serve_data(&shared, None, |org| {
        handle_collection(org, &version, &sobject, &field, &headers, &body)
    })
    .await
}

/// `PATCH /composite/sobjects/{SObject}/{ExtIdField}` (v46+): `{"allOrNone": false,
/// "records": [...]}`, at most 200 records of the named type, each carrying its external
/// id; 200 with one result per record, in order, whatever their outcome.
fn handle_collection(
    org: &mut Org,
    version: &str,
    sobject: &str,
    field: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Response {
    let admitted = match admit(org, headers) {
        Ok(a) => a,
        Err(refused) => return *refused,
    };
    let limit = Some(admitted.limit.clone());
    let api_version = api_major(version);
    let declared = org.declares_external_id(sobject, field);
    if api_version.is_none_or(|v| v < 46) || !declared {
        return rest_error(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            "The requested resource does not exist",
            &[],
            limit,
        );
    }
    let parsed: Option<(bool, Vec<Value>)> = serde_json::from_slice::<Value>(body).ok().and_then(|v| {
        let all_or_none = v.get("allOrNone").and_then(Value::as_bool).unwrap_or(false);
        let records = v.get("records")?.as_array()?.clone();
        Some((all_or_none, records))
    });
    let Some((all_or_none, records)) = parsed else {
        return rest_error(
            StatusCode::BAD_REQUEST,
            "JSON_PARSER_ERROR",
            "Expected {\"records\": [...]}",
            &[],
            limit,
        );
    };
    if all_or_none {
        // crm-sync never asks for it; the sandbox does not model the rollback.
        let message = "allOrNone: true is not supported by this sandbox";
        return rest_error(StatusCode::BAD_REQUEST, "INVALID_FIELD", message, &[], limit);
    }
    if records.len() > COLLECTION_LIMIT {
        // UNVERIFIED: the exact error code for more than 200 records.
        let message = format!("Maximum of {COLLECTION_LIMIT} records per request");
        return rest_error(StatusCode::BAD_REQUEST, "EXCEEDED_ID_LIMIT", &message, &[], limit);
    }
    let mut results = Vec::with_capacity(records.len());
    for (i, record) in records.into_iter().enumerate() {
        let failure = |code: &str, message: String, fields: &[String]| {
            json!({"id": null, "success": false, "created": false,
                   "errors": [{"statusCode": code, "message": message, "fields": fields}]})
        };
        let Value::Object(mut fields) = record else {
            results.push(failure("JSON_PARSER_ERROR", "record is not an object".into(), &[]));
            continue;
        };
        let attributes = fields.remove("attributes");
        if attributes.as_ref().and_then(|a| a.get("type")).and_then(Value::as_str) != Some(sobject) {
            results.push(failure(
                "INVALID_TYPE",
                format!("every record must have attributes.type {sobject}"),
                &[],
            ));
            continue;
        }
        let Some(value) = fields.remove(field).and_then(|v| v.as_str().map(str::to_string)) else {
            results.push(failure(
                "MISSING_ARGUMENT",
                format!("{field} not specified"),
                &[field.to_string()],
            ));
            continue;
        };
        // A scripted lock hits the first record; the random rate applies to each record.
        let locked = if i == 0 {
            admitted.lock_error()
        } else {
            admitted.scripted.is_none() && org.rng.gen::<f64>() < admitted.lock_rate
        };
        if locked {
            let message = "unable to obtain exclusive access to this record or 1 records: 003SBX".to_string();
            results.push(failure("UNABLE_TO_LOCK_ROW", message, &[]));
            continue;
        }
        if org.setup.faults.rejected_keys.contains(&value) {
            // A validation rule fails the record in a collection as it does alone.
            results.push(failure(
                "FIELD_CUSTOM_VALIDATION_EXCEPTION",
                "Records of this kind are not accepted for now.".into(),
                &[],
            ));
            continue;
        }
        let matches = org
            .index
            .get(&(sobject.to_string(), field.to_string(), value.clone()))
            .cloned()
            .unwrap_or_default();
        if matches.len() > 1 {
            // UNVERIFIED: the per-record code for an external id matching several records.
            let message = format!("{field}: more than one record found for external id field: {matches:?}");
            results.push(failure("DUPLICATE_EXTERNAL_ID", message, &[field.to_string()]));
            continue;
        }
        match org.apply_upsert(sobject, field, &value, fields, matches.first()) {
            Ok((id, created)) => results.push(json!({"id": id, "success": true, "errors": [], "created": created})),
            Err(e) => results.push(failure(e.code, e.message, &e.fields)),
        }
    }
    with_limit((StatusCode::OK, Json(Value::Array(results))).into_response(), limit)
}

#[allow(clippy::too_many_arguments)]
fn handle_record(
    org: &mut Org,
    method: &Method,
    version: &str,
    sobject: &str,
    field: &str,
    value: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Response {
    let admitted = match admit(org, headers) {
        Ok(a) => a,
        Err(refused) => return *refused,
    };
    let limit = Some(admitted.limit.clone());
    if admitted.lock_error() {
        let message = "unable to obtain exclusive access to this record or 1 records: 003SBX";
        return rest_error(StatusCode::BAD_REQUEST, "UNABLE_TO_LOCK_ROW", message, &[], limit);
    }
    if org.setup.faults.rejected_keys.iter().any(|k| k == value) {
        return rest_error(
            StatusCode::BAD_REQUEST,
            "FIELD_CUSTOM_VALIDATION_EXCEPTION",
            "Records of this kind are not accepted for now.",
            &[],
            limit,
        );
    }
    if org.setup.faults.failing_keys.iter().any(|k| k == value) {
        return rest_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "UNKNOWN_EXCEPTION",
            "An unexpected error occurred. Please include this ErrorId if you contact support.",
            &[],
            limit,
        );
    }
    let Some(api_version) = api_major(version) else {
        return rest_error(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            "The requested resource does not exist",
            &[],
            limit,
        );
    };
    let declared = org.declares_external_id(sobject, field);
    if !declared {
        return rest_error(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            "The requested resource does not exist",
            &[],
            limit,
        );
    }
    let matches = org
        .index
        .get(&(sobject.to_string(), field.to_string(), value.to_string()))
        .cloned()
        .unwrap_or_default();
    if matches.len() > 1 {
        let urls: Vec<String> = matches
            .iter()
            .map(|id| format!("/services/data/{version}/sobjects/{sobject}/{id}"))
            .collect();
        return with_limit((StatusCode::MULTIPLE_CHOICES, Json(json!(urls))).into_response(), limit);
    }
    if method == Method::DELETE {
        return match matches.first() {
            None => rest_error(
                StatusCode::NOT_FOUND,
                "NOT_FOUND",
                "The requested resource does not exist",
                &[],
                limit,
            ),
            Some(id) => {
                let id = id.clone();
                org.remove(&id);
                org.stats.deletes_applied += 1;
                with_limit(StatusCode::NO_CONTENT.into_response(), limit)
            }
        };
    }
    let fields: Map<String, Value> = match serde_json::from_slice(body) {
        Ok(Value::Object(m)) => m,
        _ => {
            return rest_error(
                StatusCode::BAD_REQUEST,
                "JSON_PARSER_ERROR",
                "The request body must be a JSON object",
                &[],
                limit,
            )
        }
    };
    if fields.contains_key(field) {
        let message = format!("The external id field {field} may not be set in the body of an upsert by it");
        return rest_error(
            StatusCode::BAD_REQUEST,
            "INVALID_FIELD",
            &message,
            &[field.to_string()],
            limit,
        );
    }
    match org.apply_upsert(sobject, field, value, fields, matches.first()) {
        Err(e) => rest_error(StatusCode::BAD_REQUEST, e.code, &e.message, &e.fields, limit),
        Ok((id, true)) => {
            let mut body = json!({"id": id, "success": true, "errors": []});
            if api_version >= 46 {
                body["created"] = Value::Bool(true);
            }
            with_limit((StatusCode::CREATED, Json(body)).into_response(), limit)
        }
        Ok((id, false)) if api_version >= 46 => {
            let body = json!({"id": id, "success": true, "errors": [], "created": false});
            with_limit((StatusCode::OK, Json(body)).into_response(), limit)
        }
        Ok(_) => with_limit(StatusCode::NO_CONTENT.into_response(), limit),
    }
}

fn with_limit(mut response: Response, limit: Option<String>) -> Response {
    if let Some(l) = limit.and_then(|l| HeaderValue::from_str(&l).ok()) {
        response.headers_mut().insert("sforce-limit-info", l);
    }
    response
}

impl AdminState for Org {
    type Script = Scripted;

    fn stats(&self) -> Stats {
        self.stats.clone()
    }

    fn set_faults(&mut self, faults: Faults) {
        self.rng = StdRng::seed_from_u64(faults.seed);
        self.setup.faults = faults;
    }

    fn expire_tokens(&mut self) {
        self.tokens.clear();
    }

    fn script(&mut self, answers: Vec<Scripted>) {
        self.script.extend(answers);
    }

    fn records_json(&self) -> Value {
        let mut all: Vec<&StoredRecord> = self.records.values().collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        serde_json::to_value(all).unwrap_or_default()
    }
}
