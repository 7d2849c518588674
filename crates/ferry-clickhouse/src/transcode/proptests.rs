//! Property tests of the transcoder: for every mapped type, nullable or not, under every
//! out-of-range policy, arbitrary Postgres binary or text values never make it panic; and
//! whatever row it accepts is RowBinary that [`RowSplitter`] splits exactly and
//! [`render`] shows, as verification reads it back.
//!
//! 1024 cases a test; `PROPTEST_CASES` sets another number (see the README's "Fuzzing").

use proptest::collection::vec;
use proptest::prelude::*;

use super::*;
use crate::rowbinary::{RowSplitter, Shape, render};
use crate::types::{Limits, OutOfRange, oid};

/// (type oid, element oid for arrays, `typtype`, typmod, user-chosen ClickHouse type).
type ColumnType = (u32, u32, &'static str, i32, &'static str);

fn numeric(p: i32, s: i32) -> i32 {
    ((p << 16) | s) + 4
}

/// A column of every kind the mapping produces, arrays included.
fn column() -> impl Strategy<Value = ColumnSchema> {
    let scalars: Vec<ColumnType> = vec![
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
        (oid::NUMERIC, 0, "b", numeric(18, 0), ""),
        (oid::NUMERIC, 0, "b", numeric(38, 10), ""),
        (oid::NUMERIC, 0, "b", numeric(76, 38), ""),
        (oid::NUMERIC, 0, "b", -1, "Decimal(9, 9)"),
        (oid::NUMERIC, 0, "b", -1, "String"),
        (1083, 0, "b", -1, ""), // time: Text
        (1007, oid::INT4, "b", -1, ""),
        (1016, oid::INT8, "b", -1, ""),
        (1009, oid::TEXT, "b", -1, ""),
        (1231, oid::NUMERIC, "b", numeric(10, 2), ""),
        (1022, oid::FLOAT8, "b", -1, ""),
        (2951, oid::UUID, "b", -1, ""),
        (1182, oid::DATE, "b", -1, ""),
        (1185, oid::TIMESTAMPTZ, "b", -1, ""),
        (1001, oid::BYTEA, "b", -1, ""),
        (90_001, 90_000, "e", -1, ""),
    ];
    (prop::sample::select(scalars), any::<bool>()).prop_map(
        |((type_oid, element_type_oid, kind, typmod, chosen), nullable)| ColumnSchema {
            name: format!("c{type_oid}"),
            type_oid,
            element_type_oid,
            type_kind: kind.into(),
            type_modifier: typmod,
            clickhouse_type: chosen.into(),
            nullable,
            ..Default::default()
        },
    )
}

fn options() -> impl Strategy<Value = MappingOptions> {
    let wide = Limits {
        date_min_days: -719_528,
        date_max_days: 2_932_896,
        timestamp_min_micros: -62_167_219_200_000_000,
        timestamp_max_micros: 253_402_300_799_999_999,
    };
    (
        any::<bool>(),
        prop::sample::select(vec![OutOfRange::Fail, OutOfRange::Clamp, OutOfRange::Null]),
        prop::sample::select(vec![Limits::CLASSIC, wide]),
    )
        .prop_map(
            |(unconstrained_numeric_as_string, out_of_range, limits)| MappingOptions {
                unconstrained_numeric_as_string,
                out_of_range,
                limits,
            },
        )
}

/// A length-prefixed field of an array: NULL, or bytes of a width some element kind takes,
/// or of any length; sometimes with a forged length.
fn array_field() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just((-1i32).to_be_bytes().to_vec()),
        prop::sample::select(vec![0usize, 1, 2, 4, 8, 16, 3, 12]).prop_flat_map(|n| {
            vec(any::<u8>(), n).prop_map(|bytes| {
                let mut out = i32::try_from(bytes.len()).unwrap().to_be_bytes().to_vec();
                out.extend_from_slice(&bytes);
                out
            })
        }),
        any::<i32>().prop_map(|len| len.to_be_bytes().to_vec()),
    ]
}

/// Binary values that get past the first checks: any bytes, fixed widths, numerics with
/// random header fields and digits, arrays with random headers and fields.
fn binary_value() -> impl Strategy<Value = Vec<u8>> {
    let words = |n| vec(any::<u16>(), n);
    prop_oneof![
        vec(any::<u8>(), 0..40),
        prop::sample::select(vec![1usize, 2, 4, 8, 16]).prop_flat_map(|n| vec(any::<u8>(), n)),
        // numeric: ndigits, weight, sign, dscale, digits (a few beyond 9999).
        (
            0u16..12,
            any::<i16>(),
            prop::sample::select(vec![0u16, 0x4000, 0xC000, 0xD000, 0xF000, 0x1234]),
            any::<u16>(),
            words(0..12),
        )
            .prop_map(|(ndigits, weight, sign, dscale, digits)| {
                let mut out = Vec::new();
                let ndigits = if ndigits < 10 {
                    u16::try_from(digits.len()).unwrap()
                } else {
                    ndigits
                };
                for word in [ndigits, weight as u16, sign, dscale] {
                    out.extend_from_slice(&word.to_be_bytes());
                }
                for d in digits {
                    // Mostly valid base-10000 digits.
                    let d = if d % 8 == 0 { d } else { d % 10_000 };
                    out.extend_from_slice(&d.to_be_bytes());
                }
                out
            }),
        // array: ndim, has_null, element oid, then (len, lower bound) and the fields.
        (
            prop::sample::select(vec![0i32, 1, 1, 1, 2, -1]),
            any::<i32>(),
            vec(array_field(), 0..6),
            prop::option::of(any::<i32>()),
        )
            .prop_map(|(ndim, oid, fields, forged_len)| {
                let mut out = Vec::new();
                let len = forged_len
                    .filter(|l| l % 4 == 0)
                    .unwrap_or_else(|| i32::try_from(fields.len()).unwrap());
                for word in [ndim, 0, oid, len, 1] {
                    out.extend_from_slice(&word.to_be_bytes());
                }
                for f in fields {
                    out.extend_from_slice(&f);
                }
                out
            }),
    ]
}

/// Checks that `out` (one row) splits into exactly its columns and the version and delete
/// flag, and that every column renders.
fn check_row(columns: &[ColumnSchema], options: MappingOptions, out: &[u8]) {
    let mut splitter = RowSplitter::for_columns(columns, options)
        .followed_by(Shape::Fixed(16))
        .followed_by(Shape::Fixed(1));
    assert_eq!(splitter.split(out), Ok(Some(out.len())), "{out:?}");
    for (i, column) in columns.iter().enumerate() {
        let bytes = &out[splitter.column(i)];
        let shown = render(&value_kind(column, options), column.nullable, bytes);
        // What the transcoder wrote always decodes as its kind: never the hex fallback,
        // unless the value is a string that happens to start with it.
        assert!(
            !shown.starts_with("\\x")
                || matches!(
                    value_kind(column, options),
                    ValueKind::Bytes | ValueKind::Text | ValueKind::Json | ValueKind::Enum
                ),
            "{column:?} {bytes:?} rendered as {shown}"
        );
    }
}

proptest! {
    #![proptest_config(crate::proptest_config(1024))]

    #[test]
    fn arbitrary_binary_values_never_panic(
        columns in vec(column(), 1..5),
        values in vec(prop::option::weighted(0.9, binary_value()), 0..6),
        options in options(),
        deleted in any::<bool>(),
    ) {
        let mut transcoder = RowTranscoder::new(&columns, options);
        let mut out = Vec::new();
        let values = values.iter().map(|v| v.as_deref());
        if transcoder.write_row(values, 7, deleted, &mut out).is_ok() {
            check_row(&columns, options, &out);
        }
    }

    #[test]
    fn arbitrary_text_values_never_panic(
        columns in vec(column(), 1..5),
        values in vec(prop::option::weighted(0.9, crate::text::proptests::text()), 0..6),
        options in options(),
        delete in any::<bool>(),
    ) {
        let mut transcoder = RowTranscoder::new(&columns, options);
        let mut out = Vec::new();
        let values = values.iter().map(|v| v.as_deref().map(str::as_bytes));
        let written = if delete {
            transcoder.write_text_delete(values, 7, &mut out)
        } else {
            transcoder.write_text_row(values, 7, false, &mut out)
        };
        if written.is_ok() {
            check_row(&columns, options, &out);
        }
    }
}
