//! Terminal failures: the dead-letter topic and the failures topic.
//!
//! Promise: an event whose outcome is "dead-lettered" is durably in the DLQ topic (its
//! original key, value and headers, plus error-context headers) *and* described by one
//! JSON event on the failures topic before its offset may be committed. A write that the
//! broker refuses is retried until it succeeds; until then the offset stays uncommitted,
//! so a crash meanwhile means re-delivery, not loss. Credentials never reach either topic.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use chrono::{DateTime, SecondsFormat, Utc};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::json;

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
        }
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
    failures_topic: Arc<str>,
    retry: Option<RetryRoute>,
}

fn rfc3339(t: SystemTime) -> String {
    DateTime::<Utc>::from(t).to_rfc3339_opts(SecondsFormat::Millis, true)
}

impl DeadLetters {
    pub fn new(producer: FutureProducer, dlq_topic: &str, failures_topic: &str, retry: Option<RetryRoute>) -> Self {
        DeadLetters {
            producer,
            dlq_topic: dlq_topic.into(),
            failures_topic: failures_topic.into(),
            retry,
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
    /// released: the event lives on in the retry topic. Does nothing for an event that
    /// cannot be parked (see [`can_park`](Self::can_park)).
    pub async fn park(&self, source: &SourceMessage, state: RetryState) {
        let Some(route) = &self.retry else {
            return;
        };
        let Some(partition) = route.partition_for(&source.origin.topic, source.origin.partition) else {
            return;
        };
        let headers = RetryRoute::headers(&source.headers, &source.origin, &state);
        self.produce_until_acked(
            &route.topic,
            Some(partition),
            source.key.as_deref(),
            source.payload.as_deref(),
            Some(&headers),
        )
        .await;
    }

    /// Writes the DLQ record and the failure event, retrying until both are acknowledged.
    pub async fn dead_letter(&self, source: &SourceMessage, event: Option<&Event>, failure: &Failure) {
        let origin = &source.origin;
        let partition = origin.partition.to_string();
        let offset = origin.offset.to_string();
        let attempts = failure.attempts.to_string();
        let first = rfc3339(failure.first_failure);
        let last = rfc3339(failure.last_failure);
        let status = failure.http_status.map(|s| s.to_string());
        let mut context: Vec<(&str, &str)> = vec![
            ("crm-sync.stage", failure.stage),
            ("crm-sync.error.code", failure.code),
            ("crm-sync.error.class", failure.class),
            ("crm-sync.error.message", &failure.message),
            ("crm-sync.attempts", &attempts),
            ("crm-sync.first-failure", &first),
            ("crm-sync.last-failure", &last),
            ("crm-sync.source.topic", &origin.topic),
            ("crm-sync.source.partition", &partition),
            ("crm-sync.source.offset", &offset),
        ];
        if let Some(s) = &status {
            context.push(("crm-sync.crm.status", s));
        }
        if let Some(c) = &failure.crm_code {
            context.push(("crm-sync.crm.code", c));
        }
        let mut headers = source.headers.clone();
        headers.extend(
            context
                .into_iter()
                .map(|(k, v)| (k.as_bytes().to_vec(), Some(v.as_bytes().to_vec()))),
        );

        let failure_event = json!({
            "stage": failure.stage,
            "error_code": failure.code,
            "error_class": failure.class,
            "crm_status": failure.http_status,
            "crm_code": failure.crm_code,
            "message": failure.message,
            "attempts": failure.attempts,
            "first_failure_at": first,
            "last_failure_at": last,
            "tenant": event.map(|e| e.record.tenant.to_string()),
            "entity": event.map(|e| e.record.entity.to_string()),
            "key": event.map(|e| e.record.key.to_string()),
            "event_id": event.map(|e| e.event_id.clone()),
            "version": event.map(|e| e.version),
            "source": {"topic": &*origin.topic, "partition": origin.partition, "offset": origin.offset},
            "dlq_topic": &*self.dlq_topic,
        })
        .to_string();

        self.produce_until_acked(
            &self.dlq_topic,
            None,
            source.key.as_deref(),
            source.payload.as_deref(),
            Some(&headers),
        )
        .await;
        self.produce_until_acked(
            &self.failures_topic,
            None,
            source.key.as_deref(),
            Some(failure_event.as_bytes()),
            None,
        )
        .await;
    }

    async fn produce_until_acked(
        &self,
        topic: &str,
        partition: Option<i32>,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        headers: Option<&[RawHeader]>,
    ) {
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
                Ok(_) => return,
                Err((e, _)) => {
                    metrics::counter!(metric::DLQ_WRITE_FAILURES, "topic" => topic.to_string()).increment(1);
                    tracing::error!(topic, error = %e, "Could not write a dead-letter record; retrying.");
                    // Backoff between attempts; the event stays undecided meanwhile.
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}
