//! Zendesk sandbox: the Support API subset crm-sync uses, from the documentation
//! (`docs/crm-apis.md` §2 and its checklist in §5).
//!
//! - Auth: API token (`Basic base64("{email}/token:{token}")`) → 401 `{"error":"Couldn't
//!   authenticate you"}` when wrong; OAuth bearer tokens from `POST /oauth/tokens`
//!   (client credentials, JSON body) → 401 `invalid_token` once expired. A token's scopes
//!   (`read`, `write`, `users:write`, ...) bound what it may call: anything else is 403
//!   "Forbidden", the same body as for an account without bulk import.
//! - `POST /api/v2/{users|organizations}/create_or_update`: matched by `external_id`
//!   (ignoring case, and rewriting it to the case sent) or, for users, by `email`; 201
//!   created, 200 updated. Users and organizations need a `name` on create; a user's
//!   `email` must look like one: 422 `RecordInvalid` with `details` otherwise.
//! - `POST /api/v2/users/create_or_update_many` (≤100, 403 unless bulk import is
//!   enabled): a job `V3-<32 hex>` answered `queued`, then `working`, then `completed`
//!   with one result per item (`index`, `id`, `external_id`, `status`
//!   `Created`/`Updated`/`Failed`, `error`, `details`) at `GET /api/v2/job_statuses/{id}`
//!   and, for several jobs, `GET /api/v2/job_statuses/show_many?ids=a,b`. A job's writes
//!   land when it runs, `job_duration_ms` after it was queued, whether or not anyone still
//!   waits for it: jobs cannot be cancelled. Organizations have no bulk upsert:
//!   `organizations/create_or_update_many` is 404 (docs/crm-apis.md §2.4).
//! - Tickets: `GET /api/v2/tickets?external_id=`, `POST /api/v2/tickets` (a `comment` is
//!   required) honouring `Idempotency-Key` (same key and body within 2 h: the first
//!   answer again with `x-idempotency-lookup: hit`; same key, other body: 400
//!   `IdempotentRequestError`), `PUT /api/v2/tickets/{id}`.
//! - `GET /api/v2/{users|organizations}/search?external_id=`, `DELETE /api/v2/{object}/{id}`.
//! - A per-minute account rate limit: every answer carries `X-Rate-Limit`,
//!   `X-Rate-Limit-Remaining`, `ratelimit-*` and `rate-limit-*`; past it, 429 with
//!   `Retry-After`.
//! - Faults: latency, a rate of 503s, scripted 503s, 429s and lost answers (carried out,
//!   then 504), token lifetime, expiring all tokens. `/__sandbox/records`, `/__sandbox/stats` (GET), `/__sandbox/faults`,
//!   `/__sandbox/expire-tokens`, `/__sandbox/script` (POST).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, post};
use axum::{Json, Router};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use super::common::{
    admin_routes, basic_credentials, bearer, data_view, delay, lock, serve, AdminState, CrmSandbox, Faults, Stats,
};

/// How the sandbox account is set up.
#[derive(Debug, Clone)]
pub struct ZendeskSetup {
    /// The agent an API token acts as, and the token.
    pub email: String,
    pub api_token: String,
    /// OAuth client for the client-credentials grant.
    pub client_id: String,
    pub client_secret: String,
    /// Account-wide requests per minute (Enterprise: 700).
    pub rate_limit_per_minute: u64,
    /// Whether `create_or_update_many` is allowed (bulk import enabled).
    pub bulk_enabled: bool,
    /// How long a job takes from queued to completed.
    pub job_duration_ms: u64,
    pub faults: Faults,
}

impl ZendeskSetup {
    /// Agent `sync@example.com`, whose API token is `secret`, and an OAuth client
    /// `client_id` with the same secret; bulk import enabled; no rate limit to speak of.
    pub fn standard(client_id: &str, secret: &str) -> Self {
        ZendeskSetup {
            email: "sync@example.com".into(),
            api_token: secret.into(),
            client_id: client_id.into(),
            client_secret: secret.into(),
            rate_limit_per_minute: 1_000_000,
            bulk_enabled: true,
            job_duration_ms: 0,
            faults: Faults::default(),
        }
    }
}

/// A scripted answer for one of the next API requests, taken in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scripted {
    ServerError,
    TooManyRequests,
    /// The request is carried out, but the answer is lost on the way (504).
    LostResponse,
}

const OBJECTS: [&str; 3] = ["users", "organizations", "tickets"];
const BULK_LIMIT: usize = 100;
const IDEMPOTENCY_TTL: Duration = Duration::from_secs(2 * 3600);
const WINDOW: Duration = Duration::from_secs(60);
const JOB_RETENTION: Duration = Duration::from_secs(24 * 3600);

struct Job {
    created: Instant,
    /// How long this job takes, from the setup when it was queued.
    duration: Duration,
    total: usize,
    /// Each item's result, once the job has run: its writes land then, not when it is
    /// queued, so a job can land after a later write of the same record.
    results: Option<Vec<Value>>,
    /// The items of a job queued while the queue is stalled, run when it moves again.
    stalled: Option<Vec<Value>>,
}

struct Replay {
    body_hash: [u8; 32],
    status: StatusCode,
    body: Value,
    stored: Instant,
}

struct Account {
    setup: ZendeskSetup,
    base_url: String,
    /// object → id → fields (with `id` and `external_id`).
    records: HashMap<&'static str, BTreeMap<u64, Map<String, Value>>>,
    /// (object, lower-cased external id or `email:` + lower-cased email) → ids.
    index: HashMap<(&'static str, String), Vec<u64>>,
    /// OAuth access token → when issued, and the scopes it was granted.
    tokens: HashMap<String, (Instant, String)>,
    idempotency: HashMap<String, Replay>,
    jobs: HashMap<String, Job>,
    window_start: Instant,
    window_count: u64,
    script: VecDeque<Scripted>,
    stats: Stats,
    next_id: u64,
    rng: StdRng,
    /// The account itself, for the tasks that run queued jobs.
    me: std::sync::Weak<Mutex<Account>>,
    /// While set, jobs queued stay queued (a slow job queue), however long they take.
    queue_stalled: bool,
}

type Shared = Arc<Mutex<Account>>;

/// A running sandbox; stops when dropped.
pub struct ZendeskSandbox {
    addr: SocketAddr,
    account: Shared,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl ZendeskSandbox {
    pub fn start(bind: &str, setup: ZendeskSetup) -> std::io::Result<Self> {
        let seed = setup.faults.seed;
        let account = Arc::new_cyclic(|me| {
            Mutex::new(Account {
                setup,
                base_url: String::new(),
                records: OBJECTS.iter().map(|o| (*o, BTreeMap::new())).collect(),
                index: HashMap::new(),
                tokens: HashMap::new(),
                idempotency: HashMap::new(),
                jobs: HashMap::new(),
                window_start: Instant::now(),
                window_count: 0,
                script: VecDeque::new(),
                stats: Stats::default(),
                next_id: 1,
                rng: StdRng::seed_from_u64(seed),
                me: me.clone(),
                queue_stalled: false,
            })
        });
        let app = Router::new()
            .route("/oauth/tokens", post(token))
            .route("/api/v2/{*path}", any(api))
            .merge(admin_routes())
            .with_state(account.clone());
        let (addr, stop) = serve(bind, "zendesk-sandbox", app)?;
        lock(&account).base_url = format!("http://{addr}");
        Ok(ZendeskSandbox {
            addr,
            account,
            _stop: stop,
        })
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The records of `object` (`users`, `organizations`, `tickets`), by id.
    pub fn records(&self, object: &str) -> Vec<Map<String, Value>> {
        lock(&self.account)
            .records
            .get(object)
            .map(|r| r.values().cloned().collect())
            .unwrap_or_default()
    }

    /// The records of `object` whose `external_id` is `key` (ignoring case).
    pub fn find(&self, object: &str, key: &str) -> Vec<Map<String, Value>> {
        let account = lock(&self.account);
        account
            .find(object, key)
            .into_iter()
            .filter_map(|id| account.records[object].get(&id).cloned())
            .collect()
    }

    pub fn stats(&self) -> Stats {
        lock(&self.account).stats.clone()
    }

    pub fn set_faults(&self, faults: Faults) {
        lock(&self.account).set_faults(faults);
    }

    /// How long jobs queued from now on take to run.
    pub fn set_job_duration_ms(&self, ms: u64) {
        lock(&self.account).setup.job_duration_ms = ms;
    }

    /// Stalls the job queue: jobs queued from now on wait until
    /// [`run_stalled_jobs`](Self::run_stalled_jobs); `false` lets new jobs run again.
    pub fn set_job_queue_stalled(&self, stalled: bool) {
        lock(&self.account).queue_stalled = stalled;
    }

    /// Runs the jobs the stalled queue held, in the order they were queued.
    pub fn run_stalled_jobs(&self) {
        let mut account = lock(&self.account);
        let mut held: Vec<(Instant, String)> = account
            .jobs
            .iter()
            .filter(|(_, j)| j.stalled.is_some())
            .map(|(id, j)| (j.created, id.clone()))
            .collect();
        held.sort();
        for (_, id) in held {
            let items = account
                .jobs
                .get_mut(&id)
                .and_then(|j| j.stalled.take())
                .unwrap_or_default();
            account.run_job(&id, "users", &items);
        }
    }

    /// Jobs queued that have not run yet.
    pub fn open_jobs(&self) -> usize {
        lock(&self.account)
            .jobs
            .values()
            .filter(|j| j.results.is_none())
            .count()
    }

    pub fn set_bulk_enabled(&self, enabled: bool) {
        lock(&self.account).setup.bulk_enabled = enabled;
    }

    pub fn set_rate_limit_per_minute(&self, limit: u64) {
        lock(&self.account).setup.rate_limit_per_minute = limit;
    }

    pub fn script(&self, answers: impl IntoIterator<Item = Scripted>) {
        lock(&self.account).script.extend(answers);
    }

    pub fn expire_tokens(&self) {
        lock(&self.account).expire_tokens();
    }

    pub fn api_token(&self) -> (String, String) {
        let account = lock(&self.account);
        (account.setup.email.clone(), account.setup.api_token.clone())
    }
}

impl Account {
    fn find(&self, object: &str, key: &str) -> Vec<u64> {
        object_of(object)
            .and_then(|o| self.index.get(&(o, key.to_lowercase())))
            .cloned()
            .unwrap_or_default()
    }

    fn index_keys(record: &Map<String, Value>) -> impl Iterator<Item = String> + '_ {
        let text = |field: &str| record.get(field).and_then(Value::as_str).map(str::to_lowercase);
        text("external_id")
            .into_iter()
            .chain(text("email").map(|e| format!("email:{e}")))
    }

    /// Stores `record` as `id` of `object` (replacing what was there), keeping the index.
    fn store(&mut self, object: &'static str, id: u64, record: Map<String, Value>) {
        self.unindex(object, id);
        for key in Self::index_keys(&record) {
            self.index.entry((object, key)).or_default().push(id);
        }
        self.records.get_mut(object).expect("known object").insert(id, record);
    }

    fn unindex(&mut self, object: &'static str, id: u64) {
        let keys: Vec<String> = self.records[object]
            .get(&id)
            .map(|r| Self::index_keys(r).collect())
            .unwrap_or_default();
        for key in keys {
            if let Some(ids) = self.index.get_mut(&(object, key.clone())) {
                ids.retain(|i| *i != id);
                if ids.is_empty() {
                    self.index.remove(&(object, key));
                }
            }
        }
    }

    fn remove(&mut self, object: &'static str, id: u64) -> Option<Map<String, Value>> {
        self.unindex(object, id);
        self.records.get_mut(object)?.remove(&id)
    }

    /// Runs a queued `create_or_update_many` job: each item is written now, and its
    /// result kept for the job's status.
    fn run_job(&mut self, id: &str, object: &'static str, items: &[Value]) {
        let mut results = Vec::with_capacity(items.len());
        for (index, item) in items.iter().enumerate() {
            let record = item.as_object().cloned().unwrap_or_default();
            let external_id = record.get("external_id").cloned().unwrap_or(Value::Null);
            results.push(match self.create_or_update(object, &record) {
                Ok((id, created)) => json!({
                    "index": index, "id": id, "external_id": external_id, "success": true,
                    "action": if created { "create" } else { "update" },
                    "status": if created { "Created" } else { "Updated" },
                }),
                Err(details) => {
                    let text = details
                        .as_object()
                        .map(|d| {
                            d.values()
                                .flat_map(|v| v.as_array().cloned().unwrap_or_default())
                                .filter_map(|p| p.get("description").and_then(Value::as_str).map(str::to_string))
                                .collect::<Vec<_>>()
                                .join(" ")
                        })
                        .unwrap_or_default();
                    json!({"index": index, "id": index, "external_id": external_id, "success": false, "status": "Failed", "error": "RecordInvalid", "details": text})
                }
            });
        }
        if let Some(job) = self.jobs.get_mut(id) {
            job.results = Some(results);
        }
    }

    /// The per-minute window: the rate-limit headers' values, or how long to wait.
    fn take_quota(&mut self) -> (u64, u64, u64, bool) {
        let now = Instant::now();
        if now.duration_since(self.window_start) >= WINDOW {
            self.window_start = now;
            self.window_count = 0;
        }
        let limit = self.setup.rate_limit_per_minute;
        let reset = (WINDOW.saturating_sub(now.duration_since(self.window_start)))
            .as_secs()
            .max(1);
        let allowed = self.window_count < limit;
        if allowed {
            self.window_count += 1;
        }
        (limit, limit.saturating_sub(self.window_count), reset, allowed)
    }

    /// Creates or updates one user or organization matched by external id (or a user's
    /// email). `Ok((id, created))`, or the 422 details.
    fn create_or_update(&mut self, object: &'static str, record: &Map<String, Value>) -> Result<(u64, bool), Value> {
        let external_id = record.get("external_id").and_then(Value::as_str);
        let mut matched = external_id.and_then(|k| self.find(object, k).first().copied());
        if matched.is_none() && object == "users" {
            if let Some(email) = record.get("email").and_then(Value::as_str) {
                matched = self.find(object, &format!("email:{email}")).first().copied();
            }
        }
        let mut details = Map::new();
        if let Some(email) = record.get("email").and_then(Value::as_str) {
            if !email.contains('@') {
                details.insert(
                    "email".into(),
                    json!([{"description": format!("Email: {email} is not properly formatted"), "error": "InvalidFormat"}]),
                );
            }
        }
        let has_name = |r: &Map<String, Value>| r.get("name").and_then(Value::as_str).is_some_and(|n| !n.is_empty());
        let name_ok = match matched {
            Some(_) => !record.contains_key("name") || has_name(record),
            None => has_name(record),
        };
        if !name_ok {
            details.insert(
                "name".into(),
                json!([{"description": "Name: is too short (minimum is 1 characters)", "error": "BlankValue"}]),
            );
        }
        if !details.is_empty() {
            return Err(Value::Object(details));
        }
        self.stats.upserts_applied += 1;
        Ok(match matched {
            Some(id) => {
                let mut stored = self.records[object][&id].clone();
                stored.extend(record.clone());
                self.store(object, id, stored);
                (id, false)
            }
            None => {
                let id = self.next_id;
                self.next_id += 1;
                let mut stored = record.clone();
                stored.insert("id".into(), json!(id));
                self.store(object, id, stored);
                (id, true)
            }
        })
    }
}

#[derive(Deserialize)]
struct TokenRequest {
    grant_type: Option<String>,
    client_id: Option<String>,
    client_secret: Option<String>,
    scope: Option<String>,
    expires_in: Option<u64>,
}

async fn token(State(account): State<Shared>, Json(req): Json<TokenRequest>) -> Response {
    let mut account = lock(&account);
    account.stats.token_requests += 1;
    if req.grant_type.as_deref() != Some("client_credentials") {
        return error(
            StatusCode::BAD_REQUEST,
            json!({"error": "unsupported_grant_type", "error_description": "The authorization grant type is not supported."}),
        );
    }
    if req.client_id.as_deref() != Some(account.setup.client_id.as_str())
        || req.client_secret.as_deref() != Some(account.setup.client_secret.as_str())
    {
        return error(
            StatusCode::UNAUTHORIZED,
            json!({"error": "invalid_client", "error_description": "Client authentication failed."}),
        );
    }
    let access_token = format!("{:064x}", account.rng.gen::<u128>());
    // An invalid or narrow scope still yields a token; calls it does not cover get
    // "Forbidden" (docs/crm-apis.md §2.1).
    let scope = req.scope.unwrap_or_else(|| "read".into());
    account
        .tokens
        .insert(access_token.clone(), (Instant::now(), scope.clone()));
    let mut body = json!({"access_token": access_token, "token_type": "bearer", "scope": scope});
    if let Some(expires_in) = req.expires_in {
        body["expires_in"] = json!(expires_in);
    }
    Json(body).into_response()
}

fn error(status: StatusCode, body: Value) -> Response {
    (status, Json(body)).into_response()
}

/// 403: the same body for every refusal (a scope that does not cover the call, an
/// account without bulk import). The documentation shows "Forbidden" for both and does
/// not say that the bodies differ (docs/crm-apis.md §2.4, §2.8), so the sandbox gives a
/// client nothing to tell them apart by.
fn forbidden() -> Response {
    error(
        StatusCode::FORBIDDEN,
        json!({"error": "Forbidden", "description": "You do not have access to this page. Please contact the account owner of this help desk for further help."}),
    )
}

fn record_invalid(details: Value) -> Response {
    error(
        StatusCode::UNPROCESSABLE_ENTITY,
        json!({"error": "RecordInvalid", "description": "Record validation errors", "details": details}),
    )
}

/// Every data request: latency, authentication, the rate limit, injected faults, then
/// the endpoint; the rate-limit headers on every answer.
async fn api(
    State(shared): State<Shared>,
    method: Method,
    Path(path): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let latency = lock(&shared).setup.faults.latency_ms;
    delay(latency).await;
    let mut account = lock(&shared);
    let path = path.trim_end_matches(".json").to_string();
    let mut response = match authenticate(&account, &headers) {
        Err(r) => *r,
        Ok(access) => {
            account.stats.api_requests += 1;
            let (limit, remaining, reset, allowed) = account.take_quota();
            let scripted = account.script.pop_front();
            let server_roll: f64 = account.rng.gen();
            let retry_after = account.setup.faults.retry_after();
            let mut r = if !allowed || scripted == Some(Scripted::TooManyRequests) {
                let wait = if allowed { retry_after } else { reset };
                let mut r = error(
                    StatusCode::TOO_MANY_REQUESTS,
                    json!({"error": "APIRateLimitExceeded", "description": "Number of allowed API requests per minute exceeded"}),
                );
                r.headers_mut().insert("retry-after", HeaderValue::from(wait));
                r
            } else if scripted == Some(Scripted::ServerError)
                || (scripted.is_none() && server_roll < account.setup.faults.server_error_rate)
            {
                error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    json!({"error": "ServiceUnavailable", "description": "Service temporarily unavailable"}),
                )
            } else if !access.permits(&method, &path) {
                forbidden()
            } else if scripted == Some(Scripted::LostResponse) {
                route(&mut account, &method, &path, &query, &headers, &body);
                error(
                    StatusCode::GATEWAY_TIMEOUT,
                    json!({"error": "GatewayTimeout", "description": "Gateway Timeout"}),
                )
            } else {
                route(&mut account, &method, &path, &query, &headers, &body)
            };
            for (name, value) in [
                ("x-rate-limit", limit),
                ("x-rate-limit-remaining", remaining),
                ("ratelimit-limit", limit),
                ("ratelimit-remaining", remaining),
                ("ratelimit-reset", reset),
                ("rate-limit", limit),
                ("rate-limit-remaining", remaining),
                ("rate-limit-reset", reset),
            ] {
                r.headers_mut().insert(name, HeaderValue::from(value));
            }
            r
        }
    };
    let status = response.status().as_u16();
    if !(200..300).contains(&status) {
        *account.stats.rejected.entry(status).or_default() += 1;
    }
    response
        .headers_mut()
        .entry("content-type")
        .or_insert(HeaderValue::from_static("application/json; charset=utf-8"));
    response
}

/// What a caller may do: an API token acts as its agent, with every scope; an OAuth token
/// what its scopes cover.
enum Access {
    Agent,
    Scopes(String),
}

impl Access {
    /// `read` covers GET, `write` the rest; `{resource}:read` / `{resource}:write` cover
    /// one resource (`users:write`).
    fn permits(&self, method: &Method, path: &str) -> bool {
        let Access::Scopes(scopes) = self else {
            return true;
        };
        let kind = if method == Method::GET { "read" } else { "write" };
        let resource = path.split('/').next().unwrap_or_default();
        scopes
            .split_whitespace()
            .any(|s| s == kind || s == format!("{resource}:{kind}"))
    }
}

fn authenticate(account: &Account, headers: &HeaderMap) -> Result<Access, Box<Response>> {
    if let Some((user, token)) = basic_credentials(headers) {
        let expected_user = format!("{}/token", account.setup.email);
        if user == expected_user && token == account.setup.api_token {
            return Ok(Access::Agent);
        }
        return Err(Box::new(error(
            StatusCode::UNAUTHORIZED,
            json!({"error": "Couldn't authenticate you"}),
        )));
    }
    let lifetime = account.setup.faults.token_lifetime();
    let valid = bearer(headers)
        .and_then(|t| account.tokens.get(t))
        .filter(|(issued, _)| lifetime.is_none_or(|l| issued.elapsed() < l));
    if let Some((_, scopes)) = valid {
        Ok(Access::Scopes(scopes.clone()))
    } else {
        Err(Box::new(error(
            StatusCode::UNAUTHORIZED,
            json!({"error": "invalid_token", "error_description": "The access token provided is expired, revoked, malformed or invalid for other reasons."}),
        )))
    }
}

fn not_found() -> Response {
    error(
        StatusCode::NOT_FOUND,
        json!({"error": "RecordNotFound", "description": "Not found"}),
    )
}

fn object_of(name: &str) -> Option<&'static str> {
    OBJECTS.iter().copied().find(|o| *o == name)
}

fn route(
    account: &mut Account,
    method: &Method,
    path: &str,
    query: &HashMap<String, String>,
    headers: &HeaderMap,
    body: &[u8],
) -> Response {
    let segments: Vec<&str> = path.split('/').collect();
    let json_body = || serde_json::from_slice::<Value>(body).ok();
    match (method.as_str(), segments.as_slice()) {
        ("POST", [object @ ("users" | "organizations"), "create_or_update"]) => {
            let object = object_of(object).expect("matched");
            let singular = &object[..object.len() - 1];
            let Some(record) = json_body().and_then(|b| b.get(singular).and_then(Value::as_object).cloned()) else {
                return error(
                    StatusCode::BAD_REQUEST,
                    json!({"error": "InvalidEndpoint", "description": format!("expected a `{singular}` object")}),
                );
            };
            match account.create_or_update(object, &record) {
                Err(details) => record_invalid(details),
                Ok((id, created)) => {
                    let stored = account.records[object][&id].clone();
                    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
                    let mut r = (status, Json(json!({ singular: stored }))).into_response();
                    if let Ok(v) = HeaderValue::from_str(&format!("{}/api/v2/{object}/{id}.json", account.base_url)) {
                        r.headers_mut().insert("location", v);
                    }
                    r
                }
            }
        }
        // Users only: organizations have `create_many` and `update_many`, but no bulk
        // upsert (docs/crm-apis.md §2.4), so `organizations/create_or_update_many` falls
        // through to the 404 below.
        ("POST", ["users", "create_or_update_many"]) => {
            let object = "users";
            if !account.setup.bulk_enabled {
                return forbidden();
            }
            let Some(items) = json_body().and_then(|b| b.get(object).and_then(Value::as_array).cloned()) else {
                return error(
                    StatusCode::BAD_REQUEST,
                    json!({"error": "InvalidEndpoint", "description": format!("expected a `{object}` array")}),
                );
            };
            if items.len() > BULK_LIMIT {
                return error(
                    StatusCode::BAD_REQUEST,
                    json!({"error": "TooManyValues", "description": format!("{object} may contain at most {BULK_LIMIT} items")}),
                );
            }
            let id = format!("V3-{:032x}", account.rng.gen::<u128>());
            let duration = Duration::from_millis(account.setup.job_duration_ms);
            account.jobs.insert(
                id.clone(),
                Job {
                    created: Instant::now(),
                    duration,
                    total: items.len(),
                    results: None,
                    stalled: None,
                },
            );
            // Status data is kept for a day.
            account.jobs.retain(|_, j| j.created.elapsed() < JOB_RETENTION);
            let status = job_json(account, &id, true);
            if account.queue_stalled {
                if let Some(job) = account.jobs.get_mut(&id) {
                    job.stalled = Some(items);
                }
            } else if duration.is_zero() {
                account.run_job(&id, object, &items);
            } else {
                // Jobs cannot be cancelled: this one runs when its time comes, whoever
                // still waits for it.
                let me = account.me.clone();
                let job = id.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(duration).await;
                    if let Some(shared) = me.upgrade() {
                        lock(&shared).run_job(&job, object, &items);
                    }
                });
            }
            Json(json!({ "job_status": status })).into_response()
        }
        ("GET", ["job_statuses", "show_many"]) => {
            // Unknown ids are left out of the answer (UNVERIFIED: the documentation does
            // not say what Zendesk answers for them).
            let ids = query.get("ids").map(String::as_str).unwrap_or_default();
            let statuses: Vec<Value> = ids
                .split(',')
                .filter(|id| account.jobs.contains_key(*id))
                .map(|id| job_json(account, id, false))
                .collect();
            Json(json!({ "job_statuses": statuses })).into_response()
        }
        ("GET", ["job_statuses", id]) => {
            if !account.jobs.contains_key(*id) {
                return not_found();
            }
            Json(json!({ "job_status": job_json(account, id, false) })).into_response()
        }
        ("GET", [object @ ("users" | "organizations"), "search"]) | ("GET", [object @ "tickets"]) => {
            let object = object_of(object).expect("matched");
            let matches: Vec<Value> = match query.get("external_id") {
                Some(key) => account
                    .find(object, key)
                    .into_iter()
                    .map(|id| Value::Object(account.records[object][&id].clone()))
                    .collect(),
                None => account.records[object].values().cloned().map(Value::Object).collect(),
            };
            let count = matches.len();
            Json(json!({ object: matches, "count": count, "next_page": null, "previous_page": null })).into_response()
        }
        ("POST", ["tickets"]) => create_ticket(account, headers, body),
        ("PUT", ["tickets", id]) => {
            let Some(id) = id
                .parse::<u64>()
                .ok()
                .filter(|id| account.records["tickets"].contains_key(id))
            else {
                return not_found();
            };
            let Some(mut fields) = json_body().and_then(|b| b.get("ticket").and_then(Value::as_object).cloned()) else {
                return error(
                    StatusCode::BAD_REQUEST,
                    json!({"error": "InvalidEndpoint", "description": "expected a `ticket` object"}),
                );
            };
            let comment = fields.remove("comment");
            account.stats.upserts_applied += 1;
            let mut ticket = account.records["tickets"][&id].clone();
            ticket.extend(fields);
            if comment.is_some() {
                let n = ticket.get("comment_count").and_then(Value::as_u64).unwrap_or(0);
                ticket.insert("comment_count".into(), json!(n + 1));
            }
            account.store("tickets", id, ticket.clone());
            Json(json!({"ticket": ticket, "audit": {"ticket_id": id}})).into_response()
        }
        ("DELETE", [object, id]) => {
            let Some(object) = object_of(object) else {
                return not_found();
            };
            let removed = id.parse::<u64>().ok().and_then(|id| account.remove(object, id));
            match removed {
                None => not_found(),
                Some(record) => {
                    account.stats.deletes_applied += 1;
                    if object == "users" {
                        let mut user = record;
                        user.insert("active".into(), json!(false));
                        Json(json!({"user": user})).into_response()
                    } else {
                        StatusCode::NO_CONTENT.into_response()
                    }
                }
            }
        }
        _ => error(
            StatusCode::NOT_FOUND,
            json!({"error": "InvalidEndpoint", "description": "Not found"}),
        ),
    }
}

/// A job's status: `queued` when just created, `completed` once it has run, `working`
/// from half its duration until then.
fn job_json(account: &Account, id: &str, just_created: bool) -> Value {
    let job = &account.jobs[id];
    let total = job.total;
    let url = format!("{}/api/v2/job_statuses/{id}.json", account.base_url);
    match &job.results {
        Some(results) if !just_created => {
            json!({"id": id, "url": url, "total": total, "progress": total, "status": "completed",
                   "message": "Completed", "results": results})
        }
        _ if !just_created && job.created.elapsed() >= job.duration / 2 => {
            json!({"id": id, "url": url, "total": total, "progress": total / 2, "status": "working",
                   "message": format!("Processing item #{}", total / 2), "results": null})
        }
        _ => {
            json!({"id": id, "url": url, "total": total, "progress": null, "status": "queued", "message": null, "results": null})
        }
    }
}

fn create_ticket(account: &mut Account, headers: &HeaderMap, body: &[u8]) -> Response {
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body_hash: [u8; 32] = Sha256::digest(body).into();
    account.idempotency.retain(|_, r| r.stored.elapsed() < IDEMPOTENCY_TTL);
    if let Some(key) = &key {
        if let Some(replay) = account.idempotency.get(key) {
            if replay.body_hash != body_hash {
                return error(
                    StatusCode::BAD_REQUEST,
                    json!({"error": "IdempotentRequestError", "description": "Request parameters don't match the given idempotency key"}),
                );
            }
            let mut r = (replay.status, Json(replay.body.clone())).into_response();
            r.headers_mut()
                .insert("x-idempotency-lookup", HeaderValue::from_static("hit"));
            return r;
        }
    }
    let Some(mut fields) = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|b| b.get("ticket").and_then(Value::as_object).cloned())
    else {
        return error(
            StatusCode::BAD_REQUEST,
            json!({"error": "InvalidEndpoint", "description": "expected a `ticket` object"}),
        );
    };
    let Some(comment) = fields.remove("comment") else {
        return record_invalid(
            json!({"base": [{"description": "Description: cannot be blank", "error": "BlankValue"}]}),
        );
    };
    let description = comment.get("body").cloned().unwrap_or(comment);
    fields.insert("description".into(), description);
    fields.insert("comment_count".into(), json!(1));
    let id = account.next_id;
    account.next_id += 1;
    fields.insert("id".into(), json!(id));
    account.stats.upserts_applied += 1;
    account.store("tickets", id, fields.clone());
    let answer = json!({"ticket": fields, "audit": {"ticket_id": id}});
    let mut r = (StatusCode::CREATED, Json(answer.clone())).into_response();
    if let Some(key) = key {
        account.idempotency.insert(
            key,
            Replay {
                body_hash,
                status: StatusCode::CREATED,
                body: answer,
                stored: Instant::now(),
            },
        );
        r.headers_mut()
            .insert("x-idempotency-lookup", HeaderValue::from_static("miss"));
    }
    r
}

impl AdminState for Account {
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
            .map(|(o, r)| {
                (
                    o.to_string(),
                    Value::Array(r.values().cloned().map(Value::Object).collect()),
                )
            })
            .collect();
        Value::Object(all)
    }
}

/// Contacts are users: `name` from the last name, `notes` from the first name.
const CONTACT_FIELDS: [(&str, &str); 3] = [("notes", "first_name"), ("name", "last_name"), ("email", "email")];

impl CrmSandbox for ZendeskSandbox {
    fn crm(&self) -> &'static str {
        "zendesk"
    }

    fn base_url(&self) -> String {
        ZendeskSandbox::base_url(self)
    }

    fn tenant_toml(&self, secret_var: &str) -> String {
        format!(
            r#"crm = "zendesk"
[tenants.zendesk]
base_url = "{url}"
oauth_client_id = "{id}"
oauth_client_secret = "${{{secret_var}}}"
job_poll_interval_ms = 20
[tenants.entities.contact]
object = "users"
external_id_field = "external_id"
fields = {{ notes = "first_name", name = "last_name", email = "email" }}
"#,
            url = self.base_url(),
            id = lock(&self.account).setup.client_id,
        )
    }

    fn secret(&self) -> String {
        lock(&self.account).setup.client_secret.clone()
    }

    fn contact(&self, key: &str) -> Option<Map<String, Value>> {
        match self.find("users", key).as_slice() {
            [user] => Some(data_view(user, &CONTACT_FIELDS)),
            _ => None,
        }
    }

    fn record(&self, object: &str, key: &str) -> Option<Map<String, Value>> {
        match self.find(object, key).as_slice() {
            [one] => Some(one.clone()),
            _ => None,
        }
    }

    /// An email that is not one: 422 `RecordInvalid`.
    fn invalid_contact(&self) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("first_name".into(), json!("Bad"));
        m.insert("last_name".into(), json!("Address"));
        m.insert("email".into(), json!("not-an-email"));
        m
    }

    fn stats(&self) -> Stats {
        ZendeskSandbox::stats(self)
    }

    fn set_faults(&self, faults: Faults) {
        ZendeskSandbox::set_faults(self, faults)
    }

    fn expire_tokens(&self) {
        ZendeskSandbox::expire_tokens(self)
    }

    fn script_throttles(&self, n: usize) {
        self.script(std::iter::repeat_n(Scripted::TooManyRequests, n))
    }
}
