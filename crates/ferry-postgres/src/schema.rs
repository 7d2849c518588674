//! Reading source table definitions: columns with their types resolved through domains, the row
//! key, replica identity, partitioning and size estimates.

use std::collections::HashMap;

use ferry_proto::v1::{ColumnSchema, TableSchema};
use tokio_postgres::Client;

use crate::error::query_error;
use crate::{SourceError, identity};

/// What a type oid resolves to once domains are looked through.
#[derive(Debug, Clone)]
struct ResolvedType {
    oid: u32,
    kind: String,
    element: u32,
    /// The domain's type modifier, for columns declared with a domain over e.g. numeric(10,2).
    typmod: i32,
}

/// Resolves type oids through (possibly nested) domains, caching lookups.
struct TypeResolver<'c> {
    client: &'c Client,
    cache: HashMap<u32, ResolvedType>,
}

impl TypeResolver<'_> {
    async fn resolve(&mut self, oid: u32) -> Result<ResolvedType, SourceError> {
        if let Some(hit) = self.cache.get(&oid) {
            return Ok(hit.clone());
        }
        let mut current = oid;
        let mut typmod = -1;
        // Domains nest rarely and never cyclically; the bound guards against a corrupt catalog.
        for _ in 0..32 {
            let row = self
                .client
                .query_one(
                    "SELECT typtype::text, typbasetype, typelem, typtypmod, typcategory::text \
                     FROM pg_type WHERE oid = $1",
                    &[&current],
                )
                .await
                .map_err(query_error("type lookup"))?;
            let kind: String = row.get(0);
            if kind == "d" {
                let domain_typmod: i32 = row.get(3);
                if typmod == -1 {
                    typmod = domain_typmod;
                }
                current = row.get(1);
                continue;
            }
            let category: String = row.get(4);
            let element: u32 = if category == "A" { row.get(2) } else { 0 };
            let resolved = ResolvedType {
                oid: current,
                kind,
                element,
                typmod,
            };
            self.cache.insert(oid, resolved.clone());
            return Ok(resolved);
        }
        Err(SourceError::Catalog {
            detail: format!("type {oid} is a chain of more than 32 domains"),
        })
    }
}

/// Describes the table with oid `relation` under the name it has now (a stream following a
/// table by oid may hold a name the table no longer has).
pub async fn describe_relation(client: &Client, relation: u32) -> Result<TableSchema, SourceError> {
    let row = client
        .query_opt(
            "SELECT n.nspname::text, c.relname::text FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = $1",
            &[&relation],
        )
        .await
        .map_err(query_error("table lookup"))?
        .ok_or_else(|| SourceError::TableMissing {
            table: format!("relation {relation}"),
        })?;
    let (schema, table): (String, String) = (row.get(0), row.get(1));
    describe_table(client, &schema, &table).await
}

/// Describes `schema.table`.
pub async fn describe_table(
    client: &Client,
    schema: &str,
    table: &str,
) -> Result<TableSchema, SourceError> {
    let qualified = format!("{schema}.{table}");
    let row = client
        .query_opt(
            "SELECT c.oid, c.relkind = 'p' \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
            &[&schema, &table],
        )
        .await
        .map_err(query_error("table lookup"))?
        .ok_or_else(|| SourceError::TableMissing {
            table: qualified.clone(),
        })?;
    let (relation_oid, partitioned): (u32, bool) = (row.get(0), row.get(1));
    // The row key: the columns the replica identity sends (see `identity::Identity::key`).
    let replica = identity::identity(client, relation_oid).await?;
    let replica_identity = replica.kind;
    let key: HashMap<String, u32> = replica.key().into_iter().zip(1..).collect();

    let column_rows = client
        .query(
            "SELECT a.attname, a.atttypid, format_type(a.atttypid, a.atttypmod), a.atttypmod, \
                    NOT a.attnotnull, a.attnum::int4 \
             FROM pg_attribute a \
             WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '' \
             ORDER BY a.attnum",
            &[&relation_oid],
        )
        .await
        .map_err(query_error("columns"))?;
    let mut resolver = TypeResolver {
        client,
        cache: HashMap::new(),
    };
    let mut columns = Vec::with_capacity(column_rows.len());
    for row in &column_rows {
        let name: String = row.get(0);
        let declared: u32 = row.get(1);
        let resolved = resolver.resolve(declared).await?;
        let (element_type_oid, type_kind) = if resolved.element != 0 {
            let element = resolver.resolve(resolved.element).await?;
            (element.oid, element.kind)
        } else {
            (0, resolved.kind.clone())
        };
        let typmod: i32 = row.get(3);
        columns.push(ColumnSchema {
            key_position: key.get(&name).copied().unwrap_or(0),
            name,
            type_oid: resolved.oid,
            type_name: row.get(2),
            type_modifier: if typmod == -1 {
                resolved.typmod
            } else {
                typmod
            },
            nullable: row.get(4),
            element_type_oid,
            type_kind,
            dropped: false,
            // The user's choice is Setup's to record (spec.tables[i].column_types).
            clickhouse_type: String::new(),
            attnum: u32::try_from(row.get::<_, i32>(5)).unwrap_or(0),
        });
    }

    // Estimates: for a partitioned table, the sum over its leaf partitions.
    let estimate = client
        .query_one(
            "SELECT coalesce(sum(greatest(c.reltuples, 0)), 0)::int8, coalesce(sum(c.relpages), 0)::int8 \
             FROM pg_class c WHERE c.relkind <> 'p' AND (c.oid = $1::oid OR c.oid IN \
               (SELECT relid FROM pg_partition_tree($1::oid::regclass) WHERE isleaf))",
            &[&relation_oid],
        )
        .await
        .map_err(|source| SourceError::Query { what: "size estimate", source })?;
    let (rows, pages): (i64, i64) = (estimate.get(0), estimate.get(1));

    Ok(TableSchema {
        source_schema: schema.to_owned(),
        source_table: table.to_owned(),
        relation_oid,
        columns,
        replica_identity: replica_identity.into(),
        partitioned,
        estimated_rows: u64::try_from(rows).unwrap_or(0),
        pages: u64::try_from(pages).unwrap_or(0),
    })
}
