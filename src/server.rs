//! The listener: accept connections and run one task per connection until shutdown.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, Instrument};

use crate::buffer::BufferHandle;
use crate::forward::{connection, ConnectionConfig};

/// Accepts forward connections until `shutdown` is cancelled, then waits for the connections
/// to finish: each stops reading, completes the request it is receiving (for a few seconds at
/// most) and sends the acks of what was stored.
pub async fn run(
    listener: TcpListener,
    buffer: BufferHandle,
    config: Arc<ConnectionConfig>,
    shutdown: CancellationToken,
) {
    let tracker = TaskTracker::new();
    let mut backoff = Duration::from_millis(100);
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (socket, peer) = match accepted {
            Ok(a) => {
                backoff = Duration::from_millis(100);
                a
            }
            Err(e) => {
                // Out of file descriptors and the like: wait a little instead of spinning.
                error!(cause = %e, retry_in = ?backoff, "cannot accept a connection");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        // Acks are small writes that must not wait for Nagle's algorithm.
        let _ = socket.set_nodelay(true);
        debug!(%peer, "connection accepted");
        let span = tracing::info_span!("connection", %peer);
        tracker.spawn(
            connection::serve(
                socket,
                peer,
                buffer.clone(),
                config.clone(),
                shutdown.clone(),
            )
            .instrument(span),
        );
    }
    drop(listener);
    tracker.close();
    info!(
        connections = tracker.len(),
        "stopped accepting; waiting for open connections to finish"
    );
    tracker.wait().await;
}
