//! `VerifyPipe` and `ferry verify` through the real services: equal after a snapshot and
//! changes of every kind; exactly the differences planted in ClickHouse behind Ferry's back;
//! the table filter, error codes and the CLI's exit code.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use clickhouse::Client;
use common::stack::Stack;
use ferry_proto::v1::pipe_service_client::PipeServiceClient;
use ferry_proto::v1::verify_pipe_response::Event;
use ferry_proto::v1::{PausePipeRequest, PipeMode, TableVerification, VerifyPipeRequest};
use ferry_testkit::ferry::bin_dir;
use tonic::transport::Channel;

/// Several types, including values the transcoder clamps (infinity, NaN, NULL arrays).
const TYPED: &str = "CREATE TABLE items (
        id bigint PRIMARY KEY, n int, note text, amount numeric(12, 2), flag bool, born date,
        at timestamptz, u uuid, tags text[], ints int[], doc jsonb, f float8, raw bytea);
    INSERT INTO items SELECT i, i * 7, 'item ' || i, i * 1.25, i % 2 = 0,
        date '2020-01-01' + i, timestamptz '2024-01-01 00:00:00+00' + i * interval '1 minute',
        md5(i::text)::uuid, ARRAY['a' || i, NULL], ARRAY[i, NULL, -i],
        jsonb_build_object('k', i), i / 3.0, decode(md5(i::text), 'hex')
      FROM generate_series(1, 300) i;
    UPDATE items SET at = 'infinity', amount = 'NaN', tags = NULL, born = '-infinity' WHERE id = 9;";

/// The results of a verification: per table, and the summary's verdict.
async fn verify(
    client: &mut PipeServiceClient<Channel>,
    name: &str,
    tables: &[&str],
) -> Result<(Vec<TableVerification>, bool, u64), tonic::Status> {
    let mut stream = client
        .verify_pipe(VerifyPipeRequest {
            name: name.into(),
            tables: tables.iter().map(|t| (*t).into()).collect(),
            checkpoint_timeout: None,
        })
        .await?
        .into_inner();
    let (mut results, mut progress) = (Vec::new(), 0);
    while let Some(message) = stream.message().await? {
        match message.event.unwrap() {
            Event::Progress(_) => progress += 1,
            Event::Table(table) => results.push(table),
            Event::Summary(summary) => return Ok((results, summary.equal, progress)),
        }
    }
    panic!("no summary");
}

/// Inserts into `dest.<table>` a copy of the first live row matching `filter`, changed by
/// `replace` (SELECT * REPLACE), with a version above every existing one (so it is the latest,
/// yet below the verification's bound, and distinct from every other event's).
async fn plant(ch: &Client, table: &str, filter: &str, replace: &str) {
    let version: String = ch
        .query(&format!(
            "SELECT toString(max(_ferry_version) + 1) FROM dest.{table}"
        ))
        .fetch_one()
        .await
        .unwrap();
    ch.query(&format!(
        // The filter in a subquery: REPLACE's aliases would shadow the columns in a WHERE.
        "INSERT INTO dest.{table} SELECT * REPLACE ({replace}{}{version} AS _ferry_version) \
         FROM (SELECT * FROM dest.{table} FINAL WHERE {filter} AND _ferry_is_deleted = 0 LIMIT 1)",
        if replace.is_empty() { "" } else { ", " }
    ))
    .execute()
    .await
    .unwrap();
}

#[tokio::test]
async fn verify_finds_equal_tables_then_exactly_the_planted_differences() {
    let stack = Stack::start(TYPED).await;
    let spec = stack.spec("live", &["items"], PipeMode::SnapshotAndCdc);
    stack.create(spec).await;
    // Changes through CDC (text values) must transcode to the same bytes as the snapshot's.
    stack
        .db
        .batch_execute(
            "INSERT INTO items SELECT i, i, 'new ' || i, 0.5, true, '2000-02-29', now(), \
               gen_random_uuid(), ARRAY['x'], NULL, '[1, {\"a\": null}]', 'NaN', '\\x00ff' \
             FROM generate_series(1001, 1100) i;
             UPDATE items SET note = note || ' (edited)', at = '-infinity' WHERE id % 10 = 0;
             DELETE FROM items WHERE id % 13 = 0;
             UPDATE items SET id = id + 5000 WHERE id BETWEEN 20 AND 25;",
        )
        .await
        .unwrap();
    let mut client = stack.client.clone();
    let (results, equal, progress) = verify(&mut client, "live", &[]).await.unwrap();
    assert_eq!(results.len(), 1);
    let items = &results[0];
    assert!(equal && items.equal, "{items:?}");
    assert!(progress >= 2, "only {progress} progress messages");
    let live = stack.pg_count("SELECT count(*) FROM items").await;
    assert_eq!(items.postgres_rows, u64::try_from(live).unwrap());
    assert_eq!(items.clickhouse_rows, items.postgres_rows);
    assert_eq!(items.destination_table, "dest.items");
    assert!(items.lsn > 0 && !items.keyless);

    // Behind Ferry's back: key 5 gets another note, key 777777 appears, key 7 is deleted.
    let ch = &stack.clickhouse;
    plant(ch, "items", "id = 5", "'tampered' AS note").await;
    plant(ch, "items", "id = 6", "777777 AS id").await;
    plant(ch, "items", "id = 7", "1 AS _ferry_is_deleted").await;
    let (results, equal, _) = verify(&mut client, "live", &["public.items"])
        .await
        .unwrap();
    let items = &results[0];
    assert!(!equal && !items.equal);
    assert_eq!(
        (items.differing, items.extra, items.missing),
        (1, 1, 1),
        "{items:?}"
    );
    assert_eq!(items.differing_examples, ["id=5"]);
    assert_eq!(items.extra_examples, ["id=777777"]);
    assert_eq!(items.missing_examples, ["id=7"]);
    assert_eq!(items.clickhouse_rows, items.postgres_rows);

    // Only running or completed pipes can be verified.
    client
        .pause_pipe(PausePipeRequest {
            name: "live".into(),
        })
        .await
        .unwrap();
    let refused = verify(&mut client, "live", &[]).await.unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    assert!(refused.message().contains("paus"), "{}", refused.message());
}

#[tokio::test]
async fn verify_filters_tables_refuses_bad_requests_and_sets_the_cli_exit_code() {
    let stack = Stack::start(&format!(
        "{TYPED}; CREATE TABLE other (k text PRIMARY KEY, v int);
         INSERT INTO other SELECT 'k' || i, i FROM generate_series(1, 50) i;"
    ))
    .await;
    // Waits until Completed.
    let spec = stack.spec("copy", &["items", "other"], PipeMode::SnapshotOnly);
    stack.create(spec).await;
    let mut client = stack.client.clone();
    let (results, equal, _) = verify(&mut client, "copy", &[]).await.unwrap();
    assert!(equal);
    assert_eq!(results.len(), 2);
    // A completed snapshot-only pipe is compared without a version bound.
    assert!(results.iter().all(|t| t.lsn == 0 && t.equal), "{results:?}");

    let (results, _, _) = verify(&mut client, "copy", &["public.other"])
        .await
        .unwrap();
    assert_eq!(results.len(), 1);
    assert_eq!(results[0].source_table, "public.other");
    assert_eq!(results[0].postgres_rows, 50);

    let missing = verify(&mut client, "nope", &[]).await.unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound, "{missing:?}");
    let unknown = verify(&mut client, "copy", &["public.other", "public.ghost"])
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::InvalidArgument, "{unknown:?}");
    assert!(
        unknown.message().contains("tables[1]"),
        "{}",
        unknown.message()
    );

    // The CLI: 0 when equal, 1 on a difference, with the example in its output.
    let cli = |table: &'static str| {
        let addr = stack.coordinator.url();
        async move {
            tokio::process::Command::new(bin_dir().join("ferry"))
                .args(["verify", "copy", "--table", table])
                .env("FERRY_ADDR", addr)
                .output()
                .await
                .unwrap()
        }
    };
    let ok = cli("other").await;
    assert_eq!(ok.status.code(), Some(0), "{ok:?}");
    plant(&stack.clickhouse, "other", "k = 'k3'", "300 AS v").await;
    let differs = cli("public.other").await;
    let stdout = String::from_utf8_lossy(&differs.stdout);
    assert_eq!(differs.status.code(), Some(1), "{differs:?}");
    assert!(stdout.contains("differing: k=k3"), "{stdout}");
}

/// Keyless tables are multisets: duplicates count, a delete removes one copy.
#[tokio::test]
async fn verify_compares_keyless_tables_as_multisets() {
    let stack = Stack::start(
        "CREATE TABLE bag (a int, b text);
         ALTER TABLE bag REPLICA IDENTITY FULL;
         INSERT INTO bag VALUES (1, 'x'), (1, 'x'), (2, NULL), (3, 'y');",
    )
    .await;
    let spec = stack.spec("bag", &["bag"], PipeMode::SnapshotAndCdc);
    stack.create(spec).await;
    stack
        .db
        .batch_execute(
            "INSERT INTO bag VALUES (1, 'x'), (4, 'z'), (4, 'z');
             DELETE FROM bag WHERE ctid = (SELECT min(ctid) FROM bag WHERE a = 4);
             UPDATE bag SET b = 'w' WHERE a = 3;",
        )
        .await
        .unwrap();
    let mut client = stack.client.clone();
    let (results, equal, _) = verify(&mut client, "bag", &[]).await.unwrap();
    let bag = &results[0];
    assert!(bag.keyless);
    assert!(equal, "{bag:?}");
    assert_eq!((bag.postgres_rows, bag.clickhouse_rows), (6, 6));

    // One copy of (1, 'x') too many in ClickHouse.
    plant(&stack.clickhouse, "bag", "a = 1 AND b = 'x'", "").await;
    let (results, _, _) = verify(&mut client, "bag", &[]).await.unwrap();
    let bag = &results[0];
    assert_eq!(
        (bag.missing, bag.extra, bag.differing),
        (0, 1, 0),
        "{bag:?}"
    );
    assert_eq!(bag.extra_examples, ["a=1, b=x"]);
}
