//! One replicated table inside a stream: its pending RowBinary rows, and how the columns the
//! stream sends map onto the destination table as the source's schema evolves.
//!
//! The destination keeps every column it ever had: ADD COLUMN adds one (ALTER TABLE … ADD
//! COLUMN), DROP COLUMN keeps it (later rows carry NULL, or the type's zero value for a NOT
//! NULL column), and a column whose type changed fails the table with a remedy (resync).

use bytes::Bytes;
use ferry_clickhouse::sink::Sink;
use ferry_clickhouse::transcode::RowTranscoder;
use ferry_clickhouse::types::{MappingOptions, column_type};
use ferry_postgres::pgoutput::{OldTuple, RelationColumn, Tuple, Value};
use ferry_postgres::schema::describe_table;
use ferry_proto::v1::{ColumnSchema, TableSchema, TableState};
use ferry_store::Store;
use ferry_store::cdc::CdcClaim;
use tracing::info;

use crate::stream::StreamError;

/// What a schema change needs to reach.
pub(crate) struct Evolve<'a> {
    pub(crate) sink: &'a Sink,
    pub(crate) source: &'a tokio_postgres::Client,
    pub(crate) store: &'a Store,
    pub(crate) claim: &'a CdcClaim,
    pub(crate) options: MappingOptions,
}

/// A destination table's pending rows and column mapping.
pub(crate) struct TableBatch {
    /// schema.table in the source.
    source_table: String,
    /// Destination table name.
    pub(crate) name: String,
    /// Destination columns (every column the table ever had).
    schema: TableSchema,
    /// For each destination column, its index among the columns the stream sends.
    positions: Vec<Option<usize>>,
    /// The stream's column names and types, as last announced.
    streamed: Vec<(String, u32, i32)>,
    transcoder: RowTranscoder,
    pub(crate) statement: String,
    pub(crate) body: Vec<u8>,
    pub(crate) rows: u64,
}

impl TableBatch {
    pub(crate) fn new(
        source_table: String,
        name: String,
        schema: TableSchema,
        sink: &Sink,
        options: MappingOptions,
    ) -> Self {
        let positions = (0..schema.columns.len()).map(Some).collect();
        let streamed = schema
            .columns
            .iter()
            .map(|c| (c.name.clone(), c.type_oid, c.type_modifier))
            .collect();
        Self {
            statement: sink.insert_statement(&name, &schema),
            transcoder: RowTranscoder::new(&schema.columns, options),
            source_table,
            name,
            schema,
            positions,
            streamed,
            body: Vec::new(),
            rows: 0,
        }
    }

    /// Takes in a Relation message: the same columns as before, or a schema change to apply.
    pub(crate) async fn relation(
        &mut self,
        columns: &[RelationColumn<'_>],
        evolve: &Evolve<'_>,
    ) -> Result<(), StreamError> {
        let streamed: Vec<(String, u32, i32)> = columns
            .iter()
            .map(|c| (c.name.to_owned(), c.type_oid, c.type_modifier))
            .collect();
        if streamed == self.streamed {
            return Ok(());
        }
        // Rows already buffered were encoded for the old columns.
        self.write(evolve.sink).await?;
        let (namespace, table) = self
            .source_table
            .split_once('.')
            .unwrap_or(("public", &self.source_table));
        let described = describe_table(evolve.source, namespace, table).await?;
        let mut changed = false;
        for column in &self.schema.columns {
            if let Some(now) = described.columns.iter().find(|d| d.name == column.name) {
                let same = (
                    now.type_oid,
                    now.type_modifier,
                    now.element_type_oid,
                    &now.type_kind,
                ) == (
                    column.type_oid,
                    column.type_modifier,
                    column.element_type_oid,
                    &column.type_kind,
                );
                if !same {
                    return Err(StreamError::SchemaChanged {
                        table: self.source_table.clone(),
                        detail: format!("column {} changed type to {}", column.name, now.type_name),
                    });
                }
            }
        }
        for now in &described.columns {
            if self.schema.columns.iter().any(|c| c.name == now.name)
                || !streamed.iter().any(|s| s.0 == now.name)
            {
                continue;
            }
            let mut added: ColumnSchema = now.clone();
            added.key_position = 0;
            let after = self
                .schema
                .columns
                .last()
                .map_or_else(String::new, |c| c.name.clone());
            evolve
                .sink
                .add_column(
                    &self.name,
                    &added.name,
                    &column_type(&added, evolve.options),
                    &after,
                )
                .await?;
            info!(table = %self.source_table, column = %added.name, "column added");
            self.schema.columns.push(added);
            changed = true;
        }
        if changed {
            self.transcoder = RowTranscoder::new(&self.schema.columns, evolve.options);
            self.statement = evolve.sink.insert_statement(&self.name, &self.schema);
            let state = TableState {
                schema: Some(self.schema.clone()),
                destination_created: true,
            };
            evolve
                .store
                .put_table_state_claimed(evolve.claim, &self.source_table, &state)
                .await?;
        }
        self.positions = self
            .schema
            .columns
            .iter()
            .map(|c| streamed.iter().position(|s| s.0 == c.name))
            .collect();
        self.streamed = streamed;
        Ok(())
    }

    /// The tuple's values in destination column order (dropped columns: None).
    fn mapped<'a>(&self, tuple: &Tuple<'a>) -> Vec<Value<'a>> {
        let values: Vec<Value<'a>> = tuple.values().collect();
        self.positions
            .iter()
            .map(|p| {
                p.and_then(|i| values.get(i).copied())
                    .unwrap_or(Value::Null)
            })
            .collect()
    }

    pub(crate) fn insert(&mut self, new: &Tuple<'_>, version: u64) -> Result<(), StreamError> {
        let values = self.resolve(&self.mapped(new), None)?;
        self.transcoder
            .write_text_filled(values, version, &mut self.body)?;
        self.rows += 1;
        Ok(())
    }

    pub(crate) fn update(
        &mut self,
        old: Option<OldTuple<'_>>,
        new: &Tuple<'_>,
        version: u64,
    ) -> Result<(), StreamError> {
        let new = self.mapped(new);
        let old_full = match old {
            Some(OldTuple::Full(row)) => Some(self.mapped(&row)),
            _ => None,
        };
        // The key changed: the old key is deleted, the new row inserted. pgoutput sends the
        // old key only then; with REPLICA IDENTITY FULL it sends the old row every time.
        let old_key = match old {
            Some(OldTuple::Key(key)) => Some(self.mapped(&key)),
            Some(OldTuple::Full(_)) => old_full.clone().filter(|row| self.key_changed(row, &new)),
            None => None,
        };
        if let Some(key) = old_key {
            self.transcoder.write_text_delete(
                key.iter().map(|v| text(*v)),
                version,
                &mut self.body,
            )?;
            self.rows += 1;
        }
        let values = self.resolve(&new, old_full.as_deref())?;
        self.transcoder
            .write_text_filled(values, version, &mut self.body)?;
        self.rows += 1;
        Ok(())
    }

    pub(crate) fn delete(&mut self, old: OldTuple<'_>, version: u64) -> Result<(), StreamError> {
        let (OldTuple::Key(row) | OldTuple::Full(row)) = old;
        let values = self.mapped(&row);
        self.transcoder.write_text_delete(
            values.iter().map(|v| text(*v)),
            version,
            &mut self.body,
        )?;
        self.rows += 1;
        Ok(())
    }

    /// Inserts the buffered rows. Returns how many.
    pub(crate) async fn write(&mut self, sink: &Sink) -> Result<u64, StreamError> {
        if self.rows == 0 {
            return Ok(0);
        }
        sink.insert(&self.statement, Bytes::from(std::mem::take(&mut self.body)))
            .await?;
        Ok(std::mem::take(&mut self.rows))
    }

    /// Whether the row key (primary key / identity columns; every column when there is none)
    /// differs between the old and the new row.
    fn key_changed(&self, old: &[Value<'_>], new: &[Value<'_>]) -> bool {
        let keyless = self.schema.columns.iter().all(|c| c.key_position == 0);
        self.schema
            .columns
            .iter()
            .zip(old.iter().zip(new))
            .filter(|(c, _)| keyless || c.key_position > 0)
            .any(|(_, (a, b))| *b != Value::Unchanged && a != b)
    }

    /// The row's values, unchanged TOAST values taken from the full old row when there is one.
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
                    _ => Err(StreamError::UnchangedToast {
                        table: self.source_table.clone(),
                        column: self
                            .schema
                            .columns
                            .get(i)
                            .map_or_else(|| format!("#{i}"), |c| c.name.clone()),
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
