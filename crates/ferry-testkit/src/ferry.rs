//! Ferry's own services as child processes, wired to a test etcd.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use ferry_core::secret::SecretKey;
use ferry_proto::v1::WorkerKind;
use ferry_proto::v1::pipe_service_client::PipeServiceClient;
use ferry_store::{EtcdConfig, Store, StoreError};
use tempfile::TempDir;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::process::not_ready;
use crate::{ChildProcess, KitError, free_port, wait};

/// Where the service binaries are: `FERRY_BIN_DIR`, else the cargo target dir of this build.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("FERRY_BIN_DIR") {
        return PathBuf::from(dir);
    }
    // Test executables live in target/<profile>/deps, other binaries (the benchmark) in
    // target/<profile> beside the service binaries.
    std::env::current_exe()
        .ok()
        .and_then(|exe| {
            let dir = exe.parent()?;
            Some(if dir.ends_with("deps") {
                dir.parent()?.to_path_buf()
            } else {
                dir.to_path_buf()
            })
        })
        .unwrap_or_else(|| PathBuf::from("target/debug"))
}

/// Settings shared by the services of one test.
#[derive(Debug)]
pub struct Ferry {
    dir: TempDir,
    etcd_endpoints: Vec<String>,
    key_file: PathBuf,
    lease_ttl_secs: u64,
}

/// A running Ferry service.
#[derive(Debug)]
pub struct Service {
    /// Its coordinator or worker id.
    pub id: String,
    /// `127.0.0.1:<port>`.
    pub addr: String,
    process: ChildProcess,
}

impl Ferry {
    /// Services talking to etcd at `endpoints`, with leases of `lease_ttl_secs`.
    pub fn new(endpoints: Vec<String>, lease_ttl_secs: u64) -> Result<Self, KitError> {
        let dir = tempfile::Builder::new().prefix("ferry-svc-").tempdir()?;
        let key_file = dir.path().join("secret.key");
        std::fs::write(&key_file, SecretKey::generate_base64())?;
        Ok(Self {
            dir,
            etcd_endpoints: endpoints,
            key_file,
            lease_ttl_secs,
        })
    }

    /// Everything every service of this test logged so far.
    pub fn all_logs(&self) -> String {
        let mut all = String::new();
        if let Ok(entries) = std::fs::read_dir(self.dir.path()) {
            for entry in entries.flatten() {
                if entry.path().extension().is_some_and(|e| e == "log") {
                    all.push_str(&std::fs::read_to_string(entry.path()).unwrap_or_default());
                }
            }
        }
        all
    }

    /// The secret key file the services use.
    pub fn key_file(&self) -> &PathBuf {
        &self.key_file
    }

    /// A store on the same etcd.
    pub async fn store(&self) -> Result<Store, StoreError> {
        Store::connect(&EtcdConfig {
            endpoints: self.etcd_endpoints.clone(),
            prefix: "/ferry".into(),
            request_timeout: Duration::from_secs(5),
        })
        .await
    }

    fn spawn(&self, binary: &str, id: &str, extra: &[&str]) -> Result<Service, KitError> {
        let port = free_port()?;
        let addr = format!("127.0.0.1:{port}");
        let mut command = Command::new(bin_dir().join(binary));
        command
            .args(["--listen", &addr])
            .args(["--etcd-endpoints", &self.etcd_endpoints.join(",")])
            .args(["--lease-ttl", &self.lease_ttl_secs.to_string()])
            .args(["--log-level", "info,ferry_store=debug"])
            .args(extra);
        let log = self.dir.path().join(format!("{id}.log"));
        let process = ChildProcess::spawn(id, command, &log).map_err(|e| match e {
            KitError::Spawn {
                program, source, ..
            } => KitError::Spawn {
                program,
                hint: "build the service binaries first: cargo build --bins".into(),
                source,
            },
            other => other,
        })?;
        Ok(Service {
            id: id.to_owned(),
            addr,
            process,
        })
    }

    /// Starts a coordinator replica.
    pub fn coordinator(&self, id: &str) -> Result<Service, KitError> {
        let key = self.key_file.display().to_string();
        self.spawn(
            "ferry-coordinator",
            id,
            &[
                "--coordinator-id",
                id,
                "--secret-key-file",
                &key,
                "--reconcile-interval",
                "2",
            ],
        )
    }

    /// Starts a worker of `kind`.
    pub fn worker(&self, kind: WorkerKind, id: &str) -> Result<Service, KitError> {
        self.worker_with_capacity(kind, id, 4)
    }

    /// Starts a worker of `kind` taking `capacity` units of work at once.
    pub fn worker_with_capacity(
        &self,
        kind: WorkerKind,
        id: &str,
        capacity: u32,
    ) -> Result<Service, KitError> {
        let binary = match kind {
            WorkerKind::Cdc => "ferry-cdc-worker",
            _ => "ferry-snapshot-worker",
        };
        let key = self.key_file.display().to_string();
        let capacity = capacity.to_string();
        self.spawn(
            binary,
            id,
            &[
                "--worker-id",
                id,
                "--secret-key-file",
                &key,
                "--capacity",
                &capacity,
            ],
        )
    }
}

impl Service {
    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Peak resident memory of the process so far (VmHWM), in KiB.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        let pid = self.process.pid()?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }

    /// The process handle (kill -9, SIGTERM, log).
    pub fn process(&mut self) -> &mut ChildProcess {
        &mut self.process
    }

    /// The health status of `service` ("" for the server), if the server answers.
    pub async fn health(&self, service: &str) -> Option<ServingStatus> {
        let channel = tonic::transport::Endpoint::new(self.url())
            .ok()?
            .connect()
            .await
            .ok()?;
        let response = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .ok()?;
        Some(response.into_inner().status())
    }

    /// Waits until the server reports SERVING.
    pub async fn wait_serving(&self, within: Duration) -> Result<(), KitError> {
        wait::until(within, || async {
            (self.health("").await == Some(ServingStatus::Serving)).then_some(())
        })
        .await
        .ok_or_else(|| not_ready(self.id.clone(), within.as_secs(), self.process.log()))
    }

    /// A `PipeService` client connected to this service.
    pub async fn pipe_client(&self) -> Result<PipeServiceClient<Channel>, tonic::transport::Error> {
        PipeServiceClient::connect(self.url()).await
    }
}
