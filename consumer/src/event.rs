//! One event of a chunk: tag, time, record and Fluent Bit metadata.
//!
//! An [`Event`] owns the msgpack bytes of its entry (`[time, record]`, exactly as the forward
//! client sent it for `msgpack` bodies) and hands out views of them: the record as a borrowed
//! [`rmpv::ValueRef`], as JSON, or deserialized into the caller's own type.

use std::sync::Arc;

use bytes::Bytes;
use serde::Deserialize;

use crate::body;
use crate::entry::{self, EventTime, ScanError};
use crate::Error;

/// How deeply arrays and maps may nest in a record or its metadata. Deeper entries are
/// [`Error::Decode`] errors, so that borrowing a record as a [`rmpv::ValueRef`] (which recurses)
/// can never fail or exhaust the stack.
pub const MAX_NESTING: usize = 500;

/// One Fluentd event: tag, time, record and (Fluent Bit) metadata.
///
/// ```
/// use claimcheck_consumer::{Event, EventTime};
/// use serde::Deserialize;
///
/// let record = rmpv::Value::Map(vec![("msg".into(), "hello".into()), ("n".into(), 7.into())]);
/// let event = Event::new("app.web", EventTime::new(1_763_740_801, 5), &record, None)?;
///
/// assert_eq!(event.tag(), "app.web");
/// assert_eq!(event.time().secs, 1_763_740_801);
/// // Borrowed msgpack value, JSON, or your own type.
/// assert_eq!(event.record().to_owned(), record);
/// assert_eq!(event.record_json(), serde_json::json!({"msg": "hello", "n": 7}));
/// #[derive(Deserialize)]
/// struct Line<'a> { msg: &'a str, n: u32 }
/// let line: Line = event.deserialize_record()?;
/// assert_eq!((line.msg, line.n), ("hello", 7));
/// # Ok::<(), claimcheck_consumer::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    tag: Arc<str>,
    time: EventTime,
    /// The whole `[time, record]` entry. Events decoded from one read of a body share the
    /// allocation it was read into (64 KiB, plus the entry the read continued), so an event
    /// kept keeps its block.
    entry: Bytes,
    /// Byte ranges inside `entry`.
    time_slot: (usize, usize),
    record: (usize, usize),
    metadata: Option<(usize, usize)>,
}

fn invalid(what: &str, e: ScanError) -> Error {
    Error::Decode(format!("{what}: {e}"))
}

impl Event {
    /// Makes an event from its parts, encoding the entry as Fluentd does: the time as an
    /// `EventTime` (ext 0), and `[[time, metadata], record]` when there is metadata.
    ///
    /// `record` should be a map (Fluentd records always are); the time must be representable
    /// as an `EventTime` (seconds from 0 to 2^32 - 1).
    pub fn new(
        tag: &str,
        time: EventTime,
        record: &rmpv::Value,
        metadata: Option<&rmpv::Value>,
    ) -> Result<Event, Error> {
        Event::from_parts(tag.into(), time, record, metadata)
    }

    pub(crate) fn from_parts(
        tag: Arc<str>,
        time: EventTime,
        record: &rmpv::Value,
        metadata: Option<&rmpv::Value>,
    ) -> Result<Event, Error> {
        if u32::try_from(time.secs).is_err() {
            return Err(Error::Decode(format!(
                "time {time} is outside what an EventTime can hold"
            )));
        }
        let mut entry = Vec::with_capacity(64);
        entry.push(0x92);
        if metadata.is_some() {
            entry.push(0x92);
        }
        entry::encode::event_time(&mut entry, time);
        let write = |buf: &mut Vec<u8>, v: &rmpv::Value| {
            rmpv::encode::write_value(buf, v).expect("writing to a Vec cannot fail")
        };
        if let Some(meta) = metadata {
            write(&mut entry, meta);
        }
        write(&mut entry, record);
        Event::from_entry(tag, &entry)
    }

    /// Makes an event from one whole msgpack entry (`[time, record]` or
    /// `[[time, metadata], record]`), copying its bytes.
    pub(crate) fn from_entry(tag: Arc<str>, entry: &[u8]) -> Result<Event, Error> {
        let info = entry::scan_entry(entry).map_err(|e| invalid("msgpack entry", e))?;
        if info.len != entry.len() {
            return Err(Error::Decode("bytes after a msgpack entry".into()));
        }
        Event::from_scanned(tag, Bytes::copy_from_slice(entry), info)
    }

    /// [`Event::from_entry`] for an entry that [`entry::scan_entry`] already scanned: `info`
    /// must be what it returned for exactly these bytes. `entry` may be a slice of a larger
    /// block shared with other events (one allocation for many events).
    pub(crate) fn from_scanned(
        tag: Arc<str>,
        entry: Bytes,
        info: entry::EntryInfo,
    ) -> Result<Event, Error> {
        debug_assert_eq!(info.len, entry.len());
        let record = &entry[info.record.0..info.record.1];
        entry::check_depth(record, MAX_NESTING).map_err(|e| invalid("record", e))?;
        let event = Event::from_checked(tag, entry, info);
        if let Some((start, end)) = event.metadata {
            entry::check_depth(&event.entry[start..end], MAX_NESTING)
                .map_err(|e| invalid("metadata", e))?;
        }
        Ok(event)
    }

    /// [`Event::from_scanned`] for an entry whose nesting was checked as it was scanned
    /// ([`entry::scan_entry_within`] with [`MAX_NESTING`]): no second walk of the record.
    pub(crate) fn from_checked(tag: Arc<str>, entry: Bytes, info: entry::EntryInfo) -> Event {
        debug_assert_eq!(info.len, entry.len());
        let metadata = metadata_range(&entry, &info);
        Event {
            tag,
            time: info.time,
            entry,
            time_slot: info.time_slot,
            record: info.record,
            metadata,
        }
    }

    /// What [`entry::scan_entry`] would say of this event's entry.
    fn info(&self) -> entry::EntryInfo {
        entry::EntryInfo {
            len: self.entry.len(),
            time: self.time,
            time_slot: self.time_slot,
            record: self.record,
            has_metadata: self.metadata.is_some(),
        }
    }

    /// The Fluentd tag.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// The event time: seconds and nanoseconds (zero nanoseconds for integer times).
    pub fn time(&self) -> EventTime {
        self.time
    }

    /// The record as a msgpack value borrowed from the event (normally a map).
    pub fn record(&self) -> rmpv::ValueRef<'_> {
        borrow(self.record_msgpack())
    }

    /// The record's msgpack bytes, exactly as stored.
    pub fn record_msgpack(&self) -> &[u8] {
        &self.entry[self.record.0..self.record.1]
    }

    /// The record as JSON, by the conversion rules of [`body`](crate::body).
    pub fn record_json(&self) -> serde_json::Value {
        body::value_ref_to_json(&self.record())
    }

    /// The record deserialized into `T`; strings can be borrowed from the event.
    ///
    /// msgpack `bin` values deserialize as strings when they are UTF-8 (old Fluentd clients send
    /// strings as `bin`) and as bytes otherwise; `EventTime` values inside a record are
    /// extension values, which most types will refuse. For JSON types use
    /// [`Event::record_json`].
    pub fn deserialize_record<'a, T: Deserialize<'a>>(&'a self) -> Result<T, Error> {
        T::deserialize(self.record()).map_err(|e| Error::Deserialize(Box::new(e)))
    }

    /// Fluent Bit's per-event metadata (`[[time, metadata], record]`), when present.
    pub fn metadata(&self) -> Option<rmpv::ValueRef<'_>> {
        self.metadata_msgpack().map(borrow)
    }

    /// The metadata's msgpack bytes, exactly as stored, when present.
    pub fn metadata_msgpack(&self) -> Option<&[u8]> {
        self.metadata.map(|(a, b)| &self.entry[a..b])
    }

    /// The metadata as JSON, when present.
    pub fn metadata_json(&self) -> Option<serde_json::Value> {
        self.metadata().map(|m| body::value_ref_to_json(&m))
    }

    /// The whole msgpack entry: `[time, record]`, or `[[time, metadata], record]`. For `msgpack`
    /// bodies these are the bytes the forward client sent.
    pub fn entry_msgpack(&self) -> &[u8] {
        &self.entry
    }

    /// Appends the event as a forward protocol *Message* (`[tag, time, record]`, the time slot
    /// as stored, so Fluent Bit metadata stays in it) to `out`.
    pub fn write_forward_message(&self, out: &mut Vec<u8>) {
        out.push(0x93);
        rmp::encode::write_str(out, &self.tag).expect("writing to a Vec cannot fail");
        out.extend_from_slice(&self.entry[self.time_slot.0..self.time_slot.1]);
        out.extend_from_slice(self.record_msgpack());
    }

    /// The event as one JSON object, `{"time","tag","record"}` plus `"metadata"` when present:
    /// the line format of `json` bodies and of `claimcheck tail`.
    pub fn to_json(&self) -> serde_json::Value {
        let mut obj = serde_json::Map::new();
        obj.insert("time".into(), self.time.to_rfc3339().into());
        obj.insert("tag".into(), self.tag().into());
        obj.insert("record".into(), self.record_json());
        if let Some(meta) = self.metadata_json() {
            obj.insert("metadata".into(), meta);
        }
        serde_json::Value::Object(obj)
    }
}

/// The byte range of the metadata inside a scanned entry, when it has some.
fn metadata_range(entry: &[u8], info: &entry::EntryInfo) -> Option<(usize, usize)> {
    info.has_metadata.then(|| {
        // The slot is `[time, metadata...]`: the metadata is the map after the time.
        let slot = &entry[info.time_slot.0..info.time_slot.1];
        let (_, header) = entry::array_header(slot)
            .ok()
            .flatten()
            .expect("scan_entry found an array here");
        let start = header + entry::value_len(&slot[header..]).expect("scanned");
        let len = entry::value_len(&slot[start..]).expect("scanned");
        let base = info.time_slot.0;
        (base + start, base + start + len)
    })
}

/// The events decoded from one read of a body, in one shared allocation: what
/// [`Decoder::next_block`](crate::Decoder::next_block) hands out.
///
/// Reading the events of a block through [`EventRef`]s costs no allocation and no reference
/// count per event, which matters when a chunk is read at the speed of its decompression;
/// [`EventRef::to_event`] makes an [`Event`] of one that is to be kept.
#[derive(Debug, Clone)]
pub struct EventBlock {
    tag: Arc<str>,
    bytes: Bytes,
    /// One per entry, in order; the entries fill `bytes` end to end.
    infos: Vec<entry::EntryInfo>,
}

impl EventBlock {
    /// `bytes` are whole entries end to end, scanned (their nesting checked) into `infos`.
    pub(crate) fn from_checked(tag: Arc<str>, bytes: Bytes, infos: Vec<entry::EntryInfo>) -> Self {
        debug_assert_eq!(infos.iter().map(|i| i.len).sum::<usize>(), bytes.len());
        EventBlock { tag, bytes, infos }
    }

    /// A block of one event.
    pub(crate) fn of_event(event: Event) -> Self {
        let info = event.info();
        EventBlock {
            tag: event.tag,
            bytes: event.entry,
            infos: vec![info],
        }
    }

    /// The tag of every event in the block.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// How many events the block holds (at least one when it comes from a decoder).
    pub fn len(&self) -> usize {
        self.infos.len()
    }

    /// True when the block holds no event.
    pub fn is_empty(&self) -> bool {
        self.infos.is_empty()
    }

    /// The events, in order.
    pub fn iter(&self) -> EventRefs<'_> {
        EventRefs {
            block: self,
            next: 0,
            at: 0,
        }
    }
}

impl<'a> IntoIterator for &'a EventBlock {
    type Item = EventRef<'a>;
    type IntoIter = EventRefs<'a>;

    fn into_iter(self) -> EventRefs<'a> {
        self.iter()
    }
}

/// The events of an [`EventBlock`], in order.
#[derive(Debug, Clone)]
pub struct EventRefs<'a> {
    block: &'a EventBlock,
    /// Index of the next entry, and where it starts.
    next: usize,
    at: usize,
}

impl<'a> Iterator for EventRefs<'a> {
    type Item = EventRef<'a>;

    fn next(&mut self) -> Option<EventRef<'a>> {
        let info = self.block.infos.get(self.next)?;
        let start = self.at;
        self.next += 1;
        self.at += info.len;
        Some(EventRef {
            block: self.block,
            start,
            entry: &self.block.bytes[start..start + info.len],
            info,
        })
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.block.infos.len() - self.next;
        (left, Some(left))
    }
}

impl ExactSizeIterator for EventRefs<'_> {}

/// One event of an [`EventBlock`], borrowed from it, with the accessors of [`Event`]; the
/// event's own handle on the bytes is made only by [`EventRef::to_event`].
#[derive(Debug, Clone, Copy)]
pub struct EventRef<'a> {
    block: &'a EventBlock,
    /// Where the entry starts in the block.
    start: usize,
    entry: &'a [u8],
    info: &'a entry::EntryInfo,
}

impl<'a> EventRef<'a> {
    /// The Fluentd tag.
    pub fn tag(&self) -> &'a str {
        &self.block.tag
    }

    /// The event time: seconds and nanoseconds (zero nanoseconds for integer times).
    pub fn time(&self) -> EventTime {
        self.info.time
    }

    /// The record as a msgpack value borrowed from the block (normally a map).
    pub fn record(&self) -> rmpv::ValueRef<'a> {
        borrow(self.record_msgpack())
    }

    /// The record's msgpack bytes, exactly as stored.
    pub fn record_msgpack(&self) -> &'a [u8] {
        &self.entry[self.info.record.0..self.info.record.1]
    }

    /// The record as JSON, by the conversion rules of [`body`](crate::body).
    pub fn record_json(&self) -> serde_json::Value {
        body::value_ref_to_json(&self.record())
    }

    /// The record deserialized into `T`, as [`Event::deserialize_record`] does; strings can
    /// be borrowed from the block.
    pub fn deserialize_record<T: Deserialize<'a>>(&self) -> Result<T, Error> {
        T::deserialize(self.record()).map_err(|e| Error::Deserialize(Box::new(e)))
    }

    /// Fluent Bit's per-event metadata (`[[time, metadata], record]`), when present.
    pub fn metadata(&self) -> Option<rmpv::ValueRef<'a>> {
        self.metadata_msgpack().map(borrow)
    }

    /// Fluent Bit's per-event metadata's msgpack bytes, exactly as stored, when present.
    pub fn metadata_msgpack(&self) -> Option<&'a [u8]> {
        metadata_range(self.entry, self.info).map(|(a, b)| &self.entry[a..b])
    }

    /// The whole msgpack entry: `[time, record]`, or `[[time, metadata], record]`.
    pub fn entry_msgpack(&self) -> &'a [u8] {
        self.entry
    }

    /// The event as an [`Event`] of its own, sharing the block's bytes (no copy).
    pub fn to_event(&self) -> Event {
        let entry = self
            .block
            .bytes
            .slice(self.start..self.start + self.info.len);
        Event::from_checked(self.block.tag.clone(), entry, *self.info)
    }
}

/// Borrows a value whose framing and nesting [`Event::from_entry`] checked.
fn borrow(mut bytes: &[u8]) -> rmpv::ValueRef<'_> {
    rmpv::decode::read_value_ref(&mut bytes)
        .expect("entries are scanned and nest at most MAX_NESTING deep when the event is made")
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
        rmpv::Value::Map(vec![
            ("msg".into(), "hello".into()),
            ("raw".into(), rmpv::Value::Binary(b"bytes".to_vec())),
            ("n".into(), (-3).into()),
        ])
    }

    #[test]
    fn views_of_a_fluentd_entry_with_an_integer_time() {
        let entry = pack(&rmpv::Value::Array(vec![1_763_740_801u64.into(), record()]));
        let event = Event::from_entry("app".into(), &entry).unwrap();
        assert_eq!(event.time(), EventTime::new(1_763_740_801, 0));
        assert_eq!(event.entry_msgpack(), &entry[..]);
        assert_eq!(event.record().to_owned(), record());
        assert_eq!(event.record_msgpack(), &pack(&record())[..]);
        assert_eq!(event.metadata(), None);
        assert_eq!(event.metadata_msgpack(), None);
        assert_eq!(
            event.to_json(),
            serde_json::json!({"time": "2025-11-21T16:00:01.000000000Z", "tag": "app",
                               "record": {"msg": "hello", "raw": "bytes", "n": -3}})
        );
    }

    #[test]
    fn fluent_bit_metadata_and_forward_message() {
        let meta = rmpv::Value::Map(vec![("pod".into(), "web-1".into())]);
        let t = EventTime::new(1_763_740_801, 42);
        let event = Event::new("fb", t, &record(), Some(&meta)).unwrap();
        assert_eq!(event.metadata().map(|m| m.to_owned()), Some(meta.clone()));
        assert_eq!(event.metadata_msgpack(), Some(&pack(&meta)[..]));
        assert_eq!(
            event.metadata_json(),
            Some(serde_json::json!({"pod": "web-1"}))
        );
        let mut msg = Vec::new();
        event.write_forward_message(&mut msg);
        let decoded = rmpv::decode::read_value(&mut &msg[..]).unwrap();
        let rmpv::Value::Array(items) = decoded else {
            panic!("not an array")
        };
        assert_eq!(items[0], rmpv::Value::from("fb"));
        let rmpv::Value::Array(slot) = &items[1] else {
            panic!("time slot keeps the metadata")
        };
        assert_eq!(slot[1], meta);
        assert_eq!(items[2], record());
    }

    #[test]
    fn records_deserialize_into_borrowing_types_and_bin_reads_as_text() {
        #[derive(Deserialize, Debug, PartialEq)]
        struct Rec<'a> {
            msg: &'a str,
            raw: String,
            n: i64,
        }
        let event = Event::new("t", EventTime::new(1, 0), &record(), None).unwrap();
        assert_eq!(
            event.deserialize_record::<Rec>().unwrap(),
            Rec {
                msg: "hello",
                raw: "bytes".into(),
                n: -3
            }
        );
        #[derive(Deserialize, Debug)]
        #[allow(dead_code)]
        struct Wrong {
            msg: u32,
        }
        let err = event.deserialize_record::<Wrong>().unwrap_err();
        assert!(matches!(err, Error::Deserialize(_)), "{err}");
    }

    #[test]
    fn too_deep_or_damaged_entries_are_decode_errors() {
        let mut deep = rmpv::Value::from(1);
        for _ in 0..MAX_NESTING {
            deep = rmpv::Value::Array(vec![deep]);
        }
        let rec = rmpv::Value::Map(vec![("deep".into(), deep)]);
        let err = Event::new("t", EventTime::new(1, 0), &rec, None).unwrap_err();
        assert!(err.to_string().contains("too deeply"), "{err}");

        let entry = pack(&rmpv::Value::Array(vec![1.into(), record()]));
        assert!(matches!(
            Event::from_entry("t".into(), &entry[..entry.len() - 1]),
            Err(Error::Decode(_))
        ));
        let mut two = entry.clone();
        two.extend_from_slice(&entry);
        assert!(matches!(
            Event::from_entry("t".into(), &two),
            Err(Error::Decode(_))
        ));
        assert!(Event::new("t", EventTime::new(-1, 0), &record(), None).is_err());
    }
}
