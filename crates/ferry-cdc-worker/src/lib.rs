//! The CDC worker's work loop: claim the streams of running pipes within this worker's
//! capacity and run them (see [`stream`]), starting a stream again after an error worth
//! retrying (`supervise`); stop a stream when its pipe stops running or the worker's session
//! is lost (self-fencing: the claim may pass to another worker once the lease expires, and by
//! then this one has stopped).

mod error;
mod evolve;
mod fence;
mod reload;
pub mod stream;
mod supervise;
mod table;
mod toast;

use std::collections::HashMap;
use std::time::Duration;

use ferry_core::{PipeMode, PipeState};
use ferry_server::telemetry::error_chain;
use ferry_server::worker::WorkerContext;
use ferry_store::{PipeRecord, StoreError};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{Instrument as _, info, info_span, warn};

/// How often the worker looks for streams to run.
const POLL: Duration = Duration::from_millis(500);

/// A stream in progress: its task, the signal asking it to stop at a checkpoint, and the spec
/// revision and reload step it runs with (a change of either restarts it).
struct Stream {
    task: JoinHandle<()>,
    stop: watch::Sender<bool>,
    spec_revision: i64,
    reload: Option<(u64, i32, u64)>,
}

/// The reload step a stream of `record` runs with: generation, phase and boundary.
fn reload_step(record: &PipeRecord) -> Option<(u64, i32, u64)> {
    record
        .status
        .reload
        .as_ref()
        .map(|r| (r.generation, r.phase, r.start_lsn))
}

/// Whether the pipe's changes are streamed in its current state: while running, and while
/// tables are reloaded, added or removed (the other tables keep streaming).
fn streams(record: &PipeRecord) -> bool {
    if record.spec.mode() == PipeMode::SnapshotOnly {
        return false;
    }
    match record.status.state() {
        PipeState::Running | PipeState::Modifying | PipeState::Resync => true,
        // Tables added to a running pipe are copied in Snapshot.
        PipeState::Snapshot => record.status.reload.is_some(),
        _ => false,
    }
}

/// Runs until shutdown.
pub async fn run(ctx: WorkerContext) {
    let mut running: HashMap<String, Stream> = HashMap::new();
    let mut membership = ctx.membership.clone();
    loop {
        running.retain(|_, stream| !stream.task.is_finished());
        let member = membership.borrow_and_update().clone();
        match member {
            None => {
                // No live session: nothing we hold is ours any more (self-fencing).
                for (_, stream) in running.drain() {
                    stream.task.abort();
                }
            }
            Some(member) => {
                if let Err(error) = schedule(&ctx, &member, &mut running).await {
                    warn!(error = %error_chain(&error), "cannot look for streams");
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = membership.changed() => {}
            _ = ctx.shutdown.requested() => break,
        }
    }
    // Shutdown: each stream stops at its next checkpoint, bounded so SIGTERM is honoured.
    for stream in running.values() {
        stream.stop.send_replace(true);
    }
    for (_, stream) in running.drain() {
        let _ = tokio::time::timeout(Duration::from_secs(10), stream.task).await;
    }
}

async fn schedule(
    ctx: &WorkerContext,
    member: &ferry_server::membership::Member,
    running: &mut HashMap<String, Stream>,
) -> Result<(), StoreError> {
    let listing = ctx.store.list_pipes().await?;
    let streaming: Vec<_> = listing.pipes.values().filter(|r| streams(r)).collect();
    for (pipe, stream) in running.iter() {
        let current = streaming.iter().find(|r| &r.spec.name == pipe);
        let pausing = listing
            .pipes
            .get(pipe)
            .is_some_and(|r| r.status.state() == PipeState::Pausing);
        match current {
            // Settings changed: stop at a checkpoint; the next poll starts it with the new ones.
            Some(record)
                if record.spec_revision != stream.spec_revision
                    || reload_step(record) != stream.reload =>
            {
                stream.stop.send_replace(true);
            }
            Some(_) => {}
            // Pausing: flush and checkpoint the batch, then stop.
            None if pausing => {
                stream.stop.send_replace(true);
            }
            // Anything else (deleting, failed): stop at once.
            None => {
                info!(pipe = %pipe, "pipe stopped running; stopping its stream");
                stream.task.abort();
            }
        }
    }
    running.retain(|pipe, stream| {
        let keep = !stream.task.is_finished();
        if !keep {
            ctx.claims.remove(&ctx.store.keys().cdc_owner(pipe));
        }
        keep
    });
    // A claim of ours without a stream (the stream was aborted when its pipe failed, or its
    // release failed): hand it back, or the pipe could never be paused or streamed again while
    // this worker lives.
    let lease = member.session.lease_id();
    for (pipe, key) in ctx.store.cdc_claims_of(lease).await? {
        if !running.contains_key(&pipe) {
            warn!(pipe = %pipe, "releasing a stream claim without a stream");
            ctx.store.drop_cdc_claim(&key, lease).await?;
            ctx.claims.remove(&key);
        }
    }
    for record in streaming {
        let name = &record.spec.name;
        if running.len() >= ctx.capacity as usize || running.contains_key(name) {
            continue;
        }
        let Some(claim) = ctx
            .store
            .claim_cdc(
                &member.session,
                name,
                record.status_revision,
                &ctx.worker_id,
            )
            .await?
        else {
            continue;
        };
        ctx.claims.add(&claim.key);
        let (ctx2, member2, record2) = (ctx.clone(), member.clone(), record.clone());
        let (stop, stop_rx) = watch::channel(false);
        let span = info_span!("stream", pipe = %name, worker = %ctx.worker_id);
        let task = async move {
            supervise::run(&ctx2, &member2, record2, &claim, stop_rx).await;
            // Hand the stream back so this or another worker resumes from the checkpoint.
            let _ = ctx2.store.release_cdc(&claim).await;
            ctx2.claims.remove(&claim.key);
        };
        running.insert(
            name.clone(),
            Stream {
                task: tokio::spawn(task.instrument(span)),
                stop,
                spec_revision: record.spec_revision,
                reload: reload_step(record),
            },
        );
    }
    Ok(())
}
