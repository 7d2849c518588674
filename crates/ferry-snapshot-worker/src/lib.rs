//! The snapshot worker's work loop: find pipes in Snapshot, claim partitions within the pipe's
//! parallelism settings and this worker's capacity, copy them, mark them done.
//!
//! Claims are etcd keys bound to the worker's session lease. If the session is lost every copy
//! stops at once (the lease may expire and another worker take the partition over); a copy
//! that finishes after losing its claim is not marked done by this worker.

pub mod copy;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use ferry_core::PipeState;
use ferry_core::spec::{DEFAULT_PARALLEL_PARTITIONS, DEFAULT_PARALLEL_TABLES};
use ferry_proto::v1::SnapshotPartition;
use ferry_server::membership::Member;
use ferry_server::telemetry::error_chain;
use ferry_server::worker::WorkerContext;
use ferry_store::snapshot::Claim;
use ferry_store::{PipeRecord, StoreError};
use tokio::task::JoinHandle;
use tracing::{Instrument as _, info, info_span, warn};

/// How often the worker looks for work when it has capacity.
const POLL: Duration = Duration::from_millis(500);

/// Runs until shutdown.
pub async fn run(ctx: WorkerContext) {
    let mut running: HashMap<String, JoinHandle<()>> = HashMap::new();
    let mut membership = ctx.membership.clone();
    loop {
        running.retain(|_, task| !task.is_finished());
        let member = membership.borrow_and_update().clone();
        match member {
            None => {
                // No live session: nothing we hold is ours any more (self-fencing).
                for (_, task) in running.drain() {
                    task.abort();
                }
            }
            Some(member) if running.len() < ctx.capacity as usize => {
                if let Err(error) = schedule(&ctx, &member, &mut running).await {
                    warn!(error = %error_chain(&error), "cannot look for snapshot work");
                }
            }
            Some(_) => {}
        }
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = membership.changed() => {}
            _ = ctx.shutdown.requested() => break,
        }
    }
    for (_, task) in running.drain() {
        task.abort();
    }
}

/// Claims what this worker may take now and starts copying it.
async fn schedule(
    ctx: &WorkerContext,
    member: &Member,
    running: &mut HashMap<String, JoinHandle<()>>,
) -> Result<(), StoreError> {
    let listing = ctx.store.list_pipes().await?;
    for record in listing.pipes.values() {
        if record.status.state() != PipeState::Snapshot {
            continue;
        }
        // Wait for the coordinator to publish the snapshot to import (or that there is none).
        let Some(exported) = ctx.store.exported_snapshot(&record.spec.name).await? else {
            continue;
        };
        let plan = ctx.store.snapshot_plan(&record.spec.name).await?;
        let claims = ctx.store.snapshot_claims(&record.spec.name).await?;
        let settings = record.spec.settings.unwrap_or_default();
        let per_table = usize::try_from(
            settings
                .snapshot_parallel_partitions
                .unwrap_or(DEFAULT_PARALLEL_PARTITIONS),
        )
        .unwrap_or(1);
        let tables_at_once = usize::try_from(
            settings
                .snapshot_parallel_tables
                .unwrap_or(DEFAULT_PARALLEL_TABLES),
        )
        .unwrap_or(1);
        // Claimed partitions per table, across all workers.
        let mut active: BTreeMap<String, usize> = BTreeMap::new();
        let owners = ctx.store.keys().snapshot_owners(&record.spec.name);
        for claim in &claims {
            if let Some((table, _)) = claim
                .strip_prefix(owners.as_str())
                .and_then(|rest| rest.rsplit_once('/'))
            {
                *active.entry(table.to_owned()).or_default() += 1;
            }
        }
        let claimed: Vec<&str> = claims.iter().map(|c| c.as_str()).collect();
        let states: HashMap<String, _> = ctx
            .store
            .table_states(&record.spec.name)
            .await?
            .into_iter()
            .collect();
        for (_, partition) in plan {
            if running.len() >= ctx.capacity as usize {
                return Ok(());
            }
            let owner = ctx.store.keys().snapshot_owner(
                &record.spec.name,
                &partition.source_table,
                partition.index,
            );
            if partition.done || claimed.contains(&owner.as_str()) {
                continue;
            }
            let table_active = active.get(&partition.source_table).copied().unwrap_or(0);
            let new_table = table_active == 0;
            if table_active >= per_table || (new_table && active.len() >= tables_at_once) {
                continue;
            }
            let Some(state) = states.get(&partition.source_table).cloned() else {
                continue;
            };
            let Some(claim) = ctx
                .store
                .claim_partition(
                    &member.session,
                    &record.spec.name,
                    &partition,
                    &ctx.worker_id,
                )
                .await?
            else {
                continue;
            };
            *active.entry(partition.source_table.clone()).or_default() += 1;
            ctx.claims.add(&claim.key);
            let snapshot = (!exported.snapshot_id.is_empty()).then(|| exported.snapshot_id.clone());
            let span = info_span!("partition", pipe = %record.spec.name, table = %partition.source_table, partition = partition.index, worker = %ctx.worker_id);
            let task = copy_claimed(
                ctx.clone(),
                member.clone(),
                record.clone(),
                state,
                partition,
                claim.clone(),
                snapshot,
            );
            running.insert(claim.key, tokio::spawn(task.instrument(span)));
        }
    }
    Ok(())
}

/// Copies a claimed partition and records the outcome, stopping if the session is lost.
async fn copy_claimed(
    ctx: WorkerContext,
    member: Member,
    record: PipeRecord,
    state: ferry_proto::v1::TableState,
    mut partition: SnapshotPartition,
    claim: Claim,
    snapshot: Option<String>,
) {
    let session = Arc::clone(&member.session);
    let copied = tokio::select! {
        copied = copy::copy_partition(&ctx.store, &ctx.secret_key, &record.spec, &state, &partition, snapshot.as_deref()) => copied,
        _ = session.lost() => {
            warn!("session lost; abandoning the partition");
            ctx.claims.remove(&claim.key);
            return;
        }
    };
    let outcome = match copied {
        Ok(copied) => {
            partition.done = true;
            partition.rows_copied = copied.rows;
            partition.worker_id = ctx.worker_id.clone();
            partition.last_error.clear();
            match ctx.store.complete_partition(&claim, &partition).await {
                Ok(true) => {
                    info!(
                        rows = copied.rows,
                        imported_snapshot = copied.imported_snapshot,
                        "partition copied"
                    );
                    Ok(())
                }
                Ok(false) => {
                    warn!(
                        "claim lost before the partition was marked done; another worker redoes it"
                    );
                    Ok(())
                }
                Err(error) => Err(error),
            }
        }
        Err(error) => {
            let text = error_chain(&error);
            warn!(error = %text, "partition copy failed");
            partition.attempts += 1;
            partition.last_error = text;
            ctx.store.release_claim(&claim, Some(&partition)).await
        }
    };
    if let Err(error) = outcome {
        warn!(error = %error_chain(&error), "cannot record the partition's outcome; its claim expires with the lease");
    }
    ctx.claims.remove(&claim.key);
}
