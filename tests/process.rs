//! The `crm-sync` binary as operators run it: the CLI, a `kill -9` mid-stream while the
//! broker lives on in a `crm-sync sandbox kafka` process, and a graceful SIGTERM.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use crm_sync::demo::verify;
use crm_sync::demo::workload::{generate, TenantSpec, WorkloadSpec};

const BIN: &str = env!("CARGO_BIN_EXE_crm-sync");

/// Taken by the tests that run a whole service with its own broker and sandboxes under
/// load (the demo, the kill -9 run), so that on a 2-core machine they do not run beside
/// each other: the demo's `retry.max_age_ms` is 3 s, and before the age bound waited for
/// half the attempts, a record whose retries aged past it on a starved machine was
/// dead-lettered (seen once in 5 full runs).
static WHOLE_SERVICE: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn whole_service() -> std::sync::MutexGuard<'static, ()> {
    WHOLE_SERVICE.lock().unwrap_or_else(|p| p.into_inner())
}

/// A child process that is killed when the test ends, however it ends.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    /// Waits for the process to exit, up to `within`.
    fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(status)) = self.0.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20)); // polling cadence; the deadline bounds the wait
        }
    }
}

/// Starts `crm-sync sandbox kafka …` and returns it with the bootstrap address it printed.
fn start_broker<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> (Proc, String) {
    let mut broker = Proc(
        Command::new(BIN)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut bootstrap = String::new();
    BufReader::new(broker.0.stdout.take().unwrap())
        .read_line(&mut bootstrap)
        .unwrap();
    (broker, bootstrap.trim().to_string())
}

fn crm_sync(args: &[&str]) -> std::process::Output {
    Command::new(BIN).args(args).output().unwrap()
}

#[test]
fn cli_misuse_prints_usage() {
    let out = crm_sync(&[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("Usage: crm-sync"));
    let out = crm_sync(&["run"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--config"));
}

#[test]
fn check_config_accepts_the_reference_and_names_the_wrong_key() {
    let out = Command::new(BIN)
        .args([
            "check-config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config/crm-sync.toml"),
        ])
        .envs(REFERENCE_SECRETS)
        .env("KAFKA_SASL_PASSWORD", "x")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    let reference = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/crm-sync.toml")).unwrap();
    std::fs::write(
        &path,
        reference.replace("drain_timeout_ms = 5000", "drain_timeout_ms = 50000"),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["check-config", path.to_str().unwrap()])
        .envs(REFERENCE_SECRETS)
        .env("KAFKA_SASL_PASSWORD", "x")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("kafka.drain_timeout_ms"));

    // A secret the environment does not provide is named, not guessed.
    let out = Command::new(BIN)
        .args([
            "check-config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config/crm-sync.toml"),
        ])
        .env_remove("KAFKA_SASL_PASSWORD")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("KAFKA_SASL_PASSWORD"));
}

/// `check-config` reports every problem in one run, each naming its key: cross-field
/// rules, addresses, and what librdkafka refuses when the service's Kafka clients are
/// built (a property's value, a SASL mechanism this build has no provider for). Secrets
/// written in the file are named, never printed. `--no-secrets` checks the reference
/// configuration where none of its secrets are set.
#[test]
fn check_config_reports_every_problem_at_once_and_runs_without_secrets() {
    let reference = concat!(env!("CARGO_MANIFEST_DIR"), "/config/crm-sync.toml");
    let out = Command::new(BIN)
        .args(["check-config", "--no-secrets", reference])
        .env_clear()
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        stdout.contains("OK") && stdout.contains("secrets not resolved"),
        "{stdout}"
    );

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    let text = std::fs::read_to_string(reference)
        .unwrap()
        .replace("http_addr = \"127.0.0.1:9464\"", "http_addr = \"localhost:notaport\"")
        .replace("group_id = \"crm-sync\"", "group_id = \"\"")
        .replace(
            "\"sasl.mechanisms\" = \"SCRAM-SHA-512\"",
            "\"sasl.mechanisms\" = \"GSSAPI\"",
        )
        .replace(
            "\"sasl.password\" = \"${KAFKA_SASL_PASSWORD}\"",
            "\"sasl.password\" = \"hunter2-literal\"\n\"compression.type\" = \"brotli\"\n\"bad\\u001b[31mkey\" = \"1\"",
        );
    std::fs::write(&path, text).unwrap();
    let out = Command::new(BIN)
        .args(["check-config", "--no-secrets", path.to_str().unwrap()])
        .env_clear()
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    for expected in [
        "`service.http_addr`",
        "`kafka.group_id`",
        "`kafka.client.\"compression.type\"`",
        "GSSAPI",
        "warning: `kafka.client.\"sasl.password\"` is written in the file",
    ] {
        assert!(stderr.contains(expected), "{expected} missing from:\n{stderr}");
    }
    assert!(stderr.contains("5 problem(s)"), "{stderr}");
    assert!(!stderr.contains("hunter2"), "a literal secret was printed:\n{stderr}");
    assert!(
        !stderr.contains('\u{1b}'),
        "a control character reached the terminal:\n{stderr}"
    );
}

#[test]
fn redrive_from_the_command_line_says_what_it_did_and_names_a_bad_flag() {
    let env = Env::new(1);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crm-sync.toml");
    std::fs::write(&path, env.config_toml()).unwrap();
    let redrive = |extra: &[&str]| {
        Command::new(BIN)
            .args(["redrive", "--config", path.to_str().unwrap()])
            .args(extra)
            .env("SF_SECRET", CLIENT_SECRET)
            .output()
            .unwrap()
    };
    let dry = redrive(&["--dry-run"]);
    assert!(dry.status.success(), "{}", String::from_utf8_lossy(&dry.stderr));
    let said = String::from_utf8_lossy(&dry.stdout);
    assert!(
        said.contains("read 0 dead-lettered record(s)") && said.contains("would redrive 0"),
        "{said}"
    );
    let bad = redrive(&["--since", "yesterday"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--since"));
}

#[test]
fn notify_runs_the_notifier_alone_and_stops_on_sigterm() {
    let env = Env::new(1);
    let dir = tempfile::tempdir().unwrap();
    let key = webhooks::secret();
    let receiver = webhooks::Receiver::start(&key, dir.path(), false);
    let path = dir.path().join("crm-sync.toml");
    let bare = env.config_toml();
    std::fs::write(&path, &bare).unwrap();
    let notify = |envs: &[(&str, &str)]| {
        let mut c = Command::new(BIN);
        c.args(["notify", "--config", path.to_str().unwrap()])
            .env("SF_SECRET", CLIENT_SECRET)
            .env("RUST_LOG", "warn");
        for (k, v) in envs {
            c.env(k, v);
        }
        c
    };
    // Without an endpoint there is nothing to do: it says so.
    let out = notify(&[]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no webhook endpoint"));

    let ndlq = unique("ndlq");
    env.kafka.as_ref().unwrap().create_topic(&ndlq, 1).unwrap();
    let text = format!(
        "{bare}\n[[tenants.webhooks]]\nurl = \"{}\"\nsecrets = [\"${{HOOK_SECRET}}\"]\n[notifier]\ndlq_topic = \"{ndlq}\"\n",
        receiver.url()
    );
    std::fs::write(&path, text).unwrap();
    let event = serde_json::json!({"kind": "tenant_state", "tenant": "acme", "from": "closed", "to": "auth_failed", "reason": "HTTP 401", "at": "2026-11-30T12:00:00Z"});
    env.produce_failures(&[("acme".into(), event.to_string().into_bytes())]);
    let mut notifier = Proc(
        notify(&[("HOOK_SECRET", &key)])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    assert!(
        wait_until(Duration::from_secs(60), || receiver.verified().len() == 1),
        "{:?}",
        receiver.entries()
    );
    assert_eq!(receiver.verified()[0]["body"]["data"]["to"], "auth_failed");
    let pid = notifier.0.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let status = notifier
        .wait_exit(Duration::from_secs(15))
        .expect("did not exit after SIGTERM");
    assert!(status.success(), "exit status {status:?}");
}

/// Logs written to a file are JSON lines with no ANSI codes (`log_format = "auto"` off a
/// terminal); `log_format = "text"` writes plain text, still without ANSI codes.
#[test]
fn logs_off_a_terminal_are_json_lines_without_ansi_codes() {
    let env = Env::new(1);
    let dir = tempfile::tempdir().unwrap();
    for format in ["auto", "text"] {
        let path = dir.path().join(format!("{format}.toml"));
        let text = env.config_toml().replace(
            "shutdown_deadline_ms = 8000",
            &format!("shutdown_deadline_ms = 8000\nlog_format = \"{format}\""),
        );
        std::fs::write(&path, text).unwrap();
        let log = dir.path().join(format!("{format}.log"));
        let mut service = Proc(
            Command::new(BIN)
                .args(["run", "--config", path.to_str().unwrap()])
                .env("SF_SECRET", CLIENT_SECRET)
                .env("RUST_LOG", "info")
                .stdout(std::fs::File::create(&log).unwrap())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let read = || std::fs::read_to_string(&log).unwrap_or_default();
        assert!(
            wait_until(Duration::from_secs(30), || read().contains("crm-sync running.")),
            "{format}: {}",
            read()
        );
        let pid = service.0.id().to_string();
        assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
        service.wait_exit(Duration::from_secs(20)).expect("exits after SIGTERM");
        let written = read();
        assert!(
            !written.contains('\u{1b}'),
            "{format}: ANSI codes in a file:\n{written}"
        );
        let lines: Vec<&str> = written.lines().filter(|l| !l.trim().is_empty()).collect();
        assert!(lines.len() >= 2, "{format}: {written}");
        for line in &lines {
            let parsed = serde_json::from_str::<serde_json::Value>(line);
            if format == "auto" {
                let object = parsed.unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
                assert!(object["level"].is_string() && object["timestamp"].is_string(), "{line}");
                assert!(object["message"].is_string(), "{line}");
            } else {
                assert!(parsed.is_err(), "text format wrote JSON: {line}");
            }
        }
    }
}

fn start_service(config: &std::path::Path) -> Proc {
    Proc(
        Command::new(BIN)
            .args(["run", "--config", config.to_str().unwrap()])
            .env("SF_SECRET", CLIENT_SECRET)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

#[test]
fn kill_9_mid_stream_loses_nothing_and_sigterm_exits_cleanly() {
    let _alone = whole_service();
    // 1. A broker in its own process, so it outlives the killed service.
    let topics = [unique("events"), unique("dlq"), unique("failures"), unique("state")];
    let mut args = vec!["sandbox".to_string(), "kafka".into(), "--partitions".into(), "3".into()];
    for t in &topics {
        args.extend(["--topic".to_string(), t.clone()]);
    }
    let (broker, bootstrap) = start_broker(&args);
    let env = Env::external(None, bootstrap, topics, 3);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("crm-sync.toml");
    std::fs::write(&config, env.config_toml()).unwrap();

    let w = generate(&WorkloadSpec {
        seed: 21,
        ..WorkloadSpec::small(
            vec![TenantSpec {
                name: "acme".into(),
                entities: vec!["contact".into()],
            }],
            1500,
        )
    });
    env.produce(&w.messages);
    env.slow_crm(3);

    // 2. The service is killed with SIGKILL mid-stream.
    let mut service = start_service(&config);
    assert!(wait_until(Duration::from_secs(60), || env.sf.stats().upserts_applied > 300));
    service.0.kill().unwrap();
    service.0.wait().unwrap();
    assert!(!env.all_committed(), "the kill came too late to be mid-stream");
    env.slow_crm(0);

    // 3. Restarted, it resumes from the committed offsets and the CRM converges.
    let mut service = start_service(&config);
    assert!(
        env.wait_all_committed(Duration::from_secs(90)),
        "not everything was committed after the restart"
    );
    let mismatches = verify(&env.config(), &w.expected, &env.sandboxes());
    assert!(
        mismatches.is_empty(),
        "{} differ: {:?}",
        mismatches.len(),
        &mismatches[..mismatches.len().min(5)]
    );

    // 4. SIGTERM: drain, commit, leave the group, exit 0 within the deadline (8 s) + a few.
    let pid = service.0.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let status = service
        .wait_exit(Duration::from_secs(15))
        .expect("did not exit after SIGTERM");
    assert!(status.success(), "exit status {status:?}");
    drop(broker);
}

#[test]
fn produce_keys_events_by_record_identity() {
    let (_broker, bootstrap) = start_broker(&["sandbox", "kafka", "--partitions", "1", "--topic", "events"]);
    let lines = [
        String::from_utf8(upsert("e1", "C-1", 1, "Ada", "Lovelace").1).unwrap(),
        "{not json".to_string(),
    ];
    let mut child = Command::new(BIN)
        .args(["produce", "--bootstrap", &bootstrap, "--topic", "events"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        writeln!(stdin, "{}\n\n{}", lines[0], lines[1]).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("produced 2 message(s) to events"));
    let read = crm_sync::sandbox::kafka::tools::read_all(&bootstrap, "events", 1, Duration::from_secs(20)).unwrap();
    assert_eq!(read.len(), 2);
    assert_eq!(read[0].key.as_deref(), Some(b"acme/contact/C-1".as_slice()));
    assert_eq!(read[0].payload.as_deref(), Some(lines[0].as_bytes()));
    assert_eq!(read[1].key.as_deref(), Some(b"unkeyed".as_slice()));
}

#[test]
fn the_demo_converges_on_all_three_crms() {
    let _alone = whole_service();
    // The demo's own check: every sandbox (Salesforce, Zendesk, Dynamics 365) holds the
    // newest version of every record, through injected 5xx, row locks, 429 storms that
    // park events on the retry topic, and expiring tokens.
    let out = Command::new(BIN)
        .args(["demo", "--records", "600", "--metrics-addr", "127.0.0.1:0"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("CHECK PASSED"), "{stdout}");
    // The demo's webhook receiver verified the notifier's notifications, and refused none.
    assert!(stdout.contains("webhook ✓ initech  tenant.state_changed"), "{stdout}");
    assert!(stdout.contains(" 0 rejected"), "{stdout}");
    for crm in ["salesforce", "zendesk", "dynamics"] {
        assert!(stdout.contains(crm), "the summary shows {crm}: {stdout}");
    }
}
