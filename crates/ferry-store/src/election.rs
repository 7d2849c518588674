//! Coordinator leader election on etcd's election API.
//!
//! A coordinator campaigns with its session's lease; etcd makes the candidate whose key was
//! created first the leader. The leader's key and its create revision form a [`Fence`]: every
//! leader write is a transaction that succeeds only while that very key still exists, so a
//! deposed leader (lease lost, key deleted, a new leader elected) cannot write even if it has
//! not noticed yet.

use etcd_client::{Compare, CompareOp, LeaderKey, ResignOptions};
use ferry_proto::v1::CoordinatorLeader;
use prost::Message as _;
use tracing::info;

use crate::{Session, Store, StoreError};

/// Proof of leadership to attach to writes: the leader key and its create revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    key: Vec<u8>,
    revision: i64,
}

impl Fence {
    /// A fence on `key` created at `revision`.
    pub fn new(key: Vec<u8>, revision: i64) -> Self {
        Self { key, revision }
    }

    /// The transaction guard: true only while the leader key is the one created at `revision`.
    pub(crate) fn compare(&self) -> Compare {
        Compare::create_revision(self.key.clone(), CompareOp::Equal, self.revision)
    }

    /// Whether the guard still holds, read now (for distinguishing a failed transaction's cause).
    pub(crate) async fn holds(&self, store: &Store) -> Result<bool, StoreError> {
        let response = store
            .request(true, |mut c| {
                let key = self.key.clone();
                async move { c.get(key, None).await }
            })
            .await?;
        Ok(response
            .kvs()
            .first()
            .is_some_and(|kv| kv.create_revision() == self.revision))
    }
}

/// The leadership won by a campaign.
#[derive(Debug)]
pub struct Leadership {
    leader_key: LeaderKey,
    fence: Fence,
}

impl Leadership {
    /// Campaigns until elected. The session must be alive: a leader is only one whose lease has
    /// been renewed at least once. Returns [`StoreError::LeaseLost`] if the session is lost first.
    pub async fn campaign(
        store: &Store,
        session: &Session,
        me: &CoordinatorLeader,
    ) -> Result<Self, StoreError> {
        if !session.is_alive() {
            return Err(StoreError::LeaseLost);
        }
        let name = store.keys().election();
        // Campaign blocks until elected: it must not carry the unary request deadline.
        let mut client = store.stream_client();
        let campaign = client.campaign(name, me.encode_to_vec(), session.lease_id());
        let response = tokio::select! {
            response = campaign => response?,
            _ = session.lost() => return Err(StoreError::LeaseLost),
        };
        let leader_key = response.leader().cloned().ok_or_else(|| {
            etcd_client::Error::ElectError("campaign returned no leader key".into())
        })?;
        let fence = Fence::new(leader_key.key().to_vec(), leader_key.rev());
        info!(
            coordinator = %me.coordinator_id,
            revision = leader_key.rev(),
            "elected coordinator leader"
        );
        Ok(Self { leader_key, fence })
    }

    /// The fence for this leadership's writes.
    pub fn fence(&self) -> &Fence {
        &self.fence
    }

    /// Gives up leadership so another candidate is elected without waiting for the lease TTL.
    pub async fn resign(self, store: &Store) -> Result<(), StoreError> {
        store
            .client()
            .resign(Some(ResignOptions::new().with_leader(self.leader_key)))
            .await?;
        info!("resigned coordinator leadership");
        Ok(())
    }
}

/// The current leader, if any, as it announced itself.
pub async fn current_leader(store: &Store) -> Result<Option<CoordinatorLeader>, StoreError> {
    let name = store.keys().election();
    let answer = store
        .request(true, |mut c| {
            let name = name.clone();
            async move { c.leader(name).await }
        })
        .await;
    match answer {
        Ok(response) => match response.kv() {
            Some(kv) => CoordinatorLeader::decode(kv.value())
                .map(Some)
                .map_err(|e| StoreError::decode(kv.key(), e)),
            None => Ok(None),
        },
        // etcd answers "election: no leader" as an error status.
        Err(etcd_client::Error::GRpcStatus(status)) if status.message().contains("no leader") => {
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}
