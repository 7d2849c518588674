//! ClickHouse: the chdb engine behind the HTTP adapter in `deploy/local/chdb_server.py`.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use tempfile::TempDir;

use crate::process::not_ready;
use crate::{ChildProcess, KitError, free_port, repo_root, wait};

/// A running adapter; user `default` with the given password. Its data lives in its temp
/// directory, so it survives [`ClickHouse::kill`] and [`ClickHouse::restart`].
#[derive(Debug)]
pub struct ClickHouse {
    port: u16,
    dir: TempDir,
    password_file: Option<PathBuf>,
    process: ChildProcess,
}

/// The Python that has chdb: `FERRY_PYTHON`, else the repo's `.tools/venv`.
pub fn python() -> PathBuf {
    std::env::var_os("FERRY_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".tools/venv/bin/python"))
}

impl ClickHouse {
    /// Starts the adapter with an empty password.
    pub async fn start() -> Result<Self, KitError> {
        Self::start_with_password("").await
    }

    /// Starts the adapter requiring `password` for user `default`.
    pub async fn start_with_password(password: &str) -> Result<Self, KitError> {
        let dir = tempfile::Builder::new().prefix("ferry-ch-").tempdir()?;
        let port = free_port()?;
        let password_file = if password.is_empty() {
            None
        } else {
            let file = dir.path().join("password");
            std::fs::write(&file, password)?;
            Some(file)
        };
        let process = spawn(port, dir.path(), password_file.as_deref()).await?;
        Ok(Self {
            port,
            dir,
            password_file,
            process,
        })
    }

    /// Kills the server with SIGKILL, as a crash would; its data stays for
    /// [`ClickHouse::restart`]. Requests meanwhile find the port closed.
    pub fn kill(&mut self) {
        self.process.kill9();
    }

    /// Starts the server again (killing it first if it runs) on the same port over the same
    /// data, and waits until it answers.
    pub async fn restart(&mut self) -> Result<(), KitError> {
        self.process.kill9();
        self.process = spawn(self.port, self.dir.path(), self.password_file.as_deref()).await?;
        Ok(())
    }

    /// [`ClickHouse::restart`], now requiring `password` for user `default` (none if empty):
    /// a password changed under clients that still use the old one.
    pub async fn restart_with_password(&mut self, password: &str) -> Result<(), KitError> {
        self.password_file = if password.is_empty() {
            None
        } else {
            let file = self.dir.path().join("password");
            std::fs::write(&file, password)?;
            Some(file)
        };
        self.restart().await
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The adapter's log.
    pub fn log(&self) -> PathBuf {
        self.dir.path().join("clickhouse.log")
    }
}

/// Starts the adapter on `port` over the data in `dir` and waits until it answers.
async fn spawn(
    port: u16,
    dir: &std::path::Path,
    password_file: Option<&std::path::Path>,
) -> Result<ChildProcess, KitError> {
    let mut command = Command::new(python());
    command
        .arg(repo_root().join("deploy/local/chdb_server.py"))
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .arg("--data-dir")
        .arg(dir.join("data"));
    if let Some(file) = password_file {
        command.arg("--password-file").arg(file);
    }
    let log = dir.join("clickhouse.log");
    let process = ChildProcess::spawn("clickhouse", command, &log)?;
    let addr = format!("127.0.0.1:{port}");
    // Importing chdb takes a few seconds on a cold cache.
    let ready = wait::until(Duration::from_secs(60), || async {
        ping(&addr).await.then_some(())
    })
    .await;
    ready.ok_or_else(|| not_ready("clickhouse adapter", 60, &log))?;
    Ok(process)
}

/// Whether the server at `addr` answers `GET /ping` with `Ok.` (a real answer, not an open port).
async fn ping(addr: &str) -> bool {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await else {
        return false;
    };
    if stream
        .write_all(b"GET /ping HTTP/1.0\r\n\r\n")
        .await
        .is_err()
    {
        return false;
    }
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), stream.read_to_end(&mut answer)).await;
    answer.ends_with(b"Ok.\n")
}
