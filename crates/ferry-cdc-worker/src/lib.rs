//! The CDC worker's work loop: claim the streams of running pipes within this worker's
//! capacity and run them (see [`stream`]); stop a stream when its pipe stops running or the
//! worker's session is lost (self-fencing: the claim may pass to another worker once the
//! lease expires, and by then this one has stopped).

pub mod stream;

use std::collections::HashMap;
use std::time::Duration;

use ferry_core::{PipeMode, PipeState};
use ferry_server::telemetry::error_chain;
use ferry_server::worker::WorkerContext;
use ferry_store::StoreError;
use tokio::task::JoinHandle;
use tracing::{Instrument as _, info, info_span, warn};

/// How often the worker looks for streams to run.
const POLL: Duration = Duration::from_millis(500);
/// Wait after a stream failed before it may be claimed again (by anyone).
const RETRY: Duration = Duration::from_secs(2);

/// Runs until shutdown.
pub async fn run(ctx: WorkerContext) {
    let mut running: HashMap<String, JoinHandle<()>> = HashMap::new();
    let mut membership = ctx.membership.clone();
    loop {
        running.retain(|_, task| !task.is_finished());
        let member = membership.borrow_and_update().clone();
        match member {
            None => {
                for (_, task) in running.drain() {
                    task.abort();
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
    for (_, task) in running.drain() {
        task.abort();
    }
}

async fn schedule(
    ctx: &WorkerContext,
    member: &ferry_server::membership::Member,
    running: &mut HashMap<String, JoinHandle<()>>,
) -> Result<(), StoreError> {
    let listing = ctx.store.list_pipes().await?;
    let streaming: Vec<_> = listing
        .pipes
        .values()
        .filter(|r| {
            r.status.state() == PipeState::Running && r.spec.mode() != PipeMode::SnapshotOnly
        })
        .collect();
    running.retain(|pipe, task| {
        let keep = streaming.iter().any(|r| &r.spec.name == pipe);
        if !keep {
            info!(pipe = %pipe, "pipe stopped running; stopping its stream");
            task.abort();
            ctx.claims.remove(&ctx.store.keys().cdc_owner(pipe));
        }
        keep
    });
    for record in streaming {
        let name = &record.spec.name;
        if running.len() >= ctx.capacity as usize || running.contains_key(name) {
            continue;
        }
        let Some(claim) = ctx
            .store
            .claim_cdc(&member.session, name, &ctx.worker_id)
            .await?
        else {
            continue;
        };
        ctx.claims.add(&claim.key);
        let (ctx2, member2, record2) = (ctx.clone(), member.clone(), record.clone());
        let span = info_span!("stream", pipe = %name, worker = %ctx.worker_id);
        let task = async move {
            let result = stream::run(&ctx2, &member2, &record2, &claim).await;
            if let Err(error) = result {
                warn!(error = %error_chain(&error), "stream stopped; retrying");
                tokio::time::sleep(RETRY).await;
            }
            // Hand the stream back so this or another worker resumes from the checkpoint.
            let _ = ctx2.store.release_cdc(&claim).await;
            ctx2.claims.remove(&claim.key);
        };
        running.insert(name.clone(), tokio::spawn(task.instrument(span)));
    }
    Ok(())
}
