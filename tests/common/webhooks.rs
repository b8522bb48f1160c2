//! A webhook receiver that verifies with the reference Standard Webhooks library (the
//! `standardwebhooks` package from PyPI, run by `tests/support/webhook_receiver.py`), and
//! the Python that runs it, the Python gRPC client (`grpcio`, `grpcio-tools`) and the
//! secured Kafka listener's SCRAM (`scramp`).
//! `.ci/run` installs the packages; when they are missing here, they are installed into
//! `target/test-python` first, so the README's test command needs nothing by hand.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;

use base64::Engine;
use serde_json::Value;

/// A fresh `whsec_` secret.
pub fn secret() -> String {
    let key: [u8; 24] = rand::random();
    format!("whsec_{}", base64::engine::general_purpose::STANDARD.encode(key))
}

/// The PyPI packages the tests' Python needs, and a module of each to import.
const PACKAGES: [(&str, &str); 4] = [
    ("standardwebhooks", "standardwebhooks"),
    ("grpcio", "grpc"),
    ("grpcio-tools", "grpc_tools"),
    ("scramp", "scramp"),
];

/// `PYTHONPATH` under which the [`PACKAGES`] import, installing them if need be.
pub fn python_path() -> &'static str {
    static PATH: OnceLock<String> = OnceLock::new();
    PATH.get_or_init(|| {
        let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-python");
        let modules = PACKAGES.map(|(_, m)| m).join(", ");
        let imports = |path: &str| {
            Command::new("python3")
                .args(["-c", &format!("import {modules}")])
                .env("PYTHONPATH", path)
                .status()
                .is_ok_and(|s| s.success())
        };
        let target = target.display().to_string();
        if imports(&target) {
            return target;
        }
        let installed = Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", "--target", &target])
            .args(PACKAGES.map(|(p, _)| p))
            .status()
            .expect("python3 runs");
        assert!(
            installed.success() && imports(&target),
            "the tests' Python packages ({:?}) could not be installed",
            PACKAGES.map(|(p, _)| p)
        );
        target
    })
}

pub struct Receiver {
    child: Option<Child>,
    pub port: u16,
    secret: String,
    log: PathBuf,
    fail_first: bool,
}

impl Receiver {
    /// Starts a receiver on a free port that accepts what `secret` verifies.
    pub fn start(secret: &str, dir: &Path, fail_first: bool) -> Receiver {
        let mut r = Receiver {
            child: None,
            port: 0,
            secret: secret.to_string(),
            log: dir.join(format!("webhooks-{}.jsonl", rand::random::<u32>())),
            fail_first,
        };
        r.restart();
        r
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hooks/crm-sync", self.port)
    }

    /// Stops it: connections are refused until [`restart`](Self::restart).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again, on the same port once it has one.
    pub fn restart(&mut self) {
        self.kill();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/webhook_receiver.py");
        let mut args = vec![
            script.display().to_string(),
            self.port.to_string(),
            self.secret.clone(),
            self.log.display().to_string(),
        ];
        if self.fail_first {
            args.push("--fail-first".into());
        }
        let mut child = Command::new("python3")
            .args(&args)
            .env("PYTHONPATH", python_path())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 runs");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped"))
            .read_line(&mut line)
            .expect("the receiver says where it listens");
        self.port = line
            .trim()
            .strip_prefix("listening ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("receiver did not start: {line:?}"));
        self.child = Some(child);
    }

    /// Every request it got, in order.
    pub fn entries(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The requests that verified.
    pub fn verified(&self) -> Vec<Value> {
        self.with("verified")
    }

    pub fn with(&self, outcome: &str) -> Vec<Value> {
        self.entries().into_iter().filter(|e| e["outcome"] == outcome).collect()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.kill();
    }
}
