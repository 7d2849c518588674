//! `ferry.v1.PipeService`, served by every coordinator replica.
//!
//! Reads come straight from etcd. Writes validate first (nothing is written for a bad request),
//! then run on the leader under its fence (see [`route`]), as compare-and-swap on what they read.

mod delete;
mod reloads;
mod route;
mod watch;

use std::sync::Arc;
use std::time::SystemTime;

use ferry_core::PipeState;
use ferry_core::lifecycle::{self, PipeEvent};
use ferry_core::naming::check_pipe_name;
use ferry_core::secret::SecretKey;
use ferry_core::spec;
use ferry_proto::v1::pipe_service_server::PipeService;
use ferry_proto::v1::*;
use ferry_store::{PipeRecord, Store, StoreError};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use ferry_server::shutdown::Shutdown;
use ferry_server::telemetry::error_chain;

use crate::errors::{illegal, invalid_spec, store_status};
use crate::leadership::{Deposed, LeaderFence};
use route::{Route, Router};

/// How often a write retries after losing a compare-and-swap to a concurrent change.
const CAS_ATTEMPTS: usize = 3;

/// The `PipeService` implementation.
#[derive(Debug, Clone)]
pub struct PipeApi {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: Store,
    secret_key: SecretKey,
    router: Router,
    deposed: Deposed,
    shutdown: Shutdown,
}

/// What the API needs besides etcd and the key.
#[derive(Debug)]
pub struct ApiContext {
    /// This replica's id.
    pub me: String,
    /// The current leadership's fence, if leading.
    pub fence: LeaderFence,
    /// Where fenced writes are reported.
    pub deposed: Deposed,
    /// Ends open watches on shutdown.
    pub shutdown: Shutdown,
}

impl PipeApi {
    /// An API writing when `context.fence` holds a leadership.
    pub fn new(store: Store, secret_key: SecretKey, context: ApiContext) -> Self {
        let router = Router::new(context.me, context.fence, store.clone());
        Self {
            inner: Arc::new(Inner {
                store,
                secret_key,
                router,
                deposed: context.deposed,
                shutdown: context.shutdown,
            }),
        }
    }

    /// Maps a store error of a leader write; a fenced write means this replica was deposed.
    fn write_error(&self, error: StoreError) -> Status {
        if matches!(error, StoreError::Fenced) {
            self.inner.deposed.report();
        }
        store_status(error)
    }

    fn store(&self) -> &Store {
        &self.inner.store
    }

    async fn existing(&self, name: &str) -> Result<PipeRecord, Status> {
        check_pipe_name(name).map_err(|e| Status::invalid_argument(format!("name: {e}")))?;
        self.store()
            .get_pipe(name)
            .await
            .map_err(store_status)?
            .ok_or_else(|| Status::not_found(format!("pipe {name} does not exist")))
    }
}

/// A stored pipe as the API shows it: the status with the CDC worker's last report (and the
/// failure its stream is retrying, while the pipe streams) and the slot's last check folded in.
pub(crate) fn to_proto(record: &PipeRecord) -> Pipe {
    let mut status = record.status.clone();
    if let Some(retrying) = record
        .replication
        .as_ref()
        .and_then(|r| r.retrying.as_ref())
        && streaming(record)
    {
        status.retrying = Some(retrying.clone());
    }
    if let Some(replication) = &record.replication {
        for table in &mut status.tables {
            if let Some(changes) = replication.tables.get(&table.source_table) {
                table.inserted = changes.inserted;
                table.updated = changes.updated;
                table.deleted = changes.deleted;
                table.renamed_to.clone_from(&changes.renamed_to);
            }
            // Alterations: the snapshot's (in the status) plus the stream's.
            if let Some(altered) = replication.altered.get(&table.source_table) {
                table.altered = ferry_clickhouse::transcode::sum_altered([
                    table.altered.as_slice(),
                    altered.columns.as_slice(),
                ]);
            }
        }
        status.replication = Some(replication.clone());
    }
    status.slot.clone_from(&record.slot);
    Pipe {
        spec: Some(record.spec.clone()),
        status: Some(status),
        status_revision: record.status_revision,
    }
}

/// Whether the pipe's changes stream in its state (as the CDC worker decides it): a retry the
/// stream reported is current only then.
fn streaming(record: &PipeRecord) -> bool {
    record.spec.mode() != PipeMode::SnapshotOnly
        && match record.status.state() {
            PipeState::Running | PipeState::Modifying | PipeState::Resync => true,
            PipeState::Snapshot => record.status.reload.is_some(),
            _ => false,
        }
}

/// Sends a request to the leader when this replica is not it; otherwise yields the fence.
macro_rules! route {
    ($self:ident, $request:ident, $method:ident) => {
        match $self.inner.router.route(&$request).await? {
            Route::Local(fence) => fence,
            Route::Forward(mut leader) => {
                return leader.$method($self.inner.router.forwarded($request)).await;
            }
        }
    };
}

#[tonic::async_trait]
impl PipeService for PipeApi {
    async fn create_pipe(
        &self,
        request: Request<CreatePipeRequest>,
    ) -> Result<Response<CreatePipeResponse>, Status> {
        // Validate before routing: a bad request is refused wherever it lands.
        let CreatePipeRequest { spec, secrets } = request.get_ref().clone();
        let spec = spec.ok_or_else(|| Status::invalid_argument("spec: is required"))?;
        let spec = spec::normalize_new_pipe(spec).map_err(|e| invalid_spec(&e))?;
        let fence = route!(self, request, create_pipe);
        let sealed = self
            .inner
            .secret_key
            .seal(&spec.name, &secrets.unwrap_or_default())
            .map_err(|e| Status::internal(error_chain(&e)))?;
        let status = lifecycle::initial_status(SystemTime::now());
        let record = self
            .store()
            .create_pipe(&fence, &spec, &sealed, &status)
            .await
            .map_err(|e| match e {
                StoreError::AlreadyExists { .. } => Status::already_exists(format!(
                    "spec.name: a pipe named {} already exists",
                    spec.name
                )),
                other => self.write_error(other),
            })?;
        info!(pipe = %spec.name, mode = spec.mode().as_str_name(), tables = spec.tables.len(), "pipe created");
        Ok(Response::new(CreatePipeResponse {
            pipe: Some(to_proto(&record)),
        }))
    }

    async fn get_pipe(
        &self,
        request: Request<GetPipeRequest>,
    ) -> Result<Response<GetPipeResponse>, Status> {
        let record = self.existing(&request.get_ref().name).await?;
        Ok(Response::new(GetPipeResponse {
            pipe: Some(to_proto(&record)),
        }))
    }

    async fn list_pipes(
        &self,
        request: Request<ListPipesRequest>,
    ) -> Result<Response<ListPipesResponse>, Status> {
        let states = &request.get_ref().states;
        if let Some(bad) = states.iter().find(|s| PipeState::try_from(**s).is_err()) {
            return Err(Status::invalid_argument(format!(
                "states: unknown state {bad}"
            )));
        }
        let listing = self.store().list_pipes().await.map_err(store_status)?;
        let pipes = listing
            .pipes
            .values()
            .filter(|r| states.is_empty() || states.contains(&r.status.state))
            .map(to_proto)
            .collect();
        Ok(Response::new(ListPipesResponse { pipes }))
    }

    type WatchPipeStream = ReceiverStream<Result<WatchPipeResponse, Status>>;

    async fn watch_pipe(
        &self,
        request: Request<WatchPipeRequest>,
    ) -> Result<Response<Self::WatchPipeStream>, Status> {
        let name = &request.get_ref().name;
        check_pipe_name(name).map_err(|e| Status::invalid_argument(format!("name: {e}")))?;
        let (record, revision) = self.store().get_pipe_at(name).await.map_err(store_status)?;
        let record =
            record.ok_or_else(|| Status::not_found(format!("pipe {name} does not exist")))?;
        let (tx, rx) = mpsc::channel(16);
        let shutdown = self.inner.shutdown.clone();
        tokio::spawn(watch::stream(
            self.store().clone(),
            record,
            revision,
            tx,
            shutdown,
        ));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn update_pipe_settings(
        &self,
        request: Request<UpdatePipeSettingsRequest>,
    ) -> Result<Response<UpdatePipeSettingsResponse>, Status> {
        let update = request.get_ref().settings.unwrap_or_default();
        let name = request.get_ref().name.clone();
        // Validate against the defaults first, so a bad value is refused even on a follower.
        spec::apply_settings_update(&Default::default(), &update).map_err(|e| invalid_spec(&e))?;
        let fence = route!(self, request, update_pipe_settings);
        for _ in 0..CAS_ATTEMPTS {
            let mut record = self.existing(&name).await?;
            if record.status.state() == PipeState::Deleting {
                return Err(Status::failed_precondition(format!(
                    "pipe {name} is being deleted"
                )));
            }
            let current = record.spec.settings.unwrap_or_default();
            let merged =
                spec::apply_settings_update(&current, &update).map_err(|e| invalid_spec(&e))?;
            record.spec.settings = Some(merged);
            match self
                .store()
                .put_pipe_spec(&fence, record.spec_revision, &record.spec)
                .await
            {
                Ok(revision) => {
                    record.spec_revision = revision;
                    info!(pipe = %name, "pipe settings updated");
                    return Ok(Response::new(UpdatePipeSettingsResponse {
                        pipe: Some(to_proto(&record)),
                    }));
                }
                Err(StoreError::Conflict { .. }) => continue,
                Err(other) => return Err(self.write_error(other)),
            }
        }
        Err(Status::aborted(format!(
            "pipe {name} kept changing during the update; retry"
        )))
    }

    async fn pause_pipe(
        &self,
        request: Request<PausePipeRequest>,
    ) -> Result<Response<PausePipeResponse>, Status> {
        let name = request.get_ref().name.clone();
        check_pipe_name(&name).map_err(|e| Status::invalid_argument(format!("name: {e}")))?;
        let fence = route!(self, request, pause_pipe);
        // Pausing: the CDC worker flushes and checkpoints its batch, then the pipe is Paused.
        let record = self
            .apply_event(
                &fence,
                &name,
                |_| PipeEvent::PauseRequested,
                "PausePipe requested",
                &[PipeState::Paused],
            )
            .await?;
        Ok(Response::new(PausePipeResponse {
            pipe: Some(to_proto(&record)),
        }))
    }

    async fn resume_pipe(
        &self,
        request: Request<ResumePipeRequest>,
    ) -> Result<Response<ResumePipeResponse>, Status> {
        let name = request.get_ref().name.clone();
        check_pipe_name(&name).map_err(|e| Status::invalid_argument(format!("name: {e}")))?;
        let fence = route!(self, request, resume_pipe);
        let record = self
            .apply_event(
                &fence,
                &name,
                |record| PipeEvent::ResumeRequested {
                    to_snapshot: record.status.paused_from() == PipeState::Snapshot,
                },
                "ResumePipe requested",
                &[PipeState::Running],
            )
            .await?;
        Ok(Response::new(ResumePipeResponse {
            pipe: Some(to_proto(&record)),
        }))
    }

    async fn resync_pipe(
        &self,
        request: Request<ResyncPipeRequest>,
    ) -> Result<Response<ResyncPipeResponse>, Status> {
        let record = self.existing(&request.get_ref().name).await?;
        let tables = reloads::resync_tables(&record, &request.get_ref().tables)?;
        let fence = route!(self, request, resync_pipe);
        let record = self
            .start_reload(&fence, &record.spec.name, reloads::Request::Resync(tables))
            .await?;
        Ok(Response::new(ResyncPipeResponse {
            pipe: Some(to_proto(&record)),
        }))
    }

    async fn add_tables(
        &self,
        request: Request<AddTablesRequest>,
    ) -> Result<Response<AddTablesResponse>, Status> {
        let record = self.existing(&request.get_ref().name).await?;
        let added =
            spec::normalize_added_tables(request.get_ref().tables.clone(), &record.spec.tables)
                .map_err(|e| invalid_spec(&e))?;
        let fence = route!(self, request, add_tables);
        let record = self
            .start_reload(&fence, &record.spec.name, reloads::Request::Add(added))
            .await?;
        Ok(Response::new(AddTablesResponse {
            pipe: Some(to_proto(&record)),
        }))
    }

    async fn remove_tables(
        &self,
        request: Request<RemoveTablesRequest>,
    ) -> Result<Response<RemoveTablesResponse>, Status> {
        let record = self.existing(&request.get_ref().name).await?;
        let removed = reloads::removed_tables(&record, &request.get_ref().source_tables)?;
        let drop = request.get_ref().drop_destination_tables;
        let fence = route!(self, request, remove_tables);
        let record = self
            .start_reload(
                &fence,
                &record.spec.name,
                reloads::Request::Remove {
                    tables: removed,
                    drop,
                },
            )
            .await?;
        Ok(Response::new(RemoveTablesResponse {
            pipe: Some(to_proto(&record)),
        }))
    }

    type VerifyPipeStream = ReceiverStream<Result<VerifyPipeResponse, Status>>;

    /// Read-only, so served here whether or not this replica leads (see [`crate::verify`]).
    async fn verify_pipe(
        &self,
        request: Request<VerifyPipeRequest>,
    ) -> Result<Response<Self::VerifyPipeStream>, Status> {
        let request = request.into_inner();
        let record = self.existing(&request.name).await?;
        let plan = crate::verify::plan(self.store(), record, &request).await?;
        let (tx, rx) = mpsc::channel(16);
        let (store, key) = (self.store().clone(), self.inner.secret_key.clone());
        tokio::spawn(crate::verify::run(store, key, plan, tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn delete_pipe(
        &self,
        request: Request<DeletePipeRequest>,
    ) -> Result<Response<DeletePipeResponse>, Status> {
        check_pipe_name(&request.get_ref().name)
            .map_err(|e| Status::invalid_argument(format!("name: {e}")))?;
        let fence = route!(self, request, delete_pipe);
        let response = self.delete(&fence, request.into_inner()).await?;
        Ok(Response::new(response))
    }
}

impl PipeApi {
    /// Applies a user's `event` to the pipe (compare-and-swap, retried on a concurrent
    /// change). A pipe already in `settled` state is returned as it is (requests are
    /// idempotent); an event the state does not allow is FAILED_PRECONDITION.
    async fn apply_event(
        &self,
        fence: &ferry_store::Fence,
        name: &str,
        event: impl Fn(&PipeRecord) -> PipeEvent,
        reason: &str,
        settled: &[PipeState],
    ) -> Result<PipeRecord, Status> {
        for _ in 0..CAS_ATTEMPTS {
            let mut record = self.existing(name).await?;
            if settled.contains(&record.status.state()) {
                return Ok(record);
            }
            let status = lifecycle::apply(
                &record.status,
                record.spec.mode(),
                event(&record),
                reason,
                None,
                SystemTime::now(),
            )
            .map_err(|e| illegal(name, &e))?;
            match self
                .store()
                .put_pipe_status(fence, name, record.status_revision, &status)
                .await
            {
                Ok(revision) => {
                    record.status = status;
                    record.status_revision = revision;
                    info!(pipe = %name, reason, "pipe state changed by request");
                    return Ok(record);
                }
                Err(StoreError::Conflict { .. }) => continue,
                Err(other) => return Err(self.write_error(other)),
            }
        }
        warn!(pipe = %name, "request kept conflicting");
        Err(Status::aborted(format!(
            "pipe {name} kept changing during the request; retry"
        )))
    }
}
