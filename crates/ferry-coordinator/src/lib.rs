//! The coordinator: Ferry's public API and the driver of every pipe's lifecycle.
//!
//! Any number of replicas run; one is elected leader ([`leadership`]). Every replica serves
//! reads from etcd; writes are carried out by the leader under its fence, and followers forward
//! them ([`api`]). The leader reconciles the desired state in etcd with what runs
//! ([`reconcile`]), on start, on every watch event and periodically, so nothing is stranded by
//! a missed event or a restart.

pub mod api;
mod cleanup;
mod errors;
pub mod leadership;
mod pause;
pub mod reconcile;
mod reload;
mod setup;
mod slot_health;
mod snapshot;
mod verify;
