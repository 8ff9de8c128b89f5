//! One connection's share of the load: `window` requests in flight (spaced out under
//! `--rate`), acks matched in order and timed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use claimcheck_consumer::entry::ValueScanner;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::args::BenchArgs;
use super::client::connect;
use super::messages::{token, Message, TOKEN_WIDTH};

/// What one connection sent and had acknowledged.
#[derive(Default)]
pub(super) struct ConnStats {
    pub(super) requests: u64,
    pub(super) events: u64,
    pub(super) raw_bytes: u64,
    pub(super) wire_bytes: u64,
    pub(super) latencies_us: Vec<u32>,
    pub(super) errors: u64,
}

/// Sends requests until `stop`, or until an error ends the connection.
pub(super) async fn run_connection(
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
