//! `ferry-cdc-worker`: Owns replication streams: decodes pgoutput, writes ClickHouse, checkpoints.
//!
//! Joins the cdc worker pool in etcd (a registration bound to its lease) and serves
//! `ferry.v1.WorkerService`, health and reflection.

use clap::Parser;
use ferry_proto::v1::WorkerKind;
use ferry_server::telemetry::{self, LogArgs};
use ferry_server::worker::{self, WorkerArgs};

/// Ferry cdc worker.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    #[command(flatten)]
    worker: WorkerArgs,
    #[command(flatten)]
    log: LogArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    telemetry::init(&args.log);
    worker::run(WorkerKind::Cdc, args.worker, ferry_cdc_worker::run).await?;
    Ok(())
}
