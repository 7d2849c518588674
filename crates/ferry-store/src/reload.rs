//! Reloads of a pipe's tables (resync, tables added or removed): the stream's acknowledgement
//! that it holds, the per-table plan that replaces a table's partitions, and the writes that
//! change a live pipe's spec and status together.

use etcd_client::{Compare, CompareOp, DeleteOptions, Txn, TxnOp};
use ferry_proto::v1::{
    PipeSpec, PipeStatus, ReloadTruncate, SnapshotPartition, StreamHold, TableState,
};
use prost::Message as _;

use crate::cdc::CdcClaim;
use crate::{Fence, Store, StoreError};

/// etcd refuses transactions with more operations than this (its default `--max-txn-ops`).
const MAX_TXN_OPS: usize = 100;

impl Store {
    /// Records what the stream holds for a reload, while `claim` stands. Returns false if the
    /// claim is lost.
    pub async fn put_stream_hold(
        &self,
        claim: &CdcClaim,
        hold: &StreamHold,
    ) -> Result<bool, StoreError> {
        let key = self.keys().stream_hold(&claim.pipe);
        self.put_claimed(claim, key, hold.encode_to_vec()).await
    }

    /// Records a TRUNCATE of `table` applied while a reload copies it, while `claim` stands.
    pub async fn put_reload_truncate(
        &self,
        claim: &CdcClaim,
        table: &str,
        truncate: &ReloadTruncate,
    ) -> Result<bool, StoreError> {
        let key = self.keys().reload_truncate(&claim.pipe, table);
        self.put_claimed(claim, key, truncate.encode_to_vec()).await
    }

    /// The TRUNCATE recorded for `table` during a reload, if any.
    pub async fn reload_truncate(
        &self,
        pipe: &str,
        table: &str,
    ) -> Result<Option<ReloadTruncate>, StoreError> {
        self.get_one(self.keys().reload_truncate(pipe, table)).await
    }

    /// What the stream last acknowledged to a reload, if anything.
    pub async fn stream_hold(&self, pipe: &str) -> Result<Option<StreamHold>, StoreError> {
        self.get_one(self.keys().stream_hold(pipe)).await
    }

    /// Forgets the stream's reported error (a resync starts it again) and, with
    /// `reset_checkpoint`, its checkpoint (the slot was made anew: the stream starts where the
    /// new slot does).
    pub async fn reset_stream(
        &self,
        fence: &Fence,
        pipe: &str,
        reset_checkpoint: bool,
    ) -> Result<(), StoreError> {
        let keys = self.keys();
        let mut ops = vec![TxnOp::delete(keys.stream_error(pipe), None)];
        if reset_checkpoint {
            ops.push(TxnOp::delete(keys.pipe_checkpoint(pipe), None));
        }
        let txn = Txn::new().when([fence.compare()]).and_then(ops);
        if self.run_txn(txn, false).await?.succeeded() {
            Ok(())
        } else {
            Err(StoreError::Fenced)
        }
    }

    /// Replaces a pipe's spec and status together, each only if unchanged since read.
    /// Returns the new revision of both.
    pub async fn put_pipe(
        &self,
        fence: &Fence,
        spec_revision: i64,
        spec: &PipeSpec,
        status_revision: i64,
        status: &PipeStatus,
    ) -> Result<i64, StoreError> {
        let keys = self.keys();
        let (spec_key, status_key) = (keys.pipe_spec(&spec.name), keys.pipe_status(&spec.name));
        let txn = Txn::new()
            .when([
                fence.compare(),
                Compare::mod_revision(spec_key.clone(), CompareOp::Equal, spec_revision),
                Compare::mod_revision(status_key.clone(), CompareOp::Equal, status_revision),
            ])
            .and_then([
                TxnOp::put(spec_key, spec.encode_to_vec(), None),
                TxnOp::put(status_key.clone(), status.encode_to_vec(), None),
            ]);
        let response = self.run_txn(txn, false).await?;
        if response.succeeded() {
            Ok(response.header().map_or(0, |h| h.revision()))
        } else {
            Err(self
                .why_failed(fence, StoreError::Conflict { key: status_key })
                .await)
        }
    }

    /// Replaces the partitions of `tables` with `partitions` (the other tables' stay), only
    /// while the pipe's status is at `status_revision`.
    pub async fn replace_table_plans(
        &self,
        fence: &Fence,
        pipe: &str,
        status_revision: i64,
        tables: &[String],
        partitions: &[SnapshotPartition],
    ) -> Result<(), StoreError> {
        let keys = self.keys();
        let status_key = keys.pipe_status(pipe);
        let deletes: Vec<TxnOp> = tables
            .iter()
            .map(|t| {
                TxnOp::delete(
                    keys.table_partitions(pipe, t),
                    Some(DeleteOptions::new().with_prefix()),
                )
            })
            .collect();
        let puts: Vec<TxnOp> = partitions
            .iter()
            .map(|p| {
                let key = keys.snapshot_partition(pipe, &p.source_table, p.index);
                TxnOp::put(key, p.encode_to_vec(), None)
            })
            .collect();
        for ops in deletes.chunks(MAX_TXN_OPS).chain(puts.chunks(MAX_TXN_OPS)) {
            let txn = Txn::new()
                .when([
                    fence.compare(),
                    Compare::mod_revision(status_key.clone(), CompareOp::Equal, status_revision),
                ])
                .and_then(ops.to_vec());
            if !self.run_txn(txn, false).await?.succeeded() {
                let stale = StoreError::Conflict {
                    key: status_key.clone(),
                };
                return Err(self.why_failed(fence, stale).await);
            }
        }
        Ok(())
    }

    /// Forgets removed tables: their recorded state and their partitions.
    pub async fn forget_tables(
        &self,
        fence: &Fence,
        pipe: &str,
        tables: &[String],
    ) -> Result<(), StoreError> {
        let keys = self.keys();
        let ops: Vec<TxnOp> = tables
            .iter()
            .flat_map(|t| {
                [
                    TxnOp::delete(keys.pipe_table(pipe, t), None),
                    TxnOp::delete(
                        keys.table_partitions(pipe, t),
                        Some(DeleteOptions::new().with_prefix()),
                    ),
                ]
            })
            .collect();
        for chunk in ops.chunks(MAX_TXN_OPS) {
            let txn = Txn::new().when([fence.compare()]).and_then(chunk.to_vec());
            if !self.run_txn(txn, false).await?.succeeded() {
                return Err(StoreError::Fenced);
            }
        }
        Ok(())
    }

    /// The recorded state of one table, if any.
    pub async fn table_state(
        &self,
        pipe: &str,
        table: &str,
    ) -> Result<Option<TableState>, StoreError> {
        self.get_one(self.keys().pipe_table(pipe, table)).await
    }
}
