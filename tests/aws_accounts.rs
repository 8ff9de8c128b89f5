//! AWS accounts as companies run them, against the emulator: objects written with encryption,
//! a KMS key, a Bucket Key, a storage class, an ACL, tags and metadata (read back with
//! HeadObject and GetObjectTagging, by PutObject and by multipart upload alike); roles assumed
//! per destination with their external ids and session name (read back from the emulator's
//! STS), S3 and Kinesis in different regions; the start-up check; and errors that need an
//! operator, each explained once with the setting that fixes it while delivery retries.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use aws_sdk_s3::types::{BucketLocationConstraint, CreateBucketConfiguration};
use common::load::{times_delivered, Load};
use common::proxy::Fault;
use common::*;
use serde_json::{json, Value};

/// Events for `tag`: `n` of them, each with a `pad`-byte field.
fn events(tag: &str, n: u32, pad: usize) -> Vec<TestEvent> {
    let base = minute_of(now_secs()) - 600;
    (0..n)
        .map(|i| TestEvent {
            tag: tag.into(),
            secs: base + 1,
            nanos: Some(i),
            record: json!({"seq": i, "pad": "x".repeat(pad)}),
        })
        .collect()
}

/// A KMS key created in the emulator (with Python's boto3, which the suite installs).
fn kms_key(port: u16) -> String {
    let python = repo_root().join(".venv/bin/python");
    assert!(
        python.exists(),
        "{} missing: run scripts/test",
        python.display()
    );
    let out = Command::new(python)
        .args(["-c", "import boto3,sys; print(boto3.client('kms', endpoint_url=sys.argv[1], region_name='us-east-1', aws_access_key_id='test', aws_secret_access_key='test').create_key()['KeyMetadata']['Arn'])"])
        .arg(format!("http://127.0.0.1:{port}"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_carry_encryption_storage_class_acl_tags_and_metadata() {
    let env = Emulated::start("objects").await;
    let key = kms_key(env.moto.port);
    // Through a proxy that notes what each object write asked for.
    let proxies = env.proxies().await;
    let sidecar = env.sidecar_behind(
        &proxies,
        &[
            "--inline-max-bytes",
            "0",
            "--compression",
            "none",
            "--s3-multipart-threshold",
            "6MiB",
            "--flush-interval",
            "1s",
            "--timekey-wait",
            "0s",
            "--s3-sse",
            "aws:kms",
            "--s3-sse-kms-key-id",
            &key,
            "--s3-bucket-key",
            "--s3-storage-class",
            "STANDARD_IA",
            "--s3-acl",
            "bucket-owner-full-control",
            "--s3-object-tags",
            "team=sre",
            "--s3-object-tags",
            "source=${tag[1]}",
            "--s3-metadata",
            "env=test",
        ],
    );
    // One chunk of 7 MiB (multipart upload) and one of a few events (PutObject).
    let mut sent = events("app.big", 14, 512 * 1024);
    sent.extend(events("app.small", 5, 10));
    assert_eq!(
        node_send(sidecar.port, "PackedForward", &sent).len(),
        sent.len()
    );
    let chunks = env.read_events(sent.len()).await;
    assert_exactly_once(&chunks, &sent);
    assert_eq!(chunks.len(), 2);
    assert!(
        chunks.iter().any(|c| c.pointer.stored_bytes > 6 << 20),
        "one went by multipart"
    );
    for chunk in &chunks {
        let p = &chunk.pointer;
        let head = env
            .aws
            .s3
            .head_object()
            .bucket(&p.bucket)
            .key(&p.key)
            .send()
            .await
            .unwrap();
        assert_eq!(
            head.server_side_encryption().map(|s| s.as_str()),
            Some("aws:kms"),
            "{}",
            p.key
        );
        assert!(
            head.ssekms_key_id()
                .is_some_and(|k| key.ends_with(k) || k == key),
            "{:?}",
            head.ssekms_key_id()
        );
        assert_eq!(
            head.storage_class().map(|s| s.as_str()),
            Some("STANDARD_IA")
        );
        let metadata = head.metadata().unwrap();
        assert_eq!(metadata.get("env").map(String::as_str), Some("test"));
        assert_eq!(metadata.get("claimcheck-chunk-id"), Some(&p.chunk_id));
        let tagging = env
            .aws
            .s3
            .get_object_tagging()
            .bucket(&p.bucket)
            .key(&p.key)
            .send()
            .await
            .unwrap();
        let mut tags: Vec<(&str, &str)> = tagging
            .tag_set()
            .iter()
            .map(|t| (t.key(), t.value()))
            .collect();
        tags.sort();
        let source = p.tag.split('.').nth(1).unwrap();
        assert_eq!(tags, vec![("source", source), ("team", "sre")]);
        let acl = env
            .aws
            .s3
            .get_object_acl()
            .bucket(&p.bucket)
            .key(&p.key)
            .send()
            .await
            .unwrap();
        assert!(acl
            .grants()
            .iter()
            .any(|g| g.permission().map(|p| p.as_str()) == Some("FULL_CONTROL")));
    }
}

/// The roles the emulator's STS was asked for: (role ARN, external id, session name).
async fn assumed_roles(port: u16) -> Vec<(String, String, String)> {
    let (_, body) = claimcheck::admin::get(&format!("http://127.0.0.1:{port}/moto-api/data.json"))
        .await
        .expect("the emulator's state");
    let state: Value = serde_json::from_str(&body).unwrap();
    let roles = state["sts"]["AssumedRole"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
    roles
        .iter()
        .map(|r| {
            (
                text(&r["role_arn"]),
                text(&r["external_id"]),
                text(&r["session_name"]),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_destination_has_its_role_and_its_region() {
    let moto = Moto::start();
    // The bucket in eu-west-1, the stream in eu-central-1; the sidecar's own region is us-east-1.
    let (bucket, stream) = (unique("regions"), unique("regions"));
    let eu_west = Aws::in_region(moto.port, "eu-west-1");
    eu_west
        .s3
        .create_bucket()
        .bucket(&bucket)
        .create_bucket_configuration(
            CreateBucketConfiguration::builder()
                .location_constraint(BucketLocationConstraint::EuWest1)
                .build(),
        )
        .send()
        .await
        .unwrap();
    let eu_central = Aws::in_region(moto.port, "eu-central-1");
    eu_central.create_stream(&stream, 1).await;
    let dir = tempfile::tempdir().unwrap();
    let sidecar = Sidecar::start(
        &dir.path().join("buffer"),
        moto.port,
        &bucket,
        &stream,
        &[
            "--flush-interval",
            "1s",
            "--timekey-wait",
            "0s",
            "--inline-max-bytes",
            "0",
            "--s3-region",
            "eu-west-1",
            "--kinesis-region",
            "eu-central-1",
            "--role-arn",
            "arn:aws:iam::123456789012:role/s3-writer",
            "--external-id",
            "ext-s3",
            "--kinesis-role-arn",
            "arn:aws:iam::123456789012:role/stream-writer",
            "--kinesis-external-id",
            "ext-kinesis",
            "--role-session-name",
            "claimcheck-it",
            // The check passes with these settings (it fails on a stream of another region).
            "--check-on-start",
            "fail",
        ],
    );
    let sent = events("app.regions", 20, 10);
    assert_eq!(node_send(sidecar.port, "Forward", &sent).len(), sent.len());
    // Only a sidecar that put to eu-central-1 can have published these.
    let chunks = eu_central
        .read_events(&stream, sent.len(), Duration::from_secs(60))
        .await;
    assert_exactly_once(&chunks, &sent);
    // `tail` takes the same flags: a reader's role, and the stream's region.
    let (stdout, _) = tokio::task::block_in_place(|| {
        run_claimcheck(
            moto.port,
            &[
                "tail",
                "--kinesis-stream",
                &stream,
                "--until-idle",
                "2s",
                "--kinesis-region",
                "eu-central-1",
                "--s3-region",
                "eu-west-1",
                "--role-arn",
                "arn:aws:iam::123456789012:role/reader",
                "--role-session-name",
                "tail-it",
            ],
            None,
        )
    });
    assert_eq!(json_lines(&stdout).len(), sent.len());
    let roles = assumed_roles(moto.port).await;
    for (arn, external_id, session) in [
        (
            "arn:aws:iam::123456789012:role/s3-writer",
            "ext-s3",
            "claimcheck-it",
        ),
        (
            "arn:aws:iam::123456789012:role/stream-writer",
            "ext-kinesis",
            "claimcheck-it",
        ),
        ("arn:aws:iam::123456789012:role/reader", "", "tail-it"),
    ] {
        assert!(
            roles
                .iter()
                .any(|r| r == &(arn.into(), external_id.into(), session.into())),
            "{arn} assumed with {external_id:?} as {session}: {roles:?}"
        );
    }
}

/// Runs `claimcheck serve` with `args` until it exits (or fails the test after a minute);
/// its exit status and stderr.
fn serve_until_exit(port: u16, bucket: &str, stream: &str, args: &[&str]) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_claimcheck"))
        .arg("serve")
        .args([
            "--listen",
            "127.0.0.1:0",
            "--s3-bucket",
            bucket,
            "--kinesis-stream",
            stream,
        ])
        .arg("--buffer-dir")
        .arg(dir.path().join("buffer"))
        .args(args)
        .envs(aws_env(port))
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("claimcheck did not exit");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_start_up_check_names_the_setting_to_fix() {
    let env = Emulated::start("check").await;
    let port = env.moto.port;
    for (bucket, stream, extra, setting) in [
        (
            "no-such-bucket-here",
            env.stream.as_str(),
            None,
            "--s3-bucket",
        ),
        (
            env.bucket.as_str(),
            "no-such-stream",
            None,
            "--kinesis-stream",
        ),
        (
            env.bucket.as_str(),
            env.stream.as_str(),
            Some("eu-north-1"),
            "--kinesis-region",
        ),
    ] {
        let mut args = vec!["--check-on-start", "fail"];
        if let Some(region) = extra {
            args.extend(["--kinesis-region", region]);
        }
        let (ok, stderr) =
            tokio::task::block_in_place(|| serve_until_exit(port, bucket, stream, &args));
        assert!(!ok, "the sidecar does not serve after a failed check");
        let line = stderr
            .lines()
            .find(|l| l.contains("start-up check:"))
            .unwrap_or_else(|| panic!("no start-up check line:\n{stderr}"));
        assert!(line.contains(setting), "{setting} named: {line}");
    }
    // With warn, a failed check is logged and the sidecar serves anyway.
    let sidecar = env.sidecar_at(
        0,
        None,
        &["--check-on-start", "warn", "--kinesis-region", "eu-north-1"],
    );
    assert!(sidecar.addr().port() > 0);
    sidecar
        .expect_log("start-up check: cannot put to the Kinesis stream")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_that_need_an_operator_are_explained_once_and_retried() {
    let env = Emulated::start("explain").await;
    let proxies = env.proxies().await;
    let sidecar = env.sidecar_behind(
        &proxies,
        &[
            "--inline-max-bytes",
            "0",
            "--flush-interval",
            "300ms",
            "--timekey-wait",
            "0s",
            "--retry-wait",
            "100ms",
            "--retry-max-interval",
            "300ms",
        ],
    );
    let load = Load::start(sidecar.port, 1, 10, 2);
    let cases: [(bool, u16, &str, &str, &str); 6] = [
        (false, 403, "AccessDenied", "Access Denied", "--s3-role-arn"),
        (false, 400, "KMS.DisabledException", "arn:aws:kms:us-east-1:123456789012:key/k is disabled.", "--s3-sse-kms-key-id"),
        (false, 400, "InvalidStorageClass", "The storage class you specified is not valid", "--s3-storage-class"),
        (false, 301, "PermanentRedirect", "The bucket you are attempting to access must be addressed using the specified endpoint.", "--s3-region"),
        (false, 400, "ExpiredToken", "The provided token has expired.", "--role-arn"),
        (true, 400, "AccessDeniedException", "User is not authorized to perform: kinesis:PutRecords", "--kinesis-role-arn"),
    ];
    for (kinesis, status, code, message, setting) in cases {
        let proxy = if kinesis {
            &proxies.kinesis
        } else {
            &proxies.s3
        };
        proxy.set(Fault::Refuse {
            status,
            code,
            message,
        });
        let (errors, operation) = match kinesis {
            true => ("claimcheck_kinesis_errors_total", "PutRecords"),
            false => ("claimcheck_s3_errors_total", "PutObject"),
        };
        let series = format!("{errors}{{operation=\"{operation}\",code=\"{code}\"}}");
        // Counted at every attempt: retried, as any failure is.
        sidecar
            .await_metrics(&format!("{code} is retried"), |m| {
                metric_sum(m, &series) >= 3.0
            })
            .await;
        proxy.set(Fault::None);
        let log = sidecar.log_text();
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| {
                l.contains("retried until this is fixed") && l.contains(&format!("code=\"{code}\""))
            })
            .collect();
        assert_eq!(lines.len(), 1, "{code} explained once:\n{log}");
        assert!(
            lines[0].contains(setting),
            "{code}: {setting} named in {}",
            lines[0]
        );
    }
    let load = load.stop().await;
    let chunks = env.read_events(load.acked.len()).await;
    let ids = times_delivered(chunks.iter().flat_map(|c| &c.events));
    assert!(
        load.acked.iter().all(|id| ids.contains_key(id)),
        "every acked event arrives once the settings are fixed"
    );
}
