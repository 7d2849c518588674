//! One harness for end-to-end scenarios: a `Stack` with real Postgres, ClickHouse, etcd and
//! Ferry's services, a spec builder, `wait_state`, and value-by-value comparison of a source
//! table with its destination view.

use std::time::Duration;

use clickhouse::Client;
use ferry_proto::v1::pipe_service_client::PipeServiceClient;
use ferry_proto::v1::{
    CreatePipeRequest, GetPipeRequest, Pipe, PipeMode, PipeSecrets, PipeSpec, PipeState,
    PipeStatus, WorkerKind,
};
use ferry_testkit::clickhouse::ClickHouse;
use ferry_testkit::etcd::Etcd;
use ferry_testkit::ferry::{Ferry, Service};
use ferry_testkit::postgres::Postgres;
use ferry_testkit::wait;
use tonic::transport::Channel;

/// How long a scenario waits for any one state.
pub const WITHIN: Duration = Duration::from_secs(90);

/// Which workers a stack starts with, by id (`None`: no worker of that kind), and how many
/// etcd members.
pub struct Workers {
    pub snapshot: Option<&'static str>,
    pub cdc: Option<&'static str>,
    pub etcd_members: usize,
}

impl Default for Workers {
    fn default() -> Self {
        Self {
            snapshot: Some("s1"),
            cdc: Some("d1"),
            etcd_members: 1,
        }
    }
}

/// `Stack::wait_states` through any coordinator's `client`, for scenarios that start only etcd
/// and Ferry's services: waits until pipe `name` is in one of `states`; panics (at the
/// caller's line) if it fails instead (unless `states` holds `Failed`) or `within` passes.
#[track_caller]
pub fn wait_states(
    client: &PipeServiceClient<Channel>,
    name: &str,
    states: &[PipeState],
    within: Duration,
) -> impl std::future::Future<Output = Pipe> + use<> {
    let caller = std::panic::Location::caller();
    let client = client.clone();
    let name = name.to_owned();
    let states = states.to_vec();
    async move {
        let pipe_of = || {
            let mut client = client.clone();
            let name = name.clone();
            async move {
                client
                    .get_pipe(GetPipeRequest { name })
                    .await
                    .ok()?
                    .into_inner()
                    .pipe
            }
        };
        let reached = wait::until(within, || async {
            let pipe = pipe_of().await?;
            let status = pipe.status.clone()?;
            if status.state() == PipeState::Failed && !states.contains(&PipeState::Failed) {
                panic!("{caller}: pipe {name} failed: {:?}", status.error);
            }
            states.contains(&status.state()).then_some(pipe)
        })
        .await;
        match reached {
            Some(pipe) => pipe,
            None => {
                let last = pipe_of().await.and_then(|pipe| pipe.status);
                panic!("{caller}: pipe {name} never reached {states:?}; last: {last:?}")
            }
        }
    }
}

/// Real servers plus one coordinator and (by default) one snapshot worker and one CDC worker.
pub struct Stack {
    pub pg: Postgres,
    pub ch: ClickHouse,
    pub etcd: Etcd,
    pub ferry: Ferry,
    pub coordinator: Service,
    pub snapshot: Option<Service>,
    pub cdc: Option<Service>,
    pub db: tokio_postgres::Client,
    pub clickhouse: Client,
    pub client: PipeServiceClient<Channel>,
}

impl Stack {
    /// Starts everything; `setup_sql` runs on the source first.
    pub async fn start(setup_sql: &str) -> Self {
        Self::start_with(setup_sql, Workers::default()).await
    }

    /// `start`, with the workers `workers` names.
    pub async fn start_with(setup_sql: &str, workers: Workers) -> Self {
        let pg = Postgres::start().await.unwrap();
        let ch = ClickHouse::start().await.unwrap();
        let etcd = Etcd::start_cluster(workers.etcd_members.max(1))
            .await
            .unwrap();
        let db = pg.client("postgres").await.unwrap();
        if !setup_sql.is_empty() {
            db.batch_execute(setup_sql).await.unwrap();
        }
        let ferry = Ferry::new(etcd.endpoints(), 3).unwrap();
        let coordinator = ferry.coordinator("c1").unwrap();
        let snapshot = workers
            .snapshot
            .map(|id| ferry.worker(WorkerKind::Snapshot, id).unwrap());
        let cdc = workers
            .cdc
            .map(|id| ferry.worker(WorkerKind::Cdc, id).unwrap());
        coordinator.wait_serving(WITHIN).await.unwrap();
        let client = coordinator.pipe_client().await.unwrap();
        let clickhouse = Client::default().with_url(ch.url());
        Self {
            pg,
            ch,
            etcd,
            ferry,
            coordinator,
            snapshot,
            cdc,
            db,
            clickhouse,
            client,
        }
    }

    /// A spec of pipe `name` copying `tables` into ClickHouse database `dest`, streaming with a
    /// one-second sync interval.
    pub fn spec(&self, name: &str, tables: &[&str], mode: PipeMode) -> PipeSpec {
        self.spec_into("dest", name, tables, mode)
    }

    /// `spec`'s pipe into ClickHouse database `database` (so that several pipes of one stack
    /// can copy the same table).
    pub fn spec_into(
        &self,
        database: &str,
        name: &str,
        tables: &[&str],
        mode: PipeMode,
    ) -> PipeSpec {
        ferry_testkit::spec::pipe(&self.pg, &self.ch, name, database, tables, mode)
    }

    /// Creates the pipe of `spec` and waits until it streams (or completes).
    pub async fn create(&self, spec: PipeSpec) -> Pipe {
        let name = spec.name.clone();
        let done = if spec.mode() == PipeMode::SnapshotOnly {
            PipeState::Completed
        } else {
            PipeState::Running
        };
        self.submit(spec).await.unwrap();
        self.wait_state(&name, done).await
    }

    /// Asks the API to create the pipe of `spec`, without waiting for any state.
    pub async fn submit(&self, spec: PipeSpec) -> Result<(), tonic::Status> {
        self.submit_with(spec, None).await
    }

    /// `submit`, with `secrets`.
    pub async fn submit_with(
        &self,
        spec: PipeSpec,
        secrets: Option<PipeSecrets>,
    ) -> Result<(), tonic::Status> {
        self.client
            .clone()
            .create_pipe(CreatePipeRequest {
                spec: Some(spec),
                secrets,
            })
            .await
            .map(drop)
    }

    /// The pipe as the API shows it.
    pub async fn pipe(&self, name: &str) -> Option<Pipe> {
        self.client
            .clone()
            .get_pipe(GetPipeRequest { name: name.into() })
            .await
            .ok()?
            .into_inner()
            .pipe
    }

    /// The pipe's status as the API shows it.
    pub async fn status(&self, name: &str) -> Option<PipeStatus> {
        self.pipe(name).await?.status
    }

    /// Waits until pipe `name` is in `state`; panics (at the caller's line) if it fails
    /// instead or the deadline passes.
    #[track_caller]
    pub fn wait_state(
        &self,
        name: &str,
        state: PipeState,
    ) -> impl std::future::Future<Output = Pipe> + '_ {
        self.wait_states(name, &[state], WITHIN)
    }

    /// `wait_state` for any of `states`, within `within`.
    #[track_caller]
    pub fn wait_states<'a>(
        &'a self,
        name: &str,
        states: &[PipeState],
        within: Duration,
    ) -> impl std::future::Future<Output = Pipe> + use<'a> {
        wait_states(&self.client, name, states, within)
    }

    /// Waits until pipe `name`'s status satisfies `check`; panics (at the caller's line) with
    /// `what` and the status if it never does within [`WITHIN`].
    #[track_caller]
    pub fn wait_status<'a>(
        &'a self,
        name: &'a str,
        what: &'a str,
        check: impl Fn(&PipeStatus) -> bool + 'a,
    ) -> impl std::future::Future<Output = PipeStatus> + 'a {
        let caller = std::panic::Location::caller();
        async move {
            let reached = wait::until(WITHIN, || async {
                let status = self.status(name).await?;
                check(&status).then_some(status)
            })
            .await;
            match reached {
                Some(status) => status,
                None => panic!(
                    "{caller}: {what} never happened: {}",
                    self.diagnose(name).await
                ),
            }
        }
    }

    /// What `ferry get <name>` prints, run as a person would against this stack.
    pub async fn ferry_get(&self, name: &str) -> String {
        let (addr, pipe) = (self.coordinator.url(), name.to_owned());
        let output = tokio::task::spawn_blocking(move || {
            std::process::Command::new(ferry_testkit::ferry::bin_dir().join("ferry"))
                .args(["--addr", &addr, "get", &pipe])
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        assert!(output.status.success(), "ferry get {name} failed");
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Rows of a Postgres query, every column selected as text, sorted.
    pub async fn pg_rows(&self, sql: &str) -> Vec<Vec<Option<String>>> {
        let mut rows: Vec<Vec<Option<String>>> = self
            .db
            .query(sql, &[])
            .await
            .unwrap()
            .iter()
            .map(|row| (0..row.len()).map(|i| row.get(i)).collect())
            .collect();
        rows.sort();
        rows
    }

    /// The one integer a Postgres query returns (a count).
    pub async fn pg_count(&self, sql: &str) -> i64 {
        self.db.query_one(sql, &[]).await.unwrap().get(0)
    }

    /// Rows of a ClickHouse query, every column selected as a Nullable(String), sorted.
    pub async fn ch_rows(&self, sql: &str) -> Option<Vec<Vec<Option<String>>>> {
        let bytes = self
            .clickhouse
            .query(&format!("{sql} FORMAT JSONCompactEachRow"))
            .fetch_bytes("JSONCompactEachRow")
            .ok()?
            .collect()
            .await
            .ok()?;
        let mut rows: Vec<Vec<Option<String>>> = String::from_utf8(bytes.to_vec())
            .ok()?
            .lines()
            .map(super::json_strings)
            .collect();
        rows.sort();
        Some(rows)
    }

    /// Waits until `clickhouse` (a query of the destination) gives the rows `postgres` does,
    /// value by value; panics with both sides if it never does.
    #[track_caller]
    pub fn converge<'a>(
        &'a self,
        postgres: &'a str,
        clickhouse: &'a str,
    ) -> impl std::future::Future<Output = ()> + 'a {
        let caller = std::panic::Location::caller();
        async move {
            let expected = self.pg_rows(postgres).await;
            let reached = wait::until(WITHIN, || async {
                (self.ch_rows(clickhouse).await? == expected).then_some(())
            })
            .await;
            if reached.is_none() {
                let got = self.ch_rows(clickhouse).await.unwrap_or_default();
                let missing: Vec<_> = expected
                    .iter()
                    .filter(|r| !got.contains(r))
                    .take(5)
                    .collect();
                let extra: Vec<_> = got
                    .iter()
                    .filter(|r| !expected.contains(r))
                    .take(5)
                    .collect();
                let logs = self.logs();
                let problems: Vec<&str> = logs
                    .lines()
                    .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                    .collect();
                panic!(
                    "{caller}: clickhouse never matched postgres: {} rows vs {}\n missing (first 5): {missing:?}\n extra (first 5): {extra:?}\n warnings: {}",
                    expected.len(),
                    got.len(),
                    problems[problems.len().saturating_sub(10)..].join("\n")
                );
            }
        }
    }

    /// Kills the CDC worker with SIGKILL and starts another one, `id`.
    pub fn replace_cdc(&mut self, id: &str) {
        if let Some(cdc) = self.cdc.as_mut() {
            cdc.process().kill9();
        }
        self.cdc = Some(self.ferry.worker(WorkerKind::Cdc, id).unwrap());
    }

    /// Starts one more worker of `kind`, `id`, and waits until it serves.
    pub async fn worker(&self, kind: WorkerKind, id: &str) -> Service {
        let worker = self.ferry.worker(kind, id).unwrap();
        worker.wait_serving(WITHIN).await.unwrap();
        worker
    }

    /// What went wrong, for a panic message: the pipe's status and the services' last
    /// warnings and errors.
    pub async fn diagnose(&self, name: &str) -> String {
        let status = self.status(name).await;
        let logs = self.logs();
        let problems: Vec<&str> = logs
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .collect();
        format!(
            "status: {status:?}\nwarnings:\n{}",
            problems[problems.len().saturating_sub(15)..].join("\n")
        )
    }

    /// Every etcd key that belongs to pipe `name`: its records (`pipes/<name>/…`) and the
    /// claims on its work (`owners/…/<name>…`).
    pub async fn etcd_keys_of(&self, name: &str) -> Vec<String> {
        let store = self.ferry.store().await.unwrap();
        let all = store
            .client()
            .get(
                format!("{}/", store.keys().prefix()),
                Some(
                    ferry_store::etcd_client::GetOptions::new()
                        .with_prefix()
                        .with_keys_only(),
                ),
            )
            .await
            .unwrap();
        all.kvs()
            .iter()
            .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
            .filter(|key| key.contains(&format!("/{name}/")) || key.ends_with(&format!("/{name}")))
            .collect()
    }

    /// The log of every service so far.
    pub fn logs(&self) -> String {
        self.ferry.all_logs()
    }
}
