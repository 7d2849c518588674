//! Flags shared by the services. Every flag can also be set by environment variable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ferry_core::secret::{SecretError, SecretKey};
use ferry_store::EtcdConfig;

/// How to reach etcd and how long leases live.
#[derive(Debug, Clone, clap::Args)]
pub struct EtcdArgs {
    /// etcd endpoints, comma separated.
    #[arg(
        long = "etcd-endpoints",
        env = "FERRY_ETCD_ENDPOINTS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2379"
    )]
    pub endpoints: Vec<String>,
    /// Prefix of every key Ferry writes.
    #[arg(
        long = "etcd-prefix",
        env = "FERRY_ETCD_PREFIX",
        default_value = "/ferry"
    )]
    pub prefix: String,
    /// TTL of this process's lease, in seconds: after a crash, what it held is released after
    /// this long. Keepalives are sent every TTL/3.
    #[arg(long = "lease-ttl", env = "FERRY_LEASE_TTL", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(2..=300))]
    pub lease_ttl_secs: u64,
    /// Deadline of one etcd request, in seconds.
    #[arg(long = "etcd-timeout", env = "FERRY_ETCD_TIMEOUT", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(1..=60))]
    pub request_timeout_secs: u64,
}

impl EtcdArgs {
    /// The store configuration these flags describe.
    pub fn store_config(&self) -> EtcdConfig {
        EtcdConfig {
            endpoints: self.endpoints.clone(),
            prefix: self.prefix.clone(),
            request_timeout: Duration::from_secs(self.request_timeout_secs),
        }
    }

    /// The lease TTL.
    pub fn lease_ttl(&self) -> Duration {
        Duration::from_secs(self.lease_ttl_secs)
    }
}

/// Where the gRPC server listens and how others reach it.
#[derive(Debug, Clone, clap::Args)]
pub struct ListenArgs {
    /// Address the gRPC server binds.
    #[arg(long = "listen", env = "FERRY_LISTEN")]
    pub listen: SocketAddr,
    /// Address other processes use to reach this one (default: the listen address).
    #[arg(long = "advertise", env = "FERRY_ADVERTISE")]
    pub advertise: Option<String>,
}

impl ListenArgs {
    /// The address to publish in etcd.
    pub fn advertised(&self) -> String {
        self.advertise
            .clone()
            .unwrap_or_else(|| self.listen.to_string())
    }
}

/// The key that seals pipe secrets (never stored in etcd).
#[derive(Debug, Clone, clap::Args)]
pub struct SecretKeyArgs {
    /// File holding the secret key as base64 of 32 bytes (`openssl rand -base64 32`).
    #[arg(long = "secret-key-file", env = "FERRY_SECRET_KEY_FILE")]
    pub secret_key_file: PathBuf,
}

/// Why the secret key could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum SecretKeyError {
    /// The file could not be read.
    #[error("cannot read secret key file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file does not hold a valid key.
    #[error("secret key file {path} is invalid")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: SecretError,
    },
}

impl SecretKeyArgs {
    /// Reads and parses the key.
    pub fn load(&self) -> Result<SecretKey, SecretKeyError> {
        let path = &self.secret_key_file;
        let text = std::fs::read_to_string(path).map_err(|source| SecretKeyError::Read {
            path: path.clone(),
            source,
        })?;
        SecretKey::from_base64(&text).map_err(|source| SecretKeyError::Invalid {
            path: path.clone(),
            source,
        })
    }
}

/// `<hostname>-<pid>`: a default id for a process that was given none.
pub fn default_instance_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host = host.trim();
    format!(
        "{}-{}",
        if host.is_empty() { "ferry" } else { host },
        std::process::id()
    )
}
