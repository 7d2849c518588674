//! Copying one snapshot partition: binary COPY of a ctid range from Postgres, transcoded into
//! RowBinary and inserted into ClickHouse in bounded batches.
//!
//! Memory is bounded by one insert batch plus one COPY chunk, whatever the table size. Rows
//! carry a version below every change's (0, or the row's ctid for keyless tables, see
//! [`ferry_clickhouse::version`]), so a partition copied twice (after a crash) only repeats
//! rows that ReplacingMergeTree collapses, and any change replicated later wins over them.

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use ferry_clickhouse::sink::{Sink, SinkError};
use ferry_clickhouse::transcode::{RowTranscoder, TranscodeError, select_list};
use ferry_clickhouse::types::MappingOptions;
use ferry_clickhouse::{ddl, version};
use ferry_core::error_policy::{ErrorClass, Verdict};
use ferry_core::secret::{SecretError, SecretKey};
use ferry_core::spec::source_table_name;
use ferry_postgres::copy::{CopyDecoder, CopyError, DecodeError};
use ferry_postgres::{SourceError, connection, snapshot};
use ferry_proto::v1::{AlteredColumn, PipeSpec, SnapshotPartition, TableSchema, TableState};
use ferry_store::{Store, StoreError};
use tokio::task::JoinHandle;
use tokio_stream::StreamExt as _;

/// Rows per ClickHouse insert, at most.
const BATCH_ROWS: u64 = 100_000;
/// Bytes per ClickHouse insert, at most (checked after each COPY chunk). With one batch being
/// filled and one in flight per partition, this bounds a worker's memory: 4 partitions at
/// once stay well under 128 MB.
const BATCH_BYTES: usize = 8 << 20;
/// Room past the limit for the rows of the COPY chunk that crossed it.
const BATCH_SLACK: usize = 1 << 20;

/// Why a partition could not be copied.
#[derive(Debug, thiserror::Error)]
pub enum PartitionError {
    /// Reading the source failed.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// The COPY stream failed.
    #[error("COPY failed")]
    Copy(#[source] tokio_postgres::Error),
    /// The COPY stream was malformed.
    #[error(transparent)]
    Decode(#[from] CopyError),
    /// A value could not be transcoded.
    #[error(transparent)]
    Transcode(#[from] TranscodeError),
    /// Writing ClickHouse failed.
    #[error(transparent)]
    Sink(#[from] SinkError),
    /// The pipe's secrets could not be opened.
    #[error("the pipe's secrets cannot be opened")]
    Secret(#[source] SecretError),
    /// etcd failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// An insert task died.
    #[error("insert task failed")]
    Join(#[source] tokio::task::JoinError),
    /// Setup did not record the table.
    #[error("no recorded schema for {0}")]
    NoSchema(String),
    /// A keyless partitioned table with more leaves than its row versions can number.
    #[error("{0} has more than 65536 partitions; keyless tables are limited to that many")]
    TooManyRelations(String),
}

impl PartitionError {
    /// What the error policy does about it: a value the destination cannot hold under the
    /// pipe's policy, a malformed COPY stream or a missing schema fail the pipe; ClickHouse,
    /// Postgres and etcd errors go by what their server said.
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::Source(e) => e.class(),
            Self::Copy(e) => ferry_postgres::query_class(e),
            Self::Sink(e) => e.class(),
            Self::Store(e) => e.class(),
            Self::Join(_) => ErrorClass::Retry,
            Self::Decode(_)
            | Self::Transcode(_)
            | Self::Secret(_)
            | Self::NoSchema(_)
            | Self::TooManyRelations(_) => ErrorClass::Permanent,
        }
    }

    /// The error policy's verdict on copying a partition of `pipe`'s `table` (schema.table).
    pub fn verdict(&self, pipe: &str, table: &str) -> Verdict {
        let resync = format!("ferry resync {pipe} --table {table}");
        let remedy = match self {
            Self::Transcode(e) => e.remedy(),
            Self::Source(e) => e.remedy(),
            Self::Sink(e) if e.table_changed() => format!(
                "the destination table of {table} was dropped or altered in ClickHouse: recreate the pipe, or, once it has failed, reload the table with {resync}"
            ),
            Self::Sink(e) => e.remedy(),
            Self::Secret(_) => {
                "give every worker the secret key the pipe was created with (--secret-key-file)"
                    .into()
            }
            _ => format!("see the error; once its cause is fixed, {resync}"),
        };
        Verdict::new(self.class(), remedy)
    }
}

/// A partition copied: its rows, the values written altered, by column, and the snapshot
/// it was read under.
#[derive(Debug, Clone, Default)]
pub struct Copied {
    /// Rows read and written.
    pub rows: u64,
    /// Values clamped, nulled or emptied, by column.
    pub altered: Vec<AlteredColumn>,
    /// The visibility of the snapshot read under (`pg_current_snapshot()`).
    pub visibility: String,
}

/// Copies `partition` of the pipe `spec` into its destination table.
pub async fn copy_partition(
    store: &Store,
    key: &SecretKey,
    spec: &PipeSpec,
    state: &TableState,
    partition: &SnapshotPartition,
    exported_snapshot: Option<&str>,
) -> Result<Copied, PartitionError> {
    let schema = state
        .schema
        .as_ref()
        .ok_or_else(|| PartitionError::NoSchema(partition.source_table.clone()))?;
    let mapping = spec
        .tables
        .iter()
        .find(|t| source_table_name(t) == partition.source_table)
        .ok_or_else(|| PartitionError::NoSchema(partition.source_table.clone()))?;
    let sealed = store
        .get_pipe_secrets(&spec.name)
        .await?
        .unwrap_or_default();
    let secrets = key
        .open(&spec.name, &sealed)
        .map_err(PartitionError::Secret)?;

    let source = connection::connect(
        &spec.source.clone().unwrap_or_default(),
        &secrets.source_password,
    )
    .await?;
    let visibility = snapshot::begin_read(&source, exported_snapshot).await?;
    let sink = Sink::new(
        &spec.destination.clone().unwrap_or_default(),
        &secrets.destination_password,
    );
    let limits = store.destination_limits(&spec.name).await?;
    let options = MappingOptions::for_pipe(&spec.settings.unwrap_or_default(), limits.as_ref());
    // A resync writes into its shadow table, named on the partition.
    let target = if partition.destination_table.is_empty() {
        &mapping.destination_table
    } else {
        &partition.destination_table
    };
    let statement = Arc::new(sink.insert_statement(target, schema));
    let copied = read_partition(&source, schema, partition, options, move |body| {
        let (sink, statement) = (sink.clone(), Arc::clone(&statement));
        async move { Ok(sink.insert(&statement, body).await?) }
    })
    .await?;
    // Read-only: nothing to commit; ending the transaction frees the snapshot import.
    let _ = source.batch_execute("ROLLBACK").await;
    Ok(Copied {
        visibility,
        ..copied
    })
}

/// Reads one partition with binary COPY on `source` (in the transaction the caller opened),
/// transcodes it to RowBinary, and hands batches of at most [`BATCH_ROWS`] rows or
/// [`BATCH_BYTES`] to `flush`. One flush runs while the next batch is read, so reading and
/// writing overlap; memory stays at two batches whatever the table size. Returns the rows read
/// and the values written altered.
pub async fn read_partition<F, Fut>(
    source: &tokio_postgres::Client,
    schema: &TableSchema,
    partition: &SnapshotPartition,
    options: MappingOptions,
    flush: F,
) -> Result<Copied, PartitionError>
where
    F: Fn(Bytes) -> Fut,
    Fut: Future<Output = Result<(), PartitionError>> + Send + 'static,
{
    // A keyless table is a multiset: each row's version is its place in the snapshot, read
    // with it as the first column, so identical rows stay distinct and a partition copied
    // again collapses onto itself.
    let keyless = ddl::is_keyless(schema);
    let mut select = select_list(&schema.columns, options);
    if keyless {
        select.insert(0, "ctid".into());
    }
    let relation = u16::try_from(partition.relation_ordinal)
        .map_err(|_| PartitionError::TooManyRelations(partition.source_table.clone()))?;
    let query = snapshot::copy_query(partition, &select);
    let stream = source
        .copy_out(query.as_str())
        .await
        .map_err(PartitionError::Copy)?;
    tokio::pin!(stream);
    let mut decoder = CopyDecoder::new(select.len());
    let mut transcoder =
        RowTranscoder::new(&schema.columns, options).for_table(&partition.source_table);
    let mut body = Vec::with_capacity(BATCH_BYTES + BATCH_SLACK);
    let mut batch_rows = 0u64;
    let mut rows = 0u64;
    // Aborted if this function is (a lost claim must not keep writing).
    let mut in_flight: Option<AbortOnDrop> = None;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(PartitionError::Copy)?;
        let decoded = decoder.feed(&chunk, |mut fields| {
            let version = if keyless {
                ctid_version(relation, fields.next().flatten())?
            } else {
                0
            };
            transcoder.write_row(fields, version, false, &mut body)?;
            batch_rows += 1;
            Ok::<_, TranscodeError>(())
        });
        rows += decoded.map_err(|e| match e {
            DecodeError::Copy(e) => PartitionError::Decode(e),
            DecodeError::Row(e) => PartitionError::Transcode(e),
        })?;
        if batch_rows >= BATCH_ROWS || body.len() >= BATCH_BYTES {
            if let Some(previous) = in_flight.take() {
                previous.finish().await?;
            }
            let full = std::mem::replace(&mut body, Vec::with_capacity(BATCH_BYTES + BATCH_SLACK));
            in_flight = Some(AbortOnDrop(Some(tokio::spawn(flush(Bytes::from(full))))));
            batch_rows = 0;
        }
    }
    decoder.finish()?;
    if let Some(previous) = in_flight.take() {
        previous.finish().await?;
    }
    if !body.is_empty() {
        flush(Bytes::from(body)).await?;
    }
    let adjustments = transcoder.adjustments();
    if adjustments != Default::default() {
        tracing::info!(
            table = %partition.source_table,
            partition = partition.index,
            clamped = adjustments.clamped,
            nulled = adjustments.nulled,
            emptied = adjustments.emptied,
            "values ClickHouse cannot hold were altered (counted in the pipe's status)"
        );
    }
    Ok(Copied {
        rows,
        altered: transcoder.altered(),
        visibility: String::new(),
    })
}

/// The version of a keyless table's snapshot row from its binary `tid` (block u32, offset
/// u16).
fn ctid_version(relation: u16, tid: Option<&[u8]>) -> Result<u128, TranscodeError> {
    let failed = || TranscodeError {
        table: String::new(),
        column: "ctid".into(),
        problem: "expected a 6-byte tid".into(),
        out_of_range: false,
    };
    let tid: [u8; 6] = tid.and_then(|t| t.try_into().ok()).ok_or_else(failed)?;
    let block = u32::from_be_bytes([tid[0], tid[1], tid[2], tid[3]]);
    let offset = u16::from_be_bytes([tid[4], tid[5]]);
    Ok(version::snapshot_row(relation, block, offset))
}

/// An insert task that is aborted if dropped before it is awaited.
struct AbortOnDrop(Option<JoinHandle<Result<(), PartitionError>>>);

impl AbortOnDrop {
    async fn finish(mut self) -> Result<(), PartitionError> {
        match self.0.take() {
            Some(task) => task.await.map_err(PartitionError::Join)?,
            None => Ok(()),
        }
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}
