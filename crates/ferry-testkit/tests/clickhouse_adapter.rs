//! The chdb adapter speaks ClickHouse's HTTP interface as the `clickhouse` crate uses it:
//! inserts with and without LZ4, selects with schema validation, formatted RowBinary inserts,
//! query parameters, authentication failures and server error texts.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use clickhouse::Compression;
use clickhouse::error::Error;
use clickhouse::{Client, Row};
use ferry_testkit::clickhouse::ClickHouse;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Row, Serialize, Deserialize)]
struct Item {
    id: u64,
    name: String,
    score: Option<f64>,
    tags: Vec<String>,
}

fn items(from: u64, count: u64) -> Vec<Item> {
    (from..from + count)
        .map(|id| Item {
            id,
            name: format!("item ☃ {id}\twith\ttabs\nand newline"),
            score: (id % 3 != 0).then_some(id as f64 / 7.0),
            tags: (0..id % 4).map(|t| format!("t{t}")).collect(),
        })
        .collect()
}

async fn setup(ch: &ClickHouse, password: &str) -> Client {
    let admin = Client::default()
        .with_url(ch.url())
        .with_user("default")
        .with_password(password);
    admin
        .query("CREATE DATABASE IF NOT EXISTS d")
        .execute()
        .await
        .unwrap();
    admin
        .query(
            "CREATE TABLE IF NOT EXISTS d.items (id UInt64, name String, score Nullable(Float64), \
             tags Array(String)) ENGINE = ReplacingMergeTree ORDER BY id",
        )
        .execute()
        .await
        .unwrap();
    admin.with_database("d")
}

async fn insert(client: &Client, rows: &[Item]) {
    let mut insert = client.insert::<Item>("items").await.unwrap();
    for row in rows {
        insert.write(row).await.unwrap();
    }
    insert.end().await.unwrap();
}

#[tokio::test]
async fn inserts_with_and_without_lz4_and_selects_with_validation() {
    let ch = ClickHouse::start_with_password("pw").await.unwrap();
    let client = setup(&ch, "pw").await.with_validation(true);

    let plain = client.clone().with_compression(Compression::None);
    insert(&plain, &items(0, 1000)).await;
    let lz4 = client.clone().with_compression(Compression::Lz4);
    insert(&lz4, &items(1000, 50_000)).await;

    let rows = client
        .query("SELECT ?fields FROM items ORDER BY id")
        .fetch_all::<Item>()
        .await
        .unwrap();
    assert_eq!(rows.len(), 51_000);
    assert_eq!(rows, items(0, 51_000));

    // Query parameters (sent as multipart form fields by the crate).
    let count = client
        .query("SELECT count() FROM items WHERE id >= {low:UInt64} AND name != {name:String}")
        .param("low", 50_000u64)
        .param("name", "it's \\ 'quoted'")
        .fetch_one::<u64>()
        .await
        .unwrap();
    assert_eq!(count, 1000);
}

#[tokio::test]
async fn formatted_rowbinary_inserts_and_exchange_tables() {
    let ch = ClickHouse::start().await.unwrap();
    let client = setup(&ch, "").await;
    client
        .query("CREATE TABLE d.kv (k UInt32, v String) ENGINE = MergeTree ORDER BY k")
        .execute()
        .await
        .unwrap();
    // RowBinary encoded by hand, as Ferry's transcoder does for schemas known only at run time.
    let mut body = Vec::new();
    for k in 0u32..10_000 {
        body.extend_from_slice(&k.to_le_bytes());
        let v = format!("value-{k}");
        body.push(u8::try_from(v.len()).unwrap());
        body.extend_from_slice(v.as_bytes());
    }
    let mut insert = client.insert_formatted_with("INSERT INTO d.kv (k, v) FORMAT RowBinary");
    insert.send(body.into()).await.unwrap();
    insert.end().await.unwrap();
    let (count, sum) = client
        .query("SELECT count(), sum(k) FROM d.kv")
        .fetch_one::<(u64, u64)>()
        .await
        .unwrap();
    assert_eq!((count, sum), (10_000, (0..10_000u64).sum()));

    client
        .query("CREATE TABLE d.kv2 (k UInt32, v String) ENGINE = MergeTree ORDER BY k")
        .execute()
        .await
        .unwrap();
    client
        .query("EXCHANGE TABLES d.kv AND d.kv2")
        .execute()
        .await
        .unwrap();
    let moved = client
        .query("SELECT count() FROM d.kv2")
        .fetch_one::<u64>()
        .await
        .unwrap();
    assert_eq!(moved, 10_000);
}

#[tokio::test]
async fn wrong_password_and_server_errors_carry_clickhouse_codes() {
    let ch = ClickHouse::start_with_password("right").await.unwrap();
    let wrong = Client::default()
        .with_url(ch.url())
        .with_user("default")
        .with_password("wrong");
    let err = wrong.query("SELECT 1").fetch_one::<u8>().await.unwrap_err();
    let Error::BadResponse(text) = err else {
        panic!("expected a server error, got {err:?}");
    };
    assert!(text.contains("Code: 516"), "{text}");
    assert!(text.contains("Authentication failed"), "{text}");

    let client = Client::default()
        .with_url(ch.url())
        .with_user("default")
        .with_password("right");
    let err = client.query("SELEC 1").execute().await.unwrap_err();
    let Error::BadResponse(text) = err else {
        panic!("{err:?}")
    };
    assert!(text.contains("Code: 62"), "syntax error: {text}");
    let err = client
        .query("SELECT * FROM no_such_db.no_such_table")
        .execute()
        .await
        .unwrap_err();
    let Error::BadResponse(text) = err else {
        panic!("{err:?}")
    };
    assert!(
        text.contains("Code: 81") || text.contains("Code: 60"),
        "unknown table: {text}"
    );
    assert!(text.contains("DB::Exception"), "{text}");
}
