//! Salesforce sandbox: the REST subset crm-sync uses, from the documentation
//! (`shared/crm-apis.md` §1 and its checklist in §5).
//!
//! - `POST /services/oauth2/token`: client-credentials grant (form body or Basic header);
//!   refused on a login/test host with "request not supported on this domain". No
//!   `expires_in`; tokens die after the configured lifetime or on demand, and then get
//!   401 `INVALID_SESSION_ID` "Session expired or invalid".
//! - `PATCH|DELETE /services/data/vNN.N/sobjects/{SObject}/{Field}/{value}`: upsert or
//!   delete by external id. 201 created; 200 with `created:false` from v46 (204 before);
//!   300 with a list of record URLs when several records match; 404 `NOT_FOUND` for an
//!   unknown object, field or (on delete) record; 400 `REQUIRED_FIELD_MISSING`.
//! - Every API answer carries `Sforce-Limit-Info: api-usage=N/M`; past the daily
//!   allocation, 403 `REQUEST_LIMIT_EXCEEDED`.
//! - Faults: latency, a rate of 5xx, a rate of `UNABLE_TO_LOCK_ROW`, scripted answers for
//!   the next requests, token lifetime, expiring all tokens.
//! - `/__sandbox/records`, `/__sandbox/stats` (GET) and `/__sandbox/faults`,
//!   `/__sandbox/expire-tokens`, `/__sandbox/script` (POST) for people and scripts; the
//!   same through [`SalesforceSandbox`] methods in-process.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
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
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

/// How the sandbox org is set up.
#[derive(Debug, Clone)]
pub struct SandboxOrg {
    pub client_id: String,
    pub client_secret: String,
    /// sObject → external id fields it declares.
    pub external_ids: HashMap<String, Vec<String>>,
    /// sObject → fields that must be set on create and may not be nulled.
    pub required: HashMap<String, Vec<String>>,
    /// Daily API allocation (requests to `/services/data`).
    pub daily_limit: u64,
    pub faults: Faults,
}

impl SandboxOrg {
    /// An org with `Contact` and `Account`, each with an `External_Id__c` external id;
    /// `Contact.LastName` and `Account.Name` required, as in a real org.
    pub fn standard(client_id: &str, client_secret: &str) -> Self {
        SandboxOrg {
            client_id: client_id.into(),
            client_secret: client_secret.into(),
            external_ids: [
                ("Contact".to_string(), vec!["External_Id__c".to_string()]),
                ("Account".to_string(), vec!["External_Id__c".to_string()]),
            ]
            .into(),
            required: [
                ("Contact".to_string(), vec!["LastName".to_string()]),
                ("Account".to_string(), vec!["Name".to_string()]),
            ]
            .into(),
            daily_limit: 1_000_000_000,
            faults: Faults::default(),
        }
    }
}

/// Injectable faults. Rates are probabilities per API request.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    pub latency_ms: u64,
    pub server_error_rate: f64,
    pub lock_error_rate: f64,
    /// Tokens stop working this long after they were issued; `None`: never.
    pub token_lifetime_ms: Option<u64>,
    pub seed: u64,
}

/// A scripted answer for one of the next API requests, taken in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scripted {
    ServerError,
    LockError,
    RequestLimit,
}

/// What the sandbox received.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Stats {
    pub token_requests: u64,
    /// Requests to `/services/data` (what counts against the API allocation).
    pub api_requests: u64,
    pub upserts_applied: u64,
    pub deletes_applied: u64,
    /// Answers other than 2xx, by status.
    pub rejected: BTreeMap<u16, u64>,
}

/// One stored record.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StoredRecord {
    pub id: String,
    pub sobject: String,
    pub fields: Map<String, Value>,
}

struct Org {
    setup: SandboxOrg,
    base_url: String,
    records: HashMap<String, StoredRecord>,
    /// (sObject, field, value) → record ids: a list, so several matches can be answered
    /// with 300 as the real API does.
    index: HashMap<(String, String, String), Vec<String>>,
    tokens: HashMap<String, Instant>,
    script: VecDeque<Scripted>,
    stats: Stats,
    next_id: u64,
    rng: StdRng,
}

type Shared = Arc<Mutex<Org>>;

fn lock(org: &Shared) -> std::sync::MutexGuard<'_, Org> {
    // A panic while holding the lock cannot leave the maps half-updated in a way that
    // matters for a simulator; keep serving.
    org.lock().unwrap_or_else(|p| p.into_inner())
}

/// A running sandbox; stops when dropped.
pub struct SalesforceSandbox {
    addr: SocketAddr,
    org: Shared,
    /// Dropping it stops the server thread.
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl SalesforceSandbox {
    /// Starts the sandbox on `bind` (e.g. `127.0.0.1:0`) on its own thread.
    pub fn start(bind: &str, setup: SandboxOrg) -> std::io::Result<Self> {
        let listener = std::net::TcpListener::bind(bind)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let seed = setup.faults.seed;
        let org = Arc::new(Mutex::new(Org {
            setup,
            base_url: format!("http://{addr}"),
            records: HashMap::new(),
            index: HashMap::new(),
            tokens: HashMap::new(),
            script: VecDeque::new(),
            stats: Stats::default(),
            next_id: 1,
            rng: StdRng::seed_from_u64(seed),
        }));
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let app = router(org.clone());
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("salesforce-sandbox")
            .enable_all()
            .build()?;
        std::thread::Builder::new()
            .name("salesforce-sandbox".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::error!(error = %e, "Salesforce sandbox could not listen.");
                            return;
                        }
                    };
                    let server = axum::serve(listener, app).with_graceful_shutdown(async {
                        let _ = stop_rx.await;
                    });
                    if let Err(e) = server.await {
                        tracing::error!(error = %e, "Salesforce sandbox stopped.");
                    }
                });
            })?;
        Ok(SalesforceSandbox {
            addr,
            org,
            _stop: stop_tx,
        })
    }

    /// The My Domain URL to configure (`base_url`).
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn records(&self, sobject: &str) -> Vec<StoredRecord> {
        let org = lock(&self.org);
        let mut out: Vec<StoredRecord> = org.records.values().filter(|r| r.sobject == sobject).cloned().collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// The record of `sobject` whose `field` is `value`, if exactly one.
    pub fn find(&self, sobject: &str, field: &str, value: &str) -> Option<StoredRecord> {
        let org = lock(&self.org);
        match org
            .index
            .get(&(sobject.into(), field.into(), value.into()))
            .map(Vec::as_slice)
        {
            Some([id]) => org.records.get(id).cloned(),
            _ => None,
        }
    }

    pub fn stats(&self) -> Stats {
        lock(&self.org).stats.clone()
    }

    pub fn set_faults(&self, faults: Faults) {
        let mut org = lock(&self.org);
        org.rng = StdRng::seed_from_u64(faults.seed);
        org.setup.faults = faults;
    }

    pub fn set_daily_limit(&self, limit: u64) {
        lock(&self.org).setup.daily_limit = limit;
    }

    /// Answers the next API requests with these faults, in order.
    pub fn script(&self, faults: impl IntoIterator<Item = Scripted>) {
        lock(&self.org).script.extend(faults);
    }

    /// Makes every issued token invalid (as a session timeout would).
    pub fn expire_tokens(&self) {
        lock(&self.org).tokens.clear();
    }

    /// Stores a record directly, bypassing the API (e.g. a second record with the same
    /// external id, which a non-unique External ID field allows).
    pub fn seed_record(&self, sobject: &str, fields: Map<String, Value>) -> String {
        let mut org = lock(&self.org);
        org.insert(sobject, fields)
    }
}

impl Org {
    fn insert(&mut self, sobject: &str, fields: Map<String, Value>) -> String {
        let prefix = if sobject == "Account" { "001" } else { "003" };
        let id = format!("{prefix}SBX{:012}", self.next_id);
        self.next_id += 1;
        let ext_fields = self.setup.external_ids.get(sobject).cloned().unwrap_or_default();
        for field in ext_fields {
            if let Some(v) = fields.get(&field).and_then(value_text) {
                self.index
                    .entry((sobject.to_string(), field, v))
                    .or_default()
                    .push(id.clone());
            }
        }
        self.records.insert(
            id.clone(),
            StoredRecord {
                id: id.clone(),
                sobject: sobject.to_string(),
                fields,
            },
        );
        id
    }

    fn remove(&mut self, id: &str) {
        if let Some(record) = self.records.remove(id) {
            self.index.retain(|_, ids| {
                ids.retain(|i| i != id);
                !ids.is_empty()
            });
            drop(record);
        }
    }

    fn limit_info(&self) -> String {
        format!("api-usage={}/{}", self.stats.api_requests, self.setup.daily_limit)
    }
}

fn value_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn router(org: Shared) -> Router {
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

/// Keys of records present, for quick set comparisons in tests and the demo.
pub fn external_ids(records: &[StoredRecord], field: &str) -> HashSet<String> {
    records
        .iter()
        .filter_map(|r| r.fields.get(field).and_then(value_text))
        .collect()
}
