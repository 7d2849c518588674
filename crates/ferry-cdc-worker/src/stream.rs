//! One pipe's replication stream: pgoutput (text mode) decoded, transcoded into per-table
//! RowBinary batches, written to ClickHouse, then checkpointed, then acknowledged.
//!
//! Durability order (DESIGN.md §3, invariant 3): a batch is inserted into ClickHouse, then the
//! checkpoint (its last commit's end LSN) is written to etcd under this worker's claim, then
//! the slot is told that LSN is flushed. A batch closes at a commit, when the pull batch size
//! is reached or the sync interval has passed since its first change, so a checkpoint never
//! splits a transaction. Every row carries a commit-ordered `_ferry_version` (the
//! transaction's commit LSN, then the row's place in it; see `ferry_clickhouse::version`): a
//! replay from the checkpoint rewrites rows with the same versions, which ReplacingMergeTree
//! merges.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use ferry_clickhouse::sink::Sink;
use ferry_clickhouse::types::MappingOptions;
use ferry_core::naming::default_slot_and_publication;
use ferry_core::spec::{DEFAULT_PULL_BATCH_SIZE, DEFAULT_SYNC_INTERVAL_SECS, source_table_name};
use ferry_postgres::SourceError;
use ferry_postgres::connection::{self, SESSION_OPTIONS};
use ferry_postgres::pgoutput::{self, Message};
use ferry_postgres::snapshot::Visibility;
use ferry_proto::v1::{AlteredValues, Checkpoint, ReplicationStatus, SslMode, StreamHold};
use ferry_server::membership::Member;
use ferry_server::worker::WorkerContext;
use ferry_store::PipeRecord;
use ferry_store::cdc::CdcClaim;
use pgwire_replication::{Lsn, ReplicationClient, ReplicationConfig, ReplicationEvent, TlsConfig};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info};

pub use crate::error::StreamError;
use crate::error::source_objects_gone;
use crate::reload::{Reload, ReloadedTable};
use crate::table::{Announced, Position, TableBatch, TableContext};

/// Replication events read ahead of the worker (the crate's default is 8,192).
const EVENT_BUFFER: usize = 512;

/// Most bytes of rows buffered before they are written, even inside a transaction: bounds the
/// worker's memory whatever the transaction size or the batch settings.
const MAX_BUFFERED_BYTES: usize = 16 << 20;

/// Runs the stream of `record` until it fails, the claim is lost, or `stop` asks it to end:
/// then it finishes the open transaction, writes and checkpoints its batch, and returns.
pub async fn run(
    ctx: &WorkerContext,
    member: &Member,
    record: &PipeRecord,
    claim: &CdcClaim,
    mut stop: watch::Receiver<bool>,
) -> Result<(), StreamError> {
    let spec = &record.spec;
    let name = &spec.name;
    let source = spec.source.clone().unwrap_or_default();
    if source.ssl_mode() == SslMode::Require {
        return Err(StreamError::TlsUnsupported);
    }
    let sealed = ctx.store.get_pipe_secrets(name).await?.unwrap_or_default();
    let secrets = ctx
        .secret_key
        .open(name, &sealed)
        .map_err(StreamError::Secret)?;
    let sink = Sink::new(
        &spec.destination.clone().unwrap_or_default(),
        &secrets.destination_password,
    );
    let limits = ctx.store.destination_limits(name).await?;
    let options = MappingOptions::for_pipe(&spec.settings.unwrap_or_default(), limits.as_ref());
    let states: HashMap<String, _> = ctx.store.table_states(name).await?.into_iter().collect();
    let snapshots = copied_under(&ctx.store, name).await?;
    let reload = Reload::of(record);
    let mut tables: HashMap<u32, TableBatch> = HashMap::new();
    for mapping in &spec.tables {
        let table = source_table_name(mapping);
        let (destination, visibility, reload_from) = match reload.table(&table) {
            // Left alone while the coordinator prepares or swaps it: its changes until the
            // reload's boundary are in the copy, and the stream holds its checkpoint until
            // it knows the boundary.
            Some(ReloadedTable::Held) => continue,
            Some(ReloadedTable::Copying {
                start_lsn,
                visibility,
                shadow,
            }) => {
                let destination = if shadow {
                    ferry_clickhouse::resync::shadow_name(&mapping.destination_table)
                } else {
                    mapping.destination_table.clone()
                };
                (destination, visibility, Some(start_lsn))
            }
            None => (
                mapping.destination_table.clone(),
                snapshots.get(&table).cloned(),
                None,
            ),
        };
        if let Some(schema) = states.get(&table).and_then(|s| s.schema.clone()) {
            let mut batch = TableBatch::new(
                table.clone(),
                destination,
                schema,
                visibility,
                &sink,
                options,
            );
            batch.reload_from = reload_from;
            if reload_from.is_some() {
                batch.reload_copy = reload.copy();
            }
            // Counters continue where the last stream of this pipe left them.
            if let Some(previous) = record
                .replication
                .as_ref()
                .and_then(|r| r.tables.get(&table))
            {
                batch.changes = previous.clone();
            }
            if let Some(previous) = record
                .replication
                .as_ref()
                .and_then(|r| r.altered.get(&table))
            {
                batch.carry_altered(&previous.columns);
            }
            tables.insert(batch.relation_oid(), batch);
        }
    }
    let settings = spec.settings.unwrap_or_default();
    let batch_limit =
        u64::try_from(settings.pull_batch_size.unwrap_or(DEFAULT_PULL_BATCH_SIZE)).unwrap_or(1);
    let interval = settings.sync_interval.map_or(
        Duration::from_secs(DEFAULT_SYNC_INTERVAL_SECS.unsigned_abs()),
        |d| Duration::from_secs(d.seconds.unsigned_abs()),
    );

    let start = ctx.store.checkpoint(name).await?.map_or(0, |c| c.lsn);
    let slot_name = if source.slot_name.is_empty() {
        default_slot_and_publication(name)
    } else {
        source.slot_name.clone()
    };
    let publication = if source.publication.is_empty() {
        default_slot_and_publication(name)
    } else {
        source.publication.clone()
    };
    let config = ReplicationConfig::new(
        &source.host,
        &source.user,
        &secrets.source_password,
        &source.database,
        slot_name.clone(),
        publication.clone(),
    )
    .with_port(u16::try_from(source.port).unwrap_or(5432))
    .with_tls(TlsConfig::disabled())
    .with_binary(false)
    // Decoded events wait here while a batch is written: a count, not bytes, so keep it small
    // enough that wide rows (10 kB TOAST values, old and new under REPLICA IDENTITY FULL)
    // cannot pile up hundreds of MB; pipelining needs far fewer.
    .with_buffer_size(EVENT_BUFFER)
    .with_options(SESSION_OPTIONS)
    .with_start_lsn(Lsn::from_u64(start))
    .with_status_interval(interval.clamp(Duration::from_secs(1), Duration::from_secs(10)));
    let unusable = |error: pgwire_replication::PgWireError| {
        source_objects_gone(
            error,
            &slot_name,
            &publication,
            name,
            reload.key().is_some(),
        )
    };
    let mut client = ReplicationClient::connect(config).await.map_err(unusable)?;
    // A reload waits for the stream to hold: acknowledge it once streaming from `start`.
    let hold = reload.holding().then_some(start);
    if let Some((generation, phase)) = reload.key().filter(|_| hold.is_some()) {
        let ack = StreamHold {
            generation,
            phase: phase as i32,
            lsn: start,
            worker_id: ctx.worker_id.clone(),
        };
        if !ctx.store.put_stream_hold(claim, &ack).await? {
            return Err(StreamError::ClaimLost);
        }
        info!(pipe = %name, generation, lsn = %pgoutput::Lsn(start), "holding the checkpoint for a reload");
    }
    // A plain connection for heartbeats: on an idle database they give the stream a commit
    // to checkpoint, so the slot's confirmed position moves and WAL is not pinned.
    let heartbeats = connection::connect(&source, &secrets.source_password).await?;
    let mut heartbeat = tokio::time::interval(interval);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    heartbeat.tick().await;
    info!(pipe = %name, start = %pgoutput::Lsn(start), "streaming");

    let mut position = Position::default();
    let mut xid = 0u32;
    let mut pending = 0u64;
    let mut first_change: Option<Instant> = None;
    let mut in_transaction = false;
    let mut last_commit = start;
    let mut progress = Progress {
        lsn: start,
        commit_time_micros: 0,
        slot: slot_name.clone(),
        source: &heartbeats,
    };
    let mut stopping = false;
    loop {
        let table_ctx = TableContext {
            sink: &sink,
            source: &heartbeats,
            store: &ctx.store,
            claim,
            session: &member.session,
            options,
        };
        if stopping && !in_transaction {
            flush(
                ctx,
                &table_ctx,
                &mut tables,
                claim,
                &progress,
                &client,
                hold,
            )
            .await?;
            client.stop();
            info!(pipe = %name, lsn = %pgoutput::Lsn(last_commit), "stream stopped at a checkpoint");
            return Ok(());
        }
        let deadline = first_change.map(|t| t + interval);
        let event = tokio::select! {
            event = client.recv() => event.map_err(unusable)?,
            () = sleep_until(deadline), if deadline.is_some() && !in_transaction => {
                flush(ctx, &table_ctx, &mut tables, claim, &progress, &client, hold).await?;
                pending = 0;
                first_change = None;
                continue;
            }
            () = member.session.lost() => return Err(StreamError::ClaimLost),
            changed = stop.changed(), if !stopping => {
                stopping = changed.is_err() || *stop.borrow();
                continue;
            }
            _ = heartbeat.tick() => {
                heartbeats
                    .batch_execute("SELECT pg_logical_emit_message(true, 'ferry_heartbeat', '')")
                    .await
                    .map_err(|source| SourceError::Query { what: "heartbeat", source })?;
                continue;
            }
        };
        let Some(event) = event else {
            return Err(StreamError::Ended);
        };
        match event {
            ReplicationEvent::Begin {
                final_lsn,
                xid: begun,
                ..
            } => {
                in_transaction = true;
                position = Position::begin(final_lsn.as_u64());
                xid = begun;
            }
            ReplicationEvent::XLogData { data, .. } => {
                let changed = apply(&data, &mut position, xid, &mut tables, &table_ctx).await?;
                if changed {
                    pending += 1;
                    first_change.get_or_insert_with(Instant::now);
                }
                // A transaction too large to hold: write what is buffered without moving the
                // checkpoint. pgoutput sends only committed transactions, and a replay after a
                // crash rewrites these rows with the same versions, so partial writes are safe.
                if tables.values().map(|b| b.body.len()).sum::<usize>() >= MAX_BUFFERED_BYTES {
                    write_rows(&table_ctx, &mut tables).await?;
                }
            }
            ReplicationEvent::Commit {
                end_lsn,
                commit_time_micros,
                ..
            } => {
                in_transaction = false;
                last_commit = end_lsn.as_u64();
                progress.lsn = last_commit;
                progress.commit_time_micros = commit_time_micros;
                let due = first_change.is_some_and(|t| t.elapsed() >= interval);
                if pending >= batch_limit || (pending > 0 && due) {
                    flush(
                        ctx,
                        &table_ctx,
                        &mut tables,
                        claim,
                        &progress,
                        &client,
                        hold,
                    )
                    .await?;
                    pending = 0;
                    first_change = None;
                } else if pending == 0 {
                    // Transactions without rows of ours (heartbeats, other tables) still move
                    // the checkpoint, once per sync interval, so the slot does not pin WAL.
                    first_change.get_or_insert_with(Instant::now);
                }
            }
            _ => {}
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Applies one pgoutput message of transaction `xid`; returns whether it added a row.
async fn apply(
    data: &Bytes,
    position: &mut Position,
    xid: u32,
    tables: &mut HashMap<u32, TableBatch>,
    ctx: &TableContext<'_>,
) -> Result<bool, StreamError> {
    let message = pgoutput::decode(data)?;
    match message {
        Message::Relation {
            oid,
            namespace,
            name,
            columns,
            ..
        } => {
            let announced = Announced {
                namespace,
                name,
                columns: &columns,
            };
            match tables.get_mut(&oid) {
                // Before a reload's boundary the table's columns may be older than the ones
                // the reload recorded; its changes there are not written anyway. The latest
                // announcement is kept for its first change after the boundary: pgoutput
                // announces a relation once per session, not again there.
                Some(batch)
                    if batch
                        .reload_from
                        .is_some_and(|from| position.commit_lsn < from) =>
                {
                    batch.pending_relation = Some(data.clone());
                }
                Some(batch) => batch.relation(&announced, ctx).await?,
                None => {
                    // Tables are tracked by oid: another relation under the name of one of
                    // ours is that table dropped and created again, whose rows are not ours.
                    let named = format!("{namespace}.{name}");
                    if tables.values().any(|b| b.current_name() == named) {
                        return Err(StreamError::TableRecreated { table: named });
                    }
                }
            }
            Ok(false)
        }
        Message::Insert { relation, new } => match ours_at(tables, relation, xid, position) {
            Some(batch) => {
                announce_pending(batch, ctx).await?;
                batch.insert(&new, position, ctx).await.map(|()| true)
            }
            None => Ok(false),
        },
        Message::Update { relation, old, new } => match ours_at(tables, relation, xid, position) {
            Some(batch) => {
                announce_pending(batch, ctx).await?;
                batch.update(old, &new, position, ctx).await.map(|()| true)
            }
            None => Ok(false),
        },
        Message::Delete { relation, old } => match ours_at(tables, relation, xid, position) {
            Some(batch) => {
                announce_pending(batch, ctx).await?;
                batch.delete(old, position).map(|()| true)
            }
            None => Ok(false),
        },
        Message::Truncate {
            relations: truncated,
            ..
        } => {
            for oid in truncated {
                // Each truncated relation counts as a row message, written or not (see
                // `Position`): later rows keep their versions whichever tables this stream writes.
                if let Some(batch) = ours_at(tables, oid, xid, position) {
                    // Rows before the TRUNCATE go first; rows after it land after.
                    batch.truncate(xid, position, ctx).await?;
                    debug!(table = %batch.source_table(), "truncated");
                }
            }
            Ok(false)
        }
        _ => Ok(false),
    }
}

/// Applies a relation announcement kept from before a reload's boundary, at the table's first
/// change after it.
async fn announce_pending(
    batch: &mut TableBatch,
    ctx: &TableContext<'_>,
) -> Result<(), StreamError> {
    let Some(data) = batch.pending_relation.take() else {
        return Ok(());
    };
    if let Message::Relation {
        namespace,
        name,
        columns,
        ..
    } = pgoutput::decode(&data)?
    {
        let announced = Announced {
            namespace,
            name,
            columns: &columns,
        };
        batch.relation(&announced, ctx).await?;
    }
    Ok(())
}

/// A row message: counted in the transaction (see [`Position`]), then [`ours`].
fn ours_at<'t>(
    tables: &'t mut HashMap<u32, TableBatch>,
    oid: u32,
    xid: u32,
    position: &mut Position,
) -> Option<&'t mut TableBatch> {
    position.message();
    ours(tables, oid, xid, position)
}

/// The table of relation `oid` if the pipe replicates it and its copy does not already hold
/// the changes of transaction `xid` (at `position`).
fn ours<'t>(
    tables: &'t mut HashMap<u32, TableBatch>,
    oid: u32,
    xid: u32,
    position: &Position,
) -> Option<&'t mut TableBatch> {
    tables
        .get_mut(&oid)
        .filter(|batch| !batch.already_copied(xid, position.commit_lsn))
}

/// The snapshot each table was copied under (its partitions' visibility), for tables copied
/// under one snapshot.
async fn copied_under(
    store: &ferry_store::Store,
    pipe: &str,
) -> Result<HashMap<String, Visibility>, StreamError> {
    let mut seen: HashMap<String, Option<String>> = HashMap::new();
    for planned in store.snapshot_plan(pipe).await? {
        let partition = planned.partition;
        let visibility =
            Some(partition.snapshot_visibility.clone()).filter(|v| partition.done && !v.is_empty());
        seen.entry(partition.source_table)
            .and_modify(|v| {
                if *v != visibility {
                    *v = None;
                }
            })
            .or_insert(visibility);
    }
    Ok(seen
        .into_iter()
        .filter_map(|(table, v)| Some((table, Visibility::parse(&v?)?)))
        .collect())
}

/// Inserts every table's buffered rows into ClickHouse. Returns the rows written.
async fn write_rows(
    ctx: &TableContext<'_>,
    tables: &mut HashMap<u32, TableBatch>,
) -> Result<u64, StreamError> {
    let mut rows = 0;
    for batch in tables.values_mut() {
        rows += batch.write(ctx).await?;
    }
    Ok(rows)
}

/// Where the stream is: what the next checkpoint is and what to report about it.
struct Progress<'a> {
    /// End LSN of the last transaction received.
    lsn: u64,
    /// Its commit time, microseconds since 2000-01-01.
    commit_time_micros: i64,
    slot: String,
    source: &'a tokio_postgres::Client,
}

/// Microseconds between 1970-01-01 and 2000-01-01.
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// Writes every pending batch, then the checkpoint, then acknowledges the slot, then reports.
async fn flush(
    ctx: &WorkerContext,
    table_ctx: &TableContext<'_>,
    tables: &mut HashMap<u32, TableBatch>,
    claim: &CdcClaim,
    progress: &Progress<'_>,
    client: &ReplicationClient,
    hold: Option<u64>,
) -> Result<(), StreamError> {
    let rows = write_rows(table_ctx, tables).await?;
    let now = SystemTime::now();
    // Holding for a reload: rows are written, but the checkpoint stays where the reload was
    // told it is, so the stream restarts from there once the reload's boundary is known.
    if let Some(held) = hold {
        debug!(rows, held = %pgoutput::Lsn(held), "batch written; checkpoint held for a reload");
        return Ok(());
    }
    let lsn = progress.lsn;
    let checkpoint = Checkpoint {
        lsn,
        written_at: Some(now.into()),
        worker_id: ctx.worker_id.clone(),
    };
    if !ctx.store.put_checkpoint(claim, &checkpoint).await? {
        return Err(StreamError::ClaimLost);
    }
    client.update_applied_lsn(Lsn::from_u64(lsn));
    debug!(rows, lsn = %pgoutput::Lsn(lsn), "batch written and checkpointed");

    // The report is best effort: a failure here must not stop replication.
    let wal = progress
        .source
        .query_opt(
            "SELECT (pg_current_wal_lsn() - $1::text::pg_lsn)::int8, \
                    (pg_current_wal_lsn() - restart_lsn)::int8 \
             FROM pg_replication_slots WHERE slot_name = $2",
            &[&pgoutput::Lsn(lsn).to_string(), &progress.slot],
        )
        .await
        .ok()
        .flatten();
    let (lag_bytes, retained) =
        wal.map_or((0, 0), |row| (row.get::<_, i64>(0), row.get::<_, i64>(1)));
    let now_micros = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX));
    let lag_seconds = if progress.commit_time_micros == 0 {
        0.0
    } else {
        (now_micros - (progress.commit_time_micros + PG_EPOCH_MICROS)).max(0) as f64 / 1e6
    };
    let report = ReplicationStatus {
        checkpoint_lsn: lsn,
        last_batch_at: Some(now.into()),
        last_batch_rows: rows,
        lag_bytes: u64::try_from(lag_bytes).unwrap_or(0),
        lag_seconds,
        slot_retained_bytes: u64::try_from(retained).unwrap_or(0),
        worker_id: ctx.worker_id.clone(),
        tables: tables
            .values()
            .map(|b| {
                let mut changes = b.changes.clone();
                changes.renamed_to = b.renamed_to.clone().unwrap_or_default();
                (b.source_table().to_owned(), changes)
            })
            .collect(),
        altered: tables
            .values()
            .map(|b| {
                let columns = b.altered();
                (b.source_table().to_owned(), AlteredValues { columns })
            })
            .collect(),
        // A batch written: whatever was being retried is over.
        retrying: None,
    };
    if let Err(error) = ctx.store.put_replication_status(claim, &report).await {
        debug!(%error, "cannot publish replication progress");
    }
    Ok(())
}
