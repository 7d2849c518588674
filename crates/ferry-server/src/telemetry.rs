//! Logging setup: human-readable text by default, JSON lines with `--log-format json`.

use tracing_subscriber::EnvFilter;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log pipelines.
    Json,
}

/// Logging flags.
#[derive(Debug, Clone, clap::Args)]
pub struct LogArgs {
    /// Log line format.
    #[arg(
        long = "log-format",
        env = "FERRY_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub format: LogFormat,
    /// Log filter, as `RUST_LOG` (e.g. `info,ferry_store=debug`).
    #[arg(long = "log-level", env = "FERRY_LOG", default_value = "info")]
    pub filter: String,
}

/// Installs the global subscriber. Logs go to stderr so stdout stays free for output.
pub fn init(args: &LogArgs) {
    let filter = EnvFilter::try_new(&args.filter).unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only on a terminal: a log file or pipeline gets plain `field=value` text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match args.format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init(),
    }
}

/// An error and its sources on one line, for logs (`Display` of most errors omits the cause).
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
