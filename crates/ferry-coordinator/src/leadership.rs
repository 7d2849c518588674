//! The coordinator's campaign loop.
//!
//! Order matters: the session's first keepalive is answered before campaigning (so a leader's
//! lease is known to renew), the fence is published only once elected, and it is withdrawn the
//! moment the session is lost — before etcd can expire the lease and elect someone else. On
//! shutdown the leader resigns and revokes its lease so a follower takes over at once.

use std::time::{Duration, SystemTime};

use ferry_proto::v1::CoordinatorLeader;
use ferry_server::grpc::Health;
use ferry_server::shutdown::Shutdown;
use ferry_store::{Fence, Leadership, Session, Store, StoreError};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::errors::error_chain;

/// The fence of the current leadership, `None` while this replica does not lead.
pub type LeaderFence = watch::Receiver<Option<Fence>>;

/// Campaigns, leads, and campaigns again after losing the session, until shutdown.
/// Health is SERVING while the session is alive (this replica can serve and forward).
pub async fn run(
    store: Store,
    mut me: CoordinatorLeader,
    ttl: Duration,
    fence: watch::Sender<Option<Fence>>,
    health: Health,
    shutdown: Shutdown,
) {
    let mut backoff = Duration::from_millis(200);
    while !shutdown.is_requested() {
        let started = tokio::select! {
            started = Session::start(&store, ttl) => started,
            _ = shutdown.requested() => return,
        };
        let session = match started {
            Ok(session) => session,
            Err(error) => {
                warn!(error = %error_chain(&error), "cannot start etcd session; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.requested() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        backoff = Duration::from_millis(200);
        health.set(true).await;
        me.elected_at = Some(SystemTime::now().into());
        let campaign = tokio::select! {
            campaign = Leadership::campaign(&store, &session, &me) => campaign,
            _ = shutdown.requested() => {
                health.set(false).await;
                release(session).await;
                return;
            }
        };
        let leadership = match campaign {
            Ok(leadership) => leadership,
            Err(error) => {
                health.set(false).await;
                if !matches!(error, StoreError::LeaseLost) {
                    warn!(error = %error_chain(&error), "campaign failed; retrying");
                    release(session).await;
                }
                continue;
            }
        };
        fence.send_replace(Some(leadership.fence().clone()));
        info!(coordinator = %me.coordinator_id, "leading");
        tokio::select! {
            _ = session.lost() => {
                fence.send_replace(None);
                health.set(false).await;
                warn!(coordinator = %me.coordinator_id, "etcd session lost; stepped down");
            }
            _ = shutdown.requested() => {
                fence.send_replace(None);
                health.set(false).await;
                if let Err(error) = leadership.resign(&store).await {
                    warn!(error = %error_chain(&error), "cannot resign; the lease revoke releases leadership");
                }
                release(session).await;
                return;
            }
        }
    }
}

async fn release(session: Session) {
    if let Err(error) = session.revoke().await {
        warn!(error = %error_chain(&error), "cannot revoke lease; it expires after its TTL");
    }
}
