//! Snapshot reads: the partition plan (ctid block ranges), exporting a snapshot, and the COPY
//! query of one partition.

use ferry_proto::v1::{SnapshotPartition, TableSchema};
use tokio_postgres::Client;

use crate::SourceError;
use crate::error::{query_error, quoted_table};

/// Most partitions one table is split into (PeerDB's cap).
pub const MAX_PARTITIONS: u64 = 1000;

/// Splits a table into ctid block ranges of about `rows_per_partition` rows. A partitioned
/// table is planned per leaf partition (ctids are per relation). The last range of each
/// relation is open-ended, so rows in blocks added after planning are still read.
pub async fn plan(
    client: &Client,
    schema: &TableSchema,
    rows_per_partition: u64,
) -> Result<Vec<SnapshotPartition>, SourceError> {
    let source_table = format!("{}.{}", schema.source_schema, schema.source_table);
    let relations = client
        .query(
            "SELECT n.nspname || '.' || c.relname, \
                    (pg_relation_size(c.oid) / current_setting('block_size')::int8)::int8, \
                    c.reltuples::int8 \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind = 'r' AND (c.oid = $1::oid OR c.oid IN \
               (SELECT relid FROM pg_partition_tree($1::oid::regclass) WHERE isleaf)) \
             ORDER BY 1",
            &[&schema.relation_oid],
        )
        .await
        .map_err(query_error("partition planning"))?;
    let rows_per_partition = rows_per_partition.max(1);
    // Before Postgres 14 a ctid range is not a TID Range Scan but a full scan per partition:
    // read each relation in one piece there.
    let version: i32 = client
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .map_err(query_error("server version"))?
        .get(0);
    let max_partitions = if version < 140_000 { 1 } else { MAX_PARTITIONS };
    let mut plan = Vec::new();
    for (ordinal, relation) in relations.into_iter().enumerate() {
        let name: String = relation.get(0);
        let pages = u64::try_from(relation.get::<_, i64>(1)).unwrap_or(0);
        let mut rows = relation.get::<_, i64>(2);
        if rows < 0 && pages > 0 {
            // Never analyzed: count instead of guessing.
            let sql = format!("SELECT count(*) FROM ONLY {}", quoted_table(&name));
            rows = client
                .query_one(&sql, &[])
                .await
                .map_err(query_error("row count"))?
                .get(0);
        }
        let rows = u64::try_from(rows).unwrap_or(0);
        let count = rows
            .div_ceil(rows_per_partition)
            .clamp(1, max_partitions)
            .min(pages.max(1));
        let blocks = pages.div_ceil(count).max(1);
        for i in 0..count {
            let last = i + 1 == count;
            plan.push(SnapshotPartition {
                source_table: source_table.clone(),
                relation: name.clone(),
                index: u32::try_from(plan.len()).unwrap_or(u32::MAX),
                start_block: i * blocks,
                end_block: if last { 0 } else { (i + 1) * blocks },
                rows_estimated: rows / count,
                relation_ordinal: u32::try_from(ordinal).unwrap_or(u32::MAX),
                ..Default::default()
            });
        }
    }
    Ok(plan)
}

/// `COPY (SELECT <select> FROM ONLY <relation> WHERE <ctid range>) TO STDOUT (FORMAT binary)`.
pub fn copy_query(partition: &SnapshotPartition, select: &[String]) -> String {
    let mut range = format!("ctid >= '({},0)'::tid", partition.start_block);
    if partition.end_block > 0 {
        range.push_str(&format!(" AND ctid < '({},0)'::tid", partition.end_block));
    }
    format!(
        "COPY (SELECT {} FROM ONLY {} WHERE {range}) TO STDOUT (FORMAT binary)",
        select.join(", "),
        quoted_table(&partition.relation)
    )
}

/// Opens a repeatable-read transaction on `client` and exports its snapshot: its id and its
/// visibility (`pg_current_snapshot()`). The snapshot lives as long as the transaction: keep
/// the client open and idle while readers import it.
pub async fn export_snapshot(client: &Client) -> Result<(String, String), SourceError> {
    client
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .await
        .map_err(query_error("snapshot transaction"))?;
    let row = client
        .query_one(
            "SELECT pg_export_snapshot(), pg_current_snapshot()::text",
            &[],
        )
        .await
        .map_err(query_error("pg_export_snapshot"))?;
    Ok((row.get(0), row.get(1)))
}

/// The visibility of the transaction snapshot `client` reads under (`pg_current_snapshot()`:
/// `xmin:xmax:xip,…` in 64-bit transaction ids, which never repeat).
async fn visibility(client: &Client) -> Result<String, SourceError> {
    Ok(client
        .query_one("SELECT pg_current_snapshot()::text", &[])
        .await
        .map_err(query_error("snapshot visibility"))?
        .get(0))
}

/// Starts the read transaction of a partition, importing `snapshot` when given (`None` reads
/// a fresh snapshot: benchmarks, tests). If the snapshot's holder is gone Postgres refuses the
/// import and this returns [`SourceError::SnapshotGone`]: the caller waits for a new export
/// rather than read a different point in time than the table's other partitions. Returns
/// the visibility of the snapshot read under.
pub async fn begin_read(client: &Client, snapshot: Option<&str>) -> Result<String, SourceError> {
    client
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .await
        .map_err(query_error("read transaction"))?;
    let Some(snapshot) = snapshot else {
        return visibility(client).await;
    };
    if snapshot.is_empty() || !snapshot.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
        return Err(SourceError::SnapshotGone {
            snapshot: snapshot.to_owned(),
        });
    }
    let import = client
        .batch_execute(&format!("SET TRANSACTION SNAPSHOT '{snapshot}'"))
        .await;
    match import {
        Ok(()) => visibility(client).await,
        // 22023: "invalid snapshot identifier" — the exporting transaction has ended.
        Err(error)
            if error.code() == Some(&tokio_postgres::error::SqlState::INVALID_PARAMETER_VALUE) =>
        {
            let _ = client.batch_execute("ROLLBACK").await;
            Err(SourceError::SnapshotGone {
                snapshot: snapshot.to_owned(),
            })
        }
        Err(error) => Err(SourceError::Query {
            what: "snapshot import",
            source: error,
        }),
    }
}

/// Which transactions a snapshot sees, from its `pg_current_snapshot()` text
/// (`xmin:xmax:xip,…`, 64-bit transaction ids).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Visibility {
    xmin: u64,
    xmax: u64,
    in_progress: Vec<u64>,
}

impl Visibility {
    /// Parses `pg_current_snapshot()::text`; `None` if it is not one.
    pub fn parse(text: &str) -> Option<Self> {
        let mut parts = text.trim().splitn(3, ':');
        let xmin = parts.next()?.parse().ok()?;
        let xmax = parts.next()?.parse().ok()?;
        let list = parts.next()?;
        let in_progress = if list.is_empty() {
            Vec::new()
        } else {
            list.split(',')
                .map(str::parse)
                .collect::<Result<_, _>>()
                .ok()?
        };
        Some(Self {
            xmin,
            xmax,
            in_progress,
        })
    }

    /// Whether a transaction with the 32-bit id `xid` (as pgoutput's Begin carries it) that
    /// committed is visible in the snapshot: it had finished when the snapshot was taken.
    pub fn sees(&self, xid: u32) -> bool {
        let full = self.widen(xid);
        if full < self.xmin {
            return true;
        }
        full < self.xmax && !self.in_progress.contains(&full)
    }

    /// The 64-bit id of `xid`: the one within 2^31 of the snapshot's xmax (a transaction in the
    /// stream is never that far from a snapshot taken while the slot was retaining WAL).
    fn widen(&self, xid: u32) -> u64 {
        let epoch = self.xmax & !0xffff_ffff;
        let candidate = epoch | u64::from(xid);
        if candidate > self.xmax.saturating_add(1 << 31) {
            candidate.saturating_sub(1 << 32)
        } else if candidate.saturating_add(1 << 31) < self.xmax {
            candidate.saturating_add(1 << 32)
        } else {
            candidate
        }
    }
}

/// A WAL position that a copy's snapshot, taken once [`boundary_reached`] says so, lines up
/// with: every transaction whose commit record lies before it is visible to that snapshot.
///
/// A transaction writes its commit record before it leaves the proc array, so a snapshot
/// taken just after a commit record may still see the transaction as running. This reads the
/// position, then takes a fresh transaction id `n` (in its own, immediately ended
/// transaction): every transaction that wrote a commit record before the position had an id
/// below `n`. Returns the position and `n`.
pub async fn stream_boundary(client: &Client) -> Result<(u64, i64), SourceError> {
    let lsn: String = client
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .map_err(query_error("WAL position"))?
        .get(0);
    let lsn = parse_lsn(&lsn).ok_or_else(|| SourceError::Catalog {
        detail: format!("pg_current_wal_insert_lsn() returned {lsn:?}"),
    })?;
    let fence: String = client
        .query_one("SELECT pg_current_xact_id()::text", &[])
        .await
        .map_err(query_error("transaction id"))?
        .get(0);
    let fence: i64 = fence.parse().map_err(|_| SourceError::Catalog {
        detail: format!("pg_current_xact_id() returned {fence:?}"),
    })?;
    Ok((lsn, fence))
}

/// Whether every transaction with an id below `fence` has ended (the oldest running one is
/// above it), so a snapshot taken now sees all that committed. A long-running transaction
/// older than the boundary keeps this false, as it delays the creation of a replication slot.
pub async fn boundary_reached(client: &Client, fence: i64) -> Result<bool, SourceError> {
    let oldest: String = client
        .query_one("SELECT pg_snapshot_xmin(pg_current_snapshot())::text", &[])
        .await
        .map_err(query_error("oldest running transaction"))?
        .get(0);
    Ok(oldest.parse::<i64>().is_ok_and(|oldest| oldest > fence))
}

/// Parses Postgres's `X/Y` LSN text.
fn parse_lsn(text: &str) -> Option<u64> {
    let (high, low) = text.split_once('/')?;
    Some((u64::from_str_radix(high, 16).ok()? << 32) | u64::from_str_radix(low, 16).ok()?)
}

#[cfg(test)]
mod tests {
    use super::Visibility;

    #[test]
    fn visibility_follows_xmin_xmax_and_in_progress() {
        let v = Visibility::parse("100:105:101,103").unwrap();
        assert!(v.sees(99) && v.sees(100) && v.sees(102) && v.sees(104));
        assert!(!v.sees(101) && !v.sees(103) && !v.sees(105) && !v.sees(200));
        assert_eq!(
            Visibility::parse("7:7:").unwrap(),
            Visibility {
                xmin: 7,
                xmax: 7,
                in_progress: vec![]
            }
        );
        assert!(Visibility::parse("garbage").is_none());
        assert!(Visibility::parse("1:2:x").is_none());
    }

    #[test]
    fn xids_are_widened_across_an_epoch() {
        // xmax just past a wraparound: 32-bit ids near u32::MAX belong to the previous epoch.
        let v = Visibility::parse(&format!("{}:{}:", (1u64 << 32) - 10, (1u64 << 32) + 5)).unwrap();
        assert!(v.sees(u32::MAX - 20)); // below xmin
        assert!(v.sees(u32::MAX - 5)); // between xmin and xmax
        assert!(v.sees(3)); // next epoch, below xmax
        assert!(!v.sees(6)); // at or past xmax
    }
}
