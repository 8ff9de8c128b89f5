//! Fuzz harnesses for the forward input, shared by the libFuzzer targets (`fuzz_targets/`) and
//! by the corpus replay test of the main workspace (`tests/fuzz_corpus.rs` includes this file),
//! so CI checks every corpus file with the same invariants without libFuzzer.
//!
//! * [`frame`]: bytes → request scanner → `frame::parse` → `entries::Pieces` → `split`,
//!   checking that nothing panics, that pieces keep to the limit and end between entries, and
//!   that what `split` keeps is whole, valid entries.
//! * [`ConnectionHarness::run`]: the bytes are written, in pieces whose sizes the input
//!   chooses, into a duplex stream served by `connection::serve` with a real buffer in a
//!   temporary directory. The acks read back must be exactly the ones a reference model of
//!   the protocol expects (a prefix of them when the connection is closed for an error), and
//!   the buffer must have stored exactly the events of the requests handed to it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use claimcheck::buffer::registry::Registry;
use claimcheck::buffer::{
    chunk, BufferConfig, BufferHandle, DirLock, Group, OverflowAction, SealedChunk, SyncPolicy,
};
use claimcheck::forward::connection::{self, ConnectionConfig, MAX_TAG_BYTES};
use claimcheck::forward::entries;
use claimcheck::forward::frame::{self, Request};
use claimcheck::timekey::Timekey;
use claimcheck_consumer::body::{self, Compression};
use claimcheck_consumer::entry::{self, EventTime, ScanError, ValueScanner};
use std::io::Read;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Decompressed entries are expanded in pieces of at most this (small, so a bomb stays cheap).
pub const DECOMPRESSION_LIMIT: u64 = 256 << 10;
/// How much of the pieces [`frame`] compares with one decompression of the same bytes.
const JOINED_CHECKED: usize = 4 << 20;
/// Requests larger than this close the connection (`chunk_size_limit`).
pub const CHUNK_SIZE_LIMIT: u64 = 8 << 10;
/// Timekey of both the connection and the buffer.
const TIMEKEY_SECS: u64 = 3600;

// ---------------------------------------------------------------------------------------------
// frame
// ---------------------------------------------------------------------------------------------

/// Scans `data` as a connection would (request after request), parses each request and checks
/// its entries. Panics on a broken invariant.
pub fn frame(data: &[u8]) {
    check_scanner_is_resumable(data);
    let mut rest = data;
    while !rest.is_empty() {
        let len = match entry::value_len(rest) {
            Ok(len) => len,
            Err(ScanError::Incomplete) | Err(ScanError::Invalid(_)) => return,
        };
        assert!(len > 0 && len <= rest.len(), "value_len out of range");
        let (request, tail) = rest.split_at(len);
        rest = tail;
        check_request(Bytes::copy_from_slice(request));
    }
}

/// Feeding the scanner a growing buffer gives the same answer as scanning the whole at once.
fn check_scanner_is_resumable(data: &[u8]) {
    let whole = entry::value_len(data);
    let mut scanner = ValueScanner::default();
    // Cut points that depend on the data, so the fuzzer controls them.
    let step = 1 + usize::from(data.first().copied().unwrap_or(0) % 16);
    let mut at = 0;
    let resumed = loop {
        at = (at + step).min(data.len());
        match scanner.advance(&data[..at]) {
            Ok(Some(len)) => break Ok(len),
            Ok(None) if at == data.len() => break Err(ScanError::Incomplete),
            Ok(None) => assert!(scanner.scanned() <= at, "scanner went past the data"),
            Err(e) => break Err(e),
        }
    };
    match (&whole, &resumed) {
        (Ok(a), Ok(b)) => assert_eq!(a, b, "resumed scan found another end"),
        (Err(_), Err(_)) => {}
        // A value that the whole scan finds invalid may look incomplete up to a cut, and then
        // invalid; never a different success.
        _ => panic!("whole scan {whole:?} but resumed scan {resumed:?}"),
    }
}

fn check_request(request: Bytes) {
    let message = match frame::parse(request) {
        Request::Nop | Request::Broken(_) => return,
        Request::Events(m) => m,
    };
    if let Some(token) = &message.options.chunk {
        check_ack_encoding(token);
    }
    let (packed, compression) =
        entries::blob_of(message.entries, message.options.compressed.as_deref());
    let compressed = compression != Compression::None;
    let Ok(mut pieces) = entries::Pieces::new(packed.clone(), compression, DECOMPRESSION_LIMIT)
    else {
        return;
    };
    // The pieces joined are the start of what one decompression gives (checked on the first
    // few MiB, which is all a small input expands to unless it is a bomb).
    let mut joined = Some(Vec::new());
    let tokyo = "Asia/Tokyo".parse().expect("a known zone");
    loop {
        let Ok(blob) = pieces.next_piece() else {
            return;
        };
        if let Some(j) = joined.as_mut().filter(|j| j.len() < JOINED_CHECKED) {
            j.extend_from_slice(&blob);
        } else {
            joined = None;
        }
        if compressed {
            assert!(
                blob.len() as u64 <= DECOMPRESSION_LIMIT,
                "a piece beyond the limit"
            );
        }
        if !pieces.is_done() {
            // Cut between whole msgpack values.
            let mut at = 0;
            while at < blob.len() {
                at += entry::value_len(&blob[at..]).expect("a piece ends between values");
            }
        }
        for timekey in [
            Timekey::utc(TIMEKEY_SECS as i64),
            Timekey::utc(60),
            Timekey::utc(1),
            Timekey {
                secs: 86_400,
                zone: tokyo,
            },
        ] {
            check_split(&blob, timekey);
        }
        if pieces.is_done() {
            break;
        }
    }
    if let Some(joined) = joined.filter(|_| compressed) {
        let whole = body::decoder(compression, &packed[..])
            .map(|d| {
                let mut out = Vec::new();
                // A stream that ends in an error still gave what came before it.
                let _ = d.take(joined.len() as u64).read_to_end(&mut out);
                out
            })
            .unwrap_or_default();
        assert_eq!(whole, joined, "pieces differ from one decompression");
    }
}

/// `{"ack": token}` decodes back to the token, byte for byte, as a str.
fn check_ack_encoding(token: &[u8]) {
    let ack = frame::encode_ack(token);
    assert_eq!(entry::value_len(&ack), Ok(ack.len()));
    let v = rmpv::decode::read_value_ref(&mut &ack[..]).expect("ack decodes");
    let rmpv::ValueRef::Map(pairs) = v else {
        panic!("ack is not a map")
    };
    assert_eq!(pairs.len(), 1);
    assert!(matches!(pairs[0].0, rmpv::ValueRef::String(s) if s.as_bytes() == b"ack"));
    match pairs[0].1 {
        rmpv::ValueRef::String(s) => assert_eq!(s.as_bytes(), token, "ack token changed"),
        ref other => panic!("ack value is not a str: {other:?}"),
    }
}

/// What `split` keeps is whole valid entries of the right timekey, counted right, and the
/// buffer can cut its groups anywhere without finding anything else.
fn check_split(blob: &Bytes, timekey: Timekey) {
    let split = entries::split(blob, timekey);
    let kept: u64 = split.groups.iter().map(|g| g.records).sum();
    assert_eq!(
        kept, split.events,
        "group records do not add up to the events"
    );
    assert_eq!(
        split.reasons.iter().map(|(_, n)| n).sum::<u64>(),
        split.invalid,
        "skip reasons do not add up"
    );
    let kept_bytes: u64 = split.groups.iter().map(|g| g.bytes).sum();
    assert!(
        kept_bytes <= blob.len() as u64,
        "kept more bytes than received"
    );
    for group in &split.groups {
        assert!(group.records > 0, "empty group");
        check_group(group, Some(timekey));
        if group.records > 64 {
            // Each cut rescans the rest: quadratic, so only small groups are cut every way.
            continue;
        }
        // Chunk limits as small as they get: one entry, a few bytes, a few records.
        for (max_bytes, max_records) in [(1, 1), (64, 3), (u64::MAX, 2)] {
            let mut rest = group.clone();
            let mut records = 0;
            while rest.records > 0 {
                let front = rest.split_front(max_bytes, max_records);
                assert!(front.records > 0, "split_front made no progress");
                assert!(front.records <= max_records);
                check_group(&front, Some(timekey));
                records += front.records;
            }
            assert_eq!(records, group.records, "split_front lost or made events");
        }
    }
}

fn check_group(group: &Group, timekey: Option<Timekey>) {
    let (mut records, mut bytes) = (0u64, 0u64);
    let (mut first, mut last) = (None::<EventTime>, None::<EventTime>);
    for slice in &group.slices {
        bytes += slice.len() as u64;
        for e in entry::entries(slice) {
            let (_, info) = e.expect("a group holds only whole valid entries");
            if let Some(t) = timekey {
                assert_eq!(t.window_of(info.time.secs), group.timekey);
            }
            records += 1;
            first = Some(first.map_or(info.time, |f| f.min(info.time)));
            last = Some(last.map_or(info.time, |l| l.max(info.time)));
        }
    }
    assert_eq!(
        (records, bytes),
        (group.records, group.bytes),
        "group stats are off"
    );
    if records > 0 {
        assert_eq!((Some(group.first), Some(group.last)), (first, last));
    }
}

// ---------------------------------------------------------------------------------------------
// connection
// ---------------------------------------------------------------------------------------------

/// What the reference model expects of a connection that is sent some bytes and then closed.
#[derive(Debug, Default, PartialEq)]
pub struct Expected {
    /// Ack tokens, in order.
    pub acks: Vec<Bytes>,
    /// For each ack, the events that must be stored before it is sent: those of its request
    /// and of every request before it.
    pub stored_before_ack: Vec<u64>,
    /// Events of the requests handed to the buffer.
    pub stored_events: u64,
    /// The server closes the connection for an error (garbage, too large, bad compression):
    /// then only a prefix of `acks` may be sent.
    pub closed_for_error: bool,
}

/// The protocol as `connection.rs` documents it, request by request, from the whole stream.
pub fn expected(stream: &[u8], config: &ConnectionConfig) -> Expected {
    let mut out = Expected::default();
    let mut rest = stream;
    while !rest.is_empty() {
        // A request in JSON (its first byte `[` or `{`): closed.
        if matches!(rest[0], b'[' | b'{') {
            out.closed_for_error = true;
            return out;
        }
        let mut scanner = ValueScanner::default();
        let len = match scanner.advance(rest) {
            Ok(Some(len)) if len as u64 <= config.chunk_size_limit => len,
            // Not msgpack, or a request over the limit: closed.
            Ok(Some(_)) | Err(ScanError::Invalid(_)) => {
                out.closed_for_error = true;
                return out;
            }
            // An unfinished request when the stream ends: dropped (closed if over the limit,
            // or if its headers say it would be).
            Ok(None) | Err(ScanError::Incomplete) => {
                let least = rest.len().max(scanner.wanted());
                out.closed_for_error = least as u64 > config.chunk_size_limit;
                return out;
            }
        };
        let (request, tail) = rest.split_at(len);
        rest = tail;
        let message = match frame::parse(Bytes::copy_from_slice(request)) {
            // No-op and broken requests: skipped, never acknowledged.
            Request::Nop | Request::Broken(_) => continue,
            Request::Events(m) => m,
        };
        let token = message.options.chunk.clone();
        let tag_ok = std::str::from_utf8(&message.tag)
            .is_ok_and(|t| !t.is_empty() && t.len() <= MAX_TAG_BYTES);
        let logs = message.options.fluent_signal.unwrap_or(0) == 0;
        if tag_ok && logs {
            // Entries that expand beyond the limit are stored in pieces, all of them or,
            // when the plan finds a piece that would fail (or a bomb), none: the connection
            // is closed.
            let (packed, compression) =
                entries::blob_of(message.entries, message.options.compressed.as_deref());
            let limit = config.decompression_size_limit;
            let Ok(mut pieces) = entries::Pieces::new(packed.clone(), compression, limit) else {
                out.closed_for_error = true;
                return out;
            };
            let Ok(first) = pieces.next_piece() else {
                out.closed_for_error = true;
                return out;
            };
            if !pieces.is_done()
                && entries::plan(packed, compression, limit, config.timekey).is_err()
            {
                out.closed_for_error = true;
                return out;
            }
            let mut events = entries::split(&first, config.timekey).events;
            while !pieces.is_done() {
                let piece = pieces.next_piece().expect("the plan expanded every piece");
                events += entries::split(&piece, config.timekey).events;
            }
            out.stored_events += events;
        }
        // Stored, or skipped whole (bad tag, not logs, no valid event): acknowledged either way.
        if let Some(token) = token {
            out.acks.push(token);
            out.stored_before_ack.push(out.stored_events);
        }
    }
    out
}

/// A buffer in a temporary directory and a runtime, kept across runs (opening a buffer for
/// every input would cost more than the input).
pub struct ConnectionHarness {
    runtime: tokio::runtime::Runtime,
    registry: Arc<Registry>,
    handle: Option<BufferHandle>,
    writer: Option<tokio::task::JoinHandle<anyhow::Result<DirLock>>>,
    sealed_rx: mpsc::UnboundedReceiver<SealedChunk>,
    chunks_dir: PathBuf,
    // Last: removed after the buffer is closed.
    _dir: tempfile::TempDir,
}

impl Default for ConnectionHarness {
    fn default() -> Self {
        Self::new()
    }
}

/// Where buffers go: memory when the machine has it (fsync is free there), else the temp dir.
fn scratch_dir() -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

impl ConnectionHarness {
    pub fn new() -> Self {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let dir = tempfile::Builder::new()
            .prefix("claimcheck-fuzz-")
            .tempdir_in(scratch_dir())
            .expect("temporary buffer directory");
        let buffer_config = BufferConfig {
            dir: dir.path().to_path_buf(),
            timekey: Duration::from_secs(TIMEKEY_SECS),
            timekey_wait: Duration::from_secs(600),
            // Small chunks, so requests are split across chunks and chunks are sealed often.
            chunk_limit_size: 4096,
            chunk_limit_records: Some(16),
            flush_interval: Duration::from_millis(200),
            // No limit: the harness frees space only between runs, so a full buffer would
            // hold a run forever.
            total_limit_size: None,
            overflow_action: OverflowAction::Block,
            sync: SyncPolicy::Always,
            sync_interval: Duration::from_secs(1),
            // Few files, so that chunk files are closed and reopened between writes.
            max_open_files: Some(4),
        };
        let chunks_dir = claimcheck::buffer::chunks_dir(dir.path());
        let registry = Arc::new(Registry::new());
        let (sealed_tx, sealed_rx) = mpsc::unbounded_channel();
        let (buffer, _recovered) =
            claimcheck::buffer::Buffer::open(buffer_config, registry.clone(), sealed_tx)
                .expect("open the buffer");
        let handle = buffer.handle.clone();
        let writer = runtime.spawn(buffer.run());
        ConnectionHarness {
            runtime,
            registry,
            handle: Some(handle),
            writer: Some(writer),
            sealed_rx,
            chunks_dir,
            _dir: dir,
        }
    }

    /// Runs one input: two control bytes, then the bytes the client sends. Panics on a broken
    /// invariant, or if the connection does not finish within `deadline`.
    ///
    /// Control bytes: `data[0]` is the largest write (0: all at once), `data[1]` seeds the
    /// write sizes and sets the duplex stream's capacity.
    pub fn run(&mut self, data: &[u8], deadline: Duration) {
        let (control, stream) = data.split_at(data.len().min(2));
        let max_write = usize::from(control.first().copied().unwrap_or(0));
        let seed = control.get(1).copied().unwrap_or(0);
        self.release_sealed_chunks();
        // Fresh settings for every input, so that no state kept in them (such as a cache of
        // ack tokens seen) carries from one input to the next.
        let config = Arc::new(connection_config());
        let expected = expected(stream, &config);
        let before = self.stored_records();

        let handle = self.handle.clone().expect("buffer is open");
        let writes = write_sizes(stream.len(), max_write, seed);
        let capacity = 1 + usize::from(seed) * 64;
        let stream = stream.to_vec();
        let registry = self.registry.clone();
        let stored_before_ack = expected.stored_before_ack.clone();
        let acks = self.runtime.block_on(async move {
            let (client, server) = tokio::io::duplex(capacity);
            let peer: SocketAddr = "127.0.0.1:24224".parse().expect("address");
            let serve = connection::serve(server, peer, handle, config, CancellationToken::new());
            let (mut from_server, mut to_server) = tokio::io::split(client);
            let send = async move {
                let mut at = 0;
                for n in writes {
                    // The server may close early (an error): then the rest is not read.
                    if to_server.write_all(&stream[at..at + n]).await.is_err() {
                        return;
                    }
                    at += n;
                    tokio::task::yield_now().await;
                }
                let _ = to_server.shutdown().await;
            };
            // Acks are checked as they arrive: by then the events of their request (and of
            // every request before) must be in the buffer.
            let receive = async move {
                let (mut bytes, mut acks, mut at) = (Vec::new(), Vec::new(), 0);
                loop {
                    let n = from_server.read_buf(&mut bytes).await.unwrap_or(0);
                    while let Ok(len) = entry::value_len(&bytes[at..]) {
                        let stored = stored_records(&registry) - before;
                        if let Some(&need) = stored_before_ack.get(acks.len()) {
                            assert!(
                                stored >= need,
                                "ack #{} sent when {stored} events were stored, not {need}",
                                acks.len()
                            );
                        }
                        acks.push(decode_ack(&bytes[at..at + len]));
                        at += len;
                    }
                    if n == 0 {
                        break;
                    }
                }
                assert_eq!(at, bytes.len(), "the server wrote part of an ack");
                acks
            };
            let run = async { tokio::join!(serve, send, receive).2 };
            tokio::time::timeout(deadline, run)
                .await
                .expect("the connection did not finish in time")
        });
        self.barrier();
        let stored = (self.stored_records() - before)
            .checked_sub(1)
            .expect("the barrier event is counted");

        assert_eq!(
            stored, expected.stored_events,
            "the buffer stored {stored} events, the requests handed to it hold {}",
            expected.stored_events
        );
        if expected.closed_for_error {
            assert!(
                acks.len() <= expected.acks.len() && acks[..] == expected.acks[..acks.len()],
                "acks {acks:?} are not a prefix of {:?}",
                expected.acks
            );
        } else {
            assert_eq!(acks, expected.acks, "acks differ from the expected ones");
        }
    }

    /// Appends one event and waits until it is stored: every append queued before it has then
    /// been written (the writer takes appends in order), so the registry's counts are final.
    fn barrier(&self) {
        let handle = self.handle.clone().expect("buffer is open");
        let mut group = Group::new(0);
        // [0, {}]
        group.push(
            Bytes::from_static(&[0x92, 0x00, 0x80]),
            1,
            EventTime::default(),
            EventTime::default(),
        );
        self.runtime
            .block_on(async move {
                handle
                    .append("fuzz.barrier".into(), vec![group])
                    .await
                    .await
            })
            .expect("the barrier event is stored");
    }

    fn stored_records(&self) -> u64 {
        stored_records(&self.registry)
    }

    /// Reads sealed chunks back (their frames must hold exactly the events they claim), then
    /// deletes them, as delivery would.
    fn release_sealed_chunks(&mut self) {
        while let Ok(sealed) = self.sealed_rx.try_recv() {
            let scan = chunk::scan(&sealed.paths.data).expect("a sealed chunk reads back");
            assert_eq!(scan.torn_bytes, 0, "a sealed chunk has a torn tail");
            assert_eq!(
                (scan.stats.records, scan.stats.body_bytes),
                (sealed.stats.records, sealed.stats.body_bytes),
                "a sealed chunk holds other events than it claims"
            );
            assert_eq!(scan.header, sealed.header);
            sealed.paths.remove().expect("remove a chunk");
            self.registry.remove(&sealed.header.chunk_id);
        }
    }

    /// Closes the buffer (sealing what is open) and checks every chunk left.
    pub fn close(mut self) {
        drop(self.handle.take());
        if let Some(writer) = self.writer.take() {
            let lock = self
                .runtime
                .block_on(writer)
                .expect("writer task")
                .expect("writer");
            drop(lock);
        }
        self.release_sealed_chunks();
        let left = std::fs::read_dir(&self.chunks_dir)
            .map(|d| d.count())
            .unwrap_or(0);
        assert_eq!(left, 0, "chunk files left after every chunk was released");
    }
}

/// The connection settings of the harness: small limits, defaults for the rest.
pub fn connection_config() -> ConnectionConfig {
    // The model acks every stored request, so resent tokens are not deduplicated here (the
    // window has its own tests); the other settings keep their defaults.
    ConnectionConfig {
        chunk_size_limit: CHUNK_SIZE_LIMIT,
        chunk_size_warn_limit: Some(CHUNK_SIZE_LIMIT / 2),
        decompression_size_limit: DECOMPRESSION_LIMIT,
        timekey: Timekey::utc(TIMEKEY_SECS as i64),
        dedup: claimcheck::dedup::Dedup::new(std::time::Duration::ZERO, 1),
        ..ConnectionConfig::default()
    }
}

/// Sizes of the writes that send `len` bytes.
fn write_sizes(len: usize, max_write: usize, seed: u8) -> Vec<usize> {
    if max_write == 0 || len == 0 {
        return vec![len];
    }
    let mut state = u32::from(seed).wrapping_mul(2_654_435_761) | 1;
    let mut sizes = Vec::new();
    let mut left = len;
    while left > 0 {
        // xorshift32
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let n = (1 + state as usize % max_write).min(left);
        sizes.push(n);
        left -= n;
    }
    sizes
}

/// Events in every chunk of the buffer.
fn stored_records(registry: &Registry) -> u64 {
    registry.snapshot().iter().map(|c| c.records).sum()
}

/// One ack as the connection wrote it: `{"ack": str}`.
fn decode_ack(mut bytes: &[u8]) -> Bytes {
    match rmpv::decode::read_value_ref(&mut bytes).expect("the server wrote msgpack") {
        rmpv::ValueRef::Map(pairs) if pairs.len() == 1 => match pairs[0] {
            (rmpv::ValueRef::String(k), rmpv::ValueRef::String(t)) if k.as_bytes() == b"ack" => {
                Bytes::copy_from_slice(t.as_bytes())
            }
            _ => panic!("not an ack: {pairs:?}"),
        },
        other => panic!("not an ack: {other:?}"),
    }
}
