//! The process shell of a worker: flags, gRPC server with `ferry.v1.WorkerService`, membership
//! in its pool, and the worker's own work loop (snapshot or CDC) run beside them.

use std::collections::BTreeSet;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use ferry_core::secret::SecretKey;
use ferry_proto::v1::worker_service_server::{WorkerService, WorkerServiceServer};
use ferry_proto::v1::{
    GetWorkerStatusRequest, GetWorkerStatusResponse, WorkerKind, WorkerRegistration,
};
use ferry_store::Store;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tonic::service::Routes;
use tonic::{Request, Response, Status};
use tracing::info;

use crate::config::{EtcdArgs, ListenArgs, SecretKeyArgs, SecretKeyError};
use crate::grpc::{self, ServeError};
use crate::membership::{self, Membership};
use crate::shutdown::{self, Shutdown};

/// Flags of a worker process.
#[derive(Debug, Clone, clap::Args)]
pub struct WorkerArgs {
    /// etcd connection.
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// gRPC listener.
    #[command(flatten)]
    pub listen: ListenArgs,
    /// The key pipe secrets are sealed with (the coordinators' key).
    #[command(flatten)]
    pub secret: SecretKeyArgs,
    /// Unique id of this worker (default: `<hostname>-<pid>`).
    #[arg(long = "worker-id", env = "FERRY_WORKER_ID")]
    pub worker_id: Option<String>,
    /// Units of work (pipes for CDC, partitions for snapshot) taken at once.
    #[arg(long = "capacity", env = "FERRY_WORKER_CAPACITY", default_value_t = 4,
          value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub capacity: u32,
}

/// Why a worker stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The gRPC server failed.
    #[error(transparent)]
    Serve(#[from] ServeError),
    /// The etcd endpoints are malformed.
    #[error("invalid etcd configuration")]
    Store(#[from] ferry_store::StoreError),
    /// The secret key could not be loaded.
    #[error(transparent)]
    SecretKey(#[from] SecretKeyError),
}

/// The claims a worker holds right now, shown by `GetWorkerStatus`.
#[derive(Debug, Clone, Default)]
pub struct Claims(Arc<Mutex<BTreeSet<String>>>);

impl Claims {
    /// Records a claim (an owner key).
    pub fn add(&self, claim: &str) {
        self.lock().insert(claim.to_owned());
    }

    /// Forgets a claim.
    pub fn remove(&self, claim: &str) {
        self.lock().remove(claim);
    }

    /// How many claims are held.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no claim is held.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    fn list(&self) -> Vec<String> {
        self.lock().iter().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeSet<String>> {
        // A panic while holding this lock cannot leave the set inconsistent.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// What a worker's work loop gets.
#[derive(Debug, Clone)]
pub struct WorkerContext {
    /// etcd.
    pub store: Store,
    /// This worker's id.
    pub worker_id: String,
    /// Units of work it takes at once.
    pub capacity: u32,
    /// The current membership; work must stop when it is `None` (self-fencing).
    pub membership: Membership,
    /// Opens pipe secrets.
    pub secret_key: SecretKey,
    /// The claims held, for status.
    pub claims: Claims,
    /// Ends the loop.
    pub shutdown: Shutdown,
}

/// Runs a worker of `kind` until SIGTERM/SIGINT: serves gRPC at once (NOT_SERVING until
/// registered), keeps its registration live, runs `work`, and deregisters on the way out.
pub async fn run<W, F>(kind: WorkerKind, args: WorkerArgs, work: W) -> Result<(), WorkerError>
where
    W: FnOnce(WorkerContext) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let worker_id = args
        .worker_id
        .clone()
        .unwrap_or_else(crate::config::default_instance_id);
    let secret_key = args.secret.load()?;
    let store = Store::connect(&args.etcd.store_config()).await?;
    let listener = TcpListener::bind(args.listen.listen)
        .await
        .map_err(|source| WorkerError::Bind {
            addr: args.listen.listen,
            source,
        })?;
    let registration = WorkerRegistration {
        worker_id: worker_id.clone(),
        kind: kind.into(),
        address: args.listen.advertised(),
        capacity: args.capacity,
        version: env!("CARGO_PKG_VERSION").into(),
        started_at: Some(SystemTime::now().into()),
        lease_id: 0,
    };
    info!(worker = %worker_id, ?kind, listen = %args.listen.listen, "worker starting");

    let (stop, shutdown) = Shutdown::new();
    let (members_tx, members) = watch::channel(None);
    let claims = Claims::default();
    let (health_tx, health_rx) = oneshot::channel();
    let routes = Routes::new(WorkerServiceServer::new(WorkerStatusService {
        membership: members.clone(),
        claims: claims.clone(),
    }));
    let server_shutdown = shutdown.clone();
    let mut server = tokio::spawn(grpc::serve(
        listener,
        routes,
        "ferry.v1.WorkerService",
        move |health| {
            let _ = health_tx.send(health);
        },
        async move { server_shutdown.requested().await },
    ));
    let context = WorkerContext {
        store: store.clone(),
        worker_id: worker_id.clone(),
        capacity: args.capacity,
        membership: members,
        secret_key,
        claims,
        shutdown: shutdown.clone(),
    };
    let working = tokio::spawn(work(context));
    // The server hands out its health handle before it starts serving.
    let membership = match health_rx.await {
        Ok(health) => {
            let ttl = args.etcd.lease_ttl();
            let shutdown = shutdown.clone();
            Some(tokio::spawn(async move {
                membership::run(store, registration, ttl, health, members_tx, shutdown).await;
            }))
        }
        Err(_) => None,
    };
    // Run until a signal, or until the server dies (a worker must not stay registered then).
    let server_result = tokio::select! {
        _ = shutdown::signal() => None,
        result = &mut server => Some(result),
    };
    stop.send_replace(true);
    let _ = working.await;
    if let Some(membership) = membership {
        let _ = membership.await;
    }
    let server_result = match server_result {
        Some(result) => result,
        None => server.await,
    };
    match server_result {
        Ok(result) => result?,
        Err(join) => info!(%join, "server task ended abnormally"),
    }
    info!(worker = %worker_id, "worker stopped");
    Ok(())
}

/// `ferry.v1.WorkerService`: what this worker is and holds.
#[derive(Debug)]
struct WorkerStatusService {
    membership: Membership,
    claims: Claims,
}

#[tonic::async_trait]
impl WorkerService for WorkerStatusService {
    async fn get_worker_status(
        &self,
        _request: Request<GetWorkerStatusRequest>,
    ) -> Result<Response<GetWorkerStatusResponse>, Status> {
        let registration = self
            .membership
            .borrow()
            .as_ref()
            .map(|m| m.registration.clone());
        Ok(Response::new(GetWorkerStatusResponse {
            registered: registration.is_some(),
            registration,
            claims: self.claims.list(),
        }))
    }
}
