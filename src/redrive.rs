//! Redrive: dead-lettered events back to the input topic, after a fix.
//!
//! `crm-sync redrive --config F` reads the DLQ with the service's own Kafka client
//! settings (security included), keeps the records its filters select (tenant, entity,
//! error code, stage, time of the last failure), and produces each one's original key,
//! value and headers back to the input topic it came from, with a
//! `crm-sync.redriven` header (when), to the partition it came from. Never backwards: the
//! confirmed versions are read from the state topic first, and an event whose record
//! already holds its version or a newer one is skipped; of several dead-lettered versions
//! of one record, only the newest goes, once (a record dead-lettered again after an earlier
//! redrive is in the DLQ twice). That makes a second run a no-op for what the first one
//! delivered; one made before the service has processed the first run's events sends
//! them again, which the service skips as duplicates. `--dry-run` only counts, by reason.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, SystemTime};

use chrono::{DateTime, SecondsFormat, Utc};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{BorrowedMessage, Header, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

use crate::config::Config;
use crate::consume::client_config;
use crate::diff::store;
use crate::event::{self, RecordKey, Routes};
use crate::headers::{self, RawHeader};

/// The header that marks a redriven message (its value: when, RFC 3339).
pub const REDRIVEN: &str = "crm-sync.redriven";

/// Which dead-lettered events to redrive; every field left out matches all.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub tenant: Option<String>,
    pub entity: Option<String>,
    /// `crm-sync.error.code`, e.g. `crm_validation`.
    pub error_code: Option<String>,
    /// `crm-sync.stage`: `decode` or `deliver`.
    pub stage: Option<String>,
    /// Bounds on `crm-sync.last-failure`.
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
}

/// What a run did (or, dry, would do).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// DLQ records read.
    pub read: usize,
    /// Those the filters selected.
    pub selected: usize,
    /// Produced back to the input topic (dry: would be).
    pub redriven: usize,
    /// Skipped: the record already holds this version, or a newer one.
    pub already_delivered: usize,
    pub superseded: usize,
    /// Skipped: not an event crm-sync can read (a `decode`-stage record, or one trimmed to
    /// fit the DLQ).
    pub not_an_event: usize,
    /// Skipped: a newer version of the record, or the same event, goes in this run.
    pub duplicate: usize,
    /// Skipped: its source topic is not one of the service's input topics.
    pub unknown_source: usize,
    /// Why the run stopped early, if it did (what was sent until then is counted).
    pub error: Option<String>,
    /// Selected records by `crm-sync.error.code`.
    pub by_reason: BTreeMap<String, usize>,
}

/// Routes for decoding: the configured tenants and entities.
struct Configured<'a>(&'a Config);

impl Routes for Configured<'_> {
    fn has_tenant(&self, tenant: &str) -> bool {
        self.0.tenant(tenant).is_some()
    }
    fn has_entity(&self, tenant: &str, entity: &str) -> bool {
        self.0.tenant(tenant).is_some_and(|t| t.entities.contains_key(entity))
    }
}

/// A DLQ record's headers, as read (its key and payload are borrowed from the message).
struct Dead {
    headers: Vec<RawHeader>,
}

impl Dead {
    /// The last header of `name`: crm-sync's context follows the original headers, which
    /// may carry forged `crm-sync.*` ones.
    fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .rev()
            .find(|(k, _)| k.as_slice() == name.as_bytes())
            .and_then(|(_, v)| v.as_deref())
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }
}

/// A DLQ record the filters selected that is an event, without its payload.
struct Selected {
    /// Its partition and offset in the DLQ.
    at: (i32, i64),
    record: RecordKey,
    version: u64,
    /// The input topic and partition it came from, if it names a valid one.
    target: Option<(String, i32)>,
}

/// Runs a redrive; `dry_run` only counts. Memory holds no payload: the DLQ is read once
/// to select (keeping, per selected event, its record, version and place) and once more
/// to send the chosen ones; of the state topic, only the selected records' versions are
/// kept.
pub fn redrive(config: &Config, filter: &Filter, dry_run: bool) -> anyhow::Result<Report> {
    let client = client_config(&config.kafka);
    let timeout = Duration::from_secs(60);
    let dlq = config.kafka.dlq_topic.as_str();
    // The DLQ as it is now: what is dead-lettered during the run is not this run's.
    let extents = extents(&client, dlq, timeout)?;
    let input_partitions: HashMap<String, i32> = config
        .kafka
        .input_topics
        .iter()
        .map(|t| Ok((t.clone(), partitions_of(&client, t, timeout)?.len() as i32)))
        .collect::<anyhow::Result<_>>()?;
    let routes = Configured(config);
    let mut report = Report::default();

    // 1. What the filters select, and the newest dead-lettered version of each record
    //    (the first seen of equal ones), whether selected or not.
    let mut selected: Vec<Selected> = Vec::new();
    let mut newest: HashMap<RecordKey, (u64, (i32, i64))> = HashMap::new();
    scan(&client, dlq, &extents, timeout, |m| {
        report.read += 1;
        let d = Dead {
            headers: headers::read(m.headers()),
        };
        let at = (m.partition(), m.offset());
        let event = event::decode(m.payload(), usize::MAX, &routes).ok();
        if let Some(e) = &event {
            let slot = newest.entry(e.record.clone()).or_insert((e.version, at));
            if e.version > slot.0 {
                *slot = (e.version, at);
            }
        }
        let stage = d.header("crm-sync.stage");
        let code = d.header("crm-sync.error.code").unwrap_or_else(|| "?".into());
        let last = d
            .header("crm-sync.last-failure")
            .and_then(|t| DateTime::parse_from_rfc3339(&t).ok())
            .map(|t| t.with_timezone(&Utc));
        let matches = filter.stage.as_ref().is_none_or(|s| stage.as_ref() == Some(s))
            && filter.error_code.as_ref().is_none_or(|c| *c == code)
            && filter.since.is_none_or(|s| last.is_some_and(|l| l >= s))
            && filter.until.is_none_or(|u| last.is_some_and(|l| l <= u))
            && filter
                .tenant
                .as_ref()
                .is_none_or(|t| event.as_ref().is_some_and(|e| *e.record.tenant == **t))
            && filter
                .entity
                .as_ref()
                .is_none_or(|en| event.as_ref().is_some_and(|e| *e.record.entity == **en));
        if !matches {
            return Visit::Next;
        }
        report.selected += 1;
        *report.by_reason.entry(code).or_default() += 1;
        let Some(event) = event else {
            report.not_an_event += 1;
            return Visit::Next;
        };
        // Back where it came from: its topic, and its partition, which holds its record's
        // state (a producer's own partitioner might pick another).
        let partition = d
            .header("crm-sync.source.partition")
            .and_then(|p| p.parse::<i32>().ok());
        let target = d.header("crm-sync.source.topic").and_then(|t| {
            let count = *input_partitions.get(&t)?;
            partition.filter(|p| (0..count).contains(p)).map(|p| (t, p))
        });
        selected.push(Selected {
            at,
            record: event.record,
            version: event.version,
            target,
        });
        Visit::Next
    })?;

    // 2. Never backwards: the selected records' confirmed versions.
    let wanted: HashSet<&RecordKey> = selected.iter().map(|s| &s.record).collect();
    // The whole state topic is read: more time than for one partition.
    let confirmed = confirmed_versions(&client, &config.kafka.state_topic, &wanted, timeout * 5)?;
    let mut chosen: HashMap<(i32, i64), (String, i32)> = HashMap::new();
    for s in selected {
        if newest.get(&s.record).is_some_and(|(_, at)| *at != s.at) {
            report.duplicate += 1;
            continue;
        }
        match confirmed.get(&s.record) {
            Some(v) if *v > s.version => {
                report.superseded += 1;
                continue;
            }
            Some(v) if *v == s.version => {
                report.already_delivered += 1;
                continue;
            }
            _ => {}
        }
        let Some(target) = s.target else {
            report.unknown_source += 1;
            continue;
        };
        report.redriven += 1;
        chosen.insert(s.at, target);
    }
    if dry_run || chosen.is_empty() {
        return Ok(report);
    }

    // 3. The chosen records, read again, go back to their input partitions.
    let producer: FutureProducer = client.clone().set("acks", "all").create()?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let now = DateTime::<Utc>::from(SystemTime::now()).to_rfc3339_opts(SecondsFormat::Millis, true);
    let to_send = chosen.len();
    let mut sent = 0;
    let mut error = None;
    let read = scan(&client, dlq, &extents, timeout, |m| {
        if error.is_some() {
            return Visit::Stop;
        }
        // Taken, so that a message read twice is never sent twice.
        let Some((topic, partition)) = chosen.remove(&(m.partition(), m.offset())) else {
            return Visit::Next;
        };
        // The original headers, without what crm-sync added to them.
        let mut out = OwnedHeaders::new();
        for (k, v) in headers::read(m.headers())
            .iter()
            .filter(|(k, _)| !k.starts_with(b"crm-sync."))
        {
            out = out.insert(Header {
                key: &String::from_utf8_lossy(k),
                value: v.as_deref(),
            });
        }
        out = out.insert(Header {
            key: REDRIVEN,
            value: Some(now.as_bytes()),
        });
        let mut record = FutureRecord::<[u8], [u8]>::to(&topic).partition(partition).headers(out);
        if let Some(k) = m.key() {
            record = record.key(k);
        }
        if let Some(p) = m.payload() {
            record = record.payload(p);
        }
        match runtime.block_on(producer.send(record, Duration::from_secs(30))) {
            Ok(_) => sent += 1,
            Err((e, _)) => error = Some(format!("producing to {topic}/{partition}: {e}")),
        }
        if error.is_some() || sent == to_send {
            Visit::Stop
        } else {
            Visit::Next
        }
    });
    // What was sent is reported, whatever stopped the run.
    if let Err(e) = read {
        error.get_or_insert(e.to_string());
    }
    if error.is_some() || sent != report.redriven {
        report.redriven = sent;
        report.error = error.or_else(|| Some("some chosen DLQ records were gone when read again".into()));
    }
    Ok(report)
}

/// The partitions of `topic`; an error if it does not exist (or cannot be seen).
fn partitions_of(client: &ClientConfig, topic: &str, timeout: Duration) -> anyhow::Result<Vec<i32>> {
    let consumer: BaseConsumer = client.clone().set("group.id", "crm-sync-redrive").create()?;
    let metadata = consumer.fetch_metadata(Some(topic), timeout)?;
    let t = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .ok_or_else(|| anyhow::anyhow!("topic {topic} not found"))?;
    if let Some(e) = t.error() {
        anyhow::bail!("topic {topic}: {e:?}");
    }
    anyhow::ensure!(!t.partitions().is_empty(), "topic {topic} has no partition");
    Ok(t.partitions().iter().map(|p| p.id()).collect())
}

/// Each partition of `topic` that holds messages, with its first kept offset and its end.
fn extents(client: &ClientConfig, topic: &str, timeout: Duration) -> anyhow::Result<HashMap<i32, (i64, i64)>> {
    let consumer: BaseConsumer = client.clone().set("group.id", "crm-sync-redrive").create()?;
    let mut out = HashMap::new();
    for p in partitions_of(client, topic, timeout)? {
        let (low, high) = consumer.fetch_watermarks(topic, p, timeout)?;
        if high > low {
            out.insert(p, (low, high));
        }
    }
    Ok(out)
}

/// Whether [`scan`] goes on.
enum Visit {
    Next,
    Stop,
}

/// Hands every message of `topic` within `extents` to `visit`, one at a time, until it
/// says stop. Fails when no message of a partition still being read comes for `stall`
/// (a broker gone); the time `visit` takes does not count.
fn scan(
    client: &ClientConfig,
    topic: &str,
    extents: &HashMap<i32, (i64, i64)>,
    stall: Duration,
    mut visit: impl FnMut(&BorrowedMessage<'_>) -> Visit,
) -> anyhow::Result<()> {
    if extents.is_empty() {
        return Ok(());
    }
    let consumer: BaseConsumer = client
        .clone()
        .set("group.id", "crm-sync-redrive")
        .set("enable.auto.commit", "false")
        // A partition trimmed under the read goes on from its first kept message.
        .set("auto.offset.reset", "earliest")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for (p, (low, _)) in extents {
        tpl.add_partition_offset(topic, *p, Offset::Offset(*low))?;
    }
    consumer.assign(&tpl)?;
    let mut ends: HashMap<i32, i64> = extents.iter().map(|(p, (_, high))| (*p, *high)).collect();
    let mut last_progress = std::time::Instant::now();
    while !ends.is_empty() {
        anyhow::ensure!(
            last_progress.elapsed() < stall,
            "reading {topic}: no message for {} s",
            stall.as_secs()
        );
        let Some(message) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let m = message?;
        let Some(end) = ends.get(&m.partition()).copied() else {
            continue;
        };
        if m.offset() >= end {
            ends.remove(&m.partition());
            continue;
        }
        if m.offset() + 1 >= end {
            ends.remove(&m.partition());
        }
        let next = visit(&m);
        last_progress = std::time::Instant::now();
        if matches!(next, Visit::Stop) {
            break;
        }
    }
    Ok(())
}

/// The confirmed versions of the `wanted` records, from the whole state topic.
fn confirmed_versions(
    client: &ClientConfig,
    topic: &str,
    wanted: &HashSet<&RecordKey>,
    timeout: Duration,
) -> anyhow::Result<HashMap<RecordKey, u64>> {
    // A state topic that cannot be read is an error: without it, nothing would stop an
    // older version.
    let partitions = partitions_of(client, topic, timeout)?;
    let mut versions: HashMap<RecordKey, u64> = HashMap::new();
    let mut markers = store::Markers::default();
    store::restore(
        client,
        topic,
        &partitions,
        timeout,
        |chunk| {
            for (record, state) in chunk {
                if wanted.contains(&record) {
                    let v = versions.entry(record).or_insert(state.version);
                    *v = (*v).max(state.version);
                }
            }
        },
        &mut markers,
    )?;
    Ok(versions)
}
