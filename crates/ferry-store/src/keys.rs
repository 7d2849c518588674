//! The etcd key layout (DESIGN.md §3). All keys are built here and nowhere else.

use ferry_proto::v1::WorkerKind;

/// Builds Ferry's keys under a prefix.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// Keys under `prefix` (a trailing `/` is ignored).
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.trim_end_matches('/').to_owned(),
        }
    }

    /// The prefix itself, without trailing slash.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `pipes/`: every pipe's keys.
    pub fn pipes(&self) -> String {
        format!("{}/pipes/", self.prefix)
    }

    /// `pipes/<pipe>/`: all keys of one pipe.
    pub fn pipe(&self, pipe: &str) -> String {
        format!("{}/pipes/{pipe}/", self.prefix)
    }

    /// `pipes/<pipe>/spec`: the `PipeSpec`.
    pub fn pipe_spec(&self, pipe: &str) -> String {
        format!("{}spec", self.pipe(pipe))
    }

    /// `pipes/<pipe>/secrets`: the `SealedSecrets`.
    pub fn pipe_secrets(&self, pipe: &str) -> String {
        format!("{}secrets", self.pipe(pipe))
    }

    /// `pipes/<pipe>/status`: the `PipeStatus`.
    pub fn pipe_status(&self, pipe: &str) -> String {
        format!("{}status", self.pipe(pipe))
    }

    /// `pipes/<pipe>/checkpoint`: the LSN durable in ClickHouse.
    pub fn pipe_checkpoint(&self, pipe: &str) -> String {
        format!("{}checkpoint", self.pipe(pipe))
    }

    /// `pipes/<pipe>/tables/<schema.table>`: schema seen and snapshot progress of one table.
    pub fn pipe_table(&self, pipe: &str, table: &str) -> String {
        format!("{}tables/{table}", self.pipe(pipe))
    }

    /// `pipes/<pipe>/tables/`: every table's recorded state.
    pub fn pipe_tables(&self, pipe: &str) -> String {
        format!("{}tables/", self.pipe(pipe))
    }

    /// `pipes/<pipe>/snapshot/`: the snapshot plan of every table.
    pub fn snapshot_partitions(&self, pipe: &str) -> String {
        format!("{}snapshot/", self.pipe(pipe))
    }

    /// `pipes/<pipe>/snapshot/<schema.table>/<index>` (index zero-padded so keys sort).
    pub fn snapshot_partition(&self, pipe: &str, table: &str, index: u32) -> String {
        format!("{}{table}/{index:05}", self.snapshot_partitions(pipe))
    }

    /// `pipes/<pipe>/destination`: what the destination server holds (DestinationLimits).
    pub fn pipe_destination(&self, pipe: &str) -> String {
        format!("{}destination", self.pipe(pipe))
    }

    /// `pipes/<pipe>/resources`: source objects Ferry created and must drop on delete.
    pub fn pipe_resources(&self, pipe: &str) -> String {
        format!("{}resources", self.pipe(pipe))
    }

    /// `pipes/<pipe>/replication`: the CDC worker's last report (ReplicationStatus).
    pub fn replication(&self, pipe: &str) -> String {
        format!("{}replication", self.pipe(pipe))
    }

    /// `pipes/<pipe>/stream_error`: a failure the CDC worker cannot get past (PipeError).
    pub fn stream_error(&self, pipe: &str) -> String {
        format!("{}stream_error", self.pipe(pipe))
    }

    /// `pipes/<pipe>/stream_hold`: what the stream acknowledges to a reload (StreamHold).
    pub fn stream_hold(&self, pipe: &str) -> String {
        format!("{}stream_hold", self.pipe(pipe))
    }

    /// `pipes/<pipe>/reload_truncates/<schema.table>`: a TRUNCATE applied mid-copy.
    pub fn reload_truncate(&self, pipe: &str, table: &str) -> String {
        format!("{}reload_truncates/{table}", self.pipe(pipe))
    }

    /// `pipes/<pipe>/snapshot/<schema.table>/`: the partitions of one table.
    pub fn table_partitions(&self, pipe: &str, table: &str) -> String {
        format!("{}{table}/", self.snapshot_partitions(pipe))
    }

    /// `pipes/<pipe>/slot_health`: the replication slot as the coordinator last checked it
    /// (SlotHealth).
    pub fn slot_health(&self, pipe: &str) -> String {
        format!("{}slot_health", self.pipe(pipe))
    }

    /// `pipes/<pipe>/delete_request`: the options of the DeletePipe being carried out
    /// (DeletePipeRequest), so cleanup honours them whoever leads.
    pub fn delete_request(&self, pipe: &str) -> String {
        format!("{}delete_request", self.pipe(pipe))
    }

    /// `pipes/<pipe>/exported_snapshot`: the snapshot partitions import.
    pub fn exported_snapshot(&self, pipe: &str) -> String {
        format!("{}exported_snapshot", self.pipe(pipe))
    }

    /// `owners/snapshot/<pipe>/<schema.table>/<index>`: a worker's claim on a partition.
    pub fn snapshot_owner(&self, pipe: &str, table: &str, index: u32) -> String {
        format!("{}{table}/{index:05}", self.snapshot_owners(pipe))
    }

    /// `workers/<kind>/`: registrations of one worker pool.
    pub fn workers(&self, kind: WorkerKind) -> String {
        format!("{}/workers/{}/", self.prefix, kind_segment(kind))
    }

    /// `workers/<kind>/<worker>`: one worker's registration.
    pub fn worker(&self, kind: WorkerKind, worker: &str) -> String {
        format!("{}{worker}", self.workers(kind))
    }

    /// `owners/cdc/`: every stream claim.
    pub fn cdc_owners(&self) -> String {
        format!("{}/owners/cdc/", self.prefix)
    }

    /// `owners/cdc/<pipe>`: the cdc-worker consuming the pipe's slot.
    pub fn cdc_owner(&self, pipe: &str) -> String {
        format!("{}/owners/cdc/{pipe}", self.prefix)
    }

    /// `owners/snapshot/<pipe>/`: claims on a pipe's snapshot partitions.
    pub fn snapshot_owners(&self, pipe: &str) -> String {
        format!("{}/owners/snapshot/{pipe}/", self.prefix)
    }

    /// `election/coordinator`: the coordinator election.
    pub fn election(&self) -> String {
        format!("{}/election/coordinator", self.prefix)
    }

    /// The pipe a key under `pipes/` belongs to, and the rest of the key after `pipes/<pipe>/`.
    pub fn split_pipe_key<'k>(&self, key: &'k str) -> Option<(&'k str, &'k str)> {
        let rest = key.strip_prefix(self.pipes().as_str())?;
        rest.split_once('/')
    }
}

/// The key segment of a worker kind.
pub fn kind_segment(kind: WorkerKind) -> &'static str {
    match kind {
        WorkerKind::Snapshot => "snapshot",
        WorkerKind::Cdc => "cdc",
        WorkerKind::Unspecified => "unspecified",
    }
}

/// A key as text for messages (keys are ASCII by construction; anything else is escaped).
pub(crate) fn display_key(key: &[u8]) -> String {
    String::from_utf8_lossy(key).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout() {
        let keys = Keys::new("/ferry/");
        assert_eq!(keys.pipe_spec("p"), "/ferry/pipes/p/spec");
        assert_eq!(
            keys.pipe_table("p", "public.t"),
            "/ferry/pipes/p/tables/public.t"
        );
        assert_eq!(keys.worker(WorkerKind::Cdc, "w1"), "/ferry/workers/cdc/w1");
        assert_eq!(keys.cdc_owner("p"), "/ferry/owners/cdc/p");
        assert_eq!(keys.election(), "/ferry/election/coordinator");
        assert_eq!(keys.slot_health("p"), "/ferry/pipes/p/slot_health");
        assert_eq!(keys.delete_request("p"), "/ferry/pipes/p/delete_request");
        assert_eq!(
            keys.split_pipe_key("/ferry/pipes/p/tables/public.t"),
            Some(("p", "tables/public.t"))
        );
        assert_eq!(keys.split_pipe_key("/ferry/workers/cdc/w1"), None);
        // A pipe's prefix never matches another pipe whose name extends it.
        assert!(!keys.pipe_spec("ab").starts_with(&keys.pipe("a")));
    }
}
