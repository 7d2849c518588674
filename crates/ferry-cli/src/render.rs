//! Human-readable output of pipes: `get`, `list`, `delete`, and the pieces `watch` shares.

use std::fmt::Write as _;
use std::time::SystemTime;

use ferry_core::lifecycle::state_name;
use ferry_proto::v1::{
    AlterationKind, DeletePipeResponse, Pipe, PipeState, PipeStatus, ReloadKind, ReloadPhase,
    Retrying, SlotHealth, TableReload,
};

/// A timestamp to the second, in UTC (`2026-11-29T17:20:39Z`); `-` when unset.
pub fn when(ts: Option<&prost_types::Timestamp>) -> String {
    ts.map_or_else(
        || "-".into(),
        |ts| {
            prost_types::Timestamp {
                seconds: ts.seconds,
                nanos: 0,
            }
            .to_string()
        },
    )
}

/// How long ago `ts` was, as `1h 2m`, `3m 4s` or `5s`; empty when unset or in the future.
pub fn ago(ts: Option<&prost_types::Timestamp>, now: SystemTime) -> String {
    let Some(then) = ts.and_then(|ts| SystemTime::try_from(*ts).ok()) else {
        return String::new();
    };
    let Ok(elapsed) = now.duration_since(then) else {
        return String::new();
    };
    let s = elapsed.as_secs();
    let text = match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {}s", s / 60, s % 60),
        3600..86_400 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {}h", s / 86_400, s % 86_400 / 3600),
    };
    format!("{text} ago")
}

/// Bytes with a binary unit: `512 B`, `1.5 KiB`, `12.3 MiB`, `5.0 GiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    // Lossy above 2^53 bytes, which only changes digits a human does not read.
    #[allow(clippy::cast_precision_loss)]
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// An LSN as Postgres prints it (`0/16B3F20`).
pub fn lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff)
}

/// A failure being retried, as one line: `<error>, attempt N, next in S s`.
pub fn retrying(retry: &Retrying, now: SystemTime) -> String {
    let next = retry
        .next_attempt_at
        .and_then(|ts| SystemTime::try_from(ts).ok())
        .map_or_else(
            || "next soon".to_owned(),
            |at| match at.duration_since(now) {
                // Rounded up: "next in 0 s" would read as overdue.
                Ok(wait) => format!(
                    "next in {} s",
                    wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
                ),
                Err(_) => "retrying now".to_owned(),
            },
        );
    let waits = if retry.waits_for_action {
        "waiting for action: "
    } else {
        ""
    };
    format!(
        "{waits}{}, attempt {}, {next}{}",
        retry.message,
        retry.attempt,
        parenthesized(&format!("failing since {}", when(retry.since.as_ref())))
    )
}

/// The pipe's state name ("running", ...).
pub fn state(pipe: &Pipe) -> &'static str {
    state_name(
        pipe.status
            .as_ref()
            .map_or(PipeState::Unspecified, PipeStatus::state),
    )
}

/// A reload's kind and tables: `resync of every table`, `add public.b, public.c`.
pub fn reload_what(reload: &TableReload) -> String {
    let tables = reload.tables.join(", ");
    match reload.kind() {
        ReloadKind::Resync if reload.whole_pipe => "resync of every table".into(),
        ReloadKind::Resync => format!("resync of {tables}"),
        ReloadKind::Add => format!("adding {tables}"),
        ReloadKind::Remove if reload.drop_destination_tables => {
            format!("removing {tables} (dropping their ClickHouse tables)")
        }
        ReloadKind::Remove => format!("removing {tables}"),
        ReloadKind::Unspecified => format!("reload of {tables}"),
    }
}

/// A reload phase in a word.
pub fn phase_name(phase: ReloadPhase) -> &'static str {
    match phase {
        ReloadPhase::Unspecified => "starting",
        ReloadPhase::Holding => "holding",
        ReloadPhase::Copying => "copying",
        ReloadPhase::Swapping => "swapping",
    }
}

/// What a reload phase means, for `get`.
fn phase_meaning(phase: ReloadPhase) -> &'static str {
    match phase {
        ReloadPhase::Unspecified => "being planned",
        ReloadPhase::Holding => {
            "the stream holds its checkpoint while the tables are prepared and the copy's snapshot is taken"
        }
        ReloadPhase::Copying => {
            "snapshot workers copy the tables; the stream writes their newer changes over the copy"
        }
        ReloadPhase::Swapping => "the copy is complete; the stream holds while it is swapped in",
    }
}

/// The slot's health on one line: `exists, wal_status reserved, retains 12.3 MiB`.
pub fn slot_summary(slot: &SlotHealth) -> String {
    if !slot.exists {
        return "missing on the source".into();
    }
    let mut text = String::from("exists");
    if !slot.wal_status.is_empty() {
        let _ = write!(text, ", wal_status {}", slot.wal_status);
    }
    let _ = write!(text, ", retains {}", bytes(slot.retained_bytes));
    if let Some(safe) = slot.safe_wal_bytes {
        let _ = write!(
            text,
            ", {} left before it is invalidated",
            bytes(u64::try_from(safe).unwrap_or(0))
        );
    }
    text
}

/// One pipe, in full, as `ferry get` prints it.
pub fn pipe(pipe: &Pipe, now: SystemTime) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = write_pipe(&mut out, pipe, now);
    out
}

fn write_pipe(out: &mut String, pipe: &Pipe, now: SystemTime) -> std::fmt::Result {
    let spec = pipe.spec.clone().unwrap_or_default();
    let status = pipe.status.clone().unwrap_or_default();
    writeln!(out, "pipe      {}", spec.name)?;
    writeln!(out, "state     {}  ({})", state(pipe), status.reason)?;
    if let Some(retry) = &status.retrying {
        writeln!(out, "retrying  {}", retrying(retry, now))?;
        if !retry.remedy.is_empty() {
            writeln!(out, "  remedy  {}", retry.remedy)?;
        }
    }
    if status.previous_state() != PipeState::Unspecified {
        writeln!(out, "previous  {}", state_name(status.previous_state()))?;
    }
    if matches!(status.state(), PipeState::Pausing | PipeState::Paused)
        && status.paused_from() != PipeState::Unspecified
    {
        writeln!(
            out,
            "paused    from {}; resume returns it there",
            state_name(status.paused_from())
        )?;
    }
    writeln!(out, "mode      {}", spec.mode().as_str_name())?;
    if let Some(source) = &spec.source {
        writeln!(
            out,
            "source    postgres://{}@{}:{}/{}",
            source.user, source.host, source.port, source.database
        )?;
    }
    if let Some(dest) = &spec.destination {
        writeln!(
            out,
            "dest      {} database {} (user {})",
            dest.url, dest.database, dest.user
        )?;
    }
    for table in &spec.tables {
        let name = format!("{}.{}", table.source_schema, table.source_table);
        let progress = status
            .tables
            .iter()
            .find(|t| t.source_table == name)
            .filter(|t| t.partitions_total > 0)
            .map(|t| {
                format!(
                    "  {}/{} rows, {}/{} partitions",
                    t.rows_copied, t.rows_estimated, t.partitions_done, t.partitions_total
                )
            })
            .unwrap_or_default();
        writeln!(
            out,
            "table     {name} -> {}{progress}",
            table.destination_table
        )?;
        let mut types: Vec<_> = table.column_types.iter().collect();
        types.sort();
        for (column, ty) in types {
            writeln!(out, "  column  {column} as {ty}")?;
        }
    }
    if let Some(reload) = &status.reload {
        write_reload(out, reload, now)?;
    }
    // Values ClickHouse could not hold as they are (README "Altered values").
    for table in &status.tables {
        for a in &table.altered {
            let kind = match a.kind() {
                AlterationKind::Clamped => "clamped",
                AlterationKind::Nulled => "nulled",
                AlterationKind::Emptied => "emptied (NULL array)",
                AlterationKind::Unspecified => "altered",
            };
            writeln!(
                out,
                "altered   {}.{}: {} {kind}",
                table.source_table, a.column, a.count
            )?;
        }
    }
    if let Some(settings) = &spec.settings {
        writeln!(
            out,
            "settings  sync_interval={}s pull_batch_size={} rows_per_partition={} parallel_partitions={} parallel_tables={} slot_wal_warning={}",
            settings.sync_interval.map_or(0, |d| d.seconds),
            settings.pull_batch_size.unwrap_or_default(),
            settings.snapshot_rows_per_partition.unwrap_or_default(),
            settings.snapshot_parallel_partitions.unwrap_or_default(),
            settings.snapshot_parallel_tables.unwrap_or_default(),
            bytes(u64::try_from(settings.slot_wal_warning_bytes.unwrap_or_default()).unwrap_or(0)),
        )?;
        writeln!(
            out,
            "values    unconstrained_numeric={} out_of_range={}",
            settings.unconstrained_numeric().as_str_name(),
            settings.out_of_range().as_str_name()
        )?;
    }
    if let Some(slot) = &status.slot {
        writeln!(
            out,
            "slot      {} (checked {})",
            slot_summary(slot),
            when(slot.checked_at.as_ref())
        )?;
        if !slot.warning.is_empty() {
            writeln!(out, "warning   {}", slot.warning)?;
        }
    }
    if let Some(r) = &status.replication {
        writeln!(
            out,
            "stream    checkpoint {}, lag {} / {:.1} s, slot retains {}, worker {}",
            lsn(r.checkpoint_lsn),
            bytes(r.lag_bytes),
            r.lag_seconds,
            bytes(r.slot_retained_bytes),
            r.worker_id
        )?;
        writeln!(
            out,
            "batch     {} rows at {}",
            r.last_batch_rows,
            when(r.last_batch_at.as_ref())
        )?;
        for table in &status.tables {
            writeln!(
                out,
                "changes   {}: {} inserted, {} updated, {} deleted",
                table.source_table, table.inserted, table.updated, table.deleted
            )?;
            if !table.renamed_to.is_empty() {
                writeln!(
                    out,
                    "renamed   {} is now {} at the source (still replicated into {})",
                    table.source_table, table.renamed_to, table.destination_table
                )?;
            }
        }
    }
    if let Some(error) = &status.error {
        writeln!(out, "error     {}", error.message)?;
        if !error.table.is_empty() {
            writeln!(out, "  table   {}", error.table)?;
        }
        writeln!(out, "remedy    {}", error.remedy)?;
    }
    writeln!(out, "created   {}", when(status.created_at.as_ref()))?;
    writeln!(
        out,
        "changed   {}{}",
        when(status.state_changed_at.as_ref()),
        parenthesized(&ago(status.state_changed_at.as_ref(), now))
    )
}

/// `  (text)`, or nothing for an empty text.
fn parenthesized(text: &str) -> String {
    if text.is_empty() {
        String::new()
    } else {
        format!("  ({text})")
    }
}

fn write_reload(out: &mut String, reload: &TableReload, now: SystemTime) -> std::fmt::Result {
    writeln!(
        out,
        "reload    {}: {} (generation {})",
        reload_what(reload),
        phase_name(reload.phase()),
        reload.generation
    )?;
    writeln!(out, "  phase   {}", phase_meaning(reload.phase()))?;
    writeln!(
        out,
        "  since   {}{}",
        when(reload.started_at.as_ref()),
        parenthesized(&ago(reload.started_at.as_ref(), now))
    )?;
    if reload.start_lsn != 0 {
        writeln!(
            out,
            "  from    {} (changes from here on are written over the copy)",
            lsn(reload.start_lsn)
        )?;
    }
    Ok(())
}

/// Pipes as a table.
pub fn list(pipes: &[Pipe]) -> String {
    let mut out = format!(
        "{:<24} {:<14} {:<28} {:>6}  REASON\n",
        "NAME", "STATE", "MODE", "TABLES"
    );
    for pipe in pipes {
        let spec = pipe.spec.clone().unwrap_or_default();
        let reason = pipe.status.as_ref().map_or("", |s| s.reason.as_str());
        let _ = writeln!(
            out,
            "{:<24} {:<14} {:<28} {:>6}  {reason}",
            spec.name,
            state(pipe),
            spec.mode().as_str_name(),
            spec.tables.len()
        );
    }
    out
}

/// What `ferry delete` prints: whether the pipe is gone, and what was left behind, one item a
/// line.
pub fn deleted(name: &str, response: &DeletePipeResponse) -> String {
    let mut out = String::new();
    if response.deleted {
        let _ = writeln!(out, "pipe {name} deleted");
    } else {
        let reason = response
            .pipe
            .as_ref()
            .and_then(|p| p.status.as_ref())
            .map(|s| format!("{}: {}", state_name(s.state()), s.reason))
            .unwrap_or_else(|| "deleting".into());
        let _ = writeln!(out, "pipe {name} is not gone yet ({reason})");
        let _ = writeln!(
            out,
            "it disappears once its resources are released; `ferry watch {name}` follows it"
        );
    }
    if !response.left_behind.is_empty() {
        let _ = writeln!(out, "left behind (remove each yourself):");
        for item in &response.left_behind {
            let _ = writeln!(out, "  {item}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_proto::v1::{PipeSpec, TableMapping, TableStatus};
    use std::time::Duration;

    fn at(seconds: i64) -> prost_types::Timestamp {
        prost_types::Timestamp { seconds, nanos: 0 }
    }

    #[test]
    fn sizes_times_and_lsns_read_as_people_write_them() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(5 << 30), "5.0 GiB");
        assert_eq!(bytes(u64::MAX), "16384.0 PiB");
        assert_eq!(lsn((1 << 32) | 0x016B_3F20), "1/16B3F20");
        let precise = prost_types::Timestamp {
            seconds: 0,
            nanos: 5,
        };
        assert_eq!(when(Some(&precise)), "1970-01-01T00:00:00Z");
        assert_eq!(when(None), "-");
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(3725);
        assert_eq!(ago(Some(&at(3720)), now), "5s ago");
        assert_eq!(ago(Some(&at(0)), now), "1h 2m ago");
        assert_eq!(ago(Some(&at(4000)), now), "");
    }

    #[test]
    fn get_shows_the_reload_the_slot_and_what_a_pause_interrupted() {
        let mut status = PipeStatus {
            reason: "PausePipe requested".into(),
            tables: vec![TableStatus {
                source_table: "public.a".into(),
                destination_table: "a".into(),
                rows_copied: 10,
                rows_estimated: 20,
                partitions_done: 1,
                partitions_total: 2,
                ..Default::default()
            }],
            reload: Some(TableReload {
                generation: 3,
                kind: ReloadKind::Resync.into(),
                tables: vec!["public.a".into()],
                phase: ReloadPhase::Copying.into(),
                start_lsn: 0x16B_3F20,
                started_at: Some(at(100)),
                ..Default::default()
            }),
            slot: Some(SlotHealth {
                exists: true,
                wal_status: "reserved".into(),
                retained_bytes: 6 << 30,
                safe_wal_bytes: Some(1 << 20),
                checked_at: Some(at(160)),
                warning: "the slot retains 6.0 GiB".into(),
            }),
            ..Default::default()
        };
        status.set_state(PipeState::Paused);
        status.set_previous_state(PipeState::Pausing);
        status.set_paused_from(PipeState::Snapshot);
        let pipe = Pipe {
            spec: Some(PipeSpec {
                name: "demo".into(),
                tables: vec![TableMapping {
                    source_schema: "public".into(),
                    source_table: "a".into(),
                    destination_table: "a".into(),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            status: Some(status),
            status_revision: 1,
        };
        let text = super::pipe(&pipe, SystemTime::UNIX_EPOCH + Duration::from_secs(170));
        for expected in [
            "state     paused  (PausePipe requested)\n",
            "previous  pausing\n",
            "paused    from snapshot; resume returns it there\n",
            "table     public.a -> a  10/20 rows, 1/2 partitions\n",
            "reload    resync of public.a: copying (generation 3)\n",
            "  since   1970-01-01T00:01:40Z  (1m 10s ago)\n",
            "  from    0/16B3F20",
            "slot      exists, wal_status reserved, retains 6.0 GiB, 1.0 MiB left before it is invalidated (checked 1970-01-01T00:02:40Z)\n",
            "warning   the slot retains 6.0 GiB\n",
        ] {
            assert!(text.contains(expected), "{expected:?} missing from\n{text}");
        }
        let missing = SlotHealth {
            exists: false,
            ..Default::default()
        };
        assert_eq!(slot_summary(&missing), "missing on the source");
    }

    #[test]
    fn get_shows_a_failure_being_retried() {
        let mut status = PipeStatus {
            reason: "snapshot done".into(),
            retrying: Some(Retrying {
                message: "cannot reach ClickHouse at http://ch:8123".into(),
                attempt: 3,
                next_attempt_at: Some(at(107)),
                since: Some(at(90)),
                ..Default::default()
            }),
            ..Default::default()
        };
        status.set_state(PipeState::Running);
        let mut pipe = Pipe {
            status: Some(status),
            ..Default::default()
        };
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(100);
        let text = super::pipe(&pipe, now);
        let line = "retrying  cannot reach ClickHouse at http://ch:8123, attempt 3, next in 7 s  (failing since 1970-01-01T00:01:30Z)\n";
        assert!(text.contains(line), "{text}");
        assert!(!text.contains("  remedy"), "{text}");
        if let Some(retry) = pipe.status.as_mut().and_then(|s| s.retrying.as_mut()) {
            retry.waits_for_action = true;
            retry.remedy = "free disk space".into();
        }
        let text = super::pipe(&pipe, now);
        assert!(
            text.contains("retrying  waiting for action: cannot reach"),
            "{text}"
        );
        assert!(text.contains("  remedy  free disk space\n"), "{text}");
    }

    #[test]
    fn delete_says_whether_the_pipe_is_gone_and_lists_what_stayed() {
        let gone = DeletePipeResponse {
            deleted: true,
            ..Default::default()
        };
        assert_eq!(deleted("demo", &gone), "pipe demo deleted\n");
        let stuck = DeletePipeResponse {
            deleted: false,
            left_behind: vec![
                "slot ferry_demo: SELECT pg_drop_replication_slot('ferry_demo')".into(),
                "publication ferry_demo: DROP PUBLICATION ferry_demo".into(),
            ],
            pipe: None,
        };
        let text = deleted("demo", &stuck);
        assert!(
            text.starts_with("pipe demo is not gone yet (deleting)\n"),
            "{text}"
        );
        assert!(text.ends_with(
            "left behind (remove each yourself):\n  slot ferry_demo: SELECT pg_drop_replication_slot('ferry_demo')\n  publication ferry_demo: DROP PUBLICATION ferry_demo\n"
        ), "{text}");
    }
}
