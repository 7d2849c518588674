//! Self-fencing before every ClickHouse write (DESIGN.md §3, invariant 2).
//!
//! The checkpoint, the table states and every other etcd write of a stream are transactions
//! guarded by the claim's lease, so a worker that lost its lease cannot make them. ClickHouse
//! has no such guard: a worker frozen (SIGSTOP, a VM or GC pause) past its lease's TTL whose
//! claim passed to another worker would, once it runs again, write rows its successor already
//! wrote or deleted. The keepalive task declares the session lost before etcd can expire the
//! lease, but after a freeze nothing says it has run yet; so each write first asks the session
//! itself how long the lease is *certain* to last, from the send time of the last renewal etcd
//! acknowledged and the monotonic clock (which keeps counting while a process is stopped).
//!
//! What remains: the check and the write are not one step. A write starts only while the lease
//! is certain for at least half its TTL, so a successor can take over during it only if the
//! worker stalls for longer than that between the check and ClickHouse receiving the whole
//! request (a freeze in exactly that gap, or a request held up in the network). Such a late
//! write carries the versions the successor writes too, so a row is harmless under
//! ReplacingMergeTree, and a replicated TRUNCATE deletes by version, so a late one removes
//! only rows below it (`Sink::delete_below`). Not covered: a late insert of rows from before
//! a TRUNCATE landing after the successor applied that TRUNCATE leaves those rows behind.

use ferry_store::Session;
use tracing::warn;

use crate::stream::StreamError;

/// Returns once the lease is certain to hold for at least half its TTL (waiting for a renewal
/// if need be); `ClaimLost` if the session is lost first.
pub(crate) async fn before_write(session: &Session) -> Result<(), StreamError> {
    let needed = session.ttl() / 2;
    if session.certain_for_at_least(needed).await {
        return Ok(());
    }
    warn!(
        left_ms = session.certain_for().as_millis() as u64,
        "lease not certain to outlive a ClickHouse write; stopping the stream"
    );
    Err(StreamError::ClaimLost)
}
