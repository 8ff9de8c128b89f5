//! `claimcheck bench`: a forward load generator with acks, for claimcheck or any forward
//! receiver (Fluentd's in_forward, Fluent Bit's).
//!
//! Messages are encoded once before the run; per request only the ack token (a fixed-width
//! counter) changes, so the generator itself stays cheap (its CPU time is reported). Every
//! connection keeps `window` requests in flight and matches acks in order.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use bytes::{Bytes, BytesMut};
use claimcheck_consumer::entry::{self, EventTime, ValueScanner};
use rustls::pki_types::ServerName;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::{parse_duration, parse_size};
use crate::forward::security::sha512_hex;

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

/// `claimcheck bench`: send pre-encoded forward requests and measure acks.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Forward receiver to load.
    #[arg(long, default_value = "127.0.0.1:24224")]
    pub target: SocketAddr,
    /// Bytes per event (the whole msgpack entry, approximately).
    #[arg(long, default_value_t = 200)]
    pub event_size: usize,
    /// Events per request.
    #[arg(long, default_value_t = 1000)]
    pub events_per_message: usize,
    /// Distinct tags, used round-robin.
    #[arg(long, default_value_t = 1)]
    pub tags: usize,
    /// Bytes of distinct requests to pre-encode, shared among the tags (default: 16 MiB in at
    /// most 256 requests). A tag's chunk holds its share only: with many tags, give it more
    /// than the tags' chunks hold together, or bodies repeat themselves and compress better
    /// than the records would.
    #[arg(long, value_parser = parse_size)]
    pub distinct_bytes: Option<u64>,
    #[arg(long, value_enum, default_value = "packed")]
    pub mode: Mode,
    /// What the records' `message` field is made of.
    #[arg(long, value_enum, default_value = "logs")]
    pub payload: Payload,
    /// Concurrent connections.
    #[arg(long, default_value_t = 1)]
    pub connections: usize,
    /// Requests in flight per connection.
    #[arg(long, default_value_t = 4)]
    pub window: usize,
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub duration: Duration,
    /// Send at most this many events per second in all (requests evenly spaced, each
    /// connection its share); unset: as fast as acks come back.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Answer the receiver's HELO with this shared key (its `<security>` section).
    #[arg(long, env = "CLAIMCHECK_BENCH_SHARED_KEY", hide_env_values = true)]
    pub shared_key: Option<String>,
    /// Hostname sent in PING.
    #[arg(long, default_value = "claimcheck-bench")]
    pub self_hostname: String,
    /// `user:password` for a receiver with `user_auth`.
    #[arg(long, env = "CLAIMCHECK_BENCH_USER", hide_env_values = true)]
    pub user: Option<String>,
    /// Connect with TLS.
    #[arg(long)]
    pub tls: bool,
    /// CA certificate (PEM) to verify the receiver with. Without it the receiver's
    /// certificate is not verified: a load generator, not a client to trust with secrets.
    #[arg(long)]
    pub tls_ca_path: Option<std::path::PathBuf>,
    /// Name to verify the receiver's certificate against (default: the target's address).
    #[arg(long)]
    pub tls_server_name: Option<String>,
    /// Report CPU seconds and peak RSS of this process (e.g. the sidecar) over the run.
    #[arg(long)]
    pub pid: Option<u32>,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

/// What a run measured.
#[derive(Debug, Serialize)]
pub struct Report {
    pub mode: String,
    pub payload: String,
    pub connections: usize,
    pub window: usize,
    pub event_bytes: usize,
    pub events_per_message: usize,
    pub seconds: f64,
    pub requests: u64,
    pub events: u64,
    pub events_per_sec: f64,
    /// Event bytes (uncompressed entries) acknowledged per second, in MB (10^6 bytes).
    pub mb_per_sec: f64,
    /// Bytes written to the sockets per second, in MB.
    pub wire_mb_per_sec: f64,
    pub ack_p50_ms: f64,
    pub ack_p99_ms: f64,
    pub ack_max_ms: f64,
    pub errors: u64,
    pub bench_cpu_seconds: f64,
    pub target_cpu_seconds: Option<f64>,
    pub target_peak_rss_mib: Option<f64>,
}

const TOKEN_WIDTH: usize = 24;

/// A request without its token: `head` (shared) ends with the token's str header, and each
/// request is `head` followed by its own token.
struct Message {
    head: Bytes,
    events: u64,
    raw_bytes: u64,
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

fn encode_message(
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
fn token(run: u32, conn: usize, n: u64) -> [u8; TOKEN_WIDTH] {
    let mut t = [b'0'; TOKEN_WIDTH];
    let s = format!("r{run:08x}c{conn:03}n{n:010}");
    t[..s.len().min(TOKEN_WIDTH)].copy_from_slice(&s.as_bytes()[..s.len().min(TOKEN_WIDTH)]);
    t
}

#[derive(Default)]
struct ConnStats {
    requests: u64,
    events: u64,
    raw_bytes: u64,
    wire_bytes: u64,
    latencies_us: Vec<u32>,
    errors: u64,
}

async fn run_connection(
    id: usize,
    run: u32,
    tls: Option<tokio_rustls::TlsConnector>,
    args: Arc<BenchArgs>,
    messages: Arc<Vec<Message>>,
    stop: Arc<AtomicBool>,
) -> ConnStats {
    let mut stats = ConnStats::default();
    let stream = match connect(&args, tls.as_ref()).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("connection {id} to {}: {e:#}", args.target);
            stats.errors += 1;
            return stats;
        }
    };
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut in_flight: std::collections::VecDeque<(u64, Instant, usize)> = Default::default();
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut next = 0u64;
    // Under `--rate`, request n of this connection is due at `started + n * interval`.
    let interval = args.rate.filter(|r| *r > 0.0).map(|r| {
        let per_conn = r / args.connections.max(1) as f64;
        Duration::from_secs_f64(args.events_per_message.max(1) as f64 / per_conn)
    });
    let started = Instant::now();
    loop {
        let mut due_at = None;
        while in_flight.len() < args.window && !stop.load(Ordering::Relaxed) {
            if let Some(interval) = interval {
                let due = started + interval.mul_f64(next as f64);
                if due > Instant::now() {
                    due_at = Some(due);
                    break;
                }
            }
            let m = &messages[(next as usize + id) % messages.len()];
            let t = token(run, id, next);
            if let Err(e) = async {
                wr.write_all(&m.head).await?;
                wr.write_all(&t).await
            }
            .await
            {
                eprintln!("connection {id}: write failed: {e}");
                stats.errors += 1;
                return stats;
            }
            stats.wire_bytes += (m.head.len() + TOKEN_WIDTH) as u64;
            in_flight.push_back((next, Instant::now(), (next as usize + id) % messages.len()));
            next += 1;
        }
        if in_flight.is_empty() {
            match due_at {
                Some(due) => {
                    tokio::time::sleep_until(due.into()).await;
                    continue;
                }
                None => return stats,
            }
        }
        // Read acks until at least one completes (or the next request is due).
        let mut scanner = ValueScanner::default();
        let len = loop {
            match scanner.advance(&buf) {
                Ok(Some(len)) => break Some(len),
                Ok(None) => {}
                Err(e) => {
                    eprintln!("connection {id}: bad ack: {e}");
                    stats.errors += 1;
                    return stats;
                }
            }
            let read = match due_at {
                Some(due) => tokio::select! {
                    r = rd.read_buf(&mut buf) => Some(r),
                    () = tokio::time::sleep_until(due.into()) => None,
                },
                None => Some(rd.read_buf(&mut buf).await),
            };
            let Some(read) = read else {
                break None;
            };
            match read {
                Ok(0) | Err(_) => {
                    eprintln!(
                        "connection {id}: closed by the receiver with {} requests unacknowledged",
                        in_flight.len()
                    );
                    stats.errors += in_flight.len() as u64;
                    return stats;
                }
                Ok(_) => {}
            }
        };
        // A request is due: send it, then come back for the ack.
        let Some(len) = len else {
            continue;
        };
        let ack = buf.split_to(len);
        let (n, sent, index) = in_flight.pop_front().expect("a request is in flight");
        let want = token(run, id, n);
        if !ack.ends_with(&want) {
            eprintln!("connection {id}: ack does not match request {n}");
            stats.errors += 1;
            return stats;
        }
        stats
            .latencies_us
            .push(sent.elapsed().as_micros().min(u32::MAX as u128) as u32);
        stats.requests += 1;
        stats.events += messages[index].events;
        stats.raw_bytes += messages[index].raw_bytes;
    }
}

/// A connection to the receiver: TCP or TLS.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// Connects, with TLS if asked, and answers the receiver's HELO if given a shared key.
async fn connect(
    args: &BenchArgs,
    tls: Option<&tokio_rustls::TlsConnector>,
) -> anyhow::Result<Box<dyn Stream>> {
    let tcp = TcpStream::connect(args.target)
        .await
        .context("cannot connect")?;
    let _ = tcp.set_nodelay(true);
    let mut stream: Box<dyn Stream> = match tls {
        None => Box::new(tcp),
        Some(connector) => {
            let name = match &args.tls_server_name {
                Some(name) => ServerName::try_from(name.clone())
                    .with_context(|| format!("{name:?} is not a server name"))?,
                None => ServerName::IpAddress(args.target.ip().into()),
            };
            Box::new(
                connector
                    .connect(name, tcp)
                    .await
                    .context("TLS handshake failed")?,
            )
        }
    };
    if let Some(key) = &args.shared_key {
        handshake(&mut stream, args, key).await?;
    }
    Ok(stream)
}

/// The forward protocol's handshake as a client: HELO in, PING out, PONG in and checked.
async fn handshake(
    stream: &mut Box<dyn Stream>,
    args: &BenchArgs,
    key: &str,
) -> anyhow::Result<()> {
    use rmpv::Value;
    let helo = read_value(stream)
        .await
        .context("no HELO (does the receiver have a shared key?)")?;
    let options = match helo.as_array().map(Vec::as_slice) {
        Some([kind, options]) if kind.as_str() == Some("HELO") => options,
        _ => anyhow::bail!("expected HELO, got {helo}"),
    };
    let field = |name: &str| -> Vec<u8> {
        let v = options
            .as_map()
            .and_then(|m| m.iter().find(|(k, _)| k.as_str() == Some(name)))
            .map(|(_, v)| v);
        match v {
            Some(Value::Binary(b)) => b.clone(),
            Some(Value::String(s)) => s.as_bytes().to_vec(),
            _ => Vec::new(),
        }
    };
    let (nonce, auth) = (field("nonce"), field("auth"));
    let salt: [u8; 16] = rand::random();
    let hostname = args.self_hostname.as_bytes();
    let digest = sha512_hex(&[&salt, hostname, &nonce, key.as_bytes()]);
    let (user, password_digest) = match (&args.user, auth.is_empty()) {
        (Some(user), false) => {
            let (name, password) = user
                .split_once(':')
                .context("--user must be user:password")?;
            let digest = sha512_hex(&[&auth, name.as_bytes(), password.as_bytes()]);
            (name.to_string(), digest)
        }
        (None, false) => anyhow::bail!("the receiver asks for a user (give --user)"),
        (_, true) => (String::new(), String::new()),
    };
    let ping = Value::Array(vec![
        "PING".into(),
        args.self_hostname.clone().into(),
        Value::Binary(salt.to_vec()),
        digest.into(),
        user.into(),
        password_digest.into(),
    ]);
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, &ping).expect("writing to a Vec cannot fail");
    stream.write_all(&out).await?;
    let pong = read_value(stream).await.context("no PONG")?;
    match pong.as_array().map(Vec::as_slice) {
        Some([kind, ok, reason, server, digest]) if kind.as_str() == Some("PONG") => {
            if ok.as_bool() != Some(true) {
                anyhow::bail!("handshake refused: {}", reason.as_str().unwrap_or("?"));
            }
            let server = server.as_str().unwrap_or_default().as_bytes();
            let want = sha512_hex(&[&salt, server, &nonce, key.as_bytes()]);
            if digest.as_str() != Some(want.as_str()) {
                anyhow::bail!("the receiver's PONG digest is wrong: is its shared key the same?");
            }
            Ok(())
        }
        _ => anyhow::bail!("expected PONG, got {pong}"),
    }
}

/// Reads one msgpack value (a handshake message) from the stream.
async fn read_value(stream: &mut Box<dyn Stream>) -> anyhow::Result<rmpv::Value> {
    let mut buf = Vec::with_capacity(512);
    let mut scanner = ValueScanner::default();
    loop {
        if let Some(len) = scanner.advance(&buf)? {
            anyhow::ensure!(
                len == buf.len(),
                "unexpected bytes after a handshake message"
            );
            return Ok(rmpv::decode::read_value(&mut &buf[..])?);
        }
        anyhow::ensure!(buf.len() < 64 << 10, "handshake message too long");
        let mut piece = [0u8; 4096];
        let n = stream.read(&mut piece).await?;
        anyhow::ensure!(n > 0, "closed by the receiver");
        buf.extend_from_slice(&piece[..n]);
    }
}

/// A TLS client for the load: verifying with `ca` if given, otherwise accepting any
/// certificate.
fn tls_connector(ca: Option<&std::path::Path>) -> anyhow::Result<tokio_rustls::TlsConnector> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let config = match ca {
        Some(path) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(path)
                .with_context(|| format!("cannot read {}", path.display()))?
            {
                roots.add(cert?)?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
            .with_no_client_auth(),
    };
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// Accepts the receiver's certificate unchecked (signatures are still verified).
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Distinct bytes the pre-encoded messages cover at least (up to `MAX_MESSAGES` of them)
/// unless `--distinct-bytes` says otherwise: more than a compressor's window, so that bodies
/// made of repeated messages do not compress better than the records themselves would.
const DISTINCT_BYTES: usize = 16 << 20;
const MAX_MESSAGES: usize = 256;

/// How many different messages to pre-encode: two per tag at least, and as many for each tag
/// (so that request n, message n modulo the count, goes to tag n modulo the tags).
fn distinct_messages(args: &BenchArgs) -> usize {
    let message = (args.events_per_message.max(1) * args.event_size.max(1)).max(1);
    let tags = args.tags.max(1);
    let n = match args.distinct_bytes {
        Some(bytes) => (bytes as usize).div_ceil(message).max(1),
        None => DISTINCT_BYTES.div_ceil(message).clamp(1, MAX_MESSAGES),
    };
    n.max(tags * 2).next_multiple_of(tags)
}

/// CPU seconds (user + system) of a process, from /proc.
fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// Peak resident set size of a process in MiB, from /proc (VmHWM).
fn peak_rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[i]) / 1000.0
}

pub async fn run(args: BenchArgs) -> anyhow::Result<Report> {
    let args = Arc::new(args);
    let messages: Arc<Vec<Message>> = Arc::new(
        (0..distinct_messages(&args))
            .map(|i| {
                encode_message(
                    args.mode,
                    &format!("bench.tag{}", i % args.tags.max(1)),
                    args.events_per_message.max(1),
                    args.event_size,
                    i,
                    args.payload,
                )
            })
            .collect(),
    );
    let tls = if args.tls {
        Some(tls_connector(args.tls_ca_path.as_deref())?)
    } else {
        None
    };
    let run: u32 = rand::random();
    let target_cpu_before = args.pid.and_then(|p| cpu_seconds(&p.to_string()));
    let bench_cpu_before = cpu_seconds("self").unwrap_or(0.0);
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let tasks: Vec<_> = (0..args.connections.max(1))
        .map(|id| {
            tokio::spawn(run_connection(
                id,
                run,
                tls.clone(),
                args.clone(),
                messages.clone(),
                stop.clone(),
            ))
        })
        .collect();
    tokio::time::sleep(args.duration).await;
    stop.store(true, Ordering::Relaxed);
    let mut total = ConnStats::default();
    for t in tasks {
        let s = t.await?;
        total.requests += s.requests;
        total.events += s.events;
        total.raw_bytes += s.raw_bytes;
        total.wire_bytes += s.wire_bytes;
        total.errors += s.errors;
        total.latencies_us.extend(s.latencies_us);
    }
    let seconds = started.elapsed().as_secs_f64();
    total.latencies_us.sort_unstable();
    let target_cpu = match (args.pid, target_cpu_before) {
        (Some(p), Some(before)) => cpu_seconds(&p.to_string()).map(|after| after - before),
        _ => None,
    };
    Ok(Report {
        mode: format!("{:?}", args.mode).to_lowercase(),
        payload: format!("{:?}", args.payload).to_lowercase(),
        connections: args.connections,
        window: args.window,
        event_bytes: args.event_size,
        events_per_message: args.events_per_message,
        seconds,
        requests: total.requests,
        events: total.events,
        events_per_sec: total.events as f64 / seconds,
        mb_per_sec: total.raw_bytes as f64 / seconds / 1e6,
        wire_mb_per_sec: total.wire_bytes as f64 / seconds / 1e6,
        ack_p50_ms: percentile(&total.latencies_us, 0.50),
        ack_p99_ms: percentile(&total.latencies_us, 0.99),
        ack_max_ms: total
            .latencies_us
            .last()
            .map_or(0.0, |m| f64::from(*m) / 1000.0),
        errors: total.errors,
        bench_cpu_seconds: cpu_seconds("self").unwrap_or(0.0) - bench_cpu_before,
        target_cpu_seconds: target_cpu,
        target_peak_rss_mib: args.pid.and_then(peak_rss_mib),
    })
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "mode {} ({}) · {} connections × window {} · {} events of ~{} B per request · {:.1} s",
            self.mode,
            self.payload,
            self.connections,
            self.window,
            self.events_per_message,
            self.event_bytes,
            self.seconds
        )?;
        writeln!(
            f,
            "acked    {} requests, {} events, {} errors",
            self.requests, self.events, self.errors
        )?;
        writeln!(
            f,
            "rate     {:.0} events/s · {:.1} MB/s of events · {:.1} MB/s on the wire",
            self.events_per_sec, self.mb_per_sec, self.wire_mb_per_sec
        )?;
        writeln!(
            f,
            "ack      p50 {:.2} ms · p99 {:.2} ms · max {:.2} ms",
            self.ack_p50_ms, self.ack_p99_ms, self.ack_max_ms
        )?;
        write!(f, "cpu      bench {:.2} s", self.bench_cpu_seconds)?;
        if let Some(cpu) = self.target_cpu_seconds {
            write!(f, " · target {cpu:.2} s")?;
        }
        if let Some(rss) = self.target_peak_rss_mib {
            write!(f, " · target peak RSS {rss:.1} MiB")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use claimcheck_consumer::entry;

    use super::*;
    use crate::forward::frame::{self, Request};

    fn args(tags: usize, events_per_message: usize, distinct_bytes: Option<u64>) -> BenchArgs {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            bench: BenchArgs,
        }
        let mut a = Cli::parse_from(["bench"]).bench;
        (a.tags, a.events_per_message, a.distinct_bytes) =
            (tags, events_per_message, distinct_bytes);
        a
    }

    #[test]
    fn every_tag_gets_as_many_distinct_messages() {
        // Default: 16 MiB of 200 KB requests.
        assert_eq!(distinct_messages(&args(1, 1000, None)), 84);
        // Small requests: at most 256, and two per tag at least.
        assert_eq!(distinct_messages(&args(1, 25, None)), 256);
        assert_eq!(distinct_messages(&args(3000, 1, None)), 6000);
        assert_eq!(distinct_messages(&args(200, 25, None)) % 200, 0);
        // Asked for: 80 MiB of 5 KB requests, 420 KB per tag.
        let n = distinct_messages(&args(200, 25, Some(80 << 20)));
        assert_eq!((n, n % 200), (16800, 0));
    }

    #[test]
    fn encoded_messages_parse_as_forward_requests_of_the_right_size() {
        for mode in [Mode::Packed, Mode::Forward, Mode::Gzip, Mode::Zstd] {
            let m = encode_message(mode, "bench.tag0", 50, 200, 0, Payload::Hex);
            let mut bytes = m.head.to_vec();
            bytes.extend_from_slice(&token(7, 1, 2));
            assert_eq!(entry::value_len(&bytes), Ok(bytes.len()), "{mode:?}");
            let Request::Events(msg) = frame::parse(Bytes::from(bytes)) else {
                panic!("{mode:?} is not a request")
            };
            assert_eq!(msg.options.chunk.as_deref(), Some(&token(7, 1, 2)[..]));
            assert_eq!(msg.options.size, Some(50));
            let per_event = m.raw_bytes as f64 / 50.0;
            assert!(
                (190.0..=210.0).contains(&per_event),
                "{mode:?}: {per_event} bytes per event"
            );
        }
    }
}
