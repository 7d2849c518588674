//! The ClickHouse sink.
//!
//! - [`types`]: the Postgres → ClickHouse type mapping of DESIGN.md §5.
//! - [`transcode`]: Postgres binary values → RowBinary, per-table column plans.
//! - [`sink`]: the ClickHouse server: checks, DDL, RowBinary inserts.
//! - [`ddl`]: destination tables (`ReplacingMergeTree(_ferry_version, _ferry_is_deleted)`
//!   ordered by the source's row key, plus Ferry's metadata columns).

mod altered;
pub mod ddl;
mod decimal;
pub mod sink;
mod text;
pub mod transcode;
pub mod types;
