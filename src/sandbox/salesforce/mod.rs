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
//! - `PATCH /services/data/vNN.N/composite/sobjects/{SObject}/{Field}` (v46+): sObject
//!   Collections upsert of up to 200 records, 200 with a result per record in order
//!   (`success`, `created`, `errors[].statusCode`), so one bad record fails alone.
//! - Every API answer carries `Sforce-Limit-Info: api-usage=N/M`; past the daily
//!   allocation, 403 `REQUEST_LIMIT_EXCEEDED`.
//! - Faults: latency, a rate of 5xx, a rate of `UNABLE_TO_LOCK_ROW`, scripted answers for
//!   the next requests, token lifetime, expiring all tokens.
//! - `/__sandbox/records`, `/__sandbox/stats` (GET) and `/__sandbox/faults`,
//!   `/__sandbox/expire-tokens`, `/__sandbox/script` (POST) for people and scripts; the
//!   same through [`SalesforceSandbox`] methods in-process.

mod api;
mod org;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use org::{lock, Org, Shared};

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
        let app = api::router(org.clone());
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
