//! Prometheus metrics, all named `claimcheck_*` with their unit in the name.
//!
//! Counters and histograms live in one process-wide [`Metrics`] that the stages record into.
//! What describes the buffer (bytes, chunks by phase, the age of the oldest chunk not yet
//! published, drops and dead letters) is read from the buffer's registry at each scrape
//! ([`crate::buffer::gauges`]), so it cannot drift from the buffer itself. Label values come from small fixed sets (reasons,
//! phases, operations, AWS error codes): tags are never labels.

use std::sync::atomic::AtomicU64;
use std::sync::LazyLock;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Unit;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Operation {
    pub operation: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationCode {
    pub operation: String,
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Code {
    pub code: String,
}

/// How a chunk's body reached the consumer: `inline` in its Kinesis record, or `s3`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Via {
    pub via: &'static str,
}

/// What a buffer fsync was for: a `round` of appends before their acks (`sync always`), the
/// periodic sync of open chunks (`interval`), or a chunk's `seal`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Kind {
    pub kind: &'static str,
}

/// Which thread ran a buffer write round: the `connection` that read its one request, or the
/// `writer` thread, for every request that waited for it.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct On {
    pub on: &'static str,
}

/// A body's compression: `zstd` or `gzip`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Codec {
    pub compression: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Stage {
    pub stage: String,
}

fn reason(r: &str) -> Reason {
    Reason {
        reason: r.to_string(),
    }
}

fn duration_histogram() -> Histogram {
    // 1 ms to about 65 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

/// The process-wide counters and histograms.
#[derive(Debug)]
pub struct Metrics {
    pub connections_accepted: Counter,
    pub connections_open: Gauge,
    pub connections_refused: Counter,
    pub handshake_failures: Family<Reason, Counter>,
    pub udp_heartbeats: Counter,
    pub duplicate_requests: Counter,
    pub requests_in_pieces: Counter,
    pub requests: Counter,
    pub received_bytes: Counter,
    pub events_received: Counter,
    pub events_skipped: Family<Reason, Counter>,
    pub requests_refused: Family<Reason, Counter>,
    pub acks_sent: Counter,
    pub ack_duration: Histogram,
    pub fsync_duration: Family<Kind, Histogram>,
    pub write_rounds: Family<On, Counter>,
    pub compression_cpu: Family<Codec, Counter<f64, AtomicU64>>,
    pub chunks_sealed: Family<Reason, Counter>,
    pub chunk_files_open: Gauge,
    pub chunk_files_open_limit: Gauge,
    pub chunk_file_evictions: Counter,
    pub s3_request_duration: Family<Operation, Histogram>,
    pub s3_errors: Family<OperationCode, Counter>,
    pub kinesis_request_duration: Family<Operation, Histogram>,
    pub kinesis_errors: Family<OperationCode, Counter>,
    pub put_records_failed_entries: Family<Code, Counter>,
    pub retries: Family<Stage, Counter>,
    pub chunks_uploaded: Counter,
    pub stored_bytes: Counter,
    pub chunks_published: Counter,
    pub events_published: Counter,
    pub delivered_chunks: Family<Via, Counter>,
    pub delivered_bytes: Family<Via, Counter>,
    pub kinesis_record_bytes: Counter,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| Metrics {
    connections_accepted: Counter::default(),
    connections_open: Gauge::default(),
    connections_refused: Counter::default(),
    handshake_failures: Family::default(),
    udp_heartbeats: Counter::default(),
    duplicate_requests: Counter::default(),
    requests_in_pieces: Counter::default(),
    requests: Counter::default(),
    received_bytes: Counter::default(),
    events_received: Counter::default(),
    events_skipped: Family::default(),
    requests_refused: Family::default(),
    acks_sent: Counter::default(),
    ack_duration: Histogram::new(exponential_buckets(0.0001, 2.0, 18)),
    fsync_duration: Family::new_with_constructor(|| {
        Histogram::new(exponential_buckets(0.0001, 2.0, 18))
    }),
    write_rounds: Family::default(),
    compression_cpu: Family::default(),
    chunks_sealed: Family::default(),
    chunk_files_open: Gauge::default(),
    chunk_files_open_limit: Gauge::default(),
    chunk_file_evictions: Counter::default(),
    s3_request_duration: Family::new_with_constructor(duration_histogram),
    s3_errors: Family::default(),
    kinesis_request_duration: Family::new_with_constructor(duration_histogram),
    kinesis_errors: Family::default(),
    put_records_failed_entries: Family::default(),
    retries: Family::default(),
    chunks_uploaded: Counter::default(),
    stored_bytes: Counter::default(),
    chunks_published: Counter::default(),
    events_published: Counter::default(),
    delivered_chunks: Family::default(),
    delivered_bytes: Family::default(),
    kinesis_record_bytes: Counter::default(),
});

/// The process-wide metrics.
pub fn metrics() -> &'static Metrics {
    &METRICS
}

/// Label values known in advance, created at zero so that every series exists from the start.
const SEAL_REASONS: [&str; 7] = [
    "size",
    "time",
    "shutdown",
    "buffer full",
    "disk full",
    "write error",
    "retry",
];
const REFUSAL_REASONS: [&str; 6] = [
    "too_large",
    "not_msgpack",
    "json",
    "decompression",
    "buffer_error",
    "not_logs",
];
const HANDSHAKE_FAILURES: [&str; 5] = [
    "invalid_ping",
    "anonymous_denied",
    "shared_key_mismatch",
    "user_mismatch",
    "tls",
];
const SYNC_KINDS: [&str; 3] = ["round", "interval", "seal"];
const ROUND_THREADS: [&str; 2] = ["connection", "writer"];
const STAGES: [&str; 2] = ["upload", "publish"];

impl Metrics {
    pub fn skipped(&self, why: &str, n: u64) {
        self.events_skipped.get_or_create(&reason(why)).inc_by(n);
    }

    pub fn refused(&self, why: &str) {
        self.requests_refused.get_or_create(&reason(why)).inc();
    }

    pub fn handshake_failed(&self, why: &str) {
        self.handshake_failures.get_or_create(&reason(why)).inc();
    }

    /// One round of buffer fsyncs (several files synced together count once) and its time.
    pub fn synced(&self, kind: &'static str, took: Duration) {
        self.fsync_duration
            .get_or_create(&Kind { kind })
            .observe(took.as_secs_f64());
    }

    /// A buffer write round that took requests, run `on` the `connection` or the `writer`.
    pub fn write_round(&self, on: &'static str) {
        self.write_rounds.get_or_create(&On { on }).inc();
    }

    /// CPU time the compressor of a body took, on its thread.
    pub fn compressed(&self, compression: &'static str, cpu: Duration) {
        self.compression_cpu
            .get_or_create(&Codec { compression })
            .inc_by(cpu.as_secs_f64());
    }

    pub fn sealed(&self, why: &str) {
        self.chunks_sealed.get_or_create(&reason(why)).inc();
    }

    /// A chunk whose pointer Kinesis accepted: its stored bytes, inline or in S3, and the
    /// record's size.
    pub fn delivered(&self, inline: bool, stored_bytes: u64, record_bytes: u64) {
        let via = Via {
            via: if inline { "inline" } else { "s3" },
        };
        self.delivered_chunks.get_or_create(&via).inc();
        self.delivered_bytes
            .get_or_create(&via)
            .inc_by(stored_bytes);
        self.kinesis_record_bytes.inc_by(record_bytes);
    }

    pub fn retry(&self, stage: &str) {
        self.retries
            .get_or_create(&Stage {
                stage: stage.to_string(),
            })
            .inc();
    }

    /// Records an S3 or Kinesis call: its duration, and its error code if it failed.
    pub fn aws_call(
        &self,
        kinesis: bool,
        operation: &str,
        took: Duration,
        error_code: Option<&str>,
    ) {
        let (durations, errors) = match kinesis {
            false => (&self.s3_request_duration, &self.s3_errors),
            true => (&self.kinesis_request_duration, &self.kinesis_errors),
        };
        durations
            .get_or_create(&Operation {
                operation: operation.to_string(),
            })
            .observe(took.as_secs_f64());
        if let Some(code) = error_code {
            errors
                .get_or_create(&OperationCode {
                    operation: operation.to_string(),
                    code: code.to_string(),
                })
                .inc();
        }
    }

    /// A Prometheus registry with every metric (the buffer's own gauges are added by the admin
    /// endpoint, from [`crate::buffer::gauges`]).
    pub fn registry(&'static self) -> prometheus_client::registry::Registry {
        for r in SEAL_REASONS {
            drop(self.chunks_sealed.get_or_create(&reason(r)));
        }
        for r in REFUSAL_REASONS {
            drop(self.requests_refused.get_or_create(&reason(r)));
        }
        for r in HANDSHAKE_FAILURES {
            drop(self.handshake_failures.get_or_create(&reason(r)));
        }
        for via in ["inline", "s3"] {
            drop(self.delivered_chunks.get_or_create(&Via { via }));
            drop(self.delivered_bytes.get_or_create(&Via { via }));
        }
        for kind in SYNC_KINDS {
            drop(self.fsync_duration.get_or_create(&Kind { kind }));
        }
        for on in ROUND_THREADS {
            drop(self.write_rounds.get_or_create(&On { on }));
        }
        for compression in ["zstd", "gzip"] {
            drop(self.compression_cpu.get_or_create(&Codec { compression }));
        }
        for s in STAGES {
            drop(self.retries.get_or_create(&Stage {
                stage: s.to_string(),
            }));
        }
        let mut r = prometheus_client::registry::Registry::with_prefix("claimcheck");
        r.register(
            "connections_accepted",
            "Forward connections accepted",
            self.connections_accepted.clone(),
        );
        r.register(
            "connections_open",
            "Forward connections open",
            self.connections_open.clone(),
        );
        r.register(
            "connections_refused",
            "Forward connections closed at once because max_connections were open",
            self.connections_refused.clone(),
        );
        r.register(
            "handshake_failures",
            "Shared-key or TLS handshakes refused, by reason",
            self.handshake_failures.clone(),
        );
        r.register(
            "udp_heartbeats",
            "UDP heartbeats answered",
            self.udp_heartbeats.clone(),
        );
        r.register(
            "duplicate_requests",
            "Resent requests acked again without storing their events twice",
            self.duplicate_requests.clone(),
        );
        r.register(
            "requests_in_pieces",
            "Compressed requests that expanded beyond decompression_size_limit, stored a piece at a time",
            self.requests_in_pieces.clone(),
        );
        r.register(
            "requests",
            "Forward requests received",
            self.requests.clone(),
        );
        r.register_with_unit(
            "received",
            "Bytes read from forward connections",
            Unit::Bytes,
            self.received_bytes.clone(),
        );
        r.register(
            "events_received",
            "Events received and buffered",
            self.events_received.clone(),
        );
        r.register(
            "events_skipped",
            "Events skipped as invalid, by reason",
            self.events_skipped.clone(),
        );
        r.register(
            "requests_refused",
            "Requests refused (connection closed, no ack), by reason",
            self.requests_refused.clone(),
        );
        r.register("acks_sent", "Acks sent", self.acks_sent.clone());
        r.register_with_unit(
            "ack_duration",
            "Time from a request received to its ack",
            Unit::Seconds,
            self.ack_duration.clone(),
        );
        r.register_with_unit(
            "buffer_fsync_duration",
            "Buffer fsyncs, by kind: `round` (appends before their acks, sync always), `interval` \
             (the open chunks, sync interval), `seal` (a batch of seals); files synced together \
             count once",
            Unit::Seconds,
            self.fsync_duration.clone(),
        );
        r.register(
            "buffer_write_rounds",
            "Buffer write rounds that took requests, by the thread that ran them: `connection` \
             (one request written where it was read, when nothing else waited for the writer) \
             or `writer` (the writer thread, for every request waiting for it)",
            self.write_rounds.clone(),
        );
        r.register_with_unit(
            "compression_cpu",
            "CPU time spent compressing chunk bodies, by compression: the compressing thread's \
             own time in the compressor (and, for the json format, in converting to JSON \
             lines), where Linux reports it",
            Unit::Seconds,
            self.compression_cpu.clone(),
        );
        r.register(
            "chunks_sealed",
            "Chunks sealed, by reason",
            self.chunks_sealed.clone(),
        );
        r.register(
            "chunk_files_open",
            "Data files of open chunks held open",
            self.chunk_files_open.clone(),
        );
        r.register(
            "chunk_files_open_limit",
            "max_open_chunk_files: most data files of open chunks held open",
            self.chunk_files_open_limit.clone(),
        );
        r.register(
            "chunk_file_evictions",
            "Data files of open chunks closed to stay within max_open_chunk_files (reopened on the chunk's next write)",
            self.chunk_file_evictions.clone(),
        );
        r.register_with_unit(
            "s3_request_duration",
            "S3 request durations, by operation",
            Unit::Seconds,
            self.s3_request_duration.clone(),
        );
        r.register(
            "s3_errors",
            "Failed S3 requests, by operation and error code",
            self.s3_errors.clone(),
        );
        r.register_with_unit(
            "kinesis_request_duration",
            "Kinesis request durations, by operation",
            Unit::Seconds,
            self.kinesis_request_duration.clone(),
        );
        r.register(
            "kinesis_errors",
            "Failed Kinesis requests, by operation and error code",
            self.kinesis_errors.clone(),
        );
        r.register(
            "put_records_failed_entries",
            "PutRecords entries refused inside a successful response, by error code",
            self.put_records_failed_entries.clone(),
        );
        r.register(
            "retries",
            "Delivery retries scheduled, by stage (upload, publish)",
            self.retries.clone(),
        );
        r.register(
            "chunks_uploaded",
            "Chunks stored in S3",
            self.chunks_uploaded.clone(),
        );
        r.register_with_unit(
            "stored",
            "Bytes stored in S3 (after compression)",
            Unit::Bytes,
            self.stored_bytes.clone(),
        );
        r.register(
            "chunks_published",
            "Chunks whose pointer Kinesis accepted",
            self.chunks_published.clone(),
        );
        r.register(
            "events_published",
            "Events in chunks whose pointer Kinesis accepted",
            self.events_published.clone(),
        );
        r.register(
            "delivered_chunks",
            "Chunks whose pointer Kinesis accepted, by where the body went (inline, s3)",
            self.delivered_chunks.clone(),
        );
        r.register_with_unit(
            "delivered",
            "Stored (compressed) body bytes of chunks whose pointer Kinesis accepted, by where the body went (inline, s3)",
            Unit::Bytes,
            self.delivered_bytes.clone(),
        );
        r.register_with_unit(
            "kinesis_records",
            "Bytes of the records Kinesis accepted (data and partition key), what it bills",
            Unit::Bytes,
            self.kinesis_record_bytes.clone(),
        );
        r
    }
}

/// Encodes every metric in the text exposition format.
pub fn encode(registry: &prometheus_client::registry::Registry) -> String {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry)
        .expect("writing to a String cannot fail");
    out
}
