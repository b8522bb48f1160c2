//! What happened to each record and each event, for the people who ask: the status topic
//! and the audit topic.
//!
//! - **Status topic** (`kafka.status_topic`, compacted): per record (keyed by the JSON
//!   array `[tenant, entity, key]`), its latest known status: `delivered`, `skipped`
//!   (reason `unchanged`: the CRM already held it), `retrying`, `parked`,
//!   `tenant_paused` (parked while its tenant does not write; reason: the tenant's state),
//!   `dead_lettered` (with the error's code and message), with the version and event id,
//!   the attempts, and when this member first read the event, last tried it and decided
//!   it. Events that say nothing new about their record (an exact duplicate, a stale or
//!   superseded version: the record's status is that of a newer event) update no status.
//! - **Audit topic** (`kafka.audit_topic`, optional, not compacted): one record per final
//!   outcome of every event read, bad input included, with its source topic, partition
//!   and offset: the trail of what was done and why.
//!
//! Promise: a final outcome's status and audit records are acknowledged by the broker
//! before the event's offset may be committed (written like the confirmed states: the
//! outcome is reported to its partition only once they are), so a crash re-reads the
//! event rather than leave a committed event without its trail; a re-read may write them
//! twice, never a status that did not happen. `retrying` is written when it happens,
//! without holding anything back: it is never final, and the outcome that follows
//! replaces it.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use chrono::{DateTime, SecondsFormat, Utc};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{json, Value};

use crate::dead_letter::cap;
use crate::diff::SkipReason;
use crate::event::Event;
use crate::messages::OutcomeKind;
use crate::retry::topic::Origin;
use crate::telemetry::metric;

/// What became of an event, as the trail tells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Delivered,
    Skipped(SkipReason),
    Retrying,
    Parked,
    /// Parked because its tenant is not writing (its state: `open`, `half_open`,
    /// `auth_failed` or `paused`).
    TenantPaused(&'static str),
    DeadLettered,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Delivered => "delivered",
            Status::Skipped(_) => "skipped",
            Status::Retrying => "retrying",
            Status::Parked => "parked",
            Status::TenantPaused(_) => "tenant_paused",
            Status::DeadLettered => "dead_lettered",
        }
    }

    /// Whether it tells something new about the record (see the module doc).
    fn updates_the_record(self) -> bool {
        !matches!(
            self,
            Status::Skipped(SkipReason::Duplicate | SkipReason::Stale | SkipReason::Superseded)
        )
    }
}

impl From<OutcomeKind> for Status {
    fn from(kind: OutcomeKind) -> Status {
        match kind {
            OutcomeKind::Delivered => Status::Delivered,
            OutcomeKind::Skipped(r) => Status::Skipped(r),
            OutcomeKind::DeadLettered => Status::DeadLettered,
            OutcomeKind::Parked => Status::Parked,
        }
    }
}

/// One line of the trail.
#[derive(Debug, Clone)]
pub struct Entry {
    /// `None` for a message that did not decode (audit only).
    pub event: Option<Arc<Event>>,
    pub source: Origin,
    pub status: Status,
    pub attempts: u32,
    pub first_seen: SystemTime,
    pub last_attempt: Option<SystemTime>,
    /// Error code and message, for `retrying` and `dead_lettered`.
    pub error: Option<(&'static str, String)>,
    pub at: SystemTime,
}

impl Entry {
    /// The record key of the status topic: `[tenant, entity, key]`.
    pub fn record_key(event: &Event) -> String {
        let r = &event.record;
        json!([cap(&r.tenant), cap(&r.entity), cap(&r.key)]).to_string()
    }

    fn json(&self) -> Value {
        let time = |t: SystemTime| DateTime::<Utc>::from(t).to_rfc3339_opts(SecondsFormat::Millis, true);
        let e = self.event.as_deref();
        json!({
            "tenant": e.map(|e| cap(&e.record.tenant)),
            "entity": e.map(|e| cap(&e.record.entity)),
            "key": e.map(|e| cap(&e.record.key)),
            "status": self.status.as_str(),
            "reason": match self.status {
                Status::Skipped(r) => Some(r.as_str()),
                Status::TenantPaused(state) => Some(state),
                _ => None,
            },
            "error_code": self.error.as_ref().map(|(c, _)| *c),
            "error_message": self.error.as_ref().map(|(_, m)| cap(m)),
            "version": e.map(|e| e.version),
            "event_id": e.map(|e| cap(&e.event_id)),
            "attempts": self.attempts,
            "first_seen_at": time(self.first_seen),
            "last_attempt_at": self.last_attempt.map(time),
            "at": time(self.at),
            "source": {"topic": &*self.source.topic, "partition": self.source.partition, "offset": self.source.offset},
        })
    }
}

/// Writes the trail; cheap to clone. Does nothing for a topic that is not configured.
#[derive(Clone)]
pub struct Trail {
    producer: Option<FutureProducer>,
    status_topic: Option<Arc<str>>,
    audit_topic: Option<Arc<str>>,
}

impl Trail {
    pub fn new(producer: FutureProducer, status_topic: Option<&str>, audit_topic: Option<&str>) -> Trail {
        Trail {
            producer: Some(producer),
            status_topic: status_topic.map(Arc::from),
            audit_topic: audit_topic.map(Arc::from),
        }
    }

    /// A trail that writes nothing.
    pub fn off() -> Trail {
        Trail {
            producer: None,
            status_topic: None,
            audit_topic: None,
        }
    }

    pub fn is_on(&self) -> bool {
        self.producer.is_some() && (self.status_topic.is_some() || self.audit_topic.is_some())
    }

    /// Writes final outcomes: each one's status (when it updates its record) and audit
    /// record, all at once, each retried until the broker acknowledges it.
    pub async fn record(&self, entries: &[Entry]) {
        let Some(producer) = &self.producer else {
            return;
        };
        let mut writes = Vec::new();
        for entry in entries {
            let value = entry.json().to_string();
            if let (Some(topic), Some(event)) = (&self.status_topic, &entry.event) {
                if entry.status.updates_the_record() {
                    writes.push(write(producer, topic.clone(), Entry::record_key(event), value.clone()));
                }
            }
            if let Some(topic) = &self.audit_topic {
                let key = format!(
                    "{}/{}/{}",
                    entry.source.topic, entry.source.partition, entry.source.offset
                );
                writes.push(write(producer, topic.clone(), key, value));
            }
        }
        futures::future::join_all(writes).await;
    }

    /// Writes an intermediate status (`retrying`) without waiting for it: it holds
    /// nothing back, and a lost one is replaced by the outcome that follows.
    pub fn note(&self, entry: Entry) {
        let (Some(producer), Some(topic), Some(event)) = (&self.producer, &self.status_topic, &entry.event) else {
            return;
        };
        let (key, value) = (Entry::record_key(event), entry.json().to_string());
        let (producer, topic) = (producer.clone(), topic.clone());
        drop(crate::offload::spawn(async move {
            let record = FutureRecord::to(&topic).key(&key).payload(&value);
            if let Err((e, _)) = producer.send(record, Duration::from_secs(30)).await {
                metrics::counter!(metric::TRAIL_WRITE_FAILURES, "topic" => topic.to_string()).increment(1);
                tracing::warn!(error = %e, "Could not write a retrying status; the outcome will replace it.");
            }
        }));
    }
}

/// One record, retried until acknowledged (like the dead-letter topic's writes); one the
/// broker can never take (the topic gone, not authorised) is given up, logged and
/// counted: the trail then misses a line rather than hold every tenant back for good.
async fn write(producer: &FutureProducer, topic: Arc<str>, key: String, value: String) {
    loop {
        let record = FutureRecord::to(&topic).key(&key).payload(&value);
        match producer.send(record, Duration::from_secs(30)).await {
            Ok(_) => return,
            Err((e, _)) => {
                metrics::counter!(metric::TRAIL_WRITE_FAILURES, "topic" => topic.to_string()).increment(1);
                if crate::dead_letter::Unwritable::classify(&e).is_some() {
                    tracing::error!(topic = %topic, error = %e, "The trail topic refuses this line for good; it is left out.");
                    return;
                }
                tracing::error!(topic = %topic, error = %e, "Could not write to the trail; retrying.");
                // Backoff before the next attempt: the broker is down or refusing for now.
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
    }
}
