//! Operator pauses of a tenant (`AdminService.PauseTenant`, `crm-sync pause`), for the
//! whole group and across restarts.
//!
//! A pause is a flag per tenant and per who set it: the admin token, or the tenant's own
//! token ([`PausedBy`]). The tenant is paused while either is set. A tenant's token
//! clears only its own flag, so an operator's pause outlasts the tenant's resume; the
//! admin token's resume clears both.
//!
//! With `kafka.pause_topic` (compacted), each flag is a record keyed by the JSON array
//! `[tenant, "admin"|"tenant"]`, its value `{"paused": bool, "at": RFC 3339 time}`.
//! Every member reads the topic from its start before it consumes any event, and follows
//! it afterwards. So a pause taken through any member holds on every member, on members
//! that start later, and after restarts: compaction keeps each flag's latest record, and
//! two keys (not one) keep a tenant's resume from ever replacing an operator's pause. A
//! call is answered once its record is on the topic, this member has read it back, and
//! the tenant actor here has followed it; the other members follow as they read it.
//!
//! Without the topic, the flags live in the member that took the call, until it
//! restarts.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::watch;

use super::board::{Board, PausedBy};
use super::Hold;
use crate::config::KafkaConfig;
use crate::consume;
use crate::consume::StopSignal;

/// How long a call waits for its record to be written and read back.
const ANSWER_WITHIN: Duration = Duration::from_secs(10);

/// Where pause flags are kept: the pause topic, or this member alone.
#[derive(Clone)]
pub struct Pauses {
    board: Board,
    topic: Option<Arc<PauseTopic>>,
}

struct PauseTopic {
    name: String,
    producer: FutureProducer,
    /// Per partition, the offset after the last record this member has applied.
    applied: watch::Receiver<HashMap<i32, i64>>,
    applied_tx: watch::Sender<HashMap<i32, i64>>,
}

/// A pause flag that could not be set.
#[derive(Debug, thiserror::Error)]
pub enum PauseError {
    #[error("the pause topic did not take the change: {0}")]
    Write(String),
    #[error(
        "the change is on the pause topic (the other members follow it), but this member did not read it back in time"
    )]
    NotReadBack,
    #[error("the change was not confirmed in time: it may still be applied; check the tenant's state")]
    TimedOut,
}

impl Pauses {
    pub fn new(config: &KafkaConfig, board: Board) -> Result<Pauses, rdkafka::error::KafkaError> {
        let topic = match &config.pause_topic {
            Some(name) => {
                let producer: FutureProducer = consume::producer_config(config).create()?;
                let (applied_tx, applied) = watch::channel(HashMap::new());
                Some(Arc::new(PauseTopic {
                    name: name.clone(),
                    producer,
                    applied,
                    applied_tx,
                }))
            }
            None => None,
        };
        Ok(Pauses { board, topic })
    }

    pub fn board(&self) -> &Board {
        &self.board
    }

    /// Sets `tenant`'s flags `by` to `paused`, on the pause topic when there is one
    /// (then waits until this member has read them back), and has this member's tenant
    /// actor follow.
    pub async fn set(&self, tenant: &str, by: &[PausedBy], paused: bool) -> Result<(), PauseError> {
        // Writes, the read back and the actor's answer: bounded together.
        tokio::time::timeout(ANSWER_WITHIN * 3, self.set_unbounded(tenant, by, paused))
            .await
            .unwrap_or(Err(PauseError::TimedOut))
    }

    async fn set_unbounded(&self, tenant: &str, by: &[PausedBy], paused: bool) -> Result<(), PauseError> {
        match &self.topic {
            Some(topic) => {
                let mut written = Vec::with_capacity(by.len());
                for who in by {
                    let key = serde_json::json!([tenant, who.as_str()]).to_string();
                    let value = serde_json::json!({
                        "paused": paused,
                        "at": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                    })
                    .to_string();
                    let delivery = topic
                        .producer
                        .send(FutureRecord::to(&topic.name).key(&key).payload(&value), ANSWER_WITHIN)
                        .await
                        .map_err(|(e, _)| PauseError::Write(e.to_string()))?;
                    written.push((delivery.partition, delivery.offset));
                }
                let mut applied = topic.applied.clone();
                let read_back = async move {
                    applied
                        .wait_for(|at| {
                            written
                                .iter()
                                .all(|(p, offset)| at.get(p).is_some_and(|next| next > offset))
                        })
                        .await
                        .is_ok()
                };
                if !tokio::time::timeout(ANSWER_WITHIN, read_back).await.unwrap_or(false) {
                    return Err(PauseError::NotReadBack);
                }
            }
            None => {
                for who in by {
                    self.board.set_paused(tenant, *who, paused);
                }
            }
        }
        if let Some(actor) = self.board.actor(tenant) {
            // Answered once the actor has followed the flags as they are now.
            let _ = actor.send(Hold).await;
        }
        Ok(())
    }

    /// Reads the pause topic from its start until its end as of now, applying every flag,
    /// then follows it on a thread of its own until `stop`. Returns once caught up, or
    /// the reason it could not be.
    pub fn follow(&self, config: &KafkaConfig, stop: StopSignal) -> Result<(), String> {
        let Some(topic) = self.topic.clone() else {
            return Ok(());
        };
        let consumer: BaseConsumer = consume::client_config(config)
            .set("group.id", format!("{}.pauses", config.group_id))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            // A flag is never skipped: a partition trimmed under the read restarts it at
            // the first record kept.
            .set("auto.offset.reset", "earliest")
            .create()
            .map_err(|e| e.to_string())?;
        let metadata = consumer
            .fetch_metadata(Some(&topic.name), ANSWER_WITHIN)
            .map_err(|e| e.to_string())?;
        let partitions = metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic.name && t.error().is_none())
            .map_or(0, |t| t.partitions().len() as i32);
        if partitions == 0 {
            return Err(format!("the pause topic {} does not exist", topic.name));
        }
        let mut assignment = TopicPartitionList::new();
        // Where each partition ends now, and the offset reading it starts from.
        let mut ends = HashMap::new();
        let mut starts = HashMap::new();
        for p in 0..partitions {
            assignment
                .add_partition_offset(&topic.name, p, Offset::Beginning)
                .map_err(|e| e.to_string())?;
            let (low, high) = consumer
                .fetch_watermarks(&topic.name, p, ANSWER_WITHIN)
                .map_err(|e| e.to_string())?;
            ends.insert(p, high);
            starts.insert(p, low);
        }
        consumer.assign(&assignment).map_err(|e| e.to_string())?;
        let board = self.board.clone();
        let (caught_up_tx, caught_up) = std::sync::mpsc::channel();
        // Set when the start gives up on catching up: the thread then ends too.
        let given_up = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread_given_up = given_up.clone();
        std::thread::Builder::new()
            .name("crm-sync-pauses".into())
            .spawn(move || {
                let mut caught_up_tx = Some(caught_up_tx);
                let mut applied = starts;
                while stop.mode().is_none() && !thread_given_up.load(std::sync::atomic::Ordering::Relaxed) {
                    let behind = ends.iter().any(|(p, end)| applied.get(p).copied().unwrap_or(0) < *end);
                    if !behind {
                        if let Some(tx) = caught_up_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    let Some(message) = consumer.poll(Duration::from_millis(200)) else {
                        continue;
                    };
                    let message = match message {
                        Ok(m) => m,
                        Err(e) => {
                            tracing::warn!(topic = %topic.name, error = %e, "Pause topic read error.");
                            continue;
                        }
                    };
                    apply(&board, message.key(), message.payload());
                    applied.insert(message.partition(), message.offset() + 1);
                    topic.applied_tx.send_modify(|at| {
                        at.insert(message.partition(), message.offset() + 1);
                    });
                }
            })
            .map_err(|e| e.to_string())?;
        caught_up.recv_timeout(Duration::from_secs(30)).map_err(|_| {
            given_up.store(true, std::sync::atomic::Ordering::Relaxed);
            "the pause topic could not be read to its end within 30 s".to_string()
        })
    }
}

/// Applies one record of the pause topic; one of any other shape is skipped.
fn apply(board: &Board, key: Option<&[u8]>, payload: Option<&[u8]>) {
    let Some((tenant, by)) = key
        .and_then(|k| serde_json::from_slice::<(String, String)>(k).ok())
        .and_then(|(tenant, by)| Some((tenant, PausedBy::parse(&by)?)))
    else {
        return;
    };
    // A tombstone clears the flag, as `paused: false` does.
    let paused = match payload {
        None => false,
        Some(p) => match serde_json::from_slice::<serde_json::Value>(p)
            .ok()
            .and_then(|v| v["paused"].as_bool())
        {
            Some(paused) => paused,
            None => return,
        },
    };
    if board.set_paused(&tenant, by, paused) {
        tracing::warn!(tenant = %tenant, by = by.as_str(), paused, "A tenant's pause changed.");
        if let Some(actor) = board.actor(&tenant) {
            actor.do_send(Hold);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tenants_resume_does_not_end_an_operators_pause() {
        let board = Board::default();
        let key = |by: &str| serde_json::json!(["acme", by]).to_string().into_bytes();
        apply(&board, Some(&key("admin")), Some(br#"{"paused":true}"#));
        apply(&board, Some(&key("tenant")), Some(br#"{"paused":true}"#));
        apply(&board, Some(&key("tenant")), Some(br#"{"paused":false}"#));
        assert!(board.paused("acme"), "the operator's pause stands");
        apply(&board, Some(&key("admin")), None);
        assert!(!board.paused("acme"), "a tombstone clears the flag");
    }

    #[test]
    fn records_of_any_other_shape_are_skipped() {
        let board = Board::default();
        for (key, value) in [
            (&b"\xff\xfe"[..], &br#"{"paused":true}"#[..]),
            (br#"["acme"]"#, br#"{"paused":true}"#),
            (br#"["acme","root"]"#, br#"{"paused":true}"#),
            (br#"{"tenant":"acme"}"#, br#"{"paused":true}"#),
        ] {
            apply(&board, Some(key), Some(value));
        }
        apply(&board, None, Some(br#"{"paused":true}"#));
        assert!(!board.paused("acme"));
        apply(&board, Some(br#"["acme","admin"]"#), Some(br#"{"paused":true}"#));
        for value in [&b"\xff"[..], b"{}", br#"{"paused":"no"}"#] {
            apply(&board, Some(br#"["acme","admin"]"#), Some(value));
        }
        assert!(board.paused("acme"), "a value of another shape changes nothing");
    }
}
