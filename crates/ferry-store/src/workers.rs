//! Worker registrations: `workers/<kind>/<worker>`, bound to the worker's session lease.

use etcd_client::{GetOptions, PutOptions};
use ferry_proto::v1::{WorkerKind, WorkerRegistration};
use prost::Message as _;

use crate::{Session, Store, StoreError};

impl Store {
    /// Publishes a worker's registration under its session's lease: it disappears when the
    /// session ends, by revoke or by expiry.
    pub async fn register_worker(
        &self,
        session: &Session,
        registration: &WorkerRegistration,
    ) -> Result<(), StoreError> {
        let key = self
            .keys()
            .worker(registration.kind(), &registration.worker_id);
        let value = registration.encode_to_vec();
        let lease = session.lease_id();
        // Putting the same value twice is harmless, so this write may be retried.
        self.request(true, |mut c| {
            let (key, value) = (key.clone(), value.clone());
            async move {
                c.put(key, value, Some(PutOptions::new().with_lease(lease)))
                    .await
            }
        })
        .await?;
        Ok(())
    }

    /// The live registrations of one worker pool.
    pub async fn list_workers(
        &self,
        kind: WorkerKind,
    ) -> Result<Vec<WorkerRegistration>, StoreError> {
        let response = self
            .client()
            .get(
                self.keys().workers(kind),
                Some(GetOptions::new().with_prefix()),
            )
            .await?;
        // An undecodable registration (a newer or broken worker) is skipped, not fatal.
        Ok(response
            .kvs()
            .iter()
            .filter_map(|kv| match WorkerRegistration::decode(kv.value()) {
                Ok(registration) => Some(registration),
                Err(error) => {
                    let key = String::from_utf8_lossy(kv.key());
                    tracing::warn!(%key, %error, "skipping undecodable worker registration");
                    None
                }
            })
            .collect())
    }

    /// Whether a worker's registration is present right now.
    pub async fn worker_registered(
        &self,
        kind: WorkerKind,
        worker: &str,
    ) -> Result<bool, StoreError> {
        let response = self
            .client()
            .get(
                self.keys().worker(kind, worker),
                Some(GetOptions::new().with_count_only()),
            )
            .await?;
        Ok(response.count() > 0)
    }
}
