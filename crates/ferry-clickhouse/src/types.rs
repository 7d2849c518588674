//! Postgres → ClickHouse column types (DESIGN.md §5).
//!
//! The mapping works from type oids recorded at Setup (domains already resolved to their base
//! type), so it is a pure function of the recorded schema and gives the same answer on every
//! worker. Types without a faithful ClickHouse equivalent become `String` holding Postgres's own
//! text form, which loses nothing.

use ferry_proto::v1::{
    ColumnSchema, DestinationLimits, OutOfRange as ProtoOutOfRange, PipeSettings,
    UnconstrainedNumeric,
};

/// Built-in type oids (from `pg_type.dat`; fixed across Postgres versions).
pub mod oid {
    #![allow(missing_docs)]
    pub const BOOL: u32 = 16;
    pub const BYTEA: u32 = 17;
    pub const CHAR: u32 = 18;
    pub const NAME: u32 = 19;
    pub const INT8: u32 = 20;
    pub const INT2: u32 = 21;
    pub const INT4: u32 = 23;
    pub const TEXT: u32 = 25;
    pub const OID: u32 = 26;
    pub const JSON: u32 = 114;
    pub const FLOAT4: u32 = 700;
    pub const FLOAT8: u32 = 701;
    pub const BPCHAR: u32 = 1042;
    pub const VARCHAR: u32 = 1043;
    pub const DATE: u32 = 1082;
    pub const TIMESTAMP: u32 = 1114;
    pub const TIMESTAMPTZ: u32 = 1184;
    pub const NUMERIC: u32 = 1700;
    pub const UUID: u32 = 2950;
    pub const JSONB: u32 = 3802;
}

/// Largest precision ClickHouse's Decimal takes.
pub const MAX_DECIMAL_PRECISION: u32 = 76;

/// Choices the mapping leaves to the user, and what the destination server holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MappingOptions {
    /// Map `numeric` without precision to `String` instead of `Decimal(76, 38)`.
    pub unconstrained_numeric_as_string: bool,
    /// What happens to a numeric its Decimal cannot hold.
    pub out_of_range: OutOfRange,
    /// The date and timestamp range of the destination server.
    pub limits: Limits,
}

impl MappingOptions {
    /// The options of a pipe: its settings and the limits Setup recorded (`None` for a pipe
    /// created before Ferry probed them: the classic range).
    pub fn for_pipe(settings: &PipeSettings, limits: Option<&DestinationLimits>) -> Self {
        Self {
            unconstrained_numeric_as_string: settings.unconstrained_numeric()
                == UnconstrainedNumeric::String,
            out_of_range: match settings.out_of_range() {
                ProtoOutOfRange::Clamp => OutOfRange::Clamp,
                ProtoOutOfRange::Null => OutOfRange::Null,
                ProtoOutOfRange::Fail | ProtoOutOfRange::Unspecified => OutOfRange::Fail,
            },
            limits: limits.map_or_else(Limits::default, Limits::from),
        }
    }
}

/// What happens to a numeric value its Decimal column cannot hold.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OutOfRange {
    /// The row fails, and with it the pipe.
    #[default]
    Fail,
    /// Saturated to the Decimal's largest or smallest value.
    Clamp,
    /// NULL where the column is Nullable; a failure elsewhere.
    Null,
}

/// The range of Date32 and DateTime64 the destination server holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Days since 1970-01-01.
    pub date_min_days: i32,
    /// Days since 1970-01-01.
    pub date_max_days: i32,
    /// Microseconds since 1970-01-01 UTC.
    pub timestamp_min_micros: i64,
    /// Microseconds since 1970-01-01 UTC.
    pub timestamp_max_micros: i64,
}

impl Limits {
    /// The range every ClickHouse version since Date32 holds: 1900-01-01 ..= 2299-12-31.
    pub const CLASSIC: Self = Self {
        date_min_days: -25_567,
        date_max_days: 120_529,
        timestamp_min_micros: -2_208_988_800_000_000,
        timestamp_max_micros: 10_413_791_999_999_999,
    };
}

impl Default for Limits {
    fn default() -> Self {
        Self::CLASSIC
    }
}

impl From<&DestinationLimits> for Limits {
    fn from(limits: &DestinationLimits) -> Self {
        Self {
            date_min_days: limits.date_min_days,
            date_max_days: limits.date_max_days,
            timestamp_min_micros: limits.timestamp_min_micros,
            timestamp_max_micros: limits.timestamp_max_micros,
        }
    }
}

/// A ClickHouse type a user may choose for a column (`TableMapping.column_types`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TypeOverride {
    /// `String`: Postgres's text form of any value.
    String,
    /// `Decimal(P, S)` for a numeric.
    Decimal {
        /// Digits in all.
        precision: u32,
        /// Digits after the point.
        scale: u32,
    },
    /// `JSON` for json and jsonb.
    Json,
}

impl TypeOverride {
    /// Parses `String`, `JSON` or `Decimal(P, S)` (spaces optional); `None` for anything else.
    pub fn parse(text: &str) -> Option<Self> {
        match text.trim() {
            "String" => return Some(Self::String),
            "JSON" => return Some(Self::Json),
            _ => {}
        }
        let inner = text.trim().strip_prefix("Decimal(")?.strip_suffix(')')?;
        let (p, s) = inner.split_once(',')?;
        let (precision, scale): (u32, u32) = (p.trim().parse().ok()?, s.trim().parse().ok()?);
        ((1..=MAX_DECIMAL_PRECISION).contains(&precision) && scale <= precision)
            .then_some(Self::Decimal { precision, scale })
    }

    /// Whether a column of `column`'s type can take this type: String any, Decimal a
    /// numeric, JSON a json or jsonb.
    pub fn fits(self, column: &ColumnSchema) -> bool {
        let scalar = column.element_type_oid == 0;
        match self {
            Self::String => true,
            Self::Decimal { .. } => scalar && column.type_oid == oid::NUMERIC,
            Self::Json => scalar && matches!(column.type_oid, oid::JSON | oid::JSONB),
        }
    }
}

/// How a column's values are carried, which decides both its ClickHouse type and how the
/// transcoder writes its values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ValueKind {
    /// Int16, Int32, Int64.
    Int(u8),
    /// UInt32 (`oid`).
    UInt32,
    /// Float32 or Float64.
    Float(u8),
    /// Decimal(precision, scale).
    Decimal {
        /// Digits in all.
        precision: u32,
        /// Digits after the point.
        scale: u32,
    },
    /// Bool.
    Bool,
    /// UUID.
    Uuid,
    /// Date32.
    Date,
    /// DateTime64(6), or DateTime64(6, 'UTC') when `utc`.
    Timestamp {
        /// Source is `timestamptz`.
        utc: bool,
    },
    /// LowCardinality(String) holding an enum label.
    Enum,
    /// String with raw bytes (`bytea`).
    Bytes,
    /// String holding Postgres's text form of the value.
    Text,
    /// JSON, written as its text (a user's choice for json and jsonb).
    Json,
    /// Array of the element kind.
    Array(Box<ValueKind>),
}

impl ValueKind {
    /// The ClickHouse type of a non-null value of this kind.
    pub fn clickhouse_type(&self) -> String {
        match self {
            Self::Int(bits) => format!("Int{bits}"),
            Self::UInt32 => "UInt32".into(),
            Self::Float(bits) => format!("Float{bits}"),
            Self::Decimal { precision, scale } => format!("Decimal({precision}, {scale})"),
            Self::Bool => "Bool".into(),
            Self::Uuid => "UUID".into(),
            Self::Date => "Date32".into(),
            // A `timestamp` is wall-clock time: stored as if UTC, and typed UTC so a server in
            // another time zone shows it unshifted.
            Self::Timestamp { .. } => "DateTime64(6, 'UTC')".into(),
            Self::Enum => "LowCardinality(String)".into(),
            Self::Bytes | Self::Text => "String".into(),
            Self::Json => "JSON".into(),
            Self::Array(element) => format!("Array({})", element.nullable_type()),
        }
    }

    /// The type as an element that may be NULL (array elements always may).
    fn nullable_type(&self) -> String {
        match self {
            // ClickHouse has no Nullable(Array) and wants Nullable inside LowCardinality.
            Self::Array(_) => self.clickhouse_type(),
            Self::Enum => "LowCardinality(Nullable(String))".into(),
            other => format!("Nullable({})", other.clickhouse_type()),
        }
    }
}

/// The value kind of a scalar type oid of kind `type_kind` (`pg_type.typtype`).
fn scalar_kind(type_oid: u32, type_kind: &str, typmod: i32, options: MappingOptions) -> ValueKind {
    if type_kind == "e" {
        return ValueKind::Enum;
    }
    match type_oid {
        oid::INT2 => ValueKind::Int(16),
        oid::INT4 => ValueKind::Int(32),
        oid::INT8 => ValueKind::Int(64),
        oid::OID => ValueKind::UInt32,
        oid::FLOAT4 => ValueKind::Float(32),
        oid::FLOAT8 => ValueKind::Float(64),
        oid::BOOL => ValueKind::Bool,
        oid::UUID => ValueKind::Uuid,
        oid::DATE => ValueKind::Date,
        oid::TIMESTAMP => ValueKind::Timestamp { utc: false },
        oid::TIMESTAMPTZ => ValueKind::Timestamp { utc: true },
        oid::BYTEA => ValueKind::Bytes,
        oid::NUMERIC => numeric_kind(typmod, options),
        _ => ValueKind::Text,
    }
}

/// numeric(p, s): typmod is ((p << 16) | s) + 4, or -1 when unconstrained.
fn numeric_kind(typmod: i32, options: MappingOptions) -> ValueKind {
    if typmod < 4 {
        return if options.unconstrained_numeric_as_string {
            ValueKind::Text
        } else {
            ValueKind::Decimal {
                precision: MAX_DECIMAL_PRECISION,
                scale: 38,
            }
        };
    }
    let packed = (typmod - 4).unsigned_abs();
    let precision = (packed >> 16) & 0xffff;
    // Postgres 15 allows a negative scale (11-bit two's complement): numeric(5,-3) holds
    // 12345000, more digits than its precision, so no Decimal(p, s) fits; keep the text.
    let scale = packed & 0x7ff;
    if scale & 0x400 != 0
        || precision == 0
        || precision > MAX_DECIMAL_PRECISION
        || scale > precision
    {
        return ValueKind::Text;
    }
    ValueKind::Decimal { precision, scale }
}

/// How `column`'s values are carried: as the user chose (`clickhouse_type`, recorded by
/// Setup), else by the mapping of DESIGN.md §5.
pub fn value_kind(column: &ColumnSchema, options: MappingOptions) -> ValueKind {
    if !column.clickhouse_type.is_empty() {
        match TypeOverride::parse(&column.clickhouse_type) {
            Some(TypeOverride::String) => return ValueKind::Text,
            Some(TypeOverride::Json) => return ValueKind::Json,
            Some(TypeOverride::Decimal { precision, scale }) => {
                return ValueKind::Decimal { precision, scale };
            }
            // Setup records only types that parse; anything else keeps the default mapping.
            None => {}
        }
    }
    if column.element_type_oid != 0 {
        // Array typmods apply to the element (numeric(10,2)[] has the numeric's typmod).
        let element = scalar_kind(
            column.element_type_oid,
            &column.type_kind,
            column.type_modifier,
            options,
        );
        return ValueKind::Array(Box::new(element));
    }
    scalar_kind(
        column.type_oid,
        &column.type_kind,
        column.type_modifier,
        options,
    )
}

/// The ClickHouse column type of `column`, `Nullable` when the source column is.
pub fn column_type(column: &ColumnSchema, options: MappingOptions) -> String {
    let kind = value_kind(column, options);
    if column.nullable {
        kind.nullable_type()
    } else {
        kind.clickhouse_type()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn col(type_oid: u32, typmod: i32, nullable: bool) -> ColumnSchema {
        ColumnSchema {
            name: "c".into(),
            type_oid,
            type_modifier: typmod,
            nullable,
            type_kind: "b".into(),
            ..Default::default()
        }
    }

    fn numeric(p: i32, s: i32) -> i32 {
        ((p << 16) | s) + 4
    }

    #[test]
    fn design_table() {
        let o = MappingOptions::default();
        let cases = [
            (col(oid::INT2, -1, false), "Int16"),
            (col(oid::INT4, -1, false), "Int32"),
            (col(oid::INT8, -1, true), "Nullable(Int64)"),
            (col(oid::OID, -1, false), "UInt32"),
            (col(oid::FLOAT4, -1, false), "Float32"),
            (col(oid::FLOAT8, -1, false), "Float64"),
            (col(oid::NUMERIC, numeric(12, 2), false), "Decimal(12, 2)"),
            (
                col(oid::NUMERIC, numeric(76, 10), true),
                "Nullable(Decimal(76, 10))",
            ),
            (col(oid::NUMERIC, numeric(77, 0), false), "String"),
            (col(oid::NUMERIC, -1, false), "Decimal(76, 38)"),
            (col(oid::BOOL, -1, false), "Bool"),
            (col(oid::TEXT, -1, false), "String"),
            (col(oid::VARCHAR, 14, false), "String"),
            (col(oid::BPCHAR, 9, false), "String"),
            (col(oid::NAME, -1, false), "String"),
            (col(oid::BYTEA, -1, true), "Nullable(String)"),
            (col(oid::UUID, -1, false), "UUID"),
            (col(oid::DATE, -1, false), "Date32"),
            (col(oid::TIMESTAMP, -1, false), "DateTime64(6, 'UTC')"),
            (col(oid::NUMERIC, ((5 << 16) | 0x7fd) + 4, false), "String"), // numeric(5,-3)
            (
                col(oid::TIMESTAMPTZ, 3, true),
                "Nullable(DateTime64(6, 'UTC'))",
            ),
            (col(1083, -1, false), "String"), // time
            (col(1186, -1, false), "String"), // interval
            (col(oid::JSON, -1, false), "String"),
            (col(oid::JSONB, -1, false), "String"),
            (col(869, -1, false), "String"),  // inet
            (col(3614, -1, false), "String"), // tsvector
        ];
        for (column, expected) in cases {
            assert_eq!(column_type(&column, o), expected, "oid {}", column.type_oid);
        }
        let unconstrained = MappingOptions {
            unconstrained_numeric_as_string: true,
            ..Default::default()
        };
        assert_eq!(
            column_type(&col(oid::NUMERIC, -1, false), unconstrained),
            "String"
        );
    }

    #[test]
    fn user_chosen_types() {
        let o = MappingOptions::default();
        let mut n = col(oid::NUMERIC, -1, true);
        n.clickhouse_type = "Decimal(10, 2)".into();
        assert_eq!(column_type(&n, o), "Nullable(Decimal(10, 2))");
        n.clickhouse_type = "String".into();
        assert_eq!(column_type(&n, o), "Nullable(String)");
        let mut j = col(oid::JSONB, -1, false);
        j.clickhouse_type = "JSON".into();
        assert_eq!(column_type(&j, o), "JSON");
        assert_eq!(
            TypeOverride::parse("Decimal(76,38)"),
            Some(TypeOverride::Decimal {
                precision: 76,
                scale: 38
            })
        );
        for bad in [
            "Decimal(77, 0)",
            "Decimal(5, 6)",
            "Int64",
            "string",
            "Decimal(0, 0)",
        ] {
            assert_eq!(TypeOverride::parse(bad), None, "{bad}");
        }
        assert!(TypeOverride::String.fits(&col(oid::DATE, -1, false)));
        assert!(!TypeOverride::Json.fits(&col(oid::TEXT, -1, false)));
        assert!(
            !TypeOverride::Decimal {
                precision: 5,
                scale: 0
            }
            .fits(&col(oid::INT4, -1, false))
        );
    }

    #[test]
    fn enums_ranges_and_arrays() {
        let o = MappingOptions::default();
        let mut mood = col(90_000, -1, true);
        mood.type_kind = "e".into();
        assert_eq!(column_type(&mood, o), "LowCardinality(Nullable(String))");
        mood.nullable = false;
        assert_eq!(column_type(&mood, o), "LowCardinality(String)");
        let mut range = col(3904, -1, false);
        range.type_kind = "r".into();
        assert_eq!(column_type(&range, o), "String");
        let mut ints = col(1007, -1, true);
        ints.element_type_oid = oid::INT4;
        assert_eq!(column_type(&ints, o), "Array(Nullable(Int32))");
        let mut decimals = col(1231, numeric(10, 2), false);
        decimals.element_type_oid = oid::NUMERIC;
        assert_eq!(column_type(&decimals, o), "Array(Nullable(Decimal(10, 2)))");
        let mut moods = col(90_001, -1, false);
        moods.element_type_oid = 90_000;
        moods.type_kind = "e".into();
        assert_eq!(
            column_type(&moods, o),
            "Array(LowCardinality(Nullable(String)))"
        );
    }
}
