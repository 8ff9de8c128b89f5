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
    let address_file = dir.path().join("addresses.json");
    let child = claimcheck()
        .arg("serve")
        .env("CLAIMCHECK_LISTEN", "127.0.0.1:0")
        .env("CLAIMCHECK_ADDRESS_FILE", &address_file)
        .env("CLAIMCHECK_BUFFER_DIR", dir.path().join("from-env"))
        .env("CLAIMCHECK_S3_BUCKET", "bucket-from-env")
        .env("CLAIMCHECK_KINESIS_STREAM", "stream-from-env")
        .env("CLAIMCHECK_FLUSH_INTERVAL", "1s")
        .env("CLAIMCHECK_LOG_FORMAT", "json")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Listening once it says where.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !address_file.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "claimcheck did not listen"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
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

/// `serve --print-config` with `args` and `env`: the effective settings as a TOML table.
fn effective(args: &[&str], env: &[(&str, &str)]) -> toml::Table {
    let out = claimcheck()
        .arg("serve")
        .args(args)
        .arg("--print-config")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .parse()
        .expect("the printed configuration is TOML")
}

fn setting<'a>(t: &'a toml::Table, key: &str) -> &'a str {
    t.get(key)
        .and_then(|v| v.as_str())
        .unwrap_or_else(|| panic!("no {key} in {t:?}"))
}

#[test]
fn a_configuration_file_sits_between_the_environment_and_the_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("claimcheck.toml");
    std::fs::write(
        &file,
        "s3_bucket = \"file-bucket\"\nkinesis_stream = \"file-stream\"\nflush_interval = \"7s\"\ntimekey = \"2m\"\n\
         timekey_wait = \"20s\"\nchunk_limit_records = 5000\nretry_forever = true\n",
    )
    .unwrap();
    let file = file.to_str().unwrap();
    let t = effective(
        &["--config", file, "--timekey-wait", "3s"],
        &[
            ("CLAIMCHECK_TIMEKEY", "5m"),
            ("CLAIMCHECK_TIMEKEY_WAIT", "30s"),
        ],
    );
    assert_eq!(setting(&t, "flush_interval"), "7s", "file over default");
    assert_eq!(setting(&t, "timekey"), "5m", "environment over file");
    assert_eq!(
        setting(&t, "timekey_wait"),
        "3s",
        "flag over environment and file"
    );
    assert_eq!(
        setting(&t, "chunk_limit_size"),
        "8MiB",
        "default when nobody sets it"
    );
    assert_eq!(
        (
            setting(&t, "chunk_limit_records"),
            setting(&t, "retry_forever")
        ),
        ("5000", "true"),
        "numbers and booleans"
    );
    assert_eq!(
        setting(&t, "s3_bucket"),
        "file-bucket",
        "required settings may come from the file alone"
    );

    // The file can also be named by CLAIMCHECK_CONFIG.
    let t = effective(&[], &[("CLAIMCHECK_CONFIG", file)]);
    assert_eq!(setting(&t, "kinesis_stream"), "file-stream");
}

#[test]
fn health_without_a_sidecar_says_where_it_looked() {
    // Port 1 on the loopback: nothing listens there without root.
    let err = fails(claimcheck().args(["health", "--metrics-listen", "127.0.0.1:1"]));
    assert!(
        err.contains("is the sidecar running with --metrics-listen 127.0.0.1:1"),
        "{err}"
    );
}

#[test]
fn print_config_refuses_what_serve_refuses() {
    let err = fails(claimcheck().args([
        "serve",
        "--s3-bucket",
        "b",
        "--kinesis-stream",
        "s",
        "--timekey",
        "0",
        "--print-config",
    ]));
    assert!(err.contains("--timekey must be at least 1s"), "{err}");
}

#[test]
fn print_config_round_trips_through_the_file_format() {
    let dir = tempfile::tempdir().unwrap();
    let first = effective(
        &[
            "--s3-bucket",
            "b",
            "--kinesis-stream",
            "arn:aws:kinesis:eu-west-1:1:stream/s",
            "--s3-prefix",
            "logs/",
            "--overflow-action",
            "drop_oldest_chunk",
            "--metrics-listen",
            "0.0.0.0:24231",
            "--s3-object-key-format",
            "${tag[0]}/%Y/%m/${chunk_id}.%{file_extension}",
            "--shared-key",
            "k",
            "--user",
            "alice:wonder land",
            "--user",
            "bob:pw",
            "--client",
            "10.0.0.0/8,shared_key=other,users=alice",
            "--s3-object-tags",
            "team=sre",
            "--s3-object-tags",
            "source=${tag}",
            "--s3-metadata",
            "env=prod=eu",
        ],
        &[],
    );
    assert_eq!(
        first["user"],
        toml::Value::Array(vec!["alice:wonder land".into(), "bob:pw".into()]),
        "lists print as lists"
    );
    let table = |pairs: &[(&str, &str)]| {
        toml::Value::Table(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), toml::Value::from(*v)))
                .collect(),
        )
    };
    assert_eq!(
        first["s3_object_tags"],
        table(&[("source", "${tag}"), ("team", "sre")]),
        "KEY=VALUE settings print as tables"
    );
    assert_eq!(first["s3_metadata"], table(&[("env", "prod=eu")]));
    let file = dir.path().join("printed.toml");
    std::fs::write(&file, toml::to_string(&first).unwrap()).unwrap();
    let second = effective(&["--config", file.to_str().unwrap()], &[]);
    assert_eq!(first, second);
}

#[test]
fn configuration_file_mistakes_name_the_file_and_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "flush_intervl = \"1s\"\n",
            "unknown setting `flush_intervl`",
        ),
        (
            "flush_interval = \"soon\"\n",
            "`flush_interval` = \"soon\" is invalid",
        ),
        (
            "chunk_limit_size = \"huge\"\n",
            "`chunk_limit_size` = \"huge\" is invalid",
        ),
        (
            "compression = \"lz4\"\n",
            "`compression` = \"lz4\" is invalid",
        ),
        (
            "flush_interval = [1]\n",
            "`flush_interval` takes one value, not a list",
        ),
        (
            "flush_interval = { a = 1 }\n",
            "`flush_interval` must be a string, a number or a boolean",
        ),
        (
            "user = [\"alice:pw\", \"bob\"]\n",
            "`user` = \"bob\" is invalid: invalid value 'bob' for '--user <USER>': a user is NAME:PASSWORD",
        ),
        ("s3_bucket = \n", "claimcheck.toml"),
    ];
    for (text, expected) in cases {
        let file = dir.path().join("claimcheck.toml");
        std::fs::write(&file, text).unwrap();
        let err = fails(
            claimcheck()
                .args([
                    "serve",
                    "--s3-bucket",
                    "b",
                    "--kinesis-stream",
                    "s",
                    "--listen",
                    "127.0.0.1:0",
                    "--config",
                ])
                .arg(&file),
        );
        assert!(
            err.contains(expected) && err.contains("claimcheck.toml"),
            "{text:?}: {err}"
        );
    }
    let err = fails(claimcheck().args(["serve", "--config", "/nonexistent/claimcheck.toml"]));
    assert!(
        err.contains("cannot read the configuration file /nonexistent/claimcheck.toml"),
        "{err}"
    );
}
