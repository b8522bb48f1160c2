//! `diff-memory`: what one remembered record costs in the diff cache, measured as the
//! process's resident memory, not computed.
//!
//! The cache (`DiffCache`, capacity N) is filled with distinct records until it is full
//! (both generations, `DiffCache::limit` records), and the growth of the resident set is
//! divided by the records it holds. For comparison, in the same run, the same number
//! of records is kept the way the cache kept them before (a hash map keyed by the
//! record's three strings). That one is measured second, in memory the first may have
//! freed, so its figure is if anything too low.

use std::sync::Arc;

use crm_sync::diff::{DiffCache, RecordState};
use crm_sync::event::{PayloadHash, RecordKey, RecordMap};

use super::status_kib;

fn record(i: usize) -> RecordKey {
    RecordKey {
        tenant: Arc::from("acme"),
        entity: Arc::from("contact"),
        key: Arc::from(format!("C-{i:08}").as_str()),
    }
}

fn state(i: usize) -> RecordState {
    RecordState {
        version: i as u64,
        payload: Some(PayloadHash([(i % 251) as u8; 16])),
        event: i as u64,
    }
}

fn rss_bytes() -> f64 {
    status_kib("VmRSS:") as f64 * 1024.0
}

pub fn run(capacity: usize) {
    println!("\n### diff-memory: bytes per remembered record, cache capacity {capacity}\n");
    let before = rss_bytes();
    let mut cache = DiffCache::new(capacity);
    for i in 0..cache.limit() {
        cache.confirm(&record(i), state(i));
    }
    let held = cache.len();
    let cache_bytes = rss_bytes() - before;
    let per_record = cache_bytes / held as f64;
    drop(cache);

    let before = rss_bytes();
    let mut by_strings: RecordMap<RecordState> = RecordMap::default();
    for i in 0..held {
        by_strings.insert(record(i), state(i));
    }
    let old_bytes = rss_bytes() - before;
    let old_per_record = old_bytes / held as f64;
    drop(by_strings);

    println!("| representation | records held | RSS growth MiB | bytes per record |");
    println!("|---|---|---|---|");
    println!(
        "| diff cache (128-bit id, packed state, pre-sized generations) | {held} | {:.1} | **{per_record:.0}** |",
        cache_bytes / 1048576.0
    );
    println!(
        "| map keyed by the record's strings (before) | {held} | {:.1} | {old_per_record:.0} |",
        old_bytes / 1048576.0
    );
    println!(
        "\nratio: {:.2} (records of ~{} bytes of key text: \"acme\", \"contact\", \"C-00000000\")",
        per_record / old_per_record,
        4 + 7 + 10
    );
}
