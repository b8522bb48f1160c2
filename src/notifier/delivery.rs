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
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
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

/// Where notifications go and how they are signed. Its `Debug` shows the label only (a
/// URL may carry a token).
#[derive(Clone)]
pub struct Endpoint {
    /// Names the endpoint in logs, metrics and dead-letter records.
    pub label: String,
    pub url: reqwest::Url,
    pub keys: Vec<SigningKey>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Endpoint({})", self.label)
    }
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
    /// Failure events a failing endpoint's queue may stand for at most.
    pub max_sources: usize,
}

struct Waiting {
    notification: Arc<Notification>,
    /// When it reached this endpoint: `give_up_after` counts from here.
    queued: Instant,
    attempts: u32,
    last_error: String,
}

/// Why one attempt failed, and how long the endpoint asked us to wait.
struct Failed {
    reason: String,
    retry_after: Option<Duration>,
}

/// How loaded an endpoint is, shared with the reader: notifications handed to it and not
/// yet delivered or dead-lettered, the failure events they stand for, and whether it is
/// failing ([`FAILING_AFTER`] failed attempts in a row). The reader waits while an
/// endpoint that is not failing has `max_queued` (it is slow: wait for it); a failing
/// endpoint's queue is bounded by dead-lettering instead (it is down: do not hold up the
/// others for it).
#[derive(Debug, Default)]
pub struct Load {
    pub outstanding: AtomicUsize,
    pub sources: AtomicUsize,
    pub failing: AtomicBool,
}

/// Failed attempts in a row after which an endpoint counts as failing (one 503 of a busy
/// endpoint does not).
pub const FAILING_AFTER: u32 = 3;

/// Delivers what arrives on `incoming` until it is closed (the notifier stops; what is
/// still queued is read again from the failures topic next time), reporting each
/// notification's sources on `done` once it is delivered or dead-lettered.
pub async fn run(
    endpoint: Endpoint,
    mut incoming: UnboundedReceiver<Arc<Notification>>,
    done: UnboundedSender<Vec<Source>>,
    delivery: Arc<Delivery>,
    load: Arc<Load>,
) {
    let mut queue: VecDeque<Waiting> = VecDeque::new();
    let label = endpoint.label.clone();
    let finish = |n: &Notification| {
        load.outstanding.fetch_sub(1, Ordering::SeqCst);
        load.sources.fetch_sub(n.sources.len(), Ordering::SeqCst);
        let _ = done.send(n.sources.clone());
    };
    // Failed attempts in a row, and since when.
    let mut failures: u32 = 0;
    let mut failing_since: Option<Instant> = None;
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
        delivery.bound(&label, &mut queue, &load, &finish).await;
        metrics::gauge!(metric::NOTIFIER_QUEUED, "endpoint" => label.clone()).set(queue.len() as f64);

        let head = queue.front_mut().expect("not empty");
        head.attempts += 1;
        match attempt(&delivery.client, &endpoint, &head.notification).await {
            Ok(()) => {
                failures = 0;
                failing_since = None;
                load.failing.store(false, Ordering::SeqCst);
                let head = queue.pop_front().expect("not empty");
                metrics::counter!(metric::NOTIFICATIONS, "endpoint" => label.clone(), "type" => head.notification.kind, "outcome" => "delivered").increment(1);
                finish(&head.notification);
                continue;
            }
            Err(failed) => {
                failures += 1;
                let since = *failing_since.get_or_insert_with(Instant::now);
                load.failing.store(failures >= FAILING_AFTER, Ordering::SeqCst);
                metrics::counter!(metric::NOTIFICATION_ATTEMPT_FAILURES, "endpoint" => label.clone()).increment(1);
                head.last_error = failed.reason;
                // A notification is given up once the endpoint has failed for
                // give_up_after while it waited: counted from its queuing or from when the
                // endpoint began failing, whichever is later. What waited behind the head
                // that long goes with it (their last error is the head's).
                let due = |w: &Waiting| w.queued.max(since).elapsed() >= delivery.give_up_after;
                if due(head) {
                    let error = head.last_error.clone();
                    while queue.front().is_some_and(due) {
                        let mut w = queue.pop_front().expect("just seen");
                        if w.last_error.is_empty() {
                            w.last_error = error.clone();
                        }
                        tracing::error!(endpoint = %label, webhook_id = %w.notification.id, attempts = w.attempts, error = %w.last_error, "Giving up on a notification; it goes to the notifier's dead-letter topic.");
                        delivery.dead_letter(&label, &w, "gave_up").await;
                        finish(&w.notification);
                    }
                    continue;
                }
                // The endpoint's Retry-After may ask for longer than our backoff, never
                // for less; at most the longest delay.
                let delay = failed
                    .retry_after
                    .map_or_else(
                        || delivery.backoff(head.attempts),
                        |asked| asked.max(delivery.backoff(head.attempts)),
                    )
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
                                delivery.bound(&label, &mut queue, &load, &finish).await;
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
            queued: Instant::now(),
            attempts: 0,
            last_error: String::new(),
        }
    }
}

/// `Retry-After`: seconds, or an HTTP date.
fn retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    let wait = at
        .timestamp_millis()
        .saturating_sub(chrono::Utc::now().timestamp_millis());
    Some(Duration::from_millis(wait.max(0) as u64))
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
                .and_then(retry_after);
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

    /// While the endpoint is failing, dead-letters the oldest notifications waiting
    /// behind the head (which is being retried) as long as its queue is over its bound, in
    /// notifications or in the failure events they stand for.
    async fn bound(&self, label: &str, queue: &mut VecDeque<Waiting>, load: &Load, finish: &impl Fn(&Notification)) {
        if !load.failing.load(Ordering::SeqCst) {
            return;
        }
        while queue.len() > 1
            && (queue.len() > self.max_queued || load.sources.load(Ordering::SeqCst) > self.max_sources)
        {
            let oldest = queue.remove(1).expect("longer than one");
            tracing::error!(endpoint = %label, webhook_id = %oldest.notification.id, "Endpoint queue full while it fails; the oldest waiting notification goes to the notifier's dead-letter topic.");
            self.dead_letter(label, &oldest, "queue_full").await;
            finish(&oldest.notification);
        }
    }

    /// Writes a notification that was not delivered to the notifier's dead-letter topic,
    /// retrying until the broker takes it.
    async fn dead_letter(&self, label: &str, w: &Waiting, reason: &str) {
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_is_seconds_or_a_date() {
        assert_eq!(retry_after(" 7 "), Some(Duration::from_secs(7)));
        let later = (chrono::Utc::now() + chrono::Duration::seconds(30)).to_rfc2822();
        let d = retry_after(&later).unwrap();
        assert!(d > Duration::from_secs(25) && d <= Duration::from_secs(30), "{d:?}");
        assert_eq!(retry_after("Sun, 06 Nov 1994 08:49:37 GMT"), Some(Duration::ZERO));
        assert_eq!(retry_after("soon"), None);
        assert_eq!(retry_after("99999999999999999999999"), None);
    }
}
