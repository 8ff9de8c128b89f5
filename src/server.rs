//! The listener: accept connections (TLS ones too) and run one task per connection until
//! shutdown; answer UDP heartbeats on the same port.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn, Instrument};

use crate::buffer::BufferHandle;
use crate::metrics::metrics;
use crate::time::AcceptBackoff;

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
use crate::forward::connection::LogLimit;
use crate::forward::{connection, ConnectionConfig};

/// Settings of the listener itself.
#[derive(Clone)]
pub struct ListenerConfig {
    /// Serve TLS on the forward port (Fluentd's `<transport tls>`).
    pub tls: Option<TlsAcceptor>,
    /// Connections served at once; more are closed at once, with a log line.
    pub max_connections: usize,
    /// Answer UDP heartbeats on the forward port.
    pub udp_heartbeat: bool,
}

impl std::fmt::Debug for ListenerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListenerConfig")
            .field("tls", &self.tls.is_some())
            .field("max_connections", &self.max_connections)
            .field("udp_heartbeat", &self.udp_heartbeat)
            .finish()
    }
}

impl Default for ListenerConfig {
    fn default() -> Self {
        ListenerConfig {
            tls: None,
            max_connections: 4096,
            udp_heartbeat: true,
        }
    }
}

/// How long a TLS handshake may take.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Refusals and TLS failures: a few lines per minute, with counts of the rest.
static REFUSED_LOG: LogLimit = LogLimit::new(5, Duration::from_secs(60));
static TLS_LOG: LogLimit = LogLimit::new(5, Duration::from_secs(60));

/// How long shutdown waits for connections before closing them: the time a connection gets
/// to finish a request it is receiving, and as long again to send its acks.
pub const DRAIN: Duration = Duration::from_secs(2 * connection::SHUTDOWN_GRACE.as_secs());

/// Accepts forward connections until `shutdown` is cancelled, then waits for the connections
/// to finish: each stops reading, completes the request it is receiving (for a few seconds at
/// most) and sends the acks of what was stored. Connections still open after that are closed;
/// their senders resend whatever was not acknowledged.
pub async fn run(
    listener: TcpListener,
    heartbeat: Option<UdpSocket>,
    buffer: BufferHandle,
    config: Arc<ConnectionConfig>,
    listener_config: ListenerConfig,
    shutdown: CancellationToken,
) {
    if let Some(socket) = heartbeat {
        tokio::spawn(heartbeats(socket, shutdown.clone()));
    }
    let slots = Arc::new(Semaphore::new(listener_config.max_connections.max(1)));
    let mut connections = JoinSet::new();
    let mut backoff = AcceptBackoff::new();
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
            // Reap connections as they finish (Fluentd opens one per second for heartbeats), so
            // that the set holds only open ones, and the count at shutdown is right.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let (socket, peer) = match accepted {
            Ok(a) => {
                backoff.reset();
                a
            }
            Err(e) => {
                error!(cause = %e, retry_in = ?backoff.next(), "cannot accept a connection");
                if !backoff.wait(&shutdown).await {
                    break;
                }
                continue;
            }
        };
        metrics().connections_accepted.inc();
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics().connections_refused.inc();
            if let Some(suppressed) = REFUSED_LOG.allow() {
                warn!(%peer, max_connections = listener_config.max_connections,
                      similar_lines_suppressed = suppressed,
                      "refusing a connection: max_connections are open");
            }
            drop(socket);
            continue;
        };
        // Acks are small writes that must not wait for Nagle's algorithm.
        let _ = socket.set_nodelay(true);
        debug!(%peer, "connection accepted");
        let span = tracing::info_span!("connection", %peer);
        let (buffer, config, shutdown) = (buffer.clone(), config.clone(), shutdown.clone());
        let tls = listener_config.tls.clone();
        connections.spawn(
            async move {
                // Counted open until the task ends, however it ends (aborts included).
                let _open = OpenConnection::new();
                let _slot = slot;
                match tls {
                    None => connection::serve(socket, peer, buffer, config, shutdown).await,
                    Some(tls) => {
                        if let Some(stream) = accept_tls(&tls, socket, peer).await {
                            connection::serve(stream, peer, buffer, config, shutdown).await
                        }
                    }
                }
            }
            .instrument(span),
        );
    }
    drop(listener);
    while connections.try_join_next().is_some() {}
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

/// Completes a TLS handshake; `None` (logged) if it fails.
async fn accept_tls(
    tls: &TlsAcceptor,
    socket: TcpStream,
    peer: SocketAddr,
) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, tls.accept(socket)).await {
        Ok(Ok(stream)) => Some(stream),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            // A port probe or a plain TCP heartbeat: nothing was attempted.
            debug!(%peer, "connection closed before a TLS handshake");
            None
        }
        failed => {
            metrics().handshake_failed("tls");
            let cause = match failed {
                Ok(Err(e)) => e.to_string(),
                _ => format!("no TLS handshake within {TLS_HANDSHAKE_TIMEOUT:?}"),
            };
            if let Some(suppressed) = TLS_LOG.allow() {
                warn!(%peer, %cause, similar_lines_suppressed = suppressed, "TLS handshake failed");
            }
            None
        }
    }
}

/// Binds the UDP socket for heartbeats on the forward listener's address, when they are on.
/// It is bound before the sidecar says it is serving, so that a heartbeat sent as soon as the
/// address is known is answered. A failure is logged and TCP is served anyway.
pub async fn bind_heartbeats(
    listener: &TcpListener,
    listener_config: &ListenerConfig,
) -> Option<UdpSocket> {
    if !listener_config.udp_heartbeat {
        return None;
    }
    let addr = listener.local_addr().ok()?;
    match UdpSocket::bind(addr).await {
        Ok(s) => Some(s),
        Err(e) => {
            warn!(%addr, cause = %e, "cannot listen for UDP heartbeats; TCP is served anyway");
            None
        }
    }
}

/// Answers UDP heartbeats on the forward port, as Fluentd's in_forward does: one byte back
/// from the listening socket to whoever sent a datagram.
async fn heartbeats(socket: UdpSocket, shutdown: CancellationToken) {
    let mut buf = [0u8; 128];
    loop {
        let received = tokio::select! {
            () = shutdown.cancelled() => return,
            r = socket.recv_from(&mut buf) => r,
        };
        match received {
            Ok((_, from)) => {
                metrics().udp_heartbeats.inc();
                if let Err(e) = socket.send_to(b"\0", from).await {
                    debug!(%from, cause = %e, "cannot answer a UDP heartbeat");
                }
            }
            Err(e) => debug!(cause = %e, "UDP heartbeat socket error"),
        }
    }
}
