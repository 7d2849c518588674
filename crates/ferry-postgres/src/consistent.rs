//! A consistent read of source tables for verification: one repeatable-read snapshot and the
//! WAL position it covers.

use ferry_proto::v1::{PostgresSource, TableSchema};
use tokio_postgres::{Client, CopyOutStream};

use crate::error::{Ident, query_error};
use crate::{SourceError, connection};

/// An open read-only transaction whose snapshot every read shares.
#[derive(Debug)]
pub struct ConsistentSnapshot {
    client: Client,
    lsn: u64,
}

impl ConsistentSnapshot {
    /// Opens the snapshot and reads the WAL insert position after it was taken: every
    /// transaction visible in the snapshot committed at or before that position. (A
    /// transaction may also commit just before it yet stay invisible; callers recheck.)
    pub async fn open(source: &PostgresSource, password: &str) -> Result<Self, SourceError> {
        let client = connection::connect(source, password).await?;
        client
            .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .await
            .map_err(query_error("verify transaction"))?;
        // The first statement of the transaction takes the snapshot; the position is read
        // only afterwards, so it cannot precede anything the snapshot shows.
        client
            .batch_execute("SELECT 1")
            .await
            .map_err(query_error("verify snapshot"))?;
        let lsn: i64 = client
            .query_one("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::int8", &[])
            .await
            .map_err(query_error("pg_current_wal_lsn"))?
            .get(0);
        Ok(Self {
            client,
            lsn: u64::try_from(lsn).unwrap_or(0),
        })
    }

    /// The WAL position the snapshot covers.
    pub fn lsn(&self) -> u64 {
        self.lsn
    }

    /// The planner's row estimate of `schema`'s table (its leaf partitions summed), or 0.
    pub async fn estimated_rows(&self, schema: &TableSchema) -> Result<u64, SourceError> {
        let row = self
            .client
            .query_one(
                "SELECT coalesce(sum(greatest(c.reltuples, 0)), 0)::int8 FROM pg_class c \
                 WHERE c.relkind <> 'p' AND (c.oid = $1::oid OR c.oid IN \
                   (SELECT relid FROM pg_partition_tree($1::oid::regclass) WHERE isleaf))",
                &[&schema.relation_oid],
            )
            .await
            .map_err(query_error("row estimate"))?;
        Ok(u64::try_from(row.get::<_, i64>(0)).unwrap_or(0))
    }

    /// `COPY (SELECT <select> FROM <table>) TO STDOUT (FORMAT binary)` in the snapshot, for the
    /// whole table (every partition of a partitioned one).
    pub async fn copy_table(
        &self,
        schema: &TableSchema,
        select: &[String],
    ) -> Result<CopyOutStream, SourceError> {
        let query = format!(
            "COPY (SELECT {} FROM {}.{}) TO STDOUT (FORMAT binary)",
            select.join(", "),
            Ident(&schema.source_schema),
            Ident(&schema.source_table)
        );
        self.client
            .copy_out(query.as_str())
            .await
            .map_err(query_error("verify COPY"))
    }
}
