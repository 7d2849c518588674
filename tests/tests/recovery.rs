//! A failed pipe brought back by ResyncPipe: a changed column type, a slot or publication
//! dropped from outside, a Setup refusal fixed at the source. Each test is one scenario
//! through the real services, compared value by value.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::reload::*;
use common::stack::{Stack, WITHIN};
use ferry_proto::v1::{PipeMode, PipeState};
use ferry_testkit::wait;

#[tokio::test]
async fn a_changed_column_type_fails_the_table_and_its_resync_brings_the_pipe_back() {
    let stack = Stack::start(
        "CREATE TABLE wide (id int PRIMARY KEY, note text);
         INSERT INTO wide SELECT g, 'note ' || g FROM generate_series(1, 500) g;
         CREATE TABLE ticks (id serial PRIMARY KEY, v int);",
    )
    .await;
    stack
        .create(stack.spec("typed", &["wide", "ticks"], PipeMode::SnapshotAndCdc))
        .await;
    stack
        .db
        .batch_execute(
            "ALTER TABLE wide ALTER COLUMN note TYPE integer USING length(note);
             INSERT INTO wide VALUES (501, 42); INSERT INTO ticks (v) VALUES (1);",
        )
        .await
        .unwrap();
    let failed = stack.wait_state("typed", PipeState::Failed).await;
    let error = failed.status.unwrap().error.unwrap();
    assert_eq!(error.table, "public.wide");
    assert!(
        error
            .remedy
            .contains("ferry resync typed --table public.wide"),
        "{}",
        error.remedy
    );
    // Changes keep coming while the pipe is failed; none may be lost.
    stack
        .db
        .batch_execute("UPDATE wide SET note = note + 1 WHERE id <= 10; INSERT INTO ticks (v) VALUES (2), (3);")
        .await
        .unwrap();

    resync(&stack, "typed", &["public.wide"]).await;
    stack.wait_state("typed", PipeState::Running).await;
    stack
        .db
        .batch_execute(
            "UPDATE wide SET note = -1 WHERE id = 500; INSERT INTO ticks (v) VALUES (4);",
        )
        .await
        .unwrap();
    stack
        .converge(
            "SELECT id::text, note::text FROM wide",
            "SELECT toString(id), toString(note) FROM dest.wide_current",
        )
        .await;
    stack.converge(TICKS_PG, TICKS_CH).await;
    let ty = stack
        .ch_rows("SELECT type FROM system.columns WHERE database = 'dest' AND table = 'wide' AND name = 'note'")
        .await
        .unwrap();
    assert_eq!(ty, vec![vec![Some("Nullable(Int32)".to_owned())]]);
}

#[tokio::test]
async fn a_pipe_whose_slot_was_dropped_fails_and_a_resync_recovers_it_exactly() {
    let stack = Stack::start(
        "CREATE TABLE ticks (id serial PRIMARY KEY, v int);
         INSERT INTO ticks (v) SELECT g FROM generate_series(1, 1000) g;",
    )
    .await;
    stack
        .create(stack.spec("slotless", &["ticks"], PipeMode::SnapshotAndCdc))
        .await;
    // Dropped from outside: its walsender is terminated first (it reconnects, so retry).
    let dropped = wait::until(WITHIN, || async {
        stack
            .db
            .batch_execute(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
                 WHERE slot_name = 'ferry_slotless' AND active_pid IS NOT NULL;
                 SELECT pg_drop_replication_slot('ferry_slotless');",
            )
            .await
            .ok()
    })
    .await;
    assert!(dropped.is_some(), "the slot could be dropped");
    stack
        .db
        .batch_execute("INSERT INTO ticks (v) VALUES (-1), (-2); DELETE FROM ticks WHERE id <= 10;")
        .await
        .unwrap();
    let failed = stack.wait_state("slotless", PipeState::Failed).await;
    let error = failed.status.unwrap().error.unwrap();
    assert!(error.remedy.contains("ferry resync slotless"), "{error:?}");

    resync(&stack, "slotless", &[]).await;
    stack.wait_state("slotless", PipeState::Running).await;
    stack
        .db
        .batch_execute(
            "UPDATE ticks SET v = v * 10 WHERE id % 2 = 0; INSERT INTO ticks (v) VALUES (7);",
        )
        .await
        .unwrap();
    stack.converge(TICKS_PG, TICKS_CH).await;
    let slots = stack
        .pg_count("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'ferry_slotless'")
        .await;
    assert_eq!(slots, 1);
}

#[tokio::test]
async fn a_pipe_that_failed_in_setup_is_brought_back_by_a_resync_once_the_cause_is_fixed() {
    let stack = Stack::start(
        "CREATE TABLE keyless (a int, b text);
         INSERT INTO keyless SELECT g, 'k' || g FROM generate_series(1, 300) g;",
    )
    .await;
    stack
        .submit(stack.spec("later", &["keyless"], PipeMode::SnapshotAndCdc))
        .await
        .unwrap();
    let failed = stack.wait_state("later", PipeState::Failed).await;
    let error = failed.status.unwrap().error.unwrap();
    assert_eq!(error.table, "public.keyless", "{error:?}");
    stack
        .db
        .batch_execute(
            "ALTER TABLE keyless ADD PRIMARY KEY (a); INSERT INTO keyless VALUES (301, 'x');",
        )
        .await
        .unwrap();
    resync(&stack, "later", &[]).await;
    stack.wait_state("later", PipeState::Running).await;
    stack
        .db
        .batch_execute(
            "UPDATE keyless SET b = 'changed' WHERE a <= 5; DELETE FROM keyless WHERE a = 6;",
        )
        .await
        .unwrap();
    stack
        .converge(
            "SELECT a::text, b FROM keyless",
            "SELECT toString(a), b FROM dest.keyless_current",
        )
        .await;
    let resources = stack
        .pg_count("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'ferry_later'")
        .await;
    assert_eq!(resources, 1);
}

#[tokio::test]
async fn a_pipe_whose_publication_was_dropped_fails_and_a_resync_recreates_it() {
    let stack = Stack::start(
        "CREATE TABLE ticks (id serial PRIMARY KEY, v int);
         INSERT INTO ticks (v) SELECT g FROM generate_series(1, 200) g;
         CREATE TABLE other (id int PRIMARY KEY, t text);
         INSERT INTO other SELECT g, 'o' FROM generate_series(1, 50) g;",
    )
    .await;
    stack
        .create(stack.spec("unpublished", &["ticks", "other"], PipeMode::SnapshotAndCdc))
        .await;
    stack
        .db
        .batch_execute(
            "DROP PUBLICATION ferry_unpublished;
             SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots
             WHERE slot_name = 'ferry_unpublished' AND active_pid IS NOT NULL;
             INSERT INTO ticks (v) VALUES (-1); UPDATE other SET t = 'lost?' WHERE id = 1;",
        )
        .await
        .unwrap();
    let failed = stack.wait_state("unpublished", PipeState::Failed).await;
    let error = failed.status.unwrap().error.unwrap();
    assert!(
        error.remedy.contains("ferry resync unpublished"),
        "{error:?}"
    );
    // Asked for one table; the new slot it needs makes it a resync of every table (the other
    // table's changes since the checkpoint went with the old slot).
    resync(&stack, "unpublished", &["public.ticks"]).await;
    stack.wait_state("unpublished", PipeState::Running).await;
    stack
        .db
        .batch_execute("INSERT INTO ticks (v) VALUES (-2); UPDATE ticks SET v = 0 WHERE id = 3;")
        .await
        .unwrap();
    stack.converge(TICKS_PG, TICKS_CH).await;
    stack
        .converge(
            "SELECT id::text, t FROM other",
            "SELECT toString(id), t FROM dest.other_current",
        )
        .await;
}
