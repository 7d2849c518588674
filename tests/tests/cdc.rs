//! Change data capture through the real services: after the snapshot, inserts, updates,
//! deletes, primary-key changes, unchanged TOAST values under REPLICA IDENTITY FULL and a
//! TRUNCATE reach ClickHouse; the slot is never acknowledged beyond the checkpoint.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::stack::{Stack, WITHIN, Workers};
use ferry_proto::v1::{PausePipeRequest, PipeMode, PipeState, ResumePipeRequest};
use ferry_testkit::wait;

/// Every live row of `table` as (id, note, length of big): in Postgres, in ClickHouse.
fn rows(table: &str) -> (String, String) {
    (
        format!("SELECT id::text, note, length(big)::text FROM {table}"),
        format!(
            "SELECT toString(id), note, toString(length(big)) FROM dest.{table} FINAL \
             WHERE _ferry_is_deleted = 0"
        ),
    )
}

/// Waits until ClickHouse holds `table`'s rows as Postgres does.
async fn converge(stack: &Stack, table: &str) {
    let (postgres, clickhouse) = rows(table);
    stack.converge(&postgres, &clickhouse).await;
}

#[tokio::test]
async fn changes_after_the_snapshot_reach_clickhouse_exactly() {
    let stack = Stack::start(
        "CREATE TABLE items (id bigint PRIMARY KEY, note text, big text);
         CREATE TABLE wide (id bigint PRIMARY KEY, note text, big text);
         ALTER TABLE wide REPLICA IDENTITY FULL;
         ALTER TABLE wide ALTER big SET STORAGE EXTERNAL;
         INSERT INTO items SELECT i, 'item ' || i, NULL FROM generate_series(1, 1000) i;
         INSERT INTO wide SELECT i, 'w' || i, repeat('x', 5000) FROM generate_series(1, 10) i;",
    )
    .await;
    let db = &stack.db;
    stack
        .create(stack.spec("live", &["items", "wide"], PipeMode::SnapshotAndCdc))
        .await;
    converge(&stack, "items").await;

    // Changes of every kind, each in its own transaction, some in one.
    for statement in [
        "INSERT INTO items SELECT i, 'new ' || i, NULL FROM generate_series(1001, 1500) i",
        "UPDATE items SET note = note || ' (edited)' WHERE id % 10 = 0",
        "DELETE FROM items WHERE id % 7 = 0",
        "UPDATE items SET id = id + 100000 WHERE id BETWEEN 1 AND 20",
        "BEGIN; INSERT INTO items VALUES (9999999, 'in a transaction', NULL); \
         UPDATE items SET note = 'twice' WHERE id = 9999999; COMMIT",
        // Only note changes: big is TOASTed and unchanged (REPLICA IDENTITY FULL carries it).
        "UPDATE wide SET note = note || '!'",
        "UPDATE wide SET id = id + 1000 WHERE id = 1",
    ] {
        db.batch_execute(statement).await.unwrap();
    }
    converge(&stack, "items").await;
    converge(&stack, "wide").await;

    // The status shows the stream: checkpoint, lag, per-table counters.
    let status = stack.status("live").await.unwrap();
    let replication = status.replication.expect("replication status");
    assert_eq!(replication.worker_id, "d1");
    assert!(replication.checkpoint_lsn > 0 && replication.last_batch_at.is_some());
    let items = status
        .tables
        .iter()
        .find(|t| t.source_table == "public.items")
        .unwrap();
    assert!(items.inserted >= 501, "{items:?}");
    assert!(items.updated >= 100 && items.deleted >= 200, "{items:?}");

    // TRUNCATE lands in order with what follows it.
    db.batch_execute("TRUNCATE items").await.unwrap();
    db.batch_execute("INSERT INTO items VALUES (1, 'after truncate', NULL)")
        .await
        .unwrap();
    converge(&stack, "items").await;

    // Invariant: the slot's confirmed_flush_lsn is never ahead of the checkpoint in etcd.
    let store = stack.ferry.store().await.unwrap();
    let checkpoint = store
        .checkpoint("live")
        .await
        .unwrap()
        .expect("a checkpoint was written")
        .lsn;
    let confirmed = confirmed_flush(db).await;
    assert!(
        confirmed <= checkpoint,
        "slot confirmed {confirmed:#x} beyond checkpoint {checkpoint:#x}"
    );

    // An idle database: heartbeats (every sync interval, 1 s here) still move the slot.
    let idle_from = confirmed_flush(db).await;
    // Two heartbeat intervals (1 s each), plus one status report (1 s) and a margin.
    let moved = wait::until(Duration::from_secs(5), || async {
        (confirmed_flush(db).await > idle_from).then_some(())
    })
    .await;
    assert!(
        moved.is_some(),
        "the slot did not advance while the database was idle"
    );
    let checkpoint = store.checkpoint("live").await.unwrap().unwrap().lsn;
    assert!(confirmed_flush(db).await <= checkpoint);

    // ADD COLUMN reaches ClickHouse, rows that predate it with its default; DROP COLUMN keeps
    // the ClickHouse column.
    for statement in [
        "ALTER TABLE items ADD COLUMN extra integer DEFAULT 4",
        "INSERT INTO items VALUES (2, 'with extra', NULL, 7)",
        "UPDATE items SET extra = 5 WHERE id = 2",
        "ALTER TABLE items DROP COLUMN big",
        "INSERT INTO items (id, note, extra) VALUES (3, 'after drop', 9)",
    ] {
        db.batch_execute(statement).await.unwrap();
    }
    stack
        .converge(
            "SELECT count(*)::text, coalesce(sum(extra), 0)::text FROM items",
            "SELECT toString(count()), toString(sum(ifNull(extra, 0))) FROM dest.items FINAL \
             WHERE _ferry_is_deleted = 0",
        )
        .await;
    let big_kept: u64 = stack
        .clickhouse
        .query("SELECT count() FROM system.columns WHERE database = 'dest' AND table = 'items' AND name = 'big'")
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(big_kept, 1, "a dropped source column stays in ClickHouse");

    // An incompatible type change fails the pipe, naming the table and the remedy.
    db.batch_execute("ALTER TABLE wide ALTER COLUMN note TYPE integer USING length(note)")
        .await
        .unwrap();
    db.batch_execute("INSERT INTO wide VALUES (500, 1, 'x')")
        .await
        .unwrap();
    let failed = stack.wait_state("live", PipeState::Failed).await;
    let error = failed.status.unwrap().error.unwrap();
    assert_eq!(error.table, "public.wide");
    assert!(error.message.contains("changed type"), "{}", error.message);
    assert!(
        error
            .remedy
            .contains("ferry resync live --table public.wide"),
        "{}",
        error.remedy
    );
}

async fn confirmed_flush(db: &tokio_postgres::Client) -> u64 {
    let confirmed: String = db
        .query_one(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = 'ferry_live'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let (hi, lo) = confirmed.split_once('/').unwrap();
    (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
}

#[tokio::test]
async fn a_killed_cdc_worker_is_replaced_and_nothing_is_lost() {
    let mut stack = Stack::start_with(
        "CREATE TABLE items (id bigint PRIMARY KEY, note text, big text);
         INSERT INTO items SELECT i, 'item ' || i, NULL FROM generate_series(1, 100) i;",
        Workers {
            cdc: Some("doomed"),
            ..Workers::default()
        },
    )
    .await;
    let mut spec = stack.spec("live", &["items"], PipeMode::SnapshotAndCdc);
    spec.settings.as_mut().unwrap().pull_batch_size = Some(50);
    stack.submit(spec).await.unwrap();
    let store = stack.ferry.store().await.unwrap();
    let owned = wait::until(WITHIN, || async {
        let (owner, _) = store.cdc_owner("live").await.ok()??;
        (owner == "doomed").then_some(())
    })
    .await;
    assert!(owned.is_some(), "the doomed worker never took the stream");

    // Throughout, the slot's confirmed position never passes the checkpoint (read in that
    // order: the checkpoint only grows, so a later read cannot hide a violation).
    let (stop_sampling, mut sampling_stopped) = tokio::sync::watch::channel(false);
    let sampler = {
        let sampler_db = stack.pg.client("postgres").await.unwrap();
        let store = stack.ferry.store().await.unwrap();
        tokio::spawn(async move {
            let mut samples = 0u32;
            while !*sampling_stopped.borrow_and_update() {
                let confirmed = confirmed_flush(&sampler_db).await;
                if let Some(checkpoint) = store.checkpoint("live").await.unwrap() {
                    assert!(
                        confirmed <= checkpoint.lsn,
                        "slot confirmed {confirmed:#x} beyond checkpoint {:#x}",
                        checkpoint.lsn
                    );
                    samples += 1;
                }
                let _ = tokio::time::timeout(Duration::from_millis(20), sampling_stopped.changed())
                    .await;
            }
            samples
        })
    };
    // A bounded write workload runs while the worker is killed and replaced.
    let writer = stack.pg.client("postgres").await.unwrap();
    let workload = tokio::spawn(async move {
        for i in 0..400i64 {
            let id = 1000 + i;
            writer
                .batch_execute(&format!(
                    "BEGIN; INSERT INTO items VALUES ({id}, 'w{i}', NULL); \
                     UPDATE items SET note = note || '+' WHERE id = {}; \
                     DELETE FROM items WHERE id = {}; COMMIT",
                    1 + i % 100,
                    id - 3
                ))
                .await
                .unwrap();
        }
    });
    let progressed = wait::until(WITHIN, || async {
        let checkpoint = store.checkpoint("live").await.ok()??;
        (checkpoint.worker_id == "doomed").then_some(())
    })
    .await;
    assert!(progressed.is_some(), "the doomed worker never checkpointed");
    stack.replace_cdc("survivor");
    workload.await.unwrap();

    converge(&stack, "items").await;
    stop_sampling.send_replace(true);
    let samples = sampler.await.unwrap();
    assert!(
        samples > 10,
        "only {samples} samples of the slot against the checkpoint"
    );
    let checkpoint = store.checkpoint("live").await.unwrap().unwrap();
    assert_eq!(checkpoint.worker_id, "survivor");
    assert!(confirmed_flush(&stack.db).await <= checkpoint.lsn);
}

#[tokio::test]
async fn pause_stops_the_stream_at_a_checkpoint_and_resume_catches_up() {
    let stack =
        Stack::start("CREATE TABLE items (id bigint PRIMARY KEY, note text, big text);").await;
    let db = &stack.db;
    stack
        .create(stack.spec("live", &["items"], PipeMode::CdcOnly))
        .await;
    let store = stack.ferry.store().await.unwrap();
    let streaming = wait::until(WITHIN, || async {
        store.cdc_owner("live").await.ok()?.map(|_| ())
    })
    .await;
    assert!(streaming.is_some(), "no worker took the stream");

    // A write burst, paused in the middle.
    for i in 0..200 {
        db.batch_execute(&format!(
            "INSERT INTO items VALUES ({i}, 'before pause', NULL)"
        ))
        .await
        .unwrap();
    }
    stack
        .client
        .clone()
        .pause_pipe(PausePipeRequest {
            name: "live".into(),
        })
        .await
        .unwrap();
    for i in 200..400 {
        db.batch_execute(&format!(
            "INSERT INTO items VALUES ({i}, 'around pause', NULL)"
        ))
        .await
        .unwrap();
    }
    // The pipe reaches paused within seconds.
    stack
        .wait_states("live", &[PipeState::Paused], Duration::from_secs(15))
        .await;
    assert!(
        store.cdc_owner("live").await.unwrap().is_none(),
        "a stream still runs while paused"
    );

    // While paused nothing arrives, however long we look (three sync intervals here).
    let (_, ch_items) = rows("items");
    let at_pause = stack.ch_rows(&ch_items).await;
    for i in 400..600 {
        db.batch_execute(&format!(
            "INSERT INTO items VALUES ({i}, 'while paused', NULL)"
        ))
        .await
        .unwrap();
    }
    let arrived = wait::until(Duration::from_secs(3), || async {
        (stack.ch_rows(&ch_items).await != at_pause).then_some(())
    })
    .await;
    assert!(arrived.is_none(), "rows arrived while the pipe was paused");

    // Resume: everything, including what was written while paused, arrives exactly.
    stack
        .client
        .clone()
        .resume_pipe(ResumePipeRequest {
            name: "live".into(),
        })
        .await
        .unwrap();
    converge(&stack, "items").await;
    assert_eq!(
        stack.status("live").await.unwrap().state(),
        PipeState::Running
    );
}

#[tokio::test]
async fn unchanged_toast_values_survive_updates_without_replica_identity_full() {
    let stack = Stack::start(
        "CREATE TABLE docs (id bigint PRIMARY KEY, title text, body text, tags text[], blob bytea);
         ALTER TABLE docs ALTER body SET STORAGE EXTERNAL;
         ALTER TABLE docs ALTER tags SET STORAGE EXTERNAL;
         ALTER TABLE docs ALTER blob SET STORAGE EXTERNAL;
         INSERT INTO docs SELECT i, 'title ' || i,
             repeat(md5(i::text), 32768),
             ARRAY(SELECT 'tag \"' || j || '\\' FROM generate_series(1, 500) j),
             decode(repeat(md5(i::text), 200), 'hex')
           FROM generate_series(1, 5) i;",
    )
    .await;
    stack
        .create(stack.spec("live", &["docs"], PipeMode::SnapshotAndCdc))
        .await;
    let store = stack.ferry.store().await.unwrap();
    let streaming = wait::until(WITHIN, || async {
        store.cdc_owner("live").await.ok()?.map(|_| ())
    })
    .await;
    assert!(streaming.is_some());

    // Only the title changes: body (1 MB), tags and blob are TOASTed and not sent.
    for statement in [
        "UPDATE docs SET title = title || ' (1)'",
        "INSERT INTO docs VALUES (6, 'six', repeat('z', 100000), ARRAY['a'], '\\x00ff')",
        "UPDATE docs SET title = 'six again' WHERE id = 6",
        "UPDATE docs SET title = title || ' (2)' WHERE id <= 2",
    ] {
        stack.db.batch_execute(statement).await.unwrap();
    }
    stack
        .converge(
            "SELECT id::text, title, md5(body), md5(array_to_string(tags, ',')), md5(blob) FROM docs",
            "SELECT toString(id), assumeNotNull(title), lower(hex(MD5(assumeNotNull(body)))), \
             lower(hex(MD5(arrayStringConcat(tags, ',')))), lower(hex(MD5(assumeNotNull(blob)))) \
             FROM dest.docs FINAL WHERE _ferry_is_deleted = 0",
        )
        .await;
    assert_eq!(
        stack.status("live").await.unwrap().state(),
        PipeState::Running
    );
}

/// A snapshot+CDC pipe under a concurrent workload of every kind: after the workload stops
/// and the stream catches up, ClickHouse (FINAL, not deleted) equals Postgres exactly.
#[tokio::test]
async fn a_concurrent_workload_of_every_kind_converges_exactly() {
    let stack = Stack::start(
        "CREATE TABLE items (id bigint PRIMARY KEY, note text, big text);
         ALTER TABLE items ALTER big SET STORAGE EXTERNAL;
         INSERT INTO items SELECT i, 'item ' || i, CASE WHEN i % 50 = 0 THEN repeat(md5(i::text), 32768) END
           FROM generate_series(1, 2000) i;
         CREATE TABLE events (id bigint, at date, note text, big text, PRIMARY KEY (id, at)) PARTITION BY RANGE (at);
         CREATE TABLE events_a PARTITION OF events FOR VALUES FROM ('2020-01-01') TO ('2025-01-01');
         CREATE TABLE events_b PARTITION OF events FOR VALUES FROM ('2025-01-01') TO ('2030-01-01');
         INSERT INTO events SELECT i, '2024-06-01'::date + (i % 400), 'event ' || i, NULL FROM generate_series(1, 1000) i;",
    )
    .await;
    let mut spec = stack.spec("live", &["items", "events"], PipeMode::SnapshotAndCdc);
    spec.settings.as_mut().unwrap().pull_batch_size = Some(500);
    stack.submit(spec).await.unwrap();
    // The workload starts once the slot exists (the snapshot may still run): CDC carries it.
    stack
        .wait_states("live", &[PipeState::Snapshot, PipeState::Running], WITHIN)
        .await;
    let writer = stack.pg.client("postgres").await.unwrap();
    let workload = tokio::spawn(async move {
        for round in 0..60i64 {
            let base = 10_000 + round * 10;
            let statements = [
                format!(
                    "INSERT INTO items SELECT i, 'new ' || i, NULL FROM generate_series({base}, {base} + 9) i"
                ),
                format!(
                    "UPDATE items SET note = note || '.' WHERE id % 37 = {}",
                    round % 37
                ),
                format!("DELETE FROM items WHERE id = {}", 100 + round * 3),
                // A primary-key change.
                format!(
                    "UPDATE items SET id = id + 1000000 WHERE id = {}",
                    200 + round
                ),
                // Other columns of rows holding 1 MB TOASTed values.
                format!(
                    "UPDATE items SET note = 'toast row ' || {round} WHERE id = {}",
                    50 * (1 + round % 40)
                ),
                format!(
                    "INSERT INTO events VALUES ({}, '2026-01-01'::date + {round}, 'new', NULL)",
                    5000 + round
                ),
                format!("UPDATE events SET note = 'moved' WHERE id = {}", 1 + round),
                format!("DELETE FROM events WHERE id = {}", 500 + round),
            ];
            for statement in statements {
                writer.batch_execute(&statement).await.unwrap();
            }
            if round == 20 {
                writer
                    .batch_execute("ALTER TABLE items ADD COLUMN extra integer DEFAULT 0")
                    .await
                    .unwrap();
            }
            if round >= 20 {
                writer
                    .batch_execute(&format!(
                        "UPDATE items SET extra = {round} WHERE id = {}",
                        base
                    ))
                    .await
                    .unwrap();
            }
            if round == 40 {
                writer.batch_execute("TRUNCATE events").await.unwrap();
            }
        }
    });
    workload.await.unwrap();

    stack.wait_state("live", PipeState::Running).await;
    // Row by row: every live row's id, note, big (as md5) and extra.
    stack
        .converge(
            "SELECT id::text, coalesce(note, ''), coalesce(md5(big), ''), coalesce(extra, 0)::text \
             FROM items",
            "SELECT toString(id), ifNull(note, ''), if(isNull(big), '', lower(hex(MD5(assumeNotNull(big))))), \
             toString(ifNull(extra, 0)) FROM dest.items FINAL WHERE _ferry_is_deleted = 0",
        )
        .await;
    // events (partitioned) matches postgres row for row.
    stack
        .converge(
            "SELECT id::text, at::text, note FROM events",
            "SELECT toString(id), toString(at), ifNull(note, '') FROM dest.events FINAL \
             WHERE _ferry_is_deleted = 0",
        )
        .await;
    let status = stack.status("live").await.unwrap();
    assert_eq!(status.state(), PipeState::Running);
    // The changes really went through the stream.
    let items = status
        .tables
        .iter()
        .find(|t| t.source_table == "public.items")
        .unwrap();
    assert!(
        items.inserted >= 600 && items.updated > 0 && items.deleted > 0,
        "{items:?}"
    );
}
