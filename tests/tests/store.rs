//! ferry-store against a real etcd: sessions, election fencing, CAS, resumable watches, keys
//! that must not outlive their pipe.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use ferry_core::lifecycle::initial_status;
use ferry_proto::v1::{CoordinatorLeader, DeletePipeRequest, PipeSpec, SealedSecrets, SlotHealth};
use ferry_store::watch::{PrefixWatch, WatchEvent};
use ferry_store::{EtcdConfig, Leadership, Session, Store, StoreError};
use ferry_testkit::etcd::Etcd;

async fn store(etcd: &Etcd) -> Store {
    Store::connect(&EtcdConfig {
        endpoints: etcd.endpoints(),
        prefix: "/ferry".into(),
        request_timeout: Duration::from_secs(3),
    })
    .await
    .unwrap()
}

fn me(id: &str) -> CoordinatorLeader {
    CoordinatorLeader {
        coordinator_id: id.into(),
        address: "127.0.0.1:1".into(),
        elected_at: None,
    }
}

/// A spec the store keeps as it is (it validates nothing); these tests start etcd alone, so
/// `ferry_testkit::spec::pipe`, which takes started servers, does not fit.
fn spec(name: &str) -> PipeSpec {
    PipeSpec {
        name: name.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_write_fenced_by_a_lost_leadership_is_rejected() {
    let etcd = Etcd::start().await.unwrap();
    let store = store(&etcd).await;
    let session_a = Session::start(&store, Duration::from_secs(5))
        .await
        .unwrap();
    let a = Leadership::campaign(&store, &session_a, &me("a"))
        .await
        .unwrap();
    let fence_a = a.fence().clone();
    let now = std::time::SystemTime::now();
    let created = store
        .create_pipe(
            &fence_a,
            &spec("p1"),
            &SealedSecrets::default(),
            &initial_status(now),
        )
        .await
        .unwrap();

    // B campaigns and waits while A leads.
    let session_b = Session::start(&store, Duration::from_secs(5))
        .await
        .unwrap();
    let campaign_b = {
        let store = store.clone();
        tokio::spawn(async move {
            let b = Leadership::campaign(&store, &session_b, &me("b"))
                .await
                .unwrap();
            (b, session_b)
        })
    };
    // A loses its lease (as when etcd stops hearing from it); B is elected.
    session_a.revoke().await.unwrap();
    let (b, _session_b) = tokio::time::timeout(Duration::from_secs(10), campaign_b)
        .await
        .unwrap()
        .unwrap();

    // A, not knowing yet, tries to write with its old fence: refused, nothing changed.
    let mut status = created.status.clone();
    status.reason = "written by a deposed leader".into();
    let err = store
        .put_pipe_status(&fence_a, "p1", created.status_revision, &status)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Fenced), "{err:?}");
    let err = store
        .create_pipe(
            &fence_a,
            &spec("p2"),
            &SealedSecrets::default(),
            &initial_status(now),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Fenced), "{err:?}");
    assert!(store.get_pipe("p2").await.unwrap().is_none());
    let stored = store.get_pipe("p1").await.unwrap().unwrap();
    assert_eq!(stored.status, created.status);

    // The new leader writes; a stale compare-and-swap loses.
    let revision = store
        .put_pipe_status(b.fence(), "p1", created.status_revision, &status)
        .await
        .unwrap();
    assert!(revision > created.status_revision);
    let err = store
        .put_pipe_status(b.fence(), "p1", created.status_revision, &status)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict { .. }), "{err:?}");
    let err = store
        .create_pipe(
            b.fence(),
            &spec("p1"),
            &SealedSecrets::default(),
            &initial_status(now),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::AlreadyExists { .. }), "{err:?}");
}

#[tokio::test]
async fn a_session_reports_loss_before_its_lease_can_expire() {
    let mut etcd = Etcd::start().await.unwrap();
    let store = store(&etcd).await;
    let ttl = Duration::from_secs(3);
    let session = Session::start(&store, ttl).await.unwrap();
    assert!(session.is_alive());
    let renewed_before = tokio::time::Instant::now();
    // etcd disappears: no renewal can succeed.
    etcd.kill_member(0);
    tokio::time::timeout(ttl * 2, session.lost())
        .await
        .expect("session must report loss");
    // Loss is declared before the TTL since the last possible renewal ran out.
    assert!(renewed_before.elapsed() < ttl + Duration::from_millis(500));
    assert!(!session.is_alive());
}

#[tokio::test]
async fn a_frozen_session_knows_its_lease_is_not_certain_before_its_keepalive_runs() {
    let etcd = Etcd::start().await.unwrap();
    let store = store(&etcd).await;
    let ttl = Duration::from_secs(2);
    let session = Session::start(&store, ttl).await.unwrap();
    assert!(
        session.certain_for() > ttl / 2,
        "{:?}",
        session.certain_for()
    );
    assert!(session.certain_for_at_least(ttl / 2).await);
    // A freeze (SIGSTOP, a VM pause) past the TTL: this test's runtime has one thread, so
    // blocking it keeps the keepalive task from running, as a stopped process would. This
    // sleep is the freeze itself, not a wait for some state.
    std::thread::sleep(ttl + Duration::from_millis(500));
    // Nothing has declared the loss yet, but the session knows it cannot vouch for the lease.
    assert!(session.is_alive());
    assert_eq!(session.certain_for(), Duration::ZERO);
    assert!(!session.certain_for_at_least(ttl / 2).await);
    assert!(!session.is_alive());
}

#[tokio::test]
async fn a_watch_resumes_after_etcd_restarts_without_losing_or_repeating_events() {
    let mut etcd = Etcd::start().await.unwrap();
    let store = store(&etcd).await;
    let mut client = store.client();
    let first = client.put("/ferry/pipes/w/a", "1", None).await.unwrap();
    let start = first.header().unwrap().revision();
    let mut watch = PrefixWatch::new(&store, "/ferry/pipes/".into(), start);
    let events = watch.next().await.unwrap();
    assert_eq!(events.len(), 1);

    etcd.restart_member(0).await.unwrap();
    // The client reconnects on its own; retry the write until etcd answers again.
    let written = ferry_testkit::wait::until(Duration::from_secs(10), || {
        let mut client = store.client();
        async move { client.put("/ferry/pipes/w/b", "2", None).await.ok() }
    })
    .await;
    assert!(written.is_some(), "etcd did not come back");
    store
        .client()
        .delete("/ferry/pipes/w/a", None)
        .await
        .unwrap();

    let mut seen = Vec::new();
    while seen.len() < 2 {
        let events = tokio::time::timeout(Duration::from_secs(15), watch.next())
            .await
            .expect("watch must resume")
            .unwrap();
        seen.extend(events);
    }
    assert!(matches!(&seen[0], WatchEvent::Put { key, .. } if key == b"/ferry/pipes/w/b"));
    assert!(matches!(&seen[1], WatchEvent::Delete { key, .. } if key == b"/ferry/pipes/w/a"));
}

#[tokio::test]
async fn slot_health_and_delete_options_live_and_die_with_their_pipe() {
    let etcd = Etcd::start().await.unwrap();
    let store = store(&etcd).await;
    let session = Session::start(&store, Duration::from_secs(5))
        .await
        .unwrap();
    let leader = Leadership::campaign(&store, &session, &me("a"))
        .await
        .unwrap();
    let fence = leader.fence();
    let now = std::time::SystemTime::now();
    let created = store
        .create_pipe(
            fence,
            &spec("p"),
            &SealedSecrets::default(),
            &initial_status(now),
        )
        .await
        .unwrap();

    // Stored beside the pipe and read with it.
    let health = SlotHealth {
        exists: true,
        wal_status: "reserved".into(),
        retained_bytes: 42,
        ..Default::default()
    };
    assert!(store.put_slot_health(fence, "p", &health).await.unwrap());
    assert_eq!(
        store.get_pipe("p").await.unwrap().unwrap().slot,
        Some(health.clone())
    );
    let listed = store.list_pipes().await.unwrap();
    assert_eq!(listed.pipes["p"].slot, Some(health.clone()));
    let options = DeletePipeRequest {
        name: "p".into(),
        drop_destination_tables: true,
        force: false,
    };
    store
        .put_delete_request(fence, "p", &options)
        .await
        .unwrap();
    assert_eq!(
        store.delete_request("p").await.unwrap(),
        Some(options.clone())
    );

    // Once the pipe is gone, a late write does not bring a key of it back.
    store
        .delete_pipe(fence, "p", created.status_revision)
        .await
        .unwrap();
    assert!(!store.put_slot_health(fence, "p", &health).await.unwrap());
    let err = store
        .put_delete_request(fence, "p", &options)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict { .. }), "{err:?}");
    let left = store
        .client()
        .get(
            "/ferry/pipes/p/",
            Some(ferry_store::etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    assert!(left.kvs().is_empty());
}
