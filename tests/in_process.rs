//! The whole sidecar in-process (`Sidecar::run_with`) on 127.0.0.1:0, with the in-memory S3
//! and Kinesis of `claimcheck::testing`: forward requests in, every acknowledged event out
//! exactly once, through objects or inline records, across an outage of either backend. What
//! needs a real process (SIGKILL, the CLI, real clients, the AWS APIs) stays in the process
//! tests against the emulator.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use claimcheck::testing::{self, MemorySink, MemoryStore};
use claimcheck_consumer::entry::{encode, EventTime};
use claimcheck_consumer::Pointer;
use common::in_process::InProcess;
use common::load::request;
use common::wire::{fluentd_request, pack};
use common::{event_key, metric_sum, now_secs, samples, scrape, TestEvent};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends `requests` requests of `events` events each, to tags `app.0` … `app.{tags-1}` in
/// turn, over one connection, each waiting for its ack; returns the events sent.
async fn send(sidecar: &InProcess, requests: usize, events: usize, tags: usize) -> Vec<TestEvent> {
    let mut stream = TcpStream::connect(sidecar.addr).await.unwrap();
    let secs = now_secs();
    let mut sent = Vec::new();
    for r in 0..requests {
        let tag = format!("app.{}", r % tags);
        let mut entries = Vec::new();
        for e in 0..events {
            let n = (r * events + e) as u32;
            entries.push(0x92);
            encode::event_time(&mut entries, EventTime::new(secs, n));
            entries.extend(pack(&rmpv::Value::Map(vec![("n".into(), n.into())])));
            sent.push(TestEvent {
                tag: tag.clone(),
                secs,
                nanos: Some(n),
                record: json!({"n": n}),
            });
        }
        let token = format!("r{r}");
        let req = fluentd_request(&tag, &entries, events, "text", &token);
        request(&mut stream, &req, &token)
            .await
            .unwrap_or_else(|e| panic!("request {r}: no ack ({e})"));
    }
    sent
}

/// Every event of every record: each sent event exactly once, and no other.
fn assert_exactly_once(store: &MemoryStore, pointers: &[Pointer], sent: &[TestEvent]) {
    let mut want: HashMap<_, usize> = HashMap::new();
    for e in sent {
        *want.entry(e.key()).or_default() += 1;
    }
    let mut got: HashMap<_, usize> = HashMap::new();
    for p in pointers {
        let events = testing::events(store, p).unwrap_or_else(|e| panic!("{p:?}: {e}"));
        assert_eq!(events.len() as u64, p.records);
        for e in &events {
            *got.entry(event_key(e)).or_default() += 1;
        }
    }
    assert_eq!(got.len(), want.len(), "distinct events delivered");
    assert_eq!(got, want, "each event once");
}

#[tokio::test]
async fn small_chunks_ride_inline_and_large_ones_go_through_objects() {
    let dir = tempfile::tempdir().unwrap();
    // The default inline limit: chunks of a few events go inline, no object stored.
    let sidecar = InProcess::start(&dir, &[]).await;
    let sent = send(&sidecar, 30, 10, 3).await;
    let (store, sink) = sidecar.shut_down().await;
    let pointers = sink.pointers();
    assert_eq!(pointers.len(), 3, "one chunk per tag");
    assert!(pointers.iter().all(Pointer::is_inline));
    assert!(store.keys().is_empty());
    assert_exactly_once(&store, &pointers, &sent);

    // Inline off: every chunk is an object, named by its pointer.
    let dir = tempfile::tempdir().unwrap();
    let sidecar = InProcess::start(&dir, &["--inline-max-bytes", "0"]).await;
    let sent = send(&sidecar, 30, 10, 3).await;
    let (store, sink) = sidecar.shut_down().await;
    let pointers = sink.pointers();
    assert_eq!(pointers.len(), 3);
    assert!(pointers.iter().all(|p| !p.is_inline()));
    let mut keys: Vec<_> = pointers.iter().map(|p| p.key.clone()).collect();
    keys.sort();
    assert_eq!(keys, store.keys());
    assert_exactly_once(&store, &pointers, &sent);
}

/// Chunks sealed after a second, failed attempts retried within a fifth of one.
const QUICK: [&str; 6] = [
    "--flush-interval",
    "1s",
    "--retry-wait",
    "100ms",
    "--retry-max-interval",
    "200ms",
];

#[tokio::test]
async fn acked_events_wait_out_an_outage_of_either_backend_and_arrive_once() {
    for (s3_down, inline_max_bytes) in [(true, "0"), (false, "24KiB")] {
        let dir = tempfile::tempdir().unwrap();
        let args = [&["--inline-max-bytes", inline_max_bytes][..], &QUICK].concat();
        let sidecar = InProcess::start(&dir, &args).await;
        if s3_down {
            sidecar.store.set_down(true);
        } else {
            sidecar.sink.set_down(true);
        }
        let sent = send(&sidecar, 20, 5, 2).await;
        // Acked while the backend is down; the chunks are sealed (flush interval) and their
        // attempts fail until it is back.
        let calls = || match s3_down {
            true => sidecar.store.calls(),
            false => sidecar.sink.failed_calls(),
        };
        tokio::time::timeout(Duration::from_secs(30), async {
            while calls() < 3 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("attempts were made and failed");
        assert!(sidecar.sink.records().is_empty(), "nothing published yet");
        sidecar.store.set_down(false);
        sidecar.sink.set_down(false);
        tokio::time::timeout(Duration::from_secs(30), sidecar.sink.wait_for(2))
            .await
            .expect("both chunks published once the backend is back");
        let (store, sink) = sidecar.shut_down().await;
        let pointers = sink.pointers();
        assert_eq!(pointers.len(), 2, "s3 down: {s3_down}");
        assert_exactly_once(&store, &pointers, &sent);
    }
}

/// A panic in delivery (a bug) stops the sidecar with an error, for whatever supervises it to
/// start it again, rather than leave it acking what it would never deliver; what it acked
/// stays in the buffer, and the next start delivers it.
#[tokio::test]
async fn a_panic_in_delivery_stops_the_sidecar_and_the_next_start_delivers_what_it_acked() {
    // A panic in an upload (the uploader's tasks), then in a publish.
    for stage in ["upload", "publish"] {
        let dir = tempfile::tempdir().unwrap();
        let buffer_dir = dir.path().join("buffer");
        // Bodies go to S3, so that each chunk is uploaded.
        let args = [&QUICK[..], &["--inline-max-bytes", "0"]].concat();
        let (store, sink) = (
            Arc::new(MemoryStore::new("in-memory")),
            Arc::new(MemorySink::new()),
        );
        // Down until the panic (which comes first, down or not), so that nothing is published
        // before it.
        sink.set_down(true);
        store.set_down(stage == "upload");
        let sidecar = InProcess::start_on(&buffer_dir, &args, store.clone(), sink.clone()).await;
        let sent = send(&sidecar, 10, 5, 2).await;
        match stage {
            "upload" => store.panic_next(),
            _ => sink.panic_next(),
        }
        let stopped = sidecar.stopped_by_itself().await;
        let e = stopped.expect_err("the sidecar stops with an error");
        assert!(
            format!("{e:#}").contains("delivery failed"),
            "{stage}: {e:#}"
        );
        assert!(sink.records().is_empty(), "{stage}");
        store.set_down(false);

        let sidecar =
            InProcess::start_on(&buffer_dir, &args, store, Arc::new(MemorySink::new())).await;
        tokio::time::timeout(Duration::from_secs(30), sidecar.sink.wait_for(2))
            .await
            .unwrap_or_else(|_| panic!("{stage}: both chunks published after the restart"));
        let (store, sink) = sidecar.shut_down().await;
        assert_exactly_once(&store, &sink.pointers(), &sent);
    }
}

/// With `--timekey-zone`, daily windows start at that zone's midnight, as Fluentd's with its
/// `timekey_zone`, and object keys carry the zone's date.
#[tokio::test]
async fn daily_windows_and_keys_follow_the_timekey_zone() {
    let dir = tempfile::tempdir().unwrap();
    let sidecar = InProcess::start(
        &dir,
        &[
            "--timekey",
            "1d",
            "--timekey-zone",
            "+09:00",
            "--s3-object-key-format",
            "%Y/%m/%d/${tag}/${chunk_id}",
            "--inline-max-bytes",
            "0",
        ],
    )
    .await;
    // 2026-11-30T14:59:59Z is 23:59:59 in Tokyo; 15:00Z its midnight; 23:30Z 08:30 there.
    let times = [1_796_050_799, 1_796_050_800, 1_796_081_400];
    let mut entries = Vec::new();
    for (n, secs) in times.into_iter().enumerate() {
        entries.push(0x92);
        encode::event_time(&mut entries, EventTime::new(secs, 0));
        entries.extend(pack(&rmpv::Value::Map(vec![("n".into(), n.into())])));
    }
    let mut stream = TcpStream::connect(sidecar.addr).await.unwrap();
    let req = fluentd_request("app", &entries, times.len(), "text", "zoned");
    request(&mut stream, &req, "zoned").await.unwrap();
    drop(stream);
    let (store, sink) = sidecar.shut_down().await;
    let mut chunks: Vec<(i64, String, u64)> = sink
        .pointers()
        .iter()
        .map(|p| (p.timekey, p.key.clone(), p.records))
        .collect();
    chunks.sort();
    let tokyo_midnight = 1_796_050_800;
    assert_eq!(chunks.len(), 2, "{chunks:?}");
    assert_eq!(
        (chunks[0].0, chunks[0].2, chunks[1].0, chunks[1].2),
        (tokyo_midnight - 86_400, 1, tokyo_midnight, 2)
    );
    assert!(chunks[0].1.starts_with("2026/11/30/app/"), "{chunks:?}");
    assert!(chunks[1].1.starts_with("2026/12/01/app/"), "{chunks:?}");
    assert_eq!(store.keys().len(), 2);
}

/// A time of 0 is "now", as Fluentd's in_forward reads it: the event is stored at the time it
/// arrived, not in 1970.
#[tokio::test]
async fn a_time_of_zero_is_the_time_of_arrival() {
    let dir = tempfile::tempdir().unwrap();
    let sidecar = InProcess::start(&dir, &[]).await;
    let mut entries = vec![0x92, 0x00];
    entries.extend(pack(&rmpv::Value::Map(vec![("n".into(), 0.into())])));
    let before = now_secs();
    let mut stream = TcpStream::connect(sidecar.addr).await.unwrap();
    let req = fluentd_request("app", &entries, 1, "text", "zero");
    request(&mut stream, &req, "zero").await.unwrap();
    drop(stream);
    let after = now_secs();
    let (store, sink) = sidecar.shut_down().await;
    let pointers = sink.pointers();
    let events = testing::events(&store, &pointers[0]).unwrap();
    let secs = events[0].time().secs;
    assert!(
        (before..=after).contains(&secs),
        "{secs} not in {before}..={after}"
    );
    assert_eq!(pointers[0].timekey, secs - secs % 60);
}

/// At shutdown the sidecar delivers what it holds before it exits, and its admin endpoint
/// answers through that: alive, not ready (it takes no new connections), and scraped, so that
/// the scrape sees the buffer drain. The endpoint closes when the sidecar ends.
#[tokio::test]
async fn the_admin_endpoint_answers_while_the_sidecar_delivers_at_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let sidecar = InProcess::start(
        &dir,
        &["--retry-wait", "100ms", "--retry-max-interval", "200ms"],
    )
    .await;
    sidecar.sink.set_down(true);
    let sent = send(&sidecar, 4, 5, 2).await;
    let admin = sidecar.admin;
    let sink = sidecar.sink.clone();
    let stopping = tokio::spawn(sidecar.shut_down());
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let (_, why) = loop {
        let (status, body) = scrape(admin, "/readyz").await;
        if status == 503 {
            break (status, body);
        }
        assert!(std::time::Instant::now() < deadline, "never not ready");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(why.contains("shutting down"), "{why}");
    assert_eq!(scrape(admin, "/healthz").await.0, 200);
    let (status, metrics) = scrape(admin, "/metrics").await;
    assert_eq!(status, 200);
    let metrics = samples(&metrics);
    assert_eq!(metrics["claimcheck_ready"], 0.0);
    assert!(
        metric_sum(&metrics, "claimcheck_buffer_chunks") > 0.0,
        "the chunks waiting for Kinesis"
    );
    sink.set_down(false);
    let (store, sink) = stopping.await.unwrap();
    assert_exactly_once(&store, &sink.pointers(), &sent);
    assert!(
        claimcheck::admin::get(&format!("http://127.0.0.1:{admin}/healthz"))
            .await
            .is_err(),
        "the endpoint closed with the sidecar"
    );
}

/// A request waits for room (the buffer at `total_limit_size`, Kinesis down) when its
/// connection is reset. It is still stored once there is room, and its token with it: the
/// sender's resend on a new connection is acknowledged without being stored again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_connection_was_reset_while_it_waited_is_recognised_when_resent() {
    let dir = tempfile::tempdir().unwrap();
    let sidecar = InProcess::start(
        &dir,
        &[
            "--total-limit-size",
            "64KiB",
            "--flush-interval",
            "200ms",
            "--retry-wait",
            "100ms",
            "--retry-max-interval",
            "200ms",
        ],
    )
    .await;
    sidecar.sink.set_down(true);
    let secs = now_secs();
    let request_of = |r: u32| {
        let mut entries = Vec::new();
        for e in 0..20 {
            entries.push(0x92);
            encode::event_time(&mut entries, EventTime::new(secs, r * 100 + e));
            entries.extend(pack(&rmpv::Value::Map(vec![(
                "pad".into(),
                "x".repeat(500).into(),
            )])));
        }
        let token = format!("t{r}");
        (fluentd_request("app", &entries, 20, "text", &token), token)
    };
    // Requests acked one after the other until one waits for room.
    let mut stream = TcpStream::connect(sidecar.addr).await.unwrap();
    let mut r = 0;
    let (held, token) = loop {
        let (req, token) = request_of(r);
        r += 1;
        stream.write_all(&req).await.unwrap();
        let waiting = async {
            let mut ack = [0u8; 64];
            let n = stream.read(&mut ack).await.unwrap();
            assert!(n > 0 && ack[..n].ends_with(token.as_bytes()), "acked");
        };
        let held = async {
            sidecar
                .await_metrics("a request waits for room", |m| {
                    m["claimcheck_buffer_requests_waiting"] == 1.0
                })
                .await
        };
        tokio::select! {
            () = waiting => {}
            () = held => break (req, token),
        }
        assert!(r < 100, "the buffer never filled");
    };
    // Reset, not closed: the sidecar's read fails.
    #[allow(deprecated)] // Blocking on close: harmless with a zero timeout, in a test.
    stream.set_linger(Some(Duration::ZERO)).unwrap();
    drop(stream);
    sidecar.sink.set_down(false);
    sidecar
        .await_metrics("the held request is stored", |m| {
            m["claimcheck_buffer_requests_waiting"] == 0.0
        })
        .await;
    let mut stream = TcpStream::connect(sidecar.addr).await.unwrap();
    request(&mut stream, &held, &token).await.unwrap();
    drop(stream);
    // (The process's counters are shared with the other tests here: the events delivered
    // tell.)
    let (store, sink) = sidecar.shut_down().await;
    let delivered = common::in_process::delivered(&store, &sink);
    let mut times: Vec<u32> = delivered
        .iter()
        .flat_map(|(_, events)| events.iter().map(|e| e.time().nanos))
        .collect();
    times.sort_unstable();
    let sent: Vec<u32> = (0..r)
        .flat_map(|r| (0..20).map(move |e| r * 100 + e))
        .collect();
    assert_eq!(times, sent, "every request stored once, the resent one too");
}
