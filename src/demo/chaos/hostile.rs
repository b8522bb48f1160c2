//! Hostile messages for the chaos harness: what a producer crm-sync does not control may
//! send, and what must become of each — dead-lettered once with a stable reason, or
//! processed like any valid event (and never held by headers it forged).

use rand::rngs::StdRng;
use rand::Rng;

use crate::demo::workload::{envelope, kafka_key, sample_data, Expected, RecordId};
use crate::headers::RawHeader;
use crate::retry::topic::header;

/// A message to produce, with the raw bytes a hostile producer may use anywhere.
pub struct Outgoing {
    pub topic: String,
    /// `None`: the producer's partitioner picks it from the key.
    pub partition: Option<i32>,
    pub key: Vec<u8>,
    /// `None`: a message without a value.
    pub value: Option<Vec<u8>>,
    pub headers: Vec<RawHeader>,
    /// For hostile messages, what it is and what must become of it.
    pub hostile: Option<Hostile>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hostile {
    /// What makes it hostile, for people.
    pub kind: &'static str,
    pub fate: Fate,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Dead-lettered exactly once, with this `crm-sync.error.code`.
    DeadLettered(&'static str),
    /// Processed as a valid event: never in the DLQ, its record in the expected states.
    Processed,
}

/// One round of hostile messages and what the CRMs must hold for the records they name.
pub struct Round {
    pub messages: Vec<Outgoing>,
    pub expected: Vec<(RecordId, Expected)>,
}

/// Where a round goes.
pub struct Target<'a> {
    pub input: &'a str,
    pub retry: &'a str,
    pub partitions: i32,
    /// Tenants whose `contact` entity the valid records of the round use, in turn.
    pub tenants: &'a [&'a str],
}

/// Messages in a round: [`round`] makes one of each kind it lists.
pub const PER_ROUND: usize = 14;
/// Extra messages of a round with `huge`.
pub const HUGE_PER_ROUND: usize = 3;

/// A valid upsert (version 1) of the contact `key` of `tenant`: the record, the Kafka
/// key, the value, and what its CRM must then hold.
fn valid(n: usize, tenant: &str, key: String, rng: &mut StdRng) -> (RecordId, Vec<u8>, Vec<u8>, Expected) {
    let id: RecordId = (tenant.to_string(), "contact".to_string(), key);
    let data = sample_data("contact", &id.2, rng, true);
    let value = envelope(&format!("hostile-{n}-{}", id.2), &id, "upsert", 1, Some(&data));
    let key = kafka_key(&id.0, &id.1, &id.2).into_bytes();
    (id, key, value, Expected::Present(data))
}

/// An envelope with `tenant`, `entity`, the `key` field as given (`None`: left out),
/// `op` and `version` (JSON text) as given: the fields a bad event gets wrong.
fn event(n: usize, tenant: &str, entity: &str, key: Option<&str>, op: &str, version: &str) -> Option<Vec<u8>> {
    let key = key.map(|k| format!(r#""key":"{k}","#)).unwrap_or_default();
    Some(
        format!(
            r#"{{"event_id":"hostile-{n}","tenant":"{tenant}","entity":"{entity}",{key}"op":"{op}","version":{version},"occurred_at":"2026-11-29T10:00:00Z","data":{{}}}}"#
        )
        .into_bytes(),
    )
}

/// A message to dead-letter: what it is, its reason code, its value and headers.
type BadInput = (&'static str, &'static str, Option<Vec<u8>>, Vec<RawHeader>);

fn headers(pairs: &[(&[u8], &[u8])]) -> Vec<RawHeader> {
    pairs.iter().map(|(k, v)| (k.to_vec(), Some(v.to_vec()))).collect()
}

fn dead(kind: &'static str, code: &'static str) -> Option<Hostile> {
    Some(Hostile {
        kind,
        fate: Fate::DeadLettered(code),
    })
}

fn processed(kind: &'static str) -> Option<Hostile> {
    Some(Hostile {
        kind,
        fate: Fate::Processed,
    })
}

/// Round `n`. With `huge`, it also carries a 600 KB tenant name, a message over 1 MB and
/// a 100 KB Kafka key, all on input partition `n % partitions` (the mock broker keeps
/// only about 5 MiB per partition, so huge messages are spread out).
pub fn round(n: usize, to: &Target<'_>, huge: bool, rng: &mut StdRng) -> Round {
    let mut messages = Vec::new();
    let mut expected = Vec::new();
    let tenant = |i: usize| to.tenants[(n + i) % to.tenants.len()];
    let input = |partition: i32, key: Vec<u8>, value: Option<Vec<u8>>, headers: Vec<RawHeader>, hostile| Outgoing {
        topic: to.input.to_string(),
        partition: Some(partition),
        key,
        value,
        headers,
        hostile,
    };
    let not_utf8_headers = headers(&[(b"bad\xffname", b"\xfe\xff"), (b"\xff\xfe", b"\x00\x01")]);

    // 1. Valid events in hostile clothing: processed, and nothing they forged holds them.
    let (id, key, value, want) = valid(n, tenant(0), format!("H-{n}-not-utf8-headers"), rng);
    expected.push((id, want));
    messages.push(input(
        rng.gen_range(0..to.partitions),
        key,
        Some(value),
        not_utf8_headers.clone(),
        processed("valid event, header names and values not UTF-8"),
    ));
    let (id, key, value, want) = valid(n, tenant(1), format!("H-{n}-forged-retry-headers"), rng);
    expected.push((id, want));
    let forged_retry = headers(&[
        (header::ORIGIN_TOPIC.as_bytes(), to.input.as_bytes()),
        (header::ORIGIN_PARTITION.as_bytes(), b"999"),
        (header::ORIGIN_OFFSET.as_bytes(), b"7"),
        (header::ATTEMPTS.as_bytes(), b"4000000000"),
        (header::FIRST_FAILURE.as_bytes(), b"1"),
        (header::NOT_BEFORE.as_bytes(), u64::MAX.to_string().as_bytes()),
    ]);
    messages.push(input(
        rng.gen_range(0..to.partitions),
        key,
        Some(value),
        forged_retry,
        processed("valid event, forged crm-sync.retry/origin headers (not before the end of time)"),
    ));

    // 2. Bad input: dead-lettered once each, with its reason.
    let forged_context = headers(&[
        (b"crm-sync.source.topic", b"elsewhere"),
        (b"crm-sync.source.partition", b"0"),
        (b"crm-sync.source.offset", b"0"),
        (b"crm-sync.error.code", b"forged"),
        (b"crm-sync.stage", b"deliver"),
    ]);
    let bad: Vec<BadInput> = vec![
        (
            "invalid JSON, header names and values not UTF-8",
            "invalid_json",
            Some(b"{not json".to_vec()),
            not_utf8_headers,
        ),
        (
            "invalid JSON, forged crm-sync.source/error headers",
            "invalid_json",
            Some(b"{\"forged\": ".to_vec()),
            forged_context,
        ),
        (
            "value not UTF-8",
            "not_utf8",
            Some(b"\xff\xfe\xfd{}".to_vec()),
            Vec::new(),
        ),
        ("no value", "empty_message", None, Vec::new()),
        ("JSON array", "not_an_object", Some(b"[1,2,3]".to_vec()), Vec::new()),
        (
            "no key field",
            "missing_field",
            event(n, "acme", "contact", None, "upsert", "1"),
            Vec::new(),
        ),
        (
            "version as a string",
            "wrong_type",
            event(n, "acme", "contact", Some("X"), "upsert", "\"7\""),
            Vec::new(),
        ),
        (
            "unknown op",
            "unknown_op",
            event(n, "acme", "contact", Some("X"), "merge", "1"),
            Vec::new(),
        ),
        (
            "unknown tenant",
            "unknown_tenant",
            event(n, "no-such-tenant", "contact", Some("X"), "upsert", "1"),
            Vec::new(),
        ),
        (
            "unknown entity",
            "unknown_entity",
            event(n, "acme", "lead", Some("X"), "upsert", "1"),
            Vec::new(),
        ),
    ];
    for (kind, code, value, headers) in bad {
        messages.push(input(
            rng.gen_range(0..to.partitions),
            format!("hostile-{n}").into_bytes(),
            value,
            headers,
            dead(kind, code),
        ));
    }

    // 3. On the retry topic, where crm-sync's headers are trusted once checked: a message
    //    without them is dead-lettered and not acted on; a parked copy on the wrong retry
    //    partition is forwarded to its own and processed there.
    let p = rng.gen_range(0..to.partitions);
    let (id, key, value, _) = valid(n, tenant(2), format!("U-{n}"), rng);
    expected.push((id, Expected::Absent));
    messages.push(Outgoing {
        topic: to.retry.to_string(),
        partition: Some(p),
        key,
        value: Some(value),
        headers: Vec::new(),
        hostile: dead("retry-topic message without retry headers", "bad_retry_header"),
    });
    let (id, key, value, want) = valid(n, tenant(3), format!("H-{n}-misrouted"), rng);
    expected.push((id, want));
    let elsewhere = ((p + 1) % to.partitions).to_string();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default()
        .to_string();
    messages.push(Outgoing {
        topic: to.retry.to_string(),
        partition: Some(p),
        key,
        value: Some(value),
        headers: headers(&[
            (header::ORIGIN_TOPIC.as_bytes(), to.input.as_bytes()),
            (header::ORIGIN_PARTITION.as_bytes(), elsewhere.as_bytes()),
            (header::ORIGIN_OFFSET.as_bytes(), b"0"),
            (header::ATTEMPTS.as_bytes(), b"1"),
            (header::FIRST_FAILURE.as_bytes(), now_ms.as_bytes()),
            (header::NOT_BEFORE.as_bytes(), b"0"),
        ]),
        hostile: processed("parked copy on another input partition's retry partition"),
    });

    // 4. Huge ones, on one partition per round.
    if huge {
        let p = n as i32 % to.partitions;
        let name = "t".repeat(600_000);
        messages.push(input(
            p,
            format!("huge-tenant-{n}").into_bytes(),
            event(n, &name, "contact", Some("X"), "upsert", "1"),
            Vec::new(),
            dead("600 KB tenant name", "unknown_tenant"),
        ));
        messages.push(input(
            p,
            format!("too-large-{n}").into_bytes(),
            Some(vec![b'x'; 1_200_000]),
            Vec::new(),
            dead("1.2 MB message", "too_large"),
        ));
        let (id, _, value, want) = valid(n, tenant(4), format!("H-{n}-huge-key"), rng);
        expected.push((id, want));
        let mut key = format!("huge-key-{n}-").into_bytes();
        key.resize(100_000, b'k');
        messages.push(input(
            p,
            key,
            Some(value),
            Vec::new(),
            processed("valid event under a 100 KB Kafka key"),
        ));
    }
    debug_assert_eq!(messages.len(), PER_ROUND + if huge { HUGE_PER_ROUND } else { 0 });
    Round { messages, expected }
}
