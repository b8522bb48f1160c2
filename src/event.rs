//! Decode stage: turns a Kafka message value into a validated [`Event`].
//!
//! Promise: every message either becomes an event or a [`DecodeError`] whose
//! [`code`](DecodeError::code) is one of a small fixed set, so the partition can
//! dead-letter it with a machine-readable reason and move on. Nothing here panics on input.

use std::fmt;
use std::sync::Arc;

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// What a change does to its record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Upsert,
    Delete,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Upsert => "upsert",
            Op::Delete => "delete",
        }
    }
}

/// Identity of one record: all its versions share it, and a partition.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RecordKey {
    pub tenant: Arc<str>,
    pub entity: Arc<str>,
    pub key: Arc<str>,
}

/// A map by record: the tenant's slots and the diff cache look one up for every event.
/// foldhash instead of SipHash (measured: SipHash was the actor thread's largest single
/// cost); it is seeded per process, and the keys come from the service's own producers.
pub type RecordMap<V> = std::collections::HashMap<RecordKey, V, foldhash::fast::RandomState>;

impl fmt::Display for RecordKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.tenant, self.entity, self.key)
    }
}

/// A validated change event (the envelope documented in the README).
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub event_id: String,
    pub record: RecordKey,
    pub op: Op,
    /// Grows with each change of one record; the newest wins.
    pub version: u64,
    pub occurred_at: String,
    /// Source fields; empty for deletes.
    pub data: Map<String, Value>,
}

/// Why a message could not become an event. Each variant has a stable [`code`](Self::code).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    #[error("message is {size} bytes, more than the limit of {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error("message has no value")]
    Empty,
    #[error("message is not valid UTF-8")]
    NotUtf8,
    #[error("message is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("message is not a JSON object")]
    NotAnObject,
    #[error("field `{0}` is missing")]
    MissingField(&'static str),
    #[error("field `{field}` must be {expected}")]
    WrongType {
        field: &'static str,
        expected: &'static str,
    },
    #[error("unknown op `{0}` (expected upsert or delete)")]
    UnknownOp(String),
    #[error("unknown tenant `{0}`")]
    UnknownTenant(String),
    #[error("tenant `{tenant}` has no mapping for entity `{entity}`")]
    UnknownEntity { tenant: String, entity: String },
    #[error("field `{field}` is {size} bytes, more than the limit of {limit}")]
    TooLong {
        field: &'static str,
        size: usize,
        limit: usize,
    },
    /// A message on the retry topic whose retry headers are missing or invalid.
    #[error(transparent)]
    BadRetryHeader(#[from] crate::retry::topic::BadRetryHeader),
}

impl DecodeError {
    /// Stable, bounded reason code for DLQ headers and metric labels.
    /// Every [`code`](Self::code).
    pub const CODES: [&'static str; 12] = [
        "too_large",
        "empty_message",
        "not_utf8",
        "invalid_json",
        "not_an_object",
        "missing_field",
        "wrong_type",
        "unknown_op",
        "unknown_tenant",
        "unknown_entity",
        "field_too_long",
        "bad_retry_header",
    ];

    pub fn code(&self) -> &'static str {
        match self {
            DecodeError::TooLarge { .. } => "too_large",
            DecodeError::Empty => "empty_message",
            DecodeError::NotUtf8 => "not_utf8",
            DecodeError::InvalidJson(_) => "invalid_json",
            DecodeError::NotAnObject => "not_an_object",
            DecodeError::MissingField(_) => "missing_field",
            DecodeError::WrongType { .. } => "wrong_type",
            DecodeError::UnknownOp(_) => "unknown_op",
            DecodeError::UnknownTenant(_) => "unknown_tenant",
            DecodeError::UnknownEntity { .. } => "unknown_entity",
            DecodeError::TooLong { .. } => "field_too_long",
            DecodeError::BadRetryHeader(_) => "bad_retry_header",
        }
    }
}

/// What the decoder needs to know about the configured tenants.
pub trait Routes {
    fn has_tenant(&self, tenant: &str) -> bool;
    fn has_entity(&self, tenant: &str, entity: &str) -> bool;
}

/// Most bytes of a record's `key`, and of its `event_id`: the record identity is written
/// to the state topic (twice: as the message key and in the value), to CRM URLs and to
/// DLQ headers, so it must stay small whatever the message's size. CRMs cap external ids
/// far below this (Salesforce 255 characters).
pub const MAX_ID_BYTES: usize = 1_024;

/// Decodes and validates one message value.
pub fn decode(bytes: Option<&[u8]>, max_bytes: usize, routes: &dyn Routes) -> Result<Event, DecodeError> {
    let bytes = bytes.filter(|b| !b.is_empty()).ok_or(DecodeError::Empty)?;
    if bytes.len() > max_bytes {
        return Err(DecodeError::TooLarge {
            size: bytes.len(),
            limit: max_bytes,
        });
    }
    let text = std::str::from_utf8(bytes).map_err(|_| DecodeError::NotUtf8)?;
    let value: Value = serde_json::from_str(text).map_err(|e| DecodeError::InvalidJson(e.to_string()))?;
    let Value::Object(mut obj) = value else {
        return Err(DecodeError::NotAnObject);
    };

    let event_id = take_string(&mut obj, "event_id")?;
    let tenant = take_string(&mut obj, "tenant")?;
    let entity = take_string(&mut obj, "entity")?;
    let key = take_string(&mut obj, "key")?;
    for (field, value) in [("event_id", &event_id), ("key", &key)] {
        if value.len() > MAX_ID_BYTES {
            return Err(DecodeError::TooLong {
                field,
                size: value.len(),
                limit: MAX_ID_BYTES,
            });
        }
    }
    let op = match take_string(&mut obj, "op")?.as_str() {
        "upsert" => Op::Upsert,
        "delete" => Op::Delete,
        other => return Err(DecodeError::UnknownOp(other.to_string())),
    };
    let version = match obj.remove("version") {
        None | Some(Value::Null) => return Err(DecodeError::MissingField("version")),
        Some(v) => v.as_u64().ok_or(DecodeError::WrongType {
            field: "version",
            expected: "a non-negative integer",
        })?,
    };
    let occurred_at = take_string(&mut obj, "occurred_at")?;
    if chrono::DateTime::parse_from_rfc3339(&occurred_at).is_err() {
        return Err(DecodeError::WrongType {
            field: "occurred_at",
            expected: "an RFC 3339 timestamp",
        });
    }
    let data = match (obj.remove("data"), op) {
        (Some(Value::Object(map)), _) => map,
        (None | Some(Value::Null), Op::Delete) => Map::new(),
        (None | Some(Value::Null), Op::Upsert) => return Err(DecodeError::MissingField("data")),
        (Some(_), _) => {
            return Err(DecodeError::WrongType {
                field: "data",
                expected: "an object",
            })
        }
    };
    if !routes.has_tenant(&tenant) {
        return Err(DecodeError::UnknownTenant(tenant));
    }
    if !routes.has_entity(&tenant, &entity) {
        return Err(DecodeError::UnknownEntity { tenant, entity });
    }
    Ok(Event {
        event_id,
        record: RecordKey {
            tenant: tenant.into(),
            entity: entity.into(),
            key: key.into(),
        },
        op,
        version,
        occurred_at,
        data,
    })
}

fn take_string(obj: &mut Map<String, Value>, field: &'static str) -> Result<String, DecodeError> {
    match obj.remove(field) {
        None | Some(Value::Null) => Err(DecodeError::MissingField(field)),
        Some(Value::String(s)) if !s.is_empty() => Ok(s),
        Some(Value::String(_)) => Err(DecodeError::WrongType {
            field,
            expected: "a non-empty string",
        }),
        Some(_) => Err(DecodeError::WrongType {
            field,
            expected: "a string",
        }),
    }
}

/// Hash of a JSON value that ignores key order and formatting: objects are hashed with
/// their keys sorted, whatever order the map keeps them in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PayloadHash(pub [u8; 16]);

pub fn canonical_hash(value: &Map<String, Value>) -> PayloadHash {
    let mut hasher = Sha256::new();
    hash_object(&mut hasher, value);
    let digest = hasher.finalize();
    let mut out = [0u8; 16];
    out.copy_from_slice(&digest[..16]);
    PayloadHash(out)
}

fn hash_object(h: &mut Sha256, map: &Map<String, Value>) {
    let mut keys: Vec<&String> = map.keys().collect();
    keys.sort();
    h.update(b"{");
    for k in keys {
        hash_str(h, k);
        h.update(b":");
        hash_value(h, &map[k]);
        h.update(b",");
    }
    h.update(b"}");
}

fn hash_value(h: &mut Sha256, v: &Value) {
    match v {
        Value::Null => h.update(b"n"),
        Value::Bool(b) => h.update(if *b { b"t" } else { b"f" }),
        Value::Number(n) => {
            h.update(b"#");
            h.update(n.to_string().as_bytes());
            h.update(b";");
        }
        Value::String(s) => hash_str(h, s),
        Value::Array(items) => {
            h.update(b"[");
            for item in items {
                hash_value(h, item);
                h.update(b",");
            }
            h.update(b"]");
        }
        Value::Object(map) => hash_object(h, map),
    }
}

fn hash_str(h: &mut Sha256, s: &str) {
    // Length prefix: no two different strings hash the same byte sequence.
    h.update(b"s");
    h.update((s.len() as u64).to_le_bytes());
    h.update(s.as_bytes());
}

/// A short, stable fingerprint of an event id, so the diff cache does not keep the ids.
pub fn event_id_fingerprint(event_id: &str) -> u64 {
    let digest = Sha256::digest(event_id.as_bytes());
    let mut out = [0u8; 8];
    out.copy_from_slice(&digest[..8]);
    u64::from_le_bytes(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    struct AllRoutes;
    impl Routes for AllRoutes {
        fn has_tenant(&self, t: &str) -> bool {
            t != "nobody"
        }
        fn has_entity(&self, _: &str, e: &str) -> bool {
            e == "contact"
        }
    }

    fn decode_str(s: &str) -> Result<Event, DecodeError> {
        decode(Some(s.as_bytes()), 10_000, &AllRoutes)
    }

    const GOOD: &str = r#"{"event_id":"e1","tenant":"acme","entity":"contact","key":"C-1","op":"upsert","version":7,"occurred_at":"2026-11-29T10:00:00Z","data":{"a":1}}"#;

    #[test]
    fn decodes_a_valid_upsert() {
        let e = decode_str(GOOD).unwrap();
        assert_eq!(e.version, 7);
        assert_eq!(e.op, Op::Upsert);
        assert_eq!(&*e.record.key, "C-1");
        assert_eq!(e.data["a"], 1);
    }

    #[test]
    fn decode_errors_have_stable_codes() {
        let cases: Vec<(Option<&[u8]>, &str)> = vec![
            (None, "empty_message"),
            (Some(b"\xff\xfe"), "not_utf8"),
            (Some(b"{nope"), "invalid_json"),
            (Some(b"[1]"), "not_an_object"),
            (Some(br#"{"tenant":"acme"}"#), "missing_field"),
        ];
        for (bytes, code) in cases {
            assert_eq!(decode(bytes, 10_000, &AllRoutes).unwrap_err().code(), code);
        }
        let cases = [
            (GOOD.replace("\"version\":7", "\"version\":\"7\""), "wrong_type"),
            (GOOD.replace("\"version\":7", "\"version\":-1"), "wrong_type"),
            (GOOD.replace("upsert", "merge"), "unknown_op"),
            (GOOD.replace("acme", "nobody"), "unknown_tenant"),
            (GOOD.replace("\"contact\"", "\"lead\""), "unknown_entity"),
            (GOOD.replace("2026-11-29T10:00:00Z", "yesterday"), "wrong_type"),
            (GOOD.replace(",\"data\":{\"a\":1}", ""), "missing_field"),
            (GOOD.replace("C-1", &"k".repeat(MAX_ID_BYTES + 1)), "field_too_long"),
        ];
        for (text, code) in cases {
            assert_eq!(decode_str(&text).unwrap_err().code(), code, "{text}");
        }
        assert_eq!(
            decode(Some(GOOD.as_bytes()), 10, &AllRoutes).unwrap_err().code(),
            "too_large"
        );
    }

    #[test]
    fn delete_needs_no_data() {
        let text = r#"{"event_id":"e2","tenant":"acme","entity":"contact","key":"C-1","op":"delete","version":8,"occurred_at":"2026-11-29T10:00:00Z"}"#;
        assert_eq!(decode_str(text).unwrap().op, Op::Delete);
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            "[a-z ]{0,8}".prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map("[a-z]{1,4}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// Writes an object with its keys in reverse order and extra whitespace.
    fn reordered(v: &Value) -> String {
        match v {
            Value::Object(map) => {
                let mut keys: Vec<&String> = map.keys().collect();
                keys.sort();
                keys.reverse();
                let parts: Vec<String> = keys
                    .iter()
                    .map(|k| format!("  {} :\n {}", serde_json::to_string(k).unwrap(), reordered(&map[*k])))
                    .collect();
                format!("{{ {} }}", parts.join(" ,\t"))
            }
            Value::Array(items) => format!("[ {} ]", items.iter().map(reordered).collect::<Vec<_>>().join(" , ")),
            other => other.to_string(),
        }
    }

    proptest! {
        #[test]
        fn hash_ignores_key_order_and_whitespace(map in prop::collection::btree_map("[a-z]{1,5}", arb_json(), 0..6)) {
            let original: Map<String, Value> = map.into_iter().collect();
            let text = reordered(&Value::Object(original.clone()));
            let reparsed: Map<String, Value> = serde_json::from_str(&text).unwrap();
            prop_assert_eq!(canonical_hash(&original), canonical_hash(&reparsed));
        }

        #[test]
        fn hash_changes_when_a_value_changes(map in prop::collection::btree_map("[a-z]{1,5}", arb_json(), 1..6), extra in "[a-z]{6}") {
            let original: Map<String, Value> = map.into_iter().collect();
            let mut changed = original.clone();
            let first = changed.keys().next().unwrap().clone();
            changed.insert(first, Value::String(extra));
            prop_assume!(changed != original);
            prop_assert_ne!(canonical_hash(&original), canonical_hash(&changed));
        }
    }
}
