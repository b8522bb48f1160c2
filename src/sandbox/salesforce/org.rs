//! The sandbox org's state: records indexed by external id, issued tokens, the script
//! of faults to come, and what was received.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use rand::rngs::StdRng;
use serde_json::{Map, Value};

use super::{SandboxOrg, Scripted, Stats, StoredRecord};
pub(super) use crate::sandbox::common::lock;

pub(super) struct Org {
    pub(super) setup: SandboxOrg,
    pub(super) base_url: String,
    pub(super) records: HashMap<String, StoredRecord>,
    /// (sObject, field, value) → record ids: a list, so several matches can be answered
    /// with 300 as the real API does.
    pub(super) index: HashMap<(String, String, String), Vec<String>>,
    pub(super) tokens: HashMap<String, Instant>,
    pub(super) script: VecDeque<Scripted>,
    pub(super) stats: Stats,
    /// Requests by external id in progress, by (sObject, field, value).
    pub(super) in_progress: HashMap<(String, String, String), u64>,
    pub(super) next_id: u64,
    pub(super) rng: StdRng,
}

/// A record-level failure, as Salesforce reports it (`errorCode` at the top level of a
/// single-record call, `statusCode` inside collection results).
pub(super) struct RecordError {
    pub(super) code: &'static str,
    pub(super) message: String,
    pub(super) fields: Vec<String>,
}

pub(super) type Shared = Arc<Mutex<Org>>;

impl Org {
    pub(super) fn insert(&mut self, sobject: &str, fields: Map<String, Value>) -> String {
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

    pub(super) fn remove(&mut self, id: &str) {
        if let Some(record) = self.records.remove(id) {
            self.index.retain(|_, ids| {
                ids.retain(|i| i != id);
                !ids.is_empty()
            });
            drop(record);
        }
    }

    pub(super) fn limit_info(&self) -> String {
        format!("api-usage={}/{}", self.stats.api_requests, self.setup.daily_limit)
    }

    /// Whether `field` is a declared external id field of `sobject`.
    pub(super) fn declares_external_id(&self, sobject: &str, field: &str) -> bool {
        self.setup
            .external_ids
            .get(sobject)
            .is_some_and(|f| f.iter().any(|f| f == field))
    }

    /// Creates or updates the record matched by an external id (`matched`), enforcing the
    /// object's required fields. Returns the record id and whether it was created.
    pub(super) fn apply_upsert(
        &mut self,
        sobject: &str,
        field: &str,
        value: &str,
        fields: Map<String, Value>,
        matched: Option<&String>,
    ) -> Result<(String, bool), RecordError> {
        let required = self.setup.required.get(sobject).cloned().unwrap_or_default();
        let existing = matched.and_then(|id| self.records.get(id)).map(|r| r.fields.clone());
        let missing: Vec<String> = required
            .iter()
            .filter(|f| match fields.get(*f) {
                Some(Value::Null) => true,
                Some(_) => false,
                None => existing.as_ref().and_then(|e| e.get(*f)).is_none_or(Value::is_null),
            })
            .cloned()
            .collect();
        if !missing.is_empty() {
            return Err(RecordError {
                code: "REQUIRED_FIELD_MISSING",
                message: format!("Required fields are missing: [{}]", missing.join(", ")),
                fields: missing,
            });
        }
        self.stats.upserts_applied += 1;
        match matched {
            None => {
                let mut all = fields;
                all.insert(field.to_string(), Value::String(value.to_string()));
                Ok((self.insert(sobject, all), true))
            }
            Some(id) => {
                if let Some(record) = self.records.get_mut(id) {
                    record.fields.extend(fields);
                }
                Ok((id.clone(), false))
            }
        }
    }
}

fn value_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}
