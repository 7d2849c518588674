//! Pipe records: spec, sealed secrets and status under `pipes/<pipe>/`.
//!
//! Reads assemble a pipe from one ranged get, so spec and status come from the same revision.
//! Writes are transactions guarded by the leader [`Fence`] and, for updates, by the
//! `mod_revision` the caller read: a write based on a stale read fails with
//! [`StoreError::Conflict`] instead of overwriting a newer change.

use std::collections::BTreeMap;

use etcd_client::{Compare, CompareOp, DeleteOptions, GetOptions, Txn, TxnOp};
use ferry_proto::v1::{PipeSpec, PipeStatus, ReplicationStatus, SealedSecrets, SlotHealth};
use prost::Message;

use crate::keys::display_key;
use crate::{Fence, Store, StoreError};

/// A pipe as stored, with the revisions needed to update it safely.
#[derive(Debug, Clone, PartialEq)]
pub struct PipeRecord {
    /// The normalised spec.
    pub spec: PipeSpec,
    /// `mod_revision` of the spec key.
    pub spec_revision: i64,
    /// The current status.
    pub status: PipeStatus,
    /// `mod_revision` of the status key.
    pub status_revision: i64,
    /// The CDC worker's last report, once the pipe streams.
    pub replication: Option<ReplicationStatus>,
    /// The replication slot as the leader last checked it.
    pub slot: Option<SlotHealth>,
}

/// Pipes read at one etcd revision.
#[derive(Debug, Clone)]
pub struct PipeListing {
    /// Pipes by name. A pipe whose spec or status is missing (mid-delete) is left out.
    pub pipes: BTreeMap<String, PipeRecord>,
    /// The revision the listing was read at; watch from `revision + 1` to miss nothing.
    pub revision: i64,
}

fn decode<M: Message + Default>(key: &[u8], value: &[u8]) -> Result<M, StoreError> {
    M::decode(value).map_err(|e| StoreError::decode(key, e))
}

/// Assembles a pipe from the spec and status entries of one listing.
#[derive(Default)]
struct Partial {
    spec: Option<(PipeSpec, i64)>,
    status: Option<(PipeStatus, i64)>,
    replication: Option<ReplicationStatus>,
    slot: Option<SlotHealth>,
    broken: bool,
}

impl Partial {
    /// Takes in the value of `pipes/<pipe>/<rest>` if it is part of the record (spec, status,
    /// the stream's report, the slot's health).
    fn absorb(
        &mut self,
        rest: &str,
        key: &[u8],
        value: &[u8],
        revision: i64,
    ) -> Result<(), StoreError> {
        match rest {
            "spec" => self.spec = Some((decode(key, value)?, revision)),
            "status" => self.status = Some((decode(key, value)?, revision)),
            "replication" => self.replication = Some(decode(key, value)?),
            "slot_health" => self.slot = Some(decode(key, value)?),
            _ => {}
        }
        Ok(())
    }

    fn finish(self) -> Option<PipeRecord> {
        let (spec, spec_revision) = self.spec?;
        let (status, status_revision) = self.status?;
        Some(PipeRecord {
            spec,
            spec_revision,
            status,
            status_revision,
            replication: self.replication,
            slot: self.slot,
        })
    }
}

impl Store {
    /// Every pipe, read at one revision.
    pub async fn list_pipes(&self) -> Result<PipeListing, StoreError> {
        let prefix = self.keys().pipes();
        let response = self
            .request(true, |mut c| {
                let prefix = prefix.clone();
                async move { c.get(prefix, Some(GetOptions::new().with_prefix())).await }
            })
            .await?;
        let revision = response.header().map_or(0, |h| h.revision());
        let mut partial: BTreeMap<String, Partial> = BTreeMap::new();
        for kv in response.kvs() {
            let key = display_key(kv.key());
            let Some((pipe, rest)) = self.keys().split_pipe_key(&key) else {
                continue;
            };
            let entry = partial.entry(pipe.to_owned()).or_default();
            // One undecodable pipe must not hide (or stall reconciling) all the others.
            if let Err(error) = entry.absorb(rest, kv.key(), kv.value(), kv.mod_revision()) {
                tracing::warn!(pipe, %error, "skipping pipe with an undecodable record");
                entry.broken = true;
            }
        }
        let pipes = partial
            .into_iter()
            .filter(|(_, p)| !p.broken)
            .filter_map(|(name, p)| p.finish().map(|record| (name, record)))
            .collect();
        Ok(PipeListing { pipes, revision })
    }

    /// One pipe, or `None` if it does not exist.
    pub async fn get_pipe(&self, pipe: &str) -> Result<Option<PipeRecord>, StoreError> {
        Ok(self.get_pipe_at(pipe).await?.0)
    }

    /// One pipe and the etcd revision it was read at (watch from `revision + 1`).
    pub async fn get_pipe_at(&self, pipe: &str) -> Result<(Option<PipeRecord>, i64), StoreError> {
        let keys = self.keys();
        let txn = Txn::new().and_then([
            TxnOp::get(keys.pipe_spec(pipe), None),
            TxnOp::get(keys.pipe_status(pipe), None),
            TxnOp::get(keys.replication(pipe), None),
            TxnOp::get(keys.slot_health(pipe), None),
        ]);
        let response = self.run_txn(txn, true).await?;
        let revision = response.header().map_or(0, |h| h.revision());
        let mut partial = Partial::default();
        for op in response.op_responses() {
            if let etcd_client::TxnOpResponse::Get(get) = op {
                for kv in get.kvs() {
                    let key = display_key(kv.key());
                    if let Some((_, rest)) = self.keys().split_pipe_key(&key) {
                        partial.absorb(rest, kv.key(), kv.value(), kv.mod_revision())?;
                    }
                }
            }
        }
        Ok((partial.finish(), revision))
    }

    /// The sealed secrets of a pipe.
    pub async fn get_pipe_secrets(&self, pipe: &str) -> Result<Option<SealedSecrets>, StoreError> {
        let key = self.keys().pipe_secrets(pipe);
        let response = self
            .request(true, |mut c| {
                let key = key.clone();
                async move { c.get(key, None).await }
            })
            .await?;
        response
            .kvs()
            .first()
            .map(|kv| decode(kv.key(), kv.value()))
            .transpose()
    }

    /// Stores a new pipe. Fails with [`StoreError::AlreadyExists`] if the name is taken.
    pub async fn create_pipe(
        &self,
        fence: &Fence,
        spec: &PipeSpec,
        secrets: &SealedSecrets,
        status: &PipeStatus,
    ) -> Result<PipeRecord, StoreError> {
        let keys = self.keys();
        let spec_key = keys.pipe_spec(&spec.name);
        let txn = Txn::new()
            .when([
                fence.compare(),
                Compare::create_revision(spec_key.clone(), CompareOp::Equal, 0),
            ])
            .and_then([
                TxnOp::put(spec_key.clone(), spec.encode_to_vec(), None),
                TxnOp::put(keys.pipe_secrets(&spec.name), secrets.encode_to_vec(), None),
                TxnOp::put(keys.pipe_status(&spec.name), status.encode_to_vec(), None),
            ]);
        let response = self.run_txn(txn, false).await?;
        if !response.succeeded() {
            return Err(self
                .why_failed(fence, StoreError::AlreadyExists { key: spec_key })
                .await);
        }
        let revision = response.header().map_or(0, |h| h.revision());
        Ok(PipeRecord {
            spec: spec.clone(),
            spec_revision: revision,
            status: status.clone(),
            status_revision: revision,
            replication: None,
            slot: None,
        })
    }

    /// Replaces a pipe's status if it is still at `expected_revision`. Returns the new revision.
    pub async fn put_pipe_status(
        &self,
        fence: &Fence,
        pipe: &str,
        expected_revision: i64,
        status: &PipeStatus,
    ) -> Result<i64, StoreError> {
        let key = self.keys().pipe_status(pipe);
        self.put_if_unchanged(fence, key, expected_revision, status.encode_to_vec())
            .await
    }

    /// Replaces a pipe's spec if it is still at `expected_revision`. Returns the new revision.
    pub async fn put_pipe_spec(
        &self,
        fence: &Fence,
        expected_revision: i64,
        spec: &PipeSpec,
    ) -> Result<i64, StoreError> {
        let key = self.keys().pipe_spec(&spec.name);
        self.put_if_unchanged(fence, key, expected_revision, spec.encode_to_vec())
            .await
    }

    /// Removes every key of a pipe (and the claims on its work), if its status is still at
    /// `expected_status_revision`.
    pub async fn delete_pipe(
        &self,
        fence: &Fence,
        pipe: &str,
        expected_status_revision: i64,
    ) -> Result<(), StoreError> {
        let keys = self.keys();
        let status_key = keys.pipe_status(pipe);
        let txn = Txn::new()
            .when([
                fence.compare(),
                Compare::mod_revision(
                    status_key.clone(),
                    CompareOp::Equal,
                    expected_status_revision,
                ),
            ])
            .and_then([
                TxnOp::delete(keys.pipe(pipe), Some(DeleteOptions::new().with_prefix())),
                TxnOp::delete(keys.cdc_owner(pipe), None),
                TxnOp::delete(
                    keys.snapshot_owners(pipe),
                    Some(DeleteOptions::new().with_prefix()),
                ),
            ]);
        let response = self.run_txn(txn, false).await?;
        if response.succeeded() {
            Ok(())
        } else {
            Err(self
                .why_failed(fence, StoreError::Conflict { key: status_key })
                .await)
        }
    }

    async fn put_if_unchanged(
        &self,
        fence: &Fence,
        key: String,
        expected_revision: i64,
        value: Vec<u8>,
    ) -> Result<i64, StoreError> {
        let txn = Txn::new()
            .when([
                fence.compare(),
                Compare::mod_revision(key.clone(), CompareOp::Equal, expected_revision),
            ])
            .and_then([TxnOp::put(key.clone(), value, None)]);
        let response = self.run_txn(txn, false).await?;
        if response.succeeded() {
            Ok(response.header().map_or(0, |h| h.revision()))
        } else {
            Err(self.why_failed(fence, StoreError::Conflict { key }).await)
        }
    }

    /// Tells a lost leadership apart from the other guard of a failed transaction.
    pub(crate) async fn why_failed(&self, fence: &Fence, otherwise: StoreError) -> StoreError {
        match fence.holds(self).await {
            Ok(true) => otherwise,
            Ok(false) => StoreError::Fenced,
            Err(e) => e,
        }
    }
}
