//! Level-triggered reconciliation: the leader compares every pipe's stored state with what
//! exists (workers, resources, snapshot progress) and takes the next step. It runs on gaining
//! leadership, after every change under the prefix, and every `resync_interval` regardless, so
//! a missed watch event or a restart can delay a step but never strand a pipe.
//!
//! Steps that talk to Postgres or ClickHouse (Setup, holding the exported snapshot, cleanup on
//! delete) run as per-pipe tasks so one slow source cannot hold up the others; they belong to
//! the leadership and are aborted with it.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::time::{Duration, SystemTime};

use backon::Retryable as _;
use ferry_core::error_policy;
use ferry_core::lifecycle::{self, PipeEvent};
use ferry_core::secret::SecretKey;
use ferry_core::{PipeMode, PipeState, WorkerKind};
use ferry_proto::v1::WorkerRegistration;
use ferry_server::shutdown::Shutdown;
use ferry_server::telemetry::error_chain;
use ferry_store::watch::PrefixWatch;
use ferry_store::{Fence, PipeRecord, Store, StoreError};
use tokio::task::JoinHandle;
use tracing::{Instrument as _, debug, info, info_span, warn};

use crate::leadership::{Deposed, LeaderFence};
use crate::reload;
use crate::setup::{self, SetupContext};
use crate::{cleanup, pause, slot_health, snapshot};

/// What reconciliation works with.
#[derive(Debug, Clone)]
pub struct Reconciler {
    /// etcd.
    pub store: Store,
    /// Opens pipe secrets for Setup, the snapshot holder and cleanup.
    pub key: SecretKey,
    /// This coordinator's id (recorded as the exported snapshot's holder).
    pub me: String,
    /// Seconds between full passes, on top of watch-triggered ones.
    pub resync_interval: Duration,
}

/// Runs reconciliation whenever this replica leads, until shutdown.
pub async fn run(
    reconciler: Reconciler,
    mut fence: LeaderFence,
    deposed: Deposed,
    shutdown: Shutdown,
) {
    loop {
        let current = fence.borrow_and_update().clone();
        if let Some(leader) = current {
            tokio::select! {
                // Fenced: ask the leadership loop to step down, then wait for the next fence.
                _ = lead(&reconciler, &leader) => deposed.report(),
                changed = fence.changed() => {
                    if changed.is_err() { return }
                    continue;
                }
                _ = shutdown.requested() => return,
            }
        }
        tokio::select! {
            changed = fence.changed() => if changed.is_err() { return },
            _ = shutdown.requested() => return,
        }
    }
}

/// What a per-pipe task does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Job {
    Setup,
    HoldSnapshot,
    Cleanup,
    /// A reload's Holding phase, then the holder of its copy's snapshot.
    Reload,
    /// A resync's swap.
    Swap,
    /// One check of the replication slot (see [`slot_health`]); started at most once per
    /// check period, which stands in for the status revision.
    SlotHealth,
}

/// Per-pipe tasks of this leadership; dropping the set aborts them all. Each remembers the
/// status revision it was started for: a job that finished is not started again for the same
/// revision (the pass that listed the pipe before the job moved it must not repeat it).
#[derive(Debug, Default)]
pub(crate) struct Tasks(HashMap<(String, Job), (i64, JoinHandle<()>)>);

impl Tasks {
    /// Starts `job` for `pipe` at `revision` unless it runs, or already ran for that revision.
    pub(crate) fn ensure(
        &mut self,
        pipe: &str,
        job: Job,
        revision: i64,
        work: impl Future<Output = ()> + Send + 'static,
    ) {
        let key = (pipe.to_owned(), job);
        if let Some((started_for, task)) = self.0.get(&key)
            && (!task.is_finished() || *started_for == revision)
        {
            return;
        }
        let span = info_span!("job", pipe = %pipe, job = ?job);
        self.0
            .insert(key, (revision, tokio::spawn(work.instrument(span))));
    }

    pub(crate) fn running(&self, pipe: &str, job: Job) -> bool {
        self.0
            .get(&(pipe.to_owned(), job))
            .is_some_and(|(_, task)| !task.is_finished())
    }

    pub(crate) fn stop(&mut self, pipe: &str, job: Job) {
        if let Some((_, task)) = self.0.remove(&(pipe.to_owned(), job)) {
            task.abort();
        }
    }

    /// Aborts the tasks of pipes that no longer exist.
    fn retain_pipes(&mut self, live: &BTreeMap<String, PipeRecord>) {
        self.0.retain(|(pipe, _), (_, task)| {
            let keep = live.contains_key(pipe);
            if !keep {
                task.abort();
            }
            keep
        });
    }
}

impl Drop for Tasks {
    fn drop(&mut self) {
        for (_, task) in self.0.values() {
            task.abort();
        }
    }
}

/// Reconciles while leading. Returns only if the leadership is found fenced.
async fn lead(reconciler: &Reconciler, fence: &Fence) {
    let store = &reconciler.store;
    let mut tasks = Tasks::default();
    let mut watch: Option<PrefixWatch> = None;
    loop {
        match reconcile_all(reconciler, fence, &mut tasks).await {
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
        let periodic = tokio::time::sleep(reconciler.resync_interval);
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
async fn reconcile_all(
    reconciler: &Reconciler,
    fence: &Fence,
    tasks: &mut Tasks,
) -> Result<i64, StoreError> {
    let store = &reconciler.store;
    let listing = store.list_pipes().await?;
    tasks.retain_pipes(&listing.pipes);
    let workers = Workers::read(store).await?;
    let ctx = SetupContext {
        store: store.clone(),
        fence: fence.clone(),
        key: reconciler.key.clone(),
    };
    for (name, record) in &listing.pipes {
        let span = info_span!("reconcile", pipe = %name);
        let step = reconcile_pipe(reconciler, &ctx, record, &workers, tasks).instrument(span);
        match step.await {
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
    reconciler: &Reconciler,
    ctx: &SetupContext,
    record: &PipeRecord,
    workers: &Workers,
    tasks: &mut Tasks,
) -> Result<(), StoreError> {
    let name = &record.spec.name;
    let state = record.status.state();
    if !pause::holds_snapshot(record) {
        tasks.stop(name, Job::HoldSnapshot);
    }
    if slot_health::watched(state) {
        let (ctx, record) = (ctx.clone(), record.clone());
        let check = slot_health::check(ctx, record);
        tasks.ensure(name, Job::SlotHealth, slot_health::period(), check);
    }
    if matches!(state, PipeState::Failed | PipeState::Deleting) || record.status.reload.is_none() {
        tasks.stop(name, Job::Reload);
        tasks.stop(name, Job::Swap);
    }
    if let Some(reload) = &record.status.reload
        && matches!(
            state,
            PipeState::Resync | PipeState::Modifying | PipeState::Snapshot
        )
    {
        if reload::streams(&record.spec) && fail_on_stream_error(ctx, record).await? {
            return Ok(());
        }
        return reload::advance(ctx, record, reload, tasks).await;
    }
    match state {
        PipeState::Provisioning => {
            let missing = needed_kinds(record.spec.mode())
                .into_iter()
                .any(|kind| workers.of(kind).iter().all(|w| w.capacity == 0));
            if missing {
                debug!("waiting for workers");
                return Ok(());
            }
            let available: Vec<String> = needed_kinds(record.spec.mode())
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
            transition(ctx, record, PipeEvent::WorkersReady, reason).await
        }
        PipeState::Setup => {
            let (ctx, record) = (ctx.clone(), record.clone());
            tasks.ensure(name, Job::Setup, record.status_revision, async move {
                retrying("setup", || setup::run(ctx.clone(), record.clone())).await;
            });
            Ok(())
        }
        PipeState::Snapshot => {
            let (holder_ctx, holder_record, me) =
                (ctx.clone(), record.clone(), reconciler.me.clone());
            // The holder lives as long as the pipe is in Snapshot under this leadership.
            tasks.ensure(
                name,
                Job::HoldSnapshot,
                0,
                snapshot::hold(holder_ctx, holder_record, me),
            );
            snapshot::advance(ctx, record).await
        }
        PipeState::Running => fail_on_stream_error(ctx, record).await.map(|_| ()),
        PipeState::Pausing | PipeState::Paused => {
            // A snapshot paused midway continues under the snapshot it started with.
            if pause::holds_snapshot(record) {
                let (holder_ctx, holder_record, me) =
                    (ctx.clone(), record.clone(), reconciler.me.clone());
                let hold = snapshot::hold(holder_ctx, holder_record, me);
                tasks.ensure(name, Job::HoldSnapshot, 0, hold);
            }
            // Paused once no worker holds the stream (the owner releases it after flushing and
            // checkpointing its batch, or its lease expires if it died) or a partition.
            if state == PipeState::Pausing {
                pause::settle(ctx, record).await
            } else {
                Ok(())
            }
        }
        PipeState::Deleting => {
            // A running Setup may be creating the slot or publication right now: let it end
            // (it is bounded by timeouts) so cleanup drops what it created.
            if tasks.running(name, Job::Setup) {
                debug!("waiting for setup to finish before cleaning up");
                return Ok(());
            }
            let (ctx, record) = (ctx.clone(), record.clone());
            tasks.ensure(name, Job::Cleanup, record.status_revision, async move {
                retrying("cleanup", || cleanup::run(&ctx, &record)).await;
            });
            Ok(())
        }
        state => {
            debug!(
                state = lifecycle::state_name(state),
                "no coordinator step for this state"
            );
            Ok(())
        }
    }
}

/// Fails the pipe with the error its CDC worker reported, if any: something retrying cannot
/// fix. Returns whether it did.
async fn fail_on_stream_error(ctx: &SetupContext, record: &PipeRecord) -> Result<bool, StoreError> {
    let name = &record.spec.name;
    let Some(error) = ctx.store.stream_error(name).await? else {
        return Ok(false);
    };
    let Ok(status) = lifecycle::apply(
        &record.status,
        record.spec.mode(),
        PipeEvent::Failed,
        "replication failed",
        Some(error),
        SystemTime::now(),
    ) else {
        return Ok(false);
    };
    ctx.store
        .put_pipe_status(&ctx.fence, name, record.status_revision, &status)
        .await?;
    warn!(pipe = %name, "pipe failed: replication cannot continue");
    Ok(true)
}

/// Runs a job until it succeeds, retrying what etcd failed with backoff; stops if the
/// leadership or the pipe moved on (fenced, or a compare-and-swap lost), since a later pass
/// decides then.
pub(crate) async fn retrying<F, Fut>(job: &'static str, run: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<(), StoreError>>,
{
    let outcome = run
        .retry(ferry_server::retry::builder(&error_policy::JOB))
        .when(|error| !matches!(error, StoreError::Fenced | StoreError::Conflict { .. }))
        .notify(|error, delay| {
            warn!(job, error = %error_chain(error), next_in_ms = delay.as_millis() as u64, "interrupted; retrying");
        })
        .await;
    if let Err(error) = outcome {
        debug!(job, error = %error_chain(&error), "job stopped: a later pass decides");
    }
}

/// Applies `event` to the pipe's status and writes it (compare-and-swap).
pub(crate) async fn transition(
    ctx: &SetupContext,
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
    ctx.store
        .put_pipe_status(&ctx.fence, name, record.status_revision, &status)
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
