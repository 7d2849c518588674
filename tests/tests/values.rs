//! Values at the edge of what ClickHouse holds, through the real services: dates and
//! timestamps land exactly across the whole range the server holds (probed at Setup) and are
//! clamped only beyond it; numerics a Decimal cannot hold fail the pipe with a remedy that
//! names real settings, or land exactly as text, or are clamped and counted, as the pipe says.
//! Every alteration is counted per column in GetPipe, from the snapshot and from CDC.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::time::Duration;

use clickhouse::Client;
use ferry_proto::v1::pipe_service_client::PipeServiceClient;
use ferry_proto::v1::*;
use ferry_testkit::clickhouse::ClickHouse;
use ferry_testkit::etcd::Etcd;
use ferry_testkit::ferry::Ferry;
use ferry_testkit::postgres::Postgres;
use ferry_testkit::wait;
use prost_types::Duration as ProtoDuration;
use tonic::transport::Channel;

const WITHIN: Duration = Duration::from_secs(90);

/// The bounds of the test server (ClickHouse 26): 0000-01-01 ..= 9999-12-31.
const DATE_MIN: i64 = -719_528;
const DATE_MAX: i64 = 2_932_896;
const MICROS_MIN: i64 = -62_167_219_200_000_000;
const MICROS_MAX: i64 = 253_402_300_799_999_999;

fn spec(
    name: &str,
    pg: &Postgres,
    ch: &ClickHouse,
    table: TableMapping,
    mode: PipeMode,
    settings: PipeSettings,
) -> PipeSpec {
    PipeSpec {
        name: name.into(),
        source: Some(PostgresSource {
            host: "127.0.0.1".into(),
            port: u32::from(pg.port()),
            database: "postgres".into(),
            user: "postgres".into(),
            ..Default::default()
        }),
        destination: Some(ClickHouseDestination {
            url: ch.url(),
            database: format!("d_{name}"),
            ..Default::default()
        }),
        tables: vec![table],
        mode: mode.into(),
        settings: Some(PipeSettings {
            sync_interval: Some(ProtoDuration {
                seconds: 1,
                nanos: 0,
            }),
            ..settings
        }),
    }
}

fn table(name: &str) -> TableMapping {
    TableMapping {
        source_table: name.into(),
        ..Default::default()
    }
}

async fn status(client: &PipeServiceClient<Channel>, name: &str) -> Option<PipeStatus> {
    client
        .clone()
        .get_pipe(GetPipeRequest { name: name.into() })
        .await
        .ok()?
        .into_inner()
        .pipe?
        .status
}

/// Waits for `state`; panics on Failed unless that is the state waited for.
async fn reach(client: &PipeServiceClient<Channel>, name: &str, state: PipeState) -> PipeStatus {
    let reached = wait::until(WITHIN, || async {
        let status = status(client, name).await?;
        if state != PipeState::Failed {
            assert_ne!(
                status.state(),
                PipeState::Failed,
                "{name}: {:?}",
                status.error
            );
        }
        (status.state() == state).then_some(status)
    })
    .await;
    reached.unwrap_or_else(|| panic!("{name} never reached {state:?}"))
}

/// Altered counts of the pipe's one table, by (column, kind).
fn altered(status: &PipeStatus) -> HashMap<(String, AlterationKind), u64> {
    status
        .tables
        .iter()
        .flat_map(|t| &t.altered)
        .map(|a| ((a.column.clone(), a.kind()), a.count))
        .collect()
}

/// Rows of (id, values...) as text from ClickHouse, ordered by id.
async fn ch_rows(ch: &Client, sql: &str) -> Vec<Vec<String>> {
    let bytes = ch
        .query(&format!("{sql} FORMAT TabSeparated"))
        .fetch_bytes("TabSeparated")
        .unwrap()
        .collect()
        .await
        .unwrap();
    String::from_utf8(bytes.to_vec())
        .unwrap()
        .lines()
        .map(|l| l.split('\t').map(str::to_owned).collect())
        .collect()
}

async fn pg_rows(db: &tokio_postgres::Client, sql: &str) -> Vec<Vec<String>> {
    db.query(sql, &[])
        .await
        .unwrap()
        .iter()
        .map(|row| (0..row.len()).map(|i| row.get::<_, String>(i)).collect())
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
    let pg = Postgres::start().await.unwrap();
    let ch = ClickHouse::start().await.unwrap();
    let etcd = Etcd::start().await.unwrap();
    let db = pg.client("postgres").await.unwrap();
    db.batch_execute(
        "SET timezone = 'UTC';
         ALTER DATABASE postgres SET timezone = 'UTC';
         CREATE TABLE dates (id int PRIMARY KEY, d date, ts timestamp, tz timestamptz);",
    )
    .await
    .unwrap();
    insert_edge_dates(&db, 1).await;

    let ferry = Ferry::new(etcd.endpoints(), 3).unwrap();
    let coordinator = ferry.coordinator("c1").unwrap();
    let _snapshot = ferry.worker(WorkerKind::Snapshot, "s1").unwrap();
    let _cdc = ferry.worker(WorkerKind::Cdc, "d1").unwrap();
    coordinator.wait_serving(WITHIN).await.unwrap();
    let client = coordinator.pipe_client().await.unwrap();
    let s = spec(
        "dates",
        &pg,
        &ch,
        table("dates"),
        PipeMode::SnapshotAndCdc,
        PipeSettings::default(),
    );
    client
        .clone()
        .create_pipe(CreatePipeRequest {
            spec: Some(s),
            secrets: None,
        })
        .await
        .unwrap();
    let running = reach(&client, "dates", PipeState::Running).await;
    let clickhouse = Client::default().with_url(ch.url());
    let pg_sql = PG_DATES
        .replace("{dmin}", &DATE_MIN.to_string())
        .replace("{dmax}", &DATE_MAX.to_string())
        .replace("{tmin}", &MICROS_MIN.to_string())
        .replace("{tmax}", &MICROS_MAX.to_string());
    assert_eq!(
        ch_rows(&clickhouse, CH_DATES).await,
        pg_rows(&db, &pg_sql).await,
        "snapshot"
    );
    // The four values beyond the range (4713 BC, 12000, ±infinity) of each column, no more.
    let expected = |n: u64| {
        ["d", "ts", "tz"]
            .map(|c| ((c.to_owned(), AlterationKind::Clamped), n))
            .into_iter()
            .collect::<HashMap<_, _>>()
    };
    assert_eq!(altered(&running), expected(4), "{:?}", running.tables);

    // The same values through CDC (text), after the snapshot.
    insert_edge_dates(&db, 101).await;
    let pg_expected = pg_rows(&db, &pg_sql).await;
    let converged = wait::until(WITHIN, || async {
        (ch_rows(&clickhouse, CH_DATES).await == pg_expected).then_some(())
    })
    .await;
    assert!(
        converged.is_some(),
        "cdc: {:?} vs {pg_expected:?}",
        ch_rows(&clickhouse, CH_DATES).await
    );
    let counted = wait::until(WITHIN, || async {
        let status = status(&client, "dates").await?;
        (altered(&status) == expected(8)).then_some(())
    })
    .await;
    assert!(
        counted.is_some(),
        "{:?}",
        status(&client, "dates").await.map(|s| s.tables)
    );
    // And `ferry get` shows them.
    let output = std::process::Command::new(ferry_testkit::ferry::bin_dir().join("ferry"))
        .args(["--addr", &coordinator.url(), "get", "dates"])
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
    let pg = Postgres::start().await.unwrap();
    let ch = ClickHouse::start().await.unwrap();
    let etcd = Etcd::start().await.unwrap();
    let db = pg.client("postgres").await.unwrap();
    db.batch_execute(&format!(
        "CREATE TABLE big (id int PRIMARY KEY, n numeric);
         INSERT INTO big VALUES (1, 1.25), (2, '{BIG}'), (3, '-{BIG}');
         CREATE TABLE later (id int PRIMARY KEY, n numeric);
         CREATE TABLE docs (id int PRIMARY KEY, jb jsonb, js json);
         INSERT INTO docs VALUES (1, '{{\"b\": [1, 2.5], \"a\": \"x\"}}', '{{\"k\": 1}}'), (2, NULL, NULL);"
    ))
    .await
    .unwrap();

    let ferry = Ferry::new(etcd.endpoints(), 3).unwrap();
    let coordinator = ferry.coordinator("c1").unwrap();
    let _snapshot = ferry.worker(WorkerKind::Snapshot, "s1").unwrap();
    let _cdc = ferry.worker(WorkerKind::Cdc, "d1").unwrap();
    coordinator.wait_serving(WITHIN).await.unwrap();
    let client = coordinator.pipe_client().await.unwrap();
    let mut overridden = table("big");
    overridden.column_types.insert("n".into(), "String".into());
    let mut json = table("docs");
    json.column_types.insert("jb".into(), "JSON".into());
    json.column_types.insert("js".into(), "JSON".into());
    let mut unfit = table("big");
    unfit.column_types.insert("n".into(), "JSON".into());
    let pipes = [
        (
            "json",
            json,
            PipeMode::SnapshotAndCdc,
            PipeSettings::default(),
        ),
        (
            "unfit",
            unfit,
            PipeMode::SnapshotAndCdc,
            PipeSettings::default(),
        ),
        (
            "fails",
            table("big"),
            PipeMode::SnapshotAndCdc,
            PipeSettings::default(),
        ),
        (
            "fails_cdc",
            table("later"),
            PipeMode::CdcOnly,
            PipeSettings::default(),
        ),
        (
            "as_string",
            table("big"),
            PipeMode::SnapshotAndCdc,
            PipeSettings {
                unconstrained_numeric: UnconstrainedNumeric::String.into(),
                ..Default::default()
            },
        ),
        (
            "overridden",
            overridden,
            PipeMode::SnapshotAndCdc,
            PipeSettings::default(),
        ),
        (
            "clamped",
            table("big"),
            PipeMode::SnapshotAndCdc,
            PipeSettings {
                out_of_range: OutOfRange::Clamp.into(),
                ..Default::default()
            },
        ),
    ];
    for (name, mapping, mode, settings) in pipes {
        client
            .clone()
            .create_pipe(CreatePipeRequest {
                spec: Some(spec(name, &pg, &ch, mapping, mode, settings)),
                secrets: None,
            })
            .await
            .unwrap();
    }

    // A type the spec does not support is refused at once, naming the field.
    let mut unsupported = table("big");
    unsupported
        .column_types
        .insert("n".into(), "Float64".into());
    let refused = client
        .clone()
        .create_pipe(CreatePipeRequest {
            spec: Some(spec(
                "refused",
                &pg,
                &ch,
                unsupported,
                PipeMode::SnapshotAndCdc,
                PipeSettings::default(),
            )),
            secrets: None,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(
        refused.message().contains("spec.tables[0].column_types[n]"),
        "{}",
        refused.message()
    );
    // A supported type the column cannot take is refused by Setup, naming the field.
    let failed = reach(&client, "unfit", PipeState::Failed).await;
    let error = failed.error.unwrap();
    assert!(
        error.message.contains("spec.tables[0].column_types[n]"),
        "{error:?}"
    );
    assert!(error.remedy.contains("ferry delete"), "{error:?}");

    // JSON where the server has it: the same document (ClickHouse re-serialises it).
    reach(&client, "json", PipeState::Running).await;
    let clickhouse = Client::default().with_url(ch.url());
    let docs = ch_rows(
        &clickhouse,
        "SELECT toString(id), ifNull(toString(jb), 'NULL'), ifNull(toString(js), 'NULL') \
         FROM d_json.docs FINAL ORDER BY id",
    )
    .await;
    assert_eq!(docs.len(), 2, "{docs:?}");
    let same = db
        .query_one(
            "SELECT $1::text::jsonb = jb AND $2::text::jsonb = js::jsonb FROM docs WHERE id = 1",
            &[&docs[0][1], &docs[0][2]],
        )
        .await
        .unwrap()
        .get::<_, bool>(0);
    assert!(same, "{docs:?}");
    assert_eq!(docs[1][1..], ["NULL", "NULL"], "{docs:?}");

    // Default (Decimal(76, 38), FAIL): the snapshot fails the pipe, naming what to change.
    let failed = reach(&client, "fails", PipeState::Failed).await;
    let error = failed.error.unwrap();
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
    reach(&client, "fails_cdc", PipeState::Running).await;
    db.batch_execute(&format!("INSERT INTO later VALUES (1, '{BIG}')"))
        .await
        .unwrap();
    let failed = reach(&client, "fails_cdc", PipeState::Failed).await;
    let error = failed.error.unwrap();
    assert_eq!(error.table, "public.later", "{error:?}");
    assert!(
        error.remedy.contains("--column-type public.later.n=String"),
        "{}",
        error.remedy
    );

    // As text (the setting, or the column's type): Postgres's exact text, snapshot and CDC.
    for name in ["as_string", "overridden"] {
        reach(&client, name, PipeState::Running).await;
    }
    db.batch_execute(&format!(
        "INSERT INTO big VALUES (4, '-0.{}1')",
        "0".repeat(60)
    ))
    .await
    .unwrap();
    let expected = pg_rows(&db, "SELECT id::text, n::text FROM big ORDER BY big.id").await;
    for name in ["as_string", "overridden"] {
        let sql = format!(
            "SELECT toString(id), n FROM d_{name}.big FINAL WHERE _ferry_is_deleted = 0 ORDER BY id"
        );
        let landed = wait::until(WITHIN, || async {
            (ch_rows(&clickhouse, &sql).await == expected).then_some(())
        })
        .await;
        assert!(
            landed.is_some(),
            "{name}: {:?} vs {expected:?}",
            ch_rows(&clickhouse, &sql).await
        );
    }

    // CLAMP: saturated to Decimal(76, 38)'s bounds, and counted for the column.
    let running = reach(&client, "clamped", PipeState::Running).await;
    let nines = format!("{}.{}", "9".repeat(38), "9".repeat(38));
    let sql = "SELECT toString(id), toString(n) FROM d_clamped.big FINAL \
               WHERE _ferry_is_deleted = 0 AND id <= 3 ORDER BY id";
    assert_eq!(
        ch_rows(&clickhouse, sql).await,
        [
            vec!["1".to_owned(), "1.25".to_owned()],
            vec!["2".to_owned(), nines.clone()],
            vec!["3".to_owned(), format!("-{nines}")],
        ]
    );
    assert_eq!(
        altered(&running),
        HashMap::from([(("n".to_owned(), AlterationKind::Clamped), 2)]),
        "{:?}",
        running.tables
    );
}
