//! The sandbox's HTTP API: the token endpoint, upsert/delete by external id, and the
//! `/__sandbox` admin endpoints.

use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::org::{lock, Org, Shared};
use super::{Faults, Scripted, Stats, StoredRecord};

pub(super) fn router(org: Shared) -> Router {
    Router::new()
        .route("/services/oauth2/token", post(token))
        .route(
            "/services/data/{version}/sobjects/{sobject}/{field}/{value}",
            axum::routing::patch(by_external_id).delete(by_external_id),
        )
        .route("/__sandbox/records", get(admin_records))
        .route("/__sandbox/stats", get(admin_stats))
        .route("/__sandbox/faults", post(admin_faults))
        .route("/__sandbox/expire-tokens", post(admin_expire))
        .route("/__sandbox/script", post(admin_script))
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

#[derive(Deserialize)]
struct TokenForm {
    grant_type: Option<String>,
    client_id: Option<String>,
    client_secret: Option<String>,
}

async fn token(State(org): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let form: TokenForm = match serde_urlencoded_from(&body) {
        Some(f) => f,
        None => return token_error("invalid_request", "malformed form body"),
    };
    let mut org = lock(&org);
    org.stats.token_requests += 1;
    let host = headers.get("host").and_then(|h| h.to_str().ok()).unwrap_or_default();
    if host.starts_with("login.salesforce.com") || host.starts_with("test.salesforce.com") {
        return token_error("invalid_grant", "request not supported on this domain");
    }
    if form.grant_type.as_deref() != Some("client_credentials") {
        return token_error("unsupported_grant_type", "grant type not supported");
    }
    let (id, secret) = match (form.client_id, form.client_secret) {
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

fn serde_urlencoded_from(body: &[u8]) -> Option<TokenForm> {
    let mut form = TokenForm {
        grant_type: None,
        client_id: None,
        client_secret: None,
    };
    let text = std::str::from_utf8(body).ok()?;
    for pair in text.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_encoding::percent_decode_str(&v.replace('+', " "))
            .decode_utf8()
            .ok()?
            .into_owned();
        match k {
            "grant_type" => form.grant_type = Some(v),
            "client_id" => form.client_id = Some(v),
            "client_secret" => form.client_secret = Some(v),
            _ => {}
        }
    }
    Some(form)
}

fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get("authorization")?.to_str().ok()?.strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD.decode(value).ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (id, secret) = text.split_once(':')?;
    Some((id.to_string(), secret.to_string()))
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
    let latency = lock(&shared).setup.faults.latency_ms;
    if latency > 0 {
        tokio::time::sleep(Duration::from_millis(latency)).await;
    }
    let mut org = lock(&shared);
    let response = handle_record(&mut org, &method, &version, &sobject, &field, &value, &headers, &body);
    let status = response.status().as_u16();
    if !(200..300).contains(&status) {
        *org.stats.rejected.entry(status).or_default() += 1;
    }
    response
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
    // Authentication comes first and does not count against the allocation.
    let bearer = headers
        .get("authorization")
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "));
    let lifetime = org.setup.faults.token_lifetime_ms.map(Duration::from_millis);
    let valid = bearer
        .and_then(|t| org.tokens.get(t))
        .is_some_and(|issued| lifetime.is_none_or(|l| issued.elapsed() < l));
    if !valid {
        return rest_error(
            StatusCode::UNAUTHORIZED,
            "INVALID_SESSION_ID",
            "Session expired or invalid",
            &[],
            None,
        );
    }
    if org.stats.api_requests >= org.setup.daily_limit {
        let limit = Some(org.limit_info());
        return rest_error(
            StatusCode::FORBIDDEN,
            "REQUEST_LIMIT_EXCEEDED",
            "TotalRequests Limit exceeded.",
            &[],
            limit,
        );
    }
    org.stats.api_requests += 1;
    let limit = Some(org.limit_info());
    let scripted = org.script.pop_front();
    let faults = org.setup.faults.clone();
    let roll_server: f64 = org.rng.gen();
    let roll_lock: f64 = org.rng.gen();
    if scripted == Some(Scripted::ServerError) || (scripted.is_none() && roll_server < faults.server_error_rate) {
        return rest_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "SERVER_UNAVAILABLE",
            "Server unavailable",
            &[],
            limit,
        );
    }
    if scripted == Some(Scripted::RequestLimit) {
        return rest_error(
            StatusCode::FORBIDDEN,
            "REQUEST_LIMIT_EXCEEDED",
            "TotalRequests Limit exceeded.",
            &[],
            limit,
        );
    }
    if scripted == Some(Scripted::LockError) || (scripted.is_none() && roll_lock < faults.lock_error_rate) {
        let message = "unable to obtain exclusive access to this record or 1 records: 003SBX";
        return rest_error(StatusCode::BAD_REQUEST, "UNABLE_TO_LOCK_ROW", message, &[], limit);
    }
    let Some(api_version) = version
        .strip_prefix('v')
        .and_then(|v| v.split_once('.'))
        .and_then(|(major, _)| major.parse::<u32>().ok())
    else {
        return rest_error(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            "The requested resource does not exist",
            &[],
            limit,
        );
    };
    let declared = org
        .setup
        .external_ids
        .get(sobject)
        .is_some_and(|f| f.iter().any(|f| f == field));
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
    let required = org.setup.required.get(sobject).cloned().unwrap_or_default();
    let existing = matches
        .first()
        .and_then(|id| org.records.get(id))
        .map(|r| r.fields.clone());
    let missing: Vec<String> = required
        .iter()
        .filter(|f| {
            let new = fields.get(*f);
            let old = existing.as_ref().and_then(|e| e.get(*f));
            match new {
                Some(Value::Null) => true,
                Some(_) => false,
                None => old.is_none_or(Value::is_null),
            }
        })
        .cloned()
        .collect();
    if !missing.is_empty() {
        let message = format!("Required fields are missing: [{}]", missing.join(", "));
        return rest_error(
            StatusCode::BAD_REQUEST,
            "REQUIRED_FIELD_MISSING",
            &message,
            &missing,
            limit,
        );
    }
    org.stats.upserts_applied += 1;
    match matches.first() {
        None => {
            let mut all = fields;
            all.insert(field.to_string(), Value::String(value.to_string()));
            let id = org.insert(sobject, all);
            let mut body = json!({"id": id, "success": true, "errors": []});
            if api_version >= 46 {
                body["created"] = Value::Bool(true);
            }
            with_limit((StatusCode::CREATED, Json(body)).into_response(), limit)
        }
        Some(id) => {
            let id = id.clone();
            if let Some(record) = org.records.get_mut(&id) {
                for (k, v) in fields {
                    record.fields.insert(k, v);
                }
            }
            if api_version >= 46 {
                let body = json!({"id": id, "success": true, "errors": [], "created": false});
                with_limit((StatusCode::OK, Json(body)).into_response(), limit)
            } else {
                with_limit(StatusCode::NO_CONTENT.into_response(), limit)
            }
        }
    }
}

fn with_limit(mut response: Response, limit: Option<String>) -> Response {
    if let Some(l) = limit.and_then(|l| HeaderValue::from_str(&l).ok()) {
        response.headers_mut().insert("sforce-limit-info", l);
    }
    response
}

async fn admin_records(State(org): State<Shared>) -> Json<Vec<StoredRecord>> {
    let org = lock(&org);
    let mut all: Vec<StoredRecord> = org.records.values().cloned().collect();
    all.sort_by(|a, b| a.id.cmp(&b.id));
    Json(all)
}

async fn admin_stats(State(org): State<Shared>) -> Json<Stats> {
    Json(lock(&org).stats.clone())
}

async fn admin_faults(State(org): State<Shared>, Json(faults): Json<Faults>) -> StatusCode {
    let mut org = lock(&org);
    org.rng = StdRng::seed_from_u64(faults.seed);
    org.setup.faults = faults;
    StatusCode::NO_CONTENT
}

async fn admin_expire(State(org): State<Shared>) -> StatusCode {
    lock(&org).tokens.clear();
    StatusCode::NO_CONTENT
}

async fn admin_script(State(org): State<Shared>, Json(script): Json<Vec<Scripted>>) -> StatusCode {
    lock(&org).script.extend(script);
    StatusCode::NO_CONTENT
}
