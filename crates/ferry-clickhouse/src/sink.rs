//! The destination: a ClickHouse server over HTTP (the `clickhouse` crate).

use bytes::Bytes;
use clickhouse::Client;
use ferry_proto::v1::{ClickHouseDestination, ColumnSchema, DestinationLimits, TableSchema};

use crate::ddl::{self, DdlError, IS_DELETED_COLUMN, Ident, VERSION_COLUMN};
use crate::failure::{Failure, code};
use crate::lookup;
use crate::types::{Limits, MappingOptions, TypeOverride};

/// Date32 bounds to try, widest first (days since 1970-01-01): 0000-01-01, 0001-01-01,
/// 1900-01-01; 9999-12-31, 2299-12-31.
const DATE_MIN_CANDIDATES: [i32; 3] = [-719_528, -719_162, Limits::CLASSIC.date_min_days];
const DATE_MAX_CANDIDATES: [i32; 2] = [2_932_896, Limits::CLASSIC.date_max_days];
/// DateTime64 bounds to try, widest first (microseconds since 1970-01-01 UTC), the same days.
const TIMESTAMP_MIN_CANDIDATES: [i64; 3] = [
    -62_167_219_200_000_000,
    -62_135_596_800_000_000,
    Limits::CLASSIC.timestamp_min_micros,
];
const TIMESTAMP_MAX_CANDIDATES: [i64; 2] = [
    253_402_300_799_999_999,
    Limits::CLASSIC.timestamp_max_micros,
];

/// A ClickHouse failure, phrased for the person who has to fix it.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The server refused the credentials.
    #[error("ClickHouse refused the login of user {user}")]
    AuthFailed {
        /// The user.
        user: String,
        /// Why.
        #[source]
        source: clickhouse::error::Error,
    },
    /// The server could not be reached.
    #[error("cannot reach ClickHouse at {url}")]
    Unreachable {
        /// The URL.
        url: String,
        /// Why.
        #[source]
        source: clickhouse::error::Error,
    },
    /// A statement failed.
    #[error("ClickHouse {what} failed")]
    Statement {
        /// What was being done.
        what: String,
        /// The server's exception code, or how else it failed.
        failure: Failure,
        /// Why.
        #[source]
        source: clickhouse::error::Error,
    },
    /// A table cannot be created.
    #[error(transparent)]
    Ddl(#[from] DdlError),
    /// An existing destination table does not have the columns Ferry writes.
    #[error("existing table {table} has column {column} as {found}, Ferry writes {expected}")]
    Mismatch {
        /// database.table.
        table: String,
        /// The column.
        column: String,
        /// The type Ferry writes.
        expected: String,
        /// The table's type ("missing" when absent).
        found: String,
    },
    /// A table that is not a resync's shadow has the shadow's name.
    #[error("{table} exists and is not a shadow table of a Ferry resync")]
    ShadowTaken {
        /// database.table.
        table: String,
    },
    /// The database cannot exchange tables atomically.
    #[error("database {database} has engine {engine:?}, which cannot EXCHANGE TABLES")]
    NoExchange {
        /// The database.
        database: String,
        /// Its engine.
        engine: String,
    },
    /// A resync's shadow table is gone before it was swapped in.
    #[error("the resync shadow table {table} is missing")]
    ShadowMissing {
        /// database.table.
        table: String,
    },
}

impl SinkError {
    /// What the user should do.
    pub fn remedy(&self) -> String {
        match self {
            Self::AuthFailed { .. } => "check the user in spec.destination and the password in secrets.destination_password".into(),
            Self::Unreachable { .. } => "check spec.destination.url and that the ClickHouse server is up and reachable from Ferry".into(),
            Self::Statement { failure, .. } => Self::statement_remedy(*failure),
            Self::Ddl(DdlError::ReservedColumn { .. }) => "rename the source column; Ferry adds columns named _ferry_*".into(),
            Self::Ddl(DdlError::NoColumns { .. }) => "add a column to the table or remove it from the pipe".into(),
            Self::Mismatch { .. } => "drop the existing table so Ferry creates it, or map the source table to another destination_table".into(),
            Self::ShadowTaken { table } => format!("rename or drop {table} (a resync loads the table into it), then resync again"),
            Self::NoExchange { .. } => "resync swaps tables with EXCHANGE TABLES: replicate into a database with the Atomic engine (ClickHouse's default), or recreate the pipe".into(),
            Self::ShadowMissing { .. } => "resync the table again (ferry resync <pipe> --table <schema.table>)".into(),
        }
    }

    /// A failed statement doing `what`.
    pub fn statement(what: impl Into<String>, source: clickhouse::error::Error) -> Self {
        Self::Statement {
            what: what.into(),
            failure: Failure::of(&source),
            source,
        }
    }
}

/// A connection to the destination database.
#[derive(Clone)]
pub struct Sink {
    client: Client,
    url: String,
    user: String,
    database: String,
}

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sink")
            .field("url", &self.url)
            .field("database", &self.database)
            .finish()
    }
}

impl Sink {
    /// A client for `destination`; nothing is sent until used.
    pub fn new(destination: &ClickHouseDestination, password: &str) -> Self {
        let client = Client::default()
            .with_url(&destination.url)
            .with_user(&destination.user)
            .with_password(password);
        Self {
            client,
            url: destination.url.clone(),
            user: destination.user.clone(),
            database: destination.database.clone(),
        }
    }

    /// The client, for the other modules of the crate (the verification reads).
    pub(crate) fn client(&self) -> &Client {
        &self.client
    }

    /// The destination database.
    pub fn database(&self) -> &str {
        &self.database
    }

    pub(crate) fn classify(&self, what: &str, source: clickhouse::error::Error) -> SinkError {
        match Failure::of(&source) {
            Failure::Exception(
                code::AUTHENTICATION_FAILED | code::REQUIRED_PASSWORD | code::UNKNOWN_USER,
            ) => SinkError::AuthFailed {
                user: self.user.clone(),
                source,
            },
            Failure::Network => SinkError::Unreachable {
                url: self.url.clone(),
                source,
            },
            failure => SinkError::Statement {
                what: what.to_owned(),
                failure,
                source,
            },
        }
    }

    pub(crate) async fn execute(&self, what: &str, sql: &str) -> Result<(), SinkError> {
        self.client
            .query(sql)
            .execute()
            .await
            .map_err(|e| self.classify(what, e))
    }

    /// Proves the server answers and accepts the credentials.
    pub async fn check(&self) -> Result<(), SinkError> {
        self.client
            .query("SELECT 1")
            .fetch_one::<u8>()
            .await
            .map(|_| ())
            .map_err(|e| self.classify("login check", e))
    }

    /// What the server can hold: the widest Date32 and DateTime64 range among the candidates
    /// that round-trips exactly (a value beyond the server's range wraps or saturates without
    /// an error, so only a round trip proves it), and whether it has the JSON type.
    pub async fn probe_limits(&self) -> Result<DestinationLimits, SinkError> {
        let date_min = self
            .widest(&DATE_MIN_CANDIDATES, "toInt32(toDate32({n}))")
            .await?;
        let date_max = self
            .widest(&DATE_MAX_CANDIDATES, "toInt32(toDate32({n}))")
            .await?;
        let micros = "toUnixTimestamp64Micro(fromUnixTimestamp64Micro(toInt64({n}), 'UTC'))";
        let timestamp_min = self.widest(&TIMESTAMP_MIN_CANDIDATES, micros).await?;
        let timestamp_max = self.widest(&TIMESTAMP_MAX_CANDIDATES, micros).await?;
        let json_type = match self
            .client
            .query("SELECT toTypeName(CAST('{}' AS JSON))")
            .fetch_one::<String>()
            .await
        {
            Ok(name) => name.starts_with("JSON"),
            // Unknown type, or one behind an experimental setting: not usable as is.
            Err(e) => match self.classify("JSON probe", e) {
                SinkError::Statement { failure, .. } if !failure.class().retries() => false,
                other => return Err(other),
            },
        };
        Ok(DestinationLimits {
            date_min_days: i32::try_from(date_min).unwrap_or(Limits::CLASSIC.date_min_days),
            date_max_days: i32::try_from(date_max).unwrap_or(Limits::CLASSIC.date_max_days),
            timestamp_min_micros: timestamp_min,
            timestamp_max_micros: timestamp_max,
            json_type,
        })
    }

    /// The first of `candidates` that `expression` (with `{n}` the candidate) gives back
    /// unchanged; the last candidate (the classic bound) if none does.
    async fn widest<T: Into<i64> + Copy>(
        &self,
        candidates: &[T],
        expression: &str,
    ) -> Result<i64, SinkError> {
        let mut last = 0;
        for candidate in candidates {
            let n: i64 = (*candidate).into();
            last = n;
            let sql = format!(
                "SELECT toInt64({}) = {n}",
                expression.replace("{n}", &n.to_string())
            );
            match self.client.query(&sql).fetch_one::<bool>().await {
                Ok(true) => return Ok(n),
                Ok(false) => {}
                // A server that refuses the value outright does not hold it either.
                Err(e) => match self.classify("range probe", e) {
                    SinkError::Statement { failure, .. } if !failure.class().retries() => {}
                    other => return Err(other),
                },
            }
        }
        Ok(last)
    }

    /// Creates the destination database if missing.
    pub async fn create_database(&self) -> Result<(), SinkError> {
        self.execute("CREATE DATABASE", &ddl::create_database(&self.database))
            .await
    }

    /// Creates `table` for the source `schema` if missing.
    pub async fn create_table(
        &self,
        table: &str,
        schema: &TableSchema,
        options: MappingOptions,
    ) -> Result<(), SinkError> {
        let sql = ddl::create_table(&self.database, table, schema, options)?;
        self.execute(&format!("CREATE TABLE {table}"), &sql).await
    }

    /// Checks that an existing `table` has exactly the columns Ferry writes for `schema`.
    pub async fn check_columns(
        &self,
        table: &str,
        schema: &TableSchema,
        options: MappingOptions,
    ) -> Result<(), SinkError> {
        let found: Vec<(String, String)> = self
            .client
            .query("SELECT name, type FROM system.columns WHERE database = ? AND table = ?")
            .bind(&self.database)
            .bind(table)
            .fetch_all::<(String, String)>()
            .await
            .map_err(|e| self.classify("column lookup", e))?;
        for (column, expected) in ddl::expected_columns(schema, options) {
            let actual = found
                .iter()
                .find(|(name, _)| *name == column)
                .map(|(_, ty)| ty.clone());
            if actual.as_deref() != Some(expected.as_str()) {
                return Err(SinkError::Mismatch {
                    table: format!("{}.{table}", self.database),
                    column,
                    expected,
                    found: actual.unwrap_or_else(|| "missing".into()),
                });
            }
        }
        Ok(())
    }

    /// Rows in `table`, or `None` if it does not exist.
    pub async fn row_count(&self, table: &str) -> Result<Option<u64>, SinkError> {
        let exists = self
            .client
            .query("SELECT count() FROM system.tables WHERE database = ? AND name = ?")
            .bind(&self.database)
            .bind(table)
            .fetch_one::<u64>()
            .await
            .map_err(|e| self.classify("table lookup", e))?;
        if exists == 0 {
            return Ok(None);
        }
        let sql = format!(
            "SELECT count() FROM {}.{}",
            Ident(&self.database),
            Ident(table)
        );
        let rows = self
            .client
            .query(&sql)
            .fetch_one::<u64>()
            .await
            .map_err(|e| self.classify("row count", e))?;
        Ok(Some(rows))
    }

    /// Adds a column after `after` (a replicated ADD COLUMN); existing rows get the type's
    /// default.
    pub async fn add_column(
        &self,
        table: &str,
        column: &str,
        ty: &str,
        after: &str,
    ) -> Result<(), SinkError> {
        let sql = format!(
            "ALTER TABLE {}.{} ADD COLUMN IF NOT EXISTS {} {ty} AFTER {}",
            Ident(&self.database),
            Ident(table),
            Ident(column),
            Ident(after)
        );
        self.execute("ADD COLUMN", &sql).await
    }

    /// The latest live version of many rows by key (see [`lookup::latest_rows_query`]): for
    /// each row found, its key texts and the Postgres text of each of `values`.
    pub async fn latest_rows(
        &self,
        table: &str,
        key: &[&ColumnSchema],
        values: &[&ColumnSchema],
        literals: &[Vec<String>],
    ) -> Result<Vec<(Vec<String>, Vec<Option<String>>)>, SinkError> {
        if literals.is_empty() {
            return Ok(Vec::new());
        }
        let sql = lookup::latest_rows_query(&self.database, table, key, values, literals);
        let rows = self
            .client
            .query(&sql)
            .fetch_all::<Vec<Option<String>>>()
            .await
            .map_err(|e| self.classify("row lookup", e))?;
        Ok(rows
            .into_iter()
            .map(|mut row| {
                let values = row.split_off(key.len().min(row.len()));
                (
                    row.into_iter().map(Option::unwrap_or_default).collect(),
                    values,
                )
            })
            .collect())
    }

    /// Creates or replaces the `<table>_current` view of `schema` (see [`ddl::create_view`]).
    pub async fn create_view(&self, table: &str, schema: &TableSchema) -> Result<(), SinkError> {
        let sql = ddl::create_view(&self.database, table, schema);
        self.execute(&format!("CREATE VIEW {}", ddl::view_name(table)), &sql)
            .await
    }

    /// Changes the type of `column` of `table` to `ty`: Nullable, for a source column that
    /// became nullable or was dropped (later rows carry NULL in it).
    pub async fn modify_column(
        &self,
        table: &str,
        column: &str,
        ty: &str,
    ) -> Result<(), SinkError> {
        let sql = format!(
            "ALTER TABLE {}.{} MODIFY COLUMN {} {ty}",
            Ident(&self.database),
            Ident(table),
            Ident(column)
        );
        self.execute("MODIFY COLUMN", &sql).await
    }

    /// Deletes every row of `table` below `version`: a replicated TRUNCATE at that version,
    /// and the copied rows (version 0) a reload's copy landed after one.
    ///
    /// Unlike `TRUNCATE TABLE` this commutes with later writes: run late (by a worker paused
    /// past its lease, or again on replay) it removes only what the TRUNCATE removes anyway.
    /// It is a mutation, heavier than `TRUNCATE TABLE`: it rewrites the parts holding rows
    /// below `version`. It touches only the parts that exist when it is issued (never rows
    /// written after it), and `mutations_sync = 2` returns once every replica has applied it,
    /// so once the stream moves on no reader (FINAL, the `_current` view) sees a row below the
    /// TRUNCATE. The version goes in as text: a bare literal above 2^64 would be parsed as a
    /// Float64, losing the row's position inside its transaction.
    pub async fn delete_below(&self, table: &str, version: u128) -> Result<(), SinkError> {
        let sql = format!(
            "ALTER TABLE {}.{} DELETE WHERE {} < toUInt128('{version}') SETTINGS mutations_sync = 2",
            Ident(&self.database),
            Ident(table),
            Ident(VERSION_COLUMN)
        );
        self.execute("DELETE of rows before a TRUNCATE", &sql).await
    }

    /// Empties `table` at once (before a table's first copy; a replicated TRUNCATE deletes by
    /// version instead, see [`Sink::delete_below`]).
    pub async fn truncate(&self, table: &str) -> Result<(), SinkError> {
        let sql = format!("TRUNCATE TABLE {}.{}", Ident(&self.database), Ident(table));
        self.execute("TRUNCATE", &sql).await
    }

    /// The INSERT statement for RowBinary rows of `schema`'s columns plus version and delete
    /// flag, as [`crate::transcode::RowTranscoder`] writes them.
    pub fn insert_statement(&self, table: &str, schema: &TableSchema) -> String {
        let columns: Vec<String> = schema
            .columns
            .iter()
            .map(|c| Ident(&c.name).to_string())
            .chain([
                Ident(VERSION_COLUMN).to_string(),
                Ident(IS_DELETED_COLUMN).to_string(),
            ])
            .collect();
        // JSON columns take their values as text (the transcoder writes Postgres's text).
        let json = schema
            .columns
            .iter()
            .any(|c| TypeOverride::parse(&c.clickhouse_type) == Some(TypeOverride::Json));
        let settings = if json {
            " SETTINGS input_format_binary_read_json_as_string = 1"
        } else {
            ""
        };
        format!(
            "INSERT INTO {}.{} ({}){settings} FORMAT RowBinary",
            Ident(&self.database),
            Ident(table),
            columns.join(", ")
        )
    }

    /// Inserts a RowBinary body with `statement` (from [`Sink::insert_statement`]). Returns
    /// only once the rows are durable: the checkpoint that follows relies on it, so an
    /// asynchronous insert (a server or profile default of `async_insert = 1` would
    /// acknowledge rows still in a buffer) is switched off for this statement.
    pub async fn insert(&self, statement: &str, body: Bytes) -> Result<(), SinkError> {
        let mut insert = self
            .client
            .insert_formatted_with(statement.to_owned())
            .with_setting("async_insert", "0");
        insert
            .send(body)
            .await
            .map_err(|e| self.classify("INSERT", e))?;
        insert.end().await.map_err(|e| self.classify("INSERT", e))
    }
}
