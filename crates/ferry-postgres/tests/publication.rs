//! Setup's checks of a publication the user names, against a real PostgreSQL 15.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use ferry_postgres::SourceError;
use ferry_postgres::connection::connect;
use ferry_postgres::validate::check_source;
use ferry_testkit::postgres::Postgres;

mod common;

use common::{admin, source, spec};

#[tokio::test]
async fn user_publications_must_publish_every_change_row_and_column() {
    let pg = Postgres::start().await.unwrap();
    let db = admin(&pg).await;
    db.batch_execute(
        "CREATE TABLE t (id int PRIMARY KEY, a text, b text, g int GENERATED ALWAYS AS (id * 2) STORED);
         CREATE TABLE other (id int PRIMARY KEY);
         CREATE PUBLICATION inserts FOR TABLE t WITH (publish = 'insert');
         CREATE PUBLICATION filtered FOR TABLE t WHERE (id > 10), other;
         CREATE PUBLICATION narrow FOR TABLE t (id, a), other;
         CREATE PUBLICATION whole FOR TABLE t (id, a, b);",
    )
    .await
    .unwrap();
    let client = connect(&source(&pg, "postgres"), "").await.unwrap();
    let check = |publication: &'static str| {
        let (pg, client) = (&pg, &client);
        async move {
            let mut spec = spec(pg, "postgres", &["public.t"]);
            spec.source.as_mut().unwrap().publication = publication.into();
            check_source(client, &spec, "ferry_p").await
        }
    };
    // Apply "run …" of a remedy, statement by statement.
    let apply = |remedy: String| {
        let db = &db;
        async move {
            let sql = remedy.split_once("run ").unwrap().1.to_owned();
            db.batch_execute(&sql).await.unwrap();
        }
    };

    let err = check("inserts").await.unwrap_err();
    assert!(
        matches!(err, SourceError::PublicationOmitsChanges { .. }),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "publication inserts does not publish update, delete, truncate: those changes of public.t would be lost"
    );
    assert_eq!(
        err.remedy(),
        "run ALTER PUBLICATION \"inserts\" SET (publish = 'insert, update, delete, truncate');"
    );
    apply(err.remedy()).await;
    check("inserts").await.unwrap();

    let err = check("filtered").await.unwrap_err();
    assert!(
        matches!(err, SourceError::PublicationRowFilter { .. }),
        "{err:?}"
    );
    assert_eq!(err.table(), Some("public.t"));
    assert!(err.to_string().contains("WHERE (id > 10)"), "{err}");
    apply(err.remedy()).await;
    check("filtered").await.unwrap();

    let err = check("narrow").await.unwrap_err();
    assert!(
        matches!(err, SourceError::PublicationColumnList { .. }),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "publication narrow does not publish column(s) b of public.t"
    );
    assert!(err.remedy().contains("(also b)"), "{}", err.remedy());
    apply(err.remedy()).await;
    check("narrow").await.unwrap();
    // The remedies touched only this table: the publications' other tables stay.
    let others: i64 = db
        .query_one(
            "SELECT count(*) FROM pg_publication_tables WHERE tablename = 'other'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(others, 2);

    // A column list of every replicated column (generated ones cannot be listed) is fine.
    check("whole").await.unwrap();
}
