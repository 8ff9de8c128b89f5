//! The resend window on disk: the ack tokens of stored requests, durable with their events, so
//! that a request resent after a restart of the sidecar is acknowledged without being stored
//! again.
//!
//! A request's token is written as a *token record* in the data file of every chunk that holds
//! its events, in a token frame that follows the entries frame of the same write (see the format
//! in [`crate::buffer`]): the fsync that makes the events durable makes the token durable, and
//! recovery trusts a token frame only if every frame before it is whole. A request whose events
//! went to several chunks (two timekeys, a chunk that filled up) counts as stored only when
//! the records of all its parts are found (`parts`, each record with its part index), so that
//! a crash between the writes of its chunks, or a write that failed in one of them, makes its
//! resend stored again (at least once) rather than acknowledged with events missing.
//!
//! When a chunk is delivered, its token records are appended to the token journal (fsynced)
//! before its files are deleted, each with an expiry `dedup_window` later; on start, the
//! unexpired records of the journal and the records of the chunks still in the buffer rebuild
//! the in-memory window ([`Dedup`]). The journal is rewritten without its expired records when
//! they make up most of it. Only the file holds the journaled records: the rewrite reads them
//! back, and in memory each frame is known by its expiry, its count and its size. After an
//! append that failed, the next one rewrites the file first, so that nothing is appended
//! behind a torn frame (which would end the journal on the next start).
//!
//! ```text
//! <buffer_dir>/tokens.journal = "CCTOKS01" | frame*
//! frame   = payload_len u32 LE | payload_crc32c u32 LE | payload
//! payload = expires_ms i64 LE | record*
//! record  = see [`super::token_record`]
//! ```
//!
//! A token frame in a chunk data file holds `record*` only.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use claimcheck_consumer::crc;
use tracing::{error, info, warn};

use super::chunk::{self, ChunkPaths};
use super::token_record::TokenRecord;
use crate::dedup::Dedup;

/// First bytes of the token journal.
const JOURNAL_MAGIC: &[u8; 8] = b"CCTOKS01";
/// The token journal's name in the buffer directory.
pub const JOURNAL_FILE: &str = "tokens.journal";
/// Longest token recorded (Fluentd's are 25 bytes, Fluent Bit's 24 or 32); a longer one is
/// remembered in memory only.
pub const MAX_TOKEN_BYTES: usize = 1024;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The token journal: records of delivered chunks, until they expire. Only the file holds the
/// records; in memory, each of its frames is known by its expiry, its records and its size.
#[derive(Debug)]
struct Journal {
    path: PathBuf,
    file: Option<File>,
    /// The file's unexpired frames, oldest first, holding at least `max_live` records when
    /// there are that many (the window holds no more tokens than that anyway); older ones are
    /// still in the file until it is rewritten.
    frames: VecDeque<Frame>,
    max_live: usize,
    /// Bytes in the file.
    len: u64,
    /// Makes the next rewrite fail just after its rename (tests only).
    #[cfg(test)]
    fail_after_rename: bool,
    /// Errors the next appends fail with, last first (tests only).
    #[cfg(test)]
    fail_appends: Vec<io::ErrorKind>,
}

/// One frame of the journal file: one append, the records of the chunks delivered together.
#[derive(Debug, Clone, Copy)]
struct Frame {
    /// Unix ms.
    expires: i64,
    records: usize,
    bytes: u64,
}

impl Journal {
    /// Reads the journal (a torn or damaged tail ends it), and rewrites it with only the
    /// records unexpired at `now_ms`, which it returns with their expiry, oldest first. If the
    /// rewrite fails (a full disk), the records are read as they are and the first append
    /// rewrites the file: a start does not wait for room.
    fn open(
        buffer_dir: &Path,
        now_ms: i64,
        max_live: usize,
    ) -> io::Result<(Journal, Vec<(i64, TokenRecord)>)> {
        let mut journal = Journal {
            path: buffer_dir.join(JOURNAL_FILE),
            file: None,
            frames: VecDeque::new(),
            max_live,
            len: 0,
            #[cfg(test)]
            fail_after_rename: false,
            #[cfg(test)]
            fail_appends: Vec::new(),
        };
        let live = journal.read_live(now_ms)?;
        if let Err(e) = journal.write(&live) {
            warn!(path = %journal.path.display(), cause = %e,
                  "cannot rewrite the token journal; reading it as it is");
        }
        Ok((journal, live))
    }

    /// The records of the file unexpired at `now_ms`, oldest first, the oldest beyond
    /// `max_live` left out.
    fn read_live(&self, now_ms: i64) -> io::Result<Vec<(i64, TokenRecord)>> {
        let path = &self.path;
        let mut live = Vec::new();
        match fs::read(path) {
            Ok(bytes) => {
                if bytes.len() >= 8 && &bytes[..8] == JOURNAL_MAGIC {
                    let mut pos = 8;
                    while let Some((payload, next)) = next_frame(&bytes, pos) {
                        let Some((expires, records)) = decode_payload(payload) else {
                            break;
                        };
                        pos = next;
                        if expires > now_ms {
                            live.extend(records.into_iter().map(|r| (expires, r)));
                        }
                    }
                    if pos < bytes.len() {
                        warn!(path = %path.display(), bytes = bytes.len() - pos,
                              "the token journal ends in a torn or damaged record; ignoring it");
                    }
                } else if !bytes.is_empty() {
                    error!(path = %path.display(), "the token journal is not one; starting a new one");
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let excess = live.len().saturating_sub(self.max_live);
        live.drain(..excess);
        Ok(live)
    }

    /// Replaces the file with its records unexpired at `now_ms` ([`Journal::write`]).
    fn rewrite(&mut self, now_ms: i64) -> io::Result<()> {
        let live = self.read_live(now_ms)?;
        self.write(&live)
    }

    /// Replaces the file with `live` (temporary file, fsync, rename, directory fsync). The new
    /// file is appended to through the handle that wrote it. If this fails after the rename,
    /// the handle on the file replaced is let go (appends to it would be lost with it), and
    /// the next append rewrites again; if it fails before, the file is as it was.
    fn write(&mut self, live: &[(i64, TokenRecord)]) -> io::Result<()> {
        let mut bytes = JOURNAL_MAGIC.to_vec();
        let mut frames = VecDeque::new();
        let mut i = 0;
        while i < live.len() {
            let expires = live[i].0;
            let mut payload = expires.to_le_bytes().to_vec();
            let first = i;
            while i < live.len() && live[i].0 == expires {
                live[i].1.encode(&mut payload);
                i += 1;
            }
            let before = bytes.len();
            push_frame(&mut bytes, &payload);
            frames.push_back(Frame {
                expires,
                records: i - first,
                bytes: (bytes.len() - before) as u64,
            });
        }
        let tmp = self.path.with_extension("journal.tmp");
        let written = File::create(&tmp).and_then(|mut file| {
            file.write_all(&bytes)?;
            file.sync_all()?;
            Ok(file)
        });
        let file = match written {
            Ok(file) => file,
            Err(e) => {
                // Not left to take the room of a full disk.
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
        };
        self.file = None;
        fs::rename(&tmp, &self.path)?;
        #[cfg(test)]
        if std::mem::take(&mut self.fail_after_rename) {
            return Err(io::Error::other("failure injected after the rename"));
        }
        chunk::sync_dir(
            self.path
                .parent()
                .expect("the journal lives in a directory"),
        )?;
        self.file = Some(file);
        self.frames = frames;
        self.len = bytes.len() as u64;
        Ok(())
    }

    /// Records in the frames kept.
    fn live_records(&self) -> usize {
        self.frames.iter().map(|f| f.records).sum()
    }

    /// Appends `records`, expiring at `expires`, and fsyncs them.
    fn append(&mut self, expires: i64, records: &[TokenRecord], now_ms: i64) -> io::Result<()> {
        #[cfg(test)]
        if let Some(kind) = self.fail_appends.pop() {
            return Err(kind.into());
        }
        if self.file.is_none() {
            // The last append failed: whatever part of its frame made it is a torn tail, which
            // would end the journal on the next start before anything appended after it.
            self.rewrite(now_ms)?;
        }
        while self.frames.front().is_some_and(|f| f.expires <= now_ms) {
            self.frames.pop_front();
        }
        let mut payload = expires.to_le_bytes().to_vec();
        records.iter().for_each(|r| r.encode(&mut payload));
        let mut frame = Vec::with_capacity(payload.len() + 8);
        push_frame(&mut frame, &payload);
        let file = self.file.as_mut().expect("opened by the rewrite");
        let written = file.write_all(&frame).and_then(|()| file.sync_data());
        if let Err(e) = written {
            self.file = None;
            return Err(e);
        }
        self.len += frame.len() as u64;
        self.frames.push_back(Frame {
            expires,
            records: records.len(),
            bytes: frame.len() as u64,
        });
        let mut live = self.live_records();
        while let Some(oldest) = self.frames.front() {
            if live - oldest.records < self.max_live {
                break;
            }
            live -= oldest.records;
            self.frames.pop_front();
        }
        // Rewrite once the file is mostly expired records. The records are durable already:
        // a failed rewrite is tried again on a later append, and fails none.
        let live_bytes: u64 = self.frames.iter().map(|f| f.bytes).sum();
        if self.len > (1 << 20) && self.len > 4 * live_bytes {
            if let Err(e) = self.rewrite(now_ms) {
                warn!(path = %self.path.display(), cause = %e,
                      "cannot rewrite the token journal without its expired records; trying again later");
            }
        }
        Ok(())
    }
}

fn push_frame(out: &mut Vec<u8>, payload: &[u8]) {
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc::crc32c(payload).to_le_bytes());
    out.extend_from_slice(payload);
}

/// The payload of the whole, valid frame at `pos`, and where the next one starts.
fn next_frame(bytes: &[u8], pos: usize) -> Option<(&[u8], usize)> {
    let head = bytes.get(pos..pos + 8)?;
    let len = u32::from_le_bytes(head[..4].try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(head[4..].try_into().ok()?);
    let payload = bytes.get(pos + 8..pos + 8 + len)?;
    (crc::crc32c(payload) == crc).then_some((payload, pos + 8 + len))
}

fn decode_payload(payload: &[u8]) -> Option<(i64, Vec<TokenRecord>)> {
    let expires = i64::from_le_bytes(payload.get(..8)?.try_into().ok()?);
    Some((expires, TokenRecord::decode_all(&payload[8..])?))
}

/// The durable side of the resend window: the journal, and the in-memory window it feeds.
#[derive(Debug)]
pub struct Tokens {
    dedup: Arc<Dedup>,
    window: Duration,
    journal: Mutex<Journal>,
}

impl Tokens {
    /// Opens the journal and rebuilds the in-memory window from it and from `in_chunks`, the
    /// token records of the chunks still in the buffer. A request counts as stored when all its
    /// parts are found.
    pub fn open(
        buffer_dir: &Path,
        dedup: Arc<Dedup>,
        in_chunks: Vec<TokenRecord>,
    ) -> io::Result<Tokens> {
        let now = now_ms();
        let (journal, journaled) =
            Journal::open(buffer_dir, now, dedup.capacity().saturating_mul(2))?;
        let window = dedup.window();
        // By request: its record, the parts found, and when its window ends (`None`: a part is
        // still in the buffer, so the window starts now). A part is found once however many
        // times its record is: in the journal and in a chunk not yet deleted, say.
        let mut requests: HashMap<u128, (&TokenRecord, u32, Option<i64>)> = HashMap::new();
        let mut parts_found: HashSet<(u128, u16)> = HashSet::new();
        let all = journaled
            .iter()
            .map(|(e, r)| (Some(*e), r))
            .chain(in_chunks.iter().map(|r| (None, r)));
        for (expires, record) in all {
            let entry = requests
                .entry(record.request)
                .or_insert((record, 0, expires));
            let found = match record.part {
                Some(part) => parts_found.insert((record.request, part)),
                // Written before the part index existed: the parts of a request carry the same
                // record, so one found twice (journaled, and still in its chunk) cannot be told
                // from two parts. Such a request counts only if it had one part: a resend of
                // the others is stored again.
                None => record.parts == 1,
            };
            if found {
                entry.1 += 1;
            }
            entry.2 = match (entry.2, expires) {
                (Some(a), Some(b)) => Some(a.max(b)),
                _ => None,
            };
        }
        let mut stored: Vec<(Duration, &TokenRecord)> = requests
            .into_values()
            .filter(|(r, found, _)| *found >= u32::from(r.parts))
            .map(|(r, _, expires)| {
                let left = expires.map_or(window, |e| {
                    Duration::from_millis(e.saturating_sub(now).max(0) as u64)
                });
                (window.saturating_sub(left), r)
            })
            .collect();
        // Oldest first, so that the window expires them in order.
        stored.sort_by_key(|s| std::cmp::Reverse(s.0));
        for (age, r) in &stored {
            dedup.remember(r.sender, &r.token, *age);
        }
        if !stored.is_empty() {
            info!(
                tokens = stored.len(),
                "rebuilt the resend window from the buffer and the token journal"
            );
        }
        Ok(Tokens {
            dedup,
            window,
            journal: Mutex::new(journal),
        })
    }

    /// Before delivered chunks are deleted: journals their token records (fsynced), with an
    /// expiry `dedup_window` from now, and restarts their window in memory. The chunks may be
    /// deleted only if this succeeds (it fails only if the journal cannot be written; a chunk
    /// whose token frames cannot be read is logged and its tokens left out).
    ///
    /// When the disk is full the records are kept in memory only and this succeeds: deleting
    /// delivered chunks is what frees the disk, and a journal that waits for space would keep
    /// them, and every sender's acks, stalled for good. A resend of their requests after a
    /// restart within the window is then stored again.
    pub fn retire(&self, chunks: &[&ChunkPaths]) -> io::Result<()> {
        let mut records = Vec::new();
        for paths in chunks {
            match chunk::read_tokens(&paths.data) {
                Ok(r) => records.extend(r),
                // Its tokens are lost, not its delivery: a resend of its requests is stored
                // again. Refusing to delete it would publish it again on every start.
                Err(e) => warn!(path = %paths.data.display(), cause = %e,
                                "cannot read the tokens of a delivered chunk; a resend of its requests will be stored again"),
            }
        }
        if records.is_empty() {
            return Ok(());
        }
        let now = now_ms();
        let expires = now.saturating_add(self.window.as_millis() as i64);
        let journaled = self
            .journal
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .append(expires, &records, now);
        if let Err(e) = journaled {
            return_or_full(e, &records)?;
        }
        self.dedup
            .touch(records.iter().map(|r| (r.sender, &r.token[..])));
        Ok(())
    }

    /// Makes the next appends to the journal fail with these errors, last first (tests only).
    #[cfg(test)]
    pub fn fail_appends(&self, kinds: Vec<io::ErrorKind>) {
        self.journal
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .fail_appends = kinds;
    }

    /// Records in the journal now (expired ones are dropped on each append).
    pub fn journaled(&self) -> usize {
        self.journal
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .live_records()
    }
}

/// A failed journal append: returned, unless the disk is full ([`Tokens::retire`]).
fn return_or_full(e: io::Error, records: &[TokenRecord]) -> io::Result<()> {
    if !chunk::is_disk_full(&e) {
        return Err(e);
    }
    error!(tokens = records.len(), cause = %e,
           "the disk is full: deleting delivered chunks with their tokens in memory only; \
            a resend of their requests after a restart within the window will be stored again");
    Ok(())
}

/// Reads the whole journal file, for tests.
#[cfg(test)]
pub(super) fn read_journal(buffer_dir: &Path) -> Vec<(i64, TokenRecord)> {
    use std::io::Read;
    let mut bytes = Vec::new();
    File::open(buffer_dir.join(JOURNAL_FILE))
        .unwrap()
        .read_to_end(&mut bytes)
        .unwrap();
    let mut out = Vec::new();
    let mut pos = 8;
    while let Some((payload, next)) = next_frame(&bytes, pos) {
        let (e, records) = decode_payload(payload).unwrap();
        out.extend(records.into_iter().map(|r| (e, r)));
        pos = next;
    }
    out
}

#[cfg(test)]
mod tests {
    use std::fs::OpenOptions;

    use bytes::Bytes;

    use super::*;
    use crate::dedup::{Link, Origin, Seen};

    fn record(token: &str, request: u128, parts: u16) -> TokenRecord {
        TokenRecord {
            sender: "10.0.0.1".parse().unwrap(),
            token: Bytes::copy_from_slice(token.as_bytes()),
            request,
            parts,
            part: None,
        }
    }

    fn stored(dedup: &Arc<Dedup>, token: &str) -> bool {
        matches!(
            dedup.check(
                "10.0.0.1".parse().unwrap(),
                &Bytes::copy_from_slice(token.as_bytes()),
                Origin {
                    link: Link::new(),
                    answer: 0
                },
                false
            ),
            Seen::Stored
        )
    }

    #[test]
    fn the_window_is_rebuilt_from_chunks_and_journal_and_expires() {
        let dir = tempfile::tempdir().unwrap();
        let chunks = dir.path().join("chunks");
        fs::create_dir_all(&chunks).unwrap();
        let window = Duration::from_secs(600);
        let dedup = Dedup::new(window, 1000);
        let tokens = Tokens::open(dir.path(), dedup, Vec::new()).unwrap();
        // A delivered chunk holding a whole request, half of another, and half of one written
        // before the part index existed.
        let split = TokenRecord::new_request();
        let part = |part| TokenRecord {
            part: Some(part),
            ..record("split", split, 2)
        };
        let paths = ChunkPaths::new(&chunks, "a");
        let mut w = chunk::ChunkWriter::create(&paths.data, &test_header()).unwrap();
        let mut recs = Vec::new();
        record("whole", 1, 1).encode(&mut recs);
        part(0).encode(&mut recs);
        record("old-split", 3, 2).encode(&mut recs);
        w.append(&[test_entry()], &recs).unwrap();
        w.sync().unwrap();
        tokens.retire(&[&paths]).unwrap();
        assert_eq!(tokens.journaled(), 3);
        assert_eq!(read_journal(dir.path()).len(), 3);

        // Restart: "split" counts only with its other part, still in a chunk; not with the
        // same part found again (the chunk not deleted yet).
        let dedup = Dedup::new(window, 1000);
        Tokens::open(dir.path(), dedup.clone(), Vec::new()).unwrap();
        assert!(stored(&dedup, "whole"));
        assert!(!stored(&dedup, "split"), "half a request is not stored");
        let dedup = Dedup::new(window, 1000);
        Tokens::open(dir.path(), dedup.clone(), vec![part(0)]).unwrap();
        assert!(!stored(&dedup, "split"), "one part found twice");
        let dedup = Dedup::new(window, 1000);
        Tokens::open(dir.path(), dedup.clone(), vec![part(1)]).unwrap();
        assert!(stored(&dedup, "split"));
        // A request of several parts without indices never counts: its parts cannot be told
        // from one part found twice.
        let dedup = Dedup::new(window, 1000);
        Tokens::open(dir.path(), dedup.clone(), vec![record("old-split", 3, 2)]).unwrap();
        assert!(!stored(&dedup, "old-split"));

        // Expired records are pruned from the file on start.
        let (mut j, _) = Journal::open(dir.path(), now_ms(), 100).unwrap();
        j.append(now_ms() - 1, &[record("old", 9, 1)], 0).unwrap();
        assert_eq!(read_journal(dir.path()).len(), 4);
        drop(j);
        let dedup = Dedup::new(window, 1000);
        Tokens::open(dir.path(), dedup.clone(), Vec::new()).unwrap();
        assert!(!stored(&dedup, "old"));
        assert_eq!(read_journal(dir.path()).len(), 3);

        // A torn tail ends the journal without losing what comes before it.
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.path().join(JOURNAL_FILE))
            .unwrap();
        f.write_all(&[40, 0, 0, 0, 1, 2]).unwrap();
        let dedup = Dedup::new(window, 1000);
        Tokens::open(dir.path(), dedup.clone(), Vec::new()).unwrap();
        assert!(stored(&dedup, "whole"));
    }

    /// A full disk does not keep delivered chunks: their tokens stay in memory only. Any other
    /// failure to journal them does.
    #[test]
    fn a_full_disk_keeps_the_tokens_of_delivered_chunks_in_memory_only() {
        let dir = tempfile::tempdir().unwrap();
        let chunks = dir.path().join("chunks");
        fs::create_dir_all(&chunks).unwrap();
        let dedup = Dedup::new(Duration::from_secs(600), 1000);
        let tokens = Tokens::open(dir.path(), dedup.clone(), Vec::new()).unwrap();
        let paths = ChunkPaths::new(&chunks, "a");
        let mut w = chunk::ChunkWriter::create(&paths.data, &test_header()).unwrap();
        let mut recs = Vec::new();
        record("full", 1, 1).encode(&mut recs);
        w.append(&[test_entry()], &recs).unwrap();
        w.sync().unwrap();
        // Stored: in the window from then on.
        dedup.remember("10.0.0.1".parse().unwrap(), b"full", Duration::ZERO);

        tokens.fail_appends(vec![io::ErrorKind::Other]);
        assert!(tokens.retire(&[&paths]).is_err());
        tokens.fail_appends(vec![io::ErrorKind::StorageFull]);
        tokens.retire(&[&paths]).unwrap();
        assert_eq!(tokens.journaled(), 0);
        assert!(stored(&dedup, "full"));
    }

    #[test]
    fn the_journal_keeps_no_records_in_memory_and_is_rewritten_once_mostly_expired() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, live) = Journal::open(dir.path(), 0, 100_000).unwrap();
        assert!(live.is_empty());
        // Over 1 MiB of records expiring at 100, then one expiring later, appended at 200.
        let batch: Vec<TokenRecord> = (0..40_000).map(|i| record("tok", i, 1)).collect();
        j.append(100, &batch, 0).unwrap();
        assert!(j.len > 1 << 20);
        assert_eq!(j.live_records(), 40_000);
        j.append(10_000, &[record("late", 1 << 40, 1)], 200)
            .unwrap();
        assert_eq!(j.live_records(), 1);
        let on_disk = read_journal(dir.path());
        assert_eq!(on_disk.len(), 1, "rewritten without the expired records");
        assert_eq!(on_disk[0].1.token.as_ref(), b"late");
        assert_eq!(
            j.len,
            fs::metadata(dir.path().join(JOURNAL_FILE)).unwrap().len()
        );

        // At most `max_live` records are kept, the oldest frames dropped first.
        let (mut j, _) = Journal::open(dir.path(), 0, 3).unwrap();
        for i in 0..5 {
            j.append(
                20_000 + i,
                &[
                    record("a", 100 + i as u128, 1),
                    record("b", 200 + i as u128, 1),
                ],
                0,
            )
            .unwrap();
        }
        assert_eq!(
            j.live_records(),
            4,
            "whole frames, at least max_live records"
        );
        let (_, live) = Journal::open(dir.path(), 0, 3).unwrap();
        assert_eq!(live.len(), 3);
        assert_eq!(live.last().unwrap().0, 20_004);
    }

    fn tokens_of(live: &[(i64, TokenRecord)]) -> Vec<&[u8]> {
        live.iter().map(|(_, r)| r.token.as_ref()).collect()
    }

    #[test]
    fn an_append_after_a_failed_one_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open(dir.path(), 0, 100).unwrap();
        j.append(1_000, &[record("before", 1, 1)], 0).unwrap();
        // A failed append leaves part of its frame behind and the file closed.
        OpenOptions::new()
            .append(true)
            .open(dir.path().join(JOURNAL_FILE))
            .unwrap()
            .write_all(&[40, 0, 0, 0, 1, 2])
            .unwrap();
        j.file = None;
        j.append(1_000, &[record("after", 2, 1)], 0).unwrap();
        let (_, live) = Journal::open(dir.path(), 0, 100).unwrap();
        assert_eq!(tokens_of(&live), [&b"before"[..], &b"after"[..]]);
    }

    #[test]
    fn appends_after_a_rewrite_that_failed_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open(dir.path(), 0, 100_000).unwrap();
        // Over 1 MiB of records expiring at 100, so that the append at 200 rewrites the file.
        let batch: Vec<TokenRecord> = (0..40_000).map(|i| record("old", i, 1)).collect();
        j.append(100, &batch, 0).unwrap();
        j.fail_after_rename = true;
        j.append(10_000, &[record("kept", 1 << 40, 1)], 200)
            .expect("the records are durable; only the rewrite behind them failed");
        j.append(10_000, &[record("next", 2 << 40, 1)], 300)
            .unwrap();
        let (_, live) = Journal::open(dir.path(), 0, 100_000).unwrap();
        assert_eq!(tokens_of(&live), [&b"kept"[..], &b"next"[..]]);

        // A rewrite that cannot start leaves the file as it was, appended to as before.
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open(dir.path(), 0, 100_000).unwrap();
        j.append(100, &batch, 0).unwrap();
        let tmp = dir.path().join("tokens.journal.tmp");
        fs::create_dir(&tmp).unwrap();
        j.append(10_000, &[record("third", 3 << 40, 1)], 200)
            .unwrap();
        assert!(j.file.is_some());
        fs::remove_dir(&tmp).unwrap();
        j.append(10_000, &[record("fourth", 4 << 40, 1)], 300)
            .unwrap();
        assert_eq!(
            read_journal(dir.path()).len(),
            2,
            "rewritten on the next append, without the expired records"
        );
    }

    #[test]
    fn a_journal_that_cannot_be_rewritten_on_start_is_read_as_it_is() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open(dir.path(), 0, 100).unwrap();
        j.append(1_000, &[record("before", 1, 1)], 0).unwrap();
        drop(j);
        let tmp = dir.path().join("tokens.journal.tmp");
        fs::create_dir(&tmp).unwrap();
        let (mut j, live) = Journal::open(dir.path(), 0, 100).unwrap();
        assert_eq!(live.len(), 1);
        assert!(j.append(1_000, &[record("during", 2, 1)], 0).is_err());
        fs::remove_dir(&tmp).unwrap();
        j.append(1_000, &[record("after", 3, 1)], 0).unwrap();
        let (_, live) = Journal::open(dir.path(), 0, 100).unwrap();
        assert_eq!(tokens_of(&live), [&b"before"[..], &b"after"[..]]);
    }

    fn test_header() -> chunk::ChunkHeader {
        chunk::ChunkHeader {
            chunk_id: "0".repeat(32),
            tag: "t".into(),
            timekey: 0,
            created_ms: 0,
            reused: false,
        }
    }

    fn test_entry() -> Bytes {
        let mut b = vec![0x92];
        claimcheck_consumer::entry::encode::event_time(
            &mut b,
            claimcheck_consumer::EventTime::new(1, 0),
        );
        b.extend_from_slice(&[0x81, 0xa1, b'k', 0x01]);
        Bytes::from(b)
    }
}
