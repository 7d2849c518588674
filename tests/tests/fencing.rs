//! Self-fencing of the CDC worker (DESIGN.md §3, invariant 2) against a freeze: a worker
//! stopped with SIGSTOP past its lease's TTL, with a batch buffered after a TRUNCATE, while a
//! successor takes its stream over, must write nothing once it runs again — and a TRUNCATE it
//! still holds must not delete what the successor wrote.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::stack::{Stack, WITHIN, Workers};
use ferry_clickhouse::version;
use ferry_proto::v1::{Checkpoint, PipeMode, WorkerKind};
use ferry_store::etcd_client::WatchOptions;
use ferry_testkit::wait;
use prost::Message as _;

const ITEMS_PG: &str = "SELECT id::text, note FROM items";
const ITEMS_CH: &str =
    "SELECT toString(id), note FROM dest.items FINAL WHERE _ferry_is_deleted = 0";
/// Keyless: every copy of a duplicated row is one row on both sides.
const BAG_PG: &str = "SELECT n::text, note FROM bag";
const BAG_CH: &str = "SELECT toString(n), note FROM dest.bag_current";

/// One transaction of the workload: an upsert, an update and a delete of keyed rows, and on
/// the keyless table two copies of a row in, one copy out; every tenth a TRUNCATE of it.
async fn write_round(db: &tokio_postgres::Client, round: i64) {
    let n = round % 5;
    let truncate = if round % 10 == 9 { "TRUNCATE bag;" } else { "" };
    db.batch_execute(&format!(
        "BEGIN;
         INSERT INTO items VALUES ({id}, 'r{round}') ON CONFLICT (id) DO UPDATE SET note = EXCLUDED.note;
         UPDATE items SET note = note || '+' WHERE id = {updated};
         DELETE FROM items WHERE id = {deleted};
         INSERT INTO bag VALUES ({n}, 'dup {round}'), ({n}, 'dup {round}');
         DELETE FROM bag WHERE ctid = (SELECT ctid FROM bag WHERE n = {n} LIMIT 1);
         {truncate}
         INSERT INTO bag VALUES ({n}, 'after {round}'), ({n}, 'after {round}');
         COMMIT;",
        id = 1000 + round,
        updated = 1 + round % 50,
        deleted = 50 + (round * 7) % 150,
    ))
    .await
    .unwrap();
}

async fn wal_lsn(db: &tokio_postgres::Client) -> u64 {
    let text: String = db
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    let (hi, lo) = text.split_once('/').unwrap();
    (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
}

/// Waits until the pipe's checkpoint is at or past `lsn`, written by `worker`.
async fn checkpointed(store: &ferry_store::Store, worker: &str, lsn: u64) {
    let reached = wait::until(WITHIN, || async {
        let checkpoint = store.checkpoint("live").await.ok()??;
        (checkpoint.worker_id == worker && checkpoint.lsn >= lsn).then_some(())
    })
    .await;
    let last = store.checkpoint("live").await.unwrap();
    assert!(
        reached.is_some(),
        "{worker} never checkpointed {lsn:#x}; last: {last:?}"
    );
}

/// Every value the checkpoint key ever had, in order (etcd keeps the key's history).
async fn checkpoint_history(store: &ferry_store::Store) -> Vec<Checkpoint> {
    let key = store.keys().pipe_checkpoint("live");
    let mut client = store.client();
    let now = client.get(key.clone(), None).await.unwrap();
    let last = now.kvs().first().unwrap().mod_revision();
    let mut stream = client
        .watch(key, Some(WatchOptions::new().with_start_revision(1)))
        .await
        .unwrap();
    let mut history = Vec::new();
    // Bounded: the key's history up to `last` is finite and etcd sends it at once.
    let read = tokio::time::timeout(WITHIN, async {
        while let Some(response) = stream.message().await.unwrap() {
            for event in response.events() {
                let Some(kv) = event.kv() else { continue };
                history.push(Checkpoint::decode(kv.value()).unwrap());
                if kv.mod_revision() >= last {
                    return;
                }
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the checkpoint's history did not arrive");
    history
}

#[tokio::test]
async fn a_frozen_cdc_worker_never_writes_after_its_successor_took_over() {
    let mut stack = Stack::start_with(
        "CREATE TABLE items (id bigint PRIMARY KEY, note text);
         CREATE TABLE bag (n integer, note text);
         ALTER TABLE bag REPLICA IDENTITY FULL;
         INSERT INTO items SELECT i, 'item ' || i FROM generate_series(1, 200) i;
         INSERT INTO bag SELECT i % 5, 'dup' FROM generate_series(1, 50) i;",
        Workers {
            cdc: Some("frozen"),
            ..Workers::default()
        },
    )
    .await;
    // A frozen client never answers its walsender, which keeps the slot busy until
    // wal_sender_timeout (60 s by default) ends it; shorter here so the successor streams soon.
    stack
        .db
        .batch_execute("ALTER SYSTEM SET wal_sender_timeout = '3s'")
        .await
        .unwrap();
    stack
        .db
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .unwrap();
    let mut spec = stack.spec("live", &["items", "bag"], PipeMode::SnapshotAndCdc);
    // Rows stay buffered for 5 s: the freeze below finds a batch in the worker.
    spec.settings.as_mut().unwrap().sync_interval = Some(prost_types::Duration {
        seconds: 5,
        nanos: 0,
    });
    stack.create(spec).await;
    let store = stack.ferry.store().await.unwrap();
    let db = &stack.db;

    for round in 0..30 {
        write_round(db, round).await;
    }
    stack.converge(ITEMS_PG, ITEMS_CH).await;
    stack.converge(BAG_PG, BAG_CH).await;
    checkpointed(&store, "frozen", wal_lsn(db).await).await;

    // A transaction with keyless rows on both sides of a TRUNCATE: the worker writes the rows
    // before it and applies it at once, and keeps the rows after it buffered.
    db.batch_execute(
        "BEGIN;
         INSERT INTO items VALUES (5000, 'with the truncate');
         INSERT INTO bag VALUES (7, 'before'), (7, 'before');
         TRUNCATE bag;
         INSERT INTO bag VALUES (7, 'after'), (7, 'after');
         COMMIT;
         INSERT INTO bag VALUES (8, 'next'), (8, 'next');",
    )
    .await
    .unwrap();
    let applied = wait::until(WITHIN, || async {
        let left: u64 = stack
            .clickhouse
            .query("SELECT count() FROM dest.bag")
            .fetch_one()
            .await
            .ok()?;
        (left == 0).then_some(())
    })
    .await;
    assert!(applied.is_some(), "the TRUNCATE never reached ClickHouse");
    let mut frozen = stack.cdc.take().unwrap();
    let frozen_log = frozen.process().log().to_owned();
    frozen.process().stop();

    // Committed while it is frozen: a TRUNCATE that may sit unread in its socket.
    db.batch_execute(
        "BEGIN; TRUNCATE bag; INSERT INTO bag VALUES (9, 'while frozen'), (9, 'while frozen'); COMMIT;",
    )
    .await
    .unwrap();
    let successor = stack.worker(WorkerKind::Cdc, "successor").await;
    for round in 30..60 {
        write_round(db, round).await;
    }
    // The successor has the stream and wrote everything so far before the frozen worker runs
    // again: whatever lands later with a version up to here can only be the frozen worker's.
    let resumed_lsn = wal_lsn(db).await;
    checkpointed(&store, "successor", resumed_lsn).await;
    let resumed_at: String = stack
        .clickhouse
        .query("SELECT toString(now64(9))")
        .fetch_one()
        .await
        .unwrap();
    frozen.process().cont();

    // The frozen worker notices its lost session and registers again under a new lease.
    let registered_again = wait::until(WITHIN, || async {
        let log = std::fs::read_to_string(&frozen_log).ok()?;
        (log.matches("worker registered").count() >= 2).then_some(())
    })
    .await;
    assert!(
        registered_again.is_some(),
        "the frozen worker never noticed it lost its lease:\n{}",
        frozen.process().log_tail(30)
    );
    for round in 60..90 {
        write_round(db, round).await;
    }
    stack.converge(ITEMS_PG, ITEMS_CH).await;
    stack.converge(BAG_PG, BAG_CH).await;

    // No row up to `resumed_lsn` was written after the frozen worker resumed.
    for table in ["items", "bag"] {
        let late: u64 = stack
            .clickhouse
            .query(&format!(
                "SELECT count() FROM dest.{table} WHERE _ferry_synced_at >= toDateTime64(?, 9) \
                 AND _ferry_version <= toUInt128(?)"
            ))
            .bind(&resumed_at)
            .bind(version::upto(resumed_lsn).to_string())
            .fetch_one()
            .await
            .unwrap();
        assert_eq!(
            late, 0,
            "{late} rows of {table} written after the frozen worker resumed"
        );
    }
    // The checkpoint never went back to the frozen worker once the successor wrote it.
    let history = checkpoint_history(&store).await;
    let took_over = history
        .iter()
        .position(|c| c.worker_id == "successor")
        .expect("the successor checkpointed");
    assert!(
        history[took_over..]
            .iter()
            .all(|c| c.worker_id == "successor"),
        "the frozen worker checkpointed after its successor: {:?}",
        history.iter().map(|c| &c.worker_id).collect::<Vec<_>>()
    );
    assert!(
        history[..took_over].iter().any(|c| c.worker_id == "frozen"),
        "the frozen worker never checkpointed"
    );
    let (owner, _) = store.cdc_owner("live").await.unwrap().unwrap();
    assert_eq!(owner, "successor");
    drop(successor);
    drop(frozen);
}
