//! Slot health against a real PostgreSQL 15: a slot retaining WAL, a slot that is missing, and
//! one invalidated (`wal_status = lost`) once `max_slot_wal_keep_size` is exceeded.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use ferry_postgres::slot::{self, max_slot_wal_keep_size, slot_state};
use ferry_testkit::postgres::Postgres;
use ferry_testkit::wait;

#[tokio::test]
async fn slot_health_follows_what_the_slot_retains_until_it_is_lost() {
    let pg = Postgres::start().await.unwrap();
    let db = common::admin(&pg).await;
    assert_eq!(max_slot_wal_keep_size(&db).await.unwrap(), None);
    assert_eq!(slot_state(&db, "nope").await.unwrap(), None);

    db.batch_execute("SELECT pg_create_logical_replication_slot('s', 'pgoutput')")
        .await
        .unwrap();
    db.batch_execute(
        "CREATE TABLE filler (id bigint, pad text);
         INSERT INTO filler SELECT i, repeat('x', 200) FROM generate_series(1, 20000) i;",
    )
    .await
    .unwrap();
    let state = slot_state(&db, "s").await.unwrap().unwrap();
    assert_eq!(state.wal_status, "reserved");
    assert!(state.retained_bytes > 2_000_000, "{state:?}");
    assert_eq!(state.safe_wal_bytes, None);
    assert!(!state.active);

    // Bounded: the slot is invalidated once it would keep more than 1 MB past a checkpoint.
    // Each its own statement: ALTER SYSTEM refuses to run in a multi-statement batch.
    for statement in [
        "ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'",
        "SELECT pg_reload_conf()",
    ] {
        db.batch_execute(statement).await.unwrap();
    }
    let bounded = wait::until(Duration::from_secs(10), || async {
        max_slot_wal_keep_size(&db).await.unwrap()
    })
    .await;
    assert_eq!(bounded, Some(1 << 20));
    let lost = wait::until(Duration::from_secs(30), || async {
        for statement in [
            "INSERT INTO filler SELECT i, repeat('y', 200) FROM generate_series(1, 20000) i",
            "SELECT pg_switch_wal()",
            "CHECKPOINT",
        ] {
            db.batch_execute(statement).await.unwrap();
        }
        let state = slot_state(&db, "s").await.unwrap().unwrap();
        (state.wal_status == "lost").then_some(state)
    })
    .await;
    let lost = lost.expect("the slot was never invalidated");
    assert_eq!(lost.retained_bytes, 0);

    db.batch_execute(&slot::drop_slot_sql("s")).await.unwrap();
    assert_eq!(slot_state(&db, "s").await.unwrap(), None);
}
