//! The snapshot worker's work loop: find pipes in Snapshot, claim partitions within the pipe's
//! parallelism settings and this worker's capacity, copy them, mark them done.
//!
//! Claims are etcd keys bound to the worker's session lease. If the session is lost every copy
//! stops at once (the lease may expire and another worker take the partition over); a copy
//! that finishes after losing its claim is not marked done by this worker.

pub mod copy;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ferry_core::PipeState;
use ferry_core::error_policy::{self, ErrorClass, Verdict};
use ferry_core::spec::{DEFAULT_PARALLEL_PARTITIONS, DEFAULT_PARALLEL_TABLES};
use ferry_postgres::SourceError;
use ferry_proto::v1::{ReloadPhase, Retrying, SnapshotPartition};
use ferry_server::membership::Member;
use ferry_server::telemetry::error_chain;
use ferry_server::worker::WorkerContext;
use ferry_store::snapshot::Claim;
use ferry_store::{PipeRecord, StoreError};
use tokio::task::JoinHandle;
use tracing::{Instrument as _, info, info_span, warn};

/// How often the worker looks for work when it has capacity.
const POLL: Duration = Duration::from_millis(500);

/// A copy in progress, by owner key.
type Running = HashMap<String, (String, JoinHandle<()>)>;

/// Runs until shutdown.
pub async fn run(ctx: WorkerContext) {
    let mut running: Running = HashMap::new();
    let mut membership = ctx.membership.clone();
    loop {
        running.retain(|_, (_, task)| !task.is_finished());
        let member = membership.borrow_and_update().clone();
        match member {
            None => {
                // No live session: nothing we hold is ours any more (self-fencing).
                for (_, (_, task)) in running.drain() {
                    task.abort();
                }
            }
            Some(member) => {
                if let Err(error) = schedule(&ctx, &member, &mut running).await {
                    warn!(error = %error_chain(&error), "cannot look for snapshot work");
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = membership.changed() => {}
            _ = ctx.shutdown.requested() => break,
        }
    }
    for (_, (_, task)) in running.drain() {
        task.abort();
    }
}

/// Stops copies of pipes that failed or are being deleted, releases claims of ours that have
/// no copy (left by an ambiguous etcd failure), then claims what this worker may take now
/// (only of pipes in Snapshot).
async fn schedule(
    ctx: &WorkerContext,
    member: &Member,
    running: &mut Running,
) -> Result<(), StoreError> {
    let listing = ctx.store.list_pipes().await?;
    let snapshotting: Vec<&PipeRecord> = listing.pipes.values().filter(|r| copying(r)).collect();
    running.retain(|key, (pipe, task)| {
        // Copies go on while the pipe copies, pauses or is paused; a reload that starts over
        // (new generation) passes through Holding, which stops its copies.
        let keep = listing.pipes.get(pipe).is_some_and(|r| {
            copies_continue(r.status.state())
                && r.status
                    .reload
                    .as_ref()
                    .is_none_or(|reload| reload.phase() == ReloadPhase::Copying)
        });
        if !keep {
            info!(claim = %key, "pipe failed or is being deleted; stopping its copy");
            task.abort();
            ctx.claims.remove(key);
        }
        keep
    });
    for record in snapshotting {
        let name = &record.spec.name;
        let claims = ctx.store.snapshot_claims(name).await?;
        for (key, holder, lease) in &claims {
            if *holder == ctx.worker_id
                && *lease == member.session.lease_id()
                && !running.contains_key(key)
            {
                warn!(claim = %key, "releasing a claim without a copy");
                ctx.store.drop_claim(key, *lease).await?;
            }
        }
        if running.len() >= ctx.capacity as usize {
            continue;
        }
        // Partitions are read only under the coordinator's exported snapshot.
        let Some(exported) = ctx.store.exported_snapshot(name).await? else {
            continue;
        };
        let plan = ctx.store.snapshot_plan(name).await?;
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
        let owners = ctx.store.keys().snapshot_owners(name);
        let mut active: BTreeMap<String, usize> = BTreeMap::new();
        for (key, ..) in &claims {
            if let Some((table, _)) = key
                .strip_prefix(owners.as_str())
                .and_then(|rest| rest.rsplit_once('/'))
            {
                *active.entry(table.to_owned()).or_default() += 1;
            }
        }
        let claimed: Vec<&str> = claims.iter().map(|(key, ..)| key.as_str()).collect();
        let states: HashMap<String, _> = ctx.store.table_states(name).await?.into_iter().collect();
        // Claims hold only while the pipe is as read just now (not paused since).
        let Some(current) = ctx.store.get_pipe(name).await? else {
            continue;
        };
        if !copying(&current) {
            continue;
        }
        for planned in plan {
            if running.len() >= ctx.capacity as usize {
                break;
            }
            let partition = &planned.partition;
            let owner =
                ctx.store
                    .keys()
                    .snapshot_owner(name, &partition.source_table, partition.index);
            if partition.done
                || partition.held
                || claimed.contains(&owner.as_str())
                || backing_off(partition, SystemTime::now())
            {
                continue;
            }
            // During a reload only its own partitions are copied, once its snapshot is taken.
            if let Some(reload) = &record.status.reload
                && (reload.phase() != ReloadPhase::Copying
                    || partition.reload_generation != reload.generation)
            {
                continue;
            }
            let table_active = active.get(&partition.source_table).copied().unwrap_or(0);
            if table_active >= per_table || (table_active == 0 && active.len() >= tables_at_once) {
                continue;
            }
            let Some(state) = states.get(&partition.source_table).cloned() else {
                continue;
            };
            let Some(claim) = ctx
                .store
                .claim_partition_while(
                    &member.session,
                    name,
                    current.status_revision,
                    &planned,
                    &ctx.worker_id,
                )
                .await?
            else {
                continue;
            };
            *active.entry(partition.source_table.clone()).or_default() += 1;
            ctx.claims.add(&claim.key);
            let span = info_span!("partition", pipe = %name, table = %partition.source_table, partition = partition.index, worker = %ctx.worker_id);
            let task = copy_claimed(
                ctx.clone(),
                member.clone(),
                record.clone(),
                state,
                planned.partition.clone(),
                claim.clone(),
                exported.snapshot_id.clone(),
            );
            running.insert(
                claim.key,
                (name.clone(), tokio::spawn(task.instrument(span))),
            );
        }
    }
    Ok(())
}

/// Whether the pipe's partitions are being copied: its first snapshot, a resync, or tables
/// added to it.
fn copying(record: &PipeRecord) -> bool {
    match record.status.state() {
        PipeState::Snapshot => true,
        PipeState::Resync => record.status.reload.is_some(),
        _ => false,
    }
}

/// Whether copies in flight of a pipe in `state` go on: while it copies (Snapshot, Resync),
/// and while it pauses or is paused (they finish and are marked done, so a resume does not
/// redo them); a pipe that failed or is being deleted stops them at once.
fn copies_continue(state: PipeState) -> bool {
    matches!(
        state,
        PipeState::Snapshot | PipeState::Resync | PipeState::Pausing | PipeState::Paused
    )
}

/// Copies a claimed partition and records the outcome, stopping if the session is lost.
async fn copy_claimed(
    ctx: WorkerContext,
    member: Member,
    record: PipeRecord,
    state: ferry_proto::v1::TableState,
    mut partition: SnapshotPartition,
    claim: Claim,
    snapshot: String,
) {
    let session = Arc::clone(&member.session);
    let copied = tokio::select! {
        copied = copy::copy_partition(&ctx.store, &ctx.secret_key, &record.spec, &state, &partition, Some(&snapshot)) => copied,
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
            partition.altered = copied.altered;
            partition.worker_id = ctx.worker_id.clone();
            partition.snapshot_id = snapshot;
            partition.snapshot_visibility = copied.visibility;
            partition.last_error.clear();
            partition.retrying = None;
            complete(&ctx, &claim, &partition).await
        }
        // Not the partition's fault: wait for the coordinator's next export.
        Err(copy::PartitionError::Source(SourceError::SnapshotGone { .. })) => {
            info!("exported snapshot gone; the partition waits for a new one");
            ctx.store.release_claim(&claim, None).await
        }
        Err(error) => {
            let text = error_chain(&error);
            let verdict = error.verdict(&record.spec.name, &partition.source_table);
            partition.last_error.clone_from(&text);
            if verdict.class.retries() {
                // Copied again once the backoff passes, by whichever worker claims it then.
                let retrying = retry_partition(&partition, text, verdict);
                warn!(error = %retrying.message, attempt = retrying.attempt, "partition copy failed; it is retried");
                partition.retrying = Some(retrying);
            } else {
                warn!(error = %text, "partition copy failed; the pipe fails");
                partition.attempts += 1;
                partition.retrying = None;
                // The coordinator fails the pipe at once on a partition with a remedy.
                partition.last_remedy = verdict.remedy;
            }
            ctx.store.release_claim(&claim, Some(&partition)).await
        }
    };
    if let Err(error) = outcome {
        // The claim is left behind; the next poll finds it without a copy and releases it.
        warn!(error = %error_chain(&error), "cannot record the partition's outcome");
    }
    ctx.claims.remove(&claim.key);
}

/// The retry of `partition` after a failure worth retrying (`message`), paced by the
/// partition schedule from its failures so far.
fn retry_partition(partition: &SnapshotPartition, message: String, verdict: Verdict) -> Retrying {
    let previous = partition.retrying.as_ref();
    let attempt = previous.map_or(0, |r| r.attempt) + 1;
    let now = SystemTime::now();
    let delay = ferry_server::retry::delay(&error_policy::PARTITION, attempt);
    let waits = verdict.class == ErrorClass::RetryAfterAction;
    Retrying {
        message,
        remedy: if waits { verdict.remedy } else { String::new() },
        attempt,
        next_attempt_at: Some((now + delay).into()),
        since: previous.and_then(|r| r.since).or_else(|| Some(now.into())),
        waits_for_action: waits,
        table: partition.source_table.clone(),
    }
}

/// Whether `partition` waits out a retry's backoff at `now`.
fn backing_off(partition: &SnapshotPartition, now: SystemTime) -> bool {
    partition
        .retrying
        .as_ref()
        .and_then(|r| r.next_attempt_at)
        .and_then(|at| SystemTime::try_from(at).ok())
        .is_some_and(|at| at > now)
}

/// Marks the partition done, retrying etcd failures a few times.
async fn complete(
    ctx: &WorkerContext,
    claim: &Claim,
    partition: &SnapshotPartition,
) -> Result<(), StoreError> {
    let mut attempt = 1;
    loop {
        match ctx.store.complete_partition(claim, partition).await {
            Ok(true) => {
                info!(rows = partition.rows_copied, "partition copied");
                return Ok(());
            }
            Ok(false) => {
                warn!("claim lost or partition re-planned before it was marked done; it is redone");
                return Ok(());
            }
            Err(error) if attempt < 3 && error.class().passes_by_itself() => {
                warn!(error = %error_chain(&error), "cannot mark the partition done; retrying");
                tokio::time::sleep(Duration::from_millis(500) * attempt).await;
                attempt += 1;
            }
            Err(error) => return Err(error),
        }
    }
}
