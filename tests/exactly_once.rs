//! Exactly once across a crash at the worst moment: the sidecar aborts after the fsync that
//! made a request durable and before its ack (`CLAIMCHECK_FAULT=abort-after-sync:1`). The
//! sender never saw the ack, so it resends the request with the same token to the restarted
//! sidecar, which must acknowledge it without storing it again: every event is delivered
//! once, counted per event. The same resend after the chunk was delivered and deleted, and
//! the sidecar restarted again, is recognised through the token journal.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

use common::wire::{self, connect, expect_ack};
use common::*;

const TIMEKEY: i64 = 60;

/// A request of `n` events whose times span two timekeys (so its events go to two chunks).
fn request(source: &str, base: i64, n: usize, token: &str) -> (Vec<u8>, Vec<TestEvent>) {
    let entries = wire::entries(source, base, n, false);
    let req = wire::fluentd_request("exactly.once", &entries, n, "text", token);
    (req, wire::expected("exactly.once", source, base, n))
}

/// Waits until the buffer holds no chunk: everything delivered and deleted.
async fn drained(env: &Emulated) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !chunk_files(&env.buffer_dir()).is_empty() {
        assert!(Instant::now() < deadline, "the buffer did not drain");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn resend_after_abort_between_fsync_and_ack(sync: &str) {
    let env = Emulated::start("exactly-once").await;
    let args = [
        "--sync",
        sync,
        "--timekey",
        "60s",
        "--timekey-wait",
        "0s",
        "--flush-interval",
        "300ms",
        "--metrics-listen",
        "127.0.0.1:0",
    ];
    let mut sidecar = env.sidecar_env(0, &[("CLAIMCHECK_FAULT", "abort-after-sync:1")], &args);
    // Two timekeys ago and one ago: the events go to two chunks, both sealed at once.
    let base = (now_secs() / TIMEKEY - 2) * TIMEKEY + TIMEKEY - 10;
    let token = "p8n9gmxTQVC8/nh2wlKKeQ==\n";
    let (req, mut expected) = request("resent", base, 40, token);

    let mut conn = connect(sidecar.port);
    std::io::Write::write_all(&mut conn, &req).unwrap();
    assert!(
        wire::closed_silently(&mut conn),
        "no ack may come before the crash"
    );
    let status = sidecar
        .wait_exit(Duration::from_secs(30))
        .expect("the fault point aborts the process");
    assert_eq!(
        status.signal(),
        Some(SIGABRT),
        "killed at the fault point (after the fsync, before the ack): {status}"
    );

    // The sender resends the unacknowledged request, same token, to the restarted sidecar.
    let sidecar = env.sidecar_at(0, None, &args);
    let mut conn = connect(sidecar.port);
    std::io::Write::write_all(&mut conn, &req).unwrap();
    expect_ack(&mut conn, token.as_bytes());
    // And something new after it, on the same connection.
    let (next, more) = request("new", base + 30, 5, "another-token\n");
    std::io::Write::write_all(&mut conn, &next).unwrap();
    expect_ack(&mut conn, b"another-token\n");
    expected.extend(more);
    assert_eq!(
        sidecar.metric("claimcheck_duplicate_requests_total").await,
        1.0,
        "the resend was recognised as stored"
    );
    assert_eq!(
        sidecar.metric("claimcheck_events_received_total").await,
        5.0,
        "only the new request's events were stored"
    );
    let chunks = env.read_events(expected.len()).await;
    assert_exactly_once(&chunks, &expected);

    // Once delivered and deleted, a resend is still recognised after a restart: the token
    // journal outlives the chunk for the window.
    drained(&env).await;
    drop(conn);
    let mut sidecar = sidecar;
    assert!(sidecar.terminate(Duration::from_secs(30)).success());
    let sidecar = env.sidecar_at(0, None, &args);
    let mut conn = connect(sidecar.port);
    std::io::Write::write_all(&mut conn, &req).unwrap();
    expect_ack(&mut conn, token.as_bytes());
    assert_eq!(
        sidecar.metric("claimcheck_duplicate_requests_total").await,
        1.0
    );
    assert_eq!(
        sidecar.metric("claimcheck_events_received_total").await,
        0.0
    );
    let moment = if sync == "always" { "fsync" } else { "write" };
    println!(
        "sync {sync}: aborted between {moment} and ack, resent twice (after the restart, and \
         after delivery and another restart): {} events, each delivered once in {} chunks",
        expected.len(),
        chunks.len()
    );
}

/// The signal of `std::process::abort`.
const SIGABRT: i32 = 6;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resend_after_a_crash_between_fsync_and_ack_is_not_stored_again_sync_always() {
    resend_after_abort_between_fsync_and_ack("always").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resend_after_a_crash_between_write_and_ack_is_not_stored_again_sync_interval() {
    resend_after_abort_between_fsync_and_ack("interval").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resend_after_a_crash_between_write_and_ack_is_not_stored_again_sync_none() {
    resend_after_abort_between_fsync_and_ack("none").await;
}
