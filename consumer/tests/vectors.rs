//! The test vectors of `docs/pointer-format.md`, in `tests/vectors/`: a pointer record and the
//! stored object it names (`NAME.pointer.json`, `NAME.object`), or an inline record that
//! carries its body (`NAME.record`), and the events a reader must produce (or the error it must
//! report).
//!
//! The committed files are the contract; this test checks that the crate reads them as
//! `manifest.json` says. `CLAIMCHECK_WRITE_VECTORS=1 cargo test -p claimcheck-consumer --test
//! vectors` rewrites them from the inputs below first (compressed bytes then depend on the
//! zstd and flate2 versions, which is why the files, not this code, are the reference).

use std::io::Write;
use std::path::PathBuf;

use claimcheck_consumer::body::{self, Compression, Encoder, Format};
use claimcheck_consumer::entry::encode;
use claimcheck_consumer::pointer::Checksum;
use claimcheck_consumer::{verify_and_decode, Error, EventTime, Pointer};
use serde::{Deserialize, Serialize};

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/vectors")
}

#[derive(Debug, Serialize, Deserialize)]
struct Vector {
    name: String,
    about: String,
    /// `events`, or the kind of error a reader must report.
    expect: String,
}

fn pack(buf: &mut Vec<u8>, v: &rmpv::Value) {
    rmpv::encode::write_value(buf, v).unwrap();
}

fn map(pairs: Vec<(rmpv::Value, rmpv::Value)>) -> rmpv::Value {
    rmpv::Value::Map(pairs)
}

/// Five entries using every form of the Fluentd and Fluent Bit wire formats the body keeps.
fn msgpack_body() -> Vec<u8> {
    let mut b = Vec::new();
    // 1. fixarray, EventTime as fixext8.
    b.push(0x92);
    encode::event_time(&mut b, EventTime::new(1_795_276_801, 123_456_789));
    pack(
        &mut b,
        &map(vec![
            ("msg".into(), "hello".into()),
            ("level".into(), "info".into()),
        ]),
    );
    // 2. Integer time (uint32), scalars of every kind, nesting.
    b.push(0x92);
    pack(&mut b, &1_795_276_802u32.into());
    pack(
        &mut b,
        &map(vec![
            ("n".into(), (-42).into()),
            ("f".into(), 1.5f64.into()),
            ("ok".into(), true.into()),
            ("none".into(), rmpv::Value::Nil),
            (
                "list".into(),
                rmpv::Value::Array(vec![
                    1.into(),
                    "two".into(),
                    rmpv::Value::Array(vec![3.into()]),
                ]),
            ),
        ]),
    );
    // 3. Fluent Bit: [[EventTime, metadata], record].
    b.extend_from_slice(&[0x92, 0x92]);
    encode::event_time(&mut b, EventTime::new(1_795_276_803, 5));
    pack(
        &mut b,
        &map(vec![(
            "k8s".into(),
            map(vec![("pod".into(), "web-1".into())]),
        )]),
    );
    pack(&mut b, &map(vec![("log".into(), "with metadata".into())]));
    // 4. EventTime as ext8; bin key and a bin value that is not UTF-8.
    b.push(0x92);
    encode::event_time_ext8(&mut b, EventTime::new(1_795_276_804, 1));
    pack(
        &mut b,
        &map(vec![(
            rmpv::Value::Binary(b"raw".to_vec()),
            rmpv::Value::Binary(b"\xff\xfebytes".to_vec()),
        )]),
    );
    // 5. array16 entry header, uint64 time, map16 record with an integer key, a msgpack
    // timestamp, another extension, NaN, the largest uint64 and non-ASCII text.
    b.extend_from_slice(&[0xdc, 0x00, 0x02, 0xcf]);
    b.extend_from_slice(&1_795_276_805u64.to_be_bytes());
    b.extend_from_slice(&[0xde, 0x00, 0x06]);
    let ts_nanos: u64 = 250_000_000;
    let ts = (ts_nanos << 34) | 1_795_276_800;
    for (k, v) in [
        (rmpv::Value::from(7), rmpv::Value::from("int key")),
        ("ts".into(), rmpv::Value::Ext(-1, ts.to_be_bytes().to_vec())),
        ("x".into(), rmpv::Value::Ext(5, vec![1, 2, 3])),
        ("nan".into(), f64::NAN.into()),
        ("big".into(), u64::MAX.into()),
        ("text".into(), "ü€😀".into()),
    ] {
        pack(&mut b, &k);
        pack(&mut b, &v);
    }
    b
}

/// Compresses `parts` as separate zstd frames or gzip members, back to back.
fn compress(compression: Compression, parts: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for part in parts {
        let mut enc = Encoder::new(compression, None, Vec::new()).unwrap();
        enc.write_all(part).unwrap();
        out.extend(enc.finish().unwrap());
    }
    out
}

/// The pointer to `stored`; vectors are numbered so that their chunk ids differ.
fn pointer(
    n: u16,
    format: Format,
    compression: Compression,
    body: &[u8],
    stored: &[u8],
) -> Pointer {
    let chunk_id = format!("0193a1c2e4f87d3e9a5b6c7d8e9f{n:04x}");
    Pointer {
        v: 1,
        key: format!(
            "app.web/2026/11/21/16/{chunk_id}.{}",
            body::file_extension(format, compression)
        ),
        chunk_id,
        bucket: "logs".into(),
        tag: "app.web".into(),
        timekey: 1_795_276_800,
        first_time: EventTime::new(1_795_276_801, 123_456_789),
        last_time: EventTime::new(1_795_276_805, 0),
        records: 5,
        bytes: body.len() as u64,
        stored_bytes: stored.len() as u64,
        format,
        compression,
        checksum: Checksum {
            crc32c: claimcheck_consumer::crc::crc32c(stored),
        },
        producer: "ip-10-0-1-7".into(),
        created_at: "2026-11-21T16:01:02.345Z".into(),
        inline: None,
    }
}

fn write_vectors() {
    let dir = dir();
    std::fs::create_dir_all(&dir).unwrap();
    let msgpack = msgpack_body();
    let mut json = Vec::new();
    body::write_json_lines("app.web", &msgpack, &mut json).unwrap();
    // Where the second entry (or line) ends: the split point of two-frame objects.
    let cut = |b: &[u8]| -> usize {
        if b[0] == b'{' {
            b.iter()
                .enumerate()
                .filter(|(_, c)| **c == b'\n')
                .nth(1)
                .unwrap()
                .0
                + 1
        } else {
            let first = claimcheck_consumer::entry::value_len(b).unwrap();
            first + claimcheck_consumer::entry::value_len(&b[first..]).unwrap()
        }
    };
    let mut manifest = Vec::new();
    let mut put = |name: &str,
                   about: &str,
                   expect: &str,
                   pointer: &[u8],
                   object: &[u8],
                   events: Option<&[u8]>| {
        std::fs::write(dir.join(format!("{name}.pointer.json")), pointer).unwrap();
        std::fs::write(dir.join(format!("{name}.object")), object).unwrap();
        if let Some(events) = events {
            std::fs::write(dir.join(format!("{name}.events.jsonl")), events).unwrap();
        }
        manifest.push(Vector {
            name: name.into(),
            about: about.into(),
            expect: expect.into(),
        });
    };

    // The json body is already in the event line format: it is what every vector must give.
    let expected = json.clone();
    let bodies = [(Format::Msgpack, &msgpack), (Format::Json, &json)];
    let mut zstd_msgpack = None;
    let mut n = 0;
    for (format, body) in bodies {
        for compression in [Compression::Zstd, Compression::Gzip, Compression::None] {
            n += 1;
            let name = format!("{}-{}", format.as_str(), compression.as_str());
            let multi = matches!(
                (format, compression),
                (Format::Msgpack, Compression::Gzip) | (Format::Json, Compression::Zstd)
            );
            let stored = if multi {
                let at = cut(body);
                compress(compression, &[&body[..at], &body[at..]])
            } else {
                compress(compression, &[body])
            };
            let p = pointer(n, format, compression, body, &stored);
            let mut text = String::from_utf8(p.to_json()).unwrap();
            let mut about = format!(
                "{} body, {} compression",
                format.as_str(),
                compression.as_str()
            );
            if multi {
                about.push_str(", stored as two frames/members back to back");
            }
            if (format, compression) == (Format::Json, Compression::Gzip) {
                // Fields a newer producer might add: readers ignore them.
                text = text.replace(
                    r#""checksum":{"crc32c":"#,
                    r#""something_new":{"a":[1,2]},"checksum":{"sha256":"later","crc32c":"#,
                );
                about.push_str(", with unknown pointer fields");
            }
            if (format, compression) == (Format::Msgpack, Compression::Zstd) {
                zstd_msgpack = Some((p.clone(), stored.clone()));
            }
            put(
                &name,
                &about,
                "events",
                text.as_bytes(),
                &stored,
                Some(&expected),
            );
        }
    }

    let (p, stored) = zstd_msgpack.unwrap();
    let mut damaged = stored.clone();
    let middle = damaged.len() / 2;
    damaged[middle] ^= 0x01;
    put(
        "bad-checksum",
        "msgpack-zstd with one bit of the object flipped",
        "checksum_mismatch",
        &p.to_json(),
        &damaged,
        None,
    );
    put(
        "truncated-object",
        "msgpack-zstd without its last 4 bytes",
        "stored_size_mismatch",
        &p.to_json(),
        &stored[..stored.len() - 4],
        None,
    );
    let mut count = p.clone();
    count.records = 6;
    put(
        "wrong-count",
        "a pointer that claims 6 events for 5",
        "event_count_mismatch",
        &count.to_json(),
        &stored,
        None,
    );
    let newer = String::from_utf8(p.to_json())
        .unwrap()
        .replace(r#"{"v":1,"#, r#"{"v":3,"#);
    put(
        "newer-version",
        "a pointer of version 3",
        "unsupported_version",
        newer.as_bytes(),
        &stored,
        None,
    );
    let keyless = String::from_utf8(p.to_json())
        .unwrap()
        .replace(&format!(r#""key":"{}","#, p.key), "");
    put(
        "no-key",
        "a pointer without its key",
        "malformed_pointer",
        keyless.as_bytes(),
        &stored,
        None,
    );

    // Inline records (version 2): the pointer's JSON, a newline, the stored body. No object.
    let mut inline = |name: &str, about: &str, expect: &str, record: &[u8]| {
        std::fs::write(dir.join(format!("{name}.record")), record).unwrap();
        if expect == "events" {
            std::fs::write(dir.join(format!("{name}.events.jsonl")), &expected).unwrap();
        }
        manifest.push(Vector {
            name: name.into(),
            about: about.into(),
            expect: expect.into(),
        });
    };
    let inlined = |p: &Pointer, stored: &[u8]| p.clone().into_inline(stored.to_vec().into());
    let msgpack_zstd = inlined(&p, &stored);
    inline(
        "inline-msgpack-zstd",
        "msgpack body, zstd compression, inline in the record",
        "events",
        &msgpack_zstd.to_record(),
    );
    let json_none = compress(Compression::None, &[&json]);
    let json_pointer = pointer(20, Format::Json, Compression::None, &json, &json_none);
    inline(
        "inline-json-none",
        "json body (whose lines end in newlines), no compression, inline in the record",
        "events",
        &inlined(&json_pointer, &json_none).to_record(),
    );
    let mut record = msgpack_zstd.to_record();
    let last = record.len() - 1;
    record[last] ^= 0x01;
    inline(
        "inline-bad-checksum",
        "inline msgpack-zstd with one bit of the body flipped",
        "checksum_mismatch",
        &record,
    );
    let record = msgpack_zstd.to_record();
    inline(
        "inline-truncated",
        "inline msgpack-zstd without the last 4 bytes of its body",
        "inline_size_mismatch",
        &record[..record.len() - 4],
    );

    let mut text = serde_json::to_string_pretty(&manifest).unwrap();
    text.push('\n');
    std::fs::write(dir.join("manifest.json"), text).unwrap();
}

fn kind(e: &Error) -> &'static str {
    match e {
        Error::MalformedPointer(_) => "malformed_pointer",
        Error::UnsupportedVersion { .. } => "unsupported_version",
        Error::ChecksumMismatch { .. } => "checksum_mismatch",
        Error::SizeMismatch {
            what: "stored object bytes",
            ..
        } => "stored_size_mismatch",
        Error::SizeMismatch {
            what: "decompressed body bytes",
            ..
        } => "body_size_mismatch",
        Error::SizeMismatch {
            what: "inline body bytes",
            ..
        } => "inline_size_mismatch",
        Error::SizeMismatch {
            what: "event count",
            ..
        } => "event_count_mismatch",
        Error::Decompress(_) => "decompress",
        Error::Decode(_) => "decode",
        other => panic!("not a vector outcome: {other}"),
    }
}

#[test]
fn committed_vectors_give_their_expected_events_or_errors() {
    if std::env::var_os("CLAIMCHECK_WRITE_VECTORS").is_some() {
        write_vectors();
    }
    let dir = dir();
    let manifest: Vec<Vector> =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest.len(), 15, "{manifest:?}");
    for v in &manifest {
        let read = |ext: &str| std::fs::read(dir.join(format!("{}.{ext}", v.name))).unwrap();
        let result = if dir.join(format!("{}.record", v.name)).exists() {
            // An inline record carries its body; there is no object.
            Pointer::from_record(&read("record")).and_then(|p| {
                assert!(p.is_inline(), "{}", v.name);
                let body = p.inline.clone().unwrap();
                verify_and_decode(&p, &body)
            })
        } else {
            let (pointer, object) = (read("pointer.json"), read("object"));
            Pointer::from_record(&pointer).and_then(|p| verify_and_decode(&p, &object))
        };
        match (v.expect.as_str(), result) {
            ("events", Ok(events)) => {
                let got: String = events
                    .iter()
                    .map(|e| format!("{}\n", e.to_json()))
                    .collect();
                let want = String::from_utf8(read("events.jsonl")).unwrap();
                assert_eq!(got, want, "{}", v.name);
            }
            ("events", Err(e)) => panic!("{}: {e}", v.name),
            (expect, Ok(_)) => panic!("{}: decoded, but should be {expect}", v.name),
            (expect, Err(e)) => assert_eq!(kind(&e), expect, "{}: {e}", v.name),
        }
    }
    // A json body's lines are already in the event line format: printed events give them back.
    assert_eq!(
        std::fs::read(dir.join("json-none.object")).unwrap(),
        std::fs::read(dir.join("json-none.events.jsonl")).unwrap()
    );
}
