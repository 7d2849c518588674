//! `ferry-bench snapshot`: Ferry's initial load against baselines measured in the same run on
//! the same table, and the snapshot worker's peak memory.
//!
//! (a) raw parallel `COPY … (FORMAT binary)` into nothing — what Postgres can hand out;
//! (b) Ferry's read path (COPY, decode, transcode to RowBinary) into a null sink;
//! (c) Ferry's snapshot through the real services into ClickHouse;
//! (d) a hand pipeline `psql -c "COPY … TO STDOUT" | curl … INSERT … FORMAT TSV` into the same
//!     ClickHouse.

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Parser;
use ferry_postgres::schema::describe_table;
use ferry_postgres::snapshot::begin_read;
use ferry_proto::v1::*;
use ferry_testkit::clickhouse::ClickHouse;
use ferry_testkit::etcd::Etcd;
use ferry_testkit::ferry::Ferry;
use ferry_testkit::postgres::Postgres;
use ferry_testkit::wait;
use tokio_stream::StreamExt as _;

mod cdc;
mod toast;

/// Ferry benchmarks.
#[derive(Debug, Parser)]
#[command(about)]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Debug, clap::Subcommand)]
enum Bench {
    /// The initial load against raw COPY and a psql | curl pipeline.
    Snapshot(Args),
    /// Change data capture against pg_recvlogical, and its latency.
    Cdc(cdc::CdcArgs),
}

/// Snapshot benchmark flags.
#[derive(Debug, clap::Args)]
struct Args {
    /// Rows in the generated table.
    #[arg(long, default_value_t = 5_000_000)]
    rows: u64,
    /// Parallel readers (raw COPY streams, Ferry partitions in flight).
    #[arg(long, default_value_t = 4)]
    parallel: u32,
}

const TABLE: &str = "
CREATE TABLE wide (
  id bigint PRIMARY KEY, account integer NOT NULL, kind smallint NOT NULL, amount numeric(12,2),
  price double precision, name text NOT NULL, note text, active boolean NOT NULL,
  created_at timestamp NOT NULL, day date, ref uuid NOT NULL
);
INSERT INTO wide SELECT i, (i % 100000)::int, (i % 7)::smallint, (i % 1000000) / 100.0,
  i * 0.25, 'customer-' || (i % 50000), CASE WHEN i % 3 = 0 THEN NULL ELSE md5(i::text) END,
  i % 2 = 0, '2024-01-01'::timestamp + i * interval '1 second', '2024-01-01'::date + (i % 365)::int,
  md5(i::text)::uuid
FROM generate_series(1::bigint, $ROWS) AS i;
";

/// One measured run.
struct Run {
    name: &'static str,
    rows: u64,
    seconds: f64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().bench {
        Bench::Snapshot(args) => snapshot(args).await,
        Bench::Cdc(args) => cdc::run(args).await,
    }
}

async fn snapshot(args: Args) -> anyhow::Result<()> {
    eprintln!("starting postgres, etcd, clickhouse (chdb) and ferry's services");
    let pg = Postgres::start_with(&[
        "shared_buffers=512MB",
        "max_wal_size=4GB",
        "checkpoint_timeout=30min",
    ])
    .await?;
    let ch = ClickHouse::start().await?;
    let etcd = Etcd::start().await?;
    let db = pg.client("postgres").await?;
    eprintln!("generating {} rows", args.rows);
    db.batch_execute(&TABLE.replace("$ROWS", &args.rows.to_string()))
        .await?;
    // Separately: VACUUM refuses to run inside the implicit transaction of a batch.
    db.batch_execute("VACUUM ANALYZE wide").await?;
    let size: i64 = db
        .query_one("SELECT pg_relation_size('wide')", &[])
        .await?
        .get(0);
    let pages: i64 = db
        .query_one(
            "SELECT relpages::int8 FROM pg_class WHERE relname = 'wide'",
            &[],
        )
        .await?
        .get(0);
    let schema = describe_table(&db, "public", "wide").await?;
    let ranges = split(u64::try_from(pages)?, args.parallel);

    eprintln!("(a) raw parallel COPY");
    let (raw_bytes, a) = timed(raw_copy(&pg, &ranges)).await?;
    eprintln!("(b) ferry read path into a null sink");
    let (null_rows, b) = timed(null_sink(&pg, &schema, &ranges)).await?;
    eprintln!("(c) ferry snapshot into clickhouse");
    let (ch_rows, peak_kib, c) = ferry_snapshot(&pg, &ch, &etcd, &args).await?;
    eprintln!("(d) psql | curl TSV pipeline into clickhouse");
    let (hand_rows, d) = timed(hand_pipeline(&pg, &ch, &schema)).await?;

    let runs = [
        Run {
            name: "(a) raw parallel COPY -> /dev/null",
            rows: args.rows,
            seconds: a,
        },
        Run {
            name: "(b) ferry snapshot -> null sink",
            rows: null_rows,
            seconds: b,
        },
        Run {
            name: "(c) ferry snapshot -> clickhouse",
            rows: ch_rows,
            seconds: c,
        },
        Run {
            name: "(d) psql COPY | HTTP TSV -> clickhouse",
            rows: hand_rows,
            seconds: d,
        },
    ];
    let mb = raw_bytes as f64 / 1e6;
    println!();
    println!(
        "table: {} rows, {:.0} MB on disk, {:.0} MB as binary COPY, {} parallel",
        args.rows,
        size as f64 / 1e6,
        mb,
        args.parallel
    );
    println!(
        "{:<42} {:>10} {:>9} {:>12} {:>8}",
        "run", "rows", "seconds", "rows/s", "MB/s"
    );
    for run in &runs {
        println!(
            "{:<42} {:>10} {:>9.2} {:>12.0} {:>8.1}",
            run.name,
            run.rows,
            run.seconds,
            run.rows as f64 / run.seconds,
            mb / run.seconds
        );
    }
    let rate = |r: &Run| r.rows as f64 / r.seconds;
    println!();
    println!(
        "ferry null sink / raw parallel COPY   {:.2}x  (target >= 0.8x)",
        rate(&runs[1]) / rate(&runs[0])
    );
    println!(
        "ferry clickhouse / hand pipeline      {:.2}x  (target >= 2x)",
        rate(&runs[2]) / rate(&runs[3])
    );
    println!(
        "snapshot worker peak RSS              {:.1} MB  (target <= 128 MB)",
        peak_kib as f64 / 1024.0
    );
    for run in &runs {
        if run.rows != args.rows {
            bail!(
                "{} moved {} rows, expected {}",
                run.name,
                run.rows,
                args.rows
            );
        }
    }
    Ok(())
}

async fn timed<T>(
    work: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<(T, f64)> {
    let started = Instant::now();
    let value = work.await?;
    Ok((value, started.elapsed().as_secs_f64()))
}

/// `parallel` block ranges covering `pages`, the last open-ended.
fn split(pages: u64, parallel: u32) -> Vec<SnapshotPartition> {
    let n = u64::from(parallel.max(1));
    let blocks = pages.div_ceil(n).max(1);
    (0..n)
        .map(|i| SnapshotPartition {
            source_table: "public.wide".into(),
            relation: "public.wide".into(),
            index: u32::try_from(i).unwrap_or(0),
            start_block: i * blocks,
            end_block: if i + 1 == n { 0 } else { (i + 1) * blocks },
            ..Default::default()
        })
        .collect()
}

async fn raw_copy(pg: &Postgres, ranges: &[SnapshotPartition]) -> anyhow::Result<u64> {
    let mut tasks = Vec::new();
    for range in ranges {
        let client = pg.client("postgres").await?;
        let query = ferry_postgres::snapshot::copy_query(range, &["*".to_owned()]);
        tasks.push(tokio::spawn(async move {
            let stream = client.copy_out(query.as_str()).await?;
            tokio::pin!(stream);
            let mut bytes = 0u64;
            while let Some(chunk) = stream.next().await {
                bytes += chunk?.len() as u64;
            }
            Ok::<_, tokio_postgres::Error>(bytes)
        }));
    }
    let mut total = 0;
    for task in tasks {
        total += task.await??;
    }
    Ok(total)
}

async fn null_sink(
    pg: &Postgres,
    schema: &TableSchema,
    ranges: &[SnapshotPartition],
) -> anyhow::Result<u64> {
    let mut tasks = Vec::new();
    for range in ranges {
        let client = pg.client("postgres").await?;
        let (schema, range) = (schema.clone(), range.clone());
        tasks.push(tokio::spawn(async move {
            begin_read(&client, None).await?;
            let rows = ferry_snapshot_worker::copy::read_partition(
                &client,
                &schema,
                &range,
                Default::default(),
                |_body| async { Ok(()) },
            )
            .await?
            .rows;
            Ok::<_, anyhow::Error>(rows)
        }));
    }
    let mut total = 0;
    for task in tasks {
        total += task.await??;
    }
    Ok(total)
}

async fn ferry_snapshot(
    pg: &Postgres,
    ch: &ClickHouse,
    etcd: &Etcd,
    args: &Args,
) -> anyhow::Result<(u64, u64, f64)> {
    let ferry = Ferry::new(etcd.endpoints(), 10)?;
    let coordinator = ferry.coordinator("bench-coordinator")?;
    let worker =
        ferry.worker_with_capacity(WorkerKind::Snapshot, "bench-snapshot", args.parallel)?;
    let _cdc = ferry.worker(WorkerKind::Cdc, "bench-cdc")?;
    coordinator.wait_serving(Duration::from_secs(30)).await?;
    worker.wait_serving(Duration::from_secs(30)).await?;
    let mut client = coordinator.pipe_client().await?;
    let mut spec = pipe_spec(pg, ch, "bench", &["wide"], PipeMode::SnapshotOnly);
    spec.settings = Some(PipeSettings {
        snapshot_rows_per_partition: Some(i64::try_from(
            args.rows.div_ceil(u64::from(args.parallel) * 4).max(1),
        )?),
        snapshot_parallel_partitions: Some(i64::from(args.parallel)),
        ..Default::default()
    });
    let started = Instant::now();
    client
        .create_pipe(CreatePipeRequest {
            spec: Some(spec),
            secrets: None,
        })
        .await?;
    let done = wait::until(Duration::from_secs(3600), || {
        let mut client = client.clone();
        async move {
            let pipe = client
                .get_pipe(GetPipeRequest {
                    name: "bench".into(),
                })
                .await
                .ok()?
                .into_inner()
                .pipe?;
            let status = pipe.status?;
            matches!(status.state(), PipeState::Completed | PipeState::Failed).then_some(status)
        }
    })
    .await
    .context("snapshot did not finish")?;
    let seconds = started.elapsed().as_secs_f64();
    if done.state() == PipeState::Failed {
        bail!("snapshot failed: {:?}", done.error);
    }
    let rows = done.tables.iter().map(|t| t.rows_copied).sum();
    let peak = worker.peak_rss_kib().unwrap_or(0);
    Ok((rows, peak, seconds))
}

async fn hand_pipeline(
    pg: &Postgres,
    ch: &ClickHouse,
    schema: &TableSchema,
) -> anyhow::Result<u64> {
    let columns: Vec<String> = schema
        .columns
        .iter()
        .map(|c| format!("`{}`", c.name))
        .collect();
    let sql = ferry_clickhouse::ddl::create_table("bench", "hand", schema, Default::default())?;
    let sink = clickhouse_client(ch);
    sink.query(&sql).execute().await?;
    let insert = format!("INSERT INTO bench.hand ({}) FORMAT TSV", columns.join(", "));
    let url = format!("{}/?query={}", ch.url(), percent(&insert));
    let pipeline = format!(
        "psql -h 127.0.0.1 -p {} -U postgres -d postgres -c 'COPY wide TO STDOUT' | curl -sS --fail-with-body -H 'Transfer-Encoding: chunked' --data-binary @- '{url}'",
        pg.port()
    );
    let status = tokio::process::Command::new("sh")
        .args(["-c", &pipeline])
        .stdout(Stdio::inherit())
        .status()
        .await?;
    if !status.success() {
        bail!("hand pipeline failed ({status})");
    }
    Ok(sink
        .query("SELECT count() FROM bench.hand")
        .fetch_one::<u64>()
        .await?)
}

fn clickhouse_client(ch: &ClickHouse) -> clickhouse::Client {
    clickhouse::Client::default().with_url(ch.url())
}

fn percent(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A pipe `name` of the benchmark's Postgres tables `tables` into the ClickHouse database of the
/// same name, streaming with a one-second sync interval.
pub(crate) fn pipe_spec(
    pg: &Postgres,
    ch: &ClickHouse,
    name: &str,
    tables: &[&str],
    mode: PipeMode,
) -> PipeSpec {
    ferry_testkit::spec::pipe(pg, ch, name, name, tables, mode)
}
