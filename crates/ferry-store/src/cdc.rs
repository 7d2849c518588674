//! CDC ownership and checkpoints.
//!
//! One cdc-worker at a time owns a pipe's replication slot: `owners/cdc/<pipe>`, created only
//! if absent and bound to the worker's lease. The checkpoint is written only while that claim
//! stands, so a worker that lost its lease (and may have been replaced) cannot move it.

use etcd_client::{Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp};
use ferry_proto::v1::{Checkpoint, PipeError, ReplicationStatus, TableState};
use prost::Message as _;

use crate::{Session, Store, StoreError};

/// A worker's claim on a pipe's stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CdcClaim {
    /// The owner key.
    pub key: String,
    /// The pipe.
    pub pipe: String,
    /// The claimer's lease.
    pub lease: i64,
}

impl Store {
    /// Claims the stream of `pipe` for `worker`, if nobody owns it and the pipe's status is
    /// still the one read at `status_revision` (a stale read of a pipe being paused or deleted
    /// cannot start a stream).
    pub async fn claim_cdc(
        &self,
        session: &Session,
        pipe: &str,
        status_revision: i64,
        worker: &str,
    ) -> Result<Option<CdcClaim>, StoreError> {
        let key = self.keys().cdc_owner(pipe);
        let lease = session.lease_id();
        let txn = Txn::new()
            .when([
                Compare::create_revision(key.clone(), CompareOp::Equal, 0),
                Compare::mod_revision(
                    self.keys().pipe_status(pipe),
                    CompareOp::Equal,
                    status_revision,
                ),
            ])
            .and_then([TxnOp::put(
                key.clone(),
                worker,
                Some(PutOptions::new().with_lease(lease)),
            )]);
        let response = self.run_txn(txn, false).await?;
        Ok(response.succeeded().then(|| CdcClaim {
            key,
            pipe: pipe.to_owned(),
            lease,
        }))
    }

    /// The owner of a pipe's stream and its lease, if any.
    pub async fn cdc_owner(&self, pipe: &str) -> Result<Option<(String, i64)>, StoreError> {
        let key = self.keys().cdc_owner(pipe);
        let response = self
            .request(true, |mut c| {
                let key = key.clone();
                async move { c.get(key, None).await }
            })
            .await?;
        Ok(response
            .kvs()
            .first()
            .map(|kv| (String::from_utf8_lossy(kv.value()).into_owned(), kv.lease())))
    }

    /// Every stream claim held under `lease`, as (pipe, owner key): one request.
    pub async fn cdc_claims_of(&self, lease: i64) -> Result<Vec<(String, String)>, StoreError> {
        let prefix = self.keys().cdc_owners();
        let response = self
            .request(true, |mut c| {
                let prefix = prefix.clone();
                async move { c.get(prefix, Some(GetOptions::new().with_prefix())).await }
            })
            .await?;
        Ok(response
            .kvs()
            .iter()
            .filter(|kv| kv.lease() == lease)
            .filter_map(|kv| {
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                let pipe = key.strip_prefix(prefix.as_str())?.to_owned();
                Some((pipe, key))
            })
            .collect())
    }

    /// Releases the claim at `key` if `lease` still holds it.
    pub async fn drop_cdc_claim(&self, key: &str, lease: i64) -> Result<(), StoreError> {
        let txn = Txn::new()
            .when([Compare::lease(key.to_owned(), CompareOp::Equal, lease)])
            .and_then([TxnOp::delete(key.to_owned(), None)]);
        self.run_txn(txn, false).await?;
        Ok(())
    }

    /// Releases a stream claim (on a clean stop).
    pub async fn release_cdc(&self, claim: &CdcClaim) -> Result<(), StoreError> {
        let txn = Txn::new()
            .when([Compare::lease(
                claim.key.clone(),
                CompareOp::Equal,
                claim.lease,
            )])
            .and_then([TxnOp::delete(claim.key.clone(), None)]);
        self.run_txn(txn, false).await?;
        Ok(())
    }

    /// The pipe's checkpoint, if one was written.
    pub async fn checkpoint(&self, pipe: &str) -> Result<Option<Checkpoint>, StoreError> {
        let key = self.keys().pipe_checkpoint(pipe);
        let response = self
            .request(true, |mut c| {
                let key = key.clone();
                async move { c.get(key, Some(GetOptions::new())).await }
            })
            .await?;
        response
            .kvs()
            .first()
            .map(|kv| Checkpoint::decode(kv.value()).map_err(|e| StoreError::decode(kv.key(), e)))
            .transpose()
    }

    /// Writes the checkpoint, only while `claim` stands. Returns false if the claim is lost.
    pub async fn put_checkpoint(
        &self,
        claim: &CdcClaim,
        checkpoint: &Checkpoint,
    ) -> Result<bool, StoreError> {
        let txn = Txn::new()
            .when([Compare::lease(
                claim.key.clone(),
                CompareOp::Equal,
                claim.lease,
            )])
            .and_then([TxnOp::put(
                self.keys().pipe_checkpoint(&claim.pipe),
                checkpoint.encode_to_vec(),
                None,
            )]);
        let response = self.run_txn(txn, false).await?;
        Ok(response.succeeded())
    }

    /// Records the new state of a table whose columns changed, while `claim` stands.
    pub async fn put_table_state_claimed(
        &self,
        claim: &CdcClaim,
        table: &str,
        state: &TableState,
    ) -> Result<bool, StoreError> {
        self.put_claimed(
            claim,
            self.keys().pipe_table(&claim.pipe, table),
            state.encode_to_vec(),
        )
        .await
    }

    /// Publishes the stream's progress, while `claim` stands.
    pub async fn put_replication_status(
        &self,
        claim: &CdcClaim,
        status: &ReplicationStatus,
    ) -> Result<bool, StoreError> {
        self.put_claimed(
            claim,
            self.keys().replication(&claim.pipe),
            status.encode_to_vec(),
        )
        .await
    }

    /// Reports a failure the stream cannot get past; the coordinator fails the pipe with it.
    pub async fn report_stream_error(
        &self,
        claim: &CdcClaim,
        error: &PipeError,
    ) -> Result<bool, StoreError> {
        self.put_claimed(
            claim,
            self.keys().stream_error(&claim.pipe),
            error.encode_to_vec(),
        )
        .await
    }

    /// The stream failure reported for a pipe, if any.
    pub async fn stream_error(&self, pipe: &str) -> Result<Option<PipeError>, StoreError> {
        let key = self.keys().stream_error(pipe);
        let response = self
            .request(true, |mut c| {
                let key = key.clone();
                async move { c.get(key, None).await }
            })
            .await?;
        response
            .kvs()
            .first()
            .map(|kv| PipeError::decode(kv.value()).map_err(|e| StoreError::decode(kv.key(), e)))
            .transpose()
    }

    /// Writes `key` only while `claim` stands. Returns false if the claim is lost.
    pub(crate) async fn put_claimed(
        &self,
        claim: &CdcClaim,
        key: String,
        value: Vec<u8>,
    ) -> Result<bool, StoreError> {
        let txn = Txn::new()
            .when([Compare::lease(
                claim.key.clone(),
                CompareOp::Equal,
                claim.lease,
            )])
            .and_then([TxnOp::put(key, value, None)]);
        let response = self.run_txn(txn, false).await?;
        Ok(response.succeeded())
    }
}
