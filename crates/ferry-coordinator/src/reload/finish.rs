//! The ends of a reload: swapping a resync's shadow tables in, removing tables, and an added
//! table of a CDC-only pipe (nothing to copy).

use std::time::SystemTime;

use ferry_clickhouse::resync::{marker, shadow_name};
use ferry_clickhouse::sink::Sink;
use ferry_core::lifecycle::{self, PipeEvent};
use ferry_core::spec::source_table_name;
use ferry_postgres::replication;
use ferry_proto::v1::{ReloadPhase, SnapshotPartition, TableReload};
use ferry_server::telemetry::error_chain;
use ferry_store::{PipeRecord, StoreError};
use tokio_postgres::Client;
use tracing::{info, warn};

use super::{mapping, streams, update, wait_for_hold};
use crate::setup::{SetupContext, SetupProblem, managed_publication, open_secrets, table_progress};

/// Swapping: once the stream holds (it writes none of the reloaded tables meanwhile), each
/// shadow is exchanged with its live table, then the pipe goes back to Running (Completed
/// for a snapshot-only pipe).
pub(super) async fn swap(ctx: SetupContext, record: PipeRecord) -> Result<(), StoreError> {
    let Some(reload) = record.status.reload.clone() else {
        return Ok(());
    };
    let name = record.spec.name.clone();
    if streams(&record.spec)
        && !wait_for_hold(&ctx, &name, reload.generation, ReloadPhase::Swapping).await?
    {
        return Ok(());
    }
    loop {
        match swap_tables(&ctx, &record, &reload).await {
            Ok(()) => break,
            Err(SetupProblem::Store(error)) => return Err(error),
            Err(problem) => {
                // A table cannot be swapped now (ClickHouse down, …): keep trying, visibly.
                let text = error_chain(&problem);
                warn!(pipe = %name, error = %text, "cannot swap the reloaded tables yet; retrying");
                if !update(&ctx, &name, reload.generation, |_, status| {
                    status.reason = format!("retrying the swap: {text}");
                })
                .await?
                {
                    return Ok(());
                }
                tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            }
        }
    }
    let plan: Vec<SnapshotPartition> = ctx
        .store
        .snapshot_plan(&name)
        .await?
        .into_iter()
        .map(|p| p.partition)
        .collect();
    let tables = reload.tables.join(", ");
    let finished = update(&ctx, &name, reload.generation, move |record, status| {
        let reason = format!("resync done: {tables} reloaded and swapped in");
        if let Ok(mut next) = lifecycle::apply(
            status,
            record.spec.mode(),
            PipeEvent::ResyncDone,
            reason,
            None,
            SystemTime::now(),
        ) {
            next.reload = None;
            next.tables = table_progress(&record.spec, &plan);
            *status = next;
        }
    })
    .await?;
    if finished {
        ctx.store
            .delete_exported_snapshot(&ctx.fence, &name)
            .await?;
        info!(pipe = %name, generation = reload.generation, "resync done");
    }
    Ok(())
}

async fn swap_tables(
    ctx: &SetupContext,
    record: &PipeRecord,
    reload: &TableReload,
) -> Result<(), SetupProblem> {
    let name = &record.spec.name;
    let secrets = open_secrets(&ctx.store, &ctx.key, name).await?;
    let sink = Sink::new(
        &record.spec.destination.clone().unwrap_or_default(),
        &secrets.destination_password,
    );
    let mark = marker(name, reload.generation);
    for table in &reload.tables {
        let Some(m) = mapping(&record.spec, table) else {
            continue;
        };
        let shadow = shadow_name(&m.destination_table);
        if sink.table_exists(&shadow).await? {
            super::truncated_during_copy(ctx, name, reload, table, &sink, &shadow).await?;
        }
        sink.swap_in(&m.destination_table, &mark).await?;
        if let Some(schema) = ctx
            .store
            .table_state(name, table)
            .await?
            .and_then(|s| s.schema)
        {
            // The columns may have changed with the reload.
            sink.create_view(&m.destination_table, &schema).await?;
        }
        info!(pipe = %name, table = %table, shadow = %shadow_name(&m.destination_table), "swapped in");
    }
    Ok(())
}

/// Removes tables once the stream runs without them: out of the publication Ferry manages,
/// their destination tables dropped if asked, their records forgotten; then Running.
pub(super) async fn remove(
    ctx: &SetupContext,
    pipe: &str,
    reload: &TableReload,
    source: &Client,
    sink: &Sink,
) -> Result<(), SetupProblem> {
    let Some(record) = ctx.store.get_pipe(pipe).await? else {
        return Ok(());
    };
    if let Some(publication) = managed_publication(&record.spec) {
        replication::remove_from_publication(source, &publication, &reload.tables).await?;
    }
    if reload.drop_destination_tables {
        for destination in &reload.destination_tables {
            sink.drop_view(&ferry_clickhouse::ddl::view_name(destination))
                .await?;
            sink.drop_table(destination).await?;
        }
    }
    ctx.store
        .forget_tables(&ctx.fence, pipe, &reload.tables)
        .await?;
    let tables = reload.tables.join(", ");
    let dropped = reload.drop_destination_tables;
    update(ctx, pipe, reload.generation, move |record, status| {
        let reason = if dropped {
            format!("removed {tables}; their ClickHouse tables were dropped")
        } else {
            format!("removed {tables}; their ClickHouse tables are kept")
        };
        if let Ok(mut next) = lifecycle::apply(
            status,
            record.spec.mode(),
            PipeEvent::ModifyDone {
                needs_snapshot: false,
            },
            reason,
            None,
            SystemTime::now(),
        ) {
            next.reload = None;
            next.tables.retain(|t| {
                record
                    .spec
                    .tables
                    .iter()
                    .any(|m| source_table_name(m) == t.source_table)
            });
            *status = next;
        }
    })
    .await?;
    info!(pipe = %pipe, tables = %reload.tables.join(", "), "tables removed");
    Ok(())
}

/// Tables added to a CDC-only pipe: nothing to copy, they stream from now on.
pub(super) async fn added_without_copy(
    ctx: &SetupContext,
    pipe: &str,
    reload: &TableReload,
) -> Result<(), StoreError> {
    let tables = reload.tables.join(", ");
    let done = update(ctx, pipe, reload.generation, move |record, status| {
        let reason = format!("added {tables}; they stream from now on (CDC-only pipe)");
        if let Ok(mut next) = lifecycle::apply(
            status,
            record.spec.mode(),
            PipeEvent::ModifyDone {
                needs_snapshot: false,
            },
            reason,
            None,
            SystemTime::now(),
        ) {
            next.reload = None;
            next.tables = table_progress(&record.spec, &[]);
            *status = next;
        }
    })
    .await?;
    if !done {
        warn!(pipe = %pipe, "pipe moved on before its added tables were recorded");
    }
    Ok(())
}
