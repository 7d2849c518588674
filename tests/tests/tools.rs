//! The tools users drive Ferry with: the `ferry` CLI and grpcurl 1.8.6 (reflection v1alpha).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use ferry_proto::v1::{GetPipeRequest, PipeState, WorkerKind};
use ferry_testkit::etcd::Etcd;
use ferry_testkit::ferry::{Ferry, bin_dir};
use ferry_testkit::{repo_root, wait};

fn grpcurl() -> PathBuf {
    repo_root().join(".tools/venv/bin/grpcurl")
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

async fn run(mut command: Command) -> Output {
    tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap()
}

#[tokio::test]
async fn grpcurl_lists_checks_health_and_creates_a_pipe() {
    let etcd = Etcd::start().await.unwrap();
    let ferry = Ferry::new(etcd.endpoints(), 3).unwrap();
    let coordinator = ferry.coordinator("c1").unwrap();
    let cdc = ferry.worker(WorkerKind::Cdc, "d1").unwrap();
    let snapshot = ferry.worker(WorkerKind::Snapshot, "s1").unwrap();
    for (service, api) in [
        (&coordinator, "ferry.v1.PipeService"),
        (&cdc, "ferry.v1.WorkerService"),
        (&snapshot, "ferry.v1.WorkerService"),
    ] {
        service.wait_serving(Duration::from_secs(20)).await.unwrap();
        let mut list = Command::new(grpcurl());
        list.args(["-plaintext", &service.addr, "list"]);
        let out = run(list).await;
        assert!(out.status.success(), "{}", text(&out));
        let listed = text(&out);
        assert!(listed.contains("grpc.health.v1.Health"), "{listed}");
        assert!(listed.contains(api), "{listed}");
        let mut check = Command::new(grpcurl());
        check.args(["-plaintext", &service.addr, "grpc.health.v1.Health/Check"]);
        let out = run(check).await;
        assert!(text(&out).contains("\"SERVING\""), "{}", text(&out));
    }

    let mut create = Command::new(grpcurl());
    create.args([
        "-plaintext",
        "-d",
        r#"{"spec": {"name": "from_grpcurl",
            "source": {"host": "127.0.0.1", "database": "db", "user": "u"},
            "destination": {"url": "http://127.0.0.1:8123"},
            "tables": [{"source_table": "t"}]}}"#,
        &coordinator.addr,
        "ferry.v1.PipeService/CreatePipe",
    ]);
    let out = run(create).await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("PIPE_STATE_PROVISIONING"),
        "{}",
        text(&out)
    );

    // A bad request shows the field and the code.
    let mut bad = Command::new(grpcurl());
    bad.args([
        "-plaintext",
        "-d",
        r#"{"spec": {"name": "x", "tables": []}}"#,
        &coordinator.addr,
        "ferry.v1.PipeService/CreatePipe",
    ]);
    let out = run(bad).await;
    assert!(!out.status.success());
    assert!(text(&out).contains("InvalidArgument"), "{}", text(&out));
    assert!(text(&out).contains("spec.tables"), "{}", text(&out));

    let mut client = coordinator.pipe_client().await.unwrap();
    let setup = wait::until(Duration::from_secs(20), || {
        let mut client = client.clone();
        async move {
            let pipe = client
                .get_pipe(GetPipeRequest {
                    name: "from_grpcurl".into(),
                })
                .await
                .ok()?
                .into_inner()
                .pipe?;
            matches!(pipe.status?.state(), PipeState::Setup | PipeState::Failed).then_some(())
        }
    })
    .await;
    assert!(setup.is_some());
    let listed = client
        .list_pipes(ferry_proto::v1::ListPipesRequest::default())
        .await
        .unwrap();
    assert_eq!(listed.into_inner().pipes.len(), 1);
}

#[tokio::test]
async fn the_cli_creates_watches_lists_and_deletes_a_pipe() {
    let etcd = Etcd::start().await.unwrap();
    let ferry = Ferry::new(etcd.endpoints(), 3).unwrap();
    let coordinator = ferry.coordinator("c1").unwrap();
    coordinator
        .wait_serving(Duration::from_secs(20))
        .await
        .unwrap();
    let cli = |args: &[&str]| {
        let mut command = Command::new(bin_dir().join("ferry"));
        command
            .env("FERRY_ADDR", coordinator.url())
            .env("FERRY_SOURCE_PASSWORD", "cli-s3cret")
            .args(args);
        command
    };
    let out = run(cli(&[
        "create",
        "from_cli",
        "--table",
        "public.orders,sales.items",
        "--mode",
        "cdc-only",
        "--source-host",
        "127.0.0.1",
        "--source-database",
        "shop",
        "--source-user",
        "u",
        "--clickhouse-url",
        "http://127.0.0.1:8123",
        "--pull-batch-size",
        "5000",
    ]))
    .await;
    assert!(out.status.success(), "{}", text(&out));
    let shown = text(&out);
    assert!(shown.contains("PIPE_MODE_CDC_ONLY"), "{shown}");
    assert!(shown.contains("pull_batch_size=5000"), "{shown}");
    assert!(!shown.contains("cli-s3cret"));

    // `ferry watch` prints the move to setup (a CDC-only pipe needs only the CDC worker).
    let mut watch = cli(&["watch", "from_cli"]);
    watch.stdout(std::process::Stdio::piped());
    let mut child = watch.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (first_tx, first_rx) = tokio::sync::oneshot::channel();
    let reader = tokio::task::spawn_blocking(move || {
        use std::io::BufRead as _;
        let mut lines = std::io::BufReader::new(stdout).lines();
        let first = lines.next().unwrap().unwrap();
        let _ = first_tx.send(first.clone());
        let mut all = vec![first];
        all.extend(lines.map_while(Result::ok));
        all.join("\n")
    });
    let first = tokio::time::timeout(Duration::from_secs(20), first_rx)
        .await
        .unwrap()
        .unwrap();
    assert!(first.contains("provisioning"), "{first}");
    // Only now a CDC worker joins, and the watcher sees the pipe move on.
    let _cdc = ferry.worker(WorkerKind::Cdc, "d1").unwrap();
    let client = coordinator.pipe_client().await.unwrap();
    let setup = wait::until(Duration::from_secs(20), || {
        let mut client = client.clone();
        async move {
            let pipe = client
                .get_pipe(GetPipeRequest {
                    name: "from_cli".into(),
                })
                .await
                .ok()?
                .into_inner()
                .pipe?;
            matches!(pipe.status?.state(), PipeState::Setup | PipeState::Failed).then_some(())
        }
    })
    .await;
    assert!(setup.is_some());

    let out = run(cli(&["list", "--state", "setup", "--state", "failed"])).await;
    assert!(text(&out).contains("from_cli"), "{}", text(&out));
    let out = run(cli(&["settings", "from_cli", "--pull-batch-size", "0"])).await;
    assert!(!out.status.success());
    assert!(
        text(&out).contains("settings.pull_batch_size"),
        "{}",
        text(&out)
    );
    let out = run(cli(&["delete", "from_cli"])).await;
    assert!(out.status.success(), "{}", text(&out));

    // The watch ends by itself once the pipe is gone, having printed both states.
    let printed = tokio::time::timeout(Duration::from_secs(20), reader)
        .await
        .unwrap()
        .unwrap();
    assert!(
        tokio::task::spawn_blocking(move || child.wait().unwrap())
            .await
            .unwrap()
            .success()
    );
    assert!(printed.contains("setup"), "{printed}");
    assert!(printed.contains("deleted"), "{printed}");
    let out = run(cli(&["get", "from_cli"])).await;
    assert!(text(&out).contains("NotFound"), "{}", text(&out));
}
