//! The retry topic: where a parked event goes, and what it carries.
//!
//! **Co-partitioned with the input.** An event read from input topic `T` (the `i`-th of
//! `kafka.input_topics`), partition `p`, is parked on retry partition `i × stride + p`,
//! where `stride` is the retry topic's partition count divided by the number of input
//! topics (with one input topic: partition `p`). The member that owns input partition
//! `T/p` also reads its retry partition, by assignment and not through the group (see
//! [`crate::consume`]). So a parked event is acted on only by the member that owns its
//! record's partition, with that partition's restored state and with its in-flight
//! writes in view: it can never write a version older than one that member delivered.
//!
//! **Headers are trusted only here, and checked.** A parked event keeps the original key,
//! value and headers and adds its retry state and origin under `crm-sync.retry.*` and
//! `crm-sync.origin.*`. Those names mean nothing on an input topic (anyone can send them
//! there). On the retry topic they are checked: the origin must be a configured input
//! topic whose partition maps to the partition the event was read from (one that maps
//! elsewhere is forwarded there), and times are clamped to the present and to
//! `retry.max_age_ms` ahead.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::headers::RawHeader;

/// Names of the headers a parked event carries.
pub mod header {
    pub const ATTEMPTS: &str = "crm-sync.retry.attempts";
    /// Milliseconds since the Unix epoch.
    pub const FIRST_FAILURE: &str = "crm-sync.retry.first-failure-ms";
    /// Milliseconds since the Unix epoch: not to be tried again before.
    pub const NOT_BEFORE: &str = "crm-sync.retry.not-before-ms";
    /// Where the event was first read from.
    pub const ORIGIN_TOPIC: &str = "crm-sync.origin.topic";
    pub const ORIGIN_PARTITION: &str = "crm-sync.origin.partition";
    pub const ORIGIN_OFFSET: &str = "crm-sync.origin.offset";

    /// Whether a header is one of the above (replaced, not copied, when parking again).
    pub fn is_retry_header(name: &[u8]) -> bool {
        name.starts_with(b"crm-sync.retry.") || name.starts_with(b"crm-sync.origin.")
    }
}

/// Where an event was first read from: its input topic coordinates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
}

/// How far a parked event's retries have gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryState {
    pub attempts: u32,
    pub first_failure: SystemTime,
    pub not_before: SystemTime,
}

/// What a message read from the retry topic turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parked {
    /// Parked for the partition it was read from.
    Here(Origin, RetryState),
    /// Parked for another retry partition (by an older crm-sync, or by hand): forward it.
    Elsewhere(Origin, RetryState),
}

/// Why a message on the retry topic cannot be acted on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("retry-topic message has a missing or invalid header `{0}`")]
pub struct BadRetryHeader(pub &'static str);

/// The retry topic and how input partitions map onto its partitions.
#[derive(Debug, Clone)]
pub struct RetryRoute {
    pub topic: Arc<str>,
    inputs: Vec<Arc<str>>,
    stride: i32,
    /// The furthest ahead a parked event may ask to wait (`retry.max_age_ms`).
    max_wait: Duration,
}

impl RetryRoute {
    /// The route for a retry topic of `retry_partitions` partitions; fails, saying why,
    /// when it has fewer than `inputs.len()` × `max_input_partitions`.
    pub fn new(
        topic: &str,
        inputs: &[String],
        retry_partitions: i32,
        max_input_partitions: i32,
        max_wait: Duration,
    ) -> Result<Self, String> {
        let n = inputs.len().max(1) as i32;
        let stride = retry_partitions / n;
        if stride < max_input_partitions.max(1) {
            return Err(format!(
                "`kafka.retry_topic` ({topic}) has {retry_partitions} partitions; it needs at least {} ({} input topic(s) × {} partitions, the most any input topic has), so that each input partition has its own",
                n * max_input_partitions.max(1),
                n,
                max_input_partitions.max(1)
            ));
        }
        Ok(RetryRoute {
            topic: topic.into(),
            inputs: inputs.iter().map(|t| Arc::from(t.as_str())).collect(),
            stride,
            max_wait,
        })
    }

    /// The retry partition of input partition `topic/partition`; `None` for a topic that
    /// is not an input topic, or a partition beyond the retry topic's room.
    pub fn partition_for(&self, topic: &str, partition: i32) -> Option<i32> {
        let index = self.inputs.iter().position(|t| **t == *topic)? as i32;
        (0..self.stride)
            .contains(&partition)
            .then_some(index * self.stride + partition)
    }

    /// The input partition number whose parked events go to retry partition `retry`.
    pub fn origin_partition(&self, retry: i32) -> i32 {
        retry % self.stride
    }

    /// The headers of a parked event: the original ones, less any retry headers, then its
    /// origin and retry state.
    pub fn headers(original: &[RawHeader], origin: &Origin, state: &RetryState) -> Vec<RawHeader> {
        let mut out: Vec<RawHeader> = original
            .iter()
            .filter(|(k, _)| !header::is_retry_header(k))
            .cloned()
            .collect();
        for (k, v) in [
            (header::ATTEMPTS, state.attempts.to_string()),
            (header::FIRST_FAILURE, epoch_ms(state.first_failure).to_string()),
            (header::NOT_BEFORE, epoch_ms(state.not_before).to_string()),
            (header::ORIGIN_TOPIC, origin.topic.to_string()),
            (header::ORIGIN_PARTITION, origin.partition.to_string()),
            (header::ORIGIN_OFFSET, origin.offset.to_string()),
        ] {
            out.push((k.as_bytes().to_vec(), Some(v.into_bytes())));
        }
        out
    }

    /// Reads and checks the origin and retry state of a message read from retry partition
    /// `partition`, at `now`.
    pub fn read(&self, headers: &[RawHeader], partition: i32, now: SystemTime) -> Result<Parked, BadRetryHeader> {
        let text = |name: &'static str| -> Result<&str, BadRetryHeader> {
            // The last one wins, as in Kafka clients that read headers into a map.
            let value = headers
                .iter()
                .rev()
                .find(|(k, _)| k.as_slice() == name.as_bytes())
                .and_then(|(_, v)| v.as_deref());
            value
                .and_then(|v| std::str::from_utf8(v).ok())
                .ok_or(BadRetryHeader(name))
        };
        let number = |name: &'static str| -> Result<u64, BadRetryHeader> {
            text(name)?.parse::<u64>().map_err(|_| BadRetryHeader(name))
        };
        let topic = text(header::ORIGIN_TOPIC)?;
        let topic = self
            .inputs
            .iter()
            .find(|t| ***t == *topic)
            .ok_or(BadRetryHeader(header::ORIGIN_TOPIC))?
            .clone();
        let origin_partition =
            i32::try_from(number(header::ORIGIN_PARTITION)?).map_err(|_| BadRetryHeader(header::ORIGIN_PARTITION))?;
        let home = self
            .partition_for(&topic, origin_partition)
            .ok_or(BadRetryHeader(header::ORIGIN_PARTITION))?;
        let offset =
            i64::try_from(number(header::ORIGIN_OFFSET)?).map_err(|_| BadRetryHeader(header::ORIGIN_OFFSET))?;
        let attempts = u32::try_from(number(header::ATTEMPTS)?).map_err(|_| BadRetryHeader(header::ATTEMPTS))?;
        // Times from the future are clamped: a first failure no later than now, and a wait
        // of at most `max_wait`, so that no header can hold an event for good.
        let first_failure = from_epoch_ms(number(header::FIRST_FAILURE)?).min(now);
        let latest = now.checked_add(self.max_wait).unwrap_or(now);
        let not_before = from_epoch_ms(number(header::NOT_BEFORE)?).min(latest);
        let origin = Origin {
            topic,
            partition: origin_partition,
            offset,
        };
        let state = RetryState {
            attempts,
            first_failure,
            not_before,
        };
        Ok(if home == partition {
            Parked::Here(origin, state)
        } else {
            Parked::Elsewhere(origin, state)
        })
    }
}

fn epoch_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Milliseconds since the epoch as a time; values past what `SystemTime` holds saturate
/// at the latest time it can (which callers clamp).
fn from_epoch_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH
        .checked_add(Duration::from_millis(ms))
        .unwrap_or(UNIX_EPOCH + Duration::from_secs(i32::MAX as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn route() -> RetryRoute {
        RetryRoute::new("retry", &["a".into(), "b".into()], 8, 4, Duration::from_secs(60)).unwrap()
    }

    fn h(k: &str, v: &str) -> RawHeader {
        (k.as_bytes().to_vec(), Some(v.as_bytes().to_vec()))
    }

    fn parked(topic: &str, partition: &str, not_before: &str) -> Vec<RawHeader> {
        vec![
            h(header::ATTEMPTS, "3"),
            h(header::FIRST_FAILURE, "1000"),
            h(header::NOT_BEFORE, not_before),
            h(header::ORIGIN_TOPIC, topic),
            h(header::ORIGIN_PARTITION, partition),
            h(header::ORIGIN_OFFSET, "42"),
        ]
    }

    #[test]
    fn each_input_partition_has_its_own_retry_partition() {
        let r = route();
        let all: Vec<i32> = ["a", "b"]
            .iter()
            .flat_map(|t| (0..4).map(|p| r.partition_for(t, p).unwrap()))
            .collect();
        assert_eq!(all, (0..8).collect::<Vec<_>>());
        assert_eq!(r.partition_for("a", 4), None);
        assert_eq!(r.partition_for("other", 0), None);
        assert!(RetryRoute::new("retry", &["a".into(), "b".into()], 7, 4, Duration::ZERO).is_err());
    }

    #[test]
    fn headers_round_trip_and_replace_older_retry_headers() {
        let r = route();
        let origin = Origin {
            topic: "b".into(),
            partition: 2,
            offset: 9,
        };
        let now = SystemTime::now();
        let state = RetryState {
            attempts: 4,
            first_failure: from_epoch_ms(epoch_ms(now) - 5_000),
            not_before: from_epoch_ms(epoch_ms(now) + 1_000),
        };
        let original = vec![h("trace", "x"), h(header::ATTEMPTS, "1")];
        let headers = RetryRoute::headers(&original, &origin, &state);
        assert_eq!(
            headers.iter().filter(|(k, _)| k == header::ATTEMPTS.as_bytes()).count(),
            1
        );
        assert_eq!(r.read(&headers, 6, now), Ok(Parked::Here(origin.clone(), state)));
        assert_eq!(r.read(&headers, 1, now), Ok(Parked::Elsewhere(origin, state)));
    }

    #[test]
    fn forged_or_hostile_headers_are_refused_or_clamped() {
        let r = route();
        let now = SystemTime::now();
        assert_eq!(
            r.read(&parked("a", "999", "0"), 0, now),
            Err(BadRetryHeader(header::ORIGIN_PARTITION))
        );
        assert_eq!(
            r.read(&parked("a", "-1", "0"), 0, now),
            Err(BadRetryHeader(header::ORIGIN_PARTITION))
        );
        assert_eq!(
            r.read(&parked("elsewhere", "0", "0"), 0, now),
            Err(BadRetryHeader(header::ORIGIN_TOPIC))
        );
        assert_eq!(r.read(&[], 0, now), Err(BadRetryHeader(header::ORIGIN_TOPIC)));
        for far in ["99999999999999", &u64::MAX.to_string()] {
            let Ok(Parked::Here(_, state)) = r.read(&parked("a", "0", far), 0, now) else {
                panic!("not read");
            };
            assert_eq!(state.not_before, now + Duration::from_secs(60), "clamped to max_wait");
        }
        let mut bad = parked("a", "0", "0");
        bad[0] = (header::ATTEMPTS.as_bytes().to_vec(), Some(b"\xff".to_vec()));
        assert_eq!(r.read(&bad, 0, now), Err(BadRetryHeader(header::ATTEMPTS)));
    }

    proptest! {
        /// Whatever bytes the headers hold, reading them neither panics nor yields a wait
        /// beyond `max_wait` or an origin outside the input topics.
        #[test]
        fn reading_any_headers_is_safe(
            values in prop::collection::vec(prop::option::of(prop::collection::vec(any::<u8>(), 0..24)), 6),
            numbers in prop::collection::vec(any::<u64>(), 6),
            use_numbers in any::<bool>(),
            partition in 0i32..8,
        ) {
            let r = route();
            let names = [
                header::ATTEMPTS, header::FIRST_FAILURE, header::NOT_BEFORE,
                header::ORIGIN_TOPIC, header::ORIGIN_PARTITION, header::ORIGIN_OFFSET,
            ];
            let headers: Vec<RawHeader> = names
                .iter()
                .enumerate()
                .map(|(i, n)| {
                    let v = if use_numbers && i != 3 { Some(numbers[i].to_string().into_bytes()) } else { values[i].clone() };
                    (n.as_bytes().to_vec(), v)
                })
                .collect();
            let now = SystemTime::now();
            if let Ok(Parked::Here(o, s) | Parked::Elsewhere(o, s)) = r.read(&headers, partition, now) {
                prop_assert!(s.not_before <= now + Duration::from_secs(60));
                prop_assert!(s.first_failure <= now);
                prop_assert!(r.partition_for(&o.topic, o.partition).is_some());
            }
        }
    }
}
