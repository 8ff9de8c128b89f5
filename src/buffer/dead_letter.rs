//! Where chunks go when they cannot be delivered or read: `dead/` for chunks whose delivery
//! exhausted the retry budget (whole and valid, waiting for `claimcheck replay`), and
//! `quarantine/` for files recovery could not read and bytes it had to cut off. Nothing in
//! either folder is ever deleted by claimcheck.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::chunk::{self, ChunkPaths, DATA_EXT, STATE_EXT};
use super::registry::Registry;

pub fn dead_dir(buffer_dir: &Path) -> PathBuf {
    buffer_dir.join("dead")
}

pub fn quarantine_dir(buffer_dir: &Path) -> PathBuf {
    buffer_dir.join("quarantine")
}

/// Moves a chunk's data and state files into `dead/`. Its state (sealed or uploaded) goes
/// with it, so a replay resumes exactly where delivery stopped.
pub fn move_to_dead(buffer_dir: &Path, paths: &ChunkPaths) -> io::Result<()> {
    let dead = dead_dir(buffer_dir);
    chunk::create_dir_durably(&dead)?;
    // The state file first. Stopped between the two (a crash), the buffer keeps the data file
    // alone, which the next start recovers as an open chunk and delivers; the other way round
    // it would keep a state file alone, taken for a published chunk's and deleted, and the
    // data would wait in `dead/` without its state, for a replay that a running sidecar does
    // not pick up. A file gone already was moved by an earlier try that failed after it.
    for path in [&paths.state, &paths.data] {
        #[cfg(test)]
        chunk::fault::check(chunk::fault::Op::Rename, path, None)?;
        match fs::rename(
            path,
            dead.join(path.file_name().expect("chunk files have names")),
        ) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            result => result?,
        }
    }
    chunk::sync_dir(&dead)?;
    chunk::sync_dir(
        paths
            .data
            .parent()
            .expect("chunk files live in a directory"),
    )
}

/// Moves files into `quarantine/`, keeping their names (with `.1`, `.2`, … appended to a name
/// already there: a chunk's state file can be set aside twice), and counts them in
/// `registry`; returns where the first one went.
pub fn quarantine(buffer_dir: &Path, files: &[&Path], registry: &Registry) -> io::Result<PathBuf> {
    let target = quarantine_dir(buffer_dir);
    chunk::create_dir_durably(&target)?;
    let mut first = None;
    let mut sources = Vec::new();
    for path in files.iter().filter(|p| p.exists()) {
        let to = free_name(&target, path.file_name().expect("files have names"))?;
        fs::rename(path, &to)?;
        registry.count_quarantined(1);
        first.get_or_insert(to);
        sources.extend(path.parent().map(Path::to_path_buf));
    }
    // The new entries first, then the old ones' removal (as `move_to_dead` does): a power
    // loss in between leaves a file in both places, never in neither.
    chunk::sync_dir(&target)?;
    sources.dedup();
    for dir in sources {
        chunk::sync_dir(&dir)?;
    }
    Ok(first.unwrap_or(target))
}

/// `dir/name`, or the first of `dir/name.1`, `dir/name.2`, … that does not exist.
fn free_name(dir: &Path, name: &std::ffi::OsStr) -> io::Result<PathBuf> {
    let mut to = dir.join(name);
    let mut n = 0u32;
    while to.try_exists()? {
        n += 1;
        let mut numbered = name.to_os_string();
        numbered.push(format!(".{n}"));
        to = dir.join(numbered);
    }
    Ok(to)
}

/// An error unless `buffer_dir` is a sidecar's buffer directory (it has `chunks/`): a wrong
/// `--buffer-dir` would otherwise list nothing and replay nothing, as an empty `dead/` does.
fn check_buffer_dir(buffer_dir: &Path) -> io::Result<()> {
    if super::chunks_dir(buffer_dir).is_dir() {
        return Ok(());
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!(
            "{} is not a claimcheck buffer directory (it has no chunks/): give the sidecar's --buffer-dir",
            buffer_dir.display()
        ),
    ))
}

/// Chunk ids in `dead/`, oldest first. An error if `buffer_dir` is not a buffer directory.
pub fn list_dead(buffer_dir: &Path) -> io::Result<Vec<String>> {
    check_buffer_dir(buffer_dir)?;
    let dead = dead_dir(buffer_dir);
    if !dead.exists() {
        return Ok(Vec::new());
    }
    let mut ids: Vec<String> = fs::read_dir(&dead)?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_suffix(&format!(".{DATA_EXT}"))
                .map(str::to_string)
        })
        .collect();
    ids.sort();
    Ok(ids)
}

/// Moves dead-lettered chunks (all, or those in `ids`) back to `chunks/`, where a running
/// sidecar picks them up within seconds and a starting one recovers them. Returns the ids
/// moved. Safe while a sidecar runs: each move is a rename, data file first. A replay stopped
/// between the two renames left a state file in `dead/` whose data is in `chunks/` (which
/// a running sidecar does not pick up): the next replay finishes that move first.
pub fn replay(buffer_dir: &Path, ids: &[String]) -> io::Result<Vec<String>> {
    let dead = dead_dir(buffer_dir);
    let chunks = super::chunks_dir(buffer_dir);
    let available = list_dead(buffer_dir)?;
    let mut finished = false;
    if dead.exists() {
        for entry in fs::read_dir(&dead)? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            let Some(id) = name.strip_suffix(&format!(".{STATE_EXT}")) else {
                continue;
            };
            let data = format!("{id}.{DATA_EXT}");
            if !dead.join(&data).exists() && chunks.join(&data).exists() {
                fs::rename(dead.join(&name), chunks.join(&name))?;
                finished = true;
            }
        }
    }
    if finished {
        chunk::sync_dir(&chunks)?;
        chunk::sync_dir(&dead)?;
    }
    let wanted: Vec<String> = if ids.is_empty() {
        available
    } else {
        for id in ids {
            if !available.contains(id) {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("no dead-lettered chunk {id}"),
                ));
            }
        }
        ids.to_vec()
    };
    for id in &wanted {
        for ext in [DATA_EXT, STATE_EXT] {
            let name = format!("{id}.{ext}");
            if dead.join(&name).exists() {
                fs::rename(dead.join(&name), chunks.join(&name))?;
            }
        }
    }
    if !wanted.is_empty() {
        chunk::sync_dir(&chunks)?;
        chunk::sync_dir(&dead)?;
    }
    Ok(wanted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_set_aside_twice_keeps_both_files() {
        let dir = tempfile::tempdir().unwrap();
        let registry = Registry::new();
        let chunks = dir.path().join("chunks");
        fs::create_dir_all(&chunks).unwrap();
        let state = chunks.join("x.state");
        for content in ["first", "second", "third"] {
            fs::write(&state, content).unwrap();
            quarantine(dir.path(), &[&state], &registry).unwrap();
        }
        let q = quarantine_dir(dir.path());
        let kept: Vec<String> = ["x.state", "x.state.1", "x.state.2"]
            .iter()
            .map(|name| fs::read_to_string(q.join(name)).unwrap())
            .collect();
        assert_eq!(kept, ["first", "second", "third"]);
        assert_eq!(registry.quarantined(), 3);
    }

    /// A directory that is not a buffer (a wrong `--buffer-dir`) is an error, not "nothing
    /// dead-lettered", and nothing is created in it.
    #[test]
    fn listing_or_replaying_a_directory_that_is_not_a_buffer_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = list_dead(dir.path()).unwrap_err();
        assert!(err.to_string().contains("--buffer-dir"), "{err}");
        assert!(replay(dir.path(), &[]).is_err());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    /// A replay stopped between its two renames left the data file in `chunks/` and the state
    /// file in `dead/`: the next replay moves the state file too.
    #[test]
    fn a_replay_stopped_half_way_is_finished_by_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let (chunks, dead) = (super::super::chunks_dir(dir.path()), dead_dir(dir.path()));
        fs::create_dir_all(&chunks).unwrap();
        fs::create_dir_all(&dead).unwrap();
        fs::write(chunks.join("a.chunk"), "data").unwrap();
        fs::write(dead.join("a.state"), "state").unwrap();
        fs::write(dead.join("b.chunk"), "data").unwrap();
        fs::write(dead.join("b.state"), "state").unwrap();
        assert_eq!(replay(dir.path(), &[]).unwrap(), ["b"]);
        for name in ["a.chunk", "a.state", "b.chunk", "b.state"] {
            assert!(chunks.join(name).exists(), "{name}");
        }
        assert_eq!(fs::read_dir(&dead).unwrap().count(), 0);
    }

    /// A move to `dead/` stopped between its two renames (as by a crash) leaves the data file
    /// in the buffer, which the next start recovers and delivers.
    #[test]
    fn a_move_to_dead_stopped_half_way_leaves_a_chunk_the_next_start_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let chunks = super::super::chunks_dir(dir.path());
        fs::create_dir_all(&chunks).unwrap();
        let header = chunk::ChunkHeader {
            chunk_id: "0193a1c2e4f87d3e9a5b6c7d8e9f0a1b".into(),
            tag: "app".into(),
            timekey: 60,
            created_ms: 1,
            reused: false,
        };
        let paths = ChunkPaths::new(&chunks, &header.chunk_id);
        let mut w = chunk::ChunkWriter::create(&paths.data, &header).unwrap();
        w.append(&[super::super::tests::entry_at(61, 1)], &[])
            .unwrap();
        w.finish().unwrap();
        let stats = chunk::scan(&paths.data).unwrap().stats;
        chunk::write_state(
            &paths.state,
            &chunk::ChunkState::Sealed {
                header: header.clone(),
                stats,
            },
        )
        .unwrap();

        let mut renames = 0;
        chunk::fault::set(Some(Box::new(move |op, _, _| {
            renames += u32::from(op == chunk::fault::Op::Rename);
            (renames == 2).then(|| io::Error::other("the process dies here"))
        })));
        let moved = move_to_dead(dir.path(), &paths);
        chunk::fault::set(None);
        assert!(moved.is_err());
        assert!(paths.data.exists() && !paths.state.exists());

        let registry = Registry::new();
        let recovered = super::super::recovery::recover(&chunks, &registry).unwrap();
        let ids: Vec<&str> = recovered
            .sealed
            .iter()
            .map(|c| c.header.chunk_id.as_str())
            .collect();
        assert_eq!(ids, [header.chunk_id.as_str()]);
        assert_eq!(recovered.sealed[0].stats.records, 1);
    }
}
