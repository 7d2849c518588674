//! Hostile names end to end: a schema and a table whose names hold quotes, spaces, unicode and
//! upper case, and columns with dots too, replicate exactly through Setup, the snapshot, CDC
//! and a resync: Ferry quotes every identifier it writes. (Dots in schema and table names are
//! refused at CreatePipe, naming the field, as in ClickPipes: Ferry names tables schema.table.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::reload::resync;
use common::stack::Stack;
use ferry_proto::v1::{PipeMode, PipeState, TableMapping};

const PG: &str =
    r#"SELECT "Id"::text, "Spalte ""1""", "dot.ted col" FROM "Grüße Schema"."Tab""le x""#;
const CH: &str = "SELECT toString(`Id`), `Spalte \"1\"`, `dot.ted col` FROM dest.`tab_le_current`";

#[tokio::test]
async fn quoted_spaced_and_unicode_names_replicate_exactly_through_snapshot_cdc_and_resync() {
    let stack = Stack::start(
        r#"CREATE SCHEMA "Grüße Schema";
           CREATE TABLE "Grüße Schema"."Tab""le x" (
               "Id" int PRIMARY KEY, "Spalte ""1""" text, "dot.ted col" text);
           INSERT INTO "Grüße Schema"."Tab""le x"
               SELECT g, 'wert ' || g || ' ✓', 'a.b ''c''' FROM generate_series(1, 300) g;"#,
    )
    .await;
    let mut spec = stack.spec("names", &[], PipeMode::SnapshotAndCdc);
    spec.tables = vec![TableMapping {
        source_schema: "Grüße Schema".into(),
        source_table: "Tab\"le x".into(),
        destination_table: "tab_le".into(),
        ..Default::default()
    }];
    stack.create(spec).await;
    stack.converge(PG, CH).await;
    stack
        .db
        .batch_execute(
            r#"UPDATE "Grüße Schema"."Tab""le x" SET "Spalte ""1""" = 'geändert "q"' WHERE "Id" <= 10;
               DELETE FROM "Grüße Schema"."Tab""le x" WHERE "Id" > 290;
               INSERT INTO "Grüße Schema"."Tab""le x" VALUES (1000, 'neu', NULL);"#,
        )
        .await
        .unwrap();
    stack.converge(PG, CH).await;
    resync(&stack, "names", &[r#"Grüße Schema.Tab"le x"#]).await;
    stack.wait_state("names", PipeState::Running).await;
    stack
        .db
        .batch_execute(
            r#"UPDATE "Grüße Schema"."Tab""le x" SET "dot.ted col" = 'nach' WHERE "Id" = 1;"#,
        )
        .await
        .unwrap();
    stack.converge(PG, CH).await;
}
