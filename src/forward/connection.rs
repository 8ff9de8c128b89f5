//! One forward connection: read requests, append their events to the buffer, and answer each
//! `chunk` option with `{"ack": token}` once the buffer says the events are durable.
//!
//! Requests are handled in arrival order and their acks are written in that order, one ack per
//! write (Fluent Bit reads an ack with a single `read()`). Up to `MAX_IN_FLIGHT` requests may
//! wait for durability at once; then the connection stops reading, which pushes back on the
//! sender through TCP. A request that cannot be buffered gets no ack and the connection is
//! closed, so the sender resends it; an ack is never sent for what is not stored.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use claimcheck_consumer::entry::{ScanError, ValueScanner};
use futures::stream::{FuturesOrdered, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use std::time::Instant;

use super::entries;
use super::frame::{self, Request};
use crate::buffer::{BufferError, BufferHandle};
use crate::metrics::metrics;

/// Requests whose acks may be outstanding on one connection.
const MAX_IN_FLIGHT: usize = 64;
/// Bytes read per `read` call at least.
const READ_CHUNK: usize = 64 * 1024;
/// Longest tag accepted (S3 keys are limited to 1024 bytes and usually contain the tag).
pub const MAX_TAG_BYTES: usize = 512;
/// How long a connection may take to finish a request it is receiving when shutdown starts.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Settings of the forward input that connections apply.
#[derive(Debug, Clone)]
pub struct ConnectionConfig {
    /// Largest request accepted, in bytes as received (Fluentd's `chunk_size_limit`).
    pub chunk_size_limit: u64,
    /// Requests larger than this are logged (Fluentd's `chunk_size_warn_limit`).
    pub chunk_size_warn_limit: Option<u64>,
    /// Largest decompressed size of one request's entries.
    pub decompression_size_limit: u64,
    /// Timekey length in seconds, to group entries.
    pub timekey_secs: i64,
}

impl Default for ConnectionConfig {
    /// The settings' defaults, as `claimcheck serve` has them.
    fn default() -> Self {
        ConnectionConfig {
            chunk_size_limit: 256 << 20,
            chunk_size_warn_limit: None,
            decompression_size_limit: 256 << 20,
            timekey_secs: 3600,
        }
    }
}

/// Resolves to the request's ack token, when it was received, and whether it was stored.
type AckFuture =
    Pin<Box<dyn Future<Output = (Option<Bytes>, Instant, Result<(), BufferError>)> + Send>>;

/// Why a connection was closed by us.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error("request larger than chunk_size_limit ({limit} bytes)")]
    TooLarge { limit: u64 },
    #[error("not msgpack: {0}")]
    Garbage(&'static str),
    #[error(transparent)]
    Decompress(#[from] entries::DecompressError),
    #[error("events not buffered: {0}")]
    Buffer(#[from] BufferError),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// Serves one connection until the peer closes it, an error closes it, or shutdown.
pub async fn serve<S>(
    stream: S,
    peer: SocketAddr,
    buffer: BufferHandle,
    config: Arc<ConnectionConfig>,
    shutdown: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Send + Unpin,
{
    let mut conn = Connection {
        peer,
        buffer,
        config,
        read_buf: BytesMut::with_capacity(READ_CHUNK),
        scanner: ValueScanner::default(),
        pending: FuturesOrdered::new(),
    };
    let result = conn.run(stream, shutdown).await;
    if let Err(e) = &result {
        let reason = match e {
            ConnectionError::TooLarge { .. } => Some("too_large"),
            ConnectionError::Garbage(_) => Some("not_msgpack"),
            ConnectionError::Decompress(_) => Some("decompression"),
            ConnectionError::Buffer(_) => Some("buffer_error"),
            ConnectionError::Io(_) => None,
        };
        reason.into_iter().for_each(|r| metrics().refused(r));
    }
    match result {
        Ok(()) => debug!(%peer, "connection closed"),
        Err(ConnectionError::Io(e)) => debug!(%peer, cause = %e, "connection ended"),
        Err(e @ ConnectionError::Buffer(_)) => {
            error!(%peer, cause = %e, "closing connection; unacknowledged requests will be resent")
        }
        Err(e) => warn!(%peer, cause = %e, "closing connection"),
    }
}

struct Connection {
    peer: SocketAddr,
    buffer: BufferHandle,
    config: Arc<ConnectionConfig>,
    read_buf: BytesMut,
    scanner: ValueScanner,
    pending: FuturesOrdered<AckFuture>,
}

impl Connection {
    async fn run<S>(
        &mut self,
        stream: S,
        shutdown: CancellationToken,
    ) -> Result<(), ConnectionError>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin,
    {
        let (mut reader, mut writer) = tokio::io::split(stream);
        let mut eof = false;
        let mut stop_at: Option<tokio::time::Instant> = None;
        loop {
            while self.pending.len() < MAX_IN_FLIGHT {
                match self.next_request()? {
                    Some(frame) => self.handle(frame).await?,
                    None => break,
                }
            }
            let partial = !self.read_buf.is_empty();
            if shutdown.is_cancelled() && stop_at.is_none() {
                stop_at = Some(tokio::time::Instant::now() + SHUTDOWN_GRACE);
            }
            // After shutdown, read on only to finish a request already started, for a while.
            let reading = !eof
                && self.pending.len() < MAX_IN_FLIGHT
                && stop_at.is_none_or(|at| partial && tokio::time::Instant::now() < at);
            if !reading && self.pending.is_empty() {
                if partial {
                    debug!(peer = %self.peer, bytes = self.read_buf.len(), "dropping an incomplete request (never acknowledged)");
                }
                return Ok(());
            }
            if self.read_buf.capacity() - self.read_buf.len() < READ_CHUNK {
                self.read_buf.reserve(READ_CHUNK.max(self.read_buf.len()));
            }
            tokio::select! {
                read = reader.read_buf(&mut self.read_buf), if reading => {
                    match read? {
                        0 => eof = true,
                        n => {
                            metrics().received_bytes.inc_by(n as u64);
                        }
                    }
                }
                Some((token, received, result)) = self.pending.next(), if !self.pending.is_empty() => {
                    result?;
                    if let Some(token) = token {
                        writer.write_all(&frame::encode_ack(&token)).await?;
                        metrics().acks_sent.inc();
                        metrics().ack_duration.observe(received.elapsed().as_secs_f64());
                    }
                }
                () = shutdown.cancelled(), if stop_at.is_none() => {}
                () = sleep_until(stop_at), if reading => {}
            }
        }
    }

    /// The next complete request in the read buffer, if there is one.
    fn next_request(&mut self) -> Result<Option<Bytes>, ConnectionError> {
        match self.scanner.advance(&self.read_buf) {
            Ok(Some(len)) if len as u64 > self.config.chunk_size_limit => {
                Err(ConnectionError::TooLarge {
                    limit: self.config.chunk_size_limit,
                })
            }
            Ok(Some(len)) => {
                self.scanner = ValueScanner::default();
                Ok(Some(self.read_buf.split_to(len).freeze()))
            }
            Ok(None) => {
                let limit = self.config.chunk_size_limit;
                if self.read_buf.len() as u64 > limit {
                    return Err(ConnectionError::TooLarge { limit });
                }
                Ok(None)
            }
            Err(ScanError::Invalid(why)) => Err(ConnectionError::Garbage(why)),
            Err(ScanError::Incomplete) => Ok(None),
        }
    }

    /// Validates a request, appends its events and queues its ack.
    async fn handle(&mut self, frame: Bytes) -> Result<(), ConnectionError> {
        let peer = self.peer;
        if let Some(warn_at) = self.config.chunk_size_warn_limit {
            if frame.len() as u64 > warn_at {
                warn!(%peer, bytes = frame.len(), limit = warn_at, "request is larger than chunk_size_warn_limit");
            }
        }
        let message = match frame::parse(frame) {
            Request::Nop => return Ok(()),
            Request::Broken(why) => {
                warn!(%peer, reason = why, "skipping a request that is not a forward message");
                metrics().skipped(why, 1);
                return Ok(());
            }
            Request::Events(m) => m,
        };
        metrics().requests.inc();
        // Events in requests skipped whole: the sender's count, when it gave one.
        let announced = message.options.size.unwrap_or(1);
        let token = message.options.chunk.clone();
        let tag = match std::str::from_utf8(&message.tag) {
            Ok(t) if !t.is_empty() && t.len() <= MAX_TAG_BYTES => t,
            _ => {
                warn!(%peer, tag = %String::from_utf8_lossy(&message.tag), "skipping events: tag is empty, not UTF-8 or longer than 512 bytes");
                metrics().skipped("invalid tag", announced);
                self.ack_now(token);
                return Ok(());
            }
        };
        if let Some(signal) = message.options.fluent_signal.filter(|s| *s != 0) {
            info!(%peer, %tag, signal, "skipping a request that carries metrics or traces, not logs");
            metrics().skipped("not logs (fluent_signal)", announced);
            self.ack_now(token);
            return Ok(());
        }
        let tag: Arc<str> = Arc::from(tag);
        let compressed = message.options.compressed.clone();
        let mut blob = entries::blob_of(message.entries);
        if matches!(compressed.as_deref(), Some("gzip" | "zstd")) {
            let limit = self.config.decompression_size_limit;
            blob = tokio::task::spawn_blocking(move || {
                entries::decompress(blob, compressed.as_deref(), limit)
            })
            .await
            .map_err(|e| ConnectionError::Io(std::io::Error::other(e)))??;
        }
        let split = entries::split(&blob, self.config.timekey_secs);
        for (why, n) in &split.reasons {
            metrics().skipped(why, *n);
        }
        if split.invalid > 0 {
            warn!(%peer, %tag, skipped = split.invalid, kept = split.events,
                  reason = split.invalid_reason.unwrap_or_default(), "skipping invalid events");
        }
        if split.groups.is_empty() {
            self.ack_now(token);
            return Ok(());
        }
        debug!(%peer, %tag, events = split.events, "request");
        let received = Instant::now();
        metrics().events_received.inc_by(split.events);
        let durable = self.buffer.append(tag, split.groups).await;
        self.pending
            .push_back(Box::pin(async move { (token, received, durable.await) }));
        Ok(())
    }

    /// Queues an ack that needs no buffering (nothing to store), in order with the others.
    fn ack_now(&mut self, token: Option<Bytes>) {
        self.pending.push_back(Box::pin(std::future::ready((
            token,
            Instant::now(),
            Ok(()),
        ))));
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
