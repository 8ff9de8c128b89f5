//! The listener: accept connections and run one task per connection until shutdown.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn, Instrument};

use crate::buffer::BufferHandle;
use crate::metrics::metrics;

/// Keeps `claimcheck_connections_open` while it lives.
struct OpenConnection;

impl OpenConnection {
    fn new() -> Self {
        metrics().connections_open.inc();
        OpenConnection
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        metrics().connections_open.dec();
    }
}
use crate::forward::{connection, ConnectionConfig};

/// How long shutdown waits for connections before closing them: the time a connection gets
/// to finish a request it is receiving, and as long again to send its acks.
const DRAIN: Duration = Duration::from_secs(2 * connection::SHUTDOWN_GRACE.as_secs());

/// Accepts forward connections until `shutdown` is cancelled, then waits for the connections
/// to finish: each stops reading, completes the request it is receiving (for a few seconds at
/// most) and sends the acks of what was stored. Connections still open after that are closed;
/// their senders resend whatever was not acknowledged.
pub async fn run(
    listener: TcpListener,
    buffer: BufferHandle,
    config: Arc<ConnectionConfig>,
    shutdown: CancellationToken,
) {
    let mut connections = JoinSet::new();
    let mut backoff = Duration::from_millis(100);
    loop {
        // Reap finished connections (Fluentd opens one per second for heartbeats).
        while connections.try_join_next().is_some() {}
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
        metrics().connections_accepted.inc();
        let span = tracing::info_span!("connection", %peer);
        let conn = connection::serve(
            socket,
            peer,
            buffer.clone(),
            config.clone(),
            shutdown.clone(),
        );
        connections.spawn(
            async move {
                // Counted open until the task ends, however it ends (aborts included).
                let _open = OpenConnection::new();
                conn.await
            }
            .instrument(span),
        );
    }
    drop(listener);
    info!(
        connections = connections.len(),
        "stopped accepting; waiting for open connections to finish"
    );
    let drained = tokio::time::timeout(DRAIN, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        warn!(
            connections = connections.len(),
            "closing connections that did not finish in time; their senders resend what was not acknowledged"
        );
        connections.abort_all();
        while connections.join_next().await.is_some() {}
    }
}
