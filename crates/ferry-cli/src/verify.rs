//! `ferry verify`: a progress bar per table while the coordinator compares, then a table of
//! results with example keys.

use std::collections::BTreeMap;
use std::time::Duration;

use ferry_proto::v1::pipe_service_client::PipeServiceClient;
use ferry_proto::v1::verify_pipe_response::Event;
use ferry_proto::v1::{TableVerification, VerifyPipeRequest, VerifyProgress, VerifyStage};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use tonic::transport::Channel;

/// Runs the verification; returns whether every table is equal.
pub async fn run(
    client: &mut PipeServiceClient<Channel>,
    name: String,
    tables: Vec<String>,
    checkpoint_timeout: Option<u64>,
) -> anyhow::Result<bool> {
    let mut stream = client
        .verify_pipe(VerifyPipeRequest {
            name,
            tables,
            checkpoint_timeout: checkpoint_timeout.map(|seconds| prost_types::Duration {
                seconds: i64::try_from(seconds).unwrap_or(i64::MAX),
                nanos: 0,
            }),
        })
        .await?
        .into_inner();
    let mut bars = Bars::default();
    let mut results = Vec::new();
    let mut equal = None;
    while let Some(message) = stream.message().await? {
        match message.event {
            Some(Event::Progress(progress)) => bars.show(&progress),
            Some(Event::Table(table)) => {
                bars.finish(&table);
                results.push(table);
            }
            Some(Event::Summary(summary)) => equal = Some(summary.equal),
            None => {}
        }
    }
    bars.clear();
    print(&results);
    // A stream that ends without a summary was cut short: not a verdict.
    equal.ok_or_else(|| anyhow::anyhow!("the verification ended before its summary"))
}

#[derive(Default)]
struct Bars {
    bars: MultiProgress,
    tables: BTreeMap<String, ProgressBar>,
    waiting: Option<ProgressBar>,
}

impl Bars {
    fn show(&mut self, progress: &VerifyProgress) {
        if progress.stage() == VerifyStage::WaitingForCheckpoint {
            let spinner = self.bars.add(ProgressBar::new_spinner());
            spinner.set_message("waiting for the pipe's checkpoint to reach the snapshot");
            spinner.enable_steady_tick(Duration::from_millis(120));
            self.waiting = Some(spinner);
            return;
        }
        if let Some(spinner) = self.waiting.take() {
            spinner.finish_and_clear();
        }
        let bar = self
            .tables
            .entry(progress.source_table.clone())
            .or_insert_with(|| {
                let bar = self.bars.add(ProgressBar::new(1));
                bar.set_style(
                    ProgressStyle::with_template("{prefix:<28} [{bar:30}] {pos}/{len} rows {msg}")
                        .unwrap_or_else(|_| ProgressStyle::default_bar())
                        .progress_chars("=> "),
                );
                bar.set_prefix(progress.source_table.clone());
                bar
            });
        bar.set_length(progress.rows_estimated.max(progress.rows_compared).max(1));
        bar.set_position(progress.rows_compared);
        bar.set_message(match progress.stage() {
            VerifyStage::Rechecking => "rechecking differences",
            _ => "comparing",
        });
    }

    fn finish(&mut self, table: &TableVerification) {
        if let Some(bar) = self.tables.get(&table.source_table) {
            bar.set_length(bar.position().max(1));
            bar.finish_with_message(if table.equal { "equal" } else { "DIFFERENT" });
        }
    }

    fn clear(&mut self) {
        if let Some(spinner) = self.waiting.take() {
            spinner.finish_and_clear();
        }
    }
}

fn print(results: &[TableVerification]) {
    println!(
        "{:<28} {:<28} {:>10} {:>10} {:>8} {:>8} {:>9}  RESULT",
        "TABLE", "DESTINATION", "POSTGRES", "CLICKHOUSE", "MISSING", "EXTRA", "DIFFERING"
    );
    for t in results {
        println!(
            "{:<28} {:<28} {:>10} {:>10} {:>8} {:>8} {:>9}  {}",
            t.source_table,
            t.destination_table,
            t.postgres_rows,
            t.clickhouse_rows,
            t.missing,
            t.extra,
            t.differing,
            if t.equal { "equal" } else { "DIFFERENT" }
        );
    }
    for t in results.iter().filter(|t| !t.equal) {
        println!();
        println!("{}:", t.source_table);
        for (what, examples) in [
            ("missing in ClickHouse", &t.missing_examples),
            ("extra in ClickHouse", &t.extra_examples),
            ("differing", &t.differing_examples),
        ] {
            if !examples.is_empty() {
                println!("  {what}: {}", examples.join("; "));
            }
        }
    }
}
