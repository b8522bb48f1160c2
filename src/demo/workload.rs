//! Synthetic change streams with known answers, for the demo, the tests and the load
//! tests: creates, updates, unchanged repeats, exact duplicates, late stale versions,
//! deletes, records the CRM will reject, and malformed messages — and, for every record,
//! what the CRM must hold at the end.

use std::collections::BTreeMap;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::{json, Map, Value};

/// One tenant's part of the stream.
#[derive(Debug, Clone)]
pub struct TenantSpec {
    pub name: String,
    /// Entity names (as in the tenant's config); records are spread over them.
    pub entities: Vec<String>,
}

/// Shape of the stream. Ratios are probabilities per record (or per event, for
/// duplicates and unchanged repeats).
#[derive(Debug, Clone)]
pub struct WorkloadSpec {
    pub tenants: Vec<TenantSpec>,
    pub records_per_tenant: usize,
    /// Versions after the create, per record.
    pub updates_per_record: usize,
    /// Share of updates that repeat the previous payload under a new version.
    pub unchanged_ratio: f64,
    /// Share of events sent twice (the exact same message).
    pub duplicate_ratio: f64,
    /// Share of records that get a late, older version after a newer one.
    pub stale_ratio: f64,
    /// Share of records whose last event is a delete.
    pub delete_ratio: f64,
    /// Share of records that never carry the field the CRM requires (dead-lettered).
    pub invalid_ratio: f64,
    /// Tenant → contact data its CRM refuses, used for its invalid contacts instead of
    /// leaving out the last name (which a CRM without required fields accepts).
    pub invalid_contacts: BTreeMap<String, Map<String, Value>>,
    /// Malformed messages mixed in.
    pub malformed: usize,
    pub seed: u64,
}

impl WorkloadSpec {
    pub fn small(tenants: Vec<TenantSpec>, records_per_tenant: usize) -> Self {
        WorkloadSpec {
            tenants,
            records_per_tenant,
            updates_per_record: 3,
            unchanged_ratio: 0.3,
            duplicate_ratio: 0.1,
            stale_ratio: 0.1,
            delete_ratio: 0.1,
            invalid_ratio: 0.0,
            invalid_contacts: BTreeMap::new(),
            malformed: 0,
            seed: 7,
        }
    }
}

/// What the CRM must hold for a record at the end.
#[derive(Debug, Clone, PartialEq)]
pub enum Expected {
    /// The newest version's `data` (to be mapped with the tenant's field mapping).
    Present(Map<String, Value>),
    /// Deleted, or never accepted by the CRM.
    Absent,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkloadCounts {
    pub messages: usize,
    pub duplicates: usize,
    pub unchanged: usize,
    pub stale: usize,
    pub deletes: usize,
    pub invalid_records: usize,
    pub malformed: usize,
}

/// (tenant, entity, key) of a record.
pub type RecordId = (String, String, String);

#[derive(Debug, Clone)]
pub struct Workload {
    /// Kafka key and value, in produce order.
    pub messages: Vec<(String, Vec<u8>)>,
    pub expected: BTreeMap<RecordId, Expected>,
    pub counts: WorkloadCounts,
}

/// The Kafka key producers use: the record identity, so that all versions of a record
/// share a partition.
pub fn kafka_key(tenant: &str, entity: &str, key: &str) -> String {
    format!("{tenant}/{entity}/{key}")
}

/// An event envelope as producers write it.
pub fn envelope(event_id: &str, id: &RecordId, op: &str, version: u64, data: Option<&Map<String, Value>>) -> Vec<u8> {
    let mut e = json!({
        "event_id": event_id,
        "tenant": id.0,
        "entity": id.1,
        "key": id.2,
        "op": op,
        "version": version,
        "occurred_at": "2026-11-29T10:00:00Z",
    });
    if let Some(d) = data {
        e["data"] = Value::Object(d.clone());
    }
    e.to_string().into_bytes()
}

/// Source fields for an entity (`account`, `ticket`, anything else is a contact) of the
/// record `key`; `with_required` false leaves out what the CRM requires. A contact's
/// email is unique to its record, since some CRMs (Zendesk) also match users by email.
pub fn sample_data(entity: &str, key: &str, rng: &mut StdRng, with_required: bool) -> Map<String, Value> {
    const FIRST: [&str; 6] = ["Ada", "Grace", "Alan", "Edsger", "Barbara", "Ken"];
    const LAST: [&str; 6] = ["Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Thompson"];
    const CITY: [&str; 5] = ["London", "Arlington", "Manchester", "Austin", "Boston"];
    let n: u32 = rng.gen_range(0..1_000_000);
    let mut m = Map::new();
    if entity == "account" {
        if with_required {
            m.insert("name".into(), json!(format!("Company {n}")));
        }
        m.insert(
            "industry".into(),
            json!(["Software", "Retail", "Energy"][n as usize % 3]),
        );
        m.insert("employees".into(), json!(n % 5000));
    } else if entity == "ticket" {
        m.insert("subject".into(), json!(format!("Order {n} did not arrive")));
        m.insert("priority".into(), json!(["low", "normal", "high"][n as usize % 3]));
        if with_required {
            // The ticket's first comment: set on create, not on updates.
            m.insert("description".into(), json!(format!("Reported for {key}.")));
        }
    } else {
        m.insert("first_name".into(), json!(FIRST.choose(rng).copied().unwrap_or("Ada")));
        if with_required {
            m.insert(
                "last_name".into(),
                json!(LAST.choose(rng).copied().unwrap_or("Lovelace")),
            );
        }
        m.insert("email".into(), json!(format!("{}.{n}@example.com", key.to_lowercase())));
        m.insert(
            "address".into(),
            json!({"city": CITY.choose(rng).copied().unwrap_or("London")}),
        );
    }
    m
}

/// Builds the stream described by `spec`.
pub fn generate(spec: &WorkloadSpec) -> Workload {
    let mut rng = StdRng::seed_from_u64(spec.seed);
    let mut counts = WorkloadCounts::default();
    let mut expected = BTreeMap::new();
    let mut per_record: Vec<Vec<Vec<u8>>> = Vec::new();
    let mut keys: Vec<String> = Vec::new();
    let mut next_event = 0u64;
    let mut event_id = |rng: &mut StdRng| {
        next_event += 1;
        format!("evt-{next_event}-{:08x}", rng.gen::<u32>())
    };

    for tenant in &spec.tenants {
        for i in 0..spec.records_per_tenant {
            let entity = &tenant.entities[i % tenant.entities.len()];
            let id: RecordId = (tenant.name.clone(), entity.clone(), format!("R-{i:06}"));
            let invalid = rng.gen_bool(spec.invalid_ratio);
            counts.invalid_records += usize::from(invalid);
            let mut events: Vec<Vec<u8>> = Vec::new();
            let invalid_contact = spec
                .invalid_contacts
                .get(&tenant.name)
                .filter(|_| invalid && entity == "contact");
            let sample = |rng: &mut StdRng| match invalid_contact {
                Some(refused) => refused.clone(),
                None => sample_data(entity, &id.2, rng, !invalid),
            };
            let mut data = sample(&mut rng);
            let mut version = 1u64;
            events.push(envelope(&event_id(&mut rng), &id, "upsert", version, Some(&data)));
            let mut previous_data = data.clone();
            for _ in 0..spec.updates_per_record {
                version += 1;
                if rng.gen_bool(spec.unchanged_ratio) {
                    counts.unchanged += 1;
                } else {
                    previous_data = data.clone();
                    data = sample(&mut rng);
                }
                events.push(envelope(&event_id(&mut rng), &id, "upsert", version, Some(&data)));
            }
            if rng.gen_bool(spec.stale_ratio) {
                // An older version arrives late, with other data: it must not win.
                counts.stale += 1;
                events.push(envelope(
                    &event_id(&mut rng),
                    &id,
                    "upsert",
                    version - 1,
                    Some(&previous_data),
                ));
            }
            let deleted = rng.gen_bool(spec.delete_ratio);
            if deleted {
                counts.deletes += 1;
                version += 1;
                events.push(envelope(&event_id(&mut rng), &id, "delete", version, None));
            }
            let mut with_duplicates = Vec::with_capacity(events.len() + 2);
            for e in events {
                if rng.gen_bool(spec.duplicate_ratio) {
                    counts.duplicates += 1;
                    with_duplicates.push(e.clone());
                }
                with_duplicates.push(e);
            }
            expected.insert(
                id.clone(),
                if deleted || invalid {
                    Expected::Absent
                } else {
                    Expected::Present(data)
                },
            );
            keys.push(kafka_key(&id.0, &id.1, &id.2));
            per_record.push(with_duplicates);
        }
    }

    // Interleave records, keeping each record's events in order.
    let mut messages = Vec::new();
    let mut cursors: Vec<usize> = (0..per_record.len()).collect();
    let mut positions = vec![0usize; per_record.len()];
    while !cursors.is_empty() {
        let pick = rng.gen_range(0..cursors.len());
        let r = cursors[pick];
        messages.push((keys[r].clone(), per_record[r][positions[r]].clone()));
        positions[r] += 1;
        if positions[r] == per_record[r].len() {
            cursors.swap_remove(pick);
        }
    }

    let tenant0 = spec.tenants.first().map(|t| t.name.clone()).unwrap_or_default();
    for i in 0..spec.malformed {
        let body: Vec<u8> = match i % 4 {
            0 => b"{this is not json".to_vec(),
            1 => br#"{"event_id":"m","tenant":"acme","entity":"contact","op":"upsert","version":1}"#.to_vec(),
            2 => json!({"event_id": format!("m{i}"), "tenant": "no-such-tenant", "entity": "contact", "key": "X",
                        "op": "upsert", "version": 1, "occurred_at": "2026-11-29T10:00:00Z", "data": {}})
            .to_string()
            .into_bytes(),
            _ => json!({"event_id": format!("m{i}"), "tenant": tenant0, "entity": "contact", "key": "X",
                        "op": "merge", "version": 1, "occurred_at": "2026-11-29T10:00:00Z", "data": {}})
            .to_string()
            .into_bytes(),
        };
        let at = rng.gen_range(0..=messages.len());
        messages.insert(at, (format!("malformed-{i}"), body));
        counts.malformed += 1;
    }
    counts.messages = messages.len();
    Workload {
        messages,
        expected,
        counts,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_each_records_events_in_version_order_except_stale_ones() {
        let spec = WorkloadSpec {
            malformed: 3,
            ..WorkloadSpec::small(
                vec![TenantSpec {
                    name: "acme".into(),
                    entities: vec!["contact".into()],
                }],
                50,
            )
        };
        let w = generate(&spec);
        assert_eq!(w.counts.malformed, 3);
        assert_eq!(w.expected.len(), 50);
        let mut newest: BTreeMap<String, u64> = BTreeMap::new();
        let mut late = std::collections::HashSet::new();
        for (key, value) in &w.messages {
            let Ok(v) = serde_json::from_slice::<Value>(value) else {
                continue;
            };
            let Some(version) = v["version"].as_u64() else {
                continue;
            };
            let seen = newest.entry(key.clone()).or_default();
            if version < *seen {
                late.insert(v["event_id"].as_str().unwrap_or_default().to_string());
            }
            *seen = (*seen).max(version);
        }
        assert_eq!(late.len(), w.counts.stale);
    }
}
