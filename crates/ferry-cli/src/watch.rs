//! `ferry watch`: one line per change of a pipe as it happens, until the pipe is deleted.
//!
//! The server sends a message for every change of the pipe's spec, status or stream report;
//! most stream reports only move lag and counters, so [`Lines`] keeps what the last message
//! showed and prints only what a person follows: the state (and the one before), the reason,
//! the reload and its phase, per-table snapshot progress, the slot's warning and the error.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};

use ferry_core::lifecycle::state_name;
use ferry_proto::v1::pipe_service_client::PipeServiceClient;
use ferry_proto::v1::{PipeState, PipeStatus, TableReload, WatchPipeRequest, WatchPipeResponse};
use tonic::Code;
use tonic::transport::Channel;

use crate::json::Json;
use crate::render::{phase_name, reload_what, when};

/// How often a table's progress is shown at most, between its 10 % steps.
const PROGRESS_EVERY: Duration = Duration::from_secs(10);
/// How long `watch` tries to reconnect to a coordinator that went away.
const RECONNECT_FOR: Duration = Duration::from_secs(60);

/// What was last shown of one table's snapshot progress.
struct Shown {
    done: u32,
    total: u32,
    at: Instant,
}

/// Turns watch messages into the lines worth printing.
#[derive(Default)]
pub struct Lines {
    last: Option<PipeStatus>,
    progress: BTreeMap<String, Shown>,
}

impl Lines {
    /// The lines `update` adds to what was shown, stamped with `now` (a state change with the
    /// time it happened).
    pub fn of(
        &mut self,
        update: &WatchPipeResponse,
        now: SystemTime,
        clock: Instant,
    ) -> Vec<String> {
        let status = update
            .pipe
            .as_ref()
            .and_then(|p| p.status.clone())
            .unwrap_or_default();
        let stamp = when(Some(&now.into()));
        let name = state_name(status.state());
        if update.deleted {
            self.last = Some(status);
            return vec![format!("{stamp}  deleted")];
        }
        let mut lines = Vec::new();
        let last = self.last.take();
        let state_changed = last.as_ref().is_none_or(|l| l.state != status.state);
        if state_changed {
            let mut line = format!(
                "{}  {name:<12}",
                when(status.state_changed_at.as_ref().or(Some(&now.into())))
            );
            if status.previous_state() != PipeState::Unspecified {
                line.push_str(&format!(" (was {})", state_name(status.previous_state())));
            }
            if matches!(status.state(), PipeState::Pausing | PipeState::Paused)
                && status.paused_from() != PipeState::Unspecified
                && status.paused_from() != status.previous_state()
            {
                line.push_str(&format!(
                    " (paused from {})",
                    state_name(status.paused_from())
                ));
            }
            if !status.reason.is_empty() {
                line.push_str(&format!("  {}", status.reason));
            }
            lines.push(line);
        } else if last.as_ref().is_some_and(|l| l.reason != status.reason) {
            lines.push(format!("{stamp}  {name:<12} {}", status.reason));
        }
        let prefix = format!("{stamp}  {name:<12}");
        if let Some(line) = reload_change(
            last.as_ref().and_then(|l| l.reload.as_ref()),
            status.reload.as_ref(),
        ) {
            lines.push(format!("{prefix} {line}"));
        }
        let warning = |s: &PipeStatus| {
            s.slot
                .as_ref()
                .map(|slot| slot.warning.clone())
                .unwrap_or_default()
        };
        let (was, is) = (
            last.as_ref().map(warning).unwrap_or_default(),
            warning(&status),
        );
        if was != is {
            if is.is_empty() {
                lines.push(format!("{prefix} slot warning cleared"));
            } else {
                lines.push(format!("{prefix} slot warning: {is}"));
            }
        }
        // A retry is shown when it starts, when its error changes and when it is over; its
        // attempts are counted by `ferry get`.
        let retry_text = |s: &PipeStatus| s.retrying.as_ref().map(|r| r.message.clone());
        let (was, is) = (last.as_ref().and_then(retry_text), retry_text(&status));
        if was != is {
            match (&is, status.retrying.as_ref()) {
                (Some(message), Some(retry)) if retry.waits_for_action => lines.push(format!(
                    "{prefix} waiting for action, retrying: {message}; remedy: {}",
                    retry.remedy
                )),
                (Some(message), _) => lines.push(format!("{prefix} retrying: {message}")),
                (None, _) if !state_changed => lines.push(format!("{prefix} retry over")),
                (None, _) => {}
            }
        }
        let new_error = status
            .error
            .as_ref()
            .filter(|e| last.as_ref().and_then(|l| l.error.as_ref()) != Some(*e));
        if let Some(error) = new_error {
            let table = if error.table.is_empty() {
                String::new()
            } else {
                format!(" ({})", error.table)
            };
            lines.push(format!("{prefix} error: {}{table}", error.message));
            if !error.remedy.is_empty() {
                lines.push(format!("{prefix} remedy: {}", error.remedy));
            }
        }
        for table in &status.tables {
            if table.partitions_total == 0 {
                continue;
            }
            let shown = self.progress.get(&table.source_table);
            let worth = match shown {
                // A table first seen mid-copy (or at the start of a snapshot) is shown once.
                None => {
                    table.partitions_done < table.partitions_total
                        || state_changed && status.state() == PipeState::Snapshot
                }
                Some(s) if s.done == table.partitions_done && s.total == table.partitions_total => {
                    false
                }
                Some(s) => {
                    s.total != table.partitions_total
                        || table.partitions_done < s.done
                        || table.partitions_done == table.partitions_total
                        || decile(table.partitions_done, table.partitions_total)
                            != decile(s.done, s.total)
                        || clock.duration_since(s.at) >= PROGRESS_EVERY
                }
            };
            if worth {
                lines.push(format!(
                    "{prefix} {} {}/{} partitions, {}/{} rows",
                    table.source_table,
                    table.partitions_done,
                    table.partitions_total,
                    table.rows_copied,
                    table.rows_estimated
                ));
                self.progress.insert(
                    table.source_table.clone(),
                    Shown {
                        done: table.partitions_done,
                        total: table.partitions_total,
                        at: clock,
                    },
                );
            } else if shown.is_none() {
                // Already complete when first seen: remember it quietly.
                self.progress.insert(
                    table.source_table.clone(),
                    Shown {
                        done: table.partitions_done,
                        total: table.partitions_total,
                        at: clock,
                    },
                );
            }
        }
        self.last = Some(status);
        lines
    }
}

fn decile(done: u32, total: u32) -> u64 {
    u64::from(done) * 10 / u64::from(total.max(1))
}

/// A line for a reload that started, moved to another phase or ended.
fn reload_change(was: Option<&TableReload>, is: Option<&TableReload>) -> Option<String> {
    let describe = |r: &TableReload| {
        format!(
            "reload {}: {} (generation {})",
            reload_what(r),
            phase_name(r.phase()),
            r.generation
        )
    };
    match (was, is) {
        (None, None) => None,
        (Some(was), None) => Some(format!(
            "reload {} ended (generation {})",
            reload_what(was),
            was.generation
        )),
        (None, Some(is)) => Some(describe(is)),
        (Some(was), Some(is)) => (was.generation != is.generation
            || was.phase != is.phase
            || was.kind != is.kind
            || was.tables != is.tables)
            .then(|| describe(is)),
    }
}

/// Follows pipe `name` until it is deleted: lines, or with `json` every message as one line of
/// JSON. A coordinator that goes away (restart, failover) is watched again for a while.
pub async fn run(
    client: &mut PipeServiceClient<Channel>,
    name: String,
    json: Option<&Json>,
) -> anyhow::Result<()> {
    let mut lines = Lines::default();
    let mut lost_at: Option<Instant> = None;
    loop {
        let outcome = follow(client, &name, json, &mut lines, &mut lost_at).await;
        let status = match outcome {
            Ok(true) => return Ok(()),
            Ok(false) => tonic::Status::unavailable("the coordinator ended the watch"),
            Err(status) => status,
        };
        // A pipe seen before and now unknown was deleted while the watch was down.
        if status.code() == Code::NotFound && lines.last.is_some() {
            crate::emit(&format!(
                "{}  deleted\n",
                when(Some(&SystemTime::now().into()))
            ));
            return Ok(());
        }
        if !matches!(
            status.code(),
            Code::Unavailable | Code::Unknown | Code::Internal
        ) || lines.last.is_none()
        {
            return Err(status.into());
        }
        if lost_at.is_none() {
            eprintln!("watch interrupted ({}); reconnecting", status.message());
        }
        let since = *lost_at.get_or_insert_with(Instant::now);
        if since.elapsed() >= RECONNECT_FOR {
            return Err(anyhow::Error::from(status).context("the watch was lost"));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// One watch stream: `Ok(true)` once the pipe is deleted, `Ok(false)` if the stream ended.
async fn follow(
    client: &mut PipeServiceClient<Channel>,
    name: &str,
    json: Option<&Json>,
    lines: &mut Lines,
    lost_at: &mut Option<Instant>,
) -> Result<bool, tonic::Status> {
    let mut stream = client
        .watch_pipe(WatchPipeRequest { name: name.into() })
        .await?
        .into_inner();
    while let Some(update) = stream.message().await? {
        *lost_at = None;
        match json {
            Some(json) => match json.watch(&update) {
                Ok(text) => crate::emit(&format!("{text}\n")),
                Err(error) => eprintln!("error: {error:#}"),
            },
            None => {
                for line in lines.of(&update, SystemTime::now(), Instant::now()) {
                    crate::emit(&format!("{line}\n"));
                }
            }
        }
        if json.is_some() {
            // `lines` also tells whether the pipe was seen, for a reconnect.
            lines.last = update.pipe.as_ref().and_then(|p| p.status.clone());
        }
        if update.deleted {
            return Ok(true);
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_proto::v1::{Pipe, PipeError, ReloadKind, ReloadPhase, SlotHealth, TableStatus};

    fn at(seconds: i64) -> prost_types::Timestamp {
        prost_types::Timestamp { seconds, nanos: 0 }
    }

    fn update(status: &PipeStatus) -> WatchPipeResponse {
        WatchPipeResponse {
            pipe: Some(Pipe {
                status: Some(status.clone()),
                ..Default::default()
            }),
            deleted: false,
        }
    }

    fn status(state: PipeState, previous: PipeState, reason: &str, changed: i64) -> PipeStatus {
        let mut status = PipeStatus {
            reason: reason.into(),
            state_changed_at: Some(at(changed)),
            ..Default::default()
        };
        status.set_state(state);
        status.set_previous_state(previous);
        status
    }

    fn table(done: u32, total: u32) -> TableStatus {
        TableStatus {
            source_table: "public.t".into(),
            partitions_done: done,
            partitions_total: total,
            rows_copied: u64::from(done) * 10,
            rows_estimated: u64::from(total) * 10,
            ..Default::default()
        }
    }

    #[test]
    fn one_line_per_change_worth_reading() {
        let mut lines = Lines::default();
        let t0 = Instant::now();
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(100);
        let mut s = status(PipeState::Snapshot, PipeState::Setup, "setup done", 90);
        s.tables = vec![table(0, 40)];
        assert_eq!(
            lines.of(&update(&s), now, t0),
            [
                "1970-01-01T00:01:30Z  snapshot     (was setup)  setup done",
                "1970-01-01T00:01:40Z  snapshot     public.t 0/40 partitions, 0/400 rows",
            ]
        );
        // A stream report changes nothing shown; one partition is not a 10 % step.
        s.tables = vec![table(1, 40)];
        assert!(lines.of(&update(&s), now, t0).is_empty());
        s.tables = vec![table(4, 40)];
        assert_eq!(
            lines.of(&update(&s), now, t0),
            ["1970-01-01T00:01:40Z  snapshot     public.t 4/40 partitions, 40/400 rows"]
        );
        // A slow table still shows progress now and then.
        s.tables = vec![table(5, 40)];
        assert_eq!(lines.of(&update(&s), now, t0 + PROGRESS_EVERY).len(), 1);
        s.tables = vec![table(40, 40)];
        let mut r = status(
            PipeState::Running,
            PipeState::Snapshot,
            "snapshot done",
            101,
        );
        r.tables = vec![table(40, 40)];
        assert_eq!(
            lines.of(&update(&r), now, t0),
            [
                "1970-01-01T00:01:41Z  running      (was snapshot)  snapshot done",
                "1970-01-01T00:01:40Z  running      public.t 40/40 partitions, 400/400 rows",
            ]
        );

        // A resync: its phases, then its end.
        let mut y = status(
            PipeState::Resync,
            PipeState::Running,
            "ResyncPipe requested",
            110,
        );
        y.tables = r.tables.clone();
        y.reload = Some(TableReload {
            generation: 2,
            kind: ReloadKind::Resync.into(),
            tables: vec!["public.t".into()],
            phase: ReloadPhase::Holding.into(),
            ..Default::default()
        });
        let got = lines.of(&update(&y), now, t0);
        assert_eq!(
            got[1],
            "1970-01-01T00:01:40Z  resync       reload resync of public.t: holding (generation 2)"
        );
        y.reload.as_mut().unwrap().set_phase(ReloadPhase::Copying);
        y.reason = "copying public.t".into();
        assert_eq!(
            lines.of(&update(&y), now, t0),
            [
                "1970-01-01T00:01:40Z  resync       copying public.t",
                "1970-01-01T00:01:40Z  resync       reload resync of public.t: copying (generation 2)",
            ]
        );
        let mut back = status(PipeState::Running, PipeState::Resync, "resync done", 120);
        back.tables = r.tables.clone();
        back.slot = Some(SlotHealth {
            exists: true,
            warning: "retains 6.0 GiB".into(),
            ..Default::default()
        });
        assert_eq!(
            lines.of(&update(&back), now, t0)[1..],
            [
                "1970-01-01T00:01:40Z  running      reload resync of public.t ended (generation 2)",
                "1970-01-01T00:01:40Z  running      slot warning: retains 6.0 GiB",
            ]
        );

        // Paused out of a snapshot, a failure with its remedy, and the end.
        let mut p = status(PipeState::Paused, PipeState::Pausing, "stream stopped", 130);
        p.set_paused_from(PipeState::Snapshot);
        assert_eq!(
            lines.of(&update(&p), now, t0)[0],
            "1970-01-01T00:02:10Z  paused       (was pausing) (paused from snapshot)  stream stopped"
        );
        let mut f = status(
            PipeState::Failed,
            PipeState::Paused,
            "replication failed",
            140,
        );
        f.error = Some(PipeError {
            message: "type changed".into(),
            remedy: "ALTER it back".into(),
            table: "public.t".into(),
            ..Default::default()
        });
        assert_eq!(
            lines.of(&update(&f), now, t0)[1..],
            [
                "1970-01-01T00:01:40Z  failed       error: type changed (public.t)",
                "1970-01-01T00:01:40Z  failed       remedy: ALTER it back",
            ]
        );
        let gone = WatchPipeResponse {
            deleted: true,
            ..update(&f)
        };
        assert_eq!(lines.of(&gone, now, t0), ["1970-01-01T00:01:40Z  deleted"]);
    }
}
