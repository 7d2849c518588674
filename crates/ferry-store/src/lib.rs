//! Ferry's durable control state in etcd (DESIGN.md §3).
//!
//! - [`keys`]: the key layout under a configurable prefix.
//! - [`session`]: a lease kept alive by its own task, which declares itself lost *before* the
//!   lease can expire so holders fence themselves.
//! - [`election`]: coordinator leader election; a [`Fence`] guards every leader write.
//! - [`pipes`]: pipe records, written by compare-and-swap on `mod_revision` under a fence.
//! - [`workers`]: worker registrations bound to leases.
//! - [`slot`]: the replication slot's health; [`deletion`]: the options of a delete.
//! - [`watch`]: prefix watches that resume from the last seen revision after a reconnect.

pub mod cdc;
pub mod deletion;
pub mod election;
mod error;
pub mod keys;
pub mod pipes;
pub mod reload;
pub mod session;
pub mod slot;
pub mod snapshot;
pub mod watch;
pub mod workers;

use std::time::Duration;

pub use election::{Fence, Leadership};
pub use error::StoreError;
pub use etcd_client;
pub use etcd_client::Client as EtcdClient;
pub use keys::Keys;
pub use pipes::PipeRecord;
pub use session::{Session, SessionState};

/// How to reach etcd.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    /// `host:port` or `http://host:port` of one or more members.
    pub endpoints: Vec<String>,
    /// Every key lives under this prefix (default `/ferry`).
    pub prefix: String,
    /// Deadline of a single request.
    pub request_timeout: Duration,
}

/// A connection to etcd plus the key layout: the handle every Ferry process uses.
#[derive(Clone)]
pub struct Store {
    /// For unary requests: every call carries the configured deadline.
    client: EtcdClient,
    /// For long-lived calls (campaign, watch, lease keepalive), which a per-request deadline
    /// would cancel mid-flight.
    streams: EtcdClient,
    keys: Keys,
}

impl Store {
    /// Prepares a connection to etcd. The channel connects lazily, so this only fails on
    /// malformed endpoints; an unreachable etcd shows up as retryable errors on use, which lets
    /// a service start, report NOT_SERVING, and recover when etcd comes back.
    pub async fn connect(config: &EtcdConfig) -> Result<Self, StoreError> {
        let streaming = etcd_client::ConnectOptions::new()
            .with_connect_timeout(config.request_timeout)
            .with_keep_alive(Duration::from_secs(5), config.request_timeout)
            .with_keep_alive_while_idle(true);
        let unary = streaming.clone().with_timeout(config.request_timeout);
        let client = EtcdClient::connect(&config.endpoints, Some(unary)).await?;
        let streams = EtcdClient::connect(&config.endpoints, Some(streaming)).await?;
        Ok(Self {
            client,
            streams,
            keys: Keys::new(&config.prefix),
        })
    }

    /// The key layout.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// Runs an etcd request, retrying a few times when it did not get through. With several
    /// members, the client balances requests over them; a dead member refuses connections
    /// until the balancer notices, and a retry lands on a live one. Requests that change
    /// state (`idempotent == false`) are retried only when they cannot have reached etcd
    /// (the connection was refused), so a write is never applied twice.
    pub(crate) async fn request<T, F, Fut>(
        &self,
        idempotent: bool,
        op: F,
    ) -> Result<T, etcd_client::Error>
    where
        F: Fn(EtcdClient) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        const ATTEMPTS: u32 = 4;
        let mut attempt = 1;
        loop {
            match op(self.client()).await {
                Err(error) if attempt < ATTEMPTS && not_delivered(&error, idempotent) => {
                    tracing::debug!(%error, attempt, "etcd request failed; retrying");
                    tokio::time::sleep(Duration::from_millis(50) * attempt).await;
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    /// Runs a transaction through [`Store::request`]: a guarded write (`idempotent == false`)
    /// is retried only when it cannot have reached etcd.
    pub(crate) async fn run_txn(
        &self,
        txn: etcd_client::Txn,
        idempotent: bool,
    ) -> Result<etcd_client::TxnResponse, etcd_client::Error> {
        self.request(idempotent, |mut c| {
            let txn = txn.clone();
            async move { c.txn(txn).await }
        })
        .await
    }

    /// A handle on the underlying client for unary requests (cheap: clones share one channel).
    pub fn client(&self) -> EtcdClient {
        self.client.clone()
    }

    /// A client without per-request deadline, for calls that block or stream.
    pub(crate) fn stream_client(&self) -> EtcdClient {
        self.streams.clone()
    }
}

/// Whether a failed request may be retried: it certainly did not reach etcd (the connection
/// was refused), or it is idempotent and failed for a transient reason.
fn not_delivered(error: &etcd_client::Error, idempotent: bool) -> bool {
    match error {
        etcd_client::Error::GRpcStatus(status) if status.code() == tonic::Code::Unavailable => {
            idempotent || connection_refused(status)
        }
        etcd_client::Error::TransportError(transport) => {
            idempotent || connection_refused(transport)
        }
        _ => false,
    }
}

fn connection_refused(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(e) = current {
        if e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused)
        {
            return true;
        }
        current = e.source();
    }
    false
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("prefix", &self.keys.prefix())
            .finish_non_exhaustive()
    }
}
