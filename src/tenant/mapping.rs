//! Field mapping: event `data` paths to CRM field names, per entity.
//!
//! Pure. A path absent from the event leaves its CRM field out of the write (so the CRM
//! keeps what it has); an explicit `null` is sent as `null` (which clears the field).

use std::collections::BTreeMap;

use serde_json::{Map, Value};

/// Looks a dot-separated path up in `data`.
pub fn lookup<'a>(data: &'a Map<String, Value>, path: &str) -> Option<&'a Value> {
    let mut parts = path.split('.');
    let mut current = data.get(parts.next()?)?;
    for part in parts {
        current = current.as_object()?.get(part)?;
    }
    Some(current)
}

/// Builds the CRM field map from `fields` (CRM field → data path).
pub fn map_fields(data: &Map<String, Value>, fields: &BTreeMap<String, String>) -> Map<String, Value> {
    let mut out = Map::new();
    for (crm_field, path) in fields {
        if let Some(v) = lookup(data, path) {
            out.insert(crm_field.clone(), v.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn maps_nested_paths_and_leaves_absent_ones_out() {
        let data = json!({"first": "Ada", "address": {"city": "London"}, "phone": null});
        let data = data.as_object().unwrap();
        let fields: BTreeMap<String, String> = [
            ("FirstName", "first"),
            ("MailingCity", "address.city"),
            ("Phone", "phone"),
            ("Email", "email"),
            ("MailingZip", "address.zip"),
        ]
        .into_iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
        let mapped = map_fields(data, &fields);
        assert_eq!(
            Value::Object(mapped),
            json!({"FirstName": "Ada", "MailingCity": "London", "Phone": null})
        );
    }
}
