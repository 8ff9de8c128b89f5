//! Settings of `claimcheck serve`. Every setting is a flag, a `CLAIMCHECK_*` environment
//! variable and a key of the TOML configuration file, all of the same name (`--buffer-dir`,
//! `CLAIMCHECK_BUFFER_DIR`, `buffer_dir`); names follow Fluentd's where a Fluentd user would
//! look for them. Durations take `500ms`, `60s`, `1m`, `1h` or plain seconds; sizes take `8m`,
//! `8MiB`, `256k`, `1g` (powers of 1024 whatever the case, as in Fluentd) or plain bytes.
//!
//! Precedence: flag, then environment, then file, then default. The file is applied by
//! [`with_config_file`] before the command line is parsed: each of its settings is checked with
//! the flag's own parser (an error names the file, the key and the value) and becomes a flag
//! only where neither a flag nor an environment variable already set it.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use claimcheck_consumer::body::{Compression, Format};

use crate::aws::settings::{pairs, AccessArgs, AwsSettings, ObjectArgs};
use crate::buffer::{BufferConfig, OverflowAction, SyncPolicy};
use crate::dedup::Dedup;
use crate::forward::connection::SignalAction;
use crate::forward::security::{ClientRule, Secret, Security, User};
use crate::forward::tls::{TlsSettings, TlsVersion};
use crate::forward::ConnectionConfig;
use crate::key_template::KeyTemplate;
use crate::publisher::PublisherConfig;
use crate::retry::{Backoff, RetryPolicy};
use crate::server::ListenerConfig;
use crate::uploader::UploaderConfig;

/// Largest `inline_max_bytes`: a Kinesis record is at most 1 MiB, partition key (up to 256
/// characters) included.
pub const MAX_INLINE_BYTES: u64 = 1000 * 1024;

/// Parses a duration such as `500ms`, `60s`, `1m`, `1h30m`, or a bare number of seconds
/// (`3600`, `0.5`), as Fluentd's `timekey 3600` and `flush_interval 60` are written.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return t
            .parse::<f64>()
            .ok()
            .and_then(|secs| Duration::try_from_secs_f64(secs).ok())
            .ok_or_else(|| format!("invalid duration {s:?} (examples: 500ms, 60s, 1m, 3600)"));
    }
    humantime::parse_duration(t).map_err(|e| format!("{e} (examples: 500ms, 60s, 1m, 3600)"))
}

/// Parses a size as Fluentd does: a number of bytes, or one with a unit `k`, `m`, `g` or `t`,
/// powers of 1024, in any case and with or without `b` or `ib` (`8m`, `8MB` and `8MiB` are all
/// 8,388,608 bytes; Fluentd's `chunk_limit_size 8m` is that size too). A fraction is taken
/// (`1.5g`) and rounded down to a byte.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let invalid = || {
        format!(
            "invalid size {s:?} (examples: 8m, 8MiB, 256k, 1g, 1048576; \
             k, m, g and t are powers of 1024, as in Fluentd)"
        )
    };
    let t = s.trim();
    let digits = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(digits);
    let shift = match unit.trim_start().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(invalid()),
    };
    if let Ok(whole) = number.parse::<u64>() {
        return whole.checked_mul(1 << shift).ok_or_else(invalid);
    }
    let fraction: f64 = number.parse().map_err(|_| invalid())?;
    let bytes = (fraction * (1u64 << shift) as f64).floor();
    // Within u64 (the largest f64 below 2^64 is exact).
    if bytes.is_finite() && bytes < u64::MAX as f64 {
        Ok(bytes as u64)
    } else {
        Err(invalid())
    }
}

/// `overflow_action` under Fluentd's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OverflowActionArg {
    Block,
    #[value(name = "drop_oldest_chunk", alias = "drop-oldest-chunk")]
    DropOldestChunk,
}

/// The forward listener's transport, as Fluentd's `<transport>` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    Tcp,
    Tls,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

/// `claimcheck serve`: the sidecar.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// TOML file of settings, under the flags' names with underscores (`buffer_dir = "..."`).
    /// Flags and environment variables override it.
    #[arg(long, env = "CLAIMCHECK_CONFIG")]
    pub config: Option<PathBuf>,

    /// Print the effective settings as a configuration file and exit.
    #[arg(long)]
    pub print_config: bool,

    /// Address of the forward listener (TCP, and UDP on the same port for heartbeats). The
    /// Docker image uses 0.0.0.0:24224.
    #[arg(long, env = "CLAIMCHECK_LISTEN", default_value = "127.0.0.1:24224")]
    pub listen: SocketAddr,

    /// Address of the metrics and health endpoint (`/metrics`, `/healthz`, `/readyz`,
    /// `/api/v1/buffer`); off when unset. The Docker image uses 0.0.0.0:24231.
    #[arg(long, env = "CLAIMCHECK_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// Once listening, write the addresses bound to this file, as JSON (`{"forward":
    /// "127.0.0.1:24224", "metrics": …}`): with port 0 in `--listen` or `--metrics-listen` the
    /// system picks a free port, and this says which.
    #[arg(long, env = "CLAIMCHECK_ADDRESS_FILE")]
    pub address_file: Option<PathBuf>,

    /// Directory of the durable buffer. One sidecar per directory (it is locked).
    #[arg(
        long,
        env = "CLAIMCHECK_BUFFER_DIR",
        default_value = "./claimcheck-buffer"
    )]
    pub buffer_dir: PathBuf,

    /// Length of a chunk's time window, by event time (Fluentd's `timekey`).
    #[arg(long, env = "CLAIMCHECK_TIMEKEY", default_value = "60s", value_parser = parse_duration)]
    pub timekey: Duration,

    /// The zone timekey windows start in and object keys' times are written in (Fluentd's
    /// `timekey_zone`): `UTC`, an offset such as `+09:00`, or an IANA name such as
    /// `Europe/Berlin`. Fluentd's default is the host's offset at its start; set this to match.
    #[arg(long, env = "CLAIMCHECK_TIMEKEY_ZONE", default_value = "UTC")]
    pub timekey_zone: crate::timekey::Zone,

    /// How long after its window ends a chunk waits for late events (Fluentd's `timekey_wait`).
    #[arg(long, env = "CLAIMCHECK_TIMEKEY_WAIT", default_value = "10s", value_parser = parse_duration)]
    pub timekey_wait: Duration,

    /// A chunk is sealed when its body reaches this size (Fluentd's `chunk_limit_size`).
    #[arg(long, env = "CLAIMCHECK_CHUNK_LIMIT_SIZE", default_value = "8MiB", value_parser = parse_size)]
    pub chunk_limit_size: u64,

    /// A chunk is sealed when it holds this many events (Fluentd's `chunk_limit_records`).
    #[arg(long, env = "CLAIMCHECK_CHUNK_LIMIT_RECORDS")]
    pub chunk_limit_records: Option<u64>,

    /// A chunk is sealed this long after it was created, even with no new events
    /// (Fluentd's `flush_interval`).
    #[arg(long, env = "CLAIMCHECK_FLUSH_INTERVAL", default_value = "60s", value_parser = parse_duration)]
    pub flush_interval: Duration,

    /// When the buffer's chunks reach this size, it takes no more requests (or drops chunks,
    /// with `overflow_action drop_oldest_chunk`) until delivery frees space (Fluentd's
    /// `total_limit_size`). The disk filling up has the same effect. Up to 4 delivered chunks'
    /// data files kept for new chunks to overwrite (`chunks/*.free`) count toward it, and are
    /// deleted before anything has to wait for room.
    #[arg(long, env = "CLAIMCHECK_TOTAL_LIMIT_SIZE", default_value = "64GiB", value_parser = parse_size)]
    pub total_limit_size: u64,

    /// At `total_limit_size`: `block` (senders wait; nothing is lost) or `drop_oldest_chunk`
    /// (the oldest chunk waiting for delivery is deleted, logged at ERROR).
    #[arg(
        long,
        env = "CLAIMCHECK_OVERFLOW_ACTION",
        value_enum,
        default_value = "block"
    )]
    pub overflow_action: OverflowActionArg,

    /// When appends are fsynced: `always` (before each ack, shared by concurrent requests),
    /// `interval` (every `sync_interval`; acks after the write) or `none` (only when a chunk is
    /// sealed; the kernel is asked to write each chunk back as it fills, so that the seal
    /// finds little left to write). All three survive a crash of the process; only `always`
    /// survives power loss for everything acknowledged.
    #[arg(long, env = "CLAIMCHECK_SYNC", value_enum, default_value = "always")]
    pub sync: SyncPolicy,

    /// Fsync period under `sync interval`.
    #[arg(long, env = "CLAIMCHECK_SYNC_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub sync_interval: Duration,

    /// Most data files of open chunks held open at once. Each tag (and timekey) being written
    /// has an open chunk; beyond this many, the file of the least recently written one is
    /// closed (fsynced first if it holds writes not yet synced) and reopened on its next
    /// write, so that many tags cost a few system calls rather than requests refused for lack
    /// of file descriptors. Default: half the open files soft limit (`ulimit -n`, as raised at
    /// start to fit `max_connections` and these files), which leaves the other half to forward
    /// connections, chunks read for upload, connections to S3 and Kinesis, the metrics
    /// listener and seals.
    #[arg(long, env = "CLAIMCHECK_MAX_OPEN_CHUNK_FILES")]
    pub max_open_chunk_files: Option<usize>,

    /// Largest forward request accepted, as received; a larger one closes the connection
    /// without an ack, as soon as its headers show it is larger (Fluentd's `chunk_size_limit`),
    /// and its sender resends it until this is raised: keep it above the senders'
    /// `chunk_limit_size`. The default holds a full 256 MiB chunk (Fluentd's file buffer) with
    /// its request's framing.
    #[arg(long, env = "CLAIMCHECK_CHUNK_SIZE_LIMIT", default_value = "257MiB", value_parser = parse_size)]
    pub chunk_size_limit: u64,

    /// Forward requests larger than this are logged (Fluentd's `chunk_size_warn_limit`).
    #[arg(long, env = "CLAIMCHECK_CHUNK_SIZE_WARN_LIMIT", value_parser = parse_size)]
    pub chunk_size_warn_limit: Option<u64>,

    /// Most decompressed bytes of one gzip or zstd request held at once (Fluentd's
    /// `decompression_size_limit`). A request that expands beyond it is expanded once to check
    /// it, then stored a piece at a time, each cut between events, and acked. One that would
    /// fail part way (an event larger than this, a corrupt stream, pieces mostly not valid
    /// events: a compression bomb) closes the connection without an ack, nothing of it stored.
    #[arg(long, env = "CLAIMCHECK_DECOMPRESSION_SIZE_LIMIT", default_value = "256MiB", value_parser = parse_size)]
    pub decompression_size_limit: u64,

    /// Forward transport: tcp, or tls on the same port (Fluentd's `<transport tls>`).
    #[arg(long, env = "CLAIMCHECK_TRANSPORT", default_value = "tcp")]
    pub transport: Transport,

    /// PEM certificate chain of the TLS listener (Fluentd's `cert_path`).
    #[arg(long, env = "CLAIMCHECK_TLS_CERT_PATH")]
    pub tls_cert_path: Option<PathBuf>,

    /// PEM private key of the TLS listener, unencrypted (Fluentd's `private_key_path`).
    #[arg(long, env = "CLAIMCHECK_TLS_PRIVATE_KEY_PATH")]
    pub tls_private_key_path: Option<PathBuf>,

    /// PEM CA certificates that client certificates must chain to (Fluentd's `ca_path`).
    #[arg(long, env = "CLAIMCHECK_TLS_CA_PATH")]
    pub tls_ca_path: Option<PathBuf>,

    /// Require and verify client certificates (Fluentd's `client_cert_auth`).
    #[arg(long, env = "CLAIMCHECK_TLS_CLIENT_CERT_AUTH", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub tls_client_cert_auth: bool,

    /// Oldest TLS version accepted (Fluentd's `min_version`). `TLSv1_3` refuses senders on
    /// Fluentd's default `tls_version TLSv1_2`.
    #[arg(long, env = "CLAIMCHECK_TLS_MIN_VERSION", default_value = "TLSv1_2")]
    pub tls_min_version: TlsVersion,

    /// Shared key of the forward handshake: when set, every connection starts with HELO and
    /// clients must prove they know the key (Fluentd's `<security> shared_key`).
    #[arg(long, env = "CLAIMCHECK_SHARED_KEY", hide_env_values = true)]
    pub shared_key: Option<String>,

    /// Name given in the handshake's PONG (Fluentd's `self_hostname`). Fluentd refuses a
    /// PONG that carries its own `self_hostname`; default: the host name + `-claimcheck`.
    #[arg(long, env = "CLAIMCHECK_SELF_HOSTNAME")]
    pub self_hostname: Option<String>,

    /// Require a username and password in the handshake, checked against `user` (Fluentd's
    /// `user_auth`).
    #[arg(long, env = "CLAIMCHECK_USER_AUTH", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub user_auth: bool,

    /// A user for `user_auth`, `NAME:PASSWORD` (Fluentd's `<user>`); repeat the flag or list
    /// them in the file (the environment variable holds one).
    #[arg(long, env = "CLAIMCHECK_USER", hide_env_values = true)]
    pub user: Vec<User>,

    /// Whether senders that match no `client` rule may connect (Fluentd's
    /// `allow_anonymous_source`).
    #[arg(long, env = "CLAIMCHECK_ALLOW_ANONYMOUS_SOURCE", default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub allow_anonymous_source: bool,

    /// A client rule (Fluentd's `<client>`): `ADDRESS[,shared_key=KEY][,users=NAME:NAME]`,
    /// ADDRESS being an IP address, a network (`10.0.0.0/8`) or a host name resolved at start.
    /// A matching sender uses the rule's key and only its users. Repeat as for `user`.
    #[arg(long, env = "CLAIMCHECK_CLIENT", hide_env_values = true)]
    pub client: Vec<ClientRule>,

    /// Close each connection after its first request and ack (Fluentd's `deny_keepalive`).
    /// Not for Fluent Bit with a dynamic `Tag` (its Message mode): it sends a chunk's records
    /// as one request each on one connection and retries the whole chunk when that fails, so
    /// the first record is stored again on every try and the others never arrive.
    #[arg(long, env = "CLAIMCHECK_DENY_KEEPALIVE", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub deny_keepalive: bool,

    /// Close a connection that sent nothing for this long while no ack was due; `0s`: never.
    #[arg(long, env = "CLAIMCHECK_IDLE_TIMEOUT", default_value = "10m", value_parser = parse_duration)]
    pub idle_timeout: Duration,

    /// Forward connections served at once; more are closed at once, counted and logged.
    #[arg(long, env = "CLAIMCHECK_MAX_CONNECTIONS", default_value_t = 4096)]
    pub max_connections: usize,

    /// How long a request's `chunk` token is remembered per sender, from when it is stored and
    /// again from when its chunk is delivered: a request resent with it (after a lost ack) is
    /// acked again without storing its events twice, across restarts too (tokens are kept
    /// on disk with the events); `0s`: off.
    #[arg(long, env = "CLAIMCHECK_DEDUP_WINDOW", default_value = "10m", value_parser = parse_duration)]
    pub dedup_window: Duration,

    /// Most tokens remembered for `dedup_window`; the oldest are forgotten first. Each takes
    /// up to about 350 bytes of memory with delivery running (the default's 100,000 up to
    /// 35 MB, reached at 170 requests a second for the 10 minutes).
    #[arg(long, env = "CLAIMCHECK_DEDUP_MAX_TOKENS", default_value_t = 100_000)]
    pub dedup_max_tokens: usize,

    /// Requests whose `fluent_signal` is not logs (Fluent Bit's metrics, traces): `skip` acks
    /// and counts them, `reject` closes the connection without an ack.
    #[arg(long, env = "CLAIMCHECK_FLUENT_SIGNAL_ACTION", default_value = "skip")]
    pub fluent_signal_action: SignalAction,

    /// Record key set to the sender's IP address (Fluentd's `source_address_key`). Makes
    /// ingest rewrite every record's map header.
    #[arg(long, env = "CLAIMCHECK_SOURCE_ADDRESS_KEY")]
    pub source_address_key: Option<String>,

    /// Record key set to the sender's host name by reverse DNS, or its address when it has
    /// none (Fluentd's `source_hostname_key`).
    #[arg(long, env = "CLAIMCHECK_SOURCE_HOSTNAME_KEY")]
    pub source_hostname_key: Option<String>,

    /// S3 bucket for chunk bodies.
    #[arg(long, env = "CLAIMCHECK_S3_BUCKET")]
    pub s3_bucket: String,

    /// Prefix of every object key (a `/` is added if missing).
    #[arg(long, env = "CLAIMCHECK_S3_PREFIX", default_value = "")]
    pub s3_prefix: String,

    /// Object key template (fluent-plugin-s3's `s3_object_key_format`); must contain
    /// `${chunk_id}` so that retries overwrite the same object and hosts never collide.
    #[arg(
        long,
        env = "CLAIMCHECK_S3_OBJECT_KEY_FORMAT",
        default_value = "${tag}/%Y/%m/%d/%H/${chunk_id}.%{file_extension}"
    )]
    pub s3_object_key_format: String,

    /// Objects larger than this are sent by multipart upload, part by part while they are
    /// compressed; smaller ones by one PutObject from memory.
    #[arg(long, env = "CLAIMCHECK_S3_MULTIPART_THRESHOLD", default_value = "16MiB", value_parser = parse_size)]
    pub s3_multipart_threshold: u64,

    /// Part size of multipart uploads (S3's minimum is 5 MiB).
    #[arg(long, env = "CLAIMCHECK_S3_PART_SIZE", default_value = "8MiB", value_parser = parse_size)]
    pub s3_part_size: u64,

    /// A chunk whose Kinesis record, with the stored (compressed) body inside, is at most this
    /// long goes inline: the body rides in the record and no S3 object is written. The
    /// default, 24 KiB, keeps such a record plus a partition key of up to 424 bytes within one
    /// 25 KB PUT payload unit of a provisioned stream; on-demand streams bill each record by
    /// the KiB, so a small body costs little more than its pointer would. 0 sends every body
    /// to S3. At most 1000 KiB (a Kinesis record, partition key included, is at most 1 MiB).
    #[arg(long, env = "CLAIMCHECK_INLINE_MAX_BYTES", default_value = "24KiB", value_parser = parse_size)]
    pub inline_max_bytes: u64,

    /// Body format: msgpack (Fluentd's buffer format, bytes as received) or json (lines).
    #[arg(long, env = "CLAIMCHECK_FORMAT", default_value = "msgpack")]
    pub format: Format,

    /// Body compression: zstd, gzip or none.
    #[arg(long, env = "CLAIMCHECK_COMPRESSION", default_value = "zstd")]
    pub compression: Compression,

    /// Compression level (zstd 1-22, default 3; gzip 0-9, default 6).
    #[arg(long, env = "CLAIMCHECK_COMPRESSION_LEVEL")]
    pub compression_level: Option<i32>,

    /// Kinesis stream for pointer records (a name or an ARN).
    #[arg(long, env = "CLAIMCHECK_KINESIS_STREAM")]
    pub kinesis_stream: String,

    /// Partition key template of pointer records; `${tag}` keeps each tag's pointers in order
    /// within a shard.
    #[arg(
        long,
        env = "CLAIMCHECK_KINESIS_PARTITION_KEY",
        default_value = "${tag}"
    )]
    pub kinesis_partition_key: String,

    #[command(flatten)]
    pub access: AccessArgs,

    #[command(flatten)]
    pub objects: ObjectArgs,

    /// Chunks uploaded at once (Fluentd's `flush_thread_count`).
    #[arg(long, env = "CLAIMCHECK_FLUSH_THREAD_COUNT", default_value_t = 2)]
    pub flush_thread_count: usize,

    /// First wait before retrying a failed upload or publish (Fluentd's `retry_wait`).
    #[arg(long, env = "CLAIMCHECK_RETRY_WAIT", default_value = "1s", value_parser = parse_duration)]
    pub retry_wait: Duration,

    /// Longest wait between retries (Fluentd's `retry_max_interval`).
    #[arg(long, env = "CLAIMCHECK_RETRY_MAX_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub retry_max_interval: Duration,

    /// A chunk that still fails this long after its first failure moves to the dead-letter
    /// folder (Fluentd's `retry_timeout`).
    #[arg(long, env = "CLAIMCHECK_RETRY_TIMEOUT", default_value = "72h", value_parser = parse_duration)]
    pub retry_timeout: Duration,

    /// A chunk that failed this many retries moves to the dead-letter folder (Fluentd's
    /// `retry_max_times`; default: no limit but `retry_timeout`).
    #[arg(long, env = "CLAIMCHECK_RETRY_MAX_TIMES")]
    pub retry_max_times: Option<u32>,

    /// Move each retry's wait by a random ±12.5 %, so that chunks that failed together do not
    /// retry together (Fluentd's `retry_randomize`).
    #[arg(long, env = "CLAIMCHECK_RETRY_RANDOMIZE", default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub retry_randomize: bool,

    /// Retry forever; never dead-letter (Fluentd's `retry_forever`).
    #[arg(long, env = "CLAIMCHECK_RETRY_FOREVER", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub retry_forever: bool,

    /// On SIGTERM or SIGINT, how long to keep delivering sealed chunks before exiting; what is
    /// left stays in the buffer for the next start.
    #[arg(long, env = "CLAIMCHECK_SHUTDOWN_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,

    /// Threads that serve forward connections and drive delivery (the async runtime's
    /// workers). Default: one per CPU the process may use, less one, and at least one: the
    /// buffer's writer thread, which writes and fsyncs every request, keeps a core of its own
    /// (on 2 CPUs, one worker ingested more events per second than two, for less CPU per
    /// event; docs/performance-history.md). Compression runs beside them
    /// (`flush_thread_count`).
    #[arg(long, env = "CLAIMCHECK_WORKER_THREADS", value_parser = clap::value_parser!(u16).range(1..))]
    pub worker_threads: Option<u16>,

    /// Host name used in pointers (`producer`) and in `%{hostname}`; defaults to the system's.
    #[arg(long, env = "CLAIMCHECK_HOSTNAME")]
    pub hostname: Option<String>,

    /// Log format: human or json. The level comes from RUST_LOG (default info).
    #[arg(long, env = "CLAIMCHECK_LOG_FORMAT", default_value = "human")]
    pub log_format: LogFormat,
}

/// The validated settings of every component.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub listener: ListenerConfig,
    pub metrics_listen: Option<SocketAddr>,
    pub address_file: Option<PathBuf>,
    pub buffer: BufferConfig,
    pub connection: Arc<ConnectionConfig>,
    pub uploader: Arc<UploaderConfig>,
    pub publisher: Arc<PublisherConfig>,
    pub s3_bucket: String,
    pub kinesis_stream: String,
    pub aws: AwsSettings,
    pub shutdown_timeout: Duration,
}

impl ServeArgs {
    /// The async runtime's worker threads: `worker_threads`, or one per CPU the process may
    /// use (its CPU quota included) less one, and at least one.
    pub fn runtime_workers(&self) -> usize {
        self.worker_threads.map_or_else(
            || {
                std::thread::available_parallelism()
                    .map_or(1, |n| n.get())
                    .saturating_sub(1)
                    .max(1)
            },
            usize::from,
        )
    }

    /// Checks the settings and builds each component's configuration.
    pub fn into_config(self) -> Result<Config, String> {
        if self.timekey.as_secs() == 0 {
            return Err("--timekey must be at least 1s".into());
        }
        if self.s3_bucket.is_empty() {
            return Err("--s3-bucket is required".into());
        }
        if self.max_open_chunk_files == Some(0) {
            return Err("--max-open-chunk-files must be at least 1".into());
        }
        if self.total_limit_size == 0 {
            return Err("--total-limit-size 0 would take no request".into());
        }
        if self.kinesis_stream.is_empty() {
            return Err("--kinesis-stream is required".into());
        }
        if self.max_connections == 0 {
            return Err("--max-connections 0 would serve no sender".into());
        }
        if self.flush_thread_count == 0 {
            return Err("--flush-thread-count must be at least 1 (as Fluentd's)".into());
        }
        if self.retry_wait > self.retry_max_interval {
            tracing::warn!(retry_wait = ?self.retry_wait, retry_max_interval = ?self.retry_max_interval,
                           "--retry-wait is above --retry-max-interval: every retry waits --retry-wait");
        }
        let hostname = match self.hostname {
            // Empty, it would make `%{hostname}/…` keys start with a `/`, and `producer` say
            // nothing.
            Some(h) if h.trim().is_empty() => {
                return Err("--hostname must not be empty (unset it for the system's)".into())
            }
            Some(h) => h,
            None => hostname::get()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_else(|_| "unknown".into()),
        };
        // Every template writes the host name and its times in the timekey's zone.
        let template = |what: &str, text: &str| {
            KeyTemplate::parse(text, &hostname)
                .map(|t| t.in_zone(self.timekey_zone))
                .map_err(|e| format!("{what}: {e}"))
        };
        let key_template = template("--s3-object-key-format", &self.s3_object_key_format)?;
        if !key_template.has_chunk_id() {
            return Err("--s3-object-key-format must contain ${chunk_id}, so that retries rewrite the same object and hosts never collide".into());
        }
        let partition_key = template("--kinesis-partition-key", &self.kinesis_partition_key)?;
        let (s3_access, kinesis_access) = self.access.destinations()?;
        let kinesis_access = kinesis_access.for_stream(&self.kinesis_stream)?;
        let objects = self.objects.objects()?;
        let templates =
            |flag: &str, items: &[String]| -> Result<Vec<(String, KeyTemplate)>, String> {
                pairs(flag, items)?
                    .into_iter()
                    .map(|(k, v)| {
                        let t = template(&format!("{flag} {k}"), &v)?;
                        Ok((k, t))
                    })
                    .collect()
            };
        let object_tags = templates("--s3-object-tags", &self.objects.s3_object_tags)?;
        if object_tags.len() > 10 {
            return Err("--s3-object-tags: S3 takes at most 10 tags per object".into());
        }
        // What the operator wrote must be what S3 takes; what a chunk's tag brings in is made
        // so when rendered.
        for (k, t) in &object_tags {
            if !crate::uploader::config::is_tag_text(k, 128)
                || !crate::uploader::config::is_tag_text(&t.literal_text(), 256)
            {
                return Err(format!("--s3-object-tags {k}: S3 takes keys of up to 128 and values of up to 256 letters, digits, spaces and + - = . _ : / @"));
            }
        }
        let object_metadata = templates("--s3-metadata", &self.objects.s3_metadata)?;
        if let Some((k, _)) = object_metadata.iter().find(|(k, _)| {
            !k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        }) {
            return Err(format!("--s3-metadata: the key {k:?} must be letters, digits, '-', '_' or '.' (it becomes the header x-amz-meta-{k})"));
        }
        let backoff = Backoff {
            wait: self.retry_wait,
            max_interval: self.retry_max_interval.max(self.retry_wait),
            randomize: self.retry_randomize,
        };
        let retry = RetryPolicy {
            backoff,
            timeout: self.retry_timeout,
            max_times: self.retry_max_times,
            forever: self.retry_forever,
        };
        if self.s3_part_size < crate::backends::MIN_PART_SIZE {
            return Err("--s3-part-size must be at least 5MiB (S3's minimum part size)".into());
        }
        // S3's limits: a part, and a PutObject, of at most 5 GiB; at most 10,000 parts.
        const MAX_PUT: u64 = 5 << 30;
        const MAX_PARTS: u64 = 10_000;
        if self.s3_part_size > MAX_PUT {
            return Err("--s3-part-size must be at most 5GiB (S3's largest part)".into());
        }
        if self.s3_multipart_threshold > MAX_PUT {
            return Err(
                "--s3-multipart-threshold must be at most 5GiB (S3's largest PutObject)".into(),
            );
        }
        if self.chunk_limit_size.div_ceil(self.s3_part_size) > MAX_PARTS {
            return Err(format!(
                "--s3-part-size must be at least {} bytes with --chunk-limit-size {}: S3 takes at most 10,000 parts",
                self.chunk_limit_size.div_ceil(MAX_PARTS),
                self.chunk_limit_size
            ));
        }
        if self.inline_max_bytes > MAX_INLINE_BYTES {
            return Err(format!(
                "--inline-max-bytes must be at most {MAX_INLINE_BYTES} (1000KiB: a Kinesis record, partition key included, is at most 1 MiB)"
            ));
        }
        let security = match self.shared_key {
            None if self.user_auth || !self.user.is_empty() || !self.client.is_empty() => {
                return Err("--user-auth, --user and --client need --shared-key (the handshake carries them)".into())
            }
            None => None,
            Some(key) => {
                if self.user_auth && self.user.is_empty() {
                    return Err("--user-auth needs at least one --user NAME:PASSWORD".into());
                }
                if !self.allow_anonymous_source && self.client.is_empty() {
                    return Err("--allow-anonymous-source false needs at least one --client rule".into());
                }
                let mut clients = self.client;
                for rule in &mut clients {
                    if let Err(e) = rule.resolve() {
                        tracing::warn!(cause = %e, "a client rule's host name does not resolve; it matches no sender");
                    }
                }
                Some(Arc::new(Security {
                    self_hostname: self
                        .self_hostname
                        .unwrap_or_else(|| format!("{hostname}-claimcheck")),
                    shared_key: Secret(key),
                    user_auth: self.user_auth,
                    users: self.user,
                    allow_anonymous_source: self.allow_anonymous_source,
                    clients,
                }))
            }
        };
        let tls = match self.transport {
            Transport::Tcp => {
                if self.tls_cert_path.is_some()
                    || self.tls_private_key_path.is_some()
                    || self.tls_ca_path.is_some()
                    || self.tls_client_cert_auth
                {
                    tracing::warn!("--tls-* settings are ignored: --transport is tcp (add --transport tls to serve TLS)");
                }
                None
            }
            Transport::Tls => {
                let (Some(cert_path), Some(private_key_path)) =
                    (self.tls_cert_path, self.tls_private_key_path)
                else {
                    return Err(
                        "--transport tls needs --tls-cert-path and --tls-private-key-path".into(),
                    );
                };
                let settings = TlsSettings {
                    cert_path,
                    private_key_path,
                    ca_path: self.tls_ca_path,
                    client_cert_auth: self.tls_client_cert_auth,
                    min_version: self.tls_min_version,
                };
                Some(settings.acceptor()?)
            }
        };
        Ok(Config {
            listen: self.listen,
            listener: ListenerConfig {
                tls,
                max_connections: self.max_connections,
                udp_heartbeat: true,
            },
            metrics_listen: self.metrics_listen,
            address_file: self.address_file.clone(),
            buffer: BufferConfig {
                dir: self.buffer_dir.clone(),
                timekey: self.timekey,
                timekey_wait: self.timekey_wait,
                chunk_limit_size: self.chunk_limit_size.max(1),
                chunk_limit_records: self.chunk_limit_records,
                flush_interval: self.flush_interval,
                total_limit_size: Some(self.total_limit_size),
                overflow_action: match self.overflow_action {
                    OverflowActionArg::Block => OverflowAction::Block,
                    OverflowActionArg::DropOldestChunk => OverflowAction::DropOldestChunk,
                },
                sync: self.sync,
                sync_interval: self.sync_interval,
                max_open_files: self.max_open_chunk_files,
            },
            connection: Arc::new(ConnectionConfig {
                chunk_size_limit: self.chunk_size_limit,
                chunk_size_warn_limit: self.chunk_size_warn_limit,
                decompression_size_limit: self.decompression_size_limit,
                timekey: crate::timekey::Timekey {
                    secs: self.timekey.as_secs() as i64,
                    zone: self.timekey_zone,
                },
                security,
                deny_keepalive: self.deny_keepalive,
                idle_timeout: self.idle_timeout,
                signal_action: self.fluent_signal_action,
                source_address_key: self.source_address_key.filter(|k| !k.is_empty()),
                source_hostname_key: self.source_hostname_key.filter(|k| !k.is_empty()),
                dedup: Dedup::new(self.dedup_window, self.dedup_max_tokens),
            }),
            uploader: Arc::new(UploaderConfig {
                format: self.format,
                compression: self.compression,
                compression_level: self.compression_level,
                key_template,
                prefix: self.s3_prefix,
                producer: hostname,
                workers: self.flush_thread_count,
                retry,
                multipart_threshold: self.s3_multipart_threshold,
                part_size: self.s3_part_size,
                inline_max_bytes: self.inline_max_bytes,
                buffer_dir: self.buffer_dir.clone(),
                object_tags,
                object_metadata,
            }),
            publisher: Arc::new(PublisherConfig {
                partition_key,
                retry,
                buffer_dir: self.buffer_dir,
            }),
            s3_bucket: self.s3_bucket,
            kinesis_stream: self.kinesis_stream,
            aws: AwsSettings {
                s3: s3_access,
                kinesis: kinesis_access,
                objects,
                check_on_start: self.objects.check_on_start,
            },
            shutdown_timeout: self.shutdown_timeout,
        })
    }
}

/// Settings of `KEY=VALUE` items, a table in the file.
const KEY_VALUE_SETTINGS: [&str; 2] = ["s3_object_tags", "s3_metadata"];

/// Arguments of `serve` that are not settings.
const NOT_SETTINGS: [&str; 3] = ["config", "print_config", "help"];

/// Whether a setting takes several values (repeated flags, a list in the file).
fn is_list(arg: &clap::Arg) -> bool {
    matches!(arg.get_action(), clap::ArgAction::Append)
}

/// The `serve` command, for checking and printing settings.
fn serve_command() -> clap::Command {
    <ServeArgs as clap::Args>::augment_args(clap::Command::new("serve").no_binary_name(true))
}

/// The first line of a clap error, without its "error: " prefix.
fn clap_message(e: &clap::Error) -> String {
    let text = e.to_string();
    let first = text.lines().next().unwrap_or_default();
    first.strip_prefix("error: ").unwrap_or(first).to_string()
}

/// A setting of the configuration file that a flag or an environment variable overrides with
/// another value (for the log: the Docker image sets `CLAIMCHECK_BUFFER_DIR` and three
/// others, which a file's `buffer_dir` does not change).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overridden {
    /// The file's key.
    pub key: String,
    pub in_file: String,
    /// `--flag` or `CLAIMCHECK_*`.
    pub by: String,
    pub value: String,
}

/// The command line with the configuration file's settings added as flags (see the module
/// documentation), and the file's settings overridden with other values. `argv` is the whole
/// command line; only `serve` uses a file.
pub fn with_config_file(argv: Vec<OsString>) -> Result<(Vec<OsString>, Vec<Overridden>), String> {
    let mut overridden = Vec::new();
    let Some(at) = argv.iter().position(|a| a == "serve") else {
        return Ok((argv, overridden));
    };
    let cmd = serve_command();
    // A lenient first look: settings that only the file provides may be "missing" now.
    let matches = cmd
        .clone()
        .ignore_errors(true)
        .get_matches_from(argv[at + 1..].iter().cloned());
    let Some(path) = matches.get_one::<PathBuf>("config").cloned() else {
        return Ok((argv, overridden));
    };
    let name = path.display();
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("cannot read the configuration file {name}: {e}"))?;
    let table: toml::Table = text.parse().map_err(|e| format!("{name}: {e}"))?;
    let mut extra: Vec<OsString> = Vec::new();
    for (key, value) in table {
        let arg = cmd
            .get_arguments()
            .find(|a| a.get_id() == key.as_str() && !NOT_SETTINGS.contains(&key.as_str()))
            .ok_or_else(|| format!("{name}: unknown setting `{key}` (settings are `claimcheck serve --help`'s flags, with underscores)"))?;
        let list = is_list(arg);
        let values = match value {
            toml::Value::Array(items) if list => items,
            // `s3_object_tags = { team = "sre" }`: a table of KEY=VALUE settings.
            toml::Value::Table(pairs) if list && KEY_VALUE_SETTINGS.contains(&key.as_str()) => {
                pairs
                    .into_iter()
                    .map(|(k, v)| match v {
                        toml::Value::String(v) => Ok(toml::Value::String(format!("{k}={v}"))),
                        other => Err(format!(
                            "{name}: `{key}.{k}` must be a string, not {}",
                            other.type_str()
                        )),
                    })
                    .collect::<Result<_, _>>()?
            }
            toml::Value::Array(_) => {
                return Err(format!("{name}: `{key}` takes one value, not a list"));
            }
            one => vec![one],
        };
        let long = arg.get_long().expect("settings are long flags");
        let set_by = match matches.value_source(key.as_str()) {
            Some(clap::parser::ValueSource::CommandLine) => Some(format!("--{long}")),
            Some(clap::parser::ValueSource::EnvVariable) => {
                arg.get_env().map(|e| e.to_string_lossy().into_owned())
            }
            _ => None,
        };
        let set_elsewhere = set_by.is_some();
        let mut in_file = Vec::new();
        for value in values {
            let value = match value {
                toml::Value::String(s) => s,
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                other => {
                    return Err(format!(
                        "{name}: `{key}` must be a string, a number or a boolean{}, not {}",
                        if list { " (or a list of them)" } else { "" },
                        other.type_str()
                    ))
                }
            };
            // The flag's own parser, on this value alone (no environment, nothing required).
            let alone = arg
                .clone()
                .required(false)
                .env(clap::builder::Resettable::Reset);
            clap::Command::new("check")
                .no_binary_name(true)
                .arg(alone)
                .try_get_matches_from([OsString::from(format!("--{long}")), OsString::from(&value)])
                .map_err(|e| {
                    format!(
                        "{name}: `{key}` = {value:?} is invalid: {}",
                        clap_message(&e)
                    )
                })?;
            if !set_elsewhere {
                extra.push(format!("--{long}").into());
                extra.push(value.clone().into());
            }
            in_file.push(value);
        }
        if let Some(by) = set_by {
            let set: Vec<String> = matches
                .get_raw(key.as_str())
                .into_iter()
                .flatten()
                .map(|v| v.to_string_lossy().into_owned())
                .collect();
            if set != in_file {
                // Keys and passwords are not for the log.
                let shown = |values: Vec<String>| match arg.is_hide_env_values_set() {
                    true => "(hidden)".to_string(),
                    false => values.join(", "),
                };
                overridden.push(Overridden {
                    key: key.clone(),
                    in_file: shown(in_file),
                    by,
                    value: shown(set),
                });
            }
        }
    }
    let mut out = argv;
    out.splice(at + 1..at + 1, extra);
    Ok((out, overridden))
}

/// The effective settings of `serve_argv` (the arguments after `serve`) as a TOML file that
/// gives the same settings when read back with `--config`.
pub fn effective_toml(serve_argv: &[OsString]) -> Result<String, String> {
    let matches = serve_command()
        .try_get_matches_from(serve_argv)
        .map_err(|e| clap_message(&e))?;
    let mut table = toml::Table::new();
    for arg in serve_command().get_arguments() {
        let id = arg.get_id().as_str();
        if NOT_SETTINGS.contains(&id) {
            continue;
        }
        if let Some(raw) = matches.get_raw(id) {
            let mut values: Vec<toml::Value> = raw
                .map(|v| toml::Value::String(v.to_string_lossy().into_owned()))
                .collect();
            if KEY_VALUE_SETTINGS.contains(&id) {
                let pairs = values
                    .into_iter()
                    .filter_map(|v| {
                        let (k, v) = v.as_str()?.split_once('=')?;
                        Some((k.to_string(), toml::Value::String(v.to_string())))
                    })
                    .collect();
                table.insert(id.to_string(), toml::Value::Table(pairs));
            } else if is_list(arg) {
                table.insert(id.to_string(), toml::Value::Array(values));
            } else if let Some(value) = values.pop() {
                table.insert(id.to_string(), value);
            }
        }
    }
    toml::to_string(&table).map_err(|e| e.to_string())
}

/// `CLAIMCHECK_*` variables that no flag declares: the fault hook the binary reads, and the
/// variables this project's scripts and tests set for themselves (a sidecar they start
/// inherits them), which the binary ignores.
const OTHER_ENV: &[&str] = &[
    "CLAIMCHECK_FAULT",
    "CLAIMCHECK_BIN",
    "CLAIMCHECK_CRASH_CYCLES",
    "CLAIMCHECK_MANY_TAGS",
    "CLAIMCHECK_MANY_TAGS_NOFILE",
    "CLAIMCHECK_MANY_TAGS_WINDOW",
    "CLAIMCHECK_MOTO_SERVER",
    "CLAIMCHECK_NODE_MODULES",
    "CLAIMCHECK_PYTHON",
    "CLAIMCHECK_WRITE_VECTORS",
];

/// The `CLAIMCHECK_*` variables of `vars` that neither a flag of `command` (or of its
/// subcommands) nor anything else reads, each with the known name nearest to it when one is
/// close: a typo in a deployment (`CLAIMCHECK_S3_BUCKT`) would otherwise leave a setting at
/// its default without a word.
pub fn unknown_env(
    command: &clap::Command,
    vars: impl IntoIterator<Item = OsString>,
) -> Vec<(String, Option<String>)> {
    fn known(command: &clap::Command, into: &mut Vec<String>) {
        for arg in command.get_arguments() {
            if let Some(name) = arg.get_env().and_then(|e| e.to_str()) {
                into.push(name.to_owned());
            }
        }
        for sub in command.get_subcommands() {
            known(sub, into);
        }
    }
    let mut names: Vec<String> = OTHER_ENV.iter().map(|s| s.to_string()).collect();
    known(command, &mut names);
    let mut unknown: Vec<(String, Option<String>)> = vars
        .into_iter()
        .filter_map(|v| v.into_string().ok())
        .filter(|v| v.starts_with("CLAIMCHECK_") && !names.contains(v))
        .map(|v| {
            // Compared without the prefix every name shares.
            let typed = &v["CLAIMCHECK_".len()..];
            let nearest = names
                .iter()
                .filter_map(|n| Some((strsim::jaro(n.strip_prefix("CLAIMCHECK_")?, typed), n)))
                .max_by(|a, b| a.0.total_cmp(&b.0))
                .filter(|(score, _)| *score > 0.8)
                .map(|(_, n)| n.clone());
            (v, nearest)
        })
        .collect();
    unknown.sort();
    unknown.dedup();
    unknown
}

/// The configuration reference (docs/configuration.md): every `serve` setting with its flag,
/// environment variable, file key, default and description, from the definitions above.
pub fn reference_markdown() -> String {
    let mut out = String::from(
        "# Configuration reference\n\n\
         Generated from the code by `claimcheck config-reference`; a test keeps it in step.\n\n\
         Every setting of `claimcheck serve` is a flag, an environment variable and a key of the\n\
         TOML file given with `--config` (or `CLAIMCHECK_CONFIG`). Precedence: flag, environment,\n\
         file, default; a file's setting that a flag or a variable overrides with another value\n\
         is logged as a warning at start. Durations take `500ms`, `60s`, `1m`, `72h` or plain\n\
         seconds (`3600`); sizes take `8m`, `8MiB`, `256k`, `1g` (powers of 1024 whatever the\n\
         case, as in Fluentd) or bytes. `claimcheck serve --print-config` prints the effective\n\
         settings as a file. A `CLAIMCHECK_*` variable that no setting reads (a typo) is logged\n\
         as a warning at start, with the name it most resembles.\n\n\
         | file key | flag | environment | default | meaning |\n\
         |---|---|---|---|---|\n",
    );
    for arg in serve_command().get_arguments() {
        let id = arg.get_id().as_str();
        if NOT_SETTINGS.contains(&id) {
            continue;
        }
        let flag = format!("`--{}`", arg.get_long().expect("settings are long flags"));
        let env = arg
            .get_env()
            .map_or(String::new(), |e| format!("`{}`", e.to_string_lossy()));
        let default: Vec<String> = arg
            .get_default_values()
            .iter()
            .map(|v| v.to_string_lossy().into_owned())
            .collect();
        let default = if default.is_empty() {
            "(none)".to_string()
        } else {
            format!("`{}`", default.join(" "))
        };
        let mut help = arg
            .get_long_help()
            .or(arg.get_help())
            .map(|h| h.to_string())
            .unwrap_or_default();
        let values: Vec<String> = arg
            .get_possible_values()
            .iter()
            .map(|v| format!("`{}`", v.get_name()))
            .collect();
        if !values.is_empty() && !help.contains(&values[0]) {
            help.push_str(&format!(" One of {}.", values.join(", ")));
        }
        let help = help
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .replace('|', "\\|");
        out.push_str(&format!(
            "| `{id}` | {flag} | {env} | {default} | {help} |\n"
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    #[test]
    fn unknown_claimcheck_variables_are_named_with_the_nearest_known_one() {
        let command = <Cli as clap::CommandFactory>::command();
        let vars = [
            "CLAIMCHECK_S3_BUCKT",
            "CLAIMCHECK_S3_BUCKET",
            "CLAIMCHECK_FAULT",
            "CLAIMCHECK_ZZZ",
            "CLAIMCHECK_KINESIS_STREM",
            "PATH",
            "AWS_REGION",
        ]
        .map(OsString::from);
        assert_eq!(
            unknown_env(&command, vars),
            vec![
                (
                    "CLAIMCHECK_KINESIS_STREM".to_owned(),
                    Some("CLAIMCHECK_KINESIS_STREAM".to_owned())
                ),
                (
                    "CLAIMCHECK_S3_BUCKT".to_owned(),
                    Some("CLAIMCHECK_S3_BUCKET".to_owned())
                ),
                ("CLAIMCHECK_ZZZ".to_owned(), None),
            ]
        );
    }

    #[test]
    fn the_variables_of_the_scripts_and_tests_are_not_reported() {
        // Every CLAIMCHECK_* name in the scripts and tests is a flag's or in OTHER_ENV, so
        // that a sidecar they start does not warn about them.
        let command = <Cli as clap::CommandFactory>::command();
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut files = Vec::new();
        let mut dirs = vec![root.join("scripts"), root.join("tests")];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    dirs.push(path);
                } else {
                    files.push(path);
                }
            }
        }
        let mut names = std::collections::BTreeSet::new();
        for file in &files {
            let Ok(text) = std::fs::read_to_string(file) else {
                continue;
            };
            for (at, _) in text.match_indices("CLAIMCHECK_") {
                let name: String = text[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                    .collect();
                // Names built at run time (`CLAIMCHECK_S3_...` from a prefix) end in `_`.
                if !name.ends_with('_') {
                    names.insert(OsString::from(name));
                }
            }
        }
        assert!(
            names.contains(&OsString::from("CLAIMCHECK_BIN")),
            "{names:?}"
        );
        // The test's Cli has serve's flags only; the other subcommands' come from the binary.
        let others = ["CLAIMCHECK_BENCH_SHARED_KEY", "CLAIMCHECK_BENCH_USER"];
        let unknown: Vec<_> = unknown_env(&command, names)
            .into_iter()
            .filter(|(name, _)| !others.contains(&name.as_str()))
            .collect();
        assert_eq!(unknown, vec![]);
    }

    fn parse(args: &[&str]) -> Result<Config, String> {
        let mut all = vec!["claimcheck", "--s3-bucket", "b", "--kinesis-stream", "s"];
        all.extend_from_slice(args);
        Cli::try_parse_from(all)
            .map_err(|e| e.to_string())?
            .serve
            .into_config()
    }

    #[test]
    fn the_configuration_reference_is_in_step_with_the_code() {
        let doc = include_str!("../docs/configuration.md");
        assert!(
            doc == reference_markdown(),
            "docs/configuration.md is out of date: run `cargo run -- config-reference > docs/configuration.md`"
        );
    }

    #[test]
    fn settings_that_would_do_nothing_or_fail_every_upload_are_refused() {
        let config = |flag: &str, value: &str| {
            Cli::try_parse_from([
                "claimcheck",
                "--s3-bucket",
                "b",
                "--kinesis-stream",
                "s",
                flag,
                value,
            ])
            .unwrap()
            .serve
            .into_config()
        };
        for (flag, bad, good) in [
            ("--total-limit-size", "0", "1KiB"),
            ("--max-connections", "0", "1"),
            ("--flush-thread-count", "0", "1"),
            // Beyond S3's limits.
            ("--s3-part-size", "6GiB", "5GiB"),
            ("--s3-multipart-threshold", "6GiB", "5GiB"),
            ("--chunk-limit-size", "100GiB", "50GiB"),
        ] {
            let refused = config(flag, bad).expect_err(flag);
            assert!(refused.contains(flag), "{refused}");
            assert!(config(flag, good).is_ok(), "{flag} {good}");
        }
    }

    #[test]
    fn worker_threads_leave_the_writer_a_core_unless_set() {
        let args = |extra: &[&str]| {
            let mut all = vec!["claimcheck", "--s3-bucket", "b", "--kinesis-stream", "s"];
            all.extend_from_slice(extra);
            Cli::try_parse_from(all).map(|cli| cli.serve.runtime_workers())
        };
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(args(&[]).unwrap(), (cpus - 1).max(1));
        assert_eq!(args(&["--worker-threads", "3"]).unwrap(), 3);
        assert!(
            args(&["--worker-threads", "0"]).is_err(),
            "a runtime needs a worker"
        );
    }

    #[test]
    fn durations_and_sizes_take_human_units() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("60s"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_size("8MiB"), Ok(8 << 20));
        assert_eq!(parse_size("256KiB"), Ok(256 << 10));
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert!(parse_duration("soon").is_err());
        assert!(parse_size("big").is_err());
    }

    /// What a Fluentd configuration says means the same here: its sizes are powers of 1024
    /// (`chunk_limit_size 8m` is 8,388,608 bytes) and a bare duration is seconds.
    #[test]
    fn fluentds_notations_mean_what_they_mean_to_fluentd() {
        for (text, bytes) in [
            ("8m", 8 << 20),
            ("8M", 8 << 20),
            ("8MB", 8 << 20),
            ("8 mb", 8 << 20),
            ("256k", 256 << 10),
            ("256KB", 256 << 10),
            ("1g", 1 << 30),
            ("64GiB", 64 << 30),
            ("2t", 2 << 40),
            ("1.5k", 1536),
            ("0", 0),
            ("512b", 512),
        ] {
            assert_eq!(parse_size(text), Ok(bytes), "{text}");
        }
        for bad in [
            "",
            "m",
            "8x",
            "8 mbs",
            "-1",
            "1.2.3k",
            "99999999999t",
            "1e9",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
        assert_eq!(parse_duration("3600"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1d"), Ok(Duration::from_secs(86400)));
        assert!(parse_duration(".").is_err());
        // A TOML integer reaches the parser as its digits.
        let c = parse(&["--timekey", "3600", "--chunk-limit-size", "8m"]).unwrap();
        assert_eq!(
            (c.buffer.timekey, c.buffer.chunk_limit_size),
            (Duration::from_secs(3600), 8 << 20)
        );
    }

    #[test]
    fn a_file_setting_overridden_with_another_value_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("claimcheck.toml");
        std::fs::write(&file, "buffer_dir = \"/from/file\"\ntimekey = \"60s\"\n").unwrap();
        let argv = |extra: &[&str]| -> Vec<OsString> {
            ["claimcheck", "serve", "--config", file.to_str().unwrap()]
                .iter()
                .chain(extra)
                .map(OsString::from)
                .collect()
        };
        let (_, overridden) =
            with_config_file(argv(&["--buffer-dir", "/from/flag", "--timekey", "60s"])).unwrap();
        assert_eq!(
            overridden,
            [Overridden {
                key: "buffer_dir".into(),
                in_file: "/from/file".into(),
                by: "--buffer-dir".into(),
                value: "/from/flag".into(),
            }],
            "the same value set twice is not reported"
        );
        let (with_file, overridden) = with_config_file(argv(&[])).unwrap();
        assert!(overridden.is_empty());
        assert!(with_file.iter().any(|a| a == "/from/file"));
        // A secret's values are not repeated.
        std::fs::write(&file, "shared_key = \"in-the-file\"\n").unwrap();
        let (_, overridden) = with_config_file(argv(&["--shared-key", "on-the-line"])).unwrap();
        assert_eq!(
            (overridden[0].in_file.as_str(), overridden[0].value.as_str()),
            ("(hidden)", "(hidden)")
        );
    }

    #[test]
    fn defaults_match_the_documentation() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:24224");
        assert_eq!(c.buffer.dir, PathBuf::from("./claimcheck-buffer"));
        assert_eq!(
            (c.buffer.timekey, c.buffer.timekey_wait),
            (Duration::from_secs(60), Duration::from_secs(10))
        );
        assert_eq!(
            (c.buffer.chunk_limit_size, c.buffer.flush_interval),
            (8 << 20, Duration::from_secs(60))
        );
        assert_eq!(
            (c.uploader.format, c.uploader.compression),
            (Format::Msgpack, Compression::Zstd)
        );
        assert_eq!(
            c.buffer.max_open_files, None,
            "derived from the open files limit when the buffer opens"
        );
        // A full chunk of Fluentd's file buffer (256 MiB) in a request with the longest tag
        // accepted and its options.
        let framing = 1 + 5 + crate::forward::connection::MAX_TAG_BYTES as u64 + 5 + 4096;
        assert!(c.connection.chunk_size_limit >= (256 << 20) + framing);
        assert_eq!(
            c.connection.chunk_size_limit,
            ConnectionConfig::default().chunk_size_limit
        );
        let c = parse(&["--max-open-chunk-files", "64"]).unwrap();
        assert_eq!(c.buffer.max_open_files, Some(64));
        let err = parse(&["--max-open-chunk-files", "0"]).unwrap_err();
        assert!(err.contains("at least 1"), "{err}");
    }

    /// Requests go to the client's region: a stream's ARN sets it, and a region that
    /// disagrees with the ARN is refused rather than sending every PutRecords astray.
    #[test]
    fn a_stream_arn_gives_the_kinesis_region() {
        let arn = "arn:aws:kinesis:eu-central-1:444455556666:stream/pointers";
        let with = |stream: &str, args: &[&str]| {
            let mut all = vec!["claimcheck", "--s3-bucket", "b", "--kinesis-stream", stream];
            all.extend_from_slice(args);
            Cli::try_parse_from(all).unwrap().serve.into_config()
        };
        let region = |c: Config| c.aws.kinesis.region;
        assert_eq!(with(arn, &[]).map(region), Ok(Some("eu-central-1".into())));
        assert_eq!(
            with(arn, &["--kinesis-region", "eu-central-1"]).map(region),
            Ok(Some("eu-central-1".into()))
        );
        let err = with(arn, &["--kinesis-region", "us-east-1"]).unwrap_err();
        assert!(err.contains("--kinesis-region"), "{err}");
        assert_eq!(
            with("pointers", &[]).map(region),
            Ok(None),
            "the standard chain's"
        );
    }

    #[test]
    fn object_tags_are_what_s3_takes() {
        assert!(parse(&[
            "--s3-object-tags",
            "team=sre + ops",
            "--s3-object-tags",
            "source=${tag}",
            "--s3-object-tags",
            "app=${tag[1]}/%Y",
        ])
        .is_ok());
        for bad in ["team=sre & ops", "t#am=sre", "team=${tag}*"] {
            let err = parse(&["--s3-object-tags", bad]).unwrap_err();
            assert!(err.contains("--s3-object-tags"), "{bad}: {err}");
        }
    }

    #[test]
    fn an_empty_hostname_is_refused() {
        let err = parse(&["--hostname", ""]).unwrap_err();
        assert!(err.contains("--hostname"), "{err}");
        assert!(parse(&["--hostname", "web-1"]).is_ok());
    }

    #[test]
    fn key_format_must_name_the_chunk_id() {
        let err = parse(&["--s3-object-key-format", "${tag}/%Y/x.log"]).unwrap_err();
        assert!(err.contains("${chunk_id}"), "{err}");
        let err = parse(&["--s3-object-key-format", "${nope}/${chunk_id}"]).unwrap_err();
        assert!(err.contains("unknown placeholder"), "{err}");
        assert!(parse(&["--compression", "lz4"]).is_err());
    }
}
