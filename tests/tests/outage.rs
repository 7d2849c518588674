//! ClickHouse going away and the error policy (`ferry_core::error_policy`): an outage in the
//! middle of change data capture or of a snapshot is retried, visibly, without failing the
//! pipe, and ends with ClickHouse equal to Postgres; an error retrying cannot fix (the
//! destination table dropped) fails the pipe with a remedy that works.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::stack::{Stack, WITHIN, Workers};
use ferry_proto::v1::{PipeMode, PipeSettings, PipeState, Retrying};
use ferry_testkit::wait;
use tokio::time::Instant;

/// How long ClickHouse stays down.
const OUTAGE: Duration = Duration::from_secs(30);

const ITEMS_PG: &str = "SELECT id::text, note, n::text FROM items";
const ITEMS_CH: &str =
    "SELECT toString(id), note, toString(n) FROM dest.items FINAL WHERE _ferry_is_deleted = 0";

/// Writes to `items` until `stop`: inserts, updates and deletes in small transactions, paced.
/// Bounded; returns how many transactions it committed.
async fn workload(stack: &Stack, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<u32> {
    let db = stack.pg.client("postgres").await.unwrap();
    tokio::spawn(async move {
        let mut i = 0u32;
        while !stop.load(Ordering::Relaxed) && i < 5_000 {
            let k = i * 7919 % 2_000 + 1;
            db.batch_execute(&format!(
                "BEGIN;
                 INSERT INTO items VALUES ({new}, 'new {i}', {i}) ON CONFLICT (id) DO NOTHING;
                 UPDATE items SET note = 'u{i}', n = n + 1 WHERE id = {k};
                 DELETE FROM items WHERE id = {gone};
                 COMMIT;",
                new = 100_000 + i,
                gone = (k + 37) % 2_000 + 1,
            ))
            .await
            .unwrap();
            i += 1;
            // A steady flow rather than one burst.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        i
    })
}

/// Samples pipe `name` for `span`, panicking at once if it leaves `state`; returns the retries
/// its status showed meanwhile (in order, one per change of attempt).
async fn hold(stack: &Stack, name: &str, state: PipeState, span: Duration) -> Vec<Retrying> {
    let until = Instant::now() + span;
    let mut seen: Vec<Retrying> = Vec::new();
    while Instant::now() < until {
        let status = stack.status(name).await.unwrap();
        assert_eq!(
            status.state(),
            state,
            "the pipe left {state:?} while ClickHouse was down: {}",
            stack.diagnose(name).await
        );
        if let Some(retry) = status.retrying
            && seen.last().is_none_or(|last| last.attempt != retry.attempt)
        {
            seen.push(retry);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    seen
}

#[tokio::test]
async fn a_clickhouse_outage_during_cdc_is_retried_visibly_and_converges() {
    let mut stack = Stack::start(
        "CREATE TABLE items (id int PRIMARY KEY, note text, n int);
         INSERT INTO items SELECT g, 'n' || g, g FROM generate_series(1, 2000) g;",
    )
    .await;
    stack
        .create(stack.spec("live", &["items"], PipeMode::SnapshotAndCdc))
        .await;
    stack.converge(ITEMS_PG, ITEMS_CH).await;

    let stop = Arc::new(AtomicBool::new(false));
    let writes = workload(&stack, Arc::clone(&stop)).await;
    stack.ch.kill();

    // The stream's failed writes show as a retry within a few attempts' time, and the pipe
    // stays Running throughout the outage.
    let shown = stack
        .wait_status("live", "a retry in the status", |s| {
            assert_eq!(s.state(), PipeState::Running, "{s:?}");
            s.retrying.is_some()
        })
        .await;
    let retry = shown.retrying.unwrap();
    assert!(
        retry.message.contains("cannot reach ClickHouse"),
        "{retry:?}"
    );
    assert!(!retry.waits_for_action && retry.next_attempt_at.is_some());
    assert!(retry.table == "public.items", "{retry:?}");
    let text = stack.ferry_get("live").await;
    assert!(
        text.contains("retrying  writing the changes of public.items to ClickHouse failed"),
        "{text}"
    );
    let seen = hold(&stack, "live", PipeState::Running, OUTAGE).await;
    let attempts: Vec<u32> = seen.iter().map(|r| r.attempt).collect();
    assert!(
        attempts.windows(2).all(|w| w[0] < w[1]) && attempts.last() > Some(&retry.attempt),
        "the attempts did not go on: {attempts:?}"
    );
    stack.ch.restart().await.unwrap();
    // Writes go on a little past the restart, then the stream catches up exactly.
    let written = wait::until(WITHIN, || async {
        let status = stack.status("live").await?;
        status.retrying.is_none().then_some(())
    })
    .await;
    assert!(
        written.is_some(),
        "the retry never cleared: {}",
        stack.diagnose("live").await
    );
    stop.store(true, Ordering::Relaxed);
    let transactions = writes.await.unwrap();
    assert!(transactions > 100, "only {transactions} transactions");
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
async fn a_clickhouse_outage_during_a_snapshot_is_retried_and_converges() {
    let mut stack = Stack::start(
        "CREATE TABLE items (id int PRIMARY KEY, note text, n int);
         INSERT INTO items SELECT g, repeat(md5(g::text), 4), g FROM generate_series(1, 60000) g;
         ANALYZE items;",
    )
    .await;
    let mut spec = stack.spec("copy", &["items"], PipeMode::SnapshotOnly);
    spec.settings = Some(PipeSettings {
        snapshot_rows_per_partition: Some(1_500),
        snapshot_parallel_partitions: Some(1),
        snapshot_parallel_tables: Some(1),
        ..Default::default()
    });
    stack.submit(spec).await.unwrap();

    // ClickHouse goes away once a few partitions are copied.
    let store = stack.ferry.store().await.unwrap();
    let started = wait::until(WITHIN, || async {
        let plan = store.snapshot_plan("copy").await.ok()?;
        (plan.iter().filter(|p| p.partition.done).count() >= 2).then_some(plan.len())
    })
    .await;
    let partitions = started.expect("no partition was copied");
    assert!(partitions >= 10, "only {partitions} partitions planned");
    stack.ch.kill();

    let shown = stack
        .wait_status("copy", "a partition retry in the status", |s| {
            assert_eq!(s.state(), PipeState::Snapshot, "{s:?}");
            s.retrying.is_some()
        })
        .await;
    let retry = shown.retrying.unwrap();
    assert!(
        retry.message.starts_with("snapshot partition ") && retry.message.contains("ClickHouse"),
        "{retry:?}"
    );
    assert_eq!(retry.table, "public.items");
    hold(&stack, "copy", PipeState::Snapshot, OUTAGE).await;
    let plan = store.snapshot_plan("copy").await.unwrap();
    let retried = plan
        .iter()
        .filter_map(|p| p.partition.retrying.as_ref())
        .map(|r| r.attempt)
        .max()
        .unwrap_or(0);
    assert!(retried >= 2, "no partition was retried during the outage");
    assert!(
        plan.iter().any(|p| !p.partition.done),
        "the snapshot finished while ClickHouse was down"
    );

    stack.ch.restart().await.unwrap();
    let finished = stack
        .wait_states("copy", &[PipeState::Completed], Duration::from_secs(180))
        .await;
    let status = finished.status.unwrap();
    assert!(
        status.error.is_none() && status.retrying.is_none(),
        "{status:?}"
    );
    // A failure worth retrying never counts toward failing the pipe.
    let plan = store.snapshot_plan("copy").await.unwrap();
    assert!(
        plan.iter().all(|p| p.partition.done
            && p.partition.attempts == 0
            && p.partition.retrying.is_none()),
        "{plan:?}"
    );
    stack.converge(ITEMS_PG, ITEMS_CH).await;
}

#[tokio::test]
async fn a_revoked_clickhouse_login_waits_for_action_without_failing_the_pipe() {
    let mut stack = Stack::start(
        "CREATE TABLE items (id int PRIMARY KEY, note text, n int);
         INSERT INTO items SELECT g, 'n' || g, g FROM generate_series(1, 500) g;",
    )
    .await;
    stack
        .create(stack.spec("locked", &["items"], PipeMode::SnapshotAndCdc))
        .await;
    stack.converge(ITEMS_PG, ITEMS_CH).await;

    // The server starts requiring a password the pipe does not have.
    stack.ch.restart_with_password("changed").await.unwrap();
    stack
        .db
        .batch_execute("UPDATE items SET note = 'while locked out' WHERE id <= 50")
        .await
        .unwrap();
    let shown = stack
        .wait_status("locked", "a retry waiting for action", |s| {
            assert_eq!(s.state(), PipeState::Running, "{s:?}");
            s.retrying.as_ref().is_some_and(|r| r.waits_for_action)
        })
        .await;
    let retry = shown.retrying.unwrap();
    assert!(retry.message.contains("refused the login"), "{retry:?}");
    assert!(
        retry.remedy.contains("secrets.destination_password"),
        "{retry:?}"
    );
    let text = stack.ferry_get("locked").await;
    assert!(text.contains("retrying  waiting for action: "), "{text}");
    assert!(
        text.contains("  remedy  check the user in spec.destination"),
        "{text}"
    );

    // The operator puts the password back: the stream resumes by itself, exactly.
    stack.ch.restart_with_password("").await.unwrap();
    stack.converge(ITEMS_PG, ITEMS_CH).await;
    let cleared = stack
        .wait_status("locked", "the retry clearing", |s| s.retrying.is_none())
        .await;
    assert_eq!(cleared.state(), PipeState::Running);
}

#[tokio::test]
async fn a_dropped_destination_table_fails_the_pipe_with_a_remedy_that_works() {
    let stack = Stack::start_with(
        "CREATE TABLE items (id int PRIMARY KEY, note text, n int);
         INSERT INTO items SELECT g, 'n' || g, g FROM generate_series(1, 500) g;",
        Workers::default(),
    )
    .await;
    stack
        .create(stack.spec("doomed", &["items"], PipeMode::SnapshotAndCdc))
        .await;
    stack.converge(ITEMS_PG, ITEMS_CH).await;

    stack
        .clickhouse
        .query("DROP TABLE dest.items")
        .execute()
        .await
        .unwrap();
    stack
        .db
        .batch_execute("INSERT INTO items VALUES (501, 'after the drop', 501)")
        .await
        .unwrap();
    let failed = stack
        .wait_states("doomed", &[PipeState::Failed], WITHIN)
        .await;
    let error = failed.status.unwrap().error.unwrap();
    assert_eq!(error.table, "public.items", "{error:?}");
    assert!(error.message.contains("UNKNOWN_TABLE"), "{error:?}");
    let command = "ferry resync doomed --table public.items";
    assert!(error.remedy.contains(command), "{error:?}");
    let text = stack.ferry_get("doomed").await;
    assert!(text.contains(command), "{text}");

    // The remedy's command brings the table back, rows and all.
    common::reload::resync(&stack, "doomed", &["public.items"]).await;
    stack.wait_state("doomed", PipeState::Running).await;
    stack
        .db
        .batch_execute("UPDATE items SET note = 'after the resync' WHERE id <= 10")
        .await
        .unwrap();
    stack.converge(ITEMS_PG, ITEMS_CH).await;
}
