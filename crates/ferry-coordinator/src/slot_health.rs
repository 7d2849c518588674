//! The replication slot's health, checked by the leader every [`CHECK_EVERY`] for every pipe
//! that holds a slot: a slot retains WAL on the source for as long as the pipe is paused or
//! behind, and Postgres invalidates it (or someone drops it) without telling Ferry.
//!
//! Each check reads `pg_replication_slots` and stores the result in `pipes/<pipe>/slot_health`
//! (the API folds it into `PipeStatus.slot`). A slot past `slot_wal_warning_bytes`, or one
//! Postgres no longer reserves WAL for, gets a warning, also shown in the status reason and
//! logged. A slot that is gone or lost fails the pipe: the changes it held cannot be replayed,
//! only a resync recovers (which makes a new slot, so a pipe in Resync is left alone). A source
//! that cannot be reached only leaves the health stale: the stream itself reports outages.

use std::time::{Duration, SystemTime};

use ferry_core::lifecycle::{self, PipeEvent};
use ferry_core::spec::DEFAULT_SLOT_WAL_WARNING_BYTES;
use ferry_core::units::human_bytes;
use ferry_core::{PipeMode, PipeState};
use ferry_postgres::slot::{SlotState, slot_state};
use ferry_postgres::{SourceError, connection};
use ferry_proto::v1::{PipeError, PipeStatus, SlotHealth};
use ferry_server::telemetry::error_chain;
use ferry_store::{PipeRecord, StoreError};
use tracing::{debug, info, warn};

use crate::setup::{self, SetupContext, SetupProblem};

/// How often a pipe's slot is checked (at most; a reconcile pass starts the check).
pub(crate) const CHECK_EVERY: Duration = Duration::from_secs(10);
/// A check that takes longer than this is dropped (the source is too slow to answer).
const CHECK_TIMEOUT: Duration = Duration::from_secs(15);
/// `max_slot_wal_keep_size` below this makes a short pause or lag invalidate the slot.
const SMALL_KEEP_SIZE: i64 = 1 << 30;
/// Separates a status reason from the slot's note appended to it.
const NOTE: &str = " | slot: ";
/// Compare-and-swap attempts at failing a pipe whose slot is gone.
const FAIL_ATTEMPTS: usize = 3;

/// Whether a pipe in `state` holds a slot worth checking.
pub(crate) fn watched(state: PipeState) -> bool {
    matches!(
        state,
        PipeState::Snapshot
            | PipeState::Running
            | PipeState::Pausing
            | PipeState::Paused
            | PipeState::Modifying
            | PipeState::Resync
    )
}

/// Whether a slot that is gone fails a pipe in `state`. A resync makes the slot anew.
fn needs_slot(state: PipeState) -> bool {
    watched(state) && state != PipeState::Resync
}

/// Whether the slot check may rewrite the status reason in `state` (reloads own theirs).
fn notes_reason(state: PipeState) -> bool {
    !matches!(state, PipeState::Modifying | PipeState::Resync)
}

/// The current check period: a pipe's check starts at most once per period.
pub(crate) fn period() -> i64 {
    let secs = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    i64::try_from(secs / CHECK_EVERY.as_secs()).unwrap_or(i64::MAX)
}

/// Checks the slot of `record`'s pipe once, records its health, and fails the pipe or notes
/// a warning in its reason.
pub(crate) async fn check(ctx: SetupContext, record: PipeRecord) {
    let name = record.spec.name.clone();
    if let Err(error) = check_once(&ctx, record).await {
        match error {
            StoreError::Fenced | StoreError::Conflict { .. } => {
                debug!(pipe = %name, "slot check overtaken")
            }
            other => warn!(pipe = %name, error = %error_chain(&other), "cannot record slot health"),
        }
    }
}

async fn check_once(ctx: &SetupContext, record: PipeRecord) -> Result<(), StoreError> {
    let name = &record.spec.name;
    let slot = ctx.store.resources(name).await?.slot_name;
    if slot.is_empty() {
        return Ok(());
    }
    let read = tokio::time::timeout(CHECK_TIMEOUT, read_slot(ctx, &record, &slot)).await;
    let state = match read {
        Ok(Ok(state)) => state,
        Ok(Err(SetupProblem::Store(error))) => return Err(error),
        Ok(Err(SetupProblem::Source(error @ SourceError::Unreachable { .. }))) => {
            debug!(pipe = %name, error = %error_chain(&error), "source unreachable; slot health not refreshed");
            return Ok(());
        }
        Ok(Err(problem)) => {
            warn!(pipe = %name, error = %error_chain(&problem), "cannot check the replication slot");
            return Ok(());
        }
        Err(_) => {
            warn!(pipe = %name, "the source did not answer the slot check in time");
            return Ok(());
        }
    };
    let threshold = record
        .spec
        .settings
        .and_then(|s| s.slot_wal_warning_bytes)
        .unwrap_or(DEFAULT_SLOT_WAL_WARNING_BYTES);
    let health = assess(&slot, state.as_ref(), threshold, SystemTime::now());
    if !ctx.store.put_slot_health(&ctx.fence, name, &health).await? {
        return Ok(());
    }
    let had_warning = record.slot.as_ref().is_some_and(|h| !h.warning.is_empty());
    if !health.warning.is_empty() && !had_warning {
        warn!(pipe = %name, slot = %slot, retained = health.retained_bytes, wal_status = %health.wal_status, warning = %health.warning, "replication slot at risk");
    }
    let gone = !health.exists || health.wal_status == "lost";
    if gone {
        fail_pipe(ctx, record, &slot, &health).await
    } else {
        note_in_reason(ctx, &record, &health).await
    }
}

async fn read_slot(
    ctx: &SetupContext,
    record: &PipeRecord,
    slot: &str,
) -> Result<Option<SlotState>, SetupProblem> {
    let secrets = setup::open_secrets(&ctx.store, &ctx.key, &record.spec.name).await?;
    let source = record.spec.source.clone().unwrap_or_default();
    let client = connection::connect(&source, &secrets.source_password).await?;
    Ok(slot_state(&client, slot).await?)
}

/// The health of `slot` as read (`None`: it does not exist), with a warning when it is at
/// risk: retaining more than `threshold` bytes, no longer guaranteed its WAL, gone.
pub(crate) fn assess(
    slot: &str,
    state: Option<&SlotState>,
    threshold: i64,
    now: SystemTime,
) -> SlotHealth {
    let mut health = SlotHealth {
        exists: state.is_some(),
        checked_at: Some(now.into()),
        ..Default::default()
    };
    let Some(state) = state else {
        health.warning = format!(
            "replication slot {slot} does not exist on the source (dropped outside Ferry?): the changes it held are lost; run `ferry resync` to copy the tables again"
        );
        return health;
    };
    health.wal_status.clone_from(&state.wal_status);
    health.retained_bytes = state.retained_bytes;
    health.safe_wal_bytes = state.safe_wal_bytes;
    let retained = human_bytes(state.retained_bytes);
    let threshold = u64::try_from(threshold).unwrap_or(0);
    health.warning = match state.wal_status.as_str() {
        "lost" => format!(
            "replication slot {slot} was invalidated by Postgres (wal_status lost: it needed more WAL than max_slot_wal_keep_size keeps); run `ferry resync` to copy the tables again"
        ),
        "unreserved" => format!(
            "replication slot {slot} retains {retained} of WAL, past max_slot_wal_keep_size (wal_status unreserved): the next checkpoint invalidates it unless the pipe catches up; resume the pipe or fix its stream now, or raise max_slot_wal_keep_size"
        ),
        _ if state.retained_bytes > threshold => format!(
            "replication slot {slot} retains {retained} of WAL, over slot_wal_warning_bytes ({}): the source keeps it on disk until the pipe catches up; resume the pipe or fix its stream (see ferry get), or raise settings.slot_wal_warning_bytes",
            human_bytes(threshold)
        ),
        _ => String::new(),
    };
    health
}

/// Fails the pipe whose slot is gone, unless the pipe moved to a state that does not need it.
async fn fail_pipe(
    ctx: &SetupContext,
    mut record: PipeRecord,
    slot: &str,
    health: &SlotHealth,
) -> Result<(), StoreError> {
    let name = record.spec.name.clone();
    let message = if health.exists {
        format!(
            "replication slot {slot} was invalidated by Postgres (wal_status lost): the WAL it needed was removed, so changes since the pipe's checkpoint cannot be replayed"
        )
    } else {
        format!(
            "replication slot {slot} no longer exists on the source (dropped outside Ferry?): changes since the pipe's checkpoint cannot be replayed"
        )
    };
    for _ in 0..FAIL_ATTEMPTS {
        if !needs_slot(record.status.state()) {
            return Ok(());
        }
        let now = SystemTime::now();
        let error = PipeError {
            message: message.clone(),
            remedy: format!(
                "run `ferry resync {name}` to copy the tables again into a new slot, or delete the pipe (`ferry delete {name}`); to keep the slot from being invalidated again, raise max_slot_wal_keep_size and do not leave the pipe paused for long"
            ),
            table: String::new(),
            occurred_at: Some(now.into()),
        };
        let Ok(status) = lifecycle::apply(
            &record.status,
            record.spec.mode(),
            PipeEvent::Failed,
            "replication slot lost",
            Some(error),
            now,
        ) else {
            return Ok(());
        };
        match ctx
            .store
            .put_pipe_status(&ctx.fence, &name, record.status_revision, &status)
            .await
        {
            Ok(_) => {
                warn!(pipe = %name, slot = %slot, "pipe failed: {message}");
                return Ok(());
            }
            // The status moved meanwhile (snapshot progress, say): look again.
            Err(StoreError::Conflict { .. }) => match ctx.store.get_pipe(&name).await? {
                Some(current) => record = current,
                None => return Ok(()),
            },
            Err(other) => return Err(other),
        }
    }
    Ok(())
}

/// Puts the slot's note (its warning; while paused, what it retains) in the status reason.
async fn note_in_reason(
    ctx: &SetupContext,
    record: &PipeRecord,
    health: &SlotHealth,
) -> Result<(), StoreError> {
    if !notes_reason(record.status.state()) {
        return Ok(());
    }
    let reason = reason_with(&record.status, record.spec.mode(), Some(health));
    if reason == record.status.reason {
        return Ok(());
    }
    let mut status = record.status.clone();
    status.reason = reason;
    ctx.store
        .put_pipe_status(
            &ctx.fence,
            &record.spec.name,
            record.status_revision,
            &status,
        )
        .await?;
    info!(pipe = %record.spec.name, reason = %status.reason, "slot noted in the pipe's reason");
    Ok(())
}

/// The reason `status` shows with the slot's `health`: while paused, what the pause keeps and
/// what the slot retains meanwhile; in any state, the slot's warning after [`NOTE`].
pub(crate) fn reason_with(
    status: &PipeStatus,
    mode: PipeMode,
    health: Option<&SlotHealth>,
) -> String {
    let base = if status.state() == PipeState::Paused {
        paused_reason(status, mode, health)
    } else {
        status
            .reason
            .split(NOTE)
            .next()
            .unwrap_or_default()
            .to_owned()
    };
    match health.map(|h| h.warning.as_str()) {
        Some(warning) if !warning.is_empty() => format!("{base}{NOTE}{warning}"),
        _ => base,
    }
}

/// Why a pipe is paused, and what its slot retains while it is.
pub(crate) fn paused_reason(
    status: &PipeStatus,
    mode: PipeMode,
    health: Option<&SlotHealth>,
) -> String {
    let mut reason = if status.paused_from() == PipeState::Snapshot {
        let done: u32 = status.tables.iter().map(|t| t.partitions_done).sum();
        let total: u32 = status.tables.iter().map(|t| t.partitions_total).sum();
        format!(
            "paused during the snapshot with {done}/{total} partitions done; ResumePipe copies the rest under the same snapshot"
        )
    } else {
        "paused at the stream's last checkpoint; ResumePipe continues from it".to_owned()
    };
    if mode != PipeMode::SnapshotOnly
        && let Some(health) = health.filter(|h| h.exists)
    {
        reason.push_str(&format!(
            "; meanwhile the slot retains {} of WAL on the source, and grows until resumed",
            human_bytes(health.retained_bytes)
        ));
    }
    reason
}

/// What Setup says about `max_slot_wal_keep_size` (bytes; `None` is unlimited), if it puts
/// the source or the pipe at risk.
pub(crate) fn keep_size_warning(limit: Option<i64>) -> Option<String> {
    match limit {
        None => Some(
            "WARNING: max_slot_wal_keep_size is -1 (unlimited): while the pipe is paused or behind, its slot keeps WAL without limit and can fill the source's disk; consider ALTER SYSTEM SET max_slot_wal_keep_size = '50GB'; SELECT pg_reload_conf();".into(),
        ),
        Some(bytes) if bytes < SMALL_KEEP_SIZE => Some(format!(
            "WARNING: max_slot_wal_keep_size is {}: a pause or lag past it invalidates the slot and the pipe then needs a resync; consider raising it (ALTER SYSTEM SET max_slot_wal_keep_size = '50GB'; SELECT pg_reload_conf();)",
            human_bytes(u64::try_from(bytes).unwrap_or(0))
        )),
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use ferry_proto::v1::TableStatus;

    use super::*;

    fn state(wal_status: &str, retained_bytes: u64) -> SlotState {
        SlotState {
            wal_status: wal_status.into(),
            retained_bytes,
            safe_wal_bytes: None,
            active: false,
        }
    }

    #[test]
    fn a_slot_is_at_risk_past_the_threshold_unreserved_lost_or_gone() {
        let t = SystemTime::UNIX_EPOCH;
        let fine = assess("s", Some(&state("reserved", 100)), 1000, t);
        assert!(fine.exists && fine.warning.is_empty());
        assert_eq!(fine.retained_bytes, 100);
        let big = assess("s", Some(&state("extended", 5 << 30)), 1 << 30, t);
        assert!(big.warning.contains("retains 5.0 GiB"), "{}", big.warning);
        assert!(big.warning.contains("slot_wal_warning_bytes (1.0 GiB)"));
        let unreserved = assess("s", Some(&state("unreserved", 10)), 1 << 30, t);
        assert!(unreserved.warning.contains("unreserved"));
        let lost = assess("s", Some(&state("lost", 0)), 1 << 30, t);
        assert!(lost.warning.contains("ferry resync"));
        let gone = assess("s", None, 1 << 30, t);
        assert!(!gone.exists && gone.warning.contains("does not exist"));
    }

    #[test]
    fn the_reason_carries_the_warning_once_and_drops_it_when_cleared() {
        let mut status = PipeStatus {
            reason: "snapshot done".into(),
            ..Default::default()
        };
        status.set_state(PipeState::Running);
        let mode = PipeMode::SnapshotAndCdc;
        let t = SystemTime::UNIX_EPOCH;
        let warned = assess("s", Some(&state("reserved", 2048)), 1024, t);
        let noted = reason_with(&status, mode, Some(&warned));
        assert!(noted.starts_with("snapshot done | slot: replication slot s retains 2.0 KiB"));
        status.reason = noted.clone();
        assert_eq!(reason_with(&status, mode, Some(&warned)), noted);
        let cleared = assess("s", Some(&state("reserved", 10)), 1024, t);
        assert_eq!(reason_with(&status, mode, Some(&cleared)), "snapshot done");
    }

    #[test]
    fn a_paused_reason_shows_the_partitions_done_and_the_slot_growing() {
        let mut status = PipeStatus {
            tables: vec![TableStatus {
                partitions_done: 3,
                partitions_total: 30,
                ..Default::default()
            }],
            ..Default::default()
        };
        status.set_state(PipeState::Paused);
        status.set_paused_from(PipeState::Snapshot);
        let health = assess(
            "s",
            Some(&state("reserved", 3 << 20)),
            1 << 30,
            SystemTime::UNIX_EPOCH,
        );
        let reason = reason_with(&status, PipeMode::SnapshotAndCdc, Some(&health));
        assert!(reason.contains("3/30 partitions done"), "{reason}");
        assert!(reason.contains("retains 3.0 MiB"), "{reason}");
        status.set_paused_from(PipeState::Running);
        let reason = reason_with(&status, PipeMode::CdcOnly, None);
        assert_eq!(
            reason,
            "paused at the stream's last checkpoint; ResumePipe continues from it"
        );
    }

    #[test]
    fn keep_size_warnings() {
        assert!(keep_size_warning(None).unwrap().contains("unlimited"));
        assert!(
            keep_size_warning(Some(512 << 20))
                .unwrap()
                .contains("512.0 MiB")
        );
        assert_eq!(keep_size_warning(Some(10 << 30)), None);
    }
}
