//! Setup refuses what would make Ferry lose or alter data, or break writes on the source, and
//! keys rows by what the replica identity actually sends. Each refusal ends the pipe in Failed
//! naming the table and the SQL that fixes it, and creates nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::stack::Stack;
use ferry_proto::v1::{PipeMode, PipeState};

/// Asserts Setup refused pipe `name` naming `words` and `table`, with `remedy` in its
/// remedy, and left nothing behind: no slot, no Ferry publication, no ClickHouse database.
async fn assert_refused(stack: &Stack, name: &str, table: &str, words: &[&str], remedy: &str) {
    let status = stack
        .wait_state(name, PipeState::Failed)
        .await
        .status
        .unwrap();
    assert_eq!(status.previous_state(), PipeState::Setup);
    let error = status.error.unwrap();
    for word in words {
        assert!(error.message.contains(word), "{word}: {}", error.message);
    }
    assert_eq!(error.table, table);
    assert!(error.remedy.contains(remedy), "{}", error.remedy);
    assert_eq!(
        stack
            .pg_count("SELECT count(*) FROM pg_replication_slots")
            .await,
        0
    );
    assert_eq!(
        stack
            .pg_count("SELECT count(*) FROM pg_publication WHERE pubname LIKE 'ferry%'")
            .await,
        0
    );
    let databases = stack
        .clickhouse
        .query("SELECT name FROM system.databases")
        .fetch_all::<String>()
        .await
        .unwrap();
    assert!(!databases.contains(&format!("d_{name}")), "{databases:?}");
}

#[tokio::test]
async fn a_deferrable_primary_key_is_refused_and_source_writes_keep_working() {
    let stack = Stack::start(
        "CREATE TABLE deferred (id int PRIMARY KEY DEFERRABLE INITIALLY IMMEDIATE, v text);
         INSERT INTO deferred SELECT i, 'v' || i FROM generate_series(1, 100) i;",
    )
    .await;
    let spec = stack.spec_into(
        "d_deferred",
        "deferred",
        &["public.deferred"],
        PipeMode::SnapshotAndCdc,
    );
    stack.submit(spec).await.unwrap();
    assert_refused(
        &stack,
        "deferred",
        "public.deferred",
        &["public.deferred", "DEFERRABLE"],
        "CREATE UNIQUE INDEX CONCURRENTLY \"deferred_ferry_key\" ON \"public\".\"deferred\" (\"id\"); \
         ALTER TABLE \"public\".\"deferred\" REPLICA IDENTITY USING INDEX \"deferred_ferry_key\";",
    )
    .await;
    // Nothing publishes the table, so Postgres still lets its users change it.
    assert_eq!(
        stack.pg_count("SELECT count(*) FROM pg_publication").await,
        0
    );
    stack
        .db
        .batch_execute(
            "UPDATE deferred SET v = 'edited' WHERE id = 1; DELETE FROM deferred WHERE id = 2",
        )
        .await
        .unwrap();
    assert_eq!(
        stack
            .pg_count("SELECT count(*) FROM deferred WHERE v = 'edited' OR id = 2")
            .await,
        1
    );
}

/// (id, code, note) of every live row: Postgres and ClickHouse (FINAL).
const CODED_PG: &str = "SELECT id::text, code, note FROM coded";
const CODED_CH: &str =
    "SELECT toString(id), code, note FROM d_coded.coded FINAL WHERE _ferry_is_deleted = 0";

#[tokio::test]
async fn rows_are_keyed_by_a_replica_identity_index_other_than_the_primary_key() {
    let stack = Stack::start(
        "CREATE TABLE coded (id int PRIMARY KEY, code text NOT NULL, note text);
         CREATE UNIQUE INDEX code_idx ON coded (code);
         ALTER TABLE coded REPLICA IDENTITY USING INDEX code_idx;
         INSERT INTO coded SELECT i, 'c' || i, CASE WHEN i % 5 <> 0 THEN 'note ' || i END
           FROM generate_series(1, 200) i;",
    )
    .await;
    let spec = stack.spec_into(
        "d_coded",
        "coded",
        &["public.coded"],
        PipeMode::SnapshotAndCdc,
    );
    // Waits until Running; a failure instead panics with the pipe's error.
    stack.create(spec).await;
    // ClickHouse orders (and so replaces and deletes) rows by what Postgres sends as the key.
    let sorting_key: String = stack
        .clickhouse
        .query(
            "SELECT sorting_key FROM system.tables WHERE database = 'd_coded' AND name = 'coded'",
        )
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(sorting_key.trim_matches(['(', ')']), "code");
    stack.converge(CODED_PG, CODED_CH).await;

    for statement in [
        "INSERT INTO coded SELECT i, 'c' || i, 'new ' || i FROM generate_series(201, 250) i",
        "UPDATE coded SET note = 'edited ' || id WHERE id % 10 = 0",
        // The identity changes: the old code is deleted, the new one inserted.
        "UPDATE coded SET code = code || '-renamed' WHERE id % 7 = 0",
        // Only the primary key changes: the same identity, a new id.
        "UPDATE coded SET id = id + 1000 WHERE id BETWEEN 1 AND 5",
        "DELETE FROM coded WHERE id % 11 = 0",
        "BEGIN; UPDATE coded SET code = 'swapped', note = NULL WHERE id = 12; \
         DELETE FROM coded WHERE id = 13; INSERT INTO coded VALUES (13, 'c13', 'back'); COMMIT",
    ] {
        stack.db.batch_execute(statement).await.unwrap();
    }
    stack.converge(CODED_PG, CODED_CH).await;
}

const PUBLISHED: &str = "CREATE TABLE t (id int PRIMARY KEY, a text, b text);
    INSERT INTO t SELECT i, 'a' || i, 'b' || i FROM generate_series(1, 100) i;";

#[tokio::test]
async fn a_publication_that_omits_kinds_of_change_is_refused() {
    let stack = Stack::start(&format!(
        "{PUBLISHED} CREATE PUBLICATION inserts_only FOR TABLE t WITH (publish = 'insert');"
    ))
    .await;
    let mut spec = stack.spec_into("d_omits", "omits", &["public.t"], PipeMode::SnapshotAndCdc);
    spec.source.as_mut().unwrap().publication = "inserts_only".into();
    stack.submit(spec).await.unwrap();
    assert_refused(
        &stack,
        "omits",
        "public.t",
        &["inserts_only", "update, delete, truncate", "public.t"],
        "ALTER PUBLICATION \"inserts_only\" SET (publish = 'insert, update, delete, truncate');",
    )
    .await;
}

#[tokio::test]
async fn a_publication_with_a_row_filter_is_refused() {
    let stack = Stack::start(&format!(
        "{PUBLISHED} CREATE PUBLICATION some_rows FOR TABLE t WHERE (id > 50);"
    ))
    .await;
    let mut spec = stack.spec_into(
        "d_filtered",
        "filtered",
        &["public.t"],
        PipeMode::SnapshotAndCdc,
    );
    spec.source.as_mut().unwrap().publication = "some_rows".into();
    stack.submit(spec).await.unwrap();
    assert_refused(
        &stack,
        "filtered",
        "public.t",
        &["some_rows", "public.t", "WHERE (id > 50)"],
        "ALTER PUBLICATION \"some_rows\" DROP TABLE \"public\".\"t\"; \
         ALTER PUBLICATION \"some_rows\" ADD TABLE \"public\".\"t\";",
    )
    .await;
}

#[tokio::test]
async fn a_publication_with_a_partial_column_list_is_refused() {
    let stack = Stack::start(&format!(
        "{PUBLISHED} CREATE PUBLICATION some_columns FOR TABLE t (id, a);"
    ))
    .await;
    let mut spec = stack.spec_into(
        "d_narrow",
        "narrow",
        &["public.t"],
        PipeMode::SnapshotAndCdc,
    );
    spec.source.as_mut().unwrap().publication = "some_columns".into();
    stack.submit(spec).await.unwrap();
    assert_refused(
        &stack,
        "narrow",
        "public.t",
        &["some_columns", "public.t", "column(s) b"],
        "ALTER PUBLICATION \"some_columns\" DROP TABLE \"public\".\"t\"; \
         ALTER PUBLICATION \"some_columns\" ADD TABLE \"public\".\"t\";",
    )
    .await;
}
