//! A PostgreSQL 15 server with `wal_level=logical` on a free loopback port.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tempfile::TempDir;

use crate::process::{not_ready, run};
use crate::{ChildProcess, KitError, free_port, wait};

const BIN: &str = "/usr/lib/postgresql/15/bin";

/// A running Postgres server; trust auth for local TCP clients, superuser `postgres`.
#[derive(Debug)]
pub struct Postgres {
    port: u16,
    dir: TempDir,
    /// The `-c name=value` settings it was started with, to start it again alike.
    extra: Vec<String>,
    process: Option<ChildProcess>,
}

/// How the server shuts down, as `pg_ctl stop -m` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    /// Waits for every client to disconnect (SIGTERM).
    Smart,
    /// Ends every session and checkpoints (SIGINT): what `pg_ctl restart` does by default.
    Fast,
    /// Quits without a checkpoint, recovering from WAL on the next start (SIGQUIT).
    Immediate,
}

impl StopMode {
    fn signal(self) -> &'static str {
        match self {
            Self::Smart => "TERM",
            Self::Fast => "INT",
            Self::Immediate => "QUIT",
        }
    }
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false)
}

/// The user server binaries must run as: `postgres` when we are root (initdb refuses root).
fn server_user() -> Option<&'static str> {
    is_root().then_some("postgres")
}

/// A command for a setup binary (initdb), as [`server_user`].
fn server_command(program: &str) -> Command {
    let path = Path::new(BIN).join(program);
    if is_root() {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(path);
        command
    } else {
        Command::new(path)
    }
}

impl Postgres {
    /// `initdb` into a temp dir and start the server with `extra` settings (`name=value`).
    pub async fn start_with(extra: &[&str]) -> Result<Self, KitError> {
        let dir = tempfile::Builder::new().prefix("ferry-pg-").tempdir()?;
        let data = dir.path().join("data");
        if is_root() {
            // The temp dir is 0700 root; the postgres user must reach its data dir.
            std::fs::set_permissions(
                dir.path(),
                std::os::unix::fs::PermissionsExt::from_mode(0o755),
            )?;
            std::fs::create_dir(&data)?;
            run({
                let mut c = Command::new("chown");
                c.arg("postgres:postgres").arg(&data);
                c
            })?;
        }
        let mut initdb = server_command("initdb");
        initdb.arg("-D").arg(&data).args([
            "--auth=trust",
            "--username=postgres",
            "--encoding=UTF8",
            "--no-sync",
        ]);
        run(initdb)?;
        let port = free_port()?;
        let mut pg = Self {
            port,
            dir,
            extra: extra.iter().map(|s| (*s).to_owned()).collect(),
            process: None,
        };
        pg.start_again().await?;
        Ok(pg)
    }

    /// Starts the stopped server again on the same port over the same data, and waits until
    /// it accepts connections. Does nothing if it runs.
    pub async fn start_again(&mut self) -> Result<(), KitError> {
        if self.process.as_mut().is_some_and(ChildProcess::is_running) {
            return Ok(());
        }
        let data = self.dir.path().join("data");
        let mut postgres = Command::new(Path::new(BIN).join("postgres"));
        postgres
            .arg("-D")
            .arg(&data)
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-k")
            .arg(&data)
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args(["-c", "wal_level=logical"])
            .args(["-c", "max_replication_slots=20"])
            .args(["-c", "max_wal_senders=20"])
            .args([
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
            ]);
        for setting in &self.extra {
            postgres.args(["-c", setting]);
        }
        let log = self.log();
        self.process = Some(ChildProcess::spawn_as(
            "postgres",
            postgres,
            &log,
            server_user(),
        )?);
        self.wait_ready().await
    }

    /// Shuts the server down in `mode` and waits until it has exited (at most 60 s, then it
    /// is killed); the data directory stays for [`Postgres::start_again`].
    pub async fn stop(&mut self, mode: StopMode) {
        if let Some(mut process) = self.process.take() {
            process
                .stop_with(mode.signal(), Duration::from_secs(60))
                .await;
        }
    }

    /// `pg_ctl restart -m <mode>`: [`Postgres::stop`] then [`Postgres::start_again`].
    pub async fn restart(&mut self, mode: StopMode) -> Result<(), KitError> {
        self.stop(mode).await;
        self.start_again().await
    }

    /// A default server.
    pub async fn start() -> Result<Self, KitError> {
        Self::start_with(&[]).await
    }

    async fn wait_ready(&self) -> Result<(), KitError> {
        let conn = self.connection_string("postgres");
        let ready = wait::until(Duration::from_secs(30), || async {
            tokio_postgres::connect(&conn, tokio_postgres::NoTls)
                .await
                .ok()
                .map(|_| ())
        })
        .await;
        ready.ok_or_else(|| not_ready("postgres", 30, &self.log()))
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server log.
    pub fn log(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    /// A libpq-style connection string for `database` as `postgres`.
    pub fn connection_string(&self, database: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname={database}",
            self.port
        )
    }

    /// A connected client (its connection task runs in the background).
    pub async fn client(
        &self,
        database: &str,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let (client, connection) =
            tokio_postgres::connect(&self.connection_string(database), tokio_postgres::NoTls)
                .await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(client)
    }

    /// Makes TCP logins of `user` require a password (scram-sha-256), for authentication tests.
    pub async fn require_password_for(&self, user: &str) -> Result<(), KitError> {
        let hba = self.dir.path().join("data/pg_hba.conf");
        let rest = std::fs::read_to_string(&hba)?;
        std::fs::write(
            &hba,
            format!("host all {user} 127.0.0.1/32 scram-sha-256\n{rest}"),
        )?;
        let client = self
            .client("postgres")
            .await
            .map_err(|e| KitError::Io(std::io::Error::other(e)))?;
        client
            .execute("SELECT pg_reload_conf()", &[])
            .await
            .map_err(|e| KitError::Io(std::io::Error::other(e)))?;
        Ok(())
    }

    /// Stops the server at once.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.kill9();
        }
    }
}
