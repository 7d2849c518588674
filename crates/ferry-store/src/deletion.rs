//! What a DeletePipe asked for (`pipes/<pipe>/delete_request`): kept with the pipe so the
//! leader's cleanup honours it whichever coordinator leads, and for as long as it retries.

use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use ferry_proto::v1::DeletePipeRequest;
use prost::Message as _;

use crate::{Fence, Store, StoreError};

impl Store {
    /// Records the options of a delete, only while the pipe exists.
    pub async fn put_delete_request(
        &self,
        fence: &Fence,
        pipe: &str,
        request: &DeletePipeRequest,
    ) -> Result<(), StoreError> {
        let keys = self.keys();
        let status_key = keys.pipe_status(pipe);
        let txn = Txn::new()
            .when([
                fence.compare(),
                Compare::create_revision(status_key.clone(), CompareOp::Greater, 0),
            ])
            .and_then([TxnOp::put(
                keys.delete_request(pipe),
                request.encode_to_vec(),
                None,
            )]);
        if self.run_txn(txn, false).await?.succeeded() {
            Ok(())
        } else {
            Err(self
                .why_failed(fence, StoreError::Conflict { key: status_key })
                .await)
        }
    }

    /// The options of the delete under way, if one was asked for.
    pub async fn delete_request(
        &self,
        pipe: &str,
    ) -> Result<Option<DeletePipeRequest>, StoreError> {
        self.get_one(self.keys().delete_request(pipe)).await
    }
}
