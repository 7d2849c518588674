//! What the fuzz targets share: a column of every kind the type mapping produces.

use ferry_clickhouse::types::oid;
use ferry_proto::v1::ColumnSchema;

/// Columns of every mapped kind, NOT NULL and Nullable, scalars and arrays; a fuzz input's
/// first byte picks one.
pub fn columns() -> Vec<ColumnSchema> {
    let numeric = |p: i32, s: i32| ((p << 16) | s) + 4;
    // (type oid, element oid, typtype, typmod, user-chosen ClickHouse type)
    let kinds: [(u32, u32, &str, i32, &str); 24] = [
        (oid::INT2, 0, "b", -1, ""),
        (oid::INT4, 0, "b", -1, ""),
        (oid::INT8, 0, "b", -1, ""),
        (oid::OID, 0, "b", -1, ""),
        (oid::FLOAT4, 0, "b", -1, ""),
        (oid::FLOAT8, 0, "b", -1, ""),
        (oid::BOOL, 0, "b", -1, ""),
        (oid::UUID, 0, "b", -1, ""),
        (oid::DATE, 0, "b", -1, ""),
        (oid::TIMESTAMP, 0, "b", -1, ""),
        (oid::TIMESTAMPTZ, 0, "b", -1, ""),
        (oid::BYTEA, 0, "b", -1, ""),
        (oid::TEXT, 0, "b", -1, ""),
        (oid::JSONB, 0, "b", -1, "JSON"),
        (90_000, 0, "e", -1, ""),
        (oid::NUMERIC, 0, "b", -1, ""),
        (oid::NUMERIC, 0, "b", numeric(5, 2), ""),
        (oid::NUMERIC, 0, "b", numeric(76, 38), ""),
        (1007, oid::INT4, "b", -1, ""),
        (1009, oid::TEXT, "b", -1, ""),
        (1231, oid::NUMERIC, "b", numeric(10, 2), ""),
        (1185, oid::TIMESTAMPTZ, "b", -1, ""),
        (2951, oid::UUID, "b", -1, ""),
        (1001, oid::BYTEA, "b", -1, ""),
    ];
    kinds
        .iter()
        .flat_map(|&(type_oid, element_type_oid, kind, typmod, chosen)| {
            [false, true].map(|nullable| ColumnSchema {
                name: format!("c{type_oid}"),
                type_oid,
                element_type_oid,
                type_kind: kind.into(),
                type_modifier: typmod,
                clickhouse_type: chosen.into(),
                nullable,
                ..Default::default()
            })
        })
        .collect()
}
