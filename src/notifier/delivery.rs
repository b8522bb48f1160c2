//! Delivery to one webhook endpoint: one task per endpoint, so that an endpoint that is
//! down or slow holds up no other.
//!
//! Notifications go out in the order they were made (a tenant's changes of health stay in
//! order), each signed afresh per attempt with the same `webhook-id`. A failed attempt
//! (no 2xx answer, a timeout, no connection) is retried with exponential backoff and
//! jitter, or after the endpoint's `Retry-After`; after `give_up_after_ms` the
//! notification goes to the notifier's dead-letter topic instead. The queue of an endpoint
//! is bounded: past it, the oldest notification waiting behind the one being retried goes
//! to the dead-letter topic. Either way every notification ends delivered or
//! dead-lettered, and only then are its failure events reported done (their offsets may
//! then be committed). Nothing of the endpoint's secrets or URL reaches the dead-letter
//! topic, logs or metrics: an endpoint is named by its label (`acme#0`, `operators#0`).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

use super::coalesce::{Notification, Source};
use super::signing::{signature_header, SigningKey};
use crate::dead_letter::cap;
use crate::telemetry::metric;

/// Where notifications go and how they are signed.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// Names the endpoint in logs, metrics and dead-letter records.
    pub label: String,
    pub url: reqwest::Url,
    pub keys: Vec<SigningKey>,
}

/// What every endpoint task shares.
pub struct Delivery {
    pub client: reqwest::Client,
    pub producer: FutureProducer,
    pub dlq_topic: String,
    pub base_delay: Duration,
    pub max_delay: Duration,
    pub give_up_after: Duration,
    pub max_queued: usize,
}

struct Waiting {
    notification: Arc<Notification>,
    first_attempt: Option<Instant>,
    attempts: u32,
    last_error: String,
}

/// Why one attempt failed, and how long the endpoint asked us to wait.
struct Failed {
    reason: String,
    retry_after: Option<Duration>,
}

/// Delivers what arrives on `incoming` until it is closed (the notifier stops; what is
/// still queued is read again from the failures topic next time), reporting each
/// notification's sources on `done` once it is delivered or dead-lettered.
pub async fn run(
    endpoint: Endpoint,
    mut incoming: UnboundedReceiver<Arc<Notification>>,
    done: UnboundedSender<Vec<Source>>,
    delivery: Arc<Delivery>,
) {
    let mut queue: VecDeque<Waiting> = VecDeque::new();
    let label = endpoint.label.clone();
    loop {
        if queue.is_empty() {
            match incoming.recv().await {
                Some(n) => queue.push_back(Waiting::new(n)),
                None => return,
            }
        }
        while let Ok(n) = incoming.try_recv() {
            queue.push_back(Waiting::new(n));
        }
        delivery.bound(&label, &mut queue, &done).await;
        metrics::gauge!(metric::NOTIFIER_QUEUED, "endpoint" => label.clone()).set(queue.len() as f64);

        let head = queue.front_mut().expect("not empty");
        let started = *head.first_attempt.get_or_insert_with(Instant::now);
        head.attempts += 1;
        match attempt(&delivery.client, &endpoint, &head.notification).await {
            Ok(()) => {
                let head = queue.pop_front().expect("not empty");
                metrics::counter!(metric::NOTIFICATIONS, "endpoint" => label.clone(), "type" => head.notification.kind, "outcome" => "delivered").increment(1);
                let _ = done.send(head.notification.sources.clone());
                continue;
            }
            Err(failed) => {
                metrics::counter!(metric::NOTIFICATION_ATTEMPT_FAILURES, "endpoint" => label.clone()).increment(1);
                head.last_error = failed.reason;
                if started.elapsed() >= delivery.give_up_after {
                    let head = queue.pop_front().expect("not empty");
                    tracing::error!(endpoint = %label, webhook_id = %head.notification.id, attempts = head.attempts, error = %head.last_error, "Giving up on a notification; it goes to the notifier's dead-letter topic.");
                    delivery.dead_letter(&label, head, "gave_up", &done).await;
                    continue;
                }
                let delay = failed
                    .retry_after
                    .unwrap_or_else(|| delivery.backoff(head.attempts))
                    .min(delivery.max_delay);
                tracing::warn!(endpoint = %label, webhook_id = %head.notification.id, attempts = head.attempts, error = %head.last_error, retry_in_ms = delay.as_millis() as u64, "Webhook delivery failed; retrying.");
                // Go on taking notifications in while waiting, within the bound.
                let until = tokio::time::Instant::now() + delay;
                loop {
                    tokio::select! {
                        () = tokio::time::sleep_until(until) => break,
                        next = incoming.recv() => match next {
                            Some(n) => {
                                queue.push_back(Waiting::new(n));
                                delivery.bound(&label, &mut queue, &done).await;
                            }
                            None => return,
                        },
                    }
                }
            }
        }
    }
}

impl Waiting {
    fn new(notification: Arc<Notification>) -> Waiting {
        Waiting {
            notification,
            first_attempt: None,
            attempts: 0,
            last_error: String::new(),
        }
    }
}

/// One signed POST; a 2xx answer is a delivery.
async fn attempt(client: &reqwest::Client, endpoint: &Endpoint, n: &Notification) -> Result<(), Failed> {
    let body = n.body();
    let timestamp = chrono::Utc::now().timestamp();
    let signature = signature_header(&endpoint.keys, &n.id, timestamp, &body);
    let sent = client
        .post(endpoint.url.clone())
        .header("content-type", "application/json")
        .header("webhook-id", &n.id)
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", signature)
        .body(body)
        .send()
        .await;
    match sent {
        Ok(r) if r.status().is_success() => Ok(()),
        Ok(r) => {
            let retry_after = r
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            Err(Failed {
                reason: format!("HTTP {}", r.status().as_u16()),
                retry_after,
            })
        }
        // Without the URL: it may carry a token in its query.
        Err(e) => Err(Failed {
            reason: e.without_url().to_string(),
            retry_after: None,
        }),
    }
}

impl Delivery {
    /// `base × 2^(attempts-1)`, capped, times a jitter in [0.5, 1].
    fn backoff(&self, attempts: u32) -> Duration {
        let exp = self
            .base_delay
            .saturating_mul(1u32 << attempts.saturating_sub(1).min(20));
        exp.min(self.max_delay).mul_f64(rand::thread_rng().gen_range(0.5..=1.0))
    }

    /// Dead-letters the oldest notifications waiting behind the head while the queue is
    /// over its bound.
    async fn bound(&self, label: &str, queue: &mut VecDeque<Waiting>, done: &UnboundedSender<Vec<Source>>) {
        while queue.len() > self.max_queued.max(1) {
            let oldest = queue.remove(1).expect("longer than one");
            tracing::error!(endpoint = %label, webhook_id = %oldest.notification.id, "Endpoint queue full; the oldest waiting notification goes to the notifier's dead-letter topic.");
            self.dead_letter(label, oldest, "queue_full", done).await;
        }
    }

    /// Writes a notification that was not delivered to the notifier's dead-letter topic
    /// (retrying until the broker takes it), then reports it done.
    async fn dead_letter(&self, label: &str, w: Waiting, reason: &str, done: &UnboundedSender<Vec<Source>>) {
        let n = &w.notification;
        let body = n.body();
        let attempts = w.attempts.to_string();
        let error = cap(&w.last_error);
        let tenant = n.tenant.as_deref().map(cap).unwrap_or_default();
        let headers = [
            ("crm-sync.webhook.endpoint", label),
            ("crm-sync.webhook.id", &n.id),
            ("crm-sync.webhook.type", n.kind),
            ("crm-sync.webhook.tenant", &tenant),
            ("crm-sync.notify.reason", reason),
            ("crm-sync.notify.last-error", &error),
            ("crm-sync.attempts", &attempts),
        ];
        loop {
            let mut h = OwnedHeaders::new();
            for (key, value) in headers {
                h = h.insert(rdkafka::message::Header {
                    key,
                    value: Some(value),
                });
            }
            let record = FutureRecord::to(&self.dlq_topic).key(&n.id).payload(&body).headers(h);
            match self.producer.send(record, Duration::from_secs(30)).await {
                Ok(_) => break,
                Err((e, _)) => {
                    metrics::counter!(metric::DLQ_WRITE_FAILURES, "topic" => self.dlq_topic.clone()).increment(1);
                    tracing::error!(topic = %self.dlq_topic, error = %e, "Could not write to the notifier's dead-letter topic; retrying.");
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
            }
        }
        metrics::counter!(metric::NOTIFICATIONS, "endpoint" => label.to_string(), "type" => n.kind, "outcome" => "dead_lettered").increment(1);
        let _ = done.send(n.sources.clone());
    }
}
