//! What the source tests share: a spec of the test server's tables and an admin client.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use ferry_proto::v1::{PipeMode, PipeSpec, PostgresSource, TableMapping};
use ferry_testkit::postgres::Postgres;

pub fn source(pg: &Postgres, user: &str) -> PostgresSource {
    PostgresSource {
        host: "127.0.0.1".into(),
        port: u32::from(pg.port()),
        database: "postgres".into(),
        user: user.into(),
        ..Default::default()
    }
}

pub fn spec(pg: &Postgres, user: &str, tables: &[&str]) -> PipeSpec {
    PipeSpec {
        name: "p".into(),
        source: Some(source(pg, user)),
        tables: tables
            .iter()
            .map(|t| {
                let (schema, table) = t.split_once('.').unwrap();
                TableMapping {
                    source_schema: schema.into(),
                    source_table: table.into(),
                    destination_table: table.into(),
                    ..Default::default()
                }
            })
            .collect(),
        mode: PipeMode::SnapshotAndCdc.into(),
        ..Default::default()
    }
}

pub async fn admin(pg: &Postgres) -> tokio_postgres::Client {
    pg.client("postgres").await.unwrap()
}
