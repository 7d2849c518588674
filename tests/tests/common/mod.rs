//! What several end-to-end tests share: a table with every type of DESIGN.md §5 and its
//! value-by-value comparison between Postgres and ClickHouse.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod reload;
pub mod stack;

use clickhouse::Client;

pub const SCHEMA: &str = "
SET timezone = 'UTC';
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE DOMAIN positive AS integer CHECK (VALUE > 0);
CREATE TABLE everything (
  id bigint PRIMARY KEY,
  i2 smallint, i4 integer, i8 bigint, o oid,
  f4 real, f8 double precision,
  n12 numeric(12,2), n60 numeric(60,20), nu numeric,
  b boolean, t text, vc varchar(10), c char(3), nm name,
  ba bytea, u uuid, d date, ts timestamp, tstz timestamptz,
  tm time, tmz timetz, iv interval, js json, jb jsonb,
  ai integer[], at text[], an numeric(10,2)[],
  e mood, ae mood[],
  ip inet, net cidr, mac macaddr, cash money, bits bit(4), vb varbit, x xml, tsv tsvector,
  pt point, rng int4range, dom positive
);
INSERT INTO everything (id) VALUES (1);
INSERT INTO everything VALUES (2,
  12, 1234, 123456789012, 42,
  1.5, 2.25,
  1234.50, 12345678901234567890.12345678901234567890, 3.14159265358979323846264338327950288,
  true, 'plain', 'varchar', 'ab', 'a_name',
  '\\xdeadbeef', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '2024-02-29', '2024-02-29 13:14:15.123456',
  '2024-02-29 13:14:15.654321+02',
  '13:14:15', '13:14:15+02', '1 year 2 mons 3 days 04:05:06.7', '{\"a\": [1, 2]}', '{\"b\": {\"c\": null}}',
  '{1,NULL,3}', '{\"x\",NULL,\"\"}', '{1.10,NULL,-2.25}',
  'happy', '{sad,happy}',
  '192.168.0.1/24', '10.0.0.0/8', '08:00:2b:01:02:03', 12.34, B'1010', B'101', '<a>1</a>', 'a fat cat',
  '(1,2)', '[1,10)', 7);
INSERT INTO everything VALUES (3,
  -32768, 2147483647, -9223372036854775808, 4294967295,
  'NaN', '-Infinity',
  -9999999999.99, -0.00000000000000000001, 'NaN',
  false, '☃ ünïcødé 𝄞 \"quoted\" \\ backslash', '', 'x', '',
  '\\x', '00000000-0000-0000-0000-000000000000', 'infinity', '-infinity', '1800-01-01 00:00:00+00',
  '00:00:00', '23:59:59.999999-12', '-1 days', '[]', '[]',
  '{}', '{}', '{}',
  'sad', '{}',
  '::1', '::/0', 'ff:ff:ff:ff:ff:ff', -0.01, B'0000', B'', '', '',
  '(-1.5,0)', 'empty', 2147483647);
INSERT INTO everything (id, t, f4, f8, nu, d) VALUES
  (4, repeat('1 MB of text ', 80660), 3.4028235e38, 1e-300, '-123456789012345678901234567890.123456789', '1900-01-01');
";

/// Each column as canonical text: (Postgres expression, ClickHouse expression). The Postgres
/// side spells out the README's altered values: ±infinity clamped to the range the test server
/// holds (probed at Setup: 0000-01-01 ..= 9999-12-31 on ClickHouse 26), NaN numeric as NULL, a
/// NULL array as an empty one. Nothing inside the server's range is altered (tstz 1800).
pub const COMPARE: &[(&str, &str)] = &[
    ("i2::text", "toString(i2)"),
    ("i4::text", "toString(i4)"),
    ("i8::text", "toString(i8)"),
    ("o::text", "toString(o)"),
    ("b::text", "toString(b)"),
    ("trim_scale(n12)::text", "toString(n12)"),
    ("trim_scale(n60)::text", "toString(n60)"),
    (
        "CASE WHEN nu = 'NaN' THEN NULL ELSE trim_scale(round(nu, 38))::text END",
        "toString(nu)",
    ),
    ("t", "t"),
    ("vc", "vc"),
    ("CASE WHEN c IS NOT NULL THEN format('%s', c) END", "c"),
    ("nm::text", "nm"),
    ("encode(ba, 'hex')", "lower(hex(ba))"),
    ("u::text", "toString(u)"),
    (
        "CASE WHEN d = 'infinity' THEN '9999-12-31' WHEN d = '-infinity' THEN '0000-01-01' ELSE d::text END",
        "toString(d)",
    ),
    (
        "CASE WHEN ts = 'infinity' THEN '9999-12-31 23:59:59.999999' WHEN ts = '-infinity' THEN '0000-01-01 00:00:00.000000' ELSE to_char(ts, 'YYYY-MM-DD HH24:MI:SS.US') END",
        "toString(ts)",
    ),
    (
        "CASE WHEN tstz = 'infinity' THEN '9999-12-31 23:59:59.999999' WHEN tstz = '-infinity' THEN '0000-01-01 00:00:00.000000' ELSE to_char(tstz, 'YYYY-MM-DD HH24:MI:SS.US') END",
        "toString(tstz)",
    ),
    ("tm::text", "tm"),
    ("tmz::text", "tmz"),
    ("iv::text", "iv"),
    ("js::text", "js"),
    ("jb::text", "jb"),
    (
        "'[' || coalesce(array_to_string(ai, ',', 'NULL'), '') || ']'",
        "concat('[', arrayStringConcat(arrayMap(x -> ifNull(toString(x), 'NULL'), ai), ','), ']')",
    ),
    (
        "'[' || coalesce(array_to_string(at, ',', 'NULL'), '') || ']'",
        "concat('[', arrayStringConcat(arrayMap(x -> ifNull(x, 'NULL'), at), ','), ']')",
    ),
    (
        "(SELECT '[' || coalesce(string_agg(coalesce(trim_scale(x)::text, 'NULL'), ',' ORDER BY i), '') || ']' FROM unnest(an) WITH ORDINALITY AS u(x, i))",
        "concat('[', arrayStringConcat(arrayMap(x -> ifNull(toString(x), 'NULL'), an), ','), ']')",
    ),
    ("e::text", "toString(e)"),
    (
        "'[' || coalesce(array_to_string(ae, ','), '') || ']'",
        "concat('[', arrayStringConcat(arrayMap(x -> ifNull(x, 'NULL'), ae), ','), ']')",
    ),
    // As Postgres prints it (a cast to text would add /32 to a host address).
    ("CASE WHEN ip IS NOT NULL THEN format('%s', ip) END", "ip"),
    ("net::text", "net"),
    ("mac::text", "mac"),
    ("cash::text", "cash"),
    ("bits::text", "bits"),
    ("vb::text", "vb"),
    ("x::text", "x"),
    ("tsv::text", "tsv"),
    ("pt::text", "pt"),
    ("rng::text", "rng"),
    ("dom::text", "toString(dom)"),
];

/// Columns compared as floats (text forms differ: "Infinity" vs "inf", exponents).
pub const FLOATS: &[&str] = &["f4", "f8"];

pub fn float_eq(pg: Option<&str>, ch: Option<&str>, single: bool) -> bool {
    match (pg, ch) {
        (None, None) => true,
        (Some(a), Some(b)) => {
            // Both sides print the shortest text that round-trips; parse back and compare bits.
            let (a, b): (f64, f64) = (a.parse().unwrap(), b.parse().unwrap());
            (a.is_nan() && b.is_nan()) || a == b || (a as f32) == (b as f32) && single
        }
        _ => false,
    }
}

/// Compares `everything` in Postgres with `<database>.<table>` in ClickHouse (FINAL), value by
/// value, every row; panics naming the first difference.
pub async fn compare_everything(
    pg: &tokio_postgres::Client,
    ch: &Client,
    database: &str,
    table: &str,
) {
    let pg_select: Vec<String> = COMPARE.iter().map(|(p, _)| p.to_string()).collect();
    let pg_rows = pg
        .query(
            &format!(
                "SELECT id, {}, f4::float8::text, f8::text FROM everything ORDER BY id",
                pg_select.join(", ")
            ),
            &[],
        )
        .await
        .unwrap();
    let ch_select: Vec<String> = COMPARE
        .iter()
        .map(|(_, c)| format!("toNullable(toString({c}))"))
        .collect();
    let bytes = ch
        .query(&format!(
            "SELECT toString(id), {}, toNullable(toString(f4)), toNullable(toString(f8)) \
             FROM {database}.{table} FINAL WHERE _ferry_is_deleted = 0 ORDER BY id FORMAT JSONCompactEachRow",
            ch_select.join(", ")
        ))
        .fetch_bytes("JSONCompactEachRow")
        .unwrap()
        .collect()
        .await
        .unwrap();
    let ch_rows: Vec<Vec<Option<String>>> = String::from_utf8(bytes.to_vec())
        .unwrap()
        .lines()
        .map(json_strings)
        .collect();
    assert_eq!(ch_rows.len(), pg_rows.len(), "row count");
    for (pg_row, ch_row) in pg_rows.iter().zip(&ch_rows) {
        let id: i64 = pg_row.get(0);
        assert_eq!(ch_row[0].as_deref(), Some(id.to_string().as_str()));
        for (i, (pg_expr, ch_expr)) in COMPARE.iter().enumerate() {
            let expected: Option<String> = pg_row.get(i + 1);
            assert_eq!(
                ch_row[i + 1],
                expected,
                "row {id}: {pg_expr} (postgres) vs {ch_expr} (clickhouse)"
            );
        }
        for (j, name) in FLOATS.iter().enumerate() {
            let at = COMPARE.len() + 1 + j;
            let expected: Option<String> = pg_row.get(at);
            assert!(
                float_eq(expected.as_deref(), ch_row[at].as_deref(), *name == "f4"),
                "row {id}: {name}: {expected:?} vs {:?}",
                ch_row[at]
            );
        }
    }
}

/// Parses one JSONCompactEachRow line of strings and nulls (all this test selects).
pub fn json_strings(line: &str) -> Vec<Option<String>> {
    let mut out = Vec::new();
    let mut chars = line
        .trim()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .chars()
        .peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        match chars.peek() {
            None => break,
            Some('n') => {
                for _ in 0..4 {
                    chars.next();
                }
                out.push(None);
            }
            Some('"') => {
                chars.next();
                let mut s = String::new();
                while let Some(c) = chars.next() {
                    match c {
                        '"' => break,
                        '\\' => match chars.next() {
                            Some('n') => s.push('\n'),
                            Some('t') => s.push('\t'),
                            Some('r') => s.push('\r'),
                            Some('b') => s.push('\u{8}'),
                            Some('f') => s.push('\u{c}'),
                            Some('u') => {
                                let hex: String = (0..4).filter_map(|_| chars.next()).collect();
                                let code = u32::from_str_radix(&hex, 16).unwrap();
                                s.push(char::from_u32(code).unwrap_or('\u{fffd}'));
                            }
                            Some(other) => s.push(other),
                            None => {}
                        },
                        c => s.push(c),
                    }
                }
                out.push(Some(s));
            }
            Some(other) => panic!("unexpected {other} in {line}"),
        }
    }
    out
}
