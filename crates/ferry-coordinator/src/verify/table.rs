//! One pass over one table: Postgres rows through the transcoder, then ClickHouse's state,
//! into a keyed or multiset comparison.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use ferry_clickhouse::compare::{KeyedComparison, MultisetComparison, Tally};
use ferry_clickhouse::rowbinary::{RowBinaryError, RowSplitter, Shape, render};
use ferry_clickhouse::state::{keyed_state_query, multiset_query};
use ferry_clickhouse::transcode::{RowTranscoder, select_list};
use ferry_clickhouse::types::{MappingOptions, value_kind};
use ferry_postgres::consistent::ConsistentSnapshot;
use ferry_postgres::copy::{CopyDecoder, DecodeError};
use ferry_proto::v1::verify_pipe_response::Event;
use ferry_proto::v1::{ColumnSchema, TableSchema, VerifyProgress, VerifyStage};
use tokio_stream::StreamExt as _;

use super::{Context, TablePlan, VerifyError};

/// Least time between two progress messages of a table.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// What differed in a pass, to limit a recheck to.
#[derive(Debug)]
pub(crate) enum Differing {
    /// Key bytes of a keyed table.
    Keys(HashSet<Box<[u8]>>),
    /// Row hashes of a keyless table.
    Rows(HashSet<u128>),
}

/// The result of one pass.
#[derive(Debug)]
pub(crate) struct Pass {
    pub(crate) tally: Tally,
    pub(crate) differing: Differing,
}

/// Whether the table has no key (REPLICA IDENTITY FULL): compared as multisets of rows.
pub(crate) fn keyless(schema: &TableSchema) -> bool {
    schema.columns.iter().all(|c| c.key_position == 0)
}

/// The key columns' indices, in key order.
fn key_columns(schema: &TableSchema) -> Vec<usize> {
    let mut key: Vec<usize> = (0..schema.columns.len())
        .filter(|&i| schema.columns[i].key_position > 0)
        .collect();
    key.sort_by_key(|&i| schema.columns[i].key_position);
    key
}

enum Comparison {
    Keyed {
        comparison: KeyedComparison,
        columns: Vec<usize>,
        key: Vec<u8>,
    },
    Multiset(MultisetComparison),
}

impl Comparison {
    fn new(schema: &TableSchema, only: Option<Differing>) -> Self {
        if keyless(schema) {
            let only = match only {
                Some(Differing::Rows(rows)) => Some(rows),
                _ => None,
            };
            Self::Multiset(MultisetComparison::new(only))
        } else {
            let only = match only {
                Some(Differing::Keys(keys)) => Some(keys),
                _ => None,
            };
            Self::Keyed {
                comparison: KeyedComparison::new(only),
                columns: key_columns(schema),
                key: Vec::new(),
            }
        }
    }

    /// The key bytes of the row `splitter` last split.
    fn key<'k>(
        key: &'k mut Vec<u8>,
        columns: &[usize],
        row: &[u8],
        splitter: &RowSplitter,
    ) -> &'k [u8] {
        key.clear();
        for &i in columns {
            key.extend_from_slice(&row[splitter.column(i)]);
        }
        key
    }

    fn postgres(&mut self, row: &[u8], splitter: &RowSplitter) {
        match self {
            Self::Keyed {
                comparison,
                columns,
                key,
            } => comparison.postgres_row(Self::key(key, columns, row, splitter), row),
            Self::Multiset(comparison) => comparison.postgres_row(row),
        }
    }

    fn clickhouse(&mut self, row: &[u8], splitter: &RowSplitter, deleted: bool) {
        match self {
            // The latest version of the key is a delete: the key is absent.
            Self::Keyed { .. } if deleted => {}
            Self::Keyed {
                comparison,
                columns,
                key,
            } => comparison.clickhouse_row(Self::key(key, columns, row, splitter), row),
            Self::Multiset(comparison) => comparison.clickhouse_row(row, deleted),
        }
    }

    fn finish(self) -> Pass {
        match self {
            Self::Keyed { comparison, .. } => {
                let (tally, keys) = comparison.finish();
                Pass {
                    tally,
                    differing: Differing::Keys(keys),
                }
            }
            Self::Multiset(comparison) => {
                let (tally, rows) = comparison.finish();
                Pass {
                    tally,
                    differing: Differing::Rows(rows),
                }
            }
        }
    }
}

/// Progress messages of one pass, at most every [`PROGRESS_EVERY`].
struct Progress<'c, 'a> {
    context: &'c Context<'a>,
    message: VerifyProgress,
    last: Instant,
}

impl Progress<'_, '_> {
    async fn add(&mut self, rows: u64, force: bool) -> Result<(), VerifyError> {
        self.message.rows_compared += rows;
        if force || self.last.elapsed() >= PROGRESS_EVERY {
            self.last = Instant::now();
            self.context
                .send(Event::Progress(self.message.clone()))
                .await?;
        }
        Ok(())
    }
}

/// Compares `table` at `snapshot` with ClickHouse's state up to `bound` (everything when
/// `None`), limited to what differed before when `only` is given.
pub(crate) async fn compare(
    context: &Context<'_>,
    snapshot: &ConsistentSnapshot,
    bound: Option<u128>,
    table: &TablePlan,
    only: Option<Differing>,
    stage: VerifyStage,
) -> Result<Pass, VerifyError> {
    let schema = &table.schema;
    let options = table.options;
    let estimate = snapshot.estimated_rows(schema).await?;
    let mut progress = Progress {
        context,
        message: VerifyProgress {
            source_table: table.source_table.clone(),
            stage: stage.into(),
            rows_compared: 0,
            // Rows are read from both sides.
            rows_estimated: estimate.saturating_mul(2),
        },
        last: Instant::now(),
    };
    progress.add(0, true).await?;
    let mut comparison = Comparison::new(schema, only);

    // Postgres: binary COPY, transcoded exactly as the snapshot worker writes it.
    let stream = snapshot
        .copy_table(schema, &select_list(&schema.columns, options))
        .await?;
    tokio::pin!(stream);
    let mut decoder = CopyDecoder::new(schema.columns.len());
    let mut transcoder = RowTranscoder::new(&schema.columns, options);
    let mut splitter = RowSplitter::for_columns(&schema.columns, options);
    let mut row = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(VerifyError::Copy)?;
        let rows = decoder
            .feed(&chunk, |fields| {
                row.clear();
                transcoder.write_row(fields, 0, false, &mut row)?;
                // The transcoder appends Ferry's version and delete flag: only the source
                // columns are compared.
                let len = splitter
                    .split(&row)?
                    .ok_or(RowBinaryError::Truncated(row.len()))?;
                comparison.postgres(&row[..len], &splitter);
                Ok::<_, VerifyError>(())
            })
            .map_err(|e| match e {
                DecodeError::Copy(e) => VerifyError::Decode(e),
                DecodeError::Row(e) => e,
            })?;
        progress.add(rows, false).await?;
    }
    decoder.finish()?;

    // ClickHouse: the state up to the bound, split by the same column layouts.
    let query = if keyless(schema) {
        multiset_query(
            context.sink.database(),
            &table.destination_table,
            schema,
            bound,
        )
    } else {
        keyed_state_query(
            context.sink.database(),
            &table.destination_table,
            schema,
            bound,
        )
    };
    let mut rows = context.sink.state_rows(&query, schema, options)?;
    while let Some(read) = rows
        .next_rows(|row, splitter, deleted| comparison.clickhouse(row, splitter, deleted))
        .await?
    {
        progress.add(read, false).await?;
    }
    progress.add(0, true).await?;
    Ok(comparison.finish())
}

/// Key bytes (keyed table) or row bytes with a copy count (keyless) as `name=value, ...`.
pub(crate) fn show_example(schema: &TableSchema, bytes: &[u8], copies: u64) -> String {
    let options = MappingOptions::default();
    let columns: Vec<&ColumnSchema> = if keyless(schema) {
        schema.columns.iter().collect()
    } else {
        key_columns(schema)
            .into_iter()
            .map(|i| &schema.columns[i])
            .collect()
    };
    let mut splitter = RowSplitter::new(
        columns
            .iter()
            .map(|c| Shape::of(&value_kind(c, options), c.nullable))
            .collect(),
    );
    if !matches!(splitter.split(bytes), Ok(Some(_))) {
        return format!("{bytes:?}");
    }
    let shown: Vec<String> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let value = render(
                &value_kind(c, options),
                c.nullable,
                &bytes[splitter.column(i)],
            );
            format!("{}={value}", c.name)
        })
        .collect();
    let shown = shown.join(", ");
    if copies > 1 {
        format!("{shown} ({copies} copies)")
    } else {
        shown
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn column(name: &str, type_oid: u32, nullable: bool, key_position: u32) -> ColumnSchema {
        ColumnSchema {
            name: name.into(),
            type_oid,
            type_modifier: -1,
            nullable,
            type_kind: "b".into(),
            key_position,
            ..Default::default()
        }
    }

    #[test]
    fn examples_show_key_columns_in_key_order_or_whole_rows() {
        let keyed = TableSchema {
            columns: vec![
                column("note", 25, true, 0),
                column("shop", 25, false, 2),
                column("id", 20, false, 1),
            ],
            ..Default::default()
        };
        assert_eq!(key_columns(&keyed), [2, 1]);
        let mut key = 42i64.to_le_bytes().to_vec();
        key.extend_from_slice(&[2, b'e', b'u']);
        assert_eq!(show_example(&keyed, &key, 1), "id=42, shop=eu");
        let bag = TableSchema {
            columns: vec![column("a", 23, false, 0), column("b", 25, true, 0)],
            ..Default::default()
        };
        assert!(keyless(&bag));
        let mut row = 1i32.to_le_bytes().to_vec();
        row.push(1); // NULL
        assert_eq!(show_example(&bag, &row, 3), "a=1, b=NULL (3 copies)");
    }
}
