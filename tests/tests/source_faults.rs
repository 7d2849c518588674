//! Postgres faults and the error policy (`ferry_core::error_policy`): a fast restart in the
//! middle of a snapshot or of streaming, a crash (immediate shutdown) while streaming, and the
//! replication connection terminated from the server side, are retried without failing the
//! pipe, visibly while the source is down, and end with ClickHouse equal to Postgres value by
//! value.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use common::stack::{Stack, WITHIN};
use ferry_proto::v1::{PipeMode, PipeSettings, PipeState};
use ferry_testkit::postgres::StopMode;
use ferry_testkit::wait;

const ITEMS_PG: &str = "SELECT id::text, note, n::text FROM items";
const ITEMS_CH: &str =
    "SELECT toString(id), note, toString(n) FROM dest.items FINAL WHERE _ferry_is_deleted = 0";

/// A write workload on `items` that outlives Postgres restarts: inserts, updates and deletes
/// in small transactions, paced, reconnecting when the server goes away.
struct Workload {
    stop: Arc<AtomicBool>,
    /// Transactions committed so far (as far as the client knows).
    committed: Arc<AtomicU32>,
    task: tokio::task::JoinHandle<()>,
}

impl Workload {
    /// Starts writing to the server at `conn` (a connection string).
    fn start(conn: String) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let committed = Arc::new(AtomicU32::new(0));
        let task = tokio::spawn({
            let (stop, committed) = (Arc::clone(&stop), Arc::clone(&committed));
            async move {
                let mut db: Option<tokio_postgres::Client> = None;
                let mut i = 0u32;
                // Bounded: at most this many attempts, whatever happens.
                for _ in 0..20_000 {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let Some(client) = db.as_ref().filter(|c| !c.is_closed()) else {
                        db = connect(&conn).await;
                        if db.is_none() {
                            // Down: try again shortly.
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        continue;
                    };
                    let k = i * 7919 % 2_000 + 1;
                    let sql = format!(
                        "BEGIN;
                         INSERT INTO items VALUES ({new}, 'new {i}', {i}) ON CONFLICT (id) DO NOTHING;
                         UPDATE items SET note = 'u{i}', n = n + 1 WHERE id = {k};
                         DELETE FROM items WHERE id = {gone};
                         COMMIT;",
                        new = 100_000 + i,
                        gone = (k + 37) % 2_000 + 1,
                    );
                    match client.batch_execute(&sql).await {
                        Ok(()) => {
                            committed.fetch_add(1, Ordering::Relaxed);
                            i += 1;
                        }
                        // The server went away (whether the last COMMIT landed does not
                        // matter: the comparison reads Postgres afterwards).
                        Err(_) => db = None,
                    }
                    // A steady flow rather than one burst.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        });
        Self {
            stop,
            committed,
            task,
        }
    }

    fn committed(&self) -> u32 {
        self.committed.load(Ordering::Relaxed)
    }

    /// Waits until `more` transactions beyond those committed now have committed.
    #[track_caller]
    fn advance(&self, more: u32) -> impl std::future::Future<Output = ()> + '_ {
        let caller = std::panic::Location::caller();
        let target = self.committed() + more;
        async move {
            let reached = wait::until(WITHIN, || async {
                (self.committed() >= target).then_some(())
            })
            .await;
            assert!(
                reached.is_some(),
                "{caller}: the workload stalled at {} transactions",
                self.committed()
            );
        }
    }

    /// Stops writing; returns how many transactions committed.
    async fn finish(self) -> u32 {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap();
        self.committed.load(Ordering::Relaxed)
    }
}

async fn connect(conn: &str) -> Option<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(conn, tokio_postgres::NoTls)
        .await
        .ok()?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Some(client)
}

/// Connects the stack's own client again after a restart of Postgres.
async fn reconnect(stack: &mut Stack) {
    stack.db = stack.pg.client("postgres").await.unwrap();
}

/// The server process of the slot of pipe `name` while a stream holds it.
async fn slot_pid(stack: &Stack, name: &str) -> Option<i32> {
    stack
        .db
        .query_opt(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1 AND active",
            &[&format!("ferry_{name}")],
        )
        .await
        .ok()??
        .get(0)
}

#[tokio::test]
async fn a_postgres_restart_during_a_snapshot_reexports_and_converges() {
    let mut stack = Stack::start(
        "CREATE TABLE items (id int PRIMARY KEY, note text, n int);
         INSERT INTO items SELECT g, repeat(md5(g::text), 4), g FROM generate_series(1, 60000) g;
         ANALYZE items;",
    )
    .await;
    let mut spec = stack.spec("copy", &["items"], PipeMode::SnapshotAndCdc);
    spec.settings = Some(PipeSettings {
        snapshot_rows_per_partition: Some(1_500),
        snapshot_parallel_partitions: Some(1),
        snapshot_parallel_tables: Some(1),
        // The harness's one-second sync interval stays.
        ..spec.settings.unwrap_or_default()
    });
    stack.submit(spec).await.unwrap();

    // Postgres restarts once a few partitions are copied, while another is being copied.
    let store = stack.ferry.store().await.unwrap();
    let started = wait::until(WITHIN, || async {
        let plan = store.snapshot_plan("copy").await.ok()?;
        let copying = !store.snapshot_claims("copy").await.ok()?.is_empty();
        (copying && plan.iter().filter(|p| p.partition.done).count() >= 2).then_some(())
    })
    .await;
    assert!(started.is_some(), "no partition was copied");
    let first = store.exported_snapshot("copy").await.unwrap().unwrap();
    // A write committed after the export, so that the snapshot exported after the restart
    // sees a different database: what was copied so far must be read again under it.
    stack
        .db
        .batch_execute("UPDATE items SET note = 'before the restart' WHERE id % 50 = 0")
        .await
        .unwrap();
    stack.pg.restart(StopMode::Fast).await.unwrap();
    let plan = store.snapshot_plan("copy").await.unwrap();
    let done = plan.iter().filter(|p| p.partition.done).count();
    assert!(
        plan.len() >= 10 && done < plan.len(),
        "the restart came after the copy: {done} of {} partitions done",
        plan.len()
    );
    reconnect(&mut stack).await;

    // The pipe never fails (wait_state panics if it does) and streams once every partition
    // is read again under one new snapshot.
    stack
        .wait_states("copy", &[PipeState::Running], Duration::from_secs(180))
        .await;
    let plan = store.snapshot_plan("copy").await.unwrap();
    let snapshots: BTreeSet<&str> = plan
        .iter()
        .map(|p| p.partition.snapshot_visibility.as_str())
        .collect();
    assert_eq!(snapshots.len(), 1, "read under several snapshots: {plan:?}");
    assert!(
        !snapshots.contains(first.visibility.as_str()),
        "nothing was read again after the restart"
    );
    assert!(
        plan.iter()
            .all(|p| p.partition.done && p.partition.attempts == 0)
    );

    // Changes made after the restart stream on top.
    stack
        .db
        .batch_execute(
            "UPDATE items SET note = 'after the restart' WHERE id % 97 = 0;
             DELETE FROM items WHERE id % 101 = 0;
             INSERT INTO items VALUES (60001, 'new', 1);",
        )
        .await
        .unwrap();
    stack.converge(ITEMS_PG, ITEMS_CH).await;
    let status = stack.status("copy").await.unwrap();
    assert_eq!(status.state(), PipeState::Running);
    assert!(
        status.error.is_none() && status.retrying.is_none(),
        "{status:?}"
    );
}

#[tokio::test]
async fn a_postgres_restart_during_streaming_is_retried_visibly_and_converges() {
    restart_during_streaming(StopMode::Fast).await;
}

/// A crash of the source (no shutdown checkpoint, recovery from WAL): the stream only ever
/// read WAL the server had flushed, so nothing it wrote is lost with the crash.
#[tokio::test]
async fn a_postgres_crash_during_streaming_is_retried_and_converges() {
    restart_during_streaming(StopMode::Immediate).await;
}

/// Postgres stopped in `mode` under a write workload, shown as a retry while it is down, then
/// started again: the stream resumes from its checkpoint and ClickHouse ends equal to it.
async fn restart_during_streaming(mode: StopMode) {
    let mut stack = Stack::start(
        "CREATE TABLE items (id int PRIMARY KEY, note text, n int);
         INSERT INTO items SELECT g, 'n' || g, g FROM generate_series(1, 2000) g;",
    )
    .await;
    stack
        .create(stack.spec("live", &["items"], PipeMode::SnapshotAndCdc))
        .await;
    stack.converge(ITEMS_PG, ITEMS_CH).await;

    let writes = Workload::start(stack.pg.connection_string("postgres"));
    writes.advance(50).await;
    stack.pg.stop(mode).await;

    // While the source is down the status says the stream is retrying, not a quiet Running.
    let shown = stack
        .wait_status("live", "a retry in the status", |s| {
            assert_eq!(s.state(), PipeState::Running, "{s:?}");
            s.retrying.is_some()
        })
        .await;
    let retry = shown.retrying.unwrap();
    // Whichever connection noticed first: the heartbeats' or the replication stream's.
    assert!(
        retry.message.contains("Postgres") || retry.message.contains("replication stream"),
        "{retry:?}"
    );
    assert!(!retry.waits_for_action && retry.next_attempt_at.is_some());
    let text = stack.ferry_get("live").await;
    assert!(text.contains("retrying  "), "{text}");

    stack.pg.start_again().await.unwrap();
    reconnect(&mut stack).await;
    // The stream resumes from its checkpoint and the retry clears; writes go on meanwhile.
    stack
        .wait_status("live", "the retry clearing", |s| {
            assert_eq!(s.state(), PipeState::Running, "{s:?}");
            s.retrying.is_none()
        })
        .await;
    writes.advance(100).await;
    let transactions = writes.finish().await;
    assert!(transactions > 150, "only {transactions} transactions");
    stack.converge(ITEMS_PG, ITEMS_CH).await;
    let status = stack.status("live").await.unwrap();
    assert_eq!(status.state(), PipeState::Running);
    assert!(
        status.retrying.is_none() && status.error.is_none(),
        "{status:?}"
    );
    assert!(!stack.ferry_get("live").await.contains("retrying"));
}

#[tokio::test]
async fn a_terminated_replication_connection_reconnects_and_converges() {
    let stack = Stack::start(
        "CREATE TABLE items (id int PRIMARY KEY, note text, n int);
         INSERT INTO items SELECT g, 'n' || g, g FROM generate_series(1, 2000) g;",
    )
    .await;
    stack
        .create(stack.spec("cut", &["items"], PipeMode::SnapshotAndCdc))
        .await;
    stack.converge(ITEMS_PG, ITEMS_CH).await;

    let writes = Workload::start(stack.pg.connection_string("postgres"));
    let mut killed = BTreeSet::new();
    for round in 0..3 {
        writes.advance(30).await;
        // The stream is back (a new server process holds the slot) before it is cut again.
        // The pipe stays Running throughout.
        let pid = wait::until(WITHIN, || async {
            let status = stack.status("cut").await?;
            assert_eq!(status.state(), PipeState::Running, "{status:?}");
            slot_pid(&stack, "cut")
                .await
                .filter(|pid| !killed.contains(pid))
        })
        .await;
        let Some(pid) = pid else {
            panic!(
                "round {round}: the stream never reconnected: {}",
                stack.diagnose("cut").await
            );
        };
        let terminated: bool = stack
            .db
            .query_one(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = 'ferry_cut'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert!(terminated, "round {round}: nothing to terminate");
        killed.insert(pid);
        let status = stack.status("cut").await.unwrap();
        assert_eq!(status.state(), PipeState::Running, "{status:?}");
    }
    writes.advance(50).await;
    let transactions = writes.finish().await;
    assert!(transactions > 100, "only {transactions} transactions");
    stack.converge(ITEMS_PG, ITEMS_CH).await;
    let status = stack
        .wait_status("cut", "the retry clearing", |s| {
            assert_eq!(s.state(), PipeState::Running, "{s:?}");
            s.retrying.is_none()
        })
        .await;
    assert!(status.error.is_none(), "{status:?}");
    assert!(
        slot_pid(&stack, "cut").await.is_some(),
        "the stream is not connected"
    );
}
