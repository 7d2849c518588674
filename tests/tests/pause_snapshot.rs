//! Pausing a pipe in the middle of its snapshot: copies in flight finish, nothing new is
//! claimed while paused, the exported snapshot stays held, and ResumePipe copies the rest under
//! the same snapshot without reading a finished partition again; ClickHouse ends equal to
//! Postgres, changes made during the pause included.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::stack::{Stack, WITHIN};
use ferry_proto::v1::{PausePipeRequest, PipeMode, PipeSettings, PipeState, ResumePipeRequest};
use ferry_store::Store;
use ferry_store::snapshot::PlannedPartition;
use ferry_testkit::wait;

const TABLE: &str = "
CREATE TABLE big (id bigint PRIMARY KEY, payload text NOT NULL, n integer);
INSERT INTO big SELECT i, md5(i::text) || md5((i * 7)::text), i % 1000 FROM generate_series(1, 60000) AS i;
ANALYZE big;
";

async fn plan(store: &Store) -> Vec<PlannedPartition> {
    store.snapshot_plan("halt").await.unwrap()
}

async fn claims(store: &Store) -> usize {
    store.snapshot_claims("halt").await.unwrap().len()
}

fn done(plan: &[PlannedPartition]) -> usize {
    plan.iter().filter(|p| p.partition.done).count()
}

#[tokio::test]
async fn a_snapshot_paused_midway_resumes_where_it_stopped_under_the_same_snapshot() {
    let stack = Stack::start(TABLE).await;
    let store = stack.ferry.store().await.unwrap();
    let mut spec = stack.spec("halt", &["big"], PipeMode::SnapshotAndCdc);
    let settings = spec.settings.get_or_insert_with(PipeSettings::default);
    settings.snapshot_rows_per_partition = Some(2_000);
    settings.snapshot_parallel_partitions = Some(1);
    stack.submit(spec).await.unwrap();

    // Pause once a few partitions are done.
    let started = wait::until(WITHIN, || async {
        (done(&plan(&store).await) >= 3).then_some(())
    })
    .await;
    assert!(started.is_some(), "{}", stack.diagnose("halt").await);
    let exported = store.exported_snapshot("halt").await.unwrap().unwrap();
    let pausing = stack
        .client
        .clone()
        .pause_pipe(PausePipeRequest {
            name: "halt".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .pipe
        .unwrap()
        .status
        .unwrap();
    assert!(
        [PipeState::Pausing, PipeState::Paused].contains(&pausing.state()),
        "{pausing:?}"
    );
    assert_eq!(pausing.paused_from(), PipeState::Snapshot);
    let paused = stack.wait_state("halt", PipeState::Paused).await;
    let paused = paused.status.unwrap();

    // Nothing is claimed and nothing is copied while paused; the snapshot stays held.
    assert_eq!(
        claims(&store).await,
        0,
        "a partition claim outlived the pause"
    );
    let at_pause = plan(&store).await;
    let done_at_pause = done(&at_pause);
    assert!(
        done_at_pause < at_pause.len(),
        "the snapshot finished before the pause landed; make it longer"
    );
    eprintln!(
        "paused with {done_at_pause}/{} partitions done",
        at_pause.len()
    );
    let reported: u32 = paused.tables.iter().map(|t| t.partitions_done).sum();
    assert_eq!(reported as usize, done_at_pause, "{paused:?}");
    assert!(
        paused.reason.contains("paused during the snapshot"),
        "{}",
        paused.reason
    );
    // Changes while paused: the slot holds them for after the snapshot.
    stack
        .db
        .batch_execute(
            "UPDATE big SET n = -n WHERE id % 100 = 0;
             DELETE FROM big WHERE id % 250 = 0;
             INSERT INTO big SELECT i, 'added while paused', 0 FROM generate_series(60001, 61000) AS i;",
        )
        .await
        .unwrap();
    let moved = wait::until(Duration::from_secs(6), || async {
        let now = plan(&store).await;
        (done(&now) != done_at_pause || claims(&store).await > 0).then_some(done(&now))
    })
    .await;
    assert_eq!(moved, None, "partitions were copied while paused");
    let held = store.exported_snapshot("halt").await.unwrap().unwrap();
    assert_eq!(
        held.snapshot_id, exported.snapshot_id,
        "the snapshot was not held"
    );
    // The reason shows what the slot retains meanwhile (the slot is checked every 10 s).
    let noted = wait::until(Duration::from_secs(30), || async {
        let status = stack.status("halt").await?;
        (status.state() == PipeState::Paused && status.reason.contains("the slot retains"))
            .then_some(status)
    })
    .await;
    let noted = noted.unwrap_or_else(|| panic!("no slot note while paused"));
    assert!(noted.slot.is_some_and(|s| s.exists && s.retained_bytes > 0));

    // Resume: back to the snapshot, then streaming.
    let resumed = stack
        .client
        .clone()
        .resume_pipe(ResumePipeRequest {
            name: "halt".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .pipe
        .unwrap()
        .status
        .unwrap();
    assert!(
        [PipeState::Snapshot, PipeState::Running].contains(&resumed.state()),
        "{resumed:?}"
    );
    stack.wait_state("halt", PipeState::Running).await;
    stack
        .converge(
            "SELECT id::text, payload, n::text FROM big",
            "SELECT toString(id), payload, toString(n) FROM dest.big FINAL WHERE _ferry_is_deleted = 0",
        )
        .await;

    // Partitions finished before the pause were not copied again: same done-mark (revision),
    // worker and snapshot; every partition was read under the one snapshot.
    let finished = plan(&store).await;
    let before: BTreeMap<_, _> = at_pause
        .iter()
        .filter(|p| p.partition.done)
        .map(|p| (p.key.clone(), p))
        .collect();
    for partition in &finished {
        assert!(partition.partition.done, "{partition:?}");
        assert_eq!(partition.partition.snapshot_id, exported.snapshot_id);
        if let Some(early) = before.get(&partition.key) {
            assert_eq!(
                partition.revision, early.revision,
                "{} redone",
                partition.key
            );
            assert_eq!(partition.partition.worker_id, early.partition.worker_id);
        }
    }
    let status = stack.status("halt").await.unwrap();
    let total: u32 = status.tables.iter().map(|t| t.partitions_done).sum();
    assert_eq!(total as usize, finished.len());
}
