//! etcd 3.4 members on loopback.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use tempfile::TempDir;

use crate::process::not_ready;
use crate::{ChildProcess, KitError, free_port, wait};

/// One member's ports and process.
#[derive(Debug)]
pub struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    process: Option<ChildProcess>,
}

impl Member {
    /// `http://127.0.0.1:<client port>`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }
}

/// A running etcd cluster (one or more members), removed on drop.
#[derive(Debug)]
pub struct Etcd {
    members: Vec<Member>,
    dir: TempDir,
}

impl Etcd {
    /// A single member.
    pub async fn start() -> Result<Self, KitError> {
        Self::start_cluster(1).await
    }

    /// A cluster of `size` members.
    pub async fn start_cluster(size: usize) -> Result<Self, KitError> {
        let dir = tempfile::Builder::new().prefix("ferry-etcd-").tempdir()?;
        let mut members = Vec::with_capacity(size);
        for i in 0..size {
            members.push(Member {
                name: format!("m{i}"),
                client_port: free_port()?,
                peer_port: free_port()?,
                process: None,
            });
        }
        let mut etcd = Self { members, dir };
        for i in 0..size {
            etcd.spawn(i)?;
        }
        for i in 0..size {
            etcd.wait_ready(i).await?;
        }
        Ok(etcd)
    }

    fn initial_cluster(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn data_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(&self.members[i].name)
    }

    fn spawn(&mut self, i: usize) -> Result<(), KitError> {
        let initial_cluster = self.initial_cluster();
        let data_dir = self.data_dir(i);
        let m = &self.members[i];
        let mut command = Command::new("etcd");
        command
            .arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--listen-client-urls")
            .arg(m.endpoint())
            .arg("--advertise-client-urls")
            .arg(m.endpoint())
            .arg("--listen-peer-urls")
            .arg(format!("http://127.0.0.1:{}", m.peer_port))
            .arg("--initial-advertise-peer-urls")
            .arg(format!("http://127.0.0.1:{}", m.peer_port))
            .arg("--initial-cluster")
            .arg(initial_cluster)
            .arg("--initial-cluster-state")
            .arg("new")
            // Tests measure failover in seconds; keep elections among members quick too.
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"]);
        let log = self.dir.path().join(format!("{}.log", m.name));
        let process = ChildProcess::spawn(&format!("etcd {}", m.name), command, &log)?;
        self.members[i].process = Some(process);
        Ok(())
    }

    async fn wait_ready(&self, i: usize) -> Result<(), KitError> {
        // A real request, not just an open port: the port could belong to someone else.
        let endpoint = self.members[i].endpoint();
        let ready = wait::until(Duration::from_secs(20), || async {
            let mut client = etcd_client::Client::connect([endpoint.as_str()], None)
                .await
                .ok()?;
            client.status().await.ok().map(|_| ())
        })
        .await;
        let log = self
            .dir
            .path()
            .join(format!("{}.log", self.members[i].name));
        ready.ok_or_else(|| not_ready(format!("etcd member {}", self.members[i].name), 20, &log))
    }

    /// Client endpoints of every member.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(Member::endpoint).collect()
    }

    /// The members.
    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// `kill -9` of member `i`.
    pub fn kill_member(&mut self, i: usize) {
        if let Some(mut process) = self.members[i].process.take() {
            process.kill9();
        }
    }

    /// Restarts member `i` on its old ports and data.
    pub async fn restart_member(&mut self, i: usize) -> Result<(), KitError> {
        self.kill_member(i);
        self.spawn(i)?;
        self.wait_ready(i).await
    }
}
