//! Pausing: a pipe is Paused once nothing works on it any more. For a streaming pipe that is
//! its CDC worker releasing the stream after flushing and checkpointing its batch; for a pipe
//! paused during its snapshot, the snapshot workers finishing (and marking done) the
//! partitions they were copying, since they claim no new ones.
//!
//! A pipe paused during its snapshot keeps its exported snapshot held, so ResumePipe copies
//! the remaining partitions under the same snapshot and nothing done is read again.

use ferry_core::PipeState;
use ferry_core::lifecycle::{self, PipeEvent};
use ferry_store::{PipeRecord, StoreError};
use std::time::SystemTime;
use tracing::{debug, info};

use crate::setup::{SetupContext, table_progress};
use crate::slot_health::paused_reason;

/// Whether the pipe's exported snapshot must stay held: it is being copied, or its copy is
/// paused and will continue under it.
pub(crate) fn holds_snapshot(record: &PipeRecord) -> bool {
    // A reload holds its own snapshot (crate::reload), tied to its stream boundary.
    if record.status.reload.is_some() {
        return false;
    }
    match record.status.state() {
        PipeState::Snapshot => true,
        PipeState::Pausing | PipeState::Paused => {
            record.status.paused_from() == PipeState::Snapshot
        }
        _ => false,
    }
}

/// Moves a Pausing pipe to Paused once no worker holds its stream or a partition of it.
pub(crate) async fn settle(ctx: &SetupContext, record: &PipeRecord) -> Result<(), StoreError> {
    let name = &record.spec.name;
    if let Some((owner, _)) = ctx.store.cdc_owner(name).await? {
        debug!(%owner, "waiting for the stream to stop");
        return Ok(());
    }
    let from_snapshot = record.status.paused_from() == PipeState::Snapshot;
    let mut progress = None;
    if from_snapshot {
        let claims = ctx.store.snapshot_claims(name).await?;
        if !claims.is_empty() {
            debug!(
                partitions = claims.len(),
                "waiting for partitions in flight to finish"
            );
            return Ok(());
        }
        // Partitions finished while pausing: the paused status counts them.
        let plan: Vec<_> = ctx
            .store
            .snapshot_plan(name)
            .await?
            .into_iter()
            .map(|p| p.partition)
            .collect();
        progress = Some(table_progress(&record.spec, &plan));
    }
    let mut paused = record.status.clone();
    if let Some(tables) = progress {
        paused.tables = tables;
    }
    paused.set_state(PipeState::Paused);
    let reason = paused_reason(&paused, record.spec.mode(), record.slot.as_ref());
    let Ok(mut status) = lifecycle::apply(
        &record.status,
        record.spec.mode(),
        PipeEvent::PauseDone,
        reason,
        None,
        SystemTime::now(),
    ) else {
        return Ok(());
    };
    status.tables = paused.tables;
    ctx.store
        .put_pipe_status(&ctx.fence, name, record.status_revision, &status)
        .await?;
    info!(pipe = %name, reason = %status.reason, "pipe paused");
    Ok(())
}
