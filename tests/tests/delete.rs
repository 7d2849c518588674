//! DeletePipe from every state a pipe can be in (Running, Paused, Failed, mid-snapshot): it
//! leaves nothing of the pipe in `pg_replication_slots`, `pg_publication` or etcd, and with
//! `drop_destination_tables` nothing in ClickHouse. A pipe whose source is down stays in
//! Deleting with what is left behind and the SQL that drops it, until forced (`ferry delete
//! --force`), which forgets it and reports the slot it could not drop.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::stack::{Stack, WITHIN};
use ferry_proto::v1::{
    DeletePipeRequest, DeletePipeResponse, PausePipeRequest, PipeMode, PipeSettings, PipeState,
};
use ferry_testkit::ferry::bin_dir;
use ferry_testkit::wait;

const TABLES: &str = "
CREATE TABLE ra (id bigint PRIMARY KEY, note text);
CREATE TABLE pa (id bigint PRIMARY KEY, note text);
CREATE TABLE fa (id bigint PRIMARY KEY, note text);
CREATE TABLE sa (id bigint PRIMARY KEY, payload text);
INSERT INTO ra SELECT i, 'r' || i FROM generate_series(1, 100) i;
INSERT INTO pa SELECT i, 'p' || i FROM generate_series(1, 100) i;
INSERT INTO fa SELECT i, 'f' || i FROM generate_series(1, 100) i;
INSERT INTO sa SELECT i, md5(i::text) || md5((i * 3)::text) FROM generate_series(1, 60000) i;
ANALYZE sa;
";

async fn delete(stack: &Stack, name: &str, drop_tables: bool) -> DeletePipeResponse {
    stack
        .client
        .clone()
        .delete_pipe(DeletePipeRequest {
            name: name.into(),
            drop_destination_tables: drop_tables,
            force: false,
        })
        .await
        .unwrap()
        .into_inner()
}

/// ClickHouse tables (and views) of database `db`.
async fn ch_tables(stack: &Stack, db: &str) -> Vec<String> {
    stack
        .ch_rows(&format!(
            "SELECT name FROM system.tables WHERE database = '{db}'"
        ))
        .await
        .unwrap_or_default()
        .into_iter()
        .filter_map(|row| row.into_iter().next().flatten())
        .collect()
}

/// Asserts that nothing of pipe `name` is left on the source or in etcd, and that nothing
/// comes back for a few seconds (a task finishing late must not write a key again).
async fn assert_gone(stack: &Stack, name: &str) {
    let slots = stack
        .pg_count(&format!(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'ferry_{name}'"
        ))
        .await;
    assert_eq!(slots, 0, "slot of {name} left behind");
    let publications = stack
        .pg_count(&format!(
            "SELECT count(*) FROM pg_publication WHERE pubname = 'ferry_{name}'"
        ))
        .await;
    assert_eq!(publications, 0, "publication of {name} left behind");
    let back = wait::until(Duration::from_secs(3), || async {
        let keys = stack.etcd_keys_of(name).await;
        (!keys.is_empty()).then_some(keys)
    })
    .await;
    assert_eq!(back, None, "etcd keys of {name} left behind");
}

#[tokio::test]
async fn a_pipe_deleted_in_any_state_leaves_nothing_behind() {
    let stack = Stack::start(TABLES).await;
    let store = stack.ferry.store().await.unwrap();
    stack
        .create(stack.spec_into("db_r", "run", &["ra"], PipeMode::SnapshotAndCdc))
        .await;
    stack
        .create(stack.spec_into("db_p", "halted", &["pa"], PipeMode::CdcOnly))
        .await;
    stack
        .create(stack.spec_into("db_f", "broken", &["fa"], PipeMode::SnapshotAndCdc))
        .await;

    // Running, destination tables kept.
    let response = delete(&stack, "run", false).await;
    assert!(response.deleted && response.pipe.is_none(), "{response:?}");
    assert!(response.left_behind.is_empty(), "{response:?}");
    assert_gone(&stack, "run").await;
    let kept = ch_tables(&stack, "db_r").await;
    assert!(
        kept.contains(&"ra".to_owned()) && kept.contains(&"ra_current".to_owned()),
        "{kept:?}"
    );

    // Paused, destination tables dropped (with their views).
    stack
        .client
        .clone()
        .pause_pipe(PausePipeRequest {
            name: "halted".into(),
        })
        .await
        .unwrap();
    stack.wait_state("halted", PipeState::Paused).await;
    let response = delete(&stack, "halted", true).await;
    assert!(response.deleted, "{response:?}");
    assert!(response.left_behind.is_empty(), "{response:?}");
    assert_gone(&stack, "halted").await;
    assert_eq!(ch_tables(&stack, "db_p").await, Vec::<String>::new());

    // Failed: a column type change the stream cannot follow.
    stack
        .db
        .batch_execute(
            "ALTER TABLE fa ALTER COLUMN note TYPE integer USING length(note); \
             INSERT INTO fa VALUES (1000, 7)",
        )
        .await
        .unwrap();
    stack
        .wait_states("broken", &[PipeState::Failed], WITHIN)
        .await;
    let response = delete(&stack, "broken", true).await;
    assert!(response.deleted, "{response:?}");
    assert_gone(&stack, "broken").await;
    assert_eq!(ch_tables(&stack, "db_f").await, Vec::<String>::new());

    // Mid-snapshot: partitions being copied, the exported snapshot held.
    let mut spec = stack.spec_into("db_s", "copying", &["sa"], PipeMode::SnapshotAndCdc);
    let settings = spec.settings.get_or_insert_with(PipeSettings::default);
    settings.snapshot_rows_per_partition = Some(2_000);
    settings.snapshot_parallel_partitions = Some(1);
    stack.submit(spec).await.unwrap();
    let copying = wait::until(WITHIN, || async {
        let plan = store.snapshot_plan("copying").await.ok()?;
        let done = plan.iter().filter(|p| p.partition.done).count();
        (done >= 1 && done < plan.len()).then_some(())
    })
    .await;
    assert!(copying.is_some(), "{}", stack.diagnose("copying").await);
    let response = delete(&stack, "copying", true).await;
    assert!(response.deleted, "{response:?}");
    assert_gone(&stack, "copying").await;
    assert_eq!(ch_tables(&stack, "db_s").await, Vec::<String>::new());
}

#[tokio::test]
async fn a_pipe_whose_source_is_down_is_deleted_only_when_forced() {
    let mut stack = Stack::start(TABLES).await;
    stack
        .create(stack.spec_into("db_r", "orphan", &["ra"], PipeMode::SnapshotAndCdc))
        .await;
    stack.pg.kill();

    // Not forced: the pipe stays in Deleting and says what is left and how to drop it.
    let response = delete(&stack, "orphan", true).await;
    assert!(!response.deleted, "{response:?}");
    let status = response.pipe.unwrap().status.unwrap();
    assert_eq!(status.state(), PipeState::Deleting);
    assert!(
        status
            .reason
            .contains("Left behind: replication slot ferry_orphan"),
        "{}",
        status.reason
    );
    let left = response.left_behind.join("\n");
    assert!(
        left.contains("SELECT pg_drop_replication_slot('ferry_orphan');")
            && left.contains("DROP PUBLICATION IF EXISTS \"ferry_orphan\";")
            && left.contains("cannot connect to Postgres"),
        "{left}"
    );
    // ClickHouse is up: its tables went even though the source is down.
    assert_eq!(ch_tables(&stack, "db_r").await, Vec::<String>::new());
    assert!(!left.contains("ClickHouse table"), "{left}");

    // Forced, through the CLI: the pipe is forgotten and the slot reported.
    let coordinator = stack.coordinator.url();
    let output = tokio::task::spawn_blocking(move || {
        Command::new(bin_dir().join("ferry"))
            .args(["--addr", &coordinator, "delete", "orphan", "--force"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{printed}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(printed.contains("pipe orphan deleted"), "{printed}");
    assert!(
        printed.contains("left behind")
            && printed.contains("SELECT pg_drop_replication_slot('ferry_orphan');"),
        "{printed}"
    );
    let keys = stack.etcd_keys_of("orphan").await;
    assert!(keys.is_empty(), "{keys:?}");
    assert!(stack.pipe("orphan").await.is_none());
}
