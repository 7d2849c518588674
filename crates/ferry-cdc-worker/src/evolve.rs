//! How a replicated table follows its source's schema: renames (tracked by oid), added,
//! dropped and newly nullable columns, and a replica identity that must keep sending the key.
//!
//! The destination keeps every column it ever had. Each insert names only the columns the
//! stream sends at that point: a column added later (met again when a restart replays older
//! changes) takes its ClickHouse DEFAULT, which is Postgres's missing value for it; a column
//! dropped at the source becomes Nullable and gets NULL. A column that became nullable (`DROP
//! NOT NULL`) becomes Nullable before its first NULL is written. A type change or a replica
//! identity that no longer sends the key fails the table with a remedy.

use ferry_clickhouse::types::{MappingOptions, ValueKind, column_type, value_kind};
use ferry_postgres::lookup::missing_value;
use ferry_postgres::pgoutput::Value;
use ferry_postgres::schema::describe_relation;
use ferry_proto::v1::{ColumnSchema, ReplicaIdentity, TableSchema, TableState};
use tracing::info;

use crate::stream::StreamError;
use crate::table::{Announced, Streamed, TableBatch, TableContext};

impl TableBatch {
    /// Takes in a Relation message: the same table as before, or a rename or schema change to
    /// apply.
    pub(crate) async fn relation(
        &mut self,
        announced: &Announced<'_>,
        ctx: &TableContext<'_>,
    ) -> Result<(), StreamError> {
        let mut changed = false;
        if (announced.namespace, announced.name)
            != (
                self.schema.source_schema.as_str(),
                self.schema.source_table.as_str(),
            )
        {
            info!(table = %self.source_table, now = %format!("{}.{}", announced.namespace, announced.name), "table renamed at the source; still replicating into {}", self.name);
            self.schema.source_schema = announced.namespace.to_owned();
            self.schema.source_table = announced.name.to_owned();
            changed = true;
        }
        let current = self.current_name();
        self.renamed_to = (current != self.source_table).then_some(current);
        let streamed: Vec<Streamed> = announced
            .columns
            .iter()
            .map(|c| (c.name.to_owned(), c.type_oid, c.type_modifier, c.key))
            .collect();
        self.check_identity(&streamed)?;
        if streamed == self.streamed && !changed {
            return Ok(());
        }
        // Rows already buffered were encoded for the old columns.
        self.write(ctx).await?;
        let described = describe_relation(ctx.source, self.schema.relation_oid).await?;
        for column in &self.schema.columns {
            let Some(now) = described.columns.iter().find(|d| d.name == column.name) else {
                continue;
            };
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
        // A column that is gone under its name but whose number lives on under another name
        // was renamed: its values would land in a new column while the old one kept the rows
        // before, so the table fails instead.
        for column in self
            .schema
            .columns
            .iter()
            .filter(|c| !c.dropped && c.attnum > 0)
        {
            let by_name = described.columns.iter().any(|d| d.name == column.name);
            let renamed = described
                .columns
                .iter()
                .find(|d| d.attnum == column.attnum && d.name != column.name);
            if let (false, Some(now)) = (by_name, renamed) {
                return Err(StreamError::SchemaChanged {
                    table: self.source_table.clone(),
                    detail: format!("column {} was renamed to {}", column.name, now.name),
                });
            }
        }
        changed |= self.add_columns(&described, &streamed, ctx).await?;
        changed |= self.drop_columns(&described, ctx).await?;
        self.streamed = streamed;
        self.remap(ctx.sink, ctx.options);
        if changed {
            self.record(ctx).await?;
        }
        Ok(())
    }

    /// Fails the table if the stream no longer identifies its rows by the recorded key: a
    /// changed replica identity would write delete markers under the wrong key.
    fn check_identity(&self, streamed: &[Streamed]) -> Result<(), StreamError> {
        let flagged = |name: &str| streamed.iter().any(|s| s.0 == name && s.3);
        let lost: Vec<&str> = if self.keyless {
            streamed
                .iter()
                .filter(|s| !s.3)
                .map(|s| s.0.as_str())
                .collect()
        } else {
            self.schema
                .columns
                .iter()
                .filter(|c| c.key_position > 0 && !flagged(&c.name))
                .map(|c| c.name.as_str())
                .collect()
        };
        if lost.is_empty() {
            return Ok(());
        }
        let recorded = match self.schema.replica_identity() {
            ReplicaIdentity::Full => "FULL".to_owned(),
            ReplicaIdentity::Index => "USING INDEX <the index Setup saw>".to_owned(),
            _ => "DEFAULT".to_owned(),
        };
        Err(StreamError::IdentityChanged {
            table: self.current_name(),
            detail: format!(
                "the replica identity no longer includes {}",
                lost.join(", ")
            ),
            restore: recorded,
        })
    }

    /// Adds streamed columns the destination lacks (a replicated ADD COLUMN). Rows that
    /// existed before show Postgres's default for the column (its missing value), which
    /// becomes the ClickHouse column's DEFAULT.
    async fn add_columns(
        &mut self,
        described: &TableSchema,
        streamed: &[Streamed],
        ctx: &TableContext<'_>,
    ) -> Result<bool, StreamError> {
        let mut added_any = false;
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
            let ty = column_type(&added, ctx.options);
            let missing = missing_value(ctx.source, described.relation_oid, &added.name).await?;
            let ty = match missing.and_then(|text| default_expression(&added, &text, &ty)) {
                Some(default) => format!("{ty} DEFAULT {default}"),
                None => ty,
            };
            ctx.fence().await?;
            ctx.sink
                .add_column(&self.name, &added.name, &ty, &after)
                .await?;
            info!(table = %self.source_table, column = %added.name, "column added");
            self.schema.columns.push(added);
            added_any = true;
        }
        Ok(added_any)
    }

    /// Marks destination columns the source no longer has as dropped: they become Nullable
    /// (later rows have no value for them) and leave the table's view.
    async fn drop_columns(
        &mut self,
        described: &TableSchema,
        ctx: &TableContext<'_>,
    ) -> Result<bool, StreamError> {
        let mut dropped_any = false;
        for column in &mut self.schema.columns {
            if column.dropped || described.columns.iter().any(|d| d.name == column.name) {
                continue;
            }
            if column.key_position > 0 {
                return Err(StreamError::SchemaChanged {
                    table: self.source_table.clone(),
                    detail: format!("key column {} was dropped", column.name),
                });
            }
            if !column.nullable && !is_array(column) {
                column.nullable = true;
                ctx.fence().await?;
                ctx.sink
                    .modify_column(&self.name, &column.name, &column_type(column, ctx.options))
                    .await?;
            }
            column.dropped = true;
            info!(table = %self.source_table, column = %column.name, "column dropped at the source; kept in ClickHouse with NULL in later rows");
            dropped_any = true;
        }
        Ok(dropped_any)
    }

    /// Makes written columns Nullable where `values` holds a NULL the destination column
    /// cannot take, once the source says the column is nullable now (`DROP NOT NULL`).
    pub(crate) async fn admit_nulls(
        &mut self,
        values: &[Value<'_>],
        ctx: &TableContext<'_>,
    ) -> Result<(), StreamError> {
        let refused: Vec<usize> = self
            .written
            .iter()
            .zip(values)
            .filter(|((i, _), v)| {
                let column = &self.schema.columns[*i];
                **v == Value::Null && !column.nullable && !is_array(column)
            })
            .map(|((i, _), _)| *i)
            .collect();
        if refused.is_empty() {
            return Ok(());
        }
        // Buffered rows are encoded for the NOT NULL type.
        self.write(ctx).await?;
        let described = describe_relation(ctx.source, self.schema.relation_oid).await?;
        for i in refused {
            let column = &mut self.schema.columns[i];
            let nullable_now = described
                .columns
                .iter()
                .any(|d| d.name == column.name && d.nullable);
            if !nullable_now {
                return Err(StreamError::NullInNotNull {
                    table: self.source_table.clone(),
                    column: column.name.clone(),
                });
            }
            column.nullable = true;
            ctx.fence().await?;
            ctx.sink
                .modify_column(&self.name, &column.name, &column_type(column, ctx.options))
                .await?;
            info!(table = %self.source_table, column = %column.name, "column became nullable at the source; now Nullable in ClickHouse");
        }
        self.remap(ctx.sink, ctx.options);
        self.record(ctx).await
    }

    /// Records the table's schema (and view) after a change.
    async fn record(&mut self, ctx: &TableContext<'_>) -> Result<(), StreamError> {
        ctx.fence().await?;
        ctx.sink.create_view(&self.name, &self.schema).await?;
        let state = TableState {
            schema: Some(self.schema.clone()),
            destination_created: true,
        };
        if !ctx
            .store
            .put_table_state_claimed(ctx.claim, &self.source_table, &state)
            .await?
        {
            return Err(StreamError::ClaimLost);
        }
        Ok(())
    }
}

fn is_array(column: &ColumnSchema) -> bool {
    column.element_type_oid != 0
}

/// A ClickHouse DEFAULT expression for the Postgres text `text` of a `column` of type `ty`,
/// for the kinds whose text ClickHouse parses the same way; `None` for others.
fn default_expression(column: &ColumnSchema, text: &str, ty: &str) -> Option<String> {
    let quoted = ferry_clickhouse::lookup::string_literal(text);
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
