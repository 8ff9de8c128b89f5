//! The in-memory index of every chunk in the buffer: where it is in its lifecycle, how many
//! bytes it holds on disk, how often delivering it failed and why.
//!
//! The writer, the uploader and the publisher each update it as a chunk moves on; it is what
//! `total_limit_size` is checked against, what `drop_oldest_chunk` chooses from, and what an
//! operator sees of the buffer. The files on disk stay the source of truth after a restart:
//! recovery rebuilds the index from them. It also carries each delivery stage's outage
//! [`Reporter`], which the uploader and the publisher share through it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::Notify;

use super::chunk::Spares;
use super::tokens::Tokens;
use crate::outage::{Backlog, Reporter, Reporters, Stage};

/// Where a chunk is in its lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Receiving events.
    Open,
    /// Waiting for upload (or for a retry of it).
    Sealed,
    /// Being compressed and stored in S3.
    Uploading,
    /// Stored in S3; waiting for its pointer to be published (or for a retry).
    Uploaded,
    /// Its pointer is in a PutRecords request.
    Publishing,
    /// Its pointer is in Kinesis; its files are being deleted (again, if that failed). Not
    /// waiting for delivery: not in `oldest_unpublished_chunk_age` nor in a stage's backlog.
    Published,
    /// Chosen by `drop_oldest_chunk`; its files are being deleted.
    Dropped,
}

/// What is known about one chunk.
#[derive(Debug, Clone, Serialize)]
pub struct ChunkInfo {
    pub chunk_id: String,
    pub tag: String,
    pub timekey: i64,
    pub phase: Phase,
    /// Creation time, Unix milliseconds.
    pub created_ms: i64,
    pub records: u64,
    /// Bytes of the chunk's files on disk.
    pub bytes: u64,
    /// Failed upload or publish attempts since the chunk was (re)loaded.
    pub attempts: u32,
    pub last_error: Option<String>,
    /// When the chunk is tried again after a failure, Unix milliseconds; `None` unless it waits
    /// for a retry.
    pub next_retry_ms: Option<i64>,
}

/// The index, shared by the buffer's stages.
#[derive(Debug, Default)]
pub struct Registry {
    /// Chunk ids are UUIDv7, so this map is ordered oldest first.
    chunks: Mutex<BTreeMap<String, ChunkInfo>>,
    bytes: AtomicU64,
    freed: Notify,
    dropped_chunks: AtomicU64,
    dropped_events: AtomicU64,
    dead_lettered: AtomicU64,
    quarantined: AtomicU64,
    /// The buffer is at `total_limit_size` (and blocking).
    full: AtomicBool,
    /// Writes are held for lack of disk space.
    disk_full: AtomicBool,
    /// The last write round failed for another reason (an I/O error).
    write_failing: AtomicBool,
    /// The sidecar is shutting down: no new connections, delivering what it holds.
    shutting_down: AtomicBool,
    /// Requests taken from senders and not yet durable ([`WaitingRequest`]).
    waiting: AtomicUsize,
    outages: Reporters,
    /// The token journal, when the resend window is kept on disk: delivered chunks' tokens go
    /// there before their files are deleted.
    tokens: std::sync::OnceLock<Arc<Tokens>>,
    /// Delivered chunks' data files kept for new chunks to overwrite.
    spares: Arc<Spares>,
    /// Open chunks found at start that could not be sealed or read then (a full disk, a read
    /// error): tried again by [`super::rescan`].
    left: Mutex<std::collections::BTreeSet<String>>,
}

/// One request counted in [`Registry::requests_waiting`] while this lives.
#[derive(Debug)]
pub struct WaitingRequest(Arc<Registry>);

impl Drop for WaitingRequest {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl Registry {
    pub fn new() -> Self {
        Registry::default()
    }

    /// Sets the token journal (once, when the buffer opens).
    pub fn set_tokens(&self, tokens: Arc<Tokens>) {
        let _ = self.tokens.set(tokens);
    }

    /// The token journal, if the resend window is kept on disk.
    pub fn tokens(&self) -> Option<&Arc<Tokens>> {
        self.tokens.get()
    }

    /// The spare data files: the publisher puts delivered chunks' there, the writer takes them
    /// for new chunks.
    pub fn spares(&self) -> &Arc<Spares> {
        &self.spares
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, ChunkInfo>> {
        // A panic elsewhere must not take the index down with it: the data is plain values.
        self.chunks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a chunk (or replaces one with the same id).
    pub fn insert(&self, info: ChunkInfo) {
        self.bytes.fetch_add(info.bytes, Ordering::Relaxed);
        if let Some(old) = self.lock().insert(info.chunk_id.clone(), info) {
            self.bytes.fetch_sub(old.bytes, Ordering::Relaxed);
        }
    }

    /// Records that a chunk's files grew (or shrank, for a negative `bytes`).
    pub fn grow(&self, chunk_id: &str, bytes: i64, records: u64) {
        if let Some(c) = self.lock().get_mut(chunk_id) {
            c.bytes = c.bytes.saturating_add_signed(bytes);
            c.records += records;
            if bytes >= 0 {
                self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
            } else {
                self.bytes
                    .fetch_sub(bytes.unsigned_abs(), Ordering::Relaxed);
                self.freed.notify_one();
            }
        }
    }

    /// A chunk was cut back by `bytes` at its seal, to `records` events (its later requests,
    /// not synced, were refused).
    pub fn cut_back(&self, chunk_id: &str, bytes: u64, records: u64) {
        self.grow(chunk_id, -(bytes as i64), 0);
        if let Some(c) = self.lock().get_mut(chunk_id) {
            c.records = records;
        }
    }

    /// Moves a chunk to `phase`. False if the chunk is not (or no longer) in the buffer, for
    /// example because `drop_oldest_chunk` dropped it while it waited.
    pub fn set_phase(&self, chunk_id: &str, phase: Phase) -> bool {
        match self.lock().get_mut(chunk_id) {
            Some(c) if c.phase != Phase::Dropped => {
                c.phase = phase;
                c.next_retry_ms = None;
                true
            }
            _ => false,
        }
    }

    /// Records a failed delivery attempt and puts the chunk back to waiting in `phase`. A
    /// writer held at `total_limit_size` is woken: with `drop_oldest_chunk` it may drop this
    /// chunk now, which it could not while the attempt was under way.
    pub fn failed(&self, chunk_id: &str, phase: Phase, error: String) {
        if let Some(c) = self.lock().get_mut(chunk_id) {
            c.attempts += 1;
            c.last_error = Some(error);
            c.phase = phase;
        }
        self.freed.notify_one();
    }

    /// Records when a chunk that failed (see [`Registry::failed`]) is tried again.
    pub fn retry_in(&self, chunk_id: &str, delay: Duration) {
        if let Some(c) = self.lock().get_mut(chunk_id) {
            c.next_retry_ms = Some(now_ms().saturating_add(delay.as_millis() as i64));
        }
    }

    /// The outage reporter of a delivery stage.
    pub fn outage(&self, stage: Stage) -> &Reporter {
        self.outages.get(stage)
    }

    /// What waits for `stage`, for its outage summary; `with_last_error` counts the chunks
    /// waiting for a retry whose last error is `last_error`.
    pub fn backlog(&self, stage: Stage, last_error: Option<&str>) -> Backlog {
        backlog(self.lock().values(), stage, last_error, now_ms())
    }

    /// Removes a chunk whose files are gone (published, dead-lettered, dropped, quarantined).
    pub fn remove(&self, chunk_id: &str) -> Option<ChunkInfo> {
        let removed = self.lock().remove(chunk_id);
        if let Some(c) = &removed {
            self.bytes.fetch_sub(c.bytes, Ordering::Relaxed);
            self.freed.notify_one();
        }
        removed
    }

    /// Marks the oldest chunk that is waiting (sealed or uploaded, not being worked on) as
    /// dropped and returns it, for `drop_oldest_chunk`; [`Registry::remove`] it once its files
    /// are deleted. No stage takes a dropped chunk up again.
    pub fn take_oldest_waiting(&self) -> Option<ChunkInfo> {
        let mut chunks = self.lock();
        let c = chunks
            .values_mut()
            .find(|c| matches!(c.phase, Phase::Sealed | Phase::Uploaded))?;
        c.phase = Phase::Dropped;
        Some(c.clone())
    }

    pub fn contains(&self, chunk_id: &str) -> bool {
        self.lock().contains_key(chunk_id)
    }

    /// Bytes of every chunk in the buffer.
    pub fn usage(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Every chunk, oldest first.
    pub fn snapshot(&self) -> Vec<ChunkInfo> {
        self.lock().values().cloned().collect()
    }

    /// How many chunks are in `phase`, for each of `phases`, and the creation time of the
    /// oldest chunk (Unix milliseconds). Unlike [`Registry::snapshot`] it copies nothing, so a
    /// metrics scrape of a buffer of 100,000 chunks holds the index (and the writer, which
    /// updates it every round) only briefly.
    pub fn count_by_phase<const N: usize>(&self, phases: [Phase; N]) -> ([usize; N], Option<i64>) {
        let chunks = self.lock();
        let mut counts = [0; N];
        let mut oldest: Option<i64> = None;
        for c in chunks.values() {
            if let Some(i) = phases.iter().position(|p| *p == c.phase) {
                counts[i] += 1;
            }
            if c.phase != Phase::Published {
                oldest = Some(oldest.map_or(c.created_ms, |o| o.min(c.created_ms)));
            }
        }
        (counts, oldest)
    }

    /// Counts a chunk deleted by `overflow_action drop_oldest_chunk`.
    pub fn count_dropped(&self, events: u64) {
        self.dropped_chunks.fetch_add(1, Ordering::Relaxed);
        self.dropped_events.fetch_add(events, Ordering::Relaxed);
    }

    /// Counts a chunk moved to the dead-letter folder.
    pub fn count_dead_letter(&self) {
        self.dead_lettered.fetch_add(1, Ordering::Relaxed);
    }

    /// Notes an open chunk found at start that could not be recovered yet.
    pub fn leave(&self, chunk_id: &str) {
        self.left
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(chunk_id.to_string());
    }

    /// The ids of the open chunks left at start, to try them again.
    pub fn left_ids(&self) -> Vec<String> {
        let left = self.left.lock().unwrap_or_else(|e| e.into_inner());
        left.iter().cloned().collect()
    }

    /// Forgets an open chunk left at start: recovered, or gone.
    pub fn forget_left(&self, chunk_id: &str) {
        self.left
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(chunk_id);
    }

    /// Counts files moved (or, for a torn tail, copied) into `quarantine/`.
    pub fn count_quarantined(&self, files: u64) {
        self.quarantined.fetch_add(files, Ordering::Relaxed);
    }

    /// Files put in `quarantine/` so far.
    pub fn quarantined(&self) -> u64 {
        self.quarantined.load(Ordering::Relaxed)
    }

    /// Chunks and events dropped by `drop_oldest_chunk`, and chunks dead-lettered, so far.
    pub fn losses(&self) -> (u64, u64, u64) {
        (
            self.dropped_chunks.load(Ordering::Relaxed),
            self.dropped_events.load(Ordering::Relaxed),
            self.dead_lettered.load(Ordering::Relaxed),
        )
    }

    /// Records whether the buffer is at `total_limit_size` and whether the disk is full.
    pub fn set_full(&self, full: bool, disk_full: bool) {
        self.full.store(full, Ordering::Relaxed);
        self.disk_full.store(disk_full, Ordering::Relaxed);
    }

    /// Records whether the last write round failed with an I/O error.
    pub fn set_write_failing(&self, failing: bool) {
        self.write_failing.store(failing, Ordering::Relaxed);
    }

    /// True while new requests are taken: the buffer is neither full nor out of disk space.
    pub fn accepting(&self) -> bool {
        !self.full.load(Ordering::Relaxed) && !self.disk_full.load(Ordering::Relaxed)
    }

    /// The sidecar stopped taking connections and delivers what it holds before it exits.
    pub fn set_shutting_down(&self) {
        self.shutting_down.store(true, Ordering::Relaxed);
    }

    /// Why the sidecar cannot accept and buffer events right now, if it cannot.
    pub fn not_ready_because(&self) -> Option<&'static str> {
        if self.shutting_down.load(Ordering::Relaxed) {
            Some("shutting down: no new connections; delivering what the buffer holds")
        } else if self.full.load(Ordering::Relaxed) {
            Some("the buffer is at total_limit_size")
        } else if self.disk_full.load(Ordering::Relaxed) {
            Some("the disk is full")
        } else if self.write_failing.load(Ordering::Relaxed) {
            Some("writes to the buffer fail")
        } else {
            None
        }
    }

    /// Counts a request as waiting until the guard is dropped: from the moment a connection
    /// hands it to the buffer until its answer (durable, or failed) has come back, or the
    /// connection gave up on it.
    pub fn request_waiting(self: &Arc<Self>) -> WaitingRequest {
        self.waiting.fetch_add(1, Ordering::Relaxed);
        WaitingRequest(self.clone())
    }

    /// Requests taken from senders and not yet durable: their acks wait. All of the senders'
    /// requests in flight while the buffer is full.
    pub fn requests_waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Waits until some space is freed, or a chunk waits again after a failed attempt, or
    /// `timeout`. For the writer, the one waiter: a change between its last look and this
    /// call is not missed (it ends the wait at once).
    pub async fn wait_for_space(&self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.freed.notified()).await;
    }
}

fn backlog<'a>(
    chunks: impl Iterator<Item = &'a ChunkInfo>,
    stage: Stage,
    last_error: Option<&str>,
    now_ms: i64,
) -> Backlog {
    let ms = |ms: i64| Duration::from_millis(ms.max(0) as u64);
    let mut b = Backlog::default();
    let (mut oldest, mut next_retry) = (None::<i64>, None::<i64>);
    for c in chunks.filter(|c| phases_of(stage).contains(&c.phase)) {
        b.waiting += 1;
        oldest = Some(oldest.map_or(c.created_ms, |o| o.min(c.created_ms)));
        if let Some(at) = c.next_retry_ms {
            b.retrying += 1;
            next_retry = Some(next_retry.map_or(at, |n| n.min(at)));
            if last_error.is_some() && c.last_error.as_deref() == last_error {
                b.with_last_error += 1;
            }
        }
    }
    b.oldest = oldest.map(|o| ms(now_ms - o));
    b.next_retry_in = next_retry.map(|n| ms(n - now_ms));
    b
}

/// The phases of a chunk that waits for `stage` or is being worked on by it.
pub fn phases_of(stage: Stage) -> [Phase; 2] {
    match stage {
        Stage::Upload => [Phase::Sealed, Phase::Uploading],
        Stage::Publish => [Phase::Uploaded, Phase::Publishing],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(id: &str, phase: Phase, bytes: u64) -> ChunkInfo {
        ChunkInfo {
            chunk_id: id.into(),
            tag: "t".into(),
            timekey: 0,
            phase,
            created_ms: 0,
            records: 0,
            bytes,
            attempts: 0,
            last_error: None,
            next_retry_ms: None,
        }
    }

    #[test]
    fn usage_follows_inserts_growth_and_removals() {
        let r = Registry::new();
        r.insert(info("a", Phase::Open, 10));
        r.insert(info("b", Phase::Sealed, 5));
        r.grow("a", 7, 2);
        assert_eq!(r.usage(), 22);
        r.grow("a", -4, 0);
        assert_eq!(r.usage(), 18);
        assert_eq!(r.remove("b").map(|c| c.bytes), Some(5));
        assert_eq!(r.usage(), 13);
        r.insert(info("a", Phase::Sealed, 1));
        assert_eq!(r.usage(), 1, "replacing an entry replaces its bytes");
    }

    #[test]
    fn only_waiting_chunks_are_dropped_oldest_first() {
        let r = Registry::new();
        r.insert(info("1", Phase::Uploading, 1));
        r.insert(info("2", Phase::Open, 1));
        r.insert(info("3", Phase::Uploaded, 1));
        r.insert(info("4", Phase::Sealed, 1));
        assert_eq!(
            r.take_oldest_waiting().map(|c| c.chunk_id),
            Some("3".into())
        );
        assert_eq!(
            r.take_oldest_waiting().map(|c| c.chunk_id),
            Some("4".into())
        );
        assert!(r.take_oldest_waiting().is_none());
        assert!(
            !r.set_phase("3", Phase::Publishing),
            "a dropped chunk is not taken up again"
        );
        assert_eq!(r.usage(), 4, "a dropped chunk counts until it is removed");
        r.remove("3");
        assert_eq!(r.usage(), 3);
        assert_eq!(
            r.count_by_phase([Phase::Open, Phase::Dropped, Phase::Sealed]),
            ([1, 1, 0], Some(0))
        );
        r.failed("1", Phase::Sealed, "boom".into());
        let one = &r.snapshot()[0];
        assert_eq!(
            (one.attempts, one.phase, one.last_error.as_deref()),
            (1, Phase::Sealed, Some("boom"))
        );
    }

    /// A chunk in Kinesis whose files are still being deleted (a deletion that failed, tried
    /// again) is not waiting for delivery: the age of the oldest unpublished chunk, on which
    /// the "delivery lags" alert is set, leaves it out.
    #[test]
    fn a_published_chunk_is_not_the_oldest_unpublished() {
        let r = Registry::new();
        r.insert(ChunkInfo {
            created_ms: 1_000,
            ..info("published", Phase::Publishing, 1)
        });
        r.insert(ChunkInfo {
            created_ms: 5_000,
            ..info("waiting", Phase::Uploaded, 1)
        });
        assert_eq!(r.count_by_phase([Phase::Published]), ([0], Some(1_000)));
        assert!(r.set_phase("published", Phase::Published));
        assert_eq!(r.count_by_phase([Phase::Published]), ([1], Some(5_000)));
        assert_eq!(r.usage(), 2, "its files still count");
    }

    #[tokio::test(start_paused = true)]
    async fn a_writer_waiting_for_space_wakes_when_a_chunk_is_droppable_or_space_is_freed() {
        let r = Registry::new();
        r.insert(info("1", Phase::Uploading, 1));
        r.insert(info("2", Phase::Sealed, 1));
        async fn waited(r: &Registry) -> Duration {
            let started = tokio::time::Instant::now();
            r.wait_for_space(Duration::from_secs(60)).await;
            started.elapsed()
        }
        assert_eq!(waited(&r).await, Duration::from_secs(60), "nothing changed");
        r.failed("1", Phase::Sealed, "boom".into());
        assert_eq!(waited(&r).await, Duration::ZERO, "a failed attempt");
        r.remove("2");
        assert_eq!(waited(&r).await, Duration::ZERO, "a removal");
        assert_eq!(
            waited(&r).await,
            Duration::from_secs(60),
            "one wake per change"
        );
    }

    #[test]
    fn a_failed_chunk_has_a_next_retry_until_it_is_picked_up() {
        let r = Registry::new();
        r.insert(info("1", Phase::Uploading, 1));
        r.failed("1", Phase::Sealed, "boom".into());
        r.retry_in("1", Duration::from_secs(5));
        let at = r.snapshot()[0].next_retry_ms.expect("a retry is scheduled");
        assert!((at - now_ms() - 5_000).abs() < 1_000, "{at}");
        r.set_phase("1", Phase::Uploading);
        assert_eq!(r.snapshot()[0].next_retry_ms, None);
    }

    #[test]
    fn the_backlog_of_a_stage_counts_its_waiting_and_retrying_chunks() {
        let r = Registry::new();
        let chunk = |id: &str, phase, created_ms, retry: Option<(i64, &str)>| {
            let mut c = info(id, phase, 1);
            c.created_ms = created_ms;
            if let Some((at, error)) = retry {
                c.next_retry_ms = Some(at);
                c.last_error = Some(error.into());
                c.attempts = 1;
            }
            r.insert(c);
        };
        chunk("1", Phase::Open, 1_000, None);
        chunk("2", Phase::Sealed, 2_000, Some((10_500, "refused")));
        chunk("3", Phase::Sealed, 3_000, Some((10_200, "refused")));
        chunk("4", Phase::Sealed, 4_000, Some((9_000, "denied")));
        chunk("5", Phase::Uploading, 5_000, None);
        chunk("6", Phase::Sealed, 6_000, None);
        chunk("7", Phase::Uploaded, 7_000, Some((12_000, "throttled")));
        let chunks = r.snapshot();
        let upload = backlog(chunks.iter(), Stage::Upload, Some("refused"), 10_000);
        assert_eq!(
            upload,
            Backlog {
                waiting: 5,
                retrying: 3,
                with_last_error: 2,
                oldest: Some(Duration::from_secs(8)),
                next_retry_in: Some(Duration::ZERO),
            },
            "an overdue retry is due now"
        );
        let publish = backlog(chunks.iter(), Stage::Publish, Some("refused"), 10_000);
        assert_eq!(
            publish,
            Backlog {
                waiting: 1,
                retrying: 1,
                with_last_error: 0,
                oldest: Some(Duration::from_secs(3)),
                next_retry_in: Some(Duration::from_secs(2)),
            }
        );
        assert_eq!(
            backlog(std::iter::empty(), Stage::Upload, None, 0),
            Backlog::default()
        );
    }
}
