//! Human-readable output of pipes.

use ferry_core::lifecycle::state_name;
use ferry_core::units::human_bytes as bytes;
use std::collections::BTreeMap;

use ferry_proto::v1::{AlterationKind, DeletePipeResponse, Pipe, PipeState, WatchPipeResponse};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

fn when(ts: Option<&prost_types::Timestamp>) -> String {
    ts.map_or_else(|| "-".into(), ToString::to_string)
}

fn state(pipe: &Pipe) -> &'static str {
    state_name(
        pipe.status
            .as_ref()
            .map_or(PipeState::Unspecified, |s| s.state()),
    )
}

/// One pipe, in full.
pub fn pipe(pipe: Option<&Pipe>) {
    let Some(pipe) = pipe else { return };
    let spec = pipe.spec.clone().unwrap_or_default();
    let status = pipe.status.clone().unwrap_or_default();
    println!("pipe      {}", spec.name);
    println!("state     {}  ({})", state(pipe), status.reason);
    println!("mode      {}", spec.mode().as_str_name());
    if let Some(source) = &spec.source {
        println!(
            "source    postgres://{}@{}:{}/{}",
            source.user, source.host, source.port, source.database
        );
    }
    if let Some(dest) = &spec.destination {
        println!(
            "dest      {} database {} (user {})",
            dest.url, dest.database, dest.user
        );
    }
    for table in &spec.tables {
        let progress = status
            .tables
            .iter()
            .find(|t| t.source_table == format!("{}.{}", table.source_schema, table.source_table))
            .map(|t| {
                format!(
                    "  {}/{} rows, {}/{} partitions",
                    t.rows_copied, t.rows_estimated, t.partitions_done, t.partitions_total
                )
            })
            .unwrap_or_default();
        println!(
            "table     {}.{} -> {}{progress}",
            table.source_schema, table.source_table, table.destination_table
        );
        let mut types: Vec<_> = table.column_types.iter().collect();
        types.sort();
        for (column, ty) in types {
            println!("  column  {column} as {ty}");
        }
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
            println!(
                "altered   {}.{}: {} {kind}",
                table.source_table, a.column, a.count
            );
        }
    }
    if let Some(settings) = &spec.settings {
        println!(
            "settings  sync_interval={}s pull_batch_size={} rows_per_partition={} parallel_partitions={} parallel_tables={}",
            settings.sync_interval.map_or(0, |d| d.seconds),
            settings.pull_batch_size.unwrap_or_default(),
            settings.snapshot_rows_per_partition.unwrap_or_default(),
            settings.snapshot_parallel_partitions.unwrap_or_default(),
            settings.snapshot_parallel_tables.unwrap_or_default(),
        );
        println!(
            "values    unconstrained_numeric={} out_of_range={}",
            settings.unconstrained_numeric().as_str_name(),
            settings.out_of_range().as_str_name()
        );
    }
    if let Some(r) = &status.replication {
        println!(
            "stream    checkpoint {:X}/{:X}, lag {} bytes / {:.1} s, slot retains {} bytes, worker {}",
            r.checkpoint_lsn >> 32,
            r.checkpoint_lsn & 0xffff_ffff,
            r.lag_bytes,
            r.lag_seconds,
            r.slot_retained_bytes,
            r.worker_id
        );
        println!(
            "batch     {} rows at {}",
            r.last_batch_rows,
            when(r.last_batch_at.as_ref())
        );
        for table in &status.tables {
            println!(
                "changes   {}: {} inserted, {} updated, {} deleted",
                table.source_table, table.inserted, table.updated, table.deleted
            );
            if !table.renamed_to.is_empty() {
                println!(
                    "renamed   {} is now {} at the source (still replicated into {})",
                    table.source_table, table.renamed_to, table.destination_table
                );
            }
        }
    }
    if let Some(slot) = &status.slot {
        let safe = slot.safe_wal_bytes.map_or_else(String::new, |b| {
            format!(
                ", {} before max_slot_wal_keep_size",
                bytes(u64::try_from(b).unwrap_or(0))
            )
        });
        if slot.exists {
            println!(
                "slot      retains {} of WAL, wal_status {}{safe} (checked {})",
                bytes(slot.retained_bytes),
                slot.wal_status,
                when(slot.checked_at.as_ref())
            );
        } else {
            println!(
                "slot      missing (checked {})",
                when(slot.checked_at.as_ref())
            );
        }
        if !slot.warning.is_empty() {
            println!("warning   {}", slot.warning);
        }
    }
    if let Some(error) = &status.error {
        println!("error     {}", error.message);
        println!("remedy    {}", error.remedy);
    }
    println!("created   {}", when(status.created_at.as_ref()));
    println!("changed   {}", when(status.state_changed_at.as_ref()));
}

/// What `delete` did: gone, or still deleting, and whatever was left behind.
pub fn deleted(name: &str, response: &DeletePipeResponse) {
    if response.deleted {
        println!("pipe {name} deleted");
    } else {
        println!("pipe {name} is still being deleted (ferry get {name} shows progress)");
        pipe(response.pipe.as_ref());
    }
    if !response.left_behind.is_empty() {
        println!("left behind:");
        for item in &response.left_behind {
            println!("  {item}");
        }
    }
}

/// Pipes as a table.
pub fn list(pipes: &[Pipe]) {
    println!(
        "{:<24} {:<14} {:<28} {:>6}  REASON",
        "NAME", "STATE", "MODE", "TABLES"
    );
    for pipe in pipes {
        let spec = pipe.spec.clone().unwrap_or_default();
        let reason = pipe.status.as_ref().map_or("", |s| s.reason.as_str());
        println!(
            "{:<24} {:<14} {:<28} {:>6}  {reason}",
            spec.name,
            state(pipe),
            spec.mode().as_str_name(),
            spec.tables.len()
        );
    }
}

/// What `watch` shows: a line per state change, and during a snapshot a progress bar per table
/// (on a terminal; elsewhere only the lines).
#[derive(Default)]
pub struct Progress {
    bars: MultiProgress,
    tables: BTreeMap<String, ProgressBar>,
    last_state: Option<PipeState>,
}

impl Progress {
    /// Shows one update.
    pub fn show(&mut self, update: &WatchPipeResponse) {
        let status = update
            .pipe
            .as_ref()
            .and_then(|p| p.status.clone())
            .unwrap_or_default();
        if self.last_state != Some(status.state()) || update.deleted {
            self.bars.suspend(|| change(update));
            self.last_state = Some(status.state());
        }
        for table in &status.tables {
            if table.partitions_total == 0 {
                continue;
            }
            let bar = self
                .tables
                .entry(table.source_table.clone())
                .or_insert_with(|| {
                    let bar = self.bars.add(ProgressBar::new(table.rows_estimated.max(1)));
                    bar.set_style(
                        ProgressStyle::with_template(
                            "{prefix:<28} [{bar:30}] {pos}/{len} rows {msg}",
                        )
                        .unwrap_or_else(|_| ProgressStyle::default_bar())
                        .progress_chars("=> "),
                    );
                    bar.set_prefix(table.source_table.clone());
                    bar
                });
            bar.set_length(table.rows_estimated.max(table.rows_copied).max(1));
            bar.set_position(table.rows_copied);
            bar.set_message(format!(
                "{}/{} partitions",
                table.partitions_done, table.partitions_total
            ));
            if table.partitions_done == table.partitions_total {
                bar.finish();
            }
        }
    }
}

/// One line per change seen by `watch`.
pub fn change(update: &WatchPipeResponse) {
    let Some(pipe) = &update.pipe else { return };
    let status = pipe.status.clone().unwrap_or_default();
    if update.deleted {
        println!("{}  deleted", when(status.state_changed_at.as_ref()));
        return;
    }
    println!(
        "{}  {:<12} {}",
        when(status.state_changed_at.as_ref()),
        state(pipe),
        status.reason
    );
}
