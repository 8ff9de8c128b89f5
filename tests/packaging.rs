//! The deployment files, checked against the binary they deploy. No Docker engine runs here,
//! so these tests check what can be checked: the compose file parses and wires the services
//! together, every flag, environment variable and subcommand the Docker and systemd files use
//! exists, and the image's build step builds the binary with the features `scripts/test` lints.

mod common;

use std::collections::BTreeSet;
use std::process::Command;

use common::repo_root;
use serde_norway::Value;

fn read(path: &str) -> String {
    std::fs::read_to_string(repo_root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Every setting of `claimcheck serve` with its flag and environment variable, as the binary
/// prints them (`claimcheck config-reference`), plus the two flags that are not settings.
fn serve_help() -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_claimcheck"))
        .arg("config-reference")
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap() + " `--config` `--print-config` `CLAIMCHECK_CONFIG`"
}

fn assert_flags_exist(args: &[String], help: &str, origin: &str) {
    for flag in args.iter().filter(|a| a.starts_with("--")) {
        let name = flag.split('=').next().unwrap();
        assert!(
            help.contains(&format!("`{name}`")),
            "{origin} passes {name}, which `claimcheck serve` does not have"
        );
    }
}

fn assert_env_exists(name: &str, help: &str, origin: &str) {
    if name.starts_with("CLAIMCHECK_") {
        assert!(
            help.contains(&format!("`{name}`")),
            "{origin} sets {name}, which `claimcheck serve` does not read"
        );
    }
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .map(|s| {
            s.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn the_compose_file_wires_fluentd_claimcheck_and_the_emulator() {
    let mut compose: Value =
        serde_norway::from_str(&read("docker/compose.yml")).expect("docker/compose.yml parses");
    compose.apply_merge().expect("merge keys resolve");
    let services = compose["services"].as_mapping().expect("services");
    let names: BTreeSet<String> = services
        .keys()
        .filter_map(|k| k.as_str().map(str::to_string))
        .collect();
    assert_eq!(
        names,
        ["claimcheck", "fluentd", "init", "moto"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    );
    let help = serve_help();

    let cc = &compose["services"]["claimcheck"];
    assert_eq!(
        cc["build"]["dockerfile"].as_str(),
        Some("docker/Dockerfile")
    );
    assert!(repo_root()
        .join("docker")
        .join(cc["build"]["context"].as_str().unwrap())
        .join("docker/Dockerfile")
        .exists());
    let command = strings(&cc["command"]);
    assert_eq!(command.first().map(String::as_str), Some("serve"));
    assert_flags_exist(&command, &help, "compose's claimcheck command");
    for (k, _) in cc["environment"].as_mapping().expect("environment").iter() {
        assert_env_exists(k.as_str().unwrap_or_default(), &help, "compose");
    }
    assert_eq!(
        cc["environment"]["CLAIMCHECK_S3_BUCKET"].as_str(),
        Some("logs")
    );
    assert_eq!(
        cc["environment"]["AWS_ENDPOINT_URL"].as_str(),
        Some("http://moto:5000")
    );
    assert_eq!(
        cc["depends_on"]["init"]["condition"].as_str(),
        Some("service_completed_successfully")
    );
    assert!(
        strings(&cc["volumes"])
            .iter()
            .any(|v| v.ends_with(":/var/lib/claimcheck")),
        "the buffer is a volume"
    );

    // The init step makes exactly the bucket and stream claimcheck uses.
    let init = strings(&compose["services"]["init"]["command"]).join("\n");
    assert!(init.contains("Bucket=\"logs\"") && init.contains("StreamName=\"pointers\""));
    assert_eq!(
        cc["environment"]["CLAIMCHECK_KINESIS_STREAM"].as_str(),
        Some("pointers")
    );

    // Fluentd forwards to the claimcheck service with acks.
    let fluentd = &compose["services"]["fluentd"];
    assert!(fluentd["image"]
        .as_str()
        .unwrap()
        .starts_with("fluent/fluentd:v1."));
    let mount = strings(&fluentd["volumes"])
        .into_iter()
        .find(|v| v.contains("fluent.conf"))
        .expect("a fluent.conf mount");
    let conf = read(&format!(
        "docker/{}",
        mount.split(':').next().unwrap().trim_start_matches("./")
    ));
    assert!(
        conf.contains("require_ack_response true")
            && conf.contains("host claimcheck")
            && conf.contains("port 24224")
    );
    for (name, service) in services {
        if let Some(image) = service["image"].as_str() {
            assert!(
                !image.ends_with(":latest") && image.contains(':'),
                "{name:?}: pin the image ({image})"
            );
        }
    }
}

#[test]
fn the_dockerfile_builds_what_the_test_suite_lints_and_runs_as_documented() {
    let dockerfile = read("docker/Dockerfile");
    let help = serve_help();
    assert!(
        dockerfile
            .lines()
            .any(|l| l.starts_with("RUN scripts/build-release")),
        "the image builds with scripts/build-release"
    );
    // scripts/test does not build the release binary (it would take a third of the suite's
    // time), but it lints the binary with the features the image's build gives it.
    let build = read("scripts/build-release");
    let built = build
        .lines()
        .find(|l| l.starts_with("cargo build"))
        .expect("scripts/build-release runs cargo build");
    let words: Vec<&str> = built.split_whitespace().collect();
    assert!(
        ["--release", "--locked", "--bin", "claimcheck"]
            .iter()
            .all(|w| words.contains(w))
            && !words.iter().any(|w| w.contains("features")),
        "the image's build: {built}"
    );
    let linted = read("scripts/test").lines().any(|l| {
        let words: Vec<&str> = l.split_whitespace().collect();
        words.starts_with(&["cargo", "clippy", "-p", "claimcheck"])
            && words.contains(&"--bins")
            && words.contains(&"--locked")
            && !words
                .iter()
                .any(|w| w.contains("features") || *w == "--all-targets")
    });
    assert!(
        linted,
        "scripts/test lints the binary with the image's features (no --all-targets: the tests' \
         dev-dependencies would add features)"
    );
    for line in dockerfile.lines().map(str::trim) {
        for word in line.split_whitespace() {
            if let Some((name, _)) = word.split_once('=') {
                assert_env_exists(name, &help, "docker/Dockerfile");
            }
        }
    }
    assert!(
        dockerfile.contains("CLAIMCHECK_LISTEN=0.0.0.0:24224"),
        "listens on all interfaces inside the container"
    );
    assert!(
        dockerfile.contains("USER claimcheck")
            && dockerfile.contains("VOLUME [\"/var/lib/claimcheck\"]")
    );
    assert!(
        dockerfile.contains("ENTRYPOINT [\"claimcheck\"]")
            && dockerfile.contains("CMD [\"serve\"]")
    );
    // The health check's command exists and takes the address from the image's environment.
    assert!(
        dockerfile.contains("HEALTHCHECK")
            && dockerfile.contains("CMD [\"claimcheck\", \"health\"]")
    );
    let health = Command::new(env!("CARGO_BIN_EXE_claimcheck"))
        .args(["health", "--help"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&health.stdout).contains("CLAIMCHECK_METRICS_LISTEN"));
    let ignored = read(".dockerignore");
    assert!(ignored.lines().any(|l| l == "target") && ignored.lines().any(|l| l == ".venv"));
}

#[test]
fn the_systemd_unit_starts_without_the_network_restarts_and_runs_as_its_own_user() {
    let unit = read("packaging/claimcheck.service");
    let directive = |key: &str| {
        unit.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .map(str::trim)
    };
    assert!(
        !unit
            .lines()
            .any(|l| !l.starts_with('#') && l.contains("network-online")),
        "must not wait for network-online"
    );
    assert_eq!(directive("Restart"), Some("on-failure"));
    assert_eq!(directive("User"), Some("claimcheck"));
    assert_eq!(directive("KillSignal"), Some("SIGTERM"));
    let stop: u64 = directive("TimeoutStopSec").unwrap().parse().unwrap();
    assert!(
        stop > 30,
        "longer than the default --shutdown-timeout (30 s)"
    );
    let exec: Vec<String> = directive("ExecStart")
        .unwrap()
        .split_whitespace()
        .map(str::to_string)
        .collect();
    assert_eq!(
        (exec[0].as_str(), exec[1].as_str()),
        ("/usr/local/bin/claimcheck", "serve")
    );
    assert_flags_exist(&exec[2..], &serve_help(), "the systemd unit");
    for line in unit.lines().filter_map(|l| l.strip_prefix("Environment=")) {
        assert_env_exists(
            line.split('=').next().unwrap(),
            &serve_help(),
            "the systemd unit",
        );
    }
}

#[test]
fn the_example_fluentd_configuration_asks_for_acks() {
    let conf = read("fluent.conf.example");
    assert!(
        conf.contains("@type forward")
            && conf.contains("require_ack_response true")
            && conf.contains("port 24224")
    );
}

/// Fluentd verifies a TLS certificate against `<server> name` when `host` is an IP address;
/// without a name, Fluentd 1.19.3 (Ruby 3.1) fails with `IPAddr::AddressFamilyError` and
/// discards the chunks. Every example that verifies certificates names the server.
#[test]
fn the_fluentd_tls_examples_name_the_server_they_verify() {
    let readme = read("README.md");
    // The README's fenced blocks, and fluent.conf.example as a whole.
    let mut examples: Vec<(String, String)> = readme
        .split("```")
        .skip(1)
        .step_by(2)
        .map(|block| ("README.md".to_string(), block.to_string()))
        .collect();
    examples.push(("fluent.conf.example".into(), read("fluent.conf.example")));
    let mut checked = 0;
    for (origin, text) in examples
        .iter()
        .filter(|(_, text)| text.contains("tls_verify_hostname true"))
    {
        checked += 1;
        let servers: Vec<&str> = text
            .split("<server>")
            .skip(1)
            .map(|s| s.split("</server>").next().unwrap())
            .collect();
        assert!(
            !servers.is_empty(),
            "{origin}: a TLS example without <server>"
        );
        for server in servers {
            let key = |k: &str| {
                server
                    .lines()
                    .map(str::trim)
                    .find_map(|l| l.strip_prefix(&format!("{k} ")))
                    .map(|v| v.split_whitespace().next().unwrap_or_default())
            };
            let name = key("name").unwrap_or_else(|| panic!("{origin}: <server> without name"));
            assert!(
                name.parse::<std::net::IpAddr>().is_err(),
                "{origin}: <server> name {name} must be a DNS name"
            );
        }
    }
    assert_eq!(
        checked, 2,
        "the README's TLS example and fluent.conf.example"
    );
}
