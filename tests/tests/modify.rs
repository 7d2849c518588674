//! AddTables and RemoveTables on a live pipe (docs/reload.md): an added table copied while the
//! others stream, a removed one receiving no more changes, a refused addition. Each test is
//! one scenario through the real services, compared value by value.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::reload::*;
use common::stack::{Stack, WITHIN};
use ferry_proto::v1::{AddTablesRequest, PipeMode, PipeState, RemoveTablesRequest, TableMapping};
use ferry_testkit::wait;

#[tokio::test]
async fn a_table_added_under_load_is_copied_while_the_others_stream_and_a_removed_one_stops() {
    let stack = Stack::start(&format!(
        "{TABLES}
         CREATE TABLE late (id int PRIMARY KEY, body text);
         INSERT INTO late SELECT g, repeat('late', g % 50) FROM generate_series(1, 30000) g;"
    ))
    .await;
    let mut spec = stack.spec("grow", &["ticks", "items"], PipeMode::SnapshotAndCdc);
    spec.settings = Some(settings());
    stack.create(spec).await;
    let stop = Arc::new(AtomicBool::new(false));
    let writer = workload(&stack, Arc::clone(&stop)).await;
    let late_writer = {
        let db = stack.pg.client("postgres").await.unwrap();
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) && i < 20_000 {
                db.batch_execute(&format!(
                    "UPDATE late SET body = 'changed {i}' WHERE id = {k};
                     INSERT INTO late VALUES ({new}, 'new') ON CONFLICT DO NOTHING;",
                    k = i * 37 % 30_000 + 1,
                    new = 100_000 + i
                ))
                .await
                .unwrap();
                i += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };

    let seen = watch(&stack, "grow");
    let added = stack
        .client
        .clone()
        .add_tables(AddTablesRequest {
            name: "grow".into(),
            tables: vec![TableMapping {
                source_table: "late".into(),
                ..Default::default()
            }],
        })
        .await
        .unwrap()
        .into_inner();
    let status = added.pipe.unwrap().status.unwrap();
    assert_eq!(status.state(), PipeState::Modifying);
    let started = status.state_changed_at.unwrap();
    let done = stack.wait_state("grow", PipeState::Running).await;
    let ended = done.status.clone().unwrap().state_changed_at.unwrap();
    let during = ticks_written_between(&stack, &started, &ended).await;
    assert!(during > 0, "no ticks arrived while late was added");
    assert!(
        done.status
            .unwrap()
            .tables
            .iter()
            .any(|t| t.source_table == "public.late"
                && t.partitions_done == t.partitions_total
                && t.partitions_total > 1),
        "late's snapshot progress is reported"
    );
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    late_writer.await.unwrap();
    stack
        .converge(
            "SELECT id::text, body FROM late",
            "SELECT toString(id), body FROM dest.late_current",
        )
        .await;
    stack.converge(TICKS_PG, TICKS_CH).await;
    stack.converge(ITEMS_PG, ITEMS_CH).await;
    {
        let seen = seen.lock().unwrap();
        assert!(
            in_order(
                &seen.states,
                &[
                    PipeState::Modifying,
                    PipeState::Snapshot,
                    PipeState::Running
                ]
            ),
            "states seen: {:?}",
            seen.states
        );
    }

    // Removed: its changes stop arriving; its ClickHouse table stays.
    stack
        .client
        .clone()
        .remove_tables(RemoveTablesRequest {
            name: "grow".into(),
            source_tables: vec!["public.late".into()],
            drop_destination_tables: false,
        })
        .await
        .unwrap();
    stack.wait_state("grow", PipeState::Running).await;
    let before = stack
        .ch_rows("SELECT toString(id), body FROM dest.late_current")
        .await
        .unwrap();
    stack
        .db
        .batch_execute("UPDATE late SET body = 'after removal'; INSERT INTO ticks (v) VALUES (-5);")
        .await
        .unwrap();
    stack.converge(TICKS_PG, TICKS_CH).await;
    let after = stack
        .ch_rows("SELECT toString(id), body FROM dest.late_current")
        .await
        .unwrap();
    assert_eq!(before, after, "a removed table received changes");
    let published = stack
        .pg_count("SELECT count(*) FROM pg_publication_tables WHERE pubname = 'ferry_grow' AND tablename = 'late'")
        .await;
    assert_eq!(published, 0);
    let pipe = stack.pipe("grow").await.unwrap();
    assert!(
        !pipe
            .spec
            .unwrap()
            .tables
            .iter()
            .any(|t| t.source_table == "late")
    );

    // Removed with its ClickHouse table dropped (and its view).
    stack
        .client
        .clone()
        .remove_tables(RemoveTablesRequest {
            name: "grow".into(),
            source_tables: vec!["public.items".into()],
            drop_destination_tables: true,
        })
        .await
        .unwrap();
    stack.wait_state("grow", PipeState::Running).await;
    let gone = stack
        .ch_rows("SELECT name FROM system.tables WHERE database = 'dest' AND name IN ('items', 'items_current')")
        .await
        .unwrap();
    assert!(gone.is_empty(), "dropped tables remain: {gone:?}");
    stack
        .db
        .batch_execute("INSERT INTO ticks (v) VALUES (-6);")
        .await
        .unwrap();
    stack.converge(TICKS_PG, TICKS_CH).await;
}

#[tokio::test]
async fn an_added_table_that_cannot_be_replicated_is_refused_and_the_pipe_keeps_streaming() {
    let stack = Stack::start(
        "CREATE TABLE ticks (id serial PRIMARY KEY, v int);
         CREATE TABLE loose (a int, b text);
         INSERT INTO loose VALUES (1, 'x');",
    )
    .await;
    stack
        .create(stack.spec("picky", &["ticks"], PipeMode::SnapshotAndCdc))
        .await;
    stack
        .client
        .clone()
        .add_tables(AddTablesRequest {
            name: "picky".into(),
            tables: vec![TableMapping {
                source_table: "loose".into(),
                ..Default::default()
            }],
        })
        .await
        .unwrap();
    // No key and no replica identity: refused, named, with what to run; nothing else changes.
    let refused = wait::until(WITHIN, || async {
        let pipe = stack.pipe("picky").await?;
        let status = pipe.status.clone()?;
        (status.state() == PipeState::Running && status.reason.contains("tables not added"))
            .then_some(pipe)
    })
    .await
    .unwrap_or_else(|| panic!("not refused"));
    let status = refused.status.unwrap();
    assert!(status.reason.contains("public.loose"), "{}", status.reason);
    assert!(
        status.reason.contains("REPLICA IDENTITY"),
        "{}",
        status.reason
    );
    assert!(status.reload.is_none());
    assert!(
        !refused
            .spec
            .unwrap()
            .tables
            .iter()
            .any(|t| t.source_table == "loose")
    );
    stack
        .db
        .batch_execute("INSERT INTO ticks (v) VALUES (1), (2);")
        .await
        .unwrap();
    stack.converge(TICKS_PG, TICKS_CH).await;
}
