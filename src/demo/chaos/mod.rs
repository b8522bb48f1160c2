//! The chaos harness: the promises kept while members die.
//!
//! Several members of one consumer group, each a `crm-sync run` child process, are
//! killed with SIGKILL and started again at random moments while a stream flows: the
//! [`workload`](super::workload) (creates, updates, unchanged repeats, duplicates, late
//! stale versions, deletes) with [`hostile`] messages mixed in. The broker (librdkafka's
//! mock cluster) and the CRM sandboxes run in this process, so they outlive every
//! member. The sandboxes answer with 5xx, row locks and expired tokens all along, and
//! with 429 storms, bursts of 5xx and latency spikes at random moments (`crms.rs`); one
//! tenant is slow on every call. Retries park on the retry topic at the first failure.
//!
//! Then the faults stop, every member runs, and once every offset is committed the
//! harness checks what must hold ([`ChaosReport::violations`]):
//! - every record holds its newest version in its CRM (or is absent) — [`super::verify`];
//! - every hostile message that must be dead-lettered is in the DLQ exactly once per
//!   source offset (`crm-sync.source.topic/partition/offset`), with its reason, and
//!   nothing else is;
//! - no lag: the group has committed the input topic to its end, `{group}.retry` the
//!   retry topic;
//! - no member's resident memory (VmRSS, sampled all along) went past a bound, and no
//!   member ended on its own.
//!
//! Long form: `load-test --scenario chaos`; short form: `tests/chaos.rs`.

mod crms;
pub mod hostile;
mod members;
mod stream;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use chrono::{DateTime, SecondsFormat, Utc};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use crate::config::Config;
use crate::consume::retry_group_id;
use crate::demo::workload::{generate, TenantSpec, WorkloadCounts, WorkloadSpec};
use crate::demo::{verify, Mismatch};
use crate::sandbox::common::Stats;
use crate::sandbox::kafka::tools::{self, ReadMessage};
use crate::sandbox::kafka::KafkaSandbox;
use crate::sandbox::CrmSandbox;
use crms::{FaultKind, Tenant};
use hostile::Outgoing;
use members::{Launcher, Member};
pub use stream::SentHostile;
use stream::Topics;

#[derive(Debug, thiserror::Error)]
pub enum ChaosError {
    #[error("chaos harness setup failed: {0}")]
    Setup(String),
    #[error("Kafka, from the harness: {0}")]
    Kafka(String),
}

fn kafka<E: fmt::Display>(what: &str) -> impl FnOnce(E) -> ChaosError + '_ {
    move |e| ChaosError::Kafka(format!("{what}: {e}"))
}

/// How hard and how long.
#[derive(Debug, Clone)]
pub struct ChaosOptions {
    /// The `crm-sync` binary the members run.
    pub binary: PathBuf,
    pub members: usize,
    /// Partitions of the input, retry, state and DLQ topics.
    pub partitions: i32,
    /// Workload events, about (the generator makes whole records).
    pub events: usize,
    /// How long members are killed and CRMs misbehave; the stream is produced over the
    /// first 70% of it.
    pub chaos: Duration,
    /// Members stopped during the chaos, at random moments.
    pub kills: usize,
    /// How they are stopped: SIGKILL, or (to tell apart what only a crash causes)
    /// SIGTERM.
    pub stop: Stop,
    /// Rounds of hostile messages ([`hostile::PER_ROUND`] each) at random places.
    pub hostile_rounds: usize,
    /// How many of those rounds carry the huge messages (600 KB tenant, 1.2 MB message,
    /// 100 KB key): the mock broker keeps only about 5 MiB per partition.
    pub huge_rounds: usize,
    /// Longest wait, once the chaos is over, for every offset to be committed.
    pub drain_within: Duration,
    /// Resident memory no member may go past.
    pub rss_limit_mib: u64,
    /// Seeds the workload, the hostile rounds, the faults and the moments of kills.
    pub seed: u64,
}

impl ChaosOptions {
    /// The test suite's form: under two minutes on a 2-core machine, start-ups included.
    pub fn short(binary: PathBuf) -> Self {
        ChaosOptions {
            binary,
            members: 3,
            partitions: 6,
            events: 2_500,
            chaos: Duration::from_secs(35),
            kills: 5,
            stop: Stop::Kill,
            hostile_rounds: 3,
            huge_rounds: 2,
            drain_within: Duration::from_secs(60),
            rss_limit_mib: RSS_LIMIT_MIB,
            seed: rand::random(),
        }
    }

    /// The load test's default form.
    pub fn long(binary: PathBuf) -> Self {
        ChaosOptions {
            binary,
            members: 3,
            partitions: 12,
            events: 40_000,
            chaos: Duration::from_secs(90),
            kills: 15,
            stop: Stop::Kill,
            hostile_rounds: 8,
            huge_rounds: 4,
            drain_within: Duration::from_secs(180),
            rss_limit_mib: RSS_LIMIT_MIB,
            seed: rand::random(),
        }
    }
}

/// How the chaos stops a member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// SIGKILL: no drain, no commit, no leaving the group.
    Kill,
    /// SIGTERM: the graceful stop (drain, commit, leave), waited for.
    Term,
}

impl Stop {
    pub fn as_str(self) -> &'static str {
        match self {
            Stop::Kill => "SIGKILL",
            Stop::Term => "SIGTERM",
        }
    }
}

/// The memory bound of a member: its in-flight windows (partitions × (500 + a 512-message
/// batch) events × ~4 KiB, 47 MiB at 12 partitions), librdkafka's prefetch (16 MiB) and the service's own heap,
/// with room for the huge messages it reads and writes again.
pub const RSS_LIMIT_MIB: u64 = 256;

/// How often the stream sends its next slice.
const SLICE_INTERVAL: Duration = Duration::from_millis(200);
/// The chaos loop's cadence: RSS samples, kills and faults come due on these ticks.
const TICK: Duration = Duration::from_millis(100);

/// A SIGKILL.
#[derive(Debug, Clone)]
pub struct Kill {
    /// Seconds since the run started.
    pub at: f64,
    pub wall_clock: String,
    pub member: usize,
    pub pid: u32,
    /// Messages not yet committed then, input and retry topics together.
    pub lag: Option<i64>,
    /// The group's committed offsets on the input topic then, per partition.
    pub committed: Vec<Option<i64>>,
    time: SystemTime,
}

/// A member that ended without being killed.
#[derive(Debug, Clone)]
pub struct Crash {
    pub at: f64,
    pub member: usize,
    pub status: String,
    pub log: PathBuf,
}

/// One DLQ record, as evidence.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub dlq_partition: i32,
    pub dlq_offset: i64,
    pub code: String,
    pub attempts: String,
    pub first_failure: String,
    pub last_failure: String,
}

/// The DLQ held more than one record for one source offset.
#[derive(Debug, Clone)]
pub struct DuplicateDeadLetter {
    pub source: (String, i32, i64),
    /// What the source message was, if the harness sent it as hostile.
    pub hostile: Option<&'static str>,
    pub copies: Vec<DeadLetter>,
}

/// The DLQ against the hostile messages sent.
#[derive(Debug, Clone, Default)]
pub struct DlqCheck {
    pub records: usize,
    pub source_offsets: usize,
    pub by_reason: BTreeMap<String, usize>,
    pub duplicates: Vec<DuplicateDeadLetter>,
    /// Hostile messages that must be dead-lettered and are not.
    pub missing: Vec<String>,
    /// Records for source offsets that are no hostile message to dead-letter.
    pub unexpected: Vec<String>,
    pub wrong_reason: Vec<String>,
    /// Records that carry a `crm-sync.source.*` header more than once: the sender's
    /// forged one is kept ahead of crm-sync's (which is read, being the last).
    pub repeated_source_headers: usize,
}

/// Per partition: messages not committed.
#[derive(Debug, Clone, Default)]
pub struct Lag {
    pub input: Vec<i64>,
    pub retry: Vec<i64>,
}

impl Lag {
    pub fn total(&self) -> i64 {
        self.input.iter().chain(&self.retry).sum()
    }
}

/// What a run did and found.
#[derive(Debug)]
pub struct ChaosReport {
    pub options: ChaosOptions,
    pub input_topic: String,
    pub logs: PathBuf,
    pub chaos_seconds: f64,
    pub drain_seconds: f64,
    pub total_seconds: f64,
    /// Each tenant's name, CRM and faults during the chaos.
    pub tenants: Vec<(String, String, String)>,
    pub workload: WorkloadCounts,
    pub workload_records: usize,
    /// Records that valid hostile messages name (or that must stay absent).
    pub hostile_records: usize,
    pub hostile_sent: usize,
    pub hostile_to_dead_letter: usize,
    pub kills: Vec<Kill>,
    pub crashes: Vec<Crash>,
    /// Member processes started, the first starts included.
    pub starts: usize,
    /// Faults injected at random moments, by kind.
    pub faults: BTreeMap<&'static str, usize>,
    /// Messages on the retry topic less the hostile ones and their forwarded copies.
    pub parked: i64,
    pub drained: bool,
    /// Input partitions whose committed offset went backwards between two samples:
    /// (partition, from, to, when).
    pub commit_regressions: Vec<(usize, i64, i64, String)>,
    /// The committed offsets sampled all through the run.
    commits: stream::CommitLog,
    pub lag_after_drain: Lag,
    pub lag_after_stop: Lag,
    pub diverged: Vec<Mismatch>,
    pub dlq: DlqCheck,
    /// Topic partitions whose oldest messages the broker dropped: the run checked
    /// nothing there.
    pub truncated: Vec<String>,
    /// Highest VmRSS of each member slot, over all its starts.
    pub max_rss_mib: Vec<f64>,
    /// Exit status of each member on SIGTERM at the end (`None`: killed after the
    /// deadline).
    pub stop_status: Vec<Option<i32>>,
    pub crm_stats: Vec<(String, Stats)>,
}

impl ChaosReport {
    /// Records checked in the CRMs.
    pub fn records(&self) -> usize {
        self.workload_records + self.hostile_records
    }

    /// Kills that came while messages were not yet committed.
    pub fn kills_mid_stream(&self) -> usize {
        self.kills.iter().filter(|k| k.lag.is_some_and(|l| l > 0)).count()
    }

    /// Everything that should have held and did not; empty for a passing run. The first
    /// entries say when the run did not do what it claims to test.
    pub fn violations(&self) -> Vec<String> {
        let mut out = Vec::new();
        let o = &self.options;
        if self.kills.len() < o.kills {
            out.push(format!("only {} of {} kills happened", self.kills.len(), o.kills));
        }
        if o.kills > 0 && self.kills_mid_stream() == 0 {
            out.push("no kill came while messages were uncommitted".into());
        }
        if self.parked <= 0 {
            out.push("no event was parked on the retry topic".into());
        }
        if !self.truncated.is_empty() {
            out.push(format!("the broker dropped messages (retention): {:?}", self.truncated));
        }
        if !self.drained {
            out.push(format!(
                "not every offset was committed within {:?}: lag {:?}",
                o.drain_within, self.lag_after_drain
            ));
        }
        if self.lag_after_stop.total() != 0 {
            out.push(format!("lag after the members stopped: {:?}", self.lag_after_stop));
        }
        if !self.diverged.is_empty() {
            out.push(format!(
                "{} of {} records diverged, e.g. {:?}",
                self.diverged.len(),
                self.records(),
                &self.diverged[..self.diverged.len().min(5)]
            ));
        }
        for d in &self.dlq.duplicates {
            out.push(format!("DLQ duplicate: {d}; {}", self.duplicate_evidence(d)));
        }
        for m in &self.dlq.missing {
            out.push(format!("not in the DLQ: {m}"));
        }
        for u in &self.dlq.unexpected {
            out.push(format!("unexpected in the DLQ: {u}"));
        }
        for w in &self.dlq.wrong_reason {
            out.push(format!("DLQ reason: {w}"));
        }
        for (slot, rss) in self.max_rss_mib.iter().enumerate() {
            if *rss > o.rss_limit_mib as f64 {
                out.push(format!(
                    "member {slot} reached {rss:.1} MiB RSS (limit {} MiB)",
                    o.rss_limit_mib
                ));
            }
        }
        for c in &self.crashes {
            out.push(format!(
                "member {} ended on its own at {:.1} s ({}), log {}",
                c.member,
                c.at,
                c.status,
                c.log.display()
            ));
        }
        out
    }
}

impl ChaosReport {
    /// Evidence for a duplicate: the kills between its first and its last copy with how
    /// far its partition was committed at each, and the highest commit of its partition
    /// seen before the last copy (at or below the source offset: the message was due to
    /// be read again).
    fn duplicate_evidence(&self, d: &DuplicateDeadLetter) -> String {
        let time = |c: &DeadLetter| {
            DateTime::parse_from_rfc3339(&c.last_failure)
                .ok()
                .map(|t| SystemTime::from(t.with_timezone(&Utc)))
        };
        let first = d.copies.iter().filter_map(time).min();
        let last = d.copies.iter().filter_map(time).max();
        let (Some(first), Some(last)) = (first, last) else {
            return "copies without times".into();
        };
        let (topic, partition, offset) = &d.source;
        let mut evidence: Vec<String> = self
            .kills
            .iter()
            .filter(|k| k.time > first && k.time < last)
            .map(|k| {
                let committed = match k.committed.get(*partition as usize) {
                    Some(Some(c)) if *topic == self.input_topic => c.to_string(),
                    Some(None) if *topic == self.input_topic => "nothing".into(),
                    _ => "?".into(),
                };
                format!(
                    "{} of member {} at {} with partition {partition} committed to {committed}",
                    self.options.stop.as_str(),
                    k.member,
                    k.wall_clock
                )
            })
            .collect();
        if evidence.is_empty() {
            evidence.push(format!("no {} between the copies", self.options.stop.as_str()));
        }
        if *topic == self.input_topic {
            let highest = self.commits.highest_before(*partition as usize, last);
            evidence.push(format!(
                "highest commit of partition {partition} seen before the last copy: {} (source offset {offset})",
                highest.map_or("none".into(), |h| h.to_string())
            ));
        }
        evidence.join("; ")
    }
}

impl fmt::Display for DuplicateDeadLetter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (topic, partition, offset) = &self.source;
        write!(
            f,
            "source {topic}/{partition}@{offset} ({}) dead-lettered {} times:",
            self.hostile.unwrap_or("a workload event"),
            self.copies.len()
        )?;
        for c in &self.copies {
            write!(
                f,
                " [dlq {}@{} code={} attempts={} first-failure={} last-failure={}]",
                c.dlq_partition, c.dlq_offset, c.code, c.attempts, c.first_failure, c.last_failure
            )?;
        }
        Ok(())
    }
}

impl fmt::Display for ChaosReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let o = &self.options;
        let w = &self.workload;
        writeln!(
            f,
            "Chaos run: seed {}, {} members, {} partitions; {:.1} s of chaos, {:.1} s to drain, {:.1} s in all",
            o.seed, o.members, o.partitions, self.chaos_seconds, self.drain_seconds, self.total_seconds
        )?;
        for (name, crm, faults) in &self.tenants {
            writeln!(f, "  tenant {name:<8} {crm:<10} {faults}")?;
        }
        writeln!(
            f,
            "  events        {} workload messages ({} records; {} unchanged repeats, {} duplicates, {} stale, {} deletes) + {} hostile ({} to dead-letter, {} records)",
            w.messages,
            self.workload_records,
            w.unchanged,
            w.duplicates,
            w.stale,
            w.deletes,
            self.hostile_sent,
            self.hostile_to_dead_letter,
            self.hostile_records
        )?;
        writeln!(
            f,
            "  kills         {} {}s ({} while messages were uncommitted), {} starts in all, {} crashes",
            self.kills.len(),
            o.stop.as_str(),
            self.kills_mid_stream(),
            self.starts,
            self.crashes.len()
        )?;
        for k in &self.kills {
            writeln!(
                f,
                "    {:>6.1} s  {}  member {} pid {} (lag {})",
                k.at,
                k.wall_clock,
                k.member,
                k.pid,
                k.lag.map_or("?".into(), |l| l.to_string())
            )?;
        }
        writeln!(f, "  CRM faults    {:?}", self.faults)?;
        writeln!(f, "  parked        {} copies on the retry topic", self.parked)?;
        for (name, s) in &self.crm_stats {
            writeln!(
                f,
                "  CRM {name:<8}  {} calls (+{} token requests), {} upserts / {} deletes applied, rejected {:?}",
                s.api_requests, s.token_requests, s.upserts_applied, s.deletes_applied, s.rejected
            )?;
        }
        writeln!(
            f,
            "  records       {} checked, {} diverged",
            self.records(),
            self.diverged.len()
        )?;
        writeln!(
            f,
            "  DLQ           {} records for {} source offsets; by reason {:?}; duplicates {}, missing {}, unexpected {}, wrong reason {}; {} carry a forged crm-sync.source header too",
            self.dlq.records,
            self.dlq.source_offsets,
            self.dlq.by_reason,
            self.dlq.duplicates.len(),
            self.dlq.missing.len(),
            self.dlq.unexpected.len(),
            self.dlq.wrong_reason.len(),
            self.dlq.repeated_source_headers
        )?;
        writeln!(
            f,
            "  lag           after drain {} (input {:?}, retry {:?}); after stop {}",
            self.lag_after_drain.total(),
            self.lag_after_drain.input,
            self.lag_after_drain.retry,
            self.lag_after_stop.total()
        )?;
        let rss: Vec<String> = self.max_rss_mib.iter().map(|m| format!("{m:.1}")).collect();
        writeln!(
            f,
            "  max RSS       [{}] MiB per member (limit {} MiB)",
            rss.join(", "),
            o.rss_limit_mib
        )?;
        writeln!(f, "  SIGTERM exit  {:?}", self.stop_status)?;
        writeln!(
            f,
            "  commits       {} samples of the input topic's committed offsets, {} went backwards {:?}",
            self.commits.count(),
            self.commit_regressions.len(),
            self.commit_regressions
        )?;
        writeln!(f, "  logs          {}", self.logs.display())?;
        let violations = self.violations();
        if violations.is_empty() {
            write!(f, "  VIOLATIONS    none")
        } else {
            writeln!(f, "  VIOLATIONS    {}", violations.len())?;
            for v in &violations {
                writeln!(f, "    - {v}")?;
            }
            Ok(())
        }
    }
}

/// Prints a progress line, stamped with the seconds since the run started.
struct Clock(Instant);

impl Clock {
    fn secs(&self) -> f64 {
        self.0.elapsed().as_secs_f64()
    }

    fn say(&self, what: impl fmt::Display) {
        println!("[{:>6.1} s] {what}", self.secs());
    }
}

fn rfc3339(t: SystemTime) -> String {
    DateTime::<Utc>::from(t).to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// The config every member runs, with the tenants' secrets as `${VAR}` references.
fn config_toml(bootstrap: &str, topics: &Topics, tenants: &[Tenant]) -> String {
    let tenants: String = tenants.iter().map(|t| t.toml() + "\n").collect();
    format!(
        r#"# crm-sync chaos run: members of one group on the harness's broker and sandboxes.
[service]
http_addr = "127.0.0.1:0"
shutdown_deadline_ms = 5000

[kafka]
bootstrap_servers = "{bootstrap}"
group_id = "{group}"
input_topics = ["{input}"]
dlq_topic = "{dlq}"
failures_topic = "{failures}"
state_topic = "{state}"
retry_topic = "{retry}"
# A killed member's partitions move after this; the mock makes a joining member wait
# about this less a second.
session_timeout_ms = 3000
commit_interval_ms = 200
drain_timeout_ms = 2000
max_in_flight_per_partition = 500
create_topics = false

[retry]
# Park at the first retry, or when a wait is 250 ms or more, and never give up within a
# run: every event must end in its CRM.
in_memory_attempts = 1
park_after_ms = 250
base_delay_ms = 100
max_delay_ms = 1000
max_attempts = 1000
max_age_ms = 900000

[breaker]
# A CRM that recovers is probed again within 2 s: well inside the drain budget.
probe_interval_ms = 250
max_probe_interval_ms = 2000

{tenants}"#,
        group = topics.group,
        input = topics.input,
        dlq = topics.dlq,
        failures = topics.failures,
        state = topics.state,
        retry = topics.retry,
    )
}

/// Workload records per tenant for about `events` messages: a record makes a create,
/// three updates, sometimes a late stale version and a delete, a tenth of them twice.
fn records_per_tenant(events: usize, tenants: usize) -> usize {
    ((events as f64 / (tenants.max(1) as f64 * 4.62)).round() as usize).max(1)
}

/// Runs the harness; `Err` only when it could not be set up or could not read Kafka.
pub fn run(o: &ChaosOptions) -> Result<ChaosReport, ChaosError> {
    let clock = Clock(Instant::now());
    let mut rng = StdRng::seed_from_u64(o.seed);
    let logs = std::env::temp_dir().join(format!("crm-sync-chaos-{:08x}", rng.gen::<u32>()));
    std::fs::create_dir_all(&logs).map_err(|e| ChaosError::Setup(format!("creating {}: {e}", logs.display())))?;

    // 1. The broker, in this process: it outlives every member.
    let kafka_sandbox = KafkaSandbox::start(1).map_err(kafka("starting the mock cluster"))?;
    let bootstrap = kafka_sandbox.bootstrap_servers();
    let topics = Topics::random();
    topics.create(&kafka_sandbox, o.partitions)?;
    let retry_group = retry_group_id(&topics.group);

    // 2. The CRM sandboxes, faults on.
    let secret = format!("chaos-{:016x}", rng.gen::<u64>());
    let mut tenants = crms::start(&secret, o.seed)?;

    // 3. One config file for every member; the secrets come from the environment.
    let text = config_toml(&bootstrap, &topics, &tenants);
    let config_path = logs.join("crm-sync.toml");
    std::fs::write(&config_path, &text).map_err(|e| ChaosError::Setup(format!("writing the config: {e}")))?;
    let env: Vec<(String, String)> = tenants
        .iter()
        .map(|t| (t.secret_var.to_string(), secret.clone()))
        .collect();
    let config = Config::from_toml_with_env(&text, |var| env.iter().find(|(k, _)| k == var).map(|(_, v)| v.clone()))
        .map_err(|e| ChaosError::Setup(format!("the chaos config: {e}")))?;

    // 4. The stream: the workload with hostile rounds at random places.
    let workload = generate(&WorkloadSpec {
        seed: o.seed,
        ..WorkloadSpec::small(
            tenants
                .iter()
                .map(|t| TenantSpec {
                    name: t.name.to_string(),
                    entities: t.entities.iter().map(|e| e.to_string()).collect(),
                })
                .collect(),
            records_per_tenant(o.events, tenants.len()),
        )
    });
    let mut expected = workload.expected;
    let workload_records = expected.len();
    let names: Vec<&str> = tenants.iter().map(|t| t.name).collect();
    let target = hostile::Target {
        input: &topics.input,
        retry: &topics.retry,
        partitions: o.partitions,
        tenants: &names,
    };
    let mut hostile_messages = Vec::new();
    for n in 0..o.hostile_rounds {
        let round = hostile::round(n, &target, n < o.huge_rounds, &mut rng);
        expected.extend(round.expected);
        hostile_messages.push(round.messages);
    }
    let hostile_records = expected.len() - workload_records;
    let hostile_sent: usize = hostile_messages.iter().map(Vec::len).sum();
    let workload_messages = workload
        .messages
        .into_iter()
        .map(|(key, value)| Outgoing {
            topic: topics.input.clone(),
            partition: None,
            key: key.into_bytes(),
            value: Some(value),
            headers: Vec::new(),
            hostile: None,
        })
        .collect();
    let slices = (o.chaos.mul_f64(0.7).as_millis() / SLICE_INTERVAL.as_millis()).max(1) as usize;
    let slices = stream::plan(workload_messages, hostile_messages, slices, &mut rng);

    // 5. The members.
    let launcher = Launcher {
        binary: o.binary.clone(),
        config: config_path,
        env: env.clone(),
        logs: logs.clone(),
    };
    let mut members: Vec<Member> = (0..o.members).map(Member::new).collect();
    for m in &mut members {
        m.start(&launcher)?;
    }
    clock.say(format_args!(
        "chaos: seed {}, {} members of group {}, broker {bootstrap}, logs in {}",
        o.seed,
        o.members,
        topics.group,
        logs.display()
    ));

    // 6. Chaos: the stream flows while members are killed and started again and the
    //    CRMs misbehave.
    let producer = stream::spawn_producer(bootstrap.clone(), slices, SLICE_INTERVAL);
    let chaos_started = Instant::now();
    let mut kill_at: Vec<Duration> = (0..o.kills)
        .map(|_| o.chaos.mul_f64(rng.gen_range(0.05..0.95)))
        .collect();
    kill_at.sort_unstable_by(|a, b| b.cmp(a)); // the next one last, for pop()
    let mut next_fault = chaos_started + Duration::from_millis(rng.gen_range(500..2_000));
    let mut kills = Vec::new();
    let mut crashes = Vec::new();
    let mut commits = stream::CommitLog::default();
    let mut faults: BTreeMap<&'static str, usize> = BTreeMap::new();
    loop {
        let now = Instant::now();
        let elapsed = now - chaos_started;
        watch(&mut members, &launcher, &mut crashes, &clock, &mut rng)?;
        commits.sample_if_due(&bootstrap, &topics.group, &topics.input, o.partitions);
        if kill_at.last().is_some_and(|at| *at <= elapsed) {
            let running: Vec<usize> = (0..members.len()).filter(|&i| members[i].is_running()).collect();
            if let Some(&slot) = running.choose(&mut rng) {
                kill_at.pop();
                let committed =
                    tools::committed(&bootstrap, &topics.group, &topics.input, o.partitions).unwrap_or_default();
                let lag = total_lag(&bootstrap, &topics, &retry_group, o.partitions);
                let member = &mut members[slot];
                let pid = match o.stop {
                    Stop::Kill => member.kill(),
                    // Blocks the loop while the member drains: a diagnostic mode.
                    Stop::Term => member.stop(Duration::from_secs(15)),
                }
                .unwrap_or_default();
                // Random restart moments are the point here, not a wait for anything.
                let down_for = Duration::from_millis(rng.gen_range(300..3_000));
                member.restart_at = Some(Instant::now() + down_for);
                let time = SystemTime::now();
                let kill = Kill {
                    at: clock.secs(),
                    wall_clock: rfc3339(time),
                    member: slot,
                    pid,
                    lag,
                    committed,
                    time,
                };
                clock.say(format_args!(
                    "{} member {slot} (pid {pid}), lag {:?}; back in {:.1} s",
                    o.stop.as_str(),
                    lag,
                    down_for.as_secs_f64()
                ));
                kills.push(kill);
            }
        }
        if now >= next_fault {
            let kind = *[
                FaultKind::ThrottleStorm,
                FaultKind::ServerErrorBurst,
                FaultKind::LatencySpike,
                FaultKind::TokenExpiry,
            ]
            .choose(&mut rng)
            .unwrap_or(&FaultKind::ThrottleStorm);
            let tenant = rng.gen_range(0..tenants.len());
            let what = tenants[tenant].inject(kind, &mut rng);
            *faults.entry(kind.as_str()).or_default() += 1;
            clock.say(format_args!("fault: {} {what}", tenants[tenant].name));
            next_fault = now + Duration::from_millis(rng.gen_range(1_000..3_000));
        }
        for t in &mut tenants {
            t.end_spike_if_due(now);
        }
        if elapsed >= o.chaos && kill_at.is_empty() && producer.is_finished() {
            break;
        }
        std::thread::sleep(TICK); // the chaos loop's cadence: samples and random moments, not a wait for a condition
    }
    let sent = producer
        .join()
        .map_err(|_| ChaosError::Kafka("the producer thread panicked".into()))?
        .map_err(kafka("producing the stream"))?;
    let chaos_seconds = chaos_started.elapsed().as_secs_f64();

    // 7. Calm: the faults stop, every member runs, and everything is committed.
    for t in &mut tenants {
        t.calm();
    }
    for m in &mut members {
        if !m.is_running() {
            m.start(&launcher)?;
        }
    }
    clock.say("chaos over: faults off, every member running; waiting for every offset to be committed");
    let drain_started = Instant::now();
    let mut drained = false;
    let mut lag_after_drain = Lag::default();
    while drain_started.elapsed() < o.drain_within {
        watch(&mut members, &launcher, &mut crashes, &clock, &mut rng)?;
        commits.sample_if_due(&bootstrap, &topics.group, &topics.input, o.partitions);
        // Input first: an event parked on the retry topic has its copy there before its
        // input offset is committed.
        if let Ok(lag) = lag(&bootstrap, &topics, &retry_group, o.partitions) {
            drained = lag.total() == 0;
            lag_after_drain = lag;
            if drained {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(250)); // polling cadence; the deadline bounds the wait
    }
    let drain_seconds = drain_started.elapsed().as_secs_f64();
    clock.say(format_args!(
        "drained: {drained} after {drain_seconds:.1} s (lag {})",
        lag_after_drain.total()
    ));

    // 8. The checks, while the members still run.
    let refs: HashMap<String, &dyn CrmSandbox> = tenants
        .iter()
        .map(|t| (t.name.to_string(), t.sandbox.as_ref()))
        .collect();
    let diverged = verify(&config, &expected, &refs);
    let dlq = tools::read_all(&bootstrap, &topics.dlq, o.partitions, Duration::from_secs(60))
        .map_err(kafka("reading the DLQ"))?;
    let dlq = check_dlq(&dlq, &sent);
    let mut truncated = Vec::new();
    for topic in [&topics.input, &topics.retry, &topics.dlq] {
        for (p, low) in stream::truncated(&bootstrap, topic, o.partitions).map_err(kafka("reading watermarks"))? {
            truncated.push(format!("{topic}/{p} starts at {low}"));
        }
    }
    let retry_messages: i64 = tools::end_offsets(&bootstrap, &topics.retry, o.partitions)
        .map_err(kafka("reading end offsets"))?
        .iter()
        .sum();
    let hostile_on_retry = sent.iter().filter(|s| s.topic == topics.retry).count() as i64;
    // Each round's misrouted copy is forwarded once: one more message there.
    let parked = retry_messages - hostile_on_retry - o.hostile_rounds as i64;

    // 9. SIGTERM, as an orchestrator stops them; then the commits must still be whole.
    for m in &members {
        m.terminate();
    }
    let mut stop_status = Vec::new();
    for m in &mut members {
        m.sample_rss();
        stop_status.push(m.wait_exit(Duration::from_secs(15)).and_then(|s| s.code()));
    }
    let lag_after_stop = lag(&bootstrap, &topics, &retry_group, o.partitions).map_err(kafka("reading lag"))?;

    let report = ChaosReport {
        options: o.clone(),
        input_topic: topics.input.clone(),
        logs: logs.clone(),
        chaos_seconds,
        drain_seconds,
        total_seconds: clock.secs(),
        tenants: tenants
            .iter()
            .map(|t| (t.name.to_string(), t.sandbox.crm().to_string(), t.describe_faults()))
            .collect(),
        workload: workload.counts,
        workload_records,
        hostile_records,
        hostile_sent,
        hostile_to_dead_letter: sent.iter().filter(|s| s.dead_letter_code().is_some()).count(),
        kills,
        crashes,
        starts: members.iter().map(|m| m.starts).sum(),
        faults,
        parked,
        drained,
        commit_regressions: commits
            .regressions()
            .into_iter()
            .map(|(p, from, to, when)| (p, from, to, rfc3339(when)))
            .collect(),
        commits,
        lag_after_drain,
        lag_after_stop,
        diverged,
        dlq,
        truncated,
        max_rss_mib: members.iter().map(|m| m.max_rss_kib as f64 / 1024.0).collect(),
        stop_status,
        crm_stats: tenants
            .iter()
            .map(|t| (t.name.to_string(), t.sandbox.stats()))
            .collect(),
    };
    if report.violations().is_empty() {
        // The logs are evidence only when something failed.
        let _ = std::fs::remove_dir_all(&logs);
    }
    Ok(report)
}

/// One tick of looking after the members: samples their memory, notes one that ended on
/// its own (and has it started again, as an orchestrator would), and starts again those
/// whose down time is over.
fn watch(
    members: &mut [Member],
    launcher: &Launcher,
    crashes: &mut Vec<Crash>,
    clock: &Clock,
    rng: &mut StdRng,
) -> Result<(), ChaosError> {
    let now = Instant::now();
    for m in members.iter_mut() {
        m.sample_rss();
        let log = m.current_log().map(PathBuf::from).unwrap_or_default();
        if let Some(status) = m.exited() {
            clock.say(format_args!("member {} ended on its own: {status}", m.slot));
            crashes.push(Crash {
                at: clock.secs(),
                member: m.slot,
                status: status.to_string(),
                log,
            });
            m.restart_at = Some(now + Duration::from_millis(rng.gen_range(300..1_000)));
        }
        if !m.is_running() && m.restart_at.is_some_and(|at| now >= at) {
            let pid = m.start(launcher)?;
            clock.say(format_args!("member {} started again (pid {pid})", m.slot));
        }
    }
    Ok(())
}

/// The group's lag on the input topic, then `{group}.retry`'s on the retry topic.
fn lag(bootstrap: &str, topics: &Topics, retry_group: &str, partitions: i32) -> rdkafka::error::KafkaResult<Lag> {
    let input = stream::lag(bootstrap, &topics.group, &topics.input, partitions)?;
    let retry = stream::lag(bootstrap, retry_group, &topics.retry, partitions)?;
    Ok(Lag { input, retry })
}

fn total_lag(bootstrap: &str, topics: &Topics, retry_group: &str, partitions: i32) -> Option<i64> {
    lag(bootstrap, topics, retry_group, partitions).ok().map(|l| l.total())
}

/// Holds the DLQ against the hostile messages sent: one record per source offset that
/// must be dead-lettered, with its reason, and nothing else. The source coordinates are
/// the last `crm-sync.source.*` headers of a record, the ones crm-sync appended.
pub fn check_dlq(dlq: &[ReadMessage], sent: &[SentHostile]) -> DlqCheck {
    type Source = (String, i32, i64);
    let sent_by_source: HashMap<Source, &SentHostile> = sent
        .iter()
        .map(|s| ((s.topic.clone(), s.partition, s.offset), s))
        .collect();
    let mut by_source: BTreeMap<Source, Vec<DeadLetter>> = BTreeMap::new();
    let mut check = DlqCheck {
        records: dlq.len(),
        ..DlqCheck::default()
    };
    for m in dlq {
        let header = |name: &str| m.header(name).unwrap_or("?").to_string();
        let code = header("crm-sync.error.code");
        *check.by_reason.entry(code.clone()).or_default() += 1;
        let repeated = m
            .raw_headers
            .iter()
            .filter(|(k, _)| k.as_slice() == b"crm-sync.source.offset")
            .count();
        check.repeated_source_headers += usize::from(repeated > 1);
        let source = (
            header("crm-sync.source.topic"),
            m.header("crm-sync.source.partition")
                .and_then(|p| p.parse().ok())
                .unwrap_or(-1),
            m.header("crm-sync.source.offset")
                .and_then(|o| o.parse().ok())
                .unwrap_or(-1),
        );
        by_source.entry(source).or_default().push(DeadLetter {
            dlq_partition: m.partition,
            dlq_offset: m.offset,
            code,
            attempts: header("crm-sync.attempts"),
            first_failure: header("crm-sync.first-failure"),
            last_failure: header("crm-sync.last-failure"),
        });
    }
    check.source_offsets = by_source.len();
    for (source, copies) in &by_source {
        let hostile = sent_by_source.get(source);
        let describe = || {
            format!(
                "{}/{}@{} ({}), code {}",
                source.0,
                source.1,
                source.2,
                hostile.map_or("not a hostile message", |h| h.hostile.kind),
                copies[0].code
            )
        };
        match hostile.and_then(|h| h.dead_letter_code()) {
            None => check.unexpected.push(describe()),
            Some(code) if copies.iter().any(|c| c.code != code) => {
                check.wrong_reason.push(format!("{}, expected {code}", describe()));
            }
            Some(_) => {}
        }
        if copies.len() > 1 {
            check.duplicates.push(DuplicateDeadLetter {
                source: source.clone(),
                hostile: hostile.map(|h| h.hostile.kind),
                copies: copies.clone(),
            });
        }
    }
    for s in sent {
        if let Some(code) = s.dead_letter_code() {
            if !by_source.contains_key(&(s.topic.clone(), s.partition, s.offset)) {
                check.missing.push(format!(
                    "{}/{}@{} ({}, {code})",
                    s.topic, s.partition, s.offset, s.hostile.kind
                ));
            }
        }
    }
    check
}
