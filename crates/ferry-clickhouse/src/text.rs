//! Postgres text-format values → the binary send format the transcoder writes from.
//!
//! Logical replication in text mode (and any text-protocol source) delivers every value as
//! its output-function text. Converting the typed kinds to their binary form and reusing the
//! binary path keeps one definition of how each kind lands in ClickHouse, so a value copied
//! by the snapshot and the same value replicated later are byte-for-byte identical. Expects
//! the session settings `DateStyle=ISO`, `TimeZone=UTC`, `bytea_output=hex`.

use crate::types::ValueKind;

/// Converts the text `text` of a value of `kind` into its binary send format in `out`
/// (cleared first). Text-like kinds (text, enum labels) are copied as they are.
pub(crate) fn to_binary(kind: &ValueKind, text: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
    out.clear();
    let s = std::str::from_utf8(text).map_err(|_| "value is not UTF-8".to_owned())?;
    match kind {
        ValueKind::Int(16) => out.extend_from_slice(&parse::<i16>(s)?.to_be_bytes()),
        ValueKind::Int(32) => out.extend_from_slice(&parse::<i32>(s)?.to_be_bytes()),
        ValueKind::Int(_) => out.extend_from_slice(&parse::<i64>(s)?.to_be_bytes()),
        ValueKind::UInt32 => out.extend_from_slice(&parse::<u32>(s)?.to_be_bytes()),
        ValueKind::Float(32) => out.extend_from_slice(&parse::<f32>(s)?.to_be_bytes()),
        ValueKind::Float(_) => out.extend_from_slice(&parse::<f64>(s)?.to_be_bytes()),
        ValueKind::Bool => out.push(match s {
            "t" | "true" => 1,
            "f" | "false" => 0,
            other => return Err(format!("not a boolean: {other:?}")),
        }),
        ValueKind::Uuid => uuid(s, out)?,
        ValueKind::Date => out.extend_from_slice(&date(s)?.to_be_bytes()),
        ValueKind::Timestamp { .. } => out.extend_from_slice(&timestamp(s)?.to_be_bytes()),
        ValueKind::Decimal { .. } => numeric(s, out)?,
        ValueKind::Bytes => hex(s, out)?,
        ValueKind::Enum | ValueKind::Text | ValueKind::Json => out.extend_from_slice(text),
        ValueKind::Array(element) => array(element, s, out)?,
    }
    Ok(())
}

fn parse<T: std::str::FromStr>(s: &str) -> Result<T, String> {
    s.parse().map_err(|_| format!("cannot parse {s:?}"))
}

fn uuid(s: &str, out: &mut Vec<u8>) -> Result<(), String> {
    let digits: Vec<u8> = s.bytes().filter(|b| *b != b'-').collect();
    if digits.len() != 32 {
        return Err(format!("not a uuid: {s:?}"));
    }
    for pair in digits.chunks(2) {
        let text = std::str::from_utf8(pair).map_err(|_| format!("not a uuid: {s:?}"))?;
        out.push(u8::from_str_radix(text, 16).map_err(|_| format!("not a uuid: {s:?}"))?);
    }
    Ok(())
}

fn hex(s: &str, out: &mut Vec<u8>) -> Result<(), String> {
    let digits = s
        .strip_prefix("\\x")
        .ok_or_else(|| format!("bytea not in hex format: {s:?}"))?;
    if digits.len() % 2 != 0 {
        return Err("odd number of hex digits in bytea".into());
    }
    for pair in digits.as_bytes().chunks(2) {
        let text = std::str::from_utf8(pair).map_err(|_| "bad hex in bytea".to_owned())?;
        out.push(u8::from_str_radix(text, 16).map_err(|_| format!("bad hex {text:?} in bytea"))?);
    }
    Ok(())
}

/// Days from 1970-01-01 to the proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The largest year [`days_since_2000`] takes.
const MAX_YEAR: i64 = 1_000_000_000;

/// Splits a trailing " BC" off, returning whether it was there.
fn era(s: &str) -> (&str, bool) {
    match s.strip_suffix(" BC") {
        Some(rest) => (rest, true),
        None => (s, false),
    }
}

/// `YYYY-MM-DD` (ISO) as days since 2000-01-01; ±infinity as Postgres encodes them.
fn date(s: &str) -> Result<i32, String> {
    match s {
        "infinity" => return Ok(i32::MAX),
        "-infinity" => return Ok(i32::MIN),
        _ => {}
    }
    let (s, bc) = era(s);
    let days = days_since_2000(s, bc)?;
    i32::try_from(days).map_err(|_| format!("date out of range: {s:?}"))
}

/// Days from 2000-01-01 to the ISO date `YYYY-MM-DD` (a year before Christ when `bc`).
fn days_since_2000(s: &str, bc: bool) -> Result<i64, String> {
    let mut parts = s.splitn(3, '-');
    let (Some(y), Some(m), Some(d)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(format!("not an ISO date: {s:?}"));
    };
    let (y, m, d): (i64, i64, i64) = (parse(y)?, parse(m)?, parse(d)?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return Err(format!("not a date: {s:?}"));
    }
    // Postgres prints no year beyond 5874897 (date's limit); a bound far above it keeps
    // the calendar arithmetic below inside i64 for any text.
    if !(0..=MAX_YEAR).contains(&y) {
        return Err(format!("date out of range: {s:?}"));
    }
    let year = if bc { 1 - y } else { y };
    Ok(days_from_civil(year, m, d) - days_from_civil(2000, 1, 1))
}

/// `YYYY-MM-DD HH:MM:SS[.ffffff][±HH[:MM[:SS]]][ BC]` as microseconds since 2000-01-01 UTC.
fn timestamp(s: &str) -> Result<i64, String> {
    match s {
        "infinity" => return Ok(i64::MAX),
        "-infinity" => return Ok(i64::MIN),
        _ => {}
    }
    let (s, bc) = era(s);
    let (day, time) = s
        .split_once(' ')
        .ok_or_else(|| format!("not an ISO timestamp: {s:?}"))?;
    let days = days_since_2000(day, bc)?;
    // The zone offset starts at the first '+' or '-' after the clock time.
    let (clock, offset) = match time.find(['+', '-']) {
        Some(at) => (&time[..at], Some(&time[at..])),
        None => (time, None),
    };
    let mut hms = clock.splitn(3, ':');
    let (Some(h), Some(m), Some(sec)) = (hms.next(), hms.next(), hms.next()) else {
        return Err(format!("not an ISO time: {clock:?}"));
    };
    let (whole, fraction) = sec.split_once('.').unwrap_or((sec, ""));
    if fraction.len() > 6 || !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("bad fractional seconds in {s:?}"));
    }
    let micros_fraction: i64 = if fraction.is_empty() {
        0
    } else {
        parse::<i64>(fraction)? * 10_i64.pow(6 - fraction.len() as u32)
    };
    let out_of_range = || format!("timestamp out of range: {s:?}");
    // Checked throughout: the fields are parsed as they come, so any of them can be huge.
    let seconds = clock_seconds(parse(h)?, parse(m)?, parse(whole)?).ok_or_else(out_of_range)?;
    let mut offset_seconds = 0;
    if let Some(offset) = offset {
        let sign = if offset.starts_with('-') { -1 } else { 1 };
        let mut fields = offset[1..].split(':');
        let hours: i64 = parse(fields.next().unwrap_or("0"))?;
        let minutes: i64 = fields.next().map(parse).transpose()?.unwrap_or(0);
        let secs: i64 = fields.next().map(parse).transpose()?.unwrap_or(0);
        offset_seconds = clock_seconds(hours, minutes, secs)
            .and_then(|o| o.checked_mul(sign))
            .ok_or_else(out_of_range)?;
    }
    seconds
        .checked_sub(offset_seconds)
        .and_then(|s| s.checked_mul(1_000_000))
        .and_then(|s| s.checked_add(micros_fraction))
        .and_then(|micros| days.checked_mul(86_400_000_000)?.checked_add(micros))
        .ok_or_else(out_of_range)
}

/// `h:m:s` in seconds, or `None` if it overflows.
fn clock_seconds(h: i64, m: i64, s: i64) -> Option<i64> {
    h.checked_mul(3600)?
        .checked_add(m.checked_mul(60)?)?
        .checked_add(s)
}

/// Decimal text (or NaN / ±Infinity) as Postgres's binary numeric.
fn numeric(s: &str, out: &mut Vec<u8>) -> Result<(), String> {
    let special = match s {
        "NaN" => Some(0xC000u16),
        "Infinity" => Some(0xD000),
        "-Infinity" => Some(0xF000),
        _ => None,
    };
    if let Some(sign) = special {
        out.extend_from_slice(&[0, 0, 0, 0]);
        out.extend_from_slice(&sign.to_be_bytes());
        out.extend_from_slice(&[0, 0]);
        return Ok(());
    }
    let (negative, unsigned) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (int, frac) = unsigned.split_once('.').unwrap_or((unsigned, ""));
    if int.is_empty() && frac.is_empty()
        || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit())
    {
        return Err(format!("not a numeric: {s:?}"));
    }
    // Align to groups of four digits around the decimal point.
    let pad_int = (4 - int.len() % 4) % 4;
    let pad_frac = (4 - frac.len() % 4) % 4;
    let digits: String = std::iter::repeat_n('0', pad_int)
        .chain(int.chars())
        .chain(frac.chars())
        .chain(std::iter::repeat_n('0', pad_frac))
        .collect();
    let groups: Vec<u16> = digits
        .as_bytes()
        .chunks(4)
        .map(|c| c.iter().fold(0u16, |acc, d| acc * 10 + u16::from(d - b'0')))
        .collect();
    let weight =
        i16::try_from((int.len() + pad_int) / 4).map_err(|_| "numeric too long".to_owned())? - 1;
    let ndigits = u16::try_from(groups.len()).map_err(|_| "numeric too long".to_owned())?;
    let dscale = u16::try_from(frac.len()).map_err(|_| "numeric too long".to_owned())?;
    out.extend_from_slice(&ndigits.to_be_bytes());
    out.extend_from_slice(&weight.to_be_bytes());
    out.extend_from_slice(&(if negative { 0x4000u16 } else { 0 }).to_be_bytes());
    out.extend_from_slice(&dscale.to_be_bytes());
    for group in groups {
        out.extend_from_slice(&group.to_be_bytes());
    }
    Ok(())
}

/// A one-dimensional array literal (`{a,"b c",NULL}`, optionally `[lo:hi]=` first) as
/// Postgres's binary array format.
fn array(element: &ValueKind, s: &str, out: &mut Vec<u8>) -> Result<(), String> {
    let body = match s.find('=') {
        Some(at) if s.starts_with('[') => &s[at + 1..],
        _ => s,
    };
    let inner = body
        .strip_prefix('{')
        .and_then(|b| b.strip_suffix('}'))
        .ok_or_else(|| format!("not an array literal: {s:?}"))?;
    let mut elements: Vec<Option<String>> = Vec::new();
    let mut chars = inner.chars().peekable();
    while chars.peek().is_some() {
        match chars.peek() {
            Some('{') => {
                return Err("multi-dimensional arrays are not supported; use one dimension".into());
            }
            Some('"') => {
                chars.next();
                let mut value = String::new();
                loop {
                    match chars.next() {
                        Some('\\') => value.extend(chars.next()),
                        Some('"') => break,
                        Some(c) => value.push(c),
                        None => return Err(format!("unterminated quote in {s:?}")),
                    }
                }
                elements.push(Some(value));
            }
            _ => {
                let mut value = String::new();
                while let Some(c) = chars.peek().copied() {
                    if c == ',' {
                        break;
                    }
                    value.push(c);
                    chars.next();
                }
                // Postgres quotes an element only for ASCII white space (`array_isspace`),
                // so any other space at its ends (U+00A0, U+2003, ...) is part of the value.
                let value =
                    value.trim_matches(|c| matches!(c, ' ' | '\t' | '\n' | '\r' | '\x0B' | '\x0C'));
                elements.push((!value.eq_ignore_ascii_case("NULL")).then(|| value.to_owned()));
            }
        }
        match chars.next() {
            None | Some(',') => {}
            Some(c) => return Err(format!("unexpected {c:?} in array {s:?}")),
        }
    }
    let has_null = elements.iter().any(Option::is_none);
    let count = i32::try_from(elements.len()).map_err(|_| "array too long".to_owned())?;
    out.extend_from_slice(&i32::from(count > 0).to_be_bytes());
    out.extend_from_slice(&i32::from(has_null).to_be_bytes());
    out.extend_from_slice(&0i32.to_be_bytes());
    if count > 0 {
        out.extend_from_slice(&count.to_be_bytes());
        out.extend_from_slice(&1i32.to_be_bytes());
    }
    let mut scratch = Vec::new();
    for value in elements {
        match value {
            None => out.extend_from_slice(&(-1i32).to_be_bytes()),
            Some(text) => {
                to_binary(element, text.as_bytes(), &mut scratch)?;
                let len = i32::try_from(scratch.len())
                    .map_err(|_| "array element too long".to_owned())?;
                out.extend_from_slice(&len.to_be_bytes());
                out.extend_from_slice(&scratch);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod proptests;

#[cfg(test)]
mod tests {
    use super::*;

    fn bin(kind: ValueKind, text: &str) -> Vec<u8> {
        let mut out = Vec::new();
        to_binary(&kind, text.as_bytes(), &mut out).unwrap();
        out
    }

    #[test]
    fn dates_and_timestamps() {
        assert_eq!(bin(ValueKind::Date, "2000-01-01"), 0i32.to_be_bytes());
        assert_eq!(bin(ValueKind::Date, "2024-02-29"), 8825i32.to_be_bytes());
        assert_eq!(
            bin(ValueKind::Date, "1970-01-01"),
            (-10_957i32).to_be_bytes()
        );
        assert_eq!(bin(ValueKind::Date, "infinity"), i32::MAX.to_be_bytes());
        let ts = ValueKind::Timestamp { utc: true };
        assert_eq!(
            bin(ts.clone(), "2000-01-01 00:00:01.5"),
            1_500_000i64.to_be_bytes()
        );
        assert_eq!(
            bin(ts.clone(), "2000-01-01 02:00:00+02"),
            0i64.to_be_bytes()
        );
        assert_eq!(
            bin(ts.clone(), "1999-12-31 23:00:00-01:00"),
            0i64.to_be_bytes()
        );
        assert_eq!(bin(ts, "-infinity"), i64::MIN.to_be_bytes());
    }

    /// Found by the property test: these overflowed i64 arithmetic (a panic in a debug build,
    /// a wrong value in a release build).
    #[test]
    fn huge_fields_are_errors_not_overflows() {
        let ts = ValueKind::Timestamp { utc: true };
        for (kind, text) in [
            (ValueKind::Date, "9223372036854775807-01-01"),
            (ValueKind::Date, "9223372036854775807-01-01 BC"),
            (ts.clone(), "9223372036854775807-01-01 00:00:00"),
            (ts.clone(), "2000-01-01 9223372036854775:00:00"),
            (ts.clone(), "2000-01-01 00:00:9223372036854775807.5"),
            (ts.clone(), "2000-01-01 00:00:00+9223372036854775"),
            (ts.clone(), "2000-01-01 00:00:00-00:153722867280912930"),
            (ts, "1000000000-01-01 00:00:00"),
        ] {
            assert!(
                to_binary(&kind, text.as_bytes(), &mut Vec::new()).is_err(),
                "{text}"
            );
        }
        // The widest values Postgres prints still convert.
        assert_eq!(
            bin(ValueKind::Date, "5874897-12-31"),
            2_145_031_948i32.to_be_bytes()
        );
    }

    #[test]
    fn garbage_is_an_error() {
        let cases = [
            (ValueKind::Int(32), "12x"),
            (ValueKind::Bool, "yes"),
            (ValueKind::Uuid, "1234"),
            (ValueKind::Date, "2024/01/01"),
            (
                ValueKind::Decimal {
                    precision: 10,
                    scale: 2,
                },
                "1.2.3",
            ),
            (ValueKind::Bytes, "deadbeef"),
            (ValueKind::Array(Box::new(ValueKind::Int(32))), "{{1},{2}}"),
            (ValueKind::Array(Box::new(ValueKind::Text)), "{\"open"),
        ];
        for (kind, text) in cases {
            assert!(
                to_binary(&kind, text.as_bytes(), &mut Vec::new()).is_err(),
                "{text}"
            );
        }
    }
}

#[cfg(test)]
mod array_tests {
    use super::*;

    /// Element texts of a text-array literal, via its binary form.
    fn elements(literal: &str) -> Vec<Option<String>> {
        let mut out = Vec::new();
        to_binary(
            &ValueKind::Array(Box::new(ValueKind::Text)),
            literal.as_bytes(),
            &mut out,
        )
        .unwrap();
        let word = |at: usize| i32::from_be_bytes(out[at..at + 4].try_into().unwrap());
        if word(0) == 0 {
            return Vec::new();
        }
        let count = word(12) as usize;
        let mut at = 20;
        let mut values = Vec::new();
        for _ in 0..count {
            let len = word(at);
            at += 4;
            if len < 0 {
                values.push(None);
            } else {
                let len = len as usize;
                values.push(Some(String::from_utf8(out[at..at + len].to_vec()).unwrap()));
                at += len;
            }
        }
        values
    }

    #[test]
    fn quoted_elements_keep_everything_inside_the_quotes() {
        let s = |v: &str| Some(v.to_owned());
        assert_eq!(elements(r#"{" a","b "}"#), vec![s(" a"), s("b ")]);
        assert_eq!(
            elements(r#"{"a,b","{c}","d\"e","f\\g","NULL",NULL,"",plain}"#),
            vec![
                s("a,b"),
                s("{c}"),
                s("d\"e"),
                s("f\\g"),
                s("NULL"),
                None,
                s(""),
                s("plain")
            ]
        );
        assert_eq!(elements(r#"{"  "}"#), vec![s("  ")]);
        // Found by the property test: only ASCII white space around an unquoted element is
        // padding; Postgres prints other spaces unquoted, and they belong to the value.
        assert_eq!(
            elements("{\u{85},\u{a0}x\u{2003}, \ty\n}"),
            vec![s("\u{85}"), s("\u{a0}x\u{2003}"), s("y")]
        );
        assert_eq!(elements("{}"), Vec::<Option<String>>::new());
    }
}
