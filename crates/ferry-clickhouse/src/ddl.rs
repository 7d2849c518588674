//! Destination table DDL (DESIGN.md §5).

use std::fmt;

use ferry_proto::v1::{ColumnSchema, TableSchema};

use crate::types::{MappingOptions, column_type};

/// Version column: commit-ordered, see [`crate::version`]; never a clock.
pub const VERSION_COLUMN: &str = "_ferry_version";
/// 1 for a delete (keyed tables), or for the removal of one copy of a row (keyless tables).
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
            (VERSION_COLUMN.to_owned(), "UInt128".to_owned()),
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
    columns.push(format!("{} UInt128", Ident(VERSION_COLUMN)));
    columns.push(format!("{} UInt8", Ident(IS_DELETED_COLUMN)));
    columns.push(format!(
        "{} DateTime64(9) DEFAULT now64(9)",
        Ident(SYNCED_AT_COLUMN)
    ));

    let key = key_columns(schema);
    // A keyless table (REPLICA IDENTITY FULL, no key) is a multiset: every row event is its
    // own row, identified by its version alone, so identical rows stay distinct and a replay
    // collapses onto what it repeats. `<table>_current` adds the copies up.
    let (engine, order_by) = if key.is_empty() {
        (
            format!("ReplacingMergeTree({})", Ident(VERSION_COLUMN)),
            Ident(VERSION_COLUMN).to_string(),
        )
    } else {
        (
            format!(
                "ReplacingMergeTree({}, {})",
                Ident(VERSION_COLUMN),
                Ident(IS_DELETED_COLUMN)
            ),
            key.iter()
                .map(|c| Ident(&c.name).to_string())
                .collect::<Vec<_>>()
                .join(", "),
        )
    };
    Ok(format!(
        "CREATE TABLE IF NOT EXISTS {}.{} ({}) ENGINE = {engine} ORDER BY ({order_by})",
        Ident(database),
        Ident(table),
        columns.join(", "),
    ))
}

/// The row key columns in key order (primary key or replica identity index); empty for a
/// keyless table.
pub fn key_columns(schema: &TableSchema) -> Vec<&ColumnSchema> {
    let mut key: Vec<_> = schema
        .columns
        .iter()
        .filter(|c| c.key_position > 0)
        .collect();
    key.sort_by_key(|c| c.key_position);
    key
}

/// Whether `schema` has no row key: its destination table is a multiset.
pub fn is_keyless(schema: &TableSchema) -> bool {
    schema.columns.iter().all(|c| c.key_position == 0)
}

/// The name of the view that shows `table` as the source table is.
pub fn view_name(table: &str) -> String {
    format!("{table}{VIEW_SUFFIX}")
}

/// Suffix of the views Ferry keeps beside each destination table.
pub const VIEW_SUFFIX: &str = "_current";

/// `CREATE OR REPLACE VIEW database.<table>_current`: the table as it is in Postgres, with
/// the source's columns (not those dropped at the source) and no metadata. A keyed table
/// shows each key's latest version unless deleted; a keyless table shows every distinct row
/// as many times as it was added minus removed, duplicates included.
pub fn create_view(database: &str, table: &str, schema: &TableSchema) -> String {
    let columns = schema
        .columns
        .iter()
        .filter(|c| !c.dropped)
        .map(|c| Ident(&c.name).to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let source = format!("{}.{}", Ident(database), Ident(table));
    let body = if is_keyless(schema) {
        format!(
            "SELECT {columns} FROM (SELECT {columns}, sum(if({deleted} = 1, -1, 1)) AS _ferry_copies \
             FROM {source} FINAL GROUP BY {columns}) \
             ARRAY JOIN range(toUInt64(greatest(_ferry_copies, 0))) AS _ferry_copy",
            deleted = Ident(IS_DELETED_COLUMN)
        )
    } else {
        format!(
            "SELECT {columns} FROM {source} FINAL WHERE {} = 0",
            Ident(IS_DELETED_COLUMN)
        )
    };
    format!(
        "CREATE OR REPLACE VIEW {}.{} AS {body}",
        Ident(database),
        Ident(&view_name(table))
    )
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
             `id` Int64, `_ferry_version` UInt128, `_ferry_is_deleted` UInt8, `_ferry_synced_at` \
             DateTime64(9) DEFAULT now64(9)) ENGINE = ReplacingMergeTree(`_ferry_version`, \
             `_ferry_is_deleted`) ORDER BY (`id`, `shop`)"
        );
    }

    #[test]
    fn keyless_table_is_a_multiset_of_row_events() {
        let mut s = schema(vec![
            column("a", oid::TEXT, true, 0),
            column("b`x", oid::INT4, false, 0),
            column("gone", oid::INT4, true, 0),
        ]);
        let sql = create_table("db", "t", &s, MappingOptions::default()).unwrap();
        assert!(
            sql.ends_with(
                "ENGINE = ReplacingMergeTree(`_ferry_version`) ORDER BY (`_ferry_version`)"
            ),
            "{sql}"
        );
        s.columns[2].dropped = true;
        let view = create_view("db", "t", &s);
        assert!(
            view.starts_with("CREATE OR REPLACE VIEW `db`.`t_current` AS SELECT `a`, `b\\`x` FROM"),
            "{view}"
        );
        assert!(view.contains("GROUP BY `a`, `b\\`x`"), "{view}");
    }

    #[test]
    fn keyed_view_hides_deleted_rows() {
        let s = schema(vec![column("id", oid::INT8, false, 1)]);
        assert_eq!(
            create_view("db", "t", &s),
            "CREATE OR REPLACE VIEW `db`.`t_current` AS SELECT `id` FROM `db`.`t` FINAL \
             WHERE `_ferry_is_deleted` = 0"
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
