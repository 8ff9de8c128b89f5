//! Fluentd event entries, scanned without decoding.
//!
//! A chunk body in the `msgpack` format is the Fluentd buffer format: concatenated msgpack
//! `[time, record]` arrays, exactly as a forward client sent them. This module finds entry
//! boundaries and event times by walking the msgpack framing only; records are never built.
//! The sidecar uses it on ingest (to validate and split by timekey) and the consumer uses it to
//! cut a body into events.
//!
//! ```text
//! entry  ::= array(2) [ time, record ]          any array header width (fix, 16, 32)
//! time   ::= uint | EventTime | array [ uint|EventTime, map... ]    (the last form: forward v1.5)
//! EventTime ::= ext type 0, 8 bytes: seconds u32 BE, nanoseconds u32 BE (fixext8 or ext8)
//! record ::= map
//! ```
//!
//! Of this module, [`EventTime`] is the consumer's API. The scanner and the encoder are shared
//! with the sidecar, which needs them on ingest; they are hidden from the documentation and not
//! part of the crate's stable API.

use std::fmt;

use rmp::Marker;
use smallvec::SmallVec;

/// Why a byte slice is not (yet) a msgpack value or a valid entry.
#[doc(hidden)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScanError {
    /// The slice ends inside the value: read more bytes.
    Incomplete,
    /// The bytes can never become a valid value or entry; the reason is for logs.
    Invalid(&'static str),
}

impl fmt::Display for ScanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ScanError::Incomplete => f.write_str("incomplete msgpack value"),
            ScanError::Invalid(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for ScanError {}

/// An event time: seconds since the Unix epoch and nanoseconds, as Fluentd's `EventTime`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct EventTime {
    pub secs: i64,
    pub nanos: u32,
}

impl EventTime {
    pub const fn new(secs: i64, nanos: u32) -> Self {
        EventTime { secs, nanos }
    }

    /// The time as RFC 3339 in UTC with nanoseconds, e.g. `2026-11-21T16:01:02.123456789Z`.
    pub fn to_rfc3339(self) -> String {
        match chrono::DateTime::from_timestamp(self.secs, self.nanos) {
            Some(t) => t.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
            None => format!("{}.{:09}", self.secs, self.nanos),
        }
    }

    /// Parses what [`EventTime::to_rfc3339`] writes (any RFC 3339 offset is accepted).
    pub fn parse_rfc3339(s: &str) -> Option<Self> {
        let t = chrono::DateTime::parse_from_rfc3339(s).ok()?;
        Some(EventTime::new(t.timestamp(), t.timestamp_subsec_nanos()))
    }

    /// Exact decimal form `secs.nanos` (nine digits), the pointer's `first_time` notation.
    pub fn to_decimal(self) -> String {
        format!("{}.{:09}", self.secs, self.nanos)
    }

    /// Parses a decimal number of seconds (`1763740801`, `1763740801.5`, `1763740801.123456789`)
    /// without going through a float, so nanoseconds survive.
    pub fn parse_decimal(s: &str) -> Option<Self> {
        let (int, frac) = match s.split_once('.') {
            Some((i, f)) => (i, f),
            None => (s, ""),
        };
        let secs: i64 = int.parse().ok()?;
        if frac.len() > 9 || !frac.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let mut nanos = 0u32;
        for i in 0..9 {
            let digit = frac.as_bytes().get(i).map_or(0, |b| u32::from(b - b'0'));
            nanos = nanos * 10 + digit;
        }
        Some(EventTime::new(secs, nanos))
    }
}

impl fmt::Display for EventTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_rfc3339())
    }
}

/// What [`scan_entry`] learned about one entry.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryInfo {
    /// Bytes taken by the whole entry.
    pub len: usize,
    /// The event time (seconds and nanoseconds; integer times have zero nanoseconds).
    pub time: EventTime,
    /// Byte range of the time slot inside the entry (a v1.5 `[time, metadata]` array included).
    pub time_slot: (usize, usize),
    /// Byte range of the record map inside the entry.
    pub record: (usize, usize),
    /// True when the time slot is the forward v1.5 form `[time, {metadata}]`.
    pub has_metadata: bool,
}

fn need(buf: &[u8], n: usize) -> Result<&[u8], ScanError> {
    buf.get(..n).ok_or(ScanError::Incomplete)
}

fn be_len(bytes: &[u8]) -> usize {
    bytes
        .iter()
        .fold(0usize, |acc, b| (acc << 8) | usize::from(*b))
}

/// What a msgpack header starts; containers are told apart because the walks count their
/// children and check their depth.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Scalar,
    Str,
    Bin,
    Ext,
    Array,
    Map,
}

/// Header of a msgpack value: its kind, how many bytes the header itself takes, how many
/// payload bytes follow it, and how many nested values follow it (array elements, map keys
/// and values).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    kind: Kind,
    header: usize,
    payload: usize,
    children: u64,
}

impl Header {
    const fn fixed(kind: Kind, header: usize, payload: usize) -> Header {
        Header {
            kind,
            header,
            payload,
            children: 0,
        }
    }

    const fn container(kind: Kind, header: usize, children: u64) -> Header {
        Header {
            kind,
            header,
            payload: 0,
            children,
        }
    }
}

/// The big-endian length of `width` (1, 2 or 4) bytes after the marker byte.
#[inline(always)]
fn length_after_marker(buf: &[u8], width: usize) -> Result<usize, ScanError> {
    let bytes = need(buf, 1 + width)?;
    Ok(match width {
        1 => usize::from(bytes[1]),
        2 => usize::from(u16::from_be_bytes([bytes[1], bytes[2]])),
        _ => u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize,
    })
}

/// Bytes taken by a value whose first byte says all of its length: a fixstr or any
/// fixed-size scalar (integers, floats, nil, booleans, fixext); zero for the others.
const FIXED_SIZE: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut b = 0usize;
    while b < 256 {
        table[b] = match b as u8 {
            0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => 1,
            0xa0..=0xbf => 1 + (b as u8 & 0x1f),
            0xcc | 0xd0 => 2,
            0xcd | 0xd1 => 3,
            0xca | 0xce | 0xd2 => 5,
            0xcb | 0xcf | 0xd3 => 9,
            0xd4 => 3,
            0xd5 => 4,
            0xd6 => 6,
            0xd7 => 10,
            0xd8 => 18,
            _ => 0,
        };
        b += 1;
    }
    table
};

/// Bytes taken by the value at `pos` when its first bytes say all of its length (see
/// [`FIXED_SIZE`]; also a str8, the usual longer string): the walks' shortcut past [`header`].
/// The value may run past the end of `buf`; the caller checks.
#[inline(always)]
fn simple_len(buf: &[u8], pos: usize) -> Option<usize> {
    let first = *buf.get(pos)?;
    match FIXED_SIZE[usize::from(first)] {
        0 if first == 0xd9 => buf.get(pos + 1).map(|&n| 2 + usize::from(n)),
        0 => None,
        n => Some(usize::from(n)),
    }
}

/// Decodes the header at the start of `buf` from its first byte (and the length bytes that
/// follow it), one match on the byte: the walks below call this once per value, inlined.
#[inline(always)]
fn header(buf: &[u8]) -> Result<Header, ScanError> {
    use Kind::*;
    let first = *buf.first().ok_or(ScanError::Incomplete)?;
    let sized = |kind, width: usize, extra: usize| -> Result<Header, ScanError> {
        let len = length_after_marker(buf, width)?;
        Ok(Header::fixed(kind, 1 + width + extra, len))
    };
    let counted = |kind, width: usize, per: u64| -> Result<Header, ScanError> {
        let n = length_after_marker(buf, width)? as u64;
        Ok(Header::container(kind, 1 + width, n * per))
    };
    Ok(match first {
        // positive and negative fixint, nil, false, true
        0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => Header::fixed(Scalar, 1, 0),
        0x80..=0x8f => Header::container(Map, 1, 2 * u64::from(first & 0x0f)),
        0x90..=0x9f => Header::container(Array, 1, u64::from(first & 0x0f)),
        0xa0..=0xbf => Header::fixed(Str, 1, usize::from(first & 0x1f)),
        0xc1 => return Err(ScanError::Invalid("reserved msgpack byte 0xc1")),
        0xc4 => sized(Bin, 1, 0)?,
        0xc5 => sized(Bin, 2, 0)?,
        0xc6 => sized(Bin, 4, 0)?,
        // ext 8/16/32: the length, then one type byte, then the data
        0xc7 => sized(Ext, 1, 1)?,
        0xc8 => sized(Ext, 2, 1)?,
        0xc9 => sized(Ext, 4, 1)?,
        0xca => Header::fixed(Scalar, 1, 4), // float 32
        0xcb => Header::fixed(Scalar, 1, 8), // float 64
        0xcc | 0xd0 => Header::fixed(Scalar, 1, 1),
        0xcd | 0xd1 => Header::fixed(Scalar, 1, 2),
        0xce | 0xd2 => Header::fixed(Scalar, 1, 4),
        0xcf | 0xd3 => Header::fixed(Scalar, 1, 8),
        // fixext 1/2/4/8/16: one type byte, then the data
        0xd4 => Header::fixed(Ext, 2, 1),
        0xd5 => Header::fixed(Ext, 2, 2),
        0xd6 => Header::fixed(Ext, 2, 4),
        0xd7 => Header::fixed(Ext, 2, 8),
        0xd8 => Header::fixed(Ext, 2, 16),
        0xd9 => sized(Str, 1, 0)?,
        0xda => sized(Str, 2, 0)?,
        0xdb => sized(Str, 4, 0)?,
        0xdc => counted(Array, 2, 1)?,
        0xdd => counted(Array, 4, 1)?,
        0xde => counted(Map, 2, 2)?,
        0xdf => counted(Map, 4, 2)?,
    })
}

/// Length in bytes of the msgpack value at the start of `buf`, found without decoding it.
///
/// Runs in time linear in the bytes it looks at and without recursion, so hostile nesting or
/// huge declared lengths cost nothing but `Incomplete`.
#[doc(hidden)]
pub fn value_len(buf: &[u8]) -> Result<usize, ScanError> {
    match ValueScanner::default().advance(buf)? {
        Some(len) => Ok(len),
        None => Err(ScanError::Incomplete),
    }
}

/// A resumable [`value_len`]: feed it the same growing buffer after every read and it goes on
/// from where it stopped, so a large request arriving in many reads is scanned once.
#[doc(hidden)]
#[derive(Debug, Clone)]
pub struct ValueScanner {
    pos: usize,
    pending: u64,
    /// Where the part that did not fit ends, as far as its header says (see `wanted`).
    wanted: usize,
}

impl Default for ValueScanner {
    fn default() -> Self {
        ValueScanner {
            pos: 0,
            pending: 1,
            wanted: 0,
        }
    }
}

impl ValueScanner {
    /// `Some(len)` once the whole value is in `buf`, `None` if more bytes are needed. `buf`
    /// must start with the same bytes as on earlier calls.
    pub fn advance(&mut self, buf: &[u8]) -> Result<Option<usize>, ScanError> {
        // The walk runs on locals, stored back when it stops: one value per turn, no stores.
        let (mut pos, mut pending) = (self.pos, self.pending);
        let result = loop {
            if pending == 0 {
                break Ok(Some(pos));
            }
            // Most values in a record are strings and numbers: their first bytes say all.
            if let Some(len) = simple_len(buf, pos) {
                let end = pos + len;
                if end > buf.len() {
                    self.wanted = end;
                    break Ok(None);
                }
                (pos, pending) = (end, pending - 1);
                continue;
            }
            let h = match header(buf.get(pos..).unwrap_or_default()) {
                Ok(h) => h,
                Err(ScanError::Incomplete) => {
                    self.wanted = buf.len() + 1;
                    break Ok(None);
                }
                Err(e) => break Err(e),
            };
            let Some(end) = pos
                .checked_add(h.header)
                .and_then(|p| p.checked_add(h.payload))
            else {
                break Err(ScanError::Invalid("msgpack length overflows"));
            };
            if end > buf.len() {
                self.wanted = end;
                break Ok(None);
            }
            pos = end;
            pending = pending - 1 + h.children;
        };
        (self.pos, self.pending) = (pos, pending);
        result
    }

    /// After `advance` returned `None`: the length `buf` must reach before the scan can go
    /// on, which is where the value's part that did not fit ends (as its header says), or one
    /// byte more when not even its header fits. A lower bound of the whole value's length:
    /// for a forward request whose entries are one `bin` or `str`, the end of its entries,
    /// known as soon as their header has arrived.
    pub fn wanted(&self) -> usize {
        self.wanted
    }

    /// Bytes known to belong to the value so far.
    pub fn scanned(&self) -> usize {
        self.pos
    }
}

/// Checks that arrays and maps in the value at the start of `buf` nest at most `limit` deep
/// (a scalar is depth 0, `[1]` is 1, `[[1]]` is 2).
///
/// Like [`value_len`] it walks the framing without recursion, and it stops as soon as the
/// limit is passed, so a body of nothing but nested array headers costs no more than its bytes.
#[doc(hidden)]
pub fn check_depth(buf: &[u8], limit: usize) -> Result<(), ScanError> {
    value_len_within(buf, limit).map(|_| ())
}

/// [`value_len`] that also makes the checks of [`check_depth`]: one walk for both.
#[doc(hidden)]
pub fn value_len_within(buf: &[u8], limit: usize) -> Result<usize, ScanError> {
    // Values still to read at each open level: `top` for the innermost (starting with the value
    // itself), `outer` for the levels around it. The first levels live inline, so that the
    // usual record (a map nesting a few levels) costs no allocation: the consumer checks every
    // event this way.
    let mut outer: SmallVec<[u64; 16]> = SmallVec::new();
    let mut top: u64 = 1;
    let mut pos = 0usize;
    loop {
        if top == 0 {
            match outer.pop() {
                Some(count) => {
                    top = count;
                    continue;
                }
                None => break,
            }
        }
        top -= 1;
        if let Some(len) = simple_len(buf, pos) {
            pos += len;
            continue;
        }
        let h = header(buf.get(pos..).unwrap_or_default())?;
        pos = pos
            .checked_add(h.header)
            .and_then(|p| p.checked_add(h.payload))
            .ok_or(ScanError::Invalid("msgpack length overflows"))?;
        if matches!(h.kind, Kind::Array | Kind::Map) {
            // This container sits at depth `outer.len() + 1`.
            if outer.len() >= limit {
                return Err(ScanError::Invalid("msgpack value nests too deeply"));
            }
            if h.children > 0 {
                outer.push(top);
                top = h.children;
            }
        }
    }
    if pos > buf.len() {
        return Err(ScanError::Incomplete);
    }
    Ok(pos)
}

/// Number of elements if `buf` starts with an array header, and the header's length.
#[doc(hidden)]
pub fn array_header(buf: &[u8]) -> Result<Option<(u64, usize)>, ScanError> {
    let h = header(buf)?;
    Ok((h.kind == Kind::Array).then_some((h.children, h.header)))
}

/// Number of pairs if `buf` starts with a map header, and the header's length.
#[doc(hidden)]
pub fn map_header(buf: &[u8]) -> Result<Option<(u64, usize)>, ScanError> {
    let h = header(buf)?;
    Ok((h.kind == Kind::Map).then_some((h.children / 2, h.header)))
}

/// The payload of a msgpack str or bin at the start of `buf`: `(header_len, payload_len)`.
#[doc(hidden)]
pub fn str_or_bin(buf: &[u8]) -> Result<Option<(usize, usize)>, ScanError> {
    let h = header(buf)?;
    Ok(matches!(h.kind, Kind::Str | Kind::Bin).then_some((h.header, h.payload)))
}

/// Reads a plain time: an unsigned integer or an EventTime ext. `Ok(None)` means "not a time".
fn plain_time(buf: &[u8]) -> Result<Option<(EventTime, usize)>, ScanError> {
    let h = header(buf)?;
    let marker = Marker::from_u8(buf[0]);
    let total = h.header + h.payload;
    let body = need(buf, total)?;
    let int = |bytes: &[u8]| EventTime::new(be_len(bytes) as i64, 0);
    let time = match marker {
        Marker::FixPos(n) => EventTime::new(i64::from(n), 0),
        Marker::U8 | Marker::U16 | Marker::U32 => int(&body[1..]),
        Marker::U64 => {
            let v = u64::from_be_bytes(body[1..9].try_into().expect("8 bytes"));
            match i64::try_from(v) {
                Ok(secs) => EventTime::new(secs, 0),
                Err(_) => return Ok(None),
            }
        }
        // Signed encodings are accepted when the value is not negative (some encoders use them).
        Marker::I8 | Marker::I16 | Marker::I32 | Marker::I64 => {
            let bytes = &body[1..];
            let mut v: i64 = if bytes[0] & 0x80 != 0 { -1 } else { 0 };
            for b in bytes {
                v = (v << 8) | i64::from(*b);
            }
            if v < 0 {
                return Ok(None);
            }
            EventTime::new(v, 0)
        }
        Marker::FixExt8 | Marker::Ext8 | Marker::Ext16 | Marker::Ext32 if h.payload == 8 => {
            let type_at = h.header - 1;
            if body[type_at] != 0 {
                return Ok(None);
            }
            let data = &body[h.header..total];
            let secs = u32::from_be_bytes(data[..4].try_into().expect("4 bytes"));
            let nanos = u32::from_be_bytes(data[4..].try_into().expect("4 bytes"));
            if nanos >= 1_000_000_000 {
                return Ok(None);
            }
            EventTime::new(i64::from(secs), nanos)
        }
        _ => return Ok(None),
    };
    Ok(Some((time, total)))
}

/// Scans one `[time, record]` entry at the start of `buf`.
///
/// `Invalid` names what is wrong with the entry (for Fluentd-style `skip_invalid_event`
/// logging); the entry's length is then still found by [`value_len`] when the caller wants
/// to skip it.
#[doc(hidden)]
pub fn scan_entry(buf: &[u8]) -> Result<EntryInfo, ScanError> {
    scan(buf, None)
}

/// [`scan_entry`] that also checks, in the same walk, that the record and any metadata nest
/// at most `limit` deep ([`check_depth`]): what the consumer needs of every entry, for the
/// price of one walk rather than two.
#[doc(hidden)]
pub fn scan_entry_within(buf: &[u8], limit: usize) -> Result<EntryInfo, ScanError> {
    scan(buf, Some(limit))
}

fn scan(buf: &[u8], depth_limit: Option<usize>) -> Result<EntryInfo, ScanError> {
    let len_of = |value: &[u8]| match depth_limit {
        Some(limit) => value_len_within(value, limit),
        None => value_len(value),
    };
    // The usual entry, as Fluentd and Fluent Bit write it: `[EventTime, record]`, a fixarray
    // of 2 and a fixext8 of type 0, read here without decoding their headers.
    if let [0x92, 0xd7, 0x00, s0, s1, s2, s3, n0, n1, n2, n3, ..] = *buf {
        let nanos = u32::from_be_bytes([n0, n1, n2, n3]);
        if nanos < 1_000_000_000 {
            let time = EventTime::new(i64::from(u32::from_be_bytes([s0, s1, s2, s3])), nanos);
            return record_after(buf, 1, 11, time, false, len_of);
        }
    }
    let (n, mut pos) = array_header(buf)?.ok_or(ScanError::Invalid("entry is not an array"))?;
    if n != 2 {
        return Err(ScanError::Invalid("entry is not a [time, record] pair"));
    }
    let slot_start = pos;
    let (time, has_metadata) = match plain_time(&buf[pos..])? {
        Some((time, len)) => {
            pos += len;
            (time, false)
        }
        None => match array_header(&buf[pos..])? {
            // Forward protocol v1.5: `[EventTime, {metadata}]` in the time slot (`[EventTime]`
            // alone has none).
            Some((m, hlen)) if m >= 1 => {
                pos += hlen;
                let (time, len) = plain_time(&buf[pos..])?.ok_or(ScanError::Invalid(
                    "event time is not an integer or EventTime",
                ))?;
                pos += len;
                for _ in 1..m {
                    if map_header(&buf[pos..])?.is_none() {
                        return Err(ScanError::Invalid("event metadata is not a map"));
                    }
                    pos += len_of(&buf[pos..])?;
                }
                (time, m > 1)
            }
            _ => {
                return Err(ScanError::Invalid(
                    "event time is not an integer or EventTime",
                ))
            }
        },
    };
    record_after(buf, slot_start, pos, time, has_metadata, len_of)
}

/// The rest of [`scan`] once the time slot (`slot_start..pos`) is read: the record map.
#[inline(always)]
fn record_after(
    buf: &[u8],
    slot_start: usize,
    pos: usize,
    time: EventTime,
    has_metadata: bool,
    len_of: impl Fn(&[u8]) -> Result<usize, ScanError>,
) -> Result<EntryInfo, ScanError> {
    if map_header(&buf[pos..])?.is_none() {
        return Err(ScanError::Invalid("record is not a map"));
    }
    let record_len = len_of(&buf[pos..])?;
    Ok(EntryInfo {
        len: pos + record_len,
        time,
        time_slot: (slot_start, pos),
        record: (pos, pos + record_len),
        has_metadata,
    })
}

/// Iterates over the entries of a complete body, yielding each entry's bytes and info.
///
/// Stops with an error at the first invalid or truncated entry; bodies written by the sidecar
/// only ever contain entries that passed [`scan_entry`].
#[doc(hidden)]
pub fn entries(body: &[u8]) -> impl Iterator<Item = Result<(&[u8], EntryInfo), ScanError>> {
    let mut rest = body;
    let mut failed = false;
    std::iter::from_fn(move || {
        if rest.is_empty() || failed {
            return None;
        }
        match scan_entry(rest) {
            Ok(info) => {
                let (entry, tail) = rest.split_at(info.len);
                rest = tail;
                Some(Ok((entry, info)))
            }
            Err(e) => {
                failed = true;
                Some(Err(e))
            }
        }
    })
}

/// Encoders used by tests and tools to build entries by hand.
#[doc(hidden)]
pub mod encode {
    use super::EventTime;

    /// `EventTime` as fixext8 (`d7 00 <secs> <nanos>`), the form Fluentd and Fluent Bit send.
    pub fn event_time(buf: &mut Vec<u8>, t: EventTime) {
        buf.extend_from_slice(&[0xd7, 0x00]);
        buf.extend_from_slice(&(t.secs as u32).to_be_bytes());
        buf.extend_from_slice(&t.nanos.to_be_bytes());
    }

    /// `EventTime` as ext8 (`c7 08 00 <secs> <nanos>`), which the protocol also allows.
    pub fn event_time_ext8(buf: &mut Vec<u8>, t: EventTime) {
        buf.extend_from_slice(&[0xc7, 0x08, 0x00]);
        buf.extend_from_slice(&(t.secs as u32).to_be_bytes());
        buf.extend_from_slice(&t.nanos.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pack(v: &rmpv::Value) -> Vec<u8> {
        let mut buf = Vec::new();
        rmpv::encode::write_value(&mut buf, v).unwrap();
        buf
    }

    fn record() -> rmpv::Value {
        rmpv::Value::Map(vec![("msg".into(), "hello".into()), ("n".into(), 7.into())])
    }

    /// The header as rmp's `Marker` classifies the first byte, spelled out from the msgpack
    /// specification: `header`'s one-match decoding must agree with it on every byte.
    fn header_by_marker(buf: &[u8]) -> Result<Header, ScanError> {
        use Kind::*;
        let len = |width: usize| length_after_marker(buf, width);
        Ok(match Marker::from_u8(buf[0]) {
            Marker::FixPos(_) | Marker::FixNeg(_) | Marker::Null | Marker::True | Marker::False => {
                Header::fixed(Scalar, 1, 0)
            }
            Marker::U8 | Marker::I8 => Header::fixed(Scalar, 1, 1),
            Marker::U16 | Marker::I16 => Header::fixed(Scalar, 1, 2),
            Marker::U32 | Marker::I32 | Marker::F32 => Header::fixed(Scalar, 1, 4),
            Marker::U64 | Marker::I64 | Marker::F64 => Header::fixed(Scalar, 1, 8),
            Marker::FixStr(n) => Header::fixed(Str, 1, usize::from(n)),
            Marker::Str8 => Header::fixed(Str, 2, len(1)?),
            Marker::Str16 => Header::fixed(Str, 3, len(2)?),
            Marker::Str32 => Header::fixed(Str, 5, len(4)?),
            Marker::Bin8 => Header::fixed(Bin, 2, len(1)?),
            Marker::Bin16 => Header::fixed(Bin, 3, len(2)?),
            Marker::Bin32 => Header::fixed(Bin, 5, len(4)?),
            Marker::FixExt1 => Header::fixed(Ext, 2, 1),
            Marker::FixExt2 => Header::fixed(Ext, 2, 2),
            Marker::FixExt4 => Header::fixed(Ext, 2, 4),
            Marker::FixExt8 => Header::fixed(Ext, 2, 8),
            Marker::FixExt16 => Header::fixed(Ext, 2, 16),
            Marker::Ext8 => Header::fixed(Ext, 3, len(1)?),
            Marker::Ext16 => Header::fixed(Ext, 4, len(2)?),
            Marker::Ext32 => Header::fixed(Ext, 6, len(4)?),
            Marker::FixArray(n) => Header::container(Array, 1, u64::from(n)),
            Marker::Array16 => Header::container(Array, 3, len(2)? as u64),
            Marker::Array32 => Header::container(Array, 5, len(4)? as u64),
            Marker::FixMap(n) => Header::container(Map, 1, 2 * u64::from(n)),
            Marker::Map16 => Header::container(Map, 3, 2 * len(2)? as u64),
            Marker::Map32 => Header::container(Map, 5, 2 * len(4)? as u64),
            Marker::Reserved => return Err(ScanError::Invalid("reserved msgpack byte 0xc1")),
        })
    }

    #[test]
    fn header_agrees_with_the_marker_table_on_every_first_byte() {
        for first in 0..=255u8 {
            // Length bytes that differ per width, and every truncation of them.
            let full = [first, 0x01, 0x82, 0x03, 0xf4];
            for cut in 1..=full.len() {
                let buf = &full[..cut];
                assert_eq!(
                    header(buf),
                    header_by_marker(buf),
                    "first byte {first:#04x}, {cut} bytes"
                );
            }
        }
        assert_eq!(header(&[]), Err(ScanError::Incomplete));
    }

    #[test]
    fn the_shortcut_agrees_with_header_where_it_applies() {
        for first in 0..=255u8 {
            let buf = [first, 0x21, 0, 0, 0, 0];
            if let Some(len) = simple_len(&buf, 0) {
                let h = header(&buf).unwrap();
                assert_eq!(len, h.header + h.payload, "first byte {first:#04x}");
                assert!(matches!(h.kind, Kind::Scalar | Kind::Str | Kind::Ext));
            }
        }
        // A str8 whose length byte has not arrived yet takes the long way (and waits).
        assert_eq!(simple_len(&[0xd9], 0), None);
        assert_eq!(simple_len(&[], 0), None);
    }

    #[test]
    fn value_len_matches_encoder_for_every_kind() {
        let values = vec![
            rmpv::Value::Nil,
            true.into(),
            5.into(),
            (-3).into(),
            300.into(),
            70000.into(),
            (u64::MAX).into(),
            (i64::MIN).into(),
            1.5f32.into(),
            2.5f64.into(),
            "x".repeat(40).into(),
            "y".repeat(300).into(),
            "z".repeat(70000).into(),
            rmpv::Value::Binary(vec![1; 300]),
            rmpv::Value::Ext(0, vec![0; 8]),
            rmpv::Value::Ext(5, vec![0; 3]),
            rmpv::Value::Ext(-1, vec![0; 12]),
            rmpv::Value::Array(vec![1.into(); 20]),
            rmpv::Value::Map((0..20).map(|i| (i.into(), record())).collect()),
        ];
        for v in values {
            let bytes = pack(&v);
            assert_eq!(value_len(&bytes), Ok(bytes.len()), "{v:?}");
            for cut in 0..bytes.len() {
                assert_eq!(
                    value_len(&bytes[..cut]),
                    Err(ScanError::Incomplete),
                    "{v:?} cut {cut}"
                );
            }
        }
    }

    #[test]
    fn scanner_resumes_across_reads() {
        let v = rmpv::Value::Array(
            (0..50)
                .map(|i| rmpv::Value::Array(vec![i.into(), record()]))
                .collect(),
        );
        let bytes = pack(&v);
        let mut s = ValueScanner::default();
        for cut in 0..bytes.len() {
            assert_eq!(s.advance(&bytes[..cut]), Ok(None), "cut {cut}");
        }
        assert_eq!(s.advance(&bytes), Ok(Some(bytes.len())));
    }

    #[test]
    fn scanner_says_how_far_a_packed_request_goes_once_its_entries_header_is_in() {
        // [tag, bin32 of 300,000 bytes, {"chunk": token}]: what PackedForward senders send.
        let entries = vec![0x90u8; 300_000];
        let request = rmpv::Value::Array(vec![
            "app.logs".into(),
            rmpv::Value::Binary(entries),
            rmpv::Value::Map(vec![("chunk".into(), "dG9rZW4=".into())]),
        ]);
        let bytes = pack(&request);
        let entries_end = 1 + 9 + 5 + 300_000;
        let mut s = ValueScanner::default();
        // Before the bin header is whole: the tag's end, or the next byte of a header.
        for (cut, wanted) in [(0, 1), (1, 2), (2, 10), (5, 10), (10, 11), (12, 13)] {
            assert_eq!(s.advance(&bytes[..cut]), Ok(None), "cut {cut}");
            assert_eq!(s.wanted(), wanted, "cut {cut}");
        }
        // From then on, the end of the entries.
        for cut in [15, 16, 65_536, entries_end - 1] {
            assert_eq!(s.advance(&bytes[..cut]), Ok(None), "cut {cut}");
            assert_eq!(s.wanted(), entries_end, "cut {cut}");
        }
        // Then the option map, part by part.
        assert_eq!(s.advance(&bytes[..entries_end]), Ok(None));
        assert_eq!(s.wanted(), entries_end + 1);
        assert_eq!(s.advance(&bytes[..entries_end + 2]), Ok(None));
        assert_eq!(s.wanted(), entries_end + 7, "the key \"chunk\"");
        assert_eq!(s.advance(&bytes), Ok(Some(bytes.len())));
        assert!(s.wanted() <= bytes.len());
    }

    #[test]
    fn value_len_rejects_reserved_byte_and_survives_huge_lengths() {
        assert!(matches!(value_len(&[0xc1]), Err(ScanError::Invalid(_))));
        // array32 of 4 billion elements with almost nothing behind it: just Incomplete.
        assert_eq!(
            value_len(&[0xdd, 0xff, 0xff, 0xff, 0xff, 0x01]),
            Err(ScanError::Incomplete)
        );
        assert_eq!(
            value_len(&[0xc6, 0xff, 0xff, 0xff, 0xff]),
            Err(ScanError::Incomplete)
        );
    }

    #[test]
    fn entry_with_event_time_int_and_metadata() {
        let t = EventTime::new(1_763_740_801, 123_456_789);
        let rec = pack(&record());

        let mut fixext = vec![0x92];
        encode::event_time(&mut fixext, t);
        fixext.extend_from_slice(&rec);
        let info = scan_entry(&fixext).unwrap();
        assert_eq!(
            (info.len, info.time, info.has_metadata),
            (fixext.len(), t, false)
        );
        assert_eq!(&fixext[info.record.0..info.record.1], &rec[..]);

        let mut ext8 = vec![0x92];
        encode::event_time_ext8(&mut ext8, t);
        ext8.extend_from_slice(&rec);
        assert_eq!(scan_entry(&ext8).unwrap().time, t);

        let int = pack(&rmpv::Value::Array(vec![1_763_740_801u64.into(), record()]));
        assert_eq!(
            scan_entry(&int).unwrap().time,
            EventTime::new(1_763_740_801, 0)
        );

        // Fluent Bit: [[EventTime, {meta}], record], here with an array32 outer header.
        let mut fb = vec![0xdd, 0, 0, 0, 2, 0x92];
        encode::event_time(&mut fb, t);
        fb.extend_from_slice(&pack(&rmpv::Value::Map(vec![("k8s".into(), "pod".into())])));
        fb.extend_from_slice(&rec);
        let info = scan_entry(&fb).unwrap();
        assert_eq!(
            (info.len, info.time, info.has_metadata),
            (fb.len(), t, true)
        );
    }

    #[test]
    fn the_usual_entry_is_read_as_the_general_path_reads_it() {
        // `[fixext8 EventTime, record]` takes a shortcut; the same time as an ext8 (one byte
        // longer, the general path) must give the same time and record, the same errors for
        // nanoseconds out of range and for a record that is not a map, and Incomplete at
        // every truncation.
        let rec = pack(&record());
        for t in [
            EventTime::new(0, 0),
            EventTime::new(1_763_740_801, 999_999_999),
            EventTime::new(i64::from(u32::MAX), 5),
        ] {
            let mut fixext = vec![0x92];
            encode::event_time(&mut fixext, t);
            let mut ext8 = vec![0x92];
            encode::event_time_ext8(&mut ext8, t);
            for tail in [&rec[..], &pack(&"text".into())[..]] {
                let (mut a, mut b) = (fixext.clone(), ext8.clone());
                a.extend_from_slice(tail);
                b.extend_from_slice(tail);
                let (fast, general) = (scan_entry(&a), scan_entry(&b));
                match (&fast, &general) {
                    (Ok(f), Ok(g)) => {
                        assert_eq!((f.time, f.has_metadata), (g.time, g.has_metadata));
                        assert_eq!(&a[f.record.0..f.record.1], &b[g.record.0..g.record.1]);
                        assert_eq!((f.len + 1, f.time_slot.1 + 1), (g.len, g.time_slot.1));
                    }
                    _ => assert_eq!(fast, general),
                }
                if general.is_ok() {
                    for cut in 0..a.len() {
                        assert_eq!(scan_entry(&a[..cut]), Err(ScanError::Incomplete), "{cut}");
                    }
                }
            }
        }
        let mut bad_nanos = vec![0x92, 0xd7, 0x00, 0, 0, 0, 1];
        bad_nanos.extend_from_slice(&1_000_000_000u32.to_be_bytes());
        bad_nanos.extend_from_slice(&rec);
        assert_eq!(
            scan_entry(&bad_nanos),
            Err(ScanError::Invalid(
                "event time is not an integer or EventTime"
            ))
        );
    }

    #[test]
    fn invalid_entries_are_named() {
        let float = pack(&rmpv::Value::Array(vec![1.5f64.into(), record()]));
        assert_eq!(
            scan_entry(&float),
            Err(ScanError::Invalid(
                "event time is not an integer or EventTime"
            ))
        );
        let not_map = pack(&rmpv::Value::Array(vec![1.into(), "text".into()]));
        assert_eq!(
            scan_entry(&not_map),
            Err(ScanError::Invalid("record is not a map"))
        );
        let triple = pack(&rmpv::Value::Array(vec![1.into(), record(), 3.into()]));
        assert!(matches!(scan_entry(&triple), Err(ScanError::Invalid(_))));
        let negative = pack(&rmpv::Value::Array(vec![(-5).into(), record()]));
        assert!(matches!(scan_entry(&negative), Err(ScanError::Invalid(_))));
        assert!(matches!(
            scan_entry(&pack(&"x".into())),
            Err(ScanError::Invalid(_))
        ));
    }

    #[test]
    fn entries_iterates_and_stops_at_damage() {
        let one = pack(&rmpv::Value::Array(vec![10.into(), record()]));
        let mut body = one.repeat(3);
        assert_eq!(entries(&body).count(), 3);
        body.extend_from_slice(&one[..one.len() - 1]);
        let results: Vec<_> = entries(&body).collect();
        assert_eq!(results.len(), 4);
        assert_eq!(results[3].as_ref().unwrap_err(), &ScanError::Incomplete);
    }

    #[test]
    fn depth_is_checked_without_recursion() {
        let nested = |n: usize| {
            let mut v = rmpv::Value::from(1);
            for _ in 0..n {
                v = rmpv::Value::Array(vec![v]);
            }
            pack(&v)
        };
        assert_eq!(check_depth(&pack(&5.into()), 0), Ok(()));
        assert_eq!(check_depth(&nested(3), 3), Ok(()));
        assert!(matches!(
            check_depth(&nested(4), 3),
            Err(ScanError::Invalid(_))
        ));
        assert_eq!(check_depth(&pack(&record()), 1), Ok(()));
        let wide = rmpv::Value::Map(vec![
            ("a".into(), rmpv::Value::Array(vec![])),
            ("b".into(), record()),
        ]);
        assert_eq!(check_depth(&pack(&wide), 2), Ok(()));
        // Deeper than the levels kept inline, and siblings after the deep part.
        let deep_then_wide = rmpv::Value::Array(vec![
            rmpv::decode::read_value(&mut &nested(40)[..]).unwrap(),
            record(),
            rmpv::Value::Array(vec![1.into(), 2.into()]),
        ]);
        assert_eq!(check_depth(&pack(&deep_then_wide), 41), Ok(()));
        assert!(matches!(
            check_depth(&pack(&deep_then_wide), 40),
            Err(ScanError::Invalid(_))
        ));
        // Millions of array headers: refused at the limit, never a deep stack.
        let bomb = vec![0x91u8; 4 << 20];
        assert!(matches!(
            check_depth(&bomb, 100),
            Err(ScanError::Invalid(_))
        ));
        let bytes = nested(2);
        assert_eq!(
            check_depth(&bytes[..bytes.len() - 1], 5),
            Err(ScanError::Incomplete)
        );
    }

    #[test]
    fn decimal_and_rfc3339_times_round_trip() {
        let t = EventTime::new(1_763_740_801, 123_456_789);
        assert_eq!(t.to_decimal(), "1763740801.123456789");
        assert_eq!(EventTime::parse_decimal("1763740801.123456789"), Some(t));
        assert_eq!(
            EventTime::parse_decimal("1763740859.5"),
            Some(EventTime::new(1_763_740_859, 500_000_000))
        );
        assert_eq!(EventTime::parse_decimal("12"), Some(EventTime::new(12, 0)));
        assert_eq!(EventTime::parse_decimal("1.1234567891"), None);
        assert_eq!(t.to_rfc3339(), "2025-11-21T16:00:01.123456789Z");
        assert_eq!(EventTime::parse_rfc3339(&t.to_rfc3339()), Some(t));
    }
}
