//! The process shell of a worker: flags, gRPC server with `ferry.v1.WorkerService`, and
//! membership in its pool. The snapshot and CDC workers add their work on top of this.

use std::net::SocketAddr;
use std::time::SystemTime;

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

use crate::config::{EtcdArgs, ListenArgs};
use crate::grpc::{self, ServeError};
use crate::membership::{self, Registered};
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
}

/// Runs a worker of `kind` until SIGTERM/SIGINT: serves gRPC at once (NOT_SERVING until
/// registered), keeps its registration live, and deregisters on the way out.
pub async fn run(kind: WorkerKind, args: WorkerArgs) -> Result<(), WorkerError> {
    let worker_id = args
        .worker_id
        .clone()
        .unwrap_or_else(crate::config::default_instance_id);
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
    let (registered_tx, registered) = watch::channel(None);
    let (health_tx, health_rx) = oneshot::channel();
    let routes = Routes::new(WorkerServiceServer::new(WorkerStatusService {
        registered: registered.clone(),
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
    // The server hands out its health handle before it starts serving.
    let membership = match health_rx.await {
        Ok(health) => {
            let store = Store::connect(&args.etcd.store_config()).await?;
            let ttl = args.etcd.lease_ttl();
            let shutdown = shutdown.clone();
            Some(tokio::spawn(async move {
                membership::run(store, registration, ttl, health, registered_tx, shutdown).await;
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
    registered: Registered,
}

#[tonic::async_trait]
impl WorkerService for WorkerStatusService {
    async fn get_worker_status(
        &self,
        _request: Request<GetWorkerStatusRequest>,
    ) -> Result<Response<GetWorkerStatusResponse>, Status> {
        let registration = self.registered.borrow().clone();
        Ok(Response::new(GetWorkerStatusResponse {
            registered: registration.is_some(),
            registration,
            // Claims arrive with the snapshot and CDC work (issues 3 and 4); none exist yet.
            claims: Vec::new(),
        }))
    }
}
