//! Round trips of generated rows of every mapped type: Postgres's binary and text forms
//! transcode to the same RowBinary, and that RowBinary, inserted into a real ClickHouse table
//! created by Ferry's DDL, reads back as exactly the values generated (clamped or NULL where
//! DESIGN.md §5 says so) and as exactly the bytes sent.
//!
//! The ClickHouse test runs a few cases of 64 rows by default (`FERRY_CLICKHOUSE_ROUND_TRIPS`
//! sets how many); the in-memory one runs 1024 cases, or `PROPTEST_CASES` (see the README's "Fuzzing").

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod values;

use std::sync::atomic::{AtomicUsize, Ordering};

use ferry_clickhouse::rowbinary::{RowSplitter, Shape};
use ferry_clickhouse::sink::Sink;
use ferry_clickhouse::transcode::RowTranscoder;
use ferry_clickhouse::types::{Limits, MappingOptions, oid};
use ferry_proto::v1::{ClickHouseDestination, ColumnSchema, PipeSettings, TableSchema};
use ferry_testkit::clickhouse::ClickHouse;
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use values::{Col, V, clickhouse_text, columns, element_oid, pg_binary, pg_text};

const ROWS: usize = 64;

/// The source table: `id int8` as its key, then every generated column.
fn schema(cols: &[Col]) -> TableSchema {
    let id = ColumnSchema {
        name: "id".into(),
        type_oid: oid::INT8,
        type_modifier: -1,
        type_kind: "b".into(),
        key_position: 1,
        ..Default::default()
    };
    TableSchema {
        source_schema: "public".into(),
        source_table: "everything".into(),
        columns: std::iter::once(id)
            .chain(cols.iter().map(Col::schema))
            .collect(),
        ..Default::default()
    }
}

/// One row's values, in column order.
fn row(cols: &[Col]) -> impl Strategy<Value = Vec<Option<V>>> + use<> {
    cols.iter().map(Col::values).collect::<Vec<_>>()
}

/// The row with key `id` in both Postgres forms, each transcoded; the two must agree.
fn transcode(
    cols: &[Col],
    binary: &mut RowTranscoder,
    text: &mut RowTranscoder,
    id: i64,
    values: &[Option<V>],
    out: &mut Vec<u8>,
) -> Result<(), TestCaseError> {
    let id_binary = id.to_be_bytes().to_vec();
    let bin: Vec<Option<Vec<u8>>> = std::iter::once(Some(id_binary))
        .chain(
            cols.iter()
                .zip(values)
                .map(|(c, v)| v.as_ref().map(|v| pg_binary(v, element_oid(c)))),
        )
        .collect();
    let txt: Vec<Option<String>> = std::iter::once(Some(id.to_string()))
        .chain(values.iter().map(|v| v.as_ref().map(pg_text)))
        .collect();
    let version = id as u128;
    let start = out.len();
    binary
        .write_row(bin.iter().map(|v| v.as_deref()), version, false, out)
        .map_err(|e| TestCaseError::fail(format!("binary row refused: {e}")))?;
    let mut from_text = Vec::new();
    text.write_text_row(
        txt.iter().map(|v| v.as_deref().map(str::as_bytes)),
        version,
        false,
        &mut from_text,
    )
    .map_err(|e| TestCaseError::fail(format!("text row {txt:?} refused: {e}")))?;
    prop_assert!(
        out[start..] == from_text[..],
        "text and binary forms transcode differently: {txt:?}"
    );
    Ok(())
}

fn options(limits: Option<&ferry_proto::v1::DestinationLimits>) -> MappingOptions {
    MappingOptions::for_pipe(&PipeSettings::default(), limits)
}

/// 1024 cases, unless `PROPTEST_CASES` asks for another number.
fn in_memory_config() -> Config {
    let config = Config::default();
    if std::env::var_os("PROPTEST_CASES").is_some() {
        config
    } else {
        Config {
            cases: 1024,
            ..config
        }
    }
}

proptest! {
    #![proptest_config(in_memory_config())]

    /// Every generated row's text form (logical replication in text mode) transcodes to
    /// the same bytes as its binary form (COPY binary), with the same values altered; and
    /// the row splits into its columns as verification reads them.
    #[test]
    fn proptest_text_and_binary_forms_transcode_alike(values in row(&columns())) {
        let cols = columns();
        let schema = schema(&cols);
        let options = options(None);
        let mut binary = RowTranscoder::new(&schema.columns, options);
        let mut text = RowTranscoder::new(&schema.columns, options);
        let mut out = Vec::new();
        transcode(&cols, &mut binary, &mut text, 1, &values, &mut out)?;
        prop_assert_eq!(binary.altered(), text.altered());
        let mut splitter = RowSplitter::for_columns(&schema.columns, options)
            .followed_by(Shape::Fixed(16))
            .followed_by(Shape::Fixed(1));
        prop_assert_eq!(splitter.split(&out), Ok(Some(out.len())));
    }
}

/// Inserts `rows` into a new table and reads them back, by value and as bytes.
async fn round_trip(
    sink: &Sink,
    client: &clickhouse::Client,
    limits: &Limits,
    options: MappingOptions,
    rows: &[Vec<Option<V>>],
) -> Result<(), TestCaseError> {
    static TABLES: AtomicUsize = AtomicUsize::new(0);
    let table = format!("t{}", TABLES.fetch_add(1, Ordering::Relaxed));
    let cols = columns();
    let schema = schema(&cols);
    sink.create_table(&table, &schema, options).await.unwrap();
    let mut binary = RowTranscoder::new(&schema.columns, options);
    let mut text = RowTranscoder::new(&schema.columns, options);
    let mut body = Vec::new();
    for (id, values) in rows.iter().enumerate() {
        transcode(&cols, &mut binary, &mut text, id as i64, values, &mut body)?;
    }
    let insert = sink.insert_statement(&table, &schema);
    if let Err(e) = sink.insert(&insert, body.clone().into()).await {
        return Err(TestCaseError::fail(format!("insert refused: {e}")));
    }

    // By value: each column shown as text ClickHouse computes, against the expected text.
    let shown: Vec<String> = cols.iter().map(Col::select).collect();
    // Every shown value is digits, hex, a date or NULL: tab-separated without escaping.
    let tsv = fetch(
        client,
        &format!(
            "SELECT id, {} FROM proptest.{table} ORDER BY id",
            shown.join(", ")
        ),
        "TabSeparatedRaw",
    )
    .await;
    let read: Vec<(i64, Vec<String>)> = String::from_utf8(tsv)
        .unwrap()
        .lines()
        .map(|line| {
            let mut fields = line.split('\t');
            let id = fields.next().unwrap().parse().unwrap();
            (id, fields.map(String::from).collect())
        })
        .collect();
    prop_assert_eq!(read.len(), rows.len());
    for ((id, got), (i, values)) in read.iter().zip(rows.iter().enumerate()) {
        prop_assert_eq!(*id, i as i64);
        for ((col, value), got) in cols.iter().zip(values).zip(got) {
            let expected = match value {
                // ClickHouse has no Nullable(Array): a NULL array is an empty one.
                None if col.array => String::new(),
                v => clickhouse_text(v.as_ref(), col.ty, limits),
            };
            prop_assert_eq!(
                got,
                &expected,
                "row {}, column {} ({:?}): {:?}",
                id,
                col.name,
                col.ty,
                value
            );
        }
    }

    // As bytes: ClickHouse gives back exactly the RowBinary Ferry sent.
    let names: Vec<String> = schema
        .columns
        .iter()
        .map(|c| format!("`{}`", c.name))
        .chain(["_ferry_version".into(), "_ferry_is_deleted".into()])
        .collect();
    let back = fetch(
        client,
        &format!(
            "SELECT {} FROM proptest.{table} ORDER BY id",
            names.join(", ")
        ),
        "RowBinary",
    )
    .await;
    prop_assert!(
        back == body,
        "RowBinary read back differs from what was inserted"
    );
    Ok(())
}

/// The whole answer to `sql` in `format`.
async fn fetch(client: &clickhouse::Client, sql: &str, format: &str) -> Vec<u8> {
    let mut cursor = client.query(sql).fetch_bytes(format).unwrap();
    let mut out = Vec::new();
    while let Some(chunk) = cursor.next().await.unwrap() {
        out.extend_from_slice(&chunk);
    }
    out
}

/// The round trip through a real ClickHouse: a few cases of 64 rows of every mapped type.
#[test]
fn proptest_clickhouse_round_trip_of_every_type() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let ch = runtime.block_on(ClickHouse::start()).unwrap();
    let sink = Sink::new(
        &ClickHouseDestination {
            url: ch.url(),
            database: "proptest".into(),
            user: "default".into(),
        },
        "",
    );
    let client = clickhouse::Client::default().with_url(ch.url());
    // The range this server holds, as Setup probes it: values beyond it are clamped to it.
    let probed = runtime.block_on(sink.probe_limits()).unwrap();
    runtime.block_on(sink.create_database()).unwrap();
    let options = options(Some(&probed));
    let limits = options.limits;

    let cases = std::env::var("FERRY_CLICKHOUSE_ROUND_TRIPS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(4);
    let mut runner = TestRunner::new(Config {
        cases,
        // Each shrinking step is a ClickHouse round trip: keep a failure's report quick.
        max_shrink_iters: 64,
        ..Config::default()
    });
    let rows = vec(row(&columns()), ROWS);
    let result = runner.run(&rows, |rows| {
        runtime.block_on(round_trip(&sink, &client, &limits, options, &rows))
    });
    if let Err(e) = result {
        panic!("{e}\nClickHouse log: {}", ch.log().display());
    }
}
