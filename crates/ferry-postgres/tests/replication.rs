//! The pgoutput decoder against a real PostgreSQL 15 stream (binary mode), received with
//! pgwire-replication: every message kind Ferry relies on, including unchanged TOAST values,
//! primary-key changes, TRUNCATE and logical messages.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use ferry_postgres::pgoutput::{self, Message, OldTuple, Value};
use ferry_testkit::postgres::Postgres;
use pgwire_replication::{ReplicationClient, ReplicationConfig, ReplicationEvent, TlsConfig};

/// A change as the test looks at it.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    Relation(String, Vec<(String, bool)>),
    Insert(i64),
    Update {
        old_key: Option<i64>,
        new_key: i64,
        big: &'static str,
    },
    Delete(i64),
    Truncate(usize),
    Message(String),
}

fn int8(value: Value<'_>) -> i64 {
    match value {
        Value::Binary(bytes) => i64::from_be_bytes(bytes.try_into().unwrap()),
        other => panic!("expected a binary int8, got {other:?}"),
    }
}

#[tokio::test]
async fn a_real_stream_decodes_into_the_changes_that_were_made() {
    let pg = Postgres::start().await.unwrap();
    let db = pg.client("postgres").await.unwrap();
    db.batch_execute(
        "CREATE TABLE t (id bigint PRIMARY KEY, note text, big text);
         ALTER TABLE t ALTER big SET STORAGE EXTERNAL;
         CREATE PUBLICATION p FOR TABLE t;",
    )
    .await
    .unwrap();
    // Each statement its own transaction (a slot cannot be created after writes in one).
    for statement in [
        "SELECT pg_create_logical_replication_slot('s', 'pgoutput')",
        "INSERT INTO t VALUES (1, 'one', repeat('x', 10000)), (2, 'two', NULL)",
        "UPDATE t SET note = 'uno' WHERE id = 1",
        "UPDATE t SET id = 3 WHERE id = 2",
        "DELETE FROM t WHERE id = 3",
        "SELECT pg_logical_emit_message(true, 'ferry_test', 'hello')",
        "TRUNCATE t",
    ] {
        db.batch_execute(statement).await.unwrap();
    }

    let config = ReplicationConfig::new("127.0.0.1", "postgres", "", "postgres", "s", "p")
        .with_port(pg.port())
        .with_tls(TlsConfig::disabled())
        .with_binary(true);
    let mut client = ReplicationClient::connect(config).await.unwrap();
    let mut seen = Vec::new();
    let mut commits = 0;
    while !seen.iter().any(|s| matches!(s, Seen::Truncate(_))) {
        let event = tokio::time::timeout(Duration::from_secs(20), client.recv())
            .await
            .expect("the stream stalled")
            .unwrap()
            .expect("the stream ended");
        match event {
            ReplicationEvent::XLogData { data, .. } => match pgoutput::decode(&data).unwrap() {
                Message::Relation { name, columns, .. } => seen.push(Seen::Relation(
                    name.to_owned(),
                    columns.iter().map(|c| (c.name.to_owned(), c.key)).collect(),
                )),
                Message::Insert { new, .. } => {
                    seen.push(Seen::Insert(int8(new.values().next().unwrap())))
                }
                Message::Update { old, new, .. } => {
                    let values: Vec<_> = new.values().collect();
                    let old_key = old.map(|o| match o {
                        OldTuple::Key(t) | OldTuple::Full(t) => int8(t.values().next().unwrap()),
                    });
                    let big = match values[2] {
                        Value::Unchanged => "unchanged",
                        Value::Null => "null",
                        _ => "sent",
                    };
                    seen.push(Seen::Update {
                        old_key,
                        new_key: int8(values[0]),
                        big,
                    });
                }
                Message::Delete {
                    old: OldTuple::Key(t),
                    ..
                } => seen.push(Seen::Delete(int8(t.values().next().unwrap()))),
                Message::Truncate { relations, .. } => seen.push(Seen::Truncate(relations.len())),
                Message::LogicalMessage { prefix, .. } => {
                    seen.push(Seen::Message(prefix.to_owned()))
                }
                other => panic!("unexpected {other:?}"),
            },
            ReplicationEvent::Message { prefix, .. } => seen.push(Seen::Message(prefix)),
            ReplicationEvent::Commit { end_lsn, .. } => {
                commits += 1;
                client.update_applied_lsn(end_lsn);
            }
            _ => {}
        }
    }
    client.stop();
    assert_eq!(
        seen,
        [
            Seen::Relation(
                "t".into(),
                vec![
                    ("id".into(), true),
                    ("note".into(), false),
                    ("big".into(), false)
                ]
            ),
            Seen::Insert(1),
            Seen::Insert(2),
            // The TOASTed value did not change: pgoutput does not send it.
            Seen::Update {
                old_key: None,
                new_key: 1,
                big: "unchanged"
            },
            // A primary-key change carries the old key.
            Seen::Update {
                old_key: Some(2),
                new_key: 3,
                big: "null"
            },
            Seen::Delete(3),
            Seen::Message("ferry_test".into()),
            // Postgres sends the relation again when its cache entry was invalidated.
            Seen::Relation(
                "t".into(),
                vec![
                    ("id".into(), true),
                    ("note".into(), false),
                    ("big".into(), false)
                ]
            ),
            Seen::Truncate(1),
        ]
    );
    assert!(commits >= 5, "{commits} commits");
}
