//! The in-memory index of every chunk in the buffer: where it is in its lifecycle, how many
//! bytes it holds on disk, how often delivering it failed and why.
//!
//! The writer, the uploader and the publisher each update it as a chunk moves on; it is what
//! `total_limit_size` is checked against, what `drop_oldest_chunk` chooses from, and what an
//! operator sees of the buffer. The files on disk stay the source of truth after a restart:
//! recovery rebuilds the index from them.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::Notify;

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
    /// The buffer is at `total_limit_size` (and blocking).
    full: AtomicBool,
    /// Writes are held for lack of disk space.
    disk_full: AtomicBool,
    /// The last write round failed for another reason (an I/O error).
    write_failing: AtomicBool,
}

impl Registry {
    pub fn new() -> Self {
        Registry::default()
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
                self.freed.notify_waiters();
            }
        }
    }

    /// Moves a chunk to `phase`. False if the chunk is not (or no longer) in the buffer, for
    /// example because `drop_oldest_chunk` dropped it while it waited.
    pub fn set_phase(&self, chunk_id: &str, phase: Phase) -> bool {
        match self.lock().get_mut(chunk_id) {
            Some(c) if c.phase != Phase::Dropped => {
                c.phase = phase;
                true
            }
            _ => false,
        }
    }

    /// Records a failed delivery attempt and puts the chunk back to waiting in `phase`.
    pub fn failed(&self, chunk_id: &str, phase: Phase, error: String) {
        if let Some(c) = self.lock().get_mut(chunk_id) {
            c.attempts += 1;
            c.last_error = Some(error);
            c.phase = phase;
        }
    }

    /// Removes a chunk whose files are gone (published, dead-lettered, dropped, quarantined).
    pub fn remove(&self, chunk_id: &str) -> Option<ChunkInfo> {
        let removed = self.lock().remove(chunk_id);
        if let Some(c) = &removed {
            self.bytes.fetch_sub(c.bytes, Ordering::Relaxed);
            self.freed.notify_waiters();
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
            oldest = Some(oldest.map_or(c.created_ms, |o| o.min(c.created_ms)));
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

    /// Why the sidecar cannot accept and buffer events right now, if it cannot.
    pub fn not_ready_because(&self) -> Option<&'static str> {
        if self.full.load(Ordering::Relaxed) {
            Some("the buffer is at total_limit_size")
        } else if self.disk_full.load(Ordering::Relaxed) {
            Some("the disk is full")
        } else if self.write_failing.load(Ordering::Relaxed) {
            Some("writes to the buffer fail")
        } else {
            None
        }
    }

    /// Waits until some space is freed, or `timeout`.
    pub async fn wait_for_space(&self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.freed.notified()).await;
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
}
