//! The source objects Ferry manages for a pipe: its publication and its replication slot.

use tokio_postgres::Client;

use crate::SourceError;
use crate::error::{Ident, query_error, quoted_table};

/// Creates publication `name` for `tables` (schema.table) unless it exists. Partitioned tables
/// publish through their root, so changes arrive under the table the pipe names.
pub async fn ensure_publication(
    client: &Client,
    name: &str,
    tables: &[String],
) -> Result<bool, SourceError> {
    let exists: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)",
            &[&name],
        )
        .await
        .map_err(query_error("publication lookup"))?
        .get(0);
    if exists {
        return Ok(false);
    }
    let list: Vec<String> = tables.iter().map(|t| quoted_table(t)).collect();
    let sql = format!(
        "CREATE PUBLICATION {} FOR TABLE {} WITH (publish_via_partition_root = true)",
        Ident(name),
        list.join(", ")
    );
    client
        .batch_execute(&sql)
        .await
        .map_err(query_error("CREATE PUBLICATION"))?;
    Ok(true)
}

/// Drops publication `name` if it exists.
pub async fn drop_publication(client: &Client, name: &str) -> Result<(), SourceError> {
    let sql = format!("DROP PUBLICATION IF EXISTS {}", Ident(name));
    client
        .batch_execute(&sql)
        .await
        .map_err(query_error("DROP PUBLICATION"))
}

/// Creates logical slot `slot` (pgoutput) unless it exists. Returns whether it was created.
pub async fn ensure_slot(client: &Client, slot: &str) -> Result<bool, SourceError> {
    let exists: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)",
            &[&slot],
        )
        .await
        .map_err(query_error("slot lookup"))?
        .get(0);
    if exists {
        return Ok(false);
    }
    client
        .execute(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&slot],
        )
        .await
        .map_err(query_error("slot creation"))?;
    Ok(true)
}

/// Drops slot `slot` if it exists and is not in use.
pub async fn drop_slot(client: &Client, slot: &str) -> Result<(), SourceError> {
    client
        .execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(query_error("slot drop"))?;
    Ok(())
}

/// Adds `tables` (schema.table) to publication `name`, skipping those already in it.
pub async fn add_to_publication(
    client: &Client,
    name: &str,
    tables: &[String],
) -> Result<(), SourceError> {
    let published = published_tables(client, name).await?;
    let missing: Vec<String> = tables
        .iter()
        .filter(|t| !published.contains(t))
        .map(|t| quoted_table(t))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let sql = format!(
        "ALTER PUBLICATION {} ADD TABLE {}",
        Ident(name),
        missing.join(", ")
    );
    client
        .batch_execute(&sql)
        .await
        .map_err(query_error("ALTER PUBLICATION ADD TABLE"))
}

/// Removes `tables` (schema.table) from publication `name`, skipping those not in it.
pub async fn remove_from_publication(
    client: &Client,
    name: &str,
    tables: &[String],
) -> Result<(), SourceError> {
    let published = published_tables(client, name).await?;
    let present: Vec<String> = tables
        .iter()
        .filter(|t| published.contains(t))
        .map(|t| quoted_table(t))
        .collect();
    if present.is_empty() {
        return Ok(());
    }
    let sql = format!(
        "ALTER PUBLICATION {} DROP TABLE {}",
        Ident(name),
        present.join(", ")
    );
    client
        .batch_execute(&sql)
        .await
        .map_err(query_error("ALTER PUBLICATION DROP TABLE"))
}

/// The tables publication `name` publishes directly, as schema.table.
async fn published_tables(client: &Client, name: &str) -> Result<Vec<String>, SourceError> {
    Ok(client
        .query(
            "SELECT n.nspname || '.' || c.relname FROM pg_publication_rel pr \
             JOIN pg_publication p ON p.oid = pr.prpubid \
             JOIN pg_class c ON c.oid = pr.prrelid \
             JOIN pg_namespace n ON n.oid = c.relnamespace WHERE p.pubname = $1",
            &[&name],
        )
        .await
        .map_err(query_error("publication tables"))?
        .iter()
        .map(|row| row.get(0))
        .collect())
}

/// Whether slot `slot` exists and can still stream (its WAL was not removed:
/// `wal_status <> 'lost'`).
pub async fn slot_usable(client: &Client, slot: &str) -> Result<bool, SourceError> {
    Ok(client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_replication_slots \
             WHERE slot_name = $1 AND wal_status IS DISTINCT FROM 'lost')",
            &[&slot],
        )
        .await
        .map_err(query_error("slot lookup"))?
        .get(0))
}

/// Drops slot `slot` even if a walsender is using it (the pipe's own stream, which retries):
/// its backend is terminated first.
pub async fn drop_slot_forcibly(client: &Client, slot: &str) -> Result<(), SourceError> {
    client
        .execute(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
             WHERE slot_name = $1 AND active_pid IS NOT NULL",
            &[&slot],
        )
        .await
        .map_err(query_error("slot backend termination"))?;
    // The walsender exits asynchronously: retry the drop while it still holds the slot.
    for _ in 0..50 {
        match drop_slot(client, slot).await {
            Ok(()) => return Ok(()),
            Err(SourceError::Query { source, .. })
                if source.code() == Some(&tokio_postgres::error::SqlState::OBJECT_IN_USE) =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(other) => return Err(other),
        }
    }
    drop_slot(client, slot).await
}
