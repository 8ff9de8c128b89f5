//! Support for integration tests: a real S3 + Kinesis emulator (moto server), the sidecar as a
//! real process, and real forward client libraries (Node `@fluent-org/logger`, Python
//! `fluent-logger`). `scripts/test` installs all of them; a test that cannot find one fails
//! with a message saying so, it never skips.

#![allow(dead_code)]

pub mod in_process;
pub mod load;
pub mod proxy;
pub mod wire;

use std::collections::HashMap;
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use claimcheck_consumer::body::{Compression, Encoder, Format};
use claimcheck_consumer::pointer::Checksum;
use claimcheck_consumer::{
    Event, EventTime, Pointer, ResolvedChunk, Resolver, StartPosition, StreamReader,
};
use serde_json::{json, Value};

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until something accepts TCP connections on `port`.
pub fn wait_for_port(port: u16, what: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what} did not start listening on port {port} within {timeout:?}");
}

fn tool(env_var: &str, default: &Path, hint: &str) -> PathBuf {
    let path = std::env::var_os(env_var)
        .map(PathBuf::from)
        .unwrap_or_else(|| default.to_path_buf());
    assert!(
        path.exists(),
        "{} not found at {} ({hint}); run scripts/test, which installs it",
        env_var,
        path.display()
    );
    path
}

/// A moto server: S3 and Kinesis in one process, on 127.0.0.1.
pub struct Moto {
    pub port: u16,
    child: Child,
}

fn moto_server() -> Command {
    Command::new(tool(
        "CLAIMCHECK_MOTO_SERVER",
        &repo_root().join(".venv/bin/moto_server"),
        "moto[server]==5.2.5 in .venv",
    ))
}

impl Moto {
    /// A moto server on a port of its own choosing (port 0), read from the line it prints.
    pub fn start() -> Moto {
        use std::io::BufRead;
        let mut child = moto_server()
            .args(["-H", "127.0.0.1", "-p", "0"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start moto_server");
        let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
        let mut said = Vec::new();
        let port = loop {
            let Some(Ok(line)) = lines.next() else {
                panic!("moto_server exited without listening:\n{}", said.join("\n"));
            };
            // " * Running on http://127.0.0.1:PORT"
            if let Some(port) = line
                .split_once("Running on http://127.0.0.1:")
                .and_then(|(_, p)| p.trim().parse().ok())
            {
                break port;
            }
            said.push(line);
        };
        // It logs every request on stderr: keep reading so that it never blocks on the pipe.
        std::thread::spawn(move || lines.for_each(drop));
        Moto { port, child }
    }

    /// A moto server on `port`, for a test that points the sidecar at the port first.
    pub fn start_on(port: u16) -> Moto {
        let child = moto_server()
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot start moto_server");
        let moto = Moto { port, child };
        wait_for_port(port, "moto_server", Duration::from_secs(60));
        moto
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Environment that points the AWS SDK at an emulator on `port`.
pub fn aws_env(port: u16) -> Vec<(&'static str, String)> {
    vec![
        ("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{port}")),
        ("AWS_REGION", "us-east-1".into()),
        ("AWS_ACCESS_KEY_ID", "test".into()),
        ("AWS_SECRET_ACCESS_KEY", "test".into()),
        // No IMDS or profile look-ups in tests.
        ("AWS_EC2_METADATA_DISABLED", "true".into()),
        ("AWS_CONFIG_FILE", "/dev/null".into()),
        ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null".into()),
    ]
}

/// SDK clients for an emulator on `port`.
pub struct Aws {
    pub s3: aws_sdk_s3::Client,
    pub kinesis: aws_sdk_kinesis::Client,
}

impl Aws {
    pub fn new(port: u16) -> Aws {
        Aws::in_region(port, "us-east-1")
    }

    /// Clients of `region`.
    pub fn in_region(port: u16, region: &'static str) -> Aws {
        let creds = Credentials::new("test", "test", None, None, "tests");
        let endpoint = format!("http://127.0.0.1:{port}");
        let s3 = aws_sdk_s3::config::Builder::new()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(region))
            .credentials_provider(creds.clone())
            .endpoint_url(&endpoint)
            .force_path_style(true)
            .build();
        let kinesis = aws_sdk_kinesis::config::Builder::new()
            .behavior_version(BehaviorVersion::latest())
            .region(aws_sdk_kinesis::config::Region::new(region))
            .credentials_provider(creds)
            .endpoint_url(&endpoint)
            .build();
        Aws {
            s3: aws_sdk_s3::Client::from_conf(s3),
            kinesis: aws_sdk_kinesis::Client::from_conf(kinesis),
        }
    }

    /// A DynamoDB client for the same emulator.
    pub fn dynamodb(port: u16) -> aws_sdk_dynamodb::Client {
        let config = aws_sdk_dynamodb::config::Builder::new()
            .behavior_version(BehaviorVersion::latest())
            .region(aws_sdk_dynamodb::config::Region::new("us-east-1"))
            .credentials_provider(Credentials::new("test", "test", None, None, "tests"))
            .endpoint_url(format!("http://127.0.0.1:{port}"))
            .build();
        aws_sdk_dynamodb::Client::from_conf(config)
    }

    /// Creates a bucket and a one-shard stream and waits until the stream is active.
    pub async fn create(&self, bucket: &str, stream: &str) {
        self.s3
            .create_bucket()
            .bucket(bucket)
            .send()
            .await
            .expect("create bucket");
        self.create_stream(stream, 1).await;
    }

    /// Creates a stream of `shards` shards and waits until it is active.
    pub async fn create_stream(&self, stream: &str, shards: i32) {
        self.kinesis
            .create_stream()
            .stream_name(stream)
            .shard_count(shards)
            .send()
            .await
            .expect("create stream");
        for _ in 0..100 {
            let d = self
                .kinesis
                .describe_stream_summary()
                .stream_name(stream)
                .send()
                .await
                .expect("describe stream");
            if d.stream_description_summary
                .map(|s| s.stream_status.as_str() == "ACTIVE")
                .unwrap_or(false)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("stream {stream} never became active");
    }

    /// Reads the stream from its start until `expected` events arrived (or `timeout`),
    /// resolving every pointer through the consumer crate. A failed read of the stream is
    /// tried again, up to ten times in a row: after minutes of reading a long stream, the
    /// emulator answers GetRecords with a 500 now and then.
    pub async fn read_events(
        &self,
        stream: &str,
        expected: usize,
        timeout: Duration,
    ) -> Vec<ResolvedChunk> {
        let resolver = Resolver::new(self.s3.clone());
        let mut reader = StreamReader::open(
            self.kinesis.clone(),
            resolver,
            stream,
            StartPosition::TrimHorizon,
        )
        .await
        .expect("open stream reader");
        let deadline = Instant::now() + timeout;
        let mut chunks = Vec::new();
        let (mut count, mut failures) = (0, 0);
        while count < expected && Instant::now() < deadline {
            match reader.next().await {
                Ok(Some(mut delivery)) => {
                    let chunk = delivery.resolve().await.expect("every pointer resolves");
                    count += chunk.events.len();
                    chunks.push(chunk);
                    reader.commit(delivery.position());
                    failures = 0;
                }
                Ok(None) => tokio::time::sleep(Duration::from_millis(200)).await,
                Err(e) => {
                    failures += 1;
                    assert!(failures < 10, "reading the stream keeps failing: {e}");
                    eprintln!("reading the stream failed, trying again: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
        // Give stragglers (duplicates would show here) a moment.
        tokio::time::sleep(Duration::from_millis(500)).await;
        while let Some(mut delivery) = reader.next().await.expect("read stream") {
            chunks.push(delivery.resolve().await.expect("every pointer resolves"));
        }
        chunks
    }
}

/// Writes an open chunk with `frames` frames of `per_frame` events (ids from `first_id`).
pub fn open_chunk(
    dir: &std::path::Path,
    tag: &str,
    first_id: u64,
    frames: u64,
    per_frame: u64,
) -> (
    claimcheck::buffer::chunk::ChunkPaths,
    claimcheck::buffer::chunk::ChunkHeader,
    claimcheck::buffer::chunk::ChunkStats,
) {
    use claimcheck::buffer::chunk::{ChunkHeader, ChunkPaths, ChunkStats, ChunkWriter};
    use claimcheck_consumer::entry::{encode, EventTime};

    let id = uuid::Uuid::now_v7().simple().to_string();
    let secs = minute_of(now_secs()) - 600;
    let header = ChunkHeader {
        chunk_id: id.clone(),
        tag: tag.into(),
        timekey: secs,
        created_ms: 0,
        reused: false,
    };
    let paths = ChunkPaths::new(dir, &id);
    let mut w = ChunkWriter::create(&paths.data, &header).unwrap();
    let mut stats = ChunkStats::default();
    for f in 0..frames {
        let mut frame = Vec::new();
        for i in 0..per_frame {
            let t = EventTime::new(secs + 1, 0);
            frame.push(0x92);
            encode::event_time(&mut frame, t);
            rmpv::encode::write_value(&mut frame, &load::record_of(first_id + f * per_frame + i))
                .unwrap();
            stats.add(1, 0, t, t);
        }
        stats.body_bytes += frame.len() as u64;
        w.append(&[bytes::Bytes::from(frame)], &[]).unwrap();
    }
    w.sync().unwrap();
    stats.data_len = w.valid_len();
    (paths, header, stats)
}

/// Builds a chunk the way the sidecar stores it: `events` as a body in `format`, compressed,
/// and the pointer that describes it (unique chunk id, key under `tag/`).
pub fn make_chunk(
    bucket: &str,
    tag: &str,
    events: &[Event],
    format: Format,
    compression: Compression,
) -> (Pointer, Vec<u8>) {
    let mut body = Vec::new();
    for e in events {
        match format {
            Format::Msgpack => body.extend_from_slice(e.entry_msgpack()),
            Format::Json => {
                claimcheck_consumer::body::write_json_lines(tag, e.entry_msgpack(), &mut body)
                    .unwrap()
            }
        }
    }
    let mut encoder = Encoder::new(compression, None, Vec::new()).unwrap();
    std::io::Write::write_all(&mut encoder, &body).unwrap();
    let stored = encoder.finish().unwrap();
    let chunk_id = uuid::Uuid::new_v4().simple().to_string();
    let times = events.iter().map(Event::time);
    let pointer = Pointer {
        v: 1,
        key: format!(
            "{tag}/{chunk_id}.{}",
            claimcheck_consumer::body::file_extension(format, compression)
        ),
        chunk_id,
        bucket: bucket.into(),
        tag: tag.into(),
        timekey: 0,
        first_time: times.clone().min().unwrap_or_default(),
        last_time: times.max().unwrap_or_default(),
        records: events.len() as u64,
        bytes: body.len() as u64,
        stored_bytes: stored.len() as u64,
        format,
        compression,
        checksum: Checksum {
            crc32c: claimcheck_consumer::crc::crc32c(&stored),
        },
        producer: "tests".into(),
        created_at: "2026-11-21T16:01:02.345Z".into(),
        inline: None,
    };
    (pointer, stored)
}

/// `n` events of `tag`, records `{"tag": tag, "i": i, "chunk": label}`.
pub fn sample_events(tag: &str, label: &str, n: usize) -> Vec<Event> {
    (0..n)
        .map(|i| {
            let record = rmpv::Value::Map(vec![
                ("tag".into(), tag.into()),
                ("i".into(), (i as u64).into()),
                ("chunk".into(), label.into()),
            ]);
            Event::new(
                tag,
                EventTime::new(1_795_276_800 + i as i64, 7),
                &record,
                None,
            )
            .unwrap()
        })
        .collect()
}

impl Aws {
    /// Stores `stored` at the pointer's key.
    pub async fn put_object(&self, pointer: &Pointer, stored: Vec<u8>) {
        self.s3
            .put_object()
            .bucket(&pointer.bucket)
            .key(&pointer.key)
            .body(stored.into())
            .send()
            .await
            .expect("put object");
    }

    /// Puts one record on the stream, partitioned by the pointer's tag as the sidecar does.
    pub async fn put_pointer(&self, stream: &str, pointer: &Pointer) -> (String, String) {
        let out = self
            .kinesis
            .put_record()
            .stream_name(stream)
            .partition_key(&pointer.tag)
            .data(aws_sdk_kinesis::primitives::Blob::new(pointer.to_record()))
            .send()
            .await
            .expect("put record");
        (out.shard_id, out.sequence_number)
    }
}

impl Emulated {
    /// Stores a chunk of `events` and publishes its pointer, as the sidecar would.
    pub async fn publish(
        &self,
        tag: &str,
        events: &[Event],
        format: Format,
        compression: Compression,
    ) -> Pointer {
        let (pointer, stored) = make_chunk(&self.bucket, tag, events, format, compression);
        self.aws.put_object(&pointer, stored).await;
        self.aws.put_pointer(&self.stream, &pointer).await;
        pointer
    }
}

/// A test's own emulator, bucket, stream and temporary directory.
pub struct Emulated {
    pub moto: Moto,
    pub aws: Aws,
    pub bucket: String,
    pub stream: String,
    pub dir: tempfile::TempDir,
}

impl Emulated {
    pub async fn start(name: &str) -> Emulated {
        let moto = Moto::start();
        let aws = Aws::new(moto.port);
        let (bucket, stream) = (unique(name), unique(name));
        aws.create(&bucket, &stream).await;
        Emulated {
            moto,
            aws,
            bucket,
            stream,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn buffer_dir(&self) -> PathBuf {
        self.dir.path().join("buffer")
    }

    /// Starts a sidecar on this test's buffer directory, bucket and stream.
    pub fn sidecar(&self, args: &[&str]) -> Sidecar {
        Sidecar::start(
            &self.buffer_dir(),
            self.moto.port,
            &self.bucket,
            &self.stream,
            args,
        )
    }

    /// Starts a sidecar on `port`, reaching S3 and Kinesis through `endpoints` (for example
    /// fault proxies) when given.
    pub fn sidecar_at(&self, port: u16, endpoints: Option<(&str, &str)>, args: &[&str]) -> Sidecar {
        let mut extra = Vec::new();
        if let Some((s3, kinesis)) = endpoints {
            extra.push(("AWS_ENDPOINT_URL_S3", s3));
            extra.push(("AWS_ENDPOINT_URL_KINESIS", kinesis));
        }
        self.sidecar_env(port, &extra, args)
    }

    /// [`Emulated::sidecar_at`] (no proxies) with `extra` environment variables, such as
    /// `CLAIMCHECK_FAULT`.
    pub fn sidecar_env(&self, port: u16, extra: &[(&str, &str)], args: &[&str]) -> Sidecar {
        let mut env: Vec<(&str, String)> = aws_env(self.moto.port);
        env.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
        Sidecar::start_with(
            port,
            &self.buffer_dir(),
            &env,
            &self.bucket,
            &self.stream,
            args,
        )
    }

    /// Fault proxies in front of this emulator.
    pub async fn proxies(&self) -> proxy::Proxies {
        proxy::Proxies::start(self.moto.port).await
    }

    /// Starts a sidecar on a free port that reaches S3 and Kinesis through `proxies`.
    pub fn sidecar_behind(&self, proxies: &proxy::Proxies, args: &[&str]) -> Sidecar {
        let (s3, kinesis) = (proxies.s3.url(), proxies.kinesis.url());
        self.sidecar_at(0, Some((&s3, &kinesis)), args)
    }

    pub async fn read_events(&self, expected: usize) -> Vec<ResolvedChunk> {
        self.aws
            .read_events(&self.stream, expected, Duration::from_secs(90))
            .await
    }
}

/// The files in a buffer directory's `chunks/`, split: the chunks' data and state files, and
/// the spare files (`*.free`) kept from delivered chunks for new ones to overwrite.
fn chunks_dir_files(buffer_dir: &Path) -> (Vec<PathBuf>, Vec<PathBuf>) {
    std::fs::read_dir(buffer_dir.join("chunks"))
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.path())
                .partition(|p| p.extension().is_none_or(|x| x != "free"))
        })
        .unwrap_or_default()
}

/// The chunks' data and state files in a buffer directory: none once every chunk is delivered.
pub fn chunk_files(buffer_dir: &Path) -> Vec<PathBuf> {
    chunks_dir_files(buffer_dir).0
}

/// The spare files (`*.free`) in a buffer directory: delivered chunks' data files kept for new
/// chunks to overwrite.
pub fn spare_files(buffer_dir: &Path) -> Vec<PathBuf> {
    chunks_dir_files(buffer_dir).1
}

/// Names unique to one test: buckets and streams.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// The sidecar as a real process.
pub struct Sidecar {
    pub port: u16,
    /// The admin endpoint's port (`/metrics`, `/readyz`, `/api/v1/buffer`).
    pub admin: u16,
    pub buffer_dir: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
    /// The buffer's temporary directory, for sidecars that own theirs.
    own_dir: Option<tempfile::TempDir>,
}

impl Sidecar {
    /// Starts `claimcheck serve` on a free port (port 0: the sidecar picks it) with `args`
    /// added, and waits until it listens.
    pub fn start(
        buffer_dir: &Path,
        aws_port: u16,
        bucket: &str,
        stream: &str,
        args: &[&str],
    ) -> Sidecar {
        Sidecar::start_with(0, buffer_dir, &aws_env(aws_port), bucket, stream, args)
    }

    /// A sidecar with a buffer directory of its own and no AWS behind it: for what ends at the
    /// ack (handshakes, limits, hostile peers).
    pub fn standalone(args: &[&str]) -> Sidecar {
        let dir = tempfile::tempdir().unwrap();
        let mut sidecar = Sidecar::start(&dir.path().join("buffer"), free_port(), "b", "s", args);
        sidecar.own_dir = Some(dir);
        sidecar
    }

    /// Starts `claimcheck serve` on `port` (0: any free port) with `env` (AWS settings) and
    /// `args`.
    pub fn start_with(
        port: u16,
        buffer_dir: &Path,
        env: &[(&str, String)],
        bucket: &str,
        stream: &str,
        args: &[&str],
    ) -> Sidecar {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_claimcheck"));
        cmd.arg("serve");
        Sidecar::spawn(cmd, port, buffer_dir, env, bucket, stream, args)
    }

    /// Starts the sidecar through `cmd` (the binary itself, or a wrapper that execs it).
    pub fn spawn(
        mut cmd: Command,
        port: u16,
        buffer_dir: &Path,
        env: &[(&str, String)],
        bucket: &str,
        stream: &str,
        args: &[&str],
    ) -> Sidecar {
        let log =
            buffer_dir.with_extension(format!("{port}.{}.log", uuid::Uuid::new_v4().simple()));
        let log_file = std::fs::File::create(&log).unwrap();
        // Port 0: the sidecar takes a free port and says which in its address file, so that no
        // other process can take the port between a test's choice and the sidecar's bind.
        let address_file = log.with_extension("addr");
        if !args.contains(&"--metrics-listen") {
            cmd.args(["--metrics-listen", "127.0.0.1:0"]);
        }
        cmd.args(["--listen", &format!("127.0.0.1:{port}")])
            .arg("--address-file")
            .arg(&address_file)
            .arg("--buffer-dir")
            .arg(buffer_dir)
            .args(["--s3-bucket", bucket, "--kinesis-stream", stream])
            .args(args)
            .env("RUST_LOG", "info,claimcheck=debug")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(Stdio::null())
            .stderr(log_file);
        let child = cmd.spawn().expect("cannot start claimcheck");
        let mut sidecar = Sidecar {
            port,
            admin: 0,
            buffer_dir: buffer_dir.to_path_buf(),
            log,
            child: Some(child),
            own_dir: None,
        };
        (sidecar.port, sidecar.admin) =
            sidecar.wait_for_address(&address_file, Duration::from_secs(30));
        assert!(port == 0 || sidecar.port == port);
        sidecar
    }

    /// Waits until the sidecar wrote its address file (it is listening then); its forward and
    /// admin ports.
    fn wait_for_address(&mut self, path: &Path, timeout: Duration) -> (u16, u16) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(text) = std::fs::read_to_string(path) {
                let addresses: Value = serde_json::from_str(&text).expect("address file is JSON");
                let port = |name: &str| {
                    addresses[name]
                        .as_str()
                        .and_then(|a| a.parse::<SocketAddr>().ok())
                        .map(|a| a.port())
                };
                return (
                    port("forward").expect("the forward address"),
                    port("metrics").unwrap_or(0),
                );
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                panic!(
                    "claimcheck exited ({status}) before listening:\n{}",
                    self.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "claimcheck did not listen within {timeout:?}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Waits (up to `timeout`) until the log contains `text`: a line about a connection may
    /// be written just after the peer saw it close, a retry some time after a fault.
    pub fn wait_for_log(&self, text: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while !self.log_text().contains(text) {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        true
    }

    /// [`Sidecar::wait_for_log`] for an async test (multi-threaded runtime) that cannot go on
    /// without the line: up to a minute, then the test fails with the log.
    pub async fn expect_log(&self, text: &str) {
        let said = tokio::task::block_in_place(|| self.wait_for_log(text, Duration::from_secs(60)));
        assert!(said, "the log never said {text:?}:\n{}", self.log_text());
    }

    /// Every sample of a scrape of `/metrics`: `name{labels}` -> value.
    pub async fn metrics(&self) -> HashMap<String, f64> {
        samples(&scrape(self.admin, "/metrics").await.1)
    }

    /// Sum of the samples of `metric`: a name (all its label sets) or one series.
    pub async fn metric(&self, metric: &str) -> f64 {
        metric_sum(&self.metrics().await, metric)
    }

    /// Waits up to a minute until `check` holds for the sidecar's metrics; fails the test
    /// with `what` and the log otherwise.
    pub async fn await_metrics(&self, what: &str, check: impl Fn(&HashMap<String, f64>) -> bool) {
        await_metrics_at(self.admin, what, check, || self.log_text()).await
    }

    /// Waits until write rounds ran on the thread a load from `connections` connections is
    /// meant to use: with one, the connection's own (its requests written in place); with
    /// more, the buffer's writer thread.
    pub async fn await_rounds_for(&self, connections: usize) {
        let on = if connections == 1 {
            "connection"
        } else {
            "writer"
        };
        let rounds = format!("claimcheck_buffer_write_rounds_total{{on=\"{on}\"}}");
        self.await_metrics(&format!("write rounds on the {on} thread"), |m| {
            metric_sum(m, &rounds) >= 10.0
        })
        .await;
    }

    /// [`Sidecar::await_metrics`] for a test without a runtime of its own.
    pub fn await_metrics_blocking(
        &self,
        what: &str,
        check: impl Fn(&HashMap<String, f64>) -> bool,
    ) {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(self.await_metrics(what, check));
    }

    /// True while the process runs.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the sidecar runs").id()
    }

    /// A line of /proc/<pid>/status in KiB: `VmRSS` (resident now), `VmHWM` (peak).
    pub fn memory_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
            .unwrap_or_else(|| panic!("no {field} in /proc status"))
    }

    /// Waits (up to `timeout`) for the process to exit by itself; its status, or `None` if it
    /// still runs (it is then left running).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let child = self.child.as_mut()?;
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// SIGKILL: no chance to seal, flush or say goodbye.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// SIGTERM, then waits for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("sidecar is running");
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "sidecar did not exit within {timeout:?} of SIGTERM; log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- sidecar log ({}) ---\n{}",
                self.log.display(),
                self.log_text()
            );
        }
    }
}

/// GET `path` of the admin endpoint on `port`: status and body.
pub async fn scrape(port: u16, path: &str) -> (u16, String) {
    let (status, body) = claimcheck::admin::get(&format!("http://127.0.0.1:{port}{path}"))
        .await
        .expect("the admin endpoint answers");
    (status.as_u16(), body)
}

/// Samples of a scrape: `name{labels}` -> value.
pub fn samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// Waits up to a minute until `check` holds for the metrics of the admin endpoint on `port`;
/// fails the test with `what` and `context()` otherwise.
pub async fn await_metrics_at(
    port: u16,
    what: &str,
    check: impl Fn(&HashMap<String, f64>) -> bool,
    context: impl Fn() -> String,
) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !check(&samples(&scrape(port, "/metrics").await.1)) {
        assert!(
            Instant::now() < deadline,
            "timed out waiting until {what}\n{}",
            context()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sum of the samples of `metric` (a name, for all its label sets, or one series).
pub fn metric_sum(samples: &HashMap<String, f64>, metric: &str) -> f64 {
    samples
        .iter()
        .filter(|(series, _)| {
            series
                .strip_prefix(metric)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('{'))
        })
        .map(|(_, v)| v)
        .sum()
}

/// One event to send: tag, time (seconds, and nanoseconds or `None` for an integer time),
/// and the record.
#[derive(Debug, Clone)]
pub struct TestEvent {
    pub tag: String,
    pub secs: i64,
    pub nanos: Option<u32>,
    pub record: Value,
}

impl TestEvent {
    fn to_json(&self) -> Value {
        json!({"tag": self.tag, "secs": self.secs, "nanos": self.nanos, "record": self.record})
    }

    /// The key events are compared by: tag, time, record as JSON text.
    pub fn key(&self) -> (String, i64, u32, String) {
        (
            self.tag.clone(),
            self.secs,
            self.nanos.unwrap_or(0),
            self.record.to_string(),
        )
    }
}

/// The comparison key of a resolved event (see [`TestEvent::key`]).
pub fn event_key(e: &Event) -> (String, i64, u32, String) {
    (
        e.tag().to_string(),
        e.time().secs,
        e.time().nanos,
        e.record_json().to_string(),
    )
}

fn run_client(mut cmd: Command, spec: Value, what: &str) -> Value {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(spec.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{what} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// Runs `claimcheck <args>` against the emulator on `aws_port`, feeding `stdin`; checks that it
/// succeeded and returns its stdout and stderr.
pub fn run_claimcheck(aws_port: u16, args: &[&str], stdin: Option<&[u8]>) -> (Vec<u8>, String) {
    let out = claimcheck_output(aws_port, args, stdin);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "claimcheck {args:?} failed: {stderr}");
    (out.stdout, stderr)
}

/// Runs `claimcheck <args>` against the emulator on `aws_port`, feeding `stdin`, whatever its
/// exit status.
pub fn claimcheck_output(
    aws_port: u16,
    args: &[&str],
    stdin: Option<&[u8]>,
) -> std::process::Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_claimcheck"))
        .args(args)
        .envs(aws_env(aws_port))
        .env("RUST_LOG", "info")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(bytes) = stdin {
        input.write_all(bytes).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

/// Stdout of `claimcheck tail` or `resolve` in the JSON format, one value per line.
pub fn json_lines(stdout: &[u8]) -> Vec<Value> {
    std::str::from_utf8(stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

/// Sends with Node `@fluent-org/logger` in `mode` (Message, Forward, PackedForward,
/// CompressedPackedForward), requesting acks. Returns the indexes of acknowledged events.
pub fn node_send(port: u16, mode: &str, events: &[TestEvent]) -> Vec<usize> {
    node_send_with(port, mode, events, json!({}))
}

/// [`node_send`] with more of send.js's options (`security`, `tlsCaFile`, ...) in `extra`.
pub fn node_send_with(port: u16, mode: &str, events: &[TestEvent], extra: Value) -> Vec<usize> {
    let dir = repo_root().join("tests/clients");
    tool(
        "CLAIMCHECK_NODE_MODULES",
        &dir.join("node_modules/@fluent-org/logger"),
        "npm ci in tests/clients",
    );
    let mut spec = json!({"host": "127.0.0.1", "port": port, "mode": mode, "ack": true, "ackTimeoutMs": 60000,
                      "events": events.iter().map(TestEvent::to_json).collect::<Vec<_>>()});
    for (k, v) in extra.as_object().expect("extra options are an object") {
        spec[k] = v.clone();
    }
    let mut cmd = Command::new("node");
    cmd.arg(dir.join("send.js"));
    let result = run_client(cmd, spec, "node client");
    let failed = result["failed"].as_array().cloned().unwrap_or_default();
    if !failed.is_empty() {
        eprintln!(
            "node client: {} events not acknowledged, first: {}",
            failed.len(),
            failed[0]
        );
    }
    result["acked"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect()
}

/// Sends with Python `fluent-logger` (Message mode; the library cannot request acks).
pub fn python_send(port: u16, events: &[TestEvent]) {
    let python = tool(
        "CLAIMCHECK_PYTHON",
        &repo_root().join(".venv/bin/python"),
        "fluent-logger in .venv",
    );
    let spec = json!({"host": "127.0.0.1", "port": port, "events": events.iter().map(TestEvent::to_json).collect::<Vec<_>>()});
    let mut cmd = Command::new(python);
    cmd.arg(repo_root().join("tests/clients/send.py"));
    let result = run_client(cmd, spec, "python client");
    assert_eq!(result["sent"].as_u64(), Some(events.len() as u64));
}

/// Start of the timekey window (60 s) holding `secs`.
pub fn minute_of(secs: i64) -> i64 {
    secs - secs.rem_euclid(60)
}

/// Now, in Unix seconds.
pub fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Checks that `chunks` hold exactly `expected` (as a multiset), each event once, and that
/// every object key contains its chunk id (inline chunks have none). Returns the number of chunks.
pub fn assert_exactly_once(chunks: &[ResolvedChunk], expected: &[TestEvent]) -> usize {
    let mut want: HashMap<(String, i64, u32, String), usize> = HashMap::new();
    for e in expected {
        *want.entry(e.key()).or_default() += 1;
    }
    let mut got: HashMap<(String, i64, u32, String), usize> = HashMap::new();
    let mut ids = std::collections::HashSet::new();
    for chunk in chunks {
        let p = &chunk.pointer;
        assert!(
            ids.insert(p.chunk_id.clone()),
            "chunk {} yielded twice",
            p.chunk_id
        );
        assert!(
            p.key.contains(&p.chunk_id) || (p.is_inline() && p.key.is_empty()),
            "key {} does not contain chunk id {}",
            p.key,
            p.chunk_id
        );
        assert_eq!(p.records as usize, chunk.events.len());
        for e in &chunk.events {
            assert_eq!(e.tag(), p.tag);
            *got.entry(event_key(e)).or_default() += 1;
        }
    }
    let missing: Vec<_> = want
        .iter()
        .filter(|(k, n)| got.get(*k) != Some(n))
        .take(5)
        .collect();
    let extra: Vec<_> = got
        .iter()
        .filter(|(k, n)| want.get(*k) != Some(n))
        .take(5)
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "events differ: missing or miscounted {missing:?}; unexpected {extra:?}"
    );
    chunks.len()
}
