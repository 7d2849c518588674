//! Why a stream stops, what the error policy does about it, and what a person should do.

use ferry_clickhouse::sink::SinkError;
use ferry_clickhouse::transcode::TranscodeError;
use ferry_core::error_policy::{ErrorClass, Verdict};
use ferry_core::secret::SecretError;
use ferry_postgres::SourceError;
use ferry_postgres::pgoutput::DecodeError;
use ferry_store::StoreError;

/// Why a stream stopped.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The replication connection failed.
    #[error("replication stream failed")]
    Replication(#[from] pgwire_replication::PgWireError),
    /// A message did not decode.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// The source refused a query.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// A value did not transcode.
    #[error(transparent)]
    Transcode(#[from] TranscodeError),
    /// ClickHouse refused a request.
    #[error(transparent)]
    Sink(#[from] SinkError),
    /// ClickHouse refused the rows of a table.
    #[error("writing the changes of {table} to ClickHouse failed")]
    Write {
        /// schema.table.
        table: String,
        /// Why.
        #[source]
        source: SinkError,
    },
    /// etcd failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The secrets could not be opened.
    #[error("the pipe's secrets cannot be opened")]
    Secret(#[source] SecretError),
    /// A change for a table the stream does not know.
    #[error("change for unknown relation {0}")]
    UnknownRelation(u32),
    /// A table's columns differ from what Setup recorded.
    #[error("the columns of {table} changed ({detail}); resync the pipe")]
    SchemaChanged {
        /// schema.table.
        table: String,
        /// What differs.
        detail: String,
    },
    /// An update left a TOASTed value out and its row cannot be looked up by key.
    #[error(
        "an update of {table} left TOASTed column {column} out, and the table's key cannot be used to look the row up"
    )]
    UnchangedToast {
        /// schema.table.
        table: String,
        /// The column.
        column: String,
    },
    /// The replica identity no longer sends what Setup recorded as the row key.
    #[error("the replica identity of {table} changed: {detail}")]
    IdentityChanged {
        /// schema.table.
        table: String,
        /// What changed.
        detail: String,
        /// The replica identity Setup recorded.
        restore: String,
    },
    /// A NULL arrived for a column that is still NOT NULL at the source.
    #[error("a NULL arrived for column {column} of {table}, which the source declares NOT NULL")]
    NullInNotNull {
        /// schema.table.
        table: String,
        /// The column.
        column: String,
    },
    /// A replicated table was dropped and created again: a new relation with its name.
    #[error("table {table} was dropped and created again at the source")]
    TableRecreated {
        /// schema.table.
        table: String,
    },
    /// TLS is required but not supported here.
    #[error("ssl_mode require is not supported for replication yet")]
    TlsUnsupported,
    /// The replication slot is gone or can no longer stream (its WAL was removed).
    #[error("replication slot {slot} cannot be used: {detail}")]
    SlotUnusable {
        /// The slot.
        slot: String,
        /// What the server said.
        detail: String,
        /// The pipe (for the remedy).
        pipe: String,
    },
    /// The publication the stream reads is gone.
    #[error("publication {publication} does not exist: {detail}")]
    PublicationMissing {
        /// The publication.
        publication: String,
        /// What the server said.
        detail: String,
        /// The pipe (for the remedy).
        pipe: String,
    },
    /// Another worker took the pipe over.
    #[error("the stream claim was lost")]
    ClaimLost,
    /// The server ended the stream.
    #[error("the replication stream ended")]
    Ended,
}

impl StreamError {
    /// What the error policy does about it: what the stream cannot get past fails the pipe;
    /// ClickHouse, Postgres and etcd errors go by what their server said; a dropped
    /// connection, a lost claim or an ended stream are retried.
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::Decode(_)
            | Self::Transcode(_)
            | Self::UnknownRelation(_)
            | Self::SchemaChanged { .. }
            | Self::UnchangedToast { .. }
            | Self::IdentityChanged { .. }
            | Self::NullInNotNull { .. }
            | Self::TableRecreated { .. }
            | Self::TlsUnsupported
            | Self::SlotUnusable { .. }
            | Self::PublicationMissing { .. }
            | Self::Secret(_) => ErrorClass::Permanent,
            Self::Sink(e) | Self::Write { source: e, .. } => e.class(),
            Self::Source(e) => e.class(),
            Self::Store(e) => e.class(),
            // The server refusing the slot or publication outright is told apart by
            // `source_objects_gone`; anything else here (a restart, the slot still active
            // after a takeover, a dropped connection) passes.
            Self::Replication(_) | Self::ClaimLost | Self::Ended => ErrorClass::Retry,
        }
    }

    /// The error policy's verdict on an error of pipe `pipe`'s stream.
    pub fn verdict(&self, pipe: &str) -> Verdict {
        Verdict::new(self.class(), self.remedy(pipe))
    }

    /// What to do about an error of pipe `pipe`'s stream.
    pub fn remedy(&self, pipe: &str) -> String {
        let resync = |table: &str| format!("ferry resync {pipe} --table {table}");
        match self {
            Self::SchemaChanged { table, .. } | Self::TableRecreated { table } => format!(
                "reload the table with its new definition: {}",
                resync(table)
            ),
            Self::UnchangedToast { table, .. } => format!(
                "run ALTER TABLE {table} REPLICA IDENTITY FULL; then {}",
                resync(table)
            ),
            Self::IdentityChanged { table, restore, .. } => format!(
                "run ALTER TABLE {table} REPLICA IDENTITY {restore} and resume with ferry resync {pipe} --table {table}; or, to key the table differently, change its key and run the same resync"
            ),
            Self::NullInNotNull { table, column } => format!(
                "check the column (ALTER TABLE {table} ALTER COLUMN {column} DROP NOT NULL; if NULLs are meant), then {}",
                resync(table)
            ),
            Self::TlsUnsupported => "use ssl_mode disable or prefer".into(),
            Self::SlotUnusable { pipe, .. } => format!(
                "resync the pipe: ferry resync {pipe} (it creates the slot anew and reloads every table, since the changes the slot held are lost)"
            ),
            Self::PublicationMissing {
                pipe, publication, ..
            } => format!(
                "resync the pipe: ferry resync {pipe} (it recreates a publication Ferry manages; a publication of your own, {publication}, must be created again first)"
            ),
            Self::Secret(_) => {
                "give every worker the secret key the pipe was created with (--secret-key-file)"
                    .into()
            }
            Self::Write { table, source } if source.table_changed() => format!(
                "the destination table of {table} was dropped or altered in ClickHouse: reload it with {}, which creates it anew",
                resync(table)
            ),
            Self::Sink(e) | Self::Write { source: e, .. } => e.remedy(),
            Self::Source(e) => e.remedy(),
            Self::Transcode(e) => e.remedy(),
            _ => format!("see the error; once its cause is fixed, ferry resync {pipe}"),
        }
    }

    /// The table concerned, if any.
    pub fn table(&self) -> Option<&str> {
        match self {
            Self::SchemaChanged { table, .. }
            | Self::UnchangedToast { table, .. }
            | Self::IdentityChanged { table, .. }
            | Self::NullInNotNull { table, .. }
            | Self::TableRecreated { table }
            | Self::Write { table, .. } => Some(table),
            Self::Transcode(e) if !e.table.is_empty() => Some(&e.table),
            _ => None,
        }
    }
}

/// A replication error, recognised as the slot being gone (SQLSTATE 42704) or invalidated
/// (55000, its WAL removed), or the publication gone (42704): retrying cannot help, unless a
/// reload is making them anew.
pub(crate) fn source_objects_gone(
    error: pgwire_replication::PgWireError,
    slot: &str,
    publication: &str,
    pipe: &str,
    reloading: bool,
) -> StreamError {
    match error {
        pgwire_replication::PgWireError::Server(detail) if !reloading => {
            let gone = detail.contains("SQLSTATE 42704") || detail.contains("SQLSTATE 55000");
            if gone && detail.contains("replication slot") {
                StreamError::SlotUnusable {
                    slot: slot.to_owned(),
                    detail,
                    pipe: pipe.to_owned(),
                }
            } else if gone && detail.contains("publication") {
                StreamError::PublicationMissing {
                    publication: publication.to_owned(),
                    detail,
                    pipe: pipe.to_owned(),
                }
            } else {
                StreamError::Replication(pgwire_replication::PgWireError::Server(detail))
            }
        }
        other => StreamError::Replication(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clickhouse::error::Error;

    fn write_failed(answer: &str) -> StreamError {
        StreamError::Write {
            table: "public.items".into(),
            source: SinkError::statement("INSERT", Error::BadResponse(answer.into())),
        }
    }

    #[test]
    fn a_dropped_table_fails_with_its_resync_and_an_overloaded_server_is_retried() {
        let gone = write_failed(
            "Code: 60. DB::Exception: Table dest.items does not exist. (UNKNOWN_TABLE)",
        );
        let verdict = gone.verdict("demo");
        assert_eq!(verdict.class, ErrorClass::Permanent);
        assert!(
            verdict
                .remedy
                .contains("ferry resync demo --table public.items"),
            "{}",
            verdict.remedy
        );
        assert_eq!(gone.table(), Some("public.items"));
        let busy = write_failed("Code: 252. DB::Exception: Too many parts. (TOO_MANY_PARTS)");
        assert_eq!(busy.class(), ErrorClass::Retry);
        assert_eq!(StreamError::ClaimLost.class(), ErrorClass::Retry);
        let recreated = StreamError::TableRecreated {
            table: "public.items".into(),
        };
        assert_eq!(recreated.class(), ErrorClass::Permanent);
    }
}
