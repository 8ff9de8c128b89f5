//! One forward connection: read requests, append their events to the buffer, and answer each
//! `chunk` option with `{"ack": token}` once the buffer says the events are durable.
//!
//! Requests are handled in arrival order and their acks are written in that order, one ack per
//! write (Fluent Bit reads an ack with a single `read()`). Up to `MAX_IN_FLIGHT` requests may
//! wait for durability at once; then the connection stops reading, which pushes back on the
//! sender through TCP. A request that cannot be buffered gets no ack and the connection is
//! closed, so the sender resends it; an ack is never sent for what is not stored.
//!
//! With `<security>` settings the connection starts with the shared-key handshake
//! ([`super::security`]); a request whose token was stored recently from the same sender is
//! acked again without storing it twice ([`crate::dedup`]), also after a restart: the token is
//! handed to the buffer with the events, which writes it with them
//! ([`crate::buffer::tokens`]).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
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
use super::security::{Handshake, Security};
use crate::buffer::{Appender, BufferError, BufferHandle};
use crate::dedup::{self, Dedup, Link, Origin, Seen};
use crate::metrics::metrics;
use crate::time::sleep_until;
use crate::timekey::Timekey;

/// Requests whose acks may be outstanding on one connection.
const MAX_IN_FLIGHT: usize = 64;
/// Bytes read per `read` call at least, once a connection carries data.
const READ_CHUNK: usize = 64 * 1024;
/// The first read of an idle connection (a heartbeat, a keepalive connection between
/// flushes) is small, so that thousands of them cost little memory.
const FIRST_READ: usize = 4 * 1024;
/// Most room made at once for the known rest of a request beyond what the peer has sent of
/// it (see [`room_to_make`]).
const MAX_AHEAD: usize = 8 << 20;
/// Longest tag accepted (S3 keys are limited to 1024 bytes and usually contain the tag).
pub const MAX_TAG_BYTES: usize = 512;
/// How long a connection may take to finish a request it is receiving when shutdown starts.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Settings of the forward input that connections apply, and the state they share.
#[derive(Debug, Clone)]
pub struct ConnectionConfig {
    /// Largest request accepted, in bytes as received (Fluentd's `chunk_size_limit`).
    pub chunk_size_limit: u64,
    /// Requests larger than this are logged (Fluentd's `chunk_size_warn_limit`).
    pub chunk_size_warn_limit: Option<u64>,
    /// Largest decompressed size of one request's entries.
    pub decompression_size_limit: u64,
    /// The timekey windows entries are grouped by.
    pub timekey: Timekey,
    /// The shared-key handshake, when `shared_key` is set (Fluentd's `<security>`).
    pub security: Option<Arc<Security>>,
    /// Close each connection after its first request (Fluentd's `deny_keepalive`).
    pub deny_keepalive: bool,
    /// Close a connection that sent nothing for this long while no ack was due (zero: never).
    pub idle_timeout: Duration,
    /// What to do with requests whose `fluent_signal` says metrics or traces.
    pub signal_action: SignalAction,
    /// Record keys that receive the sender's address and host name.
    pub source_address_key: Option<String>,
    pub source_hostname_key: Option<String>,
    /// Tokens stored recently, to ack resent requests without storing them twice.
    pub dedup: Arc<Dedup>,
}

impl Default for ConnectionConfig {
    /// The settings' defaults, as `claimcheck serve` has them.
    fn default() -> Self {
        ConnectionConfig {
            chunk_size_limit: 257 << 20,
            chunk_size_warn_limit: None,
            decompression_size_limit: 256 << 20,
            timekey: Timekey::utc(3600),
            security: None,
            deny_keepalive: false,
            idle_timeout: Duration::from_secs(600),
            signal_action: SignalAction::Skip,
            source_address_key: None,
            source_hostname_key: None,
            dedup: Dedup::new(Duration::from_secs(600), 100_000),
        }
    }
}

/// Requests of Forward protocol v1.5 whose `fluent_signal` is not 0 (logs) carry metrics or
/// traces as binary blobs, not records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SignalAction {
    /// Ack them and count them as skipped.
    Skip,
    /// Close the connection without an ack; the sender keeps them.
    Reject,
}

/// Largest message read before the handshake's PING is accepted: a PING is six short fields
/// (under 1 KiB with a 255-byte host name).
const PING_SIZE_LIMIT: u64 = 64 << 10;

/// Resolves to the request's ack token, when it was received, and whether it was stored.
type AckFuture =
    Pin<Box<dyn Future<Output = (Option<Bytes>, Instant, Result<(), ConnectionError>)> + Send>>;

/// Why a connection was closed by us.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error("request larger than chunk_size_limit ({limit} bytes)")]
    TooLarge { limit: u64 },
    #[error("request before the handshake larger than a PING ({PING_SIZE_LIMIT} bytes)")]
    PingTooLarge,
    #[error("not msgpack: {0}")]
    Garbage(&'static str),
    #[error("a request in JSON (Fluentd's in_forward takes JSON too; claimcheck takes msgpack only: set the client to send msgpack)")]
    Json,
    #[error(transparent)]
    Decompress(#[from] entries::DecompressError),
    #[error("events not buffered: {0}")]
    Buffer(#[from] BufferError),
    #[error("an earlier copy of a resent request was not stored")]
    EarlierCopyFailed,
    #[error(
        "requests with fluent_signal {0} (not logs) are rejected (fluent_signal_action reject)"
    )]
    NotLogs(i64),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// How many bytes to reserve in a connection's read buffer before its next read, if any.
/// `held` bytes are in it and `spare` more fit; the request being read, or the next one, is
/// expected to reach `wanted` bytes; `busy` once the connection carries data.
///
/// Growing a buffer moves what it holds. The usual request from Fluentd (PackedForward, its
/// entries one `str` or `bin`) says its length in its first bytes ([`ValueScanner::wanted`]),
/// so the room for all of it is made at once and it is read without being moved. Fluent Bit's
/// (Forward mode, its entries an array) shows its length only as it arrives: it is expected to
/// be as long as the connection's previous request ([`expected_len`]), room for which is made
/// before it arrives, and grows by doubling beyond that, so that it is moved about once in all
/// at worst. A peer can make us reserve at most [`MAX_AHEAD`] more than it has sent, or as
/// much again once it has sent more than that. Small and idle reads stay small.
fn room_to_make(held: usize, spare: usize, wanted: usize, busy: bool) -> Option<usize> {
    if !busy {
        return (spare < FIRST_READ).then_some(FIRST_READ);
    }
    let need = wanted.saturating_sub(held);
    if need > spare {
        // After a large request, a little more for what follows it (the option map), not much
        // of the next request: its start would move with it into the room made for that one.
        // Small requests are read several at a time.
        let more = if need >= READ_CHUNK {
            FIRST_READ
        } else {
            READ_CHUNK
        };
        return Some(need.min(held.max(MAX_AHEAD)) + more);
    }
    (spare < FIRST_READ).then(|| READ_CHUNK.max(held))
}

/// Makes room in a connection's read buffer for its next read ([`room_to_make`]): `wanted` is
/// what the scanner knows of the request being read, `last_len` the length of the
/// connection's last request, `last_read` the bytes its last read gave. The connection is
/// busy while it holds part of a request or its last read was not a small one.
fn make_room(buf: &mut BytesMut, wanted: usize, last_len: usize, last_read: usize) {
    let (held, spare) = (buf.len(), buf.capacity() - buf.len());
    let busy = held > 0 || last_read >= FIRST_READ;
    let wanted = wanted.max(expected_len(last_len));
    if let Some(room) = room_to_make(held, spare, wanted, busy) {
        buf.reserve(room);
    }
}

/// How long the next request of a connection is expected to be, whose last one was `last_len`
/// bytes long: as long, if that is large enough for growing its buffer to cost anything.
fn expected_len(last_len: usize) -> usize {
    if last_len >= READ_CHUNK {
        last_len
    } else {
        0
    }
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
        appender: None,
        config,
        read_buf: BytesMut::new(),
        scanner: ValueScanner::default(),
        pending: FuturesOrdered::new(),
        handshake: None,
        sender: None,
        source_hostname: None,
        link: Link::new(),
        queued: 0,
        answered: 0,
        last_len: 0,
    };
    let result = conn.run(stream, shutdown).await;
    // Requests handed to the buffer are stored whether or not their connection lasts (a
    // reset, a failed ack): their tokens are finished when the buffer answers, so that a
    // resend on another connection is recognised.
    let pending = std::mem::take(&mut conn.pending);
    if !pending.is_empty() {
        tokio::spawn(pending.for_each(|_| std::future::ready(())));
    }
    if let Err(e) = &result {
        let reason = match e {
            ConnectionError::TooLarge { .. } | ConnectionError::PingTooLarge => Some("too_large"),
            ConnectionError::Garbage(_) => Some("not_msgpack"),
            ConnectionError::Json => Some("json"),
            ConnectionError::Decompress(_) => Some("decompression"),
            ConnectionError::Buffer(_) | ConnectionError::EarlierCopyFailed => Some("buffer_error"),
            ConnectionError::NotLogs(_) => Some("not_logs"),
            ConnectionError::Io(_) => None,
        };
        reason.into_iter().for_each(|r| metrics().refused(r));
    }
    match result {
        Ok(()) => debug!(%peer, "connection closed"),
        Err(ConnectionError::Io(e)) => debug!(%peer, cause = %e, "connection ended"),
        Err(e @ (ConnectionError::Buffer(_) | ConnectionError::EarlierCopyFailed)) => {
            error!(%peer, cause = %e, "closing connection; unacknowledged requests will be resent")
        }
        // Not a passing fault: the sender resends the same request until the limit is raised.
        Err(e @ ConnectionError::TooLarge { .. }) => {
            error!(%peer, cause = %e, "closing connection; the sender will resend this request \
                   until --chunk-size-limit is raised above its chunk_limit_size")
        }
        // A client set up wrong: every connection of it says so, a few times a minute.
        Err(e @ ConnectionError::Json) => {
            if let Some(suppressed) = JSON_LOG.allow() {
                error!(%peer, cause = %e, similar_lines_suppressed = suppressed,
                       "closing connection; its events are not stored");
            }
        }
        Err(e) => warn!(%peer, cause = %e, "closing connection"),
    }
}

struct Connection {
    peer: SocketAddr,
    buffer: BufferHandle,
    /// This connection as an appender, from its first request with events on.
    appender: Option<Appender>,
    config: Arc<ConnectionConfig>,
    read_buf: BytesMut,
    scanner: ValueScanner,
    pending: FuturesOrdered<AckFuture>,
    /// The HELO sent, until the PING arrives.
    handshake: Option<Handshake>,
    /// The hostname the sender gave in its PING.
    sender: Option<String>,
    /// The sender's host name for `source_hostname_key`, looked up once.
    source_hostname: Option<String>,
    /// This connection as the resend window sees it.
    link: Arc<Link>,
    /// Requests queued for an answer, and answered (in order), since the connection opened.
    queued: u64,
    answered: u64,
    /// Length of the last request read: what the next one is expected to be, until its
    /// headers say more ([`room_to_make`]).
    last_len: usize,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.link.close();
    }
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
        // A peer that has not sent its PING by then is closed: silent sockets would otherwise
        // hold connection slots for `idle_timeout` (Fluentd sends its PING at once).
        let mut handshake_by = None;
        if let Some(security) = &self.config.security {
            handshake_by = Some(tokio::time::Instant::now() + HANDSHAKE_TIMEOUT);
            let (handshake, helo) = security.helo(!self.config.deny_keepalive);
            writer.write_all(&helo).await?;
            writer.flush().await?;
            self.handshake = Some(handshake);
        }
        let mut eof = false;
        let mut stop_at: Option<tokio::time::Instant> = None;
        // With deny_keepalive, reading stops after the first request.
        let mut served_one = false;
        let idle = self.config.idle_timeout;
        let mut last_read = tokio::time::Instant::now();
        let mut last_read_len = 0;
        loop {
            while self.pending.len() < MAX_IN_FLIGHT && !served_one {
                let frame = match self.next_request() {
                    Ok(Some(frame)) => frame,
                    Ok(None) => break,
                    Err(e) => return Err(self.refuse(e, &mut writer).await),
                };
                if let Some(handshake) = self.handshake.take() {
                    if !self.answer_ping(&handshake, &frame, &mut writer).await? {
                        return Ok(());
                    }
                    continue;
                }
                if let Err(e) = self.handle(frame).await {
                    return Err(self.refuse(e, &mut writer).await);
                }
                served_one = self.config.deny_keepalive;
            }
            let partial = !self.read_buf.is_empty();
            if shutdown.is_cancelled() && stop_at.is_none() {
                stop_at = Some(tokio::time::Instant::now() + SHUTDOWN_GRACE);
            }
            // After shutdown, read on only to finish a request already started, for a while.
            let reading = !eof
                && !served_one
                && self.pending.len() < MAX_IN_FLIGHT
                && stop_at.is_none_or(|at| partial && tokio::time::Instant::now() < at);
            if !reading && self.pending.is_empty() {
                if partial {
                    debug!(peer = %self.peer, bytes = self.read_buf.len(), "dropping an incomplete request (never acknowledged)");
                }
                if !eof {
                    self.closed_in_order();
                }
                return Ok(());
            }
            make_room(
                &mut self.read_buf,
                self.scanner.wanted(),
                self.last_len,
                last_read_len,
            );
            let idle_at = (!idle.is_zero() && self.pending.is_empty()).then(|| last_read + idle);
            tokio::select! {
                read = reader.read_buf(&mut self.read_buf), if reading => {
                    last_read = tokio::time::Instant::now();
                    match read {
                        Ok(0) => {
                            eof = true;
                            self.closed_in_order();
                        }
                        // A TLS peer that closed without close_notify, as many TLS stacks do:
                        // the end of the stream, as a TCP FIN is (a request it cut short is
                        // never acked), not a failed connection, whose answers may be lost.
                        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                            debug!(peer = %self.peer, "the peer closed TLS without close_notify");
                            eof = true;
                            self.closed_in_order();
                        }
                        Err(e) => return Err(e.into()),
                        Ok(n) => {
                            last_read_len = n;
                            metrics().received_bytes.inc_by(n as u64);
                        }
                    }
                }
                Some((token, received, result)) = self.pending.next(), if !self.pending.is_empty() => {
                    result?;
                    if let Some(token) = token {
                        write_ack(&mut writer, &token, received).await?;
                    }
                    self.answered += 1;
                    last_read = tokio::time::Instant::now();
                }
                () = shutdown.cancelled(), if stop_at.is_none() => {}
                () = sleep_until(handshake_by), if self.handshake.is_some() => {
                    metrics().handshake_failed("handshake_timeout");
                    if let Some(suppressed) = HANDSHAKE_LOG.allow() {
                        warn!(peer = %self.peer, timeout = ?HANDSHAKE_TIMEOUT, similar_lines_suppressed = suppressed,
                              "no PING within the handshake's time; closing the connection");
                    }
                    return Ok(());
                }
                () = sleep_until(stop_at), if reading => {}
                () = sleep_until(idle_at), if reading => {
                    if partial {
                        info!(peer = %self.peer, bytes = self.read_buf.len(), timeout = ?idle,
                              "closing a connection that stopped sending in the middle of a request (never acknowledged)");
                    } else {
                        debug!(peer = %self.peer, timeout = ?idle, "closing an idle connection");
                    }
                    self.closed_in_order();
                    return Ok(());
                }
            }
        }
    }

    /// Before a refused request closes the connection: the acks of the requests read before
    /// it, in order, as far as they were stored, so that their senders need not resend them.
    /// Returns the refusal.
    async fn refuse<W>(&mut self, refusal: ConnectionError, writer: &mut W) -> ConnectionError
    where
        W: AsyncWrite + Unpin,
    {
        while let Some((token, received, result)) = self.pending.next().await {
            if result.is_err() {
                break;
            }
            if let Some(token) = token {
                if write_ack(writer, &token, received).await.is_err() {
                    break;
                }
            }
            self.answered += 1;
        }
        refusal
    }

    /// Checks the PING and answers PONG; false if the client was refused (the connection is
    /// then closed after the PONG is written).
    async fn answer_ping<W>(
        &mut self,
        handshake: &Handshake,
        frame: &[u8],
        writer: &mut W,
    ) -> Result<bool, ConnectionError>
    where
        W: AsyncWrite + Unpin,
    {
        let security = self
            .config
            .security
            .clone()
            .expect("a handshake is started only with security settings");
        match security.check_ping(handshake, frame, self.peer.ip()) {
            Ok(accepted) => {
                writer.write_all(&accepted.pong).await?;
                writer.flush().await?;
                debug!(peer = %self.peer, hostname = %accepted.hostname, "handshake accepted");
                self.sender = Some(accepted.hostname);
                Ok(true)
            }
            Err(refused) => {
                metrics().handshake_failed(refused.kind);
                // A sender with the wrong key retries (and its heartbeats connect) every second.
                if let Some(suppressed) = HANDSHAKE_LOG.allow() {
                    warn!(peer = %self.peer, hostname = %refused.hostname, username = %refused.username,
                          reason = %refused.reason, similar_lines_suppressed = suppressed,
                          "handshake refused; closing the connection");
                }
                writer.write_all(&refused.pong).await?;
                writer.flush().await?;
                Ok(false)
            }
        }
    }

    /// The next complete request in the read buffer, if there is one.
    fn next_request(&mut self) -> Result<Option<Bytes>, ConnectionError> {
        let next = self.scan_request();
        if next.is_err() {
            // A request refused is a request read all the same: the answers sent before it
            // had arrived (see [`Link::read_request`]), as for one that is handled.
            self.link.read_request(self.answered);
        }
        next
    }

    fn scan_request(&mut self) -> Result<Option<Bytes>, ConnectionError> {
        // A request starts the buffer. One in JSON (as fluent-logger-php sends by default)
        // starts with `[` or `{`, which no msgpack request does: read as msgpack, each of its
        // bytes would be a small integer, skipped one by one, its events lost unsaid.
        if matches!(self.read_buf.first(), Some(b'[' | b'{')) {
            return Err(ConnectionError::Json);
        }
        // Until the PING is accepted, nothing larger than a PING: a peer that has not
        // authenticated does not get chunk_size_limit of memory held for it.
        let (limit, too_large) = match self.handshake {
            Some(_) => (PING_SIZE_LIMIT, ConnectionError::PingTooLarge),
            None => {
                let limit = self.config.chunk_size_limit;
                (limit, ConnectionError::TooLarge { limit })
            }
        };
        match self.scanner.advance(&self.read_buf) {
            Ok(Some(len)) if len as u64 > limit => Err(too_large),
            Ok(Some(len)) => {
                self.scanner = ValueScanner::default();
                self.last_len = len;
                Ok(Some(self.read_buf.split_to(len).freeze()))
            }
            Ok(None) => {
                // The request is at least as long as what is held and what its headers say.
                if self.read_buf.len().max(self.scanner.wanted()) as u64 > limit {
                    return Err(too_large);
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
        self.link.read_request(self.answered);
        if let Some(warn_at) = self.config.chunk_size_warn_limit {
            if frame.len() as u64 > warn_at {
                warn!(%peer, bytes = frame.len(), limit = warn_at, "request is larger than chunk_size_warn_limit");
            }
        }
        let message = match frame::parse(frame) {
            Request::Nop => return Ok(()),
            Request::Broken(why) => {
                if let Some(suppressed) = INVALID_LOG.allow() {
                    warn!(%peer, reason = why, similar_lines_suppressed = suppressed,
                          "skipping a request that is not a forward message");
                }
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
                if let Some(suppressed) = INVALID_LOG.allow() {
                    let tag = String::from_utf8_lossy(&message.tag);
                    let tag: String = tag.chars().take(80).collect();
                    warn!(%peer, %tag, bytes = message.tag.len(), similar_lines_suppressed = suppressed,
                          "skipping events: tag is not a string, empty, not UTF-8 or longer than 512 bytes");
                }
                metrics().skipped("invalid tag", announced);
                self.ack_now(token);
                return Ok(());
            }
        };
        if let Some(signal) = message.options.fluent_signal.filter(|s| *s != 0) {
            if self.config.signal_action == SignalAction::Reject {
                return Err(ConnectionError::NotLogs(signal));
            }
            info!(%peer, %tag, signal, "skipping a request that carries metrics or traces, not logs");
            metrics().skipped("not logs (fluent_signal)", announced);
            self.ack_now(token);
            return Ok(());
        }
        let tag: Arc<str> = Arc::from(tag);
        // Looked up before the entries are decompressed: a resend is answered without that.
        let ticket = match &token {
            Some(t) if self.config.dedup.enabled() => {
                let origin = Origin {
                    link: self.link.clone(),
                    answer: self.queued,
                };
                let fluent_bit = dedup::is_fluent_bit_token(t);
                match self.config.dedup.check(peer.ip(), t, origin, fluent_bit) {
                    Seen::New(ticket) => Some(ticket),
                    Seen::Stored => {
                        metrics().duplicate_requests.inc();
                        info!(%peer, %tag, token = %String::from_utf8_lossy(t).trim_end(),
                              "acknowledging a resent request again; its events were stored already");
                        self.ack_now(token);
                        return Ok(());
                    }
                    Seen::Pending(outcome) => {
                        metrics().duplicate_requests.inc();
                        info!(%peer, %tag, token = %String::from_utf8_lossy(t).trim_end(),
                              "a resent request arrived while its first copy is being stored; acknowledging both once stored");
                        let received = Instant::now();
                        self.queue(Box::pin(async move {
                            let result = match dedup::wait_stored(outcome).await {
                                true => Ok(()),
                                false => Err(ConnectionError::EarlierCopyFailed),
                            };
                            (token, received, result)
                        }));
                        return Ok(());
                    }
                }
            }
            _ => None,
        };
        let (packed, compression) =
            entries::blob_of(message.entries, message.options.compressed.as_deref());
        let limit = self.config.decompression_size_limit;
        let pieces = entries::Pieces::new(packed.clone(), compression, limit)?;
        let (pieces, first) = next_piece(pieces).await?;
        let received = Instant::now();
        let in_pieces = !pieces.is_done();
        let split = if !in_pieces {
            let split = self.prepare(first).await;
            self.count_skipped(&tag, &split);
            split
        } else {
            drop(first);
            let plan = {
                let (packed, timekey) = (packed.clone(), self.config.timekey);
                decompressing(move || entries::plan(packed, compression, limit, timekey)).await??
            };
            info!(%peer, %tag, limit,
                  "a request expands beyond decompression_size_limit; storing it a piece at a time");
            metrics().requests_in_pieces.inc();
            let pieces = entries::Pieces::new(packed, compression, limit)?;
            self.store_all_but_the_last(&tag, pieces, plan).await?
        };
        if split.groups.is_empty() {
            // Nothing to store (every event skipped): done, as a stored request is, so that a
            // copy of it waiting on this one is acked too rather than taken for a failure.
            if let Some(ticket) = ticket {
                ticket.finish(true);
            }
            self.ack_now(token);
            return Ok(());
        }
        debug!(%peer, %tag, events = split.events, "request");
        metrics().events_received.inc_by(split.events);
        // The token goes to disk with the events only if a resend will be looked up. For a
        // request stored in pieces, only if the pieces before this last one are on disk by now
        // (`sync always`): under `interval` or `none` they may still be in the page cache, in
        // other chunks, and a power cut that kept this piece's chunk and lost one of theirs
        // would have a resend acked and not stored. Without the record, such a resend after a
        // restart is stored again: a duplicate at worst.
        let recorded = ticket
            .as_ref()
            .and(token.clone())
            .filter(|_| !in_pieces || self.buffer.syncs_each_append())
            .map(|t| (peer.ip(), t));
        // Bytes of the next request already read: the sender has more on its way, and this
        // request waits for the writer, to be synced with what follows.
        let more_coming = !self.read_buf.is_empty();
        let durable = self
            .appender
            .get_or_insert_with(|| self.buffer.appender())
            .append_with_token(tag, split.groups, recorded, more_coming)
            .await;
        self.queue(Box::pin(async move {
            let result = durable.await;
            if let Some(ticket) = ticket {
                ticket.finish(result.is_ok());
            }
            (token, received, result.map_err(ConnectionError::from))
        }));
        Ok(())
    }

    /// Stores the pieces of a request that expands beyond the limit, as `plan` found them,
    /// each durable before the next is expanded, but for the last one with events: its split
    /// is returned, to be appended with the request's token, so that the ack, and (under
    /// `sync always`) the token found on disk after a restart, vouch for the whole request.
    async fn store_all_but_the_last(
        &mut self,
        tag: &Arc<str>,
        mut pieces: entries::Pieces,
        plan: entries::Plan,
    ) -> Result<entries::Split, ConnectionError> {
        let mut last = entries::Split::default();
        for i in 0.. {
            let (rest, piece) = next_piece(pieces).await?;
            pieces = rest;
            let split = self.prepare(piece).await;
            self.count_skipped(tag, &split);
            match Some(i).cmp(&plan.last_with_events) {
                std::cmp::Ordering::Less if !split.groups.is_empty() => {
                    metrics().events_received.inc_by(split.events);
                    self.appender
                        .get_or_insert_with(|| self.buffer.appender())
                        .append_with_token(tag.clone(), split.groups, None, false)
                        .await
                        .await?;
                }
                std::cmp::Ordering::Equal => last = split,
                // Nothing valid to store: only counted as skipped.
                _ => {}
            }
            if pieces.is_done() {
                break;
            }
        }
        Ok(last)
    }

    /// A piece of a request's entries made ready to append: the sender's keys set, times of
    /// 0 made now, split by timekey.
    async fn prepare(&mut self, mut blob: Bytes) -> entries::Split {
        if self.config.source_address_key.is_some() || self.config.source_hostname_key.is_some() {
            blob = self.add_source(&blob).await;
        }
        let mut split = entries::split(&blob, self.config.timekey);
        if split.zero_times > 0 {
            // Fluentd's in_forward reads a time of 0 as "now".
            blob = entries::zero_times_to_now(&blob, event_time_now());
            split = entries::split(&blob, self.config.timekey);
        }
        split
    }

    /// Counts and logs the entries a split skipped.
    fn count_skipped(&self, tag: &str, split: &entries::Split) {
        for (why, n) in &split.reasons {
            metrics().skipped(why, *n);
        }
        if split.invalid > 0 {
            if let Some(suppressed) = INVALID_LOG.allow() {
                warn!(peer = %self.peer, %tag, skipped = split.invalid, kept = split.events,
                      reason = split.invalid_reason.unwrap_or_default(),
                      similar_lines_suppressed = suppressed, "skipping invalid events");
            }
        }
    }

    /// The entries with the sender's address and host name set in every record.
    async fn add_source(&mut self, blob: &[u8]) -> Bytes {
        let ip = self.peer.ip().to_canonical();
        let address = ip.to_string();
        let mut pairs: Vec<(&str, &str)> = Vec::with_capacity(2);
        if let Some(key) = &self.config.source_address_key {
            pairs.push((key, &address));
        }
        if let Some(key) = &self.config.source_hostname_key {
            if self.source_hostname.is_none() {
                self.source_hostname = Some(reverse_lookup(ip).await);
            }
            pairs.push((key, self.source_hostname.as_deref().unwrap_or(&address)));
        }
        entries::add_to_records(blob, &pairs)
    }

    /// Queues an ack that needs no buffering (nothing to store), in order with the others.
    fn ack_now(&mut self, token: Option<Bytes>) {
        self.queue(Box::pin(std::future::ready((
            token,
            Instant::now(),
            Ok(()),
        ))));
    }

    /// The connection ends in order: the peer closed it after the answers written so far, or
    /// we close it with every answer written. Those answers count as arrived for the resend
    /// window; a connection that fails (reset, write error) shows no such thing.
    fn closed_in_order(&self) {
        self.link.read_request(self.answered);
        self.link.close();
    }

    /// Queues a request's answer, in order with the others.
    fn queue(&mut self, answer: AckFuture) {
        self.pending.push_back(answer);
        self.queued += 1;
    }
}

/// The next piece of a request's entries; decompressing it runs on a blocking thread.
async fn next_piece(
    mut pieces: entries::Pieces,
) -> Result<(entries::Pieces, Bytes), ConnectionError> {
    if !pieces.is_compressed() {
        let piece = pieces.next_piece()?;
        return Ok((pieces, piece));
    }
    let (pieces, piece) = decompressing(move || {
        let piece = pieces.next_piece();
        (pieces, piece)
    })
    .await?;
    Ok((pieces, piece?))
}

/// Runs a decompression on a blocking thread. Each may hold up to the limit: a few at once,
/// whatever the number of connections sending compressed requests.
async fn decompressing<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ConnectionError> {
    let _turn = DECOMPRESSIONS
        .acquire()
        .await
        .expect("the semaphore is never closed");
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ConnectionError::Io(std::io::Error::other(e)))
}

/// The time now, as an event time.
fn event_time_now() -> claimcheck_consumer::entry::EventTime {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    claimcheck_consumer::entry::EventTime::new(now.as_secs() as i64, now.subsec_nanos())
}

/// The host name of `ip` by reverse DNS, or the address itself if it has none (Fluentd's
/// `resolve_hostname`).
async fn reverse_lookup(ip: std::net::IpAddr) -> String {
    let lookup = tokio::task::spawn_blocking(move || dns_lookup::lookup_addr(&ip));
    match tokio::time::timeout(Duration::from_secs(2), lookup).await {
        Ok(Ok(Ok(name))) => name,
        _ => ip.to_string(),
    }
}

/// Lets a few log lines of one kind through per period and counts the rest.
#[derive(Debug)]
pub struct LogLimit {
    per_period: u32,
    period: Duration,
    state: Mutex<Option<(Instant, u32, u64)>>,
}

impl LogLimit {
    pub const fn new(per_period: u32, period: Duration) -> LogLimit {
        LogLimit {
            per_period,
            period,
            state: Mutex::new(None),
        }
    }

    /// `Some(lines suppressed since the last one let through)` if this line may be logged.
    pub fn allow(&self) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let (start, logged, suppressed) = state.get_or_insert((now, 0, 0));
        if now.duration_since(*start) >= self.period {
            (*start, *logged) = (now, 0);
        }
        if *logged < self.per_period {
            *logged += 1;
            Some(std::mem::take(suppressed))
        } else {
            *suppressed += 1;
            None
        }
    }
}

/// Decompressions running at once, across connections.
static DECOMPRESSIONS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);

/// Invalid-event warnings: ten per ten seconds across connections.
static INVALID_LOG: LogLimit = LogLimit::new(10, Duration::from_secs(10));

/// How long a peer has to send its PING after the HELO, as long as a TLS handshake has.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Refused handshakes: five a minute across connections (all counted in
/// `claimcheck_handshake_failures_total`).
static HANDSHAKE_LOG: LogLimit = LogLimit::new(5, Duration::from_secs(60));

/// Writes the ack of a request received at `received`, in one write.
async fn write_ack<W>(writer: &mut W, token: &[u8], received: Instant) -> std::io::Result<()>
where
    W: AsyncWrite + Unpin,
{
    writer.write_all(&frame::encode_ack(token)).await?;
    // Over TLS the record may wait in the session's buffer while the socket is full: the ack
    // goes out now, not with the next write.
    writer.flush().await?;
    metrics().acks_sent.inc();
    metrics()
        .ack_duration
        .observe(received.elapsed().as_secs_f64());
    Ok(())
}

/// Connections closed for a request in JSON.
static JSON_LOG: LogLimit = LogLimit::new(5, Duration::from_secs(60));

#[cfg(test)]
mod tests {
    use super::*;

    /// What reading `request` costs when the peer's bytes come `piece` at a time, read the way
    /// [`Connection::run`] reads after a request of `last_len` bytes: the times what was held
    /// had to move, the bytes moved, and the buffer's largest capacity.
    fn read_in_pieces(request: &[u8], piece: usize, last_len: usize) -> (usize, usize, usize) {
        let mut buf = BytesMut::new();
        let mut scanner = ValueScanner::default();
        let (mut moves, mut moved, mut at) = (0, 0, 0);
        // After a request, the connection was reading: it is busy from the start.
        let mut last_read_len = if last_len > 0 { READ_CHUNK } else { 0 };
        while scanner.advance(&buf).expect("a valid request").is_none() {
            let before = buf.as_ptr();
            make_room(&mut buf, scanner.wanted(), last_len, last_read_len);
            if buf.as_ptr() != before && !buf.is_empty() {
                (moves, moved) = (moves + 1, moved + buf.len());
            }
            let n = piece
                .min(buf.capacity() - buf.len())
                .min(request.len() - at);
            assert!(n > 0, "no room to read into");
            buf.extend_from_slice(&request[at..at + n]);
            (at, last_read_len) = (at + n, n);
        }
        assert_eq!(scanner.scanned(), request.len());
        (moves, moved, buf.capacity())
    }

    fn request(entries: rmpv::Value) -> Vec<u8> {
        let option = rmpv::Value::Map(vec![("chunk".into(), "dG9rZW4=".into())]);
        let mut out = Vec::new();
        rmpv::encode::write_value(
            &mut out,
            &rmpv::Value::Array(vec!["app.logs".into(), entries, option]),
        )
        .unwrap();
        out
    }

    #[test]
    fn a_packed_request_is_read_into_one_buffer_without_moving() {
        let packed = request(rmpv::Value::Binary(vec![0x90; 3 << 20]));
        for piece in [1500, 64 * 1024, 200 * 1024] {
            let (moves, moved, capacity) = read_in_pieces(&packed, piece, 0);
            // Only the first read (4 KiB at most) moves, into the room made for all of it.
            assert!(
                moves <= 1 && moved <= FIRST_READ,
                "piece {piece}: {moves} moves, {moved} B"
            );
            assert!(
                capacity <= packed.len() + 2 * READ_CHUNK,
                "piece {piece}: {capacity}"
            );
        }
    }

    #[test]
    fn a_request_whose_length_shows_as_it_arrives_moves_once_at_most_after_one_as_long() {
        let entry = |i: u64| {
            let record = rmpv::Value::Map(vec![("message".into(), "x".repeat(180).into())]);
            rmpv::Value::Array(vec![(1_763_740_800 + i).into(), record])
        };
        let forward = request(rmpv::Value::Array((0..5_000).map(entry).collect()));
        for piece in [1500, 64 * 1024] {
            // After a request as long, with bytes coming: read without moving.
            let (moves, _, capacity) = read_in_pieces(&forward, piece, forward.len());
            assert_eq!(moves, 0, "piece {piece}");
            assert!(
                capacity <= forward.len() + 2 * READ_CHUNK,
                "piece {piece}: {capacity}"
            );
            // The first request of a connection, or one longer than the last: about once.
            let (_, moved, capacity) = read_in_pieces(&forward, piece, forward.len() / 3);
            assert!(
                moved <= forward.len(),
                "piece {piece}: moved {moved} of {}",
                forward.len()
            );
            assert!(
                capacity <= 2 * forward.len() + READ_CHUNK,
                "piece {piece}: {capacity}"
            );
        }
    }

    #[test]
    fn room_made_ahead_is_bounded_by_what_the_peer_sent() {
        // A header announcing 200 MiB of entries, and 4 KiB of them.
        let busy = true;
        let room = room_to_make(4096, 0, 200 << 20, busy).unwrap();
        assert_eq!(room, MAX_AHEAD + FIRST_READ);
        // With 32 MiB sent, up to as much again.
        let room = room_to_make(32 << 20, 0, 200 << 20, busy).unwrap();
        assert_eq!(room, (32 << 20) + FIRST_READ);
        // An idle connection reads a little; a busy one with room left reads into it.
        assert_eq!(room_to_make(0, 0, 0, false), Some(FIRST_READ));
        assert_eq!(room_to_make(0, FIRST_READ, 0, false), None);
        assert_eq!(room_to_make(100, 10_000, 200, busy), None);
        assert_eq!(
            room_to_make(100_000, 100, 100_001, busy),
            Some(READ_CHUNK.max(100_000))
        );
    }
}
