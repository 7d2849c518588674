//! One replicated table inside a stream: its pending RowBinary rows, and how the columns the
//! stream sends map onto the destination table as the source's schema evolves.
//!
//! The table is tracked by relation oid, so a renamed table keeps replicating into its
//! destination table; how it follows schema changes is in `evolve`. Rows are encoded with
//! commit-ordered versions; no value is ever written as a zero stand-in; updates that left a
//! TOASTed value out wait for `toast` to fill it in.

use std::hash::{DefaultHasher, Hash, Hasher};

use bytes::Bytes;
use ferry_clickhouse::ddl;
use ferry_clickhouse::lookup::key_comparable;
use ferry_clickhouse::sink::Sink;
use ferry_clickhouse::transcode::RowTranscoder;
use ferry_clickhouse::types::MappingOptions;
use ferry_clickhouse::version;
use ferry_postgres::lookup::KeyText;
use ferry_postgres::pgoutput::{OldTuple, RelationColumn, Tuple, Value};
use ferry_postgres::snapshot::Visibility;
use ferry_proto::v1::{AlteredColumn, ColumnSchema, ReloadTruncate, TableChanges, TableSchema};
use ferry_store::cdc::CdcClaim;
use ferry_store::{Session, Store};
use tracing::{debug, info};

use crate::stream::StreamError;
use crate::toast::{self, Backfill, Deferred, Lookup, Resolved};

/// What writing and evolving a table needs to reach.
pub(crate) struct TableContext<'a> {
    pub(crate) sink: &'a Sink,
    pub(crate) source: &'a tokio_postgres::Client,
    pub(crate) store: &'a Store,
    pub(crate) claim: &'a CdcClaim,
    /// The session the claim is bound to: every ClickHouse write is fenced by it.
    pub(crate) session: &'a Session,
    pub(crate) options: MappingOptions,
}

impl TableContext<'_> {
    /// Self-fencing: call right before every ClickHouse write (see `fence`).
    pub(crate) async fn fence(&self) -> Result<(), StreamError> {
        crate::fence::before_write(self.session).await
    }
}

/// Where the transaction being applied is: rows get versions in commit order.
///
/// A row's version depends only on the transaction and the row message's place in it, never on
/// which tables this stream writes: a stream that leaves a table out (held for a reload, or
/// removed) and one that writes it number the other tables' rows alike, so a replay by either
/// rewrites a keyless row with the version it had (a multiset cannot absorb a repeat).
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Position {
    /// The transaction's commit LSN.
    pub(crate) commit_lsn: u64,
    /// Row messages (insert, update, delete) of the transaction so far, of any table.
    message: u64,
    /// Rows written for the current message (an update of a key writes two).
    row: u64,
}

impl Position {
    /// The start of the transaction committed at `commit_lsn`.
    pub(crate) fn begin(commit_lsn: u64) -> Self {
        Self {
            commit_lsn,
            message: 0,
            row: 0,
        }
    }

    /// A row message of the transaction begins, whether or not its table is written.
    pub(crate) fn message(&mut self) {
        self.message += 1;
        self.row = 0;
    }

    /// The version of the next row of the current message (at most three per message).
    pub(crate) fn next(&mut self) -> u128 {
        self.row = (self.row + 1).min(3);
        version::change(self.commit_lsn, (self.message << 2) | self.row)
    }
}

/// The reload copying a table, as a TRUNCATE needs it.
#[derive(Debug, Clone)]
pub(crate) struct ReloadCopy {
    /// The reload's generation.
    pub(crate) generation: u64,
    /// Its copy's snapshot.
    pub(crate) visibility: Option<Visibility>,
}

/// Bytes of filled-in rows written at once.
const FILL_SLICE_BYTES: usize = 8 << 20;

/// A relation as a Relation message announces it.
pub(crate) struct Announced<'a> {
    pub(crate) namespace: &'a str,
    pub(crate) name: &'a str,
    pub(crate) columns: &'a [RelationColumn<'a>],
}

/// A column as the stream sends it: name, type, typmod, part of the replica identity.
pub(crate) type Streamed = (String, u32, i32, bool);

/// A destination table's pending rows and column mapping.
pub(crate) struct TableBatch {
    /// schema.table as the pipe's spec names it (its etcd key and status entry).
    pub(crate) source_table: String,
    /// schema.table now, if the table was renamed since Setup.
    pub(crate) renamed_to: Option<String>,
    /// Destination table name.
    pub(crate) name: String,
    /// Destination columns (every column the table ever had).
    pub(crate) schema: TableSchema,
    pub(crate) keyless: bool,
    /// For a keyless table, the snapshot its rows were copied under: changes of transactions
    /// it already saw are not applied again (a multiset cannot absorb a repeat).
    pub(crate) snapshot: Option<Visibility>,
    /// While the table is reloaded: changes committed before this LSN are in the reload's copy
    /// and are not written (see docs/reload.md).
    pub(crate) reload_from: Option<u64>,
    /// While the table is reloaded: the reload and its copy's snapshot, for TRUNCATE.
    pub(crate) reload_copy: Option<ReloadCopy>,
    /// The table's last Relation message from before the reload's boundary, applied at its
    /// first change after it.
    pub(crate) pending_relation: Option<Bytes>,
    /// The stream's columns, as last announced.
    pub(crate) streamed: Vec<Streamed>,
    /// The destination columns inserts name, in destination order, each with its index among
    /// the streamed columns.
    pub(crate) written: Vec<(usize, usize)>,
    pub(crate) transcoder: RowTranscoder,
    pub(crate) statement: String,
    pub(crate) body: Vec<u8>,
    pub(crate) rows: u64,
    pub(crate) toast: Backfill,
    /// Changes replicated, cumulative across streams of the pipe.
    pub(crate) changes: TableChanges,
}

impl TableBatch {
    pub(crate) fn new(
        source_table: String,
        name: String,
        schema: TableSchema,
        snapshot: Option<Visibility>,
        sink: &Sink,
        options: MappingOptions,
    ) -> Self {
        let keyless = ddl::is_keyless(&schema);
        let mut batch = Self {
            transcoder: RowTranscoder::new(&[], options).for_table(&source_table),
            source_table,
            renamed_to: None,
            name,
            keyless,
            snapshot: snapshot.filter(|_| keyless),
            reload_from: None,
            reload_copy: None,
            pending_relation: None,
            streamed: Vec::new(),
            written: Vec::new(),
            statement: String::new(),
            body: Vec::new(),
            rows: 0,
            toast: Backfill::default(),
            changes: TableChanges::default(),
            schema,
        };
        // Until the stream announces the relation, assume the recorded columns.
        batch.streamed = batch
            .schema
            .columns
            .iter()
            .filter(|c| !c.dropped)
            .map(|c| {
                (
                    c.name.clone(),
                    c.type_oid,
                    c.type_modifier,
                    c.key_position > 0,
                )
            })
            .collect();
        batch.remap(sink, options);
        batch
    }

    /// schema.table as the spec names it.
    pub(crate) fn source_table(&self) -> &str {
        &self.source_table
    }

    /// The relation oid Setup recorded.
    pub(crate) fn relation_oid(&self) -> u32 {
        self.schema.relation_oid
    }

    /// schema.table as the source names it now.
    pub(crate) fn current_name(&self) -> String {
        format!("{}.{}", self.schema.source_schema, self.schema.source_table)
    }

    /// Whether the change of transaction `xid`, committed at `commit_lsn`, is already in the
    /// table's copy: committed before a reload's boundary, or (keyless tables, whose rows
    /// cannot absorb a repeat) seen by the copy's snapshot.
    pub(crate) fn already_copied(&self, xid: u32, commit_lsn: u64) -> bool {
        self.reload_from.is_some_and(|from| commit_lsn < from)
            || self.snapshot.as_ref().is_some_and(|s| s.sees(xid))
    }

    /// Rebuilds the written columns, transcoder and INSERT statement from `streamed`.
    pub(crate) fn remap(&mut self, sink: &Sink, options: MappingOptions) {
        self.written = self
            .schema
            .columns
            .iter()
            .enumerate()
            .filter_map(|(i, c)| {
                self.streamed
                    .iter()
                    .position(|s| s.0 == c.name)
                    .map(|at| (i, at))
            })
            .collect();
        let columns: Vec<ColumnSchema> = self
            .written
            .iter()
            .map(|(i, _)| self.schema.columns[*i].clone())
            .collect();
        // Counts of altered values carry over to the new column set.
        self.transcoder = self.transcoder.rebuilt(&columns, options);
        let mut shown = self.schema.clone();
        shown.columns = columns;
        self.statement = sink.insert_statement(&self.name, &shown);
    }

    /// Values written altered, by column, cumulative across streams of the pipe.
    pub(crate) fn altered(&self) -> Vec<AlteredColumn> {
        self.transcoder.altered()
    }

    /// Continues the counts an earlier stream of the pipe reported.
    pub(crate) fn carry_altered(&mut self, previous: &[AlteredColumn]) {
        self.transcoder.carry(previous);
    }

    /// The tuple's values in written-column order.
    fn mapped<'a>(&self, tuple: &Tuple<'a>) -> Vec<Value<'a>> {
        let values: Vec<Value<'a>> = tuple.values().collect();
        self.written
            .iter()
            .map(|(_, at)| values.get(*at).copied().unwrap_or(Value::Null))
            .collect()
    }

    /// Encodes a row in written-column order.
    fn encode(
        &mut self,
        values: Vec<Option<&[u8]>>,
        version: u128,
        deleted: bool,
    ) -> Result<(), StreamError> {
        if deleted {
            self.transcoder
                .write_text_delete(values, version, &mut self.body)?;
        } else {
            self.transcoder
                .write_text_row(values, version, false, &mut self.body)?;
        }
        self.rows += 1;
        Ok(())
    }

    pub(crate) async fn insert(
        &mut self,
        new: &Tuple<'_>,
        position: &mut Position,
        ctx: &TableContext<'_>,
    ) -> Result<(), StreamError> {
        let values = self.mapped(new);
        self.admit_nulls(&values, ctx).await?;
        if let Some(key) = self.key_hash(&values) {
            self.toast.note(key);
        }
        self.encode(
            values.iter().map(|v| text(*v)).collect(),
            position.next(),
            false,
        )?;
        self.changes.inserted += 1;
        Ok(())
    }

    pub(crate) async fn update(
        &mut self,
        old: Option<OldTuple<'_>>,
        new: &Tuple<'_>,
        position: &mut Position,
        ctx: &TableContext<'_>,
    ) -> Result<(), StreamError> {
        let new = self.mapped(new);
        self.admit_nulls(&new, ctx).await?;
        let old_full = match old {
            Some(OldTuple::Full(row)) => Some(self.mapped(&row)),
            _ => None,
        };
        self.changes.updated += 1;
        if self.keyless {
            // One copy of the old row goes, one of the new row comes.
            let old = old_full.ok_or_else(|| StreamError::IdentityChanged {
                table: self.current_name(),
                detail: "an update of a keyless table came without its old row".into(),
                restore: "FULL".into(),
            })?;
            let removed = old.iter().map(|v| text(*v)).collect();
            self.encode(removed, position.next(), true)?;
            let values = self.resolve(&new, Some(&old))?;
            return self.encode(values, position.next(), false);
        }
        // The key changed: the old key is deleted, the new row inserted. pgoutput sends the
        // old key only then; with REPLICA IDENTITY FULL it sends the old row every time.
        let old_key = match old {
            Some(OldTuple::Key(key)) => Some(self.mapped(&key)),
            Some(OldTuple::Full(_)) => old_full.clone().filter(|row| self.key_changed(row, &new)),
            None => None,
        };
        let keys = [
            old_key.as_deref().and_then(|k| self.key_hash(k)),
            self.key_hash(&new),
        ];
        let needs_backfill = old_full.is_none() && new.contains(&Value::Unchanged);
        // A deferred row must see every earlier change of its key in ClickHouse.
        if needs_backfill && keys.iter().flatten().any(|k| self.toast.holds(*k)) {
            self.write(ctx).await?;
        }
        if let Some(key) = &old_key {
            let marker = key.iter().map(|v| text(*v)).collect();
            self.encode(marker, position.next(), true)?;
        }
        for key in keys.into_iter().flatten() {
            self.toast.note(key);
        }
        let version = position.next();
        if needs_backfill {
            // Key texts only for the rows that need them: a lookup by key.
            let old_key_text = old_key.as_deref().and_then(|k| self.key_text(k));
            let new_key_text = self.key_text(&new);
            return self.defer(&new, old_key_text, new_key_text, version);
        }
        let values = self.resolve(&new, old_full.as_deref())?;
        self.encode(values, version, false)
    }

    /// Holds an update that left values out until the batch is written.
    fn defer(
        &mut self,
        new: &[Value<'_>],
        old_key: Option<KeyText>,
        new_key: Option<KeyText>,
        version: u128,
    ) -> Result<(), StreamError> {
        let comparable = self
            .written
            .iter()
            .map(|(i, _)| &self.schema.columns[*i])
            .filter(|c| c.key_position > 0)
            .all(key_comparable);
        let Some(new_key) = new_key.filter(|_| comparable) else {
            let column = self
                .written
                .iter()
                .zip(new)
                .find(|(_, v)| **v == Value::Unchanged)
                .map_or_else(String::new, |((i, _), _)| {
                    self.schema.columns[*i].name.clone()
                });
            return Err(StreamError::UnchangedToast {
                table: self.current_name(),
                column,
            });
        };
        let values = new
            .iter()
            .map(|v| match v {
                Value::Unchanged => None,
                other => Some(text(*other).map(<[u8]>::to_vec)),
            })
            .collect();
        self.toast.pending.push(Deferred {
            version,
            keys: old_key.into_iter().chain([new_key]).collect(),
            values,
        });
        Ok(())
    }

    pub(crate) fn delete(
        &mut self,
        old: OldTuple<'_>,
        position: &mut Position,
    ) -> Result<(), StreamError> {
        let (OldTuple::Key(row) | OldTuple::Full(row)) = old;
        let values = self.mapped(&row);
        if let Some(key) = self.key_hash(&values) {
            self.toast.note(key);
        }
        self.encode(
            values.iter().map(|v| text(*v)).collect(),
            position.next(),
            true,
        )?;
        self.changes.deleted += 1;
        Ok(())
    }

    /// A failed insert of this table's rows, naming the table (its remedy is a resync of it).
    fn write_error(&self, source: ferry_clickhouse::sink::SinkError) -> StreamError {
        StreamError::Write {
            table: self.source_table.clone(),
            source,
        }
    }

    /// Resolves deferred rows, then inserts the buffered rows. Returns how many.
    pub(crate) async fn write(&mut self, ctx: &TableContext<'_>) -> Result<u64, StreamError> {
        let filled = if self.toast.pending.is_empty() {
            0
        } else {
            self.fill_in(ctx).await?
        };
        self.toast.clear();
        if self.rows == 0 {
            return Ok(filled);
        }
        let body = Bytes::from(std::mem::take(&mut self.body));
        ctx.fence().await?;
        ctx.sink
            .insert(&self.statement, body)
            .await
            .map_err(|e| self.write_error(e))?;
        Ok(filled + std::mem::take(&mut self.rows))
    }

    /// Resolves the deferred rows (unchanged TOAST values), a lookup's worth at a time, each
    /// chunk written before the next is looked up so memory stays bounded. Returns the rows
    /// written.
    async fn fill_in(&mut self, ctx: &TableContext<'_>) -> Result<u64, StreamError> {
        let mut stats = Resolved::default();
        let source_table = self.current_name();
        loop {
            let chunk = self.toast.next_chunk();
            if chunk.is_empty() {
                break;
            }
            let lookup = Lookup {
                sink: ctx.sink,
                source: ctx.source,
                table: &self.name,
                source_table: &source_table,
                key: ddl::key_columns(&self.schema),
                columns: self
                    .written
                    .iter()
                    .map(|(i, _)| &self.schema.columns[*i])
                    .collect(),
            };
            let (previous, done) = toast::look_up(&chunk, &lookup).await?;
            stats.add(done);
            // Written in slices, so memory holds one lookup's answer and one slice.
            let mut rows = Vec::new();
            for row in &chunk {
                let Some(values) = previous.complete(row) else {
                    debug!(table = %self.source_table, "row of an update is gone at the source; a later delete removes it");
                    stats.dropped += 1;
                    continue;
                };
                self.transcoder
                    .write_text_row(values, row.version, false, &mut rows)?;
                if rows.len() >= FILL_SLICE_BYTES {
                    let full = std::mem::take(&mut rows);
                    ctx.fence().await?;
                    ctx.sink
                        .insert(&self.statement, Bytes::from(full))
                        .await
                        .map_err(|e| self.write_error(e))?;
                }
            }
            if !rows.is_empty() {
                ctx.fence().await?;
                ctx.sink
                    .insert(&self.statement, Bytes::from(rows))
                    .await
                    .map_err(|e| self.write_error(e))?;
            }
        }
        info!(
            table = %self.source_table,
            rows = stats.rows,
            lookups = stats.lookups,
            source_lookups = stats.source_lookups,
            dropped = stats.dropped,
            "unchanged TOAST values filled in"
        );
        Ok(stats.rows - stats.dropped)
    }

    /// Applies a TRUNCATE of transaction `xid`, at `position`, after the rows before it: every
    /// row below the TRUNCATE's own version is deleted, not the whole table, so the statement
    /// commutes with later writes. A worker that runs it late (it was paused past its lease
    /// and another worker took over) then removes only rows the TRUNCATE removes anyway, never
    /// rows written after it. While a reload copies the table, a TRUNCATE its snapshot already
    /// saw is skipped (the copy reflects it); a later one is recorded first, so the rows the
    /// copy lands after it are deleted once the copy is complete.
    pub(crate) async fn truncate(
        &mut self,
        xid: u32,
        position: &mut Position,
        ctx: &TableContext<'_>,
    ) -> Result<(), StreamError> {
        // The message was counted by the caller (`ours_at`).
        let truncated_at = position.next();
        if let Some(copy) = &self.reload_copy {
            if copy.visibility.as_ref().is_some_and(|v| v.sees(xid)) {
                return Ok(());
            }
            let record = ReloadTruncate {
                generation: copy.generation,
                commit_lsn: version::commit_lsn(truncated_at),
                position: u64::try_from(truncated_at & u128::from(u64::MAX)).unwrap_or(u64::MAX),
            };
            if !ctx
                .store
                .put_reload_truncate(ctx.claim, &self.source_table, &record)
                .await?
            {
                return Err(StreamError::ClaimLost);
            }
        }
        self.write(ctx).await?;
        ctx.fence().await?;
        ctx.sink.delete_below(&self.name, truncated_at).await?;
        Ok(())
    }

    /// Whether the row key (primary key / identity columns) differs between the old and the
    /// new row.
    fn key_changed(&self, old: &[Value<'_>], new: &[Value<'_>]) -> bool {
        self.written
            .iter()
            .zip(old.iter().zip(new))
            .filter(|((i, _), _)| self.schema.columns[*i].key_position > 0)
            .any(|(_, (a, b))| *b != Value::Unchanged && a != b)
    }

    /// A hash of the row key, without allocating (every insert, update and delete of a keyed
    /// table computes it): what the batch remembers of the keys it holds.
    fn key_hash(&self, values: &[Value<'_>]) -> Option<u64> {
        if self.keyless {
            return None;
        }
        let mut hasher = DefaultHasher::new();
        for ((i, _), value) in self.written.iter().zip(values) {
            let position = self.schema.columns[*i].key_position;
            if position == 0 {
                continue;
            }
            match value {
                Value::Text(bytes) | Value::Binary(bytes) => (position, *bytes).hash(&mut hasher),
                _ => return None,
            }
        }
        Some(hasher.finish())
    }

    /// The row key as the text of each key column in key order, if every key value is there.
    fn key_text(&self, values: &[Value<'_>]) -> Option<KeyText> {
        if self.keyless {
            return None;
        }
        let mut key: Vec<(u32, String)> = Vec::new();
        for ((i, _), value) in self.written.iter().zip(values) {
            let column = &self.schema.columns[*i];
            if column.key_position == 0 {
                continue;
            }
            match value {
                Value::Text(bytes) | Value::Binary(bytes) => key.push((
                    column.key_position,
                    String::from_utf8_lossy(bytes).into_owned(),
                )),
                _ => return None,
            }
        }
        key.sort_by_key(|(position, _)| *position);
        Some(key.into_iter().map(|(_, text)| text).collect())
    }

    /// The row's values; unchanged TOAST values come from the full old row.
    fn resolve<'a>(
        &self,
        new: &[Value<'a>],
        old: Option<&[Value<'a>]>,
    ) -> Result<Vec<Option<&'a [u8]>>, StreamError> {
        new.iter()
            .enumerate()
            .map(|(i, value)| match value {
                Value::Unchanged => match old.and_then(|o| o.get(i)) {
                    Some(previous @ (Value::Text(_) | Value::Binary(_))) => Ok(text(*previous)),
                    Some(Value::Null) => Ok(None),
                    _ => Err(StreamError::UnchangedToast {
                        table: self.current_name(),
                        column: self.written.get(i).map_or_else(
                            || format!("#{i}"),
                            |(c, _)| self.schema.columns[*c].name.clone(),
                        ),
                    }),
                },
                other => Ok(text(*other)),
            })
            .collect()
    }
}

fn text(value: Value<'_>) -> Option<&[u8]> {
    match value {
        Value::Text(bytes) | Value::Binary(bytes) => Some(bytes),
        Value::Null | Value::Unchanged => None,
    }
}
