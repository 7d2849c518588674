//! Ferry's domain core: everything that decides, nothing that talks to a network.
//!
//! - [`error_policy`]: what Ferry does about a failure: retry, wait for an operator, or fail.
//! - [`lifecycle`]: the pipe state machine of DESIGN.md §2 as a pure function.
//! - [`mapping`]: the users' choices of how values map: column types, numeric policies.
//! - [`spec`]: validation and normalisation of pipe specs, with field-level errors.
//! - [`secret`]: sealing pipe secrets so etcd never holds them in plaintext.
//! - [`naming`]: names Ferry derives (slots, publications, etcd-safe identifiers).
//! - [`units`]: quantities as people read them.

pub mod error_policy;
pub mod lifecycle;
pub mod mapping;
pub mod naming;
pub mod secret;
pub mod spec;
pub mod units;

pub use ferry_proto::v1::{PipeMode, PipeState, WorkerKind};
