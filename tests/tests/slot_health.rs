//! The replication slot watched by the coordinator: its health in the pipe's status, a
//! warning (status, reason, log) once it retains more WAL than the pipe allows, Setup's
//! warning about an unlimited `max_slot_wal_keep_size`, and a pipe failed with a remedy when
//! its slot is dropped from outside or invalidated by Postgres.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::stack::{Stack, WITHIN};
use ferry_proto::v1::{
    DeletePipeRequest, PausePipeRequest, PipeMode, PipeSettings, PipeState, ResumePipeRequest,
};
use ferry_testkit::wait;

const TABLES: &str = "
CREATE TABLE a (id bigint PRIMARY KEY, note text);
CREATE TABLE b (id bigint PRIMARY KEY, note text);
CREATE TABLE c (id bigint PRIMARY KEY, note text);
INSERT INTO a SELECT i, 'a' || i FROM generate_series(1, 100) i;
INSERT INTO b SELECT i, 'b' || i FROM generate_series(1, 100) i;
INSERT INTO c SELECT i, 'c' || i FROM generate_series(1, 100) i;
";

async fn pause(stack: &Stack, name: &str) {
    stack
        .client
        .clone()
        .pause_pipe(PausePipeRequest { name: name.into() })
        .await
        .unwrap();
    stack.wait_state(name, PipeState::Paused).await;
}

#[tokio::test]
async fn a_slot_retaining_too_much_wal_is_shown_warned_about_and_cleared() {
    let stack = Stack::start(TABLES).await;
    let mut spec = stack.spec("watched", &["a"], PipeMode::CdcOnly);
    let settings = spec.settings.get_or_insert_with(PipeSettings::default);
    settings.slot_wal_warning_bytes = Some(1 << 20);
    let running = stack.create(spec).await.status.unwrap();
    // The test server runs with max_slot_wal_keep_size = -1: Setup says so.
    assert!(
        running
            .reason
            .contains("max_slot_wal_keep_size is -1 (unlimited)"),
        "{}",
        running.reason
    );
    assert!(stack.logs().contains("max_slot_wal_keep_size is -1"));

    // Healthy: shown in the status.
    let healthy = stack
        .wait_status("watched", "the slot status", |s| s.slot.is_some())
        .await;
    let slot = healthy.slot.unwrap();
    assert!(slot.exists && slot.checked_at.is_some(), "{slot:?}");
    assert_eq!(slot.wal_status, "reserved");
    let shown = stack.ferry_get("watched").await;
    assert!(
        shown.contains("slot      exists, wal_status reserved, retains "),
        "{shown}"
    );

    // Paused while the source writes: the slot grows past 1 MiB.
    pause(&stack, "watched").await;
    stack
        .db
        .batch_execute(
            "INSERT INTO a SELECT i, repeat('x', 500) FROM generate_series(1000, 20000) i",
        )
        .await
        .unwrap();
    let warned = stack
        .wait_status("watched", "the slot status", |s| {
            s.slot.as_ref().is_some_and(|h| !h.warning.is_empty())
                && s.reason.contains("slot_wal_warning_bytes")
        })
        .await;
    let slot = warned.slot.unwrap();
    assert!(slot.retained_bytes > 1 << 20, "{slot:?}");
    assert!(
        slot.warning
            .contains("over slot_wal_warning_bytes (1.0 MiB)")
            && slot.warning.contains("resume the pipe"),
        "{}",
        slot.warning
    );
    assert!(
        warned
            .reason
            .starts_with("paused at the stream's last checkpoint")
            && warned.reason.contains("the slot retains"),
        "{}",
        warned.reason
    );
    assert!(stack.logs().contains("replication slot at risk"));
    let shown = stack.ferry_get("watched").await;
    assert!(
        shown.contains("warning   replication slot ferry_watched retains"),
        "{shown}"
    );

    // Resumed, the stream catches up and the warning goes.
    stack
        .client
        .clone()
        .resume_pipe(ResumePipeRequest {
            name: "watched".into(),
        })
        .await
        .unwrap();
    let cleared = stack
        .wait_status("watched", "the slot status", |s| {
            s.state() == PipeState::Running
                && s.slot.as_ref().is_some_and(|h| h.warning.is_empty())
                && !s.reason.contains("| slot:")
        })
        .await;
    assert!(
        !cleared.reason.contains("slot_wal_warning_bytes"),
        "{}",
        cleared.reason
    );
}

#[tokio::test]
async fn a_slot_dropped_from_outside_or_lost_fails_the_pipe_with_a_remedy() {
    let stack = Stack::start(TABLES).await;
    stack
        .create(stack.spec_into("db_b", "dropped", &["b"], PipeMode::CdcOnly))
        .await;
    stack
        .create(stack.spec_into("db_c", "lost", &["c"], PipeMode::SnapshotAndCdc))
        .await;

    // Dropped by someone else while paused (an active slot cannot be dropped).
    pause(&stack, "dropped").await;
    // The stream's WAL sender may take a moment to let go of the slot.
    let dropped = wait::until(WITHIN, || async {
        stack
            .db
            .batch_execute("SELECT pg_drop_replication_slot('ferry_dropped')")
            .await
            .ok()
    })
    .await;
    assert!(dropped.is_some(), "the slot could not be dropped");
    let failed = stack
        .wait_states("dropped", &[PipeState::Failed], WITHIN)
        .await
        .status
        .unwrap();
    let error = failed.error.unwrap();
    assert!(
        error.message.contains("ferry_dropped no longer exists"),
        "{}",
        error.message
    );
    assert!(
        error.remedy.contains("ferry resync dropped"),
        "{}",
        error.remedy
    );
    assert!(error.occurred_at.is_some());
    assert!(!failed.slot.unwrap().exists);

    // Invalidated by Postgres: a paused slot retaining more than max_slot_wal_keep_size.
    pause(&stack, "lost").await;
    for statement in [
        "ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'",
        "SELECT pg_reload_conf()",
    ] {
        stack.db.batch_execute(statement).await.unwrap();
    }
    let invalidated = wait::until(WITHIN, || async {
        for statement in [
            "INSERT INTO c SELECT i, repeat('y', 200) FROM generate_series(1000, 21000) i \
             ON CONFLICT (id) DO UPDATE SET note = excluded.note",
            "SELECT pg_switch_wal()",
            "CHECKPOINT",
        ] {
            stack.db.batch_execute(statement).await.unwrap();
        }
        let lost = stack
            .pg_count(
                "SELECT count(*) FROM pg_replication_slots \
                 WHERE slot_name = 'ferry_lost' AND wal_status = 'lost'",
            )
            .await;
        (lost == 1).then_some(())
    })
    .await;
    assert!(invalidated.is_some(), "the slot was never invalidated");
    let failed = stack
        .wait_states("lost", &[PipeState::Failed], WITHIN)
        .await
        .status
        .unwrap();
    let error = failed.error.unwrap();
    assert!(
        error
            .message
            .contains("invalidated by Postgres (wal_status lost)"),
        "{}",
        error.message
    );
    assert!(
        error.remedy.contains("ferry resync lost"),
        "{}",
        error.remedy
    );
    assert_eq!(failed.slot.unwrap().wal_status, "lost");

    // Failed pipes delete cleanly, whatever became of their slot.
    for name in ["dropped", "lost"] {
        let response = stack
            .client
            .clone()
            .delete_pipe(DeletePipeRequest {
                name: name.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(response.deleted, "{response:?}");
        assert!(response.left_behind.is_empty(), "{response:?}");
    }
    assert_eq!(
        stack
            .pg_count("SELECT count(*) FROM pg_replication_slots")
            .await,
        0
    );
    assert_eq!(
        stack.pg_count("SELECT count(*) FROM pg_publication").await,
        0
    );
}
