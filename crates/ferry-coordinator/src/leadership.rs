//! The coordinator's campaign loop.
//!
//! Order matters: the session's first keepalive is answered before campaigning (so a leader's
//! lease is known to renew), the fence is published only once elected, and it is withdrawn the
//! moment the session is lost — before etcd can expire the lease and elect someone else — or
//! the moment a fenced write reveals the leadership is gone for another reason (the election
//! key deleted by hand, say). On shutdown the leader resigns and revokes its lease so a
//! follower takes over at once.
//!
//! Health is SERVING while this replica can act on a request: its session is alive and a
//! leader (itself, or one it forwards writes to) exists.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ferry_proto::v1::CoordinatorLeader;
use ferry_server::grpc::Health;
use ferry_server::membership::start_session;
use ferry_server::shutdown::Shutdown;
use ferry_server::telemetry::error_chain;
use ferry_store::{Fence, Leadership, Session, Store, StoreError, election};
use tokio::sync::{Notify, watch};
use tracing::{info, warn};

/// The fence of the current leadership, `None` while this replica does not lead.
pub type LeaderFence = watch::Receiver<Option<Fence>>;

/// Raised by whoever finds a leader write fenced: the leadership is gone, step down.
#[derive(Debug, Clone, Default)]
pub struct Deposed(Arc<Notify>);

impl Deposed {
    /// Reports that a write under the current fence was refused.
    pub fn report(&self) {
        self.0.notify_one();
    }

    async fn reported(&self) {
        self.0.notified().await;
    }
}

/// Everything the campaign loop needs.
#[derive(Debug)]
pub struct Campaign {
    /// etcd.
    pub store: Store,
    /// How this replica announces itself as leader.
    pub me: CoordinatorLeader,
    /// Session lease TTL.
    pub ttl: Duration,
    /// Where the current fence is published.
    pub fence: watch::Sender<Option<Fence>>,
    /// Step-down requests.
    pub deposed: Deposed,
    /// Health to keep current.
    pub health: Health,
    /// Ends the loop.
    pub shutdown: Shutdown,
}

/// Campaigns, leads, and campaigns again after losing the leadership, until shutdown.
pub async fn run(mut c: Campaign) {
    while let Some(session) = start_session(&c.store, c.ttl, &c.shutdown).await {
        c.me.elected_at = Some(SystemTime::now().into());
        let campaign = async {
            let campaign = Leadership::campaign(&c.store, &session, &c.me);
            tokio::pin!(campaign);
            tokio::select! {
                elected = &mut campaign => return elected,
                () = serve_once_a_leader_exists(&c.store, &c.health) => {}
            }
            campaign.await
        };
        let campaign = tokio::select! {
            campaign = campaign => campaign,
            _ = c.shutdown.requested() => {
                c.health.set(false).await;
                release(session).await;
                return;
            }
        };
        let leadership = match campaign {
            Ok(leadership) => leadership,
            Err(error) => {
                c.health.set(false).await;
                if !matches!(error, StoreError::LeaseLost) {
                    warn!(error = %error_chain(&error), "campaign failed; retrying");
                }
                release(session).await;
                continue;
            }
        };
        c.fence.send_replace(Some(leadership.fence().clone()));
        c.health.set(true).await;
        info!(coordinator = %c.me.coordinator_id, "leading");
        tokio::select! {
            _ = session.lost() => {
                c.fence.send_replace(None);
                c.health.set(false).await;
                warn!(coordinator = %c.me.coordinator_id, "etcd session lost; stepped down");
                release(session).await;
            }
            _ = c.deposed.reported() => {
                c.fence.send_replace(None);
                c.health.set(false).await;
                warn!(coordinator = %c.me.coordinator_id, "leadership fenced off; stepping down to campaign again");
                let _ = leadership.resign(&c.store).await;
                release(session).await;
            }
            _ = c.shutdown.requested() => {
                c.fence.send_replace(None);
                c.health.set(false).await;
                if let Err(error) = leadership.resign(&c.store).await {
                    warn!(error = %error_chain(&error), "cannot resign; the lease revoke releases leadership");
                }
                release(session).await;
                return;
            }
        }
    }
}

/// While campaigning: reports SERVING once some leader exists to forward writes to.
async fn serve_once_a_leader_exists(store: &Store, health: &Health) {
    while !matches!(election::current_leader(store).await, Ok(Some(_))) {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    health.set(true).await;
}

/// Revokes the session's lease (best effort, bounded): after a false loss alarm the old lease
/// could otherwise keep an election key alive for up to a TTL and delay failover.
async fn release(session: Session) {
    match tokio::time::timeout(Duration::from_secs(2), session.revoke()).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => {
            warn!(error = %error_chain(&error), "cannot revoke lease; it expires after its TTL")
        }
        Err(_) => warn!("lease revoke timed out; it expires after its TTL"),
    }
}
