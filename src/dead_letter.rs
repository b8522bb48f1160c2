//! Terminal failures: the dead-letter topic and the failures topic.
//!
//! Promise: an event whose outcome is "dead-lettered" is durably in the DLQ topic (its
//! original key, value and headers, plus error-context headers) *and* described by one
//! JSON event on the failures topic before its offset may be committed. A write that the
//! broker refuses is retried until it succeeds; until then the offset stays uncommitted,
//! so a crash meanwhile means re-delivery, not loss. Credentials never reach either topic.
//!
//! One DLQ record per message, even across a `kill -9`: a marker on the state topic says
//! that a message's dead-lettering has begun (and where its record goes) before the
//! record is written, and another that it is done after; the next owner of a message
//! whose dead-lettering began and did not end looks for its record in the DLQ
//! ([`find_written`]) instead of writing it again.
//!
//! A write that can never succeed is not retried. A record too large for the producer
//! (`message.max.bytes`) is dead-lettered *trimmed*: error context and a reference to the
//! source offset, the payload cut ([`TRIMMED_PAYLOAD_BYTES`]). Strings echoed from input
//! or from a CRM (error messages, names, keys) are capped ([`ECHO_BYTES`]) in every header
//! and failure event, so that no input can make its own dead-letter record too large. A
//! parked copy that can never be written is reported to the caller, which keeps the
//! retry in memory.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use chrono::{DateTime, SecondsFormat, Utc};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};
use serde_json::json;

use crate::diff::store::{DeadLettered, DeadLettering};
use crate::event::Event;
use crate::headers::{HeaderList, RawHeader};
use crate::retry::topic::{Origin, RetryRoute, RetryState};
use crate::telemetry::metric;

/// A message as read from Kafka, kept until its outcome is final.
#[derive(Debug, Clone)]
pub struct SourceMessage {
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    /// As the producer sent them, whatever their bytes.
    pub headers: Vec<RawHeader>,
    /// Where the event was first read from: these coordinates for a message of an input
    /// topic, the checked origin headers for one of the retry topic.
    pub origin: Origin,
    /// The checked retry state of a message of the retry topic; `None` for input topics,
    /// whatever headers they carry.
    pub retried: Option<RetryState>,
    /// When this member read it.
    pub read_at: SystemTime,
}

impl SourceMessage {
    /// A message read from `topic`: its own coordinates are its origin until the retry
    /// topic's headers, once checked, say otherwise.
    pub fn new(
        topic: Arc<str>,
        partition: i32,
        offset: i64,
        key: Option<Vec<u8>>,
        payload: Option<Vec<u8>>,
        headers: Vec<RawHeader>,
    ) -> Self {
        SourceMessage {
            origin: Origin {
                topic: topic.clone(),
                partition,
                offset,
            },
            topic,
            partition,
            offset,
            key,
            payload,
            headers,
            retried: None,
            read_at: SystemTime::now(),
        }
    }
}

impl SourceMessage {
    /// Bytes of key, value and headers: what counts against a producer's
    /// `message.max.bytes` when the message is written again.
    pub fn wire_size(&self) -> usize {
        let headers: usize = self
            .headers
            .iter()
            .map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len))
            .sum();
        self.key.as_ref().map_or(0, Vec::len) + self.payload.as_ref().map_or(0, Vec::len) + headers
    }
}

/// Why and how an event failed for good.
#[derive(Debug, Clone)]
pub struct Failure {
    /// `decode` (bad input) or `deliver` (the CRM refused or never accepted it).
    pub stage: &'static str,
    /// Stable reason code, e.g. `invalid_json`, `crm_validation`.
    pub code: &'static str,
    /// `permanent`, or `retryable` when the retries were used up.
    pub class: &'static str,
    pub http_status: Option<u16>,
    pub crm_code: Option<String>,
    pub message: String,
    pub attempts: u32,
    pub first_failure: SystemTime,
    pub last_failure: SystemTime,
}

/// Producer side of the DLQ, failures and retry topics; cheap to clone.
#[derive(Clone)]
pub struct DeadLetters {
    producer: FutureProducer,
    dlq_topic: Arc<str>,
    /// The DLQ topic's partitions: an event's DLQ record goes to its origin partition's
    /// number modulo this, so that its begun marker can say where to look for it.
    dlq_partitions: i32,
    /// Per DLQ partition, an offset at or below that of the next record written to it,
    /// and when it was learnt (see [`DeadLetters::lower_bound`]).
    bounds: Arc<Mutex<HashMap<i32, (i64, Instant)>>>,
    failures_topic: Arc<str>,
    retry: Option<RetryRoute>,
    /// Where a dead-lettered message's marker goes (see [`DeadLettered`]).
    state_topic: Arc<str>,
}

/// How old a DLQ partition's known lower bound may be before it is read again: what a
/// next owner scans after a crash is at most this long of the group's DLQ records.
const BOUND_FRESH_FOR: Duration = Duration::from_secs(30);

fn rfc3339(t: SystemTime) -> String {
    DateTime::<Utc>::from(t).to_rfc3339_opts(SecondsFormat::Millis, true)
}

impl DeadLetters {
    pub fn new(
        producer: FutureProducer,
        (dlq_topic, dlq_partitions): (&str, i32),
        failures_topic: &str,
        retry: Option<RetryRoute>,
        state_topic: &str,
    ) -> Self {
        DeadLetters {
            producer,
            dlq_topic: dlq_topic.into(),
            dlq_partitions: dlq_partitions.max(1),
            bounds: Arc::default(),
            failures_topic: failures_topic.into(),
            retry,
            state_topic: state_topic.into(),
        }
    }

    /// Whether there is a retry topic to park on.
    pub fn parks(&self) -> bool {
        self.retry.is_some()
    }

    /// Whether an event of this origin can be parked: there is a retry topic, with a
    /// partition for its input partition.
    pub fn can_park(&self, origin: &Origin) -> bool {
        self.retry
            .as_ref()
            .is_some_and(|r| r.partition_for(&origin.topic, origin.partition).is_some())
    }

    /// Writes the event (original key, value and headers) to its origin's retry
    /// partition with its retry state, retrying until acknowledged. Its offset may then be
    /// released: the event lives on in the retry topic. Fails only when the copy can never
    /// be written (see [`can_park`](Self::can_park) and [`Unwritable`]).
    pub async fn park(&self, source: &SourceMessage, state: RetryState) -> Result<(), Unwritable> {
        let route = self.retry.as_ref().ok_or(Unwritable::NoRetryTopic)?;
        let partition = route
            .partition_for(&source.origin.topic, source.origin.partition)
            .ok_or(Unwritable::NoRetryTopic)?;
        let headers = RetryRoute::headers(&source.headers, &source.origin, &state);
        self.produce(
            &route.topic,
            Some(partition),
            source.key.as_deref(),
            source.payload.as_deref(),
            Some(&headers),
        )
        .await
        .map(|_| ())
    }

    /// Writes the DLQ record and the failure event, retrying until both are acknowledged.
    /// A DLQ record too large to write goes trimmed instead.
    pub async fn dead_letter(&self, source: &SourceMessage, event: Option<&Event>, failure: &Failure) {
        let origin = &source.origin;
        let partition = origin.partition.to_string();
        let offset = origin.offset.to_string();
        let attempts = failure.attempts.to_string();
        let first = rfc3339(failure.first_failure);
        let last = rfc3339(failure.last_failure);
        let status = failure.http_status.map(|s| s.to_string());
        let message = cap(&failure.message);
        let crm_code = failure.crm_code.as_deref().map(cap);
        let mut context: Vec<(&str, &str)> = vec![
            ("crm-sync.stage", failure.stage),
            ("crm-sync.error.code", failure.code),
            ("crm-sync.error.class", failure.class),
            ("crm-sync.error.message", &message),
            ("crm-sync.attempts", &attempts),
            ("crm-sync.first-failure", &first),
            ("crm-sync.last-failure", &last),
            ("crm-sync.source.topic", &origin.topic),
            ("crm-sync.source.partition", &partition),
            ("crm-sync.source.offset", &offset),
        ];
        // Unique to this dead-lettering (see `DeadLettering`): the last header, so that
        // a forged one among the original headers is never taken for it.
        let id = format!("{:032x}", rand::random::<u128>());
        if let Some(s) = &status {
            context.push(("crm-sync.crm.status", s));
        }
        if let Some(c) = &crm_code {
            context.push(("crm-sync.crm.code", c));
        }
        context.push((DEAD_LETTER_ID, &id));
        let context: Vec<RawHeader> = context
            .into_iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), Some(v.as_bytes().to_vec())))
            .collect();
        let mut headers = source.headers.clone();
        headers.extend(context.iter().cloned());

        let failure_event = json!({
            "kind": "dead_lettered",
            "stage": failure.stage,
            "error_code": failure.code,
            "error_class": failure.class,
            "crm_status": failure.http_status,
            "crm_code": crm_code,
            "message": message,
            "attempts": failure.attempts,
            "first_failure_at": first,
            "last_failure_at": last,
            "tenant": event.map(|e| cap(&e.record.tenant)),
            "entity": event.map(|e| cap(&e.record.entity)),
            "key": event.map(|e| cap(&e.record.key)),
            "event_id": event.map(|e| cap(&e.event_id)),
            "version": event.map(|e| e.version),
            "source": {"topic": &*origin.topic, "partition": origin.partition, "offset": origin.offset},
            "dlq_topic": &*self.dlq_topic,
        })
        .to_string();

        // Exactly one DLQ record per message, even across a kill -9: first a marker that
        // the dead-lettering has begun (where its record goes, and from which offset a
        // next owner must look for it), then the failure event, then the record, then
        // the marker that it is done. A crash before the record leaves a begun marker
        // and no record, so the next owner writes it; a crash after, a begun marker and
        // a record, which the next owner finds ([`find_written`]).
        let mut dlq_partition = origin.partition.rem_euclid(self.dlq_partitions);
        let marker = DeadLettered {
            topic: source.topic.to_string(),
            partition: source.partition,
            offset: source.offset,
        };
        let state_partition = self.state_partition_of(&source.topic, source.partition);
        let begun = DeadLettering {
            message: marker.clone(),
            id: id.clone(),
            dlq_partition,
            from_offset: self.lower_bound(dlq_partition).await,
        };
        let (key, value) = begun.encode();
        self.produce_to(&self.state_topic, state_partition, key.as_bytes(), Some(&value))
            .await;
        // Capped strings and a capped key: always small enough.
        let key = source.key.as_deref().map(|k| &k[..k.len().min(ECHO_BYTES)]);
        self.produce_until_acked(&self.failures_topic, None, key, Some(failure_event.as_bytes()), None)
            .await;
        let produce_whole = |partition| {
            self.produce(
                &self.dlq_topic,
                Some(partition),
                source.key.as_deref(),
                source.payload.as_deref(),
                Some(&headers),
            )
        };
        let mut whole = produce_whole(dlq_partition).await;
        if whole == Err(Unwritable::NoSuchPartition) && dlq_partition != 0 {
            // The DLQ has fewer partitions than at start (recreated): partition 0 is
            // always there. The begun marker names the other, so a crash now can give a
            // second record, never none.
            tracing::warn!(topic = %self.dlq_topic, partition = dlq_partition, "The DLQ has no such partition any more; writing to partition 0.");
            dlq_partition = 0;
            whole = produce_whole(dlq_partition).await;
        }
        let written = match whole {
            Ok(at) => at,
            Err(why) => {
                metrics::counter!(metric::DLQ_TRIMMED).increment(1);
                tracing::warn!(topic = %self.dlq_topic, error = %why, source_topic = %origin.topic, source_partition = origin.partition, source_offset = origin.offset, "Dead-letter record cannot be written whole; writing it trimmed.");
                let (key, payload, headers) = trimmed(source, context);
                self.produce_until_acked(
                    &self.dlq_topic,
                    Some(dlq_partition),
                    key.as_deref(),
                    Some(&payload),
                    Some(&headers),
                )
                .await
            }
        };
        self.learn_bound(dlq_partition, written + 1);
        let (key, value) = marker.encode();
        self.produce_to(&self.state_topic, state_partition, key.as_bytes(), Some(&value))
            .await;
    }

    /// An offset of DLQ partition `partition` at or below that of the next record written
    /// to it: the offset after this member's last record there, or the partition's end
    /// as read from the broker when that is older than [`BOUND_FRESH_FOR`]. Offsets only
    /// grow, so an old bound is still a bound (only a longer scan for the next owner).
    async fn lower_bound(&self, partition: i32) -> i64 {
        let known = self
            .bounds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&partition)
            .copied();
        if let Some((offset, _)) = known.filter(|(_, at)| at.elapsed() < BOUND_FRESH_FOR) {
            return offset;
        }
        let mut delay = Duration::from_millis(100);
        for attempt in 1.. {
            let (producer, topic) = (self.producer.clone(), self.dlq_topic.clone());
            let read = tokio::task::spawn_blocking(move || {
                producer
                    .client()
                    .fetch_watermarks(&topic, partition, Duration::from_secs(10))
            })
            .await;
            match read {
                Ok(Ok((_, high))) => {
                    self.learn_bound(partition, high);
                    return high;
                }
                failed => {
                    // An old bound is still a bound. With none, the event waits a little;
                    // then 0 (a next owner would read the whole DLQ partition, but only
                    // after a crash, and finds the record by its id all the same).
                    if let Some((offset, _)) = known {
                        return offset;
                    }
                    if attempt >= 5 {
                        tracing::warn!(topic = %self.dlq_topic, partition, "The DLQ partition's end cannot be read; its marker names offset 0.");
                        return 0;
                    }
                    let error = match failed {
                        Ok(Err(e)) => e.to_string(),
                        Err(e) => e.to_string(),
                        Ok(Ok(_)) => String::new(),
                    };
                    tracing::warn!(topic = %self.dlq_topic, partition, error, "Could not read the DLQ partition's end; retrying.");
                    tokio::time::sleep(delay).await; // backoff; the event waits undecided
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
        0
    }

    fn learn_bound(&self, partition: i32, offset: i64) {
        let mut bounds = self.bounds.lock().unwrap_or_else(|p| p.into_inner());
        let entry = bounds.entry(partition).or_insert((offset, Instant::now()));
        *entry = (entry.0.max(offset), Instant::now());
    }

    pub fn dlq_topic(&self) -> &str {
        &self.dlq_topic
    }

    /// Settles the begun markers a restore found: those whose DLQ record was written get
    /// their done marker (so that no later restore looks for them again), the others are
    /// deleted (their messages will be read again and decided afresh). Blocking, and
    /// awaited before the partitions start: no marker written for the same messages
    /// later can be overtaken by these.
    pub fn settle_begun(&self, written: &[DeadLettered], unwritten: &[DeadLettering]) {
        let done = written.iter().map(|m| (m, m.key(), Some(m.encode().1)));
        let deleted = unwritten.iter().map(|b| (&b.message, b.message.key(), None));
        let mut sent = Vec::new();
        for (message, key, value) in done.chain(deleted) {
            let state_partition = self.state_partition_of(&message.topic, message.partition);
            let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&self.state_topic)
                .partition(state_partition)
                .key(key.as_bytes());
            if let Some(v) = &value {
                record = record.payload(v);
            }
            match self.producer.send_result(record) {
                Ok(delivery) => sent.push(delivery),
                Err((e, _)) => {
                    tracing::warn!(error = %e, "Could not settle a dead-lettering marker; it will be looked into again at the next restore.")
                }
            }
        }
        // Each ends within the producer's message.timeout.ms.
        for result in futures::executor::block_on(futures::future::join_all(sent)) {
            if !matches!(result, Ok(Ok(_))) {
                tracing::warn!(
                    "Could not settle a dead-lettering marker; it will be looked into again at the next restore."
                );
            }
        }
    }

    /// Writes a tenant's change of health to the failures topic (keyed by the tenant):
    /// `{"kind":"tenant_state","tenant","from","to","reason","at"}`.
    pub async fn tenant_state(&self, tenant: &str, from: &str, to: &str, reason: &str) {
        let event = json!({
            "kind": "tenant_state",
            "tenant": cap(tenant),
            "from": from,
            "to": to,
            "reason": cap(reason),
            "at": rfc3339(SystemTime::now()),
        })
        .to_string();
        let key = cap(tenant);
        self.produce_until_acked(
            &self.failures_topic,
            None,
            Some(key.as_bytes()),
            Some(event.as_bytes()),
            None,
        )
        .await;
    }

    /// The state partition that holds the markers of `topic`/`partition`: its own number
    /// for an input partition, its origin input partition's for a retry partition (the
    /// two are restored together).
    fn state_partition_of(&self, topic: &str, partition: i32) -> i32 {
        match &self.retry {
            Some(route) if *route.topic == *topic => route.origin_partition(partition),
            _ => partition,
        }
    }

    /// Deletes the markers of messages of `topic`/`partition` at `offsets` (committed
    /// since), with tombstones.
    pub async fn forget_dead_lettered(&self, topic: &str, partition: i32, offsets: Vec<i64>) {
        let state_partition = self.state_partition_of(topic, partition);
        for offset in offsets {
            let marker = DeadLettered {
                topic: topic.to_string(),
                partition,
                offset,
            };
            let (key, _) = marker.encode();
            self.produce_to(&self.state_topic, state_partition, key.as_bytes(), None)
                .await;
        }
    }

    /// Writes a marker (or its tombstone), retrying transient failures. One that can
    /// never be written is given up: a marker only saves a second DLQ record.
    async fn produce_to(&self, topic: &str, partition: i32, key: &[u8], payload: Option<&[u8]>) {
        if let Err(e) = self.produce(topic, Some(partition), Some(key), payload, None).await {
            tracing::warn!(topic, partition, error = %e, "Could not write a dead-letter marker; a re-read of this message would dead-letter it again.");
        }
    }

    /// Writes a record that is known to fit, retrying every failure: one that persists is
    /// an outage or a misconfigured topic, for an operator to fix, and the event waits.
    async fn produce_until_acked(
        &self,
        topic: &str,
        partition: Option<i32>,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        headers: Option<&[RawHeader]>,
    ) -> i64 {
        loop {
            match self.produce(topic, partition, key, payload, headers).await {
                Ok(offset) => return offset,
                Err(e) => {
                    metrics::counter!(metric::DLQ_WRITE_FAILURES, "topic" => topic.to_string()).increment(1);
                    tracing::error!(topic, error = %e, "Could not write even a small record; retrying.");
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
            }
        }
    }

    /// Produces one record, retrying transient failures with backoff until acknowledged;
    /// returns its offset, or the failures that repeating cannot cure.
    async fn produce(
        &self,
        topic: &str,
        partition: Option<i32>,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        headers: Option<&[RawHeader]>,
    ) -> Result<i64, Unwritable> {
        let mut delay = Duration::from_millis(100);
        loop {
            let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic);
            if let Some(p) = partition {
                record = record.partition(p);
            }
            if let Some(k) = key {
                record = record.key(k);
            }
            if let Some(p) = payload {
                record = record.payload(p);
            }
            if let Some(h) = headers {
                let mut list = HeaderList::with_capacity(h.len());
                for (k, v) in h {
                    list.add(k, v.as_deref());
                }
                record = record.headers(list.into_owned());
            }
            match self.producer.send(record, Duration::from_secs(30)).await {
                Ok(delivery) => return Ok(delivery.offset),
                Err((e, _)) => {
                    if let Some(why) = Unwritable::classify(&e) {
                        return Err(why);
                    }
                    metrics::counter!(metric::DLQ_WRITE_FAILURES, "topic" => topic.to_string()).increment(1);
                    tracing::error!(topic, error = %e, "Could not write a dead-letter or retry record; retrying.");
                    // Backoff between attempts; the event stays undecided meanwhile.
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

/// The header naming a dead-lettering's id (see [`DeadLettering`]).
pub const DEAD_LETTER_ID: &str = "crm-sync.dead-letter.id";

/// Of dead-letterings begun by an earlier owner and not marked done, those whose DLQ
/// record was written after all (a record carrying the begun marker's id as its last
/// `crm-sync.dead-letter.id`, at or after the marker's offset of its DLQ partition), as
/// done markers; and those whose record was not, to be decided afresh. Blocking: run
/// where a restore runs, before the partition's messages are handled; the whole look
/// takes at most `timeout`, and an error is for the caller to decide on.
pub fn find_written(
    client: &ClientConfig,
    dlq_topic: &str,
    begun: Vec<DeadLettering>,
    timeout: Duration,
) -> KafkaResult<(Vec<DeadLettered>, Vec<DeadLettering>)> {
    if begun.is_empty() {
        return Ok((Vec::new(), Vec::new()));
    }
    let consumer: BaseConsumer = client
        .clone()
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("group.id", "crm-sync-dlq-lookup")
        .create()?;
    let deadline = Instant::now() + timeout;
    let left = || deadline.saturating_duration_since(Instant::now());
    let timed_out = || KafkaError::MessageConsumption(RDKafkaErrorCode::OperationTimedOut);
    // Each id, and the offset from which its record may be.
    let wanted: HashMap<&str, i64> = begun.iter().map(|b| (b.id.as_str(), b.from_offset)).collect();
    let mut seen: HashSet<String> = HashSet::new();
    let mut partitions: HashMap<i32, i64> = HashMap::new();
    for b in &begun {
        let from = partitions.entry(b.dlq_partition).or_insert(b.from_offset);
        *from = (*from).min(b.from_offset);
    }
    for (partition, from) in partitions {
        // A partition the DLQ no longer has (recreated smaller) holds none of them.
        let (low, high) = match consumer.fetch_watermarks(dlq_topic, partition, left()) {
            Err(KafkaError::MetadataFetch(RDKafkaErrorCode::UnknownPartition)) => continue,
            other => other?,
        };
        let from = from.max(low);
        if from >= high {
            continue;
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(dlq_topic, partition, Offset::Offset(from))?;
        consumer.assign(&tpl)?;
        loop {
            if left().is_zero() {
                return Err(timed_out());
            }
            let Some(message) = consumer.poll(Duration::from_millis(200)) else {
                continue;
            };
            let message = message?;
            if message.partition() != partition {
                continue;
            }
            let headers = crate::headers::read(message.headers());
            let id = headers
                .iter()
                .rev()
                .find(|(k, _)| k == DEAD_LETTER_ID.as_bytes())
                .and_then(|(_, v)| v.as_deref())
                .and_then(|v| std::str::from_utf8(v).ok());
            if let Some(id) = id {
                if wanted.get(id).is_some_and(|from| message.offset() >= *from) {
                    seen.insert(id.to_string());
                }
            }
            if message.offset() + 1 >= high {
                break;
            }
        }
    }
    let (written, unwritten): (Vec<_>, Vec<_>) = begun.into_iter().partition(|b| seen.contains(&b.id));
    Ok((written.into_iter().map(|b| b.message).collect(), unwritten))
}

/// Why a record can never be written as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Unwritable {
    #[error("the record is larger than the producer's or the broker's message.max.bytes")]
    TooLarge,
    #[error("the broker rejects the record as invalid")]
    Invalid,
    #[error("the topic has no such partition")]
    NoSuchPartition,
    #[error("there is no retry partition for the event's input partition")]
    NoRetryTopic,
}

impl Unwritable {
    /// The produce errors that repeating cannot cure. Authorization and unknown-topic
    /// errors are not among them: an operator fixes those, and the event waits.
    pub(crate) fn classify(e: &KafkaError) -> Option<Unwritable> {
        let KafkaError::MessageProduction(code) = e else {
            return None;
        };
        match code {
            RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::InvalidMessageSize => Some(Unwritable::TooLarge),
            RDKafkaErrorCode::InvalidMessage | RDKafkaErrorCode::InvalidRecord => Some(Unwritable::Invalid),
            RDKafkaErrorCode::UnknownPartition => Some(Unwritable::NoSuchPartition),
            _ => None,
        }
    }
}

/// Most bytes of an echoed string (error message, CRM code, name, key) in a header or a
/// failure event.
pub const ECHO_BYTES: usize = 1_024;

/// Bytes of the original payload a trimmed DLQ record keeps.
pub const TRIMMED_PAYLOAD_BYTES: usize = 4_096;

/// `s`, cut to at most [`ECHO_BYTES`] at a character boundary, saying how long it was.
pub fn cap(s: &str) -> String {
    if s.len() <= ECHO_BYTES {
        return s.to_string();
    }
    let mut end = ECHO_BYTES;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…[{} bytes]", &s[..end], s.len())
}

/// A DLQ record small enough to write whatever the original was: the key and payload
/// cut, the original headers left out (their count noted), the error context, and
/// `crm-sync.trimmed` saying what was cut. The source coordinates in the context lead to
/// the original.
fn trimmed(source: &SourceMessage, mut context: Vec<RawHeader>) -> (Option<Vec<u8>>, Vec<u8>, Vec<RawHeader>) {
    let key = source.key.as_ref().map(|k| k[..k.len().min(ECHO_BYTES)].to_vec());
    let payload = source.payload.as_deref().unwrap_or_default();
    let note = format!(
        "key={} value={} headers={}",
        source.key.as_ref().map_or(0, Vec::len),
        payload.len(),
        source.headers.len()
    );
    context.push((b"crm-sync.trimmed".to_vec(), Some(note.into_bytes())));
    (
        key,
        payload[..payload.len().min(TRIMMED_PAYLOAD_BYTES)].to_vec(),
        context,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echoed_strings_are_capped_at_a_character_boundary() {
        assert_eq!(cap("short"), "short");
        let long = "é".repeat(ECHO_BYTES);
        let capped = cap(&long);
        assert!(capped.len() < ECHO_BYTES + 32, "{}", capped.len());
        assert!(capped.ends_with(&format!("[{} bytes]", long.len())));
    }

    #[test]
    fn size_errors_are_permanent_and_outages_are_not() {
        let production = KafkaError::MessageProduction;
        assert_eq!(
            Unwritable::classify(&production(RDKafkaErrorCode::MessageSizeTooLarge)),
            Some(Unwritable::TooLarge)
        );
        assert_eq!(
            Unwritable::classify(&production(RDKafkaErrorCode::UnknownPartition)),
            Some(Unwritable::NoSuchPartition)
        );
        for transient in [
            RDKafkaErrorCode::MessageTimedOut,
            RDKafkaErrorCode::TopicAuthorizationFailed,
            RDKafkaErrorCode::AllBrokersDown,
        ] {
            assert_eq!(Unwritable::classify(&production(transient)), None);
        }
    }
}
