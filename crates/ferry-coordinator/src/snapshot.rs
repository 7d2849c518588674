//! The coordinator's part of a snapshot: holding the exported snapshot the partitions import,
//! keeping per-table progress in the pipe's status, and finishing the snapshot.

use std::time::SystemTime;

use ferry_core::lifecycle::{self, PipeEvent};
use ferry_postgres::{connection, snapshot};
use ferry_proto::v1::{ExportedSnapshot, PipeError};
use ferry_server::telemetry::error_chain;
use ferry_store::{PipeRecord, StoreError};
use tracing::{info, warn};

use crate::setup::{self, SetupContext, SetupProblem, table_progress};

/// Failed attempts at one partition before the pipe fails (a transient error gets retries).
const MAX_PARTITION_ATTEMPTS: u32 = 3;

/// Exports a snapshot, publishes it, and keeps its transaction open until aborted (the pipe
/// leaves Snapshot or this coordinator stops leading). If no snapshot can be exported, an
/// empty id is published so workers read fresh snapshots instead of waiting: the copy still
/// converges for CDC pipes (DESIGN.md §4); a snapshot-only pipe is then consistent per
/// partition rather than across partitions.
pub(crate) async fn hold(ctx: SetupContext, record: PipeRecord, me: String) {
    let name = record.spec.name.clone();
    let exported = async {
        let secrets = setup::open_secrets(&ctx.store, &ctx.key, &name).await?;
        let source = record.spec.source.clone().unwrap_or_default();
        let client = connection::connect(&source, &secrets.source_password).await?;
        let id = snapshot::export_snapshot(&client).await?;
        Ok::<_, SetupProblem>((client, id))
    }
    .await;
    let (client, snapshot_id) = match exported {
        Ok((client, id)) => (Some(client), id),
        Err(problem) => {
            warn!(pipe = %name, error = %error_chain(&problem), "cannot export a snapshot; partitions read fresh ones");
            (None, String::new())
        }
    };
    let published = ExportedSnapshot {
        snapshot_id: snapshot_id.clone(),
        holder: me,
        exported_at: Some(SystemTime::now().into()),
    };
    if let Err(error) = ctx
        .store
        .put_exported_snapshot(&ctx.fence, &name, &published)
        .await
    {
        warn!(pipe = %name, error = %error_chain(&error), "cannot publish the exported snapshot");
        return;
    }
    info!(pipe = %name, snapshot = %snapshot_id, "holding exported snapshot");
    // The snapshot lives as long as this connection's transaction.
    std::future::pending::<()>().await;
    drop(client);
}

/// Updates the pipe's per-table progress from the plan, and finishes the snapshot once every
/// partition is done.
pub(crate) async fn advance(ctx: &SetupContext, record: &PipeRecord) -> Result<(), StoreError> {
    let name = &record.spec.name;
    let plan: Vec<_> = ctx
        .store
        .snapshot_plan(name)
        .await?
        .into_iter()
        .map(|(_, p)| p)
        .collect();
    let progress = table_progress(&record.spec, &plan);
    if let Some(stuck) = plan
        .iter()
        .find(|p| !p.done && p.attempts >= MAX_PARTITION_ATTEMPTS)
    {
        let error = PipeError {
            message: format!(
                "snapshot partition {} of {} failed {} times; last error: {}",
                stuck.index, stuck.source_table, stuck.attempts, stuck.last_error
            ),
            remedy: "fix the cause in the error, then resync the pipe".into(),
            table: stuck.source_table.clone(),
            occurred_at: Some(SystemTime::now().into()),
        };
        let status = lifecycle::apply(
            &record.status,
            record.spec.mode(),
            PipeEvent::Failed,
            "snapshot failed",
            Some(error),
            SystemTime::now(),
        );
        if let Ok(mut status) = status {
            status.tables = progress;
            ctx.store
                .put_pipe_status(&ctx.fence, name, record.status_revision, &status)
                .await?;
            warn!(pipe = %name, table = %stuck.source_table, "snapshot failed");
        }
        return Ok(());
    }
    let finished = plan.iter().all(|p| p.done);
    let mut status = if finished {
        let rows: u64 = plan.iter().map(|p| p.rows_copied).sum();
        let reason = format!("snapshot done: {rows} rows in {} partition(s)", plan.len());
        match lifecycle::apply(
            &record.status,
            record.spec.mode(),
            PipeEvent::SnapshotDone,
            reason,
            None,
            SystemTime::now(),
        ) {
            Ok(status) => status,
            Err(_) => return Ok(()),
        }
    } else if record.status.tables != progress {
        record.status.clone()
    } else {
        return Ok(());
    };
    status.tables = progress;
    ctx.store
        .put_pipe_status(&ctx.fence, name, record.status_revision, &status)
        .await?;
    if finished {
        ctx.store.delete_exported_snapshot(&ctx.fence, name).await?;
        info!(pipe = %name, next = lifecycle::state_name(status.state()), "snapshot finished");
    }
    Ok(())
}
