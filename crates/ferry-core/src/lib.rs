//! Ferry's domain core: everything that decides, nothing that talks to a network.
//!
//! - [`lifecycle`]: the pipe state machine of DESIGN.md §2 as a pure function.
//! - [`column_types`]: the ClickHouse types users may choose for columns.
//! - [`spec`]: validation and normalisation of pipe specs, with field-level errors.
//! - [`secret`]: sealing pipe secrets so etcd never holds them in plaintext.
//! - [`naming`]: names Ferry derives (slots, publications, etcd-safe identifiers).

pub mod column_types;
pub mod lifecycle;
pub mod naming;
pub mod secret;
pub mod spec;

pub use ferry_proto::v1::{PipeMode, PipeState, WorkerKind};
