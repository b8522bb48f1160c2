//! A tenant's `rate_limit_per_sec` is for the whole consumer group, as a CRM's API limits
//! are per org: three members together stay within it, and use most of it while there
//! is work.

mod common;

use std::time::{Duration, Instant};

use common::*;
use crm_sync::config::Config;
use crm_sync::consume::StopMode;
use crm_sync::pipeline;
use crm_sync::sandbox::CrmSandbox;

/// The tenant's limit, in calls per second, for the group.
const RATE: f64 = 20.0;
/// How long the calls are counted once the members share the partitions.
const WINDOW: Duration = Duration::from_secs(8);

#[test]
fn three_members_together_call_the_crm_at_the_tenants_rate() {
    let env = Env::new(6);
    let events: Vec<_> = (0..900)
        .map(|i| upsert(&format!("e-{i}"), &format!("G-{i}"), 1, "Grace", &format!("Hopper{i}")))
        .collect();
    env.produce(&events);
    // One record per call, so that calls are what the limit counts.
    let text = env
        .config_toml()
        .replace("rate_limit_per_sec = 5000", &format!("rate_limit_per_sec = {RATE}"))
        .replace("request_timeout_ms = 5000", "request_timeout_ms = 5000\nbatch_size = 1");
    let secret = env.sf.secret();
    let config = Config::from_toml_with_env(&text, |v| (v == "SF_SECRET").then(|| secret.clone())).unwrap();
    let members: Vec<_> = (0..3).map(|_| pipeline::start(config.clone()).unwrap()).collect();
    assert!(
        wait_until(Duration::from_secs(40), || members
            .iter()
            .all(|m| m.assigned_partitions() == 2)),
        "partitions not shared 2/2/2: {:?}",
        members.iter().map(|m| m.assigned_partitions()).collect::<Vec<_>>()
    );
    // The measurement starts 3 s after the split, once the partitions that moved have
    // been handed over, their states read back and their events read again, and lasts a
    // fixed window: these sleeps are the measurement's clock, not waits for a condition.
    std::thread::sleep(Duration::from_secs(3));
    let (calls_before, started) = (env.sf.stats().api_requests, Instant::now());
    std::thread::sleep(WINDOW);
    let (calls, elapsed) = (env.sf.stats().api_requests - calls_before, started.elapsed());
    let delivered = (0..900).filter(|i| env.contact(&format!("G-{i}")).is_some()).count();
    for m in members {
        m.stop(StopMode::Graceful);
    }
    let rate = calls as f64 / elapsed.as_secs_f64();
    // Shown with --nocapture; load-tests/README.md reports it.
    println!(
        "{calls} calls in {:.1} s from three members: {rate:.1} calls/s (limit {RATE})",
        elapsed.as_secs_f64()
    );
    assert!(
        delivered < 900,
        "the work ran out before the window ended: {delivered} delivered"
    );
    assert!(
        rate <= RATE * 1.1,
        "{rate:.1} calls/s from three members, over the group's limit of {RATE}"
    );
    assert!(
        rate > RATE * 0.7,
        "{rate:.1} calls/s from three members while there is work: under 70% of {RATE}"
    );
}
