//! What the reload scenarios share (docs/reload.md): tables, a concurrent write workload, a
//! WatchPipe recorder, and the resync request.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_proto::v1::{
    PipeSettings, PipeState, PipeStatus, ReloadPhase, ResyncPipeRequest, WatchPipeRequest,
};

use super::stack::Stack;

pub const ITEMS_PG: &str = "SELECT id::text, note, payload FROM items";
pub const ITEMS_CH: &str = "SELECT toString(id), note, payload FROM dest.items_current";
pub const BAG_PG: &str = "SELECT a::text, b FROM bag";
pub const BAG_CH: &str = "SELECT toString(a), b FROM dest.bag_current";
pub const TICKS_PG: &str = "SELECT id::text, v::text FROM ticks";
pub const TICKS_CH: &str = "SELECT toString(id), toString(v) FROM dest.ticks_current";

pub const TABLES: &str = r#"
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
pub struct Seen {
    pub states: Vec<PipeState>,
    pub phases: Vec<ReloadPhase>,
}

/// Follows pipe `name` through WatchPipe, recording what changed.
pub fn watch(stack: &Stack, name: &str) -> Arc<Mutex<Seen>> {
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
pub fn in_order<T: PartialEq>(seq: &[T], sub: &[T]) -> bool {
    let mut it = seq.iter();
    sub.iter().all(|x| it.any(|y| y == x))
}

/// A write workload on items, bag and ticks until `stop`: inserts, updates (some leaving the
/// TOASTed payload unchanged), deletes, key changes, keyless duplicates. Bounded.
pub async fn workload(stack: &Stack, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<u32> {
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

pub fn settings() -> PipeSettings {
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
pub async fn ticks_written_between(
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

/// Asks for a resync of `tables` (schema.table; none: the whole pipe) of pipe `name`; the
/// pipe's status as the request left it.
pub async fn resync(stack: &Stack, name: &str, tables: &[&str]) -> PipeStatus {
    stack
        .client
        .clone()
        .resync_pipe(ResyncPipeRequest {
            name: name.into(),
            tables: tables.iter().map(|t| (*t).to_owned()).collect(),
        })
        .await
        .unwrap()
        .into_inner()
        .pipe
        .unwrap()
        .status
        .unwrap()
}
