//! The forward protocol on a real socket, with requests built byte by byte for what the client
//! libraries do not send: Fluentd's str32 entries and newline-ended tokens, multi-member gzip,
//! zstd, Fluent Bit's map32 options and `[[time, metadata], record]` entries, pipelining,
//! split writes. Hostile peers are in `abuse.rs`.

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::wire::*;
use common::*;
use rmpv::Value;

/// A test's emulator and a sidecar that seals chunks after a second.
struct Setup {
    // The sidecar drops first, so that its log can still be read on failure.
    sidecar: Sidecar,
    env: Emulated,
}

async fn setup(args: &[&str]) -> Setup {
    let env = Emulated::start("fwd").await;
    let mut all = vec!["--flush-interval", "1s", "--timekey-wait", "0s"];
    all.extend_from_slice(args);
    let sidecar = env.sidecar(&all);
    Setup { env, sidecar }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fluentd_packed_forward_text_gzip_and_zstd_with_newline_tokens() {
    let s = setup(&[]).await;
    let base = minute_of(now_secs()) - 600;
    let mut conn = connect(s.sidecar.port);
    let mut want = Vec::new();

    let plain = entries("text", base, 20, false);
    conn.write_all(&fluentd_request(
        "fd.text",
        &plain,
        20,
        "text",
        "p8n9gmxTQVC8/nh2wlKKeQ==\n",
    ))
    .unwrap();
    expect_ack(&mut conn, b"p8n9gmxTQVC8/nh2wlKKeQ==\n");
    want.extend(expected("fd.text", "text", base, 20));

    // Fluentd compresses one gzip member per buffer append: several members back to back.
    let gz = gzip_members(&entries("gzip", base, 30, false), 5);
    conn.write_all(&fluentd_request(
        "fd.gzip",
        &gz,
        30,
        "gzip",
        "ZgzDi7Mh8Zj//lwAwM7UHw==\n",
    ))
    .unwrap();
    expect_ack(&mut conn, b"ZgzDi7Mh8Zj//lwAwM7UHw==\n");
    want.extend(expected("fd.gzip", "gzip", base, 30));

    let raw = entries("zstd", base, 30, false);
    let zst: Vec<u8> = raw
        .chunks(300)
        .flat_map(|p| zstd::encode_all(p, 1).unwrap())
        .collect();
    conn.write_all(&fluentd_request(
        "fd.zstd",
        &zst,
        30,
        "zstd",
        "c3RkLXRva2VuLXRocmVlIQ==\n",
    ))
    .unwrap();
    expect_ack(&mut conn, b"c3RkLXRva2VuLXRocmVlIQ==\n");
    want.extend(expected("fd.zstd", "zstd", base, 30));

    let chunks = s.env.read_events(want.len()).await;
    assert_exactly_once(&chunks, &want);
}

/// A compressed request that expands beyond `--decompression-size-limit` (a Fluentd
/// file-buffer chunk of 256 MiB compressed, at scale) is stored a piece at a time and acked,
/// not refused forever; its resend is acked again without storing it twice. One that would
/// fail part way (here an event larger than the limit after many pieces) is refused whole,
/// before any piece is stored: its resends do not pile up copies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_requests_beyond_the_decompression_limit_are_stored_in_pieces() {
    let s = setup(&["--decompression-size-limit", "64KiB"]).await;
    let base = minute_of(now_secs()) - 86_400;
    let n = 20_000;
    let gz = gzip_members(&entries("gzbig", base, n, false), 3);
    let zst = zstd::encode_all(&entries("zstbig", base, n, true)[..], 3).unwrap();
    assert!(
        entries("gzbig", base, n, false).len() > 10 * 65536,
        "each request is at least ten pieces"
    );
    let gz_request = fluentd_request("fd.big", &gz, n, "gzip", "YmlnLWd6aXAtY2h1bmsh\n");

    let mut doomed = entries("doomed", base, n, false);
    let mut huge = vec![0x92];
    huge.extend(pack(&Value::from(base)));
    huge.extend(pack(&Value::Map(vec![(
        "pad".into(),
        "x".repeat(100 << 10).into(),
    )])));
    doomed.extend(huge);
    let doomed = fluentd_request(
        "fd.doomed",
        &gzip_members(&doomed, 1),
        n + 1,
        "gzip",
        "ZG9vbWVkLWNodW5rISEh\n",
    );
    let mut refused = connect(s.sidecar.port);
    refused.write_all(&doomed).unwrap();
    assert!(closed_silently(&mut refused), "refused without an ack");

    let mut conn = connect(s.sidecar.port);
    conn.write_all(&gz_request).unwrap();
    expect_ack(&mut conn, b"YmlnLWd6aXAtY2h1bmsh\n");
    conn.write_all(&fluentd_request(
        "fb.big",
        &zst,
        n,
        "zstd",
        "YmlnLXpzdGQtY2h1bmsh\n",
    ))
    .unwrap();
    expect_ack(&mut conn, b"YmlnLXpzdGQtY2h1bmsh\n");
    // The ack was lost, say: the resend is recognised by its token.
    let mut again = connect(s.sidecar.port);
    again.write_all(&gz_request).unwrap();
    expect_ack(&mut again, b"YmlnLWd6aXAtY2h1bmsh\n");

    let mut want = expected("fd.big", "gzbig", base, n);
    want.extend(expected("fb.big", "zstbig", base, n));
    let chunks = s.env.read_events(want.len()).await;
    assert_exactly_once(&chunks, &want);
    let m = s.sidecar.metrics().await;
    assert_eq!(m["claimcheck_requests_in_pieces_total"], 2.0);
    assert_eq!(m["claimcheck_duplicate_requests_total"], 1.0);
    assert_eq!(
        m["claimcheck_requests_refused_total{reason=\"decompression\"}"],
        1.0
    );
    assert_eq!(
        m["claimcheck_events_received_total"],
        (2 * n) as f64,
        "nothing of the refused request was stored"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fluent_bit_forward_mode_with_metadata_map32_options_and_ext8_times() {
    let s = setup(&[]).await;
    let base = minute_of(now_secs()) - 600;
    let n = 25;
    // [tag, array16(n) of [[EventTime, {meta}], record], map32{chunk, size, fluent_signal}]
    let mut req = vec![0x93];
    req.extend(pack(&"fb.app".into()));
    req.extend_from_slice(&[0xdc, 0, n as u8]);
    req.extend(entries("fb", base, n, true));
    req.extend_from_slice(&[0xdf, 0, 0, 0, 3]);
    for (k, v) in [
        ("chunk", Value::from("rtXcVIIX6crUN5KFMZPzZQ==")),
        ("size", (n as u64).into()),
        ("fluent_signal", 0.into()),
    ] {
        req.extend(pack(&k.into()));
        req.extend(pack(&v));
    }
    let mut conn = connect(s.sidecar.port);
    conn.write_all(&req).unwrap();
    expect_ack(&mut conn, b"rtXcVIIX6crUN5KFMZPzZQ==");

    // Compressed with bin16 entries, as Fluent Bit sends gzip.
    let gz = gzip_members(&entries("fbgz", base, n, true), 1);
    let mut req = vec![0x93];
    req.extend(pack(&"fb.gz".into()));
    req.push(0xc5);
    req.extend_from_slice(&(gz.len() as u16).to_be_bytes());
    req.extend(gz);
    req.extend(pack(&Value::Map(vec![
        ("chunk".into(), "Zmx1ZW50LWJpdC1nemlwIQ==".into()),
        ("compressed".into(), "gzip".into()),
    ])));
    conn.write_all(&req).unwrap();
    expect_ack(&mut conn, b"Zmx1ZW50LWJpdC1nemlwIQ==");

    // Plain bin32 entries whose times are ext8 (`c7 08 00`), not fixext8, and metadata-less.
    let mut ext8 = Vec::new();
    for i in 0..n {
        ext8.push(0x92);
        ext8.extend_from_slice(&[0xc7, 0x08, 0x00]);
        ext8.extend_from_slice(&((base + i as i64) as u32).to_be_bytes());
        ext8.extend_from_slice(&(i as u32).to_be_bytes());
        ext8.extend(pack(&record("ext8", i)));
    }
    let mut req = vec![0x93];
    req.extend(pack(&"fb.ext8".into()));
    req.push(0xc6);
    req.extend_from_slice(&(ext8.len() as u32).to_be_bytes());
    req.extend(ext8);
    req.extend(pack(&Value::Map(vec![("chunk".into(), "ZXh0OA==".into())])));
    conn.write_all(&req).unwrap();
    expect_ack(&mut conn, b"ZXh0OA==");

    let mut want = expected("fb.app", "fb", base, n);
    want.extend(expected("fb.gz", "fbgz", base, n));
    let plain = want.len();
    want.extend(expected("fb.ext8", "ext8", base, n));
    let chunks = s.env.read_events(want.len()).await;
    assert_exactly_once(&chunks, &want);
    let meta = serde_json::json!({"pod": "web-1"});
    let with_meta = chunks
        .iter()
        .flat_map(|c| &c.events)
        .filter(|e| e.tag() != "fb.ext8");
    assert_eq!(with_meta.clone().count(), plain);
    for e in with_meta {
        assert_eq!(e.metadata_json(), Some(meta.clone()), "metadata is kept");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_writes_pipelining_no_ack_requests_and_skipped_events() {
    let s = setup(&[]).await;
    let base = minute_of(now_secs()) - 600;
    let mut want = Vec::new();

    // One request written a byte at a time.
    let mut conn = connect(s.sidecar.port);
    let req = fluentd_request(
        "split.bytes",
        &entries("bytes", base, 3, false),
        3,
        "text",
        "Ynl0ZS1ieS1ieXRl",
    );
    for b in &req {
        conn.write_all(&[*b]).unwrap();
        std::thread::sleep(Duration::from_millis(1));
    }
    expect_ack(&mut conn, b"Ynl0ZS1ieS1ieXRl");
    want.extend(expected("split.bytes", "bytes", base, 3));

    // A Message-mode request without options gets no reply, but is stored; 50 pipelined
    // requests on the same connection are acked in order.
    conn.write_all(&pack(&Value::Array(vec![
        "noack".into(),
        Value::Ext(
            0,
            [(base as u32).to_be_bytes(), 0u32.to_be_bytes()].concat(),
        ),
        record("noack", 0),
    ])))
    .unwrap();
    want.push(TestEvent {
        tag: "noack".into(),
        secs: base,
        nanos: Some(0),
        record: serde_json::json!({"source": "noack", "seq": 0}),
    });
    let mut burst = Vec::new();
    for i in 0..50 {
        let e = entries(&format!("pipe{i}"), base, 2, false);
        burst.extend(fluentd_request(
            "pipe",
            &e,
            2,
            "text",
            &format!("token-{i:03}\n"),
        ));
        want.extend(expected("pipe", &format!("pipe{i}"), base, 2));
    }
    conn.write_all(&burst).unwrap();
    let mut acks = Vec::new();
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let expected_acks: Vec<u8> = (0..50)
        .flat_map(|i| {
            let t = format!("token-{i:03}\n");
            let mut a = vec![0x81, 0xa3, b'a', b'c', b'k', 0xa0 | t.len() as u8];
            a.extend_from_slice(t.as_bytes());
            a
        })
        .collect();
    while acks.len() < expected_acks.len() {
        let mut buf = [0u8; 4096];
        let n = conn.read(&mut buf).unwrap();
        assert!(n > 0, "connection closed early");
        acks.extend_from_slice(&buf[..n]);
    }
    assert_eq!(
        acks, expected_acks,
        "one ack per request, in order, none for the no-option request"
    );

    // Invalid events are skipped, the valid ones in the same request kept, and it is acked.
    let mut mixed = entries("mixed", base, 2, false);
    mixed.extend(pack(&Value::Array(vec![
        1.5.into(),
        record("float-time", 0),
    ])));
    mixed.extend(pack(&Value::Array(vec![
        (base as u64).into(),
        "not a map".into(),
    ])));
    conn.write_all(&fluentd_request("mixed", &mixed, 4, "text", "bWl4ZWQ="))
        .unwrap();
    expect_ack(&mut conn, b"bWl4ZWQ=");
    want.extend(expected("mixed", "mixed", base, 2));

    let chunks = s.env.read_events(want.len()).await;
    assert_exactly_once(&chunks, &want);
    assert!(s.sidecar.metric("claimcheck_events_skipped_total").await >= 2.0);
}

#[test]
fn shutdown_waits_for_a_request_in_progress_only_so_long() {
    let dir = tempfile::tempdir().unwrap();
    // No emulator: acks and shutdown do not depend on S3 or Kinesis.
    let mut sidecar = Sidecar::start(
        &dir.path().join("buffer"),
        free_port(),
        "b",
        "s",
        &["--shutdown-timeout", "1s"],
    );
    let base = minute_of(now_secs());
    let req = fluentd_request(
        "slow",
        &entries("slow", base, 50, false),
        50,
        "text",
        "c2xvdw==",
    );
    let mut slow = connect(sidecar.port);
    slow.write_all(&req[..req.len() / 2]).unwrap();
    let idle = connect(sidecar.port);
    sidecar.await_metrics_blocking("both connections are open", |m| {
        m["claimcheck_connections_open"] == 2.0
    });
    let started = std::time::Instant::now();
    let status = sidecar.terminate(Duration::from_secs(60));
    assert!(status.success(), "exit status {status}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "shutdown took {:?}",
        started.elapsed()
    );
    // The incomplete request was dropped, never acked.
    let mut reply = Vec::new();
    let _ = std::io::Read::read_to_end(&mut slow, &mut reply);
    assert!(reply.is_empty(), "{reply:?}");
    drop(idle);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_counts_only_connections_still_open() {
    // No AWS behind it: the stored events wait for the next start, not for delivery.
    let mut sidecar = Sidecar::standalone(&["--shutdown-timeout", "1s"]);
    let base = minute_of(now_secs());
    let req = fluentd_request(
        "gone",
        &entries("gone", base, 3, false),
        3,
        "text",
        "Z29uZQ==",
    );
    let mut conn = connect(sidecar.port);
    conn.write_all(&req).unwrap();
    expect_ack(&mut conn, b"Z29uZQ==");
    drop(conn);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while sidecar.metric("claimcheck_connections_open").await > 0.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the connection never ended"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status = tokio::task::block_in_place(|| sidecar.terminate(Duration::from_secs(60)));
    assert!(status.success(), "exit status {status}");
    let log = sidecar.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("stopped accepting"))
        .expect("the shutdown line");
    assert!(line.contains("connections=0"), "{line}");
}
