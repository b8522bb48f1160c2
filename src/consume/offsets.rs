//! Offset watermark of one partition: which offset may be committed.
//!
//! Promise: the watermark never passes an offset whose event has no final outcome yet.
//! Offsets are received in increasing order (gaps from compaction or transaction markers
//! are allowed); outcomes may finish in any order. The watermark is the lowest offset
//! still undecided, or one past the highest received when nothing is undecided — the
//! "next offset to consume" that Kafka stores as a committed offset.

use std::collections::BTreeSet;

#[derive(Debug, Default)]
pub struct OffsetTracker {
    /// Offsets received and not yet final.
    pending: BTreeSet<i64>,
    /// One past the highest offset received so far; `None` before the first message.
    next_after_received: Option<i64>,
}

impl OffsetTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a received offset. Returns false (and changes nothing) for an offset at or
    /// below one already received: a redelivery the tracker has already accounted for.
    pub fn received(&mut self, offset: i64) -> bool {
        if self.next_after_received.is_some_and(|next| offset < next) {
            return false;
        }
        self.pending.insert(offset);
        self.next_after_received = Some(offset + 1);
        true
    }

    /// Records that an offset's event has its final outcome. Returns false if the offset
    /// was not pending (already final, or never received).
    pub fn finished(&mut self, offset: i64) -> bool {
        self.pending.remove(&offset)
    }

    /// Whether the offset was received and is still undecided.
    pub fn is_pending(&self, offset: i64) -> bool {
        self.pending.contains(&offset)
    }

    /// The offset to commit: every offset below it is final. `None` before any message.
    pub fn watermark(&self) -> Option<i64> {
        match self.pending.first() {
            Some(lowest) => Some(*lowest),
            None => self.next_after_received,
        }
    }

    /// Events received and not yet final.
    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn watermark_waits_for_the_lowest_undecided_offset() {
        let mut t = OffsetTracker::new();
        assert_eq!(t.watermark(), None);
        for o in 10..15 {
            assert!(t.received(o));
        }
        assert_eq!(t.watermark(), Some(10));
        t.finished(12);
        t.finished(11);
        assert_eq!(t.watermark(), Some(10));
        t.finished(10);
        assert_eq!(t.watermark(), Some(13));
        t.finished(13);
        t.finished(14);
        assert_eq!(t.watermark(), Some(15));
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn tolerates_gaps_and_ignores_redelivered_offsets() {
        let mut t = OffsetTracker::new();
        t.received(5);
        t.received(9); // 6..8 are transaction markers or compacted away
        assert!(!t.received(5));
        t.finished(5);
        assert_eq!(t.watermark(), Some(9));
        t.finished(9);
        assert_eq!(t.watermark(), Some(10));
    }

    proptest! {
        /// Whatever order outcomes arrive in, the watermark equals the lowest undecided
        /// offset (so never passes one), and reaches the end once all are final.
        #[test]
        fn watermark_never_passes_an_undecided_offset(
            gaps in prop::collection::vec(1i64..4, 1..60),
            order in prop::collection::vec(any::<prop::sample::Index>(), 1..60),
        ) {
            let mut offsets = Vec::new();
            let mut o = 100;
            for g in &gaps { o += g; offsets.push(o); }
            let mut t = OffsetTracker::new();
            for &o in &offsets { t.received(o); }
            let mut undecided: BTreeSet<i64> = offsets.iter().copied().collect();
            for idx in order {
                if undecided.is_empty() { break; }
                let pick = *undecided.iter().nth(idx.index(undecided.len())).unwrap();
                undecided.remove(&pick);
                t.finished(pick);
                let wm = t.watermark().unwrap();
                match undecided.first() {
                    Some(lowest) => prop_assert_eq!(wm, *lowest),
                    None => prop_assert_eq!(wm, offsets.last().unwrap() + 1),
                }
            }
            for o in undecided { t.finished(o); }
            prop_assert_eq!(t.watermark(), Some(offsets.last().unwrap() + 1));
        }
    }
}
