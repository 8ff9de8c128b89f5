//! Overflow: the buffer reaches `total_limit_size` (while Kinesis is down and small chunks wait
//! inline), or the disk is really full (a 4 MiB tmpfs mounted in a private mount namespace,
//! while S3 is down). The sidecar must stop acking (senders wait, TCP pushes back), never
//! crash, never corrupt a chunk, and carry on by itself when space returns; with
//! `drop_oldest_chunk` it keeps acking and counts every chunk and event it drops.
//!
//! The full disk needs a real process in its own mount namespace, behind the emulator; the
//! limits run in-process on the in-memory backends.

mod common;

use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

use common::in_process::{id_counts, InProcess};
use common::load::{times_delivered, Load, LoadResult};
use common::proxy::Fault;
use common::*;

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

/// Waits (up to a minute) until `load` has `n` acks.
async fn acked_at_least(load: &Load, n: usize, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while load.acked_count() < n {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Senders of the load: each has one request in flight at a time.
const CONNECTIONS: usize = 2;

/// Once the buffer said it is full: waits until it holds a request of each sender
/// (`claimcheck_buffer_requests_waiting`), then checks that no ack comes for a second, and
/// that the requests are still held. Returns the events acked by then.
///
/// A sender sends its next request only after it has read and counted the last ack, so with
/// every sender's request held, no ack is on its way and the count is final until the buffer
/// has room again.
async fn acks_stall(admin: u16, load: &Load) -> usize {
    let held =
        |m: &HashMap<String, f64>| m["claimcheck_buffer_requests_waiting"] == CONNECTIONS as f64;
    await_metrics_at(
        admin,
        "the buffer holds every sender's request",
        held,
        String::new,
    )
    .await;
    let stalled_at = load.acked_count();
    assert!(stalled_at > 0);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        load.acked_count(),
        stalled_at,
        "no acks while the buffer is full"
    );
    assert!(
        held(&samples(&scrape(admin, "/metrics").await.1)),
        "the requests are still held"
    );
    stalled_at
}

/// Every acknowledged event delivered, each once.
fn all_acked_once(load: &LoadResult, seen: &HashMap<u64, usize>) {
    assert!(
        load.acked.iter().all(|id| seen.contains_key(id)),
        "acknowledged events lost"
    );
    assert!(
        seen.values().all(|n| *n == 1),
        "an event was delivered twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_holds_acks_until_delivery_frees_space() {
    let env = Emulated::start("overflow").await;
    let proxies = env.proxies().await;
    proxies.s3.set(Fault::Down);
    let mut args: Vec<&str> = ARGS.to_vec();
    args.extend(["--inline-max-bytes", "0"]);
    let mut aws = aws_env(env.moto.port);
    aws.extend(proxies.env());
    let buffer = env.buffer_dir();
    std::fs::create_dir_all(&buffer).unwrap();
    // A user and mount namespace of its own: no root needed, nothing left mounted after.
    let mut cmd = Command::new("unshare");
    cmd.args(["--user", "--map-root-user", "--mount", "--", "sh", "-c"])
        .arg(r#"mount -t tmpfs -o size=4m tmpfs "$1" && shift && exec "$@""#)
        .arg("sh")
        .arg(&buffer)
        .arg(env!("CARGO_BIN_EXE_claimcheck"))
        .arg("serve");
    let mut sidecar = Sidecar::spawn(cmd, 0, &buffer, &aws, &env.bucket, &env.stream, &args);

    let load = Load::start(sidecar.port, CONNECTIONS, 20, 3);
    sidecar
        .await_metrics("the disk is full", |m| m["claimcheck_ready"] == 0.0)
        .await;
    assert_eq!(
        scrape(sidecar.admin, "/readyz").await,
        (503, "not ready: the disk is full\n".to_string())
    );
    let stalled_at = acks_stall(sidecar.admin, &load).await;

    proxies.s3.set(Fault::None);
    acked_at_least(
        &load,
        stalled_at + 1000,
        "acks resume once space comes back",
    )
    .await;
    let load = load.stop().await;
    let chunks = env.read_events(load.acked.len()).await;
    all_acked_once(
        &load,
        &times_delivered(chunks.iter().flat_map(|c| &c.events)),
    );
    assert!(sidecar.running(), "the sidecar stays up");
    assert_eq!(
        sidecar.metric("claimcheck_files_quarantined_total").await,
        0.0,
        "no chunk was damaged"
    );
    println!(
        "full disk: acks stalled at {stalled_at} events and resumed; {} acked, all delivered once",
        load.acked.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn total_limit_size_blocks_senders_until_delivery_frees_space() {
    // Inline chunks waiting for Kinesis count against the limit like any other.
    let dir = tempfile::tempdir().unwrap();
    let mut args = ARGS.to_vec();
    args.extend(["--total-limit-size", "512KiB"]);
    let sidecar = InProcess::start(&dir, &args).await;
    sidecar.sink.set_down(true);

    let load = Load::start(sidecar.port(), CONNECTIONS, 20, 3);
    sidecar
        .await_metrics("the buffer is full", |m| m["claimcheck_ready"] == 0.0)
        .await;
    assert_eq!(
        scrape(sidecar.admin, "/readyz").await,
        (
            503,
            "not ready: the buffer is at total_limit_size\n".to_string()
        )
    );
    // Full because the chunks reached the limit (the round that crossed it was taken whole).
    let bytes = sidecar.metric("claimcheck_buffer_bytes").await;
    assert!(bytes >= (512 * 1024) as f64, "{bytes}");
    let stalled_at = acks_stall(sidecar.admin, &load).await;

    sidecar.sink.set_down(false);
    acked_at_least(
        &load,
        stalled_at + 1000,
        "acks resume once space comes back",
    )
    .await;
    let load = load.stop().await;
    assert!(sidecar.running());
    assert_eq!(
        sidecar.metric("claimcheck_files_quarantined_total").await,
        0.0,
        "no chunk was damaged"
    );
    let (store, sink) = sidecar.shut_down().await;
    all_acked_once(
        &load,
        &id_counts(&common::in_process::delivered(&store, &sink)),
    );
    println!(
        "total_limit_size: acks stalled at {stalled_at} events and resumed; {} acked, all delivered once",
        load.acked.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_oldest_chunk_keeps_acking_and_accounts_for_every_drop() {
    let dir = tempfile::tempdir().unwrap();
    let mut args = ARGS.to_vec();
    args.extend([
        "--inline-max-bytes",
        "0",
        "--total-limit-size",
        "256KiB",
        "--overflow-action",
        "drop_oldest_chunk",
    ]);
    let sidecar = InProcess::start(&dir, &args).await;
    sidecar.store.set_down(true);

    let load = Load::start(sidecar.port(), 2, 20, 3);
    sidecar
        .await_metrics("a chunk is dropped", |m| {
            m["claimcheck_chunks_dropped_total"] > 0.0
        })
        .await;
    let at_first_drop = load.acked_count();
    acked_at_least(
        &load,
        at_first_drop + 1000,
        "acks go on while chunks are dropped",
    )
    .await;
    let load = load.stop().await;
    // Every drop is counted, with its events; what was acked and not dropped arrives. The
    // counter is read once the buffer is empty: a chunk that was mid-attempt when the load
    // stopped can still be dropped after that.
    sidecar.store.set_down(false);
    sidecar
        .await_metrics("every chunk is delivered or dropped", |m| {
            m["claimcheck_buffer_bytes"] == 0.0
        })
        .await;
    let dropped = sidecar.metric("claimcheck_events_dropped_total").await as usize;
    assert!(dropped > 0);
    let (store, sink) = sidecar.shut_down().await;
    let seen = id_counts(&common::in_process::delivered(&store, &sink));
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
    println!("drop_oldest_chunk: {} acked, {dropped} events dropped (counted), {lost} acked events not delivered", load.acked.len());
}

/// A sidecar restarted while its disk is full (an open chunk left by the last run, the 1 MiB
/// reserve file still there, the rest of a 4 MiB tmpfs taken by another file): it starts,
/// seals the chunk in the room the reserve leaves, and delivers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_restarted_on_a_full_disk_starts_and_delivers_what_it_held() {
    let env = Emulated::start("fullstart").await;
    // What the last run left, staged outside the tmpfs and copied in before the start.
    let staged = env.dir.path().join("staged");
    let chunks = staged.join("chunks");
    std::fs::create_dir_all(&chunks).unwrap();
    open_chunk(&chunks, "app.full", 0, 1, 20);
    std::fs::write(staged.join("RESERVE"), vec![0u8; 1 << 20]).unwrap();

    let buffer = env.buffer_dir();
    std::fs::create_dir_all(&buffer).unwrap();
    let mut cmd = Command::new("unshare");
    cmd.args(["--user", "--map-root-user", "--mount", "--", "sh", "-c"])
        .arg(concat!(
            r#"mount -t tmpfs -o size=4m tmpfs "$1" && cp -a "$2"/. "$1"/ && "#,
            r#"{ dd if=/dev/zero of="$1/filler" bs=64k 2>/dev/null; true; } && "#,
            r#"shift 2 && exec "$@""#
        ))
        .arg("sh")
        .arg(&buffer)
        .arg(&staged)
        .arg(env!("CARGO_BIN_EXE_claimcheck"))
        .arg("serve");
    let aws = aws_env(env.moto.port);
    let mut sidecar = Sidecar::spawn(cmd, 0, &buffer, &aws, &env.bucket, &env.stream, &ARGS);
    let chunks = env.read_events(20).await;
    let seen = times_delivered(chunks.iter().flat_map(|c| &c.events));
    let mut ids: Vec<u64> = seen.keys().copied().collect();
    ids.sort_unstable();
    assert_eq!(ids, (0..20).collect::<Vec<u64>>());
    assert!(seen.values().all(|n| *n == 1), "each event once");
    assert!(sidecar.running(), "the sidecar stays up");
}
