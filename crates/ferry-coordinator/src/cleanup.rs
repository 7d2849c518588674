//! Deleting a pipe: drop what it created, then its keys.
//!
//! On the source, the replication slot and the publication Ferry made (recorded in
//! `pipes/<pipe>/resources` before they were created); with `drop_destination_tables`, its
//! ClickHouse tables with their views and resync shadows. Each object is struck from the
//! record once dropped, so the record always says what is left, and a retry (or the next
//! leader) only drops what remains. Until everything is dropped the pipe stays in Deleting
//! with what is left in its reason (a slot left behind pins WAL on the source forever),
//! unless the delete was forced: then the keys go anyway and the leftovers are reported.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use ferry_clickhouse::sink::{Sink, SinkError};
use ferry_clickhouse::teardown::drop_statements;
use ferry_core::spec::source_table_name;
use ferry_postgres::slot::{drop_publication_sql, drop_slot_sql};
use ferry_postgres::{SourceError, connection, replication};
use ferry_proto::v1::{DeletePipeRequest, PipeError, PipeSpec, SourceResources, TableState};
use ferry_server::telemetry::error_chain;
use ferry_store::{PipeRecord, StoreError};
use tracing::{info, warn};

use crate::setup::{self, SetupContext, SetupProblem};

/// One attempt at dropping everything, at most (connecting alone may take 10 s).
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(20);
/// Between attempts.
const RETRY: Duration = Duration::from_secs(3);
/// Failed attempts after which a forced delete gives up on what it could not drop, when the
/// failure is not that the server cannot be reached (which gives up at once).
const FORCED_ATTEMPTS: u32 = 3;

/// Something the pipe created that is not dropped (yet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Leftover {
    /// What and where: `replication slot ferry_p on host:port/db`.
    pub(crate) what: String,
    /// The SQL that drops it, to run by hand.
    pub(crate) sql: String,
}

impl std::fmt::Display for Leftover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (drop it with: {})", self.what, self.sql)
    }
}

/// What is left of the pipe of `spec` according to its records: the source objects still
/// recorded, and (when the delete drops them) the destination tables still marked created.
pub(crate) fn leftovers(
    spec: &PipeSpec,
    resources: &SourceResources,
    tables: &HashMap<String, TableState>,
    drop_destination_tables: bool,
) -> Vec<Leftover> {
    let source = spec.source.clone().unwrap_or_default();
    let at = format!("{}:{}/{}", source.host, source.port, source.database);
    let mut left = Vec::new();
    if !resources.slot_name.is_empty() {
        left.push(Leftover {
            what: format!("replication slot {} on {at}", resources.slot_name),
            sql: drop_slot_sql(&resources.slot_name),
        });
    }
    if !resources.publication.is_empty() {
        left.push(Leftover {
            what: format!("publication {} on {at}", resources.publication),
            sql: drop_publication_sql(&resources.publication),
        });
    }
    if drop_destination_tables {
        let destination = spec.destination.clone().unwrap_or_default();
        for mapping in &spec.tables {
            let created = tables
                .get(&source_table_name(mapping))
                .is_some_and(|t| t.destination_created);
            if created {
                left.push(Leftover {
                    what: format!(
                        "ClickHouse table {}.{} at {}",
                        destination.database, mapping.destination_table, destination.url
                    ),
                    sql: drop_statements(&destination.database, &mapping.destination_table)
                        .join("; "),
                });
            }
        }
    }
    left
}

/// What a failed attempt tells a forced delete.
struct Failure {
    text: String,
    /// The server could not be reached (or refused Ferry's login): retrying soon is futile.
    unreachable: bool,
}

/// Drops everything the pipe created, then deletes its keys (see the module docs).
pub(crate) async fn run(ctx: &SetupContext, record: &PipeRecord) -> Result<(), StoreError> {
    let name = &record.spec.name;
    let mut revision = record.status_revision;
    let mut status = record.status.clone();
    let mut failures = 0;
    loop {
        let options = ctx.store.delete_request(name).await?.unwrap_or_default();
        let attempt = tokio::time::timeout(ATTEMPT_TIMEOUT, drop_all(ctx, record, &options));
        let failure = match attempt.await {
            Ok(Ok(())) => break,
            Ok(Err(problems)) => {
                // etcd trouble is the caller's to retry (or a sign the leadership moved on).
                if problems.iter().any(|p| matches!(p, SetupProblem::Store(_))) {
                    return first_store_error(problems);
                }
                Failure {
                    text: problems
                        .iter()
                        .map(|p| error_chain(p))
                        .collect::<Vec<_>>()
                        .join("; "),
                    unreachable: problems.iter().any(unreachable),
                }
            }
            Err(_) => Failure {
                text: format!(
                    "no answer within {} s from the source or ClickHouse",
                    ATTEMPT_TIMEOUT.as_secs()
                ),
                unreachable: true,
            },
        };
        failures += 1;
        let left = recorded_leftovers(ctx, record, &options).await?;
        let list = left
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ");
        let forced = options.force && (failure.unreachable || failures >= FORCED_ATTEMPTS);
        let reason = if forced {
            format!("forced delete: forgetting the pipe, leaving behind: {list}")
        } else {
            format!("cannot drop everything the pipe created yet; retrying. Left behind: {list}")
        };
        if status.reason != reason
            || status.error.as_ref().map(|e| e.message.as_str()) != Some(failure.text.as_str())
        {
            status.reason = reason;
            status.error = Some(PipeError {
                message: failure.text.clone(),
                remedy: format!(
                    "make the source and ClickHouse reachable so Ferry drops them, or run `ferry delete {name} --force` and drop them by hand"
                ),
                table: String::new(),
                occurred_at: Some(SystemTime::now().into()),
            });
            revision = ctx
                .store
                .put_pipe_status(&ctx.fence, name, revision, &status)
                .await?;
        }
        if forced {
            warn!(pipe = %name, left = %list, error = %failure.text, "forced delete: leaving objects behind; drop them by hand");
            break;
        }
        warn!(pipe = %name, error = %failure.text, "cannot drop what the pipe created yet; retrying");
        tokio::time::sleep(RETRY).await;
    }
    ctx.store.delete_pipe(&ctx.fence, name, revision).await?;
    info!(pipe = %name, "pipe deleted");
    Ok(())
}

fn first_store_error(problems: Vec<SetupProblem>) -> Result<(), StoreError> {
    match problems.into_iter().find_map(|p| match p {
        SetupProblem::Store(e) => Some(e),
        _ => None,
    }) {
        Some(error) => Err(error),
        None => Ok(()),
    }
}

fn unreachable(problem: &SetupProblem) -> bool {
    matches!(
        problem,
        SetupProblem::Source(SourceError::Unreachable { .. } | SourceError::AuthFailed { .. })
            | SetupProblem::Sink(SinkError::Unreachable { .. } | SinkError::AuthFailed { .. })
    )
}

/// What the records say is left.
async fn recorded_leftovers(
    ctx: &SetupContext,
    record: &PipeRecord,
    options: &DeletePipeRequest,
) -> Result<Vec<Leftover>, StoreError> {
    let name = &record.spec.name;
    let resources = ctx.store.resources(name).await?;
    let tables: HashMap<_, _> = ctx.store.table_states(name).await?.into_iter().collect();
    Ok(leftovers(
        &record.spec,
        &resources,
        &tables,
        options.drop_destination_tables,
    ))
}

/// One attempt at the source and (if asked) the destination; either failing does not keep
/// the other from being tried.
async fn drop_all(
    ctx: &SetupContext,
    record: &PipeRecord,
    options: &DeletePipeRequest,
) -> Result<(), Vec<SetupProblem>> {
    let mut problems = Vec::new();
    if let Err(problem) = drop_source(ctx, record).await {
        problems.push(problem);
    }
    if options.drop_destination_tables
        && let Err(problem) = drop_destination(ctx, record).await
    {
        problems.push(problem);
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

/// Drops the slot and the Ferry-managed publication, striking each from the record.
async fn drop_source(ctx: &SetupContext, record: &PipeRecord) -> Result<(), SetupProblem> {
    let name = &record.spec.name;
    let mut resources = ctx.store.resources(name).await?;
    if resources.slot_name.is_empty() && resources.publication.is_empty() {
        return Ok(());
    }
    let secrets = setup::open_secrets(&ctx.store, &ctx.key, name).await?;
    let source = connection::connect(
        &record.spec.source.clone().unwrap_or_default(),
        &secrets.source_password,
    )
    .await?;
    if !resources.slot_name.is_empty() {
        replication::drop_slot(&source, &resources.slot_name).await?;
        info!(pipe = %name, slot = %resources.slot_name, "replication slot dropped");
        resources.slot_name.clear();
        ctx.store
            .put_resources(&ctx.fence, name, &resources)
            .await?;
    }
    if !resources.publication.is_empty() {
        replication::drop_publication(&source, &resources.publication).await?;
        info!(pipe = %name, publication = %resources.publication, "publication dropped");
        resources.publication.clear();
        ctx.store
            .put_resources(&ctx.fence, name, &resources)
            .await?;
    }
    Ok(())
}

/// Drops the destination tables Ferry created (with their views and resync shadows),
/// marking each not created once dropped.
async fn drop_destination(ctx: &SetupContext, record: &PipeRecord) -> Result<(), SetupProblem> {
    let name = &record.spec.name;
    let states: HashMap<_, _> = ctx.store.table_states(name).await?.into_iter().collect();
    let pending: Vec<_> = record
        .spec
        .tables
        .iter()
        .filter_map(|mapping| {
            let table = source_table_name(mapping);
            let state = states.get(&table).filter(|s| s.destination_created)?;
            Some((table, mapping, state.clone()))
        })
        .collect();
    if pending.is_empty() {
        return Ok(());
    }
    let secrets = setup::open_secrets(&ctx.store, &ctx.key, name).await?;
    let sink = Sink::new(
        &record.spec.destination.clone().unwrap_or_default(),
        &secrets.destination_password,
    );
    for (table, mapping, mut state) in pending {
        sink.drop_table_objects(&mapping.destination_table).await?;
        info!(pipe = %name, table = %mapping.destination_table, "destination table dropped");
        state.destination_created = false;
        ctx.store
            .put_table_states(&ctx.fence, name, &[(table, state)])
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use ferry_proto::v1::{ClickHouseDestination, PostgresSource, TableMapping};

    use super::*;

    #[test]
    fn leftovers_name_each_object_with_the_sql_that_drops_it() {
        let spec = PipeSpec {
            name: "p".into(),
            source: Some(PostgresSource {
                host: "db".into(),
                port: 5432,
                database: "shop".into(),
                ..Default::default()
            }),
            destination: Some(ClickHouseDestination {
                url: "http://ch:8123".into(),
                database: "dest".into(),
                ..Default::default()
            }),
            tables: vec![
                TableMapping {
                    source_schema: "public".into(),
                    source_table: "orders".into(),
                    destination_table: "orders".into(),
                    ..Default::default()
                },
                TableMapping {
                    source_schema: "public".into(),
                    source_table: "never".into(),
                    destination_table: "never".into(),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let resources = SourceResources {
            slot_name: "ferry_p".into(),
            publication: "ferry_p".into(),
        };
        let tables = HashMap::from([(
            "public.orders".to_owned(),
            TableState {
                schema: None,
                destination_created: true,
            },
        )]);
        let left = leftovers(&spec, &resources, &tables, false);
        assert_eq!(left.len(), 2);
        assert_eq!(left[0].what, "replication slot ferry_p on db:5432/shop");
        assert_eq!(left[0].sql, "SELECT pg_drop_replication_slot('ferry_p');");
        assert_eq!(left[1].sql, "DROP PUBLICATION IF EXISTS \"ferry_p\";");
        let left = leftovers(&spec, &resources, &tables, true);
        assert_eq!(left.len(), 3, "only the table Ferry created: {left:?}");
        assert!(left[2].what.contains("dest.orders"));
        assert!(
            left[2]
                .sql
                .contains("DROP TABLE IF EXISTS `dest`.`orders` SYNC")
        );
        assert!(leftovers(&spec, &SourceResources::default(), &tables, false).is_empty());
    }
}
