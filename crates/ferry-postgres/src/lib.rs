//! The PostgreSQL source.
//!
//! - [`connection`]: connecting with a pipe's settings and sealed-then-opened password.
//! - [`validate`]: the Setup checks (wal_level, replication role, free slots and senders,
//!   table existence, SELECT privilege, row identity, publication), each failing with the exact
//!   SQL a user runs to fix it.
//! - [`schema`]: the source table definitions Setup records.
//! - [`identity`]: the replica identity and the columns that key a row.
//! - [`lookup`]: rows read back by key (unchanged TOAST values), columns' missing values.
//! - [`slot`]: a replication slot's health and the SQL that drops what a pipe leaves behind.

pub mod connection;
pub mod consistent;
pub mod copy;
mod error;
pub mod identity;
pub mod lookup;
pub mod pgoutput;
mod publication;
pub mod replication;
pub mod schema;
pub mod slot;
pub mod snapshot;
pub mod validate;

pub use error::{SourceError, query_class};
pub use identity::replica_identity_key;

/// The config of a property test: `cases` cases, unless `PROPTEST_CASES` asks for another
/// number (a long run; see the README's "Fuzzing").
#[cfg(test)]
fn proptest_config(cases: u32) -> proptest::test_runner::Config {
    let config = proptest::test_runner::Config::default();
    if std::env::var_os("PROPTEST_CASES").is_some() {
        config
    } else {
        proptest::test_runner::Config { cases, ..config }
    }
}
