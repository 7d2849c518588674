//! Setup (DESIGN.md §2): validate the source and the destination, record the source tables,
//! create the destination tables, the publication and the slot, plan the snapshot.
//!
//! Everything that can refuse the pipe is checked before anything is created, so a refused
//! pipe leaves nothing behind. Source objects are recorded in etcd *before* they are created,
//! so a delete always knows what to drop. Every step is idempotent: a Setup re-run after a
//! crash picks up where the last one stopped.

use std::time::SystemTime;

use backon::Retryable as _;
use ferry_clickhouse::ddl;
use ferry_clickhouse::sink::{Sink, SinkError};
use ferry_clickhouse::types::{MappingOptions, TypeOverride};
use ferry_core::PipeMode;
use ferry_core::error_policy::{self, ErrorClass};
use ferry_core::lifecycle::{self, PipeEvent};
use ferry_core::naming::default_slot_and_publication;
use ferry_core::secret::{SecretError, SecretKey};
use ferry_core::spec::source_table_name;
use ferry_postgres::{SourceError, connection, replication, schema, snapshot, validate};
use ferry_proto::v1::{
    DestinationLimits, PipeError, PipeSecrets, PipeSpec, SnapshotPartition, SourceResources,
    TableMapping, TableSchema, TableState, TableStatus,
};
use ferry_server::telemetry::error_chain;
use ferry_store::{Fence, PipeRecord, Store, StoreError};
use tracing::{info, warn};

use crate::slot_health;

/// Why Setup refused a pipe.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SetupProblem {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error("the pipe's secrets cannot be opened")]
    Secret(#[source] SecretError),
    #[error("destination table {table} already holds {rows} rows")]
    NotEmpty { table: String, rows: u64 },
    #[error("spec.tables[{index}].column_types[{column}]: {problem}")]
    ColumnType {
        table: String,
        index: usize,
        column: String,
        problem: String,
    },
    #[error("replication slot {slot} is gone, invalidated or older than its publication")]
    SlotUnusable { pipe: String, slot: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl SetupProblem {
    /// What the error policy does about it.
    pub(crate) fn class(&self) -> ErrorClass {
        match self {
            Self::Source(e) => e.class(),
            Self::Sink(e) => e.class(),
            Self::Store(e) => e.class(),
            Self::Secret(_)
            | Self::NotEmpty { .. }
            | Self::ColumnType { .. }
            | Self::SlotUnusable { .. } => ErrorClass::Permanent,
        }
    }

    pub(crate) fn to_pipe_error(&self) -> PipeError {
        let (remedy, table) = match self {
            Self::Source(e) => (e.remedy(), e.table().map(str::to_owned)),
            Self::Sink(e) => (e.remedy(), None),
            Self::Secret(_) => (
                "give every coordinator and worker the secret key the pipe was created with (--secret-key-file), or recreate the pipe".into(),
                None,
            ),
            Self::NotEmpty { table, .. } => (
                "empty or drop the table, pick another destination database, or set settings.allow_non_empty_destination".into(),
                Some(table.clone()),
            ),
            Self::ColumnType { table, index, column, .. } => (
                format!(
                    "correct or remove spec.tables[{index}].column_types[{column}] (`--column-type {table}.{column}=…`) and create the pipe again (`ferry delete`, then `ferry create`)"
                ),
                Some(table.clone()),
            ),
            Self::SlotUnusable { pipe, .. } => (
                format!("resync the pipe: ferry resync {pipe} (it creates the slot anew and reloads every table)"),
                None,
            ),
            Self::Store(_) => ("retry once etcd is healthy".into(), None),
        };
        PipeError {
            message: error_chain(self),
            remedy,
            table: table.unwrap_or_default(),
            occurred_at: Some(SystemTime::now().into()),
        }
    }
}

/// What Setup needs from the coordinator.
#[derive(Debug, Clone)]
pub(crate) struct SetupContext {
    pub(crate) store: Store,
    pub(crate) fence: Fence,
    pub(crate) key: SecretKey,
}

/// The slot a pipe of this spec uses, if it replicates.
pub(crate) fn slot_name(spec: &PipeSpec) -> Option<String> {
    let source = spec.source.as_ref()?;
    (spec.mode() != PipeMode::SnapshotOnly).then(|| {
        if source.slot_name.is_empty() {
            default_slot_and_publication(&spec.name)
        } else {
            source.slot_name.clone()
        }
    })
}

/// The publication Ferry creates for a pipe, if it manages one.
pub(crate) fn managed_publication(spec: &PipeSpec) -> Option<String> {
    let source = spec.source.as_ref()?;
    (spec.mode() != PipeMode::SnapshotOnly && source.publication.is_empty())
        .then(|| default_slot_and_publication(&spec.name))
}

pub(crate) async fn open_secrets(
    store: &Store,
    key: &SecretKey,
    pipe: &str,
) -> Result<PipeSecrets, SetupProblem> {
    let sealed = store.get_pipe_secrets(pipe).await?.unwrap_or_default();
    key.open(pipe, &sealed).map_err(SetupProblem::Secret)
}

/// Runs Setup for a pipe in state Setup and records the outcome (next state, or Failed).
pub(crate) async fn run(ctx: SetupContext, record: PipeRecord) -> Result<(), StoreError> {
    let name = record.spec.name.clone();
    // Bounded: whoever created the pipe waits for the outcome. An error that waits for an
    // operator fails Setup at once, since that person is the one to act.
    let outcome = (|| prepare(&ctx, &record))
        .retry(ferry_server::retry::builder(&error_policy::SETUP))
        .when(|problem| problem.class().passes_by_itself())
        .notify(|problem, delay| {
            warn!(pipe = %name, error = %error_chain(problem), next_in_ms = delay.as_millis() as u64, "setup step failed; retrying");
        })
        .await;
    let mode = record.spec.mode();
    let now = SystemTime::now();
    let status = match outcome {
        Ok(Prepared {
            tables,
            partitions,
            warning,
        }) => {
            let mut reason = if mode == PipeMode::CdcOnly {
                format!(
                    "source validated; {} destination table(s) ready",
                    tables.len()
                )
            } else {
                format!(
                    "source validated; {} destination table(s) ready; {} snapshot partition(s) planned",
                    tables.len(),
                    partitions.len()
                )
            };
            if let Some(warning) = warning {
                warn!(pipe = %name, "{warning}");
                reason = format!("{reason}; {warning}");
            }
            let mut status = lifecycle::apply(
                &record.status,
                mode,
                PipeEvent::SetupDone,
                reason,
                None,
                now,
            )
            .map_err(|_| StoreError::Conflict { key: name.clone() })?;
            status.tables = table_progress(&record.spec, &partitions);
            info!(pipe = %name, tables = tables.len(), partitions = partitions.len(), "setup done");
            status
        }
        Err(SetupProblem::Store(error)) => return Err(error),
        Err(problem) => {
            warn!(pipe = %name, error = %error_chain(&problem), "setup failed");
            let error = problem.to_pipe_error();
            lifecycle::apply(
                &record.status,
                mode,
                PipeEvent::Failed,
                "setup failed",
                Some(error),
                now,
            )
            .map_err(|_| StoreError::Conflict { key: name.clone() })?
        }
    };
    ctx.store
        .put_pipe_status(&ctx.fence, &name, record.status_revision, &status)
        .await?;
    Ok(())
}

struct Prepared {
    tables: Vec<(String, TableState)>,
    partitions: Vec<SnapshotPartition>,
    /// What the source's settings risk (see [`slot_health::keep_size_warning`]).
    warning: Option<String>,
}

async fn prepare(ctx: &SetupContext, record: &PipeRecord) -> Result<Prepared, SetupProblem> {
    let spec = &record.spec;
    let name = &spec.name;
    let settings = spec.settings.unwrap_or_default();
    let secrets = open_secrets(&ctx.store, &ctx.key, name).await?;
    let source_spec = spec.source.clone().unwrap_or_default();
    let destination = spec.destination.clone().unwrap_or_default();

    // 1. Checks: nothing is created until all of them pass.
    let source = connection::connect(&source_spec, &secrets.source_password).await?;
    let slot = slot_name(spec);
    validate::check_source(&source, spec, slot.as_deref().unwrap_or("")).await?;
    // Advisory: a source whose setting cannot be read is not refused for it.
    let warning = match &slot {
        Some(_) => match ferry_postgres::slot::max_slot_wal_keep_size(&source).await {
            Ok(limit) => slot_health::keep_size_warning(limit),
            Err(error) => {
                warn!(pipe = %name, error = %error_chain(&error), "cannot read max_slot_wal_keep_size");
                None
            }
        },
        None => None,
    };
    let sink = Sink::new(&destination, &secrets.destination_password);
    sink.check().await?;
    // What the server holds decides what is clamped; every worker builds from this record.
    let limits = sink.probe_limits().await?;
    let options = MappingOptions::for_pipe(&settings, Some(&limits));
    let recorded: std::collections::HashMap<String, TableState> =
        ctx.store.table_states(name).await?.into_iter().collect();
    let mut tables = Vec::with_capacity(spec.tables.len());
    for (index, mapping) in spec.tables.iter().enumerate() {
        let table = source_table_name(mapping);
        let mut described =
            schema::describe_table(&source, &mapping.source_schema, &mapping.source_table).await?;
        apply_column_types(index, mapping, &mut described, &limits)?;
        // Refuse a table Ferry cannot create before creating any.
        ddl::create_table(
            &destination.database,
            &mapping.destination_table,
            &described,
            options,
        )
        .map_err(SinkError::from)?;
        let created_before = recorded.get(&table).is_some_and(|s| s.destination_created);
        let existing = sink.row_count(&mapping.destination_table).await?;
        if !created_before && settings.allow_non_empty_destination != Some(true) {
            if let Some(rows @ 1..) = existing {
                return Err(SetupProblem::NotEmpty {
                    table: format!("{}.{}", destination.database, mapping.destination_table),
                    rows,
                });
            }
        }
        // RowBinary has no column names: an existing table must match what Ferry writes.
        if existing.is_some() {
            sink.check_columns(&mapping.destination_table, &described, options)
                .await?;
        }
        tables.push((table, described));
    }

    // 2. Create, recording source objects before they exist.
    let resources = SourceResources {
        slot_name: slot.clone().unwrap_or_default(),
        publication: managed_publication(spec).unwrap_or_default(),
    };
    ctx.store
        .put_resources(&ctx.fence, name, &resources)
        .await?;
    ctx.store
        .put_destination_limits(&ctx.fence, name, &limits)
        .await?;
    if !resources.publication.is_empty() {
        let names: Vec<String> = spec.tables.iter().map(source_table_name).collect();
        replication::ensure_publication(&source, &resources.publication, &names).await?;
    }
    if let Some(slot) = &slot {
        replication::ensure_slot(&source, slot).await?;
    }
    // Describe the tables again now that the slot exists: a column added since the checks
    // would otherwise be neither in the recorded schema nor announced by the stream.
    sink.create_database().await?;
    let mut states = Vec::with_capacity(tables.len());
    for (index, (mapping, (table, _))) in spec.tables.iter().zip(tables).enumerate() {
        let mut described =
            schema::describe_table(&source, &mapping.source_schema, &mapping.source_table).await?;
        apply_column_types(index, mapping, &mut described, &limits)?;
        sink.create_table(&mapping.destination_table, &described, options)
            .await?;
        sink.create_view(&mapping.destination_table, &described)
            .await?;
        states.push((
            table,
            TableState {
                schema: Some(described),
                destination_created: true,
            },
        ));
    }
    ctx.store
        .put_table_states(&ctx.fence, name, &states)
        .await?;

    // 3. Plan the snapshot.
    let mut partitions = Vec::new();
    if spec.mode() != PipeMode::CdcOnly {
        let rows_per_partition =
            u64::try_from(settings.snapshot_rows_per_partition.unwrap_or(100_000))
                .unwrap_or(100_000);
        for (_, state) in &states {
            if let Some(described) = &state.schema {
                partitions.extend(snapshot::plan(&source, described, rows_per_partition).await?);
            }
        }
        ctx.store
            .put_snapshot_plan(&ctx.fence, name, record.status_revision, &partitions)
            .await?;
    }
    Ok(Prepared {
        tables: states,
        partitions,
        warning,
    })
}

/// Records the ClickHouse types the user chose (`spec.tables[index].column_types`) in the
/// described schema, refusing a column that does not exist or cannot take the type.
pub(crate) fn apply_column_types(
    index: usize,
    mapping: &TableMapping,
    described: &mut TableSchema,
    limits: &DestinationLimits,
) -> Result<(), SetupProblem> {
    let table = source_table_name(mapping);
    for (name, ty) in &mapping.column_types {
        let refuse = |problem: String| SetupProblem::ColumnType {
            table: table.clone(),
            index,
            column: name.clone(),
            problem,
        };
        let column = described
            .columns
            .iter_mut()
            .find(|c| c.name == *name)
            .ok_or_else(|| refuse(format!("{table} has no column {name}")))?;
        let chosen = TypeOverride::parse(ty)
            .ok_or_else(|| refuse(format!("{ty:?} is not a supported column type")))?;
        if !chosen.fits(column) {
            return Err(refuse(format!(
                "{ty} cannot hold {} values (String takes any column, Decimal a numeric, JSON a json or jsonb)",
                column.type_name
            )));
        }
        if chosen == TypeOverride::Json && !limits.json_type {
            return Err(refuse(
                "the ClickHouse server has no JSON type; use String".into(),
            ));
        }
        column.clickhouse_type.clone_from(ty);
    }
    Ok(())
}

/// Per-table progress from a snapshot plan (the pipe's status shows it).
pub(crate) fn table_progress(
    spec: &PipeSpec,
    partitions: &[SnapshotPartition],
) -> Vec<TableStatus> {
    spec.tables
        .iter()
        .map(|mapping| {
            let table = source_table_name(mapping);
            let mine = partitions.iter().filter(|p| p.source_table == table);
            let mut status = TableStatus {
                source_table: table.clone(),
                destination_table: mapping.destination_table.clone(),
                ..Default::default()
            };
            for p in mine {
                status.partitions_total += 1;
                status.rows_estimated += p.rows_estimated.max(p.rows_copied);
                if p.done {
                    status.partitions_done += 1;
                    status.rows_copied += p.rows_copied;
                    status.altered = ferry_clickhouse::transcode::sum_altered([
                        status.altered.as_slice(),
                        p.altered.as_slice(),
                    ]);
                }
            }
            status
        })
        .collect()
}
