//! The examples in deploy/, checked against the binary they deploy. No cluster or ECS runs
//! here, so these tests check what a copied example gets wrong most easily: every flag and
//! `CLAIMCHECK_*` variable exists and the binary accepts the values (it prints the effective
//! settings with `serve --print-config`, image environment included), the probes and health
//! checks ask `/healthz` and `/readyz` on the metrics port the container listens on, the stop
//! budget exceeds `--shutdown-timeout` (plus Fluent Bit's flush), and Fluent Bit asks for acks
//! from claimcheck's forward port.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde::Deserialize;
use serde_norway::Value;

fn read(path: &str) -> String {
    let full = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn yaml_documents(path: &str) -> Vec<Value> {
    serde_norway::Deserializer::from_str(&read(path))
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{path}: {e}")))
        .filter(|doc| !doc.is_null())
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"].as_str() == Some(kind) && d["metadata"]["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no {kind} named {name}"))
}

fn seq(v: &Value) -> &[Value] {
    v.as_sequence().map(Vec::as_slice).unwrap_or_default()
}

fn duration(text: &str) -> Duration {
    humantime::parse_duration(text).unwrap_or_else(|e| panic!("{text}: {e}"))
}

/// Every setting's flag and environment variable, as the binary prints them.
fn config_reference() -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_claimcheck"))
        .arg("config-reference")
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

/// The `CLAIMCHECK_*` variables docker/Dockerfile sets: they apply wherever the image runs.
fn image_env() -> Vec<(String, String)> {
    read("docker/Dockerfile")
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .flat_map(str::split_whitespace)
        .filter_map(|w| w.split_once('='))
        .filter(|(k, _)| k.starts_with("CLAIMCHECK_"))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The image's user id and its `VOLUME`, from docker/Dockerfile.
fn image_user_and_volume() -> (i64, String) {
    let dockerfile = read("docker/Dockerfile");
    let uid = dockerfile
        .split_whitespace()
        .skip_while(|w| *w != "--uid")
        .nth(1)
        .expect("useradd --uid in docker/Dockerfile")
        .parse()
        .unwrap();
    let volume = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("VOLUME [\""))
        .and_then(|l| l.split('"').next())
        .expect("VOLUME in docker/Dockerfile")
        .to_string();
    (uid, volume)
}

/// How a claimcheck container is configured in an example: the arguments after the image's
/// entrypoint and its environment.
struct Sidecar {
    origin: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

/// The settings the container runs with, as `claimcheck serve --print-config` reports them.
struct Effective(toml::Table);

impl Effective {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.as_str())
    }
    fn addr(&self, key: &str, origin: &str) -> SocketAddr {
        let value = self
            .get(key)
            .unwrap_or_else(|| panic!("{origin}: {key} is not set"));
        value
            .parse()
            .unwrap_or_else(|e| panic!("{origin}: {key} {value}: {e}"))
    }
    fn shutdown_timeout(&self) -> Duration {
        duration(self.get("shutdown_timeout").expect("shutdown_timeout"))
    }
}

impl Sidecar {
    fn effective(&self) -> Effective {
        let reference = config_reference() + " `--config` `--print-config` `CLAIMCHECK_CONFIG`";
        assert_eq!(
            self.args.first().map(String::as_str),
            Some("serve"),
            "{}: runs `claimcheck serve`",
            self.origin
        );
        for flag in self.args.iter().filter(|a| a.starts_with("--")) {
            let name = flag.split('=').next().unwrap();
            assert!(
                reference.contains(&format!("`{name}`")),
                "{} passes {name}, which `claimcheck serve` does not have",
                self.origin
            );
        }
        for (name, _) in self
            .env
            .iter()
            .filter(|(k, _)| k.starts_with("CLAIMCHECK_"))
        {
            assert!(
                reference.contains(&format!("`{name}`")),
                "{} sets {name}, which `claimcheck serve` does not read",
                self.origin
            );
        }
        let out = Command::new(env!("CARGO_BIN_EXE_claimcheck"))
            .env_clear()
            .envs(image_env())
            .envs(self.env.iter().cloned())
            .args(&self.args)
            .arg("--print-config")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}: claimcheck refuses its settings: {}",
            self.origin,
            String::from_utf8_lossy(&out.stderr)
        );
        Effective(toml::from_str(&String::from_utf8(out.stdout).unwrap()).unwrap())
    }
}

fn assert_claimcheck_image(image: &str, origin: &str) {
    let (repository, tag) = image.rsplit_once(':').expect("a tagged image");
    assert_eq!(
        repository.rsplit('/').next(),
        Some("claimcheck"),
        "{origin}: the image built from docker/Dockerfile is named claimcheck"
    );
    assert_eq!(
        tag,
        env!("CARGO_PKG_VERSION"),
        "{origin}: the image tag follows the crate's version"
    );
}

fn assert_pinned(image: &str, origin: &str) {
    let tag = image.rsplit('/').next().unwrap().split_once(':');
    assert!(
        matches!(tag, Some((_, t)) if t != "latest" && t != "stable"),
        "{origin}: pin the image ({image})"
    );
}

/// A Fluent Bit classic configuration: its sections in order, keys lowercased.
fn fluent_bit_sections(conf: &str) -> Vec<(String, BTreeMap<String, String>)> {
    let mut sections: Vec<(String, BTreeMap<String, String>)> = Vec::new();
    for line in conf.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            sections.push((name.to_ascii_uppercase(), BTreeMap::new()));
        } else {
            let (key, value) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
            let (_, section) = sections.last_mut().expect("a key outside any section");
            section.insert(key.to_ascii_lowercase(), value.trim().to_string());
        }
    }
    sections
}

/// Checks that every forward output of a Fluent Bit configuration asks claimcheck for acks,
/// and that its events wait on disk; returns Fluent Bit's `Grace` (its flush time on SIGTERM).
fn assert_fluent_bit_forwards_to(conf: &str, forward: SocketAddr, origin: &str) -> Duration {
    let sections = fluent_bit_sections(conf);
    let outputs: Vec<_> = sections
        .iter()
        .filter(|(s, kv)| s == "OUTPUT" && kv.get("name").map(String::as_str) == Some("forward"))
        .map(|(_, kv)| kv)
        .collect();
    assert!(!outputs.is_empty(), "{origin}: no forward output");
    for output in outputs {
        assert_forward_options(output, forward, origin);
    }
    let service = sections
        .iter()
        .find(|(s, _)| s == "SERVICE")
        .map(|(_, kv)| kv.clone())
        .unwrap_or_default();
    assert!(
        service.contains_key("storage.path"),
        "{origin}: Fluent Bit needs storage.path for filesystem buffering"
    );
    for (_, input) in sections.iter().filter(|(s, _)| s == "INPUT") {
        assert_eq!(
            input.get("storage.type").map(String::as_str),
            Some("filesystem"),
            "{origin}: Fluent Bit input {:?} keeps its chunks in memory",
            input.get("name")
        );
    }
    // Fluent Bit's default Grace is 5 s.
    Duration::from_secs(service.get("grace").map_or(5, |g| g.parse().unwrap()))
}

/// The options of a Fluent Bit forward output, keys lowercased.
fn assert_forward_options(output: &BTreeMap<String, String>, forward: SocketAddr, origin: &str) {
    assert!(
        output
            .get("require_ack_response")
            .is_some_and(|v| v.eq_ignore_ascii_case("on") || v == "true"),
        "{origin}: Fluent Bit must set Require_ack_response On"
    );
    // Without it Fluent Bit waits for an ack forever, and its shutdown with it.
    assert!(
        output
            .get("net.io_timeout")
            .is_some_and(|v| !v.is_empty() && !v.starts_with('0')),
        "{origin}: Fluent Bit must set net.io_timeout"
    );
    let host = output
        .get("host")
        .map(String::as_str)
        .unwrap_or("127.0.0.1");
    let port: u16 = output
        .get("port")
        .map_or(24224, |p| p.parse().expect("a numeric Port"));
    assert_eq!(
        port,
        forward.port(),
        "{origin}: Fluent Bit sends to port {port}, claimcheck listens on {forward}"
    );
    assert!(
        forward.ip().is_unspecified() || host == forward.ip().to_string(),
        "{origin}: Fluent Bit sends to {host}, claimcheck listens on {forward}"
    );
    assert!(
        output
            .get("retry_limit")
            .is_some_and(|v| v == "no_limits" || v.eq_ignore_ascii_case("false")),
        "{origin}: with a retry limit, Fluent Bit drops chunks while claimcheck is away"
    );
}

/// What the common checks of a Kubernetes example found: claimcheck's effective settings and
/// the volume its buffer is on.
struct KubeCheck {
    settings: Effective,
    buffer_volume: Value,
}

fn check_kubernetes(path: &str, kind: &str, name: &str) -> (Vec<Value>, KubeCheck) {
    let docs = yaml_documents(path);
    let workload = find(&docs, kind, name);
    let namespace = workload["metadata"]["namespace"].as_str();
    let spec = &workload["spec"]["template"]["spec"];
    let origin = format!("{path} ({kind} {name})");
    let (uid, _) = image_user_and_volume();

    for c in seq(&spec["initContainers"])
        .iter()
        .chain(seq(&spec["containers"]))
    {
        assert_pinned(c["image"].as_str().unwrap(), &origin);
    }
    // claimcheck is a native sidecar: it starts before Fluent Bit and stops after it.
    let init = seq(&spec["initContainers"]);
    let position = |n: &str| init.iter().position(|c| c["name"].as_str() == Some(n));
    let cc_at = position("claimcheck").unwrap_or_else(|| {
        panic!("{origin}: claimcheck is a native sidecar (initContainers, restartPolicy Always)")
    });
    let cc = &init[cc_at];
    assert_eq!(cc["restartPolicy"].as_str(), Some("Always"), "{origin}");
    match position("fluent-bit") {
        Some(fb_at) => {
            assert!(
                fb_at > cc_at,
                "{origin}: Fluent Bit must start after claimcheck"
            );
            assert_eq!(init[fb_at]["restartPolicy"].as_str(), Some("Always"));
        }
        None => assert!(
            seq(&spec["containers"])
                .iter()
                .any(|c| c["name"].as_str() == Some("fluent-bit")),
            "{origin}: no fluent-bit container"
        ),
    }
    assert_claimcheck_image(cc["image"].as_str().unwrap(), &origin);
    assert!(
        cc["command"].is_null(),
        "{origin}: keep the image's entrypoint"
    );
    let sidecar = Sidecar {
        origin: origin.clone(),
        args: seq(&cc["args"])
            .iter()
            .map(|a| a.as_str().unwrap().to_string())
            .collect(),
        env: seq(&cc["env"])
            .iter()
            .map(|e| {
                let name = e["name"].as_str().unwrap().to_string();
                // A value from the downward API: any plausible one will do here.
                let value = e["value"].as_str().unwrap_or("node-1").to_string();
                (name, value)
            })
            .collect(),
    };
    let settings = sidecar.effective();

    // Probes: on the metrics port, which the kubelet reaches over the pod's address.
    let metrics = settings.addr("metrics_listen", &origin);
    assert!(
        metrics.ip().is_unspecified(),
        "{origin}: the kubelet cannot probe {metrics}"
    );
    let port_of = |probe: &Value| -> u16 {
        let port = &probe["httpGet"]["port"];
        match port.as_u64() {
            Some(p) => p as u16,
            None => seq(&cc["ports"])
                .iter()
                .find(|p| p["name"].as_str() == port.as_str())
                .and_then(|p| p["containerPort"].as_u64())
                .unwrap_or_else(|| panic!("{origin}: no port named {port:?}"))
                as u16,
        }
    };
    for (probe, path) in [
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
        ("startupProbe", "/healthz"),
    ] {
        let p = &cc[probe];
        if probe == "startupProbe" && p.is_null() {
            continue;
        }
        assert_eq!(
            p["httpGet"]["path"].as_str(),
            Some(path),
            "{origin}: {probe}"
        );
        assert_eq!(
            port_of(p),
            metrics.port(),
            "{origin}: {probe} asks a port claimcheck does not serve metrics on"
        );
    }

    // The image's user, and a memory limit.
    assert_eq!(
        cc["securityContext"]["runAsUser"].as_i64(),
        Some(uid),
        "{origin}: runs as the image's user"
    );
    assert_eq!(
        cc["securityContext"]["allowPrivilegeEscalation"].as_bool(),
        Some(false)
    );
    assert!(!cc["resources"]["requests"]["memory"].is_null());
    assert!(!cc["resources"]["limits"]["memory"].is_null());

    // The buffer is on a volume.
    let buffer_dir = settings.get("buffer_dir").unwrap().to_string();
    let mount = seq(&cc["volumeMounts"])
        .iter()
        .find(|m| Path::new(&buffer_dir).starts_with(m["mountPath"].as_str().unwrap()))
        .unwrap_or_else(|| panic!("{origin}: {buffer_dir} is not on a volume"));
    let buffer_volume = seq(&spec["volumes"])
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap_or_else(|| panic!("{origin}: no volume {:?}", mount["name"]))
        .clone();

    // Fluent Bit's configuration comes from a ConfigMap of this file.
    let fluent_bit = init
        .iter()
        .chain(seq(&spec["containers"]))
        .find(|c| c["name"].as_str() == Some("fluent-bit"))
        .unwrap();
    let config_volume = seq(&fluent_bit["volumeMounts"])
        .iter()
        .find(|m| m["subPath"].as_str() == Some("fluent-bit.conf"))
        .and_then(|m| {
            seq(&spec["volumes"])
                .iter()
                .find(|v| v["name"] == m["name"])
        })
        .unwrap_or_else(|| panic!("{origin}: Fluent Bit's configuration is not mounted"));
    let config_map = find(
        &docs,
        "ConfigMap",
        config_volume["configMap"]["name"].as_str().unwrap(),
    );
    assert_eq!(config_map["metadata"]["namespace"].as_str(), namespace);
    let conf = config_map["data"]["fluent-bit.conf"].as_str().unwrap();
    let grace = assert_fluent_bit_forwards_to(
        conf,
        settings.addr("listen", &origin),
        &format!("{origin}, Fluent Bit"),
    );

    // Stop budget: Fluent Bit flushes, then claimcheck finishes the requests under way and
    // delivers, within the pod's grace.
    let budget = Duration::from_secs(
        spec["terminationGracePeriodSeconds"]
            .as_u64()
            .unwrap_or_else(|| panic!("{origin}: set terminationGracePeriodSeconds")),
    );
    assert!(
        budget > grace + claimcheck::server::DRAIN + settings.shutdown_timeout(),
        "{origin}: terminationGracePeriodSeconds {budget:?} leaves no time for Fluent Bit's \
         Grace ({grace:?}), claimcheck's requests under way ({:?}) and its \
         --shutdown-timeout ({:?})",
        claimcheck::server::DRAIN,
        settings.shutdown_timeout()
    );

    // IRSA: the pod's service account names a role; the SDK's default chain does the rest.
    let account = find(
        &docs,
        "ServiceAccount",
        spec["serviceAccountName"].as_str().unwrap(),
    );
    assert_eq!(account["metadata"]["namespace"].as_str(), namespace);
    assert!(
        account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
            .as_str()
            .is_some_and(|arn| arn.starts_with("arn:aws:iam::"))
    );

    (
        docs,
        KubeCheck {
            settings,
            buffer_volume,
        },
    )
}

#[test]
fn the_kubernetes_sidecar_example_orders_probes_and_stops_claimcheck_after_fluent_bit() {
    let path = "deploy/kubernetes/pod.yaml";
    let (_, check) = check_kubernetes(path, "Deployment", "app-with-claimcheck");
    assert!(
        !check.buffer_volume["emptyDir"].is_null(),
        "{path}: the buffer is an emptyDir, as its comments explain"
    );
    assert!(
        read(path).contains("volumeClaimTemplates"),
        "{path}: says how to keep the buffer beyond the pod"
    );
    assert_eq!(
        check.settings.addr("listen", path).ip().to_string(),
        "127.0.0.1",
        "{path}: only the pod's Fluent Bit sends to claimcheck"
    );
}

#[test]
fn the_kubernetes_daemonset_example_keeps_the_buffer_on_the_node_and_reads_node_logs() {
    let path = "deploy/kubernetes/daemonset.yaml";
    let (docs, check) = check_kubernetes(path, "DaemonSet", "node-logs");
    assert_eq!(
        check.buffer_volume["hostPath"]["path"].as_str(),
        Some("/var/lib/claimcheck"),
        "{path}: the buffer outlives the pod on a hostPath"
    );
    let daemonset = find(&docs, "DaemonSet", "node-logs");
    let spec = &daemonset["spec"]["template"]["spec"];
    assert!(!seq(&spec["tolerations"]).is_empty(), "{path}: tolerations");

    // The hostPath is created root-owned: something must hand it to the image's user first.
    let (uid, _) = image_user_and_volume();
    let init = seq(&spec["initContainers"]);
    let cc_at = init
        .iter()
        .position(|c| c["name"].as_str() == Some("claimcheck"))
        .unwrap();
    assert!(
        init[..cc_at].iter().any(|c| seq(&c["command"])
            .iter()
            .any(|w| w.as_str() == Some(format!("{uid}:{uid}").as_str()))),
        "{path}: an init container before claimcheck gives the hostPath to uid {uid}"
    );

    // Fluent Bit tails the node's container logs and may read pod metadata.
    let config_map = find(&docs, "ConfigMap", "node-logs-fluent-bit");
    let sections = fluent_bit_sections(config_map["data"]["fluent-bit.conf"].as_str().unwrap());
    assert!(sections.iter().any(|(s, kv)| s == "INPUT"
        && kv.get("path").map(String::as_str) == Some("/var/log/containers/*.log")));
    assert!(sections
        .iter()
        .any(|(s, kv)| s == "FILTER" && kv.get("name").map(String::as_str) == Some("kubernetes")));
    let role = find(&docs, "ClusterRole", "node-logs");
    for resource in ["pods", "namespaces"] {
        assert!(
            seq(&role["rules"]).iter().any(|r| {
                seq(&r["resources"])
                    .iter()
                    .any(|x| x.as_str() == Some(resource))
                    && ["get", "list", "watch"]
                        .iter()
                        .all(|v| seq(&r["verbs"]).iter().any(|x| x.as_str() == Some(v)))
            }),
            "{path}: the kubernetes filter needs get, list and watch on {resource}"
        );
    }
    let binding = find(&docs, "ClusterRoleBinding", "node-logs");
    assert_eq!(binding["roleRef"]["name"].as_str(), Some("node-logs"));
    assert!(seq(&binding["subjects"])
        .iter()
        .any(|s| s["name"] == spec["serviceAccountName"]
            && s["namespace"] == daemonset["metadata"]["namespace"]));
}

#[test]
fn the_ecs_example_routes_firelens_to_claimcheck_and_stops_it_last() {
    let path = "deploy/ecs/task-definition.json";
    let task: serde_json::Value = serde_json::from_str(&read(path)).expect("parses");
    let containers = task["containerDefinitions"].as_array().unwrap();
    for c in containers {
        assert_pinned(c["image"].as_str().unwrap(), path);
    }
    assert!(task["taskRoleArn"]
        .as_str()
        .is_some_and(|arn| arn.starts_with("arn:aws:iam::")));

    let cc = containers
        .iter()
        .find(|c| {
            c["image"]
                .as_str()
                .unwrap()
                .rsplit('/')
                .next()
                .unwrap()
                .starts_with("claimcheck:")
        })
        .expect("a claimcheck container");
    let name = cc["name"].as_str().unwrap();
    assert_claimcheck_image(cc["image"].as_str().unwrap(), path);
    assert_eq!(cc["essential"], true, "{path}: claimcheck is essential");
    assert!(
        cc["entryPoint"].is_null(),
        "{path}: keep the image's entrypoint"
    );
    let settings = Sidecar {
        origin: path.to_string(),
        args: cc["command"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_string())
            .collect(),
        env: cc["environment"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["name"].as_str().unwrap().to_string(),
                    e["value"].as_str().unwrap().to_string(),
                )
            })
            .collect(),
    }
    .effective();

    // Health: `claimcheck health` asks the metrics listener the container configures.
    settings.addr("metrics_listen", path);
    let health: Vec<&str> = cc["healthCheck"]["command"]
        .as_array()
        .expect("a health check")
        .iter()
        .map(|w| w.as_str().unwrap())
        .collect();
    assert_eq!(&health[..3], ["CMD", "claimcheck", "health"], "{path}");

    // Stopping: after the log router (dependsOn), within its own stopTimeout.
    let stop = Duration::from_secs(cc["stopTimeout"].as_u64().expect("a stopTimeout"));
    assert!(
        stop > claimcheck::server::DRAIN + settings.shutdown_timeout(),
        "{path}: stopTimeout {stop:?} is not above the requests under way ({:?}) and \
         --shutdown-timeout {:?}",
        claimcheck::server::DRAIN,
        settings.shutdown_timeout()
    );
    assert!(
        stop <= Duration::from_secs(120),
        "{path}: Fargate allows a stopTimeout of 120 s at most"
    );

    // The buffer is on the image's VOLUME path, which ECS creates owned by the image's user.
    let (_, volume) = image_user_and_volume();
    let buffer_dir = settings.get("buffer_dir").unwrap();
    let mount = cc["mountPoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| Path::new(buffer_dir).starts_with(m["containerPath"].as_str().unwrap()))
        .unwrap_or_else(|| panic!("{path}: {buffer_dir} is not on a volume"));
    assert_eq!(mount["containerPath"].as_str(), Some(volume.as_str()));
    assert!(task["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .any(|v| v["name"] == mount["sourceVolume"]));
    assert_ne!(
        cc["logConfiguration"]["logDriver"], "awsfirelens",
        "{path}: claimcheck cannot log through the router that waits for it"
    );

    // The log router starts once claimcheck is healthy.
    let router = containers
        .iter()
        .find(|c| c["firelensConfiguration"]["type"] == "fluentbit")
        .expect("a FireLens log router");
    assert!(
        router["dependsOn"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["containerName"] == name && d["condition"] == "HEALTHY"),
        "{path}: the log router must wait until claimcheck is HEALTHY"
    );

    // FireLens's own Fluent Bit listens on 24224 in the task's network namespace.
    let forward = settings.addr("listen", path);
    assert_ne!(
        forward.port(),
        24224,
        "{path}: FireLens listens on 24224 itself"
    );
    let apps: Vec<_> = containers
        .iter()
        .filter(|c| c["logConfiguration"]["logDriver"] == "awsfirelens")
        .collect();
    assert!(
        !apps.is_empty(),
        "{path}: no container logs through FireLens"
    );
    for app in apps {
        let options: BTreeMap<String, String> = app["logConfiguration"]["options"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.as_str().unwrap().to_string()))
            .collect();
        assert_eq!(options.get("name").map(String::as_str), Some("forward"));
        assert_forward_options(&options, forward, &format!("{path}, {}", app["name"]));
        assert!(
            app["dependsOn"]
                .as_array()
                .unwrap()
                .iter()
                .any(|d| d["containerName"] == router["name"]),
            "{path}: {} starts after the log router",
            app["name"]
        );
    }
}

#[test]
fn the_deploy_readme_lists_every_example() {
    let readme = read("deploy/README.md");
    for file in [
        "kubernetes/pod.yaml",
        "kubernetes/daemonset.yaml",
        "ecs/task-definition.json",
    ] {
        assert!(
            readme.contains(&format!("]({file})")),
            "deploy/README.md: {file}"
        );
    }
    assert!(
        read("README.md").contains("deploy/"),
        "README.md points to deploy/"
    );
}
