//! Setup validation and schema introspection against a real PostgreSQL 15.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use ferry_core::error_policy::ErrorClass;
use ferry_postgres::connection::connect;
use ferry_postgres::schema::describe_table;
use ferry_postgres::validate::check_source;
use ferry_postgres::{SourceError, replica_identity_key};
use ferry_proto::v1::{PipeMode, ReplicaIdentity};
use ferry_testkit::postgres::Postgres;

mod common;

use common::{admin, source, spec};

#[tokio::test]
async fn a_good_source_passes_and_each_problem_names_its_fix() {
    let pg = Postgres::start().await.unwrap();
    let db = admin(&pg).await;
    db.batch_execute(
        "CREATE TABLE public.good (id int PRIMARY KEY, v text);
         CREATE TABLE public.full_identity (v text); ALTER TABLE public.full_identity REPLICA IDENTITY FULL;
         CREATE TABLE public.no_key (v text);
         CREATE TABLE public.secret (id int PRIMARY KEY);
         CREATE ROLE reader LOGIN REPLICATION;
         GRANT SELECT ON public.good, public.no_key TO reader;
         CREATE PUBLICATION mine FOR TABLE public.good;",
    )
    .await
    .unwrap();
    let client = connect(&source(&pg, "postgres"), "").await.unwrap();
    check_source(
        &client,
        &spec(&pg, "postgres", &["public.good", "public.full_identity"]),
        "ferry_p",
    )
    .await
    .unwrap();

    let err = check_source(
        &client,
        &spec(&pg, "postgres", &["public.no_key"]),
        "ferry_p",
    )
    .await
    .unwrap_err();
    assert!(matches!(err, SourceError::NoRowIdentity { .. }), "{err:?}");
    assert_eq!(err.table(), Some("public.no_key"));
    assert!(
        err.remedy()
            .contains("ALTER TABLE \"public\".\"no_key\" REPLICA IDENTITY FULL"),
        "{}",
        err.remedy()
    );
    // A snapshot-only pipe does not need row identity.
    let mut snapshot_only = spec(&pg, "postgres", &["public.no_key"]);
    snapshot_only.mode = PipeMode::SnapshotOnly.into();
    check_source(&client, &snapshot_only, "ferry_p")
        .await
        .unwrap();

    let err = check_source(
        &client,
        &spec(&pg, "postgres", &["public.missing"]),
        "ferry_p",
    )
    .await
    .unwrap_err();
    assert!(matches!(err, SourceError::TableMissing { .. }), "{err:?}");
    assert_eq!(err.to_string(), "table public.missing does not exist");

    let reader = connect(&source(&pg, "reader"), "").await.unwrap();
    // Ferry would create the publication, which needs ownership of the tables.
    let err = check_source(&reader, &spec(&pg, "reader", &["public.good"]), "ferry_p")
        .await
        .unwrap_err();
    assert!(matches!(err, SourceError::NotOwner { .. }), "{err:?}");
    assert!(
        err.remedy().contains("spec.source.publication"),
        "{}",
        err.remedy()
    );
    // With a publication of their own, the missing privilege is what stops them.
    let mut own_publication = spec(&pg, "reader", &["public.good", "public.secret"]);
    own_publication.source.as_mut().unwrap().publication = "mine".into();
    let err = check_source(&reader, &own_publication, "ferry_p")
        .await
        .unwrap_err();
    assert!(matches!(err, SourceError::NoSelect { .. }), "{err:?}");
    assert_eq!(
        err.remedy(),
        "run GRANT SELECT ON \"public\".\"secret\" TO \"reader\";"
    );

    db.batch_execute("CREATE ROLE plain LOGIN; GRANT SELECT ON public.good TO plain;")
        .await
        .unwrap();
    let plain = connect(&source(&pg, "plain"), "").await.unwrap();
    let err = check_source(&plain, &spec(&pg, "plain", &["public.good"]), "ferry_p")
        .await
        .unwrap_err();
    assert!(
        matches!(err, SourceError::NotReplicationRole { .. }),
        "{err:?}"
    );
    assert_eq!(err.remedy(), "run ALTER ROLE \"plain\" REPLICATION;");

    let mut with_publication = spec(&pg, "postgres", &["public.good", "public.full_identity"]);
    with_publication.source.as_mut().unwrap().publication = "mine".into();
    let err = check_source(&client, &with_publication, "ferry_p")
        .await
        .unwrap_err();
    assert!(
        matches!(err, SourceError::PublicationLacksTable { .. }),
        "{err:?}"
    );
    with_publication.source.as_mut().unwrap().publication = "nope".into();
    let err = check_source(&client, &with_publication, "ferry_p")
        .await
        .unwrap_err();
    assert!(
        matches!(err, SourceError::PublicationMissing { .. }),
        "{err:?}"
    );
    // A partitioned table in a publication that does not publish through the root.
    db.batch_execute(
        "CREATE TABLE parts (id int, at date, PRIMARY KEY (id, at)) PARTITION BY RANGE (at);
         CREATE TABLE parts_1 PARTITION OF parts FOR VALUES FROM ('2020-01-01') TO ('2030-01-01');
         CREATE PUBLICATION leafy FOR TABLE parts;",
    )
    .await
    .unwrap();
    let mut leafy = spec(&pg, "postgres", &["public.parts"]);
    leafy.source.as_mut().unwrap().publication = "leafy".into();
    let err = check_source(&client, &leafy, "ferry_p").await.unwrap_err();
    assert!(
        matches!(err, SourceError::PublicationNotViaRoot { .. }),
        "{err:?}"
    );
    assert!(
        err.remedy().contains("publish_via_partition_root = true"),
        "{}",
        err.remedy()
    );
    with_publication.source.as_mut().unwrap().publication = "nope".into();
    let err = check_source(&client, &with_publication, "ferry_p")
        .await
        .unwrap_err();
    assert!(
        matches!(err, SourceError::PublicationMissing { .. }),
        "{err:?}"
    );
}

#[tokio::test]
async fn wal_level_replica_is_refused() {
    let pg = Postgres::start_with(&["wal_level=replica"]).await.unwrap();
    admin(&pg)
        .await
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .unwrap();
    let client = connect(&source(&pg, "postgres"), "").await.unwrap();
    let err = check_source(&client, &spec(&pg, "postgres", &["public.t"]), "ferry_p")
        .await
        .unwrap_err();
    assert!(matches!(err, SourceError::WalLevel { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        "wal_level is replica, logical replication needs logical"
    );
    assert!(
        err.remedy()
            .contains("ALTER SYSTEM SET wal_level = logical")
    );
}

#[tokio::test]
async fn wrong_password_and_unreachable_host_are_told_apart() {
    let pg = Postgres::start().await.unwrap();
    admin(&pg)
        .await
        .batch_execute("CREATE ROLE guarded LOGIN PASSWORD 'right'")
        .await
        .unwrap();
    pg.require_password_for("guarded").await.unwrap();
    connect(&source(&pg, "guarded"), "right").await.unwrap();
    let err = connect(&source(&pg, "guarded"), "wrong").await.unwrap_err();
    assert!(matches!(err, SourceError::AuthFailed { .. }), "{err:?}");
    assert_eq!(err.class(), ErrorClass::RetryAfterAction);
    assert!(
        !format!("{err:?}").contains("wrong"),
        "the password leaked into the error"
    );

    let mut nowhere = source(&pg, "postgres");
    nowhere.port = u32::from(ferry_testkit::free_port().unwrap());
    let err = connect(&nowhere, "").await.unwrap_err();
    assert!(matches!(err, SourceError::Unreachable { .. }), "{err:?}");
    assert_eq!(err.class(), ErrorClass::Retry);
}

#[tokio::test]
async fn tables_are_described_with_types_keys_and_estimates() {
    let pg = Postgres::start().await.unwrap();
    admin(&pg)
        .await
        .batch_execute(
            "CREATE DOMAIN money2 AS numeric(10,2);
             CREATE DOMAIN money3 AS money2;
             CREATE TYPE mood AS ENUM ('sad', 'happy');
             CREATE TABLE t (
                b text, a bigint NOT NULL, amount money3, tags text[], m mood, moods mood[],
                ts timestamptz(3), gone int, gen int GENERATED ALWAYS AS (a * 2) STORED,
                PRIMARY KEY (a, b));
             ALTER TABLE t DROP COLUMN gone;
             INSERT INTO t (a, b) SELECT i, i::text FROM generate_series(1, 1000) i;
             ANALYZE t;
             CREATE TABLE both_keys (a int PRIMARY KEY, b int NOT NULL UNIQUE);
             ALTER TABLE both_keys REPLICA IDENTITY USING INDEX both_keys_b_key;
             CREATE TABLE ident_only (a int, b int NOT NULL UNIQUE);
             ALTER TABLE ident_only REPLICA IDENTITY USING INDEX ident_only_b_key;
             CREATE TABLE parted (id int, at date, PRIMARY KEY (id, at)) PARTITION BY RANGE (at);
             CREATE TABLE parted_1 PARTITION OF parted FOR VALUES FROM ('2020-01-01') TO ('2021-01-01');
             CREATE TABLE parted_2 PARTITION OF parted FOR VALUES FROM ('2021-01-01') TO ('2022-01-01');
             INSERT INTO parted SELECT i, '2020-06-01'::date + (i % 400) FROM generate_series(1, 500) i;
             ANALYZE parted;",
        )
        .await
        .unwrap();
    let client = connect(&source(&pg, "postgres"), "").await.unwrap();
    let t = describe_table(&client, "public", "t").await.unwrap();
    let names: Vec<_> = t.columns.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["b", "a", "amount", "tags", "m", "moods", "ts"]);
    let col = |n: &str| t.columns.iter().find(|c| c.name == n).unwrap().clone();
    assert_eq!(
        (
            col("a").key_position,
            col("b").key_position,
            col("m").key_position
        ),
        (1, 2, 0)
    );
    assert!(!col("a").nullable && !col("b").nullable && col("amount").nullable);
    // numeric(10,2) through two domains: numeric's oid, the domain's precision and scale.
    assert_eq!(col("amount").type_oid, 1700);
    assert_eq!(col("amount").type_modifier, ((10 << 16) | 2) + 4);
    assert_eq!(
        (col("tags").type_oid, col("tags").element_type_oid),
        (1009, 25)
    );
    assert_eq!(col("m").type_kind, "e");
    assert_eq!(col("moods").type_kind, "e");
    assert_eq!(col("ts").type_name, "timestamp(3) with time zone");
    assert_eq!(t.replica_identity(), ReplicaIdentity::Default);
    assert_eq!(t.estimated_rows, 1000);
    assert!(t.pages > 0 && !t.partitioned);

    // The key is what the replica identity sends: the identity index, even with a primary key.
    let both = describe_table(&client, "public", "both_keys")
        .await
        .unwrap();
    let keys: Vec<_> = both
        .columns
        .iter()
        .map(|c| (c.name.as_str(), c.key_position))
        .collect();
    assert_eq!(keys, [("a", 0), ("b", 1)]);
    let ident = describe_table(&client, "public", "ident_only")
        .await
        .unwrap();
    let keys: Vec<_> = ident
        .columns
        .iter()
        .map(|c| (c.name.as_str(), c.key_position))
        .collect();
    assert_eq!(keys, [("a", 0), ("b", 1)]);

    let parted = describe_table(&client, "public", "parted").await.unwrap();
    assert!(parted.partitioned);
    assert_eq!(parted.estimated_rows, 500);
}

#[tokio::test]
async fn partitions_import_the_exported_snapshot_and_know_when_it_is_gone() {
    use ferry_postgres::snapshot::{begin_read, export_snapshot};
    let pg = Postgres::start().await.unwrap();
    let db = admin(&pg).await;
    db.batch_execute("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1), (2);")
        .await
        .unwrap();
    let holder = connect(&source(&pg, "postgres"), "").await.unwrap();
    let (snapshot, exported_visibility) = export_snapshot(&holder).await.unwrap();
    // A row committed after the export is invisible to readers that import it.
    db.batch_execute("INSERT INTO t VALUES (3)").await.unwrap();
    let reader = connect(&source(&pg, "postgres"), "").await.unwrap();
    let visibility = begin_read(&reader, Some(&snapshot)).await.unwrap();
    // The importer sees exactly what the exporter sees: the texts name the same snapshot.
    assert_eq!(visibility, exported_visibility);
    let fresh = connect(&source(&pg, "postgres"), "").await.unwrap();
    assert_ne!(begin_read(&fresh, None).await.unwrap(), exported_visibility);
    let seen: i64 = reader
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(seen, 2);
    reader.batch_execute("ROLLBACK").await.unwrap();

    // The holder goes away: the import is refused with a typed error (the worker then waits
    // for a new export instead of reading another point in time).
    drop(holder);
    let gone = ferry_testkit::wait::until(std::time::Duration::from_secs(10), || async {
        let reader = connect(&source(&pg, "postgres"), "").await.ok()?;
        match begin_read(&reader, Some(&snapshot)).await {
            Err(SourceError::SnapshotGone { .. }) => Some(()),
            _ => None,
        }
    })
    .await;
    assert!(gone.is_some());
    let reader = connect(&source(&pg, "postgres"), "").await.unwrap();
    let err = begin_read(&reader, Some("'; DROP TABLE t; --"))
        .await
        .unwrap_err();
    assert!(matches!(err, SourceError::SnapshotGone { .. }), "{err:?}");
}

#[tokio::test]
async fn slot_and_publication_setup_is_idempotent_and_drops_cleanly() {
    use ferry_postgres::replication::{
        drop_publication, drop_slot, ensure_publication, ensure_slot,
    };
    let pg = Postgres::start().await.unwrap();
    let db = admin(&pg).await;
    db.batch_execute("CREATE TABLE \"Odd \"\"name\"\"\" (id int PRIMARY KEY)")
        .await
        .unwrap();
    let client = connect(&source(&pg, "postgres"), "").await.unwrap();
    let tables = ["public.Odd \"name\"".to_owned()];
    // A Setup re-run after a crash finds both already there and carries on.
    assert!(
        ensure_publication(&client, "ferry_p", &tables)
            .await
            .unwrap()
    );
    assert!(
        !ensure_publication(&client, "ferry_p", &tables)
            .await
            .unwrap()
    );
    assert!(ensure_slot(&client, "ferry_p").await.unwrap());
    assert!(!ensure_slot(&client, "ferry_p").await.unwrap());
    let published: i64 = db
        .query_one(
            "SELECT count(*) FROM pg_publication_tables WHERE pubname = 'ferry_p'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(published, 1);
    // Dropping twice is harmless too (a delete retried after a crash).
    for _ in 0..2 {
        drop_slot(&client, "ferry_p").await.unwrap();
        drop_publication(&client, "ferry_p").await.unwrap();
    }
    let left: i64 = db
        .query_one("SELECT (SELECT count(*) FROM pg_replication_slots) + (SELECT count(*) FROM pg_publication)", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
}

#[tokio::test]
async fn the_row_key_follows_the_replica_identity() {
    let pg = Postgres::start().await.unwrap();
    let db = admin(&pg).await;
    db.batch_execute(
        "CREATE TABLE t (id int PRIMARY KEY, code text NOT NULL, b int NOT NULL, v text);
         CREATE UNIQUE INDEX code_idx ON t (b, code) INCLUDE (v);",
    )
    .await
    .unwrap();
    let client = connect(&source(&pg, "postgres"), "").await.unwrap();
    let oid: u32 = db
        .query_one("SELECT 't'::regclass::oid", &[])
        .await
        .unwrap()
        .get(0);
    let key = |sql: &'static str| {
        let (db, client) = (&db, &client);
        async move {
            db.batch_execute(sql).await.unwrap();
            let (identity, key) = replica_identity_key(client, oid).await.unwrap();
            let described = describe_table(client, "public", "t").await.unwrap();
            let mut recorded: Vec<_> = described
                .columns
                .iter()
                .filter(|c| c.key_position > 0)
                .collect();
            recorded.sort_by_key(|c| c.key_position);
            let recorded: Vec<String> = recorded.iter().map(|c| c.name.clone()).collect();
            assert_eq!(
                recorded, key,
                "describe_table and replica_identity_key agree"
            );
            assert_eq!(described.replica_identity(), identity);
            (identity, key)
        }
    };
    assert_eq!(
        key("SELECT 1").await,
        (ReplicaIdentity::Default, vec!["id".to_owned()])
    );
    // The index's key columns in index order; its INCLUDE column is not sent.
    assert_eq!(
        key("ALTER TABLE t REPLICA IDENTITY USING INDEX code_idx").await,
        (
            ReplicaIdentity::Index,
            vec!["b".to_owned(), "code".to_owned()]
        )
    );
    // A dropped identity index: Postgres sends no old key, whatever the primary key.
    assert_eq!(
        key("DROP INDEX code_idx").await,
        (ReplicaIdentity::Index, vec![])
    );
    assert_eq!(
        key("ALTER TABLE t REPLICA IDENTITY FULL").await,
        (ReplicaIdentity::Full, vec!["id".to_owned()])
    );
    assert_eq!(
        key("ALTER TABLE t DROP CONSTRAINT t_pkey").await,
        (ReplicaIdentity::Full, vec![])
    );
    assert_eq!(
        key("ALTER TABLE t REPLICA IDENTITY NOTHING").await,
        (ReplicaIdentity::Nothing, vec![])
    );
    // A deferrable primary key is no identity to Postgres, and no key to Ferry.
    assert_eq!(
        key("ALTER TABLE t REPLICA IDENTITY DEFAULT; \
             ALTER TABLE t ADD PRIMARY KEY (id) DEFERRABLE INITIALLY DEFERRED")
        .await,
        (ReplicaIdentity::Default, vec![])
    );
    let err = replica_identity_key(&client, 1).await.unwrap_err();
    assert!(matches!(err, SourceError::Catalog { .. }), "{err:?}");
}

#[tokio::test]
async fn unusable_identities_are_refused_and_their_remedies_work() {
    let pg = Postgres::start().await.unwrap();
    let db = admin(&pg).await;
    db.batch_execute(
        "CREATE TABLE deferred (id int PRIMARY KEY DEFERRABLE, v text);
         CREATE TABLE dropped (id int PRIMARY KEY, code int NOT NULL);
         CREATE UNIQUE INDEX dropped_code ON dropped (code);
         ALTER TABLE dropped REPLICA IDENTITY USING INDEX dropped_code;
         DROP INDEX dropped_code;",
    )
    .await
    .unwrap();
    let client = connect(&source(&pg, "postgres"), "").await.unwrap();
    let check = |table: &'static str| {
        let (pg, client) = (&pg, &client);
        async move { check_source(client, &spec(pg, "postgres", &[table]), "ferry_p").await }
    };

    let err = check("public.deferred").await.unwrap_err();
    assert!(
        matches!(err, SourceError::DeferrablePrimaryKey { .. }),
        "{err:?}"
    );
    assert_eq!(err.table(), Some("public.deferred"));
    let remedy = err.remedy();
    assert!(
        remedy.contains(
            "CREATE UNIQUE INDEX CONCURRENTLY \"deferred_ferry_key\" ON \"public\".\"deferred\" (\"id\"); \
             ALTER TABLE \"public\".\"deferred\" REPLICA IDENTITY USING INDEX \"deferred_ferry_key\";"
        ),
        "{remedy}"
    );
    assert!(
        remedy.contains("ALTER TABLE \"public\".\"deferred\" REPLICA IDENTITY FULL;"),
        "{remedy}"
    );
    // The remedy's SQL runs as written and makes the table acceptable.
    let sql = remedy
        .split_once("run ")
        .unwrap()
        .1
        .split_once(" or run")
        .unwrap()
        .0;
    for statement in sql.split("; ").filter(|s| !s.is_empty()) {
        db.batch_execute(statement).await.unwrap();
    }
    check("public.deferred").await.unwrap();
    let described = describe_table(&client, "public", "deferred").await.unwrap();
    assert_eq!(described.columns[0].key_position, 1);

    let err = check("public.dropped").await.unwrap_err();
    assert!(
        matches!(err, SourceError::UnusableIdentityIndex { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("dropped"), "{err}");
    assert!(
        err.remedy()
            .starts_with("run ALTER TABLE \"public\".\"dropped\" REPLICA IDENTITY DEFAULT;"),
        "{}",
        err.remedy()
    );
    db.batch_execute("ALTER TABLE public.dropped REPLICA IDENTITY DEFAULT")
        .await
        .unwrap();
    check("public.dropped").await.unwrap();

    // What else would make an identity index unusable, Postgres refuses itself: choosing a
    // non-unique, partial, deferrable, nullable or expression index, and later making an
    // identity column nullable. (Setup checks all of it anyway.)
    db.batch_execute(
        "CREATE TABLE x (id int PRIMARY KEY, a int, b int NOT NULL, c int NOT NULL);
         CREATE INDEX x_plain ON x (b);
         CREATE UNIQUE INDEX x_partial ON x (b) WHERE b > 0;
         ALTER TABLE x ADD CONSTRAINT x_deferrable UNIQUE (c) DEFERRABLE;
         CREATE UNIQUE INDEX x_nullable ON x (a);
         CREATE UNIQUE INDEX x_expression ON x ((b + 1));
         CREATE UNIQUE INDEX x_good ON x (b);",
    )
    .await
    .unwrap();
    for index in [
        "x_plain",
        "x_partial",
        "x_deferrable",
        "x_nullable",
        "x_expression",
    ] {
        let refused = db
            .batch_execute(&format!(
                "ALTER TABLE x REPLICA IDENTITY USING INDEX {index}"
            ))
            .await;
        assert!(refused.is_err(), "{index} was accepted as replica identity");
    }
    db.batch_execute("ALTER TABLE x REPLICA IDENTITY USING INDEX x_good")
        .await
        .unwrap();
    assert!(
        db.batch_execute("ALTER TABLE x ALTER b DROP NOT NULL")
            .await
            .is_err()
    );
    check("public.x").await.unwrap();
}
