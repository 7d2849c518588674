//! Reloads of a live pipe (docs/reload.md): a per-table and a whole-pipe resync under a
//! concurrent write workload, recovery from Failed by resync, tables added and removed while
//! the others keep streaming. Each test is one scenario through the real services, compared
//! value by value, with the states a WatchPipe client saw asserted.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::stack::{Stack, WITHIN};
use ferry_proto::v1::{
    AddTablesRequest, PipeMode, PipeSettings, PipeState, ReloadPhase, RemoveTablesRequest,
    ResyncPipeRequest, TableMapping, WatchPipeRequest,
};
use ferry_testkit::wait;

const ITEMS_PG: &str = "SELECT id::text, note, payload FROM items";
const ITEMS_CH: &str = "SELECT toString(id), note, payload FROM dest.items_current";
const BAG_PG: &str = "SELECT a::text, b FROM bag";
const BAG_CH: &str = "SELECT toString(a), b FROM dest.bag_current";
const TICKS_PG: &str = "SELECT id::text, v::text FROM ticks";
const TICKS_CH: &str = "SELECT toString(id), toString(v) FROM dest.ticks_current";

const TABLES: &str = r#"
    CREATE TABLE items (id int PRIMARY KEY, note text, payload text);
    INSERT INTO items SELECT g, 'n' || g, repeat(md5(g::text), 80) FROM generate_series(1, 40000) g;
    CREATE TABLE bag (a int, b text);
    ALTER TABLE bag REPLICA IDENTITY FULL;
    INSERT INTO bag SELECT g % 50, 'b' || (g % 7) FROM generate_series(1, 3000) g;
    CREATE TABLE ticks (id serial PRIMARY KEY, v int);
    INSERT INTO ticks (v) SELECT g FROM generate_series(1, 100) g;
"#;

/// What a WatchPipe client saw: each state change, and each reload phase change.
#[derive(Default)]
struct Seen {
    states: Vec<PipeState>,
    phases: Vec<ReloadPhase>,
}

/// Follows pipe `name` through WatchPipe, recording what changed.
fn watch(stack: &Stack, name: &str) -> Arc<Mutex<Seen>> {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let mut client = stack.client.clone();
    let (name, record) = (name.to_owned(), Arc::clone(&seen));
    tokio::spawn(async move {
        let mut stream = client
            .watch_pipe(WatchPipeRequest { name })
            .await
            .unwrap()
            .into_inner();
        while let Ok(Some(message)) = stream.message().await {
            let Some(status) = message.pipe.and_then(|p| p.status) else {
                continue;
            };
            let mut seen = record.lock().unwrap();
            if seen.states.last() != Some(&status.state()) {
                seen.states.push(status.state());
            }
            if let Some(reload) = status.reload
                && seen.phases.last() != Some(&reload.phase())
            {
                seen.phases.push(reload.phase());
            }
        }
    });
    seen
}

/// Whether `sub` appears in `seq` in order (not necessarily adjacent).
fn in_order<T: PartialEq>(seq: &[T], sub: &[T]) -> bool {
    let mut it = seq.iter();
    sub.iter().all(|x| it.any(|y| y == x))
}

/// A write workload on items, bag and ticks until `stop`: inserts, updates (some leaving the
/// TOASTed payload unchanged), deletes, key changes, keyless duplicates. Bounded.
async fn workload(stack: &Stack, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<u32> {
    let db = stack.pg.client("postgres").await.unwrap();
    tokio::spawn(async move {
        let mut i = 0u32;
        while !stop.load(Ordering::Relaxed) && i < 20_000 {
            let k = i64::from(i) * 7919 % 40_000 + 1;
            db.batch_execute(&format!(
                "BEGIN;
                 INSERT INTO ticks (v) VALUES ({i});
                 UPDATE items SET note = 'u{i}' WHERE id = {k};
                 UPDATE items SET payload = repeat('p{i}', 300) WHERE id = {k2};
                 DELETE FROM items WHERE id = {k3};
                 INSERT INTO items VALUES ({new}, 'new', 'x') ON CONFLICT (id) DO NOTHING;
                 UPDATE items SET id = id + 100000 WHERE id = {k4};
                 INSERT INTO bag VALUES ({a}, 'w'), ({a}, 'w');
                 DELETE FROM bag WHERE ctid = (SELECT ctid FROM bag WHERE a = {a} LIMIT 1);
                 COMMIT;",
                k2 = (k + 13) % 40_000 + 1,
                k3 = (k + 29) % 40_000 + 1,
                k4 = (k + 31) % 40_000 + 1,
                new = 200_000 + i,
                a = i % 50,
            ))
            .await
            .unwrap();
            i += 1;
            // Pacing, so the stream has a steady flow rather than one burst.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        i
    })
}

fn settings() -> PipeSettings {
    PipeSettings {
        sync_interval: Some(prost_types::Duration {
            seconds: 1,
            nanos: 0,
        }),
        snapshot_rows_per_partition: Some(4000),
        snapshot_parallel_partitions: Some(2),
        ..Default::default()
    }
}

/// Rows of ticks ClickHouse received while the pipe was in `state` (by `_ferry_synced_at`
/// against the pipe's state timestamps as WatchPipe reported them).
async fn ticks_written_between(
    stack: &Stack,
    from: &prost_types::Timestamp,
    to: &prost_types::Timestamp,
) -> u64 {
    let sql = format!(
        "SELECT toString(count()) FROM dest.ticks WHERE _ferry_synced_at > fromUnixTimestamp64Micro({}) \
         AND _ferry_synced_at < fromUnixTimestamp64Micro({})",
        from.seconds * 1_000_000 + i64::from(from.nanos / 1000),
        to.seconds * 1_000_000 + i64::from(to.nanos / 1000),
    );
    let rows = stack.ch_rows(&sql).await.unwrap();
    rows[0][0].as_deref().unwrap().parse().unwrap()
}

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
    let resync = stack
        .client
        .clone()
        .resync_pipe(ResyncPipeRequest {
            name: "pipe".into(),
            tables: vec!["public.items".into()],
        })
        .await
        .unwrap()
        .into_inner();
    let status = resync.pipe.unwrap().status.unwrap();
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
    stack
        .client
        .clone()
        .resync_pipe(ResyncPipeRequest {
            name: "whole".into(),
            tables: vec![],
        })
        .await
        .unwrap();
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

    stack
        .client
        .clone()
        .resync_pipe(ResyncPipeRequest {
            name: "typed".into(),
            tables: vec!["public.wide".into()],
        })
        .await
        .unwrap();
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

    stack
        .client
        .clone()
        .resync_pipe(ResyncPipeRequest {
            name: "slotless".into(),
            tables: vec![],
        })
        .await
        .unwrap();
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
async fn a_table_added_under_load_is_copied_while_the_others_stream_and_a_removed_one_stops() {
    let stack = Stack::start(&format!(
        "{TABLES}
         CREATE TABLE late (id int PRIMARY KEY, body text);
         INSERT INTO late SELECT g, repeat('late', g % 50) FROM generate_series(1, 30000) g;"
    ))
    .await;
    let mut spec = stack.spec("grow", &["ticks", "items"], PipeMode::SnapshotAndCdc);
    spec.settings = Some(settings());
    stack.create(spec).await;
    let stop = Arc::new(AtomicBool::new(false));
    let writer = workload(&stack, Arc::clone(&stop)).await;
    let late_writer = {
        let db = stack.pg.client("postgres").await.unwrap();
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) && i < 20_000 {
                db.batch_execute(&format!(
                    "UPDATE late SET body = 'changed {i}' WHERE id = {k};
                     INSERT INTO late VALUES ({new}, 'new') ON CONFLICT DO NOTHING;",
                    k = i * 37 % 30_000 + 1,
                    new = 100_000 + i
                ))
                .await
                .unwrap();
                i += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };

    let seen = watch(&stack, "grow");
    let added = stack
        .client
        .clone()
        .add_tables(AddTablesRequest {
            name: "grow".into(),
            tables: vec![TableMapping {
                source_table: "late".into(),
                ..Default::default()
            }],
        })
        .await
        .unwrap()
        .into_inner();
    let status = added.pipe.unwrap().status.unwrap();
    assert_eq!(status.state(), PipeState::Modifying);
    let started = status.state_changed_at.unwrap();
    let done = stack.wait_state("grow", PipeState::Running).await;
    let ended = done.status.clone().unwrap().state_changed_at.unwrap();
    let during = ticks_written_between(&stack, &started, &ended).await;
    assert!(during > 0, "no ticks arrived while late was added");
    assert!(
        done.status
            .unwrap()
            .tables
            .iter()
            .any(|t| t.source_table == "public.late"
                && t.partitions_done == t.partitions_total
                && t.partitions_total > 1),
        "late's snapshot progress is reported"
    );
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    late_writer.await.unwrap();
    stack
        .converge(
            "SELECT id::text, body FROM late",
            "SELECT toString(id), body FROM dest.late_current",
        )
        .await;
    stack.converge(TICKS_PG, TICKS_CH).await;
    stack.converge(ITEMS_PG, ITEMS_CH).await;
    {
        let seen = seen.lock().unwrap();
        assert!(
            in_order(
                &seen.states,
                &[
                    PipeState::Modifying,
                    PipeState::Snapshot,
                    PipeState::Running
                ]
            ),
            "states seen: {:?}",
            seen.states
        );
    }

    // Removed: its changes stop arriving; its ClickHouse table stays.
    stack
        .client
        .clone()
        .remove_tables(RemoveTablesRequest {
            name: "grow".into(),
            source_tables: vec!["public.late".into()],
            drop_destination_tables: false,
        })
        .await
        .unwrap();
    stack.wait_state("grow", PipeState::Running).await;
    let before = stack
        .ch_rows("SELECT toString(id), body FROM dest.late_current")
        .await
        .unwrap();
    stack
        .db
        .batch_execute("UPDATE late SET body = 'after removal'; INSERT INTO ticks (v) VALUES (-5);")
        .await
        .unwrap();
    stack.converge(TICKS_PG, TICKS_CH).await;
    let after = stack
        .ch_rows("SELECT toString(id), body FROM dest.late_current")
        .await
        .unwrap();
    assert_eq!(before, after, "a removed table received changes");
    let published = stack
        .pg_count("SELECT count(*) FROM pg_publication_tables WHERE pubname = 'ferry_grow' AND tablename = 'late'")
        .await;
    assert_eq!(published, 0);
    let pipe = stack.pipe("grow").await.unwrap();
    assert!(
        !pipe
            .spec
            .unwrap()
            .tables
            .iter()
            .any(|t| t.source_table == "late")
    );

    // Removed with its ClickHouse table dropped (and its view).
    stack
        .client
        .clone()
        .remove_tables(RemoveTablesRequest {
            name: "grow".into(),
            source_tables: vec!["public.items".into()],
            drop_destination_tables: true,
        })
        .await
        .unwrap();
    stack.wait_state("grow", PipeState::Running).await;
    let gone = stack
        .ch_rows("SELECT name FROM system.tables WHERE database = 'dest' AND name IN ('items', 'items_current')")
        .await
        .unwrap();
    assert!(gone.is_empty(), "dropped tables remain: {gone:?}");
    stack
        .db
        .batch_execute("INSERT INTO ticks (v) VALUES (-6);")
        .await
        .unwrap();
    stack.converge(TICKS_PG, TICKS_CH).await;
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
    stack
        .client
        .clone()
        .resync_pipe(ResyncPipeRequest {
            name: "edge".into(),
            tables: vec![],
        })
        .await
        .unwrap();
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
async fn a_resync_survives_the_coordinator_and_the_cdc_worker_killed_mid_copy() {
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
    stack
        .client
        .clone()
        .resync_pipe(ResyncPipeRequest {
            name: "sturdy".into(),
            tables: vec!["public.items".into(), "public.bag".into()],
        })
        .await
        .unwrap();
    let copying = wait::until(WITHIN, || async {
        let status = stack.status("sturdy").await?;
        let reload = status.reload?;
        let done: u32 = status.tables.iter().map(|t| t.partitions_done).sum();
        (reload.phase() == ReloadPhase::Copying && done > 0).then_some(reload.generation)
    })
    .await
    .expect("the resync copies");
    // The leader holding the copy's snapshot dies, and so does the stream.
    stack.coordinator.process().kill9();
    stack.replace_cdc("d2");
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
    stack
        .client
        .clone()
        .resync_pipe(ResyncPipeRequest {
            name: "later".into(),
            tables: vec![],
        })
        .await
        .unwrap();
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
    stack
        .client
        .clone()
        .resync_pipe(ResyncPipeRequest {
            name: "unpublished".into(),
            tables: vec!["public.ticks".into()],
        })
        .await
        .unwrap();
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

#[tokio::test]
async fn a_truncate_while_the_resync_copies_leaves_no_copied_row_behind() {
    let stack = Stack::start(TABLES).await;
    let mut spec = stack.spec("emptied", &["items", "bag"], PipeMode::SnapshotAndCdc);
    let mut slow = settings();
    slow.snapshot_rows_per_partition = Some(2000);
    slow.snapshot_parallel_partitions = Some(1);
    spec.settings = Some(slow);
    stack.create(spec).await;
    stack
        .client
        .clone()
        .resync_pipe(ResyncPipeRequest {
            name: "emptied".into(),
            tables: vec![],
        })
        .await
        .unwrap();
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
async fn an_added_table_that_cannot_be_replicated_is_refused_and_the_pipe_keeps_streaming() {
    let stack = Stack::start(
        "CREATE TABLE ticks (id serial PRIMARY KEY, v int);
         CREATE TABLE loose (a int, b text);
         INSERT INTO loose VALUES (1, 'x');",
    )
    .await;
    stack
        .create(stack.spec("picky", &["ticks"], PipeMode::SnapshotAndCdc))
        .await;
    stack
        .client
        .clone()
        .add_tables(AddTablesRequest {
            name: "picky".into(),
            tables: vec![TableMapping {
                source_table: "loose".into(),
                ..Default::default()
            }],
        })
        .await
        .unwrap();
    // No key and no replica identity: refused, named, with what to run; nothing else changes.
    let refused = wait::until(WITHIN, || async {
        let pipe = stack.pipe("picky").await?;
        let status = pipe.status.clone()?;
        (status.state() == PipeState::Running && status.reason.contains("tables not added"))
            .then_some(pipe)
    })
    .await
    .unwrap_or_else(|| panic!("not refused"));
    let status = refused.status.unwrap();
    assert!(status.reason.contains("public.loose"), "{}", status.reason);
    assert!(
        status.reason.contains("REPLICA IDENTITY"),
        "{}",
        status.reason
    );
    assert!(status.reload.is_none());
    assert!(
        !refused
            .spec
            .unwrap()
            .tables
            .iter()
            .any(|t| t.source_table == "loose")
    );
    stack
        .db
        .batch_execute("INSERT INTO ticks (v) VALUES (1), (2);")
        .await
        .unwrap();
    stack.converge(TICKS_PG, TICKS_CH).await;
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
    stack
        .client
        .clone()
        .resync_pipe(ResyncPipeRequest {
            name: "once".into(),
            tables: vec![],
        })
        .await
        .unwrap();
    stack.wait_state("once", PipeState::Completed).await;
    stack.converge(TICKS_PG, TICKS_CH).await;
}
