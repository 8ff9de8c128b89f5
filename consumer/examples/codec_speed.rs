//! Times the codecs and the crate's decoding on one body, interleaved in one process, so that
//! a busy machine slows every variant alike: gzip and zstd compression, raw decompression, and
//! the crate's verification and decoding of the same stored object.
//!
//! ```sh
//! cargo run --release -p claimcheck-consumer --example codec_speed -- [GROUP] [ROUNDS]
//! ```
//!
//! `GROUP` is `gzip` (compression at levels 1 and 6 and decompression), `decode` (raw zstd and
//! gzip decompression against the crate's `verify_and_decode`, `Decoder` (events one at a
//! time, and `next_block`'s blocks) and `verify` on the same objects, and the uncompressed
//! body) or `all` (the default); `ROUNDS` defaults to 7.
//! Each round runs every variant in turn (each for at least 250 ms); the line printed per
//! variant gives the median round in MB of body (10^6 bytes) per CPU-second and in
//! CPU-seconds per GB of body: the thread's own CPU time, from `/proc/thread-self/schedstat`
//! where there is one (else wall time), so that time spent waiting for a busy machine's
//! cores is not counted.
//!
//! The body is 8 MiB of 200-byte access-log-like events, the lines of
//! `claimcheck bench --payload logs` (words from a small vocabulary, a random number after
//! about every other word; zstd level 3 about 3.6:1).

use std::io::{Read, Write};
use std::time::Instant;

use claimcheck_consumer::body::{self, Compression, Encoder, Format};
use claimcheck_consumer::entry::{self, EventTime};
use claimcheck_consumer::pointer::Checksum;
use claimcheck_consumer::{verify, verify_and_decode, Decoder, Pointer};

const BODY_BYTES: usize = 8 * 1024 * 1024;
const EVENT_BYTES: usize = 200;

/// Words of the log lines, as in `claimcheck bench --payload logs`.
const LOG_WORDS: [&str; 32] = [
    "GET",
    "POST",
    "PUT",
    "DELETE",
    "/api/v1/users",
    "/api/v1/orders",
    "/healthz",
    "/static/app.js",
    "/api/v2/search",
    "/login",
    "HTTP/1.1",
    "HTTP/2.0",
    "200",
    "201",
    "204",
    "301",
    "404",
    "500",
    "Mozilla/5.0",
    "curl/8.5.0",
    "python-requests/2.32",
    "Go-http-client/1.1",
    "user_id=",
    "session=",
    "latency_ms=",
    "bytes=",
    "upstream=10.0.3.",
    "region=eu-west-1",
    "trace_id=",
    "level=info",
    "level=warn",
    "msg=\"request served\"",
];

/// One `[EventTime, {"message": <line>, "seq": i}]` entry with a line of `pad` characters.
fn one_entry(out: &mut Vec<u8>, time: EventTime, i: usize, pad: usize) {
    out.push(0x92);
    entry::encode::event_time(out, time);
    let mut x = (i as u64).wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= (x >> 31) | 1;
    let mut line = String::with_capacity(pad + 32);
    while line.len() < pad {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let r = x.wrapping_mul(0x2545_f491_4f6c_dd1d);
        line.push_str(LOG_WORDS[(r >> 59) as usize]);
        if r & 1 == 0 {
            line.push_str(&((r >> 8) % 100_000).to_string());
        }
        line.push(' ');
    }
    line.truncate(pad);
    let record = rmpv::Value::Map(vec![
        ("message".into(), line.into()),
        ("seq".into(), (i as u64).into()),
    ]);
    rmpv::encode::write_value(out, &record).expect("writing to a Vec cannot fail");
}

fn logs_body() -> (Vec<u8>, u64) {
    let mut out = Vec::with_capacity(BODY_BYTES + EVENT_BYTES);
    let mut probe = Vec::new();
    let mut events = 0;
    while out.len() + EVENT_BYTES <= BODY_BYTES {
        let time = EventTime::new(1_764_288_000, events as u32);
        probe.clear();
        one_entry(&mut probe, time, events, 0);
        let pad = EVENT_BYTES.saturating_sub(probe.len());
        probe.clear();
        one_entry(&mut probe, time, events, pad);
        let pad = pad - probe.len().saturating_sub(EVENT_BYTES).min(pad);
        one_entry(&mut out, time, events, pad);
        events += 1;
    }
    (out, events as u64)
}

fn compress(body: &[u8], compression: Compression, level: Option<i32>) -> Vec<u8> {
    let mut e = Encoder::new(compression, level, Vec::with_capacity(body.len())).expect("encoder");
    // The uploader writes 1 MiB pieces.
    for piece in body.chunks(1 << 20) {
        e.write_all(piece).expect("compress");
    }
    e.finish().expect("finish")
}

/// A stored object and its pointer, as the uploader makes them.
fn stored(body: &[u8], events: u64, compression: Compression) -> (Pointer, Vec<u8>) {
    let stored = compress(body, compression, None);
    let pointer = Pointer {
        v: Pointer::VERSION,
        chunk_id: "0193a1c2e4f87d3e9a5b6c7d8e9f0a1b".into(),
        bucket: "logs".into(),
        key: "bench".into(),
        tag: "bench.tag0".into(),
        timekey: 0,
        first_time: EventTime::new(1_764_288_000, 0),
        last_time: EventTime::new(1_764_288_000, events as u32 - 1),
        records: events,
        bytes: body.len() as u64,
        stored_bytes: stored.len() as u64,
        format: Format::Msgpack,
        compression,
        checksum: Checksum {
            crc32c: claimcheck_consumer::crc::crc32c(&stored),
        },
        producer: "bench".into(),
        created_at: "2026-11-28T00:00:00.000Z".into(),
        inline: None,
    };
    (pointer, stored)
}

/// Streams a stored object through the codec's decompressor into a 64 KiB buffer: what any
/// streaming reader of the object has to pay.
fn raw_decompress(compression: Compression, stored: &[u8]) -> u64 {
    let mut d = body::decoder(compression, stored).expect("decoder");
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = d.read(&mut buf).expect("decompress");
        if n == 0 {
            return total;
        }
        total += n as u64;
    }
}

/// Nanoseconds this thread has run on a CPU, if the system says.
fn thread_cpu_ns() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    stat.split_whitespace().next()?.parse().ok()
}

struct Variant<'a> {
    name: String,
    run: Box<dyn FnMut() -> u64 + 'a>,
    /// (wall seconds, CPU seconds) per round.
    rounds: Vec<(f64, f64)>,
}

fn variant<'a>(name: impl Into<String>, run: impl FnMut() -> u64 + 'a) -> Variant<'a> {
    Variant {
        name: name.into(),
        run: Box::new(run),
        rounds: Vec::new(),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let group = args.first().map_or("all", String::as_str);
    let rounds: usize = args.get(1).map_or(7, |r| r.parse().expect("ROUNDS"));
    let (body, events) = logs_body();
    let mb = body.len() as f64 / 1e6;
    let (p_none, s_none) = stored(&body, events, Compression::None);
    let (p_zstd, s_zstd) = stored(&body, events, Compression::Zstd);
    let (p_gzip, s_gzip) = stored(&body, events, Compression::Gzip);
    println!(
        "body: {} bytes, {events} events; zstd 3 {:.2}:1, gzip 6 {:.2}:1",
        body.len(),
        body.len() as f64 / s_zstd.len() as f64,
        body.len() as f64 / s_gzip.len() as f64,
    );

    let mut variants: Vec<Variant> = Vec::new();
    if matches!(group, "gzip" | "all") {
        for level in [1, 6] {
            let body = &body;
            variants.push(variant(format!("gzip {level} compress"), move || {
                compress(body, Compression::Gzip, Some(level)).len() as u64
            }));
        }
        variants.push(variant("gzip decompress", || {
            raw_decompress(Compression::Gzip, &s_gzip)
        }));
    }
    if matches!(group, "decode" | "all") {
        for (name, c, p, s) in [
            ("zstd", Compression::Zstd, &p_zstd, &s_zstd),
            ("gzip", Compression::Gzip, &p_gzip, &s_gzip),
            ("none", Compression::None, &p_none, &s_none),
        ] {
            if c != Compression::None {
                variants.push(variant(format!("{name} decompress"), move || {
                    raw_decompress(c, s)
                }));
            }
            if c == Compression::Zstd {
                variants.push(variant(format!("{name} decompress bulk"), move || {
                    zstd::bulk::decompress(s, p.bytes as usize)
                        .expect("decompress")
                        .len() as u64
                }));
            }
            variants.push(variant(format!("{name} verify_and_decode"), move || {
                verify_and_decode(p, s).expect("valid").len() as u64
            }));
            variants.push(variant(format!("{name} Decoder"), move || {
                let mut n = 0;
                for event in Decoder::new(p, &s[..]).expect("decoder") {
                    event.expect("valid");
                    n += 1;
                }
                n
            }));
            variants.push(variant(format!("{name} Decoder blocks"), move || {
                let mut decoder = Decoder::new(p, &s[..]).expect("decoder");
                let mut n = 0;
                while let Some(block) = decoder.next_block().expect("valid") {
                    for event in &block {
                        std::hint::black_box(event.time());
                        n += 1;
                    }
                }
                n
            }));
            variants.push(variant(format!("{name} verify"), move || {
                verify(p, &s[..]).expect("valid");
                0
            }));
        }
    }
    // A warm-up round, which also sets how many times a variant runs per sample: the thread's
    // CPU clock may advance by whole scheduler ticks (4 ms on some systems), so a sample
    // lasts 250 ms or more.
    let mut reps = vec![1u32; variants.len()];
    for round in 0..=rounds {
        for (v, reps) in variants.iter_mut().zip(reps.iter_mut()) {
            let cpu = thread_cpu_ns();
            let started = Instant::now();
            for _ in 0..*reps {
                std::hint::black_box((v.run)());
            }
            let wall = started.elapsed().as_secs_f64();
            let cpu = match (cpu, thread_cpu_ns()) {
                (Some(a), Some(b)) => (b - a) as f64 / 1e9,
                _ => wall,
            };
            if round == 0 {
                *reps = (0.25 / wall.max(1e-6)).ceil().max(1.0) as u32;
            } else {
                let n = f64::from(*reps);
                v.rounds.push((wall / n, cpu / n));
            }
        }
    }
    for v in &variants {
        let wall = median(v.rounds.iter().map(|r| r.0).collect());
        let cpu = median(v.rounds.iter().map(|r| r.1).collect());
        println!(
            "{:<24} {:>8.1} MB/s  {:>6.2} CPU-s/GB  (per pass: wall {:.2} ms, CPU {:.2} ms)",
            v.name,
            mb / cpu,
            cpu / mb * 1e3,
            wall * 1e3,
            cpu * 1e3,
        );
    }
    // Each decoding variant against its codec's own decompression, round by round: the
    // share of the codec's speed left once the crate has done its part.
    for v in variants.iter().filter(|v| !v.name.contains("compress")) {
        let codec = v.name.split(' ').next().unwrap_or_default();
        let raw = format!("{codec} decompress");
        for base in variants.iter().filter(|b| b.name.starts_with(&raw)) {
            let ratios = v.rounds.iter().zip(&base.rounds).map(|(v, b)| b.1 / v.1);
            println!(
                "{:<24} {:>6.1} % of {}'s speed",
                v.name,
                median(ratios.collect()) * 100.0,
                base.name
            );
        }
    }
}
