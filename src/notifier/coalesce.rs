//! From failure events to notifications: what is worth a request, and how a storm is
//! folded into a few summaries. Pure: time is passed in.
//!
//! - A tenant's change of health is one `tenant.state_changed` notification, at once.
//! - Dead-lettered records are grouped by tenant and error code. A group's first
//!   `per_record_limit` records of a window go out one by one (`record.dead_lettered`);
//!   the rest of the window is folded into one `records.dead_lettered` summary (count,
//!   when the first and the last were dead-lettered, a few samples), sent when the window
//!   ends. A group that
//!   summarised goes on summarising, window after window, until a whole window passes
//!   without a failure: 10,000 failures of one kind in a minute are then
//!   `per_record_limit` requests plus one per window.
//! - A tenant whose dead-lettered records within a minute (by their failure time) reach
//!   `dlq_rate_per_minute` gets one `tenant.dlq_rate_exceeded`; it can fire again once
//!   the rate has fallen below half the threshold.
//!
//! Every notification lists the failure events it stands for ([`Source`]), so that their
//! offsets are committed only once it has been delivered or dead-lettered.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

/// A failure event's partition and offset in the failures topic, and the generation of
/// that partition's assignment it was read in (see `notifier::Holds`).
pub type Source = (i32, i64, u64);

/// Notification types, the `type` of the body.
pub mod kind {
    pub const TENANT_STATE: &str = "tenant.state_changed";
    pub const DEAD_LETTERED: &str = "record.dead_lettered";
    pub const DEAD_LETTERED_SUMMARY: &str = "records.dead_lettered";
    pub const DLQ_RATE: &str = "tenant.dlq_rate_exceeded";
}

/// Longest error code kept as a group key; a longer one is grouped as `unknown`.
const MAX_CODE: usize = 64;

/// Groups kept at most; past it, new error codes are grouped as `other` (the service's
/// codes are a few dozen; only a hostile failures topic could have more).
const MAX_GROUPS: usize = 1_000;

/// A failure event as read from the failures topic.
#[derive(Debug, Clone, PartialEq)]
pub enum FailureEvent {
    DeadLettered {
        tenant: Option<String>,
        error_code: String,
        /// Failure time, seconds since the epoch (for the DLQ rate).
        at_secs: i64,
        /// The event without its `kind`: a notification's `data` or a sample.
        data: Value,
    },
    TenantState {
        tenant: String,
        data: Value,
    },
}

impl FailureEvent {
    pub fn tenant(&self) -> Option<&str> {
        match self {
            FailureEvent::DeadLettered { tenant, .. } => tenant.as_deref(),
            FailureEvent::TenantState { tenant, .. } => Some(tenant),
        }
    }

    /// The metric label of its kind.
    pub fn kind(&self) -> &'static str {
        match self {
            FailureEvent::DeadLettered { .. } => "dead_lettered",
            FailureEvent::TenantState { .. } => "tenant_state",
        }
    }

    /// The event with its tenant replaced by `f(tenant)` (the name the notifier keeps it
    /// under). A tenant_state event whose tenant `f` drops keeps its own: it is only
    /// forwarded, never kept.
    pub fn with_tenant(self, f: impl FnOnce(Option<String>) -> Option<String>) -> FailureEvent {
        match self {
            FailureEvent::DeadLettered {
                tenant,
                error_code,
                at_secs,
                data,
            } => FailureEvent::DeadLettered {
                tenant: f(tenant),
                error_code,
                at_secs,
                data,
            },
            other => other,
        }
    }
}

/// Reads a failure event; the reason if it is not one (it is then only counted).
pub fn parse(payload: &[u8]) -> Result<FailureEvent, &'static str> {
    let value: Value = serde_json::from_slice(payload).map_err(|_| "not JSON")?;
    let Value::Object(mut object) = value else {
        return Err("not a JSON object");
    };
    let kind = object.remove("kind");
    let text = |o: &Map<String, Value>, k: &str| o.get(k).and_then(Value::as_str).map(str::to_string);
    match kind.as_ref().and_then(Value::as_str) {
        Some("dead_lettered") => {
            let code = text(&object, "error_code").filter(|c| c.len() <= MAX_CODE);
            let at_secs = text(&object, "last_failure_at")
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(&t).ok())
                .map_or_else(|| chrono::Utc::now().timestamp(), |t| t.timestamp());
            Ok(FailureEvent::DeadLettered {
                tenant: text(&object, "tenant"),
                error_code: code.unwrap_or_else(|| "unknown".into()),
                at_secs,
                data: Value::Object(object),
            })
        }
        Some("tenant_state") => Ok(FailureEvent::TenantState {
            tenant: text(&object, "tenant").ok_or("a tenant_state event without a tenant")?,
            data: Value::Object(object),
        }),
        _ => Err("unknown kind"),
    }
}

/// One notification to deliver, to the tenant's endpoints and the operators'.
#[derive(Debug, Clone, PartialEq)]
pub struct Notification {
    /// `None` for a failure that names no tenant (input that was not an event).
    pub tenant: Option<String>,
    pub kind: &'static str,
    /// Stable for the same failure events: the `webhook-id`, kept across retries and
    /// restarts so that a receiver can drop what it already has.
    pub id: String,
    pub data: Value,
    pub sources: Vec<Source>,
    /// When it was made: the body's `timestamp`, the same on every attempt.
    pub at: chrono::DateTime<chrono::Utc>,
}

impl Notification {
    fn new(tenant: Option<String>, kind: &'static str, data: Value, sources: Vec<Source>) -> Notification {
        let mut hash = Sha256::new();
        hash.update(kind.as_bytes());
        for (p, o, _) in &sources {
            hash.update(p.to_be_bytes());
            hash.update(o.to_be_bytes());
        }
        let digest = hash.finalize();
        let id = format!(
            "msg_{}",
            digest[..16].iter().map(|b| format!("{b:02x}")).collect::<String>()
        );
        Notification {
            tenant,
            kind,
            id,
            data,
            sources,
            at: chrono::Utc::now(),
        }
    }

    /// The request body: `{"type", "timestamp", "data"}`, as Standard Webhooks suggests.
    pub fn body(&self) -> Vec<u8> {
        json!({
            "type": self.kind,
            "timestamp": self.at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            "data": self.data,
        })
        .to_string()
        .into_bytes()
    }
}

/// Limits of the coalescing (from `[notifier]`).
#[derive(Debug, Clone)]
pub struct Limits {
    pub window: Duration,
    pub per_record_limit: u32,
    pub samples: usize,
    /// 0: no DLQ-rate notification.
    pub dlq_rate_per_minute: u32,
}

/// Dead-lettered records of one tenant and error code within the current window.
#[derive(Debug)]
struct Group {
    window_start: Instant,
    /// Records of this window sent one by one.
    individual: u32,
    /// Set once the group has summarised: no more one-by-one until it goes quiet.
    storming: bool,
    count: u64,
    /// Earliest and latest `last_failure_at` (when each was dead-lettered) folded in.
    first_at: Option<Value>,
    last_at: Option<Value>,
    samples: Vec<Value>,
    sources: Vec<Source>,
}

#[derive(Debug, Default)]
struct Rate {
    /// Dead-lettered records per second of failure time, the last minute of it.
    per_second: BTreeMap<i64, u32>,
    exceeded: bool,
}

/// Folds failure events into notifications.
#[derive(Debug)]
pub struct Coalescer {
    limits: Limits,
    groups: HashMap<(Option<String>, String), Group>,
    rates: HashMap<Option<String>, Rate>,
}

impl Coalescer {
    pub fn new(limits: Limits) -> Coalescer {
        Coalescer {
            limits,
            groups: HashMap::new(),
            rates: HashMap::new(),
        }
    }

    /// What to send now for the failure event read at `source`, and whether the event
    /// was folded into a summary: the coalescer then holds it until
    /// [`flush_due`](Self::flush_due) returns it in a summary's sources.
    pub fn add(&mut self, now: Instant, source: Source, event: FailureEvent) -> (Vec<Notification>, bool) {
        match event {
            FailureEvent::TenantState { tenant, data } => (
                vec![Notification::new(Some(tenant), kind::TENANT_STATE, data, vec![source])],
                false,
            ),
            FailureEvent::DeadLettered {
                tenant,
                error_code,
                at_secs,
                data,
            } => {
                let mut out = self.rate(&tenant, at_secs, source);
                let limits = &self.limits;
                let mut key = (tenant.clone(), error_code);
                if self.groups.len() >= MAX_GROUPS && !self.groups.contains_key(&key) {
                    key.1 = "other".into();
                }
                let group = self.groups.entry(key).or_insert_with(|| Group {
                    window_start: now,
                    individual: 0,
                    storming: false,
                    count: 0,
                    first_at: None,
                    last_at: None,
                    samples: Vec::new(),
                    sources: Vec::new(),
                });
                if !group.storming && group.individual < limits.per_record_limit {
                    group.individual += 1;
                    out.push(Notification::new(tenant, kind::DEAD_LETTERED, data, vec![source]));
                    return (out, false);
                }
                group.count += 1;
                let at = data.get("last_failure_at").cloned();
                if group.first_at.is_none() {
                    group.first_at = at.clone();
                }
                group.last_at = at;
                if group.samples.len() < limits.samples {
                    group.samples.push(data);
                }
                group.sources.push(source);
                (out, true)
            }
        }
    }

    /// The summaries of windows that have ended by `now`. A group whose window ended
    /// with nothing folded into it is forgotten: its next failure starts afresh.
    pub fn flush_due(&mut self, now: Instant) -> Vec<Notification> {
        let window = self.limits.window;
        let mut out = Vec::new();
        self.groups.retain(|(tenant, code), g| {
            if now < g.window_start + window {
                return true;
            }
            if g.count == 0 {
                return false;
            }
            let data = json!({
                "tenant": tenant,
                "error_code": code,
                "count": g.count,
                "first_dead_lettered_at": g.first_at.take(),
                "last_dead_lettered_at": g.last_at.take(),
                "window_ms": window.as_millis() as u64,
                "samples": std::mem::take(&mut g.samples),
            });
            let sources = std::mem::take(&mut g.sources);
            out.push(Notification::new(
                tenant.clone(),
                kind::DEAD_LETTERED_SUMMARY,
                data,
                sources,
            ));
            g.count = 0;
            g.storming = true;
            g.window_start = now;
            true
        });
        out
    }

    /// When the next window ends, if any is open.
    pub fn next_flush(&self) -> Option<Instant> {
        self.groups.values().map(|g| g.window_start + self.limits.window).min()
    }

    /// Failure events folded into summaries not yet sent.
    pub fn held(&self) -> usize {
        self.groups.values().map(|g| g.sources.len()).sum()
    }

    fn rate(&mut self, tenant: &Option<String>, at_secs: i64, source: Source) -> Vec<Notification> {
        let threshold = self.limits.dlq_rate_per_minute;
        if threshold == 0 {
            return Vec::new();
        }
        let rate = self.rates.entry(tenant.clone()).or_default();
        // A failure time from the future (a wrong clock, a hostile event) counts as now,
        // so that it cannot hold the minute's window ahead of every later failure.
        let now = chrono::Utc::now().timestamp();
        let at_secs = at_secs.min(now + 60);
        *rate.per_second.entry(at_secs).or_default() += 1;
        let newest = *rate.per_second.keys().next_back().expect("just inserted");
        rate.per_second = rate.per_second.split_off(&(newest - 59));
        let last_minute: u64 = rate.per_second.values().map(|&n| u64::from(n)).sum();
        // Below half the threshold before this one: it may fire again.
        if rate.exceeded && 2 * (last_minute - 1) < u64::from(threshold) {
            rate.exceeded = false;
        }
        if !rate.exceeded && last_minute >= u64::from(threshold) {
            rate.exceeded = true;
            let data = json!({
                "tenant": tenant,
                "dead_lettered_last_minute": last_minute,
                "threshold_per_minute": threshold,
                "at": chrono::DateTime::from_timestamp(at_secs, 0).map(|t| t.to_rfc3339()),
            });
            return vec![Notification::new(tenant.clone(), kind::DLQ_RATE, data, vec![source])];
        }
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            window: Duration::from_secs(10),
            per_record_limit: 3,
            samples: 5,
            dlq_rate_per_minute: 0,
        }
    }

    fn dead(tenant: &str, code: &str, at_secs: i64) -> FailureEvent {
        FailureEvent::DeadLettered {
            tenant: Some(tenant.into()),
            error_code: code.into(),
            at_secs,
            data: json!({"tenant": tenant, "error_code": code, "last_failure_at": "2026-11-30T12:00:00Z"}),
        }
    }

    #[test]
    fn a_storm_of_one_kind_is_a_few_summaries_that_count_every_record() {
        let mut c = Coalescer::new(limits());
        let t0 = Instant::now();
        let mut sent = Vec::new();
        // 10,000 failures over one minute, one every 6 ms.
        for i in 0..10_000u64 {
            let now = t0 + Duration::from_millis(i * 6);
            sent.extend(c.flush_due(now));
            sent.extend(c.add(now, (0, i as i64, 0), dead("acme", "crm_validation", 0)).0);
        }
        sent.extend(c.flush_due(t0 + Duration::from_secs(3600)));
        let individual = sent.iter().filter(|n| n.kind == kind::DEAD_LETTERED).count();
        let summaries: Vec<_> = sent.iter().filter(|n| n.kind == kind::DEAD_LETTERED_SUMMARY).collect();
        assert_eq!(individual, 3);
        assert!(summaries.len() <= 7, "{} summaries for one minute", summaries.len());
        let counted: u64 = summaries.iter().map(|n| n.data["count"].as_u64().unwrap()).sum();
        assert_eq!(counted + individual as u64, 10_000);
        let sources: usize = sent.iter().map(|n| n.sources.len()).sum();
        assert_eq!(sources, 10_000, "every failure event is accounted for once");
        assert!(summaries
            .iter()
            .all(|n| n.data["samples"].as_array().unwrap().len() <= 5));
        assert_eq!(c.held(), 0);
        assert!(c.flush_due(t0 + Duration::from_secs(3700)).is_empty());
        assert_eq!(c.next_flush(), None, "a quiet window forgets the group");
    }

    #[test]
    fn groups_are_per_tenant_and_code_and_a_quiet_group_starts_afresh() {
        let mut c = Coalescer::new(limits());
        let t0 = Instant::now();
        for (tenant, code) in [("acme", "a"), ("acme", "b"), ("globex", "a")] {
            for i in 0..3 {
                let (now, folded) = c.add(t0, (0, i, 0), dead(tenant, code, 0));
                assert_eq!((now.len(), folded), (1, false));
            }
        }
        let (now, folded) = c.add(t0, (0, 9, 0), dead("acme", "a", 0));
        assert!(now.is_empty() && folded, "the fourth is folded");
        assert_eq!(c.flush_due(t0 + Duration::from_secs(10)).len(), 1);
        // Quiet for a window: forgotten; the next failure goes out on its own again.
        assert!(c.flush_due(t0 + Duration::from_secs(20)).is_empty());
        assert_eq!(
            c.add(t0 + Duration::from_secs(21), (0, 10, 0), dead("acme", "a", 0))
                .0
                .len(),
            1
        );
    }

    #[test]
    fn the_dlq_rate_fires_once_per_crossing() {
        let mut c = Coalescer::new(Limits {
            dlq_rate_per_minute: 10,
            per_record_limit: 1000,
            ..limits()
        });
        let t0 = Instant::now();
        let kinds = |v: Vec<Notification>| v.iter().filter(|n| n.kind == kind::DLQ_RATE).count();
        let mut fired = 0;
        for i in 0..30 {
            fired += kinds(c.add(t0, (0, i, 0), dead("acme", "x", 1000 + i)).0);
        }
        assert_eq!(fired, 1, "30 in 30 s crosses 10/min once");
        // Two minutes later, quiet: a new burst fires again.
        for i in 0..10 {
            fired += kinds(c.add(t0, (0, 100 + i, 0), dead("acme", "x", 1200 + i)).0);
        }
        assert_eq!(fired, 2);
        // Another tenant has its own rate.
        assert_eq!(kinds(c.add(t0, (1, 0, 0), dead("globex", "x", 1200)).0), 0);
    }

    #[test]
    fn a_threshold_of_one_fires_again_after_a_quiet_minute() {
        let mut c = Coalescer::new(Limits {
            dlq_rate_per_minute: 1,
            ..limits()
        });
        let t0 = Instant::now();
        let fired = |c: &mut Coalescer, o: i64, at: i64| {
            c.add(t0, (0, o, 0), dead("acme", "x", at))
                .0
                .iter()
                .filter(|n| n.kind == kind::DLQ_RATE)
                .count()
        };
        assert_eq!(fired(&mut c, 0, 1000), 1);
        assert_eq!(fired(&mut c, 1, 1010), 0, "still within the minute");
        assert_eq!(fired(&mut c, 2, 1100), 1, "after a quiet minute");
    }

    #[test]
    fn failure_events_are_read_defensively() {
        assert!(parse(b"\xff").is_err());
        assert!(parse(b"[1]").is_err());
        assert!(parse(br#"{"kind":"other"}"#).is_err());
        assert!(parse(br#"{"kind":"tenant_state"}"#).is_err());
        let long = "x".repeat(65);
        let e = parse(
            format!(r#"{{"kind":"dead_lettered","error_code":"{long}","tenant":null,"last_failure_at":"nope"}}"#)
                .as_bytes(),
        )
        .unwrap();
        match e {
            FailureEvent::DeadLettered {
                tenant,
                error_code,
                data,
                ..
            } => {
                assert_eq!((tenant, error_code.as_str()), (None, "unknown"));
                assert!(data.get("kind").is_none());
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn ids_are_stable_for_the_same_failure_events() {
        let a = Notification::new(None, kind::DEAD_LETTERED, json!({}), vec![(1, 5, 0)]);
        let b = Notification::new(None, kind::DEAD_LETTERED, json!({"other": 1}), vec![(1, 5, 0)]);
        let c = Notification::new(None, kind::DEAD_LETTERED, json!({}), vec![(1, 6, 0)]);
        let d = Notification::new(None, kind::DEAD_LETTERED, json!({}), vec![(1, 5, 7)]);
        assert_eq!(a.id, b.id);
        assert_eq!(a.id, d.id, "the assignment it was read in is no part of it");
        assert_ne!(a.id, c.id);
        assert!(a.id.starts_with("msg_") && a.id.len() == 36);
    }
}
