//! Forward protocol requests, parsed without I/O.
//!
//! A connection carries concatenated msgpack values with no length prefix. The connection
//! finds where one request ends with [`ValueScanner`](claimcheck_consumer::entry::ValueScanner)
//! and hands exactly those bytes to [`parse`], which slices them without copying:
//!
//! ```text
//! Message                 [tag, time, record, option?]
//! Forward                 [tag, [[time, record], ...], option?]
//! PackedForward           [tag, entries (str or bin), option?]
//! CompressedPackedForward [tag, entries (str or bin), {"compressed": "gzip"|"zstd", ...}]
//! ```
//!
//! The mode is found from the type of the second element, as Fluentd's `in_forward` does:
//! str/bin → packed, array → Forward, anything else → Message. One refinement: an array whose
//! first element is not itself an array, followed by a map, is a Message whose time slot uses
//! the forward v1.5 `[time, {metadata}]` form.
//!
//! Fluentd sends entries as `str32` even when they are binary; they are never checked as UTF-8.

use bytes::Bytes;
use claimcheck_consumer::entry;

/// A parsed request.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    /// `nil`, the protocol's no-op.
    Nop,
    /// Not a forward request (not an array, too short, badly typed); skipped with a warning,
    /// as Fluentd does ("incoming chunk is broken").
    Broken(&'static str),
    /// A request carrying events.
    Events(Message),
}

/// A request carrying events.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// The tag as sent (str or bin); validated by the caller.
    pub tag: Bytes,
    pub entries: Entries,
    pub options: Options,
}

/// Where a request's events are.
#[derive(Debug, Clone, PartialEq)]
pub enum Entries {
    /// Message mode: the one entry, re-framed as `[time, record]`.
    Single(Bytes),
    /// Forward mode: the elements of the entries array, back to back (`count` of them).
    Array { bytes: Bytes, count: u64 },
    /// (Compressed)PackedForward: the entries blob, compressed as `options.compressed` says.
    Packed(Bytes),
}

/// The option map; unknown keys are ignored.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Options {
    /// The ack token (`chunk`), echoed byte for byte in `{"ack": token}`.
    pub chunk: Option<Bytes>,
    /// Event count announced by the sender (a hint, never trusted).
    pub size: Option<u64>,
    /// `"gzip"`, `"zstd"`; anything else (Fluentd sends `"text"`) means not compressed.
    pub compressed: Option<String>,
    /// Forward v1.5 signal type: 0 logs (the default), 1 metrics, 2 traces, ...
    pub fluent_signal: Option<i64>,
    /// A Message-mode event's metadata (Fluent Bit's `metadata` option, a non-empty map), as
    /// msgpack: it goes into the entry's time slot, `[[time, metadata], record]`, as Fluent
    /// Bit's Forward mode sends it.
    pub metadata: Option<Vec<u8>>,
}

/// Parses one complete msgpack value (exactly the bytes of one request).
pub fn parse(frame: Bytes) -> Request {
    match parse_inner(&frame) {
        Ok(None) => Request::Nop,
        Ok(Some(layout)) => Request::Events(layout.build(&frame)),
        Err(why) => Request::Broken(why),
    }
}

/// Byte ranges of a request's parts, found before any slicing.
struct Layout {
    tag: (usize, usize),
    entries: EntriesAt,
    options: Options,
}

enum EntriesAt {
    /// Time slot and record are contiguous: `frame[start..end]` follows a fixarray(2) header;
    /// the record starts at the third.
    Single(usize, usize, usize),
    Array(usize, usize, u64),
    Packed(usize, usize),
}

impl Layout {
    fn build(self, frame: &Bytes) -> Message {
        let entries = match self.entries {
            EntriesAt::Single(start, record, end) => {
                let metadata = self
                    .options
                    .metadata
                    .as_deref()
                    .filter(|_| !matches!(entry::array_header(&frame[start..]), Ok(Some(_))));
                let mut e = Vec::with_capacity(3 + end - start + metadata.map_or(0, |m| m.len()));
                e.push(0x92);
                match metadata {
                    Some(metadata) => {
                        e.push(0x92);
                        e.extend_from_slice(&frame[start..record]);
                        e.extend_from_slice(metadata);
                        e.extend_from_slice(&frame[record..end]);
                    }
                    None => e.extend_from_slice(&frame[start..end]),
                }
                Entries::Single(Bytes::from(e))
            }
            EntriesAt::Array(start, end, count) => Entries::Array {
                bytes: frame.slice(start..end),
                count,
            },
            EntriesAt::Packed(start, end) => Entries::Packed(frame.slice(start..end)),
        };
        Message {
            tag: frame.slice(self.tag.0..self.tag.1),
            entries,
            options: self.options,
        }
    }
}

fn value_end(frame: &[u8], pos: usize) -> Result<usize, &'static str> {
    match entry::value_len(&frame[pos..]) {
        Ok(len) => Ok(pos + len),
        Err(_) => Err("request ends inside an element"),
    }
}

fn parse_inner(frame: &[u8]) -> Result<Option<Layout>, &'static str> {
    let broken = |_| "request is not valid msgpack";
    if frame.first() == Some(&0xc0) {
        return Ok(None);
    }
    let (n, mut pos) = entry::array_header(frame)
        .map_err(broken)?
        .ok_or("request is not an array")?;
    if n < 2 {
        return Err("request has fewer than 2 elements");
    }
    let tag = match entry::str_or_bin(&frame[pos..]).map_err(broken)? {
        Some((hlen, len)) => (pos + hlen, pos + hlen + len),
        // Not a string: an empty tag, whose events the connection skips as invalid and whose
        // request it still acks, as Fluentd does (its sender would otherwise resend it for
        // ever).
        None => {
            let end = value_end(frame, pos)?;
            (end, end)
        }
    };
    pos = tag.1;

    let second = pos;
    let second_end = value_end(frame, second)?;
    let packed = entry::str_or_bin(&frame[second..]).map_err(broken)?;
    let array = entry::array_header(&frame[second..]).map_err(broken)?;
    let (entries, used) = if let Some((hlen, len)) = packed {
        (EntriesAt::Packed(second + hlen, second + hlen + len), 2)
    } else if let Some((count, hlen)) = array.filter(|_| !is_v15_time(frame, second, second_end, n))
    {
        (EntriesAt::Array(second + hlen, second_end, count), 2)
    } else {
        if n < 3 {
            return Err("message mode request has no record");
        }
        let record_end = value_end(frame, second_end)?;
        (EntriesAt::Single(second, second_end, record_end), 3)
    };
    let options_at = match entries {
        EntriesAt::Single(_, _, end) => end,
        _ => second_end,
    };
    let options = if n > used {
        parse_options(&frame[options_at..value_end(frame, options_at)?])
    } else {
        Options::default()
    };
    Ok(Some(Layout {
        tag,
        entries,
        options,
    }))
}

/// `[tag, [time, {meta}], record, ...]`: the second element is an array whose first element is
/// a time rather than an entry, and a map follows it.
fn is_v15_time(frame: &[u8], second: usize, second_end: usize, n: u64) -> bool {
    if n < 3 {
        return false;
    }
    let Ok(Some((count, hlen))) = entry::array_header(&frame[second..]) else {
        return false;
    };
    let first_is_array =
        count > 0 && matches!(entry::array_header(&frame[second + hlen..]), Ok(Some(_)));
    let record_is_map = matches!(entry::map_header(&frame[second_end..]), Ok(Some(_)));
    count > 0 && !first_is_array && record_is_map
}

fn parse_options(bytes: &[u8]) -> Options {
    use rmpv::ValueRef;
    let mut options = Options::default();
    let Ok(ValueRef::Map(pairs)) = rmpv::decode::read_value_ref(&mut &bytes[..]) else {
        return options;
    };
    for (k, v) in pairs {
        let key = match &k {
            ValueRef::String(s) => s.as_bytes(),
            ValueRef::Binary(b) => b,
            _ => continue,
        };
        match (key, v) {
            (b"chunk", ValueRef::String(s)) => {
                options.chunk = Some(Bytes::copy_from_slice(s.as_bytes()))
            }
            (b"chunk", ValueRef::Binary(b)) => options.chunk = Some(Bytes::copy_from_slice(b)),
            (b"size", ValueRef::Integer(i)) => options.size = i.as_u64(),
            (b"compressed", ValueRef::String(s)) => {
                options.compressed = Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
            }
            (b"fluent_signal", ValueRef::Integer(i)) => options.fluent_signal = i.as_i64(),
            (b"metadata", ValueRef::Map(pairs)) if !pairs.is_empty() => {
                let mut out = Vec::new();
                if rmpv::encode::write_value_ref(&mut out, &ValueRef::Map(pairs)).is_ok() {
                    options.metadata = Some(out);
                }
            }
            _ => {}
        }
    }
    options
}

/// Encodes `{"ack": token}` with the token as a msgpack str, echoed byte for byte.
pub fn encode_ack(token: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(token.len() + 10);
    out.extend_from_slice(&[0x81, 0xa3, b'a', b'c', b'k']);
    rmp::encode::write_str_len(&mut out, token.len() as u32).expect("writing to a Vec cannot fail");
    out.extend_from_slice(token);
    out
}

#[cfg(test)]
mod tests {
    use claimcheck_consumer::entry::{encode, EventTime, ValueScanner};
    use rmpv::Value;

    use super::*;

    fn pack(v: &Value) -> Vec<u8> {
        let mut b = Vec::new();
        rmpv::encode::write_value(&mut b, v).unwrap();
        b
    }

    fn event_time() -> Value {
        Value::Ext(
            0,
            [1_763_740_801u32.to_be_bytes(), 5u32.to_be_bytes()].concat(),
        )
    }

    fn record(i: u32) -> Value {
        Value::Map(vec![("i".into(), i.into())])
    }

    fn entry(i: u32) -> Value {
        Value::Array(vec![event_time(), record(i)])
    }

    fn options(chunk: &str) -> Value {
        Value::Map(vec![
            ("size".into(), 2.into()),
            ("chunk".into(), chunk.into()),
        ])
    }

    fn events(bytes: Vec<u8>) -> Message {
        match parse(Bytes::from(bytes)) {
            Request::Events(m) => m,
            other => panic!("not events: {other:?}"),
        }
    }

    #[test]
    fn message_mode_with_and_without_options() {
        let m = events(pack(&Value::Array(vec![
            "app".into(),
            event_time(),
            record(1),
            options("tok"),
        ])));
        assert_eq!(&m.tag[..], b"app");
        assert_eq!(m.entries, Entries::Single(Bytes::from(pack(&entry(1)))));
        assert_eq!(m.options.chunk.as_deref(), Some(&b"tok"[..]));

        let m = events(pack(&Value::Array(vec![
            "app".into(),
            1_763_740_801.into(),
            record(1),
        ])));
        assert_eq!(m.options, Options::default());
        let Entries::Single(e) = m.entries else {
            panic!()
        };
        assert_eq!(
            entry::scan_entry(&e).unwrap().time,
            EventTime::new(1_763_740_801, 0)
        );
    }

    #[test]
    fn message_mode_with_v15_time_slot() {
        let slot = Value::Array(vec![event_time(), Value::Map(vec![("m".into(), 1.into())])]);
        let m = events(pack(&Value::Array(vec![
            "app".into(),
            slot.clone(),
            record(1),
            options("t"),
        ])));
        let Entries::Single(e) = m.entries else {
            panic!("not message mode")
        };
        assert!(entry::scan_entry(&e).unwrap().has_metadata);
    }

    /// Fluent Bit's Message mode (a dynamic tag) sends an event's metadata as an option: it is
    /// kept in the entry's time slot, as Forward mode carries it. An empty map adds nothing,
    /// and a time slot that has metadata already keeps its own.
    #[test]
    fn message_mode_metadata_goes_into_the_time_slot() {
        let meta = Value::Map(vec![("k8s_pod".into(), "web-01".into())]);
        let with = |time: Value, metadata: Value| {
            events(pack(&Value::Array(vec![
                "app".into(),
                time,
                record(1),
                Value::Map(vec![
                    ("chunk".into(), "tok".into()),
                    ("fluent_signal".into(), 0.into()),
                    ("metadata".into(), metadata),
                ]),
            ])))
            .entries
        };
        let kept = Value::Array(vec![
            Value::Array(vec![event_time(), meta.clone()]),
            record(1),
        ]);
        assert_eq!(
            with(event_time(), meta.clone()),
            Entries::Single(Bytes::from(pack(&kept)))
        );
        assert_eq!(
            with(event_time(), Value::Map(vec![])),
            Entries::Single(Bytes::from(pack(&entry(1))))
        );
        let own = Value::Array(vec![event_time(), Value::Map(vec![("m".into(), 1.into())])]);
        assert_eq!(
            with(own.clone(), meta),
            Entries::Single(Bytes::from(pack(&Value::Array(vec![own, record(1)]))))
        );
    }

    #[test]
    fn forward_mode_slices_the_entries() {
        let m = events(pack(&Value::Array(vec![
            "app".into(),
            Value::Array(vec![entry(1), entry(2)]),
            options("t"),
        ])));
        let expected = [pack(&entry(1)), pack(&entry(2))].concat();
        assert_eq!(
            m.entries,
            Entries::Array {
                bytes: Bytes::from(expected),
                count: 2
            }
        );
        assert_eq!(m.options.size, Some(2));
    }

    #[test]
    fn packed_forward_accepts_str_and_bin_entries() {
        let blob = [pack(&entry(1)), pack(&entry(2))].concat();
        // Fluentd: str32 (0xdb) even for binary data that is not UTF-8.
        let mut str32 = vec![0x93, 0xa3, b'a', b'p', b'p', 0xdb];
        str32.extend_from_slice(&(blob.len() as u32).to_be_bytes());
        str32.extend_from_slice(&blob);
        str32.extend_from_slice(&pack(&Value::Map(vec![
            ("size".into(), 2.into()),
            ("compressed".into(), "text".into()),
            ("chunk".into(), "p8n9gmxTQVC8/nh2wlKKeQ==\n".into()),
        ])));
        let m = events(str32);
        assert_eq!(m.entries, Entries::Packed(Bytes::from(blob.clone())));
        assert_eq!(m.options.compressed.as_deref(), Some("text"));
        assert_eq!(
            m.options.chunk.as_deref(),
            Some(&b"p8n9gmxTQVC8/nh2wlKKeQ==\n"[..])
        );

        let bin = pack(&Value::Array(vec![
            "app".into(),
            Value::Binary(blob.clone()),
        ]));
        assert_eq!(events(bin).entries, Entries::Packed(Bytes::from(blob)));
    }

    #[test]
    fn fluent_bit_map32_options_with_signal() {
        let blob = pack(&entry(1));
        let mut req = vec![0x93, 0xa3, b'a', b'p', b'p', 0xc4, blob.len() as u8];
        req.extend_from_slice(&blob);
        // map32 with 3 keys: chunk, size, fluent_signal.
        req.extend_from_slice(&[0xdf, 0, 0, 0, 3]);
        for (k, v) in [
            ("chunk", Value::from("rtXcVIIX6crUN5KFMZPzZQ==")),
            ("size", 1.into()),
            ("fluent_signal", 0.into()),
        ] {
            req.extend(pack(&k.into()));
            req.extend(pack(&v));
        }
        let m = events(req);
        assert_eq!(m.options.fluent_signal, Some(0));
        assert_eq!(
            m.options.chunk.as_deref(),
            Some(&b"rtXcVIIX6crUN5KFMZPzZQ=="[..])
        );
    }

    #[test]
    fn ext8_event_time_in_message_mode() {
        let mut req = vec![0x93, 0xa1, b't'];
        encode::event_time_ext8(&mut req, EventTime::new(99, 1));
        req.extend(pack(&record(3)));
        let Entries::Single(e) = events(req).entries else {
            panic!()
        };
        assert_eq!(entry::scan_entry(&e).unwrap().time, EventTime::new(99, 1));
    }

    #[test]
    fn broken_requests_are_named_not_panics() {
        assert_eq!(parse(Bytes::from_static(&[0xc0])), Request::Nop);
        assert_eq!(
            parse(Bytes::from(pack(&"x".into()))),
            Request::Broken("request is not an array")
        );
        assert_eq!(
            parse(Bytes::from(pack(&Value::Array(vec!["t".into()])))),
            Request::Broken("request has fewer than 2 elements")
        );
        assert_eq!(
            parse(Bytes::from(pack(&Value::Array(vec![1.into(), 2.into()])))),
            Request::Broken("message mode request has no record")
        );
        // A tag that is not a string is an empty one (skipped, acked), the request read on.
        let no_tag = events(pack(&Value::Array(vec![
            Value::Nil,
            Value::Array(vec![Value::Array(vec![event_time(), record(1)])]),
            Value::Map(vec![("chunk".into(), "dG9rZW4=".into())]),
        ])));
        assert!(no_tag.tag.is_empty());
        assert_eq!(no_tag.options.chunk.as_deref(), Some(&b"dG9rZW4="[..]));
        assert_eq!(
            parse(Bytes::from(pack(&Value::Array(vec!["t".into(), 5.into()])))),
            Request::Broken("message mode request has no record")
        );
    }

    #[test]
    fn every_prefix_is_incomplete_and_every_mutation_is_handled() {
        let reqs = [
            pack(&Value::Array(vec![
                "app".into(),
                event_time(),
                record(1),
                options("tok"),
            ])),
            pack(&Value::Array(vec![
                "app".into(),
                Value::Array(vec![entry(1), entry(2)]),
                options("t"),
            ])),
            pack(&Value::Array(vec![
                "app".into(),
                Value::Binary(pack(&entry(1))),
                options("t"),
            ])),
        ];
        for req in &reqs {
            // Byte by byte, as a connection reading one byte at a time would see it.
            let mut scanner = ValueScanner::default();
            for cut in 0..req.len() {
                assert_eq!(scanner.advance(&req[..cut]), Ok(None));
            }
            assert_eq!(scanner.advance(req), Ok(Some(req.len())));
            // Any single corrupted byte gives a request, a broken one, or a scan error: no panic.
            for i in 0..req.len() {
                for flip in [0x01, 0x80, 0xff] {
                    let mut bad = req.clone();
                    bad[i] ^= flip;
                    if let Ok(len) = entry::value_len(&bad) {
                        let _ = parse(Bytes::copy_from_slice(&bad[..len]));
                    }
                }
            }
        }
    }

    #[test]
    fn ack_is_a_map_with_a_str_value() {
        let ack = encode_ack(b"p8n9gmxTQVC8/nh2wlKKeQ==\n");
        let v = rmpv::decode::read_value(&mut &ack[..]).unwrap();
        assert_eq!(
            v,
            Value::Map(vec![("ack".into(), "p8n9gmxTQVC8/nh2wlKKeQ==\n".into())])
        );
        assert_eq!(&ack[..6], &[0x81, 0xa3, b'a', b'c', b'k', 0xb9]);
    }
}
