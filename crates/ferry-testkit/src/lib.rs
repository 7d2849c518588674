//! Real servers for tests: PostgreSQL 15 (`initdb`, `wal_level=logical`), etcd 3.4 (one member
//! or a three-member cluster), ClickHouse (the chdb engine behind `deploy/local/chdb_server.py`),
//! and Ferry's own services, each a child process on free loopback ports in a temp directory.
//!
//! Every process runs in its own process group and is killed with its group when its handle is
//! dropped, so a failing or panicking test leaves nothing behind.

pub mod clickhouse;
pub mod etcd;
pub mod ferry;
pub mod postgres;
mod process;
pub mod spec;
pub mod wait;

pub use process::{ChildProcess, KitError, free_port, repo_root};
