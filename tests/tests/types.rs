//! Every type of DESIGN.md §5 through the snapshot data path: a real Postgres table with NULLs
//! and edge values is described, its ClickHouse table created, read with binary COPY, decoded,
//! transcoded to RowBinary and inserted into the real ClickHouse engine; then both sides are
//! compared value by value as canonical text.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use clickhouse::Client;
use ferry_clickhouse::ddl::{
    IS_DELETED_COLUMN, Ident, VERSION_COLUMN, create_database, create_table,
};
use ferry_clickhouse::sink::Sink;
use ferry_clickhouse::transcode::{RowTranscoder, select_list};
use ferry_clickhouse::types::MappingOptions;
use ferry_postgres::copy::CopyDecoder;
use ferry_postgres::schema::describe_table;
use ferry_proto::v1::{ClickHouseDestination, PipeSettings};
use ferry_testkit::clickhouse::ClickHouse;
use ferry_testkit::postgres::Postgres;
use tokio_stream::StreamExt as _;

#[tokio::test]
async fn every_type_survives_the_snapshot_path_value_for_value() {
    let pg = Postgres::start().await.unwrap();
    let ch = ClickHouse::start().await.unwrap();
    let db = pg.client("postgres").await.unwrap();
    db.batch_execute(common::SCHEMA).await.unwrap();
    // The range the server holds, as Setup probes it: nothing inside it is clamped.
    let sink = Sink::new(
        &ClickHouseDestination {
            url: ch.url(),
            database: "dest".into(),
            user: "default".into(),
        },
        "",
    );
    let limits = sink.probe_limits().await.unwrap();
    assert_eq!(
        (limits.date_min_days, limits.date_max_days),
        (-719_528, 2_932_896),
        "0000-01-01 ..= 9999-12-31"
    );
    assert_eq!(
        (limits.timestamp_min_micros, limits.timestamp_max_micros),
        (-62_167_219_200_000_000, 253_402_300_799_999_999)
    );
    let options = MappingOptions::for_pipe(&PipeSettings::default(), Some(&limits));

    let schema = describe_table(&db, "public", "everything").await.unwrap();
    let clickhouse = Client::default().with_url(ch.url());
    clickhouse
        .query(&create_database("dest"))
        .execute()
        .await
        .unwrap();
    clickhouse
        .query(&create_table("dest", "everything", &schema, options).unwrap())
        .execute()
        .await
        .unwrap();

    // COPY with text casts where the transcoder wants text, as the snapshot worker reads.
    let select = select_list(&schema.columns, options);
    let copy = format!(
        "COPY (SELECT {} FROM public.everything) TO STDOUT (FORMAT binary)",
        select.join(", ")
    );
    let stream = db.copy_out(copy.as_str()).await.unwrap();
    tokio::pin!(stream);
    let mut decoder = CopyDecoder::new(schema.columns.len());
    let mut transcoder = RowTranscoder::new(&schema.columns, options);
    let mut body = Vec::new();
    let mut rows = 0;
    while let Some(chunk) = stream.next().await {
        rows += decoder
            .feed(&chunk.unwrap(), |fields| {
                transcoder.write_row(fields, 0, false, &mut body)
            })
            .unwrap();
    }
    decoder.finish().unwrap();
    assert_eq!(rows, 4);
    let adjustments = transcoder.adjustments();
    assert_eq!(adjustments.nulled, 1, "the NaN numeric");
    assert_eq!(
        adjustments.clamped, 2,
        "date infinity, timestamp -infinity (timestamptz 1800 is in range)"
    );
    assert_eq!(adjustments.emptied, 8, "the NULL arrays of rows 1 and 4");

    let columns: Vec<String> = schema
        .columns
        .iter()
        .map(|c| Ident(&c.name).to_string())
        .chain([
            Ident(VERSION_COLUMN).to_string(),
            Ident(IS_DELETED_COLUMN).to_string(),
        ])
        .collect();
    let mut insert = clickhouse.insert_formatted_with(format!(
        "INSERT INTO dest.everything ({}) FORMAT RowBinary",
        columns.join(", ")
    ));
    insert.send(body.into()).await.unwrap();
    insert.end().await.unwrap();

    common::compare_everything(&db, &clickhouse, "dest", "everything").await;
}

/// The same rows through the text path (what text-mode replication delivers) and the binary
/// path (what the snapshot reads) give byte-identical RowBinary.
#[tokio::test]
async fn text_and_binary_values_transcode_identically() {
    let pg = Postgres::start().await.unwrap();
    let db = pg.client("postgres").await.unwrap();
    db.batch_execute(common::SCHEMA).await.unwrap();
    db.batch_execute("SET DateStyle = ISO; SET TimeZone = 'UTC'; SET bytea_output = hex;")
        .await
        .unwrap();
    let options = MappingOptions::default();
    let schema = describe_table(&db, "public", "everything").await.unwrap();
    let select = select_list(&schema.columns, options);

    let copy = format!(
        "COPY (SELECT {} FROM public.everything ORDER BY id) TO STDOUT (FORMAT binary)",
        select.join(", ")
    );
    let stream = db.copy_out(copy.as_str()).await.unwrap();
    tokio::pin!(stream);
    let mut decoder = CopyDecoder::new(schema.columns.len());
    let mut binary = RowTranscoder::new(&schema.columns, options);
    let mut binary_rows = Vec::new();
    while let Some(chunk) = stream.next().await {
        decoder
            .feed(&chunk.unwrap(), |fields| {
                let mut row = Vec::new();
                binary.write_row(fields, 9, false, &mut row)?;
                binary_rows.push(row);
                Ok::<_, ferry_clickhouse::transcode::TranscodeError>(())
            })
            .unwrap();
    }

    let text_rows = db
        .simple_query(&format!(
            "SELECT {} FROM public.everything ORDER BY id",
            select.join(", ")
        ))
        .await
        .unwrap();
    let mut text = RowTranscoder::new(&schema.columns, options);
    let mut compared = 0;
    for message in text_rows {
        let tokio_postgres::SimpleQueryMessage::Row(row) = message else {
            continue;
        };
        let values: Vec<Option<&[u8]>> = (0..row.len())
            .map(|i| row.get(i).map(str::as_bytes))
            .collect();
        let mut encoded = Vec::new();
        text.write_text_row(values, 9, false, &mut encoded).unwrap();
        assert_eq!(
            encoded, binary_rows[compared],
            "row {compared} differs between text and binary"
        );
        compared += 1;
    }
    assert_eq!(compared, binary_rows.len());
    assert_eq!(text.adjustments(), binary.adjustments());
}
