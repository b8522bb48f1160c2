//! Dynamics 365 (Dataverse) sandbox: the Web API subset crm-sync uses, from the
//! documentation (`docs/crm-apis.md` §3 and its checklist in §5).
//!
//! - `POST /{directory}/oauth2/v2.0/token`: Entra ID client credentials (form body,
//!   `scope` must be `{this URL}/.default`); `{"token_type":"Bearer","expires_in",
//!   "access_token"}`, or 400/401 `{"error","error_description","error_codes"}`. A missing,
//!   unknown or expired token gets 401 with `WWW-Authenticate: Bearer ...`.
//! - `PATCH /api/data/v9.2/{set}({column}='{value}')`: upsert by alternate key, 204 with
//!   `OData-EntityId`; `If-Match: *` (update only) → 404 when missing; `If-None-Match: *`
//!   (create only) → 412 when present; `Prefer: return=representation` → 201 or 200 with
//!   `@odata.etag`. Only declared alternate keys are accepted (400 otherwise). Key columns
//!   in the body are dropped on update and win on create. A string longer than the column
//!   limit → 400 `0x80044331`. `DELETE` on the same URL → 204, or 404 `0x80060891`.
//! - `POST /api/data/v9.2/$batch`: `multipart/mixed` parts read as RFC 2046 frames them
//!   (the CRLF before a delimiter is the delimiter's; a part whose request never ends its
//!   header block → 400 `0x80048d19`), change sets one level deep
//!   (atomic, with `Content-ID` references `$n`), answered in order as
//!   `batchresponse_`/`changesetresponse_` parts; processing stops at the first failure
//!   (whose status becomes the top-level one) unless `Prefer: odata.continue-on-error`.
//! - Service protection per application user: requests in a 300 s window and concurrent
//!   requests; past either, 429 with `Retry-After` and `0x80072322` / `0x80072326`. Every
//!   answer carries `x-ms-ratelimit-burst-remaining-xrm-requests` and
//!   `x-ms-ratelimit-time-remaining-xrm-requests`.
//! - Faults: latency, a rate of 503s, scripted 503s, 429s and whole-request 400s, token
//!   lifetime, expiring all tokens. `/__sandbox/records`, `/__sandbox/stats` (GET), `/__sandbox/faults`,
//!   `/__sandbox/expire-tokens`, `/__sandbox/script` (POST).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, post};
use axum::{Json, Router};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::common::{
    admin_routes, bearer, data_view, delay, form_fields, lock, serve, AdminState, CrmSandbox, Faults, Stats,
};

/// How the sandbox environment is set up.
#[derive(Debug, Clone)]
pub struct DynamicsSetup {
    pub directory_id: String,
    pub client_id: String,
    pub client_secret: String,
    /// Entity set → the column of its alternate key.
    pub alternate_keys: HashMap<String, String>,
    /// Longest string a column takes.
    pub max_string_length: usize,
    /// Requests per application user in a 300 s window (documented default 6000).
    pub request_limit: u64,
    /// Concurrent requests per application user (documented default 52).
    pub concurrency_limit: u64,
    /// `expires_in` of issued tokens.
    pub token_expires_in_secs: u64,
    pub faults: Faults,
}

impl DynamicsSetup {
    /// `contacts` keyed by `crm_externalid`, `accounts` by `accountnumber`; limits high
    /// enough not to get in the way unless a test lowers them.
    pub fn standard(client_id: &str, client_secret: &str) -> Self {
        DynamicsSetup {
            directory_id: "sandbox.onmicrosoft.com".into(),
            client_id: client_id.into(),
            client_secret: client_secret.into(),
            alternate_keys: [
                ("contacts".to_string(), "crm_externalid".to_string()),
                ("accounts".to_string(), "accountnumber".to_string()),
            ]
            .into(),
            max_string_length: 100,
            request_limit: 1_000_000_000,
            concurrency_limit: 52,
            token_expires_in_secs: 3599,
            faults: Faults::default(),
        }
    }
}

/// A scripted answer for one of the next API requests, taken in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scripted {
    ServerError,
    /// 429 `0x80072322` (request count).
    TooManyRequests,
    /// 400 `0x80048d19` for the request as a whole (for a `$batch`: no part is run).
    BadRequest,
}

const WINDOW: Duration = Duration::from_secs(300);
const EXECUTION_LIMIT_MS: u64 = 1_200_000;
const API_PREFIX: &str = "/api/data/v9.2/";

struct Environment {
    setup: DynamicsSetup,
    base_url: String,
    /// entity set → key value → columns.
    records: HashMap<String, BTreeMap<String, Map<String, Value>>>,
    tokens: HashMap<String, Instant>,
    window_start: Instant,
    window_count: u64,
    window_execution_ms: u64,
    in_flight: u64,
    script: VecDeque<Scripted>,
    stats: Stats,
    rng: StdRng,
}

type Shared = Arc<Mutex<Environment>>;

/// A running sandbox; stops when dropped.
pub struct DynamicsSandbox {
    addr: SocketAddr,
    env: Shared,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl DynamicsSandbox {
    pub fn start(bind: &str, setup: DynamicsSetup) -> std::io::Result<Self> {
        let seed = setup.faults.seed;
        let env = Arc::new(Mutex::new(Environment {
            setup,
            base_url: String::new(),
            records: HashMap::new(),
            tokens: HashMap::new(),
            window_start: Instant::now(),
            window_count: 0,
            window_execution_ms: 0,
            in_flight: 0,
            script: VecDeque::new(),
            stats: Stats::default(),
            rng: StdRng::seed_from_u64(seed),
        }));
        let app = Router::new()
            .route("/{directory}/oauth2/v2.0/token", post(token))
            .route("/api/data/{*path}", any(api))
            .merge(admin_routes())
            .with_state(env.clone());
        let (addr, stop) = serve(bind, "dynamics-sandbox", app)?;
        lock(&env).base_url = format!("http://{addr}");
        Ok(DynamicsSandbox { addr, env, _stop: stop })
    }

    /// The environment URL (`org_url`) and Entra authority (`authority_url`) to configure.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The record of `set` whose alternate key is `key`.
    pub fn find(&self, set: &str, key: &str) -> Option<Map<String, Value>> {
        lock(&self.env).records.get(set)?.get(key).cloned()
    }

    pub fn records(&self, set: &str) -> Vec<Map<String, Value>> {
        lock(&self.env)
            .records
            .get(set)
            .map(|r| r.values().cloned().collect())
            .unwrap_or_default()
    }

    pub fn stats(&self) -> Stats {
        lock(&self.env).stats.clone()
    }

    pub fn set_faults(&self, faults: Faults) {
        lock(&self.env).set_faults(faults);
    }

    pub fn set_limits(&self, request_limit: u64, concurrency_limit: u64) {
        let mut env = lock(&self.env);
        env.setup.request_limit = request_limit;
        env.setup.concurrency_limit = concurrency_limit;
    }

    pub fn script(&self, answers: impl IntoIterator<Item = Scripted>) {
        lock(&self.env).script.extend(answers);
    }

    pub fn expire_tokens(&self) {
        lock(&self.env).expire_tokens();
    }
}

fn odata_error(status: StatusCode, code: &str, message: &str) -> Response {
    (status, Json(json!({"error": {"code": code, "message": message}}))).into_response()
}

fn entity_of(set: &str) -> &str {
    set.strip_suffix('s').unwrap_or(set)
}

async fn token(State(env): State<Shared>, Path(directory): Path<String>, body: Bytes) -> Response {
    let mut env = lock(&env);
    env.stats.token_requests += 1;
    let entra_error = |status: StatusCode, error: &str, code: u32, text: &str| {
        (
            status,
            Json(
                json!({"error": error, "error_description": format!("AADSTS{code}: {text}"), "error_codes": [code],
                        "timestamp": "2026-01-01 00:00:00Z", "trace_id": "00000000-0000-0000-0000-000000000000",
                        "correlation_id": "00000000-0000-0000-0000-000000000000"}),
            ),
        )
            .into_response()
    };
    if directory != env.setup.directory_id {
        return entra_error(StatusCode::BAD_REQUEST, "invalid_request", 90002, "Tenant not found.");
    }
    let Some(form) = form_fields(&body) else {
        return entra_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            900144,
            "The request body must contain the following parameter: 'grant_type'.",
        );
    };
    if form.get("grant_type").map(String::as_str) != Some("client_credentials") {
        return entra_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            70003,
            "The app requested an unsupported grant type.",
        );
    }
    if form.get("client_id") != Some(&env.setup.client_id) {
        return entra_error(
            StatusCode::BAD_REQUEST,
            "unauthorized_client",
            700016,
            "Application with identifier was not found in the directory.",
        );
    }
    if form.get("client_secret") != Some(&env.setup.client_secret) {
        return entra_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            7000215,
            "Invalid client secret provided.",
        );
    }
    let scope = format!("{}/.default", env.base_url);
    if form.get("scope") != Some(&scope) {
        return entra_error(
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            70011,
            "The provided value for the input parameter 'scope' is not valid.",
        );
    }
    let access_token = format!("eyJ0eXAiOiJKV1QiLCJzYW5kYm94Ijp0cnVlfQ.{:032x}", env.rng.gen::<u128>());
    env.tokens.insert(access_token.clone(), Instant::now());
    Json(
        json!({"token_type": "Bearer", "expires_in": env.setup.token_expires_in_secs,
                "ext_expires_in": env.setup.token_expires_in_secs, "access_token": access_token}),
    )
    .into_response()
}

/// What admission decided for one request.
enum Admission {
    Refused(Response),
    Admitted,
}

/// Every data request: authentication, service protection, injected faults, latency,
/// then the endpoint; the rate-limit headers on every answer.
async fn api(
    State(shared): State<Shared>,
    method: Method,
    Path(path): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (admission, latency) = {
        let mut env = lock(&shared);
        (admit(&mut env, &headers), env.setup.faults.latency_ms)
    };
    let admitted = matches!(admission, Admission::Admitted);
    let mut response = match admission {
        Admission::Refused(r) => r,
        Admission::Admitted => {
            delay(latency).await;
            let mut env = lock(&shared);
            env.window_execution_ms += latency;
            route(&mut env, &method, &format!("/api/data/{path}"), &headers, &body)
        }
    };
    let mut env = lock(&shared);
    if admitted {
        env.in_flight -= 1;
    }
    let remaining = env.setup.request_limit.saturating_sub(env.window_count);
    let time_remaining = EXECUTION_LIMIT_MS.saturating_sub(env.window_execution_ms);
    response.headers_mut().insert(
        "x-ms-ratelimit-burst-remaining-xrm-requests",
        HeaderValue::from(remaining),
    );
    response.headers_mut().insert(
        "x-ms-ratelimit-time-remaining-xrm-requests",
        HeaderValue::from(time_remaining),
    );
    response
        .headers_mut()
        .insert("odata-version", HeaderValue::from_static("4.0"));
    let status = response.status().as_u16();
    if !(200..300).contains(&status) {
        *env.stats.rejected.entry(status).or_default() += 1;
    }
    response
}

fn admit(env: &mut Environment, headers: &HeaderMap) -> Admission {
    let lifetime = env
        .setup
        .faults
        .token_lifetime()
        .unwrap_or(Duration::from_secs(env.setup.token_expires_in_secs));
    let valid = bearer(headers)
        .and_then(|t| env.tokens.get(t))
        .is_some_and(|issued| issued.elapsed() < lifetime);
    if !valid {
        let mut r = StatusCode::UNAUTHORIZED.into_response();
        let challenge = format!(
            "Bearer authorization_uri={}/{}/oauth2/authorize, resource_id={}/",
            env.base_url, env.setup.directory_id, env.base_url
        );
        if let Ok(v) = HeaderValue::from_str(&challenge) {
            r.headers_mut().insert("www-authenticate", v);
        }
        return Admission::Refused(r);
    }
    env.stats.api_requests += 1;
    let now = Instant::now();
    if now.duration_since(env.window_start) >= WINDOW {
        env.window_start = now;
        env.window_count = 0;
        env.window_execution_ms = 0;
    }
    let throttle = |retry_after: u64, code: &str, message: String| {
        let mut r = odata_error(StatusCode::TOO_MANY_REQUESTS, code, &message);
        r.headers_mut()
            .insert("retry-after", HeaderValue::from(retry_after.max(1)));
        Admission::Refused(r)
    };
    if env.in_flight >= env.setup.concurrency_limit {
        let limit = env.setup.concurrency_limit;
        return throttle(
            env.setup.faults.retry_after(),
            "0x80072326",
            format!("Number of concurrent requests exceeded the limit of {limit}."),
        );
    }
    if env.window_count >= env.setup.request_limit {
        let reset = WINDOW.saturating_sub(now.duration_since(env.window_start)).as_secs();
        let limit = env.setup.request_limit;
        return throttle(
            reset,
            "0x80072322",
            format!("Number of requests exceeded the limit of {limit} over time window of 300 seconds."),
        );
    }
    env.window_count += 1;
    let scripted = env.script.pop_front();
    let roll: f64 = env.rng.gen();
    match scripted {
        Some(Scripted::TooManyRequests) => {
            let limit = env.setup.request_limit;
            return throttle(
                env.setup.faults.retry_after(),
                "0x80072322",
                format!("Number of requests exceeded the limit of {limit} over time window of 300 seconds."),
            );
        }
        Some(Scripted::ServerError) => {
            return Admission::Refused(odata_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "0x80040216",
                "An unexpected error occurred.",
            ))
        }
        Some(Scripted::BadRequest) => {
            return Admission::Refused(odata_error(
                StatusCode::BAD_REQUEST,
                "0x80048d19",
                "Error identified in Payload provided by the user for Entity :''",
            ))
        }
        None if roll < env.setup.faults.server_error_rate => {
            return Admission::Refused(odata_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "0x80040216",
                "An unexpected error occurred.",
            ))
        }
        None => {}
    }
    env.in_flight += 1;
    Admission::Admitted
}

/// One operation's answer: status, headers, JSON body.
struct OpAnswer {
    status: StatusCode,
    headers: Vec<(String, String)>,
    body: Option<Value>,
}

impl OpAnswer {
    fn error(status: StatusCode, code: &str, message: &str) -> OpAnswer {
        OpAnswer {
            status,
            headers: vec![],
            body: Some(json!({"error": {"code": code, "message": message}})),
        }
    }

    fn into_response(self) -> Response {
        let mut r = match self.body {
            Some(b) => (self.status, Json(b)).into_response(),
            None => self.status.into_response(),
        };
        for (k, v) in self.headers {
            if let (Ok(k), Ok(v)) = (axum::http::HeaderName::try_from(k), HeaderValue::from_str(&v)) {
                r.headers_mut().insert(k, v);
            }
        }
        r
    }

    fn http_text(&self) -> String {
        let reason = self.status.canonical_reason().unwrap_or("");
        let mut out = format!("HTTP/1.1 {} {reason}\r\n", self.status.as_u16());
        if self.body.is_some() {
            out.push_str("Content-Type: application/json; odata.metadata=minimal\r\n");
        }
        out.push_str("OData-Version: 4.0\r\n");
        for (k, v) in &self.headers {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
        out.push_str("\r\n");
        if let Some(b) = &self.body {
            out.push_str(&b.to_string());
        }
        out.push_str("\r\n");
        out
    }
}

fn route(env: &mut Environment, method: &Method, path: &str, headers: &HeaderMap, body: &[u8]) -> Response {
    let Some(rest) = path.strip_prefix(API_PREFIX) else {
        return odata_error(
            StatusCode::NOT_FOUND,
            "0x8006088a",
            &format!("Resource not found for the segment '{path}'."),
        );
    };
    if rest == "$batch" && method == Method::POST {
        return batch(env, headers, body);
    }
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
    record_op(
        env,
        method.as_str(),
        rest,
        &Conditions {
            if_match: header("if-match"),
            if_none_match: header("if-none-match"),
            prefer: header("prefer").unwrap_or_default(),
        },
        body,
    )
    .into_response()
}

struct Conditions {
    if_match: Option<String>,
    if_none_match: Option<String>,
    prefer: String,
}

/// `{set}({column}='{value}')` → (set, column, value); `None` when it is not that shape.
fn parse_key(resource: &str) -> Option<(String, String, String)> {
    let (set, rest) = resource.split_once('(')?;
    let inner = rest.strip_suffix(')')?;
    let (column, literal) = inner.split_once('=')?;
    let value = literal.strip_prefix('\'')?.strip_suffix('\'')?.replace("''", "'");
    Some((set.to_string(), column.trim().to_string(), value))
}

/// One PATCH or DELETE by alternate key.
fn record_op(env: &mut Environment, method: &str, resource: &str, cond: &Conditions, body: &[u8]) -> OpAnswer {
    let decoded = percent_encoding::percent_decode_str(resource)
        .decode_utf8_lossy()
        .into_owned();
    let Some((set, column, value)) = parse_key(&decoded) else {
        return OpAnswer::error(
            StatusCode::BAD_REQUEST,
            "0x80060888",
            &format!("Bad Request - Error in query syntax: '{decoded}'."),
        );
    };
    let Some(declared) = env.setup.alternate_keys.get(&set).cloned() else {
        return OpAnswer::error(
            StatusCode::NOT_FOUND,
            "0x8006088a",
            &format!("Resource not found for the segment '{set}'."),
        );
    };
    let entity = entity_of(&set).to_string();
    if declared != column {
        return OpAnswer::error(
            StatusCode::BAD_REQUEST,
            "0x80060888",
            &format!("The key in the request URI is not valid for resource 'Microsoft.Dynamics.CRM.{entity}'. Ensure that the names and number of key properties match the declared or alternate key properties for the resource 'Microsoft.Dynamics.CRM.{entity}'."),
        );
    }
    let entity_id = format!(
        "{}{API_PREFIX}{set}({column}='{}')",
        env.base_url,
        value.replace('\'', "''")
    );
    let exists = env.records.get(&set).is_some_and(|r| r.contains_key(&value));
    match method {
        "DELETE" => {
            if !exists {
                return OpAnswer::error(
                    StatusCode::NOT_FOUND,
                    "0x80060891",
                    &format!("A record with the specified key values does not exist in {entity} entity"),
                );
            }
            env.records.get_mut(&set).map(|r| r.remove(&value));
            env.stats.deletes_applied += 1;
            OpAnswer {
                status: StatusCode::NO_CONTENT,
                headers: vec![],
                body: None,
            }
        }
        "PATCH" => {
            if cond.if_match.as_deref() == Some("*") && !exists {
                return OpAnswer::error(
                    StatusCode::NOT_FOUND,
                    "0x80060891",
                    &format!("A record with the specified key values does not exist in {entity} entity"),
                );
            }
            if cond.if_none_match.as_deref() == Some("*") && exists {
                return OpAnswer::error(
                    StatusCode::PRECONDITION_FAILED,
                    "0x80040237",
                    "A record with matching key values already exists.",
                );
            }
            let Some(mut columns) = serde_json::from_slice::<Value>(body)
                .ok()
                .and_then(|v| v.as_object().cloned())
            else {
                return OpAnswer::error(
                    StatusCode::BAD_REQUEST,
                    "0x80048d19",
                    "Error identified in Payload provided by the user for Entity :''.",
                );
            };
            let max = env.setup.max_string_length;
            if let Some((name, _)) = columns
                .iter()
                .find(|(_, v)| v.as_str().is_some_and(|s| s.chars().count() > max))
            {
                return OpAnswer::error(
                    StatusCode::BAD_REQUEST,
                    "0x80044331",
                    &format!("The length of the '{name}' attribute of the '{entity}' entity exceeded the maximum allowed length of '{max}'."),
                );
            }
            env.stats.upserts_applied += 1;
            let records = env.records.entry(set.clone()).or_default();
            let created = !exists;
            if exists {
                columns.remove(&column);
                records.get_mut(&value).expect("exists").extend(columns);
            } else {
                // Body values win over the URL's on create; the key is copied in otherwise.
                let key_value = columns
                    .get(&column)
                    .and_then(Value::as_str)
                    .map(str::to_string)
                    .unwrap_or(value.clone());
                columns.insert(column.clone(), Value::String(key_value.clone()));
                records.insert(key_value, columns);
            }
            let stored = records.get(&value).cloned().unwrap_or_default();
            let headers = vec![("OData-EntityId".to_string(), entity_id)];
            if cond.prefer.contains("return=representation") {
                let etag = format!("W/\"{}\"", env.rng.gen::<u32>());
                let mut body = stored;
                body.insert("@odata.etag".into(), json!(etag));
                let mut headers = headers;
                headers.push(("ETag".into(), etag));
                headers.push(("Preference-Applied".into(), "return=representation".into()));
                let status = if created { StatusCode::CREATED } else { StatusCode::OK };
                return OpAnswer {
                    status,
                    headers,
                    body: Some(Value::Object(body)),
                };
            }
            OpAnswer {
                status: StatusCode::NO_CONTENT,
                headers,
                body: None,
            }
        }
        _ => OpAnswer::error(
            StatusCode::METHOD_NOT_ALLOWED,
            "0x80060888",
            &format!("The HTTP method '{method}' is not allowed here."),
        ),
    }
}

/// One part of a `$batch` request.
struct Part {
    content_id: Option<String>,
    method: String,
    url: String,
    headers: HashMap<String, String>,
    body: String,
}

enum Item {
    Single(Part),
    ChangeSet(Vec<Part>),
}

fn boundary_param(content_type: &str) -> Option<String> {
    content_type.split(';').find_map(|p| {
        let (k, v) = p.trim().split_once('=')?;
        k.eq_ignore_ascii_case("boundary")
            .then(|| v.trim_matches('"').to_string())
    })
}

fn header_map(block: &str) -> HashMap<String, String> {
    block
        .split("\r\n")
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect()
}

/// The contents of a multipart body's parts, read as RFC 2046 §5.1.1 has it: a delimiter
/// is `--boundary` at the start of a line, and the CRLF before it belongs to it, not to
/// the part before; a delimiter is followed by optional padding and a CRLF, the close
/// delimiter by `--`. Lenient readers accept a part whose content lost a CRLF to the next
/// delimiter; this one reads the bytes the way a strict parser does.
fn split_parts<'a>(body: &'a str, boundary: &str) -> Result<Vec<&'a str>, String> {
    let dash = format!("--{boundary}");
    let delimiter = format!("\r\n{dash}");
    // The first delimiter may open the body; otherwise a preamble comes before it.
    let mut rest = match body.strip_prefix(dash.as_str()) {
        Some(after) => after,
        None => {
            let at = body.find(&delimiter).ok_or("The batch request has no part.")?;
            &body[at + delimiter.len()..]
        }
    };
    let mut parts = Vec::new();
    loop {
        if rest.starts_with("--") {
            return Ok(parts);
        }
        let line_end = rest.find("\r\n").ok_or("A delimiter line is not ended by CRLF.")?;
        if !rest[..line_end].trim_matches([' ', '\t']).is_empty() {
            return Err("A delimiter line carries more than the boundary.".into());
        }
        let content = &rest[line_end + 2..];
        let end = content.find(&delimiter).ok_or("The batch request is not terminated.")?;
        parts.push(&content[..end]);
        rest = &content[end + delimiter.len()..];
    }
}

/// Splits a part, or an `application/http` message, into its header block and what
/// follows the blank line that ends it; an unterminated header block is refused.
fn split_block<'a>(text: &'a str, what: &str) -> Result<(&'a str, &'a str), String> {
    if let Some(body) = text.strip_prefix("\r\n") {
        return Ok(("", body));
    }
    text.split_once("\r\n\r\n")
        .ok_or_else(|| format!("The {what} has no blank line after its headers."))
}

/// Parses a multipart body into its items (change sets one level deep).
fn parse_multipart(body: &str, boundary: &str, nested: bool) -> Result<Vec<Item>, String> {
    let mut items = Vec::new();
    for raw in split_parts(body, boundary)? {
        let (part_headers, rest) = split_block(raw, "batch part")?;
        let part_headers = header_map(part_headers);
        let content_type = part_headers.get("content-type").cloned().unwrap_or_default();
        if content_type.to_ascii_lowercase().starts_with("multipart/mixed") {
            if nested {
                return Err("Nested change sets are not supported.".into());
            }
            let inner = boundary_param(&content_type).ok_or("A change set has no boundary.")?;
            let parts = parse_multipart(rest, &inner, true)?
                .into_iter()
                .map(|i| match i {
                    Item::Single(p) => p,
                    Item::ChangeSet(_) => unreachable!("nested change sets are refused above"),
                })
                .collect();
            items.push(Item::ChangeSet(parts));
            continue;
        }
        let (head, body) = split_block(rest, "request inside a batch part")?;
        let (request_line, headers) = head.split_once("\r\n").unwrap_or((head, ""));
        let mut words = request_line.split_whitespace();
        let (Some(method), Some(url)) = (words.next(), words.next()) else {
            return Err(format!("Malformed request line: '{request_line}'."));
        };
        items.push(Item::Single(Part {
            content_id: part_headers.get("content-id").cloned(),
            method: method.to_string(),
            url: url.to_string(),
            headers: header_map(headers),
            body: body.to_string(),
        }));
    }
    Ok(items)
}

/// The resource of a part's URL below `/api/data/v9.2/`, absolute or relative.
fn resource_of<'a>(url: &'a str, base_url: &str) -> &'a str {
    let url = url.strip_prefix(base_url).unwrap_or(url);
    url.strip_prefix(API_PREFIX).unwrap_or(url)
}

fn run_part(
    env: &mut Environment,
    part: &Part,
    references: &HashMap<String, String>,
) -> Result<(OpAnswer, Option<String>), OpAnswer> {
    let mut resource = resource_of(&part.url, &env.base_url.clone()).to_string();
    if let Some(reference) = resource.strip_prefix('$') {
        let (id, tail) = reference.split_at(reference.find(|c: char| !c.is_ascii_digit()).unwrap_or(reference.len()));
        let Some(target) = references.get(id) else {
            return Err(OpAnswer::error(
                StatusCode::BAD_REQUEST,
                "0x80060888",
                &format!("Content-ID Reference: '${id}' does not exist in the batch context."),
            ));
        };
        resource = format!("{target}{tail}");
    }
    let cond = Conditions {
        if_match: part.headers.get("if-match").cloned(),
        if_none_match: part.headers.get("if-none-match").cloned(),
        prefer: part.headers.get("prefer").cloned().unwrap_or_default(),
    };
    let answer = record_op(env, &part.method, &resource, &cond, part.body.as_bytes());
    Ok((answer, Some(resource)))
}

fn batch(env: &mut Environment, headers: &HeaderMap, body: &[u8]) -> Response {
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let continue_on_error = headers
        .get("prefer")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|p| p.contains("odata.continue-on-error"));
    let Some(request_boundary) = boundary_param(content_type).filter(|_| content_type.starts_with("multipart/mixed"))
    else {
        return odata_error(
            StatusCode::BAD_REQUEST,
            "0x80048d19",
            "The batch request must be multipart/mixed with a boundary.",
        );
    };
    let items = match parse_multipart(&String::from_utf8_lossy(body), &request_boundary, false) {
        Ok(items) => items,
        Err(message) => return odata_error(StatusCode::BAD_REQUEST, "0x80048d19", &message),
    };
    if items
        .iter()
        .map(|i| if let Item::ChangeSet(p) = i { p.len() } else { 1 })
        .sum::<usize>()
        > 1000
    {
        return odata_error(
            StatusCode::BAD_REQUEST,
            "0x80060888",
            "The number of requests in a batch exceeded the limit of 1000.",
        );
    }
    let response_boundary = format!("batchresponse_{:032x}", env.rng.gen::<u128>());
    let mut out = String::new();
    let mut failed: Option<StatusCode> = None;
    let part_header = "Content-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n";
    for item in items {
        match item {
            Item::Single(part) => {
                let answer = match run_part(env, &part, &HashMap::new()) {
                    Ok((a, _)) | Err(a) => a,
                };
                let ok = answer.status.is_success();
                if !ok && !continue_on_error {
                    // Only the failing operation's answer, with its status on top.
                    out = format!("--{response_boundary}\r\n{part_header}\r\n{}", answer.http_text());
                    failed = Some(answer.status);
                    break;
                }
                out.push_str(&format!(
                    "--{response_boundary}\r\n{part_header}\r\n{}",
                    answer.http_text()
                ));
            }
            Item::ChangeSet(parts) => {
                // Atomic: run on a copy of the records, keep it only if every part succeeds.
                let saved_records = env.records.clone();
                let saved_stats = env.stats.clone();
                let mut references = HashMap::new();
                let mut answers = Vec::new();
                let mut failure = None;
                for part in &parts {
                    match run_part(env, part, &references) {
                        Ok((answer, resource)) if answer.status.is_success() => {
                            if let (Some(id), Some(r)) = (&part.content_id, resource) {
                                references.insert(id.clone(), r);
                            }
                            answers.push((part.content_id.clone(), answer));
                        }
                        Ok((answer, _)) | Err(answer) => {
                            failure = Some((part.content_id.clone(), answer));
                            break;
                        }
                    }
                }
                let inner = format!("changesetresponse_{:032x}", env.rng.gen::<u128>());
                let mut text =
                    format!("--{response_boundary}\r\nContent-Type: multipart/mixed; boundary={inner}\r\n\r\n");
                let shown = match failure {
                    Some(f) => {
                        env.records = saved_records;
                        env.stats = saved_stats;
                        if !continue_on_error {
                            failed = Some(f.1.status);
                        }
                        vec![f]
                    }
                    None => answers,
                };
                for (content_id, answer) in &shown {
                    text.push_str(&format!("--{inner}\r\n{part_header}"));
                    if let Some(id) = content_id {
                        text.push_str(&format!("Content-ID: {id}\r\n"));
                    }
                    text.push_str(&format!("\r\n{}", answer.http_text()));
                }
                text.push_str(&format!("--{inner}--\r\n"));
                if failed.is_some() {
                    out = text;
                    break;
                }
                out.push_str(&text);
            }
        }
    }
    out.push_str(&format!("--{response_boundary}--\r\n"));
    let status = failed.unwrap_or(StatusCode::OK);
    let mut r = (status, out).into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("multipart/mixed; boundary={response_boundary}")) {
        r.headers_mut().insert("content-type", v);
    }
    r
}

impl AdminState for Environment {
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
        let all: Map<String, Value> = self
            .records
            .iter()
            .map(|(set, r)| {
                (
                    set.clone(),
                    Value::Array(r.values().cloned().map(Value::Object).collect()),
                )
            })
            .collect();
        Value::Object(all)
    }
}

const CONTACT_FIELDS: [(&str, &str); 3] = [
    ("firstname", "first_name"),
    ("lastname", "last_name"),
    ("emailaddress1", "email"),
];

impl CrmSandbox for DynamicsSandbox {
    fn crm(&self) -> &'static str {
        "dynamics"
    }

    fn base_url(&self) -> String {
        DynamicsSandbox::base_url(self)
    }

    fn tenant_toml(&self, secret_var: &str) -> String {
        let env = lock(&self.env);
        format!(
            r#"crm = "dynamics"
[tenants.dynamics]
org_url = "{url}"
authority_url = "{url}"
directory_id = "{directory}"
client_id = "{id}"
client_secret = "${{{secret_var}}}"
[tenants.entities.contact]
object = "contacts"
external_id_field = "crm_externalid"
fields = {{ firstname = "first_name", lastname = "last_name", emailaddress1 = "email" }}
"#,
            url = env.base_url,
            directory = env.setup.directory_id,
            id = env.setup.client_id,
        )
    }

    fn secret(&self) -> String {
        lock(&self.env).setup.client_secret.clone()
    }

    fn contact(&self, key: &str) -> Option<Map<String, Value>> {
        self.find("contacts", key).map(|r| data_view(&r, &CONTACT_FIELDS))
    }

    fn record(&self, object: &str, key: &str) -> Option<Map<String, Value>> {
        self.find(object, key)
    }

    /// A last name longer than the column allows: 400 `0x80044331`.
    fn invalid_contact(&self) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("first_name".into(), json!("Long"));
        m.insert(
            "last_name".into(),
            json!("x".repeat(lock(&self.env).setup.max_string_length + 1)),
        );
        m
    }

    fn stats(&self) -> Stats {
        DynamicsSandbox::stats(self)
    }

    fn set_faults(&self, faults: Faults) {
        DynamicsSandbox::set_faults(self, faults)
    }

    fn expire_tokens(&self) {
        DynamicsSandbox::expire_tokens(self)
    }

    fn script_throttles(&self, n: usize) {
        self.script(std::iter::repeat_n(Scripted::TooManyRequests, n))
    }
}
