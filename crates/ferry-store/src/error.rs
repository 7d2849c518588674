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
    /// Whether a retry of the same operation may succeed (etcd unreachable, overloaded, ...).
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Etcd(_) | Self::LeaseLost)
    }

    pub(crate) fn decode(key: &[u8], source: prost::DecodeError) -> Self {
        Self::Decode {
            key: display_key(key),
            source,
        }
    }
}
