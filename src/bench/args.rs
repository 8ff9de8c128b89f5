//! The command line of `claimcheck bench`.

use std::net::SocketAddr;
use std::time::Duration;

use super::messages::{Mode, Payload};
use crate::config::{parse_duration, parse_size};

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
