//! Reloads of a live pipe's tables: resync (whole pipe or some tables, into shadow tables
//! swapped in at the end), tables added (set up and copied while the others keep streaming)
//! and tables removed. The reload lives in the pipe's status (`PipeStatus.reload`) and moves
//! through three phases; docs/reload.md explains why the copy and the stream line up exactly.
//!
//! - Holding: the stream holds its checkpoint and leaves the reloaded tables alone; the
//!   coordinator prepares them (schema, shadow or new tables, publication, slot), takes the
//!   stream boundary and the copy's snapshot ([`prepare`]).
//! - Copying: snapshot workers copy under that snapshot; the stream writes the tables'
//!   changes committed from the boundary on over the copy. The coordinator holds the snapshot
//!   and follows progress here.
//! - Swapping: the stream holds again while each shadow is exchanged with its live table
//!   ([`finish`]).
//!
//! Every step is level-triggered from the status: a coordinator that takes over picks the
//! reload up where it is, and a lost copy snapshot starts the reload over (a new generation).

mod finish;
mod prepare;

use std::time::{Duration, SystemTime};

use ferry_core::PipeMode;
use ferry_core::lifecycle::{self, PipeEvent};
use ferry_core::spec::source_table_name;
use ferry_proto::v1::{PipeError, PipeSpec, PipeStatus, ReloadKind, ReloadPhase, TableReload};
use ferry_store::{PipeRecord, StoreError};
use tracing::{info, warn};

use crate::reconcile::{Job, Tasks, retrying};
use crate::setup::{SetupContext, table_progress};

/// Failed attempts at one partition before the pipe fails (a transient error gets retries).
const MAX_PARTITION_ATTEMPTS: u32 = 3;
/// How often a step waiting on the stream or on etcd looks again.
const POLL: Duration = Duration::from_millis(300);

/// A new reload of `tables` (schema.table) of kind `kind`, as the API starts it.
pub(crate) fn new_reload(
    previous: Option<&TableReload>,
    kind: ReloadKind,
    tables: Vec<String>,
    whole_pipe: bool,
    drop_destination_tables: bool,
) -> TableReload {
    let now = SystemTime::now();
    // Unique across the pipe's reloads (shadow tables are marked with it), growing.
    let millis = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let generation = millis.max(previous.map_or(0, |r| r.generation + 1));
    let mut reload = TableReload {
        generation,
        tables,
        whole_pipe,
        drop_destination_tables,
        started_at: Some(now.into()),
        ..Default::default()
    };
    reload.set_kind(kind);
    reload.set_phase(ReloadPhase::Holding);
    reload
}

/// Whether the pipe's changes are streamed (so the stream takes part in the reload).
pub(crate) fn streams(spec: &PipeSpec) -> bool {
    spec.mode() != PipeMode::SnapshotOnly
}

/// One reconcile step of a pipe with a reload in progress.
pub(crate) async fn advance(
    ctx: &SetupContext,
    record: &PipeRecord,
    reload: &TableReload,
    tasks: &mut Tasks,
) -> Result<(), StoreError> {
    let name = &record.spec.name;
    let generation = i64::try_from(reload.generation).unwrap_or(i64::MAX);
    match reload.phase() {
        ReloadPhase::Holding | ReloadPhase::Unspecified => {
            tasks.stop(name, Job::Swap);
            let (ctx, record) = (ctx.clone(), record.clone());
            tasks.ensure(name, Job::Reload, generation, async move {
                retrying("reload", || prepare::run(ctx.clone(), record.clone())).await;
            });
            Ok(())
        }
        ReloadPhase::Copying => copying(ctx, record, reload, tasks, generation).await,
        ReloadPhase::Swapping => {
            tasks.stop(name, Job::Reload);
            let (ctx, record) = (ctx.clone(), record.clone());
            tasks.ensure(name, Job::Swap, generation, async move {
                retrying("swap", || finish::swap(ctx.clone(), record.clone())).await;
            });
            Ok(())
        }
    }
}

/// Copying: fail on a partition that cannot be copied, report progress, and once every
/// partition of the reload is done move on (swap, or finish an added table). The snapshot
/// holder (the prepare job) must stay alive meanwhile; a coordinator that takes over has none
/// and starts the reload over.
async fn copying(
    ctx: &SetupContext,
    record: &PipeRecord,
    reload: &TableReload,
    tasks: &mut Tasks,
    generation: i64,
) -> Result<(), StoreError> {
    let name = &record.spec.name;
    let planned = ctx.store.snapshot_plan(name).await?;
    let plan: Vec<_> = planned.iter().map(|p| p.partition.clone()).collect();
    let mine: Vec<_> = plan
        .iter()
        .filter(|p| reload.tables.contains(&p.source_table))
        .filter(|p| p.reload_generation == reload.generation)
        .collect();
    if let Some(stuck) = mine
        .iter()
        .find(|p| !p.done && (p.attempts >= MAX_PARTITION_ATTEMPTS || !p.last_remedy.is_empty()))
    {
        let error = PipeError {
            message: format!(
                "partition {} of {} failed {} times; last error: {}",
                stuck.index, stuck.source_table, stuck.attempts, stuck.last_error
            ),
            remedy: if stuck.last_remedy.is_empty() {
                format!(
                    "fix the cause in the error, then resync the table (ferry resync {name} --table {})",
                    stuck.source_table
                )
            } else {
                stuck.last_remedy.clone()
            },
            table: stuck.source_table.clone(),
            occurred_at: Some(SystemTime::now().into()),
        };
        tasks.stop(name, Job::Reload);
        return fail(ctx, record, "reload failed", error).await;
    }
    if streams(&record.spec) && slot_lost(ctx, name, reload).await? {
        // The stream cannot carry the tables' changes from the boundary any more: start over
        // (the Holding phase makes the slot anew, for every table).
        tasks.stop(name, Job::Reload);
        return prepare::start_over(
            ctx,
            name,
            reload,
            "the replication slot is gone or invalidated",
        )
        .await;
    }
    let progress = table_progress(&record.spec, &plan);
    // (A partitioned table without leaves has no partition: nothing to copy.)
    let finished = mine.iter().all(|p| p.done);
    if finished {
        tasks.stop(name, Job::Reload);
        return copied(ctx, record, reload, progress).await;
    }
    if !tasks.running(name, Job::Reload) {
        // No holder of the copy's snapshot under this leadership (a new leader, or the
        // holder ended): the partitions left cannot be read under it any more. The job run
        // again starts the reload over (`Tasks::ensure` would not repeat a job that ended for
        // this generation, so forget it first).
        tasks.stop(name, Job::Reload);
        let (ctx, record) = (ctx.clone(), record.clone());
        tasks.ensure(name, Job::Reload, generation, async move {
            retrying("reload", || prepare::run(ctx.clone(), record.clone())).await;
        });
        return Ok(());
    }
    // Partitions the workers retry (ClickHouse or the source down) show in the status.
    let mine_plan: Vec<_> = mine.iter().map(|p| (*p).clone()).collect();
    let retrying = crate::snapshot::partition_retry(&mine_plan);
    if record.status.tables != progress || record.status.retrying != retrying {
        let mut status = record.status.clone();
        status.tables = progress;
        status.retrying = retrying;
        ctx.store
            .put_pipe_status(&ctx.fence, name, record.status_revision, &status)
            .await?;
    }
    Ok(())
}

/// Every partition of the reload is copied: a resync swaps its shadow tables in; added
/// tables are done.
async fn copied(
    ctx: &SetupContext,
    record: &PipeRecord,
    reload: &TableReload,
    progress: Vec<ferry_proto::v1::TableStatus>,
) -> Result<(), StoreError> {
    let name = &record.spec.name;
    let mut status = record.status.clone();
    status.tables = progress;
    status.retrying = None;
    match reload.kind() {
        ReloadKind::Resync => {
            let mut next = reload.clone();
            next.set_phase(ReloadPhase::Swapping);
            next.phase_since = Some(SystemTime::now().into());
            status.reload = Some(next);
            status.reason = format!("{} table(s) copied; swapping them in", reload.tables.len());
            ctx.store
                .put_pipe_status(&ctx.fence, name, record.status_revision, &status)
                .await?;
            info!(pipe = %name, generation = reload.generation, "reload copied; swapping");
        }
        _ => {
            // Rows the copy landed after a TRUNCATE the stream applied meanwhile go.
            let emptied = async {
                let secrets = crate::setup::open_secrets(&ctx.store, &ctx.key, name).await?;
                let sink = ferry_clickhouse::sink::Sink::new(
                    &record.spec.destination.clone().unwrap_or_default(),
                    &secrets.destination_password,
                );
                for table in &reload.tables {
                    if let Some(m) = mapping(&record.spec, table) {
                        truncated_during_copy(
                            ctx,
                            name,
                            reload,
                            table,
                            &sink,
                            &m.destination_table,
                        )
                        .await?;
                    }
                }
                Ok::<_, crate::setup::SetupProblem>(())
            };
            match emptied.await {
                Ok(()) => {}
                Err(crate::setup::SetupProblem::Store(error)) => return Err(error),
                Err(problem) => {
                    warn!(pipe = %name, error = %ferry_server::telemetry::error_chain(&problem), "cannot clear rows before a TRUNCATE yet; retrying");
                    return Ok(());
                }
            }
            let rows: u64 = status
                .tables
                .iter()
                .filter(|t| reload.tables.contains(&t.source_table))
                .map(|t| t.rows_copied)
                .sum();
            let reason = format!(
                "added table(s) {} copied ({rows} rows)",
                reload.tables.join(", ")
            );
            let Ok(mut done) = lifecycle::apply(
                &status,
                record.spec.mode(),
                PipeEvent::SnapshotDone,
                reason,
                None,
                SystemTime::now(),
            ) else {
                return Ok(());
            };
            done.reload = None;
            ctx.store
                .put_pipe_status(&ctx.fence, name, record.status_revision, &done)
                .await?;
            ctx.store.delete_exported_snapshot(&ctx.fence, name).await?;
            info!(pipe = %name, "added tables copied");
        }
    }
    Ok(())
}

/// Deletes the rows of `target` (the table of reloaded `table`) below a TRUNCATE the stream
/// applied while this reload copied it: the copy's rows that landed after it.
pub(crate) async fn truncated_during_copy(
    ctx: &SetupContext,
    pipe: &str,
    reload: &TableReload,
    table: &str,
    sink: &ferry_clickhouse::sink::Sink,
    target: &str,
) -> Result<(), crate::setup::SetupProblem> {
    if let Some(truncate) = ctx.store.reload_truncate(pipe, table).await?
        && truncate.generation == reload.generation
    {
        let version = (u128::from(truncate.commit_lsn) << 64) | u128::from(truncate.position);
        sink.delete_below(target, version).await?;
        info!(pipe = %pipe, table = %table, "rows copied before a TRUNCATE during the copy deleted");
    }
    Ok(())
}

/// Whether a check of the slot made since the reload entered its phase found it gone or
/// invalidated (an older check may predate the slot the reload made anew).
pub(crate) async fn slot_lost(
    ctx: &SetupContext,
    pipe: &str,
    reload: &TableReload,
) -> Result<bool, StoreError> {
    let since = reload.phase_since.map_or(0, |t| t.seconds);
    Ok(ctx.store.slot_health(pipe).await?.is_some_and(|slot| {
        slot.checked_at.is_some_and(|t| t.seconds > since)
            && (!slot.exists || slot.wal_status == "lost")
    }))
}

/// Moves the pipe to Failed with `error`.
pub(crate) async fn fail(
    ctx: &SetupContext,
    record: &PipeRecord,
    reason: &str,
    error: PipeError,
) -> Result<(), StoreError> {
    let name = &record.spec.name;
    let Ok(status) = lifecycle::apply(
        &record.status,
        record.spec.mode(),
        PipeEvent::Failed,
        reason,
        Some(error.clone()),
        SystemTime::now(),
    ) else {
        return Ok(());
    };
    ctx.store
        .put_pipe_status(&ctx.fence, name, record.status_revision, &status)
        .await?;
    warn!(pipe = %name, table = %error.table, error = %error.message, "pipe failed");
    Ok(())
}

/// Re-reads the pipe and, while its reload is still `generation`, writes `change(status)`
/// (compare-and-swap, retried on a concurrent change). Returns false if the pipe or the
/// reload moved on.
pub(crate) async fn update(
    ctx: &SetupContext,
    pipe: &str,
    generation: u64,
    change: impl Fn(&PipeRecord, &mut PipeStatus),
) -> Result<bool, StoreError> {
    for _ in 0..10 {
        let Some(record) = ctx.store.get_pipe(pipe).await? else {
            return Ok(false);
        };
        if record.status.reload.as_ref().map(|r| r.generation) != Some(generation) {
            return Ok(false);
        }
        let mut status = record.status.clone();
        change(&record, &mut status);
        if status == record.status {
            return Ok(true);
        }
        match ctx
            .store
            .put_pipe_status(&ctx.fence, pipe, record.status_revision, &status)
            .await
        {
            Ok(_) => return Ok(true),
            Err(StoreError::Conflict { .. }) => tokio::time::sleep(POLL).await,
            Err(other) => return Err(other),
        }
    }
    Err(StoreError::Conflict {
        key: ctx.store.keys().pipe_status(pipe),
    })
}

/// Waits until the stream acknowledges holding for `generation` in `phase`, showing why the
/// reload waits in the pipe's status.
pub(crate) async fn wait_for_hold(
    ctx: &SetupContext,
    pipe: &str,
    generation: u64,
    phase: ReloadPhase,
) -> Result<bool, StoreError> {
    let mut shown = false;
    loop {
        if let Some(hold) = ctx.store.stream_hold(pipe).await?
            && hold.generation == generation
            && hold.phase() == phase
        {
            return Ok(true);
        }
        let current = ctx
            .store
            .get_pipe(pipe)
            .await?
            .and_then(|record| record.status.reload)
            .filter(|r| r.generation == generation);
        if phase == ReloadPhase::Swapping
            && let Some(reload) = current
            && slot_lost(ctx, pipe, &reload).await?
        {
            // The stream cannot start to hold: copy again on a new slot.
            prepare::start_over(
                ctx,
                pipe,
                &reload,
                "the replication slot is gone or invalidated",
            )
            .await?;
            return Ok(false);
        }
        if !shown {
            let moved_on = !update(ctx, pipe, generation, |_, status| {
                status.reason = "waiting for the stream to hold its checkpoint".into();
            })
            .await?;
            if moved_on {
                return Ok(false);
            }
            shown = true;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The mapping of `table` (schema.table) in `spec`.
pub(crate) fn mapping<'s>(
    spec: &'s PipeSpec,
    table: &str,
) -> Option<&'s ferry_proto::v1::TableMapping> {
    spec.tables.iter().find(|m| source_table_name(m) == table)
}
