//! Start-up recovery: turn whatever a previous run left in the buffer into work.
//!
//! | found                              | done                                              |
//! |------------------------------------|---------------------------------------------------|
//! | data + `uploaded` state            | publish the pointer again                         |
//! | data + `sealed` state              | upload again (same key, same bytes)               |
//! | data, no state (or unreadable one) | scan, cut a torn tail, seal, upload               |
//! | data that cannot be read at all    | move to `quarantine/`, log at ERROR               |
//! | state or object with no data       | remove (the chunk was published and deleted)      |
//! | `*.tmp`                            | remove (an interrupted atomic write)              |

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use tracing::{error, info, warn};

use super::chunk::{self, ChunkPaths, ChunkState, DATA_EXT, OBJECT_EXT, STATE_EXT};
use super::{SealedChunk, UploadedChunk};

/// Chunks a previous run left, oldest first.
#[derive(Debug, Default)]
pub struct Recovered {
    pub sealed: Vec<SealedChunk>,
    pub uploaded: Vec<UploadedChunk>,
    /// Files moved to the quarantine folder.
    pub quarantined: Vec<PathBuf>,
}

#[derive(Default)]
struct Found {
    data: bool,
    state: bool,
    object: bool,
}

pub(super) fn recover(dir: &Path) -> io::Result<Recovered> {
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
        let found = match ext {
            DATA_EXT | STATE_EXT | OBJECT_EXT => ids.entry(id.to_string()).or_default(),
            _ => {
                warn!(path = %path.display(), "unknown file in the buffer directory; left alone");
                continue;
            }
        };
        match ext {
            DATA_EXT => found.data = true,
            STATE_EXT => found.state = true,
            _ => found.object = true,
        }
    }
    let mut out = Recovered::default();
    for (id, found) in ids {
        let paths = ChunkPaths::new(dir, &id);
        if !found.data {
            // Published and deleted, but the crash came before the rest was removed.
            paths.remove()?;
            continue;
        }
        let state = if found.state {
            match chunk::read_state(&paths.state) {
                Ok(state) => Some(state),
                Err(e) => {
                    warn!(chunk_id = %id, cause = %e, "chunk state file is unreadable; rebuilding it from the data file");
                    None
                }
            }
        } else {
            None
        };
        match state {
            Some(ChunkState::Uploaded {
                header, pointer, ..
            }) => {
                out.uploaded.push(UploadedChunk {
                    header,
                    paths,
                    pointer: *pointer,
                });
            }
            Some(ChunkState::Sealed { header, stats }) => {
                let len = fs::metadata(&paths.data)?.len();
                if len < stats.data_len {
                    error!(chunk_id = %id, expected = stats.data_len, found = len, "sealed chunk is shorter than recorded");
                    out.quarantined.push(quarantine(dir, &paths)?);
                    continue;
                }
                if found.object {
                    fs::remove_file(&paths.object)?;
                }
                out.sealed.push(SealedChunk {
                    header,
                    stats,
                    paths,
                });
            }
            None => match chunk::scan(&paths.data) {
                Ok(scan) => {
                    if scan.torn_bytes > 0 {
                        warn!(chunk_id = %id, bytes = scan.torn_bytes, "cutting a torn tail (never acknowledged)");
                        chunk::truncate(&paths.data, scan.stats.data_len)?;
                    }
                    if scan.stats.records == 0 {
                        paths.remove()?;
                        continue;
                    }
                    if found.object {
                        fs::remove_file(&paths.object)?;
                    }
                    let state = ChunkState::Sealed {
                        header: scan.header.clone(),
                        stats: scan.stats,
                    };
                    chunk::write_state(&paths.state, &state)?;
                    info!(chunk_id = %id, tag = %scan.header.tag, events = scan.stats.records, "recovered open chunk and sealed it");
                    out.sealed.push(SealedChunk {
                        header: scan.header,
                        stats: scan.stats,
                        paths,
                    });
                }
                Err(e) => {
                    error!(chunk_id = %id, cause = %e, "chunk data file is unreadable; moving it to quarantine");
                    out.quarantined.push(quarantine(dir, &paths)?);
                }
            },
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

/// Moves a chunk's files into `<buffer_dir>/quarantine/`, never deleting them.
fn quarantine(dir: &Path, paths: &ChunkPaths) -> io::Result<PathBuf> {
    let target = dir.parent().unwrap_or(dir).join("quarantine");
    fs::create_dir_all(&target)?;
    for path in [&paths.data, &paths.state, &paths.object] {
        if path.exists() {
            fs::rename(
                path,
                target.join(path.file_name().expect("chunk files have names")),
            )?;
        }
    }
    chunk::sync_dir(dir)?;
    Ok(target.join(paths.data.file_name().expect("chunk files have names")))
}
