//! The chaos harness's Kafka side: the run's topics, the stream produced while members
//! die (the workload with hostile rounds mixed in, in timed slices), and the reads that
//! decide whether it is done (lag, retention).

use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::Rng;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaResult;
use rdkafka::producer::{FutureProducer, FutureRecord};

use super::hostile::{Fate, Hostile, Outgoing};
use super::ChaosError;
use crate::headers::HeaderList;
use crate::sandbox::kafka::{tools, KafkaSandbox};

/// The run's topics and group, under names of their own.
#[derive(Debug, Clone)]
pub struct Topics {
    pub input: String,
    pub retry: String,
    pub state: String,
    pub dlq: String,
    pub failures: String,
    pub group: String,
}

impl Topics {
    pub fn random() -> Self {
        let run: u32 = rand::random();
        let name = |what: &str| format!("chaos-{run:08x}-{what}");
        Topics {
            input: name("events"),
            retry: name("retry"),
            state: name("state"),
            dlq: name("dlq"),
            failures: name("failures"),
            group: name("group"),
        }
    }

    /// Input, retry and state with `partitions` each (the retry topic is co-partitioned
    /// with the input); the DLQ too, so that its huge records spread; failures with one.
    pub fn create(&self, kafka: &KafkaSandbox, partitions: i32) -> Result<(), ChaosError> {
        for (topic, n) in [
            (&self.input, partitions),
            (&self.retry, partitions),
            (&self.state, partitions),
            (&self.dlq, partitions),
            (&self.failures, 1),
        ] {
            kafka
                .create_topic(topic, n)
                .map_err(|e| ChaosError::Setup(format!("creating topic {topic}: {e}")))?;
        }
        Ok(())
    }
}

/// A hostile message as the broker stored it.
#[derive(Debug, Clone)]
pub struct SentHostile {
    pub hostile: Hostile,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

impl SentHostile {
    pub fn dead_letter_code(&self) -> Option<&'static str> {
        match self.hostile.fate {
            Fate::DeadLettered(code) => Some(code),
            Fate::Processed => None,
        }
    }
}

/// Mixes `hostile` rounds into `workload` at random places (each round in one piece, the
/// workload's order kept) and cuts the whole into `slices` of about equal size.
pub fn plan(
    workload: Vec<Outgoing>,
    hostile: Vec<Vec<Outgoing>>,
    slices: usize,
    rng: &mut StdRng,
) -> Vec<Vec<Outgoing>> {
    let mut at: Vec<usize> = hostile.iter().map(|_| rng.gen_range(0..=workload.len())).collect();
    at.sort_unstable();
    let total = workload.len() + hostile.iter().map(Vec::len).sum::<usize>();
    let mut rounds = at.into_iter().zip(hostile).peekable();
    let mut all = Vec::with_capacity(total);
    for (i, message) in workload.into_iter().enumerate() {
        while let Some((_, round)) = rounds.next_if(|(a, _)| *a == i) {
            all.extend(round);
        }
        all.push(message);
    }
    all.extend(rounds.flat_map(|(_, round)| round));
    let per_slice = total.div_ceil(slices.max(1)).max(1);
    let mut out = Vec::new();
    let mut iter = all.into_iter().peekable();
    while iter.peek().is_some() {
        out.push(iter.by_ref().take(per_slice).collect());
    }
    out
}

/// Produces `slices` one every `interval` on a thread of its own, each acknowledged
/// before the next (so each record's versions stay in order); returns where each hostile
/// message was stored.
pub fn spawn_producer(
    bootstrap: String,
    slices: Vec<Vec<Outgoing>>,
    interval: Duration,
) -> std::thread::JoinHandle<Result<Vec<SentHostile>, String>> {
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("message.max.bytes", "3000000")
            .set("linger.ms", "5")
            .set("acks", "all")
            .set("enable.idempotence", "false")
            .set("max.in.flight.requests.per.connection", "1")
            .create()
            .map_err(|e| e.to_string())?;
        let started = Instant::now();
        let mut sent = Vec::new();
        for (i, slice) in slices.iter().enumerate() {
            // Pacing, not synchronisation: the stream is spread over the chaos phase so
            // that members die while it flows.
            let due = started + interval * i as u32;
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            let stored = runtime.block_on(send(&producer, slice)).map_err(|e| e.to_string())?;
            for (message, (partition, offset)) in slice.iter().zip(stored) {
                if let Some(hostile) = message.hostile {
                    sent.push(SentHostile {
                        hostile,
                        topic: message.topic.clone(),
                        partition,
                        offset,
                    });
                }
            }
        }
        Ok(sent)
    })
}

/// Sends every message, all in flight at once, and returns where each was stored.
async fn send(producer: &FutureProducer, messages: &[Outgoing]) -> KafkaResult<Vec<(i32, i64)>> {
    let sends = messages.iter().map(|m| {
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&m.topic).key(&m.key[..]);
        if let Some(p) = m.partition {
            record = record.partition(p);
        }
        if let Some(v) = &m.value {
            record = record.payload(&v[..]);
        }
        if !m.headers.is_empty() {
            let mut list = HeaderList::with_capacity(m.headers.len());
            for (k, v) in &m.headers {
                list.add(k, v.as_deref());
            }
            record = record.headers(list.into_owned());
        }
        producer.send(record, Duration::from_secs(30))
    });
    futures::future::join_all(sends)
        .await
        .into_iter()
        .map(|r| r.map(|d| (d.partition, d.offset)).map_err(|(e, _)| e))
        .collect()
}

/// Messages of `topic` that `group` has not committed, per partition. Committed offsets
/// are read before end offsets, so that a message written because of an event before
/// that event's own offset was committed (a parked copy, a forwarded one) is counted.
pub fn lag(bootstrap: &str, group: &str, topic: &str, partitions: i32) -> KafkaResult<Vec<i64>> {
    let committed = tools::committed(bootstrap, group, topic, partitions)?;
    let ends = tools::end_offsets(bootstrap, topic, partitions)?;
    Ok(ends
        .iter()
        .zip(&committed)
        .map(|(end, c)| (end - c.unwrap_or(0)).max(0))
        .collect())
}

/// Partitions of `topic` whose oldest messages the broker has dropped (low watermark
/// above 0): the mock keeps only about 5 MiB per partition.
pub fn truncated(bootstrap: &str, topic: &str, partitions: i32) -> KafkaResult<Vec<(i32, i64)>> {
    let consumer: BaseConsumer = ClientConfig::new().set("bootstrap.servers", bootstrap).create()?;
    let mut out = Vec::new();
    for p in 0..partitions {
        let (low, _) = consumer.fetch_watermarks(topic, p, Duration::from_secs(10))?;
        if low > 0 {
            out.push((p, low));
        }
    }
    Ok(out)
}

/// The group's committed offsets on the input topic, sampled all through the run:
/// evidence for a message read twice, and a check that no commit goes backwards.
#[derive(Debug, Default)]
pub struct CommitLog {
    samples: Vec<(std::time::SystemTime, Vec<Option<i64>>)>,
    next: Option<Instant>,
}

impl CommitLog {
    const EVERY: Duration = Duration::from_millis(500);

    /// Takes a sample if the last one is older than [`Self::EVERY`]; a failed read is
    /// skipped (the next tick tries again).
    pub fn sample_if_due(&mut self, bootstrap: &str, group: &str, topic: &str, partitions: i32) {
        if self.next.is_some_and(|next| Instant::now() < next) {
            return;
        }
        self.next = Some(Instant::now() + Self::EVERY);
        if let Ok(committed) = tools::committed(bootstrap, group, topic, partitions) {
            self.samples.push((std::time::SystemTime::now(), committed));
        }
    }

    /// Samples taken.
    pub fn count(&self) -> usize {
        self.samples.len()
    }

    /// Commits that went backwards: (partition, from, to, when).
    pub fn regressions(&self) -> Vec<(usize, i64, i64, std::time::SystemTime)> {
        let mut out = Vec::new();
        for pair in self.samples.windows(2) {
            let [(_, before), (when, after)] = pair else { continue };
            for (p, (b, a)) in before.iter().zip(after).enumerate() {
                if let (Some(b), Some(a)) = (b, a) {
                    if a < b {
                        out.push((p, *b, *a, *when));
                    }
                }
            }
        }
        out
    }

    /// The highest offset of `partition` seen committed before `time`.
    pub fn highest_before(&self, partition: usize, time: std::time::SystemTime) -> Option<i64> {
        self.samples
            .iter()
            .filter(|(t, _)| *t < time)
            .filter_map(|(_, c)| c.get(partition).copied().flatten())
            .max()
    }
}
