//! Ferry's three services as real processes against a real etcd: health and reflection,
//! worker leases, coordinator election and failover, CreatePipe validation, the lifecycle up to
//! Setup, and a coordinator crash that loses nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::stack::wait_states;
use ferry_proto::v1::pipe_service_client::PipeServiceClient;
use ferry_proto::v1::*;
use ferry_store::{Store, election};
use ferry_testkit::etcd::Etcd;
use ferry_testkit::ferry::{Ferry, Service};
use ferry_testkit::wait;
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;

const TTL: u64 = 3;

/// A change that makes a valid spec invalid.
type Mutation = Box<dyn Fn(&mut PipeSpec)>;
const READY: Duration = Duration::from_secs(20);

/// A valid spec whose source and destination no server answers: these scenarios run Ferry's
/// services on etcd alone, so `ferry_testkit::spec::pipe` (which takes started servers) does
/// not fit, and Setup fails such a pipe on purpose.
fn spec(name: &str) -> PipeSpec {
    PipeSpec {
        name: name.into(),
        source: Some(PostgresSource {
            host: "127.0.0.1".into(),
            database: "shop".into(),
            user: "ferry".into(),
            ..Default::default()
        }),
        destination: Some(ClickHouseDestination {
            url: "http://127.0.0.1:8123".into(),
            ..Default::default()
        }),
        tables: vec![TableMapping {
            source_table: "orders".into(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn create(spec: PipeSpec) -> CreatePipeRequest {
    CreatePipeRequest {
        spec: Some(spec),
        secrets: Some(PipeSecrets {
            source_password: "s3cret-source-pw".into(),
            destination_password: "s3cret-dest-pw".into(),
        }),
    }
}

async fn state_of(client: &mut PipeServiceClient<Channel>, name: &str) -> Option<PipeState> {
    let pipe = client
        .get_pipe(GetPipeRequest { name: name.into() })
        .await
        .ok()?
        .into_inner()
        .pipe?;
    Some(pipe.status?.state())
}

/// Waits until the leader moved the pipe out of Provisioning into Setup (these pipes point at
/// no real source, so Setup goes on to fail them; either way the leader acted).
async fn wait_past_provisioning(client: &PipeServiceClient<Channel>, name: &str) {
    wait_states(client, name, &[PipeState::Setup, PipeState::Failed], READY).await;
}

async fn all_values(store: &Store) -> Vec<(String, Vec<u8>)> {
    let response = store
        .client()
        .get("/ferry/", Some(etcd_options_prefix()))
        .await
        .unwrap();
    response
        .kvs()
        .iter()
        .map(|kv| {
            (
                String::from_utf8_lossy(kv.key()).into_owned(),
                kv.value().to_vec(),
            )
        })
        .collect()
}

fn etcd_options_prefix() -> ferry_store::etcd_client::GetOptions {
    ferry_store::etcd_client::GetOptions::new().with_prefix()
}

async fn channel(service: &Service) -> Channel {
    tonic::transport::Endpoint::new(service.url())
        .unwrap()
        .connect()
        .await
        .unwrap()
}

async fn start_coordinator(ferry: &Ferry, id: &str) -> Service {
    let coordinator = ferry.coordinator(id).unwrap();
    coordinator.wait_serving(READY).await.unwrap();
    coordinator
}

#[tokio::test]
async fn health_and_reflection_v1_and_v1alpha_on_every_service() {
    use tokio_stream::StreamExt as _;
    let etcd = Etcd::start().await.unwrap();
    let ferry = Ferry::new(etcd.endpoints(), TTL).unwrap();
    let coordinator = start_coordinator(&ferry, "c1").await;
    let snapshot = ferry.worker(WorkerKind::Snapshot, "s1").unwrap();
    let cdc = ferry.worker(WorkerKind::Cdc, "d1").unwrap();
    for (service, name) in [
        (&coordinator, "ferry.v1.PipeService"),
        (&snapshot, "ferry.v1.WorkerService"),
        (&cdc, "ferry.v1.WorkerService"),
    ] {
        service.wait_serving(READY).await.unwrap();
        assert_eq!(service.health(name).await, Some(ServingStatus::Serving));
        // v1
        let mut v1 =
            tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient::new(
                channel(service).await,
            );
        let request = tonic_reflection::pb::v1::ServerReflectionRequest {
            message_request: Some(
                tonic_reflection::pb::v1::server_reflection_request::MessageRequest::ListServices(
                    String::new(),
                ),
            ),
            ..Default::default()
        };
        let mut stream = v1
            .server_reflection_info(tokio_stream::once(request))
            .await
            .unwrap()
            .into_inner();
        let response = stream.next().await.unwrap().unwrap();
        let Some(tonic_reflection::pb::v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
            response.message_response
        else {
            panic!("unexpected reflection answer");
        };
        let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
        assert!(names.iter().any(|n| n == name), "{names:?}");
        assert!(
            names.iter().any(|n| n == "grpc.health.v1.Health"),
            "{names:?}"
        );
        // v1alpha (grpcurl 1.8.6 speaks only this)
        let mut alpha =
            tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient::new(
                channel(service).await,
            );
        let request = tonic_reflection::pb::v1alpha::ServerReflectionRequest {
            message_request: Some(
                tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest::FileContainingSymbol(
                    name.into(),
                ),
            ),
            ..Default::default()
        };
        let mut stream = alpha
            .server_reflection_info(tokio_stream::once(request))
            .await
            .unwrap()
            .into_inner();
        let response = stream.next().await.unwrap().unwrap();
        assert!(matches!(
            response.message_response,
            Some(tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse::FileDescriptorResponse(_))
        ));
    }
}

#[tokio::test]
async fn a_killed_workers_registration_disappears_within_its_ttl() {
    let etcd = Etcd::start().await.unwrap();
    let ferry = Ferry::new(etcd.endpoints(), TTL).unwrap();
    let store = ferry.store().await.unwrap();
    let mut worker = ferry.worker(WorkerKind::Cdc, "w-kill").unwrap();
    worker.wait_serving(READY).await.unwrap();
    assert!(
        store
            .worker_registered(WorkerKind::Cdc, "w-kill")
            .await
            .unwrap()
    );

    worker.process().kill9();
    let killed = Instant::now();
    let gone = wait::until(Duration::from_secs(TTL * 3), || async {
        (!store
            .worker_registered(WorkerKind::Cdc, "w-kill")
            .await
            .unwrap())
        .then_some(())
    })
    .await;
    assert!(gone.is_some(), "registration outlived the worker");
    // etcd checks expiry about every 500 ms; allow that on top of the TTL.
    assert!(
        killed.elapsed() <= Duration::from_secs(TTL) + Duration::from_millis(1500),
        "registration lasted {:?} after kill -9",
        killed.elapsed()
    );

    // A clean shutdown revokes the lease: the registration goes at once.
    let mut worker = ferry.worker(WorkerKind::Snapshot, "w-term").unwrap();
    worker.wait_serving(READY).await.unwrap();
    assert!(
        worker.process().terminate(Duration::from_secs(10)).await,
        "unclean exit"
    );
    assert!(
        !store
            .worker_registered(WorkerKind::Snapshot, "w-term")
            .await
            .unwrap()
    );
}

#[tokio::test]
async fn one_coordinator_leads_and_a_follower_takes_over_when_it_is_killed() {
    let etcd = Etcd::start().await.unwrap();
    let ferry = Ferry::new(etcd.endpoints(), TTL).unwrap();
    let store = ferry.store().await.unwrap();
    let mut a = start_coordinator(&ferry, "coord-a").await;
    let b = start_coordinator(&ferry, "coord-b").await;
    let leader = election::current_leader(&store).await.unwrap().unwrap();
    assert_eq!(
        leader.coordinator_id, "coord-a",
        "the first candidate leads"
    );

    // Both replicas answer writes: the follower forwards to the leader.
    let mut via_follower = b.pipe_client().await.unwrap();
    via_follower
        .create_pipe(create(spec("via_follower")))
        .await
        .unwrap();
    let mut via_leader = a.pipe_client().await.unwrap();
    assert_eq!(
        state_of(&mut via_leader, "via_follower").await,
        Some(PipeState::Provisioning)
    );

    // Kill the leader: b leads within the TTL plus an election round.
    a.process().kill9();
    let killed = Instant::now();
    let took_over = wait::until(Duration::from_secs(TTL * 4), || async {
        let leader = election::current_leader(&store).await.ok().flatten()?;
        (leader.coordinator_id == "coord-b").then_some(())
    })
    .await;
    assert!(took_over.is_some(), "coord-b never took over");
    let failover = killed.elapsed();
    assert!(
        failover <= Duration::from_secs(TTL + 2),
        "failover took {failover:?}"
    );

    // And it acts: a new pipe is accepted and provisioned once workers exist.
    let client = b.pipe_client().await.unwrap();
    let created = wait::until(READY, || {
        let mut client = client.clone();
        async move {
            client
                .create_pipe(create(spec("after_failover")))
                .await
                .ok()
        }
    })
    .await;
    assert!(created.is_some());
    let _cdc = ferry.worker(WorkerKind::Cdc, "d1").unwrap();
    let _snap = ferry.worker(WorkerKind::Snapshot, "s1").unwrap();
    wait_past_provisioning(&client, "after_failover").await;
    wait_past_provisioning(&client, "via_follower").await;
}

#[tokio::test]
async fn invalid_create_requests_are_refused_naming_the_field_and_write_nothing() {
    let etcd = Etcd::start().await.unwrap();
    let ferry = Ferry::new(etcd.endpoints(), TTL).unwrap();
    let store = ferry.store().await.unwrap();
    let coordinator = start_coordinator(&ferry, "c1").await;
    let mut client = coordinator.pipe_client().await.unwrap();
    client.create_pipe(create(spec("taken"))).await.unwrap();
    let before = all_values(&store).await;
    let pipes_before: Vec<_> = before
        .iter()
        .filter(|(k, _)| k.starts_with("/ferry/pipes/"))
        .collect();

    let cases: Vec<(&str, Mutation, Code, &str)> = vec![
        (
            "empty name",
            Box::new(|s| s.name.clear()),
            Code::InvalidArgument,
            "spec.name",
        ),
        (
            "bad name",
            Box::new(|s| s.name = "Bad-Name".into()),
            Code::InvalidArgument,
            "spec.name",
        ),
        (
            "no source",
            Box::new(|s| s.source = None),
            Code::InvalidArgument,
            "spec.source",
        ),
        (
            "empty host",
            Box::new(|s| s.source.as_mut().unwrap().host.clear()),
            Code::InvalidArgument,
            "spec.source.host",
        ),
        (
            "url as host",
            Box::new(|s| s.source.as_mut().unwrap().host = "postgres://db".into()),
            Code::InvalidArgument,
            "spec.source.host",
        ),
        (
            "port",
            Box::new(|s| s.source.as_mut().unwrap().port = 99_999),
            Code::InvalidArgument,
            "spec.source.port",
        ),
        (
            "no database",
            Box::new(|s| s.source.as_mut().unwrap().database.clear()),
            Code::InvalidArgument,
            "spec.source.database",
        ),
        (
            "no user",
            Box::new(|s| s.source.as_mut().unwrap().user.clear()),
            Code::InvalidArgument,
            "spec.source.user",
        ),
        (
            "bad url",
            Box::new(|s| s.destination.as_mut().unwrap().url = "clickhouse:8123".into()),
            Code::InvalidArgument,
            "spec.destination.url",
        ),
        (
            "url with password",
            Box::new(|s| s.destination.as_mut().unwrap().url = "http://u:pw@ch:8123".into()),
            Code::InvalidArgument,
            "spec.destination.url",
        ),
        (
            "no tables",
            Box::new(|s| s.tables.clear()),
            Code::InvalidArgument,
            "spec.tables",
        ),
        (
            "zero batch",
            Box::new(|s| {
                s.settings = Some(PipeSettings {
                    pull_batch_size: Some(0),
                    ..Default::default()
                })
            }),
            Code::InvalidArgument,
            "spec.settings.pull_batch_size",
        ),
        (
            "negative batch",
            Box::new(|s| {
                s.settings = Some(PipeSettings {
                    pull_batch_size: Some(-5),
                    ..Default::default()
                })
            }),
            Code::InvalidArgument,
            "spec.settings.pull_batch_size",
        ),
        (
            "negative partitions",
            Box::new(|s| {
                s.settings = Some(PipeSettings {
                    snapshot_parallel_partitions: Some(-1),
                    ..Default::default()
                })
            }),
            Code::InvalidArgument,
            "spec.settings.snapshot_parallel_partitions",
        ),
        (
            "unknown mode",
            Box::new(|s| s.mode = 17),
            Code::InvalidArgument,
            "spec.mode",
        ),
        (
            "duplicate name",
            Box::new(|s| s.name = "taken".into()),
            Code::AlreadyExists,
            "spec.name",
        ),
    ];
    for (what, mutate, code, field) in cases {
        let mut bad = spec("fresh");
        mutate(&mut bad);
        let status = client.create_pipe(create(bad)).await.unwrap_err();
        assert_eq!(status.code(), code, "{what}: {}", status.message());
        assert!(
            status.message().contains(field),
            "{what}: message {:?} lacks {field}",
            status.message()
        );
    }
    let status = client
        .create_pipe(CreatePipeRequest {
            spec: None,
            secrets: None,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);

    let after = all_values(&store).await;
    let pipes_after: Vec<_> = after
        .iter()
        .filter(|(k, _)| k.starts_with("/ferry/pipes/"))
        .collect();
    assert_eq!(pipes_before, pipes_after, "a refused request wrote to etcd");

    // Other RPCs: unknown pipes and illegal transitions.
    let status = client
        .get_pipe(GetPipeRequest {
            name: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let status = client
        .pause_pipe(PausePipeRequest {
            name: "taken".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        status.code(),
        Code::FailedPrecondition,
        "{}",
        status.message()
    );
    let status = client
        .update_pipe_settings(UpdatePipeSettingsRequest {
            name: "taken".into(),
            settings: Some(PipeSettings {
                pull_batch_size: Some(0),
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("settings.pull_batch_size"));
}

#[tokio::test]
async fn a_pipe_reaches_setup_and_a_coordinator_crash_loses_nothing() {
    let etcd = Etcd::start().await.unwrap();
    let ferry = Ferry::new(etcd.endpoints(), TTL).unwrap();
    let store = ferry.store().await.unwrap();
    let mut coordinator = start_coordinator(&ferry, "c1").await;
    let mut client = coordinator.pipe_client().await.unwrap();
    let _snapshot = ferry.worker(WorkerKind::Snapshot, "s1").unwrap();

    // A snapshot+CDC pipe needs both pools: it waits in Provisioning without a CDC worker.
    let created = client
        .create_pipe(create(spec("orders")))
        .await
        .unwrap()
        .into_inner();
    let created = created.pipe.unwrap();
    assert_eq!(
        created.status.as_ref().unwrap().state(),
        PipeState::Provisioning
    );
    let mut watch = client
        .watch_pipe(WatchPipeRequest {
            name: "orders".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(
        first.pipe.unwrap().status.unwrap().state(),
        PipeState::Provisioning
    );

    // The coordinator dies before any worker can take the pipe, and comes back.
    coordinator.process().kill9();
    let coordinator = start_coordinator(&ferry, "c1-restarted").await;
    let mut client = coordinator.pipe_client().await.unwrap();
    assert_eq!(
        state_of(&mut client, "orders").await,
        Some(PipeState::Provisioning)
    );

    // A CDC worker registers: the restarted coordinator reconciles the pipe to Setup, and
    // Setup refuses it (no Postgres listens at the spec's address), naming the fix.
    let mut watch = client
        .watch_pipe(WatchPipeRequest {
            name: "orders".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut next_status = async || {
        let update = tokio::time::timeout(READY, watch.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        update.pipe.unwrap()
    };
    assert_eq!(
        next_status().await.status.unwrap().state(),
        PipeState::Provisioning
    );
    let _cdc = ferry.worker(WorkerKind::Cdc, "d1").unwrap();
    let pipe = next_status().await;
    assert_eq!(pipe.spec, created.spec, "the spec survived unchanged");
    let status = pipe.status.unwrap();
    assert_eq!(status.state(), PipeState::Setup);
    assert_eq!(status.previous_state(), PipeState::Provisioning);
    assert_eq!(status.created_at, created.status.unwrap().created_at);
    assert!(status.reason.contains("d1"), "{}", status.reason);
    let status = next_status().await.status.unwrap();
    assert_eq!(status.state(), PipeState::Failed);
    assert_eq!(status.previous_state(), PipeState::Setup);
    let error = status.error.unwrap();
    assert!(
        error.message.contains("cannot connect to Postgres"),
        "{}",
        error.message
    );
    assert!(
        error.remedy.contains("spec.source.host"),
        "{}",
        error.remedy
    );

    // The documented layout, with no secret in plaintext anywhere.
    let values = all_values(&store).await;
    let keys: Vec<&str> = values.iter().map(|(k, _)| k.as_str()).collect();
    for expected in [
        "/ferry/pipes/orders/spec",
        "/ferry/pipes/orders/status",
        "/ferry/pipes/orders/secrets",
        "/ferry/workers/snapshot/s1",
        "/ferry/workers/cdc/d1",
    ] {
        assert!(keys.contains(&expected), "{expected} missing from {keys:?}");
    }
    assert!(
        keys.iter()
            .any(|k| k.starts_with("/ferry/election/coordinator/"))
    );
    for (key, value) in &values {
        let text = String::from_utf8_lossy(value);
        assert!(!text.contains("s3cret"), "plaintext secret under {key}");
    }
    assert!(
        !ferry.all_logs().contains("s3cret"),
        "a secret reached a log"
    );

    // ListPipes filters by state; DeletePipe removes a pipe that never replicated.
    let listed = client
        .list_pipes(ListPipesRequest {
            states: vec![PipeState::Failed.into()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.pipes.len(), 1);
    client
        .delete_pipe(DeletePipeRequest {
            name: "orders".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut deleted = false;
    while let Some(update) = watch.message().await.unwrap() {
        if update.deleted {
            deleted = true;
            break;
        }
    }
    assert!(deleted, "the watch must end with the deletion");
    let gone = client
        .get_pipe(GetPipeRequest {
            name: "orders".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
    assert!(
        !all_values(&store)
            .await
            .iter()
            .any(|(k, _)| k.starts_with("/ferry/pipes/orders/"))
    );
}

#[tokio::test]
async fn sigterm_hands_leadership_over_at_once() {
    let etcd = Etcd::start().await.unwrap();
    // A long TTL: a handover faster than it can only come from resigning.
    let ferry = Ferry::new(etcd.endpoints(), 30).unwrap();
    let store = ferry.store().await.unwrap();
    let mut a = start_coordinator(&ferry, "coord-a").await;
    let _b = start_coordinator(&ferry, "coord-b").await;
    let leader = election::current_leader(&store).await.unwrap().unwrap();
    assert_eq!(leader.coordinator_id, "coord-a");
    let stopping = Instant::now();
    assert!(
        a.process().terminate(Duration::from_secs(10)).await,
        "unclean exit"
    );
    let took_over = wait::until(Duration::from_secs(10), || async {
        let leader = election::current_leader(&store).await.ok().flatten()?;
        (leader.coordinator_id == "coord-b").then_some(())
    })
    .await;
    assert!(took_over.is_some());
    assert!(
        stopping.elapsed() < Duration::from_secs(5),
        "handover took {:?}",
        stopping.elapsed()
    );
    assert!(
        !all_values(&store)
            .await
            .iter()
            .any(|(_, v)| String::from_utf8_lossy(v).contains("coord-a"))
    );
}

#[tokio::test]
async fn a_three_member_etcd_losing_one_member_keeps_ferry_working() {
    let mut etcd = Etcd::start_cluster(3).await.unwrap();
    let ferry = Ferry::new(etcd.endpoints(), TTL).unwrap();
    let coordinator = start_coordinator(&ferry, "c1").await;
    let _cdc = ferry.worker(WorkerKind::Cdc, "d1").unwrap();
    let mut client = coordinator.pipe_client().await.unwrap();
    client.create_pipe(create(spec("before"))).await.unwrap();
    wait_states(&client, "before", &[PipeState::Provisioning], READY).await;

    // Any one member may die: the quorum of two carries on, and so do leases and leadership.
    etcd.kill_member(0);
    let created = wait::until(READY, || {
        let mut client = client.clone();
        async move { client.create_pipe(create(spec("after"))).await.ok() }
    })
    .await;
    assert!(
        created.is_some(),
        "no write succeeded with two of three members"
    );
    let _snapshot = ferry.worker(WorkerKind::Snapshot, "s1").unwrap();
    wait_past_provisioning(&client, "before").await;
    wait_past_provisioning(&client, "after").await;
    // The Setup transitions above were fenced leader writes: c1 kept leading throughout.
    let store = ferry.store().await.unwrap();
    let leader = election::current_leader(&store).await.unwrap().unwrap();
    assert_eq!(leader.coordinator_id, "c1");
    assert_eq!(coordinator.health("").await, Some(ServingStatus::Serving));
}

#[tokio::test]
async fn health_is_serving_only_while_etcd_holds_the_registration() {
    let mut etcd = Etcd::start().await.unwrap();
    let ferry = Ferry::new(etcd.endpoints(), TTL).unwrap();
    let worker = ferry.worker(WorkerKind::Cdc, "w").unwrap();
    let coordinator = start_coordinator(&ferry, "c").await;
    worker.wait_serving(READY).await.unwrap();

    // etcd goes away: both report NOT_SERVING once their sessions lapse.
    etcd.kill_member(0);
    for service in [&worker, &coordinator] {
        let down = wait::until(Duration::from_secs(TTL * 3), || async {
            (service.health("").await == Some(ServingStatus::NotServing)).then_some(())
        })
        .await;
        assert!(
            down.is_some(),
            "{} kept reporting SERVING without etcd",
            service.id
        );
    }

    // It comes back: both register again and serve.
    etcd.restart_member(0).await.unwrap();
    worker.wait_serving(READY).await.unwrap();
    coordinator.wait_serving(READY).await.unwrap();

    // A process that never reached etcd never claims to serve.
    let nowhere = Ferry::new(
        vec![format!(
            "http://127.0.0.1:{}",
            ferry_testkit::free_port().unwrap()
        )],
        TTL,
    )
    .unwrap();
    let lonely = nowhere.worker(WorkerKind::Snapshot, "lonely").unwrap();
    let answered = wait::until(READY, || async { lonely.health("").await }).await;
    assert_eq!(answered, Some(ServingStatus::NotServing));
}
