//! What the public API answers to requests a pipe's state does not allow, to bad arguments and
//! to unknown pipes (DESIGN.md §2): real pipes are driven into Provisioning, Snapshot, Running,
//! Paused, Completed and Failed, then every request is checked against a table of expected
//! gRPC codes and the words the message must hold, and the pipe must be unchanged afterwards.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::stack::{Stack, WITHIN};
use ferry_proto::v1::{
    AddTablesRequest, DeletePipeRequest, GetPipeRequest, PausePipeRequest, PipeMode, PipeSettings,
    PipeSpec, PipeState, RemoveTablesRequest, ResumePipeRequest, ResyncPipeRequest, TableMapping,
    UpdatePipeSettingsRequest, VerifyPipeRequest, WatchPipeRequest,
};
use ferry_testkit::wait;
use tonic::Code;

const SOURCE: &str = "
CREATE TABLE t1 (id int PRIMARY KEY, v text);
CREATE TABLE t2 (id int PRIMARY KEY, v text);
CREATE TABLE t3 (id int PRIMARY KEY, v text);
INSERT INTO t1 SELECT g, 'one' FROM generate_series(1, 20) g;
INSERT INTO t2 SELECT g, 'two' FROM generate_series(1, 20) g;
-- No primary key and the default replica identity: Setup refuses it.
CREATE TABLE keyless (a int, b text);
-- One row per page (fillfactor 10, 500-byte rows): a thousand one-row partitions.
CREATE TABLE big (id int PRIMARY KEY, pad text) WITH (fillfactor = 10);
INSERT INTO big SELECT g, repeat('x', 500) FROM generate_series(1, 2000) g;
ANALYZE big;
";

/// A request of the public API.
#[derive(Debug, Clone)]
enum Call {
    Get,
    Pause,
    Resume,
    Resync(&'static [&'static str]),
    Add(&'static [&'static str]),
    Remove(&'static [&'static str]),
    Verify(&'static [&'static str]),
    Watch,
    Settings,
    Delete,
}

/// What a request must get.
#[derive(Debug, Clone, Copy)]
enum Answer {
    /// This code, and a message holding each of these words.
    Refused(Code, &'static [&'static str]),
    /// FAILED_PRECONDITION naming the pipe and the state it is in (`in state running`).
    Illegal(&'static str),
    /// OK, the pipe already being where the request leads (requests are idempotent).
    Settled,
    /// INVALID_ARGUMENT naming this field (for requests the pipe's state allows, so the
    /// answer is the argument's).
    Invalid(&'static str),
}

/// Sends `call` for pipe `name`; the state of the pipe it answered with, if any.
async fn send(stack: &Stack, name: &str, call: &Call) -> Result<Option<PipeState>, tonic::Status> {
    let mut client = stack.client.clone();
    let name = name.to_owned();
    let state =
        |pipe: Option<ferry_proto::v1::Pipe>| pipe.and_then(|p| p.status).map(|s| s.state());
    let tables = |t: &[&str]| t.iter().map(|t| (*t).to_owned()).collect::<Vec<_>>();
    Ok(match call {
        Call::Get => state(
            client
                .get_pipe(GetPipeRequest { name })
                .await?
                .into_inner()
                .pipe,
        ),
        Call::Pause => state(
            client
                .pause_pipe(PausePipeRequest { name })
                .await?
                .into_inner()
                .pipe,
        ),
        Call::Resume => state(
            client
                .resume_pipe(ResumePipeRequest { name })
                .await?
                .into_inner()
                .pipe,
        ),
        Call::Resync(t) => state(
            client
                .resync_pipe(ResyncPipeRequest {
                    name,
                    tables: tables(t),
                })
                .await?
                .into_inner()
                .pipe,
        ),
        Call::Add(t) => {
            let tables = t
                .iter()
                .map(|t| TableMapping {
                    source_table: (*t).into(),
                    ..Default::default()
                })
                .collect();
            state(
                client
                    .add_tables(AddTablesRequest { name, tables })
                    .await?
                    .into_inner()
                    .pipe,
            )
        }
        Call::Remove(t) => state(
            client
                .remove_tables(RemoveTablesRequest {
                    name,
                    source_tables: tables(t),
                    drop_destination_tables: false,
                })
                .await?
                .into_inner()
                .pipe,
        ),
        Call::Verify(t) => {
            // Refusals come with the call; an accepted verification is not waited for.
            client
                .verify_pipe(VerifyPipeRequest {
                    name,
                    tables: tables(t),
                    checkpoint_timeout: None,
                })
                .await?;
            None
        }
        Call::Watch => {
            client.watch_pipe(WatchPipeRequest { name }).await?;
            None
        }
        Call::Settings => state(
            client
                .update_pipe_settings(UpdatePipeSettingsRequest {
                    name,
                    settings: Some(PipeSettings {
                        pull_batch_size: Some(1000),
                        ..Default::default()
                    }),
                })
                .await?
                .into_inner()
                .pipe,
        ),
        Call::Delete => state(
            client
                .delete_pipe(DeletePipeRequest {
                    name,
                    ..Default::default()
                })
                .await?
                .into_inner()
                .pipe,
        ),
    })
}

/// `stack.spec_into` with the pipe's own ClickHouse database (named after it).
fn spec(stack: &Stack, name: &str, tables: &[&str], mode: PipeMode) -> PipeSpec {
    stack.spec_into(name, name, tables, mode)
}

#[tokio::test]
async fn illegal_requests_bad_arguments_and_unknown_pipes_get_codes_naming_the_cause() {
    let mut stack = Stack::start(SOURCE).await;

    // Pipes that settle by themselves.
    let running = spec(&stack, "live", &["t1", "t2"], PipeMode::CdcOnly);
    let paused = spec(&stack, "held", &["t1", "t2"], PipeMode::CdcOnly);
    let completed = spec(&stack, "done", &["t1", "t2"], PipeMode::SnapshotOnly);
    let failed = spec(
        &stack,
        "broken",
        &["keyless", "t1"],
        PipeMode::SnapshotAndCdc,
    );
    for spec in [running, paused, completed, failed] {
        stack.submit(spec).await.unwrap();
    }
    stack.wait_state("live", PipeState::Running).await;
    stack.wait_state("held", PipeState::Running).await;
    stack.wait_state("done", PipeState::Completed).await;
    let broken = stack.wait_state("broken", PipeState::Failed).await;
    let error = broken.status.unwrap().error.unwrap();
    assert!(error.message.contains("keyless"), "{error:?}");
    stack
        .client
        .clone()
        .pause_pipe(PausePipeRequest {
            name: "held".into(),
        })
        .await
        .unwrap();
    stack.wait_state("held", PipeState::Paused).await;

    // A pipe held in Snapshot: its snapshot worker stops as soon as the pipe leaves
    // Provisioning, before a thousand one-row partitions can be copied one at a time.
    let mut copying = spec(&stack, "copying", &["big", "t1"], PipeMode::SnapshotAndCdc);
    copying
        .settings
        .as_mut()
        .unwrap()
        .snapshot_rows_per_partition = Some(1);
    copying
        .settings
        .as_mut()
        .unwrap()
        .snapshot_parallel_partitions = Some(1);
    stack.submit(copying).await.unwrap();
    stack
        .wait_states("copying", &[PipeState::Setup, PipeState::Snapshot], WITHIN)
        .await;
    let worker = stack.snapshot.as_mut().unwrap();
    assert!(
        worker.process().terminate(Duration::from_secs(30)).await,
        "the snapshot worker did not stop cleanly"
    );
    let snapshot = stack.wait_state("copying", PipeState::Snapshot).await;
    let tables = snapshot.status.unwrap().tables;
    assert!(
        tables
            .iter()
            .any(|t| t.partitions_done < t.partitions_total),
        "the snapshot finished before its worker stopped: {tables:?}"
    );

    // A pipe held in Provisioning: no snapshot worker is registered any more (a clean stop
    // revokes the worker's lease at once).
    let waiting = spec(&stack, "waiting", &["t1", "t2"], PipeMode::SnapshotAndCdc);
    stack.submit(waiting).await.unwrap();
    assert_eq!(
        stack.status("waiting").await.unwrap().state(),
        PipeState::Provisioning
    );

    use Answer::{Illegal, Invalid, Refused, Settled};
    use Call::{Add, Delete, Get, Pause, Remove, Resume, Resync, Settings, Verify, Watch};
    let not_found = Refused(Code::NotFound, &["pipe ghost does not exist"]);
    let cases: Vec<(&str, Call, Answer)> = vec![
        // Provisioning: nothing but delete (and settings) applies.
        ("waiting", Pause, Illegal("provisioning")),
        ("waiting", Resume, Illegal("provisioning")),
        ("waiting", Resync(&[]), Illegal("provisioning")),
        ("waiting", Add(&["t3"]), Illegal("provisioning")),
        ("waiting", Remove(&["public.t2"]), Illegal("provisioning")),
        (
            "waiting",
            Verify(&[]),
            Refused(Code::FailedPrecondition, &["pipe waiting is provisioning"]),
        ),
        // Snapshot (pausing it is allowed: the copy stops after its partitions).
        ("copying", Resume, Illegal("snapshot")),
        ("copying", Resync(&[]), Illegal("snapshot")),
        ("copying", Resync(&["public.big"]), Illegal("snapshot")),
        ("copying", Add(&["t3"]), Illegal("snapshot")),
        ("copying", Remove(&["public.t1"]), Illegal("snapshot")),
        (
            "copying",
            Verify(&[]),
            Refused(Code::FailedPrecondition, &["pipe copying is snapshot"]),
        ),
        // Running: resume is already done; bad arguments are named.
        ("live", Resume, Settled),
        ("live", Resync(&["public.nope"]), Invalid("tables[0]")),
        (
            "live",
            Resync(&["public.t1", "public.nope"]),
            Invalid("tables[1]"),
        ),
        (
            "live",
            Add(&[]),
            Refused(
                Code::InvalidArgument,
                &["tables: must list at least one table"],
            ),
        ),
        (
            "live",
            Add(&["t1"]),
            Refused(
                Code::InvalidArgument,
                &["tables[0].source_table", "public.t1 is listed twice"],
            ),
        ),
        (
            "live",
            Remove(&[]),
            Refused(Code::InvalidArgument, &["source_tables: must list"]),
        ),
        (
            "live",
            Remove(&["public.nope"]),
            Refused(Code::InvalidArgument, &["source_tables[0]", "public.nope"]),
        ),
        (
            "live",
            Remove(&["public.t1", "t2"]),
            Refused(Code::InvalidArgument, &["source_tables[1]", "schema.table"]),
        ),
        (
            "live",
            Remove(&["public.t1", "public.t2"]),
            Refused(
                Code::FailedPrecondition,
                &["pipe live would have no tables left", "delete the pipe"],
            ),
        ),
        (
            "live",
            Verify(&["public.nope"]),
            Refused(Code::InvalidArgument, &["tables[0]", "public.nope"]),
        ),
        // Paused: pausing again is already done; verifying waits for a running pipe.
        ("held", Pause, Settled),
        (
            "held",
            Verify(&[]),
            Refused(Code::FailedPrecondition, &["pipe held is paused"]),
        ),
        // Completed (snapshot-only): no stream to pause, resume or change the tables of.
        ("done", Pause, Illegal("completed")),
        ("done", Resume, Illegal("completed")),
        ("done", Add(&["t3"]), Illegal("completed")),
        ("done", Remove(&["public.t2"]), Illegal("completed")),
        // Failed: only resync and delete apply.
        ("broken", Pause, Illegal("failed")),
        ("broken", Resume, Illegal("failed")),
        ("broken", Add(&["t3"]), Illegal("failed")),
        ("broken", Remove(&["public.t1"]), Illegal("failed")),
        (
            "broken",
            Verify(&[]),
            Refused(Code::FailedPrecondition, &["pipe broken is failed"]),
        ),
        // Unknown pipes, and names no pipe can have.
        ("ghost", Get, not_found),
        ("ghost", Pause, not_found),
        ("ghost", Resume, not_found),
        ("ghost", Resync(&[]), not_found),
        ("ghost", Add(&["t3"]), not_found),
        ("ghost", Remove(&["public.t1"]), not_found),
        ("ghost", Verify(&[]), not_found),
        ("ghost", Watch, not_found),
        ("ghost", Settings, not_found),
        ("ghost", Delete, not_found),
        ("Bad-Name", Get, Refused(Code::InvalidArgument, &["name"])),
        ("Bad-Name", Pause, Refused(Code::InvalidArgument, &["name"])),
        (
            "Bad-Name",
            Resume,
            Refused(Code::InvalidArgument, &["name"]),
        ),
        (
            "Bad-Name",
            Delete,
            Refused(Code::InvalidArgument, &["name"]),
        ),
    ];

    let mut failures = Vec::new();
    for (pipe, call, answer) in &cases {
        let before = stack.status(pipe).await.map(|s| s.state());
        let got = send(&stack, pipe, call).await;
        let what = format!("{call:?} on {pipe} ({before:?})");
        let problem = match (answer, &got) {
            (Settled, Ok(state)) if *state == before => None,
            (Settled, _) => Some(format!("expected OK in {before:?}, got {got:?}")),
            (Illegal(state), Err(status)) => {
                let words = [format!("pipe {pipe}"), format!("in state {state}")];
                judge(status, Code::FailedPrecondition, &words)
            }
            (Invalid(field), Err(status)) => {
                judge(status, Code::InvalidArgument, &[format!("{field}:")])
            }
            (Refused(code, words), Err(status)) => {
                let words: Vec<String> = words.iter().map(|w| (*w).to_owned()).collect();
                judge(status, *code, &words)
            }
            (_, Ok(_)) => Some(format!("expected {answer:?}, got OK")),
        };
        if let Some(problem) = problem {
            failures.push(format!("{what}: {problem}"));
        }
        // Nothing changed: a refused (or settled) request leaves the pipe where it was.
        let after = stack.status(pipe).await.map(|s| s.state());
        if after != before {
            failures.push(format!("{what}: the pipe moved to {after:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} requests were answered wrongly:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );

    // The held pipes are still where the test put them (no worker came back).
    assert_eq!(
        stack.status("waiting").await.unwrap().state(),
        PipeState::Provisioning
    );
    assert_eq!(
        stack.status("copying").await.unwrap().state(),
        PipeState::Snapshot
    );

    // A legal request still works after all that: resume the paused pipe.
    stack
        .client
        .clone()
        .resume_pipe(ResumePipeRequest {
            name: "held".into(),
        })
        .await
        .unwrap();
    stack.wait_state("held", PipeState::Running).await;

    // Delete is legal in every state but Deleting; the pipe without resources goes at once.
    send(&stack, "waiting", &Delete).await.unwrap();
    let gone = wait::until(WITHIN, || async {
        let got = send(&stack, "waiting", &Get).await;
        matches!(got, Err(ref s) if s.code() == Code::NotFound).then_some(())
    })
    .await;
    assert!(gone.is_some(), "{}", stack.diagnose("waiting").await);
}

/// Why `status` is not `code` with every one of `words` in its message, if it is not.
fn judge(status: &tonic::Status, code: Code, words: &[String]) -> Option<String> {
    let missing: Vec<&String> = words
        .iter()
        .filter(|w| !status.message().contains(w.as_str()))
        .collect();
    (status.code() != code || !missing.is_empty()).then(|| {
        format!(
            "expected {code:?} with {words:?}, got {:?}: {:?}",
            status.code(),
            status.message()
        )
    })
}
