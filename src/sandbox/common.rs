//! What the CRM sandboxes share: serving a router on its own thread, the injectable
//! faults, the request statistics, form and Basic-auth parsing, and [`CrmSandbox`], the
//! view the demo, the scenario tests and the load tests take of any of them.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Injectable faults. Rates are probabilities per API request.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    pub latency_ms: u64,
    pub server_error_rate: f64,
    /// Salesforce only: `UNABLE_TO_LOCK_ROW` per record.
    pub lock_error_rate: f64,
    /// Salesforce only: external ids whose record-by-record calls always answer 500 (a
    /// record the CRM cannot process, while others go through).
    pub failing_keys: Vec<String>,
    /// Salesforce only: external ids whose upserts a validation rule refuses (400
    /// `FIELD_CUSTOM_VALIDATION_EXCEPTION` alone, that record's error in a collection),
    /// until the rule is lifted.
    pub rejected_keys: Vec<String>,
    /// Tokens stop working this long after they were issued; `None`: never.
    pub token_lifetime_ms: Option<u64>,
    /// `Retry-After` seconds sent with 429s (Zendesk, Dataverse); 0 means 1.
    pub retry_after_secs: u64,
    pub seed: u64,
}

impl Faults {
    /// A one-line description for people, e.g. "2% 5xx, 2% row locks, tokens live 400 ms".
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if self.latency_ms > 0 {
            parts.push(format!("{} ms latency", self.latency_ms));
        }
        if self.server_error_rate > 0.0 {
            parts.push(format!("{:.0}% 5xx", self.server_error_rate * 100.0));
        }
        if self.lock_error_rate > 0.0 {
            parts.push(format!("{:.0}% row locks", self.lock_error_rate * 100.0));
        }
        if let Some(ms) = self.token_lifetime_ms {
            parts.push(format!("tokens live {ms} ms"));
        }
        if parts.is_empty() {
            "no faults".into()
        } else {
            parts.join(", ")
        }
    }

    pub fn retry_after(&self) -> u64 {
        self.retry_after_secs.max(1)
    }

    pub fn token_lifetime(&self) -> Option<Duration> {
        self.token_lifetime_ms.map(Duration::from_millis)
    }
}

/// What a sandbox received.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Stats {
    pub token_requests: u64,
    /// Data API requests (what counts against the CRM's API limits), job polls and
    /// lookups included.
    pub api_requests: u64,
    pub upserts_applied: u64,
    pub deletes_applied: u64,
    /// Answers other than 2xx, by status.
    pub rejected: BTreeMap<u16, u64>,
    /// Most requests by external id in progress at once for one record (Salesforce
    /// sandbox): two writers of one record overlapping show here as 2.
    pub max_concurrent_writes_of_one_record: u64,
}

/// A running sandbox as the demo, the scenario tests and the load tests see it.
pub trait CrmSandbox: Send + Sync {
    /// The `crm` value of a tenant on this sandbox.
    fn crm(&self) -> &'static str;
    /// The URL to configure.
    fn base_url(&self) -> String;
    /// The tenant's CRM section and its `contact` entity, as config text; the secret is
    /// referenced as `${secret_var}`.
    fn tenant_toml(&self, secret_var: &str) -> String;
    /// The secret `tenant_toml` refers to.
    fn secret(&self) -> String;
    /// The fields of the contact whose external id is `key`, by the event data paths the
    /// `contact` entity maps (`first_name`, `last_name`, `email`).
    fn contact(&self, key: &str) -> Option<Map<String, Value>>;
    /// The CRM fields of the record of `object` (as configured: sObject, Zendesk object,
    /// entity set) whose external id or alternate key is `key`, if exactly one.
    fn record(&self, object: &str, key: &str) -> Option<Map<String, Value>>;
    /// Contact data this CRM refuses as invalid, permanently.
    fn invalid_contact(&self) -> Map<String, Value>;
    fn stats(&self) -> Stats;
    fn set_faults(&self, faults: Faults);
    fn expire_tokens(&self);
    /// Answers the next `n` data requests with the CRM's throttle (429 with
    /// `Retry-After` of `faults.retry_after_secs`, or Salesforce's
    /// `REQUEST_LIMIT_EXCEEDED`).
    fn script_throttles(&self, n: usize);
}

/// The state behind a sandbox's `/__sandbox` admin endpoints.
pub trait AdminState: Send + 'static {
    /// A scripted answer for one of the next requests.
    type Script: DeserializeOwned + Send + 'static;
    fn stats(&self) -> Stats;
    /// Replaces the faults (and reseeds the random faults).
    fn set_faults(&mut self, faults: Faults);
    fn expire_tokens(&mut self);
    fn script(&mut self, answers: Vec<Self::Script>);
    /// Every stored record, for people and scripts.
    fn records_json(&self) -> serde_json::Value;
}

/// `GET /__sandbox/records`, `GET /__sandbox/stats`, `POST /__sandbox/faults`,
/// `POST /__sandbox/expire-tokens`, `POST /__sandbox/script`.
pub fn admin_routes<S: AdminState>() -> Router<Arc<Mutex<S>>> {
    Router::new()
        .route(
            "/__sandbox/records",
            get(|State(s): State<Arc<Mutex<S>>>| async move { Json(lock(&s).records_json()) }),
        )
        .route(
            "/__sandbox/stats",
            get(|State(s): State<Arc<Mutex<S>>>| async move { Json(lock(&s).stats()) }),
        )
        .route(
            "/__sandbox/faults",
            post(|State(s): State<Arc<Mutex<S>>>, Json(f): Json<Faults>| async move {
                lock(&s).set_faults(f);
                StatusCode::NO_CONTENT
            }),
        )
        .route(
            "/__sandbox/expire-tokens",
            post(|State(s): State<Arc<Mutex<S>>>| async move {
                lock(&s).expire_tokens();
                StatusCode::NO_CONTENT
            }),
        )
        .route(
            "/__sandbox/script",
            post(
                |State(s): State<Arc<Mutex<S>>>, Json(script): Json<Vec<S::Script>>| async move {
                    lock(&s).script(script);
                    StatusCode::NO_CONTENT
                },
            ),
        )
}

/// Locks a sandbox's state. A panic while holding the lock cannot leave it half-updated
/// in a way that matters for a simulator; keep serving.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Serves `app` on `bind` from its own thread and runtime; the server stops when the
/// returned sender is dropped.
pub fn serve(bind: &str, name: &str, app: Router) -> std::io::Result<(SocketAddr, tokio::sync::oneshot::Sender<()>)> {
    let listener = std::net::TcpListener::bind(bind)?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name(name)
        .enable_all()
        .build()?;
    let label = name.to_string();
    std::thread::Builder::new().name(name.into()).spawn(move || {
        runtime.block_on(async move {
            let listener = match tokio::net::TcpListener::from_std(listener) {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(error = %e, sandbox = %label, "Sandbox could not listen.");
                    return;
                }
            };
            let server = axum::serve(listener, app).with_graceful_shutdown(async {
                let _ = stop_rx.await;
            });
            if let Err(e) = server.await {
                tracing::error!(error = %e, sandbox = %label, "Sandbox stopped.");
            }
        });
    })?;
    Ok((addr, stop_tx))
}

/// Waits the injected latency: the answer comes this much later.
pub async fn delay(latency_ms: u64) {
    if latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(latency_ms)).await;
    }
}

/// The fields of an `application/x-www-form-urlencoded` body.
pub fn form_fields(body: &[u8]) -> Option<HashMap<String, String>> {
    let text = std::str::from_utf8(body).ok()?;
    let mut out = HashMap::new();
    for pair in text.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(&s.replace('+', " "))
                .decode_utf8()
                .map(|c| c.into_owned())
        };
        out.insert(decode(k).ok()?, decode(v).ok()?);
    }
    Some(out)
}

/// The user and password of a `Basic` `Authorization` header.
pub fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get("authorization")?.to_str().ok()?.strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD.decode(value).ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (id, secret) = text.split_once(':')?;
    Some((id.to_string(), secret.to_string()))
}

/// The token of a `Bearer` `Authorization` header.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers.get("authorization")?.to_str().ok()?.strip_prefix("Bearer ")
}

/// The fields of `record` named in `names` (CRM field → event data path), keyed by their
/// data paths: a CRM record as the event data that produced it.
pub fn data_view(record: &Map<String, Value>, names: &[(&str, &str)]) -> Map<String, Value> {
    names
        .iter()
        .filter_map(|(crm, path)| Some((path.to_string(), record.get(*crm)?.clone())))
        .collect()
}
