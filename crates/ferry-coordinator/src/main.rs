//! `ferry-coordinator`: Ferry's public API and lifecycle driver. Run several for availability;
//! one leads (etcd election), the others serve reads and forward writes.

use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use ferry_coordinator::api::{ApiContext, PipeApi};
use ferry_coordinator::leadership::{self, Campaign, Deposed};
use ferry_coordinator::reconcile;
use ferry_proto::v1::CoordinatorLeader;
use ferry_proto::v1::pipe_service_server::PipeServiceServer;
use ferry_server::config::{EtcdArgs, ListenArgs, SecretKeyArgs};
use ferry_server::grpc;
use ferry_server::shutdown::{self, Shutdown};
use ferry_server::telemetry::{self, LogArgs};
use ferry_store::Store;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tonic::service::Routes;
use tracing::info;

/// Ferry coordinator.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    #[command(flatten)]
    etcd: EtcdArgs,
    #[command(flatten)]
    listen: ListenArgs,
    #[command(flatten)]
    secret: SecretKeyArgs,
    #[command(flatten)]
    log: LogArgs,
    /// Unique id of this replica (default: `<hostname>-<pid>`).
    #[arg(long = "coordinator-id", env = "FERRY_COORDINATOR_ID")]
    coordinator_id: Option<String>,
    /// Seconds between full reconcile passes, on top of the watch-triggered ones.
    #[arg(long = "reconcile-interval", env = "FERRY_RECONCILE_INTERVAL", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    reconcile_interval_secs: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    telemetry::init(&args.log);
    let secret_key = args.secret.load()?;
    let me = args
        .coordinator_id
        .clone()
        .unwrap_or_else(ferry_server::config::default_instance_id);
    let store = Store::connect(&args.etcd.store_config()).await?;
    let listener = TcpListener::bind(args.listen.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen.listen))?;
    info!(coordinator = %me, listen = %args.listen.listen, key_id = secret_key.id(), "coordinator starting");

    let (stop, shutdown) = Shutdown::new();
    let (fence_tx, fence) = watch::channel(None);
    let deposed = Deposed::default();
    let api = PipeApi::new(
        store.clone(),
        secret_key.clone(),
        ApiContext {
            me: me.clone(),
            fence: fence.clone(),
            deposed: deposed.clone(),
            shutdown: shutdown.clone(),
        },
    );
    let (health_tx, health_rx) = oneshot::channel();
    let server_shutdown = shutdown.clone();
    let mut server = tokio::spawn(grpc::serve(
        listener,
        Routes::new(PipeServiceServer::new(api)),
        "ferry.v1.PipeService",
        move |health| {
            let _ = health_tx.send(health);
        },
        async move { server_shutdown.requested().await },
    ));
    let health = health_rx.await.context("gRPC server failed to start")?;
    let identity = CoordinatorLeader {
        coordinator_id: me.clone(),
        address: args.listen.advertised(),
        elected_at: None,
    };
    let leading = tokio::spawn(leadership::run(Campaign {
        store: store.clone(),
        me: identity,
        ttl: args.etcd.lease_ttl(),
        fence: fence_tx,
        deposed: deposed.clone(),
        health,
        shutdown: shutdown.clone(),
    }));
    let reconciler = reconcile::Reconciler {
        store,
        key: secret_key,
        me: me.clone(),
        resync_interval: Duration::from_secs(args.reconcile_interval_secs),
    };
    let reconciling = tokio::spawn(reconcile::run(reconciler, fence, deposed, shutdown.clone()));

    // Run until a signal, or until the server dies (then leadership must not linger).
    let server_result = tokio::select! {
        _ = shutdown::signal() => None,
        result = &mut server => Some(result),
    };
    stop.send_replace(true);
    // Resign and revoke first, so a follower takes over while this process drains.
    let _ = leading.await;
    let _ = reconciling.await;
    match server_result {
        Some(result) => result??,
        None => server.await??,
    }
    info!(coordinator = %me, "coordinator stopped");
    Ok(())
}
