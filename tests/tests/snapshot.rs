//! Setup and snapshot end to end, through the real services: three tables (every DESIGN.md §5
//! type; 1,000,000 rows in ≥ 8 partitions; a partitioned table), a snapshot worker killed with
//! kill -9 mid-copy, and ClickHouse compared with Postgres afterwards.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::stack::{Stack, Workers};
use ferry_proto::v1::{PipeMode, PipeSettings, PipeState, SnapshotPartition, WorkerKind};
use ferry_store::etcd_client::GetOptions;
use ferry_testkit::ferry::Ferry;
use ferry_testkit::wait;

const BIG_ROWS: i64 = 1_000_000;

const TABLES: &str = "
CREATE TABLE big (id bigint PRIMARY KEY, payload text NOT NULL, n numeric(12,2), ts timestamptz, flag boolean);
INSERT INTO big SELECT i, md5(i::text), (i % 100000) / 100.0, '2024-01-01'::timestamptz + i * interval '1 second', i % 2 = 0
  FROM generate_series(1::bigint, 1000000) AS i;
ANALYZE big;
CREATE TABLE events (id int, at date, what text, PRIMARY KEY (id, at)) PARTITION BY RANGE (at);
CREATE TABLE events_2023 PARTITION OF events FOR VALUES FROM ('2023-01-01') TO ('2024-01-01');
CREATE TABLE events_2024 PARTITION OF events FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
INSERT INTO events SELECT i, '2023-06-01'::date + (i % 400), 'event ' || i FROM generate_series(1, 5000) AS i;
ANALYZE events;
";

/// Owner keys and the worker holding each.
async fn claims(ferry: &Ferry, pipe: &str) -> Vec<(String, String)> {
    let store = ferry.store().await.unwrap();
    let response = store
        .client()
        .get(
            store.keys().snapshot_owners(pipe),
            Some(GetOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    response
        .kvs()
        .iter()
        .map(|kv| {
            (
                String::from_utf8_lossy(kv.key()).into_owned(),
                String::from_utf8_lossy(kv.value()).into_owned(),
            )
        })
        .collect()
}

async fn partitions(ferry: &Ferry, pipe: &str) -> Vec<SnapshotPartition> {
    let store = ferry.store().await.unwrap();
    store
        .snapshot_plan(pipe)
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.partition)
        .collect()
}

#[tokio::test]
async fn a_snapshot_survives_a_killed_worker_and_matches_postgres_exactly() {
    let stack = Stack::start_with(
        &format!("{}{TABLES}", common::SCHEMA),
        Workers {
            snapshot: None,
            cdc: None,
            ..Workers::default()
        },
    )
    .await;
    let ferry = &stack.ferry;
    let mut doomed = stack.worker(WorkerKind::Snapshot, "doomed").await;
    let mut spec = stack.spec(
        "copy",
        &["everything", "big", "events"],
        PipeMode::SnapshotOnly,
    );
    spec.settings = Some(PipeSettings {
        snapshot_rows_per_partition: Some(100_000),
        snapshot_parallel_partitions: Some(4),
        snapshot_parallel_tables: Some(2),
        ..Default::default()
    });
    stack.submit(spec).await.unwrap();

    // The doomed worker starts copying; once it has finished one partition and holds another,
    // it is killed, and a survivor (with spare capacity) joins.
    let caught = wait::until(Duration::from_secs(60), || async {
        let done_by_doomed = partitions(ferry, "copy")
            .await
            .iter()
            .any(|p| p.done && p.worker_id == "doomed");
        let held = claims(ferry, "copy")
            .await
            .iter()
            .any(|(_, worker)| worker == "doomed");
        (done_by_doomed && held).then_some(())
    })
    .await;
    assert!(
        caught.is_some(),
        "the doomed worker never finished a partition while holding another"
    );
    doomed.process().kill9();
    let before_kill: Vec<_> = partitions(ferry, "copy")
        .await
        .into_iter()
        .filter(|p| p.done)
        .collect();
    let _survivor = stack.worker(WorkerKind::Snapshot, "survivor").await;

    let finished = stack
        .wait_states("copy", &[PipeState::Completed], Duration::from_secs(180))
        .await;

    // Done-marks in etcd: every partition done; what was done before the kill stayed done.
    let plan = partitions(ferry, "copy").await;
    let big: Vec<_> = plan
        .iter()
        .filter(|p| p.source_table == "public.big")
        .collect();
    assert!(
        big.len() >= 8,
        "big was split into only {} partitions",
        big.len()
    );
    assert!(plan.iter().all(|p| p.done), "partitions left undone");
    for early in &before_kill {
        let now = plan
            .iter()
            .find(|p| p.source_table == early.source_table && p.index == early.index)
            .unwrap();
        assert_eq!(
            now.worker_id, early.worker_id,
            "a finished partition was redone"
        );
    }
    assert!(plan.iter().any(|p| p.worker_id == "survivor"));
    assert!(claims(ferry, "copy").await.is_empty(), "claims left behind");
    let events: Vec<_> = plan
        .iter()
        .filter(|p| p.source_table == "public.events")
        .collect();
    assert!(
        events.iter().any(|p| p.relation == "public.events_2023")
            && events.iter().any(|p| p.relation == "public.events_2024")
    );

    // Progress in the status: rows copied per table, partitions done/total.
    let tables = finished.status.unwrap().tables;
    let big_status = tables
        .iter()
        .find(|t| t.source_table == "public.big")
        .unwrap();
    assert_eq!(big_status.rows_copied, BIG_ROWS as u64);
    assert_eq!(big_status.partitions_done, big_status.partitions_total);

    // The data: every type value for value; the big and partitioned tables by checksum, with
    // no duplicate visible through FINAL.
    let (db, clickhouse) = (&stack.db, &stack.clickhouse);
    common::compare_everything(db, clickhouse, "dest", "everything").await;
    let pg_big = db
        .query_one(
            "SELECT count(*), sum(id)::text, trim_scale(sum(n))::text, sum(length(payload)), \
                    sum(extract(epoch from ts))::bigint, count(*) FILTER (WHERE flag) FROM big",
            &[],
        )
        .await
        .unwrap();
    let (count, sum_id, sum_n, len, epoch, flags): (u64, String, String, u64, i64, u64) =
        clickhouse
            .query(
                "SELECT count(), toString(sum(id)), toString(assumeNotNull(sum(n))), sum(length(payload)), \
                    toInt64(assumeNotNull(sum(toUnixTimestamp(ts)))), countIf(assumeNotNull(flag)) FROM dest.big FINAL",
            )
            .fetch_one()
            .await
            .unwrap();
    assert_eq!(count, u64::try_from(pg_big.get::<_, i64>(0)).unwrap());
    assert_eq!(sum_id, pg_big.get::<_, String>(1));
    assert_eq!(sum_n, pg_big.get::<_, String>(2));
    assert_eq!(len, u64::try_from(pg_big.get::<_, i64>(3)).unwrap());
    assert_eq!(epoch, pg_big.get::<_, i64>(4));
    assert_eq!(flags, u64::try_from(pg_big.get::<_, i64>(5)).unwrap());
    let distinct: u64 = clickhouse
        .query("SELECT uniqExact(id) FROM dest.big FINAL")
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(distinct, BIG_ROWS as u64);
    let (events, what_len): (u64, u64) = clickhouse
        .query("SELECT count(), assumeNotNull(sum(length(what))) FROM dest.events FINAL")
        .fetch_one()
        .await
        .unwrap();
    let pg_events = db
        .query_one("SELECT count(*), sum(length(what)) FROM events", &[])
        .await
        .unwrap();
    assert_eq!(events, u64::try_from(pg_events.get::<_, i64>(0)).unwrap());
    assert_eq!(what_len, u64::try_from(pg_events.get::<_, i64>(1)).unwrap());

    // A snapshot-only pipe keeps no slot.
    let slots = stack
        .pg_count("SELECT count(*) FROM pg_replication_slots")
        .await;
    assert_eq!(slots, 0);
    let store = ferry.store().await.unwrap();
    let exported = store.exported_snapshot("copy").await.unwrap();
    assert!(
        exported.is_none(),
        "the exported snapshot must be withdrawn when done"
    );
}
