//! Salesforce sandbox: the REST subset crm-sync uses, from the documentation
//! (`docs/crm-apis.md` §1 and its checklist in §5).
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

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use org::{Org, Shared};

use super::common::{data_view, lock, serve};
pub use super::common::{Faults, Stats};

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

/// A scripted answer for one of the next API requests, taken in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scripted {
    ServerError,
    LockError,
    RequestLimit,
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
        let seed = setup.faults.seed;
        let org = Arc::new(Mutex::new(Org {
            setup,
            base_url: String::new(),
            records: HashMap::new(),
            index: HashMap::new(),
            tokens: HashMap::new(),
            script: VecDeque::new(),
            stats: Stats::default(),
            in_progress: HashMap::new(),
            next_id: 1,
            rng: StdRng::seed_from_u64(seed),
        }));
        let (addr, stop_tx) = serve(bind, "salesforce-sandbox", api::router(org.clone()))?;
        lock(&org).base_url = format!("http://{addr}");
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
        use super::common::AdminState;
        lock(&self.org).set_faults(faults);
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

impl super::CrmSandbox for SalesforceSandbox {
    fn crm(&self) -> &'static str {
        "salesforce"
    }

    fn base_url(&self) -> String {
        SalesforceSandbox::base_url(self)
    }

    fn tenant_toml(&self, secret_var: &str) -> String {
        format!(
            r#"crm = "salesforce"
[tenants.salesforce]
base_url = "{url}"
api_version = "60.0"
client_id = "{id}"
client_secret = "${{{secret_var}}}"
[tenants.entities.contact]
object = "Contact"
external_id_field = "External_Id__c"
fields = {{ FirstName = "first_name", LastName = "last_name", Email = "email" }}
"#,
            url = self.base_url(),
            id = lock(&self.org).setup.client_id,
        )
    }

    fn secret(&self) -> String {
        lock(&self.org).setup.client_secret.clone()
    }

    fn contact(&self, key: &str) -> Option<Map<String, Value>> {
        let record = self.find("Contact", "External_Id__c", key)?;
        Some(data_view(
            &record.fields,
            &[
                ("FirstName", "first_name"),
                ("LastName", "last_name"),
                ("Email", "email"),
            ],
        ))
    }

    fn record(&self, object: &str, key: &str) -> Option<Map<String, Value>> {
        let fields = lock(&self.org)
            .setup
            .external_ids
            .get(object)
            .cloned()
            .unwrap_or_default();
        fields.iter().find_map(|f| self.find(object, f, key)).map(|r| r.fields)
    }

    /// A new contact without `LastName`: `REQUIRED_FIELD_MISSING`.
    fn invalid_contact(&self) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("first_name".into(), Value::String("Nameless".into()));
        m
    }

    fn stats(&self) -> Stats {
        SalesforceSandbox::stats(self)
    }

    fn set_faults(&self, faults: Faults) {
        SalesforceSandbox::set_faults(self, faults)
    }

    fn expire_tokens(&self) {
        SalesforceSandbox::expire_tokens(self)
    }

    fn script_throttles(&self, n: usize) {
        self.script(std::iter::repeat_n(Scripted::RequestLimit, n))
    }
}
