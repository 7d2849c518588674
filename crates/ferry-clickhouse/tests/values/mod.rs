//! Generated values of every mapped Postgres type, and three independent renderings of each:
//! Postgres's binary send format, Postgres's text output, and the text ClickHouse shows for
//! the value as Ferry should have stored it (clamped or NULL where DESIGN.md §5 says so).
//!
//! Written apart from Ferry's code (other algorithms, no shared helpers), so that a property
//! comparing them checks Ferry rather than itself.

#![allow(dead_code)]

use ferry_clickhouse::types::{Limits, oid};
use ferry_proto::v1::ColumnSchema;
use proptest::collection::vec;
use proptest::prelude::*;

/// Microseconds between 1970-01-01 and 2000-01-01.
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;
/// Days between 1970-01-01 and 2000-01-01.
const PG_EPOCH_DAYS: i64 = 10_957;
/// Postgres's date range in days since 2000-01-01 (4714-11-24 BC ..= 5874897-12-31).
const PG_DATE_MIN: i32 = -2_451_545;
const PG_DATE_MAX: i32 = 2_145_031_948;
/// Postgres's timestamp range in microseconds since 2000-01-01 (4714-11-24 BC ..< 294277).
const PG_TIMESTAMP_MIN: i64 = -211_813_488_000_000_000;
const PG_TIMESTAMP_MAX: i64 = 9_223_371_331_200_000_000 - 1;

/// A Postgres value (never NULL; NULL is `None` around it).
#[derive(Debug, Clone, PartialEq)]
pub enum V {
    I16(i16),
    I32(i32),
    I64(i64),
    Oid(u32),
    F32(f32),
    F64(f64),
    Num(Num),
    Bool(bool),
    Uuid([u8; 16]),
    /// Days since 2000-01-01; `i32::MAX`/`MIN` are ±infinity.
    Date(i32),
    /// Microseconds since 2000-01-01; `i64::MAX`/`MIN` are ±infinity.
    Ts {
        micros: i64,
        utc: bool,
    },
    Bytes(Vec<u8>),
    Text(String),
    Array(Vec<Option<V>>),
}

/// A numeric: digits as text, so any precision is exact.
#[derive(Debug, Clone, PartialEq)]
pub enum Num {
    NaN,
    Infinity {
        negative: bool,
    },
    /// `int` has no leading zeros (empty for zero); `frac` has exactly the display scale.
    Value {
        negative: bool,
        int: String,
        frac: String,
    },
}

/// What a column holds, with its value generator.
#[derive(Debug, Clone, Copy)]
pub enum Ty {
    I16,
    I32,
    I64,
    Oid,
    F32,
    F64,
    /// numeric(p, s); `specials` adds NaN and ±Infinity (for Nullable columns: they land NULL).
    Numeric {
        p: u32,
        s: u32,
        specials: bool,
    },
    /// numeric without a typmod: Decimal(76, 38).
    NumericAny {
        specials: bool,
    },
    Bool,
    Uuid,
    Date,
    Timestamp {
        utc: bool,
    },
    Bytea,
    Text,
    Varchar,
    Enum,
}

impl Ty {
    /// (type oid, array type oid, typmod, `typtype`).
    fn pg(self) -> (u32, u32, i32, &'static str) {
        match self {
            Ty::I16 => (oid::INT2, 1005, -1, "b"),
            Ty::I32 => (oid::INT4, 1007, -1, "b"),
            Ty::I64 => (oid::INT8, 1016, -1, "b"),
            Ty::Oid => (oid::OID, 1028, -1, "b"),
            Ty::F32 => (oid::FLOAT4, 1021, -1, "b"),
            Ty::F64 => (oid::FLOAT8, 1022, -1, "b"),
            Ty::Numeric { p, s, .. } => (oid::NUMERIC, 1231, ((p << 16) | s) as i32 + 4, "b"),
            Ty::NumericAny { .. } => (oid::NUMERIC, 1231, -1, "b"),
            Ty::Bool => (oid::BOOL, 1000, -1, "b"),
            Ty::Uuid => (oid::UUID, 2951, -1, "b"),
            Ty::Date => (oid::DATE, 1182, -1, "b"),
            Ty::Timestamp { utc: false } => (oid::TIMESTAMP, 1115, -1, "b"),
            Ty::Timestamp { utc: true } => (oid::TIMESTAMPTZ, 1185, -1, "b"),
            Ty::Bytea => (oid::BYTEA, 1001, -1, "b"),
            Ty::Text => (oid::TEXT, 1009, -1, "b"),
            Ty::Varchar => (oid::VARCHAR, 1015, -1, "b"),
            Ty::Enum => (90_000, 90_001, -1, "e"),
        }
    }

    /// The value generator: extremes and edge cases weighted in.
    pub fn values(self) -> BoxedStrategy<V> {
        match self {
            Ty::I16 => prop_oneof![
                Just(i16::MIN),
                Just(i16::MAX),
                Just(0),
                Just(-1),
                any::<i16>()
            ]
            .prop_map(V::I16)
            .boxed(),
            Ty::I32 => prop_oneof![
                Just(i32::MIN),
                Just(i32::MAX),
                Just(0),
                Just(-1),
                any::<i32>()
            ]
            .prop_map(V::I32)
            .boxed(),
            Ty::I64 => prop_oneof![
                Just(i64::MIN),
                Just(i64::MAX),
                Just(0),
                Just(-1),
                any::<i64>()
            ]
            .prop_map(V::I64)
            .boxed(),
            Ty::Oid => prop_oneof![Just(0), Just(u32::MAX), any::<u32>()]
                .prop_map(V::Oid)
                .boxed(),
            // NaN only as Postgres prints it ("NaN" has no payload, so the text path cannot
            // keep one).
            Ty::F32 => prop_oneof![
                prop::sample::select(vec![
                    f32::NAN,
                    f32::INFINITY,
                    f32::NEG_INFINITY,
                    f32::MAX,
                    f32::MIN,
                    f32::MIN_POSITIVE,
                    -0.0,
                    0.0,
                    1e-45,
                ]),
                prop::num::f32::NORMAL | prop::num::f32::SUBNORMAL | prop::num::f32::ZERO,
            ]
            .prop_map(V::F32)
            .boxed(),
            Ty::F64 => prop_oneof![
                prop::sample::select(vec![
                    f64::NAN,
                    f64::INFINITY,
                    f64::NEG_INFINITY,
                    f64::MAX,
                    f64::MIN,
                    f64::MIN_POSITIVE,
                    -0.0,
                    0.0,
                    5e-324,
                    0.1,
                ]),
                prop::num::f64::NORMAL | prop::num::f64::SUBNORMAL | prop::num::f64::ZERO,
            ]
            .prop_map(V::F64)
            .boxed(),
            Ty::Numeric { p, s, specials } => numeric(p - s, Some(s), specials),
            Ty::NumericAny { specials } => numeric(38, None, specials),
            Ty::Bool => any::<bool>().prop_map(V::Bool).boxed(),
            Ty::Uuid => prop_oneof![Just([0u8; 16]), Just([0xff; 16]), any::<[u8; 16]>()]
                .prop_map(V::Uuid)
                .boxed(),
            Ty::Date => prop_oneof![
                // ClickHouse's widest Date32 range, 0000-01-01 ..= 9999-12-31.
                6 => -730_485i32..=2_921_939,
                1 => PG_DATE_MIN..=PG_DATE_MAX,
                1 => prop::sample::select(vec![i32::MIN, i32::MAX, PG_DATE_MIN, PG_DATE_MAX]),
            ]
            .prop_map(V::Date)
            .boxed(),
            Ty::Timestamp { utc } => prop_oneof![
                6 => -63_113_904_000_000_000i64..=252_455_615_999_999_999,
                1 => PG_TIMESTAMP_MIN..=PG_TIMESTAMP_MAX,
                1 => prop::sample::select(vec![
                    i64::MIN,
                    i64::MAX,
                    PG_TIMESTAMP_MIN,
                    PG_TIMESTAMP_MAX
                ]),
            ]
            .prop_map(move |micros| V::Ts { micros, utc })
            .boxed(),
            Ty::Bytea => vec(any::<u8>(), 0..40).prop_map(V::Bytes).boxed(),
            Ty::Text | Ty::Varchar => text().prop_map(V::Text).boxed(),
            Ty::Enum => "[a-z_ ]{1,10}|[^\\x00]{1,6}".prop_map(V::Text).boxed(),
        }
    }
}

/// Text Postgres can hold (no NUL), weighted towards what array literals quote and escape.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[^\\x00]{0,24}",
        "[ a,{}\"\\\\\t\n\u{0B}\u{0C}\r\u{A0}\u{2003}é☃😀]{0,10}",
        prop::sample::select(vec!["NULL", "null", "", " ", "\"", "\\"]).prop_map(String::from),
    ]
}

/// A numeric of at most `int_digits` integer digits, and `scale` fractional digits (any
/// number up to 38 when `None`).
fn numeric(int_digits: u32, scale: Option<u32>, specials: bool) -> BoxedStrategy<V> {
    let frac = match scale {
        Some(s) => proptest::string::string_regex(&format!("[0-9]{{{s}}}"))
            .expect("a valid pattern")
            .boxed(),
        None => "[0-9]{0,38}".boxed(),
    };
    let int = proptest::string::string_regex(&format!("[1-9][0-9]{{0,{}}}", int_digits - 1))
        .expect("a valid pattern");
    let nines = "9".repeat(int_digits as usize);
    let int = prop_oneof![3 => int, 1 => Just(String::new()), 1 => Just(nines)];
    let value = (any::<bool>(), int, frac)
        .prop_map(|(negative, int, frac)| Num::Value {
            negative,
            int,
            frac,
        })
        .prop_map(V::Num);
    if specials {
        prop_oneof![
            6 => value,
            1 => prop::sample::select(vec![
                Num::NaN,
                Num::Infinity { negative: false },
                Num::Infinity { negative: true },
            ])
            .prop_map(V::Num),
        ]
        .boxed()
    } else {
        value.boxed()
    }
}

/// One column of the generated table.
#[derive(Debug, Clone)]
pub struct Col {
    pub name: &'static str,
    pub ty: Ty,
    pub array: bool,
    pub nullable: bool,
}

impl Col {
    pub fn schema(&self) -> ColumnSchema {
        let (type_oid, array_oid, typmod, kind) = self.ty.pg();
        ColumnSchema {
            name: self.name.into(),
            type_oid: if self.array { array_oid } else { type_oid },
            element_type_oid: if self.array { type_oid } else { 0 },
            type_modifier: typmod,
            type_kind: kind.into(),
            nullable: self.nullable,
            ..Default::default()
        }
    }

    /// Values of this column: NULL only where the column is Nullable.
    pub fn values(&self) -> BoxedStrategy<Option<V>> {
        let value = if self.array {
            vec(prop::option::weighted(0.85, self.ty.values()), 0..6)
                .prop_map(V::Array)
                .boxed()
        } else {
            self.ty.values()
        };
        if self.nullable {
            prop::option::weighted(0.85, value).boxed()
        } else {
            value.prop_map(Some).boxed()
        }
    }

    /// The ClickHouse expression showing the column as [`clickhouse_text`] does.
    pub fn select(&self) -> String {
        let name = format!("`{}`", self.name);
        let show = |x: &str| -> String {
            match self.ty {
                Ty::F32 => format!("toString(reinterpretAsUInt32({x}))"),
                Ty::F64 => format!("toString(reinterpretAsUInt64({x}))"),
                Ty::Bytea | Ty::Text | Ty::Varchar | Ty::Enum => format!("hex({x})"),
                _ => format!("toString({x})"),
            }
        };
        let nullable = |x: &str| {
            format!(
                "if(isNull({x}), 'NULL', {})",
                show(&format!("assumeNotNull({x})"))
            )
        };
        if self.array {
            format!(
                "arrayStringConcat(arrayMap(x -> {}, {name}), ';')",
                nullable("x")
            )
        } else if self.nullable {
            nullable(&name)
        } else {
            show(&name)
        }
    }
}

/// The columns of the generated table (after its `id int8` key): every mapped type, NOT NULL
/// and Nullable, scalars and arrays.
pub fn columns() -> Vec<Col> {
    let c = |name, ty, array, nullable| Col {
        name,
        ty,
        array,
        nullable,
    };
    vec![
        c("i2", Ty::I16, false, false),
        c("i4", Ty::I32, false, true),
        c("i8", Ty::I64, false, false),
        c("o", Ty::Oid, false, false),
        c("f4", Ty::F32, false, true),
        c("f8", Ty::F64, false, false),
        c(
            "n10_2",
            Ty::Numeric {
                p: 10,
                s: 2,
                specials: false,
            },
            false,
            false,
        ),
        c(
            "n18_0",
            Ty::Numeric {
                p: 18,
                s: 0,
                specials: false,
            },
            false,
            true,
        ),
        c(
            "n38_10",
            Ty::Numeric {
                p: 38,
                s: 10,
                specials: true,
            },
            false,
            true,
        ),
        c(
            "n76_20",
            Ty::Numeric {
                p: 76,
                s: 20,
                specials: false,
            },
            false,
            false,
        ),
        c("n", Ty::NumericAny { specials: true }, false, true),
        c("b", Ty::Bool, false, true),
        c("u", Ty::Uuid, false, false),
        c("d", Ty::Date, false, true),
        c("ts", Ty::Timestamp { utc: false }, false, false),
        c("tstz", Ty::Timestamp { utc: true }, false, true),
        c("by", Ty::Bytea, false, true),
        c("t", Ty::Text, false, false),
        c("vc", Ty::Varchar, false, true),
        c("e", Ty::Enum, false, true),
        c("a_i2", Ty::I16, true, false),
        c("a_i4", Ty::I32, true, true),
        c("a_i8", Ty::I64, true, false),
        c("a_f4", Ty::F32, true, false),
        c("a_f8", Ty::F64, true, true),
        c(
            "a_n",
            Ty::Numeric {
                p: 10,
                s: 2,
                specials: true,
            },
            true,
            true,
        ),
        c("a_b", Ty::Bool, true, false),
        c("a_u", Ty::Uuid, true, true),
        c("a_d", Ty::Date, true, false),
        c("a_ts", Ty::Timestamp { utc: false }, true, true),
        c("a_tstz", Ty::Timestamp { utc: true }, true, false),
        c("a_by", Ty::Bytea, true, true),
        c("a_t", Ty::Text, true, false),
    ]
}

// ---------------------------------------------------------------------------------------
// Postgres's binary send format.

/// Base-10000 digits, weight and sign of a numeric, with leading and trailing zero groups
/// stripped as `numeric_send` sends them.
fn numeric_send(n: &Num, out: &mut Vec<u8>) {
    let (negative, int, frac) = match n {
        Num::NaN => return numeric_header(out, 0, 0, 0xC000, 0, &[]),
        Num::Infinity { negative } => {
            let sign = if *negative { 0xF000 } else { 0xD000 };
            return numeric_header(out, 0, 0, sign, 0, &[]);
        }
        Num::Value {
            negative,
            int,
            frac,
        } => (*negative, int, frac),
    };
    let mut digits = "0".repeat((4 - int.len() % 4) % 4);
    digits.push_str(int);
    let int_groups = digits.len() / 4;
    digits.push_str(frac);
    digits.push_str(&"0".repeat((4 - frac.len() % 4) % 4));
    let mut groups: Vec<u16> = digits
        .as_bytes()
        .chunks(4)
        .map(|c| std::str::from_utf8(c).unwrap().parse().unwrap())
        .collect();
    let mut weight = int_groups as i16 - 1;
    while groups.first() == Some(&0) {
        groups.remove(0);
        weight -= 1;
    }
    while groups.last() == Some(&0) {
        groups.pop();
    }
    let dscale = frac.len() as u16;
    if groups.is_empty() {
        // Zero: no digits, weight 0, always positive.
        return numeric_header(out, 0, 0, 0, dscale, &[]);
    }
    let sign = if negative { 0x4000 } else { 0 };
    numeric_header(out, groups.len() as u16, weight, sign, dscale, &groups);
}

fn numeric_header(out: &mut Vec<u8>, n: u16, weight: i16, sign: u16, dscale: u16, d: &[u16]) {
    for word in [n, weight as u16, sign, dscale]
        .into_iter()
        .chain(d.iter().copied())
    {
        out.extend_from_slice(&word.to_be_bytes());
    }
}

/// The value in Postgres's binary send format (`elem_oid` for arrays).
pub fn pg_binary(v: &V, elem_oid: u32) -> Vec<u8> {
    let mut out = Vec::new();
    match v {
        V::I16(n) => out.extend_from_slice(&n.to_be_bytes()),
        V::I32(n) => out.extend_from_slice(&n.to_be_bytes()),
        V::I64(n) => out.extend_from_slice(&n.to_be_bytes()),
        V::Oid(n) => out.extend_from_slice(&n.to_be_bytes()),
        V::F32(f) => out.extend_from_slice(&f.to_bits().to_be_bytes()),
        V::F64(f) => out.extend_from_slice(&f.to_bits().to_be_bytes()),
        V::Num(n) => numeric_send(n, &mut out),
        V::Bool(b) => out.push(u8::from(*b)),
        V::Uuid(u) => out.extend_from_slice(u),
        V::Date(d) => out.extend_from_slice(&d.to_be_bytes()),
        V::Ts { micros, .. } => out.extend_from_slice(&micros.to_be_bytes()),
        V::Bytes(b) => out.extend_from_slice(b),
        V::Text(s) => out.extend_from_slice(s.as_bytes()),
        V::Array(elements) => {
            let has_null = elements.iter().any(Option::is_none);
            let dims = i32::from(!elements.is_empty());
            for word in [dims, i32::from(has_null), elem_oid as i32] {
                out.extend_from_slice(&word.to_be_bytes());
            }
            if !elements.is_empty() {
                out.extend_from_slice(&(elements.len() as i32).to_be_bytes());
                out.extend_from_slice(&1i32.to_be_bytes());
            }
            for e in elements {
                match e {
                    None => out.extend_from_slice(&(-1i32).to_be_bytes()),
                    Some(e) => {
                        let bytes = pg_binary(e, 0);
                        out.extend_from_slice(&(bytes.len() as i32).to_be_bytes());
                        out.extend_from_slice(&bytes);
                    }
                }
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// Postgres's text output (DateStyle=ISO, TimeZone=UTC, bytea_output=hex).

/// Year, month, day of `days` since 1970-01-01 (proleptic Gregorian, astronomical years):
/// whole 400-year cycles first, then year by year and month by month.
fn civil(days: i64) -> (i64, u32, u32) {
    const CYCLE: i64 = 146_097;
    let leap = |y: i64| (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let mut days = days;
    let mut year = 1970 + 400 * days.div_euclid(CYCLE);
    days = days.rem_euclid(CYCLE);
    loop {
        let len = if leap(year) { 366 } else { 365 };
        if days < len {
            break;
        }
        days -= len;
        year += 1;
    }
    let months = [
        31,
        if leap(year) { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    let mut month = 0;
    while days >= months[month] {
        days -= months[month];
        month += 1;
    }
    (year, month as u32 + 1, days as u32 + 1)
}

/// `YYYY-MM-DD` and whether the year is BC, as Postgres prints a date.
fn pg_date_parts(days_since_2000: i64) -> (String, bool) {
    let (year, month, day) = civil(days_since_2000 + PG_EPOCH_DAYS);
    let (shown, bc) = if year <= 0 {
        (1 - year, true)
    } else {
        (year, false)
    };
    (format!("{shown:04}-{month:02}-{day:02}"), bc)
}

/// Postgres's shortest exact float text: `NaN`, `Infinity`, else the shortest digits that
/// read back exactly, in exponent form (`1.5e-07`, `1e+300`) outside 1e-4 ..< 1e`digits`.
/// `display` and `exponent` are Rust's shortest fixed and exponent forms of the value.
fn pg_float(value: f64, display: String, exponent_form: String, digits: i32) -> String {
    if value.is_nan() {
        return "NaN".into();
    }
    if value.is_infinite() {
        return if value > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    let (mantissa, exponent) = exponent_form.split_once('e').unwrap();
    let exponent: i32 = exponent.parse().unwrap();
    if value != 0.0 && (exponent < -4 || exponent >= digits) {
        let sign = if exponent < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exponent.abs())
    } else {
        display
    }
}

/// The value as Postgres's output function prints it.
pub fn pg_text(v: &V) -> String {
    match v {
        V::I16(n) => n.to_string(),
        V::I32(n) => n.to_string(),
        V::I64(n) => n.to_string(),
        V::Oid(n) => n.to_string(),
        V::F32(f) => pg_float(f64::from(*f), f.to_string(), format!("{f:e}"), 6),
        V::F64(f) => pg_float(*f, f.to_string(), format!("{f:e}"), 15),
        V::Num(Num::NaN) => "NaN".into(),
        V::Num(Num::Infinity { negative }) => {
            if *negative { "-Infinity" } else { "Infinity" }.into()
        }
        V::Num(Num::Value {
            negative,
            int,
            frac,
        }) => {
            let zero = int.is_empty() && frac.bytes().all(|b| b == b'0');
            let sign = if *negative && !zero { "-" } else { "" };
            let int = if int.is_empty() { "0" } else { int };
            if frac.is_empty() {
                format!("{sign}{int}")
            } else {
                format!("{sign}{int}.{frac}")
            }
        }
        V::Bool(b) => if *b { "t" } else { "f" }.into(),
        V::Uuid(u) => uuid_text(u),
        V::Date(i32::MAX) => "infinity".into(),
        V::Date(i32::MIN) => "-infinity".into(),
        V::Date(d) => {
            let (date, bc) = pg_date_parts(i64::from(*d));
            if bc { format!("{date} BC") } else { date }
        }
        V::Ts {
            micros: i64::MAX, ..
        } => "infinity".into(),
        V::Ts {
            micros: i64::MIN, ..
        } => "-infinity".into(),
        V::Ts { micros, utc } => {
            let (date, bc) = pg_date_parts(micros.div_euclid(86_400_000_000));
            let in_day = micros.rem_euclid(86_400_000_000);
            let secs = in_day / 1_000_000;
            let mut text = format!(
                "{date} {:02}:{:02}:{:02}",
                secs / 3600,
                secs / 60 % 60,
                secs % 60
            );
            if in_day % 1_000_000 != 0 {
                let fraction = format!("{:06}", in_day % 1_000_000);
                text.push('.');
                text.push_str(fraction.trim_end_matches('0'));
            }
            if *utc {
                text.push_str("+00");
            }
            if bc {
                text.push_str(" BC");
            }
            text
        }
        V::Bytes(b) => format!("\\x{}", hex(b, false)),
        V::Text(s) => s.clone(),
        V::Array(elements) => {
            let items: Vec<String> = elements
                .iter()
                .map(|e| match e {
                    None => "NULL".into(),
                    Some(e) => array_item(&pg_text(e)),
                })
                .collect();
            format!("{{{}}}", items.join(","))
        }
    }
}

/// An element as `array_out` writes it: quoted if empty, NULL in any case, or holding
/// `{},"\` or ASCII white space; `"` and `\` escaped inside quotes.
fn array_item(text: &str) -> String {
    let quote = text.is_empty()
        || text.eq_ignore_ascii_case("NULL")
        || text.contains([
            '{', '}', ',', '"', '\\', ' ', '\t', '\n', '\r', '\x0B', '\x0C',
        ]);
    if !quote {
        return text.to_owned();
    }
    let mut out = String::from('"');
    for c in text.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

fn uuid_text(u: &[u8; 16]) -> String {
    let h = hex(u, false);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

fn hex(bytes: &[u8], upper: bool) -> String {
    bytes
        .iter()
        .map(|b| {
            if upper {
                format!("{b:02X}")
            } else {
                format!("{b:02x}")
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// What ClickHouse shows for the stored value (`Col::select`).

/// The value as `Col::select` shows it after the round trip, for a column of `ty` under the
/// server's `limits` and the default out-of-range policy (FAIL: NaN and ±Infinity numerics
/// are NULL in Nullable columns and never generated elsewhere).
pub fn clickhouse_text(v: Option<&V>, ty: Ty, limits: &Limits) -> String {
    let Some(v) = v else {
        return "NULL".into();
    };
    match v {
        V::I16(n) => n.to_string(),
        V::I32(n) => n.to_string(),
        V::I64(n) => n.to_string(),
        V::Oid(n) => n.to_string(),
        V::F32(f) => f.to_bits().to_string(),
        V::F64(f) => f.to_bits().to_string(),
        V::Num(Num::NaN | Num::Infinity { .. }) => "NULL".into(),
        V::Num(Num::Value {
            negative,
            int,
            frac,
        }) => {
            let scale = match ty {
                Ty::Numeric { s, .. } => s as usize,
                _ => 38,
            };
            assert!(frac.len() <= scale, "generated within the scale");
            let frac = frac.trim_end_matches('0');
            let zero = int.is_empty() && frac.is_empty();
            let sign = if *negative && !zero { "-" } else { "" };
            let int = if int.is_empty() { "0" } else { int };
            if frac.is_empty() {
                format!("{sign}{int}")
            } else {
                format!("{sign}{int}.{frac}")
            }
        }
        V::Bool(b) => b.to_string(),
        V::Uuid(u) => uuid_text(u),
        V::Date(d) => {
            let unix = (i64::from(*d) + PG_EPOCH_DAYS).clamp(
                i64::from(limits.date_min_days),
                i64::from(limits.date_max_days),
            );
            let (y, m, d) = civil(unix);
            format!("{y:04}-{m:02}-{d:02}")
        }
        V::Ts { micros, .. } => {
            let unix = micros
                .saturating_add(PG_EPOCH_MICROS)
                .clamp(limits.timestamp_min_micros, limits.timestamp_max_micros);
            let (y, m, d) = civil(unix.div_euclid(86_400_000_000));
            let in_day = unix.rem_euclid(86_400_000_000);
            let secs = in_day / 1_000_000;
            format!(
                "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{:06}",
                secs / 3600,
                secs / 60 % 60,
                secs % 60,
                in_day % 1_000_000
            )
        }
        V::Bytes(b) => hex(b, true),
        V::Text(s) => hex(s.as_bytes(), true),
        V::Array(elements) => elements
            .iter()
            .map(|e| clickhouse_text(e.as_ref(), ty, limits))
            .collect::<Vec<_>>()
            .join(";"),
    }
}

/// The element type oid of an array column (0 for scalars).
pub fn element_oid(col: &Col) -> u32 {
    if col.array { col.ty.pg().0 } else { 0 }
}
