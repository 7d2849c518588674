//! Reading the latest live version of rows back by key, as the text Postgres would print for
//! each value: how the CDC worker recovers unchanged TOAST values that pgoutput leaves out.
//!
//! One query serves many keys (`(k1, k2) IN ((…), …)` under `FINAL`), so a bulk UPDATE costs a
//! handful of keyed lookups per batch, not one per row.

use ferry_proto::v1::ColumnSchema;

use crate::ddl::{IS_DELETED_COLUMN, Ident};
use crate::types::{MappingOptions, ValueKind, value_kind};

/// Most bytes of key literals in one lookup query (ClickHouse's `max_query_size` defaults to
/// 256 KiB).
pub const MAX_KEY_BYTES: usize = 128 << 10;
/// Most keys in one lookup query, bounding the rows (and TOAST values) one answer holds:
/// 5,000 rows of 10 kB values are a 50 MB answer, written in slices before the next lookup.
pub const MAX_KEYS: usize = 5_000;

/// Whether the key column's ClickHouse text (`toString`) equals its Postgres text, so keys can
/// be matched by text: integers, text, enum labels, UUIDs.
pub fn key_comparable(column: &ColumnSchema) -> bool {
    matches!(
        value_kind(column, MappingOptions::default()),
        ValueKind::Int(_) | ValueKind::UInt32 | ValueKind::Text | ValueKind::Enum | ValueKind::Uuid
    )
}

/// A ClickHouse literal for the Postgres text `text` of key column `column`, or `None` if the
/// text is not a valid value of a comparable kind.
pub fn key_literal(column: &ColumnSchema, text: &str) -> Option<String> {
    match value_kind(column, MappingOptions::default()) {
        ValueKind::Int(_) | ValueKind::UInt32 => {
            let digits = text.strip_prefix('-').unwrap_or(text);
            (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
                .then(|| text.to_owned())
        }
        ValueKind::Text | ValueKind::Enum => Some(string_literal(text)),
        ValueKind::Uuid => text
            .bytes()
            .all(|b| b.is_ascii_hexdigit() || b == b'-')
            .then(|| format!("toUUID({})", string_literal(text))),
        _ => None,
    }
}

/// A ClickHouse string literal.
pub fn string_literal(text: &str) -> String {
    format!("'{}'", text.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// A ClickHouse expression giving `column`'s value as Postgres prints it (what the text
/// transcoder reads): bytea as hex after a backslash-x, arrays as `{…}` literals with every
/// element quoted, the rest as its string; NULL stays NULL.
pub fn postgres_text_of(column: &ColumnSchema) -> String {
    let name = Ident(&column.name).to_string();
    let expression = match value_kind(column, MappingOptions::default()) {
        ValueKind::Bytes => format!(r"concat('\\x', lower(hex({name})))"),
        ValueKind::Array(_) => format!(
            r#"concat('{{', arrayStringConcat(arrayMap(x -> if(isNull(x), 'NULL', concat('"', replaceAll(replaceAll(toString(x), '\\', '\\\\'), '"', '\\"'), '"')), {name}), ','), '}}')"#
        ),
        _ => format!("toString({name})"),
    };
    format!("toNullable({expression})")
}

/// `SELECT [key texts…, values…] FROM database.table FINAL WHERE (key) IN (literals) AND not
/// deleted`: the latest live version of each row whose key is among `literals` (each a tuple
/// of [`key_literal`]s in key order).
pub fn latest_rows_query(
    database: &str,
    table: &str,
    key: &[&ColumnSchema],
    values: &[&ColumnSchema],
    literals: &[Vec<String>],
) -> String {
    let key_names: Vec<String> = key.iter().map(|c| Ident(&c.name).to_string()).collect();
    let key_texts: Vec<String> = key_names
        .iter()
        .map(|name| format!("toNullable(toString({name}))"))
        .collect();
    let expressions: Vec<String> = values.iter().map(|c| postgres_text_of(c)).collect();
    let tuples: Vec<String> = literals
        .iter()
        .map(|tuple| format!("({})", tuple.join(", ")))
        .collect();
    format!(
        "SELECT [{}] FROM {}.{} FINAL WHERE ({}) IN ({}) AND {} = 0",
        key_texts
            .iter()
            .chain(&expressions)
            .cloned()
            .collect::<Vec<_>>()
            .join(", "),
        Ident(database),
        Ident(table),
        key_names.join(", "),
        tuples.join(", "),
        Ident(IS_DELETED_COLUMN)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::oid;

    fn column(name: &str, type_oid: u32, key_position: u32) -> ColumnSchema {
        ColumnSchema {
            name: name.into(),
            type_oid,
            type_modifier: -1,
            type_kind: "b".into(),
            key_position,
            ..Default::default()
        }
    }

    #[test]
    fn key_literals_are_checked_and_quoted() {
        let id = column("id", oid::INT8, 1);
        assert_eq!(key_literal(&id, "-42").as_deref(), Some("-42"));
        assert_eq!(key_literal(&id, "1; DROP TABLE t"), None);
        assert_eq!(key_literal(&id, ""), None);
        let name = column("name", oid::TEXT, 2);
        assert_eq!(
            key_literal(&name, r"it's \x").as_deref(),
            Some(r"'it\'s \\x'")
        );
        let u = column("u", oid::UUID, 1);
        assert_eq!(key_literal(&u, "') OR 1=1"), None);
        assert!(!key_comparable(&column("ts", oid::TIMESTAMP, 1)));
    }

    #[test]
    fn one_query_for_many_keys() {
        let (id, shop, doc) = (
            column("id", oid::INT8, 1),
            column("shop", oid::TEXT, 2),
            column("doc", oid::JSONB, 0),
        );
        let sql = latest_rows_query(
            "db",
            "t",
            &[&id, &shop],
            &[&doc],
            &[
                vec!["1".into(), "'a'".into()],
                vec!["2".into(), "'b'".into()],
            ],
        );
        assert_eq!(
            sql,
            "SELECT [toNullable(toString(`id`)), toNullable(toString(`shop`)), \
             toNullable(toString(`doc`))] FROM `db`.`t` \
             FINAL WHERE (`id`, `shop`) IN ((1, 'a'), (2, 'b')) AND `_ferry_is_deleted` = 0"
        );
    }
}
