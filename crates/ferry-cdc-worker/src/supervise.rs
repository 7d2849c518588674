//! Keeps one claimed stream going: runs it, and when it stops on an error decides by the error
//! policy ([`ferry_core::error_policy`]) whether to fail the pipe or to start it again after a
//! backoff (exponential, capped, with jitter, never giving up: the slot keeps the changes).
//!
//! The claim is kept while waiting, so the pipe's status can show the retry: the report goes
//! into the stream's `ReplicationStatus` (`retrying`), which the next batch written replaces.
//! A failure run that follows a batch written starts the backoff over.

use std::time::{Duration, SystemTime};

use backon::ExponentialBackoff;
use ferry_core::error_policy::{self, ErrorClass};
use ferry_proto::v1::{PipeError, Retrying};
use ferry_server::membership::Member;
use ferry_server::telemetry::error_chain;
use ferry_server::worker::WorkerContext;
use ferry_store::PipeRecord;
use ferry_store::cdc::CdcClaim;
use tokio::sync::watch;
use tracing::warn;

use crate::stream::{self, StreamError};
use crate::{reload_step, streams};

/// Failures in a row, and the pacing of the next attempt.
struct Failures {
    backoff: ExponentialBackoff,
    attempt: u32,
    since: SystemTime,
}

impl Failures {
    fn new() -> Self {
        Self {
            backoff: ferry_server::retry::backoff(&error_policy::STREAM),
            attempt: 0,
            since: SystemTime::now(),
        }
    }

    /// Counts a failure; returns the delay before the next attempt.
    fn next(&mut self) -> Duration {
        self.attempt += 1;
        self.backoff.next().unwrap_or(error_policy::STREAM.max)
    }
}

/// Runs the stream of `record` under `claim` until it stops cleanly, fails the pipe, is asked
/// to stop, or the pipe changes under it (the scheduler then starts it anew).
pub(crate) async fn run(
    ctx: &WorkerContext,
    member: &Member,
    mut record: PipeRecord,
    claim: &CdcClaim,
    stop: watch::Receiver<bool>,
) {
    let name = record.spec.name.clone();
    let mut failures: Option<Failures> = None;
    loop {
        let started = SystemTime::now();
        let error = match stream::run(ctx, member, &record, claim, stop.clone()).await {
            Ok(()) => return,
            Err(error) => error,
        };
        let verdict = error.verdict(&name);
        if verdict.class == ErrorClass::Permanent {
            warn!(error = %error_chain(&error), "stream cannot continue; failing the pipe");
            let report = PipeError {
                message: error_chain(&error),
                remedy: verdict.remedy,
                table: error.table().unwrap_or_default().to_owned(),
                occurred_at: Some(SystemTime::now().into()),
            };
            if let Err(e) = ctx.store.report_stream_error(claim, &report).await {
                warn!(error = %error_chain(&e), "cannot report the stream error");
            }
            return;
        }
        if matches!(error, StreamError::ClaimLost) {
            return;
        }
        // The pipe as it is now: the report keeps the stream's counters, and a batch written
        // since this attempt started means the earlier failures are over.
        let current = ctx.store.get_pipe(&name).await.ok().flatten();
        let progressed = current
            .as_ref()
            .and_then(|r| r.replication.as_ref())
            .and_then(|r| r.last_batch_at)
            .and_then(|t| SystemTime::try_from(t).ok())
            .is_some_and(|at| at >= started);
        if progressed {
            failures = None;
        }
        let run = failures.get_or_insert_with(Failures::new);
        let delay = run.next();
        let waits = verdict.class == ErrorClass::RetryAfterAction;
        let retrying = Retrying {
            message: error_chain(&error),
            remedy: if waits { verdict.remedy } else { String::new() },
            attempt: run.attempt,
            next_attempt_at: Some((SystemTime::now() + delay).into()),
            since: Some(run.since.into()),
            waits_for_action: waits,
            table: error.table().unwrap_or_default().to_owned(),
        };
        warn!(
            error = %retrying.message,
            attempt = run.attempt,
            next_in_ms = delay.as_millis() as u64,
            waits_for_action = waits,
            "stream stopped; retrying"
        );
        if !report(ctx, claim, current.as_ref(), Some(retrying)).await {
            return;
        }
        if !wait(member, stop.clone(), delay).await {
            // Asked to stop (a pause, new settings): nothing is being retried any more.
            report(ctx, claim, current.as_ref(), None).await;
            return;
        }
        // Restarted only as it was claimed; anything else is the scheduler's to start.
        match ctx.store.get_pipe(&name).await {
            Ok(Some(now))
                if streams(&now)
                    && now.spec_revision == record.spec_revision
                    && reload_step(&now) == reload_step(&record) =>
            {
                record = now;
            }
            Ok(_) => return,
            Err(e) => {
                warn!(error = %error_chain(&e), "cannot read the pipe; restarting the stream as it was");
            }
        }
    }
}

/// Publishes the stream's status with `retrying`; returns false if the claim is lost.
async fn report(
    ctx: &WorkerContext,
    claim: &CdcClaim,
    current: Option<&PipeRecord>,
    retrying: Option<Retrying>,
) -> bool {
    let mut status = current
        .and_then(|r| r.replication.clone())
        .unwrap_or_default();
    if status.worker_id.is_empty() {
        status.worker_id.clone_from(&ctx.worker_id);
    }
    status.retrying = retrying;
    match ctx.store.put_replication_status(claim, &status).await {
        Ok(held) => held,
        // etcd is away too: the wait goes on; the claim's lease decides who streams.
        Err(e) => {
            warn!(error = %error_chain(&e), "cannot report the retry");
            true
        }
    }
}

/// Waits `delay`; false if asked to stop or the session is lost first.
async fn wait(member: &Member, mut stop: watch::Receiver<bool>, delay: Duration) -> bool {
    if *stop.borrow_and_update() {
        return false;
    }
    let sleep = tokio::time::sleep(delay);
    tokio::pin!(sleep);
    loop {
        tokio::select! {
            () = &mut sleep => return true,
            () = member.session.lost() => return false,
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow_and_update() {
                    return false;
                }
            }
        }
    }
}
