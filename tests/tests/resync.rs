//! ResyncPipe on a live pipe (docs/reload.md): per-table and whole-pipe resyncs under a
//! concurrent write workload while the other tables keep streaming, the boundary between the
//! copy and the stream, kills mid-copy, a TRUNCATE mid-copy, a snapshot-only pipe. Each test
//! is one scenario through the real services, compared value by value.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::reload::*;
use common::stack::{Stack, WITHIN};
use ferry_proto::v1::{PipeMode, PipeState, ReloadPhase, WorkerKind};
use ferry_testkit::wait;

#[tokio::test]
async fn a_table_resync_restores_deleted_rows_while_the_other_tables_keep_streaming() {
    let stack = Stack::start(TABLES).await;
    let mut spec = stack.spec("pipe", &["items", "bag", "ticks"], PipeMode::SnapshotAndCdc);
    spec.settings = Some(settings());
    stack.create(spec).await;
    let stop = Arc::new(AtomicBool::new(false));
    let writer = workload(&stack, Arc::clone(&stop)).await;

    // Rows lost in ClickHouse behind Ferry's back: a third of items. The keyless bag and
    // ticks keep streaming through the resync; bag shares every transaction with items, so a
    // replay that numbered its rows differently would duplicate them.
    stack
        .clickhouse
        .query("ALTER TABLE dest.items DELETE WHERE id % 3 = 0 SETTINGS mutations_sync = 2")
        .execute()
        .await
        .unwrap();

    let seen = watch(&stack, "pipe");
    let status = resync(&stack, "pipe", &["public.items"]).await;
    assert_eq!(status.state(), PipeState::Resync);
    let started = status.state_changed_at.unwrap();
    let done = stack.wait_state("pipe", PipeState::Running).await;
    let ended = done.status.unwrap().state_changed_at.unwrap();

    // The other tables kept receiving their changes during the resync.
    let during = ticks_written_between(&stack, &started, &ended).await;
    assert!(
        during > 0,
        "no ticks arrived during the resync ({started:?} .. {ended:?})"
    );

    stop.store(true, Ordering::Relaxed);
    let writes = writer.await.unwrap();
    assert!(writes > 10, "the workload ran ({writes} transactions)");
    stack.converge(ITEMS_PG, ITEMS_CH).await;
    stack.converge(BAG_PG, BAG_CH).await;
    stack.converge(TICKS_PG, TICKS_CH).await;
    let leftovers = stack
        .ch_rows("SELECT name FROM system.tables WHERE database = 'dest' AND name LIKE '%_resync'")
        .await
        .unwrap();
    assert!(leftovers.is_empty(), "shadow tables left: {leftovers:?}");

    let seen = seen.lock().unwrap();
    assert!(
        in_order(&seen.states, &[PipeState::Resync, PipeState::Running]),
        "states seen: {:?}",
        seen.states
    );
    assert!(
        in_order(
            &seen.phases,
            &[
                ReloadPhase::Holding,
                ReloadPhase::Copying,
                ReloadPhase::Swapping
            ]
        ),
        "reload phases seen: {:?}",
        seen.phases
    );
}

#[tokio::test]
async fn a_whole_pipe_resync_swaps_every_table_in_without_a_reader_ever_missing_one() {
    let stack = Stack::start(TABLES).await;
    let mut spec = stack.spec(
        "whole",
        &["items", "bag", "ticks"],
        PipeMode::SnapshotAndCdc,
    );
    spec.settings = Some(settings());
    stack.create(spec).await;
    let stop = Arc::new(AtomicBool::new(false));
    let writer = workload(&stack, Arc::clone(&stop)).await;

    // A reader polls every table the whole time; none may ever be missing.
    let reading = Arc::new(AtomicBool::new(true));
    let reader = {
        let (client, reading) = (stack.clickhouse.clone(), Arc::clone(&reading));
        tokio::spawn(async move {
            let (mut reads, mut errors) = (0u32, Vec::new());
            while reading.load(Ordering::Relaxed) && reads < 200_000 {
                for table in ["items", "bag", "ticks"] {
                    let sql = format!("SELECT count() FROM dest.{table}");
                    match client.query(&sql).fetch_one::<u64>().await {
                        Ok(_) => reads += 1,
                        Err(e) => errors.push(format!("{table}: {e}")),
                    }
                }
            }
            (reads, errors)
        })
    };
    stack
        .clickhouse
        .query("ALTER TABLE dest.items DELETE WHERE id % 5 = 0 SETTINGS mutations_sync = 2")
        .execute()
        .await
        .unwrap();
    let seen = watch(&stack, "whole");
    resync(&stack, "whole", &[]).await;
    stack.wait_state("whole", PipeState::Running).await;
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    reading.store(false, Ordering::Relaxed);
    let (reads, errors) = reader.await.unwrap();
    assert!(
        errors.is_empty(),
        "a reader saw errors during the swap: {errors:?}"
    );
    assert!(reads > 100, "the reader read ({reads} reads)");

    stack.converge(ITEMS_PG, ITEMS_CH).await;
    stack.converge(BAG_PG, BAG_CH).await;
    stack.converge(TICKS_PG, TICKS_CH).await;
    let seen = seen.lock().unwrap();
    assert!(
        in_order(
            &seen.states,
            &[PipeState::Running, PipeState::Resync, PipeState::Running]
        ),
        "states seen: {:?}",
        seen.states
    );
}

#[tokio::test]
async fn a_transaction_open_across_the_resync_boundary_holds_the_copy_and_lands_exactly_once() {
    let stack = Stack::start(TABLES).await;
    let mut spec = stack.spec("edge", &["items", "bag"], PipeMode::SnapshotAndCdc);
    spec.settings = Some(settings());
    stack.create(spec).await;
    // A transaction that has written (so it has an id) before the resync starts, still open.
    let open = stack.pg.client("postgres").await.unwrap();
    open.batch_execute(
        "BEGIN; INSERT INTO bag VALUES (7, 'b0'); UPDATE items SET note = 'open' WHERE id = 1;",
    )
    .await
    .unwrap();
    resync(&stack, "edge", &[]).await;
    // The copy's snapshot waits for it: the reload says so and stays in Holding.
    let waiting = wait::until(WITHIN, || async {
        let status = stack.status("edge").await?;
        (status
            .reason
            .contains("waiting for transactions older than the reload")
            && status.reload?.phase() == ReloadPhase::Holding)
            .then_some(())
    })
    .await;
    assert!(waiting.is_some(), "{}", stack.diagnose("edge").await);
    // Committed now: after the boundary, so the stream also carries it; the copy sees it
    // too. A keyless row must still land once.
    open.batch_execute("COMMIT").await.unwrap();
    stack.wait_state("edge", PipeState::Running).await;
    stack.converge(BAG_PG, BAG_CH).await;
    stack.converge(ITEMS_PG, ITEMS_CH).await;
}

#[tokio::test]
async fn a_resync_survives_the_coordinator_and_both_workers_killed_mid_copy() {
    let mut stack = Stack::start(TABLES).await;
    let mut spec = stack.spec(
        "sturdy",
        &["items", "bag", "ticks"],
        PipeMode::SnapshotAndCdc,
    );
    let mut slow = settings();
    slow.snapshot_rows_per_partition = Some(2000);
    slow.snapshot_parallel_partitions = Some(1);
    spec.settings = Some(slow);
    stack.create(spec).await;
    let stop = Arc::new(AtomicBool::new(false));
    let writer = workload(&stack, Arc::clone(&stop)).await;
    stack
        .clickhouse
        .query("ALTER TABLE dest.items DELETE WHERE id % 2 = 0 SETTINGS mutations_sync = 2")
        .execute()
        .await
        .unwrap();
    resync(&stack, "sturdy", &["public.items", "public.bag"]).await;
    let copying = wait::until(WITHIN, || async {
        let status = stack.status("sturdy").await?;
        let reload = status.reload?;
        let done: u32 = status.tables.iter().map(|t| t.partitions_done).sum();
        (reload.phase() == ReloadPhase::Copying && done > 0).then_some(reload.generation)
    })
    .await
    .expect("the resync copies");
    // The leader holding the copy's snapshot dies, and so do the stream and the copier.
    stack.coordinator.process().kill9();
    stack.replace_cdc("d2");
    if let Some(copier) = stack.snapshot.as_mut() {
        copier.process().kill9();
    }
    stack.snapshot = Some(stack.worker(WorkerKind::Snapshot, "s2").await);
    stack.coordinator = stack.ferry.coordinator("c2").unwrap();
    stack.coordinator.wait_serving(WITHIN).await.unwrap();
    stack.client = stack.coordinator.pipe_client().await.unwrap();
    let done = stack.wait_state("sturdy", PipeState::Running).await;
    assert!(
        done.status.unwrap().reason.contains("resync done"),
        "the resync finished"
    );
    // The new leader had no holder of the copy's snapshot: the reload started over.
    let logs = stack.logs();
    assert!(
        logs.contains("reload starts over"),
        "the copy was not started over after its snapshot holder died (generation {copying})"
    );
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    stack.converge(ITEMS_PG, ITEMS_CH).await;
    stack.converge(BAG_PG, BAG_CH).await;
    stack.converge(TICKS_PG, TICKS_CH).await;
}

#[tokio::test]
async fn a_truncate_while_the_resync_copies_leaves_no_copied_row_behind() {
    let stack = Stack::start(TABLES).await;
    let mut spec = stack.spec("emptied", &["items", "bag"], PipeMode::SnapshotAndCdc);
    let mut slow = settings();
    slow.snapshot_rows_per_partition = Some(2000);
    slow.snapshot_parallel_partitions = Some(1);
    spec.settings = Some(slow);
    stack.create(spec).await;
    resync(&stack, "emptied", &[]).await;
    let copying = wait::until(WITHIN, || async {
        let status = stack.status("emptied").await?;
        let done: u32 = status.tables.iter().map(|t| t.partitions_done).sum();
        (status.reload?.phase() == ReloadPhase::Copying && done > 0).then_some(())
    })
    .await;
    assert!(copying.is_some(), "{}", stack.diagnose("emptied").await);
    // Emptied while partitions are still being copied, then written again: rows the copy
    // lands afterwards are from before the TRUNCATE and must not survive.
    stack
        .db
        .batch_execute(
            "TRUNCATE items, bag;
             INSERT INTO items VALUES (1, 'after', 'x'), (2, 'after', 'y');
             INSERT INTO bag VALUES (1, 'after'), (1, 'after');",
        )
        .await
        .unwrap();
    stack.wait_state("emptied", PipeState::Running).await;
    stack.converge(ITEMS_PG, ITEMS_CH).await;
    stack.converge(BAG_PG, BAG_CH).await;
}

#[tokio::test]
async fn a_completed_snapshot_only_pipe_is_resynced_to_completed_with_the_current_rows() {
    let stack = Stack::start(
        "CREATE TABLE ticks (id serial PRIMARY KEY, v int);
         INSERT INTO ticks (v) SELECT g FROM generate_series(1, 500) g;",
    )
    .await;
    stack
        .create(stack.spec("once", &["ticks"], PipeMode::SnapshotOnly))
        .await;
    stack
        .db
        .batch_execute("DELETE FROM ticks WHERE id <= 100; UPDATE ticks SET v = -v WHERE id > 450;")
        .await
        .unwrap();
    resync(&stack, "once", &[]).await;
    stack.wait_state("once", PipeState::Completed).await;
    stack.converge(TICKS_PG, TICKS_CH).await;
}
