//! Setup's checks of a publication the user names (`spec.source.publication`): it must hand
//! Ferry every change of every row and column of the pipe's tables, or the destination would
//! silently diverge from the source.

use ferry_core::spec::source_table_name;
use ferry_proto::v1::PipeSpec;
use tokio_postgres::Client;

use crate::SourceError;
use crate::error::query_error;

/// The first server version with publication row filters and column lists (and the
/// `rowfilter` and `attnames` columns of `pg_publication_tables`).
const ROW_FILTERS_SINCE: i32 = 150_000;

pub(crate) async fn check_publication(
    client: &Client,
    publication: &str,
    spec: &PipeSpec,
) -> Result<(), SourceError> {
    let row = client
        .query_opt(
            "SELECT pubviaroot, pubinsert, pubupdate, pubdelete, pubtruncate, \
                    current_setting('server_version_num')::int4 \
             FROM pg_publication WHERE pubname = $1",
            &[&publication],
        )
        .await
        .map_err(query_error("publication lookup"))?;
    let Some(row) = row else {
        return Err(SourceError::PublicationMissing {
            publication: publication.to_owned(),
        });
    };
    let via_root: bool = row.get(0);
    let missing: Vec<&'static str> = ["insert", "update", "delete", "truncate"]
        .into_iter()
        .zip(1..)
        .filter(|(_, i)| !row.get::<_, bool>(*i))
        .map(|(action, _)| action)
        .collect();
    if let (false, Some(first)) = (missing.is_empty(), spec.tables.first()) {
        return Err(SourceError::PublicationOmitsChanges {
            publication: publication.to_owned(),
            table: source_table_name(first),
            missing,
        });
    }
    let version: i32 = row.get(5);
    // Older servers have neither the feature nor the columns: every row and column is published.
    let membership = if version >= ROW_FILTERS_SINCE {
        "SELECT rowfilter, attnames::text[] FROM pg_publication_tables \
         WHERE pubname = $1 AND schemaname = $2 AND tablename = $3"
    } else {
        "SELECT NULL::text, NULL::text[] FROM pg_publication_tables \
         WHERE pubname = $1 AND schemaname = $2 AND tablename = $3"
    };
    for table in &spec.tables {
        let name = source_table_name(table);
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
                table: name,
            });
        }
        let published = client
            .query_opt(
                membership,
                &[&publication, &table.source_schema, &table.source_table],
            )
            .await
            .map_err(query_error("publication tables"))?;
        let Some(published) = published else {
            return Err(SourceError::PublicationLacksTable {
                publication: publication.to_owned(),
                table: name,
            });
        };
        if let Some(filter) = published.get::<_, Option<String>>(0) {
            return Err(SourceError::PublicationRowFilter {
                publication: publication.to_owned(),
                table: name,
                filter,
            });
        }
        if let Some(listed) = published.get::<_, Option<Vec<String>>>(1) {
            // The columns Ferry records and writes (generated columns are not replicated).
            let columns: Vec<String> = client
                .query(
                    "SELECT a.attname::text FROM pg_attribute a \
                     JOIN pg_class c ON c.oid = a.attrelid \
                     JOIN pg_namespace n ON n.oid = c.relnamespace \
                     WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 \
                       AND NOT a.attisdropped AND a.attgenerated = '' \
                     ORDER BY a.attnum",
                    &[&table.source_schema, &table.source_table],
                )
                .await
                .map_err(query_error("columns"))?
                .iter()
                .map(|r| r.get(0))
                .collect();
            let missing: Vec<String> = columns
                .into_iter()
                .filter(|c| !listed.contains(c))
                .collect();
            if !missing.is_empty() {
                return Err(SourceError::PublicationColumnList {
                    publication: publication.to_owned(),
                    table: name,
                    missing,
                });
            }
        }
    }
    Ok(())
}
