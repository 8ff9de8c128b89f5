//! Operating the sidecar: metrics across a send/deliver cycle and a backend outage, readiness,
//! the buffer API, `claimcheck health`, and the Grafana dashboard against the real `/metrics`.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::process::Command;
use std::time::{Duration, Instant};

use common::load::Load;
use common::proxy::Fault;
use common::*;

async fn metrics(port: u16) -> HashMap<String, f64> {
    samples(&scrape(port, "/metrics").await.1)
}

fn value(m: &HashMap<String, f64>, series: &str) -> f64 {
    m.get(series).copied().unwrap_or(0.0)
}

async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_a_send_and_deliver_cycle() {
    let env = Emulated::start("metrics").await;
    let sidecar = env.sidecar(&["--flush-interval", "1s", "--timekey-wait", "0s"]);
    let admin = sidecar.admin;
    let before = metrics(admin).await;
    assert_eq!(value(&before, "claimcheck_events_received_total"), 0.0);
    assert_eq!(value(&before, "claimcheck_ready"), 1.0);

    let base = minute_of(now_secs()) - 600;
    let sent: Vec<TestEvent> = (0..120)
        .map(|i| TestEvent {
            tag: format!("m.t{}", i % 2),
            secs: base + 1,
            nanos: Some(i),
            record: serde_json::json!({"i": i}),
        })
        .collect();
    assert_eq!(
        node_send(sidecar.port, "PackedForward", &sent).len(),
        sent.len()
    );
    env.read_events(sent.len()).await;
    eventually("the buffer is empty", async || {
        value(&metrics(admin).await, "claimcheck_buffer_bytes") == 0.0
    })
    .await;

    let after = metrics(admin).await;
    assert_eq!(value(&after, "claimcheck_events_received_total"), 120.0);
    assert_eq!(value(&after, "claimcheck_events_published_total"), 120.0);
    let requests = value(&after, "claimcheck_requests_total");
    assert!(requests >= 1.0);
    assert_eq!(
        value(&after, "claimcheck_acks_sent_total"),
        requests,
        "every request with a token is acked"
    );
    assert_eq!(
        value(&after, "claimcheck_ack_duration_seconds_count"),
        requests
    );
    assert!(value(&after, "claimcheck_received_bytes_total") > 120.0 * 10.0);
    assert!(
        value(&after, "claimcheck_chunks_published_total") >= 2.0,
        "two tags, two chunks at least"
    );
    // The delivered chunks' data files are kept for the next chunks to overwrite, and counted.
    let spares: u64 = spare_files(&env.buffer_dir())
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    assert!(spares > 0, "no delivered chunk's data file kept");
    assert_eq!(
        value(&after, "claimcheck_buffer_spare_bytes"),
        spares as f64
    );
    // Chunks this small ride inline: no S3 object, and the metrics say where they went.
    let published = value(&after, "claimcheck_chunks_published_total");
    assert_eq!(
        value(&after, r#"claimcheck_delivered_chunks_total{via="inline"}"#),
        published
    );
    assert_eq!(
        value(&after, r#"claimcheck_delivered_chunks_total{via="s3"}"#),
        0.0
    );
    assert_eq!(value(&after, "claimcheck_chunks_uploaded_total"), 0.0);
    assert!(value(&after, r#"claimcheck_delivered_bytes_total{via="inline"}"#) > 0.0);
    assert!(
        value(&after, "claimcheck_kinesis_records_bytes_total")
            > value(&after, r#"claimcheck_delivered_bytes_total{via="inline"}"#),
        "a record holds its pointer's JSON and the body"
    );
    assert_eq!(
        value(
            &after,
            r#"claimcheck_s3_request_duration_seconds_count{operation="PutObject"}"#
        ),
        0.0
    );
    assert!(
        value(
            &after,
            r#"claimcheck_kinesis_request_duration_seconds_count{operation="PutRecords"}"#
        ) >= 1.0
    );
    assert!(value(&after, r#"claimcheck_chunks_sealed_total{reason="time"}"#) >= 2.0);
    // `sync always`: each round of appends is fsynced before its acks, each seal batch too.
    assert!(
        value(
            &after,
            r#"claimcheck_buffer_fsync_duration_seconds_count{kind="round"}"#
        ) >= 1.0
    );
    assert!(
        value(
            &after,
            r#"claimcheck_buffer_fsync_duration_seconds_count{kind="seal"}"#
        ) >= 1.0
    );
    assert_eq!(
        value(
            &after,
            r#"claimcheck_buffer_fsync_duration_seconds_count{kind="interval"}"#
        ),
        0.0
    );
    assert_eq!(
        value(&after, "claimcheck_oldest_unpublished_chunk_age_seconds"),
        0.0
    );
    assert_eq!(
        value(&after, r#"claimcheck_buffer_chunks{phase="sealed"}"#),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_an_s3_outage_the_sidecar_stays_ready_and_the_metrics_say_why_delivery_lags() {
    let env = Emulated::start("outage").await;
    let proxies = env.proxies().await;
    let s3 = &proxies.s3;
    s3.set(Fault::Down);
    let args = [
        "--flush-interval",
        "300ms",
        "--timekey-wait",
        "0s",
        "--retry-wait",
        "200ms",
        "--retry-max-interval",
        "1s",
        "--inline-max-bytes",
        "0",
    ];
    let sidecar = env.sidecar_behind(&proxies, &args);
    let admin = sidecar.admin;
    let load = Load::start(sidecar.port, 1, 20, 2);
    eventually("uploads fail and are retried", async || {
        let m = metrics(admin).await;
        value(&m, r#"claimcheck_retries_total{stage="upload"}"#) >= 2.0
    })
    .await;
    let m = metrics(admin).await;
    let errors: f64 = m
        .iter()
        .filter(|(k, _)| k.starts_with(r#"claimcheck_s3_errors_total{operation="PutObject""#))
        .map(|(_, v)| v)
        .sum();
    assert!(errors >= 1.0, "S3 errors are counted by operation and code");
    assert!(value(&m, "claimcheck_oldest_unpublished_chunk_age_seconds") > 0.0);
    assert!(
        value(&m, r#"claimcheck_buffer_chunks{phase="sealed"}"#)
            + value(&m, r#"claimcheck_buffer_chunks{phase="uploading"}"#)
            >= 1.0
    );
    assert_eq!(
        value(&m, "claimcheck_ready"),
        1.0,
        "an AWS outage does not make the sidecar unready"
    );
    assert_eq!(scrape(admin, "/readyz").await, (200, "ready\n".to_string()));

    // The buffer API shows the failing chunks, why, and when they are tried again (a chunk
    // being tried right now has no next retry: wait for one between its attempts).
    let mut failing = serde_json::Value::Null;
    eventually(
        "the buffer API shows a chunk waiting for its retry",
        async || {
            let (_, body) = scrape(admin, "/api/v1/buffer").await;
            let view: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert!(view["accepting"].as_bool().unwrap());
            let waiting =
                view["chunks"].as_array().unwrap().iter().find(|c| {
                    c["attempts"].as_u64().unwrap_or(0) > 0 && c["next_retry_ms"].is_i64()
                });
            failing = waiting.cloned().unwrap_or_default();
            waiting.is_some()
        },
    )
    .await;
    // At most --retry-max-interval (plus jitter) ahead; behind when it waits for a worker.
    assert!(
        failing["next_retry_in_seconds"].as_f64().unwrap() <= 1.2,
        "{failing}"
    );
    assert!(
        failing["last_error"]
            .as_str()
            .unwrap()
            .contains("PutObject"),
        "{failing}"
    );
    assert!(
        failing["age_seconds"].as_f64().unwrap() > 0.0
            && failing["tag"].as_str().unwrap().starts_with("load.t")
    );

    s3.set(Fault::None);
    let load = load.stop().await;
    env.read_events(load.acked.len()).await;
    eventually("the backlog is delivered", async || {
        value(
            &metrics(admin).await,
            "claimcheck_oldest_unpublished_chunk_age_seconds",
        ) == 0.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_false_while_the_buffer_is_full_and_health_says_so() {
    let env = Emulated::start("notready").await;
    let proxies = env.proxies().await;
    let s3 = &proxies.s3;
    s3.set(Fault::Down);
    let args = [
        "--total-limit-size",
        "128KiB",
        "--flush-interval",
        "300ms",
        "--retry-max-interval",
        "1s",
        "--inline-max-bytes",
        "0",
    ];
    let sidecar = env.sidecar_behind(&proxies, &args);
    let admin = sidecar.admin;
    let health = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_claimcheck"))
            .arg("health")
            .args(extra)
            .env("CLAIMCHECK_METRICS_LISTEN", format!("127.0.0.1:{admin}"))
            .output()
            .unwrap()
    };
    assert!(health(&["--ready"]).status.success());

    let load = Load::start(sidecar.port, 1, 20, 2);
    eventually("/readyz turns 503", async || {
        scrape(admin, "/readyz").await.0 == 503
    })
    .await;
    assert_eq!(
        scrape(admin, "/readyz").await.1,
        "not ready: the buffer is at total_limit_size\n"
    );
    assert_eq!(value(&metrics(admin).await, "claimcheck_ready"), 0.0);
    let ready = health(&["--ready"]);
    assert!(
        !ready.status.success(),
        "claimcheck health --ready fails while the buffer is full"
    );
    assert!(
        health(&[]).status.success(),
        "the process is still alive (/healthz)"
    );

    s3.set(Fault::None);
    eventually("/readyz is 200 again", async || {
        scrape(admin, "/readyz").await.0 == 200
    })
    .await;
    load.stop().await;
    drop(sidecar);
    let refused = Command::new(env!("CARGO_BIN_EXE_claimcheck"))
        .args(["health", "--metrics-listen", "127.0.0.1:1"])
        .output()
        .unwrap();
    assert!(
        !refused.status.success(),
        "health fails when nothing answers"
    );
}

/// Metric names a PromQL expression reads.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = expr;
    while let Some(at) = rest.find("claimcheck_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        out.insert(name);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_queries_is_exposed() {
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo_root().join("docs/grafana-dashboard.json")).unwrap(),
    )
    .unwrap();
    let queried: BTreeSet<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().iter())
        .flat_map(|t| metric_names(t["expr"].as_str().unwrap()))
        .collect();
    assert!(queried.len() >= 20, "{queried:?}");

    // A day in the life: traffic, S3 errors, throttled PutRecords, an invalid event, garbage.
    let env = Emulated::start("dashboard").await;
    let proxies = env.proxies().await;
    let (s3, kinesis) = (&proxies.s3, &proxies.kinesis);
    s3.set(Fault::Errors {
        status: 500,
        rate: 0.5,
    });
    kinesis.set(Fault::Streaks {
        status: 400,
        streak: 4,
        every: 8,
        record_rate: 0.5,
    });
    let args = [
        "--flush-interval",
        "300ms",
        "--timekey-wait",
        "0s",
        "--retry-wait",
        "100ms",
        "--retry-max-interval",
        "500ms",
        "--inline-max-bytes",
        "0",
    ];
    let sidecar = env.sidecar_behind(&proxies, &args);
    let admin = sidecar.admin;
    let load = Load::start(sidecar.port, 1, 20, 2);
    let bad = TestEvent {
        tag: "bad".into(),
        secs: now_secs(),
        nanos: None,
        record: serde_json::json!("not a map"),
    };
    python_send(sidecar.port, &[bad]);
    let mut garbage = std::net::TcpStream::connect(("127.0.0.1", sidecar.port)).unwrap();
    std::io::Write::write_all(&mut garbage, &[0xc1]).unwrap();
    eventually("errors of every kind were seen", async || {
        let text = scrape(admin, "/metrics").await.1;
        [
            "claimcheck_s3_errors_total{",
            "claimcheck_kinesis_errors_total{",
            "claimcheck_put_records_failed_entries_total{",
            "claimcheck_events_skipped_total{",
        ]
        .iter()
        .all(|m| text.contains(m))
    })
    .await;
    load.stop().await;
    let (_, text) = scrape(admin, "/metrics").await;
    // Families are declared (# TYPE) from the start, even before their first sample.
    let families: BTreeSet<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect();
    for name in &queried {
        let family = ["_total", "_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        assert!(
            families.contains(family) || families.contains(name.as_str()),
            "{name} is not in /metrics ({families:?})"
        );
    }
}
