//! The buffer writer: places events in open chunks, writes and syncs them, seals chunks.
//! Everything here is blocking I/O, run on tokio's blocking pool one round at a time.
//!
//! # A round
//!
//! 1. Each request waiting for the writer becomes a *waiter*; each of its groups a *piece*.
//!    Pieces held back by a full disk in an earlier round go first.
//! 2. Pieces are placed in the open chunk of their (tag, timekey), split where a chunk fills up
//!    (`chunk_limit_size`, `chunk_limit_records`); a full chunk is set aside for sealing.
//! 3. Each chunk's pieces of the round are written as one frame. Under `sync always` each
//!    written chunk is then fsynced, and the directory too when a chunk file is new.
//! 4. A waiter whose pieces are all written (and synced, under `always`) is answered Ok, and
//!    its connection sends the ack. A piece whose write or sync failed fails its waiter (no
//!    ack; the sender resends), except that a write refused for lack of space is *held* and
//!    retried in later rounds: its waiter simply waits.
//!
//! While pieces are held, the writer takes no new requests, so connections stop reading and
//! TCP pushes back on the senders. A small reserve file is released at that moment, so that
//! open chunks can still be sealed (their state files need a few hundred bytes each) and
//! delivered, which is what frees the space. Held pieces are tried again only once deliveries
//! have freed space or the file system reports room beyond the reserve, so data never eats
//! the room kept for state files.

use std::collections::HashMap;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use claimcheck_consumer::entry;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use super::chunk::{self, ChunkHeader, ChunkPaths, ChunkState, ChunkStats, ChunkWriter};
use super::registry::{ChunkInfo, Phase, Registry};
use super::{BufferConfig, BufferError, Group, SealedChunk, SyncPolicy};

/// A request waiting for the writer.
pub(super) struct Append {
    pub tag: Arc<str>,
    pub groups: Vec<Group>,
    pub done: oneshot::Sender<Result<(), BufferError>>,
}

struct Waiter {
    done: Option<oneshot::Sender<Result<(), BufferError>>>,
    /// Pieces of this request not yet durable (or failed).
    outstanding: usize,
    failed: Option<String>,
}

/// Events of one request bound for one chunk.
struct Piece {
    waiter: u64,
    tag: Arc<str>,
    group: Group,
}

type ChunkKey = (Arc<str>, i64);

struct OpenChunk {
    header: ChunkHeader,
    paths: ChunkPaths,
    writer: ChunkWriter,
    stats: ChunkStats,
    deadline: Instant,
    /// The directory entry has not been synced yet.
    new_file: bool,
    /// Written since the last fsync.
    dirty: bool,
    /// Pieces placed in this round, written as one frame.
    pending: Vec<Piece>,
    pending_stats: ChunkStats,
    /// A write or sync failed: the chunk takes no more events and is sealed as it stands.
    failed: Option<String>,
}

/// What writing one chunk's pending pieces gave.
#[derive(Default)]
struct Flushed {
    /// Waiters of pieces now durable (or written, when the sync policy does not wait).
    ok: Vec<u64>,
    /// Like `ok`, but in a new chunk file whose directory entry must be synced first.
    ok_new_file: Vec<u64>,
    failed: Vec<(u64, String)>,
}

/// Bytes kept in reserve for state files when the disk fills up.
const RESERVE_BYTES: usize = 1 << 20;

/// True for errors that mean "no space": the write can succeed later.
pub fn is_disk_full(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded | io::ErrorKind::FileTooLarge
    )
}

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The state owned by the writer task.
pub struct Writer {
    config: Arc<BufferConfig>,
    chunks_dir: PathBuf,
    reserve: PathBuf,
    registry: Arc<Registry>,
    sealed_tx: mpsc::UnboundedSender<SealedChunk>,
    open: HashMap<ChunkKey, OpenChunk>,
    /// Chunks taken out of `open` whose seal failed; retried every round.
    unsealed: Vec<OpenChunk>,
    waiters: HashMap<u64, Waiter>,
    next_waiter: u64,
    /// Pieces refused for lack of space, retried first in the next rounds.
    held: Vec<Piece>,
    /// Something was written and not yet synced (sync policies `interval` and `none`).
    dirty: bool,
    last_sync: Instant,
    /// Buffer usage when the disk was found full; held pieces wait until it goes down.
    full_at_usage: Option<u64>,
}

impl Writer {
    pub(super) fn new(
        config: Arc<BufferConfig>,
        chunks_dir: PathBuf,
        registry: Arc<Registry>,
        sealed_tx: mpsc::UnboundedSender<SealedChunk>,
    ) -> Self {
        let reserve = config.dir.join("RESERVE");
        let writer = Writer {
            config,
            chunks_dir,
            reserve,
            registry,
            sealed_tx,
            open: HashMap::new(),
            unsealed: Vec::new(),
            waiters: HashMap::new(),
            next_waiter: 0,
            held: Vec::new(),
            dirty: false,
            last_sync: Instant::now(),
            full_at_usage: None,
        };
        writer.keep_reserve();
        writer
    }

    /// True while pieces wait for disk space: take no new requests.
    pub(super) fn stalled(&self) -> bool {
        !self.held.is_empty()
    }

    /// The next moment something is due: a chunk's seal, a failed seal's retry, a sync.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        let retry = (!self.unsealed.is_empty() || self.stalled())
            .then(|| Instant::now() + Duration::from_secs(1));
        let sync = (self.dirty && self.config.sync == SyncPolicy::Interval)
            .then(|| self.last_sync + self.config.sync_interval);
        self.open
            .values()
            .map(|c| c.deadline)
            .chain(retry)
            .chain(sync)
            .min()
    }

    fn max_records(&self) -> u64 {
        self.config.chunk_limit_records.unwrap_or(u64::MAX)
    }

    /// One round: place, write, sync, answer (see the module documentation).
    pub(super) fn round(&mut self, batch: Vec<Append>, now: Instant) {
        let was_stalled = self.stalled();
        let mut pieces = if self.room_for_held() {
            std::mem::take(&mut self.held)
        } else {
            Vec::new()
        };
        for append in batch {
            let id = self.next_waiter;
            self.next_waiter += 1;
            let waiter = Waiter {
                done: Some(append.done),
                outstanding: append.groups.len(),
                failed: None,
            };
            self.waiters.insert(id, waiter);
            pieces.extend(append.groups.into_iter().map(|group| Piece {
                waiter: id,
                tag: append.tag.clone(),
                group,
            }));
            if self.waiters[&id].outstanding == 0 {
                self.answer(id);
            }
        }
        let mut full = Vec::new();
        for piece in pieces {
            self.place(piece, now, &mut full);
        }
        let mut flushed = Flushed::default();
        for chunk in self.open.values_mut().chain(full.iter_mut()) {
            flush(
                chunk,
                self.config.sync,
                &self.registry,
                &mut self.held,
                &mut flushed,
            );
        }
        self.dirty |= self.config.sync != SyncPolicy::Always
            && !(flushed.ok.is_empty() && flushed.ok_new_file.is_empty());
        if !flushed.ok_new_file.is_empty() {
            // New chunk files: their directory entries must be durable before the acks.
            match chunk::sync_dir(&self.chunks_dir) {
                Ok(()) => {
                    self.open
                        .values_mut()
                        .chain(full.iter_mut())
                        .for_each(|c| c.new_file = false);
                    flushed.ok.append(&mut flushed.ok_new_file);
                }
                Err(e) => {
                    let reason = format!("directory fsync: {e}");
                    flushed
                        .failed
                        .extend(flushed.ok_new_file.drain(..).map(|w| (w, reason.clone())));
                }
            }
        }
        if !flushed.failed.is_empty() || !flushed.ok.is_empty() {
            self.registry
                .set_write_failing(!flushed.failed.is_empty() && flushed.ok.is_empty());
        }
        for (waiter, reason) in flushed.failed {
            if let Some(w) = self.waiters.get_mut(&waiter) {
                w.failed.get_or_insert(reason);
            }
            self.piece_done(waiter);
        }
        for waiter in flushed.ok {
            self.piece_done(waiter);
        }
        if self.stalled() {
            if !was_stalled {
                self.on_disk_full();
            }
            self.full_at_usage = Some(self.registry.usage());
        } else if was_stalled {
            info!("disk space is back; held requests are stored");
            self.full_at_usage = None;
            self.keep_reserve();
        }
        // Chunks that filled up, and chunks that failed, are sealed with what they hold.
        for chunk in full {
            self.seal_chunk(chunk, "size");
        }
        let (limit, max_records) = (self.config.chunk_limit_size, self.max_records());
        let done: Vec<_> = self
            .open
            .iter()
            .filter(|(_, c)| {
                c.failed.is_some() || c.stats.body_bytes >= limit || c.stats.records >= max_records
            })
            .map(|(k, c)| {
                (
                    k.clone(),
                    if c.failed.is_some() {
                        "write error"
                    } else {
                        "size"
                    },
                )
            })
            .collect();
        for (key, reason) in done {
            self.seal_key(&key, reason);
        }
    }

    /// Places a piece in the open chunk of its tag and timekey, splitting it where chunks fill.
    fn place(&mut self, mut piece: Piece, now: Instant, full: &mut Vec<OpenChunk>) {
        let (limit_bytes, limit_records) = (self.config.chunk_limit_size, self.max_records());
        loop {
            let key = (piece.tag.clone(), piece.group.timekey);
            let chunk = match self.open_chunk(&key, now) {
                Ok(c) => c,
                Err(e) if is_disk_full(&e) => {
                    self.held.push(piece);
                    return;
                }
                Err(e) => {
                    error!(tag = %key.0, timekey = key.1, cause = %e, "cannot create a chunk file; the request is not acknowledged");
                    if let Some(w) = self.waiters.get_mut(&piece.waiter) {
                        w.failed.get_or_insert(e.to_string());
                    }
                    self.piece_done(piece.waiter);
                    return;
                }
            };
            let held_bytes = chunk.stats.body_bytes + chunk.pending_stats.body_bytes;
            let held_records = chunk.stats.records + chunk.pending_stats.records;
            let room_bytes = limit_bytes.saturating_sub(held_bytes);
            let room_records = limit_records.saturating_sub(held_records);
            let g = &piece.group;
            if g.bytes <= room_bytes && g.records <= room_records {
                chunk.pending_stats.add(g.records, g.bytes, g.first, g.last);
                chunk.pending.push(piece);
                return;
            }
            if held_records > 0
                && (room_bytes == 0 || room_records == 0 || !fits_first_entry(g, room_bytes))
            {
                // Full: set it aside for sealing and go round again with a fresh chunk.
                full.push(self.open.remove(&key).expect("the chunk is open"));
                continue;
            }
            let front = piece
                .group
                .split_front(room_bytes.max(1), room_records.max(1));
            chunk
                .pending_stats
                .add(front.records, front.bytes, front.first, front.last);
            chunk.pending.push(Piece {
                waiter: piece.waiter,
                tag: piece.tag.clone(),
                group: front,
            });
            if let Some(w) = self.waiters.get_mut(&piece.waiter) {
                w.outstanding += 1;
            }
        }
    }

    fn piece_done(&mut self, waiter: u64) {
        let done = match self.waiters.get_mut(&waiter) {
            Some(w) => {
                w.outstanding = w.outstanding.saturating_sub(1);
                w.outstanding == 0
            }
            None => false,
        };
        if done {
            self.answer(waiter);
        }
    }

    fn answer(&mut self, waiter: u64) {
        if let Some(mut w) = self.waiters.remove(&waiter) {
            let result = match w.failed {
                None => Ok(()),
                Some(reason) => Err(BufferError::Write { reason }),
            };
            if let Some(done) = w.done.take() {
                let _ = done.send(result);
            }
        }
    }

    /// Seals chunks whose time is up, retries failed seals, and syncs on the interval.
    pub(super) fn tick(&mut self, now: Instant) {
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
        if self.dirty
            && self.config.sync == SyncPolicy::Interval
            && now >= self.last_sync + self.config.sync_interval
        {
            self.sync_all(now);
        }
    }

    /// Fsyncs every open chunk written since the last sync, and the directory.
    fn sync_all(&mut self, now: Instant) {
        let mut new_files = false;
        for chunk in self.open.values_mut().filter(|c| c.dirty) {
            match chunk.writer.sync() {
                Ok(()) => chunk.dirty = false,
                Err(e) => chunk.failed = Some(format!("fsync: {e}")),
            }
            new_files |= chunk.new_file;
        }
        if new_files && chunk::sync_dir(&self.chunks_dir).is_ok() {
            self.open.values_mut().for_each(|c| c.new_file = false);
        }
        self.dirty = false;
        self.last_sync = now;
    }

    /// Seals every open chunk (shutdown, or to let delivery free space).
    pub(super) fn seal_all(&mut self, reason: &'static str) {
        let keys: Vec<_> = self.open.keys().cloned().collect();
        for key in keys {
            self.seal_key(&key, reason);
        }
        self.retry_unsealed();
    }

    /// Stops for good: seals everything; requests still held for space get no ack.
    pub(super) fn close(mut self) {
        self.round(Vec::new(), Instant::now());
        self.seal_all("shutdown");
        for piece in std::mem::take(&mut self.held) {
            if let Some(w) = self.waiters.get_mut(&piece.waiter) {
                w.failed
                    .get_or_insert_with(|| "no disk space before shutdown".into());
            }
            self.piece_done(piece.waiter);
        }
    }

    /// Whether held pieces may be tried again: deliveries freed space since the disk was found
    /// full, or the file system has room beyond what the reserve needs.
    fn room_for_held(&self) -> bool {
        let Some(usage) = self.full_at_usage else {
            return true;
        };
        if self.registry.usage() < usage {
            return true;
        }
        rustix::fs::statvfs(&self.chunks_dir)
            .map(|s| s.f_bavail.saturating_mul(s.f_frsize) >= 2 * RESERVE_BYTES as u64)
            .unwrap_or(false)
    }

    /// Makes room for delivery when the disk is full: release the reserve, seal open chunks.
    fn on_disk_full(&mut self) {
        let held = self.held.len();
        warn!(
            held,
            "the disk is full: holding requests without acks until delivered chunks free space"
        );
        let _ = std::fs::remove_file(&self.reserve);
        self.seal_all("disk full");
    }

    /// Puts the reserve file back if there is room for it.
    fn keep_reserve(&self) {
        if self.reserve.exists() {
            return;
        }
        let result = std::fs::write(&self.reserve, vec![0u8; RESERVE_BYTES]);
        if let Err(e) = result {
            let _ = std::fs::remove_file(&self.reserve);
            debug!(cause = %e, "cannot write the reserve file yet");
        }
    }

    fn retry_unsealed(&mut self) {
        for chunk in std::mem::take(&mut self.unsealed) {
            self.seal_chunk(chunk, "retry");
        }
    }

    fn open_chunk(&mut self, key: &ChunkKey, now: Instant) -> io::Result<&mut OpenChunk> {
        if !self.open.contains_key(key) {
            let chunk = self.create_chunk(key, now)?;
            self.open.insert(key.clone(), chunk);
        }
        Ok(self.open.get_mut(key).expect("just inserted"))
    }

    fn create_chunk(&self, key: &ChunkKey, now: Instant) -> io::Result<OpenChunk> {
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
        self.registry.insert(ChunkInfo {
            chunk_id: header.chunk_id.clone(),
            tag: header.tag.clone(),
            timekey: header.timekey,
            phase: Phase::Open,
            created_ms,
            records: 0,
            bytes: writer.valid_len(),
            attempts: 0,
            last_error: None,
            next_retry_ms: None,
        });
        debug!(chunk_id = %header.chunk_id, tag = %header.tag, timekey = header.timekey, "chunk created");
        Ok(OpenChunk {
            deadline: self.deadline(now, created_ms, key.1),
            header,
            paths,
            writer,
            stats: ChunkStats::default(),
            new_file: true,
            dirty: false,
            pending: Vec::new(),
            pending_stats: ChunkStats::default(),
            failed: None,
        })
    }

    /// When a chunk created now must be sealed: `flush_interval` after creation, or once its
    /// timekey plus `timekey_wait` has passed on the wall clock, whichever is first, but not
    /// before it is a second old (so a replay of old events does not make a chunk per request).
    fn deadline(&self, now: Instant, created_ms: i64, timekey: i64) -> Instant {
        let c = &self.config;
        let flush = now + c.flush_interval;
        // Saturating: a sender may send any time up to i64::MAX seconds, and a timekey that
        // far away must not overflow (a panic here would stop the writer for every connection).
        let window_end_ms = timekey
            .saturating_add(c.timekey.as_secs() as i64)
            .saturating_mul(1000)
            .saturating_add(c.timekey_wait.as_millis() as i64);
        let wait = Duration::from_millis(window_end_ms.saturating_sub(created_ms).max(0) as u64);
        let timekey_due = now.checked_add(wait).unwrap_or(flush);
        let min_age = now + c.flush_interval.min(Duration::from_secs(1));
        flush.min(timekey_due).max(min_age)
    }

    fn seal_key(&mut self, key: &ChunkKey, reason: &'static str) {
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
                warn!(chunk_id = %header.chunk_id, cause = %e, "cannot remove an empty chunk");
            }
            self.registry.remove(&header.chunk_id);
            return;
        }
        let stats = ChunkStats {
            data_len: writer.valid_len(),
            ..*stats
        };
        let state = ChunkState::Sealed {
            header: header.clone(),
            stats,
        };
        match writer
            .sync()
            .and_then(|()| chunk::write_state(&paths.state, &state))
        {
            Ok(()) => {
                info!(chunk_id = %header.chunk_id, tag = %header.tag, timekey = header.timekey,
                      events = stats.records, bytes = stats.body_bytes, reason, "chunk sealed");
                crate::metrics::metrics().sealed(reason);
                self.registry.set_phase(&header.chunk_id, Phase::Sealed);
                let sealed = SealedChunk {
                    header: header.clone(),
                    stats,
                    paths: paths.clone(),
                };
                if self.sealed_tx.send(sealed).is_err() {
                    debug!(chunk_id = %header.chunk_id, "the uploader is gone; the chunk stays for the next start");
                }
            }
            Err(e) => {
                error!(chunk_id = %header.chunk_id, cause = %e, "cannot seal a chunk; will retry");
                self.unsealed.push(chunk);
            }
        }
    }
}

/// Writes a chunk's pending pieces as one frame and, under `sync always`, fsyncs it.
fn flush(
    chunk: &mut OpenChunk,
    sync: SyncPolicy,
    registry: &Registry,
    held: &mut Vec<Piece>,
    out: &mut Flushed,
) {
    if chunk.pending.is_empty() {
        return;
    }
    let pieces = std::mem::take(&mut chunk.pending);
    let stats = std::mem::take(&mut chunk.pending_stats);
    if let Some(reason) = &chunk.failed {
        out.failed
            .extend(pieces.iter().map(|p| (p.waiter, reason.clone())));
        return;
    }
    let slices: Vec<Bytes> = pieces
        .iter()
        .flat_map(|p| p.group.slices.iter().cloned())
        .collect();
    let before = chunk.writer.valid_len();
    let written = chunk.writer.append(&slices).and_then(|()| match sync {
        SyncPolicy::Always => chunk.writer.sync(),
        _ => Ok(()),
    });
    match written {
        Ok(()) => {
            chunk.stats.add(
                stats.records,
                stats.body_bytes,
                stats.first_time,
                stats.last_time,
            );
            chunk.dirty = sync != SyncPolicy::Always;
            registry.grow(
                &chunk.header.chunk_id,
                (chunk.writer.valid_len() - before) as i64,
                stats.records,
            );
            let ok = if chunk.new_file && sync == SyncPolicy::Always {
                &mut out.ok_new_file
            } else {
                &mut out.ok
            };
            ok.extend(pieces.iter().map(|p| p.waiter));
        }
        Err(e) if is_disk_full(&e) && chunk.writer.valid_len() == before => {
            // Cut back to its last whole frame: hold the pieces and try again later.
            held.extend(pieces);
        }
        Err(e) => {
            let reason = format!("{e}");
            error!(chunk_id = %chunk.header.chunk_id, tag = %chunk.header.tag, %reason,
                   "chunk write failed; its requests are not acknowledged");
            chunk.failed = Some(reason.clone());
            out.failed
                .extend(pieces.iter().map(|p| (p.waiter, reason.clone())));
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
