//! Inserts Ferry treats as durable are never asynchronous: a server (or a user profile) with
//! `async_insert = 1` would acknowledge rows still sitting in a buffer, and the checkpoint that
//! follows an insert would then cover rows a crash can lose.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use ferry_clickhouse::sink::Sink;
use ferry_proto::v1::ClickHouseDestination;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[tokio::test]
async fn every_insert_pins_async_insert_off() {
    // A stand-in HTTP server that records the request line of the one insert it receives.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut request = Vec::new();
        let mut buffer = [0u8; 4096];
        // Headers, then the chunked body up to its last (empty) chunk.
        while !request.ends_with(b"0\r\n\r\n") {
            let n = socket.read(&mut buffer).await.unwrap();
            if n == 0 {
                break;
            }
            request.extend_from_slice(&buffer[..n]);
        }
        socket
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            .await
            .unwrap();
        String::from_utf8_lossy(&request)
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned()
    });
    let sink = Sink::new(
        &ClickHouseDestination {
            url,
            database: "d".into(),
            user: "default".into(),
        },
        "",
    );
    sink.insert(
        "INSERT INTO d.t (id) FORMAT RowBinary",
        bytes::Bytes::from_static(&[1, 0, 0, 0]),
    )
    .await
    .unwrap();
    let request_line = server.await.unwrap();
    assert!(
        request_line.contains("async_insert=0"),
        "the insert did not pin async_insert: {request_line}"
    );
}
