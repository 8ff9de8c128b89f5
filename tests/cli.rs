//! The command line: settings from `CLAIMCHECK_*` variables, and clear errors for bad ones.
//! No emulator is needed: the sidecar starts and listens without S3 or Kinesis.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

fn claimcheck() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_claimcheck"));
    cmd.env_remove("RUST_LOG").envs(aws_env(free_port()));
    for (key, _) in std::env::vars() {
        if key.starts_with("CLAIMCHECK_") {
            cmd.env_remove(key);
        }
    }
    cmd
}

/// Runs a command that must fail and returns its stderr.
fn fails(cmd: &mut Command) -> String {
    let out = cmd.stdin(Stdio::null()).output().unwrap();
    assert!(
        !out.status.success(),
        "expected a failure, got {}",
        out.status
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn serve_takes_every_setting_from_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let child = claimcheck()
        .arg("serve")
        .env("CLAIMCHECK_LISTEN", format!("127.0.0.1:{port}"))
        .env("CLAIMCHECK_BUFFER_DIR", dir.path().join("from-env"))
        .env("CLAIMCHECK_S3_BUCKET", "bucket-from-env")
        .env("CLAIMCHECK_KINESIS_STREAM", "stream-from-env")
        .env("CLAIMCHECK_FLUSH_INTERVAL", "1s")
        .env("CLAIMCHECK_LOG_FORMAT", "json")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_port(port, "claimcheck", Duration::from_secs(30));
    assert!(
        dir.path().join("from-env/chunks").is_dir(),
        "the buffer directory comes from the environment"
    );
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "exit status {}", out.status);
    let log = String::from_utf8_lossy(&out.stderr);
    let first: serde_json::Value =
        serde_json::from_str(log.lines().next().unwrap()).expect("json logs");
    assert_eq!(first["fields"]["message"], "claimcheck is serving");
    assert!(
        log.contains("bucket-from-env") && log.contains("stream-from-env"),
        "{log}"
    );
}

#[test]
fn bad_settings_are_refused_with_the_setting_named() {
    let base = |cmd: &mut Command| {
        cmd.args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--s3-bucket",
            "b",
            "--kinesis-stream",
            "s",
        ]);
    };
    let mut cmd = claimcheck();
    base(&mut cmd);
    let err = fails(cmd.args(["--flush-interval", "soon"]));
    assert!(
        err.contains("--flush-interval") && err.contains("500ms"),
        "{err}"
    );

    let mut cmd = claimcheck();
    base(&mut cmd);
    let err = fails(cmd.env("CLAIMCHECK_CHUNK_LIMIT_SIZE", "huge"));
    assert!(
        err.contains("--chunk-limit-size") && err.contains("8MiB"),
        "{err}"
    );

    let mut cmd = claimcheck();
    base(&mut cmd);
    let err = fails(cmd.args(["--s3-object-key-format", "${tag}/%Y/%m/%d.log"]));
    assert!(err.contains("${chunk_id}"), "{err}");

    let err = fails(claimcheck().args(["serve", "--kinesis-stream", "s"]));
    assert!(err.contains("--s3-bucket"), "{err}");

    let mut cmd = claimcheck();
    base(&mut cmd);
    let err = fails(cmd.args(["--compression", "lz4"]));
    assert!(err.contains("lz4") && err.contains("zstd"), "{err}");
}

#[test]
fn a_second_sidecar_on_the_same_buffer_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let buffer = dir.path().join("buffer");
    let _first = Sidecar::start(&buffer, free_port(), "b", "s", &[]);
    let err = fails(
        claimcheck()
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--s3-bucket",
                "b",
                "--kinesis-stream",
                "s",
            ])
            .arg("--buffer-dir")
            .arg(&buffer),
    );
    assert!(
        err.contains("in use by another claimcheck process"),
        "{err}"
    );
}

#[test]
fn resolve_names_what_is_wrong_with_a_pointer() {
    let err = fails(claimcheck().args(["resolve", r#"{"v":7,"chunk_id":"x"}"#]));
    assert!(err.contains("pointer version 7 is newer"), "{err}");
    let err = fails(claimcheck().args(["resolve", r#"{"v":1,"chunk_id":"x"}"#]));
    assert!(
        err.contains("malformed pointer") && err.contains("missing field"),
        "{err}"
    );
}
