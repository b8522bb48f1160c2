//! The chaos harness's members: `crm-sync run` child processes of one consumer group,
//! killed with SIGKILL and started again, their resident memory sampled from /proc.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::ChaosError;

/// How members are started: the same binary, config file and environment for all.
pub struct Launcher {
    pub binary: PathBuf,
    pub config: PathBuf,
    /// The tenants' secrets, by the variables the config names.
    pub env: Vec<(String, String)>,
    /// Where each member's log goes, one file per start.
    pub logs: PathBuf,
}

/// One member slot; its process is started again after each kill.
pub struct Member {
    pub slot: usize,
    /// The running process; killed when the member is dropped.
    child: Option<Child>,
    /// Starts so far.
    pub starts: usize,
    /// When a killed member is due to start again.
    pub restart_at: Option<Instant>,
    /// Highest VmRSS sampled, over every start, in KiB.
    pub max_rss_kib: u64,
    /// The log file of each start.
    pub logs: Vec<PathBuf>,
}

impl Member {
    pub fn new(slot: usize) -> Self {
        Member {
            slot,
            child: None,
            starts: 0,
            restart_at: None,
            max_rss_kib: 0,
            logs: Vec::new(),
        }
    }

    /// Starts `crm-sync run --config …`; its log (INFO: lifecycle, rebalances, commits
    /// refused) goes to a file of its own, kept when the run finds a violation.
    pub fn start(&mut self, launcher: &Launcher) -> Result<u32, ChaosError> {
        let log = launcher
            .logs
            .join(format!("member-{}-start-{}.log", self.slot, self.starts + 1));
        let failed = |e: std::io::Error| ChaosError::Setup(format!("creating {}: {e}", log.display()));
        let file = File::create(&log).map_err(failed)?;
        // Logs go to standard output; anything written to standard error goes there too.
        let stderr = file.try_clone().map_err(failed)?;
        let child = Command::new(&launcher.binary)
            .arg("run")
            .arg("--config")
            .arg(&launcher.config)
            .envs(launcher.env.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", "info,librdkafka=warn,rdkafka=warn")
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(stderr)
            .spawn()
            .map_err(|e| ChaosError::Setup(format!("starting {}: {e}", launcher.binary.display())))?;
        let pid = child.id();
        self.child = Some(child);
        self.starts += 1;
        self.restart_at = None;
        self.logs.push(log);
        Ok(pid)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// SIGKILL, then reaps the process; its pid, if it was running.
    pub fn kill(&mut self) -> Option<u32> {
        let mut child = self.child.take()?;
        let pid = child.id();
        let _ = child.kill();
        let _ = child.wait();
        Some(pid)
    }

    /// Whether the process ended on its own (nobody here killed it); reaps it if so.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok().flatten()?;
        self.child = None;
        Some(status)
    }

    pub fn sample_rss(&mut self) {
        if let Some(kib) = self.pid().and_then(rss_kib) {
            self.max_rss_kib = self.max_rss_kib.max(kib);
        }
    }

    /// Asks the process to stop (SIGTERM), as an orchestrator would.
    pub fn terminate(&self) {
        if let Some(pid) = self.pid() {
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }

    /// SIGTERM, then waits up to `within` for the process to exit (SIGKILL after that);
    /// its pid, if it was running.
    pub fn stop(&mut self, within: Duration) -> Option<u32> {
        let pid = self.pid()?;
        self.terminate();
        self.wait_exit(within);
        Some(pid)
    }

    /// Waits up to `within` for the process to exit; kills it if it does not.
    pub fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            match self.child.as_mut()?.try_wait() {
                Ok(Some(status)) => {
                    self.child = None;
                    return Some(status);
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20)); // polling cadence; the deadline bounds the wait
                }
                _ => {
                    self.kill();
                    return None;
                }
            }
        }
    }

    pub fn current_log(&self) -> Option<&Path> {
        self.logs.last().map(PathBuf::as_path)
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Resident set size of a process, from `/proc/<pid>/status` (VmRSS), in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}
