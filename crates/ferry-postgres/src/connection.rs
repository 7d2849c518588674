//! Connecting to the source.

use std::time::Duration;

use ferry_proto::v1::{PostgresSource, SslMode};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Config, NoTls};
use tracing::debug;

use crate::SourceError;

/// Settings every Ferry session uses, snapshot and replication alike, so values printed as
/// text (ranges of timestamptz, intervals, bytea) read the same from both.
pub const SESSION_OPTIONS: &str = "-c DateStyle=ISO -c TimeZone=UTC -c IntervalStyle=postgres -c bytea_output=hex -c extra_float_digits=1";

/// Connects to `source` as its user with `password`; the connection task runs in the
/// background and ends when the client is dropped.
pub async fn connect(source: &PostgresSource, password: &str) -> Result<Client, SourceError> {
    match source.ssl_mode() {
        SslMode::Require => return Err(SourceError::TlsUnsupported("require")),
        // Without TLS support, prefer means plaintext, as libpq does when TLS is unavailable.
        SslMode::Disable | SslMode::Prefer | SslMode::Unspecified => {}
    }
    let port = u16::try_from(source.port).unwrap_or(5432);
    let mut config = Config::new();
    config
        .host(&source.host)
        .port(port)
        .dbname(&source.database)
        .user(&source.user)
        .application_name("ferry")
        .options(SESSION_OPTIONS)
        .connect_timeout(Duration::from_secs(10));
    if !password.is_empty() {
        config.password(password);
    }
    let (client, connection) = config
        .connect(NoTls)
        .await
        .map_err(|source_error| classify_connect_error(source, port, source_error))?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            debug!(%error, "source connection ended");
        }
    });
    Ok(client)
}

fn classify_connect_error(
    source: &PostgresSource,
    port: u16,
    error: tokio_postgres::Error,
) -> SourceError {
    let auth = matches!(
        error.code(),
        Some(c) if *c == SqlState::INVALID_PASSWORD
            || *c == SqlState::INVALID_AUTHORIZATION_SPECIFICATION
    );
    if auth {
        SourceError::AuthFailed {
            user: source.user.clone(),
            source: error,
        }
    } else if error.code().is_some() {
        SourceError::Query {
            what: "connect",
            source: error,
        }
    } else {
        SourceError::Unreachable {
            addr: format!("{}:{port}", source.host),
            source: error,
        }
    }
}
