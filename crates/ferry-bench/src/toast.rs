//! The unchanged-TOAST phase of `ferry-bench cdc`: a bulk UPDATE that leaves a 10 kB jsonb
//! value unchanged. Without REPLICA IDENTITY FULL pgoutput leaves the value out and the CDC
//! worker fills it in from ClickHouse with keyed lookups; with FULL the old row carries it.
//! Both drain through the real services; the table reports rows/s of each.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use ferry_proto::v1::pipe_service_client::PipeServiceClient;
use ferry_proto::v1::{
    CreatePipeRequest, PausePipeRequest, PipeMode, PipeState, ResumePipeRequest,
};
use ferry_testkit::clickhouse::ClickHouse;
use ferry_testkit::ferry::{Ferry, Service};
use ferry_testkit::postgres::Postgres;
use ferry_testkit::wait;
use tonic::transport::Channel;

use crate::cdc::{current_lsn, pipe_state};

/// Seconds each bulk update took to reach ClickHouse.
pub(crate) struct ToastRun {
    rows: u64,
    looked_up: f64,
    full_identity: f64,
    /// The CDC worker's peak RSS after each run, in KiB.
    peaks: Vec<u64>,
}

impl ToastRun {
    pub(crate) fn print(&self) {
        println!();
        println!(
            "unchanged TOAST: UPDATE of {} rows leaving a 10 kB jsonb unchanged",
            self.rows
        );
        println!(
            "{:<44} {:>9} {:>12} {:>14}",
            "run", "seconds", "rows/s", "worker peak"
        );
        let runs = [
            (
                "(d) keyed lookups (no REPLICA IDENTITY FULL)",
                self.looked_up,
            ),
            (
                "(e) REPLICA IDENTITY FULL (old row sent)",
                self.full_identity,
            ),
        ];
        for ((name, seconds), peak) in runs.into_iter().zip(&self.peaks) {
            println!(
                "{name:<44} {seconds:>9.2} {:>12.0} {:>11.1} MB",
                self.rows as f64 / seconds,
                *peak as f64 / 1024.0
            );
        }
        println!(
            "lookups / REPLICA IDENTITY FULL        {:.2}x",
            self.full_identity / self.looked_up
        );
    }
}

/// Loads two tables of `rows` rows (one REPLICA IDENTITY FULL), snapshots them into ClickHouse
/// with a pipe, then times a bulk update of each from commit to checkpoint.
pub(crate) async fn run(
    pg: &Postgres,
    ch: &ClickHouse,
    ferry: &Ferry,
    client: &PipeServiceClient<Channel>,
    worker: &Service,
    rows: u64,
) -> anyhow::Result<ToastRun> {
    let db = pg.client("postgres").await?;
    for table in ["toast_keyed", "toast_full"] {
        db.batch_execute(&format!(
            "CREATE TABLE {table} (id bigint PRIMARY KEY, n int NOT NULL, doc jsonb NOT NULL);
             ALTER TABLE {table} ALTER doc SET STORAGE EXTERNAL;
             INSERT INTO {table} SELECT i, 0, jsonb_build_object('pad', repeat(md5(i::text), 312))
               FROM generate_series(1::bigint, {rows}) i;"
        ))
        .await?;
        // VACUUM cannot run in the implicit transaction of a multi-statement batch.
        db.batch_execute(&format!("VACUUM ANALYZE {table}")).await?;
    }
    db.batch_execute("ALTER TABLE toast_full REPLICA IDENTITY FULL")
        .await?;
    let mut client = client.clone();
    let spec = crate::pipe_spec(
        pg,
        ch,
        "toast",
        &["toast_keyed", "toast_full"],
        PipeMode::SnapshotAndCdc,
    );
    client
        .create_pipe(CreatePipeRequest {
            spec: Some(spec),
            secrets: None,
        })
        .await?;
    let within = Duration::from_secs(3600);
    pipe_state(&client, "toast", PipeState::Running, within).await?;
    let store = ferry.store().await?;
    let mut timings = Vec::new();
    let mut peaks = Vec::new();
    for table in ["toast_keyed", "toast_full"] {
        client
            .pause_pipe(PausePipeRequest {
                name: "toast".into(),
            })
            .await?;
        pipe_state(&client, "toast", PipeState::Paused, within).await?;
        db.batch_execute(&format!("UPDATE {table} SET n = n + 1"))
            .await?;
        let end = current_lsn(&db).await?;
        let started = Instant::now();
        client
            .resume_pipe(ResumePipeRequest {
                name: "toast".into(),
            })
            .await?;
        wait::until(within, || async {
            let checkpoint = store.checkpoint("toast").await.ok()??;
            (checkpoint.lsn >= end).then_some(())
        })
        .await
        .with_context(|| format!("the update of {table} never reached clickhouse"))?;
        timings.push(started.elapsed().as_secs_f64());
        peaks.push(worker.peak_rss_kib().unwrap_or(0));
    }
    Ok(ToastRun {
        rows,
        looked_up: timings[0],
        full_identity: timings[1],
        peaks,
    })
}
