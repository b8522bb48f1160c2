//! Any bytes on the wire: every message a producer we do not control can send is either
//! processed or dead-lettered once with a reason, and the partition moves on. Header
//! names and values that are not UTF-8, forged `crm-sync.*` headers, huge keys, huge
//! names and messages too large to write again, on the input and on the retry topic.

mod common;

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use crm_sync::consume::StopMode;
use crm_sync::headers::{HeaderList, RawHeader};
use crm_sync::pipeline::{self, ActorKind};
use crm_sync::retry::topic::header;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};

const WAIT: Duration = Duration::from_secs(60);

/// A message as a hostile producer would send it: any key, value and headers, to one
/// partition.
struct Raw {
    key: Vec<u8>,
    value: Vec<u8>,
    headers: Vec<RawHeader>,
}

fn raw(key: &str, value: Vec<u8>, headers: &[(&[u8], &[u8])]) -> Raw {
    Raw {
        key: key.as_bytes().to_vec(),
        value,
        headers: headers.iter().map(|(k, v)| (k.to_vec(), Some(v.to_vec()))).collect(),
    }
}

fn produce_raw(env: &Env, topic: &str, partition: i32, messages: Vec<Raw>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &env.bootstrap)
            .set("message.max.bytes", "3000000")
            .create()
            .unwrap();
        for m in messages {
            let mut headers = HeaderList::with_capacity(m.headers.len());
            for (k, v) in &m.headers {
                headers.add(k, v.as_deref());
            }
            let record = FutureRecord::to(topic)
                .partition(partition)
                .key(&m.key)
                .payload(&m.value)
                .headers(headers.into_owned());
            producer.send(record, Duration::from_secs(30)).await.unwrap();
        }
    });
}

fn now_ms() -> String {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis()
        .to_string()
}

#[test]
fn every_hostile_message_is_dead_lettered_once_or_processed_and_the_partition_moves_on() {
    let env = Env::new(2);
    let mut config = env.config();
    config.kafka.retry_topic = Some(env.retry.clone());
    let service = pipeline::start(config).unwrap();
    let huge_tenant = "t".repeat(600_000);
    let forged_not_before = u64::MAX.to_string();

    // 1. On one input partition, in this order:
    let input = vec![
        // a valid event whose header name and value are not UTF-8: processed;
        raw(
            "acme/contact/C-1",
            upsert("e1", "C-1", 1, "Ada", "Lovelace").1,
            &[(b"bad\xffkey", b"\xfe\xff")],
        ),
        // not JSON, with such a header: dead-lettered with the header's bytes kept;
        raw("junk", b"{not json".to_vec(), &[(b"\xff\xfe", b"\x00\x01")]),
        // a valid event with forged internal headers (a retry state that would hold it
        // for good, and an origin partition that does not exist): processed now;
        raw(
            "acme/contact/C-2",
            upsert("e2", "C-2", 1, "Grace", "Hopper").1,
            &[
                (header::ORIGIN_TOPIC.as_bytes(), env.topic.as_bytes()),
                (header::ORIGIN_PARTITION.as_bytes(), b"999"),
                (header::ORIGIN_OFFSET.as_bytes(), b"7"),
                (header::ATTEMPTS.as_bytes(), b"3"),
                (header::FIRST_FAILURE.as_bytes(), b"1"),
                (header::NOT_BEFORE.as_bytes(), forged_not_before.as_bytes()),
            ],
        ),
        // a 600 KB tenant name: dead-lettered, the name not echoed whole;
        raw(
            "huge-tenant",
            format!(
                r#"{{"event_id":"e3","tenant":"{huge_tenant}","entity":"contact","key":"X","op":"upsert","version":1,"occurred_at":"2026-11-29T10:00:00Z","data":{{}}}}"#
            )
            .into_bytes(),
            &[],
        ),
        // a 600 KB record key in the envelope: dead-lettered (its state record could never
        // be written, which held the partition for good);
        raw(
            "huge-record-key",
            upsert("e7", &"r".repeat(600_000), 1, "Huge", "Key").1,
            &[],
        ),
        // a message larger than any the service can write again: dead-lettered trimmed;
        raw("too-large", vec![b'x'; 1_200_000], &[]),
        // a valid event under a 500 KB Kafka key: processed (the envelope names the record);
        Raw {
            key: vec![b'k'; 500_000],
            value: upsert("e5", "C-5", 1, "Alan", "Turing").1,
            headers: Vec::new(),
        },
        // and a last valid event: the partition moved on past all of the above.
        raw(
            "acme/contact/C-3",
            upsert("e4", "C-3", 1, "Edsger", "Dijkstra").1,
            &[],
        ),
    ];
    produce_raw(&env, &env.topic, 0, input);

    // 2. On the retry topic: a message without retry headers, and a parked copy that
    //    belongs to another retry partition (it must be forwarded there and delivered).
    let misrouted = raw(
        "acme/contact/C-4",
        upsert("e6", "C-4", 1, "Barbara", "Liskov").1,
        &[
            (header::ORIGIN_TOPIC.as_bytes(), env.topic.as_bytes()),
            (header::ORIGIN_PARTITION.as_bytes(), b"1"),
            (header::ORIGIN_OFFSET.as_bytes(), b"0"),
            (header::ATTEMPTS.as_bytes(), b"1"),
            (header::FIRST_FAILURE.as_bytes(), now_ms().as_bytes()),
            (header::NOT_BEFORE.as_bytes(), b"0"),
        ],
    );
    let unparked = raw("acme/contact/C-9", upsert("e9", "C-9", 1, "No", "Headers").1, &[]);
    produce_raw(&env, &env.retry, 0, vec![unparked, misrouted]);

    // 3. Everything is decided and committed, on both topics.
    assert!(env.wait_drained(WAIT), "a hostile message holds a partition");
    for key in ["C-1", "C-2", "C-3", "C-4", "C-5"] {
        assert!(env.contact(key).is_some(), "{key} was not delivered");
    }
    assert!(
        env.contact("C-9").is_none(),
        "a retry message without headers was acted on"
    );

    // 4. The DLQ holds each bad message once, with its reason.
    let dlq = env.read_dlq();
    let mut codes: HashMap<String, usize> = HashMap::new();
    for m in &dlq {
        *codes
            .entry(m.header("crm-sync.error.code").unwrap_or("?").to_string())
            .or_default() += 1;
    }
    let expected: HashMap<String, usize> = [
        ("invalid_json", 1),
        ("unknown_tenant", 1),
        ("too_large", 1),
        ("bad_retry_header", 1),
        ("field_too_long", 1),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    assert_eq!(codes, expected);
    let junk = dlq
        .iter()
        .find(|m| m.key.as_deref() == Some(b"junk".as_slice()))
        .unwrap();
    assert!(
        junk.raw_headers
            .contains(&(b"\xff\xfe".to_vec(), Some(b"\x00\x01".to_vec()))),
        "the original header bytes are kept: {:?}",
        junk.raw_headers
    );
    let trimmed = dlq
        .iter()
        .find(|m| m.header("crm-sync.error.code") == Some("too_large"))
        .unwrap();
    assert!(trimmed.payload.as_ref().unwrap().len() <= 4_096);
    assert_eq!(
        trimmed.header("crm-sync.trimmed"),
        Some("key=9 value=1200000 headers=0")
    );
    assert_eq!(trimmed.header("crm-sync.source.offset"), Some("5"));
    // Echoed strings are capped: no record or failure event carries the 600 KB name.
    for m in dlq
        .iter()
        .filter(|m| m.header("crm-sync.error.code") == Some("unknown_tenant"))
    {
        assert!(m.header("crm-sync.error.message").unwrap().len() < 2_048);
    }
    let failures = env.read_failures();
    assert_eq!(failures.len(), 5);
    for f in &failures {
        assert!(f.payload.as_ref().unwrap().len() < 4_096, "failure event not capped");
    }
    service.stop(StopMode::Graceful);
}

/// The consumer thread is the one part no supervisor restarts. If it dies, the service
/// must say so (readiness and liveness fail) and end, so that an orchestrator restarts
/// the process, instead of staying up with nothing consumed.
#[test]
fn a_dead_consumer_thread_fails_the_health_checks_and_ends_the_service() {
    let env = Env::new(1);
    let service = pipeline::start(env.config()).unwrap();
    let url = |path: &str| format!("http://{}{path}", service.http_addr());
    assert!(wait_until(WAIT, || http_get(url("/health/ready")).0 == 200));
    assert_eq!(http_get(url("/health/live")).0, 200);
    service.inject_panic(ActorKind::Consumer);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let died = rt.block_on(async { tokio::time::timeout(WAIT, service.died()).await.is_ok() });
    assert!(died, "the service did not report its death");
    assert!(service.is_dead());
    service.stop(StopMode::Abort);
}
