//! A lease and the task that keeps it alive.
//!
//! Everything a process owns in etcd (its registration, its election key, its work claims) is
//! bound to its session's lease, so it vanishes when the process dies. The keepalive runs in its
//! own task so a busy or stuck caller cannot let the lease lapse, and it declares the session
//! [`SessionState::Lost`] *before* etcd can expire the lease: a keepalive that succeeded was sent
//! at `t`, so etcd cannot expire the lease before `t + ttl`; the session reports loss at
//! `t + ttl - margin`. Holders stop acting on `Lost`, which is what makes their claims safe
//! (self-fencing).

use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until, timeout};
use tracing::{debug, info, warn};

use crate::{EtcdClient, Store, StoreError};

/// Whether a session's lease is known to be held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionState {
    /// Renewed recently enough that etcd cannot have expired it.
    Alive,
    /// Not renewed in time (or revoked): everything bound to it is, or soon will be, gone.
    Lost,
}

/// A lease kept alive by a background task. Dropping it stops the keepalive (the lease then
/// expires after its TTL); [`Session::revoke`] releases it at once.
#[derive(Debug)]
pub struct Session {
    lease_id: i64,
    ttl: Duration,
    state: watch::Receiver<SessionState>,
    /// When the last acknowledged renewal was sent: etcd cannot expire the lease before this
    /// plus the TTL.
    renewed: watch::Receiver<Instant>,
    keepalive: KeepaliveTask,
    store: Store,
}

/// The keepalive task, aborted when its owner goes away (also if `Session::start` is
/// cancelled before it returns), so no task renews a lease nobody uses.
#[derive(Debug)]
struct KeepaliveTask(JoinHandle<()>);

impl Drop for KeepaliveTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Session {
    /// Grants a lease of `ttl` and starts keeping it alive. Returns once the first keepalive
    /// has been answered, so a caller that acts on the session knows renewal works.
    pub async fn start(store: &Store, ttl: Duration) -> Result<Self, StoreError> {
        let ttl_secs = i64::try_from(ttl.as_secs().max(2)).unwrap_or(i64::MAX);
        let ttl = Duration::from_secs(ttl_secs.unsigned_abs());
        let granted_at = Instant::now();
        let lease_id = store.client().lease_grant(ttl_secs, None).await?.id();
        let (tx, mut state) = watch::channel(SessionState::Alive);
        let (renewed_tx, renewed) = watch::channel(granted_at);
        let keepalive = KeepaliveTask(tokio::spawn(keep_alive(
            store.stream_client(),
            lease_id,
            ttl,
            granted_at,
            Renewals {
                state: tx,
                renewed: renewed_tx,
            },
        )));
        // Wait for the first renewal (or loss); the channel's initial value does not count.
        let first = state.changed().await;
        if first.is_err() || *state.borrow() == SessionState::Lost {
            return Err(StoreError::LeaseLost);
        }
        info!(lease = lease_id, ttl_secs, "etcd session started");
        Ok(Self {
            lease_id,
            ttl,
            state,
            renewed,
            keepalive,
            store: store.clone(),
        })
    }

    /// The lease id to bind keys to.
    pub fn lease_id(&self) -> i64 {
        self.lease_id
    }

    /// The lease's time to live.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Whether the lease is known to be held right now.
    pub fn is_alive(&self) -> bool {
        *self.state.borrow() == SessionState::Alive
    }

    /// How long the lease is certain to outlive this instant: the last acknowledged renewal
    /// was sent at `t`, so etcd cannot expire the lease before `t + ttl`. Zero once the session
    /// is lost.
    ///
    /// Unlike [`Session::is_alive`], this does not wait for the keepalive task to notice
    /// anything: a process that was frozen (SIGSTOP, a VM pause) past its TTL sees zero as
    /// soon as it runs again, even if its keepalive task has not yet run to declare the loss.
    /// The monotonic clock keeps counting while a process is stopped.
    pub fn certain_for(&self) -> Duration {
        if !self.is_alive() {
            return Duration::ZERO;
        }
        (*self.renewed.borrow() + self.ttl).saturating_duration_since(Instant::now())
    }

    /// Waits until the lease is certain to outlive now by at least `needed` (true), or the
    /// session is lost (false). A renewal that etcd acknowledges proves the lease is still
    /// held, so waiting for one is safe even after a pause; the wait is bounded by the TTL
    /// (the keepalive task declares the session lost well within it).
    pub async fn certain_for_at_least(&self, needed: Duration) -> bool {
        let mut renewed = self.renewed.clone();
        let give_up = Instant::now() + self.ttl;
        loop {
            if !self.is_alive() {
                return false;
            }
            if self.certain_for() >= needed {
                return true;
            }
            tokio::select! {
                changed = renewed.changed() => {
                    if changed.is_err() {
                        return false;
                    }
                }
                () = self.lost() => return false,
                () = sleep_until(give_up) => return false,
            }
        }
    }

    /// A receiver of state changes, for tasks that must stop when the session is lost.
    pub fn subscribe(&self) -> watch::Receiver<SessionState> {
        self.state.clone()
    }

    /// Resolves when the session is lost.
    pub async fn lost(&self) {
        let mut state = self.state.clone();
        // An error means the keepalive task ended, which only happens after loss.
        let _ = state.wait_for(|s| *s == SessionState::Lost).await;
    }

    /// Stops the keepalive and revokes the lease, deleting every key bound to it now rather
    /// than after the TTL.
    pub async fn revoke(&self) -> Result<(), StoreError> {
        self.keepalive.0.abort();
        self.store.client().lease_revoke(self.lease_id).await?;
        info!(lease = self.lease_id, "etcd session revoked");
        Ok(())
    }
}

/// Margin kept between declaring a session lost and the earliest instant etcd may expire it.
fn safety_margin(ttl: Duration) -> Duration {
    (ttl / 5).max(Duration::from_millis(500))
}

type KeepAliveStream = (etcd_client::LeaseKeeper, etcd_client::LeaseKeepAliveStream);

/// Sends one keepalive and waits for its answer, opening the stream if needed. Returns the send
/// time of an acknowledged renewal, or `None` when etcd says the lease is gone.
async fn renew(
    client: &mut EtcdClient,
    stream: &mut Option<KeepAliveStream>,
    lease_id: i64,
    wait: Duration,
) -> Result<Option<Instant>, etcd_client::Error> {
    let (keeper, responses) = match stream {
        Some(open) => open,
        None => stream.insert(client.lease_keep_alive(lease_id).await?),
    };
    let sent_at = Instant::now();
    keeper.keep_alive().await?;
    let response = timeout(wait, responses.message())
        .await
        .map_err(|_| etcd_client::Error::LeaseKeepAliveError("keepalive timed out".into()))??;
    match response {
        Some(r) if r.ttl() > 0 => Ok(Some(sent_at)),
        // A TTL of 0 is etcd saying the lease no longer exists.
        Some(_) => Ok(None),
        None => Err(etcd_client::Error::LeaseKeepAliveError(
            "keepalive stream closed".into(),
        )),
    }
}

/// What the keepalive task publishes.
struct Renewals {
    state: watch::Sender<SessionState>,
    /// The send time of the last acknowledged renewal.
    renewed: watch::Sender<Instant>,
}

async fn keep_alive(
    mut client: EtcdClient,
    lease_id: i64,
    ttl: Duration,
    granted_at: Instant,
    published: Renewals,
) {
    let Renewals { state, renewed } = published;
    let interval = ttl / 3;
    let margin = safety_margin(ttl);
    // The lease cannot expire before the last acknowledged renewal's send time plus TTL.
    let mut renewed_at = granted_at;
    let mut stream = None;
    let mut first = true;
    loop {
        let deadline = renewed_at + ttl - margin;
        let next_try = tokio::select! {
            result = renew(&mut client, &mut stream, lease_id, interval) => match result {
                Ok(Some(sent_at)) => {
                    renewed_at = sent_at;
                    renewed.send_replace(sent_at);
                    if first {
                        // Wakes `Session::start`, which waits for the first renewal.
                        state.send_replace(SessionState::Alive);
                        first = false;
                    }
                    debug!(lease = lease_id, "lease renewed");
                    sent_at + interval
                }
                Ok(None) => {
                    warn!(lease = lease_id, "lease expired in etcd; session lost");
                    break;
                }
                Err(error) => {
                    warn!(lease = lease_id, %error, "lease renewal failed; retrying");
                    stream = None;
                    Instant::now() + Duration::from_millis(200)
                }
            },
            _ = sleep_until(deadline) => {
                warn!(lease = lease_id, "lease not renewed in time; session lost");
                break;
            }
            // Nobody holds the session any more.
            _ = state.closed() => return,
        };
        let deadline = renewed_at + ttl - margin;
        if Instant::now() >= deadline {
            warn!(lease = lease_id, "lease not renewed in time; session lost");
            break;
        }
        sleep_until(next_try.min(deadline)).await;
    }
    state.send_replace(SessionState::Lost);
}
