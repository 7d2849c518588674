use std::fmt;

use ferry_core::error_policy::{self, ErrorClass};

/// A problem with the source, phrased for the person who has to fix it.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// Nothing answers at the address.
    #[error("cannot connect to Postgres at {addr}")]
    Unreachable {
        /// host:port.
        addr: String,
        /// Why.
        #[source]
        source: tokio_postgres::Error,
    },
    /// The server refused the credentials.
    #[error("Postgres refused the login of user {user}")]
    AuthFailed {
        /// The user.
        user: String,
        /// Why.
        #[source]
        source: tokio_postgres::Error,
    },
    /// A TLS mode Ferry cannot honour.
    #[error("ssl_mode {0} is not supported yet")]
    TlsUnsupported(&'static str),
    /// A query failed.
    #[error("Postgres query failed: {what}")]
    Query {
        /// What was being asked.
        what: &'static str,
        /// Why.
        #[source]
        source: tokio_postgres::Error,
    },
    /// The catalog holds something Ferry does not expect.
    #[error("unexpected Postgres catalog content: {detail}")]
    Catalog {
        /// What.
        detail: String,
    },
    /// The exported snapshot to import no longer exists (its holder ended).
    #[error("exported snapshot {snapshot} is gone")]
    SnapshotGone {
        /// Its id.
        snapshot: String,
    },
    /// `wal_level` is not `logical`.
    #[error("wal_level is {actual}, logical replication needs logical")]
    WalLevel {
        /// The current value.
        actual: String,
    },
    /// The user may not replicate.
    #[error("user {user} has neither the REPLICATION attribute nor superuser")]
    NotReplicationRole {
        /// The user.
        user: String,
    },
    /// No replication slot is free.
    #[error("all {max} replication slots are in use")]
    NoFreeSlots {
        /// max_replication_slots.
        max: i64,
    },
    /// No WAL sender is free.
    #[error("all {max} WAL senders are in use")]
    NoFreeWalSenders {
        /// max_wal_senders.
        max: i64,
    },
    /// A table in the spec does not exist.
    #[error("table {table} does not exist")]
    TableMissing {
        /// schema.table.
        table: String,
    },
    /// The user cannot read a table.
    #[error("user {user} may not SELECT from {table}")]
    NoSelect {
        /// schema.table.
        table: String,
        /// The user.
        user: String,
    },
    /// A table without primary key or usable replica identity.
    #[error("table {table} has no primary key and REPLICA IDENTITY {identity}")]
    NoRowIdentity {
        /// schema.table.
        table: String,
        /// DEFAULT or NOTHING.
        identity: &'static str,
    },
    /// Replica identity DEFAULT over a DEFERRABLE primary key, which Postgres does not accept
    /// as an identity: once the table is published, its UPDATEs and DELETEs fail on the source.
    #[error(
        "the primary key of {table} is DEFERRABLE, which Postgres does not accept as a replica identity: \
         once published, UPDATE and DELETE on the table would fail"
    )]
    DeferrablePrimaryKey {
        /// schema.table.
        table: String,
        /// The primary key's columns, in key order.
        columns: Vec<String>,
    },
    /// The index the replica identity relies on cannot identify rows.
    #[error("the replica identity of {table} is unusable: {reason}")]
    UnusableIdentityIndex {
        /// schema.table.
        table: String,
        /// What is wrong with it.
        reason: String,
        /// Whether a usable primary key exists (REPLICA IDENTITY DEFAULT would then do).
        primary_key: bool,
    },
    /// A partition of a partitioned table is not a plain table (a foreign table, say).
    #[error("partition {partition} of {table} is not a plain table")]
    UnsupportedPartition {
        /// schema.table.
        table: String,
        /// schema.partition.
        partition: String,
    },
    /// Ferry would create the publication but the user does not own the table.
    #[error("user {user} does not own {table}, which creating a publication for it requires")]
    NotOwner {
        /// schema.table.
        table: String,
        /// The user.
        user: String,
    },
    /// A user publication does not publish a partitioned table through its root.
    #[error(
        "publication {publication} does not publish partitioned table {table} through its root"
    )]
    PublicationNotViaRoot {
        /// Its name.
        publication: String,
        /// schema.table.
        table: String,
    },
    /// A named publication does not exist.
    #[error("publication {publication} does not exist")]
    PublicationMissing {
        /// Its name.
        publication: String,
    },
    /// A named publication leaves out some kinds of change, which would be silently lost.
    #[error("publication {publication} does not publish {}: those changes of {table} would be lost", missing.join(", "))]
    PublicationOmitsChanges {
        /// Its name.
        publication: String,
        /// schema.table (the first of the pipe's tables).
        table: String,
        /// insert, update, delete, truncate: the ones it leaves out.
        missing: Vec<&'static str>,
    },
    /// A named publication publishes a table through a row filter (PG15 `WHERE`): rows
    /// outside it, and updates moving rows out of it, would be lost.
    #[error("publication {publication} publishes {table} only WHERE {filter}")]
    PublicationRowFilter {
        /// Its name.
        publication: String,
        /// schema.table.
        table: String,
        /// The filter expression.
        filter: String,
    },
    /// A named publication publishes only some columns of a table (PG15 column list): the
    /// others would arrive as NULL.
    #[error("publication {publication} does not publish column(s) {} of {table}", missing.join(", "))]
    PublicationColumnList {
        /// Its name.
        publication: String,
        /// schema.table.
        table: String,
        /// The table's columns outside the list.
        missing: Vec<String>,
    },
    /// A named publication does not publish a table of the pipe.
    #[error("publication {publication} does not publish {table}")]
    PublicationLacksTable {
        /// Its name.
        publication: String,
        /// schema.table.
        table: String,
    },
}

/// Maps a failed query to [`SourceError::Query`] saying what was being asked.
pub(crate) fn query_error(what: &'static str) -> impl FnOnce(tokio_postgres::Error) -> SourceError {
    move |source| SourceError::Query { what, source }
}

/// Quotes an identifier for SQL shown to users (and run by Ferry).
pub(crate) struct Ident<'a>(pub &'a str);

impl fmt::Display for Ident<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{}\"", self.0.replace('"', "\"\""))
    }
}

/// `"schema"."table"` from `schema.table` as Ferry names tables (neither part contains a dot).
pub(crate) fn quoted_table(table: &str) -> String {
    match table.split_once('.') {
        Some((schema, name)) => format!("{}.{}", Ident(schema), Ident(name)),
        None => Ident(table).to_string(),
    }
}

/// SQL that republishes `table` in `publication` without a row filter or column list. DROP and
/// ADD rather than `SET TABLE`, which would also remove the publication's other tables.
fn republish(publication: &str, table: &str) -> String {
    let (publication, table) = (Ident(publication), quoted_table(table));
    format!(
        "BEGIN; ALTER PUBLICATION {publication} DROP TABLE {table}; ALTER PUBLICATION {publication} ADD TABLE {table}; COMMIT;"
    )
}

impl SourceError {
    /// What the user should do.
    pub fn remedy(&self) -> String {
        match self {
            Self::Unreachable { .. } => "check spec.source.host and port, that Postgres listens on that address (listen_addresses) and that no firewall blocks it".into(),
            Self::AuthFailed { user, .. } => format!("check the password given in secrets.source_password and that pg_hba.conf allows {user} to connect from Ferry's address, for replication too"),
            Self::TlsUnsupported(_) => "use ssl_mode disable or prefer".into(),
            Self::Query { .. } | Self::Catalog { .. } => "check the Postgres server log; retry once the cause is fixed".into(),
            Self::SnapshotGone { .. } => "none: the coordinator exports a new snapshot and the partition is read again".into(),
            Self::WalLevel { .. } => "run ALTER SYSTEM SET wal_level = logical; then restart Postgres".into(),
            Self::NotReplicationRole { user } => format!("run ALTER ROLE {} REPLICATION;", Ident(user)),
            Self::NoFreeSlots { .. } => "drop unused slots (SELECT slot_name FROM pg_replication_slots WHERE NOT active) or raise max_replication_slots and restart Postgres".into(),
            Self::NoFreeWalSenders { .. } => "raise max_wal_senders and restart Postgres, or stop other replication clients".into(),
            Self::TableMissing { .. } => "create the table, or remove it from spec.tables".into(),
            Self::NoSelect { table, user } => format!("run GRANT SELECT ON {} TO {};", quoted_table(table), Ident(user)),
            Self::NoRowIdentity { table, .. } => format!("add a primary key, or run ALTER TABLE {} REPLICA IDENTITY FULL; (or USING INDEX on a unique, non-null index)", quoted_table(table)),
            Self::DeferrablePrimaryKey { table, columns } => {
                let index = format!("{}_ferry_key", table.split_once('.').map_or(table.as_str(), |(_, t)| t));
                let columns = columns.iter().map(|c| Ident(c).to_string()).collect::<Vec<_>>().join(", ");
                format!(
                    "give the table a non-deferrable identity: run CREATE UNIQUE INDEX CONCURRENTLY {index} ON {table} ({columns}); ALTER TABLE {table} REPLICA IDENTITY USING INDEX {index}; \
                     or run ALTER TABLE {table} REPLICA IDENTITY FULL; (ClickHouse then keys rows by every column, since a deferrable key may repeat inside a transaction)",
                    index = Ident(&index),
                    table = quoted_table(table),
                )
            }
            Self::UnusableIdentityIndex { table, primary_key, .. } => {
                let table = quoted_table(table);
                let default = if *primary_key { format!("run ALTER TABLE {table} REPLICA IDENTITY DEFAULT; (the primary key), or ") } else { String::new() };
                format!("{default}run ALTER TABLE {table} REPLICA IDENTITY FULL;, or ALTER TABLE {table} REPLICA IDENTITY USING INDEX naming a unique, valid, non-partial, non-deferrable index over NOT NULL columns")
            }
            Self::UnsupportedPartition { partition, .. } => format!("detach {partition} or replicate its plain partitions as separate tables"),
            Self::NotOwner { table, .. } => format!("run Ferry as the owner of {table}, or create a publication yourself (CREATE PUBLICATION ... FOR TABLE {} WITH (publish_via_partition_root = true);) and name it in spec.source.publication", quoted_table(table)),
            Self::PublicationNotViaRoot { publication, .. } => format!("run ALTER PUBLICATION {} SET (publish_via_partition_root = true);", Ident(publication)),
            Self::PublicationMissing { publication } => format!("create it (CREATE PUBLICATION {} FOR TABLE ...;) or leave spec.source.publication empty so Ferry manages one", Ident(publication)),
            Self::PublicationOmitsChanges { publication, .. } => format!("run ALTER PUBLICATION {} SET (publish = 'insert, update, delete, truncate');", Ident(publication)),
            Self::PublicationRowFilter { publication, table, .. } => format!(
                "publish every row: run {}",
                republish(publication, table)
            ),
            Self::PublicationColumnList { publication, table, missing } => format!(
                "publish every column (also {}): run {}",
                missing.join(", "),
                republish(publication, table)
            ),
            Self::PublicationLacksTable { publication, table } => format!("run ALTER PUBLICATION {} ADD TABLE {};", Ident(publication), quoted_table(table)),
        }
    }

    /// The table concerned, if any.
    pub fn table(&self) -> Option<&str> {
        match self {
            Self::TableMissing { table }
            | Self::NoSelect { table, .. }
            | Self::UnsupportedPartition { table, .. }
            | Self::NotOwner { table, .. }
            | Self::PublicationNotViaRoot { table, .. }
            | Self::NoRowIdentity { table, .. }
            | Self::PublicationLacksTable { table, .. }
            | Self::DeferrablePrimaryKey { table, .. }
            | Self::UnusableIdentityIndex { table, .. }
            | Self::PublicationOmitsChanges { table, .. }
            | Self::PublicationRowFilter { table, .. }
            | Self::PublicationColumnList { table, .. } => Some(table),
            _ => None,
        }
    }

    /// What the error policy does about it: a lost connection or an unreachable server is
    /// retried, a refused login waits for someone to fix it, a failed query goes by its
    /// SQLSTATE, and what validation found wrong with the source is permanent.
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::Unreachable { .. }
            | Self::SnapshotGone { .. }
            | Self::NoFreeWalSenders { .. } => ErrorClass::Retry,
            Self::AuthFailed { .. } => ErrorClass::RetryAfterAction,
            Self::Query { source, .. } => query_class(source),
            _ => ErrorClass::Permanent,
        }
    }
}

/// The error policy's class of a failed query or COPY: by SQLSTATE; one without (the
/// connection closed, an I/O error) is retried.
pub fn query_class(error: &tokio_postgres::Error) -> ErrorClass {
    error.code().map_or(ErrorClass::Retry, |state| {
        error_policy::postgres_sqlstate(state.code())
    })
}
