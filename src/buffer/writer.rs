//! The buffer writer: places events in open chunks, writes and syncs them, seals chunks.
//! Everything here is blocking I/O, run one round at a time under the buffer's lock: on the
//! writer's own thread ([`Buffer::run`](super::Buffer::run)), or on a connection's thread for
//! a request that nothing else waits with ("Where a request is written" in [`super`]).
//!
//! # A round
//!
//! 1. Take waiters ([`Writer::take_waiters`]): each request waiting for the writer becomes a
//!    *waiter*; each of its groups a *piece*. Pieces held back by a full disk in an earlier
//!    round go first.
//! 2. Place pieces ([`Writer::place_pieces`]): pieces are placed in the open chunk of their
//!    (tag, timekey); a piece that does not fit in what is left of it (`chunk_limit_size`,
//!    `chunk_limit_records`) goes whole to a fresh chunk, and is split only if it is larger
//!    than a whole chunk; a full chunk is set aside for sealing. So a request is written in
//!    one piece per timekey it spans, unless it is larger than a chunk.
//! 3. Write and sync ([`Writer::write_and_sync`]): each chunk's pieces of the round are
//!    written as one frame. Under `sync always` the written chunks are then fsynced, together
//!    (see [`in_parallel`]), and the directory too when a chunk file is new.
//! 4. Answer ([`Writer::answer_waiters`]): a waiter whose pieces are all written (and synced,
//!    under `always`) is answered Ok, and its connection sends the ack. A piece whose write or
//!    sync failed fails its waiter (no ack; the sender resends), except that a write refused
//!    for lack of space is *held* and retried in later rounds: its waiter simply waits.
//!
//! A request with an ack token has its token written after its events in each chunk it went
//! to (the resend window, see [`super::tokens`]): one record per piece, which says how many
//! pieces there are and which one this is. Both are fixed in the round that places the
//! request; a held piece is placed whole later, never split, so that the count stays true.
//!
//! While pieces are held, the writer takes no new requests, so connections stop reading and
//! TCP pushes back on the senders. A small reserve file is released at that moment, so that
//! open chunks can still be sealed (their state files need a few hundred bytes each) and
//! delivered, which is what frees the space. Held pieces are tried again only once deliveries
//! have freed space or the file system reports room beyond the reserve, so data never eats
//! the room kept for state files.
//!
//! # Open files
//!
//! An open chunk does not hold its data file open for its whole life: at most
//! `max_open_chunk_files` are open at once. A chunk's file is created by its first write; when
//! another file must be opened at the bound, the file of the least recently written open chunk
//! is closed (after an fsync if it holds writes not yet synced, which only happens under `sync
//! interval` or `none`), and reopened in append mode on that chunk's next write. Chunks taken
//! out of the open set (full, failed, being sealed) keep no file open between steps. So
//! thousands of tags cost syscalls, never "too many open files".
//!
//! # Seals
//!
//! Chunks whose time is up, and those set aside full or failed, are sealed after the round's
//! acks, a batch at a time with their syncs together, for at most [`SEAL_BUDGET`] per round
//! (at least one batch): when thousands fall due at once, the rest wait for the next rounds,
//! which come at once, so that appends keep being served in between. The chunks of a batch
//! share one directory fsync, after which they go to the uploader. The writer thread runs a
//! batch's I/O ([`SealBatch::run`]) without the lock, so that requests are written in place
//! meanwhile (see the buffer module).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::io;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use claimcheck_consumer::entry;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use super::chunk::{self, ChunkHeader, ChunkPaths, ChunkState, ChunkStats, ChunkWriter};
use super::registry::{ChunkInfo, Phase, Registry, WaitingRequest};
use super::token_record::TokenRecord;
use super::tokens::MAX_TOKEN_BYTES;
use super::{BufferConfig, BufferError, Group, SealedChunk, SyncPolicy};

/// The token records of this round's requests, by waiter (without their part index, which
/// each piece carries).
type RoundTokens = HashMap<u64, TokenRecord>;

/// A request waiting for the writer.
pub(super) struct Append {
    pub tag: Arc<str>,
    pub groups: Vec<Group>,
    /// The request's sender and ack token, recorded with its events (the resend window).
    pub token: Option<(IpAddr, Bytes)>,
    pub done: Answer,
}

/// Where a request's answer goes. The request counts in the gauge
/// `claimcheck_buffer_requests_waiting` until its answer is sent (it is counted off just
/// before), or dropped unsent.
pub(super) struct Answer {
    /// Before `tx`: fields drop in order, so an answer dropped unsent is counted off before
    /// its receiver hears of it.
    _waiting: WaitingRequest,
    tx: oneshot::Sender<Result<(), BufferError>>,
}

impl Answer {
    /// An answer for a request counted as waiting from now on, and where it will arrive.
    pub fn channel(registry: &Arc<Registry>) -> (Self, oneshot::Receiver<Result<(), BufferError>>) {
        let (tx, rx) = oneshot::channel();
        let answer = Answer {
            _waiting: registry.request_waiting(),
            tx,
        };
        (answer, rx)
    }

    fn send(self, result: Result<(), BufferError>) {
        let Answer {
            tx,
            _waiting: waiting,
        } = self;
        // Counted off first: whoever the answer wakes sees the gauge without this request.
        drop(waiting);
        // The connection may have gone: nobody to tell.
        let _ = tx.send(result);
    }
}

struct Waiter {
    done: Option<Answer>,
    /// The token to record with the request's events.
    token: Option<(IpAddr, Bytes)>,
    /// Its token record, made in the round that placed the request's pieces and written with
    /// each of them (with the piece's index), also with those a full disk held for a later
    /// round.
    record: Option<TokenRecord>,
    /// Pieces of this request not yet durable (or failed).
    outstanding: usize,
    failed: Option<String>,
}

/// Events of one request bound for one chunk.
struct Piece {
    waiter: u64,
    tag: Arc<str>,
    group: Group,
    /// Its index among the pieces of its request, once the request's token record is made:
    /// from then on the piece is not split.
    part: Option<u16>,
}

type ChunkKey = (Arc<str>, i64);

struct OpenChunk {
    header: ChunkHeader,
    paths: ChunkPaths,
    /// The data file: created by the chunk's first write, open or closed since (see "Open
    /// files" in the module documentation).
    writer: ChunkWriter,
    stats: ChunkStats,
    deadline: Instant,
    /// The directory entry has not been synced yet.
    new_file: bool,
    /// The chunk's place in [`Writer::files`] while it is open there with its file open.
    file_tick: Option<u64>,
    /// Pieces placed in this round, written as one frame.
    pending: Vec<Piece>,
    pending_stats: ChunkStats,
    /// A write or sync failed: the chunk takes no more events and is sealed as it stands.
    failed: Option<String>,
    /// Its file was cut back ([`cut_at_once`], [`cut_to_synced`]) and `stats` not yet counted
    /// again.
    recount: bool,
    /// Bytes cut off the end (frames whose sync failed, under `sync always`).
    cut: u64,
}

/// What writing chunks' pending pieces gave.
#[derive(Default)]
struct Flushed {
    /// Waiters of pieces now durable (or written, when the sync policy does not wait).
    ok: Vec<u64>,
    /// Like `ok`, but in a new chunk file whose directory entry must be synced first.
    ok_new_file: Vec<u64>,
    failed: Vec<(u64, String)>,
    /// A chunk file was created.
    created: bool,
}

/// Bytes kept in reserve for state files when the disk fills up.
const RESERVE_BYTES: usize = 1 << 20;
/// The reserve's name in the buffer directory.
pub(super) const RESERVE_FILE: &str = "RESERVE";

/// Longest time a round spends sealing chunks (it always seals at least one that is due):
/// the acks of the next round wait at most about this long, plus one directory fsync, for
/// seals. A seal costs an fsync or two, so this is tens of seals per round on local disks.
pub(super) const SEAL_BUDGET: Duration = Duration::from_millis(10);

/// `max_open_chunk_files` when it is not set: half the soft limit of open files, as it is when
/// the buffer opens (after `claimcheck serve` raised it). The other half is left to forward
/// connections, files read for upload, connections to S3 and Kinesis and the metrics listener.
pub fn default_max_open_files() -> usize {
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(u64::MAX);
    (limit.min(1 << 20) / 2).max(1) as usize
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
    /// Seal deadlines of the chunks in `open`, earliest first.
    deadlines: BTreeSet<(Instant, ChunkKey)>,
    /// Chunks in `open` whose data file is open, least recently written first.
    files: BTreeMap<u64, ChunkKey>,
    /// Last tick given out in `files`.
    file_clock: u64,
    /// Most entries in `files` (`max_open_chunk_files`).
    max_open_files: usize,
    /// Most time one round spends sealing ([`SEAL_BUDGET`]; tests lower it).
    seal_budget: Duration,
    /// Chunks in `open` that received pieces in this round.
    touched: Vec<ChunkKey>,
    /// Chunks in `open` that failed outside a round's writes (an fsync), to be set aside.
    failing: Vec<ChunkKey>,
    /// Chunks taken out of `open` (full, failed), to be sealed first, with the reason.
    to_seal: VecDeque<(OpenChunk, &'static str)>,
    /// Chunks taken out of `open` whose seal failed; retried every round.
    unsealed: Vec<OpenChunk>,
    waiters: HashMap<u64, Waiter>,
    next_waiter: u64,
    /// Pieces refused for lack of space, retried first in the next rounds.
    held: Vec<Piece>,
    /// Something was written and not yet synced (sync policies `interval` and `none`).
    dirty: bool,
    /// A chunk file was created and the directory has not been fsynced since.
    dir_unsynced: bool,
    /// A chunk's fsync failed as its file was closed since the last interval's sync: under
    /// `sync interval` that sync cannot count as complete, whatever the open chunks do.
    closed_unsynced: bool,
    last_sync: Instant,
    /// Buffer usage when the disk was found full; held pieces wait until it goes down.
    full_at_usage: Option<u64>,
    /// A crash on purpose, for tests ([`Fault`]).
    fault: Option<Fault>,
}

/// A crash on purpose at the moment that matters for acks, for tests: with
/// `CLAIMCHECK_FAULT=abort-after-sync:N` (read once, when the writer starts), the process
/// aborts in the `N`th round that made requests durable, after their fsync (their write,
/// under `sync interval` and `none`) and before any of them is acknowledged. Unset, it costs
/// one branch per round.
#[derive(Debug)]
struct Fault {
    rounds_left: u64,
}

impl Fault {
    const VAR: &'static str = "CLAIMCHECK_FAULT";

    fn from_env() -> Option<Fault> {
        let value = std::env::var(Self::VAR).ok()?;
        let n = value
            .strip_prefix("abort-after-sync:")
            .and_then(|n| n.parse::<u64>().ok())
            .filter(|n| *n > 0);
        match n {
            Some(rounds_left) => {
                warn!(%value, "fault injection is on: the process will abort on purpose");
                Some(Fault { rounds_left })
            }
            None => {
                error!(%value, "{} not understood (abort-after-sync:N); ignoring it", Self::VAR);
                None
            }
        }
    }

    fn after_sync(&mut self, flushed: &Flushed) {
        if flushed.ok.is_empty() {
            return;
        }
        self.rounds_left -= 1;
        if self.rounds_left == 0 {
            eprintln!("{}: aborting after a sync, before its acks", Self::VAR);
            std::process::abort();
        }
    }
}

impl Writer {
    pub(super) fn new(
        config: Arc<BufferConfig>,
        chunks_dir: PathBuf,
        registry: Arc<Registry>,
        sealed_tx: mpsc::UnboundedSender<SealedChunk>,
    ) -> Self {
        let reserve = config.dir.join(RESERVE_FILE);
        let max_open_files = config
            .max_open_files
            .unwrap_or_else(default_max_open_files)
            .max(1);
        crate::metrics::metrics()
            .chunk_files_open_limit
            .set(max_open_files as i64);
        let writer = Writer {
            config,
            chunks_dir,
            reserve,
            registry,
            sealed_tx,
            open: HashMap::new(),
            deadlines: BTreeSet::new(),
            files: BTreeMap::new(),
            file_clock: 0,
            max_open_files,
            seal_budget: SEAL_BUDGET,
            touched: Vec::new(),
            failing: Vec::new(),
            to_seal: VecDeque::new(),
            unsealed: Vec::new(),
            waiters: HashMap::new(),
            next_waiter: 0,
            held: Vec::new(),
            dirty: false,
            dir_unsynced: false,
            closed_unsynced: false,
            last_sync: Instant::now(),
            full_at_usage: None,
            fault: Fault::from_env(),
        };
        writer.keep_reserve();
        writer
    }

    /// Most chunk files this writer holds open.
    pub(super) fn max_open_files(&self) -> usize {
        self.max_open_files
    }

    /// The time one tick may spend sealing (at least one batch is sealed).
    pub(super) fn seal_budget(&self) -> Duration {
        self.seal_budget
    }

    /// Sets the time one round may spend sealing.
    #[cfg(test)]
    pub(super) fn set_seal_budget(&mut self, budget: Duration) {
        self.seal_budget = budget;
    }

    /// True while pieces wait for disk space: take no new requests.
    pub(super) fn stalled(&self) -> bool {
        !self.held.is_empty()
    }

    /// The next moment something is due: a chunk's seal (now, for chunks set aside or left
    /// over by the seal budget), a failed seal's retry, a sync.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        let now = (!self.to_seal.is_empty() || !self.failing.is_empty()).then(Instant::now);
        let retry = (!self.unsealed.is_empty() || self.stalled())
            .then(|| Instant::now() + Duration::from_secs(1));
        let sync = (self.dirty && self.config.sync == SyncPolicy::Interval)
            .then(|| self.last_sync + self.config.sync_interval);
        let seal = self.deadlines.first().map(|(deadline, _)| *deadline);
        [now, seal, retry, sync].into_iter().flatten().min()
    }

    fn max_records(&self) -> u64 {
        self.config.chunk_limit_records.unwrap_or(u64::MAX)
    }

    /// One round: the four steps of the module documentation, then the chunks that filled up
    /// or failed are set aside for sealing.
    pub(super) fn round(&mut self, batch: Vec<Append>, now: Instant) {
        let was_stalled = self.stalled();
        self.set_aside_failing();
        let pieces = self.take_waiters(batch);
        let (mut touched, mut full) = self.place_pieces(pieces, now);
        let tokens = self.token_records(&touched, &mut full);
        let flushed = self.write_and_sync(&mut touched, &mut full, &tokens);
        if let Some(fault) = &mut self.fault {
            fault.after_sync(&flushed);
        }
        self.answer_waiters(flushed);
        self.track_disk_full(was_stalled);
        self.set_aside_filled(full, touched);
        self.set_aside_failing();
        self.count_files();
    }

    /// Step 1: each request of `batch` becomes a waiter, each of its groups a piece; pieces
    /// held back by a full disk go first, once there is room for them.
    fn take_waiters(&mut self, batch: Vec<Append>) -> Vec<Piece> {
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
                token: append.token.filter(|(_, t)| t.len() <= MAX_TOKEN_BYTES),
                record: None,
                outstanding: append.groups.len(),
                failed: None,
            };
            self.waiters.insert(id, waiter);
            pieces.extend(append.groups.into_iter().map(|group| Piece {
                waiter: id,
                tag: append.tag.clone(),
                group,
                part: None,
            }));
            if self.waiters[&id].outstanding == 0 {
                self.answer(id);
            }
        }
        pieces
    }

    /// Step 2: places the pieces in the open chunks of their (tag, timekey); returns the open
    /// chunks that received pieces (each once) and the chunks that filled up, out of `open`.
    fn place_pieces(
        &mut self,
        pieces: Vec<Piece>,
        now: Instant,
    ) -> (Vec<ChunkKey>, Vec<OpenChunk>) {
        let mut full = Vec::new();
        for piece in pieces {
            self.place(piece, now, &mut full);
        }
        let mut touched = std::mem::take(&mut self.touched);
        touched.sort_unstable();
        touched.dedup();
        (touched, full)
    }

    /// The token records of this round's requests that carry a token. A request placed in this
    /// round has its pieces numbered, one per chunk they went to, and its record made with
    /// their count (`parts`), so that recovery counts the request as stored only if it finds
    /// them all; a request whose pieces were held by a full disk keeps its record.
    fn token_records(&mut self, touched: &[ChunkKey], full: &mut [OpenChunk]) -> RoundTokens {
        let mut parts: HashMap<u64, u32> = HashMap::new();
        let mut in_round: Vec<u64> = Vec::new();
        for key in touched {
            if let Some(chunk) = self.open.get_mut(key) {
                number_pieces(chunk, &self.waiters, &mut parts, &mut in_round);
            }
        }
        for chunk in full.iter_mut() {
            number_pieces(chunk, &self.waiters, &mut parts, &mut in_round);
        }
        for (w, parts) in parts {
            let Some(waiter) = self.waiters.get_mut(&w) else {
                continue;
            };
            let Some((sender, token)) = &waiter.token else {
                continue;
            };
            let Ok(parts) = u16::try_from(parts) else {
                // More chunks than a record can count: no record, so a resend after a
                // restart is stored again rather than counted whole from some of them.
                warn!(
                    chunks = parts,
                    "a request spans too many chunks to record its token"
                );
                waiter.token = None;
                continue;
            };
            waiter.record = Some(TokenRecord {
                sender: *sender,
                token: token.clone(),
                request: TokenRecord::new_request(),
                parts,
                part: None,
            });
        }
        in_round.sort_unstable();
        in_round.dedup();
        in_round
            .into_iter()
            .filter_map(|w| Some((w, self.waiters.get(&w)?.record.clone()?)))
            .collect()
    }

    /// Step 3: writes each chunk's pieces as one frame, syncs as the policy says (and the
    /// directory for new chunk files); returns which waiters' pieces are done and which failed.
    fn write_and_sync(
        &mut self,
        touched: &mut [ChunkKey],
        full: &mut [OpenChunk],
        tokens: &RoundTokens,
    ) -> Flushed {
        let mut flushed = Flushed::default();
        self.flush_open(touched, &mut flushed, tokens);
        let always = self.config.sync == SyncPolicy::Always;
        for chunk in full.iter_mut() {
            if needs_file(chunk) {
                self.make_room();
            }
            let written =
                write_pending(chunk, &self.registry, &mut self.held, &mut flushed, tokens);
            if !written.is_empty() {
                let synced = if always { chunk.writer.sync() } else { Ok(()) };
                answer_written(chunk, written, synced, always, &mut flushed);
            }
            // Out of `open`, it keeps no file (see "Open files"). A failed sync here is tried
            // again by the seal, which reopens the file for it.
            if let Err(e) = self.let_go(chunk) {
                close_failed(&mut self.closed_unsynced, chunk, &e);
            }
        }
        self.dir_unsynced |= flushed.created;
        self.dirty |= self.config.sync != SyncPolicy::Always
            && !(flushed.ok.is_empty() && flushed.ok_new_file.is_empty());
        if !flushed.ok_new_file.is_empty() {
            // New chunk files: their directory entries must be durable before the acks.
            match chunk::sync_dir(&self.chunks_dir) {
                Ok(()) => {
                    self.dir_unsynced = false;
                    // Only chunks whose file exists now: one whose file could not be
                    // created (a full disk, its pieces held) still needs this fsync later.
                    let exists = |c: &OpenChunk| c.writer.valid_len() > 0;
                    for key in touched.iter() {
                        if let Some(c) = self.open.get_mut(key).filter(|c| exists(c)) {
                            c.new_file = false;
                        }
                    }
                    full.iter_mut()
                        .filter(|c| exists(c))
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
        flushed
    }

    /// Step 4: counts the written and failed pieces off their waiters, answering those with
    /// none left (held pieces stay outstanding: their waiters wait).
    fn answer_waiters(&mut self, flushed: Flushed) {
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
    }

    /// Notes the disk filling up (pieces newly held: the reserve is released) or having room
    /// again (nothing held any more: the reserve is kept again).
    fn track_disk_full(&mut self, was_stalled: bool) {
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
    }

    /// Chunks that filled up, and chunks that failed, are sealed with what they hold: set
    /// aside now, sealed by `tick`. Only chunks written in this round (`touched`) can have
    /// changed.
    fn set_aside_filled(&mut self, full: Vec<OpenChunk>, touched: Vec<ChunkKey>) {
        self.to_seal.extend(full.into_iter().map(|c| (c, "size")));
        let (limit, max_records) = (self.config.chunk_limit_size, self.max_records());
        for key in touched {
            let reason = match self.open.get(&key) {
                Some(c) if c.failed.is_some() => "write error",
                Some(c) if c.stats.body_bytes >= limit || c.stats.records >= max_records => "size",
                _ => continue,
            };
            self.set_aside(&key, reason);
        }
    }

    /// Writes the pending pieces of the chunks in `touched` (chunks in `open`, each once),
    /// opening their files within `max_open_chunk_files`. Under `sync always` the chunks
    /// written are then synced together (see [`in_parallel`]), up to `max_open_chunk_files` at
    /// a time so that none of them is closed, hence synced alone, before.
    fn flush_open(
        &mut self,
        touched: &mut [ChunkKey],
        flushed: &mut Flushed,
        tokens: &RoundTokens,
    ) {
        // Chunks whose file is open first: they need no room, and the others then close the
        // files of chunks not written in this round before those of chunks just written.
        touched.sort_by_key(|k| !self.open.get(k).is_some_and(|c| c.writer.is_open()));
        let always = self.config.sync == SyncPolicy::Always;
        let mut unsynced: Vec<(ChunkKey, Vec<u64>)> = Vec::new();
        for key in touched.iter() {
            let Some(chunk) = self.open.get(key) else {
                continue;
            };
            if needs_file(chunk) {
                if unsynced.len() >= self.max_open_files {
                    self.sync_written(&mut unsynced, flushed);
                }
                self.make_room();
            }
            let chunk = self
                .open
                .get_mut(key)
                .expect("making room keeps chunks open");
            let written = write_pending(chunk, &self.registry, &mut self.held, flushed, tokens);
            self.track_file(key);
            if written.is_empty() {
                continue;
            }
            if always {
                unsynced.push((key.clone(), written));
            } else {
                answer_written(
                    chunk_mut(&mut self.open, key),
                    written,
                    Ok(()),
                    false,
                    flushed,
                );
            }
        }
        self.sync_written(&mut unsynced, flushed);
        debug_assert!(self.files.len() <= self.max_open_files);
    }

    /// Syncs the chunks written in this round (`sync always`), together, and sorts their
    /// waiters into `flushed`.
    fn sync_written(&mut self, unsynced: &mut Vec<(ChunkKey, Vec<u64>)>, flushed: &mut Flushed) {
        let keys = unsynced.iter().map(|(key, _)| key.clone()).collect();
        let started = std::time::Instant::now();
        let results = self.sync_chunks(keys);
        if !results.is_empty() {
            crate::metrics::metrics().synced("round", started.elapsed());
        }
        for ((key, written), synced) in unsynced.drain(..).zip(results) {
            answer_written(
                chunk_mut(&mut self.open, &key),
                written,
                synced,
                true,
                flushed,
            );
        }
    }

    /// Syncs the open chunks of `keys` (each once) together; returns the results in order.
    fn sync_chunks(&mut self, keys: Vec<ChunkKey>) -> Vec<io::Result<()>> {
        // Out of the map for the time of the syncs, so that each thread has its own chunks.
        let mut chunks: Vec<(ChunkKey, Option<OpenChunk>, io::Result<()>)> = keys
            .into_iter()
            .map(|key| {
                let chunk = self.open.remove(&key);
                (key, chunk, Ok(()))
            })
            .collect();
        in_parallel(&mut chunks, |(_, chunk, result)| {
            if let Some(chunk) = chunk {
                *result = chunk.writer.sync();
            }
        });
        chunks
            .into_iter()
            .map(|(key, chunk, result)| {
                if let Some(chunk) = chunk {
                    self.open.insert(key, chunk);
                }
                result
            })
            .collect()
    }

    /// Places a piece in the open chunk of its tag and timekey, splitting it where chunks fill.
    fn place(&mut self, mut piece: Piece, now: Instant, full: &mut Vec<OpenChunk>) {
        let (limit_bytes, limit_records) = (self.config.chunk_limit_size, self.max_records());
        loop {
            let key = (piece.tag.clone(), piece.group.timekey);
            if !self.open.contains_key(&key) {
                let chunk = self.new_chunk(&key, now);
                self.deadlines.insert((chunk.deadline, key.clone()));
                self.open.insert(key.clone(), chunk);
            }
            let chunk = self.open.get_mut(&key).expect("just inserted");
            if chunk.pending.is_empty() {
                self.touched.push(key.clone());
            }
            let held_bytes = chunk.stats.body_bytes + chunk.pending_stats.body_bytes;
            let held_records = chunk.stats.records + chunk.pending_stats.records;
            let room_bytes = limit_bytes.saturating_sub(held_bytes);
            let room_records = limit_records.saturating_sub(held_records);
            let g = &piece.group;
            // A numbered piece (held by a full disk) goes whole to a fresh chunk if need be.
            let numbered = piece.part.is_some();
            if (g.bytes <= room_bytes && g.records <= room_records)
                || (numbered && held_records == 0)
            {
                chunk.pending_stats.add(g.records, g.bytes, g.first, g.last);
                chunk.pending.push(piece);
                return;
            }
            // A piece that fits in a chunk of its own is not split: it goes whole to a fresh
            // chunk, so that its events (and its token) are made durable by one write, and a
            // crash never leaves part of an unacknowledged request behind.
            let fits_a_chunk = numbered || (g.bytes <= limit_bytes && g.records <= limit_records);
            if held_records > 0
                && (room_bytes == 0
                    || room_records == 0
                    || fits_a_chunk
                    || !fits_first_entry(g, room_bytes))
            {
                // Full: set it aside for sealing and go round again with a fresh chunk. It
                // leaves `open`, so it gives up its file; a write of this round reopens it.
                let mut chunk = self.take_open(&key).expect("the chunk is open");
                if let Err(e) = self.let_go(&mut chunk) {
                    close_failed(&mut self.closed_unsynced, &chunk, &e);
                    chunk.failed.get_or_insert_with(|| format!("fsync: {e}"));
                }
                full.push(chunk);
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
                part: None,
            });
            if let Some(w) = self.waiters.get_mut(&piece.waiter) {
                w.outstanding += 1;
            }
        }
    }

    /// Takes a chunk out of `open` (and of the deadlines and open files that index it). Its
    /// file may still be open: the caller seals it or closes it at once.
    fn take_open(&mut self, key: &ChunkKey) -> Option<OpenChunk> {
        let mut chunk = self.open.remove(key)?;
        self.deadlines.remove(&(chunk.deadline, key.clone()));
        if let Some(tick) = chunk.file_tick.take() {
            self.files.remove(&tick);
        }
        Some(chunk)
    }

    /// Takes a chunk out of `open`, closes its file and queues it for sealing.
    fn set_aside(&mut self, key: &ChunkKey, reason: &'static str) {
        if let Some(mut chunk) = self.take_open(key) {
            // A failed sync is tried again by the seal.
            if let Err(e) = self.let_go(&mut chunk) {
                close_failed(&mut self.closed_unsynced, &chunk, &e);
            }
            self.to_seal.push_back((chunk, reason));
        }
    }

    /// Closes the file of a chunk on its way to its seal. Under `sync none` without a sync:
    /// what it holds unsynced (up to a whole chunk) is synced by the seal's `finish`, without
    /// the lock, rather than here in a round, where every request would wait for it; nothing
    /// was promised durable before the seal. Under `always` and `interval` the file is synced
    /// first, as any closed file is: an interval's sync covers only open chunks.
    fn let_go(&self, chunk: &mut OpenChunk) -> io::Result<()> {
        if self.config.sync == SyncPolicy::None {
            chunk.writer.release();
            return Ok(());
        }
        chunk.writer.close()
    }

    /// Sets aside the chunks that failed outside a round's writes.
    fn set_aside_failing(&mut self) {
        for key in std::mem::take(&mut self.failing) {
            if self.open.get(&key).is_some_and(|c| c.failed.is_some()) {
                self.set_aside(&key, "write error");
            }
        }
    }

    /// Records that the chunk of `key` was just written: its file, if open, becomes the most
    /// recently written.
    fn track_file(&mut self, key: &ChunkKey) {
        let Some(chunk) = self.open.get_mut(key) else {
            return;
        };
        if let Some(tick) = chunk.file_tick.take() {
            self.files.remove(&tick);
        }
        if chunk.writer.is_open() {
            self.file_clock += 1;
            chunk.file_tick = Some(self.file_clock);
            self.files.insert(self.file_clock, key.clone());
        }
    }

    /// Closes the files of the least recently written open chunks until one more file may be
    /// opened within `max_open_chunk_files`. The chunks stay open: their next write reopens
    /// their file. A file holding writes not yet synced is synced first; if that fails, the
    /// chunk takes no more events and is sealed as it stands, as after any failed sync.
    fn make_room(&mut self) {
        while self.files.len() >= self.max_open_files {
            let Some((_, key)) = self.files.pop_first() else {
                return;
            };
            let Some(chunk) = self.open.get_mut(&key) else {
                continue;
            };
            chunk.file_tick = None;
            crate::metrics::metrics().chunk_file_evictions.inc();
            if let Err(e) = chunk.writer.close() {
                close_failed(&mut self.closed_unsynced, chunk, &e);
                chunk.failed.get_or_insert_with(|| format!("fsync: {e}"));
                self.failing.push(key);
            }
        }
    }

    /// Publishes the number of open chunk files. In debug builds (the tests), first checks
    /// that `files` is exactly the open chunks with an open file, within the bound, and that
    /// chunks out of `open` hold none (they open one only once room is made for it).
    fn count_files(&self) {
        #[cfg(debug_assertions)]
        {
            let open = self.open.values().filter(|c| c.writer.is_open());
            assert_eq!(
                open.count(),
                self.files.len(),
                "files indexes the open files"
            );
            for (tick, key) in &self.files {
                assert_eq!(self.open[key].file_tick, Some(*tick));
            }
            assert!(self.files.len() <= self.max_open_files);
            let aside = self.to_seal.iter().map(|(c, _)| c).chain(&self.unsealed);
            assert!(aside.into_iter().all(|c| !c.writer.is_open()));
        }
        crate::metrics::metrics()
            .chunk_files_open
            .set(self.files.len() as i64);
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
                done.send(result);
            }
        }
    }

    /// Seals chunks set aside and chunks whose time is up, within the seal budget, retries
    /// failed seals, and syncs on the interval, with the lock held throughout: what the
    /// writer thread's tick does (`seal_due` in the buffer module, which lets go of the lock
    /// for each batch's I/O).
    #[cfg(test)]
    pub(super) fn tick(&mut self, now: Instant) {
        let mut due = self.due_seals(now);
        self.seal_some(Some(self.seal_budget), |w| w.next_due_seal(&mut due));
        self.end_tick(due);
    }

    /// Starts a tick ([`Writer::tick`], or the writer thread's, which seals without the lock):
    /// chunks that failed are set aside, and the chunks due are taken a batch at a time
    /// ([`Writer::next_seals`]): those set aside first, then those whose time is up at `now`,
    /// then one more try for those whose seal failed before.
    pub(super) fn due_seals(&mut self, now: Instant) -> DueSeals {
        self.set_aside_failing();
        DueSeals {
            now,
            retries: std::mem::take(&mut self.unsealed).into_iter(),
        }
    }

    /// The next batch of a tick's seals; empty once nothing more is due.
    pub(super) fn next_seals(&mut self, due: &mut DueSeals) -> SealBatch {
        self.take_seal_batch(|w| w.next_due_seal(due))
    }

    fn next_due_seal(&mut self, due: &mut DueSeals) -> Option<(OpenChunk, &'static str)> {
        self.to_seal
            .pop_front()
            .or_else(|| self.next_due(due.now))
            .or_else(|| due.retries.next().map(|c| (c, "retry")))
    }

    /// Ends a tick: the seals it did not get to wait for the next; under `sync interval`,
    /// what is due for an fsync gets it.
    pub(super) fn end_tick(&mut self, due: DueSeals) {
        self.unsealed.extend(due.retries);
        if self.dirty
            && self.config.sync == SyncPolicy::Interval
            && due.now >= self.last_sync + self.config.sync_interval
        {
            self.sync_all(due.now);
        }
        self.count_files();
    }

    /// Takes out the open chunk with the earliest deadline if its time is up at `now`.
    fn next_due(&mut self, now: Instant) -> Option<(OpenChunk, &'static str)> {
        while self.deadlines.first()?.0 <= now {
            let (_, key) = self.deadlines.pop_first()?;
            if let Some(chunk) = self.take_open(&key) {
                return Some((chunk, "time"));
            }
        }
        None
    }

    /// Fsyncs every open chunk written since the last sync, and the directory. Only chunks
    /// with an open file can hold unsynced writes: under `sync interval`, the one policy that
    /// calls this, a file is synced before it is closed (see [`Writer::let_go`]).
    ///
    /// True when it is complete: every chunk, and the directory, synced, and no chunk's sync
    /// failed as its file was closed since the last one.
    pub(super) fn sync_all(&mut self, now: Instant) -> bool {
        let keys: Vec<ChunkKey> = self
            .files
            .values()
            .filter(|key| self.open.get(*key).is_some_and(|c| c.writer.is_unsynced()))
            .cloned()
            .collect();
        let started = std::time::Instant::now();
        let results = self.sync_chunks(keys.clone());
        let mut complete = !std::mem::take(&mut self.closed_unsynced);
        for (key, synced) in keys.into_iter().zip(results) {
            if let Err(e) = synced {
                error!(tag = %key.0, cause = %e, "chunk fsync failed; the chunk is sealed as it stands");
                chunk_mut(&mut self.open, &key).failed = Some(format!("fsync: {e}"));
                self.failing.push(key);
                complete = false;
            }
        }
        if self.dir_unsynced {
            match chunk::sync_dir(&self.chunks_dir) {
                Ok(()) => self.dir_unsynced = false,
                Err(e) => {
                    // Tried again at the next interval.
                    error!(cause = %e, "buffer directory fsync failed; new chunk files are not durable yet");
                    complete = false;
                }
            }
        }
        self.dirty = false;
        self.last_sync = now;
        // Counted only when all of it is durable: what was acked before it began is.
        if complete {
            crate::metrics::metrics().synced("interval", started.elapsed());
        }
        complete
    }

    /// Seals every open chunk, and every chunk set aside (shutdown, or to let delivery free
    /// space), whatever the time it takes.
    pub(super) fn seal_all(&mut self, reason: &'static str) {
        let mut keys = self.open.keys().cloned().collect::<Vec<_>>().into_iter();
        self.seal_some(None, |w| {
            if let Some(c) = w.to_seal.pop_front() {
                return Some(c);
            }
            keys.by_ref()
                .find_map(|k| w.take_open(&k))
                .map(|c| (c, reason))
        });
        self.retry_unsealed();
        self.count_files();
    }

    /// Stops for good: seals everything; requests still held for space get no ack.
    pub(super) fn close(&mut self) {
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
        let spares = self.registry.spares().clear();
        if spares > 0 {
            info!(
                files = spares,
                "the disk is full: deleted the spare chunk files kept for reuse"
            );
        }
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
        let mut retries = std::mem::take(&mut self.unsealed).into_iter();
        self.seal_some(None, |_| retries.next().map(|c| (c, "retry")));
    }

    /// A new open chunk for `key`. Its data file is created by its first write.
    fn new_chunk(&self, key: &ChunkKey, now: Instant) -> OpenChunk {
        let chunk_id = uuid::Uuid::now_v7().simple().to_string();
        let created_ms = unix_ms();
        let header = ChunkHeader {
            chunk_id,
            tag: key.0.to_string(),
            timekey: key.1,
            created_ms,
            reused: false,
        };
        let paths = ChunkPaths::new(&self.chunks_dir, &header.chunk_id);
        let writer = ChunkWriter::new(&paths.data, &header).reusing(self.registry.spares().clone());
        let writer = match self.config.sync {
            SyncPolicy::None | SyncPolicy::Interval => writer.write_behind(),
            SyncPolicy::Always => writer,
        };
        self.registry.insert(ChunkInfo {
            chunk_id: header.chunk_id.clone(),
            tag: header.tag.clone(),
            timekey: header.timekey,
            phase: Phase::Open,
            created_ms,
            records: 0,
            bytes: 0,
            attempts: 0,
            last_error: None,
            next_retry_ms: None,
        });
        debug!(chunk_id = %header.chunk_id, tag = %header.tag, timekey = header.timekey, "chunk created");
        OpenChunk {
            deadline: self.deadline(now, created_ms, key.1),
            header,
            paths,
            writer,
            stats: ChunkStats::default(),
            new_file: true,
            file_tick: None,
            pending: Vec::new(),
            pending_stats: ChunkStats::default(),
            failed: None,
            recount: false,
            cut: 0,
        }
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

    /// Seals the chunks `next` gives (taken out of `open` or set aside) until it gives no
    /// more or, with a `budget`, that much time has passed (at least one batch is sealed), a
    /// batch at a time.
    fn seal_some(
        &mut self,
        budget: Option<Duration>,
        mut next: impl FnMut(&mut Self) -> Option<(OpenChunk, &'static str)>,
    ) {
        let started = std::time::Instant::now();
        loop {
            let mut batch = self.take_seal_batch(&mut next);
            if batch.is_empty() {
                break;
            }
            batch.run();
            self.sealed(batch);
            if budget.is_some_and(|b| started.elapsed() >= b) {
                break;
            }
        }
    }

    /// Takes up to [`SYNC_THREADS`] chunks to seal from `next`. An empty chunk is just
    /// removed.
    fn take_seal_batch(
        &mut self,
        mut next: impl FnMut(&mut Self) -> Option<(OpenChunk, &'static str)>,
    ) -> SealBatch {
        let mut chunks = Vec::with_capacity(SYNC_THREADS);
        while chunks.len() < SYNC_THREADS {
            let Some((chunk, reason)) = next(self) else {
                break;
            };
            if chunk.stats.records == 0 {
                if let Err(e) = chunk.paths.remove() {
                    warn!(chunk_id = %chunk.header.chunk_id, cause = %e, "cannot remove an empty chunk");
                }
                self.registry.remove(&chunk.header.chunk_id);
                continue;
            }
            let stats = ChunkStats {
                data_len: chunk.writer.valid_len(),
                ..chunk.stats
            };
            chunks.push(Sealing {
                chunk,
                reason,
                stats,
                result: Ok(()),
            });
        }
        SealBatch {
            chunks,
            chunks_dir: self.chunks_dir.clone(),
            dir_synced: Ok(()),
            cut_unsynced: self.config.sync == SyncPolicy::Always,
        }
    }

    /// After a batch's I/O ([`SealBatch::run`]): its chunks go to the uploader, sealed; those
    /// whose seal failed are retried in later rounds.
    pub(super) fn sealed(&mut self, batch: SealBatch) {
        let SealBatch {
            chunks, dir_synced, ..
        } = batch;
        let mut staged = Vec::with_capacity(chunks.len());
        for Sealing {
            mut chunk,
            reason,
            stats,
            result,
        } in chunks
        {
            // Counted off once, whether the seal went through or is tried again.
            let cut = std::mem::take(&mut chunk.cut);
            if cut > 0 {
                self.registry
                    .cut_back(&chunk.header.chunk_id, cut, stats.records);
            }
            match result {
                Ok(()) if stats.records == 0 => {
                    // Nothing in it was synced: nothing in it was acknowledged.
                    if let Err(e) = chunk.paths.remove() {
                        warn!(chunk_id = %chunk.header.chunk_id, cause = %e, "cannot remove an empty chunk");
                    }
                    self.registry.remove(&chunk.header.chunk_id);
                }
                Ok(()) => staged.push((chunk, reason, stats)),
                Err(e) => {
                    error!(chunk_id = %chunk.header.chunk_id, cause = %e, "cannot seal a chunk; will retry");
                    self.unsealed.push(chunk);
                }
            }
        }
        if staged.is_empty() {
            return;
        }
        if let Err(e) = dir_synced {
            error!(chunks = staged.len(), cause = %e, "cannot seal chunks (directory fsync); will retry");
            self.unsealed
                .extend(staged.into_iter().map(|(chunk, _, _)| chunk));
            return;
        }
        // `dir_unsynced` stays as it is: a chunk file created in place while this batch's
        // I/O ran without the lock may not be covered by its directory fsync.
        for (chunk, reason, stats) in staged {
            let OpenChunk { header, paths, .. } = chunk;
            info!(chunk_id = %header.chunk_id, tag = %header.tag, timekey = header.timekey,
                  events = stats.records, bytes = stats.body_bytes, reason, "chunk sealed");
            crate::metrics::metrics().sealed(reason);
            self.registry.set_phase(&header.chunk_id, Phase::Sealed);
            let chunk_id = header.chunk_id.clone();
            let sealed = SealedChunk {
                header,
                stats,
                paths,
            };
            if self.sealed_tx.send(sealed).is_err() {
                debug!(%chunk_id, "the uploader is gone; the chunk stays for the next start");
            }
        }
    }
}

/// The seals of one tick, taken a batch at a time ([`Writer::next_seals`]).
pub(super) struct DueSeals {
    now: Instant,
    /// Chunks whose seal failed before: each is tried once per tick.
    retries: std::vec::IntoIter<OpenChunk>,
}

/// A chunk being sealed, out of the writer's sets.
struct Sealing {
    chunk: OpenChunk,
    reason: &'static str,
    stats: ChunkStats,
    result: io::Result<()>,
}

/// Chunks taken out to be sealed together. Their I/O ([`SealBatch::run`]) touches only their
/// own files and the directory, so it needs no lock: the writer thread runs it while
/// connections write in place.
pub(super) struct SealBatch {
    chunks: Vec<Sealing>,
    chunks_dir: PathBuf,
    dir_synced: io::Result<()>,
    /// `sync always`: a chunk whose sync failed is cut back to what was synced before.
    cut_unsynced: bool,
}

impl SealBatch {
    pub(super) fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    /// Seals the batch on disk: each chunk's data synced and its sealed state written, their
    /// syncs together; then the directory fsynced, once for all of them.
    pub(super) fn run(&mut self) {
        let synced_at = std::time::Instant::now();
        let cut_unsynced = self.cut_unsynced;
        in_parallel(&mut self.chunks, |sealing| {
            if cut_unsynced {
                if let Err(e) = cut_to_synced(sealing) {
                    sealing.result = Err(e);
                    return;
                }
            }
            let state = ChunkState::Sealed {
                header: sealing.chunk.header.clone(),
                stats: sealing.stats,
            };
            sealing.result = sealing
                .chunk
                .writer
                .finish()
                .and_then(|()| chunk::put_state(&sealing.chunk.paths.state, &state));
            // Synced (or failed): nothing is lost by closing it; a retry reopens it.
            let _ = sealing.chunk.writer.close();
        });
        crate::metrics::metrics().synced("seal", synced_at.elapsed());
        if self.chunks.iter().any(|s| s.result.is_ok()) {
            self.dir_synced = chunk::sync_dir(&self.chunks_dir);
        }
    }
}

/// Cuts a chunk whose sync failed back to its part synced before ([`cut_back`], unless
/// [`cut_at_once`] did) and counts what is left (a scan of the file, once more after a failed
/// seal).
fn cut_to_synced(sealing: &mut Sealing) -> io::Result<()> {
    let chunk = &mut sealing.chunk;
    cut_back(chunk)?;
    if !chunk.recount {
        return Ok(());
    }
    let scan = chunk::scan(&chunk.paths.data).map_err(io::Error::other)?;
    warn!(chunk_id = %chunk.header.chunk_id, bytes = chunk.cut, events = scan.stats.records,
          "cut a chunk back to what was synced before its fsync failed (its later requests were not acknowledged)");
    chunk.stats = scan.stats;
    chunk.recount = false;
    sealing.stats = scan.stats;
    Ok(())
}

/// Under `sync always`, cuts a chunk whose fsync failed back to what was synced before as soon
/// as the failure is known, not only at its seal: a process that died in between would leave
/// the refused frames (whole in the page cache) and their tokens for recovery to take for
/// stored. If the cut fails, the seal tries again.
fn cut_at_once(chunk: &mut OpenChunk) {
    if let Err(e) = cut_back(chunk) {
        warn!(chunk_id = %chunk.header.chunk_id, cause = %e,
              "cannot cut a chunk back to what was synced before its fsync failed yet; its seal tries again")
    }
}

/// Cuts a chunk's file back to what was synced before its failed sync
/// ([`ChunkWriter::cut_to_synced`]), counting the bytes cut and its `stats` as to be counted
/// again.
fn cut_back(chunk: &mut OpenChunk) -> io::Result<()> {
    let before = chunk.writer.valid_len();
    if chunk.writer.cut_to_synced()? {
        chunk.cut += before - chunk.writer.valid_len();
        chunk.recount = true;
    }
    Ok(())
}

/// Logs a sync that failed as a chunk's file was closed, and notes it in `closed_unsynced`
/// ([`Writer`]'s). Under `always` the chunk's later requests were not acked and its seal cuts
/// them off; under `interval` its requests were acked before their sync, so the next
/// interval's sync does not count as complete.
fn close_failed(closed_unsynced: &mut bool, chunk: &OpenChunk, e: &io::Error) {
    error!(chunk_id = %chunk.header.chunk_id, tag = %chunk.header.tag, cause = %e,
           "chunk fsync failed as its file was closed; the chunk is sealed as it stands");
    *closed_unsynced = true;
}

/// Whether writing a chunk's pending pieces needs its file opened.
fn needs_file(chunk: &OpenChunk) -> bool {
    !chunk.pending.is_empty() && chunk.failed.is_none() && !chunk.writer.is_open()
}

/// The open chunk of `key`, which the caller knows is there.
fn chunk_mut<'a>(open: &'a mut HashMap<ChunkKey, OpenChunk>, key: &ChunkKey) -> &'a mut OpenChunk {
    open.get_mut(key).expect("the chunk is open")
}

/// Most threads that sync files at once, and most chunks sealed in one batch.
pub(super) const SYNC_THREADS: usize = 8;

/// Runs `f` on every item, on up to [`SYNC_THREADS`] threads (the calling one among them).
/// The items are files to fsync: fsyncs of different files proceed together, and the file
/// system commits them together (one journal commit for many, on ext4 and XFS), so a round
/// that wrote many chunks, or a batch of seals, costs little more than one fsync. Each thread
/// takes the next item until none is left; if no thread can be started, the calling thread
/// does it all.
fn in_parallel<T: Send>(items: &mut [T], f: impl Fn(&mut T) + Sync) {
    if items.len() < 2 {
        items.iter_mut().for_each(f);
        return;
    }
    let helpers = items.len().min(SYNC_THREADS) - 1;
    let items: Vec<std::sync::Mutex<&mut T>> =
        items.iter_mut().map(std::sync::Mutex::new).collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let work = || {
        while let Some(item) = items.get(next.fetch_add(1, std::sync::atomic::Ordering::Relaxed)) {
            f(&mut item.lock().unwrap_or_else(|e| e.into_inner()));
        }
    };
    std::thread::scope(|scope| {
        for _ in 0..helpers {
            if let Err(e) = std::thread::Builder::new().spawn_scoped(scope, work) {
                warn!(cause = %e, "cannot start a sync thread; syncing on fewer");
                break;
            }
        }
        work();
    });
}

/// Numbers the pieces of `chunk` whose request has a token and no record yet: each request's
/// pieces in it get the next index of that request (`parts` counts them); notes the waiters of
/// all its pieces in `in_round`.
fn number_pieces(
    chunk: &mut OpenChunk,
    waiters: &HashMap<u64, Waiter>,
    parts: &mut HashMap<u64, u32>,
    in_round: &mut Vec<u64>,
) {
    let mut numbered: HashMap<u64, u16> = HashMap::new();
    for piece in &mut chunk.pending {
        in_round.push(piece.waiter);
        let Some(waiter) = waiters.get(&piece.waiter) else {
            continue;
        };
        if piece.part.is_some() || waiter.record.is_some() || waiter.token.is_none() {
            continue;
        }
        let part = *numbered.entry(piece.waiter).or_insert_with(|| {
            let n = parts.entry(piece.waiter).or_default();
            *n += 1;
            u16::try_from(*n - 1).unwrap_or(u16::MAX)
        });
        piece.part = Some(part);
    }
}

/// Writes a chunk's pending pieces as one frame, creating or reopening its file first.
/// Returns the waiters of the pieces written: they are answered with the sync that follows
/// (under `sync always`) or at once. Pieces that could not be written fail their waiters, or
/// are held when the disk is full.
fn write_pending(
    chunk: &mut OpenChunk,
    registry: &Registry,
    held: &mut Vec<Piece>,
    out: &mut Flushed,
    tokens: &RoundTokens,
) -> Vec<u64> {
    if chunk.pending.is_empty() {
        return Vec::new();
    }
    let pieces = std::mem::take(&mut chunk.pending);
    let stats = std::mem::take(&mut chunk.pending_stats);
    if let Some(reason) = &chunk.failed {
        out.failed
            .extend(pieces.iter().map(|p| (p.waiter, reason.clone())));
        return Vec::new();
    }
    let slices: Vec<Bytes> = pieces
        .iter()
        .flat_map(|p| p.group.slices.iter().cloned())
        .collect();
    let mut numbered: Vec<(u64, u16)> = pieces
        .iter()
        .filter_map(|p| Some((p.waiter, p.part?)))
        .collect();
    numbered.sort_unstable();
    numbered.dedup();
    let mut records = Vec::new();
    for (waiter, part) in numbered {
        if let Some(record) = tokens.get(&waiter) {
            TokenRecord {
                part: Some(part),
                ..record.clone()
            }
            .encode(&mut records);
        }
    }
    let before = chunk.writer.valid_len();
    let opened = chunk.writer.open();
    // Where this frame starts: after the header when the file was just created.
    let frame_at = chunk.writer.valid_len();
    out.created |= before == 0 && frame_at > 0;
    let written = opened.and_then(|()| chunk.writer.append(&slices, &records));
    let grown = (chunk.writer.valid_len() - before) as i64;
    match written {
        Ok(()) => {
            // In the file, so in the chunk, whether or not a sync then fails.
            chunk.stats.add(
                stats.records,
                stats.body_bytes,
                stats.first_time,
                stats.last_time,
            );
            registry.grow(&chunk.header.chunk_id, grown, stats.records);
            pieces.iter().map(|p| p.waiter).collect()
        }
        Err(e) if chunk::is_disk_full(&e) && chunk.writer.valid_len() == frame_at => {
            // Cut back to its last whole frame: hold the pieces and try again later.
            if grown != 0 {
                registry.grow(&chunk.header.chunk_id, grown, 0);
            }
            held.extend(pieces);
            Vec::new()
        }
        Err(e) => {
            if grown != 0 {
                registry.grow(&chunk.header.chunk_id, grown, 0);
            }
            let reason = format!("{e}");
            error!(chunk_id = %chunk.header.chunk_id, tag = %chunk.header.tag, %reason,
                   "chunk write failed; its requests are not acknowledged");
            chunk.failed = Some(reason.clone());
            out.failed
                .extend(pieces.iter().map(|p| (p.waiter, reason.clone())));
            Vec::new()
        }
    }
}

/// Sorts the waiters of pieces written to `chunk` by how the sync after the write went (`Ok`
/// when the policy did not sync). Under `sync always`, a new file's waiters also wait for the
/// directory fsync.
fn answer_written(
    chunk: &mut OpenChunk,
    waiters: Vec<u64>,
    synced: io::Result<()>,
    always: bool,
    out: &mut Flushed,
) {
    // A sync of this chunk failed since the write (closing its file to make room for
    // another): a later sync that succeeds proves nothing, as Linux reports a lost writeback
    // to one fsync only.
    let synced = match (synced, &chunk.failed) {
        (Ok(()), None) => Ok(()),
        (Ok(()), Some(reason)) => Err(reason.clone()),
        (Err(e), _) => Err(format!("fsync: {e}")),
    };
    match synced {
        Ok(()) if always && chunk.new_file => out.ok_new_file.extend(waiters),
        Ok(()) => out.ok.extend(waiters),
        Err(reason) => {
            error!(chunk_id = %chunk.header.chunk_id, tag = %chunk.header.tag, %reason,
                   "chunk fsync failed; its requests are not acknowledged");
            chunk.failed.get_or_insert_with(|| reason.clone());
            if always {
                cut_at_once(chunk);
            }
            out.failed
                .extend(waiters.into_iter().map(|w| (w, reason.clone())));
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
