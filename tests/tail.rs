//! `claimcheck tail` and `claimcheck resolve` over chunks stored and published directly (as
//! the sidecar would) on the moto emulator: checkpoints, tag globs, start times and output
//! formats.

mod common;

use std::time::Duration;

use claimcheck_consumer::body::{Compression, Format};
use claimcheck_consumer::checkpoint::ShardCheckpoint;
use claimcheck_consumer::Checkpoint;
use common::*;

/// The `chunk` label of every printed line, in order.
fn chunks_of(lines: &[serde_json::Value]) -> Vec<String> {
    lines
        .iter()
        .map(|l| l["record"]["chunk"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_resumes_from_its_checkpoint_and_prints_only_matching_tags() {
    let env = Emulated::start("tail-cp").await;
    env.publish(
        "app.web",
        &sample_events("app.web", "one", 2),
        Format::Msgpack,
        Compression::Zstd,
    )
    .await;
    env.publish(
        "sys.db",
        &sample_events("sys.db", "two", 2),
        Format::Json,
        Compression::Gzip,
    )
    .await;
    let checkpoint = env.dir.path().join("tail.checkpoint");
    let args = |cp: &std::path::Path| {
        vec![
            "tail".to_string(),
            "--kinesis-stream".into(),
            env.stream.clone(),
            "--checkpoint".into(),
            cp.display().to_string(),
            "--tag".into(),
            "app.*".into(),
            "--tag".into(),
            "{web,api}.?".into(),
            "--until-idle".into(),
            "1s".into(),
        ]
    };
    let run = |args: Vec<String>| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run_claimcheck(env.moto.port, &args, None)
    };

    let (stdout, log) = run(args(&checkpoint));
    assert_eq!(chunks_of(&json_lines(&stdout)), ["one", "one"], "{log}");
    assert!(log.contains("filtered=1"), "{log}");
    let saved = Checkpoint::from_json(&std::fs::read(&checkpoint).unwrap()).unwrap();
    assert!(matches!(
        saved.shard("shardId-000000000000"),
        Some(ShardCheckpoint::After(_))
    ));

    env.publish(
        "app.api",
        &sample_events("app.api", "three", 1),
        Format::Msgpack,
        Compression::None,
    )
    .await;
    env.publish(
        "web.x",
        &sample_events("web.x", "four", 1),
        Format::Json,
        Compression::Zstd,
    )
    .await;
    env.publish(
        "web.xy",
        &sample_events("web.xy", "five", 1),
        Format::Json,
        Compression::Zstd,
    )
    .await;
    let (stdout, log) = run(args(&checkpoint));
    assert_eq!(
        chunks_of(&json_lines(&stdout)),
        ["three", "four"],
        "only what came after the checkpoint, and only matching tags: {log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_from_a_time_prints_msgpack_forward_messages() {
    let env = Emulated::start("tail-at").await;
    env.publish(
        "app.old",
        &sample_events("app.old", "old", 1),
        Format::Msgpack,
        Compression::Zstd,
    )
    .await;
    // Record arrival times come from the emulator's clock, which is this machine's.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let from = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let new = sample_events("app.new", "new", 3);
    env.publish("app.new", &new, Format::Json, Compression::Gzip)
        .await;

    let (stdout, log) = run_claimcheck(
        env.moto.port,
        &[
            "tail",
            "--kinesis-stream",
            &env.stream,
            "--from",
            &from,
            "--format",
            "msgpack",
            "--until-idle",
            "1s",
        ],
        None,
    );
    let mut rest = &stdout[..];
    let mut messages = Vec::new();
    while !rest.is_empty() {
        messages.push(rmpv::decode::read_value(&mut rest).expect("msgpack messages"));
    }
    assert_eq!(messages.len(), 3, "{log}");
    for (message, event) in messages.iter().zip(&new) {
        let rmpv::Value::Array(parts) = message else {
            panic!("a forward message is an array: {message}")
        };
        assert_eq!(parts[0], rmpv::Value::from("app.new"));
        assert_eq!(
            parts[1],
            rmpv::Value::Ext(0, {
                let mut t = (event.time().secs as u32).to_be_bytes().to_vec();
                t.extend(event.time().nanos.to_be_bytes());
                t
            })
        );
        assert_eq!(parts[2], event.record().to_owned());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolve_prints_one_pointer_and_fails_on_a_missing_object() {
    let env = Emulated::start("resolve").await;
    let events = sample_events("app.one", "one", 4);
    let pointer = env
        .publish("app.one", &events, Format::Msgpack, Compression::Gzip)
        .await;
    let (stdout, _) = run_claimcheck(
        env.moto.port,
        &["resolve", std::str::from_utf8(&pointer.to_json()).unwrap()],
        None,
    );
    let lines = json_lines(&stdout);
    let want: Vec<serde_json::Value> = events.iter().map(|e| e.to_json()).collect();
    assert_eq!(lines, want);

    env.aws
        .s3
        .delete_object()
        .bucket(&pointer.bucket)
        .key(&pointer.key)
        .send()
        .await
        .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_claimcheck"))
        .args(["resolve", "-"])
        .envs(aws_env(env.moto.port))
        .stdin(
            std::fs::File::open({
                let path = env.dir.path().join("pointer.json");
                std::fs::write(&path, pointer.to_json()).unwrap();
                path
            })
            .unwrap(),
        )
        .output()
        .unwrap();
    assert!(!out.status.success());
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("is missing"), "{log}");
    assert!(out.stdout.is_empty());
}

/// A pointer from a newer sidecar (a version this reader does not know) stops `tail` with an
/// error, at that record, every time: skipped, its chunk would be lost to every reader once
/// the stream's retention passed; a newer claimcheck reads it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_stops_at_a_pointer_from_a_newer_sidecar_instead_of_skipping_it() {
    let env = Emulated::start("tail-newer").await;
    env.publish(
        "app.web",
        &sample_events("app.web", "one", 1),
        Format::Msgpack,
        Compression::Zstd,
    )
    .await;
    env.aws
        .kinesis
        .put_record()
        .stream_name(&env.stream)
        .partition_key("app.web")
        .data(aws_sdk_kinesis::primitives::Blob::new(
            br#"{"v":3,"chunk_id":"from-a-newer-sidecar"}"#.to_vec(),
        ))
        .send()
        .await
        .unwrap();
    env.publish(
        "app.web",
        &sample_events("app.web", "two", 1),
        Format::Msgpack,
        Compression::Zstd,
    )
    .await;
    let checkpoint = env.dir.path().join("tail.checkpoint");
    let checkpoint = checkpoint.display().to_string();
    let tail = || {
        let args = [
            "tail",
            "--kinesis-stream",
            &env.stream,
            "--until-idle",
            "1s",
            "--checkpoint",
            &checkpoint,
        ];
        let out = claimcheck_output(env.moto.port, &args, None);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "tail went past it: {stderr}");
        assert!(stderr.contains("a newer claimcheck reads it"), "{stderr}");
        chunks_of(&json_lines(&out.stdout))
    };
    assert_eq!(tail(), ["one"]);
    assert_eq!(
        tail(),
        Vec::<String>::new(),
        "stopped at the same record again"
    );
}
