//! Setup through the real services: each way a source can be unfit ends the pipe in Failed with
//! a specific error and remedy, leaving nothing behind in ClickHouse or Postgres; a good
//! snapshot+CDC pipe creates its slot and publication, and deleting it drops them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use clickhouse::Client;
use ferry_proto::v1::pipe_service_client::PipeServiceClient;
use ferry_proto::v1::*;
use ferry_testkit::clickhouse::ClickHouse;
use ferry_testkit::etcd::Etcd;
use ferry_testkit::ferry::Ferry;
use ferry_testkit::postgres::Postgres;
use ferry_testkit::{free_port, wait};
use tonic::transport::Channel;

const WITHIN: Duration = Duration::from_secs(60);

struct Case {
    name: &'static str,
    port: u16,
    user: &'static str,
    password: &'static str,
    table: &'static str,
    message: &'static str,
    remedy: &'static str,
}

fn spec(case: &Case, ch: &ClickHouse, settings: PipeSettings) -> CreatePipeRequest {
    let (schema, table) = case.table.split_once('.').unwrap();
    CreatePipeRequest {
        spec: Some(PipeSpec {
            name: case.name.into(),
            source: Some(PostgresSource {
                host: "127.0.0.1".into(),
                port: u32::from(case.port),
                database: "postgres".into(),
                user: case.user.into(),
                ..Default::default()
            }),
            destination: Some(ClickHouseDestination {
                url: ch.url(),
                database: format!("d_{}", case.name),
                ..Default::default()
            }),
            tables: vec![TableMapping {
                source_schema: schema.into(),
                source_table: table.into(),
                destination_table: String::new(),
                ..Default::default()
            }],
            mode: PipeMode::SnapshotAndCdc.into(),
            settings: Some(settings),
        }),
        secrets: Some(PipeSecrets {
            source_password: case.password.into(),
            destination_password: String::new(),
        }),
    }
}

async fn settle(client: &PipeServiceClient<Channel>, name: &str) -> PipeStatus {
    let settled = wait::until(WITHIN, || {
        let mut client = client.clone();
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

async fn count(db: &tokio_postgres::Client, sql: &str) -> i64 {
    db.query_one(sql, &[]).await.unwrap().get(0)
}

async fn databases(ch: &Client) -> Vec<String> {
    ch.query("SELECT name FROM system.databases")
        .fetch_all::<String>()
        .await
        .unwrap()
}

#[tokio::test]
async fn unfit_sources_fail_setup_precisely_and_leave_nothing_behind() {
    let pg = Postgres::start().await.unwrap();
    let replica_only = Postgres::start_with(&["wal_level=replica"]).await.unwrap();
    let ch = ClickHouse::start().await.unwrap();
    let etcd = Etcd::start().await.unwrap();
    let db = pg.client("postgres").await.unwrap();
    db.batch_execute(
        "CREATE TABLE good (id int PRIMARY KEY, v text);
         INSERT INTO good SELECT i, 'v' || i FROM generate_series(1, 1000) i;
         CREATE TABLE no_key (v text);
         CREATE ROLE limited LOGIN REPLICATION;
         CREATE ROLE guarded LOGIN REPLICATION SUPERUSER PASSWORD 'right';",
    )
    .await
    .unwrap();
    pg.require_password_for("guarded").await.unwrap();
    replica_only
        .client("postgres")
        .await
        .unwrap()
        .batch_execute("CREATE TABLE good (id int PRIMARY KEY)")
        .await
        .unwrap();

    let ferry = Ferry::new(etcd.endpoints(), 3).unwrap();
    let coordinator = ferry.coordinator("c1").unwrap();
    let _snapshot = ferry.worker(WorkerKind::Snapshot, "s1").unwrap();
    let _cdc = ferry.worker(WorkerKind::Cdc, "d1").unwrap();
    coordinator.wait_serving(WITHIN).await.unwrap();
    let mut client = coordinator.pipe_client().await.unwrap();
    let clickhouse = Client::default().with_url(ch.url());

    let cases = [
        Case {
            name: "wal_replica",
            port: replica_only.port(),
            user: "postgres",
            password: "",
            table: "public.good",
            message: "wal_level is replica",
            remedy: "ALTER SYSTEM SET wal_level = logical",
        },
        Case {
            name: "no_select",
            port: pg.port(),
            user: "limited",
            password: "",
            table: "public.good",
            message: "may not SELECT from public.good",
            remedy: "GRANT SELECT ON \"public\".\"good\" TO \"limited\"",
        },
        Case {
            name: "no_key",
            port: pg.port(),
            user: "postgres",
            password: "",
            table: "public.no_key",
            message: "no primary key",
            remedy: "REPLICA IDENTITY FULL",
        },
        Case {
            name: "missing",
            port: pg.port(),
            user: "postgres",
            password: "",
            table: "public.nope",
            message: "table public.nope does not exist",
            remedy: "remove it from spec.tables",
        },
        Case {
            name: "bad_password",
            port: pg.port(),
            user: "guarded",
            password: "wrong",
            table: "public.good",
            message: "refused the login of user guarded",
            remedy: "secrets.source_password",
        },
        Case {
            name: "unreachable",
            port: free_port().unwrap(),
            user: "postgres",
            password: "",
            table: "public.good",
            message: "cannot connect to Postgres",
            remedy: "spec.source.host",
        },
    ];
    for case in &cases {
        client
            .create_pipe(spec(case, &ch, PipeSettings::default()))
            .await
            .unwrap();
    }
    for case in &cases {
        let status = settle(&client, case.name).await;
        assert_eq!(status.state(), PipeState::Failed, "{}", case.name);
        assert_eq!(status.previous_state(), PipeState::Setup, "{}", case.name);
        let error = status.error.unwrap();
        assert!(
            error.message.contains(case.message),
            "{}: {}",
            case.name,
            error.message
        );
        assert!(
            error.remedy.contains(case.remedy),
            "{}: {}",
            case.name,
            error.remedy
        );
        if ["no_select", "no_key", "missing"].contains(&case.name) {
            assert_eq!(error.table, case.table, "{}", case.name);
        }
        assert!(
            !error.message.contains("wrong"),
            "a password leaked into the error"
        );
    }
    // Nothing behind: no destination database, no slot, no publication.
    let dbs = databases(&clickhouse).await;
    assert!(!dbs.iter().any(|d| d.starts_with("d_")), "{dbs:?}");
    assert_eq!(
        count(&db, "SELECT count(*) FROM pg_replication_slots").await,
        0
    );
    assert_eq!(count(&db, "SELECT count(*) FROM pg_publication").await, 0);
    // Failed pipes delete cleanly.
    for case in &cases {
        client
            .delete_pipe(DeletePipeRequest {
                name: case.name.into(),
            })
            .await
            .unwrap();
    }

    // A destination table that already holds rows is refused unless allowed.
    clickhouse
        .query("CREATE DATABASE d_occupied")
        .execute()
        .await
        .unwrap();
    clickhouse
        .query("CREATE TABLE d_occupied.good (id Int32, v Nullable(String)) ENGINE = MergeTree ORDER BY id")
        .execute()
        .await
        .unwrap();
    clickhouse
        .query("INSERT INTO d_occupied.good VALUES (-1, 'mine')")
        .execute()
        .await
        .unwrap();
    let occupied = Case {
        name: "occupied",
        port: pg.port(),
        user: "postgres",
        password: "",
        table: "public.good",
        message: "",
        remedy: "",
    };
    client
        .create_pipe(spec(&occupied, &ch, PipeSettings::default()))
        .await
        .unwrap();
    let status = settle(&client, "occupied").await;
    let error = status.error.unwrap();
    assert!(
        error
            .message
            .contains("d_occupied.good already holds 1 rows"),
        "{}",
        error.message
    );
    assert!(
        error.remedy.contains("allow_non_empty_destination"),
        "{}",
        error.remedy
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM pg_replication_slots").await,
        0
    );
    client
        .delete_pipe(DeletePipeRequest {
            name: "occupied".into(),
        })
        .await
        .unwrap();

    // A fit source: Setup creates slot and publication, the snapshot runs, the pipe streams.
    let fit = Case {
        name: "fit",
        port: pg.port(),
        user: "postgres",
        password: "",
        table: "public.good",
        message: "",
        remedy: "",
    };
    client
        .create_pipe(spec(&fit, &ch, PipeSettings::default()))
        .await
        .unwrap();
    let status = settle(&client, "fit").await;
    assert_eq!(status.state(), PipeState::Running, "{:?}", status.error);
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'ferry_fit'"
        )
        .await,
        1
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM pg_publication_tables WHERE pubname = 'ferry_fit' AND tablename = 'good'").await,
        1
    );
    let copied: u64 = clickhouse
        .query("SELECT count() FROM d_fit.good FINAL")
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(copied, 1000);

    // Deleting it drops the slot and the publication (the destination table stays).
    client
        .delete_pipe(DeletePipeRequest { name: "fit".into() })
        .await
        .unwrap();
    let gone = wait::until(WITHIN, || {
        let mut client = client.clone();
        async move {
            client
                .get_pipe(GetPipeRequest { name: "fit".into() })
                .await
                .err()
                .filter(|s| s.code() == tonic::Code::NotFound)
        }
    })
    .await;
    assert!(gone.is_some(), "the pipe was not deleted");
    assert_eq!(
        count(&db, "SELECT count(*) FROM pg_replication_slots").await,
        0
    );
    assert_eq!(count(&db, "SELECT count(*) FROM pg_publication").await, 0);
    assert!(databases(&clickhouse).await.contains(&"d_fit".to_owned()));
}
