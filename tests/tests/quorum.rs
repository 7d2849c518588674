//! etcd quorum faults under a streaming pipe with a write workload: one of three members down
//! changes nothing; quorum lost, every service reports NOT_SERVING (no etcd write can succeed
//! then); quorum back, they recover and ClickHouse ends equal to Postgres, value by value.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::reload::{TICKS_CH, TICKS_PG};
use common::stack::{Stack, WITHIN, Workers};
use ferry_proto::v1::{PipeMode, PipeState};
use ferry_testkit::wait;
use tonic_health::pb::health_check_response::ServingStatus;

/// Rows of ticks ClickHouse holds now.
async fn ticks_in_clickhouse(stack: &Stack) -> u64 {
    let rows = stack
        .ch_rows("SELECT toString(count()) FROM dest.ticks_current")
        .await
        .unwrap_or_default();
    rows.first()
        .and_then(|r| r[0].as_deref())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn losing_one_etcd_member_changes_nothing_and_losing_quorum_pauses_everything_safely() {
    let mut stack = Stack::start_with(
        "CREATE TABLE ticks (id serial PRIMARY KEY, v int);
         INSERT INTO ticks (v) SELECT g FROM generate_series(1, 100) g;",
        Workers {
            etcd_members: 3,
            ..Workers::default()
        },
    )
    .await;
    stack
        .create(stack.spec("steady", &["ticks"], PipeMode::SnapshotAndCdc))
        .await;
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let db = stack.pg.client("postgres").await.unwrap();
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) && i < 20_000 {
                db.batch_execute(&format!(
                    "INSERT INTO ticks (v) VALUES ({i}); UPDATE ticks SET v = v + 1 WHERE id = {k};",
                    k = i % 100 + 1
                ))
                .await
                .unwrap();
                i += 1;
                // Pacing: a steady flow, not one burst.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };

    // One member of three down: rows keep arriving.
    stack.etcd.kill_member(0);
    let before = ticks_in_clickhouse(&stack).await;
    let moving = wait::until(WITHIN, || async {
        (ticks_in_clickhouse(&stack).await > before + 50).then_some(())
    })
    .await;
    assert!(moving.is_some(), "{}", stack.diagnose("steady").await);

    // Quorum lost: every service says so.
    stack.etcd.kill_member(1);
    for service in [
        &stack.coordinator,
        stack.cdc.as_ref().unwrap(),
        stack.snapshot.as_ref().unwrap(),
    ] {
        let down = wait::until(WITHIN, || async {
            (service.health("").await == Some(ServingStatus::NotServing)).then_some(())
        })
        .await;
        assert!(down.is_some(), "{} kept serving without quorum", service.id);
    }

    // Quorum back: everything recovers, nothing is lost.
    stack.etcd.restart_member(0).await.unwrap();
    stack.etcd.restart_member(1).await.unwrap();
    for service in [
        &stack.coordinator,
        stack.cdc.as_ref().unwrap(),
        stack.snapshot.as_ref().unwrap(),
    ] {
        service.wait_serving(WITHIN).await.unwrap();
    }
    stack.wait_state("steady", PipeState::Running).await;
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    stack.converge(TICKS_PG, TICKS_CH).await;
}
