//! The accept loop the admin socket and the HTTP listener share: one task per connection, a
//! pause instead of a spin when accepting fails (EMFILE and friends), and at shutdown two seconds
//! for connections in flight to finish.

use std::future::Future;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

/// A bound listener that hands out connections.
pub trait Listener {
    type Stream: Send + 'static;
    fn next(&self) -> impl Future<Output = std::io::Result<Self::Stream>> + Send;
}

impl Listener for UnixListener {
    type Stream = UnixStream;
    async fn next(&self) -> std::io::Result<UnixStream> {
        self.accept().await.map(|(s, _)| s)
    }
}

impl Listener for TcpListener {
    type Stream = TcpStream;
    async fn next(&self) -> std::io::Result<TcpStream> {
        self.accept().await.map(|(s, _)| s)
    }
}

/// Serves every connection of `listener` with `handle` until `shutdown`; `what` names the
/// listener in logs.
pub async fn serve<L, F, Fut>(
    listener: L,
    what: &'static str,
    shutdown: CancellationToken,
    handle: F,
) where
    L: Listener,
    F: Fn(L::Stream) -> Fut,
    Fut: Future<Output = std::io::Result<()>> + Send + 'static,
{
    let tracker = TaskTracker::new();
    loop {
        let stream = tokio::select! {
            () = shutdown.cancelled() => break,
            a = listener.next() => match a {
                Ok(s) => s,
                Err(error) => {
                    warn!(%error, what, "accept failed; pausing");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let connection = handle(stream);
        tracker.spawn(async move {
            if let Err(error) = connection.await {
                debug!(%error, what, "connection ended");
            }
        });
    }
    tracker.close();
    let _ = tokio::time::timeout(Duration::from_secs(2), tracker.wait()).await;
}
