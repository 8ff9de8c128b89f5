//! The durable buffer: chunk files keyed by (tag, timekey).
//!
//! # The promise
//!
//! A forward `chunk` option is acknowledged only after its events are written to a chunk file
//! and, under the default `sync always`, that file has been fsynced (plus its directory when
//! the file is new). One fsync covers every request that arrived while the previous one ran
//! (group commit). Nothing is deleted before Kinesis accepted the chunk's pointer, or before
//! an operator's `drop_oldest_chunk` asks for it. The ack token of each request is written with its events,
//! in the same write, so the resend window ([`tokens`]) is exactly as durable as the events
//! under each policy below.
//!
//! | `sync`     | acknowledged after          | survives a process crash | survives power loss      |
//! |------------|-----------------------------|--------------------------|--------------------------|
//! | `always`   | write + fsync               | yes                      | yes                      |
//! | `interval` | write (fsync every `sync_interval`) | yes              | all but the last interval |
//! | `none`     | write (fsync only at seal)  | yes                      | sealed chunks only       |
//!
//! Whatever the policy, a chunk's data file is fsynced before it is closed early to stay
//! within `max_open_chunk_files` (see the lifecycle below), so that closing files never
//! weakens these promises: it can only make writes durable sooner.
//!
//! # Where a request is written
//!
//! The buffer's writer thread runs the write rounds ([`writer`]): a connection hands its
//! request over and waits; the writer takes every request waiting, writes them, syncs them
//! together and answers them. Under load that is the group commit: one fsync for all the
//! requests that arrived during the last one.
//!
//! When nothing waits, the hand-over costs more than it saves: two wake-ups of a thread on
//! another CPU per request, about a third of what a 200 KB request costs beyond its bytes. So
//! a connection writes its request in place, on its own thread, running the same round under
//! the same lock, when all of these hold: no other connection appended in the last 10 ms
//! ([`IN_PLACE_QUIET`]; an open connection that sends nothing, such as the keep-alive
//! connection of Fluent Bit's idle second worker or a Fluentd connection waiting to be closed
//! after its ack, does not count), no request waits for the writer thread (it would be
//! overtaken), that thread is idle and takes requests (no full disk, not at
//! `total_limit_size`), and nothing of the sender's next request has been read yet. The
//! connection's thread then blocks for the write and the fsync, which nobody else was
//! waiting for. Otherwise the request goes to the writer as before: connections sending
//! together, or a sender with more on its way, get the group commit. The promise above is the
//! same either way; `claimcheck_buffer_write_rounds` counts the rounds of each kind. A round
//! run in place that makes something due sooner (a new chunk's seal, a chunk set aside full)
//! wakes the writer thread for it; seals always run there. The writer thread lets go of the
//! lock for a seal's fsyncs and state files (the chunks being sealed are out of its sets by
//! then), so a lone connection's request that arrives meanwhile is written in place rather
//! than held up behind the seal, even when the sender has more on its way: the writer thread
//! would take it only once the seal is done, and under `sync none` a seal's `fdatasync`
//! writes what is left of a whole chunk (milliseconds, a chunk every few dozen under load).
//! For the same reason the writer thread writes the requests that arrived during a round
//! before it seals (a few rounds at most, [`DRAIN_ROUNDS`]), and under `sync none` a chunk
//! that fills is synced by its seal, not when the round sets it aside.
//! Once [`Buffer::run`] ends or is dropped, nothing more is written, in place or by the
//! writer thread (a seal under way finishes first).
//!
//! # Layout
//!
//! ```text
//! <buffer_dir>/
//!   LOCK                  held (flock) while a sidecar uses the directory
//!   RESERVE               1 MiB released when the disk fills, so chunks can still be sealed
//!   chunks/<id>.chunk     data file (the chunk id is 32 lowercase hex digits, a UUIDv7)
//!   chunks/<id>.state     JSON state once sealed; replaced atomically (tmp, fsync, rename);
//!                         once uploaded: the pointer and, for an inline record, its body
//!   chunks/<id>.free      a delivered chunk's data file kept for a new chunk to overwrite
//!                         (at most 4, see "reuse" below)
//!   dead/                 chunks whose delivery exhausted the retry budget (`claimcheck replay`)
//!   quarantine/           files recovery could not read, and torn tails cut off; never deleted
//!   tokens.journal        ack tokens of delivered chunks, until `dedup_window` after delivery
//!
//! data file  = "CCHUNK03" | header_len u32 LE | header_crc32c u32 LE | header JSON | frame*
//! header     = {"chunk_id","tag","timekey","created_ms"[,"reused":true]}
//! frame      = entries | tokens
//! entries    = payload_len u32 LE (top bit 0) | payload_crc32c u32 LE | payload
//! payload    = whole msgpack [time, record] entries, bytes as received
//! tokens     = (records_len | 1 << 31) u32 LE | records_crc32c u32 LE | record*
//! frame CRCs = CRC32C of the payload seeded with the CRC32C of the chunk id
//! record     = the sender and ack token of a request whose events are in the entries frame
//!              just before (format in `tokens.rs`)
//! ```
//!
//! The chunk body (what S3 stores before compression) is the concatenation of the entries
//! payloads; token frames are not part of it. Each write round of a chunk is one entries frame,
//! followed by one token frame when requests of the round carry an ack token, written with
//! one vectored write; a crash in the middle leaves a torn frame, which recovery detects
//! (short or CRC mismatch) and cuts off, with everything after it. None of a torn frame's
//! events were acknowledged, because acks wait for the write (and the fsync, under `sync
//! always`). A token frame is trusted only when every frame before it is whole, so a token
//! found at recovery means its events are there. Version 2 data files (`"CCHUNK02"`, frame CRCs
//! not seeded) and version 1 (`"CCHUNK01"`, entries frames only, no top bit) are still read.
//!
//! # Lifecycle
//!
//! ```text
//! open ──seal──▶ sealed ──S3 PUT ok──▶ uploaded ──PutRecords ok──▶ deleted
//!  (data file)   (state: sealed,     (state: uploaded,            (data file renamed to
//!                 data_len fixed)     pointer + etag, or           <id>.free or removed first,
//!                                     the inline body)             then the state)
//!                    │                     │
//!                    └── retry budget exhausted ──▶ dead/ ──claimcheck replay──▶ chunks/
//! ```
//!
//! * **open**: a chunk's data file is created by its first write. At most
//!   `max_open_chunk_files` data files are open at once: at the bound, the file of the least
//!   recently written open chunk is closed (fsynced first if it holds unsynced writes) and
//!   reopened in append mode on that chunk's next write. Under `sync always`, a round fsyncs
//!   the chunks it wrote together, then the directory if a file is new, then acks.
//! * **seal** when the chunk reaches `chunk_limit_size` or `chunk_limit_records`, when its
//!   timekey plus `timekey_wait` has passed, `flush_interval` after it was created, when the
//!   buffer or the disk is full, or at shutdown. Sealing syncs the data file and writes the
//!   state atomically (temporary file, fsync, rename, directory fsync; chunks sealed together
//!   share the directory fsync, and none goes to the uploader before it). When many chunks
//!   fall due at once, each writer round seals a bounded batch of them (about 10 ms of work)
//!   after serving its requests, and the next round follows at once: appends are not held up
//!   behind thousands of seals.
//! * **full**: when the chunks reach `total_limit_size`, or a write finds no space, the writer
//!   takes no new requests (connections stop reading; TCP pushes back on the senders) and
//!   seals its open chunks so that delivery frees space; with `overflow_action
//!   drop_oldest_chunk` it deletes the oldest waiting chunk instead, logging each at ERROR. A
//!   chunk in the middle of an upload or publish attempt is not waiting; when the attempt
//!   fails, the registry wakes the writer, which may drop it then.
//! * **recover** on start: sealed and uploaded chunks are queued again where they stopped;
//!   open chunks are scanned, cut back to their last whole frame, and sealed.
//! * **delete** is the "published" record: the data file goes first, so a crash between
//!   Kinesis accepting a pointer and its going publishes the pointer again (same chunk id;
//!   consumers drop it). A state file without its data file is removed on start.
//! * **reuse**: a delivered chunk's data file is not unlinked but renamed `<id>.free` while
//!   fewer than 4 are kept ([`chunk::Spares`]), and a new chunk's first write writes its
//!   header over a spare's, then renames the spare to its own name. Overwriting blocks the
//!   file already has saves the file system their allocation and the size update, so an
//!   `fdatasync` has the data alone to write (one disk write where a growing file needs two),
//!   and the page cache reuses the pages. What follows the last write is the old chunk's
//!   leftover: its frames fail their CRC, seeded with the old chunk's id, so recovery stops
//!   where the new chunk's frames stop, and cuts the rest without copying it to
//!   `quarantine/`. The seal cuts the file to `data_len`. Only a power loss that kept the
//!   rename and lost the header can leave a file under a new chunk's name with the old
//!   chunk's header: recovery moves it to `quarantine/` (nothing in it was acknowledged: the
//!   header is synced with the first frame, and the old chunk was delivered). Spares count
//!   toward `total_limit_size` and are deleted first when it is reached or the disk fills.

pub mod chunk;
pub mod dead_letter;
pub mod gauges;
mod recovery;
pub mod registry;
pub mod token_record;
pub mod tokens;
mod writer;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use claimcheck_consumer::entry::{self, EventTime};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use crate::time::sleep_until;
use chunk::{ChunkHeader, ChunkPaths, ChunkStats};
pub use recovery::{rescan, Recovered};
use registry::Registry;
use writer::{Answer, Append, Writer};

/// Settings of the buffer (see `config.rs` for their documentation and defaults).
#[derive(Debug, Clone)]
pub struct BufferConfig {
    pub dir: PathBuf,
    pub timekey: Duration,
    pub timekey_wait: Duration,
    pub chunk_limit_size: u64,
    pub chunk_limit_records: Option<u64>,
    pub flush_interval: Duration,
    pub total_limit_size: Option<u64>,
    pub overflow_action: OverflowAction,
    pub sync: SyncPolicy,
    pub sync_interval: Duration,
    /// Most chunk data files open at once; `None`: half the open files limit at open time.
    pub max_open_files: Option<usize>,
}

/// When appended events are fsynced (see the table in the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SyncPolicy {
    Always,
    Interval,
    None,
}

/// What to do when the buffer reaches `total_limit_size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OverflowAction {
    /// Stop taking requests until delivery frees space (senders wait; nothing is lost).
    Block,
    /// Delete the oldest chunk waiting for delivery, logging it at ERROR (data is lost).
    DropOldestChunk,
}

/// Events of one tag that fall in one timekey, as byte slices of whole entries.
#[derive(Debug, Clone, PartialEq)]
pub struct Group {
    /// Start of the timekey window, Unix seconds.
    pub timekey: i64,
    /// Whole `[time, record]` entries, back to back within each slice.
    pub slices: Vec<Bytes>,
    pub records: u64,
    pub bytes: u64,
    pub first: EventTime,
    pub last: EventTime,
}

impl Group {
    pub fn new(timekey: i64) -> Self {
        Group {
            timekey,
            slices: Vec::new(),
            records: 0,
            bytes: 0,
            first: EventTime::default(),
            last: EventTime::default(),
        }
    }

    /// Adds whole entries that are known to be valid.
    pub fn push(&mut self, slice: Bytes, records: u64, first: EventTime, last: EventTime) {
        if self.records == 0 {
            (self.first, self.last) = (first, last);
        } else {
            self.first = self.first.min(first);
            self.last = self.last.max(last);
        }
        self.records += records;
        self.bytes += slice.len() as u64;
        self.slices.push(slice);
    }

    /// Splits off and returns the leading entries that fit in `max_bytes` and `max_records`
    /// (at least one entry, so a single entry larger than a chunk still gets a chunk).
    /// `self` keeps the rest.
    pub fn split_front(&mut self, max_bytes: u64, max_records: u64) -> Group {
        let mut front = Group::new(self.timekey);
        let mut rest = Group::new(self.timekey);
        for mut slice in std::mem::take(&mut self.slices) {
            if front_is_full(&front, max_bytes, max_records) {
                push_scanned(&mut rest, slice);
                continue;
            }
            // Walk entries until the next one would not fit.
            let mut cut = 0usize;
            let mut records = 0u64;
            let (mut first, mut last) = (EventTime::default(), EventTime::default());
            for e in entry::entries(&slice) {
                let (bytes, info) = e.expect("groups hold only whole valid entries");
                let fits = front.records + records < max_records
                    && front.bytes + (cut + bytes.len()) as u64 <= max_bytes;
                if !fits && (front.records + records) > 0 {
                    break;
                }
                if records == 0 {
                    (first, last) = (info.time, info.time);
                } else {
                    first = first.min(info.time);
                    last = last.max(info.time);
                }
                cut += bytes.len();
                records += 1;
            }
            let head = slice.split_to(cut);
            if records > 0 {
                front.push(head, records, first, last);
            }
            if !slice.is_empty() {
                push_scanned(&mut rest, slice);
            }
        }
        *self = rest;
        front
    }
}

fn front_is_full(front: &Group, max_bytes: u64, max_records: u64) -> bool {
    front.records > 0 && (front.records >= max_records || front.bytes >= max_bytes)
}

fn push_scanned(group: &mut Group, slice: Bytes) {
    let mut stats = ChunkStats::default();
    for e in entry::entries(&slice) {
        let (_, info) = e.expect("groups hold only whole valid entries");
        stats.add(1, 0, info.time, info.time);
    }
    group.push(slice, stats.records, stats.first_time, stats.last_time);
}

/// Why events could not be buffered. The sender gets no ack and resends.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BufferError {
    #[error("cannot write to the buffer: {reason}")]
    Write { reason: String },
    #[error("buffer is shutting down")]
    Closed,
}

/// A chunk whose object S3 confirmed, or whose body goes inline; its pointer is ready to
/// publish. An inline pointer may come without its body (`pointer.inline` is `None`, as after
/// recovery or a failed attempt): the publisher then reads it from the state file, so that
/// chunks waiting for Kinesis do not hold their bodies in memory.
#[derive(Debug, Clone)]
pub struct UploadedChunk {
    pub header: ChunkHeader,
    pub paths: ChunkPaths,
    pub pointer: claimcheck_consumer::Pointer,
}

impl UploadedChunk {
    /// An inline pointer whose body is on disk only.
    pub fn body_on_disk(&self) -> bool {
        self.pointer.v == claimcheck_consumer::Pointer::INLINE_VERSION
            && self.pointer.inline.is_none()
    }
}

/// A chunk that will receive no more events, ready for upload.
#[derive(Debug, Clone)]
pub struct SealedChunk {
    pub header: ChunkHeader,
    pub stats: ChunkStats,
    pub paths: ChunkPaths,
}

/// Cheap handle that connections use to append events.
#[derive(Clone)]
pub struct BufferHandle {
    tx: mpsc::Sender<Append>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for BufferHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BufferHandle").finish_non_exhaustive()
    }
}

/// Resolves once appended events are durable (or failed to be).
pub struct Durable(oneshot::Receiver<Result<(), BufferError>>);

impl std::future::Future for Durable {
    type Output = Result<(), BufferError>;
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0)
            .poll(cx)
            .map(|r| r.unwrap_or(Err(BufferError::Closed)))
    }
}

impl BufferHandle {
    /// Queues events for appending. Waits while the writer is busy (backpressure on the
    /// connection), then returns a future that resolves once the events are durable.
    pub async fn append(&self, tag: Arc<str>, groups: Vec<Group>) -> Durable {
        self.append_with_token(tag, groups, None).await
    }

    /// [`BufferHandle::append`] for a request whose sender and ack token are recorded with its
    /// events, so that a resend is recognised after a restart ([`tokens`]).
    pub async fn append_with_token(
        &self,
        tag: Arc<str>,
        groups: Vec<Group>,
        token: Option<(std::net::IpAddr, Bytes)>,
    ) -> Durable {
        let (append, durable) = Append::new(tag, groups, token, &self.shared.registry);
        self.queue(append).await;
        durable
    }

    /// An appender for one connection: see [`Appender`].
    pub fn appender(&self) -> Appender {
        Appender {
            handle: self.clone(),
            id: self.shared.appender_ids.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// Whether an append is on disk when its `Durable` resolves (`sync always`), not only
    /// written to the page cache.
    pub fn syncs_each_append(&self) -> bool {
        self.shared.config.sync == SyncPolicy::Always
    }

    /// Requests of this buffer written in place so far (the metric `buffer_write_rounds` with
    /// `on="connection"` counts those of every buffer in the process).
    pub fn written_in_place(&self) -> u64 {
        self.shared.in_place.load(Ordering::Relaxed)
    }

    /// Sends a request to the writer thread.
    async fn queue(&self, append: Append) {
        self.shared.queued.fetch_add(1, Ordering::AcqRel);
        // If the writer is gone the sender is dropped with the message and `Durable` says Closed.
        if self.tx.send(append).await.is_err() {
            self.shared.queued.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// A connection's way to append: like [`BufferHandle`], but it may write a request in place,
/// on the connection's own thread, when nothing else is waiting for the writer (see "Where a
/// request is written" in the module documentation).
pub struct Appender {
    handle: BufferHandle,
    /// Tells this connection's appends from the others' ([`RecentAppends`]).
    id: u64,
}

impl Appender {
    /// [`BufferHandle::append_with_token`], written in place when no other connection appended
    /// within the last [`IN_PLACE_QUIET`], no request waits for the writer, the writer is idle
    /// or sealing and takes requests, and either the sender has nothing more on its way
    /// (`more_coming` false: nothing of its next request has been read) or the writer is
    /// sealing (it would take the request only once its seal's fsyncs are done). The future
    /// then comes back resolved.
    pub async fn append_with_token(
        &self,
        tag: Arc<str>,
        groups: Vec<Group>,
        token: Option<(std::net::IpAddr, Bytes)>,
        more_coming: bool,
    ) -> Durable {
        let (append, durable) = Append::new(tag, groups, token, &self.handle.shared.registry);
        let others_appending = self.handle.shared.others_appending(self.id);
        let append = match others_appending {
            true => append,
            false => match self.handle.shared.write_in_place(append, more_coming) {
                Ok(()) => return durable,
                Err(append) => append,
            },
        };
        self.handle.queue(append).await;
        durable
    }
}

impl Append {
    /// A request for the writer, and the future its answer resolves.
    fn new(
        tag: Arc<str>,
        groups: Vec<Group>,
        token: Option<(std::net::IpAddr, Bytes)>,
        registry: &Arc<Registry>,
    ) -> (Append, Durable) {
        let (done, answer) = Answer::channel(registry);
        let append = Append {
            tag,
            groups,
            token,
            done,
        };
        (append, Durable(answer))
    }
}

/// What the writer thread and the connections share.
struct Shared {
    /// The writer, locked by whichever thread runs a round.
    desk: Mutex<Desk>,
    /// Requests sent to the writer thread and not yet written by it: while any wait, no
    /// request is written in place, which would overtake them.
    queued: AtomicUsize,
    /// Numbers the [`Appender`]s.
    appender_ids: AtomicU64,
    /// Which connections appended lately: a request is written in place only when no other
    /// did, so that no connection waits unread while another's request is written and synced.
    recent: Mutex<RecentAppends>,
    /// Requests written in place so far.
    in_place: AtomicU64,
    /// Wakes the writer thread when a round run in place made something due sooner than the
    /// moment it sleeps until (a new chunk's seal, a chunk set aside, a held request's retry).
    wake: Notify,
    /// Held by the writer thread while it seals without `desk` ([`WriterThread::Sealing`]);
    /// taken after `desk`, never before, so that [`StopOnDrop`] can wait for the seal.
    sealing: Mutex<()>,
    /// Tests hold this (writing) to keep the writer thread in the middle of a seal, or poison
    /// it to make the seal panic.
    #[cfg(test)]
    seal_pause: std::sync::RwLock<()>,
    registry: Arc<Registry>,
    config: Arc<BufferConfig>,
}

/// The writer and what the writer thread tells the connections about itself.
struct Desk {
    writer: Writer,
    thread: WriterThread,
    /// [`Buffer::run`] has ended or been dropped ([`StopOnDrop`]): nothing more is written in
    /// place.
    stopped: bool,
}

/// How long another connection's append keeps requests from being written in place. A
/// connection that appended this recently is likely to send again while a request written in
/// place holds the thread that would read it; through the writer thread, the two share an
/// fsync. One that has been quiet longer (the idle keep-alive connection of Fluent Bit's
/// second worker, a Fluentd connection waiting to be closed after its ack) does not count.
pub const IN_PLACE_QUIET: Duration = Duration::from_millis(10);

/// The latest append of all, and the latest of any connection other than the one that made
/// it: enough to tell whether a connection other than a given one appended lately.
#[derive(Debug)]
struct RecentAppends {
    latest: Option<(u64, Instant)>,
    before: Option<(u64, Instant)>,
    /// [`IN_PLACE_QUIET`], or what a test sets.
    quiet: Duration,
}

impl RecentAppends {
    fn new() -> Self {
        RecentAppends {
            latest: None,
            before: None,
            quiet: IN_PLACE_QUIET,
        }
    }

    /// Records an append by connection `id` at `now`; true if another connection appended
    /// less than `quiet` before.
    fn record(&mut self, id: u64, now: Instant) -> bool {
        if let Some(latest) = self.latest.filter(|&(latest, _)| latest != id) {
            self.before = Some(latest);
        }
        self.latest = Some((id, now));
        self.before
            .is_some_and(|(_, at)| now.saturating_duration_since(at) < self.quiet)
    }
}

/// What the writer thread is doing, as far as writes in place need to know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WriterThread {
    /// Running a round, or about to: a request goes to it.
    Busy,
    /// Waiting for requests, until a deadline (`None`: none).
    Waiting { until: Option<Instant> },
    /// Sealing chunks without the lock: requests may be written in place meanwhile (into
    /// other chunks: those being sealed are out of the writer's sets), and it looks at what
    /// they made due once it is done.
    Sealing,
}

impl Shared {
    fn lock(&self) -> anyhow::Result<std::sync::MutexGuard<'_, Desk>> {
        self.desk
            .lock()
            .map_err(|_| anyhow::anyhow!("a buffer write round panicked"))
    }

    /// Records an append by connection `id`; true if another connection appended lately.
    fn others_appending(&self, id: u64) -> bool {
        self.recent
            .lock()
            .map_or(true, |mut recent| recent.record(id, Instant::now()))
    }

    /// Writes and syncs `append` on this thread if nothing else waits for the writer and it
    /// takes requests; gives it back otherwise. A request whose sender has more on its way
    /// (`more_coming`) is written in place only while the writer thread seals: otherwise it
    /// goes to that thread, to share a round (and its fsync) with what follows.
    fn write_in_place(&self, append: Append, more_coming: bool) -> Result<(), Append> {
        if self.queued.load(Ordering::Acquire) != 0 {
            return Err(append);
        }
        let Ok(mut desk) = self.desk.try_lock() else {
            return Err(append);
        };
        if desk.stopped
            || desk.thread == WriterThread::Busy
            || (more_coming && desk.thread != WriterThread::Sealing)
            || self.queued.load(Ordering::Acquire) != 0
            || desk.writer.stalled()
            || !self.registry.accepting()
            || self.near_limit()
        {
            return Err(append);
        }
        desk.writer.round(vec![append], Instant::now());
        self.in_place.fetch_add(1, Ordering::Relaxed);
        crate::metrics::metrics().write_round("connection");
        let due = desk.writer.next_deadline();
        if let (Some(due), WriterThread::Waiting { until }) = (due, desk.thread) {
            if until.is_none_or(|at| due < at) {
                self.wake.notify_one();
            }
        }
        Ok(())
    }

    /// The buffer's chunks are at `total_limit_size`: the writer thread takes no requests.
    fn at_limit(&self) -> bool {
        self.config
            .total_limit_size
            .is_some_and(|limit| self.registry.usage() >= limit)
    }

    /// The buffer is at `total_limit_size`, spare files counted: the writer thread deletes the
    /// spares then, and decides what else happens.
    fn near_limit(&self) -> bool {
        self.config
            .total_limit_size
            .is_some_and(|limit| self.registry.usage() + self.registry.spares().bytes() >= limit)
    }
}

/// How many append requests may wait for the writer before connections stop reading.
const QUEUE_DEPTH: usize = 1024;
/// Most rounds the writer thread runs, one after the other, for requests that arrived during
/// the round before, ahead of the seals that are due.
const DRAIN_ROUNDS: usize = 4;
/// Most append requests gathered into one write round.
const MAX_BATCH: usize = 4096;

/// The opened buffer: the handle for connections and the writer task to run.
pub struct Buffer {
    pub handle: BufferHandle,
    rx: mpsc::Receiver<Append>,
    lock: DirLock,
}

/// The buffer directory's lock (an flock on `LOCK`); released when dropped.
#[derive(Debug)]
pub struct DirLock(#[allow(dead_code)] File);

impl Buffer {
    /// Opens (creating if needed) the buffer directory, takes its lock and recovers what a
    /// previous run left into `registry`. Sealed chunks go to `sealed_tx` as the writer makes
    /// them.
    pub fn open(
        config: BufferConfig,
        registry: Arc<Registry>,
        sealed_tx: mpsc::UnboundedSender<SealedChunk>,
    ) -> anyhow::Result<(Buffer, Recovered)> {
        Buffer::open_with(config, registry, sealed_tx, None)
    }

    /// [`Buffer::open`] that also rebuilds the resend window `dedup` from the token records of
    /// the recovered chunks and the token journal, and keeps the journal (in `registry`) for
    /// the chunks delivered from now on. Without it, or with deduplication off, no tokens are
    /// kept on disk.
    pub fn open_with(
        config: BufferConfig,
        registry: Arc<Registry>,
        sealed_tx: mpsc::UnboundedSender<SealedChunk>,
        dedup: Option<Arc<crate::dedup::Dedup>>,
    ) -> anyhow::Result<(Buffer, Recovered)> {
        let chunks_dir = chunks_dir(&config.dir);
        chunk::create_dir_durably(&chunks_dir).map_err(|e| {
            anyhow::anyhow!(
                "cannot create buffer directory {}: {e}",
                chunks_dir.display()
            )
        })?;
        let lock = File::create(config.dir.join("LOCK"))?;
        if let Err(e) = lock.try_lock() {
            anyhow::bail!(
                "buffer directory {} is in use by another claimcheck process ({e})",
                config.dir.display()
            );
        }
        // The reserve is room for this start's own writes (seals of recovered chunks, the
        // token journal) if the disk filled up; the writer puts it back when there is room.
        let _ = std::fs::remove_file(config.dir.join(writer::RESERVE_FILE));
        let mut recovered = recovery::recover(&chunks_dir, &registry)?;
        if let Some(dedup) = dedup.filter(|d| d.enabled()) {
            let in_chunks = std::mem::take(&mut recovered.tokens);
            let tokens = tokens::Tokens::open(&config.dir, dedup, in_chunks).map_err(|e| {
                anyhow::anyhow!(
                    "cannot open the token journal in {}: {e}",
                    config.dir.display()
                )
            })?;
            registry.set_tokens(Arc::new(tokens));
        }
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let config = Arc::new(config);
        let writer = Writer::new(config.clone(), chunks_dir, registry.clone(), sealed_tx);
        let shared = Arc::new(Shared {
            desk: Mutex::new(Desk {
                writer,
                thread: WriterThread::Busy,
                stopped: false,
            }),
            queued: AtomicUsize::new(0),
            appender_ids: AtomicU64::new(0),
            recent: Mutex::new(RecentAppends::new()),
            in_place: AtomicU64::new(0),
            wake: Notify::new(),
            sealing: Mutex::new(()),
            #[cfg(test)]
            seal_pause: std::sync::RwLock::new(()),
            registry,
            config,
        });
        let buffer = Buffer {
            handle: BufferHandle { tx, shared },
            rx,
            lock: DirLock(lock),
        };
        Ok((buffer, recovered))
    }

    /// Most chunk data files the writer holds open (`max_open_chunk_files`, resolved).
    pub fn max_open_files(&self) -> usize {
        let desk = self.handle.shared.desk.lock();
        desk.map_or(0, |desk| desk.writer.max_open_files())
    }

    /// Runs the writer until every [`BufferHandle`] is dropped, then seals all open chunks.
    /// Returns the directory lock, for the caller to hold until delivery has stopped too, or
    /// an error if the writer itself failed (a panic in its blocking work).
    ///
    /// The writer has a thread of its own, which waits for requests (and deadlines) on a
    /// small runtime of its own and writes each round right there: a round costs no hop onto
    /// the blocking pool and back, which is what bounded small requests and one busy
    /// connection when each round was a `spawn_blocking`.
    ///
    /// Dropping this future (aborting its task) stops the writer where it is, as a crash
    /// would: the lock is let go at once (after a round running in place, if one is), nothing
    /// more is written, and the thread leaves without sealing anything.
    pub async fn run(self) -> anyhow::Result<DirLock> {
        let Buffer { handle, rx, lock } = self;
        let shared = handle.shared.clone();
        drop(handle);
        // Dropped before `lock`: nothing is written in place once the directory is let go.
        let _stop = StopOnDrop(shared.clone());
        let (mut done_tx, done_rx) = oneshot::channel();
        std::thread::Builder::new()
            .name("claimcheck-writer".into())
            .spawn(move || {
                let result = tokio::runtime::Builder::new_current_thread()
                    .enable_time()
                    .build()
                    .map_err(anyhow::Error::from)
                    .and_then(|rt| rt.block_on(write_rounds(&shared, rx, &mut done_tx)));
                let _ = done_tx.send(result);
            })?;
        done_rx
            .await
            .map_err(|_| anyhow::anyhow!("the buffer writer thread panicked"))??;
        Ok(lock)
    }
}

/// Stops the writer when [`Buffer::run`] ends or is dropped, whatever the writer thread is
/// doing: a round under way (in place or on the writer thread) finishes first, and no other
/// starts: the writer thread checks `stopped` each time it takes the lock.
struct StopOnDrop(Arc<Shared>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        let mut desk = self
            .0
            .desk
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // A seal under way without the lock finishes first.
        let _sealing = self
            .0
            .sealing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        desk.stopped = true;
    }
}

/// The writer's loop, on its own thread ([`Buffer::run`]), blocking work done in place; until
/// every [`BufferHandle`] is dropped (then it seals all open chunks), or until `run` is
/// dropped (`done` closed: then it leaves at once; `run`'s [`StopOnDrop`] has stopped writes
/// in place).
async fn write_rounds(
    shared: &Shared,
    mut rx: mpsc::Receiver<Append>,
    done: &mut oneshot::Sender<anyhow::Result<()>>,
) -> anyhow::Result<()> {
    let (registry, config) = (&shared.registry, &shared.config);
    let mut full_since: Option<Instant> = None;
    loop {
        let (accepting, deadline) = {
            let mut desk = shared.lock()?;
            if desk.stopped {
                return Ok(());
            }
            let writer = &mut desk.writer;
            if config.overflow_action == OverflowAction::DropOldestChunk {
                drop_oldest(config, registry);
            }
            // Spare files count toward the limit, and go before anything has to wait.
            if shared.near_limit() && registry.spares().bytes() > 0 {
                let deleted = registry.spares().clear();
                debug!(
                    files = deleted,
                    "buffer near total_limit_size: deleted the spare chunk files kept for reuse"
                );
            }
            let full = shared.at_limit();
            match (full, full_since) {
                (true, None) => {
                    warn!(
                        usage = registry.usage(),
                        limit = config.total_limit_size,
                        "buffer full (total_limit_size): taking no requests until delivery frees space"
                    );
                    full_since = Some(Instant::now());
                    writer.seal_all("buffer full");
                }
                (false, Some(since)) => {
                    info!(after = ?since.elapsed(), "buffer has room again");
                    full_since = None;
                }
                _ => {}
            }
            let accepting = !full && !writer.stalled();
            registry.set_full(full, writer.stalled());
            let deadline = writer.next_deadline();
            desk.thread = WriterThread::Waiting { until: deadline };
            (accepting, deadline)
        };
        // At the limit (or on a full disk) the writer takes no requests, so it would not see
        // the last handle go, at shutdown once every connection is gone: it stops then all the
        // same. Requests still queued were never acked; dropped, they are answered `Closed`,
        // and their senders resend them.
        if !accepting && rx.is_closed() {
            break;
        }
        let first = tokio::select! {
            biased;
            () = done.closed() => return Ok(()),
            msg = rx.recv(), if accepting => match msg {
                Some(m) => Some(m),
                None => break,
            },
            () = sleep_until(deadline) => None,
            () = registry.wait_for_space(Duration::from_secs(1)), if !accepting => None,
            () = shared.wake.notified() => None,
        };
        let mut desk = shared.lock()?;
        // `run` was dropped while this thread waited for the lock: its directory lock may be
        // let go already, so nothing more is written (the requests taken are answered
        // `Closed` as they are dropped).
        if desk.stopped {
            return Ok(());
        }
        desk.thread = WriterThread::Busy;
        // Whatever woke the writer (a request, or seals left over from the last round),
        // the round takes the requests that are waiting. Those that arrived during it are
        // written in more rounds before a seal, up to DRAIN_ROUNDS: behind it they would wait
        // for its fsyncs (under `sync none`, what is left of a whole chunk), and so would
        // every request after them, not to overtake them. One that arrives during the seal
        // is written in place.
        let mut batch: Vec<Append> = first.into_iter().collect();
        let mut takes = accepting;
        let mut rounds = 0;
        let now = loop {
            if takes {
                take_waiting(&mut rx, &mut batch);
            }
            let (now, taken) = (Instant::now(), batch.len());
            if taken > 0 {
                crate::metrics::metrics().write_round("writer");
            }
            desk.writer.round(std::mem::take(&mut batch), now);
            // Written: requests may be written in place again (the lock is still held).
            shared.queued.fetch_sub(taken, Ordering::AcqRel);
            rounds += 1;
            takes = takes_requests(shared, &desk);
            if rounds > DRAIN_ROUNDS || !takes || rx.is_empty() {
                break now;
            }
        };
        let Some(desk) = seal_due(shared, desk, now)? else {
            return Ok(());
        };
        drop(desk);
    }
    if !done.is_closed() {
        shared.lock()?.writer.close();
    }
    Ok(())
}

/// Whether the writer thread takes requests now, as `write_rounds` decides before it waits
/// for them: not at `total_limit_size`, nor while the disk is full.
fn takes_requests(shared: &Shared, desk: &Desk) -> bool {
    !shared.at_limit() && !desk.writer.stalled()
}

/// Adds the requests waiting for the writer thread to `batch`, up to [`MAX_BATCH`].
fn take_waiting(rx: &mut mpsc::Receiver<Append>, batch: &mut Vec<Append>) {
    while batch.len() < MAX_BATCH {
        let Ok(append) = rx.try_recv() else {
            break;
        };
        batch.push(append);
    }
}

/// The writer thread's tick: seals what is due, a batch at a time for at most
/// [`writer::SEAL_BUDGET`] (at least one batch), each batch's I/O (fsyncs, state files)
/// without the lock, so that a connection's request is not held up behind a seal: it is
/// written in place meanwhile. Returns the lock again, or `None` if [`Buffer::run`] stopped
/// during a seal.
fn seal_due<'a>(
    shared: &'a Shared,
    mut desk: std::sync::MutexGuard<'a, Desk>,
    now: Instant,
) -> anyhow::Result<Option<std::sync::MutexGuard<'a, Desk>>> {
    let mut due = desk.writer.due_seals(now);
    let started = std::time::Instant::now();
    loop {
        let mut batch = desk.writer.next_seals(&mut due);
        if batch.is_empty() {
            break;
        }
        desk.thread = WriterThread::Sealing;
        let sealing = shared
            .sealing
            .lock()
            .map_err(|_| anyhow::anyhow!("a seal panicked"))?;
        drop(desk);
        #[cfg(test)]
        let paused = shared
            .seal_pause
            .read()
            .expect("a test poisoned the seal pause");
        batch.run();
        #[cfg(test)]
        drop(paused);
        drop(sealing);
        desk = shared.lock()?;
        if desk.stopped {
            // Sealed on disk, not handed over: the next start finds the chunks sealed.
            return Ok(None);
        }
        desk.thread = WriterThread::Busy;
        desk.writer.sealed(batch);
        if started.elapsed() >= desk.writer.seal_budget() {
            break;
        }
    }
    desk.writer.end_tick(due);
    Ok(Some(desk))
}

/// `overflow_action drop_oldest_chunk`: delete waiting chunks, oldest first, until the buffer
/// is under `total_limit_size`. Each drop is logged at ERROR: it is data loss by choice.
fn drop_oldest(config: &BufferConfig, registry: &Registry) {
    let Some(limit) = config.total_limit_size else {
        return;
    };
    while registry.usage() >= limit {
        let Some(info) = registry.take_oldest_waiting() else {
            return;
        };
        let paths = ChunkPaths::new(&chunks_dir(&config.dir), &info.chunk_id);
        if let Err(e) = paths.remove() {
            error!(chunk_id = %info.chunk_id, cause = %e, "cannot delete a dropped chunk's files");
        }
        registry.remove(&info.chunk_id);
        registry.count_dropped(info.records);
        error!(chunk_id = %info.chunk_id, tag = %info.tag, events = info.records, bytes = info.bytes,
               "buffer full: dropped the oldest chunk (overflow_action drop_oldest_chunk)");
    }
}

/// Directory of chunk files under a buffer directory.
pub fn chunks_dir(buffer_dir: &Path) -> PathBuf {
    buffer_dir.join("chunks")
}

#[cfg(test)]
impl BufferHandle {
    /// Makes the writer thread's next seal panic, for tests of what follows: poisons the
    /// lock its I/O takes in tests.
    pub(crate) fn panic_at_next_seal(&self) {
        let shared = self.shared.clone();
        let poisoner = std::thread::spawn(move || {
            let _paused = shared.seal_pause.write();
            panic!("poisoning the seal pause");
        });
        assert!(poisoner.join().is_err());
    }
}

#[cfg(test)]
mod fault_tests;
#[cfg(test)]
mod tests;
