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
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::json;

use crate::event::Event;
use crate::telemetry::metric;

/// A message as read from Kafka, kept until its outcome is final.
#[derive(Debug, Clone)]
pub struct SourceMessage {
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
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
    retry_topic: Option<Arc<str>>,
}

/// Headers of a parked event on the retry topic.
pub mod retry_header {
    pub const ATTEMPTS: &str = "crm-sync.retry.attempts";
    /// Milliseconds since the Unix epoch.
    pub const FIRST_FAILURE: &str = "crm-sync.retry.first-failure-ms";
    /// Milliseconds since the Unix epoch: not to be tried again before.
    pub const NOT_BEFORE: &str = "crm-sync.retry.not-before-ms";
    /// Where the event was first read from.
    pub const ORIGIN_TOPIC: &str = "crm-sync.origin.topic";
    pub const ORIGIN_PARTITION: &str = "crm-sync.origin.partition";
    pub const ORIGIN_OFFSET: &str = "crm-sync.origin.offset";
}

/// How far a parked event's retries have gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryState {
    pub attempts: u32,
    pub first_failure: SystemTime,
    pub not_before: SystemTime,
}

fn header_text<'a>(source: &'a SourceMessage, name: &str) -> Option<&'a str> {
    source
        .headers
        .iter()
        .find(|(k, _)| k == name)
        .and_then(|(_, v)| std::str::from_utf8(v.as_deref()?).ok())
}

fn epoch_ms(t: SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn from_epoch_ms(ms: u64) -> SystemTime {
    std::time::UNIX_EPOCH + Duration::from_millis(ms)
}

impl SourceMessage {
    /// The retry state of a message read from the retry topic.
    pub fn retry_state(&self) -> Option<RetryState> {
        let number = |name| header_text(self, name)?.parse::<u64>().ok();
        Some(RetryState {
            attempts: u32::try_from(number(retry_header::ATTEMPTS)?).ok()?,
            first_failure: from_epoch_ms(number(retry_header::FIRST_FAILURE)?),
            not_before: from_epoch_ms(number(retry_header::NOT_BEFORE)?),
        })
    }

    /// Where the event was first read from: its input topic coordinates, also for an
    /// event that came back from the retry topic.
    pub fn origin(&self) -> (String, i32, i64) {
        let origin = (|| {
            Some((
                header_text(self, retry_header::ORIGIN_TOPIC)?.to_string(),
                header_text(self, retry_header::ORIGIN_PARTITION)?.parse().ok()?,
                header_text(self, retry_header::ORIGIN_OFFSET)?.parse().ok()?,
            ))
        })();
        origin.unwrap_or_else(|| (self.topic.to_string(), self.partition, self.offset))
    }
}

fn rfc3339(t: SystemTime) -> String {
    DateTime::<Utc>::from(t).to_rfc3339_opts(SecondsFormat::Millis, true)
}

impl DeadLetters {
    pub fn new(producer: FutureProducer, dlq_topic: &str, failures_topic: &str, retry_topic: Option<&str>) -> Self {
        DeadLetters {
            producer,
            dlq_topic: dlq_topic.into(),
            failures_topic: failures_topic.into(),
            retry_topic: retry_topic.map(Into::into),
        }
    }

    /// Whether events can be parked on a retry topic.
    pub fn can_park(&self) -> bool {
        self.retry_topic.is_some()
    }

    pub fn is_retry_topic(&self, topic: &str) -> bool {
        self.retry_topic.as_deref() == Some(topic)
    }

    /// Writes the event (original key, value and headers) to the retry topic with its
    /// retry state, retrying until acknowledged. Its offset may then be released: the
    /// event lives on in the retry topic.
    pub async fn park(&self, source: &SourceMessage, state: RetryState) {
        let Some(topic) = self.retry_topic.clone() else {
            return;
        };
        let (origin_topic, origin_partition, origin_offset) = source.origin();
        let mut headers = OwnedHeaders::new_with_capacity(source.headers.len() + 6);
        for (k, v) in &source.headers {
            if k.starts_with("crm-sync.retry.") || k.starts_with("crm-sync.origin.") {
                continue;
            }
            headers = headers.insert(Header {
                key: k,
                value: v.as_deref(),
            });
        }
        let (attempts, first, not_before) = (
            state.attempts.to_string(),
            epoch_ms(state.first_failure).to_string(),
            epoch_ms(state.not_before).to_string(),
        );
        let (partition, offset) = (origin_partition.to_string(), origin_offset.to_string());
        for (k, v) in [
            (retry_header::ATTEMPTS, attempts.as_str()),
            (retry_header::FIRST_FAILURE, &first),
            (retry_header::NOT_BEFORE, &not_before),
            (retry_header::ORIGIN_TOPIC, &origin_topic),
            (retry_header::ORIGIN_PARTITION, &partition),
            (retry_header::ORIGIN_OFFSET, &offset),
        ] {
            headers = headers.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            });
        }
        self.produce_until_acked(&topic, source.key.as_deref(), source.payload.as_deref(), Some(headers))
            .await;
    }

    /// Writes the DLQ record and the failure event, retrying until both are acknowledged.
    pub async fn dead_letter(&self, source: &SourceMessage, event: Option<&Event>, failure: &Failure) {
        let mut headers = OwnedHeaders::new_with_capacity(source.headers.len() + 14);
        for (k, v) in &source.headers {
            headers = headers.insert(Header {
                key: k,
                value: v.as_deref(),
            });
        }
        let (origin_topic, origin_partition, origin_offset) = source.origin();
        let partition = origin_partition.to_string();
        let offset = origin_offset.to_string();
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
            ("crm-sync.source.topic", &origin_topic),
            ("crm-sync.source.partition", &partition),
            ("crm-sync.source.offset", &offset),
        ];
        if let Some(s) = &status {
            context.push(("crm-sync.crm.status", s));
        }
        if let Some(c) = &failure.crm_code {
            context.push(("crm-sync.crm.code", c));
        }
        for (k, v) in context {
            headers = headers.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            });
        }

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
            "source": {"topic": origin_topic, "partition": origin_partition, "offset": origin_offset},
            "dlq_topic": &*self.dlq_topic,
        })
        .to_string();

        self.produce_until_acked(
            &self.dlq_topic,
            source.key.as_deref(),
            source.payload.as_deref(),
            Some(headers),
        )
        .await;
        self.produce_until_acked(
            &self.failures_topic,
            source.key.as_deref(),
            Some(failure_event.as_bytes()),
            None,
        )
        .await;
    }

    async fn produce_until_acked(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        headers: Option<OwnedHeaders>,
    ) {
        let mut delay = Duration::from_millis(100);
        loop {
            let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic);
            if let Some(k) = key {
                record = record.key(k);
            }
            if let Some(p) = payload {
                record = record.payload(p);
            }
            if let Some(h) = headers.clone() {
                record = record.headers(h);
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
