//! Setup through the real services: each way a source can be unfit ends the pipe in Failed with
//! a specific error and remedy, leaving nothing behind in ClickHouse or Postgres; a good
//! snapshot+CDC pipe creates its slot and publication, and deleting it drops them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use clickhouse::Client;
use common::stack::{Stack, WITHIN};
use ferry_proto::v1::{
    DeletePipeRequest, GetPipeRequest, PipeMode, PipeSecrets, PipeSettings, PipeState,
};
use ferry_testkit::postgres::Postgres;
use ferry_testkit::{free_port, wait};

struct Case {
    name: &'static str,
    port: u16,
    user: &'static str,
    password: &'static str,
    table: &'static str,
    message: &'static str,
    remedy: &'static str,
}

/// Asks for the pipe of `case`: its table, from its port as its user, into `d_<name>`.
async fn submit(stack: &Stack, case: &Case) {
    let mut spec = stack.spec_into(
        &format!("d_{}", case.name),
        case.name,
        &[case.table],
        PipeMode::SnapshotAndCdc,
    );
    let source = spec.source.as_mut().unwrap();
    source.port = u32::from(case.port);
    source.user = case.user.into();
    spec.settings = Some(PipeSettings::default());
    let secrets = PipeSecrets {
        source_password: case.password.into(),
        destination_password: String::new(),
    };
    stack.submit_with(spec, Some(secrets)).await.unwrap();
}

async fn databases(ch: &Client) -> Vec<String> {
    ch.query("SELECT name FROM system.databases")
        .fetch_all::<String>()
        .await
        .unwrap()
}

#[tokio::test]
async fn unfit_sources_fail_setup_precisely_and_leave_nothing_behind() {
    let replica_only = Postgres::start_with(&["wal_level=replica"]).await.unwrap();
    let stack = Stack::start(
        "CREATE TABLE good (id int PRIMARY KEY, v text);
         INSERT INTO good SELECT i, 'v' || i FROM generate_series(1, 1000) i;
         CREATE TABLE no_key (v text);
         CREATE ROLE limited LOGIN REPLICATION;
         CREATE ROLE guarded LOGIN REPLICATION SUPERUSER PASSWORD 'right';",
    )
    .await;
    let (pg, clickhouse) = (&stack.pg, &stack.clickhouse);
    pg.require_password_for("guarded").await.unwrap();
    replica_only
        .client("postgres")
        .await
        .unwrap()
        .batch_execute("CREATE TABLE good (id int PRIMARY KEY)")
        .await
        .unwrap();

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
        submit(&stack, case).await;
    }
    for case in &cases {
        let pipe = stack.wait_state(case.name, PipeState::Failed).await;
        let status = pipe.status.unwrap();
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
    let dbs = databases(clickhouse).await;
    assert!(!dbs.iter().any(|d| d.starts_with("d_")), "{dbs:?}");
    assert_eq!(
        stack
            .pg_count("SELECT count(*) FROM pg_replication_slots")
            .await,
        0
    );
    assert_eq!(
        stack.pg_count("SELECT count(*) FROM pg_publication").await,
        0
    );
    // Failed pipes delete cleanly.
    for case in &cases {
        stack
            .client
            .clone()
            .delete_pipe(DeletePipeRequest {
                name: case.name.into(),
                ..Default::default()
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
    submit(&stack, &occupied).await;
    let pipe = stack.wait_state("occupied", PipeState::Failed).await;
    let error = pipe.status.unwrap().error.unwrap();
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
        stack
            .pg_count("SELECT count(*) FROM pg_replication_slots")
            .await,
        0
    );
    stack
        .client
        .clone()
        .delete_pipe(DeletePipeRequest {
            name: "occupied".into(),
            ..Default::default()
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
    submit(&stack, &fit).await;
    stack.wait_state("fit", PipeState::Running).await;
    assert_eq!(
        stack
            .pg_count("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'ferry_fit'")
            .await,
        1
    );
    assert_eq!(
        stack.pg_count("SELECT count(*) FROM pg_publication_tables WHERE pubname = 'ferry_fit' AND tablename = 'good'").await,
        1
    );
    let copied: u64 = clickhouse
        .query("SELECT count() FROM d_fit.good FINAL")
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(copied, 1000);

    // Deleting it drops the slot and the publication (the destination table stays).
    stack
        .client
        .clone()
        .delete_pipe(DeletePipeRequest {
            name: "fit".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let gone = wait::until(WITHIN, || {
        let mut client = stack.client.clone();
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
        stack
            .pg_count("SELECT count(*) FROM pg_replication_slots")
            .await,
        0
    );
    assert_eq!(
        stack.pg_count("SELECT count(*) FROM pg_publication").await,
        0
    );
    assert!(databases(clickhouse).await.contains(&"d_fit".to_owned()));
}
