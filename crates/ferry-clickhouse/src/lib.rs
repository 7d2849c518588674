//! The ClickHouse sink.
//!
//! - [`types`]: the Postgres → ClickHouse type mapping of DESIGN.md §5.
//! - [`transcode`]: Postgres binary values → RowBinary, per-table column plans.
//! - [`sink`]: the ClickHouse server: checks, DDL, RowBinary inserts.
//! - [`failure`]: how a request failed (its exception code) and the error policy's class.
//! - [`ddl`]: destination tables (`ReplacingMergeTree(_ferry_version, _ferry_is_deleted)`
//!   ordered by the source's row key, plus Ferry's metadata columns; keyless tables as
//!   multisets) and the `<table>_current` views.
//! - [`version`]: commit-ordered `_ferry_version`s.
//! - [`teardown`]: dropping a destination table with its view and resync shadow table.

mod altered;
pub mod compare;
pub mod ddl;
mod decimal;
pub mod failure;
pub mod lookup;
pub mod resync;
pub mod rowbinary;
pub mod sink;
pub mod state;
pub mod teardown;
mod text;
pub mod transcode;
pub mod types;
pub mod version;

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
