//! `VerifyPipe` and `ferry verify` through the real services: equal after a snapshot and
//! changes of every kind; exactly the differences planted in ClickHouse behind Ferry's back;
//! the table filter, error codes and the CLI's exit code.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use clickhouse::Client;
use ferry_proto::v1::pipe_service_client::PipeServiceClient;
use ferry_proto::v1::verify_pipe_response::Event;
use ferry_proto::v1::*;
use ferry_testkit::clickhouse::ClickHouse;
use ferry_testkit::etcd::Etcd;
use ferry_testkit::ferry::{Ferry, Service, bin_dir};
use ferry_testkit::postgres::Postgres;
use ferry_testkit::wait;
use prost_types::Duration as ProtoDuration;
use tonic::transport::Channel;

const WITHIN: Duration = Duration::from_secs(90);

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

struct Stack {
    pg: Postgres,
    ch: ClickHouse,
    _etcd: Etcd,
    _ferry: Ferry,
    coordinator: Service,
    _workers: Vec<Service>,
}

async fn stack(setup: &str) -> Stack {
    let pg = Postgres::start().await.unwrap();
    let ch = ClickHouse::start().await.unwrap();
    let etcd = Etcd::start().await.unwrap();
    pg.client("postgres")
        .await
        .unwrap()
        .batch_execute(setup)
        .await
        .unwrap();
    let ferry = Ferry::new(etcd.endpoints(), 3).unwrap();
    let coordinator = ferry.coordinator("c1").unwrap();
    let workers = vec![
        ferry.worker(WorkerKind::Snapshot, "s1").unwrap(),
        ferry.worker(WorkerKind::Cdc, "d1").unwrap(),
    ];
    coordinator.wait_serving(WITHIN).await.unwrap();
    Stack {
        pg,
        ch,
        _etcd: etcd,
        _ferry: ferry,
        coordinator,
        _workers: workers,
    }
}

impl Stack {
    /// Creates the pipe `name` over `tables` and waits until it is in `state`.
    async fn pipe(&self, name: &str, tables: &[&str], mode: PipeMode, state: PipeState) {
        let pg = &self.pg;
        let spec = PipeSpec {
            name: name.into(),
            source: Some(PostgresSource {
                host: "127.0.0.1".into(),
                port: u32::from(pg.port()),
                database: "postgres".into(),
                user: "postgres".into(),
                ..Default::default()
            }),
            destination: Some(ClickHouseDestination {
                url: self.ch.url(),
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
            settings: Some(PipeSettings {
                sync_interval: Some(ProtoDuration {
                    seconds: 1,
                    nanos: 0,
                }),
                ..Default::default()
            }),
        };
        let mut client = self.client().await;
        client
            .create_pipe(CreatePipeRequest {
                spec: Some(spec),
                secrets: None,
            })
            .await
            .unwrap();
        let reached = wait::until(WITHIN, || {
            let mut client = client.clone();
            async move {
                let status = client
                    .get_pipe(GetPipeRequest { name: name.into() })
                    .await
                    .ok()?
                    .into_inner()
                    .pipe?
                    .status?;
                assert_ne!(status.state(), PipeState::Failed, "{:?}", status.error);
                (status.state() == state).then_some(())
            }
        })
        .await;
        assert!(reached.is_some(), "pipe {name} never reached {state:?}");
    }

    async fn client(&self) -> PipeServiceClient<Channel> {
        self.coordinator.pipe_client().await.unwrap()
    }

    fn clickhouse(&self) -> Client {
        Client::default().with_url(self.ch.url())
    }
}

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
    let stack = stack(TYPED).await;
    stack
        .pipe(
            "live",
            &["items"],
            PipeMode::SnapshotAndCdc,
            PipeState::Running,
        )
        .await;
    let db = stack.pg.client("postgres").await.unwrap();
    // Changes through CDC (text values) must transcode to the same bytes as the snapshot's.
    db.batch_execute(
        "INSERT INTO items SELECT i, i, 'new ' || i, 0.5, true, '2000-02-29', now(), \
           gen_random_uuid(), ARRAY['x'], NULL, '[1, {\"a\": null}]', 'NaN', '\\x00ff' \
         FROM generate_series(1001, 1100) i;
         UPDATE items SET note = note || ' (edited)', at = '-infinity' WHERE id % 10 = 0;
         DELETE FROM items WHERE id % 13 = 0;
         UPDATE items SET id = id + 5000 WHERE id BETWEEN 20 AND 25;",
    )
    .await
    .unwrap();
    let mut client = stack.client().await;
    let (results, equal, progress) = verify(&mut client, "live", &[]).await.unwrap();
    assert_eq!(results.len(), 1);
    let items = &results[0];
    assert!(equal && items.equal, "{items:?}");
    assert!(progress >= 2, "only {progress} progress messages");
    let live: i64 = db
        .query_one("SELECT count(*) FROM items", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(items.postgres_rows, u64::try_from(live).unwrap());
    assert_eq!(items.clickhouse_rows, items.postgres_rows);
    assert_eq!(items.destination_table, "dest.items");
    assert!(items.lsn > 0 && !items.keyless);

    // Behind Ferry's back: key 5 gets another note, key 777777 appears, key 7 is deleted.
    let ch = stack.clickhouse();
    plant(&ch, "items", "id = 5", "'tampered' AS note").await;
    plant(&ch, "items", "id = 6", "777777 AS id").await;
    plant(&ch, "items", "id = 7", "1 AS _ferry_is_deleted").await;
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
    let stack = stack(&format!(
        "{TYPED}; CREATE TABLE other (k text PRIMARY KEY, v int);
         INSERT INTO other SELECT 'k' || i, i FROM generate_series(1, 50) i;"
    ))
    .await;
    stack
        .pipe(
            "copy",
            &["items", "other"],
            PipeMode::SnapshotOnly,
            PipeState::Completed,
        )
        .await;
    let mut client = stack.client().await;
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
    plant(&stack.clickhouse(), "other", "k = 'k3'", "300 AS v").await;
    let differs = cli("public.other").await;
    let stdout = String::from_utf8_lossy(&differs.stdout);
    assert_eq!(differs.status.code(), Some(1), "{differs:?}");
    assert!(stdout.contains("differing: k=k3"), "{stdout}");
}

/// Keyless tables are multisets: duplicates count, a delete removes one copy.
#[tokio::test]
async fn verify_compares_keyless_tables_as_multisets() {
    let stack = stack(
        "CREATE TABLE bag (a int, b text);
         ALTER TABLE bag REPLICA IDENTITY FULL;
         INSERT INTO bag VALUES (1, 'x'), (1, 'x'), (2, NULL), (3, 'y');",
    )
    .await;
    stack
        .pipe(
            "bag",
            &["bag"],
            PipeMode::SnapshotAndCdc,
            PipeState::Running,
        )
        .await;
    let db = stack.pg.client("postgres").await.unwrap();
    db.batch_execute(
        "INSERT INTO bag VALUES (1, 'x'), (4, 'z'), (4, 'z');
         DELETE FROM bag WHERE ctid = (SELECT min(ctid) FROM bag WHERE a = 4);
         UPDATE bag SET b = 'w' WHERE a = 3;",
    )
    .await
    .unwrap();
    let mut client = stack.client().await;
    let (results, equal, _) = verify(&mut client, "bag", &[]).await.unwrap();
    let bag = &results[0];
    assert!(bag.keyless);
    assert!(equal, "{bag:?}");
    assert_eq!((bag.postgres_rows, bag.clickhouse_rows), (6, 6));

    // One copy of (1, 'x') too many in ClickHouse.
    plant(&stack.clickhouse(), "bag", "a = 1 AND b = 'x'", "").await;
    let (results, _, _) = verify(&mut client, "bag", &[]).await.unwrap();
    let bag = &results[0];
    assert_eq!(
        (bag.missing, bag.extra, bag.differing),
        (0, 1, 0),
        "{bag:?}"
    );
    assert_eq!(bag.extra_examples, ["a=1, b=x"]);
}
