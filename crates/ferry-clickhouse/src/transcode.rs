//! Postgres binary values → ClickHouse `RowBinary`, one column transcoder per column, built
//! once per table from the recorded schema.
//!
//! Values arrive in Postgres's binary send format (from `COPY … (FORMAT binary)` or pgoutput's
//! binary mode) and are written straight into a caller-owned buffer: no per-value allocation,
//! no text round trip. Values ClickHouse cannot hold (±infinity and dates or timestamps beyond
//! the server's range, NaN numerics, numerics under the pipe's out-of-range policy) are
//! clamped or nulled and counted per column, never dropped silently; a numeric the policy
//! does not let through is an error naming the remedy. Malformed input is an error, never a
//! panic.

use ferry_proto::v1::{AlterationKind, AlteredColumn, ColumnSchema};

pub use crate::altered::{Adjustments, TranscodeError, sum_altered};
use crate::altered::{Rules, ValueError, decimal_width, write_numeric};
use crate::types::{MappingOptions, ValueKind, value_kind};

/// Microseconds between 1970-01-01 and 2000-01-01 (Postgres's epoch).
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;
/// Days between 1970-01-01 and 2000-01-01.
const PG_EPOCH_DAYS: i32 = 10_957;
/// Whether `column` must be read from Postgres cast to `text` (`text[]` for arrays): its
/// ClickHouse column holds Postgres's text form, and its binary form is something else
/// (jsonb's version byte, inet's address family, interval's fields, ...). Types whose binary
/// form is already their text are read as they are, which keeps `char(n)` padding.
pub fn wants_text(column: &ColumnSchema, options: MappingOptions) -> bool {
    let kind = value_kind(column, options);
    let oid = if column.element_type_oid != 0 {
        column.element_type_oid
    } else {
        column.type_oid
    };
    let text_kind = match &kind {
        ValueKind::Array(element) => matches!(**element, ValueKind::Text | ValueKind::Json),
        other => matches!(other, ValueKind::Text | ValueKind::Json),
    };
    text_kind
        && !matches!(
            oid,
            crate::types::oid::TEXT
                | crate::types::oid::VARCHAR
                | crate::types::oid::BPCHAR
                | crate::types::oid::NAME
                | crate::types::oid::JSON
        )
}

/// The select list to read `columns` with, so values arrive as the transcoder expects them:
/// quoted names, as text where [`wants_text`] says so. The text is the type's output function
/// (`format('%s', …)`), which pgoutput's text mode also prints: a cast to text can differ
/// (`inet` adds `/32` to a host address, `boolean` spells `true`), and the snapshot and the
/// stream must write the same value.
pub fn select_list(columns: &[ColumnSchema], options: MappingOptions) -> Vec<String> {
    columns
        .iter()
        .map(|c| {
            let name = format!("\"{}\"", c.name.replace('"', "\"\""));
            // An array the user stores as String is read as one text, not as text[].
            let array = matches!(value_kind(c, options), ValueKind::Array(_));
            match (wants_text(c, options), array) {
                // Element by element, in order, NULLs kept; a multi-dimensional array is read
                // as it is, for the transcoder to refuse.
                (true, true) => format!(
                    "CASE WHEN {name} IS NULL THEN NULL \
                     WHEN array_ndims({name}) > 1 THEN {name}::text[] ELSE ARRAY(\
                     SELECT CASE WHEN e IS NULL THEN NULL ELSE format('%s', e) END \
                     FROM unnest({name}) WITH ORDINALITY AS u(e, i) ORDER BY i) END"
                ),
                // format('%s', NULL) is '', not NULL.
                (true, false) => {
                    format!("CASE WHEN {name} IS NULL THEN NULL ELSE format('%s', {name}) END")
                }
                _ => name,
            }
        })
        .collect()
}

/// Writes one column's values.
#[derive(Debug, Clone)]
struct ColumnPlan {
    name: String,
    kind: ValueKind,
    nullable: bool,
}

/// How the values of a row arrive.
#[derive(Debug, Clone, Copy)]
enum Format {
    /// Binary send format (COPY binary).
    Binary,
    /// Text output format; `fill_defaults` writes zero values for absent NOT NULL columns.
    Text { fill_defaults: bool },
}

/// Transcodes the rows of one table.
#[derive(Debug, Clone)]
pub struct RowTranscoder {
    columns: Vec<ColumnPlan>,
    /// Per column, in order.
    adjustments: Vec<Adjustments>,
    /// Counts carried over from before this transcoder (an earlier stream, an earlier column
    /// layout), added to its own when reported.
    carried: Vec<AlteredColumn>,
    rules: Rules,
    /// schema.table, for errors.
    table: String,
    /// Reused for text values converted to binary (no allocation per value).
    scratch: Vec<u8>,
}

impl RowTranscoder {
    /// A transcoder for `columns`, in order.
    pub fn new(columns: &[ColumnSchema], options: MappingOptions) -> Self {
        Self {
            columns: columns
                .iter()
                .map(|c| ColumnPlan {
                    name: c.name.clone(),
                    kind: value_kind(c, options),
                    nullable: c.nullable,
                })
                .collect(),
            adjustments: vec![Adjustments::default(); columns.len()],
            carried: Vec::new(),
            rules: Rules {
                limits: options.limits,
                out_of_range: options.out_of_range,
            },
            table: String::new(),
            scratch: Vec::new(),
        }
    }

    /// The same transcoder, naming `table` (schema.table) in its errors.
    pub fn for_table(mut self, table: &str) -> Self {
        table.clone_into(&mut self.table);
        self
    }

    /// A transcoder for a new column layout of the same table, keeping the counts so far.
    pub fn rebuilt(&self, columns: &[ColumnSchema], options: MappingOptions) -> Self {
        let mut next = Self::new(columns, options).for_table(&self.table);
        next.carried = self.altered();
        next
    }

    /// Adds counts reported earlier (by a previous stream of the pipe) to this one's.
    pub fn carry(&mut self, altered: &[AlteredColumn]) {
        self.carried = sum_altered([self.carried.as_slice(), altered]);
    }

    /// Values altered so far, by column and kind (with the carried counts); zeros left out.
    pub fn altered(&self) -> Vec<AlteredColumn> {
        let mut own = Vec::new();
        for (column, a) in self.columns.iter().zip(&self.adjustments) {
            for (kind, count) in [
                (AlterationKind::Clamped, a.clamped),
                (AlterationKind::Nulled, a.nulled),
                (AlterationKind::Emptied, a.emptied),
            ] {
                if count > 0 {
                    own.push(AlteredColumn {
                        column: column.name.clone(),
                        kind: kind.into(),
                        count,
                    });
                }
            }
        }
        sum_altered([self.carried.as_slice(), own.as_slice()])
    }

    /// Number of source columns.
    pub fn width(&self) -> usize {
        self.columns.len()
    }

    /// What was clamped, nulled or emptied so far, over all columns (not the carried counts).
    pub fn adjustments(&self) -> Adjustments {
        let mut sum = Adjustments::default();
        for a in &self.adjustments {
            sum.add(*a);
        }
        sum
    }

    /// As [`RowTranscoder::write_row`] for values in Postgres's text format (logical
    /// replication in text mode), with `DateStyle=ISO`, `TimeZone=UTC`, `bytea_output=hex`.
    /// Each value lands exactly as its binary form would.
    pub fn write_text_row<'v>(
        &mut self,
        values: impl IntoIterator<Item = Option<&'v [u8]>>,
        version: u128,
        is_deleted: bool,
        out: &mut Vec<u8>,
    ) -> Result<(), TranscodeError> {
        self.write_text(values, version, is_deleted, false, out)
    }

    /// A delete marker (`_ferry_is_deleted = 1`) from the old key (text values; columns not in
    /// the key are None). Columns that cannot be NULL get their type's zero value: only the
    /// key and the version matter in a delete row.
    pub fn write_text_delete<'v>(
        &mut self,
        key: impl IntoIterator<Item = Option<&'v [u8]>>,
        version: u128,
        out: &mut Vec<u8>,
    ) -> Result<(), TranscodeError> {
        self.write_text(key, version, true, true, out)
    }

    fn write_text<'v>(
        &mut self,
        values: impl IntoIterator<Item = Option<&'v [u8]>>,
        version: u128,
        is_deleted: bool,
        fill_defaults: bool,
        out: &mut Vec<u8>,
    ) -> Result<(), TranscodeError> {
        self.write(
            values,
            Format::Text { fill_defaults },
            version,
            is_deleted,
            out,
        )
    }

    /// Appends one row: the source values (None = NULL) followed by `_ferry_version` and
    /// `_ferry_is_deleted`. On error the buffer may hold part of the row; callers discard it.
    pub fn write_row<'v>(
        &mut self,
        values: impl IntoIterator<Item = Option<&'v [u8]>>,
        version: u128,
        is_deleted: bool,
        out: &mut Vec<u8>,
    ) -> Result<(), TranscodeError> {
        self.write(values, Format::Binary, version, is_deleted, out)
    }

    /// The one row loop: each value (binary, or text converted to binary), then the version
    /// and the delete flag.
    fn write<'v>(
        &mut self,
        values: impl IntoIterator<Item = Option<&'v [u8]>>,
        format: Format,
        version: u128,
        is_deleted: bool,
        out: &mut Vec<u8>,
    ) -> Result<(), TranscodeError> {
        let mut count = 0;
        let mut values = values.into_iter();
        // A delete marker's values other than its key are fillers, not the user's values.
        let mut discarded = vec![Adjustments::default(); self.columns.len()];
        let adjustments = if is_deleted {
            &mut discarded
        } else {
            &mut self.adjustments
        };
        for (column, adjusted) in self.columns.iter().zip(adjustments.iter_mut()) {
            let failed = |problem| {
                let (problem, out_of_range) = match problem {
                    ValueError::Malformed(p) => (p, false),
                    ValueError::OutOfRange(p) => (p, true),
                };
                TranscodeError {
                    table: self.table.clone(),
                    column: column.name.clone(),
                    problem,
                    out_of_range,
                }
            };
            let value = values
                .next()
                .ok_or_else(|| failed(ValueError::Malformed("missing from the row".into())))?;
            let value = match (format, value) {
                (Format::Binary, value) => value,
                (Format::Text { .. }, Some(text)) => {
                    crate::text::to_binary(&column.kind, text, &mut self.scratch)
                        .map_err(|e| failed(e.into()))?;
                    Some(self.scratch.as_slice())
                }
                (
                    Format::Text {
                        fill_defaults: true,
                    },
                    None,
                ) if !column.nullable => {
                    write_zero(&column.kind, out);
                    count += 1;
                    continue;
                }
                (Format::Text { .. }, None) => None,
            };
            write_column(column, value, &self.rules, out, adjusted).map_err(failed)?;
            count += 1;
        }
        if values.next().is_some() {
            return Err(TranscodeError {
                table: self.table.clone(),
                column: format!("#{}", count + 1),
                problem: format!("row has more than the {count} columns of the table"),
                out_of_range: false,
            });
        }
        out.extend_from_slice(&version.to_le_bytes());
        out.push(u8::from(is_deleted));
        Ok(())
    }
}

fn write_column(
    column: &ColumnPlan,
    value: Option<&[u8]>,
    rules: &Rules,
    out: &mut Vec<u8>,
    adjustments: &mut Adjustments,
) -> Result<(), ValueError> {
    match value {
        // ClickHouse has no Nullable(Array): a NULL array is written as an empty one.
        None if matches!(column.kind, ValueKind::Array(_)) => {
            adjustments.emptied += 1;
            write_varint(0, out);
            Ok(())
        }
        None if column.nullable => {
            out.push(1);
            Ok(())
        }
        None => Err(ValueError::Malformed(
            "NULL in a column declared NOT NULL".into(),
        )),
        Some(bytes) => {
            let nullable = column.nullable && !matches!(column.kind, ValueKind::Array(_));
            write_value(&column.kind, bytes, nullable, rules, out, adjustments)
        }
    }
}

/// Writes a non-null value; `nullable` says whether a `Nullable` marker byte is due first.
fn write_value(
    kind: &ValueKind,
    bytes: &[u8],
    nullable: bool,
    rules: &Rules,
    out: &mut Vec<u8>,
    adjustments: &mut Adjustments,
) -> Result<(), ValueError> {
    if let ValueKind::Decimal { precision, scale } = kind {
        // A numeric may turn out NULL (NaN, ±Infinity), so it writes its own marker.
        return write_numeric(*precision, *scale, bytes, nullable, rules, out, adjustments);
    }
    if nullable {
        out.push(0);
    }
    match kind {
        ValueKind::Int(16) => {
            out.extend_from_slice(&i16::from_be_bytes(fixed(bytes)?).to_le_bytes())
        }
        ValueKind::Int(32) => {
            out.extend_from_slice(&i32::from_be_bytes(fixed(bytes)?).to_le_bytes())
        }
        ValueKind::Int(_) => {
            out.extend_from_slice(&i64::from_be_bytes(fixed(bytes)?).to_le_bytes())
        }
        ValueKind::UInt32 => {
            out.extend_from_slice(&u32::from_be_bytes(fixed(bytes)?).to_le_bytes())
        }
        ValueKind::Float(32) => {
            out.extend_from_slice(&f32::from_be_bytes(fixed(bytes)?).to_le_bytes())
        }
        ValueKind::Float(_) => {
            out.extend_from_slice(&f64::from_be_bytes(fixed(bytes)?).to_le_bytes())
        }
        ValueKind::Bool => out.push(u8::from(fixed::<1>(bytes)?[0] != 0)),
        ValueKind::Uuid => {
            let raw: [u8; 16] = fixed(bytes)?;
            // ClickHouse stores a UUID as two little-endian u64 halves, high half first.
            let (high, low) = raw.split_at(8);
            out.extend(high.iter().rev());
            out.extend(low.iter().rev());
        }
        ValueKind::Date => {
            let days = i32::from_be_bytes(fixed(bytes)?);
            let unix = days.saturating_add(PG_EPOCH_DAYS);
            let clamped = unix.clamp(rules.limits.date_min_days, rules.limits.date_max_days);
            if clamped != unix {
                adjustments.clamped += 1;
            }
            out.extend_from_slice(&clamped.to_le_bytes());
        }
        ValueKind::Timestamp { .. } => {
            let micros = i64::from_be_bytes(fixed(bytes)?);
            let unix = micros.saturating_add(PG_EPOCH_MICROS);
            let clamped = unix.clamp(
                rules.limits.timestamp_min_micros,
                rules.limits.timestamp_max_micros,
            );
            if clamped != unix {
                adjustments.clamped += 1;
            }
            out.extend_from_slice(&clamped.to_le_bytes());
        }
        ValueKind::Enum | ValueKind::Bytes | ValueKind::Text | ValueKind::Json => {
            write_string(bytes, out)
        }
        ValueKind::Array(element) => write_array(element, bytes, rules, out, adjustments)?,
        // Routed to write_numeric before the marker; kept for exhaustiveness.
        ValueKind::Decimal { precision, scale } => {
            write_numeric(*precision, *scale, bytes, false, rules, out, adjustments)?;
        }
    }
    Ok(())
}

/// The zero value of a non-nullable column of `kind`.
fn write_zero(kind: &ValueKind, out: &mut Vec<u8>) {
    let width = match kind {
        ValueKind::Int(bits) | ValueKind::Float(bits) => usize::from(*bits / 8),
        ValueKind::UInt32 | ValueKind::Date => 4,
        ValueKind::Timestamp { .. } => 8,
        ValueKind::Decimal { precision, .. } => decimal_width(*precision),
        ValueKind::Bool => 1,
        ValueKind::Uuid => 16,
        // Empty string or empty array: a zero length.
        ValueKind::Enum
        | ValueKind::Bytes
        | ValueKind::Text
        | ValueKind::Json
        | ValueKind::Array(_) => 1,
    };
    out.extend(std::iter::repeat_n(0, width));
}

/// A one-dimensional Postgres array (`array_send`) as ClickHouse Array of nullable elements.
fn write_array(
    element: &ValueKind,
    bytes: &[u8],
    rules: &Rules,
    out: &mut Vec<u8>,
    adjustments: &mut Adjustments,
) -> Result<(), ValueError> {
    let mut reader = Reader(bytes);
    let dimensions = reader.i32()?;
    let _has_nulls = reader.i32()?;
    let _element_oid = reader.i32()?;
    let count = match dimensions {
        0 => 0,
        1 => {
            let len = reader.i32()?;
            let _lower_bound = reader.i32()?;
            usize::try_from(len).map_err(|_| format!("negative array length {len}"))?
        }
        n => {
            return Err(ValueError::Malformed(format!(
                "{n}-dimensional arrays are not supported; use one dimension"
            )));
        }
    };
    write_varint(count as u64, out);
    for _ in 0..count {
        match reader.field()? {
            None => out.push(1),
            Some(value) => write_value(element, value, true, rules, out, adjustments)?,
        }
    }
    if !reader.0.is_empty() {
        return Err(ValueError::Malformed(
            "trailing bytes after the array".into(),
        ));
    }
    Ok(())
}

fn fixed<const N: usize>(bytes: &[u8]) -> Result<[u8; N], String> {
    bytes
        .try_into()
        .map_err(|_| format!("expected {N} bytes, got {}", bytes.len()))
}

fn write_string(bytes: &[u8], out: &mut Vec<u8>) {
    write_varint(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

/// LEB128, as RowBinary uses for lengths.
pub(crate) fn write_varint(mut value: u64, out: &mut Vec<u8>) {
    while value >= 0x80 {
        out.push((value as u8 & 0x7f) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// A cursor over Postgres binary data.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err(format!(
                "truncated: needed {n} bytes, {} left",
                self.0.len()
            ));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn i32(&mut self) -> Result<i32, String> {
        Ok(i32::from_be_bytes(fixed(self.take(4)?)?))
    }

    /// A length-prefixed field; length -1 is NULL.
    fn field(&mut self) -> Result<Option<&'a [u8]>, String> {
        let len = self.i32()?;
        if len == -1 {
            return Ok(None);
        }
        let len = usize::try_from(len).map_err(|_| format!("bad field length {len}"))?;
        self.take(len).map(Some)
    }
}

#[cfg(test)]
mod proptests;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{Limits, oid};

    fn column(name: &str, type_oid: u32, typmod: i32, nullable: bool) -> ColumnSchema {
        ColumnSchema {
            name: name.into(),
            type_oid,
            type_modifier: typmod,
            nullable,
            type_kind: "b".into(),
            ..Default::default()
        }
    }

    fn row(t: &mut RowTranscoder, values: &[Option<&[u8]>]) -> Result<Vec<u8>, TranscodeError> {
        let mut out = Vec::new();
        t.write_row(values.iter().copied(), 7, false, &mut out)?;
        Ok(out)
    }

    #[test]
    fn scalars() {
        let mut t = RowTranscoder::new(
            &[
                column("i", oid::INT4, -1, false),
                column("n", oid::INT8, -1, true),
                column("s", oid::TEXT, -1, false),
                column("b", oid::BOOL, -1, false),
            ],
            MappingOptions::default(),
        );
        let out = row(
            &mut t,
            &[Some(&(-2i32).to_be_bytes()), None, Some(b"hi"), Some(&[1])],
        )
        .unwrap();
        let mut expected = (-2i32).to_le_bytes().to_vec();
        expected.push(1); // NULL
        expected.extend_from_slice(&[2, b'h', b'i', 1]);
        expected.extend_from_slice(&7u128.to_le_bytes());
        expected.push(0);
        assert_eq!(out, expected);
    }

    #[test]
    fn timestamps_clamp_infinity_and_count_it() {
        let mut t = RowTranscoder::new(
            &[column("ts", oid::TIMESTAMPTZ, -1, false)],
            MappingOptions::default(),
        );
        let out = row(&mut t, &[Some(&i64::MAX.to_be_bytes())]).unwrap();
        assert_eq!(
            &out[..8],
            &Limits::CLASSIC.timestamp_max_micros.to_le_bytes()
        );
        let out = row(&mut t, &[Some(&0i64.to_be_bytes())]).unwrap();
        assert_eq!(&out[..8], &PG_EPOCH_MICROS.to_le_bytes());
        assert_eq!(t.adjustments().clamped, 1);
    }

    #[test]
    fn delete_rows_fill_non_nullable_columns_with_zeros() {
        let mut t = RowTranscoder::new(
            &[
                column("id", oid::INT8, -1, false),
                column("note", oid::TEXT, -1, false),
                column("n", oid::INT4, -1, true),
            ],
            MappingOptions::default(),
        );
        let mut out = Vec::new();
        t.write_text_delete([Some(&b"42"[..]), None, None], 7, &mut out)
            .unwrap();
        let mut expected = 42i64.to_le_bytes().to_vec();
        expected.extend_from_slice(&[0, 1]); // empty string, NULL
        expected.extend_from_slice(&7u128.to_le_bytes());
        expected.push(1);
        assert_eq!(out, expected);
        // An ordinary row still refuses NULL in a NOT NULL column.
        assert!(
            t.write_text_row([Some(&b"42"[..]), None, None], 7, false, &mut Vec::new())
                .is_err()
        );
    }

    #[test]
    fn uuid_halves() {
        let mut t = RowTranscoder::new(
            &[column("u", oid::UUID, -1, false)],
            MappingOptions::default(),
        );
        let raw: Vec<u8> = (0u8..16).collect();
        let out = row(&mut t, &[Some(&raw)]).unwrap();
        assert_eq!(
            &out[..16],
            &[7, 6, 5, 4, 3, 2, 1, 0, 15, 14, 13, 12, 11, 10, 9, 8]
        );
    }

    #[test]
    fn arrays_with_nulls() {
        let mut c = column("a", 1007, -1, true);
        c.element_type_oid = oid::INT4;
        let mut t = RowTranscoder::new(&[c], MappingOptions::default());
        let mut pg = Vec::new();
        for v in [1i32, 0, 23, 2, 1] {
            pg.extend_from_slice(&v.to_be_bytes()); // ndim, has_null, oid, len, lbound
        }
        pg.extend_from_slice(&4i32.to_be_bytes());
        pg.extend_from_slice(&5i32.to_be_bytes());
        pg.extend_from_slice(&(-1i32).to_be_bytes());
        let out = row(&mut t, &[Some(&pg)]).unwrap();
        assert_eq!(&out[..7], &[2, 0, 5, 0, 0, 0, 1]);
        // NULL array → empty array (no Nullable(Array) in ClickHouse).
        let out = row(&mut t, &[None]).unwrap();
        assert_eq!(out[0], 0);
    }

    #[test]
    fn malformed_input_is_an_error_not_a_panic() {
        let mut c = column("a", 1007, -1, false);
        c.element_type_oid = oid::INT4;
        let mut t = RowTranscoder::new(
            &[c, column("i", oid::INT4, -1, false)],
            MappingOptions::default(),
        );
        for bad in [
            &b""[..],
            &[0, 0, 0, 1][..],
            &[
                0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 23, 0x7f, 0, 0, 0, 0, 0, 0, 1,
            ][..],
        ] {
            assert!(row(&mut t, &[Some(bad), Some(&1i32.to_be_bytes())]).is_err());
        }
        assert!(row(&mut t, &[Some(&[0; 12][..]), Some(&[1, 2][..])]).is_err());
        assert!(row(&mut t, &[Some(&[0; 12][..])]).is_err());
        assert!(row(&mut t, &[Some(&[0; 12][..]), None]).is_err());
    }
}
