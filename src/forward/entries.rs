//! From a request's entries to buffer groups: decompress, validate, split by timekey.
//!
//! Records are never decoded: [`entry::scan_entry`] walks the msgpack framing to find each
//! entry's end and time. Consecutive valid entries of one timekey stay one zero-copy slice of
//! the received bytes; when every entry of a request falls in one timekey (the usual case) the
//! whole blob is appended as is. Invalid entries are skipped, as Fluentd's
//! `skip_invalid_event` does, and counted.

use std::io::{Cursor, Read};

use bytes::Bytes;
use claimcheck_consumer::body::{self, Compression};
use claimcheck_consumer::entry::{self, encode, EventTime, ScanError};

use super::frame::Entries;
use crate::buffer::Group;
use crate::timekey::Timekey;

/// Valid entries grouped by timekey, and what was skipped.
#[derive(Debug, Default)]
pub struct Split {
    pub groups: Vec<Group>,
    pub events: u64,
    pub invalid: u64,
    /// Why the first skipped entry was skipped.
    pub invalid_reason: Option<&'static str>,
    /// Skipped entries by reason.
    pub reasons: Vec<(&'static str, u64)>,
    /// Entries whose time is second 0, which Fluentd reads as "now" ([`zero_times_to_now`]).
    pub zero_times: u64,
}

impl Split {
    fn skip(&mut self, why: &'static str) {
        self.invalid += 1;
        self.invalid_reason.get_or_insert(why);
        match self.reasons.iter_mut().find(|(r, _)| *r == why) {
            Some((_, n)) => *n += 1,
            None => self.reasons.push((why, 1)),
        }
    }
}

/// Why a request's entries could not be expanded. The connection is closed without an ack.
#[derive(Debug, thiserror::Error)]
pub enum DecompressError {
    #[error("an entry larger than decompression_size_limit ({limit} bytes)")]
    EntryTooLarge { limit: u64 },
    #[error("decompressed entries beyond decompression_size_limit ({limit} bytes) that are mostly not valid events: a compression bomb")]
    Bomb { limit: u64 },
    #[error("cannot decompress {method} entries: {source}")]
    Corrupt {
        method: &'static str,
        source: std::io::Error,
    },
}

/// How a request's `compressed` option packs its entries: `"gzip"` (every member) or `"zstd"`
/// (every frame); anything else, Fluentd's `"text"` included, means plain entries.
fn compression_of(option: Option<&str>) -> Compression {
    match option {
        Some("gzip") => Compression::Gzip,
        Some("zstd") => Compression::Zstd,
        _ => Compression::None,
    }
}

/// A request's entries, expanded a piece at a time; plain ones are one piece.
///
/// A piece holds at most `limit` bytes and ends where an entry ends, so that a request that
/// expands beyond the limit (a Fluentd file-buffer chunk of 256 MiB compressed, say) is stored
/// in several appends, never holding more than the limit in memory. Only a single entry larger
/// than the limit cannot be cut ([`DecompressError::EntryTooLarge`]). [`plan`] expands them
/// once before anything is stored, so that a request is refused whole or stored whole.
pub struct Pieces {
    source: Source,
    limit: usize,
    /// The start of an entry that the last piece cut off.
    carry: Vec<u8>,
    /// Room to make for the next piece: a guess from the compressed size at first.
    room: usize,
    done: bool,
}

enum Source {
    Plain(Option<Bytes>),
    Compressed {
        decoder: Box<dyn Read + Send>,
        compression: Compression,
    },
}

impl Pieces {
    pub fn new(blob: Bytes, compression: Compression, limit: u64) -> Result<Self, DecompressError> {
        let blob_len = blob.len();
        let source = match compression {
            Compression::None => Source::Plain(Some(blob)),
            _ => Source::Compressed {
                decoder: body::decoder(compression, Cursor::new(blob)).map_err(|source| {
                    DecompressError::Corrupt {
                        method: compression.as_str(),
                        source,
                    }
                })?,
                compression,
            },
        };
        // One byte beyond the limit is read, to tell whether there is more.
        let limit = usize::try_from(limit)
            .unwrap_or(usize::MAX)
            .clamp(1, usize::MAX - 1);
        Ok(Pieces {
            room: (blob_len.saturating_mul(4)).min(limit),
            source,
            limit,
            carry: Vec::new(),
            done: false,
        })
    }

    /// Whether the pieces are decompressed (work for a blocking thread), not just handed over.
    pub fn is_compressed(&self) -> bool {
        !matches!(self.source, Source::Plain(_))
    }

    /// Whether the last piece was returned.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// The limit a piece keeps to.
    pub fn limit(&self) -> u64 {
        self.limit as u64
    }

    /// The next piece; see [`Pieces::is_done`] for whether it was the last. The first piece
    /// may be empty (no entries), and so is any asked for after the last.
    pub fn next_piece(&mut self) -> Result<Bytes, DecompressError> {
        if self.done {
            return Ok(Bytes::new());
        }
        let (decoder, method) = match &mut self.source {
            Source::Plain(blob) => {
                self.done = true;
                return Ok(blob.take().unwrap_or_default());
            }
            Source::Compressed {
                decoder,
                compression,
            } => (decoder, compression.as_str()),
        };
        // One byte beyond the limit tells whether there is more.
        let mut out = std::mem::take(&mut self.carry);
        read_at_most(decoder, &mut out, self.limit + 1, self.room)
            .map_err(|source| DecompressError::Corrupt { method, source })?;
        // Beyond the first piece the rest is known to be large.
        self.room = self.limit + 1;
        if out.len() <= self.limit {
            self.done = true;
            return Ok(Bytes::from(out));
        }
        let mut end = 0;
        loop {
            match entry::value_len(&out[end..self.limit]) {
                Ok(len) => end += len,
                Err(ScanError::Incomplete) if end == 0 => {
                    return Err(DecompressError::EntryTooLarge {
                        limit: self.limit as u64,
                    })
                }
                Err(ScanError::Incomplete) => break,
                // Not msgpack: nothing after it can be read. The piece ends with it, for
                // [`split`] to count as skipped, and the rest is not expanded.
                Err(ScanError::Invalid(_)) => {
                    self.done = true;
                    out.truncate(self.limit);
                    return Ok(Bytes::from(out));
                }
            }
        }
        self.carry = out[end..].to_vec();
        out.truncate(end);
        Ok(Bytes::from(out))
    }
}

/// Reads until `out` holds `max` bytes or the reader ends, growing `out` by doubling from
/// `room` (the first guess) but never beyond `max`: a piece's buffer is never twice its size.
fn read_at_most(
    reader: &mut dyn Read,
    out: &mut Vec<u8>,
    max: usize,
    room: usize,
) -> std::io::Result<()> {
    out.reserve_exact(room.max(1).min(max).saturating_sub(out.len()));
    while out.len() < max {
        if out.len() == out.capacity() {
            out.reserve_exact(out.capacity().max(64 << 10).min(max - out.len()));
        }
        let spare = (out.capacity() - out.len()).min(max - out.len());
        if reader.take(spare as u64).read_to_end(out)? == 0 {
            break;
        }
    }
    Ok(())
}

/// How a request whose entries expand beyond the limit is stored, found by expanding them
/// once without keeping them, before any piece is stored: a request that would fail part way
/// (an entry larger than the limit, a corrupt or cut stream, a bomb) is refused whole, never
/// half stored and then resent forever.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// The last piece with a valid event: it carries the request's token. Pieces after it
    /// (invalid entries only) are not stored.
    pub last_with_events: Option<usize>,
}

/// Expands the entries in pieces, as [`Pieces`] does, and checks them: every piece but the
/// last must be at least half valid events, by bytes, else the request is a bomb (mostly
/// filler that expands for a long time).
pub fn plan(
    blob: Bytes,
    compression: Compression,
    limit: u64,
    timekey: Timekey,
) -> Result<Plan, DecompressError> {
    let mut pieces = Pieces::new(blob, compression, limit)?;
    let mut plan = Plan {
        last_with_events: None,
    };
    for i in 0.. {
        let piece = pieces.next_piece()?;
        let valid: u64 = split(&piece, timekey).groups.iter().map(|g| g.bytes).sum();
        if !pieces.is_done() && valid * 2 < piece.len() as u64 {
            return Err(DecompressError::Bomb {
                limit: pieces.limit(),
            });
        }
        if valid > 0 {
            plan.last_with_events = Some(i);
        }
        if pieces.is_done() {
            break;
        }
    }
    Ok(plan)
}

/// Validates the entries of a blob and groups them by timekey window.
pub fn split(blob: &Bytes, timekey: Timekey) -> Split {
    let mut out = Split::default();
    let window_of = timekey.windows();
    let mut pos = 0usize;
    // The run of consecutive valid entries being collected: (start, timekey, stats).
    let mut run: Option<(usize, Group)> = None;
    let close = |run: &mut Option<(usize, Group)>, end: usize, out: &mut Split| {
        if let Some((start, g)) = run.take() {
            let slice = blob.slice(start..end);
            match out.groups.iter_mut().find(|x| x.timekey == g.timekey) {
                Some(existing) => existing.push(slice, g.records, g.first, g.last),
                None => {
                    let mut group = Group::new(g.timekey);
                    group.push(slice, g.records, g.first, g.last);
                    out.groups.push(group);
                }
            }
        }
    };
    while pos < blob.len() {
        // Nested no deeper than consumers read (deeper is skipped as invalid, as Fluentd's
        // unpacker refuses it): an entry that no reader can decode would make its whole
        // chunk, other senders' events with it, unreadable.
        match entry::scan_entry_within(&blob[pos..], claimcheck_consumer::MAX_NESTING) {
            Ok(info) => {
                let key = window_of(info.time.secs);
                if run.as_ref().is_some_and(|(_, g)| g.timekey != key) {
                    close(&mut run, pos, &mut out);
                }
                let (_, g) = run.get_or_insert_with(|| (pos, Group::new(key)));
                // Stats only; the slice is cut when the run closes.
                if g.records == 0 {
                    (g.first, g.last) = (info.time, info.time);
                } else {
                    g.first = g.first.min(info.time);
                    g.last = g.last.max(info.time);
                }
                g.records += 1;
                out.events += 1;
                out.zero_times += u64::from(info.time.secs == 0);
                pos += info.len;
            }
            Err(err) => {
                close(&mut run, pos, &mut out);
                let why = match err {
                    ScanError::Invalid(why) => why,
                    ScanError::Incomplete => "entries end inside an entry",
                };
                out.skip(why);
                match entry::value_len(&blob[pos..]) {
                    // A whole value that is not a valid entry: skip just it.
                    Ok(len) if !matches!(err, ScanError::Incomplete) => pos += len,
                    // Cannot find where it ends: the rest of the blob is lost to us.
                    _ => pos = blob.len(),
                }
            }
        }
    }
    close(&mut run, pos, &mut out);
    out
}

/// The entries with every event time of second 0 set to `now`, as Fluentd's in_forward does
/// for senders that leave the time to the receiver (a v1.5 time slot keeps its metadata).
/// Other entries, invalid ones included, are copied as they are. Called only when [`split`]
/// counted such a time, so that other requests are not copied.
pub fn zero_times_to_now(blob: &[u8], now: EventTime) -> Bytes {
    rewrite_entries(blob, blob.len() + 16, |e, out| {
        let Ok(info) = entry::scan_entry_within(e, claimcheck_consumer::MAX_NESTING) else {
            return false;
        };
        if info.time.secs != 0 {
            return false;
        }
        out.push(0x92);
        let slot = &e[info.time_slot.0..info.time_slot.1];
        match entry::array_header(slot) {
            // `[time, metadata]`: the metadata stays.
            Ok(Some((2, h))) if info.has_metadata => {
                let time_len = entry::value_len(&slot[h..]).unwrap_or(slot.len() - h);
                out.push(0x92);
                encode::event_time(out, now);
                out.extend_from_slice(&slot[h + time_len..]);
            }
            _ => encode::event_time(out, now),
        }
        out.extend_from_slice(&e[info.record.0..info.record.1]);
        true
    })
}

/// Each whole value of `blob` through `rewrite`, which writes it changed into `out` and says
/// so, or writes nothing and says not, to have it copied as it is; a value cut short ends the
/// blob, copied as it is.
fn rewrite_entries(
    blob: &[u8],
    capacity: usize,
    mut rewrite: impl FnMut(&[u8], &mut Vec<u8>) -> bool,
) -> Bytes {
    let mut out = Vec::with_capacity(capacity);
    let mut pos = 0;
    while pos < blob.len() {
        let rest = &blob[pos..];
        let Ok(len) = entry::value_len(rest) else {
            out.extend_from_slice(rest);
            break;
        };
        if !rewrite(&rest[..len], &mut out) {
            out.extend_from_slice(&rest[..len]);
        }
        pos += len;
    }
    Bytes::from(out)
}

/// Sets `key: value` string pairs in every record, replacing keys the record already has
/// (Fluentd's `source_address_key` and `source_hostname_key`). Only the framing is walked: the
/// time slot and the other pairs are copied as bytes. Entries that are not `[time, map]` are
/// kept as they are, for [`split`] to skip and count.
pub fn add_to_records(blob: &[u8], pairs: &[(&str, &str)]) -> Bytes {
    let extra: usize = pairs.iter().map(|(k, v)| k.len() + v.len() + 10).sum();
    rewrite_entries(
        blob,
        blob.len() + blob.len() / 64 * extra / 4 + extra,
        |e, out| rewrite_entry(e, pairs, out).is_some(),
    )
}

/// Writes `entry` with `pairs` set in its record; `None` (and nothing written) if the entry is
/// not `[time, map]`.
fn rewrite_entry(e: &[u8], pairs: &[(&str, &str)], out: &mut Vec<u8>) -> Option<()> {
    let (count, h) = entry::array_header(e).ok()??;
    if count != 2 {
        return None;
    }
    let time_len = entry::value_len(&e[h..]).ok()?;
    let record = &e[h + time_len..];
    let (n, mh) = entry::map_header(record).ok()??;
    let ours = |key: &[u8]| match entry::str_or_bin(key) {
        Ok(Some((kh, kl))) => pairs.iter().any(|(k, _)| k.as_bytes() == &key[kh..kh + kl]),
        _ => false,
    };
    let mut kept = Vec::with_capacity(n as usize);
    let mut p = mh;
    for _ in 0..n {
        let kl = entry::value_len(&record[p..]).ok()?;
        let vl = entry::value_len(&record[p + kl..]).ok()?;
        if !ours(&record[p..p + kl]) {
            kept.push(&record[p..p + kl + vl]);
        }
        p += kl + vl;
    }
    out.push(0x92);
    out.extend_from_slice(&e[h..h + time_len]);
    rmp::encode::write_map_len(out, (kept.len() + pairs.len()) as u32).ok()?;
    for pair in kept {
        out.extend_from_slice(pair);
    }
    for (k, v) in pairs {
        rmp::encode::write_str(out, k).ok()?;
        rmp::encode::write_str(out, v).ok()?;
    }
    Some(())
}

/// The entries blob of a request, for [`Pieces`], and how it is compressed (its `compressed`
/// option): only packed entries (a str or bin, PackedForward) may be, as Fluentd reads the
/// option; a Forward or Message mode request's are plain whatever it says.
pub fn blob_of(entries: Entries, compressed: Option<&str>) -> (Bytes, Compression) {
    match entries {
        Entries::Packed(b) => (b, compression_of(compressed)),
        Entries::Single(b) => (b, Compression::None),
        Entries::Array { bytes, .. } => (bytes, Compression::None),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use claimcheck_consumer::entry::encode;

    use super::*;

    fn entry_at(secs: i64) -> Vec<u8> {
        let mut b = vec![0x92];
        encode::event_time(&mut b, EventTime::new(secs, 1));
        b.extend_from_slice(&[0x81, 0xa1, b'k', 0x01]);
        b
    }

    /// Fluentd reads a time of 0 as "now": integer, EventTime (whatever its nanoseconds) and a
    /// v1.5 time slot, whose metadata stays; other entries and invalid ones stay as they were.
    #[test]
    fn times_of_second_zero_become_now() {
        let record = [0x81, 0xa1, b'k', 0x01];
        let mut blob = vec![0x92, 0x00];
        blob.extend_from_slice(&record);
        blob.push(0x92);
        encode::event_time(&mut blob, EventTime::new(0, 7));
        blob.extend_from_slice(&record);
        blob.extend_from_slice(&[0x92, 0x92]);
        encode::event_time(&mut blob, EventTime::new(0, 0));
        blob.extend_from_slice(&[0x81, 0xa1, b'm', 0x02]);
        blob.extend_from_slice(&record);
        blob.extend(entry_at(600));
        blob.extend_from_slice(&[0x92, 0x00, 0x01]);
        let blob = Bytes::from(blob);
        let before = split(&blob, Timekey::utc(60));
        assert_eq!(
            (before.events, before.invalid, before.zero_times),
            (4, 1, 3)
        );

        let now = EventTime::new(1_796_081_400, 5);
        let after = zero_times_to_now(&blob, now);
        let s = split(&after, Timekey::utc(60));
        assert_eq!((s.events, s.invalid, s.zero_times), (4, 1, 0));
        let mut times = Vec::new();
        let mut metadata = 0;
        let mut pos = 0;
        while let Ok(info) = entry::scan_entry(&after[pos..]) {
            times.push(info.time);
            metadata += usize::from(info.has_metadata);
            assert_eq!(
                &after[pos + info.record.0..pos + info.record.1],
                &record[..]
            );
            pos += info.len;
        }
        assert_eq!(times, [now, now, now, EventTime::new(600, 1)]);
        assert_eq!(metadata, 1, "the v1.5 slot keeps its metadata");
        assert_eq!(
            &after[pos..],
            &[0x92, 0x00, 0x01],
            "the invalid entry as it was"
        );
    }

    #[test]
    fn source_keys_are_set_in_every_record() {
        let mut blob = entry_at(600);
        // A Fluent Bit entry whose record already has the key, and a broken entry.
        blob.extend_from_slice(&[0x92, 0x92]);
        encode::event_time(&mut blob, EventTime::new(601, 0));
        blob.extend_from_slice(&[0x80, 0x82, 0xa4, b'h', b'o', b's', b't', 0xa1, b'x']);
        blob.extend_from_slice(&[0xa1, b'k', 0x02]);
        blob.extend_from_slice(&[0x92, 0x01, 0x02]);
        let out = add_to_records(&blob, &[("host", "10.0.0.1")]);
        let mut rd = &out[..];
        let mut records = Vec::new();
        while !rd.is_empty() {
            records.push(rmpv::decode::read_value(&mut rd).unwrap());
        }
        assert_eq!(records.len(), 3);
        assert_eq!(records[0][1]["host"].as_str(), Some("10.0.0.1"));
        assert_eq!(records[0][1]["k"].as_i64(), Some(1));
        let second = records[1][1].as_map().unwrap();
        assert_eq!(second.len(), 2, "the old value is replaced: {second:?}");
        assert_eq!(records[1][1]["host"].as_str(), Some("10.0.0.1"));
        assert!(records[1][0].is_array(), "metadata kept");
        assert_eq!(records[2], rmpv::Value::Array(vec![1.into(), 2.into()]));
        let s = split(&out, Timekey::utc(60));
        assert_eq!((s.events, s.invalid), (2, 1));
    }

    #[test]
    fn one_timekey_is_one_zero_copy_slice() {
        let blob = Bytes::from([entry_at(600), entry_at(601), entry_at(659)].concat());
        let s = split(&blob, Timekey::utc(60));
        assert_eq!((s.events, s.invalid, s.groups.len()), (3, 0, 1));
        let g = &s.groups[0];
        assert_eq!((g.timekey, g.records, g.slices.len()), (600, 3, 1));
        assert_eq!(
            g.slices[0].as_ptr(),
            blob.as_ptr(),
            "the slice shares the received bytes"
        );
        assert_eq!((g.first.secs, g.last.secs), (600, 659));
    }

    #[test]
    fn entries_are_grouped_by_timekey_keeping_order() {
        let (a, b, c) = (entry_at(600), entry_at(660), entry_at(610));
        let blob = Bytes::from([a.clone(), b.clone(), c.clone()].concat());
        let s = split(&blob, Timekey::utc(60));
        assert_eq!(s.groups.len(), 2);
        assert_eq!((s.groups[0].timekey, s.groups[0].records), (600, 2));
        assert_eq!(s.groups[0].slices.concat(), [a, c].concat());
        assert_eq!((s.groups[1].timekey, s.groups[1].slices.concat()), (660, b));
    }

    #[test]
    fn a_record_nested_deeper_than_consumers_read_is_skipped() {
        let nested = |depth: usize| {
            let mut b = vec![0x92];
            encode::event_time(&mut b, EventTime::new(600, 1));
            // A map of one key whose value is the next map, `depth` maps in all.
            for _ in 1..depth {
                b.extend_from_slice(&[0x81, 0xa1, b'k']);
            }
            b.push(0x80);
            b
        };
        let max = claimcheck_consumer::MAX_NESTING;
        let blob = Bytes::from([nested(max), nested(max + 1), entry_at(601)].concat());
        let s = split(&blob, Timekey::utc(60));
        assert_eq!((s.events, s.invalid), (2, 1));
        assert_eq!(
            s.groups[0].slices.concat(),
            [nested(max), entry_at(601)].concat()
        );
    }

    #[test]
    fn invalid_entries_are_skipped_and_the_rest_kept() {
        let mut float_time = Vec::new();
        rmpv::encode::write_value(
            &mut float_time,
            &rmpv::Value::Array(vec![1.5.into(), rmpv::Value::Map(vec![])]),
        )
        .unwrap();
        let blob = Bytes::from(
            [
                entry_at(600),
                float_time,
                entry_at(601),
                entry_at(602)[..5].to_vec(),
            ]
            .concat(),
        );
        let s = split(&blob, Timekey::utc(60));
        assert_eq!((s.events, s.invalid), (2, 2));
        assert_eq!(
            s.invalid_reason,
            Some("event time is not an integer or EventTime")
        );
        assert_eq!(
            s.groups[0].slices.concat(),
            [entry_at(600), entry_at(601)].concat()
        );
    }

    /// Every piece of a request's entries, in order.
    fn expand(
        blob: &[u8],
        method: Option<&str>,
        limit: u64,
    ) -> Result<Vec<Bytes>, DecompressError> {
        let mut pieces = Pieces::new(Bytes::copy_from_slice(blob), compression_of(method), limit)?;
        let mut out = vec![pieces.next_piece()?];
        while !pieces.is_done() {
            out.push(pieces.next_piece()?);
        }
        Ok(out)
    }

    fn gzip(parts: &[&[u8]]) -> Vec<u8> {
        let mut gz = Vec::new();
        for part in parts {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(part).unwrap();
            gz.extend(e.finish().unwrap());
        }
        gz
    }

    #[test]
    fn decompression_handles_members_frames_and_plain_entries() {
        let plain = [entry_at(1), entry_at(2)].concat();
        let gz = gzip(&[&plain[..7], &plain[7..]]);
        assert_eq!(
            expand(&gz, Some("gzip"), 1 << 20).unwrap(),
            std::slice::from_ref(&plain)
        );
        let zst = [
            zstd::encode_all(&plain[..3], 1).unwrap(),
            zstd::encode_all(&plain[3..], 1).unwrap(),
        ]
        .concat();
        assert_eq!(
            expand(&zst, Some("zstd"), 1 << 20).unwrap(),
            std::slice::from_ref(&plain)
        );
        // Plain entries are never cut, whatever their size.
        assert_eq!(
            expand(&plain, Some("text"), 1).unwrap(),
            std::slice::from_ref(&plain)
        );
        assert_eq!(
            expand(&plain, None, 1).unwrap(),
            std::slice::from_ref(&plain)
        );
        assert!(matches!(
            expand(b"nope", Some("gzip"), 10),
            Err(DecompressError::Corrupt { .. })
        ));
        assert_eq!(
            expand(&gzip(&[b""]), Some("gzip"), 10).unwrap(),
            [Bytes::new()]
        );
    }

    /// Beyond the limit the entries come in pieces, each within the limit and ending where an
    /// entry ends, together the whole; one entry larger than the limit cannot be cut.
    #[test]
    fn entries_beyond_the_limit_come_in_pieces_cut_between_entries() {
        let one = entry_at(7).len();
        let plain: Vec<u8> = (0..100).flat_map(entry_at).collect();
        let limit = (3 * one + one / 2) as u64;
        for (method, packed) in [
            ("gzip", gzip(&[&plain[..500], &plain[500..]])),
            ("zstd", zstd::encode_all(&plain[..], 3).unwrap()),
        ] {
            let pieces = expand(&packed, Some(method), limit).unwrap();
            assert_eq!(pieces.len(), 34, "{method}");
            assert!(pieces.iter().all(|p| p.len() as u64 <= limit), "{method}");
            assert_eq!(pieces.concat(), plain, "{method}");
            let split_events: u64 = pieces
                .iter()
                .map(|p| split(p, Timekey::utc(60)).events)
                .sum();
            assert_eq!(split_events, 100, "{method}: every piece is whole entries");
        }
        assert!(matches!(
            expand(&gzip(&[&plain]), Some("gzip"), one as u64 - 1),
            Err(DecompressError::EntryTooLarge { .. })
        ));
    }

    fn plan_of(plain: &[u8], limit: u64) -> Result<Plan, DecompressError> {
        plan(
            Bytes::from(gzip(&[plain])),
            Compression::Gzip,
            limit,
            Timekey::utc(60),
        )
    }

    /// Before any piece is stored: where the token goes, and what would fail part way.
    #[test]
    fn a_plan_refuses_whole_what_would_fail_part_way() {
        let one = entry_at(7).len();
        let plain: Vec<u8> = (0..100).flat_map(entry_at).collect();
        let limit = 10 * one as u64;
        assert_eq!(
            plan_of(&plain, limit).unwrap(),
            Plan {
                last_with_events: Some(9)
            }
        );
        // A last piece of invalid entries only: the token goes with the last valid piece.
        let tail = [&plain[..], &[0x90; 64][..]].concat();
        assert_eq!(plan_of(&tail, limit).unwrap().last_with_events, Some(9));
        // An entry larger than the limit after some pieces, a cut stream, pieces mostly filler
        // among a few events, or no events at all: refused whole.
        assert!(matches!(
            plan_of(
                &[
                    &plain[..],
                    &[0x92, 0x01, 0xc6, 0, 0, 4, 0],
                    &[0u8; 1024][..]
                ]
                .concat(),
                limit
            ),
            Err(DecompressError::EntryTooLarge { .. })
        ));
        let gz = gzip(&[&plain]);
        assert!(matches!(
            plan(
                Bytes::copy_from_slice(&gz[..gz.len() - 4]),
                Compression::Gzip,
                limit,
                Timekey::utc(60)
            ),
            Err(DecompressError::Corrupt { .. })
        ));
        let filler = [&entry_at(1)[..], &[0xc0; 600][..]].concat().repeat(10);
        assert!(matches!(
            plan_of(&filler, limit),
            Err(DecompressError::Bomb { .. })
        ));
        assert!(matches!(
            plan_of(&vec![0; 1 << 20], limit),
            Err(DecompressError::Bomb { .. })
        ));
    }

    /// A piece's buffer grows to the limit and one byte, never to twice the limit.
    #[test]
    fn reading_a_piece_never_doubles_past_it() {
        let data = vec![7u8; 1 << 20];
        for room in [1, 1000, 100_000, (1 << 20) + 1] {
            let mut out = Vec::new();
            read_at_most(&mut &data[..], &mut out, (1 << 20) - 5, room).unwrap();
            assert_eq!(out.len(), (1 << 20) - 5);
            assert!(out.capacity() <= 1 << 20, "room {room}: {}", out.capacity());
        }
        let mut out = Vec::new();
        read_at_most(&mut &data[..10], &mut out, 100, 4).unwrap();
        assert_eq!(out.len(), 10);
    }

    /// Bytes that are not msgpack end the expansion: the piece keeps them, for the split to
    /// count as skipped, and nothing after them is read.
    #[test]
    fn bytes_that_are_not_msgpack_end_the_pieces() {
        let mut plain: Vec<u8> = (0..10).flat_map(entry_at).collect();
        let good = plain.len();
        plain.extend_from_slice(&[0xc1; 64]);
        plain.extend((0..10).flat_map(entry_at));
        let pieces = expand(&gzip(&[&plain]), Some("gzip"), good as u64 + 10).unwrap();
        assert_eq!(pieces.len(), 1);
        let split = split(&pieces[0], Timekey::utc(60));
        assert_eq!((split.events, split.invalid), (10, 1));
    }
}
