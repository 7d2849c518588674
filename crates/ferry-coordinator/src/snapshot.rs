//! The coordinator's part of a snapshot: holding the exported snapshot the partitions import,
//! keeping per-table progress in the pipe's status, and finishing the snapshot.
//!
//! Every partition of a table must be read under the same snapshot: a row an UPDATE moves
//! from a block not yet read into a block already read would otherwise be missed, and CDC
//! cannot fully repair it (pgoutput omits unchanged TOAST values). So the holder re-exports
//! when its transaction dies, partitions record the snapshot they were read under, and a table
//! whose finished partitions were read under an older snapshot is read again.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use ferry_clickhouse::sink::Sink;
use ferry_core::lifecycle::{self, PipeEvent};
use ferry_core::spec::source_table_name;
use ferry_postgres::{connection, snapshot};
use ferry_proto::v1::{ExportedSnapshot, PipeError, Retrying, SnapshotPartition};
use ferry_server::telemetry::error_chain;
use ferry_store::snapshot::PlannedPartition;
use ferry_store::{PipeRecord, StoreError};
use tracing::{info, warn};

use crate::setup::{self, SetupContext, SetupProblem, table_progress};

/// Failed attempts at one partition before the pipe fails. Only failures the error policy
/// calls permanent count, and those carry a remedy that fails the pipe at once; a transient
/// failure is retried by the workers with backoff for as long as it lasts (its `retrying`).
const MAX_PARTITION_ATTEMPTS: u32 = 3;
/// How often the holder checks that its exporting transaction is alive.
const HOLDER_CHECK: Duration = Duration::from_secs(2);

/// Exports a snapshot, publishes it, and keeps its transaction open until aborted (the pipe
/// leaves Snapshot or this coordinator stops leading); exports again whenever the
/// transaction dies.
pub(crate) async fn hold(ctx: SetupContext, record: PipeRecord, me: String) {
    let name = record.spec.name.clone();
    loop {
        let exported = async {
            let secrets = setup::open_secrets(&ctx.store, &ctx.key, &name).await?;
            let source = record.spec.source.clone().unwrap_or_default();
            let client = connection::connect(&source, &secrets.source_password).await?;
            let (id, visibility) = snapshot::export_snapshot(&client).await?;
            let published = ExportedSnapshot {
                snapshot_id: id.clone(),
                holder: me.clone(),
                exported_at: Some(SystemTime::now().into()),
                visibility,
            };
            ctx.store
                .put_exported_snapshot(&ctx.fence, &name, &published)
                .await?;
            Ok::<_, SetupProblem>((client, id))
        }
        .await;
        match exported {
            Ok((client, id)) => {
                info!(pipe = %name, snapshot = %id, "holding exported snapshot");
                // The snapshot lives as long as this transaction; watch that it does.
                while client.simple_query("SELECT 1").await.is_ok() {
                    tokio::time::sleep(HOLDER_CHECK).await;
                }
                warn!(pipe = %name, snapshot = %id, "exported snapshot lost; exporting again");
            }
            Err(SetupProblem::Store(StoreError::Fenced)) => return,
            Err(problem) => {
                warn!(pipe = %name, error = %error_chain(&problem), "cannot export a snapshot; retrying");
                tokio::time::sleep(HOLDER_CHECK).await;
            }
        }
    }
}

/// Updates the pipe's per-table progress from the plan, re-queues partitions read under an
/// older snapshot, and finishes the snapshot once every partition is done.
pub(crate) async fn advance(ctx: &SetupContext, record: &PipeRecord) -> Result<(), StoreError> {
    let name = &record.spec.name;
    let planned = ctx.store.snapshot_plan(name).await?;
    // Every table has at least one partition: an empty plan is one being (re)written.
    if planned.is_empty() {
        return Ok(());
    }
    let plan: Vec<_> = planned.iter().map(|p| p.partition.clone()).collect();
    let progress = table_progress(&record.spec, &plan);
    if let Some(stuck) = plan
        .iter()
        // A failure with a remedy is one retrying cannot fix (a value out of range, the
        // destination table gone).
        .find(|p| !p.done && (p.attempts >= MAX_PARTITION_ATTEMPTS || !p.last_remedy.is_empty()))
    {
        let error = PipeError {
            message: format!(
                "snapshot partition {} of {} failed {} times; last error: {}",
                stuck.index, stuck.source_table, stuck.attempts, stuck.last_error
            ),
            remedy: if stuck.last_remedy.is_empty() {
                format!("fix the cause in the error, then ferry resync {name}")
            } else {
                stuck.last_remedy.clone()
            },
            table: stuck.source_table.clone(),
            occurred_at: Some(SystemTime::now().into()),
        };
        let now = SystemTime::now();
        let failed = lifecycle::apply(
            &record.status,
            record.spec.mode(),
            PipeEvent::Failed,
            "snapshot failed",
            Some(error),
            now,
        );
        if let Ok(mut status) = failed {
            status.tables = progress;
            ctx.store
                .put_pipe_status(&ctx.fence, name, record.status_revision, &status)
                .await?;
            warn!(pipe = %name, table = %stuck.source_table, "snapshot failed");
        }
        return Ok(());
    }
    // Each table must be read under one snapshot. A table that is not finished, or whose
    // finished partitions disagree, is read again from scratch under the current one: rows
    // copied under an older snapshot cannot be taken back one by one (a row deleted in
    // between, a keyless row's copies), so the destination table is emptied first. Snapshots
    // are told apart by their visibility, not their id (an id can repeat after a restart).
    // Emptying takes two steps, each level-triggered: every partition of the table is reset
    // and held (a copy finishing meanwhile fails its revision check and is redone), then, once
    // no copy of the table is in flight, the table is emptied and the hold lifted.
    let held: BTreeSet<&str> = plan
        .iter()
        .filter(|p| p.held)
        .map(|p| p.source_table.as_str())
        .collect();
    if !held.is_empty() {
        for table in held {
            let parts: Vec<_> = planned
                .iter()
                .filter(|p| p.partition.source_table == table)
                .cloned()
                .collect();
            empty_and_release(ctx, record, table, &parts).await?;
        }
        return Ok(());
    }
    if let Some(current) = ctx.store.exported_snapshot(name).await? {
        let mut reread = Vec::new();
        let tables: BTreeSet<&str> = plan.iter().map(|p| p.source_table.as_str()).collect();
        for table in tables {
            let parts: Vec<_> = planned
                .iter()
                .filter(|p| p.partition.source_table == table)
                .collect();
            let unfinished = parts.iter().any(|p| !p.partition.done);
            let seen: BTreeSet<&str> = parts
                .iter()
                .filter(|p| p.partition.done)
                .map(|p| p.partition.snapshot_visibility.as_str())
                .collect();
            let old = parts
                .iter()
                .any(|p| p.partition.done && p.partition.snapshot_visibility != current.visibility);
            if (unfinished || seen.len() > 1) && old {
                reread.push((
                    table.to_owned(),
                    parts.into_iter().cloned().collect::<Vec<_>>(),
                ));
            }
        }
        if !reread.is_empty() {
            let settings = record.spec.settings.unwrap_or_default();
            if settings.allow_non_empty_destination == Some(true) {
                // Rows that were there before the pipe must not be emptied with the copy:
                // read the older partitions again over what they wrote.
                let stale: Vec<_> = reread
                    .into_iter()
                    .flat_map(|(_, parts)| parts)
                    .filter(|p| {
                        p.partition.done && p.partition.snapshot_visibility != current.visibility
                    })
                    .collect();
                warn!(pipe = %name, partitions = stale.len(), "partitions read under an older snapshot; reading them again over a destination that may hold other rows");
                ctx.store
                    .reset_partitions(&ctx.fence, &stale, false)
                    .await?;
            } else {
                for (table, parts) in reread {
                    warn!(pipe = %name, table = %table, "table read under more than one snapshot; emptying it to read it again from scratch");
                    ctx.store.reset_partitions(&ctx.fence, &parts, true).await?;
                }
            }
            return Ok(());
        }
    }
    let finished = plan.iter().all(|p| p.done);
    let retrying = partition_retry(&plan);
    let mut status = if finished {
        let rows: u64 = plan.iter().map(|p| p.rows_copied).sum();
        let reason = format!("snapshot done: {rows} rows in {} partition(s)", plan.len());
        let now = SystemTime::now();
        match lifecycle::apply(
            &record.status,
            record.spec.mode(),
            PipeEvent::SnapshotDone,
            reason,
            None,
            now,
        ) {
            Ok(status) => status,
            Err(_) => return Ok(()),
        }
    } else if record.status.tables != progress || record.status.retrying != retrying {
        let mut status = record.status.clone();
        status.retrying = retrying;
        status
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

/// The failure snapshot workers are retrying, as the pipe's status shows it: the partition
/// that failed last, and how many others wait too.
pub(crate) fn partition_retry(plan: &[SnapshotPartition]) -> Option<Retrying> {
    let waiting: Vec<(&SnapshotPartition, &Retrying)> = plan
        .iter()
        .filter(|p| !p.done)
        .filter_map(|p| Some((p, p.retrying.as_ref()?)))
        .collect();
    let (partition, last) = waiting
        .iter()
        .max_by_key(|(_, r)| r.next_attempt_at.as_ref().map(|t| (t.seconds, t.nanos)))?;
    let others = match waiting.len() - 1 {
        0 => String::new(),
        n => format!(" ({n} more partition(s) waiting too)"),
    };
    Some(Retrying {
        message: format!(
            "snapshot partition {} of {}: {}{others}",
            partition.index, partition.source_table, last.message
        ),
        table: partition.source_table.clone(),
        ..(*last).clone()
    })
}

/// Empties the destination table of a held `table` once no partition of it is being copied
/// (a copy in flight would land its rows after the emptying), then lifts the hold so the
/// table is read again under the current snapshot. Before the snapshot ends the destination
/// holds nothing but snapshot rows, so emptying it loses nothing.
async fn empty_and_release(
    ctx: &SetupContext,
    record: &PipeRecord,
    table: &str,
    parts: &[PlannedPartition],
) -> Result<(), StoreError> {
    let name = &record.spec.name;
    let claims = ctx.store.snapshot_claims(name).await?;
    let owners = ctx.store.keys().snapshot_owners(name);
    let busy = claims.iter().any(|(key, ..)| {
        key.strip_prefix(owners.as_str())
            .and_then(|rest| rest.rsplit_once('/'))
            .is_some_and(|(t, _)| t == table)
    });
    if busy {
        return Ok(());
    }
    let Some(mapping) = record
        .spec
        .tables
        .iter()
        .find(|m| source_table_name(m) == table)
    else {
        return Ok(());
    };
    let secrets = match setup::open_secrets(&ctx.store, &ctx.key, name).await {
        Ok(secrets) => secrets,
        Err(SetupProblem::Store(error)) => return Err(error),
        Err(problem) => {
            warn!(pipe = %name, error = %error_chain(&problem), "cannot empty a table read under two snapshots");
            return Ok(());
        }
    };
    let sink = Sink::new(
        &record.spec.destination.clone().unwrap_or_default(),
        &secrets.destination_password,
    );
    if let Err(error) = sink.truncate(&mapping.destination_table).await {
        warn!(pipe = %name, table = %table, error = %error_chain(&error), "cannot empty a table to read it again");
        return Ok(());
    }
    info!(pipe = %name, table = %table, "table emptied; reading it again under the current snapshot");
    ctx.store.reset_partitions(&ctx.fence, parts, false).await?;
    Ok(())
}
