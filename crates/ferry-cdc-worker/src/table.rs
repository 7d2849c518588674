//! One replicated table inside a stream: its pending RowBinary rows, and how the columns the
//! stream sends map onto the destination table as the source's schema evolves.
//!
//! The destination keeps every column it ever had: ADD COLUMN adds one (ALTER TABLE … ADD
//! COLUMN), DROP COLUMN keeps it (later rows carry NULL, or the type's zero value for a NOT
//! NULL column), and a column whose type changed fails the table with a remedy (resync).

use bytes::Bytes;
use ferry_clickhouse::sink::Sink;
use ferry_clickhouse::transcode::RowTranscoder;
use ferry_clickhouse::types::{MappingOptions, ValueKind, column_type, value_kind};
use ferry_postgres::pgoutput::{OldTuple, RelationColumn, Tuple, Value};
use ferry_postgres::schema::describe_table;
use ferry_proto::v1::{AlteredColumn, ColumnSchema, TableChanges, TableSchema, TableState};
use ferry_store::Store;
use ferry_store::cdc::CdcClaim;
use tracing::{debug, info};

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
    /// Changes replicated, cumulative across streams of the pipe.
    pub(crate) changes: TableChanges,
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
            transcoder: RowTranscoder::new(&schema.columns, options).for_table(&source_table),
            source_table,
            name,
            schema,
            positions,
            streamed,
            body: Vec::new(),
            rows: 0,
            changes: TableChanges::default(),
        }
    }

    /// schema.table in the source.
    pub(crate) fn source_table(&self) -> &str {
        &self.source_table
    }

    /// Values written altered, by column, cumulative across streams of the pipe.
    pub(crate) fn altered(&self) -> Vec<AlteredColumn> {
        self.transcoder.altered()
    }

    /// Continues the counts an earlier stream of the pipe reported.
    pub(crate) fn carry_altered(&mut self, previous: &[AlteredColumn]) {
        self.transcoder.carry(previous);
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
            // Rows that existed before the column show Postgres's default for it (its
            // "missing value"); ClickHouse computes a column default for old rows alike.
            let ty = column_type(&added, evolve.options);
            let missing = missing_value(evolve.source, described.relation_oid, &added.name).await?;
            let ty = match missing.and_then(|text| default_expression(&added, &text, &ty)) {
                Some(default) => format!("{ty} DEFAULT {default}"),
                None => ty,
            };
            evolve
                .sink
                .add_column(&self.name, &added.name, &ty, &after)
                .await?;
            info!(table = %self.source_table, column = %added.name, "column added");
            self.schema.columns.push(added);
            changed = true;
        }
        if changed {
            self.transcoder = self
                .transcoder
                .rebuilt(&self.schema.columns, evolve.options);
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
        let values = self.resolve(&self.mapped(new), None, None)?;
        self.transcoder
            .write_text_filled(values, version, &mut self.body)?;
        self.rows += 1;
        self.changes.inserted += 1;
        Ok(())
    }

    pub(crate) async fn update(
        &mut self,
        old: Option<OldTuple<'_>>,
        new: &Tuple<'_>,
        version: u64,
        sink: &Sink,
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
        // Unchanged TOAST values are not sent: take them from the full old row, or else from
        // the row's latest version in ClickHouse — under the old key if the key changed, and
        // before that version is marked deleted below.
        let backfill = if old_full.is_none() && new.contains(&Value::Unchanged) {
            Some(self.previous_values(&new, old_key.as_deref(), sink).await?)
        } else {
            None
        };
        if let Some(key) = &old_key {
            self.transcoder.write_text_delete(
                key.iter().map(|v| text(*v)),
                version,
                &mut self.body,
            )?;
            self.rows += 1;
        }
        let values = self.resolve(&new, old_full.as_deref(), backfill.as_ref())?;
        self.transcoder
            .write_text_filled(values, version, &mut self.body)?;
        self.rows += 1;
        self.changes.updated += 1;
        Ok(())
    }

    /// The latest values in ClickHouse of the columns `new` leaves unchanged, by column.
    async fn previous_values(
        &mut self,
        new: &[Value<'_>],
        old_key: Option<&[Value<'_>]>,
        sink: &Sink,
    ) -> Result<Vec<Option<Option<String>>>, StreamError> {
        let unchanged = |table: &str, column: &ColumnSchema| StreamError::UnchangedToast {
            table: table.to_owned(),
            column: column.name.clone(),
        };
        // Rows buffered for this table may hold the latest version: write them first.
        self.write(sink).await?;
        let wanted: Vec<usize> = (0..new.len())
            .filter(|i| new[*i] == Value::Unchanged)
            .collect();
        let first = &self.schema.columns[wanted.first().copied().unwrap_or(0)];
        let expressions: Vec<String> = wanted
            .iter()
            .map(|i| postgres_text_of(&self.schema.columns[*i]))
            .collect();
        // Look under the old key first (the key changed), then the new one: a change replayed
        // from before the snapshot may find the snapshot's newer row under the new key.
        let mut found = None;
        for values in old_key.into_iter().chain([new]) {
            let key = self
                .key_text(values)
                .ok_or_else(|| unchanged(&self.source_table, first))?;
            if key.is_empty() {
                return Err(unchanged(&self.source_table, first));
            }
            found = sink.latest_row(&self.name, &expressions, &key).await?;
            if found.is_some() {
                break;
            }
        }
        let mut values = vec![None; new.len()];
        match found {
            Some(row) => {
                for (i, value) in wanted.into_iter().zip(row) {
                    values[i] = Some(value);
                }
            }
            // Neither version exists: the row was deleted before the snapshot was taken, so a
            // later change in the stream deletes it again; its unchanged values do not matter.
            None => {
                debug!(table = %self.source_table, "row of a replayed update is gone; unchanged values left empty");
                for i in wanted {
                    values[i] = Some(None);
                }
            }
        }
        Ok(values)
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
        self.changes.deleted += 1;
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

    /// The row key as (column, text), if every key column's ClickHouse text equals its
    /// Postgres text (integers, text, enum labels, UUIDs).
    fn key_text(&self, values: &[Value<'_>]) -> Option<Vec<(String, String)>> {
        let mut key = Vec::new();
        for (column, value) in self.schema.columns.iter().zip(values) {
            if column.key_position == 0 {
                continue;
            }
            let comparable = matches!(
                value_kind(column, MappingOptions::default()),
                ValueKind::Int(_)
                    | ValueKind::UInt32
                    | ValueKind::Text
                    | ValueKind::Enum
                    | ValueKind::Uuid
            );
            match value {
                Value::Text(bytes) if comparable => {
                    key.push((
                        column.name.clone(),
                        String::from_utf8_lossy(bytes).into_owned(),
                    ));
                }
                _ => return None,
            }
        }
        Some(key)
    }

    /// The row's values; unchanged TOAST values come from the full old row when there is one,
    /// else from `backfill` (values read back from ClickHouse, by column).
    fn resolve<'a>(
        &self,
        new: &[Value<'a>],
        old: Option<&[Value<'a>]>,
        backfill: Option<&'a Vec<Option<Option<String>>>>,
    ) -> Result<Vec<Option<&'a [u8]>>, StreamError> {
        new.iter()
            .enumerate()
            .map(|(i, value)| match value {
                Value::Unchanged => {
                    match (old.and_then(|o| o.get(i)), backfill.and_then(|b| b.get(i))) {
                        (Some(previous @ (Value::Text(_) | Value::Binary(_))), _) => {
                            Ok(text(*previous))
                        }
                        (_, Some(Some(previous))) => Ok(previous.as_deref().map(str::as_bytes)),
                        _ => Err(StreamError::UnchangedToast {
                            table: self.source_table.clone(),
                            column: self
                                .schema
                                .columns
                                .get(i)
                                .map_or_else(|| format!("#{i}"), |c| c.name.clone()),
                        }),
                    }
                }
                other => Ok(text(*other)),
            })
            .collect()
    }
}

/// The value rows that predate an added column have for it (`attmissingval`), as text.
async fn missing_value(
    source: &tokio_postgres::Client,
    relation: u32,
    column: &str,
) -> Result<Option<String>, StreamError> {
    let row = source
        .query_opt(
            "SELECT (attmissingval::text::text[])[1] FROM pg_attribute \
             WHERE attrelid = $1 AND attname = $2 AND atthasmissing",
            &[&relation, &column],
        )
        .await
        .map_err(|source| ferry_postgres::SourceError::Query {
            what: "missing value",
            source,
        })?;
    Ok(row.and_then(|r| r.get::<_, Option<String>>(0)))
}

/// A ClickHouse DEFAULT expression for the Postgres text `text` of a `column` of type `ty`,
/// for the kinds whose text ClickHouse parses the same way; `None` for others.
fn default_expression(column: &ColumnSchema, text: &str, ty: &str) -> Option<String> {
    let quoted = format!("'{}'", text.replace('\\', "\\\\").replace('\'', "\\'"));
    let value = match value_kind(column, MappingOptions::default()) {
        ValueKind::Int(_) | ValueKind::UInt32 | ValueKind::Float(_) | ValueKind::Decimal { .. } => {
            quoted
        }
        ValueKind::Text | ValueKind::Enum => quoted,
        ValueKind::Bool => match text {
            "t" | "true" => "true".into(),
            "f" | "false" => "false".into(),
            _ => return None,
        },
        ValueKind::Uuid => format!("toUUID({quoted})"),
        ValueKind::Date => format!("toDate32({quoted})"),
        ValueKind::Timestamp { .. } => format!("parseDateTime64BestEffort({quoted}, 6, 'UTC')"),
        ValueKind::Bytes | ValueKind::Json | ValueKind::Array(_) => return None,
    };
    Some(format!("CAST({value} AS {ty})"))
}

/// A ClickHouse expression giving the column's value as Postgres prints it (what the text
/// transcoder reads): bytea as hex after a backslash-x, arrays as `{…}` literals with quoted
/// elements, the rest as its string.
fn postgres_text_of(column: &ColumnSchema) -> String {
    let name = ferry_clickhouse::ddl::Ident(&column.name).to_string();
    let expression = match value_kind(column, MappingOptions::default()) {
        ValueKind::Bytes => format!(r"concat('\\x', lower(hex({name})))"),
        ValueKind::Array(_) => format!(
            r#"concat('{{', arrayStringConcat(arrayMap(x -> if(isNull(x), 'NULL', concat('"', replaceAll(replaceAll(toString(x), '\\', '\\\\'), '"', '\\"'), '"')), {name}), ','), '}}')"#
        ),
        _ => format!("toString({name})"),
    };
    format!("toNullable({expression})")
}

fn text(value: Value<'_>) -> Option<&[u8]> {
    match value {
        Value::Text(bytes) | Value::Binary(bytes) => Some(bytes),
        Value::Null | Value::Unchanged => None,
    }
}
