//! Setup's checks of the source, in the order a user would fix them. Each failure names the
//! table (when there is one) and the SQL that fixes it (see [`SourceError::remedy`]).

use ferry_core::PipeMode;
use ferry_core::spec::source_table_name;
use ferry_proto::v1::PipeSpec;
use tokio_postgres::Client;

use crate::error::query_error;
use crate::identity::{self, Identity};
use crate::{SourceError, publication};

/// Checks everything Setup needs from the source for `spec`. `slot` is the replication slot
/// the pipe uses: if it already exists (Setup re-run after a crash) it needs no free slot.
pub async fn check_source(client: &Client, spec: &PipeSpec, slot: &str) -> Result<(), SourceError> {
    let source = spec.source.clone().unwrap_or_default();
    let replicates = spec.mode() != PipeMode::SnapshotOnly;
    if replicates {
        check_replication(client, &source.user, slot).await?;
    }
    let managed_publication = replicates && source.publication.is_empty();
    for table in &spec.tables {
        check_table(
            client,
            &source_table_name(table),
            &source.user,
            replicates,
            managed_publication,
        )
        .await?;
    }
    if replicates && !source.publication.is_empty() {
        publication::check_publication(client, &source.publication, spec).await?;
    }
    Ok(())
}

async fn check_replication(client: &Client, user: &str, slot: &str) -> Result<(), SourceError> {
    let row = client
        .query_one(
            "SELECT current_setting('wal_level'), \
                    (SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user), \
                    current_setting('max_replication_slots')::int8, \
                    (SELECT count(*) FROM pg_replication_slots), \
                    EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1), \
                    current_setting('max_wal_senders')::int8, \
                    (SELECT count(*) FROM pg_stat_replication)",
            &[&slot],
        )
        .await
        .map_err(query_error("replication settings"))?;
    let wal_level: String = row.get(0);
    if wal_level != "logical" {
        return Err(SourceError::WalLevel { actual: wal_level });
    }
    let may_replicate: Option<bool> = row.get(1);
    if may_replicate != Some(true) {
        return Err(SourceError::NotReplicationRole {
            user: user.to_owned(),
        });
    }
    let (max_slots, used_slots, slot_exists): (i64, i64, bool) =
        (row.get(2), row.get(3), row.get(4));
    if !slot_exists && used_slots >= max_slots {
        return Err(SourceError::NoFreeSlots { max: max_slots });
    }
    let (max_senders, used_senders): (i64, i64) = (row.get(5), row.get(6));
    if used_senders >= max_senders {
        return Err(SourceError::NoFreeWalSenders { max: max_senders });
    }
    Ok(())
}

async fn check_table(
    client: &Client,
    table: &str,
    user: &str,
    replicates: bool,
    managed_publication: bool,
) -> Result<(), SourceError> {
    let (schema, name) = table.split_once('.').unwrap_or(("public", table));
    let row = client
        .query_opt(
            "SELECT has_table_privilege(c.oid, 'SELECT'), pg_has_role(c.relowner, 'USAGE'), c.oid \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
            &[&schema, &name],
        )
        .await
        .map_err(query_error("table lookup"))?;
    let Some(row) = row else {
        return Err(SourceError::TableMissing {
            table: table.to_owned(),
        });
    };
    let (can_select, owns, oid): (bool, bool, u32) = (row.get(0), row.get(1), row.get(2));
    if !can_select {
        return Err(SourceError::NoSelect {
            table: table.to_owned(),
            user: user.to_owned(),
        });
    }
    // A partitioned table is read leaf by leaf: every leaf must be readable, and a plain table.
    let leaves = client
        .query(
            "SELECT n.nspname || '.' || c.relname, c.relkind::text, has_table_privilege(c.oid, 'SELECT') \
             FROM pg_partition_tree($1::oid::regclass) p JOIN pg_class c ON c.oid = p.relid \
             JOIN pg_namespace n ON n.oid = c.relnamespace WHERE p.isleaf",
            &[&oid],
        )
        .await
        .map_err(query_error("partition lookup"))?;
    for leaf in &leaves {
        let (leaf_name, kind, readable): (String, String, bool) =
            (leaf.get(0), leaf.get(1), leaf.get(2));
        if kind != "r" {
            return Err(SourceError::UnsupportedPartition {
                table: table.to_owned(),
                partition: leaf_name,
            });
        }
        if !readable {
            return Err(SourceError::NoSelect {
                table: leaf_name,
                user: user.to_owned(),
            });
        }
    }
    // CREATE PUBLICATION … FOR TABLE needs ownership.
    if managed_publication && !owns {
        return Err(SourceError::NotOwner {
            table: table.to_owned(),
            user: user.to_owned(),
        });
    }
    if replicates {
        check_identity(table, &identity::identity(client, oid).await?)?;
    }
    Ok(())
}

/// Refuses a table whose UPDATEs and DELETEs Postgres cannot identify: Ferry could not key
/// them, and once the table is published the source itself refuses them.
fn check_identity(table: &str, identity: &Identity) -> Result<(), SourceError> {
    use ferry_proto::v1::ReplicaIdentity;
    let unusable = |reason: String| SourceError::UnusableIdentityIndex {
        table: table.to_owned(),
        reason,
        primary_key: identity
            .primary
            .as_ref()
            .is_some_and(|pk| pk.problem().is_none()),
    };
    match identity.kind {
        ReplicaIdentity::Full => Ok(()),
        ReplicaIdentity::Default => match &identity.primary {
            None => Err(SourceError::NoRowIdentity {
                table: table.to_owned(),
                identity: "DEFAULT",
            }),
            Some(pk) if !pk.immediate => Err(SourceError::DeferrablePrimaryKey {
                table: table.to_owned(),
                columns: pk.columns.iter().filter_map(|(c, _)| c.clone()).collect(),
            }),
            Some(pk) => pk.problem().map_or(Ok(()), |reason| Err(unusable(reason))),
        },
        // Postgres enforces most of this when the index is chosen; it can still be dropped
        // (then Postgres sends no key at all) or, for some properties, changed later.
        ReplicaIdentity::Index => match &identity.index {
            None => Err(unusable(
                "REPLICA IDENTITY USING INDEX names an index that was dropped, so Postgres sends no old key".into(),
            )),
            Some(index) => index.problem().map_or(Ok(()), |reason| Err(unusable(reason))),
        },
        ReplicaIdentity::Nothing | ReplicaIdentity::Unspecified => {
            Err(SourceError::NoRowIdentity {
                table: table.to_owned(),
                identity: "NOTHING",
            })
        }
    }
}
