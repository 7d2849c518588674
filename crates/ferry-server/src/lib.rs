//! The runtime every Ferry service shares: configuration flags ([`config`]), logging
//! ([`telemetry`]), the gRPC server with health and reflection ([`grpc`]), shutdown signals
//! ([`shutdown`]) and worker membership in etcd ([`membership`]).

pub mod config;
pub mod grpc;
pub mod membership;
pub mod shutdown;
pub mod telemetry;
pub mod worker;
