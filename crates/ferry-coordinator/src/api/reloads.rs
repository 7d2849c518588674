//! ResyncPipe, AddTables and RemoveTables: checked here, then started as a reload in the
//! pipe's status (and its spec, for tables added or removed) in one compare-and-swap; the
//! leader's reconciliation carries it out (`crate::reload`).

use std::time::SystemTime;

use ferry_core::PipeState;
use ferry_core::lifecycle::{self, PipeEvent};
use ferry_core::spec::source_table_name;
use ferry_proto::v1::{ReloadKind, TableMapping};
use ferry_store::{Fence, PipeRecord, StoreError};
use tonic::Status;
use tracing::{info, warn};

use super::{CAS_ATTEMPTS, PipeApi};
use crate::errors::illegal;
use crate::reload::new_reload;

/// A reload a user asked for.
pub(super) enum Request {
    /// These tables (schema.table); all of them means the whole pipe.
    Resync(Vec<String>),
    Add(Vec<TableMapping>),
    Remove {
        tables: Vec<String>,
        drop: bool,
    },
}

/// The tables a resync reloads: those named (each must be one of the pipe's), or all.
pub(super) fn resync_tables(record: &PipeRecord, named: &[String]) -> Result<Vec<String>, Status> {
    let present: Vec<String> = record.spec.tables.iter().map(source_table_name).collect();
    if named.is_empty() {
        return Ok(present);
    }
    let mut tables = Vec::new();
    for (i, table) in named.iter().enumerate() {
        if !present.contains(table) {
            return Err(Status::invalid_argument(format!(
                "tables[{i}]: {table} is not replicated by pipe {} (tables are named schema.table)",
                record.spec.name
            )));
        }
        if !tables.contains(table) {
            tables.push(table.clone());
        }
    }
    Ok(tables)
}

/// The tables a removal takes out: each one of the pipe's, and not all of them.
pub(super) fn removed_tables(record: &PipeRecord, named: &[String]) -> Result<Vec<String>, Status> {
    let name = &record.spec.name;
    if named.is_empty() {
        return Err(Status::invalid_argument(
            "source_tables: must list at least one table",
        ));
    }
    let present: Vec<String> = record.spec.tables.iter().map(source_table_name).collect();
    let mut tables = Vec::new();
    for (i, table) in named.iter().enumerate() {
        if !present.contains(table) {
            return Err(Status::invalid_argument(format!(
                "source_tables[{i}]: {table} is not replicated by pipe {name} (tables are named schema.table)"
            )));
        }
        if !tables.contains(table) {
            tables.push(table.clone());
        }
    }
    if present.iter().all(|t| tables.contains(t)) {
        return Err(Status::failed_precondition(format!(
            "pipe {name} would have no tables left; delete the pipe instead (ferry delete {name})"
        )));
    }
    Ok(tables)
}

/// The tables a resync of `asked` must reload: a reload that did not finish (a resync whose
/// tables' changes since its boundary went only into their shadows, tables added but not yet
/// copied) is taken over, and a pipe that failed before its first snapshot was done is
/// reloaded whole (its other tables were never copied).
fn resync_covers(record: &PipeRecord, asked: &[String]) -> Vec<String> {
    let all: Vec<String> = record.spec.tables.iter().map(source_table_name).collect();
    let never_ran = record.status.state() == PipeState::Failed
        && matches!(
            record.status.previous_state(),
            PipeState::Provisioning | PipeState::Setup | PipeState::Snapshot
        )
        && record.status.reload.is_none();
    if never_ran {
        return all;
    }
    let unfinished = record.status.reload.iter().flat_map(|r| r.tables.iter());
    all.into_iter()
        .filter(|t| asked.contains(t) || unfinished.clone().any(|u| u == t))
        .collect()
}

impl PipeApi {
    /// Starts `request` on the pipe: Resync or Modifying, with the reload in its status.
    pub(super) async fn start_reload(
        &self,
        fence: &Fence,
        name: &str,
        request: Request,
    ) -> Result<PipeRecord, Status> {
        for _ in 0..CAS_ATTEMPTS {
            let mut record = self.existing(name).await?;
            // A snapshot paused midway has tables not copied yet: finish it first.
            if record.status.state() == PipeState::Paused
                && record.status.paused_from() == PipeState::Snapshot
            {
                return Err(Status::failed_precondition(format!(
                    "pipe {name} is in state paused during its snapshot; resume it (ferry resume {name}) and let the snapshot finish first"
                )));
            }
            let (event, reason) = match &request {
                Request::Resync(tables) => {
                    let tables = resync_covers(&record, tables);
                    (
                        PipeEvent::ResyncRequested,
                        if tables.len() == record.spec.tables.len() {
                            "ResyncPipe requested: reloading every table".to_owned()
                        } else {
                            format!("ResyncPipe requested: reloading {}", tables.join(", "))
                        },
                    )
                }
                Request::Add(added) => (
                    PipeEvent::ModifyRequested,
                    format!(
                        "AddTables requested: {}",
                        added
                            .iter()
                            .map(source_table_name)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ),
                Request::Remove { tables, .. } => (
                    PipeEvent::ModifyRequested,
                    format!("RemoveTables requested: {}", tables.join(", ")),
                ),
            };
            let mut status = lifecycle::apply(
                &record.status,
                record.spec.mode(),
                event,
                reason,
                None,
                SystemTime::now(),
            )
            .map_err(|e| illegal(name, &e))?;
            let previous = record.status.reload.as_ref();
            let mut spec = record.spec.clone();
            status.reload = Some(match &request {
                Request::Resync(tables) => {
                    let tables = resync_covers(&record, tables);
                    let whole = tables.len() == record.spec.tables.len();
                    new_reload(previous, ReloadKind::Resync, tables, whole, false)
                }
                Request::Add(added) => {
                    spec.tables.extend(added.iter().cloned());
                    new_reload(
                        previous,
                        ReloadKind::Add,
                        added.iter().map(source_table_name).collect(),
                        false,
                        false,
                    )
                }
                Request::Remove { tables, drop } => {
                    let mut reload =
                        new_reload(previous, ReloadKind::Remove, tables.clone(), false, *drop);
                    reload.destination_tables = spec
                        .tables
                        .iter()
                        .filter(|m| tables.contains(&source_table_name(m)))
                        .map(|m| m.destination_table.clone())
                        .collect();
                    spec.tables
                        .retain(|m| !tables.contains(&source_table_name(m)));
                    reload
                }
            });
            if matches!(request, Request::Resync(_)) {
                // A resync starts the stream again: the error that stopped it is history.
                self.store()
                    .reset_stream(fence, name, false)
                    .await
                    .map_err(|e| self.write_error(e))?;
            }
            let written = if spec == record.spec {
                self.store()
                    .put_pipe_status(fence, name, record.status_revision, &status)
                    .await
            } else {
                self.store()
                    .put_pipe(
                        fence,
                        record.spec_revision,
                        &spec,
                        record.status_revision,
                        &status,
                    )
                    .await
            };
            match written {
                Ok(revision) => {
                    info!(pipe = %name, reason = %status.reason, "reload started");
                    if spec != record.spec {
                        record.spec = spec;
                        record.spec_revision = revision;
                    }
                    record.status = status;
                    record.status_revision = revision;
                    return Ok(record);
                }
                Err(StoreError::Conflict { .. }) => continue,
                Err(other) => return Err(self.write_error(other)),
            }
        }
        warn!(pipe = %name, "reload request kept conflicting");
        Err(Status::aborted(format!(
            "pipe {name} kept changing during the request; retry"
        )))
    }
}
