//! Setup's checks of the source, in the order a user would fix them. Each failure names the
//! table (when there is one) and the SQL that fixes it (see [`SourceError::remedy`]).

use ferry_core::PipeMode;
use ferry_core::spec::source_table_name;
use ferry_proto::v1::PipeSpec;
use tokio_postgres::Client;

use crate::SourceError;
use crate::error::query_error;

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
        check_publication(client, &source.publication, spec).await?;
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
            "SELECT has_table_privilege(c.oid, 'SELECT'), c.relreplident::text, \
                    EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary), \
                    pg_has_role(c.relowner, 'USAGE'), c.oid \
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
    let (can_select, identity, has_pk): (bool, String, bool) = (row.get(0), row.get(1), row.get(2));
    let (owns, oid): (bool, u32) = (row.get(3), row.get(4));
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
        let usable = match identity.as_str() {
            "f" | "i" => true,
            "d" => has_pk,
            _ => false,
        };
        if !usable {
            return Err(SourceError::NoRowIdentity {
                table: table.to_owned(),
                identity: if identity == "n" {
                    "NOTHING"
                } else {
                    "DEFAULT"
                },
            });
        }
    }
    Ok(())
}

async fn check_publication(
    client: &Client,
    publication: &str,
    spec: &PipeSpec,
) -> Result<(), SourceError> {
    let exists: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)",
            &[&publication],
        )
        .await
        .map_err(query_error("publication lookup"))?
        .get(0);
    if !exists {
        return Err(SourceError::PublicationMissing {
            publication: publication.to_owned(),
        });
    }
    let via_root: bool = client
        .query_one(
            "SELECT pubviaroot FROM pg_publication WHERE pubname = $1",
            &[&publication],
        )
        .await
        .map_err(query_error("publication lookup"))?
        .get(0);
    for table in &spec.tables {
        let partitioned: bool = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind = 'p')",
                &[&table.source_schema, &table.source_table],
            )
            .await
            .map_err(query_error("table lookup"))?
            .get(0);
        // Without publish_via_partition_root, changes arrive under leaf names, not the table's.
        if partitioned && !via_root {
            return Err(SourceError::PublicationNotViaRoot {
                publication: publication.to_owned(),
                table: source_table_name(table),
            });
        }
        let published: bool = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_publication_tables \
                 WHERE pubname = $1 AND schemaname = $2 AND tablename = $3)",
                &[&publication, &table.source_schema, &table.source_table],
            )
            .await
            .map_err(query_error("publication tables"))?
            .get(0);
        if !published {
            return Err(SourceError::PublicationLacksTable {
                publication: publication.to_owned(),
                table: source_table_name(table),
            });
        }
    }
    Ok(())
}
