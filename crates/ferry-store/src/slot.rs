//! The replication slot's health (`pipes/<pipe>/slot_health`), checked by the leader and
//! shown in the pipe's status. Kept apart from the status so a check every few seconds does
//! not contend with the status's compare-and-swap writers.

use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use ferry_proto::v1::SlotHealth;
use prost::Message as _;

use crate::{Fence, Store, StoreError};

impl Store {
    /// Records the slot's health under the fence, only while the pipe exists (a check that
    /// finishes after the pipe was deleted must not leave a key behind). Returns false if the
    /// pipe is gone.
    pub async fn put_slot_health(
        &self,
        fence: &Fence,
        pipe: &str,
        health: &SlotHealth,
    ) -> Result<bool, StoreError> {
        let keys = self.keys();
        let status_key = keys.pipe_status(pipe);
        let txn = Txn::new()
            .when([
                fence.compare(),
                Compare::create_revision(status_key.clone(), CompareOp::Greater, 0),
            ])
            .and_then([TxnOp::put(
                keys.slot_health(pipe),
                health.encode_to_vec(),
                None,
            )]);
        if self.run_txn(txn, false).await?.succeeded() {
            return Ok(true);
        }
        match self
            .why_failed(fence, StoreError::Conflict { key: status_key })
            .await
        {
            StoreError::Conflict { .. } => Ok(false),
            other => Err(other),
        }
    }

    /// The slot's health as last checked, if it was.
    pub async fn slot_health(&self, pipe: &str) -> Result<Option<SlotHealth>, StoreError> {
        self.get_one(self.keys().slot_health(pipe)).await
    }

    /// The value of one key, decoded; `None` if absent.
    pub(crate) async fn get_one<M: prost::Message + Default>(
        &self,
        key: String,
    ) -> Result<Option<M>, StoreError> {
        let response = self
            .request(true, |mut c| {
                let key = key.clone();
                async move { c.get(key, None).await }
            })
            .await?;
        response
            .kvs()
            .first()
            .map(|kv| M::decode(kv.value()).map_err(|e| StoreError::decode(kv.key(), e)))
            .transpose()
    }
}
