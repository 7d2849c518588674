//! Property tests of the text-form parsers: no string makes [`to_binary`] panic, whatever the
//! value kind; and arrays printed the way Postgres's `array_out` prints them parse back to
//! their elements.
//!
//! 2048 cases a test; `PROPTEST_CASES` sets another number (see the README's "Fuzzing").

use proptest::collection::vec;
use proptest::prelude::*;

use super::*;

fn scalar_kind() -> impl Strategy<Value = ValueKind> {
    prop_oneof![
        prop::sample::select(vec![
            ValueKind::Int(16),
            ValueKind::Int(32),
            ValueKind::Int(64),
            ValueKind::UInt32,
            ValueKind::Float(32),
            ValueKind::Float(64),
            ValueKind::Bool,
            ValueKind::Uuid,
            ValueKind::Date,
            ValueKind::Timestamp { utc: false },
            ValueKind::Timestamp { utc: true },
            ValueKind::Enum,
            ValueKind::Bytes,
            ValueKind::Text,
            ValueKind::Json,
        ]),
        (1u32..=76)
            .prop_flat_map(|precision| (Just(precision), 0..=precision))
            .prop_map(|(precision, scale)| ValueKind::Decimal { precision, scale }),
    ]
}

pub(crate) fn value_kind() -> impl Strategy<Value = ValueKind> {
    prop_oneof![
        3 => scalar_kind(),
        1 => scalar_kind().prop_map(|k| ValueKind::Array(Box::new(k))),
    ]
}

fn regex(pattern: &str) -> impl Strategy<Value = String> + use<> {
    proptest::string::string_regex(pattern).expect("a valid pattern")
}

/// A number field: mostly in the range a date or clock field takes, else of any length up
/// to past i64 (to reach overflow), sometimes signed.
fn number() -> BoxedStrategy<String> {
    prop_oneof![
        3 => regex("[0-9]{1,2}"),
        1 => regex("[0-9]{3,7}"),
        1 => regex("[+-]?[0-9]{8,21}"),
    ]
    .boxed()
}

/// A field that is mostly valid (`1..=max`), else any [`number`], so that one huge field
/// among valid ones reaches the arithmetic.
fn field(max: u32) -> BoxedStrategy<String> {
    prop_oneof![3 => (1..=max).prop_map(|n| format!("{n:02}")), 1 => number()].boxed()
}

fn date() -> impl Strategy<Value = String> {
    (number(), field(12), field(31), any::<bool>())
        .prop_map(|(y, m, d, bc)| format!("{y}-{m}-{d}{}", if bc { " BC" } else { "" }))
}

fn timestamp() -> impl Strategy<Value = String> {
    let fraction = prop::option::of(regex("[0-9]{0,7}"));
    let zone = prop::option::of((prop::sample::select(vec!['+', '-']), vec(field(59), 1..=3)));
    (date(), field(23), field(59), field(59), fraction, zone).prop_map(
        |(date, h, m, s, fraction, zone)| {
            let (date, bc) = match date.strip_suffix(" BC") {
                Some(d) => (d.to_owned(), " BC"),
                None => (date, ""),
            };
            let fraction = fraction.map(|f| format!(".{f}")).unwrap_or_default();
            let zone = zone
                .map(|(sign, fields)| format!("{sign}{}", fields.join(":")))
                .unwrap_or_default();
            format!("{date} {h}:{m}:{s}{fraction}{zone}{bc}")
        },
    )
}

/// Strings (for the parsers here and the transcoder) that reach past the first check of each parser: numbers of any length (overflow),
/// dates, times, zones, eras, numerics, hex, uuids, array literals; and arbitrary text.
pub(crate) fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        r#"[-+0-9.:eE \\xa-fA-FBCNaIinfty{}",\[\]=]{0,40}"#,
        number(),
        date(),
        timestamp(),
        r"-?[0-9]{0,90}(\.[0-9]{0,90})?",
        "[0-9a-fA-F+-]{30,40}",
        r"\\x[0-9a-fA-F+]{0,20}",
        // Array literals with bounds, quotes, escapes and NULLs.
        r#"(\[[0-9-]{1,3}:[0-9-]{1,3}\]=)?\{([^\x00]{0,6}|"[^\x00]{0,6}"|NULL)(,([^\x00]{0,6}|"[^\x00]{0,6}"|NULL)){0,4}\}"#,
    ]
}

/// Postgres's `array_out` for a one-dimensional text array: an element is quoted when it is
/// empty, spells NULL in any case, or holds `{`, `}`, `,`, `"`, `\` or ASCII white space
/// (`array_isspace`); inside quotes `"` and `\` are escaped with `\`. Bounds other than 1 are
/// printed first as `[lo:hi]=`.
fn array_out(elements: &[Option<String>], lower_bound: i32) -> String {
    let mut out = String::new();
    if lower_bound != 1 && !elements.is_empty() {
        let upper = i64::from(lower_bound) + elements.len() as i64 - 1;
        out.push_str(&format!("[{lower_bound}:{upper}]="));
    }
    out.push('{');
    for (i, element) in elements.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let Some(e) = element else {
            out.push_str("NULL");
            continue;
        };
        let quote = e.is_empty()
            || e.eq_ignore_ascii_case("NULL")
            || e.chars().any(|c| {
                matches!(
                    c,
                    '{' | '}' | ',' | '"' | '\\' | ' ' | '\t' | '\n' | '\r' | '\x0B' | '\x0C'
                )
            });
        if quote {
            out.push('"');
            for c in e.chars() {
                if c == '"' || c == '\\' {
                    out.push('\\');
                }
                out.push(c);
            }
            out.push('"');
        } else {
            out.push_str(e);
        }
    }
    out.push('}');
    out
}

/// The elements of a binary (`array_send`) text array.
fn array_elements(binary: &[u8]) -> Vec<Option<String>> {
    let word = |at: usize| i32::from_be_bytes(binary[at..at + 4].try_into().unwrap());
    if word(0) == 0 {
        assert_eq!(binary.len(), 12, "an empty array is its header alone");
        return Vec::new();
    }
    assert_eq!(word(0), 1, "one dimension");
    let count = usize::try_from(word(12)).unwrap();
    let mut at = 20;
    let mut values = Vec::new();
    for _ in 0..count {
        let len = word(at);
        at += 4;
        if len < 0 {
            values.push(None);
        } else {
            let len = usize::try_from(len).unwrap();
            values.push(Some(
                String::from_utf8(binary[at..at + len].to_vec()).unwrap(),
            ));
            at += len;
        }
    }
    assert_eq!(at, binary.len(), "trailing bytes after the elements");
    values
}

/// An element: any text Postgres can hold (no NUL), weighted towards the characters that
/// decide quoting, including white space that is not ASCII.
fn element() -> impl Strategy<Value = String> {
    prop_oneof![
        "[^\\x00]{0,8}",
        "[ a,{}\"\\\\\t\n\u{0B}\u{0C}\r\u{A0}\u{85}\u{2003}\u{3000}é☃]{0,8}",
        prop::sample::select(vec!["NULL", "null", "NuLl", " NULL", "", "\"", "\\"])
            .prop_map(String::from),
    ]
}

proptest! {
    #![proptest_config(crate::proptest_config(2048))]

    #[test]
    fn arbitrary_text_never_panics(kind in value_kind(), text in text()) {
        let mut out = vec![7u8; 3];
        if to_binary(&kind, text.as_bytes(), &mut out).is_ok() && !matches!(
            kind,
            ValueKind::Text | ValueKind::Enum | ValueKind::Json | ValueKind::Bytes
        ) {
            prop_assert!(!out.is_empty(), "{kind:?} {text:?} wrote nothing");
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(kind in value_kind(), bytes in vec(any::<u8>(), 0..64)) {
        let _ = to_binary(&kind, &bytes, &mut Vec::new());
    }

    #[test]
    fn arrays_printed_by_postgres_parse_to_their_elements(
        elements in vec(prop::option::weighted(0.85, element()), 0..8),
        lower_bound in prop_oneof![4 => Just(1), 1 => -5i32..5],
    ) {
        let literal = array_out(&elements, lower_bound);
        let mut binary = Vec::new();
        let parsed = to_binary(&ValueKind::Array(Box::new(ValueKind::Text)), literal.as_bytes(), &mut binary);
        prop_assert!(parsed.is_ok(), "{literal:?}: {parsed:?}");
        let back = array_elements(&binary);
        prop_assert!(back == elements, "{literal:?} parsed to {back:?}, not {elements:?}");
    }
}
