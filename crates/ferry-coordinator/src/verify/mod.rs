//! `VerifyPipe`: compares each table of a pipe between a Postgres snapshot and ClickHouse up to
//! the checkpoint that covers it, value by value.
//!
//! Expected bytes come from Ferry's own transcoder (binary COPY → RowBinary), so the clamps it
//! applies (±infinity dates, NaN numerics, NULL arrays) are the same on both sides and are not
//! differences. A running pipe is compared at the WAL position L read just after the
//! snapshot was taken, once its checkpoint has reached L; ClickHouse is read up to the
//! versions of transactions committed at or before L. A transaction committing just before L
//! can still be invisible to the snapshot, so differences are checked once more at a fresh
//! snapshot and only those that persist are reported. The comparison itself lives in the
//! libraries (`ferry_clickhouse::{compare, state, rowbinary}`, `ferry_postgres::consistent`).

mod table;

use std::time::{Duration, Instant};

use ferry_clickhouse::compare::Tally;
use ferry_clickhouse::sink::{Sink, SinkError};
use ferry_clickhouse::state::ReadError;
use ferry_clickhouse::transcode::TranscodeError;
use ferry_clickhouse::types::MappingOptions;
use ferry_core::PipeState;
use ferry_core::lifecycle::state_name;
use ferry_core::secret::{SecretError, SecretKey};
use ferry_core::spec::source_table_name;
use ferry_postgres::SourceError;
use ferry_postgres::consistent::ConsistentSnapshot;
use ferry_postgres::copy::CopyError;
use ferry_proto::v1::{
    PostgresSource, TableSchema, TableVerification, VerifyPipeRequest, VerifyPipeResponse,
    VerifyProgress, VerifyStage, VerifySummary, verify_pipe_response::Event,
};
use ferry_server::telemetry::error_chain;
use ferry_store::{PipeRecord, Store, StoreError};
use tokio::sync::mpsc;
use tonic::Status;
use tracing::{info, warn};

use crate::errors::store_status;

/// How long a running pipe's checkpoint may take to reach the snapshot, unless the request says.
const DEFAULT_CHECKPOINT_TIMEOUT: Duration = Duration::from_secs(60);
/// How often the checkpoint is read while waiting for it.
const CHECKPOINT_POLL: Duration = Duration::from_millis(200);

/// Where responses go.
pub(crate) type Responses = mpsc::Sender<Result<VerifyPipeResponse, Status>>;

/// Why a verification stopped.
#[derive(Debug, thiserror::Error)]
pub(crate) enum VerifyError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error("COPY failed")]
    Copy(#[source] tokio_postgres::Error),
    #[error(transparent)]
    Decode(#[from] CopyError),
    #[error(transparent)]
    Transcode(#[from] TranscodeError),
    #[error(transparent)]
    RowBinary(#[from] ferry_clickhouse::rowbinary::RowBinaryError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the pipe's secrets cannot be opened")]
    Secret(#[source] SecretError),
    #[error(
        "the checkpoint of pipe {pipe} is at LSN {at:#x}, still short of the snapshot's {want:#x} \
         after {secs} s; check that a CDC worker streams the pipe (ferry get {pipe})"
    )]
    CheckpointTimeout {
        pipe: String,
        at: u64,
        want: u64,
        secs: u64,
    },
    #[error("the client went away")]
    Gone,
}

impl VerifyError {
    fn status(self) -> Status {
        match self {
            Self::Store(e) => store_status(e),
            Self::CheckpointTimeout { .. } => Status::deadline_exceeded(self.to_string()),
            Self::Source(ref e) => {
                Status::failed_precondition(format!("{}; {}", error_chain(&self), e.remedy()))
            }
            Self::Sink(ref e) => {
                Status::failed_precondition(format!("{}; {}", error_chain(&self), e.remedy()))
            }
            Self::Gone => Status::cancelled(self.to_string()),
            other => Status::internal(error_chain(&other)),
        }
    }
}

/// One table to verify.
#[derive(Debug, Clone)]
pub(crate) struct TablePlan {
    /// schema.table.
    pub(crate) source_table: String,
    /// The ClickHouse table (in the pipe's destination database).
    pub(crate) destination_table: String,
    /// The source schema Setup recorded (kept current by the CDC worker).
    pub(crate) schema: TableSchema,
    /// How the pipe maps and writes values (its settings, the destination's probed range),
    /// so Postgres rows transcode exactly as the workers wrote them.
    pub(crate) options: MappingOptions,
}

/// A verification, checked and ready to run.
#[derive(Debug)]
pub(crate) struct Plan {
    record: PipeRecord,
    tables: Vec<TablePlan>,
    /// Running: compare up to the checkpoint; otherwise (Completed) everything.
    running: bool,
    timeout: Duration,
}

/// Checks the request against the pipe: its state allows verifying, every named table is
/// replicated by it and has a recorded schema.
pub(crate) async fn plan(
    store: &Store,
    record: PipeRecord,
    request: &VerifyPipeRequest,
) -> Result<Plan, Status> {
    let name = &record.spec.name;
    let running = match record.status.state() {
        PipeState::Running => true,
        PipeState::Completed => false,
        other => {
            return Err(Status::failed_precondition(format!(
                "pipe {name} is {}; verify a running or completed pipe",
                state_name(other)
            )));
        }
    };
    let present: Vec<String> = record.spec.tables.iter().map(source_table_name).collect();
    for (i, table) in request.tables.iter().enumerate() {
        if !present.contains(table) {
            return Err(Status::invalid_argument(format!(
                "tables[{i}]: {table} is not replicated by pipe {name} (tables are named schema.table)"
            )));
        }
    }
    let states = store.table_states(name).await.map_err(store_status)?;
    let limits = store.destination_limits(name).await.map_err(store_status)?;
    let options =
        MappingOptions::for_pipe(&record.spec.settings.unwrap_or_default(), limits.as_ref());
    let mut tables = Vec::new();
    for mapping in &record.spec.tables {
        let source_table = source_table_name(mapping);
        if !request.tables.is_empty() && !request.tables.contains(&source_table) {
            continue;
        }
        let mut schema = states
            .iter()
            .find(|(t, _)| *t == source_table)
            .and_then(|(_, state)| state.schema.clone())
            .ok_or_else(|| {
                Status::failed_precondition(format!(
                    "pipe {name} has no recorded schema for {source_table}"
                ))
            })?;
        // The table as it is now: under its current name (the stream records renames) and
        // without the columns dropped at the source, which ClickHouse keeps.
        schema.columns.retain(|c| !c.dropped);
        tables.push(TablePlan {
            source_table,
            destination_table: mapping.destination_table.clone(),
            schema,
            options,
        });
    }
    let timeout = request
        .checkpoint_timeout
        .and_then(|d| Duration::try_from(d).ok())
        .filter(|d| !d.is_zero())
        .unwrap_or(DEFAULT_CHECKPOINT_TIMEOUT);
    Ok(Plan {
        record,
        tables,
        running,
        timeout,
    })
}

/// Runs `plan`, streaming progress and results into `tx`; a failure ends the stream with its
/// status.
pub(crate) async fn run(store: Store, key: SecretKey, plan: Plan, tx: Responses) {
    let name = plan.record.spec.name.clone();
    match verify(&store, &key, plan, &tx).await {
        Ok(()) => {}
        Err(VerifyError::Gone) => info!(pipe = %name, "verification abandoned by the client"),
        Err(error) => {
            warn!(pipe = %name, error = %error_chain(&error), "verification failed");
            let _ = tx.send(Err(error.status())).await;
        }
    }
}

/// What every table's comparison needs.
pub(crate) struct Context<'a> {
    source: PostgresSource,
    source_password: String,
    pub(crate) sink: Sink,
    store: &'a Store,
    pipe: &'a str,
    timeout: Duration,
    pub(crate) tx: &'a Responses,
}

impl std::fmt::Debug for Context<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // No password here.
        f.debug_struct("Context")
            .field("pipe", &self.pipe)
            .finish_non_exhaustive()
    }
}

impl Context<'_> {
    /// Sends a message; the client leaving ends the verification.
    pub(crate) async fn send(&self, event: Event) -> Result<(), VerifyError> {
        self.tx
            .send(Ok(VerifyPipeResponse { event: Some(event) }))
            .await
            .map_err(|_| VerifyError::Gone)
    }

    /// A Postgres snapshot and, for a running pipe, a wait until the checkpoint covers it.
    async fn consistent_point(&self, running: bool) -> Result<ConsistentSnapshot, VerifyError> {
        let snapshot = ConsistentSnapshot::open(&self.source, &self.source_password).await?;
        if !running {
            return Ok(snapshot);
        }
        let want = snapshot.lsn();
        let started = Instant::now();
        let mut announced = false;
        loop {
            let at = self.store.checkpoint(self.pipe).await?.map_or(0, |c| c.lsn);
            if at >= want {
                return Ok(snapshot);
            }
            if started.elapsed() >= self.timeout {
                return Err(VerifyError::CheckpointTimeout {
                    pipe: self.pipe.to_owned(),
                    at,
                    want,
                    secs: self.timeout.as_secs(),
                });
            }
            if !announced {
                announced = true;
                self.send(Event::Progress(VerifyProgress {
                    stage: VerifyStage::WaitingForCheckpoint.into(),
                    ..Default::default()
                }))
                .await?;
            }
            tokio::time::sleep(CHECKPOINT_POLL).await;
        }
    }
}

async fn verify(
    store: &Store,
    key: &SecretKey,
    plan: Plan,
    tx: &Responses,
) -> Result<(), VerifyError> {
    let spec = &plan.record.spec;
    let sealed = store
        .get_pipe_secrets(&spec.name)
        .await?
        .unwrap_or_default();
    let secrets = key.open(&spec.name, &sealed).map_err(VerifyError::Secret)?;
    let destination = spec.destination.clone().unwrap_or_default();
    let context = Context {
        source: spec.source.clone().unwrap_or_default(),
        source_password: secrets.source_password.clone(),
        sink: Sink::new(&destination, &secrets.destination_password),
        store,
        pipe: &spec.name,
        timeout: plan.timeout,
        tx,
    };
    let snapshot = context.consistent_point(plan.running).await?;
    let mut unequal = 0u32;
    for table in &plan.tables {
        let wide = context.sink.wide_versions(&table.destination_table).await?;
        let bound = |lsn| {
            plan.running
                .then(|| ferry_clickhouse::state::version_bound(lsn, wide))
        };
        let mut lsn = if plan.running { snapshot.lsn() } else { 0 };
        let first = table::compare(
            &context,
            &snapshot,
            bound(snapshot.lsn()),
            table,
            None,
            VerifyStage::Comparing,
        )
        .await?;
        let mut tally = first.tally;
        if !tally.is_equal() && plan.running {
            let fresh = context.consistent_point(true).await?;
            lsn = fresh.lsn();
            let again = table::compare(
                &context,
                &fresh,
                bound(fresh.lsn()),
                table,
                Some(first.differing),
                VerifyStage::Rechecking,
            )
            .await?;
            tally = again.tally;
        }
        if !tally.is_equal() {
            unequal += 1;
        }
        info!(
            pipe = %spec.name,
            table = %table.source_table,
            missing = tally.missing,
            extra = tally.extra,
            differing = tally.differing,
            "table verified"
        );
        let result = result(&destination.database, table, &tally, lsn);
        context.send(Event::Table(result)).await?;
    }
    let tables = u32::try_from(plan.tables.len()).unwrap_or(u32::MAX);
    context
        .send(Event::Summary(VerifySummary {
            tables,
            tables_with_differences: unequal,
            equal: unequal == 0,
        }))
        .await
}

fn result(database: &str, table: &TablePlan, tally: &Tally, lsn: u64) -> TableVerification {
    let show = |examples: &[(Vec<u8>, u64)]| -> Vec<String> {
        examples
            .iter()
            .map(|(bytes, copies)| table::show_example(&table.schema, bytes, *copies))
            .collect()
    };
    TableVerification {
        source_table: table.source_table.clone(),
        destination_table: format!("{database}.{}", table.destination_table),
        postgres_rows: tally.postgres_rows,
        clickhouse_rows: tally.clickhouse_rows,
        missing: tally.missing,
        extra: tally.extra,
        differing: tally.differing,
        missing_examples: show(&tally.missing_examples),
        extra_examples: show(&tally.extra_examples),
        differing_examples: show(&tally.differing_examples),
        equal: tally.is_equal(),
        keyless: table::keyless(&table.schema),
        lsn,
    }
}
