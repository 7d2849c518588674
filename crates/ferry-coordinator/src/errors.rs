//! Mapping of internal errors to gRPC statuses a client can act on.

use ferry_core::lifecycle::IllegalTransition;
use ferry_core::spec::InvalidSpec;
use ferry_server::telemetry::error_chain;
use ferry_store::StoreError;
use tonic::Status;
use tracing::warn;

/// A store failure as the client sees it: retryable problems are UNAVAILABLE.
pub(crate) fn store_status(error: StoreError) -> Status {
    match &error {
        StoreError::Etcd(_) | StoreError::LeaseLost | StoreError::Compacted(_) => {
            warn!(error = %error_chain(&error), "etcd unavailable");
            Status::unavailable("etcd is unavailable; retry shortly")
        }
        StoreError::Fenced => {
            Status::unavailable("coordinator leadership changed during the request; retry")
        }
        StoreError::Conflict { .. } => {
            Status::aborted("the pipe changed concurrently; read it again and retry")
        }
        StoreError::AlreadyExists { .. } => Status::already_exists(error.to_string()),
        StoreError::Decode { .. } => {
            warn!(error = %error_chain(&error), "undecodable value in etcd");
            Status::internal(error.to_string())
        }
    }
}

/// INVALID_ARGUMENT naming every bad field.
pub(crate) fn invalid_spec(error: &InvalidSpec) -> Status {
    Status::invalid_argument(error.to_string())
}

/// FAILED_PRECONDITION for an event the pipe's state does not allow.
pub(crate) fn illegal(pipe: &str, error: &IllegalTransition) -> Status {
    Status::failed_precondition(format!("pipe {pipe}: {error}"))
}
