//! Overflow: the buffer reaches `total_limit_size` (while Kinesis is down and small chunks wait
//! inline), or the disk is really full (a 4 MiB tmpfs mounted in a private mount namespace,
//! while S3 is down). The sidecar must stop acking
//! (senders wait, TCP pushes back), never crash, never corrupt a chunk, and carry on by itself
//! when space returns; with `drop_oldest_chunk` it keeps acking and logs every chunk it drops.

mod common;

use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

use common::load::{Load, LoadResult};
use common::proxy::{Fault, Proxies};
use common::*;

/// Fields drop in order: the sidecar first, so that its log can still be read on failure.
struct Setup {
    sidecar: Sidecar,
    env: Emulated,
    proxies: Proxies,
}

const ARGS: [&str; 8] = [
    "--flush-interval",
    "300ms",
    "--timekey-wait",
    "0s",
    "--retry-wait",
    "200ms",
    "--retry-max-interval",
    "1s",
];

/// Which backend is down while the buffer fills.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Down {
    /// S3, with every body sent there (`--inline-max-bytes 0`).
    S3,
    /// Kinesis, with small bodies inline (the default): they wait in their state files.
    Kinesis,
}

/// The sidecar with a backend down behind a proxy; with `tmpfs`, its buffer is a 4 MiB tmpfs.
async fn setup(tmpfs: bool, down: Down, args: &[&str]) -> Setup {
    let env = Emulated::start("overflow").await;
    let proxies = env.proxies().await;
    let mut all: Vec<&str> = ARGS.to_vec();
    match down {
        Down::S3 => {
            proxies.s3.set(Fault::Down);
            all.extend(["--inline-max-bytes", "0"]);
        }
        Down::Kinesis => proxies.kinesis.set(Fault::Down),
    }
    all.extend_from_slice(args);
    let mut aws = aws_env(env.moto.port);
    aws.extend(proxies.env());
    let buffer = env.buffer_dir();
    let sidecar = if tmpfs {
        std::fs::create_dir_all(&buffer).unwrap();
        // A user and mount namespace of its own: no root needed, nothing left mounted after.
        let mut cmd = Command::new("unshare");
        cmd.args(["--user", "--map-root-user", "--mount", "--", "sh", "-c"])
            .arg(r#"mount -t tmpfs -o size=4m tmpfs "$1" && shift && exec "$@""#)
            .arg("sh")
            .arg(&buffer)
            .arg(env!("CARGO_BIN_EXE_claimcheck"))
            .arg("serve");
        Sidecar::spawn(
            cmd,
            free_port(),
            &buffer,
            &aws,
            &env.bucket,
            &env.stream,
            &all,
        )
    } else {
        Sidecar::start_with(free_port(), &buffer, &aws, &env.bucket, &env.stream, &all)
    };
    Setup {
        env,
        proxies,
        sidecar,
    }
}

/// Event id -> times delivered, once the stream holds at least `expected` events.
async fn delivered(s: &Setup, expected: usize) -> HashMap<u64, usize> {
    let chunks = s.env.read_events(expected).await;
    let mut seen = HashMap::new();
    for e in chunks.iter().flat_map(|c| &c.events) {
        *seen
            .entry(e.record_json()["id"].as_u64().unwrap())
            .or_insert(0) += 1;
    }
    seen
}

/// Fills the buffer with a backend down, checks that acks stop and the process stays up,
/// brings it back and checks that everything acked arrives once.
async fn fills_then_recovers(s: Setup, full_message: &str) {
    let load = Load::start(s.sidecar.port, 2, 20, 3);
    s.sidecar.expect_log(full_message).await;
    // Requests in flight when the buffer filled may still complete; then nothing moves.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stalled_at = load.acked_count();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        load.acked_count(),
        stalled_at,
        "no acks while the buffer is full"
    );
    assert!(stalled_at > 0);

    s.proxies.s3.set(Fault::None);
    s.proxies.kinesis.set(Fault::None);
    let deadline = Instant::now() + Duration::from_secs(60);
    while load.acked_count() < stalled_at + 1000 {
        assert!(
            Instant::now() < deadline,
            "acks did not resume once space came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let load: LoadResult = load.stop().await;
    let seen = delivered(&s, load.acked.len()).await;
    assert!(
        load.acked.iter().all(|id| seen.contains_key(id)),
        "acknowledged events lost"
    );
    assert!(
        seen.values().all(|n| *n == 1),
        "an event was delivered twice"
    );
    let log = s.sidecar.log_text();
    assert!(!log.contains("panicked"), "{log}");
    assert!(!log.contains("unreadable"), "no chunk was damaged:\n{log}");
    println!("{full_message}: acks stalled at {stalled_at} events and resumed; {} acked, all delivered once", load.acked.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_holds_acks_until_delivery_frees_space() {
    let s = setup(true, Down::S3, &[]).await;
    fills_then_recovers(s, "the disk is full").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn total_limit_size_blocks_senders_until_delivery_frees_space() {
    // Inline chunks waiting for Kinesis count against the limit like any other.
    let s = setup(false, Down::Kinesis, &["--total-limit-size", "512KiB"]).await;
    fills_then_recovers(s, "buffer full (total_limit_size)").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_oldest_chunk_keeps_acking_and_accounts_for_every_drop() {
    let s = setup(
        false,
        Down::S3,
        &[
            "--total-limit-size",
            "256KiB",
            "--overflow-action",
            "drop_oldest_chunk",
        ],
    )
    .await;
    let load = Load::start(s.sidecar.port, 2, 20, 3);
    s.sidecar.expect_log("dropped the oldest chunk").await;
    let at_first_drop = load.acked_count();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        load.acked_count() > at_first_drop + 1000,
        "acks go on while chunks are dropped"
    );
    let load = load.stop().await;
    s.proxies.s3.set(Fault::None);

    // Every drop is logged with its event count; what was acked and not dropped arrives.
    let log = s.sidecar.log_text();
    let dropped: usize = log
        .lines()
        .filter(|l| l.contains("dropped the oldest chunk"))
        .map(|l| {
            l.split("events=")
                .nth(1)
                .and_then(|v| v.split_whitespace().next())
                .unwrap()
                .parse::<usize>()
                .unwrap()
        })
        .sum();
    assert!(log
        .lines()
        .any(|l| l.contains("ERROR") && l.contains("dropped the oldest chunk")));
    let chunks_dir = s.env.buffer_dir().join("chunks");
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::fs::read_dir(&chunks_dir).unwrap().count() > 0 {
        assert!(Instant::now() < deadline, "the buffer did not drain");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let seen = delivered(&s, load.acked.len() - dropped).await;
    assert!(seen.values().all(|n| *n == 1));
    // Acked events that did not arrive are exactly those in dropped chunks, less the few
    // dropped events whose request was still in flight when the load stopped (2 × 20).
    let lost = load
        .acked
        .iter()
        .filter(|id| !seen.contains_key(id))
        .count();
    assert!(
        lost <= dropped && dropped <= lost + 40,
        "lost {lost} acked events, dropped {dropped}"
    );
    println!("drop_oldest_chunk: {} acked, {dropped} events dropped (logged), {lost} acked events not delivered", load.acked.len());
}
