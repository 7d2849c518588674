//! `WatchPipe`: the pipe now, then every change of its spec or status, from an etcd watch.
//!
//! The watch starts right after the revision of the first read, so no change between the read
//! and the watch is missed, and every status change is delivered (not only the latest).

use ferry_proto::v1::{PipeSpec, PipeStatus, ReplicationStatus, SlotHealth, WatchPipeResponse};
use ferry_server::shutdown::Shutdown;
use ferry_store::watch::{PrefixWatch, WatchEvent};
use ferry_store::{PipeRecord, Store, StoreError};
use prost::Message as _;
use tokio::sync::mpsc;
use tonic::Status;
use tracing::debug;

use super::to_proto;
use crate::errors::store_status;

/// Streams `record` and its changes into `tx` until the pipe is deleted or the client leaves.
pub(crate) async fn stream(
    store: Store,
    mut record: PipeRecord,
    read_at: i64,
    tx: mpsc::Sender<Result<WatchPipeResponse, Status>>,
    shutdown: Shutdown,
) {
    let name = record.spec.name.clone();
    let first = WatchPipeResponse {
        pipe: Some(to_proto(&record)),
        deleted: false,
    };
    if tx.send(Ok(first)).await.is_err() {
        return;
    }
    let keys = store.keys().clone();
    let (spec_key, status_key) = (keys.pipe_spec(&name), keys.pipe_status(&name));
    let (replication_key, slot_key) = (keys.replication(&name), keys.slot_health(&name));
    let mut watch = PrefixWatch::new(&store, keys.pipe(&name), read_at + 1);
    loop {
        let events = tokio::select! {
            events = watch.next() => events,
            _ = tx.closed() => {
                debug!(pipe = %name, "watcher left");
                return;
            }
            // An open watch must not hold up a graceful shutdown.
            _ = shutdown.requested() => {
                let _ = tx.send(Err(Status::unavailable("coordinator shutting down; watch again"))).await;
                return;
            }
        };
        let events = match events {
            Ok(events) => events,
            Err(error) => {
                let _ = tx.send(Err(watch_error(error))).await;
                return;
            }
        };
        let mut changed = false;
        for event in events {
            match event {
                WatchEvent::Put {
                    key,
                    value,
                    revision,
                } if key == status_key.as_bytes() => match PipeStatus::decode(value.as_slice()) {
                    Ok(status) => {
                        record.status = status;
                        record.status_revision = revision;
                        changed = true;
                    }
                    Err(e) => {
                        let _ = tx
                            .send(Err(store_status(StoreError::Decode {
                                key: status_key.clone(),
                                source: e,
                            })))
                            .await;
                        return;
                    }
                },
                WatchEvent::Put {
                    key,
                    value,
                    revision,
                } if key == spec_key.as_bytes() => {
                    if let Ok(spec) = PipeSpec::decode(value.as_slice()) {
                        record.spec = spec;
                        record.spec_revision = revision;
                        changed = true;
                    }
                }
                WatchEvent::Put { key, value, .. } if key == replication_key.as_bytes() => {
                    // Each progress report is a message too: lag and counters move with it.
                    if let Ok(report) = ReplicationStatus::decode(value.as_slice()) {
                        record.replication = Some(report);
                        changed = true;
                    }
                }
                WatchEvent::Put { key, value, .. } if key == slot_key.as_bytes() => {
                    if let Ok(health) = SlotHealth::decode(value.as_slice()) {
                        record.slot = Some(health);
                        changed = true;
                    }
                }
                WatchEvent::Delete { key, .. } if key == status_key.as_bytes() => {
                    let last = WatchPipeResponse {
                        pipe: Some(to_proto(&record)),
                        deleted: true,
                    };
                    let _ = tx.send(Ok(last)).await;
                    return;
                }
                _ => {}
            }
            // One message per change, so a watcher sees every state the pipe passed through.
            if std::mem::take(&mut changed) {
                let update = WatchPipeResponse {
                    pipe: Some(to_proto(&record)),
                    deleted: false,
                };
                if tx.send(Ok(update)).await.is_err() {
                    return;
                }
            }
        }
    }
}

fn watch_error(error: StoreError) -> Status {
    match error {
        StoreError::Compacted(_) => {
            Status::unavailable("the pipe's change history was compacted; watch again")
        }
        other => store_status(other),
    }
}
