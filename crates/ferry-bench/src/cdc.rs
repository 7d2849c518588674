//! `ferry-bench cdc`: draining one recorded workload of changes, three ways, from the same WAL:
//! (a) `pg_recvlogical` to /dev/null (pgoutput, the baseline), (b) Ferry's decoder and
//! transcoder into a null sink, (c) Ferry's CDC worker through the real services into
//! ClickHouse; then end-to-end latency (source commit → row in ClickHouse) at a steady rate,
//! and the CDC worker's peak memory.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use ferry_clickhouse::transcode::RowTranscoder;
use ferry_clickhouse::types::MappingOptions;
use ferry_postgres::connection::SESSION_OPTIONS;
use ferry_postgres::pgoutput::{self, Message};
use ferry_postgres::schema::describe_table;
use ferry_proto::v1::*;
use ferry_testkit::clickhouse::ClickHouse;
use ferry_testkit::etcd::Etcd;
use ferry_testkit::ferry::Ferry;
use ferry_testkit::postgres::Postgres;
use ferry_testkit::wait;
use pgwire_replication::{ReplicationClient, ReplicationConfig, ReplicationEvent, TlsConfig};

/// CDC benchmark flags.
#[derive(Debug, clap::Args)]
pub struct CdcArgs {
    /// Rows updated (the table has this many rows to start with).
    #[arg(long, default_value_t = 1_000_000)]
    updates: u64,
    /// Rows inserted.
    #[arg(long, default_value_t = 200_000)]
    inserts: u64,
    /// Rows deleted.
    #[arg(long, default_value_t = 200_000)]
    deletes: u64,
    /// Rows per transaction.
    #[arg(long, default_value_t = 10_000)]
    transaction: u64,
    /// Changes per second in the latency phase.
    #[arg(long, default_value_t = 10_000)]
    rate: u64,
    /// Seconds of the latency phase.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Rows of the unchanged-TOAST phase: a bulk UPDATE that leaves a 10 kB jsonb value
    /// unchanged, without and with REPLICA IDENTITY FULL (0 skips it).
    #[arg(long, default_value_t = 100_000)]
    toast_rows: u64,
}

pub(crate) fn lsn_text(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff)
}

pub(crate) async fn current_lsn(db: &tokio_postgres::Client) -> anyhow::Result<u64> {
    let text: String = db
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get(0);
    let (hi, lo) = text.split_once('/').context("bad lsn")?;
    Ok((u64::from_str_radix(hi, 16)? << 32) | u64::from_str_radix(lo, 16)?)
}

pub async fn run(args: CdcArgs) -> anyhow::Result<()> {
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
    let rows = args.updates.max(args.deletes);
    eprintln!("creating a table of {rows} rows");
    db.batch_execute(&format!(
        "CREATE TABLE changes (id bigint PRIMARY KEY, account integer NOT NULL, amount numeric(12,2), \
                               note text, updated_at timestamptz NOT NULL DEFAULT clock_timestamp());
         INSERT INTO changes SELECT i, (i % 1000)::int, i / 100.0, 'row ' || i, now() FROM generate_series(1::bigint, {rows}) i;
         CREATE PUBLICATION bench FOR TABLE changes;"
    ))
    .await?;
    db.batch_execute("VACUUM ANALYZE changes").await?;
    for slot in ["recv", "ferry_null"] {
        db.execute(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&slot],
        )
        .await?;
    }

    // The services: a CDC-only pipe, paused, so its slot holds the workload for (c).
    let ferry = Ferry::new(etcd.endpoints(), 10)?;
    let coordinator = ferry.coordinator("bench-coordinator")?;
    let cdc_worker = ferry.worker(WorkerKind::Cdc, "bench-cdc")?;
    let _snapshot = ferry.worker(WorkerKind::Snapshot, "bench-snapshot")?;
    coordinator.wait_serving(Duration::from_secs(30)).await?;
    cdc_worker.wait_serving(Duration::from_secs(30)).await?;
    let mut client = coordinator.pipe_client().await?;
    let mut spec = crate::pipe_spec(&pg, &ch, "bench", &["changes"], PipeMode::CdcOnly);
    if let Some(source) = spec.source.as_mut() {
        source.publication = "bench".into();
    }
    client
        .create_pipe(CreatePipeRequest {
            spec: Some(spec),
            secrets: None,
        })
        .await?;
    state(&client, PipeState::Running, Duration::from_secs(60)).await?;
    client
        .pause_pipe(PausePipeRequest {
            name: "bench".into(),
        })
        .await?;
    state(&client, PipeState::Paused, Duration::from_secs(60)).await?;

    let changes = args.updates + args.inserts + args.deletes;
    eprintln!(
        "recording the workload: {changes} changes in {}-row transactions",
        args.transaction
    );
    let step = args.transaction.max(1);
    let mut from = 1;
    while from <= args.updates {
        db.batch_execute(&format!("UPDATE changes SET amount = amount + 1, updated_at = clock_timestamp() WHERE id BETWEEN {from} AND {}", from + step - 1)).await?;
        from += step;
    }
    let mut next = rows + 1;
    while next <= rows + args.inserts {
        db.batch_execute(&format!("INSERT INTO changes SELECT i, 1, 1, 'new', clock_timestamp() FROM generate_series({next}::bigint, {}) i", next + step - 1)).await?;
        next += step;
    }
    let mut from = 1;
    while from <= args.deletes {
        db.batch_execute(&format!(
            "DELETE FROM changes WHERE id BETWEEN {from} AND {}",
            from + step - 1
        ))
        .await?;
        from += step;
    }
    db.batch_execute("CHECKPOINT").await?;
    let end = current_lsn(&db).await?;

    eprintln!("(a) pg_recvlogical");
    let started = Instant::now();
    let status = tokio::process::Command::new("/usr/lib/postgresql/15/bin/pg_recvlogical")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &pg.port().to_string(),
            "-U",
            "postgres",
            "-d",
            "postgres",
        ])
        .args([
            "--slot",
            "recv",
            "--start",
            "--endpos",
            &lsn_text(end),
            "-f",
            "/dev/null",
        ])
        .args(["-o", "proto_version=1", "-o", "publication_names=bench"])
        .status()
        .await?;
    if !status.success() {
        bail!("pg_recvlogical failed: {status}");
    }
    let recv = started.elapsed().as_secs_f64();

    eprintln!("(b) ferry decoder and transcoder into a null sink");
    let schema = describe_table(&db, "public", "changes").await?;
    let started = Instant::now();
    let decoded = null_sink(&pg, &schema, end).await?;
    let null = started.elapsed().as_secs_f64();

    eprintln!("(c) ferry cdc into clickhouse");
    let store = ferry.store().await?;
    let started = Instant::now();
    client
        .resume_pipe(ResumePipeRequest {
            name: "bench".into(),
        })
        .await?;
    let caught_up = wait::until(Duration::from_secs(3600), || async {
        let checkpoint = store.checkpoint("bench").await.ok()??;
        (checkpoint.lsn >= end).then_some(())
    })
    .await;
    caught_up.context("ferry never caught up")?;
    let into_ch = started.elapsed().as_secs_f64();

    eprintln!("latency at {} changes/s for {} s", args.rate, args.seconds);
    let (p50, p99) = latency(&pg, &ch, &args).await?;
    let peak_kib = cdc_worker.peak_rss_kib().unwrap_or(0);
    let toast = if args.toast_rows > 0 {
        eprintln!(
            "unchanged TOAST: bulk updates of {} rows with 10 kB jsonb values",
            args.toast_rows
        );
        Some(crate::toast::run(&pg, &ch, &ferry, &client, &cdc_worker, args.toast_rows).await?)
    } else {
        None
    };

    println!();
    println!(
        "workload: {changes} changes ({} updates, {} inserts, {} deletes) in {}-row transactions",
        args.updates, args.inserts, args.deletes, args.transaction
    );
    println!("{:<44} {:>9} {:>12}", "run", "seconds", "changes/s");
    for (name, seconds) in [
        ("(a) pg_recvlogical -> /dev/null", recv),
        ("(b) ferry decode + transcode -> null sink", null),
        ("(c) ferry cdc -> clickhouse (services)", into_ch),
    ] {
        println!(
            "{name:<44} {seconds:>9.2} {:>12.0}",
            changes as f64 / seconds
        );
    }
    println!();
    println!(
        "ferry null sink / pg_recvlogical      {:.2}x  (target >= 1.2x)",
        recv / null
    );
    println!(
        "ferry into clickhouse                 {:.0} changes/s  (target >= 60000)",
        changes as f64 / into_ch
    );
    println!(
        "latency at {} changes/s, sync 1 s    p50 {p50:.0} ms, p99 {p99:.0} ms  (target p99 <= 2000 ms)",
        args.rate
    );
    println!(
        "cdc worker peak RSS                   {:.1} MB  (target <= 128 MB)",
        peak_kib as f64 / 1024.0
    );
    if let Some(toast) = toast {
        toast.print();
    }
    if decoded < changes {
        bail!("the null sink decoded {decoded} changes, expected {changes}");
    }
    Ok(())
}

pub(crate) async fn state(
    client: &ferry_proto::v1::pipe_service_client::PipeServiceClient<tonic::transport::Channel>,
    want: PipeState,
    within: Duration,
) -> anyhow::Result<()> {
    pipe_state(client, "bench", want, within).await
}

/// Waits until pipe `name` is in state `want`.
pub(crate) async fn pipe_state(
    client: &ferry_proto::v1::pipe_service_client::PipeServiceClient<tonic::transport::Channel>,
    name: &str,
    want: PipeState,
    within: Duration,
) -> anyhow::Result<()> {
    let reached = wait::until(within, || {
        let mut client = client.clone();
        async move {
            let pipe = client
                .get_pipe(GetPipeRequest { name: name.into() })
                .await
                .ok()?
                .into_inner()
                .pipe?;
            (pipe.status?.state() == want).then_some(())
        }
    })
    .await;
    reached.with_context(|| format!("pipe never reached {want:?}"))
}

/// Streams the `ferry_null` slot to `end`, decoding pgoutput and transcoding every change
/// into RowBinary that is then dropped. Returns the changes seen.
async fn null_sink(pg: &Postgres, schema: &TableSchema, end: u64) -> anyhow::Result<u64> {
    let config = ReplicationConfig::new(
        "127.0.0.1",
        "postgres",
        "",
        "postgres",
        "ferry_null",
        "bench",
    )
    .with_port(pg.port())
    .with_tls(TlsConfig::disabled())
    .with_options(SESSION_OPTIONS);
    let mut client = ReplicationClient::connect(config).await?;
    let mut transcoder = RowTranscoder::new(&schema.columns, MappingOptions::default());
    let mut body = Vec::with_capacity(16 << 20);
    let mut changes = 0u64;
    loop {
        let Some(event) = client.recv().await? else {
            bail!("stream ended")
        };
        match event {
            ReplicationEvent::XLogData {
                wal_start, data, ..
            } => {
                let version = u128::from(wal_start.as_u64());
                match pgoutput::decode(&data)? {
                    Message::Insert { new, .. } | Message::Update { new, .. } => {
                        transcoder.write_text_row(
                            new.values().map(text),
                            version,
                            false,
                            &mut body,
                        )?;
                        changes += 1;
                    }
                    Message::Delete {
                        old: pgoutput::OldTuple::Key(t) | pgoutput::OldTuple::Full(t),
                        ..
                    } => {
                        transcoder.write_text_delete(t.values().map(text), version, &mut body)?;
                        changes += 1;
                    }
                    _ => {}
                }
                if body.len() > 8 << 20 {
                    body.clear();
                }
            }
            ReplicationEvent::Commit { end_lsn, .. } => {
                client.update_applied_lsn(end_lsn);
                if end_lsn.as_u64() >= end {
                    break;
                }
            }
            // Caught up past the end with nothing more to send (what pg_recvlogical's --endpos
            // also relies on: the WAL after the workload holds no change of ours).
            ReplicationEvent::KeepAlive { wal_end, .. } if wal_end.as_u64() >= end => break,
            _ => {}
        }
    }
    client.stop();
    Ok(changes)
}

fn text(value: pgoutput::Value<'_>) -> Option<&[u8]> {
    match value {
        pgoutput::Value::Text(bytes) | pgoutput::Value::Binary(bytes) => Some(bytes),
        _ => None,
    }
}

/// Inserts at `rate` rows/s for `seconds`, then measures commit → ClickHouse latency per row
/// (`_ferry_synced_at` − the row's `updated_at`, set by `clock_timestamp()` at insert).
async fn latency(pg: &Postgres, ch: &ClickHouse, args: &CdcArgs) -> anyhow::Result<(f64, f64)> {
    let writer = pg.client("postgres").await?;
    let per_tick = (args.rate / 10).max(1);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let first = 10_000_000_000u64;
    let ticks = args.seconds * 10;
    for i in 0..ticks {
        tick.tick().await;
        let from = first + i * per_tick;
        writer
            .batch_execute(&format!(
                "INSERT INTO changes SELECT i, 2, 2, 'latency', clock_timestamp() FROM generate_series({from}::bigint, {}) i",
                from + per_tick - 1
            ))
            .await?;
    }
    let expected = ticks * per_tick;
    let clickhouse = clickhouse::Client::default().with_url(ch.url());
    let all = wait::until(Duration::from_secs(120), || async {
        let n: u64 = clickhouse
            .query("SELECT count() FROM bench.changes WHERE id >= ?")
            .bind(first)
            .fetch_one()
            .await
            .ok()?;
        (n >= expected).then_some(())
    })
    .await;
    all.context("latency rows never all arrived")?;
    let (p50, p99): (f64, f64) = clickhouse
        .query(
            "SELECT quantile(0.5)(ms), quantile(0.99)(ms) FROM (SELECT \
             dateDiff('millisecond', updated_at, _ferry_synced_at) AS ms FROM bench.changes WHERE id >= ?)",
        )
        .bind(first)
        .fetch_one()
        .await?;
    Ok((p50, p99))
}
