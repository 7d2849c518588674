//! Prefix watches that survive reconnects.
//!
//! etcd watches are streams that end when the connection does. [`PrefixWatch`] remembers the
//! revision after the last event it delivered and reopens from there, so a reconnect neither
//! loses nor repeats an event. If etcd compacted that revision away it reports
//! [`StoreError::Compacted`]: the caller re-lists (level-triggered) and watches again.

use std::time::Duration;

use etcd_client::{EventType, WatchOptions, WatchStream};
use tracing::{debug, warn};

use crate::{Store, StoreError};

/// One change under the watched prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// The key was created or updated.
    Put {
        /// The key.
        key: Vec<u8>,
        /// Its new value.
        value: Vec<u8>,
        /// The revision of the change.
        revision: i64,
    },
    /// The key was deleted (or its lease expired).
    Delete {
        /// The key.
        key: Vec<u8>,
        /// The revision of the change.
        revision: i64,
    },
}

/// A watch on a key prefix that resumes after reconnects.
#[derive(Debug)]
pub struct PrefixWatch {
    store: Store,
    prefix: String,
    next_revision: i64,
    stream: Option<WatchStream>,
}

impl PrefixWatch {
    /// Watches `prefix` from `start_revision` (use a listing's revision + 1).
    pub fn new(store: &Store, prefix: String, start_revision: i64) -> Self {
        Self {
            store: store.clone(),
            prefix,
            next_revision: start_revision,
            stream: None,
        }
    }

    /// The revision the next event will have at least.
    pub fn next_revision(&self) -> i64 {
        self.next_revision
    }

    /// Waits for the next batch of events. Broken connections are reopened with backoff from
    /// the next revision; errors returned are [`StoreError::Compacted`] (re-list, then watch
    /// again) and watches etcd cancelled for another reason (e.g. permissions).
    pub async fn next(&mut self) -> Result<Vec<WatchEvent>, StoreError> {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.try_next().await {
                Ok(events) if !events.is_empty() => return Ok(events),
                Ok(_) => {}
                Err(Interrupted::Final(error)) => {
                    self.stream = None;
                    return Err(error);
                }
                Err(Interrupted::Retry(error)) => {
                    warn!(prefix = %self.prefix, %error, "watch interrupted; resuming");
                    self.stream = None;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    async fn try_next(&mut self) -> Result<Vec<WatchEvent>, Interrupted> {
        let stream = match &mut self.stream {
            Some(stream) => stream,
            None => {
                let options = WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(self.next_revision)
                    .with_progress_notify();
                let stream = self
                    .store
                    .stream_client()
                    .watch(self.prefix.clone(), Some(options))
                    .await
                    .map_err(|e| Interrupted::Retry(e.into()))?;
                debug!(prefix = %self.prefix, revision = self.next_revision, "watch opened");
                self.stream.insert(stream)
            }
        };
        let response = match stream.message().await {
            Ok(Some(response)) => response,
            Ok(None) => {
                let ended = etcd_client::Error::WatchError("watch stream ended".into());
                return Err(Interrupted::Retry(ended.into()));
            }
            Err(e) => return Err(Interrupted::Retry(e.into())),
        };
        if response.compact_revision() > 0 {
            return Err(Interrupted::Final(StoreError::Compacted(
                response.compact_revision(),
            )));
        }
        if response.canceled() {
            let reason = format!("watch canceled: {}", response.cancel_reason());
            return Err(Interrupted::Final(
                etcd_client::Error::WatchError(reason).into(),
            ));
        }
        // Progress notifications carry no events but prove the revision reached: resuming
        // from there after a reconnect keeps an idle watch clear of compaction.
        if response.events().is_empty()
            && let Some(header) = response.header()
        {
            self.next_revision = self.next_revision.max(header.revision() + 1);
        }
        let mut events = Vec::with_capacity(response.events().len());
        for event in response.events() {
            let Some(kv) = event.kv() else { continue };
            let revision = kv.mod_revision();
            self.next_revision = self.next_revision.max(revision + 1);
            events.push(match event.event_type() {
                EventType::Put => WatchEvent::Put {
                    key: kv.key().to_vec(),
                    value: kv.value().to_vec(),
                    revision,
                },
                EventType::Delete => WatchEvent::Delete {
                    key: kv.key().to_vec(),
                    revision,
                },
            });
        }
        Ok(events)
    }
}

/// Why a watch stream stopped.
enum Interrupted {
    /// The connection broke: reopen from the next revision.
    Retry(StoreError),
    /// etcd ended the watch for good.
    Final(StoreError),
}
