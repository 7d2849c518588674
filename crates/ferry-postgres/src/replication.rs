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
