//! Values at the edge of what ClickHouse holds: the out-of-range policy for numerics, the
//! per-column counts of values written altered, and the errors (with remedies) for values
//! that can be neither written nor altered.

use std::collections::BTreeMap;

use ferry_proto::v1::AlteredColumn;

use crate::decimal::{self, I256, Numeric};
use crate::types::{Limits, OutOfRange};

/// A value that does not decode as its column's type, or that its column cannot hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("column {column}: {problem}")]
pub struct TranscodeError {
    /// The source table (schema.table), when the transcoder was given it.
    pub table: String,
    /// The column.
    pub column: String,
    /// What is wrong.
    pub problem: String,
    /// The value is well formed but the column's ClickHouse type cannot hold it and the
    /// pipe's out-of-range policy does not let it through.
    pub out_of_range: bool,
}

impl TranscodeError {
    /// What the user can do: for a value out of range, the settings that let it through
    /// (they are fixed when a pipe is created, so the pipe is recreated).
    pub fn remedy(&self) -> String {
        if !self.out_of_range {
            return "the source sent a value Ferry cannot decode; report it with the error".into();
        }
        let table = if self.table.is_empty() {
            "<schema.table>"
        } else {
            &self.table
        };
        let column = &self.column;
        format!(
            "store the column as text: `ferry create … --column-type {table}.{column}=String` \
             (spec.tables[i].column_types[\"{column}\"] = \"String\" for {table}; or a wider \
             \"Decimal(P, S)\"; for every unconstrained numeric: `--unconstrained-numeric string`, \
             settings.unconstrained_numeric), or let such values through altered and counted: \
             `--out-of-range clamp|null` (settings.out_of_range). These are fixed when a pipe is \
             created: recreate the pipe (`ferry delete`, then `ferry create` with the new \
             flags)"
        )
    }
}

/// Why a value could not be written.
#[derive(Debug)]
pub(crate) enum ValueError {
    /// The bytes are not a value of the column's type.
    Malformed(String),
    /// The value is fine but the column cannot hold it.
    OutOfRange(String),
}

impl From<String> for ValueError {
    fn from(problem: String) -> Self {
        Self::Malformed(problem)
    }
}

/// What happened to values ClickHouse cannot represent exactly (one column's, or a sum).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Adjustments {
    /// Values clamped into the column's range: dates and timestamps (including ±infinity),
    /// numerics under [`OutOfRange::Clamp`].
    pub clamped: u64,
    /// Values written as NULL: NaN and ±Infinity numerics, numerics under
    /// [`OutOfRange::Null`].
    pub nulled: u64,
    /// NULL arrays written as empty arrays.
    pub emptied: u64,
}

impl Adjustments {
    pub(crate) fn add(&mut self, other: Self) {
        self.clamped += other.clamped;
        self.nulled += other.nulled;
        self.emptied += other.emptied;
    }
}

/// How the transcoder treats values at the edge of the destination's types.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rules {
    pub(crate) limits: Limits,
    pub(crate) out_of_range: OutOfRange,
}

/// Per-column alteration counts keyed by (column, kind), as the status shows them.
fn merge_altered(into: &mut BTreeMap<(String, i32), u64>, altered: &[AlteredColumn]) {
    for a in altered {
        *into.entry((a.column.clone(), a.kind)).or_default() += a.count;
    }
}

/// Sums lists of per-column alteration counts (several partitions, snapshot and CDC).
pub fn sum_altered<'a>(lists: impl IntoIterator<Item = &'a [AlteredColumn]>) -> Vec<AlteredColumn> {
    let mut sum = BTreeMap::new();
    for list in lists {
        merge_altered(&mut sum, list);
    }
    sum.into_iter()
        .filter(|(_, count)| *count > 0)
        .map(|((column, kind), count)| AlteredColumn {
            column,
            kind,
            count,
        })
        .collect()
}

/// A numeric into Decimal(precision, scale). NaN becomes NULL (there is nothing to clamp it
/// to); ±Infinity and values with too many integer digits follow the out-of-range policy,
/// except that ±Infinity in a Nullable column is NULL unless the policy clamps. A value that
/// can be neither written nor altered is an error: never a stand-in such as 0.
pub(crate) fn write_numeric(
    precision: u32,
    scale: u32,
    bytes: &[u8],
    nullable: bool,
    rules: &Rules,
    out: &mut Vec<u8>,
    adjustments: &mut Adjustments,
) -> Result<(), ValueError> {
    let (negative, what) = match decimal::from_pg_numeric(bytes, scale)? {
        Numeric::Value(value) if value.has_at_most_digits(precision) => {
            if nullable {
                out.push(0);
            }
            return write_decimal(value, precision, out);
        }
        Numeric::Value(value) => (value.is_negative(), "has too many integer digits"),
        Numeric::TooLarge { negative } => (negative, "has too many integer digits"),
        Numeric::Infinity { negative } => (negative, "is infinite"),
        Numeric::NaN if nullable => {
            adjustments.nulled += 1;
            out.push(1);
            return Ok(());
        }
        Numeric::NaN => {
            return Err(ValueError::OutOfRange(format!(
                "NaN has no Decimal({precision}, {scale}) form and the column is not Nullable"
            )));
        }
    };
    let infinite = what == "is infinite";
    let nulled = match rules.out_of_range {
        OutOfRange::Clamp => {
            adjustments.clamped += 1;
            if nullable {
                out.push(0);
            }
            return write_decimal(I256::all_nines(precision, negative), precision, out);
        }
        OutOfRange::Null => true,
        // ±Infinity in a Nullable column has always been NULL; too many digits fail.
        OutOfRange::Fail => infinite,
    };
    if nulled && nullable {
        adjustments.nulled += 1;
        out.push(1);
        return Ok(());
    }
    let policy = if rules.out_of_range == OutOfRange::Null {
        "NULL, but the column is not Nullable"
    } else {
        "FAIL"
    };
    Err(ValueError::OutOfRange(format!(
        "a value {what} for Decimal({precision}, {scale}) (at most {} integer digits), and the \
         out-of-range policy is {policy}",
        precision - scale
    )))
}

/// Bytes of a Decimal of `precision` digits in RowBinary.
pub(crate) fn decimal_width(precision: u32) -> usize {
    match precision {
        0..=9 => 4,
        10..=18 => 8,
        19..=38 => 16,
        _ => 32,
    }
}

pub(crate) fn write_decimal(
    value: I256,
    precision: u32,
    out: &mut Vec<u8>,
) -> Result<(), ValueError> {
    let width = decimal_width(precision);
    if !value.has_at_most_digits(precision) || !value.fits_in_bytes(width) {
        return Err(ValueError::OutOfRange(format!(
            "numeric value has more than {precision} digits and does not fit Decimal({precision})"
        )));
    }
    out.extend_from_slice(&value.to_le_bytes()[..width]);
    Ok(())
}

#[cfg(test)]
mod tests {
    use ferry_proto::v1::{AlterationKind, ColumnSchema};

    use crate::transcode::RowTranscoder;
    use crate::types::{MappingOptions, OutOfRange, oid};

    fn numeric(name: &str, p: i32, s: i32, nullable: bool) -> ColumnSchema {
        ColumnSchema {
            name: name.into(),
            type_oid: oid::NUMERIC,
            type_modifier: if p == 0 { -1 } else { ((p << 16) | s) + 4 },
            nullable,
            type_kind: "b".into(),
            ..Default::default()
        }
    }

    fn options(out_of_range: OutOfRange) -> MappingOptions {
        MappingOptions {
            out_of_range,
            ..Default::default()
        }
    }

    fn text_row(t: &mut RowTranscoder, values: &[&str]) -> Result<Vec<u8>, super::TranscodeError> {
        let mut out = Vec::new();
        t.write_text_row(
            values.iter().map(|v| Some(v.as_bytes())),
            1,
            false,
            &mut out,
        )?;
        Ok(out)
    }

    #[test]
    fn too_many_digits_fail_by_default_naming_table_column_and_remedy() {
        let columns = [numeric("n", 0, 0, true)];
        let mut t = RowTranscoder::new(&columns, options(OutOfRange::Fail)).for_table("public.t");
        let big = "1".repeat(45);
        let err = text_row(&mut t, &[&big]).unwrap_err();
        assert!(err.out_of_range, "{err}");
        assert_eq!((err.table.as_str(), err.column.as_str()), ("public.t", "n"));
        let remedy = err.remedy();
        for needed in [
            "--column-type public.t.n=String",
            "column_types",
            "settings.out_of_range",
            "ferry delete",
        ] {
            assert!(remedy.contains(needed), "{needed} missing from {remedy}");
        }
        // A value that fits still passes.
        text_row(&mut t, &["12.5"]).unwrap();
    }

    #[test]
    fn clamp_saturates_and_null_nulls_and_both_count_per_column() {
        let columns = [numeric("a", 5, 2, false), numeric("b", 5, 2, true)];
        let mut clamp = RowTranscoder::new(&columns, options(OutOfRange::Clamp));
        let out = text_row(&mut clamp, &["-123456", "Infinity"]).unwrap();
        // Decimal(5, 2) is 4 bytes: -999.99 and (after a not-NULL marker) 999.99.
        assert_eq!(&out[..4], &(-99_999i32).to_le_bytes());
        assert_eq!(out[4], 0);
        assert_eq!(&out[5..9], &99_999i32.to_le_bytes());
        let altered = clamp.altered();
        assert_eq!(altered.len(), 2);
        assert!(
            altered
                .iter()
                .all(|a| a.kind() == AlterationKind::Clamped && a.count == 1)
        );

        let mut null = RowTranscoder::new(&columns, options(OutOfRange::Null));
        assert!(
            text_row(&mut null, &["123456", "1"]).is_err(),
            "a is not Nullable"
        );
        let out = text_row(&mut null, &["1", "123456"]).unwrap();
        assert_eq!(out[4], 1, "NULL marker");
        assert_eq!(null.adjustments().nulled, 1);
    }

    #[test]
    fn nan_is_null_where_nullable_and_an_error_elsewhere() {
        let columns = [numeric("a", 10, 2, true), numeric("b", 10, 2, false)];
        let mut t = RowTranscoder::new(&columns, options(OutOfRange::Clamp));
        assert!(text_row(&mut t, &["NaN", "NaN"]).is_err());
        let mut t = RowTranscoder::new(&columns, MappingOptions::default());
        text_row(&mut t, &["NaN", "1"]).unwrap();
        assert_eq!(t.adjustments().nulled, 1);
        // Counts survive a new column layout.
        let rebuilt = t.rebuilt(&columns, MappingOptions::default());
        assert_eq!(rebuilt.altered(), t.altered());
    }

    #[test]
    fn dates_clamp_only_beyond_the_limits_given() {
        let date = ColumnSchema {
            name: "d".into(),
            type_oid: oid::DATE,
            type_kind: "b".into(),
            ..Default::default()
        };
        let wide = MappingOptions {
            limits: crate::types::Limits {
                date_min_days: -719_528,
                date_max_days: 2_932_896,
                ..Default::default()
            },
            ..Default::default()
        };
        let mut t = RowTranscoder::new(std::slice::from_ref(&date), wide);
        for (text, days) in [
            ("0001-01-01", -719_162),
            ("1899-12-31", -25_568),
            ("9999-12-31", 2_932_896),
            ("4713-01-01 BC", -719_528),
            ("infinity", 2_932_896),
        ] {
            let out = text_row(&mut t, &[text]).unwrap();
            assert_eq!(&out[..4], &i32::to_le_bytes(days), "{text}");
        }
        assert_eq!(t.adjustments().clamped, 2);
        // The classic range (a pipe without recorded limits) clamps 1899 and year 1.
        let mut classic = RowTranscoder::new(&[date], MappingOptions::default());
        text_row(&mut classic, &["1899-12-31"]).unwrap();
        assert_eq!(classic.adjustments().clamped, 1);
    }
}
