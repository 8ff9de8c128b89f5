//! Start-up recovery: turn whatever a previous run left in the buffer into work.
//!
//! | found in `chunks/`                   | done                                                 |
//! |--------------------------------------|------------------------------------------------------|
//! | data + `uploaded` state              | publish the pointer again                            |
//! | data + `sealed` state                | upload again (same key, same bytes)                  |
//! | data, no state                       | scan, cut a torn tail (kept in `quarantine/`), fsync, seal; if that fails (a full disk), left as it is and tried again every few seconds ([`rescan`]) |
//! | data, no state, another chunk's header | moved to `quarantine/` (WARN): a reused file whose new header a power loss lost; nothing in it was acknowledged |
//! | data, no state, in a reused file     | as above, but the tail is cut without a copy: it may be the old chunk's leftover |
//! | `<id>.free`                          | kept as a spare to reuse (deleted beyond [`chunk::MAX_SPARES`]) |
//! | data + unreadable state              | state kept in `quarantine/` (ERROR), then as above   |
//! | data that cannot be read at all      | moved to `quarantine/` (ERROR); after a read error (not bytes found wrong), left as it is and tried again every few seconds |
//! | sealed data shorter than its state   | state moved to `quarantine/` (ERROR), then as data with no state |
//! | state with no data                   | removed (the chunk was published and deleted)        |
//! | `*.tmp`                              | removed (an interrupted atomic write)                |
//! | anything else                        | moved to `quarantine/` (ERROR)                       |
//!
//! Every whole frame of a data file was acknowledged or could have been, so recovery keeps all
//! of them; what it cannot read it keeps aside, never deletes.
//!
//! The token records of every chunk kept (from the scan of an open chunk, from the token frames
//! of a sealed or uploaded one) go back in [`Recovered::tokens`], from which, with the token
//! journal, the buffer rebuilds the resend window ([`super::tokens`]).

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use tracing::{error, info, warn};

use super::chunk::{self, ChunkPaths, ChunkState, DATA_EXT, SPARE_EXT, STATE_EXT};
use super::dead_letter::quarantine;
use super::registry::{ChunkInfo, Phase, Registry};
use super::token_record::TokenRecord;
use super::{SealedChunk, UploadedChunk};

/// Chunks found in the buffer, oldest first.
#[derive(Debug, Default)]
pub struct Recovered {
    pub sealed: Vec<SealedChunk>,
    pub uploaded: Vec<UploadedChunk>,
    /// Files moved to the quarantine folder.
    pub quarantined: Vec<PathBuf>,
    /// The token records of the chunks recovered, to rebuild the resend window.
    pub tokens: Vec<TokenRecord>,
}

impl Recovered {
    fn add(&mut self, registry: &Registry, state: ChunkState, paths: ChunkPaths) -> io::Result<()> {
        let bytes =
            fs::metadata(&paths.data)?.len() + fs::metadata(&paths.state).map_or(0, |m| m.len());
        let (header, records, phase) = match &state {
            ChunkState::Sealed { header, stats } => (header, stats.records, Phase::Sealed),
            ChunkState::Uploaded {
                header, pointer, ..
            } => (header, pointer.records, Phase::Uploaded),
        };
        registry.insert(ChunkInfo {
            chunk_id: header.chunk_id.clone(),
            tag: header.tag.clone(),
            timekey: header.timekey,
            phase,
            created_ms: header.created_ms,
            records,
            bytes,
            attempts: 0,
            last_error: None,
            next_retry_ms: None,
        });
        match state {
            ChunkState::Sealed { header, stats } => self.sealed.push(SealedChunk {
                header,
                stats,
                paths,
            }),
            // An inline body stays on disk until the publisher needs it (a buffer can hold
            // many thousands of them).
            ChunkState::Uploaded {
                header, pointer, ..
            } => self.uploaded.push(UploadedChunk {
                header,
                paths,
                pointer: *pointer,
            }),
        }
        Ok(())
    }
}

impl Recovered {
    /// Adds the token records of a sealed chunk. Damaged token frames cost only the window of
    /// their requests (a resend is stored again), never the chunk: they are not body.
    fn read_tokens(&mut self, paths: &ChunkPaths, data_len: u64) {
        match chunk::read_tokens_to(&paths.data, Some(data_len)) {
            Ok(records) => self.tokens.extend(records),
            Err(e) => {
                warn!(path = %paths.data.display(), cause = %e, "cannot read the tokens of a chunk; a resend of its requests will be stored again")
            }
        }
    }
}

#[derive(Default)]
struct Found {
    data: bool,
    state: bool,
}

/// Files of `dir` by chunk id; removes `*.tmp` and quarantines files that are no chunk's.
fn list(
    dir: &Path,
    out: &mut Recovered,
    registry: &Registry,
) -> io::Result<BTreeMap<String, Found>> {
    let buffer_dir = dir.parent().unwrap_or(dir);
    let mut ids: BTreeMap<String, Found> = BTreeMap::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        if name.ends_with(".tmp") {
            fs::remove_file(&path)?;
            continue;
        }
        let (id, ext) = name.rsplit_once('.').unwrap_or((&name, ""));
        let is_id = id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit());
        match ext {
            DATA_EXT if is_id => ids.entry(id.to_string()).or_default().data = true,
            STATE_EXT if is_id => ids.entry(id.to_string()).or_default().state = true,
            SPARE_EXT if is_id => registry.spares().found(path),
            _ => {
                error!(path = %path.display(), "unknown file in the buffer; moving it to quarantine");
                out.quarantined
                    .push(quarantine(buffer_dir, &[&path], registry)?);
            }
        }
    }
    Ok(ids)
}

pub(super) fn recover(dir: &Path, registry: &Registry) -> io::Result<Recovered> {
    let buffer_dir = dir.parent().unwrap_or(dir).to_path_buf();
    let mut out = Recovered::default();
    for (id, found) in list(dir, &mut out, registry)? {
        let paths = ChunkPaths::new(dir, &id);
        if !found.data {
            // Published and deleted, but the crash came before the state file went too.
            paths.remove()?;
            continue;
        }
        let state = if found.state {
            match chunk::read_state(&paths.state) {
                Ok(state) => Some(state),
                Err(e) => {
                    error!(chunk_id = %id, cause = %e, "chunk state file is unreadable; keeping it in quarantine and rebuilding it from the data file");
                    out.quarantined
                        .push(quarantine(&buffer_dir, &[&paths.state], registry)?);
                    None
                }
            }
        } else {
            None
        };
        let state = match state {
            // Its end lost (a power loss after a failed fsync, or a seal written before its
            // data was synced): its whole frames are recovered as an open chunk's are, the old
            // state kept aside.
            Some(ChunkState::Sealed { stats, .. })
                if fs::metadata(&paths.data)?.len() < stats.data_len =>
            {
                error!(chunk_id = %id, expected = stats.data_len, found = fs::metadata(&paths.data)?.len(),
                       "sealed chunk is shorter than recorded; recovering its whole frames and keeping its state file in quarantine");
                out.quarantined
                    .push(quarantine(&buffer_dir, &[&paths.state], registry)?);
                None
            }
            state => state,
        };
        match state {
            Some(ChunkState::Sealed { header, stats }) => {
                out.read_tokens(&paths, stats.data_len);
                out.add(registry, ChunkState::Sealed { header, stats }, paths)?;
            }
            Some(uploaded @ ChunkState::Uploaded { .. }) => {
                if let ChunkState::Uploaded { stats, .. } = &uploaded {
                    out.read_tokens(&paths, stats.data_len);
                }
                out.add(registry, uploaded, paths)?
            }
            None => recover_open(&buffer_dir, &id, paths, registry, &mut out, Attempt::Start)?,
        }
    }
    if !out.sealed.is_empty() || !out.uploaded.is_empty() {
        info!(
            sealed = out.sealed.len(),
            uploaded = out.uploaded.len(),
            "recovered chunks from the buffer"
        );
    }
    Ok(out)
}

/// Whether an open chunk is recovered at start or tried again later.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Attempt {
    Start,
    Again,
}

/// Recovers an open chunk (data, no state): scanned, sealed and added to `out`; removed if it
/// holds nothing; moved to `quarantine/` if its bytes are wrong. One that cannot be sealed (a
/// full disk: its tail's copy or its state file has no room) or read (an I/O error) is left
/// as it is, noted in the registry, and tried again by [`rescan`]: its events were
/// acknowledged.
fn recover_open(
    buffer_dir: &Path,
    id: &str,
    paths: ChunkPaths,
    registry: &Registry,
    out: &mut Recovered,
    attempt: Attempt,
) -> io::Result<()> {
    let again = attempt == Attempt::Again;
    match chunk::scan(&paths.data) {
        Ok(scan) if scan.header.chunk_id != id => {
            // A spare renamed for a new chunk with the old chunk's header still: a power loss
            // kept the rename and lost the header written before it. The new header is synced
            // with the first frame, before any ack, so nothing in it was acknowledged; the old
            // chunk was delivered before it became a spare.
            warn!(chunk_id = %id, holds = %scan.header.chunk_id,
                  "chunk data file holds another chunk's header (a reused file whose new header was lost); moving it to quarantine");
            out.quarantined.push(quarantine(
                buffer_dir,
                &[&paths.data, &paths.state],
                registry,
            )?);
        }
        Ok(scan) => {
            if scan.stats.records == 0 && scan.torn_bytes == 0 {
                return paths.remove();
            }
            // The others are recovered and delivered meanwhile, which frees space.
            if let Err(e) = seal_recovered(buffer_dir, id, &paths, &scan, registry) {
                if again {
                    warn!(chunk_id = %id, cause = %e, "still cannot seal a recovered open chunk; trying again later");
                } else {
                    error!(chunk_id = %id, cause = %e, "cannot seal a recovered open chunk; it stays in the buffer as it is and is tried again every few seconds");
                }
                registry.leave(id);
                return Ok(());
            }
            if scan.stats.records == 0 {
                return paths.remove();
            }
            out.tokens.extend(scan.tokens);
            info!(chunk_id = %id, tag = %scan.header.tag, events = scan.stats.records, "recovered open chunk and sealed it");
            out.add(
                registry,
                ChunkState::Sealed {
                    header: scan.header,
                    stats: scan.stats,
                },
                paths,
            )?;
        }
        // A read that failed, not bytes found wrong: the file may read well next time, and
        // quarantine would take its acknowledged events out of delivery for good.
        Err(chunk::ReadError::Io(e)) if e.kind() != io::ErrorKind::UnexpectedEof => {
            if again {
                warn!(chunk_id = %id, cause = %e, "still cannot read a chunk data file; trying again later");
            } else {
                error!(chunk_id = %id, cause = %e, "cannot read a chunk data file; it stays in the buffer as it is and is tried again every few seconds");
            }
            registry.leave(id);
        }
        Err(e) => {
            error!(chunk_id = %id, cause = %e, "chunk data file is unreadable; moving it to quarantine");
            out.quarantined.push(quarantine(
                buffer_dir,
                &[&paths.data, &paths.state],
                registry,
            )?);
        }
    }
    Ok(())
}

/// Sealed or uploaded chunks in `dir` that `registry` does not know, for example chunks that
/// `claimcheck replay` moved back while the sidecar runs; and the open chunks that start-up
/// recovery left for later ([`Registry::leave`]), tried again. Other files with no state file
/// are never picked up here: they are the writer's open chunks.
pub fn rescan(dir: &Path, registry: &Registry) -> Recovered {
    let mut out = Recovered::default();
    let buffer_dir = dir.parent().unwrap_or(dir);
    for id in registry.left_ids() {
        let paths = ChunkPaths::new(dir, &id);
        match (paths.state.try_exists(), paths.data.try_exists()) {
            // Sealed since (picked up below), or gone.
            (Ok(true), _) | (_, Ok(false)) => {
                registry.forget_left(&id);
                continue;
            }
            (_, Err(e)) | (Err(e), _) => {
                warn!(chunk_id = %id, cause = %e, "cannot look at an open chunk left at start yet; trying again later");
                continue;
            }
            (Ok(false), Ok(true)) => {}
        }
        // Noted again if it still cannot be recovered.
        registry.forget_left(&id);
        if let Err(e) = recover_open(buffer_dir, &id, paths, registry, &mut out, Attempt::Again) {
            warn!(chunk_id = %id, cause = %e, "cannot recover an open chunk yet; trying again later");
            registry.leave(&id);
        }
    }
    // What was recovered above is returned whatever fails below: it is in the registry now,
    // and would be skipped by every later rescan.
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => {
            warn!(dir = %dir.display(), cause = %e, "cannot list the buffer to pick up chunks put back in it");
            return out;
        }
    };
    for entry in entries {
        let name = match entry {
            Ok(entry) => entry.file_name().to_string_lossy().into_owned(),
            Err(e) => {
                warn!(dir = %dir.display(), cause = %e, "cannot list the buffer to pick up chunks put back in it");
                break;
            }
        };
        let Some(id) = name.strip_suffix(&format!(".{STATE_EXT}")) else {
            continue;
        };
        let paths = ChunkPaths::new(dir, id);
        if registry.contains(id) || !paths.data.exists() {
            continue;
        }
        match chunk::read_state(&paths.state) {
            Ok(state) => {
                info!(chunk_id = %id, "picked up a chunk put back in the buffer");
                if let Err(e) = out.add(registry, state, paths) {
                    warn!(chunk_id = %id, cause = %e, "cannot pick up a chunk put back in the buffer yet");
                }
            }
            Err(e) => {
                warn!(chunk_id = %id, cause = %e, "cannot read the state of a chunk put back in the buffer")
            }
        }
    }
    out
}

/// Seals an open chunk found at start: its torn tail cut (and kept in `quarantine/`, unless
/// the file was reused), its data fsynced, then its `sealed` state written. The fsync comes
/// first, as in the writer's seal: a process killed after a write and before its fsync leaves
/// that write in the page cache only, and a state recording its length, made durable
/// before it, would make the whole chunk look short after a power loss that followed.
fn seal_recovered(
    buffer_dir: &Path,
    id: &str,
    paths: &ChunkPaths,
    scan: &chunk::Scan,
    registry: &Registry,
) -> io::Result<()> {
    if scan.torn_bytes > 0 {
        if scan.header.reused {
            // The old chunk's leftover (delivered already) and maybe a torn frame (never
            // acknowledged under sync always): nothing to keep.
            info!(chunk_id = %id, bytes = scan.torn_bytes,
                  "cut a reused chunk file back to its last whole frame");
        } else {
            let kept = keep_tail(buffer_dir, &paths.data, scan.stats.data_len)?;
            registry.count_quarantined(1);
            warn!(chunk_id = %id, bytes = scan.torn_bytes, kept = %kept.display(),
                  "cut a torn tail off an open chunk (never acknowledged under sync always)");
        }
        chunk::truncate(&paths.data, scan.stats.data_len)?;
    } else {
        fs::OpenOptions::new()
            .write(true)
            .open(&paths.data)?
            .sync_data()?;
    }
    if scan.stats.records == 0 {
        return Ok(());
    }
    let state = ChunkState::Sealed {
        header: scan.header.clone(),
        stats: scan.stats,
    };
    chunk::write_state(&paths.state, &state)
}

/// Copies the bytes of `data` from `from` to its end into `quarantine/<name>.tail-<from>`.
fn keep_tail(buffer_dir: &Path, data: &Path, from: u64) -> io::Result<PathBuf> {
    let dir = super::dead_letter::quarantine_dir(buffer_dir);
    chunk::create_dir_durably(&dir)?;
    let name = format!(
        "{}.tail-{from}",
        data.file_name()
            .expect("chunk files have names")
            .to_string_lossy()
    );
    let target = dir.join(name);
    let mut src = fs::File::open(data)?;
    src.seek(SeekFrom::Start(from))?;
    let mut tail = Vec::new();
    src.read_to_end(&mut tail)?;
    let f = fs::File::create(&target)?;
    io::Write::write_all(&mut &f, &tail)?;
    f.sync_all()?;
    chunk::sync_dir(&dir)?;
    Ok(target)
}
