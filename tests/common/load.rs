//! A steady forward load that records exactly which events were acknowledged.
//!
//! Each connection sends PackedForward requests (Fluentd's shape: str32 entries, `chunk` token)
//! one at a time, each event carrying a unique `id`, and waits for the ack. When the sidecar
//! goes away (killed) the connection reconnects and, as Fluentd does, resends the request whose
//! ack it did not get, byte for byte with the same token, before going on with new events
//! ([`Load::start_resending`]); or it goes on with new events only ([`Load::start`]), so that
//! an unacknowledged request is never resent.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use claimcheck_consumer::entry::{encode, EventTime, ValueScanner};
use claimcheck_consumer::Event;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What a load run did.
#[derive(Debug, Default)]
pub struct LoadResult {
    /// Ids of every acknowledged event.
    pub acked: HashSet<u64>,
    /// Events sent (acknowledged or not).
    pub sent: u64,
    /// Requests whose ack never came (connection lost).
    pub unacked_requests: u64,
}

pub struct Load {
    /// Where the senders connect: a restarted sidecar listens on a port of its own choosing,
    /// which [`Load::follow`] gives them.
    port: Arc<AtomicU16>,
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<HashSet<u64>>>,
    sent: Arc<AtomicU64>,
    lost: Arc<AtomicU64>,
    /// Connections open now ([`Load::acked_when_disconnected`]).
    open: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    /// Starts `connections` senders to 127.0.0.1:`port`, each sending requests of
    /// `events_per_request` events spread over `tags` tags.
    pub fn start(port: u16, connections: usize, events_per_request: usize, tags: usize) -> Load {
        Load::start_with(port, connections, events_per_request, tags, false)
    }

    /// [`Load::start`], resending each unacknowledged request with its token after reconnecting
    /// until it is acknowledged.
    pub fn start_resending(
        port: u16,
        connections: usize,
        events_per_request: usize,
        tags: usize,
    ) -> Load {
        Load::start_with(port, connections, events_per_request, tags, true)
    }

    fn start_with(
        port: u16,
        connections: usize,
        events_per_request: usize,
        tags: usize,
        resend: bool,
    ) -> Load {
        let port = Arc::new(AtomicU16::new(port));
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(HashSet::new()));
        let (sent, lost) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let open = Arc::new(AtomicUsize::new(0));
        let tasks = (0..connections as u64)
            .map(|conn| {
                let (port, stop, acked, sent, lost, open) = (
                    port.clone(),
                    stop.clone(),
                    acked.clone(),
                    sent.clone(),
                    lost.clone(),
                    open.clone(),
                );
                tokio::spawn(async move {
                    let mut seq = 0u64;
                    // The request whose ack did not come: its ids, token and bytes.
                    let mut unacked: Option<(Vec<u64>, String, Vec<u8>)> = None;
                    while !stop.load(Ordering::Relaxed) {
                        let to = ("127.0.0.1", port.load(Ordering::Relaxed));
                        let Ok(mut stream) = TcpStream::connect(to).await else {
                            tokio::time::sleep(Duration::from_millis(30)).await;
                            continue;
                        };
                        let _ = stream.set_nodelay(true);
                        open.fetch_add(1, Ordering::SeqCst);
                        while !stop.load(Ordering::Relaxed) {
                            let (ids, token, req) = match unacked.take() {
                                Some(resent) => resent,
                                None => {
                                    let ids: Vec<u64> = (0..events_per_request as u64)
                                        .map(|i| (conn << 48) | (seq << 12) | i)
                                        .collect();
                                    seq += 1;
                                    let tag = format!("load.t{}", seq % tags.max(1) as u64);
                                    let token = format!("c{conn}s{seq}");
                                    sent.fetch_add(ids.len() as u64, Ordering::Relaxed);
                                    let req = encode(&tag, &ids, &token);
                                    (ids, token, req)
                                }
                            };
                            match request(&mut stream, &req, &token).await {
                                Ok(()) => acked.lock().unwrap().extend(ids),
                                Err(_) => {
                                    lost.fetch_add(1, Ordering::Relaxed);
                                    if resend {
                                        unacked = Some((ids, token, req));
                                    }
                                    break;
                                }
                            }
                        }
                        // Every ack read on this connection is counted by now.
                        open.fetch_sub(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        Load {
            port,
            stop,
            acked,
            sent,
            lost,
            open,
            tasks,
        }
    }

    /// Sends to `port` from the next connection on (a restarted sidecar's).
    pub fn follow(&self, port: u16) {
        self.port.store(port, Ordering::Relaxed);
    }

    /// Ids of the events acknowledged once no connection is open (within 30 s), for a caller
    /// that has just killed the sidecar: an ack it wrote before dying may still be unread
    /// in a sender's socket, and [`Load::acked_ids`] at that moment would miss it. A sender
    /// counts each ack it reads before its connection ends, and connects to a dead sidecar in
    /// vain until [`Load::follow`] gives it another.
    pub async fn acked_when_disconnected(&self) -> HashSet<u64> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while self.open.load(Ordering::SeqCst) > 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the load's connections to a killed sidecar did not end"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        self.acked_ids()
    }

    /// Ids of the events acknowledged so far.
    pub fn acked_ids(&self) -> HashSet<u64> {
        self.acked.lock().unwrap().clone()
    }

    pub fn acked_count(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    pub async fn stop(self) -> LoadResult {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            // A sender blocked on a dead or paused sidecar is simply cut off.
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
        LoadResult {
            acked: std::mem::take(&mut *self.acked.lock().unwrap()),
            sent: self.sent.load(Ordering::Relaxed),
            unacked_requests: self.lost.load(Ordering::Relaxed),
        }
    }
}

/// Event id (the `id` field of [`record_of`]'s records) -> times it is among `events`.
pub fn times_delivered<'a>(events: impl IntoIterator<Item = &'a Event>) -> HashMap<u64, usize> {
    let mut seen = HashMap::new();
    for e in events {
        *seen
            .entry(e.record_json()["id"].as_u64().expect("an event id"))
            .or_insert(0) += 1;
    }
    seen
}

/// The record of event `id`.
pub fn record_of(id: u64) -> rmpv::Value {
    rmpv::Value::Map(vec![
        ("id".into(), id.into()),
        (
            "msg".into(),
            format!("event {id:x} {}", "x".repeat(64)).into(),
        ),
    ])
}

/// One request of the events `ids`.
fn encode(tag: &str, ids: &[u64], token: &str) -> Vec<u8> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let mut entries = Vec::new();
    for id in ids {
        entries.push(0x92);
        encode::event_time(
            &mut entries,
            EventTime::new(now.as_secs() as i64, now.subsec_nanos()),
        );
        rmpv::encode::write_value(&mut entries, &record_of(*id)).unwrap();
    }
    let mut req = vec![0x93];
    rmp::encode::write_str(&mut req, tag).unwrap();
    req.push(0xdb);
    req.extend_from_slice(&(entries.len() as u32).to_be_bytes());
    req.extend_from_slice(&entries);
    let option = rmpv::Value::Map(vec![
        ("size".into(), (ids.len() as u64).into()),
        ("compressed".into(), "text".into()),
        ("chunk".into(), token.into()),
    ]);
    rmpv::encode::write_value(&mut req, &option).unwrap();
    req
}

/// Sends one forward request whose `chunk` option is `token`, then waits for its ack (within
/// 60 s).
pub async fn request(stream: &mut TcpStream, req: &[u8], token: &str) -> std::io::Result<()> {
    stream.write_all(req).await?;
    let mut buf = Vec::new();
    let mut scanner = ValueScanner::default();
    let read = async {
        loop {
            if let Ok(Some(len)) = scanner.advance(&buf) {
                return Ok(buf[..len].to_vec());
            }
            let mut piece = [0u8; 256];
            let n = stream.read(&mut piece).await?;
            if n == 0 {
                return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
            }
            buf.extend_from_slice(&piece[..n]);
        }
    };
    let ack = tokio::time::timeout(Duration::from_secs(60), read)
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    if !ack.ends_with(token.as_bytes()) {
        return Err(std::io::Error::other("ack for another token"));
    }
    Ok(())
}
