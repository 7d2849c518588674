//! Change data capture through the real services: after the snapshot, inserts, updates,
//! deletes, primary-key changes, unchanged TOAST values under REPLICA IDENTITY FULL and a
//! TRUNCATE reach ClickHouse; the slot is never acknowledged beyond the checkpoint.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use clickhouse::Client;
use ferry_proto::v1::*;
use ferry_testkit::clickhouse::ClickHouse;
use ferry_testkit::etcd::Etcd;
use ferry_testkit::ferry::Ferry;
use ferry_testkit::postgres::Postgres;
use ferry_testkit::wait;
use prost_types::Duration as ProtoDuration;

const WITHIN: Duration = Duration::from_secs(60);

/// (rows, sum of ids, sum of note lengths, sum of big lengths) of live rows on both sides.
async fn pg_digest(db: &tokio_postgres::Client, table: &str) -> (i64, String, i64, i64) {
    let row = db
        .query_one(
            &format!(
                "SELECT count(*), coalesce(sum(id), 0)::text, coalesce(sum(length(note)), 0)::int8, \
                        coalesce(sum(length(big)), 0)::int8 FROM {table}"
            ),
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1), row.get(2), row.get(3))
}

async fn ch_digest(ch: &Client, table: &str) -> Option<(i64, String, i64, i64)> {
    ch.query(&format!(
        "SELECT toInt64(count()), toString(sum(id)), toInt64(sum(length(ifNull(note, '')))), \
                toInt64(sum(length(ifNull(big, '')))) FROM dest.{table} FINAL WHERE _ferry_is_deleted = 0"
    ))
    .fetch_one::<(i64, String, i64, i64)>()
    .await
    .ok()
}

/// The spec of the pipe "live": `tables` of the test's Postgres into database `dest`.
fn live_spec(
    pg: &Postgres,
    ch: &ClickHouse,
    tables: &[&str],
    mode: PipeMode,
    settings: PipeSettings,
) -> PipeSpec {
    PipeSpec {
        name: "live".into(),
        source: Some(PostgresSource {
            host: "127.0.0.1".into(),
            port: u32::from(pg.port()),
            database: "postgres".into(),
            user: "postgres".into(),
            ..Default::default()
        }),
        destination: Some(ClickHouseDestination {
            url: ch.url(),
            database: "dest".into(),
            ..Default::default()
        }),
        tables: tables
            .iter()
            .map(|t| TableMapping {
                source_table: (*t).into(),
                ..Default::default()
            })
            .collect(),
        mode: mode.into(),
        settings: Some(settings),
    }
}

async fn converge(db: &tokio_postgres::Client, ch: &Client, table: &str) {
    let expected = pg_digest(db, table).await;
    let reached = wait::until(WITHIN, || async {
        let got = ch_digest(ch, table).await?;
        (got == expected).then_some(())
    })
    .await;
    assert!(
        reached.is_some(),
        "{table}: clickhouse {:?} never matched postgres {expected:?}",
        ch_digest(ch, table).await
    );
}

#[tokio::test]
async fn changes_after_the_snapshot_reach_clickhouse_exactly() {
    let pg = Postgres::start().await.unwrap();
    let ch = ClickHouse::start().await.unwrap();
    let etcd = Etcd::start().await.unwrap();
    let db = pg.client("postgres").await.unwrap();
    db.batch_execute(
        "CREATE TABLE items (id bigint PRIMARY KEY, note text, big text);
         CREATE TABLE wide (id bigint PRIMARY KEY, note text, big text);
         ALTER TABLE wide REPLICA IDENTITY FULL;
         ALTER TABLE wide ALTER big SET STORAGE EXTERNAL;
         INSERT INTO items SELECT i, 'item ' || i, NULL FROM generate_series(1, 1000) i;
         INSERT INTO wide SELECT i, 'w' || i, repeat('x', 5000) FROM generate_series(1, 10) i;",
    )
    .await
    .unwrap();

    let ferry = Ferry::new(etcd.endpoints(), 3).unwrap();
    let coordinator = ferry.coordinator("c1").unwrap();
    let _snapshot = ferry.worker(WorkerKind::Snapshot, "s1").unwrap();
    let _cdc = ferry.worker(WorkerKind::Cdc, "d1").unwrap();
    coordinator.wait_serving(WITHIN).await.unwrap();
    let mut client = coordinator.pipe_client().await.unwrap();
    let spec = live_spec(
        &pg,
        &ch,
        &["items", "wide"],
        PipeMode::SnapshotAndCdc,
        PipeSettings {
            sync_interval: Some(ProtoDuration {
                seconds: 1,
                nanos: 0,
            }),
            ..Default::default()
        },
    );
    client
        .create_pipe(CreatePipeRequest {
            spec: Some(spec),
            secrets: None,
        })
        .await
        .unwrap();
    let running = wait::until(WITHIN, || {
        let mut client = client.clone();
        async move {
            let pipe = client
                .get_pipe(GetPipeRequest {
                    name: "live".into(),
                })
                .await
                .ok()?
                .into_inner()
                .pipe?;
            let status = pipe.status?;
            assert_ne!(status.state(), PipeState::Failed, "{:?}", status.error);
            (status.state() == PipeState::Running).then_some(())
        }
    })
    .await;
    assert!(running.is_some(), "the pipe never reached running");
    let clickhouse = Client::default().with_url(ch.url());
    converge(&db, &clickhouse, "items").await;

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
    converge(&db, &clickhouse, "items").await;
    converge(&db, &clickhouse, "wide").await;

    // The status shows the stream: checkpoint, lag, per-table counters.
    let status = client
        .get_pipe(GetPipeRequest {
            name: "live".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .pipe
        .unwrap()
        .status
        .unwrap();
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
    converge(&db, &clickhouse, "items").await;

    // Invariant: the slot's confirmed_flush_lsn is never ahead of the checkpoint in etcd.
    let store = ferry.store().await.unwrap();
    let checkpoint = store
        .checkpoint("live")
        .await
        .unwrap()
        .expect("a checkpoint was written")
        .lsn;
    let confirmed = confirmed_flush(&db).await;
    assert!(
        confirmed <= checkpoint,
        "slot confirmed {confirmed:#x} beyond checkpoint {checkpoint:#x}"
    );

    // An idle database: heartbeats (every sync interval, 1 s here) still move the slot.
    let idle_from = confirmed_flush(&db).await;
    // Two heartbeat intervals (1 s each), plus one status report (1 s) and a margin.
    let moved = wait::until(Duration::from_secs(5), || async {
        (confirmed_flush(&db).await > idle_from).then_some(())
    })
    .await;
    assert!(
        moved.is_some(),
        "the slot did not advance while the database was idle"
    );
    let checkpoint = store.checkpoint("live").await.unwrap().unwrap().lsn;
    assert!(confirmed_flush(&db).await <= checkpoint);

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
    let expected: (i64, i64) = {
        let row = db
            .query_one(
                "SELECT count(*), coalesce(sum(extra), 0)::int8 FROM items",
                &[],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    let reached = wait::until(WITHIN, || async {
        let got: (i64, i64) = clickhouse
            .query("SELECT toInt64(count()), toInt64(sum(ifNull(extra, 0))) FROM dest.items FINAL WHERE _ferry_is_deleted = 0")
            .fetch_one()
            .await
            .ok()?;
        (got == expected).then_some(())
    })
    .await;
    assert!(reached.is_some(), "added column never matched {expected:?}");
    let big_kept: u64 = clickhouse
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
    let failed = wait::until(WITHIN, || {
        let mut client = client.clone();
        async move {
            let status = client
                .get_pipe(GetPipeRequest {
                    name: "live".into(),
                })
                .await
                .ok()?
                .into_inner()
                .pipe?
                .status?;
            (status.state() == PipeState::Failed).then_some(status)
        }
    })
    .await
    .expect("the pipe did not fail on an incompatible type change");
    let error = failed.error.unwrap();
    assert_eq!(error.table, "public.wide");
    assert!(error.message.contains("changed type"), "{}", error.message);
    assert!(error.remedy.contains("ferry delete"), "{}", error.remedy);
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
    let pg = Postgres::start().await.unwrap();
    let ch = ClickHouse::start().await.unwrap();
    let etcd = Etcd::start().await.unwrap();
    let db = pg.client("postgres").await.unwrap();
    db.batch_execute(
        "CREATE TABLE items (id bigint PRIMARY KEY, note text, big text);
         INSERT INTO items SELECT i, 'item ' || i, NULL FROM generate_series(1, 100) i;",
    )
    .await
    .unwrap();
    let ferry = Ferry::new(etcd.endpoints(), 3).unwrap();
    let coordinator = ferry.coordinator("c1").unwrap();
    let _snapshot = ferry.worker(WorkerKind::Snapshot, "s1").unwrap();
    let mut doomed = ferry.worker(WorkerKind::Cdc, "doomed").unwrap();
    coordinator.wait_serving(WITHIN).await.unwrap();
    let mut client = coordinator.pipe_client().await.unwrap();
    let spec = live_spec(
        &pg,
        &ch,
        &["items"],
        PipeMode::SnapshotAndCdc,
        PipeSettings {
            sync_interval: Some(ProtoDuration {
                seconds: 1,
                nanos: 0,
            }),
            pull_batch_size: Some(50),
            ..Default::default()
        },
    );
    client
        .create_pipe(CreatePipeRequest {
            spec: Some(spec),
            secrets: None,
        })
        .await
        .unwrap();
    let store = ferry.store().await.unwrap();
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
        let sampler_db = pg.client("postgres").await.unwrap();
        let store = ferry.store().await.unwrap();
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
    let writer = pg.client("postgres").await.unwrap();
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
    doomed.process().kill9();
    let _survivor = ferry.worker(WorkerKind::Cdc, "survivor").unwrap();
    workload.await.unwrap();

    let clickhouse = Client::default().with_url(ch.url());
    converge(&db, &clickhouse, "items").await;
    stop_sampling.send_replace(true);
    let samples = sampler.await.unwrap();
    assert!(
        samples > 10,
        "only {samples} samples of the slot against the checkpoint"
    );
    let checkpoint = store.checkpoint("live").await.unwrap().unwrap();
    assert_eq!(checkpoint.worker_id, "survivor");
    assert!(confirmed_flush(&db).await <= checkpoint.lsn);
}

async fn state(
    client: &mut ferry_proto::v1::pipe_service_client::PipeServiceClient<tonic::transport::Channel>,
) -> PipeState {
    client
        .get_pipe(GetPipeRequest {
            name: "live".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .pipe
        .unwrap()
        .status
        .unwrap()
        .state()
}

#[tokio::test]
async fn pause_stops_the_stream_at_a_checkpoint_and_resume_catches_up() {
    let pg = Postgres::start().await.unwrap();
    let ch = ClickHouse::start().await.unwrap();
    let etcd = Etcd::start().await.unwrap();
    let db = pg.client("postgres").await.unwrap();
    db.batch_execute("CREATE TABLE items (id bigint PRIMARY KEY, note text, big text);")
        .await
        .unwrap();
    let ferry = Ferry::new(etcd.endpoints(), 3).unwrap();
    let coordinator = ferry.coordinator("c1").unwrap();
    let _snapshot = ferry.worker(WorkerKind::Snapshot, "s1").unwrap();
    let _cdc = ferry.worker(WorkerKind::Cdc, "d1").unwrap();
    coordinator.wait_serving(WITHIN).await.unwrap();
    let mut client = coordinator.pipe_client().await.unwrap();
    let spec = live_spec(
        &pg,
        &ch,
        &["items"],
        PipeMode::CdcOnly,
        PipeSettings {
            sync_interval: Some(ProtoDuration {
                seconds: 1,
                nanos: 0,
            }),
            ..Default::default()
        },
    );
    client
        .create_pipe(CreatePipeRequest {
            spec: Some(spec),
            secrets: None,
        })
        .await
        .unwrap();
    let running = wait::until(WITHIN, || {
        let mut client = client.clone();
        async move { (state(&mut client).await == PipeState::Running).then_some(()) }
    })
    .await;
    assert!(running.is_some());
    let store = ferry.store().await.unwrap();
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
    client
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
    let paused = wait::until(Duration::from_secs(15), || {
        let mut client = client.clone();
        async move { (state(&mut client).await == PipeState::Paused).then_some(()) }
    })
    .await;
    assert!(
        paused.is_some(),
        "the pipe did not reach paused within seconds"
    );
    assert!(
        store.cdc_owner("live").await.unwrap().is_none(),
        "a stream still runs while paused"
    );

    // While paused nothing arrives, however long we look (three sync intervals here).
    let clickhouse = Client::default().with_url(ch.url());
    let at_pause = ch_digest(&clickhouse, "items").await;
    for i in 400..600 {
        db.batch_execute(&format!(
            "INSERT INTO items VALUES ({i}, 'while paused', NULL)"
        ))
        .await
        .unwrap();
    }
    let arrived = wait::until(Duration::from_secs(3), || async {
        (ch_digest(&clickhouse, "items").await != at_pause).then_some(())
    })
    .await;
    assert!(arrived.is_none(), "rows arrived while the pipe was paused");

    // Resume: everything, including what was written while paused, arrives exactly.
    client
        .resume_pipe(ResumePipeRequest {
            name: "live".into(),
        })
        .await
        .unwrap();
    converge(&db, &clickhouse, "items").await;
    assert_eq!(state(&mut client).await, PipeState::Running);
}

#[tokio::test]
async fn unchanged_toast_values_survive_updates_without_replica_identity_full() {
    let pg = Postgres::start().await.unwrap();
    let ch = ClickHouse::start().await.unwrap();
    let etcd = Etcd::start().await.unwrap();
    let db = pg.client("postgres").await.unwrap();
    db.batch_execute(
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
    .await
    .unwrap();
    let ferry = Ferry::new(etcd.endpoints(), 3).unwrap();
    let coordinator = ferry.coordinator("c1").unwrap();
    let _snapshot = ferry.worker(WorkerKind::Snapshot, "s1").unwrap();
    let _cdc = ferry.worker(WorkerKind::Cdc, "d1").unwrap();
    coordinator.wait_serving(WITHIN).await.unwrap();
    let mut client = coordinator.pipe_client().await.unwrap();
    let spec = live_spec(
        &pg,
        &ch,
        &["docs"],
        PipeMode::SnapshotAndCdc,
        PipeSettings {
            sync_interval: Some(ProtoDuration {
                seconds: 1,
                nanos: 0,
            }),
            ..Default::default()
        },
    );
    client
        .create_pipe(CreatePipeRequest {
            spec: Some(spec),
            secrets: None,
        })
        .await
        .unwrap();
    let running = wait::until(WITHIN, || {
        let mut client = client.clone();
        async move { (state(&mut client).await == PipeState::Running).then_some(()) }
    })
    .await;
    assert!(running.is_some());
    let store = ferry.store().await.unwrap();
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
        db.batch_execute(statement).await.unwrap();
    }
    let digest = "SELECT string_agg(id || ':' || title || ':' || md5(body) || ':' || md5(array_to_string(tags, ',')) \
                  || ':' || md5(blob), '|' ORDER BY id) FROM docs";
    let expected: String = db.query_one(digest, &[]).await.unwrap().get(0);
    let clickhouse = Client::default().with_url(ch.url());
    let ch_digest = "SELECT arrayStringConcat(groupArray(line), '|') FROM (SELECT concat(toString(id), ':', \
                     assumeNotNull(title), ':', lower(hex(MD5(assumeNotNull(body)))), ':', \
                     lower(hex(MD5(arrayStringConcat(tags, ',')))), ':', lower(hex(MD5(assumeNotNull(blob))))) AS line \
                     FROM dest.docs FINAL WHERE _ferry_is_deleted = 0 ORDER BY id)";
    let matched = wait::until(WITHIN, || async {
        let got: String = clickhouse.query(ch_digest).fetch_one().await.ok()?;
        (got == expected).then_some(())
    })
    .await;
    let got: String = clickhouse
        .query(ch_digest)
        .fetch_one()
        .await
        .unwrap_or_default();
    let problems: Vec<String> = ferry
        .all_logs()
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .map(str::to_owned)
        .collect();
    assert!(
        matched.is_some(),
        "clickhouse\n{got}\npostgres\n{expected}\nlogs:\n{}",
        problems.join("\n")
    );
    assert_eq!(state(&mut client).await, PipeState::Running);
}

/// A snapshot+CDC pipe under a concurrent workload of every kind: after the workload stops
/// and the stream catches up, ClickHouse (FINAL, not deleted) equals Postgres exactly.
#[tokio::test]
async fn a_concurrent_workload_of_every_kind_converges_exactly() {
    let pg = Postgres::start().await.unwrap();
    let ch = ClickHouse::start().await.unwrap();
    let etcd = Etcd::start().await.unwrap();
    let db = pg.client("postgres").await.unwrap();
    db.batch_execute(
        "CREATE TABLE items (id bigint PRIMARY KEY, note text, big text);
         ALTER TABLE items ALTER big SET STORAGE EXTERNAL;
         INSERT INTO items SELECT i, 'item ' || i, CASE WHEN i % 50 = 0 THEN repeat(md5(i::text), 32768) END
           FROM generate_series(1, 2000) i;
         CREATE TABLE events (id bigint, at date, note text, big text, PRIMARY KEY (id, at)) PARTITION BY RANGE (at);
         CREATE TABLE events_a PARTITION OF events FOR VALUES FROM ('2020-01-01') TO ('2025-01-01');
         CREATE TABLE events_b PARTITION OF events FOR VALUES FROM ('2025-01-01') TO ('2030-01-01');
         INSERT INTO events SELECT i, '2024-06-01'::date + (i % 400), 'event ' || i, NULL FROM generate_series(1, 1000) i;",
    )
    .await
    .unwrap();
    let ferry = Ferry::new(etcd.endpoints(), 3).unwrap();
    let coordinator = ferry.coordinator("c1").unwrap();
    let _snapshot = ferry.worker(WorkerKind::Snapshot, "s1").unwrap();
    let _cdc = ferry.worker(WorkerKind::Cdc, "d1").unwrap();
    coordinator.wait_serving(WITHIN).await.unwrap();
    let mut client = coordinator.pipe_client().await.unwrap();
    let spec = live_spec(
        &pg,
        &ch,
        &["items", "events"],
        PipeMode::SnapshotAndCdc,
        PipeSettings {
            sync_interval: Some(ProtoDuration {
                seconds: 1,
                nanos: 0,
            }),
            pull_batch_size: Some(500),
            ..Default::default()
        },
    );
    client
        .create_pipe(CreatePipeRequest {
            spec: Some(spec),
            secrets: None,
        })
        .await
        .unwrap();
    // The workload starts once the slot exists (the snapshot may still run): CDC carries it.
    let past_setup = wait::until(WITHIN, || {
        let mut client = client.clone();
        async move {
            matches!(
                state(&mut client).await,
                PipeState::Snapshot | PipeState::Running
            )
            .then_some(())
        }
    })
    .await;
    assert!(past_setup.is_some());
    let writer = pg.client("postgres").await.unwrap();
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

    let running = wait::until(WITHIN, || {
        let mut client = client.clone();
        async move { (state(&mut client).await == PipeState::Running).then_some(()) }
    })
    .await;
    assert!(running.is_some(), "the pipe never reached running");
    let clickhouse = Client::default().with_url(ch.url());
    // Row by row: every live row's id, note, big (as md5) and extra.
    let pg_rows = "SELECT string_agg(id || ':' || coalesce(note, '') || ':' || coalesce(md5(big), '') \
                   || ':' || coalesce(extra, 0), '|' ORDER BY id) FROM items";
    let ch_rows = "SELECT arrayStringConcat(groupArray(line), '|') FROM (SELECT concat(toString(id), ':', \
                   ifNull(note, ''), ':', if(isNull(big), '', lower(hex(MD5(assumeNotNull(big))))), ':', \
                   toString(ifNull(extra, 0))) AS line FROM dest.items FINAL WHERE _ferry_is_deleted = 0 ORDER BY id)";
    let expected: String = db.query_one(pg_rows, &[]).await.unwrap().get(0);
    let matched = wait::until(WITHIN, || async {
        let got: String = clickhouse.query(ch_rows).fetch_one().await.ok()?;
        (got == expected).then_some(())
    })
    .await;
    if matched.is_none() {
        let got: String = clickhouse
            .query(ch_rows)
            .fetch_one()
            .await
            .unwrap_or_default();
        let (g, e): (Vec<&str>, Vec<&str>) =
            (got.split('|').collect(), expected.split('|').collect());
        let missing: Vec<_> = e.iter().filter(|r| !g.contains(r)).take(5).collect();
        let extra: Vec<_> = g.iter().filter(|r| !e.contains(r)).take(5).collect();
        let logs: Vec<String> = ferry
            .all_logs()
            .lines()
            .filter(|l| l.contains("WARN"))
            .map(str::to_owned)
            .collect();
        let error = clickhouse.query(ch_rows).fetch_one::<String>().await.err();
        let status = client
            .get_pipe(GetPipeRequest {
                name: "live".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .pipe
            .unwrap()
            .status;
        panic!(
            "items differ: missing {missing:?}, unexpected {extra:?}\nquery error {error:?}\nstatus {status:?}\n{}",
            logs.join("\n")
        );
    }
    let pg_events = "SELECT coalesce(string_agg(id || ':' || at || ':' || note, '|' ORDER BY id, at), '') FROM events";
    let ch_events = "SELECT arrayStringConcat(groupArray(line), '|') FROM (SELECT concat(toString(id), ':', \
                     toString(at), ':', ifNull(note, '')) AS line FROM dest.events FINAL WHERE _ferry_is_deleted = 0 \
                     ORDER BY id, at)";
    let expected: String = db.query_one(pg_events, &[]).await.unwrap().get(0);
    let matched = wait::until(WITHIN, || async {
        let got: String = clickhouse.query(ch_events).fetch_one().await.ok()?;
        (got == expected).then_some(())
    })
    .await;
    assert!(
        matched.is_some(),
        "events (partitioned) never matched postgres row for row"
    );
    assert_eq!(state(&mut client).await, PipeState::Running);
    // The changes really went through the stream.
    let status = client
        .get_pipe(GetPipeRequest {
            name: "live".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .pipe
        .unwrap()
        .status
        .unwrap();
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
