//! The Holding phase of a reload, and the holder of its copy's snapshot.
//!
//! In order: make sure the source can stream (publication holds the tables; a slot that is
//! gone or invalidated is made anew, which only a whole-pipe reload can absorb), wait for the
//! stream to hold its checkpoint, prepare the tables (re-described, so a resync picks up
//! schema changes; shadow or new destination tables; their partition plan), take the stream
//! boundary and export the copy's snapshot, then hold that snapshot while snapshot workers
//! copy. A lost snapshot starts the reload over (next generation): the partitions left cannot
//! be read under another one.

use std::time::{Duration, SystemTime};

use ferry_clickhouse::resync::{marker, shadow_name};
use ferry_clickhouse::sink::Sink;
use ferry_clickhouse::types::MappingOptions;
use ferry_core::lifecycle::{self, PipeEvent};
use ferry_core::spec::source_table_name;
use ferry_core::{PipeMode, PipeState};
use ferry_postgres::{connection, replication, schema, snapshot, validate};
use ferry_proto::v1::{
    ExportedSnapshot, ReloadKind, ReloadPhase, SnapshotPartition, SourceResources, TableReload,
    TableState,
};
use ferry_server::telemetry::error_chain;
use ferry_store::{PipeRecord, StoreError};
use tokio_postgres::Client;
use tracing::{info, warn};

use super::{fail, mapping, streams, update, wait_for_hold};
use crate::setup::{
    SetupContext, SetupProblem, apply_column_types, managed_publication, open_secrets, slot_name,
    table_progress,
};

/// How often the holder checks that its exporting transaction is alive.
const HOLDER_CHECK: Duration = Duration::from_secs(2);

/// Runs the Holding phase of the pipe's reload, then holds the copy's snapshot.
pub(super) async fn run(ctx: SetupContext, record: PipeRecord) -> Result<(), StoreError> {
    let name = record.spec.name.clone();
    // Run (or run again after an error) from the pipe as it is now, not as it was when the
    // job was started: the reload may have moved on meanwhile.
    let Some(record) = ctx.store.get_pipe(&name).await? else {
        return Ok(());
    };
    let Some(reload) = record.status.reload.clone() else {
        return Ok(());
    };
    if reload.phase() == ReloadPhase::Swapping {
        return Ok(());
    }
    if reload.phase() == ReloadPhase::Copying {
        // Taken over mid-copy: the snapshot the copy was read under is gone with its holder.
        return start_over(&ctx, &name, &reload, "the copy's snapshot was lost").await;
    }
    let mut record = record;
    loop {
        match prepare(&ctx, &record, &reload).await {
            Ok(Some(client)) => return hold(&ctx, &name, &reload, client).await,
            Ok(None) => return Ok(()),
            // The status changed under a write (a reason, a concurrent request): go on from
            // what it is now, as long as it is still this reload.
            Err(SetupProblem::Store(StoreError::Conflict { .. })) => {
                let Some(current) = ctx.store.get_pipe(&name).await? else {
                    return Ok(());
                };
                if current.status.reload.as_ref().map(|r| r.generation) != Some(reload.generation) {
                    return Ok(());
                }
                record = current;
                tokio::time::sleep(super::POLL).await;
            }
            Err(SetupProblem::Store(error)) => return Err(error),
            Err(problem) if problem.class().passes_by_itself() => {
                let text = error_chain(&problem);
                warn!(pipe = %name, error = %text, "reload step failed; retrying");
                let shown = update(&ctx, &name, reload.generation, |_, status| {
                    status.reason = format!("retrying: {text}");
                })
                .await?;
                if !shown {
                    return Ok(());
                }
                tokio::time::sleep(HOLDER_CHECK).await;
            }
            Err(problem) => return refuse(&ctx, &record, &reload, &problem).await,
        }
    }
}

/// A reload that cannot be done: added tables are taken out again (the pipe keeps running
/// as it was); a resync or a removal fails the pipe with the error and its remedy.
async fn refuse(
    ctx: &SetupContext,
    record: &PipeRecord,
    reload: &TableReload,
    problem: &SetupProblem,
) -> Result<(), StoreError> {
    let name = &record.spec.name;
    // Written against the pipe as it is now (waiting for the stream rewrote the reason).
    let Some(current) = ctx.store.get_pipe(name).await? else {
        return Ok(());
    };
    if current.status.reload.as_ref().map(|r| r.generation) != Some(reload.generation) {
        return Ok(());
    }
    let record = &current;
    let mut error = problem.to_pipe_error();
    warn!(pipe = %name, error = %error.message, "reload refused");
    if reload.kind() != ReloadKind::Add {
        if error.remedy.is_empty() {
            error.remedy = format!("fix the cause, then ferry resync {name}");
        }
        return fail(ctx, record, "reload failed", error).await;
    }
    let mut spec = record.spec.clone();
    spec.tables
        .retain(|m| !reload.tables.contains(&source_table_name(m)));
    let reason = format!(
        "tables not added: {} ({}); the pipe continues with its other tables",
        error.message, error.remedy
    );
    // Refused while preparing (Modifying), or when a copy started over (Snapshot).
    let event = if record.status.state() == PipeState::Snapshot {
        PipeEvent::SnapshotDone
    } else {
        PipeEvent::ModifyDone {
            needs_snapshot: false,
        }
    };
    let Ok(mut status) = lifecycle::apply(
        &record.status,
        record.spec.mode(),
        event,
        reason,
        None,
        SystemTime::now(),
    ) else {
        return Ok(());
    };
    status.reload = None;
    status.tables = table_progress(&spec, &[]);
    let plan: Vec<SnapshotPartition> = ctx
        .store
        .snapshot_plan(name)
        .await?
        .into_iter()
        .map(|p| p.partition)
        .collect();
    status.tables = table_progress(&spec, &plan);
    ctx.store
        .put_pipe(
            &ctx.fence,
            record.spec_revision,
            &spec,
            record.status_revision,
            &status,
        )
        .await?;
    ctx.store
        .forget_tables(&ctx.fence, name, &reload.tables)
        .await?;
    Ok(())
}

/// Starts the reload over as the next generation (Holding again).
pub(super) async fn start_over(
    ctx: &SetupContext,
    pipe: &str,
    reload: &TableReload,
    why: &str,
) -> Result<(), StoreError> {
    warn!(pipe = %pipe, generation = reload.generation, why, "reload starts over");
    let why = why.to_owned();
    update(ctx, pipe, reload.generation, move |_, status| {
        if let Some(current) = status.reload.as_mut() {
            current.generation += 1;
            current.set_phase(ReloadPhase::Holding);
            current.start_lsn = 0;
            current.visibility.clear();
        }
        status.reason = format!("{why}; copying the reloaded tables again");
    })
    .await?;
    Ok(())
}

/// Prepares the reload; returns the connection holding the copy's snapshot, or `None` if there is nothing to copy (removal, CDC-only additions) or the
/// reload moved on.
async fn prepare(
    ctx: &SetupContext,
    record: &PipeRecord,
    reload: &TableReload,
) -> Result<Option<Client>, SetupProblem> {
    let spec = &record.spec;
    let name = &spec.name;
    let secrets = open_secrets(&ctx.store, &ctx.key, name).await?;
    let source_spec = spec.source.clone().unwrap_or_default();
    let source = connection::connect(&source_spec, &secrets.source_password).await?;
    let sink = Sink::new(
        &spec.destination.clone().unwrap_or_default(),
        &secrets.destination_password,
    );
    let generation = reload.generation;
    // A pipe that failed in Setup may not have recorded what it creates on the source: record
    // it before creating anything, so a delete drops it.
    let resources = SourceResources {
        slot_name: slot_name(spec).unwrap_or_default(),
        publication: managed_publication(spec).unwrap_or_default(),
    };
    if ctx.store.resources(name).await? != resources {
        ctx.store
            .put_resources(&ctx.fence, name, &resources)
            .await?;
    }

    if streams(spec) {
        // Changes of every table must reach the stream: the publication holds them, and the
        // slot exists and still has its WAL.
        let mut published_anew = false;
        if let Some(publication) = managed_publication(spec) {
            let all: Vec<String> = spec.tables.iter().map(source_table_name).collect();
            published_anew = replication::ensure_publication(&source, &publication, &all).await?;
            replication::add_to_publication(&source, &publication, &all).await?;
        }
        // A slot decodes with the catalog as of each change: one older than its publication
        // cannot stream the changes made before the publication existed again.
        if let Some(slot) = slot_name(spec)
            && (published_anew || !replication::slot_usable(&source, &slot).await?)
        {
            if reload.kind() != ReloadKind::Resync {
                // Only a resync of every table can absorb a new slot.
                return Err(SetupProblem::SlotUnusable {
                    pipe: name.clone(),
                    slot,
                });
            }
            warn!(pipe = %name, %slot, "replication slot gone, invalidated or older than its publication; creating it anew");
            replication::drop_slot_forcibly(&source, &slot).await?;
            replication::ensure_slot(&source, &slot).await?;
            ctx.store.reset_stream(&ctx.fence, name, true).await?;
            if !reload.whole_pipe {
                // Changes of every table since the checkpoint are gone with the old slot.
                update(ctx, name, generation, |record, status| {
                    if let Some(r) = status.reload.as_mut() {
                        r.generation += 1;
                        r.whole_pipe = true;
                        r.tables = record.spec.tables.iter().map(source_table_name).collect();
                    }
                    status.reason = format!(
                        "replication slot {slot} was made anew (gone, invalidated, or older than its publication): resyncing every table"
                    );
                })
                .await?;
                return Ok(None);
            }
        }
        if !wait_for_hold(ctx, name, generation, ReloadPhase::Holding).await? {
            return Ok(None);
        }
    }
    if reload.kind() == ReloadKind::Remove {
        super::finish::remove(ctx, name, reload, &source, &sink).await?;
        return Ok(None);
    }

    // Copies of an earlier generation must be over before their tables are emptied.
    wait_for_no_copies(ctx, name, &reload.tables).await?;
    let states = prepare_tables(ctx, record, reload, &source, &sink).await?;
    let copy = spec.mode() != PipeMode::CdcOnly || reload.kind() == ReloadKind::Resync;
    if !copy {
        // A table added to a CDC-only pipe streams from now on, without a copy.
        super::finish::added_without_copy(ctx, name, reload).await?;
        return Ok(None);
    }
    let settings = spec.settings.unwrap_or_default();
    let rows_per_partition =
        u64::try_from(settings.snapshot_rows_per_partition.unwrap_or(100_000)).unwrap_or(100_000);
    let mut partitions = Vec::new();
    for (table, state) in &states {
        let Some(described) = &state.schema else {
            continue;
        };
        let target = match (reload.kind(), mapping(spec, table)) {
            (ReloadKind::Resync, Some(m)) => shadow_name(&m.destination_table),
            _ => String::new(),
        };
        for mut partition in snapshot::plan(&source, described, rows_per_partition).await? {
            partition.destination_table.clone_from(&target);
            partition.reload_generation = generation;
            partitions.push(partition);
        }
    }
    let Some(current) = ctx.store.get_pipe(name).await? else {
        return Ok(None);
    };
    if current.status.reload.as_ref().map(|r| r.generation) != Some(generation) {
        return Ok(None);
    }
    ctx.store
        .replace_table_plans(
            &ctx.fence,
            name,
            current.status_revision,
            &reload.tables,
            &partitions,
        )
        .await?;

    // The boundary, then the snapshot: every change committed before the boundary is in the
    // copy (docs/reload.md).
    let start_lsn = if streams(spec) {
        let (lsn, fence) = snapshot::stream_boundary(&source).await?;
        let started = std::time::Instant::now();
        let mut shown = false;
        while !snapshot::boundary_reached(&source, fence).await? {
            if !shown && started.elapsed() > Duration::from_secs(2) {
                warn!(pipe = %name, "waiting for transactions older than the reload to end");
                let moved = !update(ctx, name, generation, |_, status| {
                    status.reason = "waiting for transactions older than the reload to end (see pg_stat_activity)".into();
                })
                .await?;
                if moved {
                    return Ok(None);
                }
                shown = true;
            }
            tokio::time::sleep(super::POLL).await;
        }
        lsn
    } else {
        0
    };
    let holder = connection::connect(&source_spec, &secrets.source_password).await?;
    let (snapshot_id, visibility) = snapshot::export_snapshot(&holder).await?;
    ctx.store
        .put_exported_snapshot(
            &ctx.fence,
            name,
            &ExportedSnapshot {
                snapshot_id: snapshot_id.clone(),
                holder: "reload".into(),
                exported_at: Some(SystemTime::now().into()),
                visibility: visibility.clone(),
            },
        )
        .await?;
    let plan: Vec<SnapshotPartition> = ctx
        .store
        .snapshot_plan(name)
        .await?
        .into_iter()
        .map(|p| p.partition)
        .collect();
    let visible = visibility.clone();
    let kind = reload.kind();
    let moved = !update(ctx, name, generation, move |record, status| {
        if kind == ReloadKind::Add
            && let Ok(next) = lifecycle::apply(
                status,
                record.spec.mode(),
                PipeEvent::ModifyDone {
                    needs_snapshot: true,
                },
                "",
                None,
                SystemTime::now(),
            )
        {
            *status = next;
        }
        if let Some(r) = status.reload.as_mut() {
            r.set_phase(ReloadPhase::Copying);
            r.phase_since = Some(SystemTime::now().into());
            r.start_lsn = start_lsn;
            r.visibility.clone_from(&visible);
        }
        status.reason = format!(
            "copying {} table(s) ({} partition(s)) while the others stream",
            states.len(),
            partitions.len()
        );
        status.tables = table_progress(&record.spec, &plan);
    })
    .await?;
    if moved {
        return Ok(None);
    }
    info!(pipe = %name, generation, start_lsn = %ferry_postgres::pgoutput::Lsn(start_lsn), snapshot = %snapshot_id, "reload copying");
    Ok(Some(holder))
}

/// Describes the reloaded tables again, checks them as Setup would, creates their new
/// destination (a shadow for a resync, the table itself for an addition) and records them.
async fn prepare_tables(
    ctx: &SetupContext,
    record: &PipeRecord,
    reload: &TableReload,
    source: &Client,
    sink: &Sink,
) -> Result<Vec<(String, TableState)>, SetupProblem> {
    let spec = &record.spec;
    let name = &spec.name;
    let mut checked = spec.clone();
    checked
        .tables
        .retain(|m| reload.tables.contains(&source_table_name(m)));
    validate::check_source(source, &checked, slot_name(spec).as_deref().unwrap_or("")).await?;
    let limits = match ctx.store.destination_limits(name).await? {
        Some(limits) => limits,
        None => {
            let limits = sink.probe_limits().await?;
            ctx.store
                .put_destination_limits(&ctx.fence, name, &limits)
                .await?;
            limits
        }
    };
    let settings = spec.settings.unwrap_or_default();
    let options = MappingOptions::for_pipe(&settings, Some(&limits));
    let mark = marker(name, reload.generation);
    sink.create_database().await?;
    if reload.kind() == ReloadKind::Resync {
        sink.check_exchange().await?;
    }
    let mut states = Vec::new();
    for (index, m) in spec.tables.iter().enumerate() {
        let table = source_table_name(m);
        if !reload.tables.contains(&table) {
            continue;
        }
        let mut described =
            schema::describe_table(source, &m.source_schema, &m.source_table).await?;
        apply_column_types(index, m, &mut described, &limits)?;
        if reload.kind() == ReloadKind::Resync {
            // The swap replaces the live table: never one holding rows Ferry did not write
            // (a pipe that failed in Setup on a non-empty destination).
            let created = ctx
                .store
                .table_state(name, &table)
                .await?
                .is_some_and(|s| s.destination_created);
            if !created && settings.allow_non_empty_destination != Some(true) {
                if let Some(rows @ 1..) = sink.row_count(&m.destination_table).await? {
                    return Err(SetupProblem::NotEmpty {
                        table: format!("{}.{}", sink.database(), m.destination_table),
                        rows,
                    });
                }
            }
            sink.create_shadow(&m.destination_table, &described, options, &mark)
                .await?;
        } else {
            // Recorded already: created by an earlier generation of this reload, whose copy
            // was under another snapshot. Emptied, so no row of that copy survives.
            let ours = ctx.store.table_state(name, &table).await?.is_some();
            if ours {
                sink.truncate(&m.destination_table).await?;
            }
            let existing = sink.row_count(&m.destination_table).await?;
            if let Some(rows @ 1..) = existing.filter(|_| !ours)
                && settings.allow_non_empty_destination != Some(true)
            {
                return Err(SetupProblem::NotEmpty {
                    table: format!("{}.{}", sink.database(), m.destination_table),
                    rows,
                });
            }
            if existing.is_some() {
                sink.check_columns(&m.destination_table, &described, options)
                    .await?;
            }
            sink.create_table(&m.destination_table, &described, options)
                .await?;
            sink.create_view(&m.destination_table, &described).await?;
        }
        states.push((
            table,
            TableState {
                schema: Some(described),
                destination_created: true,
            },
        ));
    }
    ctx.store
        .put_table_states(&ctx.fence, name, &states)
        .await?;
    Ok(states)
}

/// Waits until no snapshot worker copies a partition of `tables`.
async fn wait_for_no_copies(
    ctx: &SetupContext,
    pipe: &str,
    tables: &[String],
) -> Result<(), StoreError> {
    let owners = ctx.store.keys().snapshot_owners(pipe);
    loop {
        let claims = ctx.store.snapshot_claims(pipe).await?;
        let busy = claims.iter().any(|(key, ..)| {
            key.strip_prefix(owners.as_str())
                .and_then(|rest| rest.rsplit_once('/'))
                .is_some_and(|(t, _)| tables.iter().any(|x| x == t))
        });
        if !busy {
            return Ok(());
        }
        tokio::time::sleep(super::POLL).await;
    }
}

/// Keeps the copy's snapshot alive until the reload leaves Copying (the job is then
/// stopped); if it dies first, starts the reload over.
async fn hold(
    ctx: &SetupContext,
    pipe: &str,
    reload: &TableReload,
    client: Client,
) -> Result<(), StoreError> {
    while client.simple_query("SELECT 1").await.is_ok() {
        tokio::time::sleep(HOLDER_CHECK).await;
    }
    let generation = reload.generation;
    let Some(record) = ctx.store.get_pipe(pipe).await? else {
        return Ok(());
    };
    let still = record
        .status
        .reload
        .as_ref()
        .is_some_and(|r| r.generation == generation && r.phase() == ReloadPhase::Copying);
    if still {
        start_over(ctx, pipe, reload, "the copy's snapshot was lost").await?;
    }
    Ok(())
}
