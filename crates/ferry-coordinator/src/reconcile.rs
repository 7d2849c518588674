//! Level-triggered reconciliation: the leader compares every pipe's stored state with what
//! exists (workers, resources) and takes the next step. It runs on gaining leadership, after
//! every change under the prefix, and every `resync_interval` regardless, so a missed watch
//! event or a restart can delay a step but never strand a pipe.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use ferry_core::lifecycle::{self, PipeEvent, has_started_replicating};
use ferry_core::{PipeMode, PipeState, WorkerKind};
use ferry_proto::v1::WorkerRegistration;
use ferry_server::shutdown::Shutdown;
use ferry_store::watch::PrefixWatch;
use ferry_store::{Fence, PipeRecord, Store, StoreError};
use tracing::{Instrument as _, debug, info, info_span, warn};

use ferry_server::telemetry::error_chain;

use crate::leadership::{Deposed, LeaderFence};

/// Runs reconciliation whenever this replica leads, until shutdown.
pub async fn run(
    store: Store,
    mut fence: LeaderFence,
    deposed: Deposed,
    resync_interval: Duration,
    shutdown: Shutdown,
) {
    loop {
        let current = fence.borrow_and_update().clone();
        match current {
            Some(leader) => {
                tokio::select! {
                    // Fenced: the leadership loop steps down and clears the fence.
                    _ = lead(&store, &leader, resync_interval) => {
                        deposed.report();
                        tokio::select! {
                            changed = fence.changed() => if changed.is_err() { return },
                            _ = shutdown.requested() => return,
                        }
                    }
                    changed = fence.changed() => if changed.is_err() { return },
                    _ = shutdown.requested() => return,
                }
            }
            None => {
                tokio::select! {
                    changed = fence.changed() => if changed.is_err() { return },
                    _ = shutdown.requested() => return,
                }
            }
        }
    }
}

/// Reconciles while leading. Returns only if the leadership is found fenced.
async fn lead(store: &Store, fence: &Fence, resync_interval: Duration) {
    let mut watch: Option<PrefixWatch> = None;
    loop {
        match reconcile_all(store, fence).await {
            Ok(revision) => {
                let prefix = format!("{}/", store.keys().prefix());
                watch.get_or_insert_with(|| PrefixWatch::new(store, prefix, revision + 1));
            }
            Err(StoreError::Fenced) => {
                warn!("reconcile fenced: leadership lost");
                return;
            }
            Err(error) => warn!(error = %error_chain(&error), "reconcile failed; will retry"),
        }
        let periodic = tokio::time::sleep(resync_interval);
        let changed = match watch.as_mut() {
            Some(w) => tokio::select! {
                changed = w.next() => Some(changed),
                _ = periodic => None,
            },
            None => {
                periodic.await;
                None
            }
        };
        // Compacted history: drop the watch; the next pass re-lists and re-opens it.
        if let Some(Err(_)) = changed {
            watch = None;
        }
    }
}

/// One pass over every pipe. Returns the revision the pass read at.
async fn reconcile_all(store: &Store, fence: &Fence) -> Result<i64, StoreError> {
    let listing = store.list_pipes().await?;
    let workers = Workers::read(store).await?;
    for (name, record) in &listing.pipes {
        let span = info_span!("reconcile", pipe = %name);
        match reconcile_pipe(store, fence, record, &workers)
            .instrument(span)
            .await
        {
            Ok(()) => {}
            Err(StoreError::Fenced) => return Err(StoreError::Fenced),
            // Someone else moved the pipe since the listing; the watch brings us back.
            Err(StoreError::Conflict { .. }) => {
                debug!(pipe = %name, "pipe changed during reconcile")
            }
            Err(error) => {
                warn!(pipe = %name, error = %error_chain(&error), "cannot reconcile pipe")
            }
        }
    }
    Ok(listing.revision)
}

/// The live worker pools.
struct Workers(BTreeMap<i32, Vec<WorkerRegistration>>);

impl Workers {
    async fn read(store: &Store) -> Result<Self, StoreError> {
        let mut pools = BTreeMap::new();
        for kind in [WorkerKind::Snapshot, WorkerKind::Cdc] {
            pools.insert(kind as i32, store.list_workers(kind).await?);
        }
        Ok(Self(pools))
    }

    fn of(&self, kind: WorkerKind) -> &[WorkerRegistration] {
        self.0.get(&(kind as i32)).map_or(&[], Vec::as_slice)
    }
}

/// The worker pools a pipe of `mode` needs.
fn needed_kinds(mode: PipeMode) -> Vec<WorkerKind> {
    match mode {
        PipeMode::SnapshotOnly => vec![WorkerKind::Snapshot],
        PipeMode::CdcOnly => vec![WorkerKind::Cdc],
        PipeMode::SnapshotAndCdc | PipeMode::Unspecified => {
            vec![WorkerKind::Snapshot, WorkerKind::Cdc]
        }
    }
}

async fn reconcile_pipe(
    store: &Store,
    fence: &Fence,
    record: &PipeRecord,
    workers: &Workers,
) -> Result<(), StoreError> {
    let name = &record.spec.name;
    let mode = record.spec.mode();
    match record.status.state() {
        PipeState::Provisioning => {
            let missing: Vec<_> = needed_kinds(mode)
                .into_iter()
                .filter(|kind| workers.of(*kind).iter().all(|w| w.capacity == 0))
                .collect();
            if !missing.is_empty() {
                debug!(?missing, "waiting for workers");
                return Ok(());
            }
            let available: Vec<String> = needed_kinds(mode)
                .into_iter()
                .map(|kind| {
                    let ids: Vec<&str> = workers
                        .of(kind)
                        .iter()
                        .map(|w| w.worker_id.as_str())
                        .collect();
                    format!(
                        "{} worker(s) {}",
                        ferry_store::keys::kind_segment(kind),
                        ids.join(", ")
                    )
                })
                .collect();
            let reason = format!("workers available: {}", available.join("; "));
            transition(store, fence, record, PipeEvent::WorkersReady, reason).await
        }
        PipeState::Deleting if !has_started_replicating(record.status.previous_state()) => {
            // Nothing exists outside etcd yet: removing the keys is the whole cleanup.
            store
                .delete_pipe(fence, name, record.status_revision)
                .await?;
            info!(pipe = %name, "pipe deleted");
            Ok(())
        }
        state => {
            debug!(
                state = lifecycle::state_name(state),
                "no coordinator step for this state yet"
            );
            Ok(())
        }
    }
}

async fn transition(
    store: &Store,
    fence: &Fence,
    record: &PipeRecord,
    event: PipeEvent,
    reason: String,
) -> Result<(), StoreError> {
    let name = &record.spec.name;
    let status = match lifecycle::apply(
        &record.status,
        record.spec.mode(),
        event,
        reason,
        None,
        SystemTime::now(),
    ) {
        Ok(status) => status,
        Err(illegal) => {
            // The listing said the event applies; a concurrent change made it stale.
            debug!(pipe = %name, %illegal, "transition no longer applies");
            return Ok(());
        }
    };
    store
        .put_pipe_status(fence, name, record.status_revision, &status)
        .await?;
    info!(
        pipe = %name,
        from = lifecycle::state_name(record.status.state()),
        to = lifecycle::state_name(status.state()),
        reason = %status.reason,
        "pipe state changed"
    );
    Ok(())
}
