//! Reading what a destination table holds up to a version, as RowBinary rows of the source
//! columns followed by the delete flag, for verification.
//!
//! A keyed table's state is the latest version of each key, unless deleted; a keyless table's
//! is a multiset in which every event row adds (or, deleted, removes) one copy of its values.

use clickhouse::query::BytesCursor;
use ferry_proto::v1::TableSchema;

use crate::ddl::{IS_DELETED_COLUMN, Ident, VERSION_COLUMN};
use crate::rowbinary::{RowBinaryError, RowSplitter, Shape};
use crate::sink::{Sink, SinkError};
use crate::types::MappingOptions;

/// The largest `_ferry_version` of a transaction that committed at or before `lsn`.
///
/// With 128-bit versions ((commit LSN << 64) | position in the transaction) that is
/// ((lsn + 1) << 64) - 1. With 64-bit versions (the LSN of the change) it is `lsn` itself.
pub fn version_bound(lsn: u64, wide: bool) -> u128 {
    if wide {
        ((u128::from(lsn) + 1) << 64) - 1
    } else {
        u128::from(lsn)
    }
}

/// Keyed: the latest version of each key at or below `bound` (all versions when `None`).
pub fn keyed_state_query(
    database: &str,
    table: &str,
    schema: &TableSchema,
    bound: Option<u128>,
) -> String {
    let key: Vec<String> = crate::ddl::key_columns(schema)
        .iter()
        .map(|c| Ident(&c.name).to_string())
        .collect();
    let key = key.join(", ");
    format!(
        "SELECT {}, {} FROM {}.{}{} ORDER BY {key}, {} DESC LIMIT 1 BY {key}",
        columns(schema),
        Ident(IS_DELETED_COLUMN),
        Ident(database),
        Ident(table),
        filter(bound),
        Ident(VERSION_COLUMN),
    )
}

/// Keyless: every event row at or below `bound` (`FINAL` collapses only replays of an event).
pub fn multiset_query(
    database: &str,
    table: &str,
    schema: &TableSchema,
    bound: Option<u128>,
) -> String {
    format!(
        "SELECT {}, {} FROM {}.{} FINAL{}",
        columns(schema),
        Ident(IS_DELETED_COLUMN),
        Ident(database),
        Ident(table),
        filter(bound),
    )
}

fn columns(schema: &TableSchema) -> String {
    schema
        .columns
        .iter()
        .map(|c| Ident(&c.name).to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn filter(bound: Option<u128>) -> String {
    // As a UInt128 literal, so the comparison works whether the column is UInt64 or UInt128.
    bound.map_or_else(String::new, |b| {
        format!(" WHERE {} <= toUInt128('{b}')", Ident(VERSION_COLUMN))
    })
}

/// Reading a table's rows failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// ClickHouse failed.
    #[error(transparent)]
    Sink(#[from] SinkError),
    /// The rows did not split as the table's columns.
    #[error("ClickHouse returned rows that do not match the table's columns")]
    RowBinary(#[from] RowBinaryError),
}

/// A stream of RowBinary rows: the source columns, then the delete flag.
pub struct StateRows {
    cursor: BytesCursor,
    buffer: Vec<u8>,
    splitter: RowSplitter,
    columns: usize,
}

impl std::fmt::Debug for StateRows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateRows")
            .field("buffered", &self.buffer.len())
            .finish_non_exhaustive()
    }
}

impl Sink {
    /// Whether `table`'s version column is 128 bits wide (UInt128).
    pub async fn wide_versions(&self, table: &str) -> Result<bool, SinkError> {
        let ty = self
            .client()
            .query("SELECT type FROM system.columns WHERE database = ? AND table = ? AND name = ?")
            .bind(self.database())
            .bind(table)
            .bind(VERSION_COLUMN)
            .fetch_optional::<String>()
            .await
            .map_err(|e| self.classify("version column lookup", e))?;
        Ok(ty.as_deref() == Some("UInt128"))
    }

    /// Runs `query` (from [`keyed_state_query`] or [`multiset_query`]) for `schema`'s table.
    pub fn state_rows(
        &self,
        query: &str,
        schema: &TableSchema,
        options: MappingOptions,
    ) -> Result<StateRows, SinkError> {
        let cursor = self
            .client()
            .query(query)
            // Native JSON columns come back as the text the transcoder wrote.
            .with_setting("output_format_binary_write_json_as_string", "1")
            .fetch_bytes("RowBinary")
            .map_err(|e| self.classify("verification read", e))?;
        // The delete flag, UInt8, follows the source columns.
        let splitter =
            RowSplitter::for_columns(&schema.columns, options).followed_by(Shape::Fixed(1));
        Ok(StateRows {
            cursor,
            buffer: Vec::new(),
            splitter,
            columns: schema.columns.len(),
        })
    }
}

impl StateRows {
    /// Reads the next chunk and hands each complete row to `on_row`: the bytes of the source
    /// columns, the splitter (columns located), and whether the row is a delete. Returns the
    /// rows handed over, or `None` at the end of the stream.
    pub async fn next_rows(
        &mut self,
        mut on_row: impl FnMut(&[u8], &RowSplitter, bool),
    ) -> Result<Option<u64>, ReadError> {
        let sink_error = |e| ReadError::Sink(SinkError::statement("verification read", e));
        let Some(chunk) = self.cursor.next().await.map_err(sink_error)? else {
            if !self.buffer.is_empty() {
                return Err(RowBinaryError::Truncated(self.buffer.len()).into());
            }
            return Ok(None);
        };
        self.buffer.extend_from_slice(&chunk);
        let mut at = 0;
        let mut rows = 0;
        while let Some(len) = self.splitter.split(&self.buffer[at..])? {
            let row = &self.buffer[at..at + len];
            let columns_end = self.splitter.column(self.columns).start;
            on_row(&row[..columns_end], &self.splitter, row[len - 1] != 0);
            at += len;
            rows += 1;
        }
        self.buffer.drain(..at);
        Ok(Some(rows))
    }
}
