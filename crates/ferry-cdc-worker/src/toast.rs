//! Unchanged TOAST values: pgoutput leaves a large value out of an UPDATE that did not change
//! it (without REPLICA IDENTITY FULL), and Ferry never writes a value it does not have.
//!
//! Such an update is deferred until its batch is written. Then all deferred rows of a table
//! are resolved together: their latest live version in ClickHouse (one keyed `FINAL` lookup per
//! few thousand rows, under the old key first when the key changed), else the row as it is now
//! in Postgres (a CDC-only pipe's rows that predate it, or a row the snapshot never held): if
//! that is newer than the change, a later change in the stream carries a higher version and
//! wins, so the table still converges. A row found in neither has since been deleted at the
//! source: its update is dropped, and the delete that follows in the stream removes the key.
//!
//! A deferred row must see every earlier change of its key, so when a row arrives for a key
//! that already has rows in the batch, the batch is written (and its deferred rows resolved)
//! first. Keys are remembered by hash: a collision only costs an extra write.

use std::collections::{HashMap, HashSet};

use ferry_clickhouse::lookup::{MAX_KEY_BYTES, MAX_KEYS, key_literal};
use ferry_clickhouse::sink::Sink;
use ferry_postgres::lookup::{KeyColumn, KeyText, current_rows};
use ferry_proto::v1::ColumnSchema;

use crate::stream::StreamError;

/// A value of a deferred row: known (possibly NULL), or left out by pgoutput.
pub(crate) type Slot = Option<Option<Vec<u8>>>;

/// An update waiting for the values it left out.
#[derive(Debug)]
pub(crate) struct Deferred {
    pub(crate) version: u128,
    /// Keys to look the row up under, in order: the old key when the key changed, then the new.
    pub(crate) keys: Vec<KeyText>,
    /// The row in written-column order; `None` where the value was left out.
    pub(crate) values: Vec<Slot>,
}

/// The deferred rows of one table's batch and the keys the batch holds.
#[derive(Debug, Default)]
pub(crate) struct Backfill {
    pub(crate) pending: Vec<Deferred>,
    keys: HashSet<u64>,
}

/// What resolving needs to know about the table.
pub(crate) struct Lookup<'a> {
    pub(crate) sink: &'a Sink,
    pub(crate) source: &'a tokio_postgres::Client,
    /// Destination table.
    pub(crate) table: &'a str,
    /// The source table now (schema.table).
    pub(crate) source_table: &'a str,
    /// Key columns in key order.
    pub(crate) key: Vec<&'a ColumnSchema>,
    /// The written columns, in written order.
    pub(crate) columns: Vec<&'a ColumnSchema>,
}

impl Backfill {
    /// Whether the batch holds a row of `key`.
    pub(crate) fn holds(&self, key: u64) -> bool {
        self.keys.contains(&key)
    }

    /// Remembers that the batch holds a row of `key`.
    pub(crate) fn note(&mut self, key: u64) {
        self.keys.insert(key);
    }

    /// Forgets the batch (it was written).
    pub(crate) fn clear(&mut self) {
        self.keys.clear();
    }

    /// Takes the next deferred rows one lookup serves (none when all are resolved).
    pub(crate) fn next_chunk(&mut self) -> Vec<Deferred> {
        let end = chunk_end(&self.pending);
        let rest = self.pending.split_off(end);
        std::mem::replace(&mut self.pending, rest)
    }
}

/// The values a chunk of deferred rows left out, as found in ClickHouse (latest live version)
/// or, for rows ClickHouse does not hold, in Postgres now.
pub(crate) struct Previous {
    found: HashMap<KeyText, Vec<Option<String>>>,
    now: HashMap<KeyText, Vec<Option<String>>>,
}

impl Previous {
    /// `row` complete, in written-column order; `None` if its key exists nowhere (the row was
    /// deleted at the source since, and a later delete in the stream removes the key).
    pub(crate) fn complete<'a>(&'a self, row: &'a Deferred) -> Option<Vec<Option<&'a [u8]>>> {
        let previous = row
            .keys
            .iter()
            .find_map(|k| self.found.get(k))
            .or_else(|| row.keys.last().and_then(|k| self.now.get(k)))?;
        Some(
            row.values
                .iter()
                .zip(previous)
                .map(|(value, previous)| match value {
                    Some(value) => value.as_deref(),
                    None => previous.as_deref().map(str::as_bytes),
                })
                .collect(),
        )
    }
}

/// Looks up what the rows of `chunk` (from [`Backfill::next_chunk`]) left out: one keyed
/// lookup in ClickHouse, and one in Postgres for the rows ClickHouse does not hold.
pub(crate) async fn look_up(
    chunk: &[Deferred],
    lookup: &Lookup<'_>,
) -> Result<(Previous, Resolved), StreamError> {
    let mut resolved = Resolved {
        rows: u64::try_from(chunk.len()).unwrap_or(u64::MAX),
        lookups: 1,
        ..Resolved::default()
    };
    let found = latest(chunk, lookup).await?;
    let missing: Vec<KeyText> = chunk
        .iter()
        .filter(|d| !d.keys.iter().any(|k| found.contains_key(k)))
        .filter_map(|d| d.keys.last().cloned())
        .collect();
    let now = if missing.is_empty() {
        HashMap::new()
    } else {
        resolved.source_lookups += 1;
        current(&missing, lookup).await?
    };
    Ok((Previous { found, now }, resolved))
}

impl Resolved {
    /// Adds another chunk's counts.
    pub(crate) fn add(&mut self, other: Self) {
        self.rows += other.rows;
        self.lookups += other.lookups;
        self.source_lookups += other.source_lookups;
        self.dropped += other.dropped;
    }
}

/// What resolving deferred rows took.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Resolved {
    /// Deferred rows.
    pub(crate) rows: u64,
    /// Keyed lookups in ClickHouse.
    pub(crate) lookups: u64,
    /// Keyed lookups in Postgres (rows ClickHouse did not hold).
    pub(crate) source_lookups: u64,
    /// Rows gone at the source (a later delete removes them).
    pub(crate) dropped: u64,
}

/// The end of the next chunk of `pending` that one lookup query can serve.
fn chunk_end(pending: &[Deferred]) -> usize {
    let mut bytes = 0;
    let mut keys = 0;
    for (i, row) in pending.iter().enumerate() {
        let size: usize = row.keys.iter().flatten().map(|k| k.len() + 4).sum();
        if i > 0 && (bytes + size > MAX_KEY_BYTES || keys + row.keys.len() > MAX_KEYS) {
            return i;
        }
        bytes += size;
        keys += row.keys.len();
    }
    pending.len()
}

/// A key whose text is no value of its column's type: the row cannot be looked up.
fn unchanged(lookup: &Lookup<'_>) -> StreamError {
    StreamError::UnchangedToast {
        table: lookup.source_table.to_owned(),
        column: lookup
            .key
            .iter()
            .map(|c| c.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
    }
}

/// The latest live values in ClickHouse of the rows of `chunk`, by key text, in written order.
async fn latest(
    chunk: &[Deferred],
    lookup: &Lookup<'_>,
) -> Result<HashMap<KeyText, Vec<Option<String>>>, StreamError> {
    let mut literals = Vec::new();
    for key in chunk.iter().flat_map(|d| &d.keys) {
        let tuple: Option<Vec<String>> = lookup
            .key
            .iter()
            .zip(key)
            .map(|(column, text)| key_literal(column, text))
            .collect();
        literals.push(tuple.ok_or_else(|| unchanged(lookup))?);
    }
    let rows = lookup
        .sink
        .latest_rows(lookup.table, &lookup.key, &lookup.columns, &literals)
        .await?;
    Ok(rows.into_iter().collect())
}

/// The current values in Postgres of the rows of `keys`, by key text, in written order.
async fn current(
    keys: &[KeyText],
    lookup: &Lookup<'_>,
) -> Result<HashMap<KeyText, Vec<Option<String>>>, StreamError> {
    let key: Vec<KeyColumn<'_>> = lookup
        .key
        .iter()
        .map(|c| KeyColumn {
            name: &c.name,
            type_name: &c.type_name,
        })
        .collect();
    let columns: Vec<&str> = lookup.columns.iter().map(|c| c.name.as_str()).collect();
    Ok(current_rows(lookup.source, lookup.source_table, &key, &columns, keys).await?)
}
