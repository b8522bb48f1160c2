//! The status topic as this member reads it: every partition, from the beginning, with no
//! consumer group (each member reads it all), so any member answers for any record and a
//! watcher sees what the whole group does.
//!
//! Memory is bounded: the latest status of the `grpc.status_capacity` most recently
//! updated records is kept; an older record is answered NOT_FOUND (its status is still on
//! the compacted topic). Each status read is also broadcast to the watchers; a watcher
//! that falls behind loses the oldest and is told how many ([`tokio::sync::broadcast`]):
//! the reader never waits for it.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde_json::Value;
use tokio::sync::{broadcast, Notify};

use super::pb;
use crate::config::Config;
use crate::consume;
use crate::dead_letter::cap;

/// Statuses a watcher may fall behind by before it loses the oldest: a burst of the
/// pipeline's batched rate for a second or two (measured: 4,096 lost three quarters of a
/// 40,000/s burst of 20,000). Each is a shared pointer to a status also kept in `latest`.
const WATCH_BUFFER: usize = 65_536;

/// The latest status of the most recently updated records.
struct Latest {
    map: HashMap<String, (u64, Arc<pb::RecordStatus>)>,
    /// Keys in update order, with the update's number (stale entries skipped).
    order: VecDeque<(String, u64)>,
    next: u64,
    capacity: usize,
}

/// Whether `new` may replace `held` as a record's latest status. Lines can reach the topic
/// out of order (a retried write, `retrying` written on the side), so a lower version, or
/// a `retrying` after a final status of the same version, is older news.
fn newer(new: &pb::RecordStatus, held: &pb::RecordStatus) -> bool {
    new.version > held.version
        || (new.version == held.version && !(new.status == "retrying" && held.status != "retrying"))
}

impl Latest {
    /// Keeps `status` as the record's latest unless it holds newer; whether it did.
    fn offer(&mut self, key: String, status: Arc<pb::RecordStatus>) -> bool {
        if self.map.get(&key).is_some_and(|(_, held)| !newer(&status, held)) {
            return false;
        }
        self.put(key, status);
        true
    }

    fn put(&mut self, key: String, status: Arc<pb::RecordStatus>) {
        self.next += 1;
        self.order.push_back((key.clone(), self.next));
        self.map.insert(key, (self.next, status));
        while self.map.len() > self.capacity {
            let Some((key, n)) = self.order.pop_front() else { break };
            if self.map.get(&key).is_some_and(|(m, _)| *m == n) {
                self.map.remove(&key);
            }
        }
        // Keys updated many times leave stale entries behind: drop them now and then.
        if self.order.len() > 2 * self.capacity.max(1024) {
            let map = &self.map;
            self.order.retain(|(k, n)| map.get(k).is_some_and(|(m, _)| m == n));
        }
    }
}

pub struct StatusView {
    latest: Mutex<Latest>,
    updates: broadcast::Sender<Arc<pb::RecordStatus>>,
    stop: Notify,
    /// Whether a status topic is configured.
    pub enabled: bool,
}

impl StatusView {
    /// Starts reading the status topic (when configured) on the current runtime.
    pub fn start(config: &Config, capacity: usize) -> Arc<StatusView> {
        let (updates, _) = broadcast::channel(WATCH_BUFFER);
        let view = Arc::new(StatusView {
            latest: Mutex::new(Latest {
                map: HashMap::new(),
                order: VecDeque::new(),
                next: 0,
                capacity,
            }),
            updates,
            stop: Notify::new(),
            enabled: config.kafka.status_topic.is_some(),
        });
        if let Some(topic) = config.kafka.status_topic.clone() {
            let reader = view.clone();
            let kafka = config.kafka.clone();
            tokio::spawn(async move {
                loop {
                    match reader.read(&kafka, &topic).await {
                        Ok(()) => return,
                        Err(e) => {
                            tracing::warn!(error = %e, "Could not read the status topic; trying again.");
                            tokio::select! {
                                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                                () = reader.stop.notified() => return,
                            }
                        }
                    }
                }
            });
        }
        view
    }

    pub fn stop(&self) {
        self.stop.notify_waiters();
        self.stop.notify_one();
    }

    /// The latest status of a record, if this member holds it.
    pub fn get(&self, tenant: &str, entity: &str, key: &str) -> Option<Arc<pb::RecordStatus>> {
        let id = serde_json::json!([tenant, entity, key]).to_string();
        self.latest.lock().ok()?.map.get(&id).map(|(_, s)| s.clone())
    }

    pub fn watch(&self) -> broadcast::Receiver<Arc<pb::RecordStatus>> {
        self.updates.subscribe()
    }

    async fn read(&self, kafka: &crate::config::KafkaConfig, topic: &str) -> anyhow::Result<()> {
        // The setup blocks on the broker: off the runtime's threads.
        let (kafka, topic_name) = (kafka.clone(), topic.to_string());
        let (consumer, live_from) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            let topic = topic_name.as_str();
            let consumer: StreamConsumer = consume::client_config(&kafka)
                .set("group.id", format!("{}.status-view", kafka.group_id))
                .set("enable.auto.commit", "false")
                .set("enable.auto.offset.store", "false")
                .create()?;
            let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
            let partitions = metadata
                .topics()
                .iter()
                .find(|t| t.name() == topic && t.error().is_none())
                .map(|t| t.partitions().len())
                .ok_or_else(|| anyhow::anyhow!("status topic {topic} not found"))?;
            let mut assignment = TopicPartitionList::new();
            // What was on the topic at start is history: kept, not told to watchers.
            let mut live_from = Vec::with_capacity(partitions);
            for p in 0..partitions as i32 {
                assignment.add_partition_offset(topic, p, Offset::Beginning)?;
                live_from.push(consumer.fetch_watermarks(topic, p, Duration::from_secs(10))?.1);
            }
            consumer.assign(&assignment)?;
            Ok((consumer, live_from))
        })
        .await??;
        loop {
            let message = tokio::select! {
                m = consumer.recv() => m,
                () = self.stop.notified() => return Ok(()),
            };
            let message = match message {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(error = %e, "Status topic read error.");
                    continue;
                }
            };
            let (Some(key), Some(payload)) = (message.key(), message.payload()) else {
                continue;
            };
            let (Ok(key), Some(status)) = (std::str::from_utf8(key), parse(payload)) else {
                continue;
            };
            let status = Arc::new(status);
            let kept = match self.latest.lock() {
                Ok(mut latest) => latest.offer(key.to_string(), status.clone()),
                Err(_) => false,
            };
            let live = live_from
                .get(message.partition() as usize)
                .is_some_and(|from| message.offset() >= *from);
            if kept && live {
                let _ = self.updates.send(status);
            }
        }
    }
}

/// A status record of the topic (see `trail`) as the API's message.
pub fn parse(payload: &[u8]) -> Option<pb::RecordStatus> {
    let v: Value = serde_json::from_slice(payload).ok()?;
    // Capped like everything crm-sync echoes: whatever is on the topic, an entry stays small.
    let s = |k: &str| cap(v.get(k).and_then(Value::as_str).unwrap_or_default());
    let source = v.get("source").map(|src| pb::Source {
        topic: cap(src.get("topic").and_then(Value::as_str).unwrap_or_default()),
        partition: src.get("partition").and_then(Value::as_i64).unwrap_or(-1) as i32,
        offset: src.get("offset").and_then(Value::as_i64).unwrap_or(-1),
    });
    Some(pb::RecordStatus {
        tenant: s("tenant"),
        entity: s("entity"),
        key: s("key"),
        status: s("status"),
        reason: s("reason"),
        error_code: s("error_code"),
        error_message: s("error_message"),
        version: v.get("version").and_then(Value::as_u64).unwrap_or_default(),
        event_id: s("event_id"),
        attempts: v.get("attempts").and_then(Value::as_u64).unwrap_or_default() as u32,
        first_seen_at: s("first_seen_at"),
        last_attempt_at: s("last_attempt_at"),
        at: s("at"),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(key: &str) -> Arc<pb::RecordStatus> {
        Arc::new(pb::RecordStatus {
            key: key.into(),
            ..Default::default()
        })
    }

    #[test]
    fn keeps_the_most_recently_updated_records_only() {
        let mut l = Latest {
            map: HashMap::new(),
            order: VecDeque::new(),
            next: 0,
            capacity: 2,
        };
        l.put("a".into(), status("a"));
        l.put("b".into(), status("b"));
        l.put("a".into(), status("a2"));
        l.put("c".into(), status("c"));
        assert!(l.map.contains_key("a") && l.map.contains_key("c"));
        assert!(!l.map.contains_key("b"), "the least recently updated goes");
        for i in 0..10_000 {
            l.put("a".into(), status(&i.to_string()));
        }
        assert!(
            l.order.len() <= 2 * 1024 + 1,
            "stale keys are dropped: {}",
            l.order.len()
        );
        assert_eq!(l.map.len(), 2);
    }

    #[test]
    fn older_news_does_not_replace_a_records_status() {
        let mut l = Latest {
            map: HashMap::new(),
            order: VecDeque::new(),
            next: 0,
            capacity: 10,
        };
        let s = |version: u64, status: &str| {
            Arc::new(pb::RecordStatus {
                version,
                status: status.into(),
                ..Default::default()
            })
        };
        assert!(l.offer("r".into(), s(2, "delivered")));
        assert!(!l.offer("r".into(), s(1, "delivered")), "a lower version");
        assert!(!l.offer("r".into(), s(2, "retrying")), "retrying after the outcome");
        assert!(l.offer("r".into(), s(3, "retrying")));
        assert!(l.offer("r".into(), s(3, "dead_lettered")));
        assert_eq!(l.map["r"].1.status, "dead_lettered");
    }

    #[test]
    fn status_records_of_any_shape_parse_or_are_skipped() {
        assert!(parse(b"\xff").is_none());
        let s =
            parse(br#"{"status":"delivered","version":3,"source":{"topic":"t","partition":1,"offset":9}}"#).unwrap();
        assert_eq!((s.status.as_str(), s.version), ("delivered", 3));
        assert_eq!(s.source.unwrap().offset, 9);
    }
}
