//! A file system that loses power: FUSE, in memory, keeping two versions of everything. What
//! programs read and write is the current version. `fsync` of a file makes its current data
//! durable; `fsync` of a directory makes its current entries (created, renamed, removed files)
//! durable. [`PowerFs::cut_power`], while unmounted, throws away everything that was not made
//! durable, as a power cut does to a disk's write cache: unsynced appends, files whose
//! directory was not synced after their creation, renames that were not synced.
//!
//! The model is stricter than most real file systems (ext4 often keeps a rename or an
//! unsynced write anyway), which is what a test wants: a program that survives it syncs
//! everything it relies on.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner,
    MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, WriteFlags,
};

/// No caching in the kernel: every lookup and attribute comes from here.
const TTL: Duration = Duration::ZERO;

#[derive(Debug, Clone, Default)]
struct Node {
    dir: bool,
    mode: u32,
    data: Vec<u8>,
    durable_data: Vec<u8>,
    entries: BTreeMap<OsString, u64>,
    durable_entries: BTreeMap<OsString, u64>,
}

#[derive(Debug)]
struct State {
    nodes: HashMap<u64, Node>,
    next: u64,
    /// Bytes of file data written and synced, for the test's figures.
    written: u64,
    synced: u64,
}

/// The file system's contents, kept across mounts.
#[derive(Debug, Clone)]
pub struct PowerFs {
    state: Arc<Mutex<State>>,
}

impl Default for PowerFs {
    fn default() -> Self {
        let root = Node {
            dir: true,
            mode: 0o755,
            ..Node::default()
        };
        PowerFs {
            state: Arc::new(Mutex::new(State {
                nodes: HashMap::from([(INodeNo::ROOT.0, root)]),
                next: INodeNo::ROOT.0 + 1,
                written: 0,
                synced: 0,
            })),
        }
    }
}

impl PowerFs {
    /// Mounts the file system at `at` until the returned session is dropped (or
    /// [`fuser::BackgroundSession::umount_and_join`]).
    pub fn mount(&self, at: &Path) -> std::io::Result<fuser::BackgroundSession> {
        let mut config = fuser::Config::default();
        config.mount_options = vec![MountOption::FSName("powerfs".into())];
        fuser::spawn_mount(self.clone(), at, &config)
    }

    /// Unmounts the file system mounted at `at` by `session`. The kernel may still be sending
    /// the releases of a process just killed, and the mount is busy until they are done: the
    /// unmount is tried again for a few seconds before its error is returned.
    pub fn unmount(session: fuser::BackgroundSession, at: &Path) -> std::io::Result<()> {
        for _ in 0..50 {
            let done = std::process::Command::new("umount")
                .arg(at)
                .stderr(std::process::Stdio::null())
                .status()?
                .success();
            if done {
                // The session's thread ends with the mount.
                return session.join();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        session.umount_and_join()
    }

    /// Throws away what was not synced: every directory's entries and every file's data go
    /// back to their durable versions; what is no longer reachable is gone.
    pub fn cut_power(&self) {
        let mut state = self.state.lock().unwrap();
        let mut reachable = vec![INodeNo::ROOT.0];
        let mut kept: HashMap<u64, Node> = HashMap::new();
        while let Some(ino) = reachable.pop() {
            if kept.contains_key(&ino) {
                continue;
            }
            let Some(mut node) = state.nodes.get(&ino).cloned() else {
                continue;
            };
            node.data = node.durable_data.clone();
            node.entries = node.durable_entries.clone();
            reachable.extend(node.entries.values());
            kept.insert(ino, node);
        }
        state.nodes = kept;
    }

    /// Bytes of file data written, and made durable by fsync, so far.
    pub fn bytes_written_and_synced(&self) -> (u64, u64) {
        let state = self.state.lock().unwrap();
        (state.written, state.synced)
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> Result<T, Errno>) -> Result<T, Errno> {
        f(&mut self.state.lock().unwrap())
    }
}

fn attr(ino: u64, node: &Node) -> FileAttr {
    let now = SystemTime::now();
    FileAttr {
        ino: INodeNo(ino),
        size: node.data.len() as u64,
        blocks: (node.data.len() as u64).div_ceil(512),
        atime: now,
        mtime: now,
        ctime: now,
        crtime: now,
        kind: if node.dir {
            FileType::Directory
        } else {
            FileType::RegularFile
        },
        perm: (node.mode & 0o7777) as u16,
        nlink: 1,
        uid: owner(),
        gid: 0,
        rdev: 0,
        flags: 0,
        blksize: 4096,
    }
}

/// The test runs as one user; files belong to it.
fn owner() -> u32 {
    std::fs::metadata("/proc/self").map_or(0, |m| std::os::unix::fs::MetadataExt::uid(&m))
}

impl State {
    fn node(&mut self, ino: INodeNo) -> Result<&mut Node, Errno> {
        self.nodes.get_mut(&ino.0).ok_or(Errno::ENOENT)
    }

    fn child(&mut self, parent: INodeNo, name: &OsStr) -> Result<u64, Errno> {
        self.node(parent)?
            .entries
            .get(name)
            .copied()
            .ok_or(Errno::ENOENT)
    }

    fn add(&mut self, parent: INodeNo, name: &OsStr, node: Node) -> Result<(u64, FileAttr), Errno> {
        if self.node(parent)?.entries.contains_key(name) {
            return Err(Errno::EEXIST);
        }
        let ino = self.next;
        self.next += 1;
        let attr = attr(ino, &node);
        self.nodes.insert(ino, node);
        self.node(parent)?.entries.insert(name.to_owned(), ino);
        Ok((ino, attr))
    }
}

impl Filesystem for PowerFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.with(|s| {
            let ino = s.child(parent, name)?;
            Ok(attr(ino, s.node(INodeNo(ino))?))
        }) {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.with(|s| Ok(attr(ino.0, s.node(ino)?))) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        match self.with(|s| {
            let node = s.node(ino)?;
            if let Some(mode) = mode {
                node.mode = mode;
            }
            if let Some(size) = size {
                node.data.resize(size as usize, 0);
            }
            Ok(attr(ino.0, node))
        }) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let node = Node {
            dir: true,
            mode,
            ..Node::default()
        };
        match self.with(|s| s.add(parent, name, node)) {
            Ok((_, a)) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let node = Node {
            mode,
            ..Node::default()
        };
        match self.with(|s| s.add(parent, name, node)) {
            Ok((ino, a)) => reply.created(
                &TTL,
                &a,
                Generation(0),
                FileHandle(ino),
                FopenFlags::empty(),
            ),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.with(|s| {
            s.node(parent)?.entries.remove(name).ok_or(Errno::ENOENT)?;
            Ok(())
        }) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.with(|s| {
            let ino = s.child(parent, name)?;
            if !s.node(INodeNo(ino))?.entries.is_empty() {
                return Err(Errno::ENOTEMPTY);
            }
            s.node(parent)?.entries.remove(name);
            Ok(())
        }) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        match self.with(|s| {
            let ino = s.node(parent)?.entries.remove(name).ok_or(Errno::ENOENT)?;
            s.node(newparent)?.entries.insert(newname.to_owned(), ino);
            Ok(())
        }) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.with(|s| s.node(ino).map(|_| ())) {
            Ok(()) => reply.opened(FileHandle(ino.0), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.with(|s| {
            let data = &s.node(ino)?.data;
            let start = (offset as usize).min(data.len());
            let end = (start + size as usize).min(data.len());
            Ok(data[start..end].to_vec())
        }) {
            Ok(bytes) => reply.data(&bytes),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.with(|s| {
            let file = &mut s.node(ino)?.data;
            let end = offset as usize + data.len();
            if file.len() < end {
                file.resize(end, 0);
            }
            file[offset as usize..end].copy_from_slice(data);
            s.written += data.len() as u64;
            Ok(())
        }) {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    /// Makes the node durable as it stands: a file's data, a directory's entries.
    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.with(|s| {
            let node = s.node(ino)?;
            let grown = node.data.len().saturating_sub(node.durable_data.len()) as u64;
            node.durable_data = node.data.clone();
            node.durable_entries = node.entries.clone();
            s.synced += grown;
            Ok(())
        }) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn opendir(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.open(req, ino, flags, reply)
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let listed = self.with(|s| {
            let entries: Vec<(OsString, u64)> = s
                .node(ino)?
                .entries
                .iter()
                .map(|(k, v)| (k.clone(), *v))
                .collect();
            let mut out = vec![
                (OsString::from("."), ino.0, FileType::Directory),
                (OsString::from(".."), INodeNo::ROOT.0, FileType::Directory),
            ];
            for (name, child) in entries {
                let kind = match s.nodes.get(&child).is_some_and(|n| n.dir) {
                    true => FileType::Directory,
                    false => FileType::RegularFile,
                };
                out.push((name, child, kind));
            }
            Ok(out)
        });
        match listed {
            Ok(all) => {
                for (i, (name, child, kind)) in all.into_iter().enumerate().skip(offset as usize) {
                    if reply.add(INodeNo(child), (i + 1) as u64, kind, &name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(e),
        }
    }

    /// A directory's fsync makes its entries durable, as a file's makes its data: the same.
    fn fsyncdir(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.fsync(req, ino, fh, datasync, reply)
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        reply.statfs(1 << 24, 1 << 24, 1 << 24, 1 << 20, 1 << 20, 4096, 255, 4096);
    }
}
