//! The whole path with real components: forward clients (Node `@fluent-org/logger`, Python
//! `fluent-logger`) → claimcheck (a real process) → S3 and Kinesis (moto server) → the
//! consumer crate. `scripts/test` installs the clients and the emulator.

mod common;

use std::io::Write;
use std::time::Duration;

use common::*;
use serde_json::json;

const DELIVERY: Duration = Duration::from_secs(90);

/// Events across `tags`, half in one timekey and half in the next.
fn events(source: &str, tags: &[&str], count: usize, base: i64, int_time: bool) -> Vec<TestEvent> {
    (0..count)
        .map(|i| TestEvent {
            tag: tags[i % tags.len()].to_string(),
            secs: base + if i % 2 == 0 { 5 } else { 65 } + (i as i64 % 7),
            nanos: if int_time && i % 3 == 0 { None } else { Some(1000 * i as u32 + 7) },
            record: json!({"source": source, "seq": i, "message": format!("{source} event {i}"), "nested": {"ok": true, "n": [i, -1]}}),
        })
        .collect()
}

/// `inline_max_bytes`: the sidecar's `--inline-max-bytes` (`0`: every body to S3).
async fn round_trip(format: &str, compression: &str, inline_max_bytes: &str, modes: &[&str]) {
    let env = Emulated::start("e2e").await;
    let sidecar = env.sidecar(&[
        "--format",
        format,
        "--compression",
        compression,
        "--flush-interval",
        "1s",
        "--timekey-wait",
        "0s",
        "--inline-max-bytes",
        inline_max_bytes,
    ]);
    // Two timekeys well in the past, so they are sealed as soon as they are a second old.
    let base = minute_of(now_secs()) - 600;
    let mut expected = Vec::new();
    for mode in modes {
        let sent = events(
            &format!("node-{mode}"),
            &["app.web", "app.db", "app.web.access"],
            60,
            base,
            true,
        );
        let acked = node_send(sidecar.port, mode, &sent);
        assert_eq!(
            acked.len(),
            sent.len(),
            "every event is acknowledged in {mode} mode"
        );
        expected.extend(sent);
    }
    let py = events("python", &["app.py"], 40, base, true);
    python_send(sidecar.port, &py);
    expected.extend(py);

    let chunks = env.read_events(expected.len()).await;
    let n = assert_exactly_once(&chunks, &expected);
    // Four tags × two timekeys at least; more if a flush split a timekey.
    assert!(n >= 8, "expected at least 8 chunks, got {n}");
    // These chunks are a few KiB: all inline, or all in S3 with inlining off.
    let inline = inline_max_bytes != "0";
    assert!(
        chunks.iter().all(|c| c.pointer.is_inline() == inline),
        "every chunk inline: {inline}"
    );
    for chunk in &chunks {
        let p = &chunk.pointer;
        assert_eq!(
            (p.format.as_str(), p.compression.as_str()),
            (format, compression)
        );
        let minute = p.timekey;
        assert!(
            minute == base || minute == base + 60,
            "timekey {minute} is one of the two sent"
        );
        for e in &chunk.events {
            assert_eq!(
                minute_of(e.time().secs),
                p.timekey,
                "events are chunked by their own time"
            );
        }
        // Small chunks ride inline (the default): no object, the body is the record's.
        if let Some(body) = &p.inline {
            assert_eq!(body.len() as u64, p.stored_bytes);
            assert!(p.key.is_empty() && p.bucket.is_empty());
            continue;
        }
        // The object exists under the pointer's key, with the pointer's size.
        let head = env
            .aws
            .s3
            .head_object()
            .bucket(&p.bucket)
            .key(&p.key)
            .send()
            .await
            .unwrap();
        assert_eq!(head.content_length, Some(p.stored_bytes as i64));
    }
    drop(sidecar);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_mode_from_node_and_python_arrives_exactly_once_msgpack_zstd() {
    round_trip(
        "msgpack",
        "zstd",
        "24KiB",
        &[
            "Message",
            "Forward",
            "PackedForward",
            "CompressedPackedForward",
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_bodies_with_gzip_arrive_exactly_once() {
    round_trip(
        "json",
        "gzip",
        "0",
        &["PackedForward", "CompressedPackedForward"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uncompressed_bodies_and_multipart_uploads() {
    let env = Emulated::start("mp").await;
    // Bodies of ~12 MiB with a 6 MiB threshold: multipart with 5 MiB parts, uncompressed.
    let sidecar = env.sidecar(&[
        "--compression",
        "none",
        "--flush-interval",
        "2s",
        "--s3-multipart-threshold",
        "6MiB",
        "--s3-part-size",
        "5MiB",
        "--chunk-limit-size",
        "64MiB",
    ]);
    let base = minute_of(now_secs()) - 600;
    let sent: Vec<TestEvent> = (0..24)
        .map(|i| TestEvent {
            tag: "big.blob".into(),
            secs: base + 1,
            nanos: Some(i),
            record: json!({"seq": i, "payload": format!("{i:08}").repeat(64 * 1024)}),
        })
        .collect();
    let acked = node_send(sidecar.port, "PackedForward", &sent);
    assert_eq!(acked.len(), sent.len());
    let chunks = env.read_events(sent.len()).await;
    assert_exactly_once(&chunks, &sent);
    assert!(
        chunks.iter().any(|c| c.pointer.stored_bytes > 6 << 20),
        "at least one object went by multipart"
    );
    assert!(
        sidecar
            .metric(r#"claimcheck_s3_request_duration_seconds_count{operation="UploadPart"}"#)
            .await
            > 1.0,
        "multipart parts were uploaded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_events_survive_kill_9_and_arrive_after_restart() {
    let env = Emulated::start("kill").await;
    // A long flush interval and event times two hours ahead keep the chunks open: only the
    // buffer holds the acknowledged events when the process dies.
    let mut sidecar = env.sidecar(&["--flush-interval", "1h"]);
    let base = now_secs() + 7200;
    let sent: Vec<TestEvent> = (0..300)
        .map(|i| TestEvent {
            tag: format!("app.kill{}", i % 3),
            secs: base,
            nanos: Some(i),
            record: json!({"seq": i, "msg": "must survive"}),
        })
        .collect();
    let acked = node_send(sidecar.port, "PackedForward", &sent);
    assert_eq!(acked.len(), sent.len());
    sidecar.kill9();
    let leftover = chunk_files(&env.buffer_dir()).len();
    assert!(
        leftover >= 3,
        "open chunk files remain after kill -9 ({leftover})"
    );

    // Only the buffer held these events: their delivery is the recovery.
    let _sidecar = env.sidecar(&["--flush-interval", "1s"]);
    let chunks = env.read_events(sent.len()).await;
    assert_exactly_once(&chunks, &sent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_and_acks_with_backends_down_then_delivers_when_they_come_up() {
    let aws_port = free_port();
    let (bucket, stream) = (unique("down"), unique("down"));
    let dir = tempfile::tempdir().unwrap();
    let sidecar = Sidecar::start(
        &dir.path().join("buffer"),
        aws_port,
        &bucket,
        &stream,
        &[
            "--flush-interval",
            "1s",
            "--retry-wait",
            "200ms",
            "--retry-max-interval",
            "1s",
        ],
    );
    let base = minute_of(now_secs()) - 600;
    let sent = events("down", &["app.down", "app.other"], 100, base, false);
    let acked = node_send(sidecar.port, "CompressedPackedForward", &sent);
    assert_eq!(
        acked.len(),
        sent.len(),
        "acks do not wait for S3 or Kinesis"
    );
    // Let deliveries fail against the closed port for a while (small chunks go inline, so
    // it is Kinesis that is tried).
    sidecar
        .await_metrics("publishes were attempted and failed", |m| {
            metric_sum(m, r#"claimcheck_retries_total{stage="publish"}"#) >= 2.0
        })
        .await;

    let moto = Moto::start_on(aws_port);
    let aws = Aws::new(moto.port);
    aws.create(&bucket, &stream).await;
    let chunks = aws.read_events(&stream, sent.len(), DELIVERY).await;
    assert_exactly_once(&chunks, &sent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_seals_open_chunks_delivers_and_exits_zero() {
    let env = Emulated::start("term").await;
    let mut sidecar = env.sidecar(&["--flush-interval", "1h"]);
    let sent = events("term", &["app.term"], 50, now_secs() + 7200, false);
    assert_eq!(node_send(sidecar.port, "Forward", &sent).len(), sent.len());
    let status = sidecar.terminate(Duration::from_secs(60));
    assert!(status.success(), "exit status {status}");
    // Nothing but the shutdown could seal these chunks (an hour's flush interval, event times
    // two hours ahead), and delivery finished before the exit.
    let left = chunk_files(&env.buffer_dir()).len();
    assert_eq!(left, 0, "the buffer is empty at exit");
    let chunks = env.read_events(sent.len()).await;
    assert_exactly_once(&chunks, &sent);
}

/// Runs `claimcheck <args>` against the test's emulator and returns stdout lines and stderr.
fn run_cli(
    env: &Emulated,
    args: &[&str],
    stdin: Option<&[u8]>,
) -> (Vec<serde_json::Value>, String) {
    let (stdout, stderr) = run_claimcheck(env.moto.port, args, stdin);
    (json_lines(&stdout), stderr)
}

fn line_key(line: &serde_json::Value) -> (String, i64, u32, String) {
    let time =
        claimcheck_consumer::EventTime::parse_rfc3339(line["time"].as_str().unwrap()).unwrap();
    (
        line["tag"].as_str().unwrap().to_string(),
        time.secs,
        time.nanos,
        line["record"].to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_and_resolve_print_events_and_drop_a_republished_pointer() {
    let env = Emulated::start("tail").await;
    let sidecar = env.sidecar(&["--flush-interval", "1s", "--timekey-wait", "0s"]);
    let base = minute_of(now_secs()) - 600;
    let sent = events("tail", &["app.tail", "app.tail2"], 30, base, true);
    assert_eq!(
        node_send(sidecar.port, "PackedForward", &sent).len(),
        sent.len()
    );
    let chunks = env.read_events(sent.len()).await;
    assert_exactly_once(&chunks, &sent);

    // Publish one pointer again, as a crash between PutRecords and deleting the chunk would.
    let again = &chunks[0].pointer;
    env.aws
        .kinesis
        .put_record()
        .stream_name(&env.stream)
        .partition_key(&again.tag)
        .data(aws_sdk_kinesis::primitives::Blob::new(again.to_record()))
        .send()
        .await
        .unwrap();

    let (lines, log) = run_cli(
        &env,
        &[
            "tail",
            "--kinesis-stream",
            &env.stream,
            "--until-idle",
            "2s",
        ],
        None,
    );
    let mut got: Vec<_> = lines.iter().map(line_key).collect();
    let mut want: Vec<_> = sent.iter().map(TestEvent::key).collect();
    got.sort();
    want.sort();
    assert_eq!(got, want, "tail prints every event once");
    assert!(log.contains("duplicates_dropped=1"), "{log}");

    // As `aws kinesis get-records` shows a record: base64 (this one is inline, binary).
    assert!(again.is_inline());
    let record = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        again.to_record(),
    );
    let (lines, _) = run_cli(&env, &["resolve"], Some(record.as_bytes()));
    let mut got: Vec<_> = lines.iter().map(line_key).collect();
    let mut want: Vec<_> = chunks[0].events.iter().map(event_key).collect();
    got.sort();
    want.sort();
    assert_eq!(got, want, "resolve prints the chunk's events");
}

/// Fluent Bit's forward output keeps a keep-alive connection per worker, and Fluentd closes a
/// chunk's connection up to a second after its ack: connections that stay open without
/// sending. They do not keep another sender's lone requests from being written and synced by
/// the connection that read them (`claimcheck_buffer_write_rounds_total{on="connection"}`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_open_connection_does_not_stop_requests_written_in_place() {
    let env = Emulated::start("inplace").await;
    let sidecar = env.sidecar(&["--flush-interval", "1s", "--timekey-wait", "0s"]);
    let base = minute_of(now_secs()) - 600;
    // A connection that sent one request, was answered, and stays open.
    let token = "aWRsZS1vbmNlLXRva2VuISE=\n";
    let mut idle = wire::connect(sidecar.port);
    let request = wire::fluentd_request(
        "idle",
        &wire::entries("idle", base, 5, false),
        5,
        "text",
        token,
    );
    idle.write_all(&request).unwrap();
    wire::expect_ack(&mut idle, token.as_bytes());
    let mut want = wire::expected("idle", "idle", base, 5);
    let in_place = r#"claimcheck_buffer_write_rounds_total{on="connection"}"#;
    let before = sidecar.metric(in_place).await;

    // Another sender, one request at a time.
    let sent: Vec<TestEvent> = (0..20)
        .map(|i| TestEvent {
            tag: "app.lone".into(),
            secs: base + 1,
            nanos: Some(i),
            record: json!({"seq": i}),
        })
        .collect();
    let acked = node_send_with(
        sidecar.port,
        "PackedForward",
        &sent,
        json!({"sequential": true}),
    );
    assert_eq!(acked.len(), sent.len());
    // Each request is written in place unless a seal holds the writer thread as it arrives.
    let written = sidecar.metric(in_place).await - before;
    assert!(
        written >= 10.0,
        "{written} of {} requests written in place",
        sent.len()
    );
    want.extend(sent);
    let chunks = env.read_events(want.len()).await;
    assert_exactly_once(&chunks, &want);
    drop(idle);
}
