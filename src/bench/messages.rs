//! The load's requests: forward messages (`packed`, `forward`, compressed) of synthetic
//! events, encoded once before the run, and the ack token that makes each request unique.

use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use claimcheck_consumer::entry::{self, EventTime};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// PackedForward, entries as str32 (what Fluentd sends).
    Packed,
    /// CompressedPackedForward with gzip.
    Gzip,
    /// CompressedPackedForward with zstd.
    Zstd,
    /// Forward mode: an array of entries.
    Forward,
}

/// What the records' `message` field is made of. It decides how well bodies compress, and so
/// what compression costs downstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Payload {
    /// A shifted alphabet (`abcd…`): compresses extremely well (zstd: ~100:1).
    Letters,
    /// Synthetic access-log lines (words from a small vocabulary, a random number after
    /// every other word): zstd about 3.7:1, harder than most real logs.
    Logs,
    /// Pseudo-random hex digits: compresses about 2:1, a pessimistic case for compression.
    Hex,
}

/// Words of [`Payload::Logs`] lines.
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

pub(super) const TOKEN_WIDTH: usize = 24;

/// A request without its token: `head` (shared) ends with the token's str header, and each
/// request is `head` followed by its own token.
pub(super) struct Message {
    pub(super) head: Bytes,
    pub(super) events: u64,
    pub(super) raw_bytes: u64,
}

/// One `[EventTime, {"message": <pad>, "seq": i}]` entry with a pad of `pad` characters.
fn one_entry(
    out: &mut Vec<u8>,
    time: EventTime,
    i: usize,
    pad: usize,
    seq: usize,
    payload: Payload,
) {
    out.push(0x92);
    entry::encode::event_time(out, time);
    // xorshift64* seeded per entry through splitmix64: the same bytes on every run.
    let mut x = ((seq as u64) << 32 ^ i as u64).wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= (x >> 31) | 1;
    let mut random = move || {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    let text: String = match payload {
        Payload::Letters => (0..pad)
            .map(|k| (b'a' + ((i + k + seq) % 26) as u8) as char)
            .collect(),
        Payload::Hex => (0..pad)
            .map(|_| char::from(b"0123456789abcdef"[(random() >> 60) as usize]))
            .collect(),
        Payload::Logs => {
            let mut line = String::with_capacity(pad + 32);
            while line.len() < pad {
                let r = random();
                line.push_str(LOG_WORDS[(r >> 59) as usize]);
                // A number after about every other word: ids, sizes, latencies.
                if r & 1 == 0 {
                    line.push_str(&((r >> 8) % 100_000).to_string());
                }
                line.push(' ');
            }
            line.truncate(pad);
            line
        }
    };
    let record = rmpv::Value::Map(vec![
        ("message".into(), text.into()),
        ("seq".into(), (i as u64).into()),
    ]);
    rmpv::encode::write_value(out, &record).expect("writing to a Vec cannot fail");
}

/// `events` entries of `event_size` bytes each (as near as the msgpack headers allow), stamped
/// with the current time: a PackedForward entries blob, and a chunk body.
pub fn sample_entries(events: usize, event_size: usize, seq: usize, payload: Payload) -> Vec<u8> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let mut out = Vec::with_capacity(events * event_size);
    let mut probe = Vec::new();
    for i in 0..events {
        let time = EventTime::new(now.as_secs() as i64, (i as u32) % 1_000_000_000);
        probe.clear();
        one_entry(&mut probe, time, i, 0, seq, payload);
        let mut pad = event_size.saturating_sub(probe.len());
        probe.clear();
        one_entry(&mut probe, time, i, pad, seq, payload);
        // A longer string may take a longer header: shrink the pad by the difference.
        if probe.len() > event_size && pad > 0 {
            pad -= (probe.len() - event_size).min(pad);
        }
        one_entry(&mut out, time, i, pad, seq, payload);
    }
    out
}

/// One whole forward request as the load generator sends it, with ack token `token`.
pub fn sample_request(
    mode: Mode,
    tag: &str,
    events: usize,
    event_size: usize,
    payload: Payload,
    token: u64,
) -> Vec<u8> {
    let m = encode_message(mode, tag, events, event_size, 0, payload);
    let mut out = m.head.to_vec();
    out.extend_from_slice(&self::token(0, 0, token));
    out
}

pub(super) fn encode_message(
    mode: Mode,
    tag: &str,
    events: usize,
    event_size: usize,
    seq: usize,
    payload: Payload,
) -> Message {
    let body = sample_entries(events, event_size, seq, payload);
    let raw_bytes = body.len() as u64;
    let mut head = Vec::with_capacity(body.len() + 64);
    head.push(0x93);
    rmp::encode::write_str(&mut head, tag).expect("vec");
    let compressed = match mode {
        Mode::Packed => {
            head.push(0xdb);
            head.extend_from_slice(&(body.len() as u32).to_be_bytes());
            head.extend_from_slice(&body);
            "text"
        }
        Mode::Forward => {
            rmp::encode::write_array_len(&mut head, events as u32).expect("vec");
            head.extend_from_slice(&body);
            "text"
        }
        Mode::Gzip | Mode::Zstd => {
            let compressed = if mode == Mode::Gzip {
                let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                e.write_all(&body).expect("vec");
                e.finish().expect("vec")
            } else {
                zstd::encode_all(&body[..], 1).expect("vec")
            };
            head.push(0xdb);
            head.extend_from_slice(&(compressed.len() as u32).to_be_bytes());
            head.extend_from_slice(&compressed);
            if mode == Mode::Gzip {
                "gzip"
            } else {
                "zstd"
            }
        }
    };
    // {"size": n, "compressed": c, "chunk": <token>}, the token written per request.
    head.push(0x83);
    rmp::encode::write_str(&mut head, "size").expect("vec");
    rmp::encode::write_uint(&mut head, events as u64).expect("vec");
    rmp::encode::write_str(&mut head, "compressed").expect("vec");
    rmp::encode::write_str(&mut head, compressed).expect("vec");
    rmp::encode::write_str(&mut head, "chunk").expect("vec");
    rmp::encode::write_str_len(&mut head, TOKEN_WIDTH as u32).expect("vec");
    Message {
        head: Bytes::from(head),
        events: events as u64,
        raw_bytes,
    }
}

/// Ack token of request `n` on connection `conn` of run `run`. Tokens differ between runs:
/// a receiver that remembers tokens (claimcheck's resend window) would otherwise take a second
/// run's requests for resends of the first's.
pub(super) fn token(run: u32, conn: usize, n: u64) -> [u8; TOKEN_WIDTH] {
    let mut t = [b'0'; TOKEN_WIDTH];
    let s = format!("r{run:08x}c{conn:03}n{n:010}");
    t[..s.len().min(TOKEN_WIDTH)].copy_from_slice(&s.as_bytes()[..s.len().min(TOKEN_WIDTH)]);
    t
}
