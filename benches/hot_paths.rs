//! Micro-benchmarks of the hot pieces, one group each: finding a request's end and parsing it
//! (`frame`), validating entries and grouping them by timekey (`split`), appending frames to a
//! chunk file (`chunk_append`), compressing a chunk body (`compression`) and decoding a stored
//! object in the consumer crate (`consumer_decode`). Throughput is in bytes of events.
//!
//! `cargo bench --bench hot_paths` runs them all; `cargo bench --bench hot_paths -- split`
//! one group. The inputs are what `claimcheck bench` sends: 200-byte and 100 KB events,
//! records of synthetic log lines, pseudo-random hex (compresses about 2:1) or letters
//! (compresses very well).

use std::hint::black_box;
use std::io::Write;

use bytes::Bytes;
use claimcheck::bench::{sample_entries, sample_request, Mode, Payload};
use claimcheck::buffer::chunk::{ChunkHeader, ChunkWriter};
use claimcheck::forward::entries;
use claimcheck::forward::frame::{self, Request};
use claimcheck::timekey::Timekey;
use claimcheck_consumer::body::{Compression, Encoder, Format};
use claimcheck_consumer::entry::{self, ValueScanner};
use claimcheck_consumer::pointer::Checksum;
use claimcheck_consumer::{verify_and_decode, Pointer};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};

/// 8 MiB of 200-byte events: the default `chunk_limit_size`.
const BODY_EVENTS: usize = 8 * 1024 * 1024 / 200;

fn frame(c: &mut Criterion) {
    let mut g = c.benchmark_group("frame");
    for (name, mode, events, size) in [
        ("packed_1000x200B", Mode::Packed, 1000, 200),
        ("forward_1000x200B", Mode::Forward, 1000, 200),
        ("packed_1x100KB", Mode::Packed, 1, 100_000),
    ] {
        let request = sample_request(mode, "bench.tag0", events, size, Payload::Hex, 1);
        g.throughput(Throughput::Bytes(request.len() as u64));
        // What the connection does on every read: find where the request ends.
        g.bench_function(format!("scan/{name}"), |b| {
            b.iter(|| ValueScanner::default().advance(black_box(&request)))
        });
        let bytes = Bytes::from(request.clone());
        g.bench_function(format!("parse/{name}"), |b| {
            b.iter(|| match frame::parse(black_box(bytes.clone())) {
                Request::Events(m) => m,
                other => panic!("not a request: {other:?}"),
            })
        });
    }
    g.finish();
}

fn split(c: &mut Criterion) {
    let mut g = c.benchmark_group("split");
    for (name, events, size) in [("1000x200B", 1000, 200), ("1x100KB", 1, 100_000)] {
        let blob = Bytes::from(sample_entries(events, size, 0, Payload::Hex));
        g.throughput(Throughput::Bytes(blob.len() as u64));
        g.bench_function(name, |b| {
            b.iter(|| entries::split(black_box(&blob), Timekey::utc(60)));
        });
    }
    // Two timekeys interleaved: every entry starts a new run (the worst case).
    let (a, b) = (
        sample_entries(1, 200, 0, Payload::Hex),
        sample_entries(1, 200, 1, Payload::Hex),
    );
    let mut b = b;
    // Move the second entry's time 60 s ahead: the EventTime's seconds follow `92 d7 00`.
    let secs = u32::from_be_bytes(b[3..7].try_into().expect("4 bytes")) + 60;
    b[3..7].copy_from_slice(&secs.to_be_bytes());
    let blob = Bytes::from([a, b].concat().repeat(500));
    g.throughput(Throughput::Bytes(blob.len() as u64));
    g.bench_function("1000x200B_alternating_timekeys", |bench| {
        bench.iter(|| entries::split(black_box(&blob), Timekey::utc(60)));
    });
    g.finish();
}

fn chunk_append(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let mut g = c.benchmark_group("chunk_append");
    g.sample_size(20);
    // One round's frame: 8 requests of 1000 × 200 B, as slices of the received bytes.
    let request = Bytes::from(sample_entries(1000, 200, 0, Payload::Hex));
    let round: Vec<Bytes> = (0..8).map(|_| request.clone()).collect();
    let per_chunk = 40;
    g.throughput(Throughput::Bytes(
        (request.len() * round.len() * per_chunk) as u64,
    ));
    for sync in [false, true] {
        let name = if sync {
            "64MB_in_1.6MB_frames_fsync_each"
        } else {
            "64MB_in_1.6MB_frames"
        };
        let mut n = 0u64;
        g.bench_function(name, |b| {
            b.iter_batched(
                || {
                    n += 1;
                    let header = ChunkHeader {
                        chunk_id: format!("{n:032x}"),
                        tag: "bench.tag0".into(),
                        timekey: 0,
                        created_ms: 0,
                        reused: false,
                    };
                    let path = dir.path().join(format!("{n}.chunk"));
                    (ChunkWriter::create(&path, &header).expect("create"), path)
                },
                |(mut writer, path)| {
                    for _ in 0..per_chunk {
                        writer.append(&round, &[]).expect("append");
                        if sync {
                            writer.sync().expect("fsync");
                        }
                    }
                    drop(writer);
                    std::fs::remove_file(path).expect("remove");
                },
                BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

fn compression(c: &mut Criterion) {
    let mut g = c.benchmark_group("compression");
    g.sample_size(10);
    for payload in [Payload::Logs, Payload::Hex, Payload::Letters] {
        let body = sample_entries(BODY_EVENTS, 200, 0, payload);
        g.throughput(Throughput::Bytes(body.len() as u64));
        for (name, compression, level) in [
            ("zstd3", Compression::Zstd, None),
            ("zstd1", Compression::Zstd, Some(1)),
            ("gzip6", Compression::Gzip, None),
        ] {
            g.bench_function(format!("{name}/{payload:?}").to_lowercase(), |b| {
                b.iter(|| {
                    let mut e = Encoder::new(compression, level, Vec::with_capacity(body.len()))
                        .expect("encoder");
                    // The uploader writes 1 MiB pieces.
                    for piece in body.chunks(1 << 20) {
                        e.write_all(piece).expect("compress");
                    }
                    e.finish().expect("finish")
                })
            });
        }
    }
    g.finish();
}

/// A stored object and its pointer, as the uploader makes them.
fn stored(body: &[u8], compression: Compression) -> (Pointer, Vec<u8>) {
    let mut e = Encoder::new(compression, None, Vec::new()).expect("encoder");
    e.write_all(body).expect("compress");
    let stored = e.finish().expect("finish");
    let times: Vec<_> = entry::entries(body)
        .map(|e| e.expect("valid entries").1.time)
        .collect();
    let pointer = Pointer {
        v: Pointer::VERSION,
        chunk_id: "0193a1c2e4f87d3e9a5b6c7d8e9f0a1b".into(),
        bucket: "logs".into(),
        key: "bench".into(),
        tag: "bench.tag0".into(),
        timekey: 0,
        first_time: times.iter().copied().min().unwrap_or_default(),
        last_time: times.iter().copied().max().unwrap_or_default(),
        records: times.len() as u64,
        bytes: body.len() as u64,
        stored_bytes: stored.len() as u64,
        format: Format::Msgpack,
        compression,
        checksum: Checksum {
            crc32c: claimcheck_consumer::crc::crc32c(&stored),
        },
        producer: "bench".into(),
        created_at: "2026-11-21T00:00:00.000Z".into(),
        inline: None,
    };
    (pointer, stored)
}

fn consumer_decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("consumer_decode");
    g.sample_size(10);
    let body = sample_entries(BODY_EVENTS, 200, 0, Payload::Hex);
    g.throughput(Throughput::Bytes(body.len() as u64));
    for compression in [Compression::None, Compression::Zstd, Compression::Gzip] {
        let (pointer, object) = stored(&body, compression);
        g.bench_function(
            format!("8MiB_200B_events/{compression:?}").to_lowercase(),
            |b| {
                b.iter(|| {
                    let events = verify_and_decode(&pointer, black_box(&object)).expect("valid");
                    assert_eq!(events.len() as u64, pointer.records);
                    events
                })
            },
        );
    }
    g.finish();
}

criterion_group!(
    benches,
    frame,
    split,
    chunk_append,
    compression,
    consumer_decode
);
criterion_main!(benches);
