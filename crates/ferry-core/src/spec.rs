//! Validation and normalisation of pipe specs.
//!
//! A spec is checked as a whole and every problem is reported with the path of its field
//! (`spec.settings.pull_batch_size`), so a user fixes a request in one round trip. A spec that
//! passes comes back normalised: defaults filled in, so what is stored is what runs.

use std::collections::HashSet;
use std::fmt;

use ferry_proto::v1::{
    ClickHouseDestination, OutOfRange, PipeSettings, PipeSpec, PostgresSource, SslMode,
    TableMapping, UnconstrainedNumeric,
};
use prost_types::Duration;

use crate::PipeMode;
use crate::naming::{check_identifier, check_pipe_name};

/// Default CDC sync interval (ClickPipes: 60 s).
pub const DEFAULT_SYNC_INTERVAL_SECS: i64 = 60;
/// Default CDC pull batch size (ClickPipes: 100,000).
pub const DEFAULT_PULL_BATCH_SIZE: i64 = 100_000;
/// Default rows per snapshot partition (ClickPipes: 100,000).
pub const DEFAULT_ROWS_PER_PARTITION: i64 = 100_000;
/// Default partitions of one table copied at once (ClickPipes: 4).
pub const DEFAULT_PARALLEL_PARTITIONS: i64 = 4;
/// Default tables copied at once (ClickPipes: 1).
pub const DEFAULT_PARALLEL_TABLES: i64 = 1;
/// WAL a slot may retain before the pipe warns (PeerDB alerts at 5000 MB of slot lag).
pub const DEFAULT_SLOT_WAL_WARNING_BYTES: i64 = 5 << 30;

const MAX_SYNC_INTERVAL_SECS: i64 = 24 * 3600;
const MAX_PULL_BATCH_SIZE: i64 = 10_000_000;
const MAX_PARALLELISM: i64 = 64;
const DEFAULT_POSTGRES_PORT: u32 = 5432;
const DEFAULT_SCHEMA: &str = "public";

/// One thing wrong with one field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    /// Path of the field, e.g. `spec.tables[2].source_table`.
    pub field: String,
    /// What is wrong with it.
    pub description: String,
}

/// Everything wrong with a spec. Never empty.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct InvalidSpec {
    /// The violations, in field order.
    pub violations: Vec<FieldViolation>,
}

impl fmt::Display for InvalidSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, v) in self.violations.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{}: {}", v.field, v.description)?;
        }
        Ok(())
    }
}

/// Collects violations while a spec is walked.
#[derive(Default)]
struct Violations(Vec<FieldViolation>);

impl Violations {
    fn add(&mut self, field: impl Into<String>, description: impl Into<String>) {
        self.0.push(FieldViolation {
            field: field.into(),
            description: description.into(),
        });
    }

    fn check(&mut self, field: impl Into<String>, result: Result<(), String>) {
        if let Err(description) = result {
            self.add(field, description);
        }
    }

    fn finish<T>(self, value: T) -> Result<T, InvalidSpec> {
        if self.0.is_empty() {
            Ok(value)
        } else {
            Err(InvalidSpec { violations: self.0 })
        }
    }
}

/// Validates the spec of a `CreatePipe` request and returns it with every default filled in.
pub fn normalize_new_pipe(mut spec: PipeSpec) -> Result<PipeSpec, InvalidSpec> {
    let mut v = Violations::default();
    v.check("spec.name", check_pipe_name(&spec.name));
    match spec.source.as_mut() {
        Some(source) => normalize_source(source, &mut v),
        None => v.add("spec.source", "is required"),
    }
    match spec.destination.as_mut() {
        Some(destination) => normalize_destination(destination, &mut v),
        None => v.add("spec.destination", "is required"),
    }
    if spec.tables.is_empty() {
        v.add("spec.tables", "must list at least one table");
    }
    normalize_tables(&mut spec.tables, "spec.tables", &[], &mut v);
    match PipeMode::try_from(spec.mode) {
        Ok(PipeMode::Unspecified) => spec.mode = PipeMode::SnapshotAndCdc.into(),
        Ok(_) => {}
        Err(_) => v.add(
            "spec.mode",
            format!(
                "unknown mode {}; use PIPE_MODE_SNAPSHOT_AND_CDC, PIPE_MODE_CDC_ONLY or PIPE_MODE_SNAPSHOT_ONLY",
                spec.mode
            ),
        ),
    }
    let settings = spec.settings.take().unwrap_or_default();
    let mut merged = merge_settings(&defaults(), &settings, "spec.settings", &mut v);
    for (field, description) in crate::mapping::creation_settings(&mut merged, &settings) {
        v.add(field, description);
    }
    spec.settings = Some(merged);
    v.finish(spec)
}

/// Validates a settings update and returns the settings that result from applying it to
/// `current`: fields set in `update` replace those of `current`.
pub fn apply_settings_update(
    current: &PipeSettings,
    update: &PipeSettings,
) -> Result<PipeSettings, InvalidSpec> {
    let mut v = Violations::default();
    let merged = merge_settings(current, update, "settings", &mut v);
    for (field, description) in crate::mapping::fixed_settings(update) {
        v.add(field, description);
    }
    v.finish(merged)
}

/// Validates tables to add to a pipe that already has `existing` ones, filling in defaults.
pub fn normalize_added_tables(
    mut tables: Vec<TableMapping>,
    existing: &[TableMapping],
) -> Result<Vec<TableMapping>, InvalidSpec> {
    let mut v = Violations::default();
    if tables.is_empty() {
        v.add("tables", "must list at least one table");
    }
    normalize_tables(&mut tables, "tables", existing, &mut v);
    v.finish(tables)
}

/// `schema.table` of a mapping's source.
pub fn source_table_name(table: &TableMapping) -> String {
    format!("{}.{}", table.source_schema, table.source_table)
}

fn defaults() -> PipeSettings {
    PipeSettings {
        sync_interval: Some(Duration {
            seconds: DEFAULT_SYNC_INTERVAL_SECS,
            nanos: 0,
        }),
        pull_batch_size: Some(DEFAULT_PULL_BATCH_SIZE),
        snapshot_rows_per_partition: Some(DEFAULT_ROWS_PER_PARTITION),
        snapshot_parallel_partitions: Some(DEFAULT_PARALLEL_PARTITIONS),
        snapshot_parallel_tables: Some(DEFAULT_PARALLEL_TABLES),
        allow_non_empty_destination: Some(false),
        unconstrained_numeric: UnconstrainedNumeric::Decimal7638.into(),
        out_of_range: OutOfRange::Fail.into(),
        slot_wal_warning_bytes: Some(DEFAULT_SLOT_WAL_WARNING_BYTES),
    }
}

fn normalize_source(source: &mut PostgresSource, v: &mut Violations) {
    v.check("spec.source.host", check_host(&source.host));
    if source.port == 0 {
        source.port = DEFAULT_POSTGRES_PORT;
    } else if source.port > u32::from(u16::MAX) {
        v.add(
            "spec.source.port",
            format!("must be between 1 and 65535, got {}", source.port),
        );
    }
    v.check("spec.source.database", check_identifier(&source.database));
    if source.user.is_empty() {
        v.add("spec.source.user", "must not be empty");
    }
    match SslMode::try_from(source.ssl_mode) {
        Ok(SslMode::Unspecified) => source.ssl_mode = SslMode::Prefer.into(),
        Ok(_) => {}
        Err(_) => v.add(
            "spec.source.ssl_mode",
            format!("unknown ssl mode {}", source.ssl_mode),
        ),
    }
    if !source.publication.is_empty() {
        v.check(
            "spec.source.publication",
            check_identifier(&source.publication),
        );
    }
    if !source.slot_name.is_empty() {
        v.check("spec.source.slot_name", check_slot_name(&source.slot_name));
    }
}

fn normalize_destination(destination: &mut ClickHouseDestination, v: &mut Violations) {
    v.check("spec.destination.url", check_http_url(&destination.url));
    if destination.database.is_empty() {
        destination.database = "default".into();
    }
    v.check(
        "spec.destination.database",
        check_identifier(&destination.database),
    );
    if destination.user.is_empty() {
        destination.user = "default".into();
    }
}

fn normalize_tables(
    tables: &mut [TableMapping],
    field: &str,
    existing: &[TableMapping],
    v: &mut Violations,
) {
    let mut sources: HashSet<String> = existing.iter().map(source_table_name).collect();
    let mut destinations: HashSet<String> = existing
        .iter()
        .map(|t| t.destination_table.clone())
        .collect();
    for (i, table) in tables.iter_mut().enumerate() {
        let at = format!("{field}[{i}]");
        if table.source_schema.is_empty() {
            table.source_schema = DEFAULT_SCHEMA.into();
        }
        v.check(
            format!("{at}.source_schema"),
            check_identifier(&table.source_schema),
        );
        v.check(
            format!("{at}.source_table"),
            check_identifier(&table.source_table),
        );
        if table.destination_table.is_empty() {
            table.destination_table = table.source_table.clone();
        }
        v.check(
            format!("{at}.destination_table"),
            check_identifier(&table.destination_table),
        );
        for (field, description) in crate::mapping::check_column_types(&mut table.column_types, &at)
        {
            v.add(field, description);
        }
        let source = source_table_name(table);
        if !sources.insert(source.clone()) {
            v.add(
                format!("{at}.source_table"),
                format!("{source} is listed twice"),
            );
        }
        if !destinations.insert(table.destination_table.clone()) {
            v.add(
                format!("{at}.destination_table"),
                format!(
                    "{} is the destination of another table",
                    table.destination_table
                ),
            );
        }
    }
}

fn merge_settings(
    current: &PipeSettings,
    update: &PipeSettings,
    field: &str,
    v: &mut Violations,
) -> PipeSettings {
    let sync_interval = match &update.sync_interval {
        Some(d) => {
            let ok = d.nanos == 0 && (1..=MAX_SYNC_INTERVAL_SECS).contains(&d.seconds);
            if !ok {
                v.add(
                    format!("{field}.sync_interval"),
                    format!(
                        "must be a whole number of seconds between 1s and {MAX_SYNC_INTERVAL_SECS}s, got {}s {}ns",
                        d.seconds, d.nanos
                    ),
                );
            }
            Some(*d)
        }
        None => current.sync_interval,
    };
    let mut bounded = |name: &str, new: Option<i64>, old: Option<i64>, max: i64| match new {
        Some(n) => {
            if !(1..=max).contains(&n) {
                v.add(
                    format!("{field}.{name}"),
                    format!("must be between 1 and {max}, got {n}"),
                );
            }
            Some(n)
        }
        None => old,
    };
    PipeSettings {
        sync_interval,
        pull_batch_size: bounded(
            "pull_batch_size",
            update.pull_batch_size,
            current.pull_batch_size,
            MAX_PULL_BATCH_SIZE,
        ),
        snapshot_rows_per_partition: bounded(
            "snapshot_rows_per_partition",
            update.snapshot_rows_per_partition,
            current.snapshot_rows_per_partition,
            i64::MAX,
        ),
        snapshot_parallel_partitions: bounded(
            "snapshot_parallel_partitions",
            update.snapshot_parallel_partitions,
            current.snapshot_parallel_partitions,
            MAX_PARALLELISM,
        ),
        snapshot_parallel_tables: bounded(
            "snapshot_parallel_tables",
            update.snapshot_parallel_tables,
            current.snapshot_parallel_tables,
            MAX_PARALLELISM,
        ),
        allow_non_empty_destination: update
            .allow_non_empty_destination
            .or(current.allow_non_empty_destination),
        slot_wal_warning_bytes: bounded(
            "slot_wal_warning_bytes",
            update.slot_wal_warning_bytes,
            current.slot_wal_warning_bytes,
            i64::MAX,
        ),
        // Fixed at creation (creation_settings, apply_settings_update).
        unconstrained_numeric: current.unconstrained_numeric,
        out_of_range: current.out_of_range,
    }
}

fn check_host(host: &str) -> Result<(), String> {
    if host.is_empty() {
        return Err("must not be empty".into());
    }
    // Checked before anything echoes the value: `user:password@host` must not be repeated.
    if host.contains('@') {
        return Err("must be a host name or address, without user or password".into());
    }
    if host.contains("://") {
        return Err(format!(
            "must be a host name or address, not a URL, got {host:?}"
        ));
    }
    if host.len() > 253
        || host
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '/' | '@' | '?' | '#'))
    {
        return Err(format!("is not a valid host name or address: {host:?}"));
    }
    Ok(())
}

fn check_slot_name(slot: &str) -> Result<(), String> {
    if slot.is_empty() || slot.len() > 63 {
        return Err(format!("must be 1 to 63 characters, got {}", slot.len()));
    }
    if slot
        .chars()
        .any(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
    {
        return Err(format!(
            "may contain only a-z, 0-9 and '_' (a Postgres slot name), got {slot:?}"
        ));
    }
    Ok(())
}

fn check_http_url(url: &str) -> Result<(), String> {
    if url.is_empty() {
        return Err("must not be empty; e.g. http://127.0.0.1:8123".into());
    }
    // Checked before anything echoes the value: credentials must not be repeated in errors.
    if url.contains('@') {
        return Err(
            "must not contain credentials; put the password in secrets.destination_password".into(),
        );
    }
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("is not a valid URL ({e}): {url:?}"))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err(format!("must start with http:// or https://, got {url:?}")),
    }
    let Some(authority) = uri.authority() else {
        return Err(format!("has no host: {url:?}"));
    };
    if authority.host().is_empty() {
        return Err(format!("has no host: {url:?}"));
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(format!(
            "must be the server's base URL, without path or query, got {url:?}"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> PipeSpec {
        PipeSpec {
            name: "orders".into(),
            source: Some(PostgresSource {
                host: "127.0.0.1".into(),
                database: "shop".into(),
                user: "ferry".into(),
                ..Default::default()
            }),
            destination: Some(ClickHouseDestination {
                url: "http://127.0.0.1:8123".into(),
                ..Default::default()
            }),
            tables: vec![TableMapping {
                source_table: "orders".into(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn fields(err: InvalidSpec) -> Vec<String> {
        err.violations.into_iter().map(|v| v.field).collect()
    }

    #[test]
    fn fills_defaults() {
        let spec = normalize_new_pipe(valid()).unwrap();
        let source = spec.source.clone().unwrap();
        assert_eq!(source.port, 5432);
        assert_eq!(source.ssl_mode(), SslMode::Prefer);
        let destination = spec.destination.clone().unwrap();
        assert_eq!(destination.database, "default");
        assert_eq!(destination.user, "default");
        assert_eq!(spec.tables[0].source_schema, "public");
        assert_eq!(spec.tables[0].destination_table, "orders");
        assert_eq!(spec.mode(), PipeMode::SnapshotAndCdc);
        let settings = spec.settings.unwrap();
        assert_eq!(settings, defaults());
    }

    #[test]
    fn reports_every_bad_field() {
        let mut spec = valid();
        spec.name = String::new();
        spec.source.as_mut().unwrap().host = "postgres://x".into();
        spec.source.as_mut().unwrap().port = 70000;
        spec.destination.as_mut().unwrap().url = "ftp://x".into();
        spec.mode = 42;
        spec.settings = Some(PipeSettings {
            pull_batch_size: Some(0),
            snapshot_parallel_partitions: Some(-3),
            sync_interval: Some(Duration {
                seconds: -1,
                nanos: 0,
            }),
            ..Default::default()
        });
        let err = normalize_new_pipe(spec).unwrap_err();
        assert_eq!(
            fields(err),
            [
                "spec.name",
                "spec.source.host",
                "spec.source.port",
                "spec.destination.url",
                "spec.mode",
                "spec.settings.sync_interval",
                "spec.settings.pull_batch_size",
                "spec.settings.snapshot_parallel_partitions",
            ]
        );
    }

    #[test]
    fn missing_parts() {
        let spec = PipeSpec {
            name: "p".into(),
            ..Default::default()
        };
        let err = normalize_new_pipe(spec).unwrap_err();
        assert_eq!(
            fields(err.clone()),
            ["spec.source", "spec.destination", "spec.tables"]
        );
        assert!(
            err.to_string()
                .contains("spec.tables: must list at least one table")
        );
    }

    #[test]
    fn urls() {
        for good in [
            "http://ch:8123",
            "https://ch.example.com",
            "http://[::1]:8123/",
        ] {
            assert!(check_http_url(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "ch:8123",
            "http://u:p@ch:8123",
            "clickhouse://u:p@ch",
            "http://ch:8123/db",
            "http://ch:8123/?x=1",
            "tcp://ch",
        ] {
            assert!(check_http_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn credentials_are_never_echoed() {
        for url in [
            "clickhouse://u:pw@h",
            "http://u:pw@h:8123",
            "not a url u:pw@h",
        ] {
            let err = check_http_url(url).unwrap_err();
            assert!(!err.contains("pw"), "{err}");
        }
        let err = check_host("u:pw@db").unwrap_err();
        assert!(!err.contains("pw"), "{err}");
    }

    #[test]
    fn duplicate_tables() {
        let mut spec = valid();
        spec.tables.push(TableMapping {
            source_schema: "public".into(),
            source_table: "orders".into(),
            destination_table: "orders_copy".into(),
            ..Default::default()
        });
        spec.tables.push(TableMapping {
            source_schema: "sales".into(),
            source_table: "orders".into(),
            destination_table: String::new(),
            ..Default::default()
        });
        let err = normalize_new_pipe(spec).unwrap_err();
        assert_eq!(
            fields(err),
            [
                "spec.tables[1].source_table",
                "spec.tables[2].destination_table"
            ]
        );
    }

    #[test]
    fn settings_update_keeps_unset_fields() {
        let current = defaults();
        let update = PipeSettings {
            pull_batch_size: Some(5000),
            ..Default::default()
        };
        let merged = apply_settings_update(&current, &update).unwrap();
        assert_eq!(merged.pull_batch_size, Some(5000));
        assert_eq!(merged.sync_interval, current.sync_interval);
        let bad = PipeSettings {
            pull_batch_size: Some(-1),
            ..Default::default()
        };
        assert_eq!(
            fields(apply_settings_update(&current, &bad).unwrap_err()),
            ["settings.pull_batch_size"]
        );
    }

    #[test]
    fn added_tables_must_be_new() {
        let existing = normalize_new_pipe(valid()).unwrap().tables;
        let added = vec![TableMapping {
            source_table: "orders".into(),
            destination_table: "o2".into(),
            ..Default::default()
        }];
        assert_eq!(
            fields(normalize_added_tables(added, &existing).unwrap_err()),
            ["tables[0].source_table"]
        );
    }
}
