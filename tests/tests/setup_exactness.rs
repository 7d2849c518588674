//! Setup refuses what would make Ferry lose or alter data, or break writes on the source, and
//! keys rows by what the replica identity actually sends. Each refusal ends the pipe in Failed
//! naming the table and the SQL that fixes it, and creates nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use clickhouse::Client;
use ferry_proto::v1::pipe_service_client::PipeServiceClient;
use ferry_proto::v1::*;
use ferry_testkit::clickhouse::ClickHouse;
use ferry_testkit::etcd::Etcd;
use ferry_testkit::ferry::{Ferry, Service};
use ferry_testkit::postgres::Postgres;
use ferry_testkit::wait;
use prost_types::Duration as ProtoDuration;
use tonic::transport::Channel;

const WITHIN: Duration = Duration::from_secs(60);

/// Postgres prepared with `sql`, ClickHouse, etcd and Ferry's three services.
struct Stack {
    pg: Postgres,
    ch: ClickHouse,
    _etcd: Etcd,
    _ferry: Ferry,
    _services: Vec<Service>,
    db: tokio_postgres::Client,
    clickhouse: Client,
    client: PipeServiceClient<Channel>,
}

async fn stack(sql: &str) -> Stack {
    let pg = Postgres::start().await.unwrap();
    let ch = ClickHouse::start().await.unwrap();
    let etcd = Etcd::start().await.unwrap();
    let db = pg.client("postgres").await.unwrap();
    db.batch_execute(sql).await.unwrap();
    let ferry = Ferry::new(etcd.endpoints(), 3).unwrap();
    let coordinator = ferry.coordinator("c1").unwrap();
    let snapshot = ferry.worker(WorkerKind::Snapshot, "s1").unwrap();
    let cdc = ferry.worker(WorkerKind::Cdc, "d1").unwrap();
    coordinator.wait_serving(WITHIN).await.unwrap();
    let client = coordinator.pipe_client().await.unwrap();
    let clickhouse = Client::default().with_url(ch.url());
    Stack {
        pg,
        ch,
        _etcd: etcd,
        _ferry: ferry,
        _services: vec![coordinator, snapshot, cdc],
        db,
        clickhouse,
        client,
    }
}

impl Stack {
    /// Creates the snapshot+CDC pipe `name` of `public.<table>` into ClickHouse database
    /// `d_<name>`, through `publication` when not empty.
    async fn create(&self, name: &str, table: &str, publication: &str) {
        let spec = PipeSpec {
            name: name.into(),
            source: Some(PostgresSource {
                host: "127.0.0.1".into(),
                port: u32::from(self.pg.port()),
                database: "postgres".into(),
                user: "postgres".into(),
                publication: publication.into(),
                ..Default::default()
            }),
            destination: Some(ClickHouseDestination {
                url: self.ch.url(),
                database: format!("d_{name}"),
                ..Default::default()
            }),
            tables: vec![TableMapping {
                source_schema: "public".into(),
                source_table: table.into(),
                ..Default::default()
            }],
            mode: PipeMode::SnapshotAndCdc.into(),
            settings: Some(PipeSettings {
                sync_interval: Some(ProtoDuration {
                    seconds: 1,
                    nanos: 0,
                }),
                ..Default::default()
            }),
        };
        self.client
            .clone()
            .create_pipe(CreatePipeRequest {
                spec: Some(spec),
                secrets: None,
            })
            .await
            .unwrap();
    }

    /// The pipe's status once it is Failed or Running.
    async fn settle(&self, name: &str) -> PipeStatus {
        let settled = wait::until(WITHIN, || {
            let mut client = self.client.clone();
            async move {
                let status = client
                    .get_pipe(GetPipeRequest { name: name.into() })
                    .await
                    .ok()?
                    .into_inner()
                    .pipe?
                    .status?;
                matches!(status.state(), PipeState::Failed | PipeState::Running).then_some(status)
            }
        })
        .await;
        settled.unwrap_or_else(|| panic!("pipe {name} never settled"))
    }

    async fn count(&self, sql: &str) -> i64 {
        self.db.query_one(sql, &[]).await.unwrap().get(0)
    }

    /// Asserts Setup refused pipe `name` naming `words` and `table`, with `remedy` in its
    /// remedy, and left nothing behind: no slot, no Ferry publication, no ClickHouse database.
    async fn assert_refused(&self, name: &str, table: &str, words: &[&str], remedy: &str) {
        let status = self.settle(name).await;
        assert_eq!(status.state(), PipeState::Failed, "{:?}", status.error);
        assert_eq!(status.previous_state(), PipeState::Setup);
        let error = status.error.unwrap();
        for word in words {
            assert!(error.message.contains(word), "{word}: {}", error.message);
        }
        assert_eq!(error.table, table);
        assert!(error.remedy.contains(remedy), "{}", error.remedy);
        assert_eq!(
            self.count("SELECT count(*) FROM pg_replication_slots")
                .await,
            0
        );
        assert_eq!(
            self.count("SELECT count(*) FROM pg_publication WHERE pubname LIKE 'ferry%'")
                .await,
            0
        );
        let databases = self
            .clickhouse
            .query("SELECT name FROM system.databases")
            .fetch_all::<String>()
            .await
            .unwrap();
        assert!(!databases.contains(&format!("d_{name}")), "{databases:?}");
    }
}

#[tokio::test]
async fn a_deferrable_primary_key_is_refused_and_source_writes_keep_working() {
    let stack = stack(
        "CREATE TABLE deferred (id int PRIMARY KEY DEFERRABLE INITIALLY IMMEDIATE, v text);
         INSERT INTO deferred SELECT i, 'v' || i FROM generate_series(1, 100) i;",
    )
    .await;
    stack.create("deferred", "deferred", "").await;
    stack
        .assert_refused(
            "deferred",
            "public.deferred",
            &["public.deferred", "DEFERRABLE"],
            "CREATE UNIQUE INDEX CONCURRENTLY \"deferred_ferry_key\" ON \"public\".\"deferred\" (\"id\"); \
             ALTER TABLE \"public\".\"deferred\" REPLICA IDENTITY USING INDEX \"deferred_ferry_key\";",
        )
        .await;
    // Nothing publishes the table, so Postgres still lets its users change it.
    assert_eq!(stack.count("SELECT count(*) FROM pg_publication").await, 0);
    stack
        .db
        .batch_execute(
            "UPDATE deferred SET v = 'edited' WHERE id = 1; DELETE FROM deferred WHERE id = 2",
        )
        .await
        .unwrap();
    assert_eq!(
        stack
            .count("SELECT count(*) FROM deferred WHERE v = 'edited' OR id = 2")
            .await,
        1
    );
}

/// (id, code, note) of every live row, by id: Postgres and ClickHouse (FINAL).
type Rows = Vec<(String, String, Option<String>)>;

async fn pg_rows(db: &tokio_postgres::Client) -> Rows {
    // coded.id: a bare `id` would sort by the text output column.
    db.query(
        "SELECT id::text, code, note FROM coded ORDER BY coded.id",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect()
}

async fn ch_rows(ch: &Client) -> Option<Rows> {
    ch.query(
        "SELECT toString(id), code, note FROM d_coded.coded FINAL \
         WHERE _ferry_is_deleted = 0 ORDER BY id",
    )
    .fetch_all::<(String, String, Option<String>)>()
    .await
    .ok()
}

async fn converge(stack: &Stack) {
    let expected = pg_rows(&stack.db).await;
    let reached = wait::until(WITHIN, || async {
        (ch_rows(&stack.clickhouse).await? == expected).then_some(())
    })
    .await;
    if reached.is_none() {
        let got = ch_rows(&stack.clickhouse).await.unwrap_or_default();
        let only_pg: Vec<_> = expected.iter().filter(|r| !got.contains(r)).collect();
        let only_ch: Vec<_> = got.iter().filter(|r| !expected.contains(r)).collect();
        panic!(
            "ClickHouse never matched Postgres: only in Postgres {only_pg:?}, only in ClickHouse {only_ch:?}"
        );
    }
}

#[tokio::test]
async fn rows_are_keyed_by_a_replica_identity_index_other_than_the_primary_key() {
    let stack = stack(
        "CREATE TABLE coded (id int PRIMARY KEY, code text NOT NULL, note text);
         CREATE UNIQUE INDEX code_idx ON coded (code);
         ALTER TABLE coded REPLICA IDENTITY USING INDEX code_idx;
         INSERT INTO coded SELECT i, 'c' || i, CASE WHEN i % 5 <> 0 THEN 'note ' || i END
           FROM generate_series(1, 200) i;",
    )
    .await;
    stack.create("coded", "coded", "").await;
    let status = stack.settle("coded").await;
    assert_eq!(status.state(), PipeState::Running, "{:?}", status.error);
    // ClickHouse orders (and so replaces and deletes) rows by what Postgres sends as the key.
    let sorting_key: String = stack
        .clickhouse
        .query(
            "SELECT sorting_key FROM system.tables WHERE database = 'd_coded' AND name = 'coded'",
        )
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(sorting_key.trim_matches(['(', ')']), "code");
    converge(&stack).await;

    for statement in [
        "INSERT INTO coded SELECT i, 'c' || i, 'new ' || i FROM generate_series(201, 250) i",
        "UPDATE coded SET note = 'edited ' || id WHERE id % 10 = 0",
        // The identity changes: the old code is deleted, the new one inserted.
        "UPDATE coded SET code = code || '-renamed' WHERE id % 7 = 0",
        // Only the primary key changes: the same identity, a new id.
        "UPDATE coded SET id = id + 1000 WHERE id BETWEEN 1 AND 5",
        "DELETE FROM coded WHERE id % 11 = 0",
        "BEGIN; UPDATE coded SET code = 'swapped', note = NULL WHERE id = 12; \
         DELETE FROM coded WHERE id = 13; INSERT INTO coded VALUES (13, 'c13', 'back'); COMMIT",
    ] {
        stack.db.batch_execute(statement).await.unwrap();
    }
    converge(&stack).await;
}

const PUBLISHED: &str = "CREATE TABLE t (id int PRIMARY KEY, a text, b text);
    INSERT INTO t SELECT i, 'a' || i, 'b' || i FROM generate_series(1, 100) i;";

#[tokio::test]
async fn a_publication_that_omits_kinds_of_change_is_refused() {
    let stack = stack(&format!(
        "{PUBLISHED} CREATE PUBLICATION inserts_only FOR TABLE t WITH (publish = 'insert');"
    ))
    .await;
    stack.create("omits", "t", "inserts_only").await;
    stack
        .assert_refused(
            "omits",
            "public.t",
            &["inserts_only", "update, delete, truncate", "public.t"],
            "ALTER PUBLICATION \"inserts_only\" SET (publish = 'insert, update, delete, truncate');",
        )
        .await;
}

#[tokio::test]
async fn a_publication_with_a_row_filter_is_refused() {
    let stack = stack(&format!(
        "{PUBLISHED} CREATE PUBLICATION some_rows FOR TABLE t WHERE (id > 50);"
    ))
    .await;
    stack.create("filtered", "t", "some_rows").await;
    stack
        .assert_refused(
            "filtered",
            "public.t",
            &["some_rows", "public.t", "WHERE (id > 50)"],
            "ALTER PUBLICATION \"some_rows\" DROP TABLE \"public\".\"t\"; \
             ALTER PUBLICATION \"some_rows\" ADD TABLE \"public\".\"t\";",
        )
        .await;
}

#[tokio::test]
async fn a_publication_with_a_partial_column_list_is_refused() {
    let stack = stack(&format!(
        "{PUBLISHED} CREATE PUBLICATION some_columns FOR TABLE t (id, a);"
    ))
    .await;
    stack.create("narrow", "t", "some_columns").await;
    stack
        .assert_refused(
            "narrow",
            "public.t",
            &["some_columns", "public.t", "column(s) b"],
            "ALTER PUBLICATION \"some_columns\" DROP TABLE \"public\".\"t\"; \
             ALTER PUBLICATION \"some_columns\" ADD TABLE \"public\".\"t\";",
        )
        .await;
}
