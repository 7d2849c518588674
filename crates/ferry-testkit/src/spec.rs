//! The pipe spec tests and benchmarks create: the kit's Postgres into the kit's ClickHouse.

use ferry_proto::v1::{
    ClickHouseDestination, PipeMode, PipeSettings, PipeSpec, PostgresSource, TableMapping,
};

use crate::clickhouse::ClickHouse;
use crate::postgres::Postgres;

/// Pipe `name` of `tables` (`schema.table`, or `table` for the default schema) of database
/// `postgres` on `pg` into ClickHouse database `database` on `ch`, as user `postgres` without
/// a password, streaming with a one-second sync interval.
pub fn pipe(
    pg: &Postgres,
    ch: &ClickHouse,
    name: &str,
    database: &str,
    tables: &[&str],
    mode: PipeMode,
) -> PipeSpec {
    PipeSpec {
        name: name.into(),
        source: Some(PostgresSource {
            host: "127.0.0.1".into(),
            port: u32::from(pg.port()),
            database: "postgres".into(),
            user: "postgres".into(),
            ..Default::default()
        }),
        destination: Some(ClickHouseDestination {
            url: ch.url(),
            database: database.into(),
            ..Default::default()
        }),
        tables: tables
            .iter()
            .map(|t| {
                let (schema, table) = t.split_once('.').unwrap_or(("", t));
                TableMapping {
                    source_schema: schema.into(),
                    source_table: table.into(),
                    ..Default::default()
                }
            })
            .collect(),
        mode: mode.into(),
        settings: Some(PipeSettings {
            sync_interval: Some(prost_types::Duration {
                seconds: 1,
                nanos: 0,
            }),
            ..Default::default()
        }),
    }
}
