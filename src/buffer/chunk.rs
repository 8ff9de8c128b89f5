//! One chunk on disk: the data file, its frames, and the state file. Blocking I/O only, run
//! off the async runtime (on the buffer writer's thread, or tokio's blocking pool).
//!
//! See the module documentation of [`crate::buffer`] for the layout and the lifecycle.

use std::fs::{self, File, OpenOptions};
use std::io::{self, IoSlice, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use claimcheck_consumer::crc;
use claimcheck_consumer::entry::{self, EventTime};
use claimcheck_consumer::Pointer;
use serde::{Deserialize, Serialize};

use super::token_record::TokenRecord;

/// First bytes of every data file written now; the digits are the data file version. Version 2
/// adds token frames; version 3 seeds each frame's CRC32C with its chunk's id
/// ([`frame_seed`]), so that a reused file's leftover frames fail their check.
pub const MAGIC: &[u8; 8] = b"CCHUNK03";
/// First bytes of a version 2 data file (unseeded CRCs), still read.
pub const MAGIC_V2: &[u8; 8] = b"CCHUNK02";
/// First bytes of a version 1 data file (entries frames only), still read at recovery.
pub const MAGIC_V1: &[u8; 8] = b"CCHUNK01";
/// In a version 2 or 3 data file, a frame whose length has this bit set is a token frame: the
/// token records of the requests whose events are in the frame before it (see
/// [`super::tokens`]).
pub const TOKEN_FRAME: u32 = 1 << 31;
/// Bytes before a frame's payload: payload length (u32 LE) and payload CRC32C (u32 LE).
pub const FRAME_HEADER: usize = 8;
/// Data file suffix.
pub const DATA_EXT: &str = "chunk";
/// With write-behind ([`ChunkWriter::write_behind`]), the kernel is asked to start writing a
/// chunk's data back each time this much more of it is in whole pages.
pub const WRITE_BEHIND_STEP: u64 = 1 << 20;
const PAGE: u64 = 4096;
/// State file suffix.
pub const STATE_EXT: &str = "state";
/// Suffix of a delivered chunk's data file kept for a new chunk to overwrite ([`Spares`]).
pub const SPARE_EXT: &str = "free";
/// Most spare data files kept: enough for the chunks created while a delivery is under way.
pub const MAX_SPARES: usize = 4;

/// What a data file records about its chunk before the first event is appended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkHeader {
    pub chunk_id: String,
    pub tag: String,
    /// Start of the timekey window, Unix seconds.
    pub timekey: i64,
    /// Creation time, Unix milliseconds.
    pub created_ms: i64,
    /// The data file is a delivered chunk's, overwritten ([`Spares`]): what follows the last
    /// whole frame may be that chunk's leftover rather than a torn write.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reused: bool,
}

/// The seed of the CRC32C of every frame of a version 3 data file: the CRC32C of its chunk id.
/// A frame left over from the chunk that used the file before fails its check.
pub fn frame_seed(chunk_id: &str) -> u32 {
    crc::crc32c(chunk_id.as_bytes())
}

/// The sums of a chunk's events, kept while appending and rebuilt by scanning on recovery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ChunkStats {
    /// Number of events.
    pub records: u64,
    /// Body bytes (frame payloads only).
    pub body_bytes: u64,
    /// Length of the data file's valid part, header included.
    pub data_len: u64,
    #[serde(with = "time_pair")]
    pub first_time: EventTime,
    #[serde(with = "time_pair")]
    pub last_time: EventTime,
}

impl ChunkStats {
    /// Adds events whose times span `first..=last`.
    pub fn add(&mut self, records: u64, body_bytes: u64, first: EventTime, last: EventTime) {
        if self.records == 0 {
            self.first_time = first;
            self.last_time = last;
        } else {
            self.first_time = self.first_time.min(first);
            self.last_time = self.last_time.max(last);
        }
        self.records += records;
        self.body_bytes += body_bytes;
    }
}

mod time_pair {
    use claimcheck_consumer::EventTime;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(t: &EventTime, s: S) -> Result<S::Ok, S::Error> {
        (t.secs, t.nanos).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<EventTime, D::Error> {
        let (secs, nanos) = <(i64, u32)>::deserialize(d)?;
        Ok(EventTime::new(secs, nanos))
    }
}

/// The durable state of a chunk past "open", written atomically to `<id>.state`:
/// `{"sealed": {...}}` or `{"uploaded": {...}}`. (Externally tagged: the pointer's exact
/// times are raw JSON numbers, which serde cannot read back through an internally tagged enum.)
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChunkState {
    /// Nothing more will be appended; `stats.data_len` bytes of the data file are the chunk.
    Sealed {
        header: ChunkHeader,
        stats: ChunkStats,
    },
    /// S3 confirmed the object, or the body is small enough to ride in the record; the
    /// pointer is ready to publish.
    Uploaded {
        header: ChunkHeader,
        stats: ChunkStats,
        /// The pointer's JSON part (its `inline` body is not in it: see `inline`).
        pointer: Box<Pointer>,
        etag: Option<String>,
        /// The body of an inline pointer, base64 (absent for a pointer to an S3 object).
        #[serde(default, skip_serializing_if = "Option::is_none", with = "base64_body")]
        inline: Option<Bytes>,
    },
}

impl ChunkState {
    /// The state of a chunk whose pointer is ready, inline body included.
    pub fn uploaded(
        header: ChunkHeader,
        stats: ChunkStats,
        pointer: Pointer,
        etag: Option<String>,
    ) -> ChunkState {
        ChunkState::Uploaded {
            header,
            stats,
            inline: pointer.inline.clone(),
            pointer: Box::new(pointer),
            etag,
        }
    }

    /// The pointer of an uploaded chunk, with its inline body put back.
    pub fn into_pointer(self) -> Option<Pointer> {
        match self {
            ChunkState::Uploaded {
                pointer, inline, ..
            } => Some(Pointer { inline, ..*pointer }),
            ChunkState::Sealed { .. } => None,
        }
    }
}

mod base64_body {
    use base64::Engine;
    use bytes::Bytes;
    use serde::{Deserialize, Deserializer, Serializer};

    const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

    pub fn serialize<S: Serializer>(body: &Option<Bytes>, s: S) -> Result<S::Ok, S::Error> {
        match body {
            Some(b) => s.serialize_some(&B64.encode(b)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Bytes>, D::Error> {
        let text: Option<String> = Deserialize::deserialize(d)?;
        text.map(|t| B64.decode(t).map(Bytes::from))
            .transpose()
            .map_err(serde::de::Error::custom)
    }
}

/// Paths of one chunk's files.
#[derive(Debug, Clone)]
pub struct ChunkPaths {
    pub data: PathBuf,
    pub state: PathBuf,
}

impl ChunkPaths {
    pub fn new(dir: &Path, chunk_id: &str) -> Self {
        ChunkPaths {
            data: dir.join(format!("{chunk_id}.{DATA_EXT}")),
            state: dir.join(format!("{chunk_id}.{STATE_EXT}")),
        }
    }

    /// Removes the chunk. The data file goes first: once it is gone the chunk is gone, and
    /// recovery deletes a state file left without one.
    pub fn remove(&self) -> io::Result<()> {
        for path in [&self.data, &self.state] {
            match fs::remove_file(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        Ok(())
    }
}

/// True for errors that mean "no space": the write can succeed later.
pub fn is_disk_full(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded | io::ErrorKind::FileTooLarge
    )
}

/// Data files of delivered chunks, kept (renamed `<id>.free`) for new chunks to overwrite rather
/// than deleted: overwriting blocks a file already has saves the file system the block
/// allocation and the size change, so an `fdatasync` writes the data alone, and the page cache
/// reuses its pages. At most [`MAX_SPARES`] are kept; they count toward `total_limit_size`
/// and are deleted first when it is reached or the disk fills.
#[derive(Debug)]
pub struct Spares {
    /// The files and their lengths.
    files: Mutex<Vec<(PathBuf, u64)>>,
    max: usize,
}

impl Default for Spares {
    fn default() -> Self {
        Spares::new(MAX_SPARES)
    }
}

impl Spares {
    /// At most `max` spare files (0: delete delivered chunks' files).
    pub fn new(max: usize) -> Self {
        Spares {
            files: Mutex::new(Vec::new()),
            max,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(PathBuf, u64)>> {
        self.files.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How many spare files are kept.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Their bytes on disk.
    pub fn bytes(&self) -> u64 {
        self.lock().iter().map(|(_, len)| len).sum()
    }

    /// Whether no spare file is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Removes a delivered chunk ([`ChunkPaths::remove`]), keeping its data file as a spare
    /// if there is room: renamed to `<id>.free`, which is what removes the chunk, then the
    /// state file goes.
    pub fn retire(&self, paths: &ChunkPaths) -> io::Result<()> {
        let mut files = self.lock();
        if files.len() < self.max {
            let spare = paths.data.with_extension(SPARE_EXT);
            let len = fs::metadata(&paths.data).map(|m| m.len());
            match len.and_then(|len| fs::rename(&paths.data, &spare).map(|()| len)) {
                Ok(len) => files.push((spare, len)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        drop(files);
        paths.remove()
    }

    /// A spare file found at recovery: kept if there is room, else deleted. Only a spare is at
    /// stake, so a failure is logged, not returned.
    pub fn found(&self, path: PathBuf) {
        let mut files = self.lock();
        if files.len() < self.max {
            if let Ok(meta) = fs::metadata(&path) {
                files.push((path, meta.len()));
                return;
            }
        }
        drop(files);
        if let Err(e) = fs::remove_file(&path) {
            tracing::warn!(path = %path.display(), cause = %e, "cannot delete a spare chunk file");
        }
    }

    /// A spare file and its length, no longer kept: the caller overwrites or deletes it.
    fn take(&self) -> Option<(PathBuf, u64)> {
        self.lock().pop()
    }

    /// Deletes every spare file (the buffer or the disk is full). Returns how many went.
    pub fn clear(&self) -> usize {
        let files = std::mem::take(&mut *self.lock());
        files
            .iter()
            .filter(|(f, _)| fs::remove_file(f).is_ok())
            .count()
    }
}

/// Failures injected into the chunk file operations of the calling thread (tests only): the
/// unit tests that drive a [`super::writer::Writer`] on their own thread fail one create,
/// write or fsync of their choice, as a failing disk would.
#[cfg(test)]
pub(crate) mod fault {
    use std::cell::RefCell;
    use std::io;
    use std::path::Path;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Op {
        Create,
        Write,
        /// After a frame's bytes were written: fails the write as if it had failed part way.
        Written,
        /// Cutting a failed frame back off.
        Truncate,
        /// Moving a chunk's file to `dead/`.
        Rename,
        Sync,
        SyncDir,
    }

    /// Given the operation, the file (or directory) and, for a create, the chunk's tag: the
    /// error to fail it with, if any.
    pub type Hook = Box<dyn FnMut(Op, &Path, Option<&str>) -> Option<io::Error>>;

    thread_local! {
        static HOOK: RefCell<Option<Hook>> = const { RefCell::new(None) };
    }

    /// Sets (or with `None`, clears) the calling thread's hook.
    pub fn set(hook: Option<Hook>) {
        HOOK.with(|h| *h.borrow_mut() = hook);
    }

    pub fn check(op: Op, path: &Path, tag: Option<&str>) -> io::Result<()> {
        HOOK.with(
            |h| match h.borrow_mut().as_mut().and_then(|f| f(op, path, tag)) {
                Some(e) => Err(e),
                None => Ok(()),
            },
        )
    }
}

/// Fsyncs a directory so that file creations, renames and removals in it are durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    #[cfg(test)]
    fault::check(fault::Op::SyncDir, dir, None)?;
    File::open(dir)?.sync_all()
}

/// `create_dir_all` whose result survives a power loss: each directory it creates is fsynced
/// into its parent. Without that, the first files of a fresh buffer, fsynced themselves, could
/// vanish with a directory entry that was never written.
pub fn create_dir_durably(dir: &Path) -> io::Result<()> {
    let mut missing = Vec::new();
    let mut at = Some(dir);
    while let Some(d) = at.filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
        missing.push(d.to_path_buf());
        at = d.parent();
    }
    if missing.is_empty() {
        return Ok(());
    }
    fs::create_dir_all(dir)?;
    // Outermost first: each new directory into its parent.
    for d in missing.iter().rev() {
        if let Some(parent) = d.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent)?;
        }
    }
    sync_dir(dir)
}

/// Writes `state` to `path` atomically: temporary file, fsync, rename, directory fsync.
pub fn write_state(path: &Path, state: &ChunkState) -> io::Result<()> {
    put_state(path, state)?;
    sync_dir(path.parent().expect("state files live in a directory"))
}

/// [`write_state`] without its last step: the rename is not durable until the caller fsyncs
/// the directory, which it does once for many state files (the writer seals in batches).
/// Nothing may rely on the new state before that.
pub fn put_state(path: &Path, state: &ChunkState) -> io::Result<()> {
    let tmp = path.with_extension("state.tmp");
    let json = serde_json::to_vec(state).map_err(io::Error::other)?;
    {
        let mut f = File::create(&tmp)?;
        f.write_all(&json)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)
}

pub fn read_state(path: &Path) -> io::Result<ChunkState> {
    let bytes = fs::read(path)?;
    serde_json::from_slice(&bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

fn encode_header(header: &ChunkHeader) -> Vec<u8> {
    let json = serde_json::to_vec(header).expect("a header always serializes");
    let mut out = Vec::with_capacity(16 + json.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(json.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc::crc32c(&json).to_le_bytes());
    out.extend_from_slice(&json);
    out
}

/// An open chunk's data file, appended to by the buffer writer.
///
/// The file need not stay open between writes: [`ChunkWriter::open`] creates it (with its
/// header) the first time and reopens it for appending after [`ChunkWriter::close`], so that a
/// buffer with many open chunks holds only a bounded number of open files. A file is never
/// closed holding writes that are not synced (unless the sync fails, which the caller hears
/// of): what the sync policy promised for them stays covered.
#[derive(Debug)]
pub struct ChunkWriter {
    path: PathBuf,
    /// The header, until the file is created.
    header: Option<ChunkHeader>,
    /// Where the file comes from when it is created: a spare, if there is one.
    spares: Option<Arc<Spares>>,
    /// The seed of the frames' CRC32C ([`frame_seed`]).
    seed: u32,
    /// The file is a spare, longer than what is written to it so far: it is cut to its valid
    /// part at [`ChunkWriter::finish`].
    leftover: bool,
    file: Option<File>,
    /// Length of the valid part (0 before the file exists); a failed append is cut back to it.
    len: u64,
    /// Bytes were written since the last successful sync.
    unsynced: bool,
    /// Length of the part made durable by a sync, before any sync failed.
    synced_len: u64,
    /// A sync failed: what was written after `synced_len` may be lost, even if a later sync
    /// succeeds (Linux reports a lost writeback to one fsync only).
    sync_failed: bool,
    /// Start writeback as the file grows ([`ChunkWriter::write_behind`]).
    write_behind: bool,
    /// The offset up to which writeback was started.
    written_back: u64,
}

impl ChunkWriter {
    /// A writer for a data file that does not exist yet; no I/O until [`ChunkWriter::open`].
    pub fn new(path: &Path, header: &ChunkHeader) -> Self {
        ChunkWriter {
            path: path.to_path_buf(),
            header: Some(header.clone()),
            spares: None,
            seed: frame_seed(&header.chunk_id),
            leftover: false,
            file: None,
            len: 0,
            unsynced: false,
            synced_len: 0,
            sync_failed: false,
            write_behind: false,
            written_back: 0,
        }
    }

    /// Starts writeback of the data as the file grows, every [`WRITE_BEHIND_STEP`] of whole
    /// pages, without waiting for it: for `sync none` and `interval`, whose data is synced
    /// only when the chunk is sealed (or the interval's sync comes). Without it, those
    /// fdatasyncs write up to a whole chunk (8 MiB by default) while the writer waits, and
    /// every request waits with it; with it, the disk writes while the chunk fills and the
    /// sync finds little left. Durability is unchanged: what is synced, and when, stays the
    /// same.
    pub fn write_behind(mut self) -> Self {
        self.write_behind = true;
        self
    }

    /// Creates the file by overwriting a spare one when `spares` has one.
    pub fn reusing(mut self, spares: Arc<Spares>) -> Self {
        self.spares = Some(spares);
        self
    }

    /// The offset up to which writeback was started.
    pub fn written_back(&self) -> u64 {
        self.written_back
    }

    /// Creates the data file and writes its header. The caller syncs the file and the
    /// directory before acknowledging anything stored in it.
    pub fn create(path: &Path, header: &ChunkHeader) -> io::Result<Self> {
        let mut writer = ChunkWriter::new(path, header);
        writer.open()?;
        Ok(writer)
    }

    /// Opens the data file if it is not open. The first time, it takes a spare if there is one
    /// (writes its header over the spare's, then renames the spare to its path), else creates
    /// the file with its header (an error leaves no file behind). After a close, it reopens
    /// the file to write after its valid part.
    pub fn open(&mut self) -> io::Result<()> {
        if self.file.is_some() {
            return Ok(());
        }
        let file = match &self.header {
            Some(header) => {
                let mut reused = None;
                if let Some((spare, spare_len)) = self.spares.as_ref().and_then(|s| s.take()) {
                    let bytes = encode_header(&ChunkHeader {
                        reused: true,
                        ..header.clone()
                    });
                    match overwrite_spare(&spare, &self.path, &bytes) {
                        Ok(file) => reused = Some((file, bytes.len() as u64, spare_len)),
                        Err(e) => {
                            tracing::warn!(path = %spare.display(), cause = %e,
                                           "cannot reuse a spare chunk file; deleting it");
                            let _ = fs::remove_file(&spare);
                        }
                    }
                }
                let (file, len, spare_len) = match reused {
                    Some(reused) => reused,
                    None => {
                        #[cfg(test)]
                        fault::check(fault::Op::Create, &self.path, Some(&header.tag))?;
                        let bytes = encode_header(header);
                        (create_with(&self.path, &bytes)?, bytes.len() as u64, 0)
                    }
                };
                self.len = len;
                // An empty chunk at worst, if the first sync fails.
                self.synced_len = len;
                self.leftover = spare_len > len;
                self.header = None;
                self.unsynced = true;
                file
            }
            None => {
                let mut file = OpenOptions::new().write(true).open(&self.path)?;
                file.seek(SeekFrom::Start(self.len))?;
                file
            }
        };
        self.file = Some(file);
        Ok(())
    }

    /// Whether the data file is open.
    pub fn is_open(&self) -> bool {
        self.file.is_some()
    }

    /// Whether writes are waiting for a sync.
    pub fn is_unsynced(&self) -> bool {
        self.unsynced
    }

    pub fn valid_len(&self) -> u64 {
        self.len
    }

    /// Appends one frame holding `payload` (the concatenation of the slices), followed, when
    /// `tokens` is not empty, by a token frame holding those encoded token records, in one
    /// write: the token frame is valid only if the entries frame before it is. On error the
    /// file is cut back to its previous length so that later frames do not follow garbage.
    /// The file must be open.
    pub fn append(&mut self, payload: &[Bytes], tokens: &[u8]) -> io::Result<()> {
        let Some(file) = self.file.as_mut() else {
            return Err(io::Error::other("chunk file is not open"));
        };
        let total: usize = payload.iter().map(Bytes::len).sum();
        let len = u32::try_from(total)
            .ok()
            .filter(|l| l & TOKEN_FRAME == 0)
            .ok_or_else(|| io::Error::other("frame larger than 2 GiB"))?;
        let crc = payload
            .iter()
            .fold(self.seed, |crc, s| crc::crc32c_append(crc, s));
        let mut head = [0u8; FRAME_HEADER];
        head[..4].copy_from_slice(&len.to_le_bytes());
        head[4..].copy_from_slice(&crc.to_le_bytes());
        let mut tail = Vec::new();
        if !tokens.is_empty() {
            let tlen = u32::try_from(tokens.len())
                .ok()
                .filter(|l| l & TOKEN_FRAME == 0)
                .ok_or_else(|| io::Error::other("token frame larger than 2 GiB"))?;
            tail.extend_from_slice(&(tlen | TOKEN_FRAME).to_le_bytes());
            tail.extend_from_slice(&crc::crc32c_append(self.seed, tokens).to_le_bytes());
            tail.extend_from_slice(tokens);
        }
        self.unsynced = true;
        #[cfg(test)]
        let result = fault::check(fault::Op::Write, &self.path, None)
            .and_then(|()| write_all_vectored(file, &head, payload, &tail))
            .and_then(|()| fault::check(fault::Op::Written, &self.path, None));
        #[cfg(not(test))]
        let result = write_all_vectored(file, &head, payload, &tail);
        match result {
            Ok(()) => {
                self.len += (FRAME_HEADER + total + tail.len()) as u64;
                self.start_writeback();
                Ok(())
            }
            Err(e) => {
                // The failed frame is cut off, best effort: the length recorded at seal time
                // excludes it anyway. If it cannot be, the file is closed, so that the next
                // write reopens it at `len`, over the failed frame, rather than after it (where
                // a reader would never find it); what is left past `len` is cut at the seal.
                #[cfg(test)]
                let cut = fault::check(fault::Op::Truncate, &self.path, None);
                #[cfg(not(test))]
                let cut = Ok(());
                let cut = cut
                    .and_then(|()| file.set_len(self.len))
                    .and_then(|()| file.seek(SeekFrom::Start(self.len)).map(|_| ()));
                match cut {
                    Ok(()) => self.leftover = false,
                    Err(_) => {
                        self.leftover = true;
                        self.file = None;
                    }
                }
                Err(e)
            }
        }
    }

    /// With write-behind, starts writeback of the whole pages written since the last start,
    /// once they reach [`WRITE_BEHIND_STEP`]; the page being filled is left alone, so that the
    /// next append does not wait for its writeback. `POSIX_FADV_DONTNEED` is the call that
    /// does this without `unsafe`: Linux starts writeback of the range's dirty pages and drops
    /// only its clean ones, and these pages were just written, so they stay cached for the
    /// upload. Advice only: an error changes nothing but the speed.
    fn start_writeback(&mut self) {
        let whole = self.len / PAGE * PAGE;
        if !self.write_behind || whole < self.written_back + WRITE_BEHIND_STEP {
            return;
        }
        if let Some(file) = &self.file {
            let len = std::num::NonZeroU64::new(whole - self.written_back);
            let advice = rustix::fs::Advice::DontNeed;
            let _ = rustix::fs::fadvise(file, self.written_back, len, advice);
        }
        self.written_back = whole;
    }

    /// Makes every write so far durable (fdatasync); nothing to do if they already are. A
    /// closed file whose close could not sync is opened for the time of the sync.
    pub fn sync(&mut self) -> io::Result<()> {
        if !self.unsynced {
            return Ok(());
        }
        let synced = self.sync_data();
        if synced.is_err() {
            self.sync_failed = true;
        } else if !self.sync_failed {
            self.synced_len = self.len;
        }
        synced?;
        self.unsynced = false;
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        #[cfg(test)]
        fault::check(fault::Op::Sync, &self.path, None)?;
        match &self.file {
            Some(file) => file.sync_data(),
            None => OpenOptions::new()
                .append(true)
                .open(&self.path)?
                .sync_data(),
        }
    }

    /// For a chunk whose sync failed, under `sync always` (once the failure is known, and at
    /// its seal if that cut failed): cuts the file back to the part synced before the failure
    /// (the requests written after it were not acknowledged), so that the chunk holds only
    /// what is durable. Returns whether it cut.
    pub fn cut_to_synced(&mut self) -> io::Result<bool> {
        if !self.sync_failed || self.len <= self.synced_len || self.header.is_some() {
            return Ok(false);
        }
        self.set_len(self.synced_len)?;
        self.len = self.synced_len;
        self.leftover = false;
        self.unsynced = true;
        // Its position is past the end now; nothing more is written to a chunk being sealed.
        self.file = None;
        Ok(true)
    }

    /// For the seal: cuts a spare file's leftover off (so that a sealed chunk's file ends with
    /// its valid part, as readers that read to the end expect), then syncs.
    pub fn finish(&mut self) -> io::Result<()> {
        if self.leftover {
            self.set_len(self.len)?;
            self.leftover = false;
            self.unsynced = true;
        }
        self.sync()
    }

    /// Cuts the file to `len`, opening it for the time of the call if it is closed.
    fn set_len(&self, len: u64) -> io::Result<()> {
        match &self.file {
            Some(file) => file.set_len(len),
            None => OpenOptions::new()
                .write(true)
                .open(&self.path)?
                .set_len(len),
        }
    }

    /// Closes the file without syncing it: what it holds unsynced stays so
    /// ([`ChunkWriter::is_unsynced`]) until [`ChunkWriter::sync`] or [`ChunkWriter::finish`],
    /// which open the file for the time of the sync. For a chunk on its way to its seal, whose
    /// `finish` syncs it without the writer's lock.
    pub fn release(&mut self) {
        self.file = None;
    }

    /// Syncs what is not yet synced, then closes the file; [`ChunkWriter::open`] reopens it.
    /// The file is closed even when the sync fails: the writes then stay unsynced, and a later
    /// [`ChunkWriter::sync`] tries again.
    pub fn close(&mut self) -> io::Result<()> {
        if self.file.is_none() {
            return Ok(());
        }
        let synced = self.sync();
        self.file = None;
        synced
    }
}

/// Creates the data file `path` holding `header`; an error leaves no file behind.
fn create_with(path: &Path, header: &[u8]) -> io::Result<File> {
    let mut file = OpenOptions::new().write(true).create_new(true).open(path)?;
    if let Err(e) = file.write_all(header) {
        drop(file);
        let _ = fs::remove_file(path);
        return Err(e);
    }
    Ok(file)
}

/// Writes `header` over the start of the spare file `spare`, then renames it to `path`. The
/// header goes first: a file under a new chunk's name holds that chunk's header unless a
/// power loss kept the rename and lost the header (recovery puts such a file in quarantine).
fn overwrite_spare(spare: &Path, path: &Path, header: &[u8]) -> io::Result<File> {
    let mut file = OpenOptions::new().write(true).open(spare)?;
    file.write_all(header)?;
    fs::rename(spare, path)?;
    Ok(file)
}

fn write_all_vectored(
    file: &mut File,
    head: &[u8],
    payload: &[Bytes],
    tail: &[u8],
) -> io::Result<()> {
    let mut slices: Vec<&[u8]> = Vec::with_capacity(payload.len() + 2);
    slices.push(head);
    slices.extend(payload.iter().map(|b| b.as_ref()));
    if !tail.is_empty() {
        slices.push(tail);
    }
    let mut first = 0;
    let mut offset = 0;
    while first < slices.len() {
        let io: Vec<IoSlice<'_>> = std::iter::once(IoSlice::new(&slices[first][offset..]))
            .chain(
                slices[first + 1..]
                    .iter()
                    .take(1023)
                    .map(|s| IoSlice::new(s)),
            )
            .collect();
        let mut written = file.write_vectored(&io)?;
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        while first < slices.len() && written >= slices[first].len() - offset {
            written -= slices[first].len() - offset;
            first += 1;
            offset = 0;
        }
        offset += written;
    }
    Ok(())
}

/// Why a data file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
    #[error("not a chunk data file (bad magic)")]
    BadMagic,
    #[error("chunk header is damaged: {0}")]
    BadHeader(String),
    #[error("frame at offset {offset} is damaged: {why}")]
    BadFrame { offset: u64, why: &'static str },
}

/// How a data file's frames are laid out, from its magic and header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frames {
    /// Offset of the first frame.
    pub start: u64,
    /// Token frames may occur (version 2 and later).
    tokens: bool,
    /// The frames' CRC32C seed: the chunk id's in version 3, 0 before.
    seed: u32,
}

impl Frames {
    fn crc(&self, payload: &[u8]) -> u32 {
        crc::crc32c_append(self.seed, payload)
    }
}

/// Reads a data file's header; returns it with the layout of the frames after it.
pub fn read_header(file: &mut File) -> Result<(ChunkHeader, Frames), ReadError> {
    // Only a file too short is damaged; another error (EIO) may pass, and is retried.
    let short = |e: io::Error| match e.kind() {
        io::ErrorKind::UnexpectedEof => ReadError::BadHeader("file shorter than its header".into()),
        _ => ReadError::Io(e),
    };
    let mut fixed = [0u8; 16];
    file.seek(SeekFrom::Start(0))?;
    file.read_exact(&mut fixed).map_err(short)?;
    let magic = &fixed[..8];
    if magic != MAGIC && magic != MAGIC_V2 && magic != MAGIC_V1 {
        return Err(ReadError::BadMagic);
    }
    let len = u32::from_le_bytes(fixed[8..12].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(fixed[12..16].try_into().expect("4 bytes"));
    if len > 64 * 1024 {
        return Err(ReadError::BadHeader(format!(
            "header length {len} is implausible"
        )));
    }
    let mut json = vec![0u8; len];
    file.read_exact(&mut json).map_err(short)?;
    if crc::crc32c(&json) != crc {
        return Err(ReadError::BadHeader("header checksum mismatch".into()));
    }
    let header: ChunkHeader =
        serde_json::from_slice(&json).map_err(|e| ReadError::BadHeader(e.to_string()))?;
    let frames = Frames {
        start: 16 + len as u64,
        tokens: magic != MAGIC_V1,
        seed: if magic == MAGIC {
            frame_seed(&header.chunk_id)
        } else {
            0
        },
    };
    Ok((header, frames))
}

/// Read buffer of [`FrameReader`].
const FRAME_READ_BUFFER: usize = 64 << 10;

/// Reads frame payloads of a data file in order, in pieces of bounded size, checking each
/// frame's CRC32C once the frame has been read.
pub struct FrameReader {
    file: io::BufReader<File>,
    pos: u64,
    end: u64,
    frame_left: u64,
    frame_crc: u32,
    crc: u32,
    frame_start: u64,
    /// The payload length of the last frame read.
    last_frame: u64,
    /// The layout; token frames are checked and left out: they are not body.
    frames: Frames,
    /// A token frame's payload, read to be checked.
    tokens: Vec<u8>,
}

impl FrameReader {
    /// Reads the frames laid out as `frames` says (from [`read_header`]) up to `end` (the
    /// sealed `data_len`).
    pub fn new(mut file: File, frames: Frames, end: u64) -> io::Result<Self> {
        let start = frames.start;
        file.seek(SeekFrom::Start(start))?;
        Ok(FrameReader {
            // Small, so that many small frames cost few reads, while the payload of large ones
            // is read straight into the caller's piece (a read larger than the buffer skips it,
            // and after a large frame the next header is read alone) rather than copied
            // through it.
            file: io::BufReader::with_capacity(FRAME_READ_BUFFER, file),
            pos: start,
            end,
            frame_left: 0,
            frame_crc: 0,
            crc: 0,
            frame_start: start,
            last_frame: 0,
            frames,
            tokens: Vec::new(),
        })
    }

    /// Next piece of payload, at most `max` bytes, or `None` at the end.
    pub fn next_piece(&mut self, buf: &mut Vec<u8>, max: usize) -> Result<bool, ReadError> {
        if self.at_end()? {
            return Ok(false);
        }
        let n = (self.frame_left as usize).min(max);
        buf.clear();
        buf.reserve(n);
        // Into the spare capacity: no zeroing of the piece before it is overwritten.
        let got = (&mut self.file).take(n as u64).read_to_end(buf)?;
        if got < n {
            return Err(ReadError::Io(io::ErrorKind::UnexpectedEof.into()));
        }
        self.consumed(buf)?;
        Ok(true)
    }

    /// Reads the next piece of payload straight into `room` (as much of the current frame as
    /// fits); returns its length, 0 at the end (or if `room` is empty).
    pub fn read_into(&mut self, room: &mut [u8]) -> Result<usize, ReadError> {
        if room.is_empty() || self.at_end()? {
            return Ok(0);
        }
        let n = (self.frame_left as usize).min(room.len());
        let piece = &mut room[..n];
        self.file.read_exact(piece)?;
        self.consumed(piece)?;
        Ok(piece.len())
    }

    /// True once every frame has been read; otherwise moves on to a frame with payload left
    /// (past its header, and past token frames: they are not body).
    pub fn at_end(&mut self) -> Result<bool, ReadError> {
        while self.frame_left == 0 {
            if self.pos >= self.end {
                return Ok(true);
            }
            if self.end - self.pos < FRAME_HEADER as u64 {
                return Err(ReadError::BadFrame {
                    offset: self.pos,
                    why: "truncated frame header",
                });
            }
            let mut head = [0u8; FRAME_HEADER];
            if self.last_frame >= FRAME_READ_BUFFER as u64 && self.file.buffer().is_empty() {
                // Large frames: the header alone, so that the payload goes straight to the
                // caller rather than partly through the buffer (a copy of up to its size per
                // frame). The buffer is empty, so the file is where the reader is.
                self.file.get_mut().read_exact(&mut head)?;
            } else {
                self.file.read_exact(&mut head)?;
            }
            self.frame_start = self.pos;
            self.pos += FRAME_HEADER as u64;
            let raw = u32::from_le_bytes(head[..4].try_into().expect("4"));
            let is_tokens = self.frames.tokens && raw & TOKEN_FRAME != 0;
            self.frame_left = u64::from(if is_tokens { raw & !TOKEN_FRAME } else { raw });
            self.frame_crc = u32::from_le_bytes(head[4..].try_into().expect("4"));
            self.last_frame = self.frame_left;
            self.crc = self.frames.seed;
            if self.frame_left > self.end - self.pos {
                return Err(ReadError::BadFrame {
                    offset: self.frame_start,
                    why: "frame runs past the end",
                });
            }
            if is_tokens {
                // Read and checked, not skipped: each frame's CRC covers its payload only, so
                // a data frame whose length word gained the token bit on disk would otherwise
                // drop out of the body unnoticed. Entries never decode as token records.
                self.tokens.clear();
                self.tokens.resize(self.frame_left as usize, 0);
                self.file.read_exact(&mut self.tokens)?;
                if self.frames.crc(&self.tokens) != self.frame_crc
                    || TokenRecord::decode_all(&self.tokens).is_none()
                {
                    return Err(ReadError::BadFrame {
                        offset: self.frame_start,
                        why: "damaged token frame",
                    });
                }
                self.pos += self.frame_left;
                self.frame_left = 0;
            }
        }
        Ok(false)
    }

    /// Accounts for a piece of the current frame just read; checks the frame's CRC32C at its
    /// end.
    fn consumed(&mut self, piece: &[u8]) -> Result<(), ReadError> {
        // A data frame starts with an entry, a msgpack array; a token record never does (its
        // first byte is 4 or 16), so a token frame that lost its bit on disk is caught here.
        if self.pos == self.frame_start + FRAME_HEADER as u64
            && !piece
                .first()
                .is_some_and(|b| matches!(b, 0x90..=0x9f | 0xdc | 0xdd))
        {
            return Err(ReadError::BadFrame {
                offset: self.frame_start,
                why: "frame does not start with an entry",
            });
        }
        self.crc = crc::crc32c_append(self.crc, piece);
        self.pos += piece.len() as u64;
        self.frame_left -= piece.len() as u64;
        if self.frame_left == 0 && self.crc != self.frame_crc {
            return Err(ReadError::BadFrame {
                offset: self.frame_start,
                why: "checksum mismatch",
            });
        }
        Ok(())
    }
}

/// What scanning an unsealed data file found.
#[derive(Debug)]
pub struct Scan {
    pub header: ChunkHeader,
    pub stats: ChunkStats,
    /// Bytes past the last whole, valid frame (a torn tail).
    pub torn_bytes: u64,
    /// The token records of the valid part.
    pub tokens: Vec<TokenRecord>,
}

/// Scans an unsealed data file frame by frame: the valid part ends before the first frame that
/// is incomplete, fails its checksum or holds anything but whole entries. Whole frames are
/// exactly what was acknowledged (a frame is synced before its events are acked).
pub fn scan(path: &Path) -> Result<Scan, ReadError> {
    let mut file = File::open(path)?;
    let (header, frames) = read_header(&mut file)?;
    let start = frames.start;
    let mut tokens = Vec::new();
    let file_len = file.metadata()?.len();
    let mut reader = io::BufReader::with_capacity(1 << 20, file);
    reader.seek(SeekFrom::Start(start))?;
    let mut stats = ChunkStats {
        data_len: start,
        ..ChunkStats::default()
    };
    let mut pos = start;
    let mut payload = Vec::new();
    loop {
        let mut head = [0u8; FRAME_HEADER];
        if file_len - pos < FRAME_HEADER as u64 {
            break;
        }
        reader.read_exact(&mut head)?;
        let raw = u32::from_le_bytes(head[..4].try_into().expect("4"));
        let is_tokens = frames.tokens && raw & TOKEN_FRAME != 0;
        let len = u64::from(if is_tokens { raw & !TOKEN_FRAME } else { raw });
        let crc = u32::from_le_bytes(head[4..].try_into().expect("4"));
        if len == 0 || file_len - pos - (FRAME_HEADER as u64) < len {
            break;
        }
        payload.clear();
        payload.resize(len as usize, 0);
        reader.read_exact(&mut payload)?;
        if frames.crc(&payload) != crc {
            break;
        }
        if is_tokens {
            let Some(records) = TokenRecord::decode_all(&payload) else {
                break;
            };
            tokens.extend(records);
            pos += FRAME_HEADER as u64 + len;
            stats.data_len = pos;
            continue;
        }
        let mut frame = ChunkStats::default();
        let mut whole = true;
        for e in entry::entries(&payload) {
            match e {
                Ok((_, info)) => frame.add(1, 0, info.time, info.time),
                Err(_) => {
                    whole = false;
                    break;
                }
            }
        }
        if !whole {
            break;
        }
        stats.add(frame.records, len, frame.first_time, frame.last_time);
        pos += FRAME_HEADER as u64 + len;
        stats.data_len = pos;
    }
    Ok(Scan {
        header,
        stats,
        torn_bytes: file_len - stats.data_len,
        tokens,
    })
}

/// The token records of a data file's token frames up to `end` (the sealed `data_len`, or the
/// file's length: a sealed chunk's file ends with its valid part, a reused one's too once it is
/// cut at the seal), reading only frame headers and token frames. A damaged token frame is an
/// error.
///
/// Small frames are read a window of [`FRAME_READ_BUFFER`] at a time; past a large entries
/// frame, [`SMALL_READ`] is enough for the token frame after it and the next frame's header.
/// (A buffered reader filled its whole buffer after each large frame: for a chunk of 200 KB
/// requests, a third of the file read to find a few hundred bytes of tokens.)
pub fn read_tokens_to(path: &Path, end: Option<u64>) -> Result<Vec<TokenRecord>, ReadError> {
    let mut file = File::open(path)?;
    let (_, frames) = read_header(&mut file)?;
    if !frames.tokens {
        return Ok(Vec::new());
    }
    let end = match end {
        Some(end) => end,
        None => file.metadata()?.len(),
    };
    let mut window = ReadWindow::new(file, end);
    let mut pos = frames.start;
    let mut after_large = false;
    let mut out = Vec::new();
    while end.saturating_sub(pos) >= FRAME_HEADER as u64 {
        let head: [u8; FRAME_HEADER] = window
            .read(pos, FRAME_HEADER, after_large)?
            .try_into()
            .expect("8 bytes");
        let raw = u32::from_le_bytes(head[..4].try_into().expect("4"));
        let len = u64::from(raw & !TOKEN_FRAME);
        if len > end - pos - FRAME_HEADER as u64 {
            return Err(ReadError::BadFrame {
                offset: pos,
                why: "frame runs past the end",
            });
        }
        if raw & TOKEN_FRAME != 0 {
            let payload = window.read(pos + FRAME_HEADER as u64, len as usize, after_large)?;
            let crc = u32::from_le_bytes(head[4..].try_into().expect("4"));
            let records = (frames.crc(payload) == crc)
                .then(|| TokenRecord::decode_all(payload))
                .flatten()
                .ok_or(ReadError::BadFrame {
                    offset: pos,
                    why: "damaged token frame",
                })?;
            out.extend(records);
        } else {
            after_large = len >= FRAME_READ_BUFFER as u64;
        }
        pos += FRAME_HEADER as u64 + len;
    }
    Ok(out)
}

/// What [`read_tokens_to`] reads past a large frame.
const SMALL_READ: usize = 4 << 10;

/// The bytes of a file last read, from `start`, for reads that mostly fall within them.
struct ReadWindow {
    file: File,
    /// Where reads stop: nothing beyond is read ahead.
    end: u64,
    start: u64,
    bytes: Vec<u8>,
}

impl ReadWindow {
    fn new(file: File, end: u64) -> Self {
        ReadWindow {
            file,
            end,
            start: 0,
            bytes: Vec::new(),
        }
    }

    /// Bytes `at..at + len`, from the window or from a new one read at `at`: of at least
    /// [`SMALL_READ`] bytes when `small`, else of [`FRAME_READ_BUFFER`], within `end`.
    fn read(&mut self, at: u64, len: usize, small: bool) -> io::Result<&[u8]> {
        let within = at >= self.start && at + len as u64 <= self.start + self.bytes.len() as u64;
        if !within {
            let ahead = if small { SMALL_READ } else { FRAME_READ_BUFFER };
            let n = ahead.min(self.end.saturating_sub(at) as usize).max(len);
            self.bytes.resize(n, 0);
            self.file.seek(SeekFrom::Start(at))?;
            self.file.read_exact(&mut self.bytes)?;
            self.start = at;
        }
        let from = (at - self.start) as usize;
        Ok(&self.bytes[from..from + len])
    }
}

/// The token records of a data file (see [`read_tokens_to`]).
pub fn read_tokens(path: &Path) -> Result<Vec<TokenRecord>, ReadError> {
    read_tokens_to(path, None)
}

/// Cuts a data file back to `len` bytes and syncs it.
pub fn truncate(path: &Path, len: u64) -> io::Result<()> {
    let f = OpenOptions::new().write(true).open(path)?;
    f.set_len(len)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> ChunkHeader {
        ChunkHeader {
            chunk_id: "0".repeat(32),
            tag: "app".into(),
            timekey: 60,
            created_ms: 1,
            reused: false,
        }
    }

    fn entry_bytes(secs: u32) -> Bytes {
        let mut b = vec![0x92];
        entry::encode::event_time(&mut b, EventTime::new(i64::from(secs), 0));
        b.extend_from_slice(&[0x81, 0xa1, b'k', 0x01]);
        Bytes::from(b)
    }

    fn token_record() -> TokenRecord {
        TokenRecord {
            sender: std::net::Ipv4Addr::LOCALHOST.into(),
            token: Bytes::from_static(b"tok"),
            request: 1,
            parts: 1,
            part: None,
        }
    }

    fn frame_reader(path: &Path, end: u64) -> FrameReader {
        let mut file = File::open(path).unwrap();
        let (_, frames) = read_header(&mut file).unwrap();
        FrameReader::new(file, frames, end).unwrap()
    }

    /// The payload, read in pieces of 5 bytes, and again straight into a buffer in pieces of
    /// 7 (both the same).
    fn body(path: &Path, end: u64) -> Vec<u8> {
        let mut r = frame_reader(path, end);
        let mut out = Vec::new();
        let mut piece = Vec::new();
        while r.next_piece(&mut piece, 5).unwrap() {
            out.extend_from_slice(&piece);
        }
        let mut r = frame_reader(path, end);
        let mut direct = vec![0u8; out.len() + 7];
        let mut at = 0;
        loop {
            let end = (at + 7).min(direct.len());
            match r.read_into(&mut direct[at..end]).unwrap() {
                0 => break,
                n => at += n,
            }
        }
        assert!(r.at_end().unwrap());
        assert_eq!(
            &direct[..at],
            &out[..],
            "read_into reads what next_piece does"
        );
        out
    }

    #[test]
    fn large_small_and_token_frames_read_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.chunk");
        let mut w = ChunkWriter::create(&path, &header()).unwrap();
        let mut all = Vec::new();
        // Frames above and below the reader's buffer, in every order, some followed by a
        // token frame (checked, not body). Each payload starts as an entry does.
        let sizes = [200_000, 150_000, 10, 70_000, 65_536, 3, 300_000, 9];
        let mut record = Vec::new();
        token_record().encode(&mut record);
        for (i, size) in sizes.into_iter().enumerate() {
            let mut payload: Vec<u8> = (0..size).map(|b| (b * 7 + i) as u8).collect();
            payload[0] = 0x92;
            let tokens = if i % 3 == 1 { &record[..] } else { &[][..] };
            w.append(&[Bytes::from(payload.clone())], tokens).unwrap();
            all.extend_from_slice(&payload);
        }
        let len = w.valid_len();
        drop(w);
        assert!(body(&path, len) == all, "the payload, whole and in order");
        // Straight into one buffer with room for it all: each frame in one piece.
        let mut r = frame_reader(&path, len);
        let mut direct = vec![0u8; all.len()];
        let mut pieces = Vec::new();
        let mut at = 0;
        while !r.at_end().unwrap() {
            let n = r.read_into(&mut direct[at..]).unwrap();
            pieces.push(n);
            at += n;
        }
        assert_eq!(pieces, sizes);
        assert!(direct == all);
    }

    /// Bytes this thread has read so far (Linux: `/proc/thread-self/io`).
    fn thread_rchar() -> u64 {
        let io = fs::read_to_string("/proc/thread-self/io").expect("Linux reports a thread's I/O");
        io.lines()
            .find_map(|l| l.strip_prefix("rchar: "))
            .and_then(|n| n.parse().ok())
            .expect("an rchar line")
    }

    #[test]
    fn tokens_are_read_without_reading_large_frames() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.chunk");
        let mut w = ChunkWriter::create(&path, &header()).unwrap();
        let record = |i: u16| TokenRecord {
            sender: std::net::IpAddr::from([127, 0, 0, 1]),
            token: Bytes::from(format!("token-{i}")),
            request: u128::from(i),
            parts: 1,
            part: None,
        };
        // Forty requests of 200 KB, each with its token frame, then small frames.
        let mut expected = Vec::new();
        for i in 0..48u16 {
            let size = if i < 40 { 200_000 } else { 100 };
            let mut tokens = Vec::new();
            record(i).encode(&mut tokens);
            w.append(&[Bytes::from(vec![i as u8; size])], &tokens)
                .unwrap();
            expected.push(record(i));
        }
        let len = w.valid_len();
        drop(w);
        let before = thread_rchar();
        assert_eq!(read_tokens(&path).unwrap(), expected);
        let read = thread_rchar() - before;
        // The header, a small read past each large frame, the small frames' window: 64 KiB
        // would be plenty; a buffer of 64 KiB filled after each large frame read 2.6 MB.
        assert!(
            read < 256 << 10,
            "read {read} of {len} bytes to find the tokens"
        );
        assert_eq!(read_tokens_to(&path, Some(len)).unwrap(), expected);
    }

    #[test]
    fn frames_round_trip_and_torn_tails_are_cut() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.chunk");
        let mut w = ChunkWriter::create(&path, &header()).unwrap();
        w.append(&[entry_bytes(100), entry_bytes(90)], &[]).unwrap();
        w.append(&[entry_bytes(120)], &[]).unwrap();
        w.sync().unwrap();
        let good_len = w.valid_len();
        drop(w);

        let s = scan(&path).unwrap();
        assert_eq!(s.header, header());
        assert_eq!(
            (s.stats.records, s.stats.data_len, s.torn_bytes),
            (3, good_len, 0)
        );
        assert_eq!((s.stats.first_time.secs, s.stats.last_time.secs), (90, 120));

        let mut all = Vec::new();
        for secs in [100, 90, 120] {
            all.extend_from_slice(&entry_bytes(secs));
        }
        assert_eq!(body(&path, good_len), all);
        assert_eq!(s.stats.body_bytes, all.len() as u64);

        // A torn frame: header and part of a payload.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[9, 0, 0, 0, 1, 2, 3, 4, 0x92]).unwrap();
        let s = scan(&path).unwrap();
        assert_eq!(
            (s.stats.records, s.stats.data_len, s.torn_bytes),
            (3, good_len, 9)
        );

        // A whole frame with a wrong checksum is not trusted either.
        truncate(&path, good_len).unwrap();
        let e = entry_bytes(1);
        let mut bad = (e.len() as u32).to_le_bytes().to_vec();
        bad.extend_from_slice(&0u32.to_le_bytes());
        bad.extend_from_slice(&e);
        OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(&bad)
            .unwrap();
        assert_eq!(scan(&path).unwrap().stats.data_len, good_len);
    }

    #[test]
    fn a_closed_file_is_synced_and_reopened_for_appending() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.chunk");
        let mut w = ChunkWriter::new(&path, &header());
        assert!(!path.exists() && !w.is_open() && !w.is_unsynced());
        // Nothing is created before the first open; syncing nothing is no error.
        w.sync().unwrap();
        w.close().unwrap();
        assert!(!path.exists());
        assert!(
            w.append(&[entry_bytes(1)], &[]).is_err(),
            "append needs an open file"
        );

        w.open().unwrap();
        w.append(&[entry_bytes(1)], &[]).unwrap();
        assert!(w.is_unsynced());
        w.close().unwrap();
        assert!(!w.is_open() && !w.is_unsynced(), "closing syncs first");
        w.open().unwrap();
        w.append(&[entry_bytes(2), entry_bytes(3)], &[]).unwrap();
        w.sync().unwrap();
        w.close().unwrap();

        let s = scan(&path).unwrap();
        assert_eq!(s.header, header());
        assert_eq!((s.stats.records, s.stats.data_len), (3, w.valid_len()));
        assert_eq!(s.torn_bytes, 0);
        let all = [entry_bytes(1), entry_bytes(2), entry_bytes(3)].concat();
        assert_eq!(body(&path, w.valid_len()), all);
    }

    #[test]
    fn a_released_file_keeps_its_writes_unsynced_until_the_seal_finishes_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.chunk");
        let mut w = ChunkWriter::new(&path, &header());
        w.open().unwrap();
        w.append(&[entry_bytes(1)], &[]).unwrap();
        w.release();
        assert!(!w.is_open() && w.is_unsynced(), "released without a sync");
        // A write of the same round reopens it, as for a closed file.
        w.open().unwrap();
        w.append(&[entry_bytes(2)], &[]).unwrap();
        w.release();
        w.finish().unwrap();
        assert!(!w.is_open() && !w.is_unsynced(), "finish synced it");
        let s = scan(&path).unwrap();
        assert_eq!((s.stats.records, s.stats.data_len), (2, w.valid_len()));
        assert_eq!(
            body(&path, w.valid_len()),
            [entry_bytes(1), entry_bytes(2)].concat()
        );
    }

    #[test]
    fn a_spare_file_is_written_from_its_start_and_cut_at_finish() {
        let dir = tempfile::tempdir().unwrap();
        let spares = Arc::new(Spares::new(1));
        let with_id = |c: char| ChunkHeader {
            chunk_id: c.to_string().repeat(32),
            ..header()
        };
        let old = ChunkPaths::new(dir.path(), &with_id('a').chunk_id);
        let mut w = ChunkWriter::create(&old.data, &with_id('a')).unwrap();
        for secs in 0..20 {
            w.append(&[entry_bytes(secs)], &[]).unwrap();
        }
        w.finish().unwrap();
        let old_len = w.valid_len();
        drop(w);
        spares.retire(&old).unwrap();
        assert!(!old.data.exists() && spares.len() == 1);

        let new = ChunkPaths::new(dir.path(), &with_id('b').chunk_id);
        let mut w = ChunkWriter::new(&new.data, &with_id('b')).reusing(spares.clone());
        w.open().unwrap();
        w.append(&[entry_bytes(100)], &[]).unwrap();
        // Reopened after a close, it goes on after its valid part, not at the file's end.
        w.close().unwrap();
        w.open().unwrap();
        w.append(&[entry_bytes(101)], &[]).unwrap();
        w.sync().unwrap();
        assert!(spares.is_empty());
        assert_eq!(fs::metadata(&new.data).unwrap().len(), old_len);
        let s = scan(&new.data).unwrap();
        assert!(s.header.reused);
        assert_eq!((s.stats.records, s.stats.data_len), (2, w.valid_len()));
        assert_eq!(s.torn_bytes, old_len - w.valid_len());

        w.finish().unwrap();
        assert_eq!(fs::metadata(&new.data).unwrap().len(), w.valid_len());
        let all = [entry_bytes(100), entry_bytes(101)].concat();
        assert_eq!(body(&new.data, w.valid_len()), all);
        assert_eq!(read_tokens(&new.data).unwrap(), Vec::new());

        // With no room for spares, retiring deletes.
        Spares::new(0).retire(&new).unwrap();
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn write_behind_starts_writeback_of_whole_pages_behind_the_writes() {
        let dir = tempfile::tempdir().unwrap();
        // 20,000 entries of about 220 bytes.
        let entries: Vec<Bytes> = (0..20_000)
            .map(|i| {
                let mut b = entry_bytes(i).to_vec();
                b.truncate(b.len() - 4);
                b.extend_from_slice(&[0x81, 0xa1, b'k', 0xd9, 200]);
                b.extend_from_slice(&[b'x'; 200]);
                Bytes::from(b)
            })
            .collect();
        let write = |w: &mut ChunkWriter, from: usize, to: usize| {
            for batch in entries[from..to].chunks(100) {
                w.append(batch, b"").unwrap();
            }
        };
        let plain_path = dir.path().join("plain.chunk");
        let mut plain = ChunkWriter::new(&plain_path, &header());
        plain.open().unwrap();
        write(&mut plain, 0, 20_000);
        assert_eq!(plain.written_back(), 0, "off unless asked for");

        let path = dir.path().join("behind.chunk");
        let mut w = ChunkWriter::new(&path, &header()).write_behind();
        w.open().unwrap();
        let mut starts = Vec::new();
        for (from, to) in [(0, 5_000), (5_000, 12_000), (12_000, 20_000)] {
            write(&mut w, from, to);
            starts.push(w.written_back());
            // A closed file is reopened where it was; writeback goes on from there.
            w.close().unwrap();
            w.open().unwrap();
        }
        let len = w.valid_len();
        assert!(len > 3 * WRITE_BEHIND_STEP, "{len} bytes written");
        assert!(starts.windows(2).all(|p| p[0] < p[1]), "{starts:?}");
        let last = *starts.last().unwrap();
        assert!(last % PAGE == 0 && last <= len && len - last < WRITE_BEHIND_STEP + PAGE);
        // Advice only: the file holds what was written, as without it.
        w.sync().unwrap();
        let s = scan(&path).unwrap();
        assert_eq!((s.stats.records, s.stats.data_len), (20_000, len));
        assert_eq!(
            std::fs::read(&path).unwrap(),
            std::fs::read(&plain_path).unwrap()
        );
    }

    #[test]
    fn damaged_headers_and_frames_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.chunk");
        fs::write(&path, b"CCHUNK01\x05").unwrap();
        assert!(matches!(scan(&path), Err(ReadError::BadHeader(_))));
        fs::write(&path, b"something else entirely").unwrap();
        assert!(matches!(scan(&path), Err(ReadError::BadMagic)));

        let mut w = ChunkWriter::create(&dir.path().join("d.chunk"), &header()).unwrap();
        w.append(&[entry_bytes(5)], &[]).unwrap();
        let len = w.valid_len();
        drop(w);
        let mut bytes = fs::read(dir.path().join("d.chunk")).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        fs::write(&path, &bytes).unwrap();
        let mut piece = Vec::new();
        assert!(matches!(
            frame_reader(&path, len).next_piece(&mut piece, 1 << 20),
            Err(ReadError::BadFrame { .. })
        ));
        assert!(matches!(
            frame_reader(&path, len).read_into(&mut [0; 1 << 10]),
            Err(ReadError::BadFrame { .. })
        ));
    }

    /// A frame that failed after part of it was written, and could not be cut off: the next
    /// frame goes where the failed one started, and the seal cuts what is left of it.
    #[test]
    fn a_failed_frame_that_cannot_be_cut_off_is_written_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.chunk");
        let mut w = ChunkWriter::create(&path, &header()).unwrap();
        w.append(&[entry_bytes(1)], &[]).unwrap();
        let mut failed = vec![fault::Op::Written, fault::Op::Truncate];
        fault::set(Some(Box::new(move |op, _, _| {
            let at = failed.iter().position(|f| *f == op)?;
            failed.remove(at);
            Some(io::Error::from(io::ErrorKind::StorageFull))
        })));
        let big: Vec<Bytes> = (2..40).map(entry_bytes).collect();
        assert!(w.append(&big, &[]).is_err());
        fault::set(None);
        if !w.is_open() {
            w.open().unwrap();
        }
        w.append(&[entry_bytes(3)], &[]).unwrap();
        let len = w.valid_len();
        w.finish().unwrap();
        drop(w);
        assert_eq!(body(&path, len), [entry_bytes(1), entry_bytes(3)].concat());
        assert_eq!(
            fs::metadata(&path).unwrap().len(),
            len,
            "the rest cut at the seal"
        );
        assert_eq!(scan(&path).unwrap().stats.records, 2);
    }

    /// A frame's CRC covers its payload, not its length word: a data frame whose word gains
    /// the token bit, or a token frame whose word loses it, still passes its CRC, and must be
    /// found all the same rather than leave events out of the body or put token bytes in it.
    #[test]
    fn a_frame_taken_for_the_other_kind_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.chunk");
        let mut w = ChunkWriter::create(&good, &header()).unwrap();
        let mut tokens = Vec::new();
        token_record().encode(&mut tokens);
        w.append(&[entry_bytes(5)], &tokens).unwrap();
        w.append(&[entry_bytes(6)], &[]).unwrap();
        let len = w.valid_len();
        drop(w);
        assert_eq!(body(&good, len), [entry_bytes(5), entry_bytes(6)].concat());

        let bytes = fs::read(&good).unwrap();
        let start = {
            let mut file = File::open(&good).unwrap();
            read_header(&mut file).unwrap().1.start as usize
        };
        let token_frame = start + FRAME_HEADER + entry_bytes(5).len();
        for (at, why) in [
            (start, "damaged token frame"),
            (token_frame, "frame does not start with an entry"),
        ] {
            let mut damaged = bytes.clone();
            damaged[at + 3] ^= 0x80;
            let path = dir.path().join("damaged.chunk");
            fs::write(&path, &damaged).unwrap();
            let mut piece = Vec::new();
            let mut r = frame_reader(&path, len);
            let found = loop {
                match r.next_piece(&mut piece, 1 << 20) {
                    Ok(true) => continue,
                    Ok(false) => panic!("read to the end without noticing"),
                    Err(e) => break e,
                }
            };
            assert!(
                matches!(found, ReadError::BadFrame { why: w, .. } if w == why),
                "{found:?}"
            );
        }
    }

    #[test]
    fn uploaded_state_with_its_pointer_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.state");
        let pointer = Pointer::from_json(br#"{"v":1,"chunk_id":"0193a1c2e4f87d3e9a5b6c7d8e9f0a1b","bucket":"logs","key":"k","tag":"t","timekey":1,"first_time":1763740801.123456789,"last_time":1763740859.5,"records":1,"bytes":1,"stored_bytes":1,"format":"msgpack","compression":"zstd","checksum":{"crc32c":"b5c3a1f2"},"producer":"p","created_at":"c"}"#).unwrap();
        let state = ChunkState::uploaded(
            header(),
            ChunkStats::default(),
            pointer.clone(),
            Some("e".into()),
        );
        write_state(&path, &state).unwrap();
        assert_eq!(read_state(&path).unwrap(), state);
        assert_eq!(
            read_state(&path).unwrap().into_pointer(),
            Some(pointer.clone())
        );

        // An inline pointer keeps its body, byte for byte, in the state file.
        let inline = pointer.into_inline(Bytes::from_static(b"\x00\n\xffbody"));
        let state = ChunkState::uploaded(header(), ChunkStats::default(), inline.clone(), None);
        write_state(&path, &state).unwrap();
        assert_eq!(read_state(&path).unwrap().into_pointer(), Some(inline));
    }

    #[test]
    fn state_files_are_replaced_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let paths = ChunkPaths::new(dir.path(), "abc");
        let state = ChunkState::Sealed {
            header: header(),
            stats: ChunkStats::default(),
        };
        write_state(&paths.state, &state).unwrap();
        assert_eq!(read_state(&paths.state).unwrap(), state);
        assert!(!paths.state.with_extension("state.tmp").exists());
        paths.remove().unwrap();
        assert!(!paths.state.exists());
    }
}
