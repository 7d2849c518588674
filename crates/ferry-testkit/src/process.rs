//! Child processes that die with their handle.

use std::fs::File;
use std::net::TcpListener;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// Why a server could not be started.
#[derive(Debug, thiserror::Error)]
pub enum KitError {
    /// A program is missing or failed to start.
    #[error("cannot start {program}: {hint}")]
    Spawn {
        /// The program.
        program: String,
        /// What to do about it.
        hint: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A setup command exited with an error.
    #[error("{command} failed with {status}; output: {output}")]
    Command {
        /// The command line.
        command: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What it printed.
        output: String,
    },
    /// A server did not become ready in time.
    #[error("{what} not ready within {seconds}s; the end of its log:\n{log}")]
    NotReady {
        /// The server.
        what: String,
        /// The deadline.
        seconds: u64,
        /// The last lines of its log (the temp dir holding it is gone once the test ends).
        log: String,
    },
    /// File system trouble.
    #[error("i/o error in the test kit")]
    Io(#[from] std::io::Error),
}

/// A [`KitError::NotReady`] quoting the end of the log at `log`.
pub(crate) fn not_ready(what: impl Into<String>, seconds: u64, log: &Path) -> KitError {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    KitError::NotReady {
        what: what.into(),
        seconds,
        log: lines[lines.len().saturating_sub(20)..].join("\n"),
    }
}

/// A free TCP port on 127.0.0.1 for a server to listen on.
///
/// Ports come from below the kernel's ephemeral range (32768 and up on Linux): ports there are
/// handed to outgoing connections at any moment, so one found free could be taken before the
/// server binds it. Candidates are spread pseudo-randomly so concurrent tests rarely meet.
pub fn free_port() -> Result<u16, KitError> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
        ^ u64::from(std::process::id()) << 17;
    for _ in 0..200 {
        let mut x = seed ^ NEXT.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed);
        x ^= x >> 33;
        x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
        x ^= x >> 33;
        let port = 20_000 + (x % 12_000) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The repository root (where `Cargo.toml` of the workspace lives).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A running child process, killed with its whole process group on drop.
#[derive(Debug)]
pub struct ChildProcess {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl ChildProcess {
    /// Spawns `program args…` in its own process group, stdout and stderr appended to `log`.
    ///
    /// The child runs under `setpriv --pdeathsig KILL`, so it is killed by the kernel if the
    /// test process dies without running destructors (a nextest timeout, Ctrl-C). The signal
    /// fires when the spawning *thread* exits: spawn from the test's own thread (what async
    /// tests do), not from a short-lived blocking-pool thread.
    pub fn spawn(name: &str, command: Command, log: &Path) -> Result<Self, KitError> {
        Self::spawn_as(name, command, log, None)
    }

    /// As [`ChildProcess::spawn`], running the program as `user` (for servers that refuse root).
    pub fn spawn_as(
        name: &str,
        command: Command,
        log: &Path,
        user: Option<&str>,
    ) -> Result<Self, KitError> {
        let mut wrapped = Command::new("setpriv");
        if let Some(user) = user {
            wrapped.args([
                format!("--reuid={user}"),
                format!("--regid={user}"),
                "--init-groups".into(),
            ]);
        }
        wrapped
            .args(["--pdeathsig", "KILL", "--"])
            .arg(command.get_program())
            .args(command.get_args());
        if let Some(dir) = command.get_current_dir() {
            wrapped.current_dir(dir);
        }
        for (key, value) in command.get_envs() {
            match value {
                Some(value) => wrapped.env(key, value),
                None => wrapped.env_remove(key),
            };
        }
        let mut command = wrapped;
        let out = File::options().create(true).append(true).open(log)?;
        let err = out.try_clone()?;
        command
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        let child = command.spawn().map_err(|source| KitError::Spawn {
            program: format!("{:?}", command.get_program()),
            hint: "is it installed? run deploy/local/install-deps.sh".into(),
            source,
        })?;
        Ok(Self {
            name: name.to_owned(),
            child: Some(child),
            log: log.to_owned(),
        })
    }

    /// The process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The log file.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// `kill -9` of the whole group, as a crash would; waits for the process to be gone.
    pub fn kill9(&mut self) {
        self.signal_group("KILL");
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
    }

    /// SIGSTOP to the whole group: the process freezes as a long GC or VM pause would, its
    /// sockets left open, until [`ChildProcess::cont`].
    pub fn stop(&self) {
        self.signal_group("STOP");
    }

    /// SIGCONT to the whole group: a process frozen by [`ChildProcess::stop`] runs again.
    pub fn cont(&self) {
        self.signal_group("CONT");
    }

    /// SIGTERM, then waits for a clean exit; returns whether it exited successfully.
    pub async fn terminate(&mut self, within: std::time::Duration) -> bool {
        self.stop_with("TERM", within).await
    }

    /// Sends `signal` (a name such as `INT`) to the process alone, then waits for it to exit
    /// (killing its group if it has not within `within`); returns whether it exited
    /// successfully. Servers read the signal as how to shut down (Postgres: `INT` is a fast
    /// shutdown).
    pub async fn stop_with(&mut self, signal: &str, within: std::time::Duration) -> bool {
        let Some(pid) = self.pid() else { return false };
        let _ = Command::new("kill")
            .args([&format!("-{signal}"), &pid.to_string()])
            .status();
        let deadline = tokio::time::Instant::now() + within;
        while tokio::time::Instant::now() < deadline {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                self.signal_group("KILL");
                return status.success();
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        self.kill9();
        false
    }

    /// The last `lines` lines of the log, for failure messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    fn signal_group(&self, signal: &str) {
        if let Some(pid) = self.pid() {
            kill_group(pid, signal);
        }
    }
}

/// Sends `signal` to the process group led by `pid`.
fn kill_group(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{signal}"), "--", &format!("-{pid}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        if self.child.is_some() {
            tracing::debug!(process = %self.name, "stopping");
            self.kill9();
        }
    }
}

/// Runs a setup command to completion, failing with its output.
pub(crate) fn run(mut command: Command) -> Result<(), KitError> {
    let output = command.output().map_err(|source| KitError::Spawn {
        program: format!("{:?}", command.get_program()),
        hint: "is it installed? run deploy/local/install-deps.sh".into(),
        source,
    })?;
    if output.status.success() {
        Ok(())
    } else {
        Err(KitError::Command {
            command: format!("{command:?}"),
            status: output.status,
            output: format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ),
        })
    }
}
