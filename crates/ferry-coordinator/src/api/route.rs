//! Where a write is carried out: here if this replica leads, otherwise at the leader.
//!
//! Clients (or a service mesh) may reach any replica. A follower forwards writes to the leader
//! it reads from the election key, marking the request so a leader change mid-flight cannot
//! bounce it between replicas: a forwarded request that lands on a non-leader is refused with
//! UNAVAILABLE, which clients retry.

use std::collections::HashMap;
use std::sync::Mutex;

use ferry_proto::v1::pipe_service_client::PipeServiceClient;
use ferry_store::{Fence, Store, election};
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

use crate::errors::store_status;
use crate::leadership::LeaderFence;

/// Metadata key set on forwarded requests (value: the forwarding coordinator's id).
pub(crate) const FORWARDED_BY: &str = "x-ferry-forwarded-by";

/// Decision for one write request.
pub(crate) enum Route {
    /// This replica leads: write under this fence.
    Local(Fence),
    /// Another replica leads: send the request there.
    Forward(Box<PipeServiceClient<Channel>>),
}

/// Routes writes to the leader.
#[derive(Debug)]
pub(crate) struct Router {
    me: String,
    fence: LeaderFence,
    store: Store,
    channels: Mutex<HashMap<String, Channel>>,
}

impl Router {
    pub(crate) fn new(me: String, fence: LeaderFence, store: Store) -> Self {
        Self {
            me,
            fence,
            store,
            channels: Mutex::new(HashMap::new()),
        }
    }

    /// Whether this replica leads now.
    pub(crate) fn fence(&self) -> Option<Fence> {
        self.fence.borrow().clone()
    }

    pub(crate) async fn route<T>(&self, request: &Request<T>) -> Result<Route, Status> {
        if let Some(fence) = self.fence() {
            return Ok(Route::Local(fence));
        }
        if let Some(by) = request.metadata().get(FORWARDED_BY) {
            let by = by.to_str().unwrap_or("?");
            return Err(Status::unavailable(format!(
                "coordinator {} is not the leader (request forwarded by {by}); retry",
                self.me
            )));
        }
        let leader = election::current_leader(&self.store)
            .await
            .map_err(store_status)?
            .ok_or_else(|| Status::unavailable("no coordinator leader is elected yet; retry"))?;
        if leader.coordinator_id == self.me {
            // Elected a moment ago, fence not published yet.
            return Err(Status::unavailable("leadership is changing; retry"));
        }
        let channel = self.channel(&leader.address)?;
        Ok(Route::Forward(Box::new(PipeServiceClient::new(channel))))
    }

    /// Builds the request to forward: same message, marked as forwarded, same deadline.
    pub(crate) fn forwarded<T>(&self, request: Request<T>) -> Request<T> {
        let timeout = request.metadata().get("grpc-timeout").cloned();
        let mut forwarded = Request::new(request.into_inner());
        if let Ok(me) = self.me.parse() {
            forwarded.metadata_mut().insert(FORWARDED_BY, me);
        }
        if let Some(timeout) = timeout {
            forwarded.metadata_mut().insert("grpc-timeout", timeout);
        }
        forwarded
    }

    fn channel(&self, address: &str) -> Result<Channel, Status> {
        let mut channels = self
            .channels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(channel) = channels.get(address) {
            return Ok(channel.clone());
        }
        let uri = if address.contains("://") {
            address.to_owned()
        } else {
            format!("http://{address}")
        };
        let channel = Endpoint::from_shared(uri)
            .map_err(|_| Status::internal(format!("leader advertises a bad address {address:?}")))?
            .connect_timeout(std::time::Duration::from_secs(3))
            .connect_lazy();
        channels.insert(address.to_owned(), channel.clone());
        Ok(channel)
    }
}
