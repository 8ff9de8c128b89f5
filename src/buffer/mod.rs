//! The durable buffer: chunk files keyed by (tag, timekey).
//!
//! # The promise
//!
//! A forward `chunk` option is acknowledged only after its events are written to a chunk file
//! *and that file has been fsynced* (plus its directory, when the file is new). One fsync covers
//! every append that arrived while the previous one ran (group commit). Nothing is deleted
//! before Kinesis accepted the chunk's pointer.
//!
//! # Layout
//!
//! ```text
//! <buffer_dir>/
//!   LOCK                      held (flock) while a sidecar uses the directory
//!   chunks/<id>.chunk         data file (the chunk id is 32 lowercase hex digits, a UUIDv7)
//!   chunks/<id>.state         JSON state once sealed; replaced atomically (tmp, fsync, rename)
//!   chunks/<id>.object        compressed object staged for upload (a cache; rebuilt if lost)
//!
//! data file  = "CCHUNK01" | header_len u32 LE | header_crc32c u32 LE | header JSON | frame*
//! header     = {"chunk_id","tag","timekey","created_ms"}
//! frame      = payload_len u32 LE | payload_crc32c u32 LE | payload
//! payload    = whole msgpack [time, record] entries, bytes as received
//! ```
//!
//! The chunk body (what S3 stores before compression) is the concatenation of the payloads.
//! Each append batch of a chunk is one frame, written with one vectored write; a crash in the
//! middle leaves a torn frame, which recovery detects (short or CRC mismatch) and cuts off.
//! None of a torn frame's events were acknowledged, because acks wait for the fsync.
//!
//! # Lifecycle
//!
//! ```text
//! open ──seal──▶ sealed ──S3 PUT ok──▶ uploaded ──PutRecords ok──▶ deleted
//!  (data file)   (state: sealed,     (state: uploaded,            (data file removed first,
//!                 data_len fixed)     pointer + etag)              then state and object)
//! ```
//!
//! * **seal** when the chunk reaches `chunk_limit_size` or `chunk_limit_records`, when its
//!   timekey plus `timekey_wait` has passed, `flush_interval` after it was created, or at
//!   shutdown. Sealing syncs the data file and writes the state atomically.
//! * **recover** on start: sealed and uploaded chunks are queued again where they stopped;
//!   open chunks are scanned, cut back to their last whole frame, and sealed.
//! * **delete** is the "published" record: the data file is unlinked first, so a crash
//!   between Kinesis accepting a pointer and the unlink publishes the pointer again (same chunk
//!   id; consumers drop it). A state or object file without its data file is removed on start.

pub mod chunk;
mod recovery;

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use claimcheck_consumer::entry::{self, EventTime};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use chunk::{ChunkHeader, ChunkPaths, ChunkState, ChunkStats, ChunkWriter};
pub use recovery::Recovered;

/// Settings of the buffer (see `config.rs` for their documentation and defaults).
#[derive(Debug, Clone)]
pub struct BufferConfig {
    pub dir: PathBuf,
    pub timekey: Duration,
    pub timekey_wait: Duration,
    pub chunk_limit_size: u64,
    pub chunk_limit_records: Option<u64>,
    pub flush_interval: Duration,
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

/// A chunk whose object S3 confirmed; its pointer is ready to publish.
#[derive(Debug, Clone)]
pub struct UploadedChunk {
    pub header: ChunkHeader,
    pub paths: ChunkPaths,
    pub pointer: claimcheck_consumer::Pointer,
}

/// A chunk that will receive no more events, ready for upload.
#[derive(Debug, Clone)]
pub struct SealedChunk {
    pub header: ChunkHeader,
    pub stats: ChunkStats,
    pub paths: ChunkPaths,
}

struct Append {
    tag: Arc<str>,
    groups: Vec<Group>,
    done: oneshot::Sender<Result<(), BufferError>>,
}

/// Cheap handle that connections use to append events.
#[derive(Clone, Debug)]
pub struct BufferHandle {
    tx: mpsc::Sender<Append>,
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
        let (done, rx) = oneshot::channel();
        // If the writer is gone the sender is dropped with the message and `Durable` says Closed.
        let _ = self.tx.send(Append { tag, groups, done }).await;
        Durable(rx)
    }
}

/// How many append requests may wait for the writer before connections stop reading.
const QUEUE_DEPTH: usize = 1024;
/// Most append requests gathered into one write-and-fsync round.
const MAX_BATCH: usize = 4096;

/// The opened buffer: the handle for connections and the writer task to run.
pub struct Buffer {
    pub handle: BufferHandle,
    pub writer: Writer,
    rx: mpsc::Receiver<Append>,
    lock: DirLock,
}

/// The buffer directory's lock (an flock on `LOCK`); released when dropped.
#[derive(Debug)]
pub struct DirLock(#[allow(dead_code)] File);

impl Buffer {
    /// Opens (creating if needed) the buffer directory, takes its lock and recovers what a
    /// previous run left. Sealed chunks go to `sealed_tx` as the writer produces them.
    pub fn open(
        config: BufferConfig,
        sealed_tx: mpsc::UnboundedSender<SealedChunk>,
    ) -> anyhow::Result<(Buffer, Recovered)> {
        let chunks_dir = config.dir.join("chunks");
        std::fs::create_dir_all(&chunks_dir).map_err(|e| {
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
        let recovered = recovery::recover(&chunks_dir)?;
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let writer = Writer {
            config: Arc::new(config),
            chunks_dir,
            open: HashMap::new(),
            unsealed: Vec::new(),
            sealed_tx,
        };
        Ok((
            Buffer {
                handle: BufferHandle { tx },
                writer,
                rx,
                lock: DirLock(lock),
            },
            recovered,
        ))
    }

    /// Runs the writer until every [`BufferHandle`] is dropped, then seals all open chunks.
    /// Returns the directory lock, for the caller to hold until delivery has stopped too, or
    /// an error if the writer itself failed (a panic in its blocking work).
    pub async fn run(self) -> anyhow::Result<DirLock> {
        let Buffer {
            handle,
            mut writer,
            mut rx,
            lock,
        } = self;
        drop(handle);
        loop {
            let deadline = writer.next_deadline();
            let first = tokio::select! {
                msg = rx.recv() => match msg {
                    Some(m) => Some(m),
                    None => break,
                },
                () = sleep_until(deadline) => None,
            };
            let mut batch: Vec<Append> = first.into_iter().collect();
            while batch.len() < MAX_BATCH && !batch.is_empty() {
                match rx.try_recv() {
                    Ok(m) => batch.push(m),
                    Err(_) => break,
                }
            }
            let now = Instant::now();
            writer = tokio::task::spawn_blocking(move || {
                writer.apply(batch, now);
                writer.seal_due(now);
                writer
            })
            .await?;
        }
        tokio::task::spawn_blocking(move || {
            let keys: Vec<_> = writer.open.keys().cloned().collect();
            for key in keys {
                writer.seal_key(&key, "shutdown");
            }
            writer.retry_unsealed();
        })
        .await?;
        Ok(lock)
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

struct OpenChunk {
    header: ChunkHeader,
    paths: ChunkPaths,
    writer: ChunkWriter,
    stats: ChunkStats,
    deadline: Instant,
    /// The directory entry has not been synced yet.
    new_file: bool,
    /// Events appended in the current batch, written as one frame.
    pending: Vec<Bytes>,
    pending_stats: ChunkStats,
    /// Indexes (in the batch) of the appends that put events in `pending` or in frames of this
    /// batch, and whether this chunk's writes so far succeeded.
    contributors: Vec<usize>,
    failed: Option<String>,
}

/// The state owned by the writer task; all of its methods do blocking I/O.
pub struct Writer {
    config: Arc<BufferConfig>,
    chunks_dir: PathBuf,
    open: HashMap<(Arc<str>, i64), OpenChunk>,
    /// Chunks taken out of `open` whose seal failed; retried on every round.
    unsealed: Vec<OpenChunk>,
    sealed_tx: mpsc::UnboundedSender<SealedChunk>,
}

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl Writer {
    fn next_deadline(&self) -> Option<Instant> {
        let retry = (!self.unsealed.is_empty()).then(|| Instant::now() + Duration::from_secs(1));
        self.open.values().map(|c| c.deadline).chain(retry).min()
    }

    fn max_records(&self) -> u64 {
        self.config.chunk_limit_records.unwrap_or(u64::MAX)
    }

    /// Writes a batch of appends, syncs every touched chunk once, then completes the appends.
    fn apply(&mut self, batch: Vec<Append>, now: Instant) {
        let mut outcome: Vec<Option<String>> = vec![None; batch.len()];
        let mut done_chunks: Vec<OpenChunk> = Vec::new();
        let mut senders = Vec::with_capacity(batch.len());
        let (limit_bytes, limit_records) = (self.config.chunk_limit_size, self.max_records());
        for (i, append) in batch.into_iter().enumerate() {
            senders.push(append.done);
            for mut group in append.groups {
                while group.records > 0 {
                    let key = (append.tag.clone(), group.timekey);
                    let chunk = match self.open_chunk(&key, now) {
                        Ok(c) => c,
                        Err(e) => {
                            error!(tag = %key.0, timekey = key.1, cause = %e, "cannot create chunk file");
                            outcome[i] = Some(e.to_string());
                            break;
                        }
                    };
                    let room_bytes = limit_bytes
                        .saturating_sub(chunk.stats.body_bytes + chunk.pending_stats.body_bytes);
                    let room_records = limit_records
                        .saturating_sub(chunk.stats.records + chunk.pending_stats.records);
                    let has_data = chunk.stats.records + chunk.pending_stats.records > 0;
                    let piece = if group.bytes <= room_bytes && group.records <= room_records {
                        std::mem::replace(&mut group, Group::new(0))
                    } else if has_data
                        && (room_bytes == 0
                            || room_records == 0
                            || !fits_first_entry(&group, room_bytes))
                    {
                        // Full: seal it and go round again with a fresh chunk.
                        let mut full = self.open.remove(&key).expect("chunk is open");
                        flush_pending(&mut full);
                        done_chunks.push(full);
                        continue;
                    } else {
                        group.split_front(room_bytes.max(1), room_records.max(1))
                    };
                    let chunk = self.open.get_mut(&key).expect("chunk is open");
                    chunk
                        .pending_stats
                        .add(piece.records, piece.bytes, piece.first, piece.last);
                    chunk.pending.extend(piece.slices);
                    chunk.contributors.push(i);
                }
            }
        }
        // Write what is pending, then sync each touched chunk (and the directory for new ones).
        let mut new_files = false;
        let mut synced: Vec<&mut OpenChunk> = Vec::new();
        for chunk in self.open.values_mut().chain(done_chunks.iter_mut()) {
            if chunk.contributors.is_empty() {
                continue;
            }
            flush_pending(chunk);
            if chunk.failed.is_none() {
                if let Err(e) = chunk.writer.sync() {
                    chunk.failed = Some(format!("fsync: {e}"));
                }
            }
            new_files |= chunk.new_file;
            synced.push(chunk);
        }
        if new_files {
            if let Err(e) = chunk::sync_dir(&self.chunks_dir) {
                for chunk in &mut synced {
                    if chunk.new_file {
                        chunk
                            .failed
                            .get_or_insert_with(|| format!("directory fsync: {e}"));
                    }
                }
            }
        }
        for chunk in synced {
            chunk.new_file = chunk.new_file && chunk.failed.is_some();
            if let Some(reason) = &chunk.failed {
                error!(chunk_id = %chunk.header.chunk_id, tag = %chunk.header.tag, %reason, "chunk write failed; its appends are not acknowledged");
                for &i in &chunk.contributors {
                    outcome[i].get_or_insert_with(|| reason.clone());
                }
            }
            chunk.contributors.clear();
        }
        for (sender, failed) in senders.into_iter().zip(outcome) {
            let _ = sender.send(match failed {
                None => Ok(()),
                Some(reason) => Err(BufferError::Write { reason }),
            });
        }
        // A chunk whose write failed takes no more events: seal what it durably holds.
        let failed: Vec<_> = self
            .open
            .iter()
            .filter(|(_, c)| c.failed.is_some())
            .map(|(k, _)| k.clone())
            .collect();
        for key in failed {
            self.seal_key(&key, "write error");
        }
        for chunk in done_chunks {
            self.seal_chunk(chunk, "size");
        }
        let full: Vec<_> = self
            .open
            .iter()
            .filter(|(_, c)| {
                c.stats.body_bytes >= self.config.chunk_limit_size
                    || c.stats.records >= self.max_records()
            })
            .map(|(k, _)| k.clone())
            .collect();
        for key in full {
            self.seal_key(&key, "size");
        }
    }

    /// Seals chunks whose time is up and retries failed seals.
    fn seal_due(&mut self, now: Instant) {
        let due: Vec<_> = self
            .open
            .iter()
            .filter(|(_, c)| c.deadline <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for key in due {
            self.seal_key(&key, "time");
        }
        self.retry_unsealed();
    }

    fn retry_unsealed(&mut self) {
        for chunk in std::mem::take(&mut self.unsealed) {
            self.seal_chunk(chunk, "retry");
        }
    }

    fn open_chunk(&mut self, key: &(Arc<str>, i64), now: Instant) -> io::Result<&mut OpenChunk> {
        if !self.open.contains_key(key) {
            let chunk = self.create_chunk(key, now)?;
            self.open.insert(key.clone(), chunk);
        }
        Ok(self.open.get_mut(key).expect("just inserted"))
    }

    fn create_chunk(&self, key: &(Arc<str>, i64), now: Instant) -> io::Result<OpenChunk> {
        let chunk_id = uuid::Uuid::now_v7().simple().to_string();
        let created_ms = unix_ms();
        let header = ChunkHeader {
            chunk_id,
            tag: key.0.to_string(),
            timekey: key.1,
            created_ms,
        };
        let paths = ChunkPaths::new(&self.chunks_dir, &header.chunk_id);
        let writer = ChunkWriter::create(&paths.data, &header)?;
        debug!(chunk_id = %header.chunk_id, tag = %header.tag, timekey = header.timekey, "chunk created");
        Ok(OpenChunk {
            deadline: self.deadline(now, created_ms, key.1),
            header,
            paths,
            writer,
            stats: ChunkStats::default(),
            new_file: true,
            pending: Vec::new(),
            pending_stats: ChunkStats::default(),
            contributors: Vec::new(),
            failed: None,
        })
    }

    /// When a chunk created now must be sealed: `flush_interval` after creation, or once its
    /// timekey plus `timekey_wait` has passed on the wall clock, whichever is first, but not
    /// before it is a second old (so a replay of old events does not make a chunk per request).
    fn deadline(&self, now: Instant, created_ms: i64, timekey: i64) -> Instant {
        let c = &self.config;
        let flush = now + c.flush_interval;
        let window_end_ms =
            (timekey + c.timekey.as_secs() as i64) * 1000 + c.timekey_wait.as_millis() as i64;
        let timekey_due =
            now + Duration::from_millis(window_end_ms.saturating_sub(created_ms).max(0) as u64);
        let min_age = now + c.flush_interval.min(Duration::from_secs(1));
        flush.min(timekey_due).max(min_age)
    }

    fn seal_key(&mut self, key: &(Arc<str>, i64), reason: &'static str) {
        if let Some(chunk) = self.open.remove(key) {
            self.seal_chunk(chunk, reason);
        }
    }

    /// Makes a chunk immutable: sync its data, write the sealed state, hand it to the
    /// uploader. An empty chunk is just removed.
    fn seal_chunk(&mut self, chunk: OpenChunk, reason: &'static str) {
        let OpenChunk {
            header,
            paths,
            writer,
            stats,
            ..
        } = &chunk;
        if stats.records == 0 {
            if let Err(e) = paths.remove() {
                warn!(chunk_id = %header.chunk_id, cause = %e, "cannot remove empty chunk");
            }
            return;
        }
        let stats = ChunkStats {
            data_len: writer.valid_len(),
            ..*stats
        };
        let result = writer.sync().and_then(|()| {
            chunk::write_state(
                &paths.state,
                &ChunkState::Sealed {
                    header: header.clone(),
                    stats,
                },
            )
        });
        match result {
            Ok(()) => {
                info!(chunk_id = %header.chunk_id, tag = %header.tag, timekey = header.timekey,
                      events = stats.records, bytes = stats.body_bytes, reason, "chunk sealed");
                let sealed = SealedChunk {
                    header: header.clone(),
                    stats,
                    paths: paths.clone(),
                };
                if self.sealed_tx.send(sealed).is_err() {
                    debug!(chunk_id = %header.chunk_id, "uploader is gone; the chunk stays for the next start");
                }
            }
            Err(e) => {
                error!(chunk_id = %header.chunk_id, cause = %e, "cannot seal chunk; will retry");
                self.unsealed.push(chunk);
            }
        }
    }
}

/// Whether at least the first entry of `group` fits in `room` bytes.
fn fits_first_entry(group: &Group, room: u64) -> bool {
    group
        .slices
        .first()
        .and_then(|s| entry::entries(s).next())
        .and_then(Result::ok)
        .is_some_and(|(bytes, _)| bytes.len() as u64 <= room)
}

/// Writes a chunk's pending events as one frame and moves them into its stats.
fn flush_pending(chunk: &mut OpenChunk) {
    if chunk.pending.is_empty() {
        return;
    }
    let pending = std::mem::take(&mut chunk.pending);
    let stats = std::mem::take(&mut chunk.pending_stats);
    if chunk.failed.is_some() {
        return;
    }
    match chunk.writer.append(&pending) {
        Ok(()) => chunk.stats.add(
            stats.records,
            stats.body_bytes,
            stats.first_time,
            stats.last_time,
        ),
        Err(e) => chunk.failed = Some(format!("write: {e}")),
    }
}

/// Directory of chunk files under a buffer directory.
pub fn chunks_dir(buffer_dir: &Path) -> PathBuf {
    buffer_dir.join("chunks")
}

#[cfg(test)]
mod tests;
