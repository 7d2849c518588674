//! Reading RowBinary back: splitting a stream into rows and columns, and showing values as
//! text.
//!
//! Verification compares ClickHouse's bytes with the bytes Ferry's transcoder writes for the
//! Postgres rows, so both sides are split by the same per-column [`Shape`], derived from the
//! column's [`ValueKind`] exactly as the transcoder writes it (Nullable marker byte, LEB128
//! lengths, arrays of nullable elements, no Nullable around arrays).

use std::fmt::Write as _;

use ferry_proto::v1::ColumnSchema;

use crate::types::{MappingOptions, ValueKind, value_kind};

/// Days between 0000-03-01 and 1970-01-01 in the proleptic Gregorian calendar.
const EPOCH_SHIFT_DAYS: i64 = 719_468;

/// A RowBinary stream that cannot be split.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RowBinaryError {
    /// A length prefix is longer than ten bytes or does not fit in memory.
    #[error("bad length prefix in RowBinary data")]
    BadLength,
    /// The stream ended inside a row.
    #[error("RowBinary stream ended inside a row ({0} bytes left over)")]
    Truncated(usize),
}

/// How one column's value is laid out in RowBinary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shape {
    /// A fixed number of bytes (integers, floats, Decimal, Date32, DateTime64, Bool, UUID).
    Fixed(usize),
    /// LEB128 length, then that many bytes (String, LowCardinality(String)).
    String,
    /// One marker byte (1 = NULL), then the value unless NULL.
    Nullable(Box<Shape>),
    /// LEB128 element count, then the elements.
    Array(Box<Shape>),
}

/// Bytes of a Decimal of `precision` digits in RowBinary.
pub fn decimal_width(precision: u32) -> usize {
    match precision {
        0..=9 => 4,
        10..=18 => 8,
        19..=38 => 16,
        _ => 32,
    }
}

impl Shape {
    /// The layout of a column of `kind`, `nullable` as the source column is.
    pub fn of(kind: &ValueKind, nullable: bool) -> Self {
        let base = match kind {
            ValueKind::Int(bits) | ValueKind::Float(bits) => Self::Fixed(usize::from(*bits / 8)),
            ValueKind::UInt32 | ValueKind::Date => Self::Fixed(4),
            ValueKind::Timestamp { .. } => Self::Fixed(8),
            ValueKind::Decimal { precision, .. } => Self::Fixed(decimal_width(*precision)),
            ValueKind::Bool => Self::Fixed(1),
            ValueKind::Uuid => Self::Fixed(16),
            ValueKind::Enum | ValueKind::Bytes | ValueKind::Text | ValueKind::Json => Self::String,
            // Elements may always be NULL; ClickHouse has no Nullable(Array).
            ValueKind::Array(element) => {
                return Self::Array(Box::new(Self::of(element, true)));
            }
        };
        if nullable {
            Self::Nullable(Box::new(base))
        } else {
            base
        }
    }

    /// The length of the value at the start of `bytes`, or `None` if it is not complete.
    fn len(&self, bytes: &[u8]) -> Result<Option<usize>, RowBinaryError> {
        match self {
            Self::Fixed(width) => Ok((bytes.len() >= *width).then_some(*width)),
            Self::String => {
                let Some((len, prefix)) = read_varint(bytes)? else {
                    return Ok(None);
                };
                let len = usize::try_from(len).map_err(|_| RowBinaryError::BadLength)?;
                let total = prefix.checked_add(len).ok_or(RowBinaryError::BadLength)?;
                Ok((bytes.len() >= total).then_some(total))
            }
            Self::Nullable(inner) => match bytes.first() {
                None => Ok(None),
                Some(1) => Ok(Some(1)),
                Some(_) => Ok(inner.len(&bytes[1..])?.map(|n| n + 1)),
            },
            Self::Array(element) => {
                let Some((count, mut at)) = read_varint(bytes)? else {
                    return Ok(None);
                };
                for _ in 0..count {
                    match element.len(&bytes[at..])? {
                        Some(n) => at += n,
                        None => return Ok(None),
                    }
                }
                Ok(Some(at))
            }
        }
    }
}

/// A LEB128 value and its length in bytes, or `None` if incomplete.
fn read_varint(bytes: &[u8]) -> Result<Option<(u64, usize)>, RowBinaryError> {
    let mut value = 0u64;
    for (i, byte) in bytes.iter().enumerate().take(10) {
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(Some((value, i + 1)));
        }
    }
    if bytes.len() >= 10 {
        Err(RowBinaryError::BadLength)
    } else {
        Ok(None)
    }
}

/// Splits RowBinary rows into their columns.
#[derive(Debug, Clone)]
pub struct RowSplitter {
    shapes: Vec<Shape>,
    ends: Vec<usize>,
}

impl RowSplitter {
    /// A splitter for rows of these column layouts, in order.
    pub fn new(shapes: Vec<Shape>) -> Self {
        let ends = Vec::with_capacity(shapes.len());
        Self { shapes, ends }
    }

    /// A splitter for the columns of a source table as the transcoder writes them.
    pub fn for_columns(columns: &[ColumnSchema], options: MappingOptions) -> Self {
        Self::new(
            columns
                .iter()
                .map(|c| Shape::of(&value_kind(c, options), c.nullable))
                .collect(),
        )
    }

    /// The same splitter with one more column at the end.
    pub fn followed_by(mut self, shape: Shape) -> Self {
        self.shapes.push(shape);
        self
    }

    /// Locates the first row of `bytes`: returns its length, or `None` if the row is not
    /// complete yet. Afterwards [`RowSplitter::ends`] holds each column's end offset.
    pub fn split(&mut self, bytes: &[u8]) -> Result<Option<usize>, RowBinaryError> {
        self.ends.clear();
        let mut at = 0;
        for shape in &self.shapes {
            match shape.len(&bytes[at..])? {
                Some(n) => at += n,
                None => return Ok(None),
            }
            self.ends.push(at);
        }
        Ok(Some(at))
    }

    /// The byte range of column `i` of the row last split.
    pub fn column(&self, i: usize) -> std::ops::Range<usize> {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        start..self.ends[i]
    }
}

/// `value` (one column's RowBinary bytes) as Postgres would print it; bytes that do not
/// decode as `kind` are shown in hex.
pub fn render(kind: &ValueKind, nullable: bool, value: &[u8]) -> String {
    let mut cursor = value;
    let mut out = String::new();
    match render_into(kind, nullable, &mut cursor, &mut out) {
        Some(()) if cursor.is_empty() => out,
        _ => format!("\\x{}", hex(value)),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn take<'a>(cursor: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if cursor.len() < n {
        return None;
    }
    let (head, rest) = cursor.split_at(n);
    *cursor = rest;
    Some(head)
}

fn fixed<const N: usize>(cursor: &mut &[u8]) -> Option<[u8; N]> {
    take(cursor, N)?.try_into().ok()
}

fn render_into(
    kind: &ValueKind,
    nullable: bool,
    cursor: &mut &[u8],
    out: &mut String,
) -> Option<()> {
    if nullable && !matches!(kind, ValueKind::Array(_)) && take(cursor, 1)? == [1] {
        out.push_str("NULL");
        return Some(());
    }
    match kind {
        ValueKind::Int(16) => write!(out, "{}", i16::from_le_bytes(fixed(cursor)?)).ok()?,
        ValueKind::Int(32) => write!(out, "{}", i32::from_le_bytes(fixed(cursor)?)).ok()?,
        ValueKind::Int(_) => write!(out, "{}", i64::from_le_bytes(fixed(cursor)?)).ok()?,
        ValueKind::UInt32 => write!(out, "{}", u32::from_le_bytes(fixed(cursor)?)).ok()?,
        ValueKind::Float(32) => write!(out, "{}", f32::from_le_bytes(fixed(cursor)?)).ok()?,
        ValueKind::Float(_) => write!(out, "{}", f64::from_le_bytes(fixed(cursor)?)).ok()?,
        ValueKind::Decimal { precision, scale } => {
            let raw = take(cursor, decimal_width(*precision))?;
            out.push_str(&decimal_text(raw, *scale));
        }
        ValueKind::Bool => out.push(if take(cursor, 1)?[0] != 0 { 't' } else { 'f' }),
        ValueKind::Uuid => {
            let raw = take(cursor, 16)?;
            // Two little-endian halves, high half first (see the transcoder).
            let bytes: Vec<u8> = raw[..8]
                .iter()
                .rev()
                .chain(raw[8..].iter().rev())
                .copied()
                .collect();
            let h = hex(&bytes);
            write!(
                out,
                "{}-{}-{}-{}-{}",
                &h[..8],
                &h[8..12],
                &h[12..16],
                &h[16..20],
                &h[20..]
            )
            .ok()?;
        }
        ValueKind::Date => {
            let days = i32::from_le_bytes(fixed(cursor)?);
            out.push_str(&civil_date(i64::from(days)));
        }
        ValueKind::Timestamp { utc } => {
            let micros = i64::from_le_bytes(fixed(cursor)?);
            let (days, in_day) = (
                micros.div_euclid(86_400_000_000),
                micros.rem_euclid(86_400_000_000),
            );
            let seconds = in_day / 1_000_000;
            write!(
                out,
                "{} {:02}:{:02}:{:02}",
                civil_date(days),
                seconds / 3600,
                seconds / 60 % 60,
                seconds % 60
            )
            .ok()?;
            if in_day % 1_000_000 != 0 {
                let fraction = format!("{:06}", in_day % 1_000_000);
                write!(out, ".{}", fraction.trim_end_matches('0')).ok()?;
            }
            if *utc {
                out.push_str("+00");
            }
        }
        ValueKind::Enum | ValueKind::Text | ValueKind::Json => {
            let text = string(cursor)?;
            out.push_str(&String::from_utf8_lossy(text));
        }
        ValueKind::Bytes => write!(out, "\\x{}", hex(string(cursor)?)).ok()?,
        ValueKind::Array(element) => {
            let (count, prefix) = read_varint(cursor).ok()??;
            take(cursor, prefix)?;
            out.push('{');
            for i in 0..count {
                if i > 0 {
                    out.push(',');
                }
                render_into(element, true, cursor, out)?;
            }
            out.push('}');
        }
    }
    Some(())
}

fn string<'a>(cursor: &mut &'a [u8]) -> Option<&'a [u8]> {
    let (len, prefix) = read_varint(cursor).ok()??;
    take(cursor, prefix)?;
    take(cursor, usize::try_from(len).ok()?)
}

/// Days since 1970-01-01 as YYYY-MM-DD (Howard Hinnant's civil_from_days).
fn civil_date(days: i64) -> String {
    let z = days + EPOCH_SHIFT_DAYS;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

/// A little-endian two's complement integer of 4 to 32 bytes, scaled by 10^`scale`.
fn decimal_text(raw: &[u8], scale: u32) -> String {
    let negative = raw.last().is_some_and(|b| b & 0x80 != 0);
    // Magnitude in little-endian 32-bit limbs (negated when negative).
    let mut limbs: Vec<u64> = raw
        .chunks(4)
        .map(|c| {
            let mut word = [0u8; 4];
            word[..c.len()].copy_from_slice(c);
            u64::from(u32::from_le_bytes(word))
        })
        .collect();
    if negative {
        let mut carry = 1u64;
        for limb in &mut limbs {
            let v = (!*limb & 0xffff_ffff) + carry;
            *limb = v & 0xffff_ffff;
            carry = v >> 32;
        }
    }
    let mut digits = Vec::new();
    while limbs.iter().any(|&l| l != 0) {
        let mut remainder = 0u64;
        for limb in limbs.iter_mut().rev() {
            let current = (remainder << 32) | *limb;
            *limb = current / 10;
            remainder = current % 10;
        }
        digits.push(b'0' + remainder as u8);
    }
    let scale = scale as usize;
    while digits.len() <= scale {
        digits.push(b'0');
    }
    digits.reverse();
    let (whole, fraction) = digits.split_at(digits.len() - scale);
    let mut text = String::from(if negative { "-" } else { "" });
    text.push_str(&String::from_utf8_lossy(whole));
    if !fraction.is_empty() {
        text.push('.');
        text.push_str(&String::from_utf8_lossy(fraction));
    }
    text
}

#[cfg(test)]
mod proptests;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transcode::RowTranscoder;
    use crate::types::oid;

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

    #[test]
    fn splits_what_the_transcoder_writes() {
        let mut ints = column("a", 1007, -1, true);
        ints.element_type_oid = oid::INT4;
        let columns = [
            column("i", oid::INT8, -1, false),
            column("s", oid::TEXT, -1, true),
            column("d", oid::NUMERIC, ((20 << 16) | 2) + 4, true),
            ints,
            column("u", oid::UUID, -1, false),
        ];
        let options = MappingOptions::default();
        let mut transcoder = RowTranscoder::new(&columns, options);
        let mut array = Vec::new();
        for v in [1i32, 1, 23, 2, 1] {
            array.extend_from_slice(&v.to_be_bytes());
        }
        array.extend_from_slice(&4i32.to_be_bytes());
        array.extend_from_slice(&(-5i32).to_be_bytes());
        array.extend_from_slice(&(-1i32).to_be_bytes());
        // numeric 12.5: 2 digits (12, 5000), weight 0, positive, dscale 1.
        let mut numeric = Vec::new();
        for v in [2i16, 0, 0, 1, 12, 5000] {
            numeric.extend_from_slice(&v.to_be_bytes());
        }
        let uuid: Vec<u8> = (0u8..16).collect();
        let mut out = Vec::new();
        let values: [Option<&[u8]>; 5] = [
            Some(&42i64.to_be_bytes()),
            None,
            Some(&numeric),
            Some(&array),
            Some(&uuid),
        ];
        transcoder.write_row(values, 7, false, &mut out).unwrap();
        let mut splitter = RowSplitter::for_columns(&columns, options);
        let len = splitter.split(&out).unwrap().unwrap();
        // Everything after the source columns is Ferry's version and delete flag.
        assert!(len < out.len());
        let shown: Vec<String> = columns
            .iter()
            .enumerate()
            .map(|(i, c)| {
                render(
                    &value_kind(c, options),
                    c.nullable,
                    &out[splitter.column(i)],
                )
            })
            .collect();
        assert_eq!(
            shown,
            [
                "42",
                "NULL",
                "12.50",
                "{-5,NULL}",
                "00010203-0405-0607-0809-0a0b0c0d0e0f"
            ]
        );
        // Any prefix of a row is incomplete, never an error.
        for cut in 0..len {
            assert_eq!(splitter.split(&out[..cut]), Ok(None), "cut at {cut}");
        }
    }

    #[test]
    fn dates_timestamps_and_decimals_render_as_postgres_prints_them() {
        assert_eq!(civil_date(0), "1970-01-01");
        assert_eq!(civil_date(-25_567), "1900-01-01");
        assert_eq!(civil_date(19_723), "2024-01-01");
        let ts = ValueKind::Timestamp { utc: true };
        let micros: i64 = 19_723 * 86_400_000_000 + 3_723_500_000;
        assert_eq!(
            render(&ts, false, &micros.to_le_bytes()),
            "2024-01-01 01:02:03.5+00"
        );
        assert_eq!(decimal_text(&(-1205i64).to_le_bytes(), 2), "-12.05");
        assert_eq!(decimal_text(&5i32.to_le_bytes(), 3), "0.005");
        let mut wide = [0xffu8; 32];
        wide[0] = 0xfe; // -2
        assert_eq!(decimal_text(&wide, 0), "-2");
        assert_eq!(render(&ValueKind::Int(32), false, &[1, 2]), "\\x0102");
    }

    #[test]
    fn bad_lengths_are_errors() {
        let mut splitter = RowSplitter::new(vec![Shape::String]);
        assert_eq!(splitter.split(&[0xff; 11]), Err(RowBinaryError::BadLength));
    }
}
