//! `claimcheck bench`: a forward load generator with acks, for claimcheck or any forward
//! receiver (Fluentd's in_forward, Fluent Bit's).
//!
//! Messages are encoded once before the run; per request only the ack token (a fixed-width
//! counter) changes, so the generator itself stays cheap (its CPU time is reported). Every
//! connection keeps `window` requests in flight and matches acks in order.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

mod args;
mod client;
pub mod floor;
mod load;
mod messages;
mod procfs;
mod tls;

pub use args::BenchArgs;
pub use messages::{sample_entries, sample_request, Mode, Payload};

use load::{run_connection, ConnStats};
use messages::{encode_message, Message};
use procfs::{cpu_seconds, peak_rss_mib};
use tls::tls_connector;

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

    use bytes::Bytes;

    use super::messages::token;
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
