//! Values at the edge of what ClickHouse holds, through the real services: dates and
//! timestamps land exactly across the whole range the server holds (probed at Setup) and are
//! clamped only beyond it; numerics a Decimal cannot hold fail the pipe with a remedy that
//! names real settings, or land exactly as text, or are clamped and counted, as the pipe says.
//! Every alteration is counted per column in GetPipe, from the snapshot and from CDC.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;

use common::stack::{Stack, WITHIN};
use ferry_proto::v1::{
    AlterationKind, OutOfRange, Pipe, PipeMode, PipeState, UnconstrainedNumeric,
};
use ferry_testkit::wait;

/// The bounds of the test server (ClickHouse 26): 0000-01-01 ..= 9999-12-31.
const DATE_MIN: i64 = -719_528;
const DATE_MAX: i64 = 2_932_896;
const MICROS_MIN: i64 = -62_167_219_200_000_000;
const MICROS_MAX: i64 = 253_402_300_799_999_999;

/// Altered counts of the pipe's one table, by (column, kind).
fn altered(pipe: &Pipe) -> HashMap<(String, AlterationKind), u64> {
    pipe.status
        .iter()
        .flat_map(|s| &s.tables)
        .flat_map(|t| &t.altered)
        .map(|a| ((a.column.clone(), a.kind()), a.count))
        .collect()
}

/// Dates and timestamps as days / microseconds since 1970, clamped to the server's bounds
/// (the documented alteration); everything inside them exactly as Postgres has it.
const PG_DATES: &str = "SELECT id::text,
   (CASE WHEN d = 'infinity' THEN {dmax} WHEN d = '-infinity' THEN {dmin}
         ELSE greatest({dmin}, least({dmax}, d - '1970-01-01'::date)) END)::text,
   (CASE WHEN ts = 'infinity' THEN {tmax} WHEN ts = '-infinity' THEN {tmin}
         ELSE greatest({tmin}, least({tmax}, (extract(epoch FROM ts) * 1000000)::int8)) END)::text,
   (CASE WHEN tz = 'infinity' THEN {tmax} WHEN tz = '-infinity' THEN {tmin}
         ELSE greatest({tmin}, least({tmax}, (extract(epoch FROM tz) * 1000000)::int8)) END)::text
 FROM dates ORDER BY dates.id";

const CH_DATES: &str = "SELECT toString(id), toString(toInt32(d)), \
   toString(toUnixTimestamp64Micro(ts)), toString(toUnixTimestamp64Micro(tz)) \
   FROM d_dates.dates FINAL WHERE _ferry_is_deleted = 0 ORDER BY id";

/// Inserts one row per edge value, ids from `first`.
async fn insert_edge_dates(db: &tokio_postgres::Client, first: i32) {
    let values = [
        ("0001-01-01", "0001-01-01 00:00:00"),
        ("1899-12-31", "1899-12-31 23:59:59.999999"),
        ("2300-01-01", "2300-01-01 00:00:00"),
        ("9999-12-31", "9999-12-31 23:59:59.999999"),
        // Year 1 BC is ClickHouse's year 0, inside the range.
        ("0001-12-31 BC", "0001-12-31 12:00:00 BC"),
        // Beyond the server's range on both sides, and infinity: clamped.
        ("4713-01-01 BC", "4713-01-01 00:00:00 BC"),
        ("12000-06-01", "12000-06-01 00:00:00"),
        ("infinity", "infinity"),
        ("-infinity", "-infinity"),
    ];
    for (i, (d, ts)) in values.iter().enumerate() {
        let id = first + i32::try_from(i).unwrap();
        db.execute(
            "INSERT INTO dates VALUES ($1, $2::text::date, $3::text::timestamp, $3::text::timestamptz)",
            &[&id, d, ts],
        )
        .await
        .unwrap();
    }
}

#[tokio::test]
async fn dates_and_timestamps_land_exactly_across_the_servers_range_and_clamps_are_counted() {
    let stack = Stack::start(
        "SET timezone = 'UTC';
         ALTER DATABASE postgres SET timezone = 'UTC';
         CREATE TABLE dates (id int PRIMARY KEY, d date, ts timestamp, tz timestamptz);",
    )
    .await;
    insert_edge_dates(&stack.db, 1).await;
    let spec = stack.spec_into("d_dates", "dates", &["dates"], PipeMode::SnapshotAndCdc);
    let running = stack.create(spec).await;
    let pg_sql = PG_DATES
        .replace("{dmin}", &DATE_MIN.to_string())
        .replace("{dmax}", &DATE_MAX.to_string())
        .replace("{tmin}", &MICROS_MIN.to_string())
        .replace("{tmax}", &MICROS_MAX.to_string());
    assert_eq!(
        stack.ch_rows(CH_DATES).await,
        Some(stack.pg_rows(&pg_sql).await),
        "snapshot"
    );
    // The four values beyond the range (4713 BC, 12000, ±infinity) of each column, no more.
    let expected = |n: u64| {
        ["d", "ts", "tz"]
            .map(|c| ((c.to_owned(), AlterationKind::Clamped), n))
            .into_iter()
            .collect::<HashMap<_, _>>()
    };
    assert_eq!(altered(&running), expected(4), "{:?}", running.status);

    // The same values through CDC (text), after the snapshot.
    insert_edge_dates(&stack.db, 101).await;
    stack.converge(&pg_sql, CH_DATES).await;
    let counted = wait::until(WITHIN, || async {
        let pipe = stack.pipe("dates").await?;
        (altered(&pipe) == expected(8)).then_some(())
    })
    .await;
    assert!(counted.is_some(), "{:?}", stack.status("dates").await);
    // And `ferry get` shows them.
    let output = std::process::Command::new(ferry_testkit::ferry::bin_dir().join("ferry"))
        .args(["--addr", &stack.coordinator.url(), "get", "dates"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    for column in ["d", "ts", "tz"] {
        let line = format!("altered   public.dates.{column}: 8 clamped");
        assert!(text.contains(&line), "{line} missing from:\n{text}");
    }
}

/// 45 integer digits: more than Decimal(76, 38) holds.
const BIG: &str = "123456789012345678901234567890123456789012345.5";

#[tokio::test]
async fn numerics_beyond_decimal_fail_with_a_real_remedy_or_land_as_the_pipe_says() {
    let stack = Stack::start(&format!(
        "CREATE TABLE big (id int PRIMARY KEY, n numeric);
         INSERT INTO big VALUES (1, 1.25), (2, '{BIG}'), (3, '-{BIG}');
         CREATE TABLE later (id int PRIMARY KEY, n numeric);
         CREATE TABLE docs (id int PRIMARY KEY, jb jsonb, js json);
         INSERT INTO docs VALUES (1, '{{\"b\": [1, 2.5], \"a\": \"x\"}}', '{{\"k\": 1}}'), (2, NULL, NULL);"
    ))
    .await;
    // Each pipe into its own database d_<name>.
    let spec = |name: &str, table: &str, mode: PipeMode| {
        stack.spec_into(&format!("d_{name}"), name, &[table], mode)
    };
    let mut json = spec("json", "docs", PipeMode::SnapshotAndCdc);
    json.tables[0]
        .column_types
        .insert("jb".into(), "JSON".into());
    json.tables[0]
        .column_types
        .insert("js".into(), "JSON".into());
    let mut unfit = spec("unfit", "big", PipeMode::SnapshotAndCdc);
    unfit.tables[0]
        .column_types
        .insert("n".into(), "JSON".into());
    let mut as_string = spec("as_string", "big", PipeMode::SnapshotAndCdc);
    as_string.settings.as_mut().unwrap().unconstrained_numeric =
        UnconstrainedNumeric::String.into();
    let mut overridden = spec("overridden", "big", PipeMode::SnapshotAndCdc);
    overridden.tables[0]
        .column_types
        .insert("n".into(), "String".into());
    let mut clamped = spec("clamped", "big", PipeMode::SnapshotAndCdc);
    clamped.settings.as_mut().unwrap().out_of_range = OutOfRange::Clamp.into();
    for pipe in [
        json,
        unfit,
        spec("fails", "big", PipeMode::SnapshotAndCdc),
        spec("fails_cdc", "later", PipeMode::CdcOnly),
        as_string,
        overridden,
        clamped,
    ] {
        stack.submit(pipe).await.unwrap();
    }

    // A type the spec does not support is refused at once, naming the field.
    let mut unsupported = spec("refused", "big", PipeMode::SnapshotAndCdc);
    unsupported.tables[0]
        .column_types
        .insert("n".into(), "Float64".into());
    let refused = stack.submit(unsupported).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(
        refused.message().contains("spec.tables[0].column_types[n]"),
        "{}",
        refused.message()
    );
    // A supported type the column cannot take is refused by Setup, naming the field.
    let failed = stack.wait_state("unfit", PipeState::Failed).await;
    let error = failed.status.unwrap().error.unwrap();
    assert!(
        error.message.contains("spec.tables[0].column_types[n]"),
        "{error:?}"
    );
    assert!(error.remedy.contains("ferry delete"), "{error:?}");

    // JSON where the server has it: the same document (ClickHouse re-serialises it).
    stack.wait_state("json", PipeState::Running).await;
    let docs = stack
        .ch_rows(
            "SELECT toString(id), ifNull(toString(jb), 'NULL'), ifNull(toString(js), 'NULL') \
             FROM d_json.docs FINAL ORDER BY id",
        )
        .await
        .unwrap();
    assert_eq!(docs.len(), 2, "{docs:?}");
    let same = stack
        .db
        .query_one(
            "SELECT $1::text::jsonb = jb AND $2::text::jsonb = js::jsonb FROM docs WHERE id = 1",
            &[&docs[0][1], &docs[0][2]],
        )
        .await
        .unwrap()
        .get::<_, bool>(0);
    assert!(same, "{docs:?}");
    assert_eq!(
        docs[1][1..],
        [Some("NULL".to_owned()), Some("NULL".to_owned())],
        "{docs:?}"
    );

    // Default (Decimal(76, 38), FAIL): the snapshot fails the pipe, naming what to change.
    let failed = stack.wait_state("fails", PipeState::Failed).await;
    let error = failed.status.unwrap().error.unwrap();
    assert_eq!(error.table, "public.big", "{error:?}");
    assert!(error.message.contains("column n"), "{error:?}");
    for needed in [
        "--column-type public.big.n=String",
        "column_types",
        "--unconstrained-numeric string",
        "settings.out_of_range",
        "ferry delete",
    ] {
        assert!(error.remedy.contains(needed), "{needed}: {}", error.remedy);
    }

    // The same through CDC: a fatal stream error with the same remedy.
    stack.wait_state("fails_cdc", PipeState::Running).await;
    stack
        .db
        .batch_execute(&format!("INSERT INTO later VALUES (1, '{BIG}')"))
        .await
        .unwrap();
    let failed = stack.wait_state("fails_cdc", PipeState::Failed).await;
    let error = failed.status.unwrap().error.unwrap();
    assert_eq!(error.table, "public.later", "{error:?}");
    assert!(
        error.remedy.contains("--column-type public.later.n=String"),
        "{}",
        error.remedy
    );

    // As text (the setting, or the column's type): Postgres's exact text, snapshot and CDC.
    for name in ["as_string", "overridden"] {
        stack.wait_state(name, PipeState::Running).await;
    }
    stack
        .db
        .batch_execute(&format!(
            "INSERT INTO big VALUES (4, '-0.{}1')",
            "0".repeat(60)
        ))
        .await
        .unwrap();
    for name in ["as_string", "overridden"] {
        stack
            .converge(
                "SELECT id::text, n::text FROM big",
                &format!(
                    "SELECT toString(id), n FROM d_{name}.big FINAL WHERE _ferry_is_deleted = 0"
                ),
            )
            .await;
    }

    // CLAMP: saturated to Decimal(76, 38)'s bounds, and counted for the column.
    let running = stack.wait_state("clamped", PipeState::Running).await;
    let nines = format!("{}.{}", "9".repeat(38), "9".repeat(38));
    let sql = "SELECT toString(id), toString(n) FROM d_clamped.big FINAL \
               WHERE _ferry_is_deleted = 0 AND id <= 3 ORDER BY id";
    let row = |id: &str, n: &str| vec![Some(id.to_owned()), Some(n.to_owned())];
    assert_eq!(
        stack.ch_rows(sql).await.unwrap(),
        [
            row("1", "1.25"),
            row("2", &nines),
            row("3", &format!("-{nines}"))
        ]
    );
    assert_eq!(
        altered(&running),
        HashMap::from([(("n".to_owned(), AlterationKind::Clamped), 2)]),
        "{:?}",
        running.status
    );
}
