//! ClickHouse equals Postgres in the cases a user can create (issue 7): keyless tables with
//! duplicate rows, commit order, renames, DROP NOT NULL, ADD COLUMN across a restart, unchanged
//! TOAST values of rows that predate the pipe or change in bulk, and a changed replica
//! identity. Each test is one scenario through the real services, compared value by value.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::stack::{Stack, WITHIN};
use ferry_proto::v1::{PipeMode, PipeSettings, PipeState, UpdatePipeSettingsRequest, WorkerKind};
use ferry_testkit::wait;

/// A keyless bag of rows, read element by element (a NULL array lands as an empty one).
const BAG_PG: &str = "SELECT a::text, b, coalesce(array_to_string(c, '|', 'NULL'), '') FROM bag";
const BAG_CH: &str = "SELECT toString(a), b, arrayStringConcat(arrayMap(x -> ifNull(x, 'NULL'), c), '|') \
                      FROM dest.bag_current";

#[tokio::test]
async fn a_keyless_table_keeps_its_duplicate_rows_through_changes_replays_and_truncate() {
    let mut stack = Stack::start(
        r#"CREATE TABLE bag (a int, b text, c text[]);
           ALTER TABLE bag REPLICA IDENTITY FULL;
           INSERT INTO bag VALUES (1, 'x', '{" a","b "}'), (1, 'x', '{" a","b "}'),
                                  (2, 'y', NULL), (2, 'y', NULL), (2, 'y', NULL), (3, NULL, '{}');"#,
    )
    .await;
    let spec = stack.spec("bag", &["bag"], PipeMode::SnapshotAndCdc);
    stack.create(spec).await;
    stack.converge(BAG_PG, BAG_CH).await;

    // Another copy, one copy removed, one copy of a duplicated row changed; quoted array
    // elements keep their spaces, commas, quotes, backslashes and the word NULL.
    for statement in [
        r#"INSERT INTO bag VALUES (1, 'x', '{" a","b "}'), (4, 'q', '{" spaced ","a,b","q\"uote","back\\slash","NULL",NULL}')"#,
        "DELETE FROM bag WHERE ctid = (SELECT ctid FROM bag WHERE a = 2 LIMIT 1)",
        "UPDATE bag SET b = 'z' WHERE ctid = (SELECT ctid FROM bag WHERE a = 1 LIMIT 1)",
        "UPDATE bag SET a = a WHERE a = 3",
    ] {
        stack.db.batch_execute(statement).await.unwrap();
    }
    stack.converge(BAG_PG, BAG_CH).await;

    // The CDC worker is killed while duplicates are written and removed: what it wrote
    // before dying is replayed by its successor and must not count twice.
    let writer = stack.pg.client("postgres").await.unwrap();
    let workload = tokio::spawn(async move {
        for i in 0..150 {
            writer
                .batch_execute(&format!(
                    "INSERT INTO bag VALUES ({a}, 'w', NULL), ({a}, 'w', NULL);
                     DELETE FROM bag WHERE ctid = (SELECT ctid FROM bag WHERE a = {a} LIMIT 1);",
                    a = 100 + i % 7
                ))
                .await
                .unwrap();
        }
    });
    let store = stack.ferry.store().await.unwrap();
    wait::until(WITHIN, || async {
        (store.checkpoint("bag").await.ok()??.worker_id == "d1").then_some(())
    })
    .await
    .expect("the first worker checkpointed");
    stack.replace_cdc("d2");
    workload.await.unwrap();
    stack.converge(BAG_PG, BAG_CH).await;

    // TRUNCATE, then duplicates again.
    stack
        .db
        .batch_execute(
            "TRUNCATE bag; INSERT INTO bag VALUES (9, 'again', NULL), (9, 'again', NULL);",
        )
        .await
        .unwrap();
    stack.converge(BAG_PG, BAG_CH).await;
}

#[tokio::test]
async fn versions_follow_commit_order_not_the_order_rows_were_written() {
    let stack = Stack::start(
        "CREATE TABLE bag (a int, b text, c text[]);
         ALTER TABLE bag REPLICA IDENTITY FULL;
         INSERT INTO bag VALUES (7, 'dup', NULL);",
    )
    .await;
    let spec = stack.spec("order", &["bag"], PipeMode::SnapshotAndCdc);
    stack.create(spec).await;
    stack.converge(BAG_PG, BAG_CH).await;

    // T2 writes an identical row first but commits last; T1 deletes the old copy in between.
    let t2 = stack.pg.client("postgres").await.unwrap();
    t2.batch_execute("BEGIN; INSERT INTO bag VALUES (7, 'dup', NULL);")
        .await
        .unwrap();
    stack
        .db
        .batch_execute("DELETE FROM bag WHERE a = 7")
        .await
        .unwrap();
    t2.batch_execute("COMMIT").await.unwrap();
    let left: i64 = stack
        .db
        .query_one("SELECT count(*) FROM bag", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 1, "postgres keeps T2's row");
    stack.converge(BAG_PG, BAG_CH).await;
}

#[tokio::test]
async fn a_keyless_table_that_drops_a_column_still_removes_the_right_rows() {
    let stack = Stack::start(
        "CREATE TABLE bag2 (a int, gone int, b text);
         ALTER TABLE bag2 REPLICA IDENTITY FULL;
         INSERT INTO bag2 VALUES (1, 10, 'x'), (1, 11, 'x'), (2, 20, 'y');",
    )
    .await;
    let spec = stack.spec("bag2", &["bag2"], PipeMode::SnapshotAndCdc);
    stack.create(spec).await;
    let (pg, ch) = (
        "SELECT a::text, b FROM bag2",
        "SELECT toString(a), b FROM dest.bag2_current",
    );
    stack.converge(pg, ch).await;
    stack
        .db
        .batch_execute(
            "ALTER TABLE bag2 DROP COLUMN gone;
             DELETE FROM bag2 WHERE ctid = (SELECT ctid FROM bag2 WHERE a = 1 LIMIT 1);
             INSERT INTO bag2 VALUES (2, 'y');
             UPDATE bag2 SET b = 'z' WHERE ctid = (SELECT ctid FROM bag2 WHERE a = 2 LIMIT 1);",
        )
        .await
        .unwrap();
    stack.converge(pg, ch).await;
}

#[tokio::test]
async fn a_renamed_table_keeps_replicating_into_its_destination() {
    let stack = Stack::start(
        "CREATE TABLE items (id int PRIMARY KEY, note text);
         INSERT INTO items VALUES (1, 'one'), (2, 'two');",
    )
    .await;
    let spec = stack.spec("renames", &["items"], PipeMode::SnapshotAndCdc);
    stack.create(spec).await;
    let ch = "SELECT toString(id), note FROM dest.items FINAL WHERE _ferry_is_deleted = 0";
    stack.converge("SELECT id::text, note FROM items", ch).await;
    stack
        .db
        .batch_execute(
            "ALTER TABLE items RENAME TO goods;
             INSERT INTO goods VALUES (3, 'three');
             UPDATE goods SET note = 'uno' WHERE id = 1;
             CREATE SCHEMA other;
             ALTER TABLE goods SET SCHEMA other;
             INSERT INTO other.goods VALUES (4, 'four');
             DELETE FROM other.goods WHERE id = 2;",
        )
        .await
        .unwrap();
    stack
        .converge("SELECT id::text, note FROM other.goods", ch)
        .await;
    let renamed = wait::until(WITHIN, || async {
        let status = stack.pipe("renames").await?.status?;
        let table = status.tables.first()?.clone();
        (table.renamed_to == "other.goods").then_some(table)
    })
    .await;
    assert!(renamed.is_some(), "the status never showed the new name");
}

#[tokio::test]
async fn a_column_that_drops_not_null_receives_nulls_not_zeros() {
    let stack = Stack::start(
        "CREATE TABLE strict (id int PRIMARY KEY, n int NOT NULL, s text NOT NULL, d date NOT NULL);
         INSERT INTO strict VALUES (1, 5, 'five', '2024-01-05');",
    )
    .await;
    let spec = stack.spec("nulls", &["strict"], PipeMode::SnapshotAndCdc);
    stack.create(spec).await;
    stack
        .db
        .batch_execute(
            "ALTER TABLE strict ALTER n DROP NOT NULL, ALTER s DROP NOT NULL, ALTER d DROP NOT NULL;
             INSERT INTO strict VALUES (2, NULL, NULL, NULL), (3, 3, 'three', '2024-01-03');
             UPDATE strict SET n = NULL WHERE id = 1;",
        )
        .await
        .unwrap();
    stack
        .converge(
            "SELECT id::text, n::text, s, d::text FROM strict",
            "SELECT toString(id), toString(n), s, toString(d) FROM dest.strict FINAL WHERE _ferry_is_deleted = 0",
        )
        .await;
}

#[tokio::test]
async fn a_restart_after_add_column_default_keeps_the_default_in_replayed_rows() {
    let mut stack = Stack::start(
        "CREATE TABLE evolving (id int PRIMARY KEY, v int);
         INSERT INTO evolving VALUES (1, 1), (2, 2), (3, 3);",
    )
    .await;
    let mut spec = stack.spec("evolve", &["evolving"], PipeMode::SnapshotAndCdc);
    // No checkpoint between the changes below and the kill.
    spec.settings.as_mut().unwrap().sync_interval = Some(prost_types::Duration {
        seconds: 3600,
        nanos: 0,
    });
    stack.create(spec).await;
    stack
        .db
        .batch_execute(
            "UPDATE evolving SET v = 10 WHERE id = 1;
             ALTER TABLE evolving ADD COLUMN c int DEFAULT 7;
             UPDATE evolving SET v = 20 WHERE id = 2;",
        )
        .await
        .unwrap();
    // The ALTER reached ClickHouse (and the row before it was written): kill the worker
    // before any checkpoint, so its successor replays the change that predates the column.
    wait::until(WITHIN, || async {
        let n = stack
            .clickhouse
            .query("SELECT count() FROM system.columns WHERE database = 'dest' AND table = 'evolving' AND name = 'c'")
            .fetch_one::<u64>()
            .await
            .ok()?;
        (n == 1).then_some(())
    })
    .await
    .expect("column c reached clickhouse");
    stack.cdc.as_mut().unwrap().process().kill9();
    stack
        .client
        .update_pipe_settings(UpdatePipeSettingsRequest {
            name: "evolve".into(),
            settings: Some(PipeSettings {
                sync_interval: Some(prost_types::Duration {
                    seconds: 1,
                    nanos: 0,
                }),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    stack.replace_cdc("d2");
    stack
        .converge(
            "SELECT id::text, v::text, c::text FROM evolving",
            "SELECT toString(id), toString(v), toString(c) FROM dest.evolving FINAL WHERE _ferry_is_deleted = 0",
        )
        .await;
}

#[tokio::test]
async fn a_cdc_only_pipe_fills_unchanged_toast_values_of_older_rows_from_the_source() {
    let stack = Stack::start(
        "CREATE TABLE docs (id int PRIMARY KEY, n int, body text);
         ALTER TABLE docs ALTER body SET STORAGE EXTERNAL;
         INSERT INTO docs SELECT i, 0, repeat(md5(i::text), 400) FROM generate_series(1, 5) i;",
    )
    .await;
    let spec = stack.spec("toast", &["docs"], PipeMode::CdcOnly);
    stack.create(spec).await;
    stack
        .db
        .batch_execute("UPDATE docs SET n = 1 WHERE id <= 3; DELETE FROM docs WHERE id = 3;")
        .await
        .unwrap();
    stack
        .converge(
            "SELECT id::text, n::text, md5(body) FROM docs WHERE n = 1",
            "SELECT toString(id), toString(n), lower(hex(MD5(body))) FROM dest.docs FINAL WHERE _ferry_is_deleted = 0",
        )
        .await;
}

#[tokio::test]
async fn a_bulk_update_with_unchanged_toast_values_needs_few_lookups() {
    const ROWS: i64 = 20_000;
    let stack = Stack::start(&format!(
        "CREATE TABLE blobs (id int PRIMARY KEY, n int, doc jsonb);
         ALTER TABLE blobs ALTER doc SET STORAGE EXTERNAL;
         INSERT INTO blobs SELECT i, 0, jsonb_build_object('pad', repeat(md5(i::text), 320))
           FROM generate_series(1, {ROWS}) i;"
    ))
    .await;
    let spec = stack.spec("bulk", &["blobs"], PipeMode::SnapshotAndCdc);
    stack.create(spec).await;
    stack
        .db
        .batch_execute("UPDATE blobs SET n = n + 1")
        .await
        .unwrap();
    stack
        .converge(
            "SELECT id::text, n::text, md5(doc::text) FROM blobs",
            "SELECT toString(id), toString(n), lower(hex(MD5(doc))) FROM dest.blobs FINAL WHERE _ferry_is_deleted = 0",
        )
        .await;
    // Every row's value was filled in with a handful of keyed lookups, not one per row.
    let logs = stack.logs();
    let (mut rows, mut lookups) = (0u64, 0u64);
    for line in logs
        .lines()
        .filter(|l| l.contains("unchanged TOAST values filled in"))
    {
        let field = |name: &str| -> u64 {
            line.split(&format!("{name}="))
                .nth(1)
                .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
                .and_then(|n| n.parse().ok())
                .unwrap_or(0)
        };
        rows += field("rows");
        lookups += field("lookups");
    }
    assert_eq!(rows, ROWS as u64, "every updated row was filled in");
    // One lookup per thousands of rows, not one per row.
    assert!(lookups * 500 <= rows, "{lookups} lookups for {rows} rows");
}

#[tokio::test]
async fn a_changed_replica_identity_fails_the_table_instead_of_writing_wrong_keys() {
    let stack = Stack::start(
        "CREATE TABLE coded (id int PRIMARY KEY, code text NOT NULL UNIQUE, note text);
         INSERT INTO coded VALUES (1, 'a', 'one'), (2, 'b', 'two');",
    )
    .await;
    let spec = stack.spec("identity", &["coded"], PipeMode::SnapshotAndCdc);
    stack.create(spec).await;
    stack
        .db
        .batch_execute(
            "ALTER TABLE coded REPLICA IDENTITY USING INDEX coded_code_key;
             DELETE FROM coded WHERE id = 2;",
        )
        .await
        .unwrap();
    let failed = stack.wait_state("identity", PipeState::Failed).await;
    let error = failed.status.unwrap().error.unwrap();
    assert_eq!(error.table, "public.coded");
    assert!(
        error.message.contains("replica identity"),
        "{}",
        error.message
    );
    assert!(
        error.remedy.contains("REPLICA IDENTITY DEFAULT"),
        "{}",
        error.remedy
    );
    // Nothing was written under a wrong key: row 2 is still there, not a zero-keyed marker.
    let zero: u64 = stack
        .clickhouse
        .query("SELECT count() FROM dest.coded WHERE id = 0")
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(zero, 0);
}

#[tokio::test]
async fn a_table_read_under_two_snapshots_with_the_same_id_is_read_again() {
    let mut stack = Stack::start(
        "CREATE TABLE split (id int PRIMARY KEY, note text);
         INSERT INTO split SELECT i, 'row ' || i FROM generate_series(1, 20000) i;
         ANALYZE split;",
    )
    .await;
    // No snapshot worker yet: the partitions wait under the exported snapshot.
    stack.snapshot.as_mut().unwrap().process().kill9();
    let mut spec = stack.spec("twice", &["split"], PipeMode::SnapshotOnly);
    spec.settings.as_mut().unwrap().snapshot_rows_per_partition = Some(5_000);
    stack
        .client
        .create_pipe(ferry_proto::v1::CreatePipeRequest {
            spec: Some(spec),
            secrets: None,
        })
        .await
        .unwrap();
    let store = stack.ferry.store().await.unwrap();
    let current = wait::until(WITHIN, || async {
        store.exported_snapshot("twice").await.ok()?
    })
    .await
    .expect("the coordinator exported a snapshot");

    // A partition that looks finished under the live export's id — as after a server restart,
    // when a new export can get the id of an old one — but was read under another snapshot:
    // what it wrote includes a row deleted before the live snapshot was taken.
    let plan = store.snapshot_plan("twice").await.unwrap();
    assert!(plan.len() > 1, "the table is split");
    let mut first = plan[0].partition.clone();
    first.done = true;
    first.rows_copied = 1;
    first.snapshot_id = current.snapshot_id.clone();
    first.snapshot_visibility = "1:1:".into();
    stack
        .clickhouse
        .query("INSERT INTO dest.split (id, note, _ferry_version, _ferry_is_deleted) VALUES (0, 'deleted since', 0, 0)")
        .execute()
        .await
        .unwrap();
    let mut etcd = store.client();
    etcd.put(
        store
            .keys()
            .snapshot_partition("twice", "public.split", first.index),
        prost::Message::encode_to_vec(&first),
        None,
    )
    .await
    .unwrap();

    stack.snapshot = Some(stack.ferry.worker(WorkerKind::Snapshot, "s2").unwrap());
    stack.wait_state("twice", PipeState::Completed).await;
    stack
        .converge(
            "SELECT id::text, note FROM split",
            "SELECT toString(id), note FROM dest.split FINAL WHERE _ferry_is_deleted = 0",
        )
        .await;
}

#[tokio::test]
async fn a_renamed_column_fails_the_table_instead_of_splitting_its_values() {
    let stack = Stack::start(
        "CREATE TABLE labels (id int PRIMARY KEY, label text);
         INSERT INTO labels VALUES (1, 'one');",
    )
    .await;
    let spec = stack.spec("columns", &["labels"], PipeMode::SnapshotAndCdc);
    stack.create(spec).await;
    stack
        .db
        .batch_execute(
            "ALTER TABLE labels RENAME COLUMN label TO title;
             INSERT INTO labels VALUES (2, 'two');",
        )
        .await
        .unwrap();
    let failed = stack.wait_state("columns", PipeState::Failed).await;
    let error = failed.status.unwrap().error.unwrap();
    assert_eq!(error.table, "public.labels");
    assert!(
        error.message.contains("renamed to title"),
        "{}",
        error.message
    );
    assert!(
        error
            .remedy
            .contains("ferry resync columns --table public.labels"),
        "{}",
        error.remedy
    );
}
