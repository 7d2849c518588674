//! Waiting on state with a deadline (never a fixed sleep).

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

/// Polls `check` every 50 ms until it yields `Some`, or returns `None` after `within`.
pub async fn until<T, F, Fut>(within: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = check().await {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether something accepts TCP connections at `addr`.
pub async fn port_open(addr: &str) -> bool {
    tokio::net::TcpStream::connect(addr).await.is_ok()
}
