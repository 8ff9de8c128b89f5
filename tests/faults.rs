//! Backend faults: a proxy between the sidecar and the emulator makes S3 or Kinesis unreachable,
//! failing, throttling or slow, at start or mid-run, under steady load.
//!
//! Pass: every acknowledged event is delivered exactly once, no pointer is published before
//! Pass: every acknowledged event is delivered exactly once, no pointer is published before
//! its object is stored (checked by the proxies on every PutRecords; an inline record must
//! carry a body that passes every check), delivery resumes within one retry interval (plus
//! the SDK's own quick retries) of the fault clearing, and an outage with hundreds of chunks
//! retried takes a few lines of the log, not one per retry. The S3 faults run with every body
//! sent to S3; Kinesis throttling and one Kinesis outage run with inline bodies.

mod common;

use std::time::{Duration, Instant};

use common::load::{times_delivered, Load, LoadResult};
use common::proxy::{Fault, Ledger, Proxies, Service};
use common::*;

/// `--retry-max-interval` of these tests.
const MAX_INTERVAL: Duration = Duration::from_secs(2);
/// Time allowed beyond one retry interval (with its +12.5 % jitter) for delivery to resume:
/// the AWS SDK retries a failed call itself (up to 3 attempts) before the sidecar sees it.
const RESUME_SLACK: Duration = Duration::from_secs(4);

/// Fields drop in order: the sidecar first, so that its log can still be read on failure.
struct Faulty {
    sidecar: Sidecar,
    env: Emulated,
    proxies: Proxies,
    started: Instant,
}

/// Where small bodies go: the default (inline in their Kinesis record), or all to S3.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Bodies {
    Inline,
    S3,
}

async fn setup(s3_fault: Fault, kinesis_fault: Fault, bodies: Bodies) -> Faulty {
    setup_with(s3_fault, kinesis_fault, bodies, &[]).await
}

/// [`setup`] with `extra` arguments for the sidecar.
async fn setup_with(
    s3_fault: Fault,
    kinesis_fault: Fault,
    bodies: Bodies,
    extra: &[&str],
) -> Faulty {
    let env = Emulated::start("faults").await;
    let proxies = env.proxies().await;
    proxies.s3.set(s3_fault);
    proxies.kinesis.set(kinesis_fault);
    let max = format!("{}s", MAX_INTERVAL.as_secs());
    let mut args = vec![
        "--flush-interval",
        "300ms",
        "--timekey-wait",
        "0s",
        "--chunk-limit-size",
        "64KiB",
        "--retry-wait",
        "200ms",
        "--retry-max-interval",
        &max,
        "--inline-max-bytes",
        if bodies == Bodies::S3 { "0" } else { "24KiB" },
    ];
    args.extend_from_slice(extra);
    let started = Instant::now();
    let sidecar = env.sidecar_behind(&proxies, &args);
    Faulty {
        env,
        proxies,
        sidecar,
        started,
    }
}

/// Waits (up to a minute) until `load` has `n` acks.
async fn acked_at_least(load: &Load, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while load.acked_count() < n {
        assert!(
            Instant::now() < deadline,
            "only {} acks",
            load.acked_count()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits for the buffer to drain, then checks every acked event arrived exactly once and
/// that no pointer went out before its object.
async fn verify(f: &Faulty, load: &LoadResult) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !chunk_files(&f.env.buffer_dir()).is_empty() {
        assert!(Instant::now() < deadline, "the buffer did not drain");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let chunks = f.env.read_events(load.acked.len()).await;
    let seen = times_delivered(chunks.iter().flat_map(|c| &c.events));
    let missing = load
        .acked
        .iter()
        .filter(|id| !seen.contains_key(id))
        .count();
    assert_eq!(missing, 0, "acknowledged events lost");
    assert!(
        seen.values().all(|n| *n == 1),
        "an event was delivered twice"
    );
    assert_eq!(
        f.proxies.ledger.violations(),
        Vec::<String>::new(),
        "pointers published before their objects"
    );
    println!(
        "verified: {} events acked, {} delivered in {} chunks, 0 lost, 0 twice; {} faults injected; 0 pointers before their object",
        load.acked.len(),
        seen.len(),
        chunks.len(),
        f.proxies.ledger.injected()
    );
}

/// Waits until `service` is written to successfully after `since`; returns how long it took.
async fn resumed(ledger: &Ledger, service: Service, since: Instant) -> Duration {
    let deadline = since + Duration::from_secs(60);
    loop {
        if let Some(t) = ledger.first_success_after(service, since) {
            return t - since;
        }
        assert!(
            Instant::now() < deadline,
            "{service:?} delivery never resumed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the proxies have refused `n` more requests than `before`: attempts reached the
/// backend that is down, and failed.
async fn refused(ledger: &Ledger, before: u64, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while ledger.injected() < before + n {
        assert!(
            Instant::now() < deadline,
            "no attempt reached the failing backend"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn assert_quick(what: &str, took: Duration) {
    let bound = MAX_INTERVAL.mul_f64(1.125) + RESUME_SLACK;
    println!(
        "{what}: delivery resumed {:.2} s after recovery (bound {:.2} s)",
        took.as_secs_f64(),
        bound.as_secs_f64()
    );
    assert!(
        took <= bound,
        "{what}: resumed after {took:?}, more than {bound:?}"
    );
}

/// Sidecar arguments of the outage-log check: a chunk per request of the load (20 events), so
/// that hundreds of chunks wait for S3 within seconds (every one of them goes to S3: the
/// check runs with `Bodies::S3`).
const MANY_CHUNKS_FOR_S3: &[&str] = &["--chunk-limit-records", "20"];

/// Chunks waiting for S3 in the outage-log check.
const OUTAGE_CHUNKS: usize = 200;

/// Lines of the sidecar's log at WARN or ERROR (the human format: time, then the level).
fn warnings(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| matches!(l.split_whitespace().nth(1), Some("WARN" | "ERROR")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_down_at_start_then_back() {
    let f = setup_with(Fault::Down, Fault::None, Bodies::S3, MANY_CHUNKS_FOR_S3).await;
    let load = Load::start(f.sidecar.port, 2, 20, 3);
    f.sidecar
        .await_metrics("S3 uploads fail", |m| {
            metric_sum(m, "claimcheck_s3_errors_total") > 0.0
        })
        .await;
    let chunks_dir = f.env.buffer_dir().join("chunks");
    let chunk_files = || {
        std::fs::read_dir(&chunks_dir)
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter(|e| e.path().extension().is_some_and(|x| x == "chunk"))
                    .count()
            })
            .unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while chunk_files() < OUTAGE_CHUNKS {
        assert!(
            Instant::now() < deadline,
            "the buffer never held {OUTAGE_CHUNKS} chunks"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A bounded backlog: the same chunks are retried from here on.
    let load = load.stop().await;
    assert!(!load.acked.is_empty(), "acks keep coming with S3 down");

    // The log volume of the outage (the log is what is checked here): each chunk fails again
    // and again, and that is said at debug per retry, but only a few lines (the start, a
    // summary every 30 s) above it.
    let retries = r#"claimcheck_retries_total{stage="upload"}"#;
    f.sidecar
        .await_metrics("uploads are retried", |m| {
            metric_sum(m, retries) >= (2 * OUTAGE_CHUNKS) as f64
        })
        .await;
    let log = f.sidecar.log_text();
    let warned = warnings(&log);
    println!(
        "{} chunks, {} retries, {} lines at WARN or above:\n{}",
        chunk_files(),
        f.sidecar.metric(retries).await,
        warned.len(),
        warned.join("\n")
    );
    assert!(
        warned.len() < 20,
        "{} WARN or ERROR lines for one outage",
        warned.len()
    );

    assert!(
        f.proxies
            .ledger
            .first_success_after(Service::Kinesis, f.started)
            .is_none(),
        "nothing published without objects"
    );
    let back = Instant::now();
    f.proxies.s3.set(Fault::None);
    assert_quick(
        "S3 down at start",
        resumed(&f.proxies.ledger, Service::S3, back).await,
    );
    f.sidecar.expect_log("S3 uploads recovered").await;
    verify(&f, &load).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kinesis_down_at_start_then_back() {
    let f = setup(Fault::None, Fault::Down, Bodies::S3).await;
    let load = Load::start(f.sidecar.port, 2, 20, 3);
    refused(&f.proxies.ledger, 0, 2).await;
    // Uploads go on while Kinesis is down.
    resumed(&f.proxies.ledger, Service::S3, f.started).await;
    let back = Instant::now();
    f.proxies.kinesis.set(Fault::None);
    assert_quick(
        "Kinesis down at start",
        resumed(&f.proxies.ledger, Service::Kinesis, back).await,
    );
    let load = load.stop().await;
    verify(&f, &load).await;
}

/// Inline chunks wait for Kinesis with their bodies in their state files, and are sent whole
/// once it is back; S3 is never called.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kinesis_down_at_start_then_back_with_inline_bodies() {
    let f = setup(Fault::None, Fault::Down, Bodies::Inline).await;
    let load = Load::start(f.sidecar.port, 2, 20, 3);
    refused(&f.proxies.ledger, 0, 2).await;
    assert!(load.acked_count() > 0, "acks keep coming with Kinesis down");
    let back = Instant::now();
    f.proxies.kinesis.set(Fault::None);
    assert_quick(
        "Kinesis down at start (inline)",
        resumed(&f.proxies.ledger, Service::Kinesis, back).await,
    );
    let load = load.stop().await;
    verify(&f, &load).await;
    assert_eq!(
        f.proxies.ledger.first_success_after(Service::S3, f.started),
        None,
        "inline chunks write no object"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_backend_goes_down_mid_run_then_back() {
    let f = setup(Fault::None, Fault::None, Bodies::S3).await;
    let load = Load::start(f.sidecar.port, 2, 20, 3);
    resumed(&f.proxies.ledger, Service::Kinesis, f.started).await;

    let before = f.proxies.ledger.injected();
    f.proxies.s3.set(Fault::Down);
    refused(&f.proxies.ledger, before, 2).await;
    let back = Instant::now();
    f.proxies.s3.set(Fault::None);
    assert_quick(
        "S3 down mid-run",
        resumed(&f.proxies.ledger, Service::S3, back).await,
    );

    let before = f.proxies.ledger.injected();
    f.proxies.kinesis.set(Fault::Down);
    refused(&f.proxies.ledger, before, 2).await;
    let back = Instant::now();
    f.proxies.kinesis.set(Fault::None);
    assert_quick(
        "Kinesis down mid-run",
        resumed(&f.proxies.ledger, Service::Kinesis, back).await,
    );

    let load = load.stop().await;
    verify(&f, &load).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_of_all_requests_fail_with_500_and_503() {
    // S3 at random: uploads run side by side, and there are many. Kinesis in streaks: the
    // publisher batches whatever is ready, so a run makes few PutRecords calls, and at random
    // few of them would fail past the SDK's 3 attempts.
    let f = setup(
        Fault::Errors {
            status: 500,
            rate: 0.5,
        },
        Fault::Streaks {
            status: 503,
            streak: 4,
            every: 8,
            record_rate: 0.0,
        },
        Bodies::S3,
    )
    .await;
    let load = Load::start(f.sidecar.port, 2, 20, 3);
    // A fixed amount of data and of faults, whatever the machine's speed.
    f.sidecar
        .await_metrics("faults hit both services", |m| {
            metric_sum(m, "claimcheck_s3_errors_total") >= 5.0
                && metric_sum(m, "claimcheck_kinesis_errors_total") >= 5.0
        })
        .await;
    acked_at_least(&load, 2000).await;
    let load = load.stop().await;
    f.proxies.s3.set(Fault::None);
    f.proxies.kinesis.set(Fault::None);
    assert!(f.proxies.ledger.injected() >= 10);
    verify(&f, &load).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kinesis_throttling_and_partial_put_records_failures() {
    let f = setup(
        Fault::None,
        Fault::Streaks {
            status: 400,
            streak: 4,
            every: 10,
            record_rate: 0.5,
        },
        Bodies::Inline,
    )
    .await;
    let load = Load::start(f.sidecar.port, 2, 20, 3);
    // Whole requests throttled (past the SDK's own retries), and single records refused in
    // accepted requests (retried alone).
    let throttled = r#"claimcheck_kinesis_errors_total{operation="PutRecords",code="ProvisionedThroughputExceededException"}"#;
    let refused = r#"claimcheck_put_records_failed_entries_total{code="ProvisionedThroughputExceededException"}"#;
    f.sidecar
        .await_metrics("throttling and partial failures were seen", |m| {
            metric_sum(m, throttled) >= 1.0 && metric_sum(m, refused) >= 1.0
        })
        .await;
    acked_at_least(&load, 2000).await;
    let load = load.stop().await;
    f.proxies.kinesis.set(Fault::None);
    verify(&f, &load).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_backends_delay_delivery_but_not_acks() {
    let slow = Duration::from_secs(3);
    let f = setup(Fault::Slow(slow), Fault::Slow(slow), Bodies::S3).await;
    let load = Load::start(f.sidecar.port, 2, 20, 3);
    while load.acked_count() == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // No S3 request can have been answered yet (each takes 3 s): acks do not wait for S3.
    assert!(
        f.proxies
            .ledger
            .first_success_after(Service::S3, f.started)
            .is_none(),
        "acks came before any upload finished"
    );
    // A fixed amount of data, so that the drain takes the same time on any machine.
    acked_at_least(&load, 2000).await;
    let load = load.stop().await;
    verify(&f, &load).await;
}
