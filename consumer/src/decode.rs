//! Streaming decoding of one stored object: stored bytes → CRC32C and size → decompression →
//! entries or JSON lines → events, with the pointer's checks at the end.
//!
//! Nothing here holds a whole body: the stored bytes pass through a counting reader, the
//! decompressor streams, and the splitter keeps at most one entry (or line) plus one read block.
//! Memory that the crate holds on the caller's behalf is reported to a [`Gauge`].

use std::collections::VecDeque;
use std::io::{self, BufRead, Read};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use serde::Deserialize;

use crate::body::{self, Format};
use crate::crc;
use crate::entry::{self, EventTime, ScanError, ValueScanner};
use crate::{Error, Event, EventBlock, Pointer, MAX_NESTING};

/// Bytes read from the decompressor at a time.
pub(crate) const READ_BLOCK: usize = 64 * 1024;

/// Bytes held by the crate for one resolution: spooled objects, the splitter's buffer, and
/// events decoded but not yet handed to the caller. Shared between the decoding thread and the
/// caller's side of the stream.
#[derive(Debug, Default)]
// Without the resolver (feature `aws`) nobody reads the peak or counts object reads.
#[cfg_attr(not(feature = "aws"), allow(dead_code))]
pub(crate) struct Gauge {
    current: AtomicU64,
    peak: AtomicU64,
    object_reads: AtomicU64,
}

#[cfg_attr(not(feature = "aws"), allow(dead_code))]
impl Gauge {
    const fn new() -> Self {
        Gauge {
            current: AtomicU64::new(0),
            peak: AtomicU64::new(0),
            object_reads: AtomicU64::new(0),
        }
    }

    pub(crate) fn add(&self, n: usize) {
        let now = self.current.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
        self.peak.fetch_max(now, Ordering::Relaxed);
    }

    pub(crate) fn sub(&self, n: usize) {
        self.current.fetch_sub(n as u64, Ordering::Relaxed);
    }

    pub(crate) fn object_read(&self) {
        self.object_reads.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }

    pub(crate) fn object_reads(&self) -> u64 {
        self.object_reads.load(Ordering::Relaxed)
    }
}

/// Where decoded events go. `false` means "stop": nobody wants more.
pub(crate) trait Sink {
    fn event(&mut self, event: Event) -> bool;

    /// The checked entries of one read of a msgpack body, end to end in `block`: made into
    /// events one by one, unless the sink wants them otherwise (as a block, or not at all).
    fn block(&mut self, tag: &Arc<str>, block: Bytes, infos: &[entry::EntryInfo]) -> bool {
        let mut at = 0;
        for &info in infos {
            let entry = block.slice(at..at + info.len);
            at += info.len;
            if !self.event(Event::from_checked(tag.clone(), entry, info)) {
                return false;
            }
        }
        true
    }
}

impl Sink for Vec<Event> {
    fn event(&mut self, event: Event) -> bool {
        self.push(event);
        true
    }
}

impl Sink for VecDeque<Event> {
    fn event(&mut self, event: Event) -> bool {
        self.push_back(event);
        true
    }
}

/// Drops every event: a verification pass.
struct Discard;

impl Sink for Discard {
    fn event(&mut self, _: Event) -> bool {
        true
    }

    fn block(&mut self, _: &Arc<str>, _: Bytes, _: &[entry::EntryInfo]) -> bool {
        true
    }
}

/// Keeps the next block of events: one per step of a pass (a JSON line is a block of one).
#[derive(Default)]
struct NextBlock(Option<EventBlock>);

impl Sink for NextBlock {
    fn event(&mut self, event: Event) -> bool {
        debug_assert!(self.0.is_none(), "one block per step");
        self.0 = Some(EventBlock::of_event(event));
        true
    }

    fn block(&mut self, tag: &Arc<str>, block: Bytes, infos: &[entry::EntryInfo]) -> bool {
        debug_assert!(self.0.is_none(), "one block per step");
        self.0 = Some(EventBlock::from_checked(tag.clone(), block, infos.to_vec()));
        true
    }
}

/// How a pass over an object ended when nothing was wrong with it.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Every check passed.
    Verified,
    /// The sink stopped the pass; nothing was checked.
    Stopped,
}

/// The stored bytes as they are read: count, CRC32C, and the first read error, which belongs
/// to the transport (S3), not to the data.
struct Stored<R> {
    inner: R,
    bytes: u64,
    crc: u32,
    failed: Option<io::Error>,
}

impl<R: Read> Read for Stored<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.inner.read(buf) {
            Ok(n) => {
                self.bytes += n as u64;
                self.crc = crc::crc32c_append(self.crc, &buf[..n]);
                Ok(n)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Err(e),
            Err(e) => {
                let kept = io::Error::new(e.kind(), e.to_string());
                self.failed = Some(e);
                Err(kept)
            }
        }
    }
}

/// Why a step stopped early: decompression failed, the body is not valid in its format, or
/// the sink stopped it.
enum Cut {
    Read(io::Error),
    Decode(Error),
    Stopped,
}

/// The decompressor over the stored bytes, keeping them reachable for the final checks.
enum Decompress<R: Read> {
    Zstd(zstd::stream::read::Decoder<'static, io::BufReader<R>>),
    // Boxed: over 300 bytes with the zlib-rs backend, against 76 for zstd.
    Gzip(Box<flate2::read::MultiGzDecoder<R>>),
    None(R),
}

impl<R: Read> Decompress<R> {
    fn new(compression: body::Compression, inner: R) -> io::Result<Self> {
        Ok(match compression {
            body::Compression::Zstd => Decompress::Zstd(zstd::stream::read::Decoder::new(inner)?),
            body::Compression::Gzip => {
                Decompress::Gzip(Box::new(flate2::read::MultiGzDecoder::new(inner)))
            }
            body::Compression::None => Decompress::None(inner),
        })
    }

    fn get_mut(&mut self) -> &mut R {
        match self {
            Decompress::Zstd(d) => d.get_mut().get_mut(),
            Decompress::Gzip(d) => d.get_mut(),
            Decompress::None(r) => r,
        }
    }
}

impl<R: Read> Read for Decompress<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Decompress::Zstd(d) => d.read(buf),
            Decompress::Gzip(d) => d.read(buf),
            Decompress::None(r) => r.read(buf),
        }
    }
}

/// What a step of a [`Pass`] came to when nothing was wrong.
enum Step {
    /// Some events went to the sink; there may be more.
    More,
    /// The body ended and every check passed.
    Verified,
    /// The sink stopped the pass; nothing was checked.
    Stopped,
}

/// One pass over a stored object, a step at a time: the decompressed body behind a read
/// buffer, and the state of the splitter between steps.
struct Pass<'g, R: Read> {
    /// Read up to one byte past the size the pointer gives, so that a body larger than it
    /// says (damaged, or hostile: a small object that decompresses to gigabytes) is found out
    /// without holding more than that in memory.
    body: io::BufReader<body::Counting<io::Take<Decompress<Stored<R>>>>>,
    split: Split<'g>,
    events: u64,
}

impl<'g, R: Read> Pass<'g, R> {
    fn new(pointer: &Pointer, stored: R, gauge: &'g Gauge) -> Result<Self, Error> {
        let stored = Stored {
            inner: stored,
            bytes: 0,
            crc: 0,
            failed: None,
        };
        let decoder = Decompress::new(pointer.compression, stored).map_err(Error::Decompress)?;
        let decoder = decoder.take(pointer.bytes.saturating_add(1));
        let body = io::BufReader::with_capacity(READ_BLOCK, body::Counting::new(decoder));
        let split = match pointer.format {
            Format::Msgpack => Split::Msgpack {
                buf: Blocks::new(gauge),
                scanner: ValueScanner::default(),
                infos: Vec::new(),
                tag: pointer.tag.as_str().into(),
            },
            Format::Json => Split::Json {
                line: Buffer::new(gauge),
                tag: pointer.tag.as_str().into(),
                _reader_memory: Held::new(gauge, READ_BLOCK),
            },
        };
        Ok(Pass {
            body,
            split,
            events: 0,
        })
    }

    /// Decodes the next events into `sink`; at the end of the body, checks the pointer's
    /// stored size, CRC32C, body size and event count.
    ///
    /// When decompression or decoding fails, the rest of the object is still read so that a
    /// damaged object is reported as the checksum or size mismatch it is, rather than as the
    /// decoding error it causes. A read error of the stored bytes is an [`Error::S3`].
    fn step(&mut self, pointer: &Pointer, sink: &mut dyn Sink) -> Result<Step, Error> {
        let mut counting = Counting { sink, events: 0 };
        let cut = self.split.step(&mut self.body, &mut counting);
        self.events += counting.events;
        let body_bytes = self.body.get_ref().bytes();
        let stored = self.body.get_mut().get_mut().get_mut().get_mut();
        if let Some(e) = stored.failed.take() {
            return Err(transport(e));
        }
        let failed = match cut {
            Ok(true) => return Ok(Step::More),
            Ok(false) => None,
            Err(Cut::Stopped) => return Ok(Step::Stopped),
            Err(Cut::Read(e)) => Some(Error::Decompress(e)),
            Err(Cut::Decode(e)) => Some(e),
        };
        check_stored(pointer, stored)?;
        // A body that went on past its size is that, whatever it broke on the way.
        if let Some(e) = failed.filter(|_| body_bytes <= pointer.bytes) {
            return Err(e);
        }
        if body_bytes != pointer.bytes {
            return Err(Error::SizeMismatch {
                what: "decompressed body bytes",
                expected: pointer.bytes,
                actual: body_bytes,
            });
        }
        if self.events != pointer.records {
            return Err(Error::SizeMismatch {
                what: "event count",
                expected: pointer.records,
                actual: self.events,
            });
        }
        Ok(Step::Verified)
    }
}

/// Reads `stored` (the object's bytes) to its end, sends the events to `sink`, and checks the
/// pointer's stored size, CRC32C, body size and event count (see [`Pass::step`]).
pub(crate) fn decode_object<R: Read>(
    pointer: &Pointer,
    stored: R,
    gauge: &Gauge,
    sink: &mut dyn Sink,
) -> Result<Outcome, Error> {
    let mut pass = Pass::new(pointer, stored, gauge)?;
    loop {
        match pass.step(pointer, sink)? {
            Step::More => {}
            Step::Verified => return Ok(Outcome::Verified),
            Step::Stopped => return Ok(Outcome::Stopped),
        }
    }
}

fn transport(e: io::Error) -> Error {
    Error::S3 {
        operation: "GetObject body",
        source: Box::new(e),
    }
}

/// Reads what is left of the stored object and checks its size and CRC32C.
fn check_stored<R: Read>(pointer: &Pointer, stored: &mut Stored<R>) -> Result<(), Error> {
    if let Err(e) = io::copy(stored, &mut io::sink()) {
        return Err(transport(stored.failed.take().unwrap_or(e)));
    }
    if stored.bytes != pointer.stored_bytes {
        return Err(Error::SizeMismatch {
            what: "stored object bytes",
            expected: pointer.stored_bytes,
            actual: stored.bytes,
        });
    }
    if stored.crc != pointer.checksum.crc32c {
        return Err(Error::ChecksumMismatch {
            expected: pointer.checksum.crc32c,
            actual: stored.crc,
        });
    }
    Ok(())
}

struct Counting<'a> {
    sink: &'a mut dyn Sink,
    events: u64,
}

impl Counting<'_> {
    fn event(&mut self, event: Event) -> Result<(), Cut> {
        self.events += 1;
        if self.sink.event(event) {
            Ok(())
        } else {
            Err(Cut::Stopped)
        }
    }

    fn block(
        &mut self,
        tag: &Arc<str>,
        block: Bytes,
        infos: &[entry::EntryInfo],
    ) -> Result<(), Cut> {
        self.events += infos.len() as u64;
        if self.sink.block(tag, block, infos) {
            Ok(())
        } else {
            Err(Cut::Stopped)
        }
    }
}

/// The JSON splitter's line buffer, reported to the gauge by capacity.
struct Buffer<'g> {
    bytes: Vec<u8>,
    held: Capacity<'g>,
}

impl<'g> Buffer<'g> {
    fn new(gauge: &'g Gauge) -> Self {
        Buffer {
            bytes: Vec::new(),
            held: Capacity::new(gauge),
        }
    }

    fn report(&mut self) {
        self.held.set(self.bytes.capacity());
    }

    /// Gives memory back once a large entry or line has passed.
    fn relax(&mut self) {
        if self.bytes.capacity() > 4 * READ_BLOCK && self.bytes.len() < READ_BLOCK {
            self.bytes.shrink_to(2 * READ_BLOCK);
            self.report();
        }
    }
}

/// The msgpack splitter's buffer, reported to the gauge by capacity. Whole entries leave it
/// as blocks that their events share, without a copy; only an entry cut by the end of a read
/// is copied, when the next read needs room.
struct Blocks<'g> {
    bytes: BytesMut,
    held: Capacity<'g>,
}

impl<'g> Blocks<'g> {
    fn new(gauge: &'g Gauge) -> Self {
        Blocks {
            bytes: BytesMut::new(),
            held: Capacity::new(gauge),
        }
    }

    fn report(&mut self) {
        self.held.set(self.bytes.capacity());
    }

    /// Appends up to one block from `r`; 0 at the end of the body.
    fn fill(&mut self, r: &mut impl Read) -> io::Result<usize> {
        let len = self.bytes.len();
        if self.bytes.capacity() - len < READ_BLOCK {
            // A new allocation: for one read and the entry it continues, or, while a large
            // entry arrives, twice as large each time (copies of it stay linear in its size).
            let capacity = if len < READ_BLOCK {
                len + READ_BLOCK
            } else {
                (len + READ_BLOCK).next_power_of_two()
            };
            let mut grown = BytesMut::with_capacity(capacity);
            grown.extend_from_slice(&self.bytes);
            self.bytes = grown;
        }
        self.bytes.resize(len + READ_BLOCK, 0);
        self.report();
        let n = loop {
            match r.read(&mut self.bytes[len..]) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => break other,
            }
        };
        self.bytes.truncate(len + n.as_ref().copied().unwrap_or(0));
        n
    }

    /// The first `n` bytes, handed over: from now on they belong to the events.
    fn take(&mut self, n: usize) -> Bytes {
        let block = self.bytes.split_to(n).freeze();
        self.report();
        block
    }
}

/// A buffer's capacity as reported to a gauge: kept up to date by [`Capacity::set`], taken
/// back when dropped.
struct Capacity<'g> {
    gauge: &'g Gauge,
    reported: usize,
}

impl<'g> Capacity<'g> {
    fn new(gauge: &'g Gauge) -> Self {
        Capacity { gauge, reported: 0 }
    }

    fn set(&mut self, cap: usize) {
        if cap > self.reported {
            self.gauge.add(cap - self.reported);
        } else {
            self.gauge.sub(self.reported - cap);
        }
        self.reported = cap;
    }
}

impl Drop for Capacity<'_> {
    fn drop(&mut self) {
        self.gauge.sub(self.reported);
    }
}

/// Cuts a body into events as it streams by, a step at a time: the msgpack entries that are
/// whole in the buffer, or one JSON line.
enum Split<'g> {
    Msgpack {
        /// Starts with the next entry.
        buf: Blocks<'g>,
        /// Follows an entry cut by the end of the buffer.
        scanner: ValueScanner,
        infos: Vec<entry::EntryInfo>,
        tag: Arc<str>,
    },
    Json {
        line: Buffer<'g>,
        /// The chunk's tag, which every line carries: one allocation shared.
        tag: Arc<str>,
        _reader_memory: Held<'g>,
    },
}

/// One line of a `json` body.
#[derive(Deserialize)]
struct Line {
    time: String,
    tag: String,
    record: serde_json::Value,
    metadata: Option<serde_json::Value>,
}

impl Split<'_> {
    /// Sends the next events to `out`: `Ok(true)` when some were sent, `Ok(false)` at the end
    /// of the body.
    fn step(&mut self, body: &mut impl BufRead, out: &mut Counting<'_>) -> Result<bool, Cut> {
        match self {
            Split::Msgpack {
                buf,
                scanner,
                infos,
                tag,
            } => split_msgpack(body, buf, scanner, infos, tag, out),
            Split::Json { line, tag, .. } => split_json_line(body, line, tag, out),
        }
    }
}

/// Sends the msgpack entries that are whole in the buffer, reading blocks until there is one.
fn split_msgpack(
    body: &mut impl Read,
    buf: &mut Blocks<'_>,
    scanner: &mut ValueScanner,
    infos: &mut Vec<entry::EntryInfo>,
    tag: &Arc<str>,
    out: &mut Counting<'_>,
) -> Result<bool, Cut> {
    let invalid = |e: ScanError| Cut::Decode(Error::Decode(format!("msgpack entry: {e}")));
    loop {
        let rest = &buf.bytes[..];
        // The usual case: the next entry is all in the buffer, and one walk checks it (its
        // framing and its nesting) and finds its end. An entry cut by the end of the buffer is
        // followed by the resumable scanner instead, so that a large one is not walked again
        // after each block.
        let whole = if scanner.scanned() == 0 {
            match entry::scan_entry_within(rest, MAX_NESTING) {
                Ok(info) => Some(info),
                Err(ScanError::Incomplete) => None,
                Err(e) => return Err(invalid(e)),
            }
        } else {
            None
        };
        let whole = match whole {
            Some(info) => Some(info),
            None => match scanner.advance(rest).map_err(invalid)? {
                Some(len) => {
                    Some(entry::scan_entry_within(&rest[..len], MAX_NESTING).map_err(invalid)?)
                }
                None => None,
            },
        };
        if let Some(first) = whole {
            // This entry and every whole one after it in the buffer share the block they
            // were read into: no copy, and one allocation per read rather than one per event.
            infos.clear();
            infos.push(first);
            let mut end = first.len;
            while let Ok(info) = entry::scan_entry_within(&rest[end..], MAX_NESTING) {
                end += info.len;
                infos.push(info);
            }
            let block = buf.take(end);
            *scanner = ValueScanner::default();
            out.block(tag, block, infos)?;
            return Ok(true);
        }
        if buf.fill(body).map_err(Cut::Read)? == 0 {
            return if buf.bytes.is_empty() {
                Ok(false)
            } else {
                Err(Cut::Decode(Error::Decode(format!(
                    "body ends inside a msgpack entry ({} bytes left)",
                    buf.bytes.len()
                ))))
            };
        }
    }
}

/// One line of a `json` body. Its record and metadata may nest [`MAX_NESTING`] deep, as
/// msgpack ones may (the sidecar takes such events and writes them as JSON), beyond
/// serde_json's own limit of 128; deeper lines are refused before they are parsed, by a scan
/// without recursion.
fn parse_json_line(text: &[u8]) -> Result<Line, Error> {
    use serde::Deserialize;
    let failed = |e: serde_json::Error| Error::Decode(format!("json line: {e}"));
    // Nearly every line is well within serde_json's limit: parsed once, as it is.
    let deep = match serde_json::from_slice(text) {
        Ok(line) => return Ok(line),
        Err(e) if e.to_string().starts_with("recursion limit exceeded") => e,
        Err(e) => return Err(failed(e)),
    };
    // The line's own object is one level more than its record's.
    if !json_nests_within(text, MAX_NESTING + 1) {
        return Err(Error::Decode(format!(
            "json line: a value nests too deeply ({deep})"
        )));
    }
    let mut de = serde_json::Deserializer::from_slice(text);
    de.disable_recursion_limit();
    let line = Line::deserialize(&mut de).and_then(|line| de.end().map(|()| line));
    line.map_err(failed)
}

/// Whether the arrays and objects of the JSON `text` nest at most `limit` deep (brackets in
/// strings do not count).
fn json_nests_within(text: &[u8], limit: usize) -> bool {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in text {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > limit {
                    return false;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    true
}

/// Sends the event of the next non-empty line of a `json` body.
fn split_json_line(
    body: &mut impl BufRead,
    line: &mut Buffer<'_>,
    tag: &Arc<str>,
    out: &mut Counting<'_>,
) -> Result<bool, Cut> {
    loop {
        line.bytes.clear();
        let n = body.read_until(b'\n', &mut line.bytes).map_err(Cut::Read)?;
        line.report();
        if n == 0 {
            return Ok(false);
        }
        let text = line.bytes.strip_suffix(b"\n").unwrap_or(&line.bytes);
        if text.is_empty() {
            continue;
        }
        let parsed = parse_json_line(text).map_err(Cut::Decode)?;
        let time = EventTime::parse_rfc3339(&parsed.time).ok_or_else(|| {
            Cut::Decode(Error::Decode(format!(
                "json line: bad time {:?}",
                parsed.time
            )))
        })?;
        // A line of another tag is not this chunk's: a filter by the pointer's tag would let
        // it through.
        if **tag != *parsed.tag {
            return Err(Cut::Decode(Error::Decode(format!(
                "json line: tag {:?} in a chunk of {:?}",
                parsed.tag, tag
            ))));
        }
        let line_tag = tag.clone();
        let record = body::from_json(parsed.record);
        let metadata = parsed.metadata.map(body::from_json);
        let event =
            Event::from_parts(line_tag, time, &record, metadata.as_ref()).map_err(Cut::Decode)?;
        out.event(event)?;
        line.relax();
        return Ok(true);
    }
}

/// Memory reported to a gauge for as long as this lives.
pub(crate) struct Held<'g>(&'g Gauge, usize);

impl<'g> Held<'g> {
    pub(crate) fn new(gauge: &'g Gauge, bytes: usize) -> Self {
        gauge.add(bytes);
        Held(gauge, bytes)
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.sub(self.1);
    }
}

/// The checks and decoding of [`Resolver::resolve`](crate::Resolver::resolve) on an object
/// already in memory: the events, only if every check passed.
///
/// ```
/// use claimcheck_consumer::{verify_and_decode, Error, Pointer};
///
/// // A pointer and its object: one `[EventTime, {"msg": "hello"}]` entry, not compressed.
/// let pointer = Pointer::from_json(br#"{"v":1,"chunk_id":"0193a1c2e4f87d3e9a5b6c7d8e9f0a1b",
///   "bucket":"logs","key":"app/0193a1c2e4f87d3e9a5b6c7d8e9f0a1b.msgpack","tag":"app",
///   "timekey":1763740800,"first_time":1763740801.5,"last_time":1763740801.5,"records":1,
///   "bytes":22,"stored_bytes":22,"format":"msgpack","compression":"none",
///   "checksum":{"crc32c":"a7b5de6f"},"producer":"h","created_at":"2026-11-21T16:01:02.345Z"}"#)?;
/// let stored = b"\x92\xd7\x00\x69\x20\x8c\x81\x1d\xcd\x65\x00\x81\xa3msg\xa5hello".to_vec();
///
/// let events = verify_and_decode(&pointer, &stored)?;
/// assert_eq!(events[0].to_json().to_string(),
///     r#"{"time":"2025-11-21T16:00:01.500000000Z","tag":"app","record":{"msg":"hello"}}"#);
///
/// let mut damaged = stored.clone();
/// damaged[20] ^= 1;
/// assert!(matches!(verify_and_decode(&pointer, &damaged), Err(Error::ChecksumMismatch { .. })));
/// # Ok::<(), Error>(())
/// ```
pub fn verify_and_decode(pointer: &Pointer, stored: &[u8]) -> Result<Vec<Event>, Error> {
    // Room for the events the pointer announces, within what its body could hold (an entry
    // takes 8 bytes at least), so that a wrong pointer cannot reserve much.
    let announced = pointer.records.min(pointer.bytes / 8).min(1 << 20);
    let mut events = Vec::with_capacity(announced as usize);
    match decode_object(pointer, stored, &Gauge::default(), &mut events)? {
        Outcome::Verified => Ok(events),
        Outcome::Stopped => unreachable!("a Vec never stops a pass"),
    }
}

/// The gauge of passes that nobody reads: [`Decoder`] and [`verify`] report to it.
static UNWATCHED: Gauge = Gauge::new();

/// Verifies and decodes one stored body read from any [`Read`], pulled one event at a time,
/// without an async runtime: what [`Resolver`](crate::Resolver) does after its GetObject, for
/// callers that fetch the bytes themselves (another S3 client, a file, another language).
///
/// Memory stays bounded whatever the body's size: the stored bytes are read in blocks of 64
/// KiB, and at most one block of entries (or one JSON line) is decoded ahead. Events are
/// handed out as they are decoded; the pointer's checks (stored size, CRC32C, decompressed
/// size, event count) are made when the body ends, and a failure is the last item. To hand
/// out no event of a damaged body, run [`verify`] over the bytes first and a `Decoder` over
/// them again (the resolver reads twice, or keeps a small object in memory).
///
/// The pointer's [`Pointer::bytes`] is not compared with any limit here: check it first when
/// the pointer comes from someone you do not trust with your memory or time.
///
/// ```
/// use claimcheck_consumer::{Decoder, Error, Pointer};
///
/// let pointer = Pointer::from_record(br#"{"v":1,"chunk_id":"0193a1c2e4f87d3e9a5b6c7d8e9f0a1b",
///   "bucket":"logs","key":"app/0193a1c2e4f87d3e9a5b6c7d8e9f0a1b.msgpack","tag":"app",
///   "timekey":1763740800,"first_time":1763740801.5,"last_time":1763740801.5,"records":1,
///   "bytes":22,"stored_bytes":22,"format":"msgpack","compression":"none",
///   "checksum":{"crc32c":"a7b5de6f"},"producer":"h","created_at":"2026-11-21T16:01:02.345Z"}"#)?;
/// let stored: &[u8] = b"\x92\xd7\x00\x69\x20\x8c\x81\x1d\xcd\x65\x00\x81\xa3msg\xa5hello";
///
/// // Any `Read`: a file, a socket, an HTTP body.
/// for event in Decoder::new(&pointer, stored)? {
///     println!("{}", event?.record_json());
/// }
/// # Ok::<(), Error>(())
/// ```
pub struct Decoder<R: Read> {
    pointer: Pointer,
    pass: Option<Pass<'static, R>>,
    ready: VecDeque<Event>,
}

impl<R: Read> Decoder<R> {
    /// Starts a pass over `stored`, the bytes of the object (or inline body) `pointer`
    /// describes. Nothing is read yet.
    pub fn new(pointer: &Pointer, stored: R) -> Result<Self, Error> {
        let mut pointer = pointer.clone();
        // The decoder reads `stored`, not the body the pointer may carry.
        pointer.inline = None;
        let pass = Pass::new(&pointer, stored, &UNWATCHED)?;
        Ok(Decoder {
            pointer,
            pass: Some(pass),
            ready: VecDeque::new(),
        })
    }

    /// The next events, as many as were decoded from one block of the body (at least one),
    /// moved into `out`; `Ok(false)` once the body ended and every check passed. After an
    /// error, or `Ok(false)`, there is nothing more.
    pub fn next_batch(&mut self, out: &mut Vec<Event>) -> Result<bool, Error> {
        if !self.ready.is_empty() {
            out.extend(self.ready.drain(..));
            return Ok(true);
        }
        loop {
            let before = out.len();
            if !step(&mut self.pass, &self.pointer, out)? {
                return Ok(false);
            }
            if out.len() > before {
                return Ok(true);
            }
        }
    }

    /// The events decoded from the next read of the body (at least one), sharing one
    /// allocation; `Ok(None)` once the body ended and every check passed. After an error, or
    /// `Ok(None)`, there is nothing more.
    ///
    /// The quickest way through a chunk: the events of a block are read through
    /// [`EventRef`](crate::EventRef)s, with no allocation or reference count per event.
    ///
    /// ```
    /// # use claimcheck_consumer::{Decoder, Error, Pointer};
    /// # let pointer = Pointer::from_record(br#"{"v":1,"chunk_id":"0193a1c2e4f87d3e9a5b6c7d8e9f0a1b",
    /// #   "bucket":"logs","key":"app/0193a1c2e4f87d3e9a5b6c7d8e9f0a1b.msgpack","tag":"app",
    /// #   "timekey":1763740800,"first_time":1763740801.5,"last_time":1763740801.5,"records":1,
    /// #   "bytes":22,"stored_bytes":22,"format":"msgpack","compression":"none",
    /// #   "checksum":{"crc32c":"a7b5de6f"},"producer":"h","created_at":"2026-11-21T16:01:02.345Z"}"#)?;
    /// # let stored: &[u8] = b"\x92\xd7\x00\x69\x20\x8c\x81\x1d\xcd\x65\x00\x81\xa3msg\xa5hello";
    /// let mut decoder = Decoder::new(&pointer, stored)?;
    /// let mut bytes = 0;
    /// while let Some(block) = decoder.next_block()? {
    ///     for event in &block {
    ///         bytes += event.record_msgpack().len();
    ///     }
    /// }
    /// assert_eq!(bytes, 11);
    /// # Ok::<(), Error>(())
    /// ```
    pub fn next_block(&mut self) -> Result<Option<EventBlock>, Error> {
        // Events the iterator decoded and has not handed out yet come first.
        if let Some(event) = self.ready.pop_front() {
            return Ok(Some(EventBlock::of_event(event)));
        }
        loop {
            let mut next = NextBlock::default();
            if !step(&mut self.pass, &self.pointer, &mut next)? {
                return Ok(None);
            }
            if let Some(block) = next.0 {
                return Ok(Some(block));
            }
        }
    }
}

/// One step of a decoder's pass into `sink`: `Ok(true)` while there may be more; at the end,
/// or after an error, the pass is over.
fn step<R: Read>(
    pass: &mut Option<Pass<'static, R>>,
    pointer: &Pointer,
    sink: &mut dyn Sink,
) -> Result<bool, Error> {
    let Some(p) = pass.as_mut() else {
        return Ok(false);
    };
    match p.step(pointer, sink) {
        Ok(Step::More) => Ok(true),
        other => {
            *pass = None;
            other.map(|_| false)
        }
    }
}

impl<R: Read> Iterator for Decoder<R> {
    type Item = Result<Event, Error>;

    fn next(&mut self) -> Option<Result<Event, Error>> {
        loop {
            if let Some(event) = self.ready.pop_front() {
                return Some(Ok(event));
            }
            match step(&mut self.pass, &self.pointer, &mut self.ready) {
                Ok(true) => {}
                Ok(false) => return self.ready.pop_front().map(Ok),
                Err(e) => return Some(Err(e)),
            }
        }
    }
}

impl<R: Read> std::fmt::Debug for Decoder<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decoder")
            .field("chunk_id", &self.pointer.chunk_id)
            .field("events_decoded", &self.pass.as_ref().map(|p| p.events))
            .field("ready", &self.ready.len())
            .finish()
    }
}

/// Reads a stored body to its end and makes every check of [`Decoder`], keeping no event:
/// `Ok` means a [`Decoder`] over the same bytes will hand out every event and no error.
pub fn verify<R: Read>(pointer: &Pointer, stored: R) -> Result<(), Error> {
    match decode_object(pointer, stored, &UNWATCHED, &mut Discard)? {
        Outcome::Verified => Ok(()),
        Outcome::Stopped => unreachable!("Discard never stops a pass"),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::io::Write;

    use super::*;
    use crate::body::{Compression, Encoder};
    use crate::entry;
    use crate::pointer::Checksum;

    /// Five entries, the odd ones with Fluent Bit metadata.
    pub(crate) fn body() -> (Vec<u8>, Vec<Event>) {
        let mut bytes = Vec::new();
        let mut events = Vec::new();
        for i in 0..5u32 {
            let time = EventTime::new(1_763_740_800 + i64::from(i), i * 1000);
            let record = rmpv::Value::Map(vec![
                ("msg".into(), format!("line {i}").into()),
                ("bin".into(), rmpv::Value::Binary(b"raw".to_vec())),
                ("n".into(), i.into()),
            ]);
            let metadata =
                (i % 2 == 1).then(|| rmpv::Value::Map(vec![("pod".into(), "web-1".into())]));
            let start = bytes.len();
            bytes.push(0x92);
            match &metadata {
                Some(m) => {
                    bytes.push(0x92);
                    entry::encode::event_time(&mut bytes, time);
                    rmpv::encode::write_value(&mut bytes, m).unwrap();
                }
                None => entry::encode::event_time(&mut bytes, time),
            }
            rmpv::encode::write_value(&mut bytes, &record).unwrap();
            events.push(Event::from_entry("app.web".into(), &bytes[start..]).unwrap());
        }
        (bytes, events)
    }

    pub(crate) fn stored(
        format: Format,
        compression: Compression,
        body: &[u8],
        records: u64,
    ) -> (Pointer, Vec<u8>) {
        let mut enc = Encoder::new(compression, None, Vec::new()).unwrap();
        enc.write_all(body).unwrap();
        let stored = enc.finish().unwrap();
        let p = Pointer {
            v: 1,
            chunk_id: "00".repeat(16),
            bucket: "b".into(),
            key: "k".into(),
            tag: "app.web".into(),
            timekey: 0,
            first_time: EventTime::new(1, 0),
            last_time: EventTime::new(1, 0),
            records,
            bytes: body.len() as u64,
            stored_bytes: stored.len() as u64,
            format,
            compression,
            checksum: Checksum {
                crc32c: crc::crc32c(&stored),
            },
            producer: "h".into(),
            created_at: "2026-01-01T00:00:00.000Z".into(),
            inline: None,
        };
        (p, stored)
    }

    #[test]
    fn both_formats_and_every_compression_decode_to_the_same_events() {
        let (msgpack, events) = body();
        let mut json = Vec::new();
        body::write_json_lines("app.web", &msgpack, &mut json).unwrap();
        for c in [Compression::Zstd, Compression::Gzip, Compression::None] {
            let (p, bytes) = stored(Format::Msgpack, c, &msgpack, 5);
            assert_eq!(verify_and_decode(&p, &bytes).unwrap(), events, "{c:?}");
            let (p, bytes) = stored(Format::Json, c, &json, 5);
            let decoded = verify_and_decode(&p, &bytes).unwrap();
            // bin becomes a string in JSON; everything else survives.
            for (d, e) in decoded.iter().zip(&events) {
                assert_eq!((d.tag(), d.time()), (e.tag(), e.time()), "{c:?}");
                assert_eq!(d.record_json(), e.record_json());
                assert_eq!(d.metadata_json(), e.metadata_json());
            }
            assert_eq!(decoded.len(), 5);
        }
    }

    #[test]
    fn entries_split_across_reads_and_larger_than_a_block() {
        let mut body = Vec::new();
        let mut want = Vec::new();
        for i in 0..40u32 {
            let size = if i % 10 == 3 { 3 * READ_BLOCK } else { 7000 };
            let entry = rmpv::Value::Array(vec![
                i.into(),
                rmpv::Value::Map(vec![("pad".into(), "x".repeat(size).into())]),
            ]);
            rmpv::encode::write_value(&mut body, &entry).unwrap();
            want.push(u64::from(i));
        }
        let (p, bytes) = stored(Format::Msgpack, Compression::Gzip, &body, 40);
        let gauge = Gauge::default();
        let mut events = Vec::new();
        assert_eq!(
            decode_object(&p, &bytes[..], &gauge, &mut events).unwrap(),
            Outcome::Verified
        );
        let secs: Vec<u64> = events.iter().map(|e| e.time().secs as u64).collect();
        assert_eq!(secs, want);
        // One large entry plus a block or two, never the body (about 1 MiB here).
        assert!(gauge.peak() < (5 * READ_BLOCK) as u64, "{}", gauge.peak());
        assert!(body.len() > 12 * READ_BLOCK);
    }

    /// `[[time], {}]`: a time slot that is an array of one (the forward protocol's "array of
    /// 1 or more"), with no metadata after the time.
    #[test]
    fn a_time_slot_of_the_time_alone_is_read_without_metadata() {
        let mut body = vec![0x92, 0x91, 0xd7, 0x00];
        body.extend_from_slice(&1_763_740_800u32.to_be_bytes());
        body.extend_from_slice(&0u32.to_be_bytes());
        body.push(0x80);
        let (p, bytes) = stored(Format::Msgpack, Compression::None, &body, 1);
        let events = verify_and_decode(&p, &bytes).unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].time(), EventTime::new(1_763_740_800, 0));
        assert_eq!(events[0].metadata_json(), None);
    }

    #[test]
    fn every_check_is_made_and_damage_is_reported_as_damage() {
        let (msgpack, _) = body();
        let (p, bytes) = stored(Format::Msgpack, Compression::Zstd, &msgpack, 5);

        let mut corrupt = bytes.clone();
        corrupt[bytes.len() / 2] ^= 0xff;
        let err = verify_and_decode(&p, &corrupt).unwrap_err();
        assert!(matches!(err, Error::ChecksumMismatch { .. }), "{err}");

        let err = verify_and_decode(&p, &bytes[..bytes.len() - 3]).unwrap_err();
        assert!(
            matches!(
                err,
                Error::SizeMismatch {
                    what: "stored object bytes",
                    ..
                }
            ),
            "{err}"
        );

        let mut count = p.clone();
        count.records = 6;
        let err = verify_and_decode(&count, &bytes).unwrap_err();
        assert!(
            matches!(
                err,
                Error::SizeMismatch {
                    what: "event count",
                    expected: 6,
                    actual: 5
                }
            ),
            "{err}"
        );

        let mut size = p.clone();
        size.bytes += 1;
        let err = verify_and_decode(&size, &bytes).unwrap_err();
        assert!(
            matches!(
                err,
                Error::SizeMismatch {
                    what: "decompressed body bytes",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn undecodable_bodies_with_a_good_checksum_are_decode_errors() {
        let (msgpack, _) = body();
        let cut = &msgpack[..msgpack.len() - 2];
        let (p, bytes) = stored(Format::Msgpack, Compression::None, cut, 5);
        let err = verify_and_decode(&p, &bytes).unwrap_err();
        assert!(
            matches!(&err, Error::Decode(m) if m.contains("ends inside")),
            "{err}"
        );

        let mut json = Vec::new();
        body::write_json_lines("app.other", &body().0, &mut json).unwrap();
        let (p, bytes) = stored(Format::Json, Compression::None, &json, 5);
        let err = verify_and_decode(&p, &bytes).unwrap_err();
        assert!(
            matches!(&err, Error::Decode(m) if m.contains("in a chunk of \"app.web\"")),
            "{err}"
        );

        let (p, bytes) = stored(Format::Json, Compression::Gzip, b"{\"time\":1}\n", 1);
        assert!(matches!(
            verify_and_decode(&p, &bytes),
            Err(Error::Decode(_))
        ));

        let mut p = p;
        p.compression = Compression::Zstd;
        assert!(matches!(
            verify_and_decode(&p, &bytes),
            Err(Error::Decompress(_))
        ));
    }

    #[test]
    fn records_and_metadata_nesting_too_deeply_are_decode_errors() {
        // `{"x": [[...[1]...]]}`, nesting `depth` deep (the map itself is depth 1).
        let deep = |depth: usize| {
            let mut map = vec![0x81, 0xa1, b'x'];
            map.extend(std::iter::repeat_n(0x91, depth - 1));
            map.push(0x01);
            map
        };
        let time = EventTime::new(1_763_740_800, 0);
        for depth in [crate::MAX_NESTING, crate::MAX_NESTING + 1] {
            let mut in_record = vec![0x92];
            entry::encode::event_time(&mut in_record, time);
            in_record.extend(deep(depth));
            let mut in_metadata = vec![0x92, 0x92];
            entry::encode::event_time(&mut in_metadata, time);
            in_metadata.extend(deep(depth));
            in_metadata.push(0x80);
            for body in [in_record, in_metadata] {
                let (p, bytes) = stored(Format::Msgpack, Compression::None, &body, 1);
                let decoded = verify_and_decode(&p, &bytes);
                if depth <= crate::MAX_NESTING {
                    assert_eq!(decoded.unwrap().len(), 1);
                } else {
                    let err = decoded.unwrap_err();
                    assert!(
                        matches!(&err, Error::Decode(m) if m.contains("nests too deeply")),
                        "{err}"
                    );
                }
                // The same verdict as an event made from the entry alone.
                assert_eq!(
                    Event::from_entry("t".into(), &body).is_ok(),
                    depth <= crate::MAX_NESTING
                );
            }
        }
    }

    /// A `json` body's records nest as deeply as msgpack ones may, beyond serde_json's own
    /// limit of 128 (the sidecar takes such events, and writes them as JSON in `json` bodies);
    /// deeper is a decode error.
    #[test]
    fn json_lines_nest_as_deeply_as_msgpack_entries() {
        let time = EventTime::new(1_763_740_800, 0);
        let mut entry = vec![0x92];
        entry::encode::event_time(&mut entry, time);
        // `{"x": [[...[1]...]]}`, nesting MAX_NESTING deep, with brackets in a string.
        entry.extend([0x82, 0xa1, b'y', 0xa2, b'[', b'"', 0xa1, b'x']);
        entry.extend(std::iter::repeat_n(0x91, crate::MAX_NESTING - 1));
        entry.push(0x01);
        let mut deepest = Vec::new();
        body::write_json_lines("app.web", &entry, &mut deepest).unwrap();
        // One level more: `"x": [` ... `]`.
        let text = String::from_utf8(deepest.clone()).unwrap();
        let text = text.trim_end();
        let (head, tail) = text.split_at(text.len() - 2);
        let deeper = format!("{}]{tail}\n", head.replacen(r#""x":"#, r#""x":["#, 1));
        for (body, ok) in [(deepest, true), (deeper.into_bytes(), false)] {
            let (p, bytes) = stored(Format::Json, Compression::None, &body, 1);
            match verify_and_decode(&p, &bytes) {
                Ok(events) if ok => assert_eq!(events.len(), 1),
                Err(Error::Decode(m)) if !ok => assert!(m.contains("nests too deeply"), "{m}"),
                other => panic!("{ok}: {other:?}"),
            }
        }
    }

    #[test]
    fn the_pulling_decoder_gives_the_same_events_and_the_failure_last() {
        let (msgpack, events) = body();
        let mut json = Vec::new();
        body::write_json_lines("app.web", &msgpack, &mut json).unwrap();
        for c in [Compression::Zstd, Compression::Gzip, Compression::None] {
            let (p, bytes) = stored(Format::Msgpack, c, &msgpack, 5);
            let pulled: Vec<Event> = Decoder::new(&p, &bytes[..])
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            assert_eq!(pulled, events, "{c:?}");
            verify(&p, &bytes[..]).unwrap();

            let (p, bytes) = stored(Format::Json, c, &json, 5);
            let mut batches = Decoder::new(&p, &bytes[..]).unwrap();
            let mut all = Vec::new();
            while batches.next_batch(&mut all).unwrap() {}
            assert_eq!(all.len(), 5, "{c:?}");

            let mut damaged = bytes.clone();
            let last = damaged.len() - 1;
            damaged[last] ^= 1;
            let items: Vec<_> = Decoder::new(&p, &damaged[..]).unwrap().collect();
            let (last, _) = items.split_last().unwrap();
            assert!(
                matches!(
                    last,
                    Err(Error::ChecksumMismatch { .. } | Error::Decompress(_))
                ),
                "{c:?}: {last:?}"
            );
            assert!(verify(&p, &damaged[..]).is_err());
        }
    }

    /// `n` entries of every size across many 64 KiB reads, one in the middle larger than
    /// three reads, Fluent Bit metadata on the odd ones; and where each entry starts.
    fn many_reads_body(n: usize) -> (Vec<u8>, Vec<usize>) {
        let mut msgpack = Vec::new();
        let mut starts = Vec::new();
        for i in 0..n {
            let len = if i == n / 2 { 3 * READ_BLOCK } else { i % 700 };
            let record = rmpv::Value::Map(vec![("m".into(), "x".repeat(len).into())]);
            starts.push(msgpack.len());
            msgpack.push(0x92);
            let time = EventTime::new(1, i as u32);
            if i % 2 == 1 {
                msgpack.push(0x92);
                entry::encode::event_time(&mut msgpack, time);
                let meta = rmpv::Value::Map(vec![("pod".into(), i.into())]);
                rmpv::encode::write_value(&mut msgpack, &meta).unwrap();
            } else {
                entry::encode::event_time(&mut msgpack, time);
            }
            rmpv::encode::write_value(&mut msgpack, &record).unwrap();
        }
        (msgpack, starts)
    }

    #[test]
    fn verifying_without_events_agrees_with_decoding_across_many_reads() {
        // The verification pass (no events made) counts and checks what decoding does.
        let (msgpack, starts) = many_reads_body(3000);
        let n = starts.len() as u64;
        // A malformed entry two thirds of the way through (an even one, without metadata):
        // nil where the time goes.
        let mut bad = msgpack.clone();
        bad[starts[2000] + 1] = 0xc0;
        for c in [Compression::Zstd, Compression::Gzip, Compression::None] {
            let (p, bytes) = stored(Format::Msgpack, c, &msgpack, n);
            assert_eq!(verify_and_decode(&p, &bytes).unwrap().len() as u64, n);
            verify(&p, &bytes[..]).unwrap();

            let mut more = p.clone();
            more.records = n + 1;
            let decoded = verify_and_decode(&more, &bytes).unwrap_err();
            let verified = verify(&more, &bytes[..]).unwrap_err();
            assert_eq!(verified.to_string(), decoded.to_string(), "{c:?}");
            assert!(matches!(
                verified,
                Error::SizeMismatch {
                    what: "event count",
                    ..
                }
            ));

            let (p, bytes) = stored(Format::Msgpack, c, &bad, n);
            let decoded = verify_and_decode(&p, &bytes).unwrap_err();
            let verified = verify(&p, &bytes[..]).unwrap_err();
            assert_eq!(verified.to_string(), decoded.to_string(), "{c:?}");
            assert!(matches!(verified, Error::Decode(_)), "{c:?}: {verified}");
        }
    }

    #[test]
    fn blocks_hand_out_the_same_events_as_the_iterator() {
        // The same events as JSON lines too (a block per line).
        let (msgpack, _) = many_reads_body(2000);
        let mut json = Vec::new();
        body::write_json_lines("app.web", &msgpack, &mut json).unwrap();
        for (format, body) in [(Format::Msgpack, &msgpack), (Format::Json, &json)] {
            for c in [Compression::Zstd, Compression::Gzip, Compression::None] {
                let (p, bytes) = stored(format, c, body, 2000);
                let events: Vec<Event> = Decoder::new(&p, &bytes[..])
                    .unwrap()
                    .collect::<Result<_, _>>()
                    .unwrap();
                let mut decoder = Decoder::new(&p, &bytes[..]).unwrap();
                let mut seen = 0;
                let mut blocks = 0;
                while let Some(block) = decoder.next_block().unwrap() {
                    assert!(!block.is_empty());
                    assert_eq!(block.tag(), "app.web");
                    assert_eq!(block.iter().len(), block.len());
                    for (r, e) in block.iter().zip(&events[seen..]) {
                        assert_eq!((r.tag(), r.time()), (e.tag(), e.time()), "{format:?} {c:?}");
                        assert_eq!(r.record_msgpack(), e.record_msgpack());
                        assert_eq!(r.metadata_msgpack(), e.metadata_msgpack());
                        assert_eq!(r.entry_msgpack(), e.entry_msgpack());
                        assert_eq!(r.record(), e.record());
                        assert_eq!(r.metadata(), e.metadata());
                        assert_eq!(r.record_json(), e.record_json());
                        let m: std::collections::BTreeMap<&str, &str> =
                            r.deserialize_record().unwrap();
                        assert_eq!(m.len(), 1);
                        assert_eq!(&r.to_event(), e);
                    }
                    seen += block.len();
                    blocks += 1;
                }
                assert_eq!(seen, events.len(), "{format:?} {c:?}");
                assert!(decoder.next_block().unwrap().is_none());
                if format == Format::Msgpack {
                    assert!(blocks < 200, "{blocks} blocks: events of a read share one");
                }

                // A damaged object: the failure comes last, as from the iterator.
                let mut damaged = bytes.clone();
                let last = damaged.len() - 1;
                damaged[last] ^= 1;
                let mut decoder = Decoder::new(&p, &damaged[..]).unwrap();
                let failed = loop {
                    match decoder.next_block() {
                        Ok(Some(_)) => {}
                        Ok(None) => panic!("{format:?} {c:?}: a damaged object passed"),
                        Err(e) => break e,
                    }
                };
                assert!(
                    matches!(
                        failed,
                        Error::ChecksumMismatch { .. } | Error::Decompress(_)
                    ),
                    "{format:?} {c:?}: {failed}"
                );
                assert!(decoder.next_block().unwrap().is_none());
            }
        }

        // Events the iterator decoded but did not hand out come first, then blocks.
        let (p, bytes) = stored(Format::Msgpack, Compression::None, &msgpack, 2000);
        let mut decoder = Decoder::new(&p, &bytes[..]).unwrap();
        let first = decoder.next().unwrap().unwrap();
        let mut rest = Vec::new();
        while let Some(block) = decoder.next_block().unwrap() {
            rest.extend(block.iter().map(|r| r.to_event()));
        }
        let all: Vec<Event> = Decoder::new(&p, &bytes[..])
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(std::iter::once(first).chain(rest).collect::<Vec<_>>(), all);
    }

    #[test]
    fn a_stopping_sink_ends_the_pass_unchecked() {
        struct First(usize);
        impl Sink for First {
            fn event(&mut self, _: Event) -> bool {
                self.0 += 1;
                false
            }
        }
        let (msgpack, _) = body();
        let (p, bytes) = stored(Format::Msgpack, Compression::Zstd, &msgpack, 5);
        let mut sink = First(0);
        assert_eq!(
            decode_object(&p, &bytes[..], &Gauge::default(), &mut sink).unwrap(),
            Outcome::Stopped
        );
        assert_eq!(sink.0, 1);
    }

    #[test]
    fn a_failing_transport_is_an_s3_error() {
        struct Broken<'a>(&'a [u8]);
        impl Read for Broken<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                if self.0.is_empty() {
                    return Err(io::Error::new(io::ErrorKind::ConnectionReset, "reset"));
                }
                let n = buf.len().min(self.0.len()).min(7);
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let (msgpack, _) = body();
        let (p, bytes) = stored(Format::Msgpack, Compression::Gzip, &msgpack, 5);
        let half = Broken(&bytes[..bytes.len() / 2]);
        let err = decode_object(&p, half, &Gauge::default(), &mut Vec::new()).unwrap_err();
        assert!(matches!(err, Error::S3 { .. }), "{err}");
        assert!(!err.is_chunk_error());
    }
}
