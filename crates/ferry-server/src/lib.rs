//! The runtime every Ferry service shares: configuration flags ([`config`]), logging
//! ([`telemetry`]), the gRPC server with health and reflection ([`grpc`]), shutdown signals
//! ([`shutdown`]), worker membership in etcd ([`membership`]) and retry pacing ([`retry`]).

pub mod config;
pub mod grpc;
pub mod membership;
pub mod retry;
pub mod shutdown;
pub mod telemetry;
pub mod worker;
