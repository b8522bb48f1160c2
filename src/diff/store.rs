//! The durable side of the diff cache: a compacted Kafka topic of confirmed states.
//!
//! Why: a partition's new owner (after a restart, a crash or a rebalance) starts with an
//! empty cache. Without the record versions its predecessor confirmed, a late, older
//! version that arrives after the committed offset would be written over a newer one,
//! and every unchanged event would cost a call again. So every change to a record's
//! confirmed state is written here — keyed by the record, to the same partition number
//! as the event's source partition — and acknowledged *before* the event's offset may be
//! committed; and a partition's new owner reads that state partition back before it
//! handles the partition's first message.

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaResult;
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

use futures::future::BoxFuture;

use super::RecordState;
use crate::connectors::holds::{HoldLog, HoldMarker};
use crate::event::{PayloadHash, RecordKey};
use crate::telemetry::metric;

#[derive(Serialize, Deserialize)]
struct StateRecord {
    tenant: String,
    entity: String,
    key: String,
    version: u64,
    /// Hex of the payload hash; `null` for a tombstone.
    payload: Option<String>,
    event: u64,
}

fn hex(h: &PayloadHash) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(2 * h.0.len());
    for b in h.0 {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    out
}

fn unhex(s: &str) -> Option<PayloadHash> {
    if s.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, chunk) in s.as_bytes().chunks(2).enumerate() {
        out[i] = u8::from_str_radix(std::str::from_utf8(chunk).ok()?, 16).ok()?;
    }
    Some(PayloadHash(out))
}

/// A message that was dead-lettered, by its Kafka coordinates: written to the state
/// topic (its origin's partition) once its DLQ record is durable, so that a later owner
/// that reads the message again (its offset was not committed before a crash) does not
/// dead-letter it a second time. Markers of offsets below the committed one are ignored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLettered {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// A dead-lettering begun: written under the same key as [`DeadLettered`] *before* the
/// DLQ record, naming the DLQ partition that record goes to and an offset of it at or
/// below the record's. A member killed between the DLQ record and its `DeadLettered`
/// leaves this behind; the next owner looks for the record from `from_offset` on (by the
/// id it carries) and so never writes it twice.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLettering {
    pub message: DeadLettered,
    /// Unique to this dead-lettering, and carried by its DLQ record
    /// (`crm-sync.dead-letter.id`): what the next owner looks for.
    pub id: String,
    pub dlq_partition: i32,
    pub from_offset: i64,
}

#[derive(Serialize, Deserialize)]
enum MarkerRecord {
    #[serde(rename = "dead_lettered")]
    Done(DeadLettered),
    #[serde(rename = "dead_lettering")]
    Begun(DeadLettering),
}

const DEAD_LETTER_KEY: &str = "\u{1f}dead-lettered\u{1f}";

impl DeadLettered {
    /// The key of this message's markers (begun, done, or a tombstone) on the state topic.
    pub fn key(&self) -> String {
        format!(
            "{DEAD_LETTER_KEY}{}\u{1f}{}\u{1f}{}",
            self.topic, self.partition, self.offset
        )
    }

    /// Key and value on the state topic.
    pub fn encode(&self) -> (String, Vec<u8>) {
        let value = serde_json::to_vec(&MarkerRecord::Done(self.clone())).unwrap_or_default();
        (self.key(), value)
    }

    pub fn decode(bytes: &[u8]) -> Option<Self> {
        match serde_json::from_slice(bytes).ok()? {
            MarkerRecord::Done(m) => Some(m),
            MarkerRecord::Begun(_) => None,
        }
    }
}

impl DeadLettering {
    /// Key and value on the state topic.
    pub fn encode(&self) -> (String, Vec<u8>) {
        let value = serde_json::to_vec(&MarkerRecord::Begun(self.clone())).unwrap_or_default();
        (self.message.key(), value)
    }
}

#[derive(Serialize, Deserialize)]
struct HoldRecord {
    hold: HoldMarker,
}

/// A hold's key on the state topic: one per record and holder (compaction keeps the
/// latest of each, and a tombstone deletes it). Its parts are a JSON array, so no part
/// can run into the next.
fn hold_key(m: &HoldMarker) -> String {
    let parts = serde_json::to_string(&[&m.tenant, &m.object, &m.external_id, &m.by]).unwrap_or_default();
    format!("\u{1f}hold{parts}")
}

fn decode_hold(bytes: &[u8]) -> Option<HoldMarker> {
    serde_json::from_slice::<HoldRecord>(bytes).ok().map(|r| r.hold)
}

/// What a state partition holds besides confirmed states.
#[derive(Debug, Default)]
pub struct Markers {
    pub dead_lettered: Vec<DeadLettered>,
    /// Dead-letterings begun and not known to have ended (see [`DeadLettering`]).
    pub dead_lettering: Vec<DeadLettering>,
    pub holds: Vec<HoldMarker>,
}

/// The record identity as the state topic's message key (what compaction keeps one of).
fn state_key(record: &RecordKey) -> String {
    format!("{}\u{1f}{}\u{1f}{}", record.tenant, record.entity, record.key)
}

pub fn encode(record: &RecordKey, state: &RecordState) -> Vec<u8> {
    serde_json::to_vec(&StateRecord {
        tenant: record.tenant.to_string(),
        entity: record.entity.to_string(),
        key: record.key.to_string(),
        version: state.version,
        payload: state.payload.as_ref().map(hex),
        event: state.event,
    })
    .unwrap_or_default()
}

pub fn decode(bytes: &[u8]) -> Option<(RecordKey, RecordState)> {
    let r: StateRecord = serde_json::from_slice(bytes).ok()?;
    let payload = match r.payload {
        Some(h) => Some(unhex(&h)?),
        None => None,
    };
    Some((
        RecordKey {
            tenant: r.tenant.into(),
            entity: r.entity.into(),
            key: r.key.into(),
        },
        RecordState {
            version: r.version,
            payload,
            event: r.event,
        },
    ))
}

/// Writes confirmed states; cheap to clone.
#[derive(Clone)]
pub struct StateStore {
    producer: FutureProducer,
    topic: std::sync::Arc<str>,
}

impl StateStore {
    pub fn new(producer: FutureProducer, topic: &str) -> Self {
        StateStore {
            producer,
            topic: topic.into(),
        }
    }

    /// Writes records' confirmed states (state partition, record, state), all at once,
    /// each retried until acknowledged.
    pub async fn persist_all(&self, states: Vec<(i32, RecordKey, RecordState)>) {
        let writes = states
            .iter()
            .map(|(partition, record, state)| self.persist(*partition, record, state));
        futures::future::join_all(writes).await;
    }

    /// Writes one record's confirmed state to `partition`, retrying until acknowledged.
    /// Until it returns, the event's outcome is not final, so its offset stays uncommitted.
    pub async fn persist(&self, partition: i32, record: &RecordKey, state: &RecordState) {
        self.write(partition, &state_key(record), &encode(record, state)).await;
    }

    /// Writes one message to `partition`, retrying until acknowledged.
    async fn write(&self, partition: i32, key: &str, value: &[u8]) {
        let mut delay = Duration::from_millis(100);
        loop {
            let msg = FutureRecord::to(&self.topic)
                .partition(partition)
                .key(key)
                .payload(value);
            match self.producer.send(msg, Duration::from_secs(30)).await {
                Ok(_) => return,
                Err((e, _)) => {
                    metrics::counter!(metric::STATE_WRITE_FAILURES).increment(1);
                    tracing::error!(topic = %self.topic, error = %e, "Could not write confirmed state; retrying.");
                    // Backoff between attempts; the event stays undecided meanwhile.
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

impl HoldLog for StateStore {
    fn record(&self, markers: Vec<HoldMarker>) -> BoxFuture<'static, ()> {
        let store = self.clone();
        Box::pin(async move {
            let writes = markers.iter().filter_map(|m| {
                let value = serde_json::to_vec(&HoldRecord { hold: m.clone() }).ok()?;
                let store = &store;
                Some(async move { store.write(m.partition, &hold_key(m), &value).await })
            });
            futures::future::join_all(writes).await;
        })
    }

    fn forget(&self, markers: Vec<HoldMarker>) -> BoxFuture<'static, ()> {
        let store = self.clone();
        Box::pin(async move {
            for m in markers {
                let key = hold_key(&m);
                let tombstone = FutureRecord::<str, [u8]>::to(&store.topic)
                    .partition(m.partition)
                    .key(&key);
                // One try: a marker left behind only holds its record again, briefly,
                // after a restore.
                if let Err((e, _)) = store.producer.send(tombstone, Duration::from_secs(30)).await {
                    tracing::debug!(error = %e, "Could not delete a hold's marker.");
                }
            }
        })
    }
}

/// States handed on at a time while a partition is read back, so that a large partition
/// is never held in memory whole.
const RESTORE_CHUNK: usize = 10_000;

/// Reads state partitions from their start to their current end, with one client, and
/// hands the states to `sink` in chunks as they come, and the dead-letter and hold markers to
/// `markers`. Returns how many states were read. A partition the topic does not have is
/// an error: its states cannot be read.
pub fn restore(
    client: &ClientConfig,
    topic: &str,
    partitions: &[i32],
    timeout: Duration,
    mut sink: impl FnMut(Vec<(RecordKey, RecordState)>),
    markers: &mut Markers,
) -> KafkaResult<usize> {
    let consumer: BaseConsumer = client
        .clone()
        .set("enable.auto.commit", "false")
        .set("group.id", "crm-sync-state-restore")
        .create()?;
    let metadata = consumer.fetch_metadata(Some(topic), timeout)?;
    let have = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none())
        .map_or(0, |t| t.partitions().len());
    if let Some(missing) = partitions
        .iter()
        .find(|p| usize::try_from(**p).map_or(true, |p| p >= have))
    {
        tracing::error!(
            topic,
            partition = missing,
            partitions = have,
            "The state topic has no partition for this input partition; add partitions to it."
        );
        return Err(rdkafka::error::KafkaError::MetadataFetch(
            rdkafka::types::RDKafkaErrorCode::UnknownPartition,
        ));
    }
    let mut tpl = TopicPartitionList::new();
    let mut ends = std::collections::HashMap::new();
    for &p in partitions {
        let (low, high) = consumer.fetch_watermarks(topic, p, timeout)?;
        if high > low {
            tpl.add_partition_offset(topic, p, Offset::Offset(low))?;
            ends.insert(p, high);
        }
    }
    let mut read = 0;
    if ends.is_empty() {
        return Ok(read);
    }
    consumer.assign(&tpl)?;
    let deadline = std::time::Instant::now() + timeout;
    let mut chunk = Vec::new();
    // The latest dead-letter marker of each message: a later one replaces an earlier,
    // a tombstone deletes it.
    let mut dead_letters: HashMap<Vec<u8>, MarkerRecord> = HashMap::new();
    while !ends.is_empty() {
        if std::time::Instant::now() > deadline {
            return Err(rdkafka::error::KafkaError::MessageConsumption(
                rdkafka::types::RDKafkaErrorCode::OperationTimedOut,
            ));
        }
        let Some(message) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let message = message?;
        if ends
            .get(&message.partition())
            .is_some_and(|end| message.offset() + 1 >= *end)
        {
            ends.remove(&message.partition());
        }
        if let Some(decoded) = message.payload().and_then(decode) {
            chunk.push(decoded);
            read += 1;
            if chunk.len() >= RESTORE_CHUNK {
                sink(std::mem::take(&mut chunk));
            }
        } else if let Some(key) = message.key().filter(|k| k.starts_with(DEAD_LETTER_KEY.as_bytes())) {
            match message.payload().and_then(|p| serde_json::from_slice(p).ok()) {
                Some(marker) => dead_letters.insert(key.to_vec(), marker),
                None => dead_letters.remove(key),
            };
        } else if let Some(hold) = message.payload().and_then(decode_hold) {
            markers.holds.push(hold);
        }
    }
    if !chunk.is_empty() {
        sink(chunk);
    }
    for marker in dead_letters.into_values() {
        match marker {
            MarkerRecord::Done(m) => markers.dead_lettered.push(m),
            MarkerRecord::Begun(m) => markers.dead_lettering.push(m),
        }
    }
    Ok(read)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_records_round_trip() {
        let key = RecordKey {
            tenant: "acme".into(),
            entity: "contact".into(),
            key: "C-1/2".into(),
        };
        for payload in [Some(PayloadHash([0xab; 16])), None] {
            let state = RecordState {
                version: 9,
                payload,
                event: 42,
            };
            assert_eq!(decode(&encode(&key, &state)), Some((key.clone(), state)));
        }
        assert_eq!(decode(b"{}"), None);
    }
}
