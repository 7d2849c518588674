//! Destination table DDL (DESIGN.md §5).

use std::fmt;

use ferry_proto::v1::TableSchema;

use crate::types::{MappingOptions, column_type};

/// Version column: WAL position of the change (0 for snapshot rows), never a clock.
pub const VERSION_COLUMN: &str = "_ferry_version";
/// 1 for a delete.
pub const IS_DELETED_COLUMN: &str = "_ferry_is_deleted";
/// When Ferry wrote the row.
pub const SYNCED_AT_COLUMN: &str = "_ferry_synced_at";

/// A table Ferry cannot create.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DdlError {
    /// A source column has the name of one of Ferry's metadata columns.
    #[error("source column {column} of {table} clashes with Ferry's metadata column of that name")]
    ReservedColumn {
        /// schema.table.
        table: String,
        /// The column.
        column: String,
    },
    /// No columns at all.
    #[error("table {table} has no columns")]
    NoColumns {
        /// schema.table.
        table: String,
    },
}

/// A ClickHouse identifier, back-quoted.
#[derive(Debug, Clone, Copy)]
pub struct Ident<'a>(pub &'a str);

impl fmt::Display for Ident<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("`")?;
        for c in self.0.chars() {
            match c {
                '`' => f.write_str("\\`")?,
                '\\' => f.write_str("\\\\")?,
                c => write!(f, "{c}")?,
            }
        }
        f.write_str("`")
    }
}

/// `CREATE DATABASE IF NOT EXISTS`.
pub fn create_database(database: &str) -> String {
    format!("CREATE DATABASE IF NOT EXISTS {}", Ident(database))
}

/// The columns (name, ClickHouse type) of the destination table of `schema`, in order,
/// including Ferry's metadata columns.
pub fn expected_columns(schema: &TableSchema, options: MappingOptions) -> Vec<(String, String)> {
    schema
        .columns
        .iter()
        .map(|c| (c.name.clone(), column_type(c, options)))
        .chain([
            (VERSION_COLUMN.to_owned(), "UInt64".to_owned()),
            (IS_DELETED_COLUMN.to_owned(), "UInt8".to_owned()),
            (SYNCED_AT_COLUMN.to_owned(), "DateTime64(9)".to_owned()),
        ])
        .collect()
}

/// `CREATE TABLE IF NOT EXISTS database.table` for the source table `schema`: its columns with
/// mapped types plus Ferry's metadata columns, ordered by the source's row key.
pub fn create_table(
    database: &str,
    table: &str,
    schema: &TableSchema,
    options: MappingOptions,
) -> Result<String, DdlError> {
    let source = format!("{}.{}", schema.source_schema, schema.source_table);
    if schema.columns.is_empty() {
        return Err(DdlError::NoColumns { table: source });
    }
    let mut columns = Vec::with_capacity(schema.columns.len() + 3);
    for column in &schema.columns {
        if [VERSION_COLUMN, IS_DELETED_COLUMN, SYNCED_AT_COLUMN].contains(&column.name.as_str()) {
            return Err(DdlError::ReservedColumn {
                table: source,
                column: column.name.clone(),
            });
        }
        columns.push(format!(
            "{} {}",
            Ident(&column.name),
            column_type(column, options)
        ));
    }
    columns.push(format!("{} UInt64", Ident(VERSION_COLUMN)));
    columns.push(format!("{} UInt8", Ident(IS_DELETED_COLUMN)));
    columns.push(format!(
        "{} DateTime64(9) DEFAULT now64(9)",
        Ident(SYNCED_AT_COLUMN)
    ));

    let mut key: Vec<_> = schema
        .columns
        .iter()
        .filter(|c| c.key_position > 0)
        .collect();
    key.sort_by_key(|c| c.key_position);
    // REPLICA IDENTITY FULL without a key: every column identifies the row.
    let (key, nullable_key) = if key.is_empty() {
        let all: Vec<_> = schema.columns.iter().collect();
        let nullable = all.iter().any(|c| c.nullable);
        (all, nullable)
    } else {
        (key, false)
    };
    let order_by = key
        .iter()
        .map(|c| Ident(&c.name).to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let settings = if nullable_key {
        " SETTINGS allow_nullable_key = 1"
    } else {
        ""
    };
    Ok(format!(
        "CREATE TABLE IF NOT EXISTS {}.{} ({}) ENGINE = ReplacingMergeTree({}, {}) ORDER BY ({}){}",
        Ident(database),
        Ident(table),
        columns.join(", "),
        Ident(VERSION_COLUMN),
        Ident(IS_DELETED_COLUMN),
        order_by,
        settings
    ))
}

#[cfg(test)]
mod tests {
    use ferry_proto::v1::ColumnSchema;

    use super::*;
    use crate::types::oid;

    fn column(name: &str, type_oid: u32, nullable: bool, key_position: u32) -> ColumnSchema {
        ColumnSchema {
            name: name.into(),
            type_oid,
            type_modifier: -1,
            nullable,
            type_kind: "b".into(),
            key_position,
            ..Default::default()
        }
    }

    fn schema(columns: Vec<ColumnSchema>) -> TableSchema {
        TableSchema {
            source_schema: "public".into(),
            source_table: "orders".into(),
            columns,
            ..Default::default()
        }
    }

    #[test]
    fn keyed_table() {
        let s = schema(vec![
            column("note", oid::TEXT, true, 0),
            column("shop", oid::INT4, false, 2),
            column("id", oid::INT8, false, 1),
        ]);
        let sql = create_table("db", "orders", &s, MappingOptions::default()).unwrap();
        assert_eq!(
            sql,
            "CREATE TABLE IF NOT EXISTS `db`.`orders` (`note` Nullable(String), `shop` Int32, \
             `id` Int64, `_ferry_version` UInt64, `_ferry_is_deleted` UInt8, `_ferry_synced_at` \
             DateTime64(9) DEFAULT now64(9)) ENGINE = ReplacingMergeTree(`_ferry_version`, \
             `_ferry_is_deleted`) ORDER BY (`id`, `shop`)"
        );
    }

    #[test]
    fn keyless_table_orders_by_every_column() {
        let s = schema(vec![
            column("a", oid::TEXT, true, 0),
            column("b`x", oid::INT4, false, 0),
        ]);
        let sql = create_table("db", "t", &s, MappingOptions::default()).unwrap();
        assert!(
            sql.ends_with("ORDER BY (`a`, `b\\`x`) SETTINGS allow_nullable_key = 1"),
            "{sql}"
        );
    }

    #[test]
    fn reserved_names_are_refused() {
        let s = schema(vec![column("_ferry_version", oid::INT8, false, 1)]);
        let err = create_table("db", "t", &s, MappingOptions::default()).unwrap_err();
        assert!(matches!(err, DdlError::ReservedColumn { .. }));
        assert!(create_table("db", "t", &schema(vec![]), MappingOptions::default()).is_err());
    }
}
