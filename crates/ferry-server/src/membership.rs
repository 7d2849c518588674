//! A worker's membership in its pool: an etcd session and the registration bound to it.
//!
//! The registration is what the coordinator counts as capacity. If the session is lost (etcd
//! unreachable for longer than the TTL) the worker reports NOT_SERVING, stops, and registers
//! again under a fresh lease once etcd answers; on shutdown it revokes its lease so the
//! registration disappears at once instead of after the TTL.

use std::sync::Arc;
use std::time::Duration;

use ferry_proto::v1::WorkerRegistration;
use ferry_store::{Session, Store};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::grpc::Health;
use crate::shutdown::Shutdown;
use crate::telemetry::error_chain;

/// Starts an etcd session, retrying with backoff until it succeeds or shutdown is requested.
pub async fn start_session(store: &Store, ttl: Duration, shutdown: &Shutdown) -> Option<Session> {
    let mut backoff = Duration::from_millis(200);
    loop {
        let started = tokio::select! {
            started = Session::start(store, ttl) => started,
            _ = shutdown.requested() => return None,
        };
        match started {
            Ok(session) => return Some(session),
            Err(error) => {
                warn!(error = %error_chain(&error), "cannot start etcd session; retrying")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.requested() => return None,
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// A live membership: the published registration and the session it is bound to. Work a
/// worker claims is bound to the same session, and stops when the membership goes.
#[derive(Debug, Clone)]
pub struct Member {
    /// As published in etcd.
    pub registration: WorkerRegistration,
    /// The session (lease) everything the worker owns is bound to.
    pub session: Arc<Session>,
}

/// The membership as currently held, if it is.
pub type Membership = watch::Receiver<Option<Member>>;

/// Keeps `registration` published under a live lease until shutdown. `members` reflects
/// whether it is published; `health` is SERVING exactly while it is.
pub async fn run(
    store: Store,
    mut registration: WorkerRegistration,
    ttl: Duration,
    health: Health,
    members: watch::Sender<Option<Member>>,
    shutdown: Shutdown,
) {
    let mut backoff = Duration::from_millis(200);
    while let Some(session) = start_session(&store, ttl, &shutdown).await {
        registration.lease_id = session.lease_id();
        if let Err(error) = store.register_worker(&session, &registration).await {
            warn!(error = %error_chain(&error), "cannot register worker; retrying");
            let _ = session.revoke().await;
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = shutdown.requested() => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
            continue;
        }
        backoff = Duration::from_millis(200);
        info!(worker = %registration.worker_id, lease = session.lease_id(), "worker registered");
        let session = Arc::new(session);
        members.send_replace(Some(Member {
            registration: registration.clone(),
            session: session.clone(),
        }));
        health.set(true).await;
        tokio::select! {
            _ = session.lost() => {
                warn!(worker = %registration.worker_id, "etcd session lost; registering again");
                members.send_replace(None);
                health.set(false).await;
            }
            _ = shutdown.requested() => {
                members.send_replace(None);
                health.set(false).await;
                match session.revoke().await {
                    Ok(()) => info!(worker = %registration.worker_id, "worker deregistered"),
                    Err(error) => warn!(error = %error_chain(&error), "cannot revoke lease; it expires after its TTL"),
                }
                return;
            }
        }
    }
}
