//! Setup's records and the snapshot plan: table states, partitions with their claims and
//! done-marks, and the exported snapshot.
//!
//! Partitions are claimed by workers with a key bound to the worker's lease
//! (`owners/snapshot/…`), created only if absent; a partition is marked done only in a
//! transaction that proves the claim is still the worker's. A worker that dies loses its claim
//! with its lease and the partition is claimed again; finished partitions stay done.

use etcd_client::{Compare, CompareOp, DeleteOptions, GetOptions, PutOptions, Txn, TxnOp};
use ferry_proto::v1::{
    DestinationLimits, ExportedSnapshot, SnapshotPartition, SourceResources, TableState,
};
use prost::Message;

use crate::keys::display_key;
use crate::{Fence, Session, Store, StoreError};

/// etcd refuses transactions with more operations than this (its default `--max-txn-ops`).
const MAX_TXN_OPS: usize = 100;

/// A claim on a partition, proven by the claimer's lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// The owner key.
    pub key: String,
    /// The partition key.
    pub partition_key: String,
    /// The claimer's lease.
    pub lease: i64,
    /// The partition's revision when it was claimed.
    pub partition_revision: i64,
}

impl Claim {
    /// The claim still stands and the partition is unchanged since it was claimed.
    fn holds(&self) -> Vec<Compare> {
        vec![
            Compare::lease(self.key.clone(), CompareOp::Equal, self.lease),
            Compare::mod_revision(
                self.partition_key.clone(),
                CompareOp::Equal,
                self.partition_revision,
            ),
        ]
    }
}

/// A partition of the plan as read, with its key and revision.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedPartition {
    /// Its key.
    pub key: String,
    /// The partition.
    pub partition: SnapshotPartition,
    /// Its `mod_revision` when read.
    pub revision: i64,
}

impl Store {
    /// All values under `prefix`, decoded, with their keys and revisions.
    async fn list<M: Message + Default>(
        &self,
        prefix: String,
    ) -> Result<Vec<(String, M, i64)>, StoreError> {
        let response = self
            .request(true, |mut c| {
                let prefix = prefix.clone();
                async move { c.get(prefix, Some(GetOptions::new().with_prefix())).await }
            })
            .await?;
        response
            .kvs()
            .iter()
            .map(|kv| {
                let value = M::decode(kv.value()).map_err(|e| StoreError::decode(kv.key(), e))?;
                Ok((display_key(kv.key()), value, kv.mod_revision()))
            })
            .collect()
    }

    /// Writes `puts` under the fence, in as many transactions as etcd's limit requires.
    async fn put_fenced(
        &self,
        fence: &Fence,
        puts: Vec<(String, Vec<u8>)>,
    ) -> Result<(), StoreError> {
        for batch in puts.chunks(MAX_TXN_OPS) {
            let ops: Vec<TxnOp> = batch
                .iter()
                .map(|(key, value)| TxnOp::put(key.clone(), value.clone(), None))
                .collect();
            let txn = Txn::new().when([fence.compare()]).and_then(ops);
            let response = self.run_txn(txn, false).await?;
            if !response.succeeded() {
                return Err(StoreError::Fenced);
            }
        }
        Ok(())
    }

    /// Records the state of the pipe's tables (keyed by schema.table).
    pub async fn put_table_states(
        &self,
        fence: &Fence,
        pipe: &str,
        states: &[(String, TableState)],
    ) -> Result<(), StoreError> {
        let puts = states
            .iter()
            .map(|(table, state)| (self.keys().pipe_table(pipe, table), state.encode_to_vec()))
            .collect();
        self.put_fenced(fence, puts).await
    }

    /// The recorded table states of a pipe, by schema.table.
    pub async fn table_states(&self, pipe: &str) -> Result<Vec<(String, TableState)>, StoreError> {
        let prefix = self.keys().pipe_tables(pipe);
        Ok(self
            .list::<TableState>(prefix.clone())
            .await?
            .into_iter()
            .map(|(key, state, _)| (key[prefix.len()..].to_owned(), state))
            .collect())
    }

    /// Replaces the pipe's snapshot plan, only while the pipe's status is still at
    /// `status_revision` (a Setup that was overtaken cannot overwrite a newer plan).
    pub async fn put_snapshot_plan(
        &self,
        fence: &Fence,
        pipe: &str,
        status_revision: i64,
        partitions: &[SnapshotPartition],
    ) -> Result<(), StoreError> {
        let keys = self.keys();
        let status_key = keys.pipe_status(pipe);
        let guard = || {
            vec![
                fence.compare(),
                Compare::mod_revision(status_key.clone(), CompareOp::Equal, status_revision),
            ]
        };
        let mut batches = vec![vec![TxnOp::delete(
            keys.snapshot_partitions(pipe),
            Some(DeleteOptions::new().with_prefix()),
        )]];
        for chunk in partitions.chunks(MAX_TXN_OPS) {
            batches.push(
                chunk
                    .iter()
                    .map(|p| {
                        let key = keys.snapshot_partition(pipe, &p.source_table, p.index);
                        TxnOp::put(key, p.encode_to_vec(), None)
                    })
                    .collect(),
            );
        }
        for ops in batches {
            let txn = Txn::new().when(guard()).and_then(ops);
            let response = self.run_txn(txn, false).await?;
            if !response.succeeded() {
                let stale = StoreError::Conflict {
                    key: status_key.clone(),
                };
                return Err(self.why_failed(fence, stale).await);
            }
        }
        Ok(())
    }

    /// The snapshot plan of a pipe, in key order.
    pub async fn snapshot_plan(&self, pipe: &str) -> Result<Vec<PlannedPartition>, StoreError> {
        Ok(self
            .list::<SnapshotPartition>(self.keys().snapshot_partitions(pipe))
            .await?
            .into_iter()
            .map(|(key, partition, revision)| PlannedPartition {
                key,
                partition,
                revision,
            })
            .collect())
    }

    /// Marks partitions not done again (to be read under the current exported snapshot),
    /// each only if unchanged since it was read; `held` keeps workers from claiming them.
    /// Returns whether every partition was changed (a copy finishing meanwhile changes one).
    pub async fn reset_partitions(
        &self,
        fence: &Fence,
        partitions: &[PlannedPartition],
        held: bool,
    ) -> Result<bool, StoreError> {
        let mut all = true;
        for planned in partitions {
            let mut partition = planned.partition.clone();
            partition.held = held;
            partition.done = false;
            partition.rows_copied = 0;
            partition.altered.clear();
            partition.snapshot_id.clear();
            partition.snapshot_visibility.clear();
            let txn = Txn::new()
                .when([
                    fence.compare(),
                    Compare::mod_revision(planned.key.clone(), CompareOp::Equal, planned.revision),
                ])
                .and_then([TxnOp::put(
                    planned.key.clone(),
                    partition.encode_to_vec(),
                    None,
                )]);
            all &= self.run_txn(txn, false).await?.succeeded();
        }
        Ok(all)
    }

    /// The live claims on a pipe's partitions: owner key, holder, and the holder's lease.
    pub async fn snapshot_claims(
        &self,
        pipe: &str,
    ) -> Result<Vec<(String, String, i64)>, StoreError> {
        let prefix = self.keys().snapshot_owners(pipe);
        let response = self
            .request(true, |mut c| {
                let prefix = prefix.clone();
                async move { c.get(prefix, Some(GetOptions::new().with_prefix())).await }
            })
            .await?;
        Ok(response
            .kvs()
            .iter()
            .map(|kv| (display_key(kv.key()), display_key(kv.value()), kv.lease()))
            .collect())
    }

    /// Claims a partition for `worker` under its session, if nobody holds it and it has not
    /// changed since `planned` was read (so a stale read cannot redo a finished partition).
    pub async fn claim_partition(
        &self,
        session: &Session,
        pipe: &str,
        planned: &PlannedPartition,
        worker: &str,
    ) -> Result<Option<Claim>, StoreError> {
        let partition = &planned.partition;
        let key = self
            .keys()
            .snapshot_owner(pipe, &partition.source_table, partition.index);
        let lease = session.lease_id();
        let txn = Txn::new()
            .when([
                Compare::create_revision(key.clone(), CompareOp::Equal, 0),
                Compare::mod_revision(planned.key.clone(), CompareOp::Equal, planned.revision),
            ])
            .and_then([TxnOp::put(
                key.clone(),
                worker,
                Some(PutOptions::new().with_lease(lease)),
            )]);
        let response = self.run_txn(txn, false).await?;
        Ok(response.succeeded().then(|| Claim {
            key,
            partition_key: planned.key.clone(),
            lease,
            partition_revision: planned.revision,
        }))
    }

    /// [`Store::claim_partition`], only while the pipe's status is still at
    /// `status_revision`: a worker that read the pipe in Snapshot cannot start a copy after it
    /// was paused (the coordinator counts the claims to decide the pause is complete).
    pub async fn claim_partition_while(
        &self,
        session: &Session,
        pipe: &str,
        status_revision: i64,
        planned: &PlannedPartition,
        worker: &str,
    ) -> Result<Option<Claim>, StoreError> {
        let partition = &planned.partition;
        let key = self
            .keys()
            .snapshot_owner(pipe, &partition.source_table, partition.index);
        let lease = session.lease_id();
        let txn = Txn::new()
            .when([
                Compare::create_revision(key.clone(), CompareOp::Equal, 0),
                Compare::mod_revision(planned.key.clone(), CompareOp::Equal, planned.revision),
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
        Ok(response.succeeded().then(|| Claim {
            key,
            partition_key: planned.key.clone(),
            lease,
            partition_revision: planned.revision,
        }))
    }

    /// Marks a claimed partition done and releases the claim, only if the claim still stands
    /// and the partition was not re-planned meanwhile. Returns false otherwise: the partition
    /// is then redone by whoever claims it next.
    pub async fn complete_partition(
        &self,
        claim: &Claim,
        partition: &SnapshotPartition,
    ) -> Result<bool, StoreError> {
        let txn = Txn::new().when(claim.holds()).and_then([
            TxnOp::put(claim.partition_key.clone(), partition.encode_to_vec(), None),
            TxnOp::delete(claim.key.clone(), None),
        ]);
        let response = self.run_txn(txn, false).await?;
        Ok(response.succeeded())
    }

    /// Gives a claim up without finishing (the partition is retried). `failed` records the
    /// attempt and its error in the partition, if the partition is unchanged since the claim.
    pub async fn release_claim(
        &self,
        claim: &Claim,
        failed: Option<&SnapshotPartition>,
    ) -> Result<(), StoreError> {
        let mut ops = vec![TxnOp::delete(claim.key.clone(), None)];
        if let Some(partition) = failed {
            ops.push(TxnOp::put(
                claim.partition_key.clone(),
                partition.encode_to_vec(),
                None,
            ));
        }
        let just_release = Txn::new()
            .when([Compare::lease(
                claim.key.clone(),
                CompareOp::Equal,
                claim.lease,
            )])
            .and_then([TxnOp::delete(claim.key.clone(), None)]);
        let txn = Txn::new()
            .when(claim.holds())
            .and_then(ops)
            .or_else([TxnOp::txn(just_release)]);
        self.run_txn(txn, false).await?;
        Ok(())
    }

    /// Deletes an owner key if it is still bound to `lease` (a claim left without a copy).
    pub async fn drop_claim(&self, key: &str, lease: i64) -> Result<(), StoreError> {
        let txn = Txn::new()
            .when([Compare::lease(key.to_owned(), CompareOp::Equal, lease)])
            .and_then([TxnOp::delete(key.to_owned(), None)]);
        self.run_txn(txn, false).await?;
        Ok(())
    }

    /// Records the source objects Ferry is about to create for a pipe.
    pub async fn put_resources(
        &self,
        fence: &Fence,
        pipe: &str,
        resources: &SourceResources,
    ) -> Result<(), StoreError> {
        let key = self.keys().pipe_resources(pipe);
        self.put_fenced(fence, vec![(key, resources.encode_to_vec())])
            .await
    }

    /// The source objects recorded for a pipe (empty if none).
    pub async fn resources(&self, pipe: &str) -> Result<SourceResources, StoreError> {
        let key = self.keys().pipe_resources(pipe);
        Ok(self
            .list::<SourceResources>(key.clone())
            .await?
            .into_iter()
            .find(|(k, ..)| *k == key)
            .map(|(_, r, _)| r)
            .unwrap_or_default())
    }

    /// Records what the destination server holds (Setup probes it).
    pub async fn put_destination_limits(
        &self,
        fence: &Fence,
        pipe: &str,
        limits: &DestinationLimits,
    ) -> Result<(), StoreError> {
        let key = self.keys().pipe_destination(pipe);
        self.put_fenced(fence, vec![(key, limits.encode_to_vec())])
            .await
    }

    /// What the destination server holds, if Setup recorded it (pipes created before Ferry
    /// probed it have nothing: their workers use the classic range).
    pub async fn destination_limits(
        &self,
        pipe: &str,
    ) -> Result<Option<DestinationLimits>, StoreError> {
        let key = self.keys().pipe_destination(pipe);
        Ok(self
            .list::<DestinationLimits>(key.clone())
            .await?
            .into_iter()
            .find(|(k, ..)| *k == key)
            .map(|(_, limits, _)| limits))
    }

    /// Publishes the snapshot partitions should import.
    pub async fn put_exported_snapshot(
        &self,
        fence: &Fence,
        pipe: &str,
        snapshot: &ExportedSnapshot,
    ) -> Result<(), StoreError> {
        let key = self.keys().exported_snapshot(pipe);
        self.put_fenced(fence, vec![(key, snapshot.encode_to_vec())])
            .await
    }

    /// The exported snapshot of a pipe, if one is published.
    pub async fn exported_snapshot(
        &self,
        pipe: &str,
    ) -> Result<Option<ExportedSnapshot>, StoreError> {
        Ok(self
            .list::<ExportedSnapshot>(self.keys().exported_snapshot(pipe))
            .await?
            .into_iter()
            .find(|(key, ..)| *key == self.keys().exported_snapshot(pipe))
            .map(|(_, snapshot, _)| snapshot))
    }

    /// Withdraws the exported snapshot (its holder is gone or the snapshot is finished).
    pub async fn delete_exported_snapshot(
        &self,
        fence: &Fence,
        pipe: &str,
    ) -> Result<(), StoreError> {
        let txn = Txn::new()
            .when([fence.compare()])
            .and_then([TxnOp::delete(self.keys().exported_snapshot(pipe), None)]);
        let response = self.run_txn(txn, false).await?;
        if response.succeeded() {
            Ok(())
        } else {
            Err(StoreError::Fenced)
        }
    }
}
