//! The `chaos` scenario: the chaos harness's long form (`crm_sync::demo::chaos`; its
//! short form is `tests/chaos.rs`). Figures, and the verdict of its invariants.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};
use crm_sync::demo::chaos::{self, ChaosOptions, Stop};

#[derive(Args)]
pub struct ChaosArgs {
    /// Chaos scenario: seconds of chaos (kills, CRM faults, the stream flowing).
    #[arg(long, default_value_t = 90)]
    chaos_seconds: u64,
    /// Chaos scenario: workload events, about.
    #[arg(long, default_value_t = 40_000)]
    chaos_events: usize,
    /// Chaos scenario: SIGKILLs at random moments of the chaos.
    #[arg(long, default_value_t = 15)]
    chaos_kills: usize,
    /// Chaos scenario: how members are stopped; `sigterm` (graceful) is a diagnostic, to
    /// tell apart what only a crash causes.
    #[arg(long, value_enum, default_value_t = StopWith::Sigkill)]
    chaos_stop: StopWith,
    /// Chaos scenario: members of the consumer group.
    #[arg(long, default_value_t = 3)]
    chaos_members: usize,
    /// Chaos scenario: rounds of hostile messages (the first four with huge ones).
    #[arg(long, default_value_t = 8)]
    chaos_hostile_rounds: usize,
    /// Chaos scenario: seed of the workload, faults and kill moments (random by default).
    #[arg(long)]
    chaos_seed: Option<u64>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum StopWith {
    Sigkill,
    Sigterm,
}

/// Runs the harness with members running `binary`; whether every invariant held.
pub fn run(args: &ChaosArgs, binary: PathBuf) -> bool {
    let defaults = ChaosOptions::long(binary);
    let options = ChaosOptions {
        members: args.chaos_members,
        events: args.chaos_events,
        chaos: Duration::from_secs(args.chaos_seconds),
        kills: args.chaos_kills,
        stop: match args.chaos_stop {
            StopWith::Sigkill => Stop::Kill,
            StopWith::Sigterm => Stop::Term,
        },
        hostile_rounds: args.chaos_hostile_rounds,
        huge_rounds: args.chaos_hostile_rounds.min(defaults.huge_rounds),
        seed: args.chaos_seed.unwrap_or(defaults.seed),
        ..defaults
    };
    println!("\n## Chaos\n");
    match chaos::run(&options) {
        Ok(report) => {
            println!("\n{report}");
            report.violations().is_empty()
        }
        Err(e) => {
            println!("chaos harness failed: {e}");
            false
        }
    }
}
