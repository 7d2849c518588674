//! The pipe lifecycle (DESIGN.md §2) as a pure function of (state, event).
//!
//! Every status change Ferry writes goes through [`next_state`]; the store then writes it with a
//! compare-and-swap so two writers cannot both apply an event to the same state.

use std::time::SystemTime;

use ferry_proto::v1::{PipeError, PipeStatus};

use crate::{PipeMode, PipeState};

/// Something that happened to a pipe and may move it to another state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PipeEvent {
    /// Workers of every kind the pipe needs are registered with free capacity.
    WorkersReady,
    /// Source validated, destination tables, publication and slot created.
    SetupDone,
    /// Every table's snapshot is done.
    SnapshotDone,
    /// `PausePipe` was called.
    PauseRequested,
    /// The CDC worker flushed and checkpointed its in-flight batch and stopped.
    PauseDone,
    /// `ResumePipe` was called; `to_snapshot` when the pipe was paused during its snapshot
    /// (`PipeStatus.paused_from`), which it then continues.
    ResumeRequested {
        /// Continue the snapshot rather than the stream.
        to_snapshot: bool,
    },
    /// `AddTables` or `RemoveTables` was called.
    ModifyRequested,
    /// The publication change is done; `needs_snapshot` when tables were added and must be copied.
    ModifyDone {
        /// Added tables are waiting for their initial copy.
        needs_snapshot: bool,
    },
    /// `ResyncPipe` was called.
    ResyncRequested,
    /// The shadow tables are loaded and swapped in.
    ResyncDone,
    /// An unrecoverable error.
    Failed,
    /// `DeletePipe` was called.
    DeleteRequested,
}

/// An event that does not apply to the pipe's current state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("cannot {} a pipe in state {}", event_verb(*.event), state_name(*.state))]
pub struct IllegalTransition {
    /// The state the pipe is in.
    pub state: PipeState,
    /// The event that was refused.
    pub event: PipeEvent,
}

/// Whether the pipe's mode replicates changes after the snapshot.
fn streams(mode: PipeMode) -> bool {
    !matches!(mode, PipeMode::SnapshotOnly)
}

/// Whether the pipe's mode copies existing rows first.
fn snapshots(mode: PipeMode) -> bool {
    !matches!(mode, PipeMode::CdcOnly)
}

/// The state a pipe of `mode` in `state` moves to on `event`, or why it cannot.
pub fn next_state(
    state: PipeState,
    mode: PipeMode,
    event: PipeEvent,
) -> Result<PipeState, IllegalTransition> {
    use PipeEvent as E;
    use PipeState as S;
    let illegal = Err(IllegalTransition { state, event });
    let next = match (state, event) {
        (S::Unspecified, _) => return illegal,
        // Deleting is terminal: the pipe disappears from it, nothing else.
        (S::Deleting, _) => return illegal,
        (_, E::DeleteRequested) => S::Deleting,
        // A failed pipe keeps its first error; a second failure is not a transition.
        (S::Failed, E::Failed) => return illegal,
        (_, E::Failed) => S::Failed,
        (S::Provisioning, E::WorkersReady) => S::Setup,
        (S::Setup, E::SetupDone) if snapshots(mode) => S::Snapshot,
        (S::Setup, E::SetupDone) => S::Running,
        (S::Snapshot, E::SnapshotDone) if streams(mode) => S::Running,
        (S::Snapshot, E::SnapshotDone) => S::Completed,
        (S::Running, E::PauseRequested) if streams(mode) => S::Pausing,
        // Snapshot workers stop after their partition; resume continues from the done-marks.
        (S::Snapshot, E::PauseRequested) => S::Pausing,
        (S::Pausing, E::PauseDone) => S::Paused,
        (S::Paused, E::ResumeRequested { to_snapshot: true }) => S::Snapshot,
        (S::Paused, E::ResumeRequested { to_snapshot: false }) if streams(mode) => S::Running,
        (S::Running | S::Paused, E::ModifyRequested) if streams(mode) => S::Modifying,
        (
            S::Modifying,
            E::ModifyDone {
                needs_snapshot: true,
            },
        ) => S::Snapshot,
        (
            S::Modifying,
            E::ModifyDone {
                needs_snapshot: false,
            },
        ) => S::Running,
        (S::Running | S::Paused | S::Failed | S::Completed, E::ResyncRequested) => S::Resync,
        (S::Resync, E::ResyncDone) if streams(mode) => S::Running,
        (S::Resync, E::ResyncDone) => S::Completed,
        _ => return illegal,
    };
    Ok(next)
}

/// The status after `event`: new state, the previous one, why, and when. An error is kept only
/// on the way into [`PipeState::Failed`] (pass it in `error`); any other move clears it.
pub fn apply(
    status: &PipeStatus,
    mode: PipeMode,
    event: PipeEvent,
    reason: impl Into<String>,
    error: Option<PipeError>,
    now: SystemTime,
) -> Result<PipeStatus, IllegalTransition> {
    let next = next_state(status.state(), mode, event)?;
    let mut updated = status.clone();
    updated.previous_state = status.state;
    updated.set_state(next);
    // Remember what a pause interrupted, so resume returns there.
    match next {
        PipeState::Pausing => updated.set_paused_from(status.state()),
        PipeState::Paused => {}
        _ => updated.paused_from = PipeState::Unspecified as i32,
    }
    updated.reason = reason.into();
    updated.error = if next == PipeState::Failed {
        error
    } else {
        None
    };
    updated.state_changed_at = Some(now.into());
    // A retry belongs to the work of the state it was reported in.
    updated.retrying = None;
    Ok(updated)
}

/// The status of a pipe that was just created.
pub fn initial_status(now: SystemTime) -> PipeStatus {
    let mut status = PipeStatus {
        reason: "pipe created; waiting for workers".into(),
        created_at: Some(now.into()),
        state_changed_at: Some(now.into()),
        ..Default::default()
    };
    status.set_state(PipeState::Provisioning);
    status
}

/// Lower-case human name of a state ("provisioning", "running", ...).
pub fn state_name(state: PipeState) -> &'static str {
    match state {
        PipeState::Unspecified => "unspecified",
        PipeState::Provisioning => "provisioning",
        PipeState::Setup => "setup",
        PipeState::Snapshot => "snapshot",
        PipeState::Running => "running",
        PipeState::Pausing => "pausing",
        PipeState::Paused => "paused",
        PipeState::Modifying => "modifying",
        PipeState::Resync => "resync",
        PipeState::Completed => "completed",
        PipeState::Failed => "failed",
        PipeState::Deleting => "deleting",
    }
}

fn event_verb(event: PipeEvent) -> &'static str {
    match event {
        PipeEvent::WorkersReady => "start setup of",
        PipeEvent::SetupDone => "finish setup of",
        PipeEvent::SnapshotDone => "finish the snapshot of",
        PipeEvent::PauseRequested => "pause",
        PipeEvent::PauseDone => "finish pausing",
        PipeEvent::ResumeRequested { .. } => "resume",
        PipeEvent::ModifyRequested => "change the tables of",
        PipeEvent::ModifyDone { .. } => "finish changing the tables of",
        PipeEvent::ResyncRequested => "resync",
        PipeEvent::ResyncDone => "finish resyncing",
        PipeEvent::Failed => "fail",
        PipeEvent::DeleteRequested => "delete",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use PipeEvent as E;
    use PipeState as S;

    const STATES: [PipeState; 12] = [
        S::Unspecified,
        S::Provisioning,
        S::Setup,
        S::Snapshot,
        S::Running,
        S::Pausing,
        S::Paused,
        S::Modifying,
        S::Resync,
        S::Completed,
        S::Failed,
        S::Deleting,
    ];
    const EVENTS: [PipeEvent; 14] = [
        E::WorkersReady,
        E::SetupDone,
        E::SnapshotDone,
        E::PauseRequested,
        E::PauseDone,
        E::ResumeRequested { to_snapshot: false },
        E::ResumeRequested { to_snapshot: true },
        E::ModifyRequested,
        E::ModifyDone {
            needs_snapshot: true,
        },
        E::ModifyDone {
            needs_snapshot: false,
        },
        E::ResyncRequested,
        E::ResyncDone,
        E::Failed,
        E::DeleteRequested,
    ];
    const MODES: [PipeMode; 3] = [
        PipeMode::SnapshotAndCdc,
        PipeMode::CdcOnly,
        PipeMode::SnapshotOnly,
    ];

    /// The legal transitions, written out by hand from DESIGN.md §2 as (mode, from, event, to),
    /// independently of the match in `next_state`. `None` as mode means "every mode".
    fn legal() -> Vec<(Option<PipeMode>, PipeState, PipeEvent, PipeState)> {
        use PipeMode as M;
        let mut table = vec![
            (None, S::Provisioning, E::WorkersReady, S::Setup),
            (Some(M::SnapshotAndCdc), S::Setup, E::SetupDone, S::Snapshot),
            (Some(M::SnapshotOnly), S::Setup, E::SetupDone, S::Snapshot),
            (Some(M::CdcOnly), S::Setup, E::SetupDone, S::Running),
            (
                Some(M::SnapshotAndCdc),
                S::Snapshot,
                E::SnapshotDone,
                S::Running,
            ),
            (Some(M::CdcOnly), S::Snapshot, E::SnapshotDone, S::Running),
            (
                Some(M::SnapshotOnly),
                S::Snapshot,
                E::SnapshotDone,
                S::Completed,
            ),
            (None, S::Pausing, E::PauseDone, S::Paused),
            (None, S::Snapshot, E::PauseRequested, S::Pausing),
            (
                None,
                S::Paused,
                E::ResumeRequested { to_snapshot: true },
                S::Snapshot,
            ),
            (
                None,
                S::Modifying,
                E::ModifyDone {
                    needs_snapshot: true,
                },
                S::Snapshot,
            ),
            (
                None,
                S::Modifying,
                E::ModifyDone {
                    needs_snapshot: false,
                },
                S::Running,
            ),
            (
                Some(M::SnapshotAndCdc),
                S::Resync,
                E::ResyncDone,
                S::Running,
            ),
            (Some(M::CdcOnly), S::Resync, E::ResyncDone, S::Running),
            (
                Some(M::SnapshotOnly),
                S::Resync,
                E::ResyncDone,
                S::Completed,
            ),
        ];
        for mode in [M::SnapshotAndCdc, M::CdcOnly] {
            table.push((Some(mode), S::Running, E::PauseRequested, S::Pausing));
            table.push((
                Some(mode),
                S::Paused,
                E::ResumeRequested { to_snapshot: false },
                S::Running,
            ));
            table.push((Some(mode), S::Running, E::ModifyRequested, S::Modifying));
            table.push((Some(mode), S::Paused, E::ModifyRequested, S::Modifying));
        }
        for from in [S::Running, S::Paused, S::Failed, S::Completed] {
            table.push((None, from, E::ResyncRequested, S::Resync));
        }
        for from in STATES {
            if !matches!(from, S::Unspecified | S::Deleting) {
                table.push((None, from, E::DeleteRequested, S::Deleting));
            }
            if !matches!(from, S::Unspecified | S::Deleting | S::Failed) {
                table.push((None, from, E::Failed, S::Failed));
            }
        }
        table
    }

    #[test]
    fn every_state_event_and_mode_matches_the_table() {
        let table = legal();
        let mut accepted = 0;
        for mode in MODES {
            for from in STATES {
                for event in EVENTS {
                    let expected = table
                        .iter()
                        .find(|(m, f, e, _)| {
                            m.is_none_or(|m| m == mode) && *f == from && *e == event
                        })
                        .map(|(_, _, _, to)| *to);
                    let got = next_state(from, mode, event).ok();
                    assert_eq!(got, expected, "{mode:?}: {from:?} on {event:?}");
                    accepted += usize::from(got.is_some());
                }
            }
        }
        // Every row of the table was reached exactly once (no row shadowed by another).
        let rows: usize = table
            .iter()
            .map(|(m, ..)| if m.is_some() { 1 } else { MODES.len() })
            .sum();
        assert_eq!(accepted, rows);
    }

    #[test]
    fn illegal_transitions_explain_themselves() {
        let err = next_state(S::Setup, PipeMode::SnapshotAndCdc, E::PauseRequested).unwrap_err();
        assert_eq!(err.to_string(), "cannot pause a pipe in state setup");
        let err = next_state(S::Deleting, PipeMode::CdcOnly, E::DeleteRequested).unwrap_err();
        assert_eq!(err.to_string(), "cannot delete a pipe in state deleting");
    }

    #[test]
    fn apply_records_the_move() {
        let t0 = SystemTime::UNIX_EPOCH;
        let created = initial_status(t0);
        assert_eq!(created.state(), S::Provisioning);
        let t1 = t0 + std::time::Duration::from_secs(5);
        let setup = apply(
            &created,
            PipeMode::CdcOnly,
            E::WorkersReady,
            "workers up",
            None,
            t1,
        )
        .unwrap();
        assert_eq!(setup.state(), S::Setup);
        assert_eq!(setup.previous_state(), S::Provisioning);
        assert_eq!(setup.reason, "workers up");
        assert_eq!(setup.created_at, created.created_at);
        assert_eq!(setup.state_changed_at, Some(t1.into()));
        let error = PipeError {
            message: "m".into(),
            remedy: "r".into(),
            ..Default::default()
        };
        let failed = apply(
            &setup,
            PipeMode::CdcOnly,
            E::Failed,
            "boom",
            Some(error.clone()),
            t1,
        )
        .unwrap();
        assert_eq!(failed.error, Some(error));
        let deleting = apply(
            &failed,
            PipeMode::CdcOnly,
            E::DeleteRequested,
            "bye",
            None,
            t1,
        )
        .unwrap();
        assert_eq!(deleting.error, None);
        assert!(apply(&deleting, PipeMode::CdcOnly, E::WorkersReady, "", None, t1).is_err());
    }

    #[test]
    fn a_pause_remembers_the_state_it_interrupted_until_resumed() {
        let t = SystemTime::UNIX_EPOCH;
        let mode = PipeMode::SnapshotAndCdc;
        let mut status = initial_status(t);
        status.set_state(S::Snapshot);
        let pausing = apply(&status, mode, E::PauseRequested, "", None, t).unwrap();
        assert_eq!(pausing.paused_from(), S::Snapshot);
        let paused = apply(&pausing, mode, E::PauseDone, "", None, t).unwrap();
        assert_eq!(paused.paused_from(), S::Snapshot);
        let resumed = apply(
            &paused,
            mode,
            E::ResumeRequested { to_snapshot: true },
            "",
            None,
            t,
        )
        .unwrap();
        assert_eq!(resumed.state(), S::Snapshot);
        assert_eq!(resumed.paused_from(), S::Unspecified);
    }
}
