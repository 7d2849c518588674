//! A replication slot's health as the source reports it (`pg_replication_slots`), the setting
//! that bounds what a slot may retain, and the SQL that drops what a pipe leaves behind.

use tokio_postgres::Client;

use crate::SourceError;
use crate::error::{Ident, query_error};

/// One slot as `pg_replication_slots` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotState {
    /// `wal_status`: reserved, extended, unreserved or lost (empty if the server has none).
    pub wal_status: String,
    /// WAL the slot keeps: the current WAL position minus its `restart_lsn` (0 once lost).
    pub retained_bytes: u64,
    /// `safe_wal_size`: bytes that can still be written before the slot is invalidated;
    /// `None` without `max_slot_wal_keep_size` (or once lost).
    pub safe_wal_bytes: Option<i64>,
    /// Whether a WAL sender is streaming from it.
    pub active: bool,
}

/// Reads slot `slot`; `None` if it does not exist.
pub async fn slot_state(client: &Client, slot: &str) -> Result<Option<SlotState>, SourceError> {
    // The insert position is where WAL ends: pg_current_wal_lsn() (the write position) lags it
    // under asynchronous commit. The difference is numeric, cast to bigint here.
    let row = client
        .query_opt(
            "SELECT coalesce(wal_status, ''), \
                    coalesce(greatest(pg_current_wal_insert_lsn() - restart_lsn, 0), 0)::bigint, \
                    safe_wal_size, active \
               FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(query_error("slot health"))?;
    Ok(row.map(|row| SlotState {
        wal_status: row.get(0),
        retained_bytes: u64::try_from(row.get::<_, i64>(1)).unwrap_or(0),
        safe_wal_bytes: row.get(2),
        active: row.get(3),
    }))
}

/// `max_slot_wal_keep_size` in bytes; `None` when unlimited (-1).
pub async fn max_slot_wal_keep_size(client: &Client) -> Result<Option<i64>, SourceError> {
    // pg_settings reports it in MB (its unit); -1 is unlimited.
    let megabytes: i64 = client
        .query_one(
            "SELECT setting::bigint FROM pg_settings WHERE name = 'max_slot_wal_keep_size'",
            &[],
        )
        .await
        .map_err(query_error("max_slot_wal_keep_size"))?
        .get(0);
    Ok((megabytes >= 0).then(|| megabytes.saturating_mul(1 << 20)))
}

/// The SQL that drops logical slot `slot` (as shown to someone cleaning up by hand).
pub fn drop_slot_sql(slot: &str) -> String {
    format!(
        "SELECT pg_drop_replication_slot('{}');",
        slot.replace('\'', "''")
    )
}

/// The SQL that drops publication `publication`.
pub fn drop_publication_sql(publication: &str) -> String {
    format!("DROP PUBLICATION IF EXISTS {};", Ident(publication))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cleanup_sql_quotes_names() {
        assert_eq!(
            drop_slot_sql("ferry_o'k"),
            "SELECT pg_drop_replication_slot('ferry_o''k');"
        );
        assert_eq!(
            drop_publication_sql("ferry \"p\""),
            "DROP PUBLICATION IF EXISTS \"ferry \"\"p\"\"\";"
        );
    }
}
