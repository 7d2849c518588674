//! The ClickHouse sink.
//!
//! - [`types`]: the Postgres → ClickHouse type mapping of DESIGN.md §5.
//! - [`ddl`]: destination tables (`ReplacingMergeTree(_ferry_version, _ferry_is_deleted)`
//!   ordered by the source's row key, plus Ferry's metadata columns).

pub mod ddl;
pub mod types;
