//! `ferry`: create, inspect and steer pipes through a coordinator's `PipeService`.

mod render;
mod verify;

use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use ferry_proto::v1::pipe_service_client::PipeServiceClient;
use ferry_proto::v1::*;
use tonic::transport::Channel;

/// Ferry: PostgreSQL → ClickHouse replication.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Coordinator address.
    #[arg(
        long,
        env = "FERRY_ADDR",
        default_value = "http://127.0.0.1:7400",
        global = true
    )]
    addr: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a pipe. Passwords are read from FERRY_SOURCE_PASSWORD and
    /// FERRY_CLICKHOUSE_PASSWORD, never from flags (which end up in shell history).
    Create(Box<CreateArgs>),
    /// List pipes.
    List {
        /// Only pipes in these states (e.g. running, failed).
        #[arg(long = "state", value_enum)]
        states: Vec<StateArg>,
    },
    /// Show one pipe.
    Get { name: String },
    /// Follow a pipe's state changes until it is deleted (Ctrl-C to stop).
    Watch { name: String },
    /// Pause CDC after flushing the in-flight batch.
    Pause { name: String },
    /// Resume a paused pipe.
    Resume { name: String },
    /// Reload every table and swap it in atomically.
    Resync { name: String },
    /// Add tables (schema.table, or table for public.table).
    AddTables {
        name: String,
        #[arg(required = true)]
        tables: Vec<String>,
    },
    /// Stop replicating tables (schema.table).
    RemoveTables {
        name: String,
        #[arg(required = true)]
        tables: Vec<String>,
    },
    /// Change settings of a pipe; only the flags given change.
    Settings {
        name: String,
        #[command(flatten)]
        settings: SettingsArgs,
    },
    /// Delete a pipe: drop its replication slot and publication (and with --drop-tables its
    /// ClickHouse tables), then forget it. Prints whatever could not be dropped, with the SQL
    /// that drops it.
    Delete {
        name: String,
        /// Also drop the pipe's ClickHouse tables, their _current views and resync shadows.
        #[arg(long)]
        drop_tables: bool,
        /// Forget the pipe even if its source cannot be reached (what is left is printed).
        #[arg(long)]
        force: bool,
    },
    /// Compare every value of the pipe's tables between Postgres and ClickHouse, at a
    /// consistent point. Exits 0 when equal, 1 on any difference (or error).
    Verify {
        name: String,
        /// Only these tables (schema.table, or table for public.table); repeat for more.
        #[arg(long = "table")]
        tables: Vec<String>,
        /// Seconds a running pipe's checkpoint may take to catch up with the snapshot.
        #[arg(long)]
        checkpoint_timeout: Option<u64>,
    },
}

#[derive(Debug, clap::Args)]
struct CreateArgs {
    /// Pipe name: a-z, 0-9 and '_', starting with a letter.
    name: String,
    /// Source tables as schema.table (or table, for public.table); repeat or comma-separate.
    #[arg(long = "table", required = true, value_delimiter = ',')]
    tables: Vec<String>,
    #[arg(long, value_enum, default_value = "snapshot-and-cdc")]
    mode: ModeArg,
    /// Postgres host.
    #[arg(long)]
    source_host: String,
    #[arg(long, default_value_t = 5432)]
    source_port: u32,
    #[arg(long)]
    source_database: String,
    #[arg(long)]
    source_user: String,
    /// Existing publication to use (default: Ferry creates ferry_<name>).
    #[arg(long)]
    publication: Option<String>,
    /// ClickHouse HTTP URL.
    #[arg(long)]
    clickhouse_url: String,
    #[arg(long, default_value = "default")]
    clickhouse_database: String,
    #[arg(long, default_value = "default")]
    clickhouse_user: String,
    /// A column's ClickHouse type instead of the default mapping, as
    /// schema.table.column=TYPE (or table.column=TYPE for public): String (any column),
    /// Decimal(P,S) (numeric) or JSON (json, jsonb); repeat for more columns.
    #[arg(long = "column-type", value_name = "TABLE.COLUMN=TYPE")]
    column_types: Vec<String>,
    /// ClickHouse type of numerics declared without precision.
    #[arg(long, value_enum, default_value = "decimal")]
    unconstrained_numeric: UnconstrainedNumericArg,
    /// Numerics a Decimal column cannot hold: fail the pipe, clamp them to the Decimal's
    /// bounds, or write NULL (Nullable columns); altered values are counted in `ferry get`.
    #[arg(long, value_enum, default_value = "fail")]
    out_of_range: OutOfRangeArg,
    #[command(flatten)]
    settings: SettingsArgs,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum UnconstrainedNumericArg {
    /// Decimal(76, 38).
    Decimal,
    /// String with Postgres's exact text.
    String,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum OutOfRangeArg {
    Fail,
    Clamp,
    Null,
}

/// Puts each `schema.table.column=TYPE` into its table's mapping.
fn apply_column_types(tables: &mut [TableMapping], given: &[String]) -> anyhow::Result<()> {
    for item in given {
        let (target, ty) = item
            .split_once('=')
            .with_context(|| format!("--column-type {item}: expected TABLE.COLUMN=TYPE"))?;
        let (table, column) = target
            .rsplit_once('.')
            .with_context(|| format!("--column-type {item}: expected TABLE.COLUMN=TYPE"))?;
        let table = qualified(table);
        let mapping = tables
            .iter_mut()
            .find(|t| {
                let schema = if t.source_schema.is_empty() {
                    "public"
                } else {
                    &t.source_schema
                };
                format!("{schema}.{}", t.source_table) == table
            })
            .with_context(|| format!("--column-type {item}: {table} is not one of the --table"))?;
        mapping
            .column_types
            .insert(column.to_owned(), ty.trim().to_owned());
    }
    Ok(())
}

#[derive(Debug, clap::Args)]
struct SettingsArgs {
    /// Seconds between CDC batches.
    #[arg(long)]
    sync_interval: Option<i64>,
    /// Most changes in one CDC batch.
    #[arg(long)]
    pull_batch_size: Option<i64>,
    /// Rows per snapshot partition.
    #[arg(long)]
    rows_per_partition: Option<i64>,
    /// Partitions of one table copied at once.
    #[arg(long)]
    parallel_partitions: Option<i64>,
    /// Tables copied at once.
    #[arg(long)]
    parallel_tables: Option<i64>,
    /// Use destination tables that already hold rows.
    #[arg(long)]
    allow_non_empty_destination: Option<bool>,
    /// WAL (bytes) the replication slot may retain before the pipe shows a warning.
    #[arg(long)]
    slot_wal_warning_bytes: Option<i64>,
}

impl SettingsArgs {
    fn to_proto(&self) -> PipeSettings {
        PipeSettings {
            sync_interval: self
                .sync_interval
                .map(|seconds| prost_types::Duration { seconds, nanos: 0 }),
            pull_batch_size: self.pull_batch_size,
            snapshot_rows_per_partition: self.rows_per_partition,
            snapshot_parallel_partitions: self.parallel_partitions,
            snapshot_parallel_tables: self.parallel_tables,
            allow_non_empty_destination: self.allow_non_empty_destination,
            slot_wal_warning_bytes: self.slot_wal_warning_bytes,
            // Chosen at creation only (CreateArgs).
            unconstrained_numeric: 0,
            out_of_range: 0,
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ModeArg {
    SnapshotAndCdc,
    CdcOnly,
    SnapshotOnly,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum StateArg {
    Provisioning,
    Setup,
    Snapshot,
    Running,
    Pausing,
    Paused,
    Modifying,
    Resync,
    Completed,
    Failed,
    Deleting,
}

impl StateArg {
    fn to_proto(self) -> PipeState {
        match self {
            Self::Provisioning => PipeState::Provisioning,
            Self::Setup => PipeState::Setup,
            Self::Snapshot => PipeState::Snapshot,
            Self::Running => PipeState::Running,
            Self::Pausing => PipeState::Pausing,
            Self::Paused => PipeState::Paused,
            Self::Modifying => PipeState::Modifying,
            Self::Resync => PipeState::Resync,
            Self::Completed => PipeState::Completed,
            Self::Failed => PipeState::Failed,
            Self::Deleting => PipeState::Deleting,
        }
    }
}

fn table_mapping(table: &str) -> TableMapping {
    let (schema, name) = table.split_once('.').unwrap_or(("", table));
    TableMapping {
        source_schema: schema.into(),
        source_table: name.into(),
        destination_table: String::new(),
        column_types: Default::default(),
    }
}

fn qualified(table: &str) -> String {
    if table.contains('.') {
        table.to_owned()
    } else {
        format!("public.{table}")
    }
}

async fn connect(addr: &str) -> anyhow::Result<PipeServiceClient<Channel>> {
    let uri = if addr.contains("://") {
        addr.to_owned()
    } else {
        format!("http://{addr}")
    };
    let channel = Channel::from_shared(uri.clone())
        .with_context(|| format!("bad coordinator address {addr}"))?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| format!("cannot reach the coordinator at {uri}"))?;
    Ok(PipeServiceClient::new(channel))
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    if let Err(error) = run(cli).await {
        match error.downcast_ref::<tonic::Status>() {
            Some(status) => eprintln!("error: {} ({:?})", status.message(), status.code()),
            None => eprintln!("error: {error:#}"),
        }
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let mut client = connect(&cli.addr).await?;
    match cli.command {
        Command::Create(args) => {
            let mut tables: Vec<TableMapping> =
                args.tables.iter().map(|t| table_mapping(t)).collect();
            apply_column_types(&mut tables, &args.column_types)?;
            let mut settings = args.settings.to_proto();
            settings.unconstrained_numeric = match args.unconstrained_numeric {
                UnconstrainedNumericArg::Decimal => UnconstrainedNumeric::Decimal7638,
                UnconstrainedNumericArg::String => UnconstrainedNumeric::String,
            }
            .into();
            settings.out_of_range = match args.out_of_range {
                OutOfRangeArg::Fail => OutOfRange::Fail,
                OutOfRangeArg::Clamp => OutOfRange::Clamp,
                OutOfRangeArg::Null => OutOfRange::Null,
            }
            .into();
            let spec = PipeSpec {
                name: args.name,
                source: Some(PostgresSource {
                    host: args.source_host,
                    port: args.source_port,
                    database: args.source_database,
                    user: args.source_user,
                    ssl_mode: SslMode::Unspecified.into(),
                    publication: args.publication.unwrap_or_default(),
                    slot_name: String::new(),
                }),
                destination: Some(ClickHouseDestination {
                    url: args.clickhouse_url,
                    database: args.clickhouse_database,
                    user: args.clickhouse_user,
                }),
                tables,
                mode: match args.mode {
                    ModeArg::SnapshotAndCdc => PipeMode::SnapshotAndCdc,
                    ModeArg::CdcOnly => PipeMode::CdcOnly,
                    ModeArg::SnapshotOnly => PipeMode::SnapshotOnly,
                }
                .into(),
                settings: Some(settings),
            };
            let secrets = PipeSecrets {
                source_password: std::env::var("FERRY_SOURCE_PASSWORD").unwrap_or_default(),
                destination_password: std::env::var("FERRY_CLICKHOUSE_PASSWORD")
                    .unwrap_or_default(),
            };
            let response = client
                .create_pipe(CreatePipeRequest {
                    spec: Some(spec),
                    secrets: Some(secrets),
                })
                .await?;
            render::pipe(response.get_ref().pipe.as_ref());
        }
        Command::List { states } => {
            let states = states.into_iter().map(|s| s.to_proto().into()).collect();
            let response = client.list_pipes(ListPipesRequest { states }).await?;
            render::list(&response.get_ref().pipes);
        }
        Command::Get { name } => {
            let response = client.get_pipe(GetPipeRequest { name }).await?;
            render::pipe(response.get_ref().pipe.as_ref());
        }
        Command::Watch { name } => {
            let mut stream = client
                .watch_pipe(WatchPipeRequest { name })
                .await?
                .into_inner();
            let mut progress = render::Progress::default();
            while let Some(update) = stream.message().await? {
                progress.show(&update);
                if update.deleted {
                    break;
                }
            }
        }
        Command::Pause { name } => {
            let r = client.pause_pipe(PausePipeRequest { name }).await?;
            render::pipe(r.get_ref().pipe.as_ref());
        }
        Command::Resume { name } => {
            let r = client.resume_pipe(ResumePipeRequest { name }).await?;
            render::pipe(r.get_ref().pipe.as_ref());
        }
        Command::Resync { name } => {
            let r = client
                .resync_pipe(ResyncPipeRequest {
                    name,
                    ..Default::default()
                })
                .await?;
            render::pipe(r.get_ref().pipe.as_ref());
        }
        Command::AddTables { name, tables } => {
            let tables = tables.iter().map(|t| table_mapping(t)).collect();
            let r = client.add_tables(AddTablesRequest { name, tables }).await?;
            render::pipe(r.get_ref().pipe.as_ref());
        }
        Command::RemoveTables { name, tables } => {
            let source_tables = tables.iter().map(|t| qualified(t)).collect();
            let r = client
                .remove_tables(RemoveTablesRequest {
                    name,
                    source_tables,
                    ..Default::default()
                })
                .await?;
            render::pipe(r.get_ref().pipe.as_ref());
        }
        Command::Settings { name, settings } => {
            let r = client
                .update_pipe_settings(UpdatePipeSettingsRequest {
                    name,
                    settings: Some(settings.to_proto()),
                })
                .await?;
            render::pipe(r.get_ref().pipe.as_ref());
        }
        Command::Verify {
            name,
            tables,
            checkpoint_timeout,
        } => {
            let tables = tables.iter().map(|t| qualified(t)).collect();
            if !verify::run(&mut client, name, tables, checkpoint_timeout).await? {
                std::process::exit(1);
            }
        }
        Command::Delete {
            name,
            drop_tables,
            force,
        } => {
            let r = client
                .delete_pipe(DeletePipeRequest {
                    name: name.clone(),
                    drop_destination_tables: drop_tables,
                    force,
                })
                .await?;
            render::deleted(&name, r.get_ref());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn column_types_go_to_their_table() {
        let mut tables = vec![table_mapping("orders"), table_mapping("sales.items")];
        apply_column_types(
            &mut tables,
            &[
                "orders.total=Decimal(20,4)".into(),
                "public.orders.note=String".into(),
                "sales.items.doc=JSON".into(),
            ],
        )
        .unwrap();
        assert_eq!(tables[0].column_types["total"], "Decimal(20,4)");
        assert_eq!(tables[0].column_types["note"], "String");
        assert_eq!(tables[1].column_types["doc"], "JSON");
        for bad in ["orders.total", "total=String", "other.total=String"] {
            assert!(
                apply_column_types(&mut tables, &[bad.into()]).is_err(),
                "{bad}"
            );
        }
    }
}
