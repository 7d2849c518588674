//! The exactness check a user would run (issue 7, "Done means"): a table of every type with
//! edge values, a keyless table with duplicate rows and a table renamed mid-stream, written to
//! concurrently from before the snapshot starts, while the leader coordinator and the
//! snapshot worker are killed mid-snapshot and the CDC worker mid-stream. `VerifyPipe` must
//! report no difference, and an independent value-by-value comparison must agree.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::stack::{Stack, WITHIN};
use ferry_proto::v1::verify_pipe_response::Event;
use ferry_proto::v1::{CreatePipeRequest, PipeMode, PipeState, VerifyPipeRequest, WorkerKind};
use ferry_testkit::wait;

/// Edge rows beside common::SCHEMA's: dates and timestamps outside 1900–2299 that the server
/// holds, quoted array elements, unicode, a host address; a keyless bag with duplicates; a
/// table with TOASTed values (renamed later); a bulk table so the snapshot takes a while.
const EXTRA: &str = r#"
INSERT INTO everything (id, d, ts, tstz, at, t, ip, ai) VALUES
  (5, '0001-01-01', '0001-01-01 00:00:00', '1899-12-31 23:59:59.5+00', '{" a","b ","c,d","e\"f","g\\h","NULL",NULL}', 'ünï 𝄞', '10.1.2.3', '{1,NULL}'),
  (6, '1899-12-31', '2300-01-01 00:00:00', '2300-01-01 00:00:00+00', '{"  "}', '', '::ffff:1.2.3.4', '{}'),
  (7, '2300-01-01', 'infinity', '-infinity', '{}', NULL, NULL, NULL);
CREATE TABLE bag (a int, b text, c text[]);
ALTER TABLE bag REPLICA IDENTITY FULL;
INSERT INTO bag VALUES (1, 'x', '{" a"}'), (1, 'x', '{" a"}'), (2, NULL, NULL), (2, NULL, NULL);
CREATE TABLE items (id int PRIMARY KEY, note text, big text);
ALTER TABLE items ALTER big SET STORAGE EXTERNAL;
INSERT INTO items SELECT i, 'n' || i, repeat(md5(i::text), 100) FROM generate_series(1, 200) i;
CREATE TABLE bulk (id bigint PRIMARY KEY, pad text);
INSERT INTO bulk SELECT i, repeat('p', 100) FROM generate_series(1, 200000) i;
ANALYZE;
"#;

#[tokio::test]
async fn a_hostile_workload_with_every_service_killed_verifies_equal() {
    let mut stack = Stack::start(&format!("{}{EXTRA}", common::SCHEMA)).await;
    let standby = stack.ferry.coordinator("c2").unwrap();
    standby.wait_serving(WITHIN).await.unwrap();
    let mut spec = stack.spec(
        "hostile",
        &["everything", "bag", "items", "bulk"],
        PipeMode::SnapshotAndCdc,
    );
    let settings = spec.settings.as_mut().unwrap();
    settings.snapshot_rows_per_partition = Some(10_000);
    settings.snapshot_parallel_partitions = Some(2);
    settings.pull_batch_size = Some(200);
    stack
        .client
        .create_pipe(CreatePipeRequest {
            spec: Some(spec),
            secrets: None,
        })
        .await
        .unwrap();

    // Writes run from before the snapshot to well after it; the rename waits until the pipe
    // streams (Setup refuses a table missing under its name).
    let writer = stack.pg.client("postgres").await.unwrap();
    let (streaming, mut wait_streaming) = tokio::sync::watch::channel(false);
    let workload = tokio::spawn(async move {
        for i in 0..240i64 {
            let id = 1000 + i;
            let source = 2 + i % 6;
            let items = if i < 120 { "items" } else { "items_renamed" };
            writer
                .batch_execute(&format!(
                    "BEGIN;
                     INSERT INTO everything SELECT {id}, i2, i4, i8, o, f4, f8, n12, n60, nu, b, t, vc, c, nm, ba, u, d, ts, tstz,
                       tm, tmz, iv, js, jb, ai, at, an, e, ae, ip, net, mac, cash, bits, vb, x, tsv, pt, rng, dom
                       FROM everything WHERE id = {source};
                     UPDATE everything SET i4 = coalesce(i4, 0) % 1000 + 1 WHERE id IN (4, {source});
                     UPDATE everything SET at = at || '{{\" sp \",\"x,y\"}}' WHERE id = {id};
                     DELETE FROM everything WHERE id = {id} - 7;
                     INSERT INTO bag VALUES ({a}, 'w', '{{\" q\"}}'), ({a}, 'w', '{{\" q\"}}');
                     DELETE FROM bag WHERE ctid = (SELECT ctid FROM bag WHERE a = {a} LIMIT 1);
                     UPDATE bag SET b = 'u' WHERE ctid = (SELECT ctid FROM bag WHERE a = 1 LIMIT 1);
                     UPDATE {items} SET note = note || '+' WHERE id = {item};
                     INSERT INTO {items} VALUES ({id}, 'new', repeat('z', 3000));
                     DELETE FROM {items} WHERE id = {id} - 5;
                     UPDATE bulk SET pad = 'changed' WHERE id = {bulk};
                     COMMIT;",
                    a = 100 + i % 5,
                    item = 1 + i % 200,
                    bulk = 1 + i * 811 % 200_000,
                ))
                .await
                .unwrap();
            if i == 119 {
                wait_streaming.wait_for(|s| *s).await.unwrap();
                writer
                    .batch_execute("ALTER TABLE items RENAME TO items_renamed")
                    .await
                    .unwrap();
            }
        }
    });

    // Mid-snapshot: the leader (holding the exported snapshot) and the snapshot worker die.
    let store = stack.ferry.store().await.unwrap();
    let copied = wait::until(WITHIN, || async {
        let plan = store.snapshot_plan("hostile").await.ok()?;
        plan.iter().any(|p| p.partition.done).then_some(())
    })
    .await;
    if copied.is_none() {
        panic!(
            "no partition was copied: {}",
            stack.diagnose("hostile").await
        );
    }
    stack.coordinator.process().kill9();
    stack.snapshot.as_mut().unwrap().process().kill9();
    stack.snapshot = Some(stack.ferry.worker(WorkerKind::Snapshot, "s2").unwrap());
    stack.client = standby.pipe_client().await.unwrap();
    stack.wait_state("hostile", PipeState::Running).await;
    streaming.send_replace(true);

    // Mid-stream: the CDC worker dies once it has checkpointed.
    wait::until(WITHIN, || async {
        (store.checkpoint("hostile").await.ok()??.worker_id == "d1").then_some(())
    })
    .await
    .expect("the first cdc worker checkpointed");
    stack.replace_cdc("d2");
    workload.await.unwrap();

    // Ferry's own check: every table equal at one consistent point.
    let mut events = stack
        .client
        .verify_pipe(VerifyPipeRequest {
            name: "hostile".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut results = Vec::new();
    let mut summary = None;
    while let Some(event) = events.message().await.unwrap() {
        match event.event {
            Some(Event::Table(table)) => results.push(table),
            Some(Event::Summary(s)) => summary = Some(s),
            _ => {}
        }
    }
    for table in &results {
        assert!(table.equal, "verify found differences: {table:?}");
    }
    assert_eq!(results.len(), 4);
    assert!(summary.expect("a summary").equal);

    // And an independent comparison, value by value.
    common::compare_everything(&stack.db, &stack.clickhouse, "dest", "everything").await;
    stack
        .converge(
            "SELECT a::text, b, coalesce(array_to_string(c, '|', 'NULL'), '') FROM bag",
            "SELECT toString(a), b, arrayStringConcat(arrayMap(x -> ifNull(x, 'NULL'), c), '|') FROM dest.bag_current",
        )
        .await;
    stack
        .converge(
            "SELECT id::text, note, md5(big) FROM items_renamed",
            "SELECT toString(id), note, lower(hex(MD5(big))) FROM dest.items_current",
        )
        .await;
    stack
        .converge(
            "SELECT count(*)::text, sum(id)::text, sum(length(pad))::text FROM bulk",
            "SELECT toString(count()), toString(sum(id)), toString(sum(length(pad))) FROM dest.bulk_current",
        )
        .await;
}
