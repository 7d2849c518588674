use ferry_core::error_policy::{self, ErrorClass};

use crate::keys::display_key;

/// What can go wrong talking to etcd.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// etcd could not be reached or refused the request; worth retrying.
    #[error("etcd request failed")]
    Etcd(#[from] etcd_client::Error),
    /// A stored value is not the protobuf message its key should hold.
    #[error("value at {key} does not decode")]
    Decode {
        /// The key, as text.
        key: String,
        /// Why.
        #[source]
        source: prost::DecodeError,
    },
    /// The write was guarded by a leadership that no longer holds.
    #[error("not the leader any more; the write was refused")]
    Fenced,
    /// The key changed since it was read (compare-and-swap lost).
    #[error("{key} changed concurrently")]
    Conflict {
        /// The key, as text.
        key: String,
    },
    /// A create found the key already there.
    #[error("{key} already exists")]
    AlreadyExists {
        /// The key, as text.
        key: String,
    },
    /// The watched history was compacted; re-list and watch again.
    #[error("watch history was compacted at revision {0}")]
    Compacted(i64),
    /// The session's lease was lost (not renewed in time).
    #[error("etcd lease lost")]
    LeaseLost,
}

impl StoreError {
    /// What the error policy does about it: a failed request goes by its gRPC code (one
    /// that never got an answer is retried); a lost compare-and-swap, a compacted watch or a
    /// lost lease are retried from a fresh read or session; a value that does not decode, a
    /// fenced or duplicate write cannot succeed again as it is.
    pub fn class(&self) -> ErrorClass {
        use etcd_client::Error;
        match self {
            Self::Etcd(Error::GRpcStatus(status)) => {
                error_policy::grpc_status(status.code() as i32)
            }
            Self::Etcd(
                Error::InvalidArgs(_)
                | Error::InvalidUri(_)
                | Error::Utf8Error(_)
                | Error::InvalidMetadataValue(_)
                | Error::EndpointError(_),
            ) => ErrorClass::Permanent,
            Self::Etcd(_) | Self::Conflict { .. } | Self::Compacted(_) | Self::LeaseLost => {
                ErrorClass::Retry
            }
            Self::Decode { .. } | Self::Fenced | Self::AlreadyExists { .. } => {
                ErrorClass::Permanent
            }
        }
    }

    pub(crate) fn decode(key: &[u8], source: prost::DecodeError) -> Self {
        Self::Decode {
            key: display_key(key),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etcd_errors_go_by_grpc_code() {
        let status = |s| StoreError::Etcd(etcd_client::Error::GRpcStatus(s));
        let leader = status(tonic::Status::unavailable("etcdserver: leader changed"));
        assert_eq!(leader.class(), ErrorClass::Retry);
        let denied = status(tonic::Status::permission_denied(
            "etcdserver: permission denied",
        ));
        assert_eq!(denied.class(), ErrorClass::RetryAfterAction);
        let invalid = status(tonic::Status::invalid_argument(
            "etcdserver: key is not provided",
        ));
        assert_eq!(invalid.class(), ErrorClass::Permanent);
        assert_eq!(StoreError::LeaseLost.class(), ErrorClass::Retry);
        assert_eq!(StoreError::Fenced.class(), ErrorClass::Permanent);
    }
}
