//! `DeletePipe`: record the request's options with the pipe, move it to Deleting, then wait a
//! while for the leader's cleanup (see [`crate::cleanup`]) and say how far it got.
//!
//! The options live in etcd (`pipes/<pipe>/delete_request`) because the cleanup is
//! level-triggered: it may run after this request returned, or on another leader. The wait
//! watches the pipe's keys from just before the request changed anything, so it sees every
//! object the cleanup strikes from the record and, if the pipe goes, what was still recorded
//! when it went (a forced delete of a pipe whose source is down leaves its slot behind).

use std::collections::HashMap;
use std::time::Duration;

use ferry_core::PipeState;
use ferry_core::lifecycle::PipeEvent;
use ferry_proto::v1::{
    DeletePipeRequest, DeletePipeResponse, PipeStatus, SourceResources, TableState,
};
use ferry_store::watch::{PrefixWatch, WatchEvent};
use ferry_store::{Fence, StoreError};
use prost::Message as _;
use tokio::time::Instant;
use tonic::Status;
use tracing::info;

use super::{PipeApi, to_proto};
use crate::cleanup::leftovers;
use crate::errors::store_status;

/// How long the request waits for the cleanup before answering with what is left.
const WAIT: Duration = Duration::from_secs(15);

/// The pipe's records the answer is built from, kept current from the watch.
struct Seen {
    resources: SourceResources,
    tables: HashMap<String, TableState>,
    status: Option<PipeStatus>,
    gone: bool,
}

impl PipeApi {
    /// Carries out a DeletePipe on the leader (under `fence`).
    pub(super) async fn delete(
        &self,
        fence: &Fence,
        request: DeletePipeRequest,
    ) -> Result<DeletePipeResponse, Status> {
        let name = request.name.clone();
        let record = self.existing(&name).await?;
        let store = self.store();
        // Read before changing anything, and watch from there: nothing the cleanup does after
        // the request is missed.
        let (_, revision) = store.get_pipe_at(&name).await.map_err(store_status)?;
        let mut seen = Seen {
            resources: store.resources(&name).await.map_err(store_status)?,
            tables: store
                .table_states(&name)
                .await
                .map_err(store_status)?
                .into_iter()
                .collect(),
            status: Some(record.status.clone()),
            gone: false,
        };
        // A second request (say with --force after the source stayed down) adds to the first.
        let options = if record.status.state() == PipeState::Deleting {
            let before = store
                .delete_request(&name)
                .await
                .map_err(store_status)?
                .unwrap_or_default();
            DeletePipeRequest {
                name: name.clone(),
                drop_destination_tables: before.drop_destination_tables
                    || request.drop_destination_tables,
                force: before.force || request.force,
            }
        } else {
            request
        };
        store
            .put_delete_request(fence, &name, &options)
            .await
            .map_err(|e| match e {
                StoreError::Conflict { .. } => {
                    Status::not_found(format!("pipe {name} does not exist"))
                }
                other => self.write_error(other),
            })?;
        self.apply_event(
            fence,
            &name,
            |_| PipeEvent::DeleteRequested,
            "DeletePipe requested",
            &[PipeState::Deleting],
        )
        .await?;
        info!(pipe = %name, drop_destination_tables = options.drop_destination_tables, force = options.force, "delete requested");

        self.follow(&name, revision, &mut seen).await;
        let left = leftovers(
            &record.spec,
            &seen.resources,
            &seen.tables,
            options.drop_destination_tables,
        );
        let why = seen
            .status
            .as_ref()
            .and_then(|s| s.error.as_ref())
            .map_or_else(
                || "not dropped yet: the cleanup is still running".to_owned(),
                |e| format!("not dropped: {}", e.message),
            );
        let left_behind = left.iter().map(|l| format!("{l}: {why}")).collect();
        if seen.gone {
            return Ok(DeletePipeResponse {
                pipe: None,
                left_behind,
                deleted: true,
            });
        }
        let pipe = store
            .get_pipe(&name)
            .await
            .map_err(store_status)?
            .map(|r| to_proto(&r));
        Ok(DeletePipeResponse {
            deleted: pipe.is_none(),
            pipe,
            left_behind,
        })
    }

    /// Applies the pipe's changes after `revision` to `seen` until the pipe is gone or
    /// [`WAIT`] passes.
    async fn follow(&self, name: &str, revision: i64, seen: &mut Seen) {
        let store = self.store();
        let keys = store.keys();
        let (status_key, resources_key) = (keys.pipe_status(name), keys.pipe_resources(name));
        let tables_prefix = keys.pipe_tables(name);
        let mut watch = PrefixWatch::new(store, keys.pipe(name), revision + 1);
        let deadline = Instant::now() + WAIT;
        while !seen.gone {
            let Ok(Ok(events)) = tokio::time::timeout_at(deadline, watch.next()).await else {
                return;
            };
            for event in events {
                match event {
                    WatchEvent::Delete { key, .. } if key == status_key.as_bytes() => {
                        seen.gone = true;
                    }
                    WatchEvent::Put { key, value, .. } if key == status_key.as_bytes() => {
                        seen.status = PipeStatus::decode(value.as_slice()).ok();
                    }
                    WatchEvent::Put { key, value, .. } if key == resources_key.as_bytes() => {
                        if let Ok(resources) = SourceResources::decode(value.as_slice()) {
                            seen.resources = resources;
                        }
                    }
                    WatchEvent::Put { key, value, .. } => {
                        let key = String::from_utf8_lossy(&key);
                        if let Some(table) = key.strip_prefix(tables_prefix.as_str())
                            && let Ok(state) = TableState::decode(value.as_slice())
                        {
                            seen.tables.insert(table.to_owned(), state);
                        }
                    }
                    WatchEvent::Delete { .. } => {}
                }
            }
        }
    }
}
