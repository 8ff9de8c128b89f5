//! The forward protocol's optional parts, as Fluentd's in_forward serves them: the shared-key
//! handshake with user auth and client rules, TLS with and without client certificates, UDP
//! heartbeats, deny_keepalive, resent requests, non-log signals and source keys. Real clients
//! (Node `@fluent-org/logger`) where they support the feature, our own encoder elsewhere.

mod common;

use std::io::{Read, Write};
use std::net::{TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::wire::*;
use common::*;
use rmpv::Value;
use serde_json::json;

const MODES: [&str; 4] = [
    "Message",
    "Forward",
    "PackedForward",
    "CompressedPackedForward",
];

/// Events of one tag, `n` of them, one second apart.
fn events(tag: &str, base: i64, n: usize) -> Vec<TestEvent> {
    (0..n)
        .map(|i| TestEvent {
            tag: tag.into(),
            secs: base + i as i64,
            nanos: Some(i as u32 * 7),
            record: json!({"message": format!("{tag} {i}"), "seq": i}),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_client_with_shared_key_and_user_auth_in_every_mode() {
    let env = Emulated::start("sec").await;
    let sidecar = env.sidecar(&[
        "--flush-interval",
        "1s",
        "--timekey-wait",
        "0s",
        "--shared-key",
        "s3cr3t key",
        "--user-auth",
        "--user",
        "alice:wonder land",
        "--user",
        "bob:builder",
    ]);
    let base = minute_of(now_secs()) - 600;
    let security = json!({"security": {"clientHostname": "node-client", "sharedKey": "s3cr3t key",
                                       "username": "alice", "password": "wonder land"}});
    let mut want = Vec::new();
    for mode in MODES {
        let evs = events(&format!("sec.{mode}"), base, 12);
        let acked = node_send_with(sidecar.port, mode, &evs, security.clone());
        assert_eq!(acked.len(), evs.len(), "{mode}: every event acknowledged");
        want.extend(evs);
    }
    let chunks = env.read_events(want.len()).await;
    assert_exactly_once(&chunks, &want);
    drop(sidecar);
}

#[test]
fn handshake_refusals_say_why_and_close_the_connection() {
    let sidecar = Sidecar::standalone(&[
        "--shared-key",
        "k1",
        "--self-hostname",
        "sidecar-a",
        "--user-auth",
        "--user",
        "alice:pw",
    ]);
    let base = minute_of(now_secs());
    let request = fluentd_request(
        "sec.ok",
        &entries("ok", base, 3, false),
        3,
        "text",
        "b2sK\n",
    );

    // The right key and user: PONG true with the server's proof, then requests are served.
    let (mut conn, helo, pong) = handshake(sidecar.port, "k1", Some(("alice", "pw")));
    assert_eq!(
        (helo.nonce.len(), helo.auth.len(), helo.keepalive),
        (16, 16, true)
    );
    assert_eq!(pong[1].as_bool(), Some(true), "{pong}");
    assert_eq!(pong[3].as_str(), Some("sidecar-a"));
    assert_eq!(
        pong[4].as_str(),
        Some(pong_digest(&helo, "sidecar-a", "k1").as_str())
    );
    conn.write_all(&request).unwrap();
    expect_ack(&mut conn, b"b2sK\n");

    for (key, user, reason) in [
        ("wrong", ("alice", "pw"), "shared_key mismatch"),
        ("k1", ("alice", "nope"), "username/password mismatch"),
        ("k1", ("mallory", "pw"), "username/password mismatch"),
    ] {
        let (mut conn, _, pong) = handshake(sidecar.port, key, Some(user));
        assert_eq!(
            (pong[1].as_bool(), pong[2].as_str()),
            (Some(false), Some(reason))
        );
        assert!(closed_silently(&mut conn), "closed after {reason}");
    }
    // A client that skips the handshake and sends events: they are never stored.
    let mut conn = connect(sidecar.port);
    read_helo(&mut conn);
    conn.write_all(&request).unwrap();
    let pong = read_value(&mut conn);
    assert_eq!(
        (pong[1].as_bool(), pong[2].as_str()),
        (Some(false), Some("invalid ping message"))
    );
    assert!(closed_silently(&mut conn));

    // A client that announces a PING of 100 MiB: closed at once, nothing held for it.
    let mut conn = connect(sidecar.port);
    read_helo(&mut conn);
    conn.write_all(&[0x96, 0xdb, 0x06, 0x40, 0x00, 0x00])
        .unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut buf = [0u8; 64];
    match conn.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("the connection stays open: {other:?}"),
    }

    // A client that says nothing after the HELO: closed once the handshake's time is up.
    let mut conn = connect(sidecar.port);
    read_helo(&mut conn);
    conn.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    match conn.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("a silent client stays connected: {other:?}"),
    }

    sidecar.await_metrics_blocking("each refusal is counted by its reason", |m| {
        [
            "shared_key_mismatch",
            "user_mismatch",
            "invalid_ping",
            "handshake_timeout",
        ]
        .iter()
        .all(|r| {
            metric_sum(
                m,
                &format!("claimcheck_handshake_failures_total{{reason=\"{r}\"}}"),
            ) >= 1.0
        })
    });
    // The operator's side of the contract: each refusal is logged with the peer's address.
    let log = sidecar.log_text();
    assert!(log.contains("peer=127.0.0.1"), "{log}");
}

#[test]
fn client_rules_pick_the_key_and_deny_anonymous_sources() {
    let matching = Sidecar::standalone(&[
        "--shared-key",
        "default-key",
        "--allow-anonymous-source",
        "false",
        "--client",
        "10.1.2.3",
        "--client",
        "127.0.0.0/8,shared_key=loopback-key",
    ]);
    let (_, _, pong) = handshake(matching.port, "loopback-key", None);
    assert_eq!(pong[1].as_bool(), Some(true), "{pong}");
    let (_, _, pong) = handshake(matching.port, "default-key", None);
    assert_eq!(
        pong[2].as_str(),
        Some("shared_key mismatch"),
        "a matching client must use its rule's key"
    );

    let elsewhere = Sidecar::standalone(&[
        "--shared-key",
        "k",
        "--allow-anonymous-source",
        "false",
        "--client",
        "192.0.2.0/24",
    ]);
    let (mut conn, _, pong) = handshake(elsewhere.port, "k", None);
    assert_eq!(
        pong[2].as_str(),
        Some("anonymous source host '127.0.0.1' denied")
    );
    assert!(closed_silently(&mut conn));
}

/// A CA, a server certificate for localhost and a client certificate, as PEM files.
struct Pki {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

/// The sidecar's flags to serve TLS with `pki`'s server certificate.
fn tls_serving(pki: &Pki) -> [&str; 6] {
    [
        "--transport",
        "tls",
        "--tls-cert-path",
        pki.server_cert.to_str().unwrap(),
        "--tls-private-key-path",
        pki.server_key.to_str().unwrap(),
    ]
}

fn make_pki(dir: &Path) -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "claimcheck test CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf = |names: Vec<String>| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(names.clone()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, names[0].as_str());
        let cert = params.signed_by(&key, &issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = leaf(vec!["localhost".into(), "127.0.0.1".into()]);
    let (client_cert, client_key) = leaf(vec!["fluent-bit.example".into()]);
    let write = |name: &str, pem: &str| {
        let p = dir.join(name);
        std::fs::write(&p, pem).unwrap();
        p
    };
    Pki {
        ca: write("ca.pem", &ca_cert.pem()),
        server_cert: write("server.pem", &server_cert),
        server_key: write("server.key", &server_key),
        client_cert: write("client.pem", &client_cert),
        client_key: write("client.key", &client_key),
    }
}

/// A TLS client of our own (tokio-rustls), with or without a client certificate; returns
/// whether `request` got its ack.
async fn tls_request(port: u16, pki: &Pki, with_cert: bool, request: &[u8], token: &[u8]) -> bool {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(&pki.ca).unwrap())
        .unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = if with_cert {
        builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_file(&pki.client_cert).unwrap()],
                PrivateKeyDer::from_pem_file(&pki.client_key).unwrap(),
            )
            .unwrap()
    } else {
        builder.with_no_client_auth()
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let Ok(mut tls) = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
    else {
        return false;
    };
    if tls.write_all(request).await.is_err() {
        return false;
    }
    let mut buf = vec![0u8; 512];
    let read = tokio::time::timeout(Duration::from_secs(30), tls.read(&mut buf)).await;
    match read {
        Ok(Ok(n)) if n > 0 => {
            assert!(buf[..n].ends_with(token), "ack echoes the token");
            true
        }
        _ => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_the_node_client_and_client_certificates() {
    let env = Emulated::start("tls").await;
    let pki = make_pki(env.dir.path());
    let ca = pki.ca.to_str().unwrap();
    let tls = tls_serving(&pki);
    // TLS and the handshake together, as Fluentd's `transport tls` with `<security>`.
    let sidecar = env.sidecar(
        &[
            &tls[..],
            &["--flush-interval", "1s", "--timekey-wait", "0s"],
            &["--shared-key", "over-tls"],
        ]
        .concat(),
    );
    let base = minute_of(now_secs()) - 600;
    let options = json!({"tlsCaFile": ca,
                         "security": {"clientHostname": "node-tls", "sharedKey": "over-tls"}});
    let mut want = Vec::new();
    for mode in ["PackedForward", "CompressedPackedForward"] {
        let evs = events(&format!("tls.{mode}"), base, 15);
        let acked = node_send_with(sidecar.port, mode, &evs, options.clone());
        assert_eq!(acked.len(), evs.len(), "{mode} over TLS");
        want.extend(evs);
    }
    // Plain TCP on a TLS port gets no ack (at most a TLS alert), and the connection closes.
    let mut plain = connect(sidecar.port);
    plain
        .write_all(&fluentd_request(
            "plain",
            &entries("p", base, 1, false),
            1,
            "text",
            "cA==",
        ))
        .unwrap();
    plain
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut reply = Vec::new();
    let _ = std::io::Read::read_to_end(&mut plain, &mut reply);
    assert!(!reply.windows(3).any(|w| w == b"ack"), "{reply:?}");
    let chunks = env.read_events(want.len()).await;
    assert_exactly_once(&chunks, &want);
    assert!(
        sidecar
            .metric(r#"claimcheck_handshake_failures_total{reason="tls"}"#)
            .await
            >= 1.0
    );

    // Client certificates required: the Node client with one is served; a client without one
    // is not.
    let mtls =
        Sidecar::standalone(&[&tls[..], &["--tls-client-cert-auth", "--tls-ca-path", ca]].concat());
    let evs = events("mtls.node", base, 5);
    let with_cert = json!({"tlsCaFile": ca, "tlsClientCertFile": pki.client_cert,
                           "tlsClientKeyFile": pki.client_key});
    let acked = node_send_with(mtls.port, "PackedForward", &evs, with_cert);
    assert_eq!(
        acked.len(),
        evs.len(),
        "a client certificate from the CA is accepted"
    );
    let request = fluentd_request("mtls", &entries("m", base, 2, false), 2, "text", "bXRscw==");
    assert!(tls_request(mtls.port, &pki, true, &request, b"bXRscw==").await);
    assert!(!tls_request(mtls.port, &pki, false, &request, b"bXRscw==").await);
}

/// Many TLS stacks close without close_notify. A connection closed so after its answer ended
/// in order, as a TCP FIN would: a byte-identical Fluent Bit request on the next connection is
/// new data (a line logged twice), stored, not taken for a resend and dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_connection_closed_without_close_notify_ended_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path());
    let sidecar = Sidecar::standalone(&tls_serving(&pki));
    let (repeated, token) =
        fluent_bit_request("health", &entries("tls", now_secs(), 1, true), 1, false);
    for sent in 1..=2 {
        // `tls_request` drops its stream once it has the ack: no close_notify, a FIN.
        assert!(tls_request(sidecar.port, &pki, false, &repeated, token.as_bytes()).await);
        sidecar
            .await_metrics("the connection closed", |m| {
                metric_sum(m, "claimcheck_connections_open") == 0.0
            })
            .await;
        assert_eq!(
            sidecar.metric("claimcheck_events_received_total").await,
            f64::from(sent),
            "each copy stored"
        );
    }
    assert_eq!(
        sidecar.metric("claimcheck_duplicate_requests_total").await,
        0.0
    );
}

#[test]
fn udp_heartbeats_are_answered_from_the_forward_port() {
    let sidecar = Sidecar::standalone(&[]);
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 16];
    for _ in 0..3 {
        udp.send_to(&[0], sidecar.addr()).unwrap();
        let (n, from) = udp.recv_from(&mut buf).expect("a heartbeat reply");
        assert_eq!((&buf[..n], from), (&[0u8][..], sidecar.addr()));
    }
}

#[test]
fn deny_keepalive_closes_after_the_first_ack() {
    let sidecar = Sidecar::standalone(&["--deny-keepalive", "--shared-key", "k"]);
    let base = minute_of(now_secs());
    let (mut conn, helo, pong) = handshake(sidecar.port, "k", None);
    assert!(!helo.keepalive, "HELO announces keepalive false");
    assert_eq!(pong[1].as_bool(), Some(true));
    let mut two = fluentd_request("ka", &entries("a", base, 2, false), 2, "text", "MQ==");
    two.extend(fluentd_request(
        "ka",
        &entries("b", base, 2, false),
        2,
        "text",
        "Mg==",
    ));
    conn.write_all(&two).unwrap();
    expect_ack(&mut conn, b"MQ==");
    assert!(
        closed_silently(&mut conn),
        "no second request on the connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resent_request_is_acked_again_and_stored_once() {
    let env = Emulated::start("dedup").await;
    let sidecar = env.sidecar(&["--flush-interval", "1s", "--timekey-wait", "0s"]);
    let base = minute_of(now_secs()) - 600;
    let first = fluentd_request("dup", &entries("d", base, 20, false), 20, "text", "ZHVw\n");
    // Sent, acked, and sent again on new connections as Fluentd does after a lost ack.
    for _ in 0..3 {
        let mut conn = connect(sidecar.port);
        conn.write_all(&first).unwrap();
        expect_ack(&mut conn, b"ZHVw\n");
    }
    // A different token is a different request, even with the same events' tag.
    let mut conn = connect(sidecar.port);
    conn.write_all(&fluentd_request(
        "dup",
        &entries("e", base, 5, false),
        5,
        "text",
        "bmV3\n",
    ))
    .unwrap();
    expect_ack(&mut conn, b"bmV3\n");
    let mut want = expected("dup", "d", base, 20);
    want.extend(expected("dup", "e", base, 5));
    let chunks = env.read_events(want.len()).await;
    assert_exactly_once(&chunks, &want);
    assert_eq!(
        sidecar.metric("claimcheck_duplicate_requests_total").await,
        2.0,
        "two resends acked again without storing"
    );
}

/// Fluent Bit's token is a hash of the entries (before compression): the same line flushed
/// again within the second its time was parsed to repeats a token without being a resend. Such a repeat is new data
/// while the earlier copy's connection is open, or ended in order after its ack; it is taken
/// for a resend only when that connection failed before showing the ack arrived, as when
/// Fluent Bit gives up on an ack. Fluentd's tokens are random: a repeat is always a resend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_content_hash_token_is_new_data_unless_its_ack_may_be_lost() {
    use common::load::request;
    use tokio::net::TcpStream;
    let sidecar = Sidecar::standalone(&[]);
    let addr = sidecar.addr();
    let secs = now_secs();
    let mut entries = vec![0x92, 0x92];
    claimcheck_consumer::entry::encode::event_time(
        &mut entries,
        claimcheck_consumer::entry::EventTime::new(secs, 0),
    );
    entries.push(0x80);
    entries.extend(pack(&Value::Map(vec![("check".into(), "ok".into())])));
    let (repeated, token) = fluent_bit_request("health", &entries, 1, false);
    let open = |n: f64| {
        move |m: &std::collections::HashMap<String, f64>| {
            metric_sum(m, "claimcheck_connections_open") == n
        }
    };

    // Twice on a kept-alive connection; then on a second one while the first is open; then
    // on a third that the sender closes in order once it has the ack.
    let mut first = TcpStream::connect(addr).await.unwrap();
    request(&mut first, &repeated, &token).await.unwrap();
    request(&mut first, &repeated, &token).await.unwrap();
    let mut second = TcpStream::connect(addr).await.unwrap();
    request(&mut second, &repeated, &token).await.unwrap();
    let mut third = TcpStream::connect(addr).await.unwrap();
    request(&mut third, &repeated, &token).await.unwrap();
    drop(third);
    sidecar
        .await_metrics("the third connection closed", open(2.0))
        .await;
    let mut fourth = TcpStream::connect(addr).await.unwrap();
    request(&mut fourth, &repeated, &token).await.unwrap();
    // The fourth connection is reset after the ack: the ack may not have arrived.
    fourth.set_zero_linger().unwrap();
    drop(fourth);
    sidecar
        .await_metrics("the fourth connection reset", open(2.0))
        .await;
    // So the same request on a fifth connection is the resend, acked and not stored.
    let mut fifth = TcpStream::connect(addr).await.unwrap();
    request(&mut fifth, &repeated, &token).await.unwrap();
    assert_eq!(
        sidecar.metric("claimcheck_events_received_total").await,
        5.0,
        "five distinct requests stored"
    );
    assert_eq!(
        sidecar.metric("claimcheck_duplicate_requests_total").await,
        1.0,
        "one resend"
    );
    // Fluent Bit resends the whole chunk: a second record with the same line, behind the
    // resend on the same connection, is new data (in Message mode each record is a request
    // with its own hash, so the fourth connection's chunk could have held it unsent).
    request(&mut fifth, &repeated, &token).await.unwrap();
    assert_eq!(
        sidecar.metric("claimcheck_events_received_total").await,
        6.0,
        "the record behind the resend stored"
    );

    // A Fluentd token repeated on a connection that is still open is a resend.
    let mut entries = vec![0x92];
    claimcheck_consumer::entry::encode::event_time(
        &mut entries,
        claimcheck_consumer::entry::EventTime::new(secs, 1),
    );
    entries.extend(pack(&Value::Map(vec![("check".into(), "fd".into())])));
    let fluentd_token = "ZmQtY2h1bmstaWQtMDAwMQ==\n";
    let resent = fluentd_request("health", &entries, 1, "text", fluentd_token);
    request(&mut first, &resent, fluentd_token).await.unwrap();
    request(&mut first, &resent, fluentd_token).await.unwrap();
    assert_eq!(
        sidecar.metric("claimcheck_events_received_total").await,
        7.0,
        "the Fluentd chunk stored once"
    );
    assert_eq!(
        sidecar.metric("claimcheck_duplicate_requests_total").await,
        2.0
    );

    // With `Compress gzip` the token hashes the entries before compression.
    let (compressed, token) = fluent_bit_request("health", &entries, 1, true);
    request(&mut second, &compressed, &token).await.unwrap();
    request(&mut second, &compressed, &token).await.unwrap();
    assert_eq!(
        sidecar.metric("claimcheck_events_received_total").await,
        9.0,
        "a gzip request repeated on an open connection stored twice"
    );

    // Message mode (Fluent Bit with a dynamic tag): a request per record, whose token hashes
    // the record as Fluent Bit holds it, `[[time, {}], record]`, not what it sends. The same
    // line twice on an open connection is two events.
    use claimcheck_consumer::entry::{encode, EventTime};
    let time = EventTime::new(secs, 2);
    let record = pack(&Value::Map(vec![("check".into(), "fb".into())]));
    let mut held = vec![0x92, 0x92];
    encode::event_time(&mut held, time);
    held.push(0x80);
    held.extend(&record);
    let token = fluent_bit_token(&held);
    let mut message = vec![0x94];
    message.extend(pack(&"health.dynamic".into()));
    encode::event_time(&mut message, time);
    message.extend(&record);
    message.extend(pack(&Value::Map(vec![
        ("chunk".into(), token.as_str().into()),
        ("fluent_signal".into(), 0.into()),
    ])));
    request(&mut second, &message, &token).await.unwrap();
    request(&mut second, &message, &token).await.unwrap();
    assert_eq!(
        sidecar.metric("claimcheck_events_received_total").await,
        11.0,
        "a Message-mode record repeated on an open connection stored twice"
    );
    drop((first, second, fifth));
}

/// A request refused after an ack (here bytes that are no msgpack) is a request read after
/// it, as one handled is: the ack had arrived, so the same entries again on another
/// connection are new data, not a resend of the acked copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_refused_after_an_ack_shows_the_ack_arrived() {
    use common::load::request;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpStream;
    let sidecar = Sidecar::standalone(&[]);
    let mut entries = vec![0x92, 0x92];
    claimcheck_consumer::entry::encode::event_time(
        &mut entries,
        claimcheck_consumer::entry::EventTime::new(now_secs(), 0),
    );
    entries.push(0x80);
    entries.extend(pack(&Value::Map(vec![("check".into(), "ok".into())])));
    let (repeated, token) = fluent_bit_request("health", &entries, 1, false);
    let mut first = TcpStream::connect(sidecar.addr()).await.unwrap();
    request(&mut first, &repeated, &token).await.unwrap();
    first.write_all(&[0xc1]).await.unwrap();
    sidecar
        .await_metrics("the garbage refused", |m| {
            metric_sum(
                m,
                r#"claimcheck_requests_refused_total{reason="not_msgpack"}"#,
            ) == 1.0
                && metric_sum(m, "claimcheck_connections_open") == 0.0
        })
        .await;
    let mut second = TcpStream::connect(sidecar.addr()).await.unwrap();
    request(&mut second, &repeated, &token).await.unwrap();
    assert_eq!(
        sidecar.metric("claimcheck_events_received_total").await,
        2.0
    );
    assert_eq!(
        sidecar.metric("claimcheck_duplicate_requests_total").await,
        0.0
    );
}

/// `[tag, bin(metrics), {"fluent_signal": 1, "chunk": token}]`, as Fluent Bit sends metrics.
fn metrics_request(token: &str) -> Vec<u8> {
    let mut out = vec![0x93];
    out.extend(pack(&"fb.metrics".into()));
    out.extend(pack(&Value::Binary(vec![
        0x81, 0xa4, b'm', b'e', b't', b'a', 0x01,
    ])));
    out.extend(pack(&Value::Map(vec![
        ("fluent_signal".into(), 1.into()),
        ("chunk".into(), token.into()),
    ])));
    out
}

#[test]
fn metrics_and_traces_are_skipped_or_rejected() {
    let skip = Sidecar::standalone(&[]);
    let mut conn = connect(skip.port);
    conn.write_all(&metrics_request("bWV0")).unwrap();
    expect_ack(&mut conn, b"bWV0");

    let reject = Sidecar::standalone(&["--fluent-signal-action", "reject"]);
    let mut conn = connect(reject.port);
    conn.write_all(&metrics_request("bWV0")).unwrap();
    assert!(closed_silently(&mut conn));
    reject.await_metrics_blocking("the request is refused as not logs", |m| {
        metric_sum(m, r#"claimcheck_requests_refused_total{reason="not_logs"}"#) == 1.0
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_keys_add_the_sender_to_every_record() {
    let env = Emulated::start("src").await;
    let sidecar = env.sidecar(&[
        "--flush-interval",
        "1s",
        "--timekey-wait",
        "0s",
        "--source-address-key",
        "source_ip",
        "--source-hostname-key",
        "source_host",
    ]);
    let base = minute_of(now_secs()) - 600;
    let evs = events("src.node", base, 10);
    let acked = node_send(sidecar.port, "CompressedPackedForward", &evs);
    assert_eq!(acked.len(), evs.len());
    let chunks = env.read_events(evs.len()).await;
    let mut seen = 0;
    for e in chunks.iter().flat_map(|c| &c.events) {
        let r = e.record_json();
        assert_eq!(r["source_ip"], "127.0.0.1", "{r}");
        assert!(
            r["source_host"].as_str().is_some_and(|h| !h.is_empty()),
            "{r}"
        );
        assert!(r["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("src.node")));
        seen += 1;
    }
    assert_eq!(seen, evs.len());
}

#[test]
fn a_connected_but_silent_sender_is_closed_after_idle_timeout() {
    let sidecar = Sidecar::standalone(&["--idle-timeout", "1s"]);
    let mut idle = connect(sidecar.port);
    assert!(closed_silently(&mut idle), "closed by the sidecar");
    assert!(TcpStream::connect(sidecar.addr()).is_ok(), "still serving");
}

/// Runs `claimcheck bench` with `args` and returns its JSON report.
fn bench(args: &[&str]) -> serde_json::Value {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_claimcheck"))
        .arg("bench")
        .args(args)
        .arg("--json")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "claimcheck bench {args:?}: {stderr}");
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_load_generator_speaks_tls_and_the_handshake() {
    let env = Emulated::start("bench").await;
    let pki = make_pki(env.dir.path());
    let sidecar = env.sidecar(
        &[
            &tls_serving(&pki)[..],
            &[
                "--shared-key",
                "bench-key",
                "--user-auth",
                "--user",
                "loader:s3cret",
                "--flush-interval",
                "1s",
                "--timekey-wait",
                "0s",
            ],
        ]
        .concat(),
    );
    let target = sidecar.addr().to_string();
    let ca = pki.ca.to_str().unwrap();
    let secured = [
        "--target",
        &target,
        "--tls",
        "--tls-ca-path",
        ca,
        "--tls-server-name",
        "localhost",
        "--shared-key",
        "bench-key",
        "--user",
        "loader:s3cret",
        "--events-per-message",
        "50",
        "--rate",
        "1000",
        "--duration",
        "1s",
    ];
    // Two runs against one sidecar: the second's tokens must not look like resends of the
    // first's, or its events would be acked without being stored.
    let mut acked = 0;
    for mode in ["packed", "zstd"] {
        let report = bench(&[&secured[..], &["--mode", mode]].concat());
        assert_eq!(report["errors"].as_u64(), Some(0), "{report}");
        let events = report["events"].as_u64().unwrap();
        assert!(
            events >= 500,
            "{mode}: only {events} events acked: {report}"
        );
        acked += events;
    }
    // What it reports acked is what arrives downstream, once each.
    let chunks = env.read_events(acked as usize).await;
    let delivered: usize = chunks.iter().map(|c| c.events.len()).sum();
    assert_eq!(delivered as u64, acked);

    // A wrong key or password is a clear failure, not a quiet zero.
    for (flag, value, reason) in [
        (
            "--shared-key",
            "wrong",
            "handshake refused: shared_key mismatch",
        ),
        ("--user", "loader:wrong", "handshake refused"),
    ] {
        let mut args = secured.to_vec();
        let at = args.iter().position(|a| *a == flag).unwrap();
        args[at + 1] = value;
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_claimcheck"))
            .arg("bench")
            .args(&args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flag} {value}: {stderr}");
        assert!(stderr.contains(reason), "{flag} {value}: {stderr}");
    }
}

/// A client speaking the forward protocol in JSON (Fluentd's in_forward takes it;
/// fluent-logger-php sends it by default) is refused at its first byte, logged and counted,
/// rather than read as a run of small msgpack integers skipped one by one with its events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_in_json_is_refused_and_counted_not_read_byte_by_byte() {
    let sidecar = Sidecar::standalone(&[]);
    let mut conn = connect(sidecar.port);
    conn.write_all(br#"["app.php",1700000000,{"message":"hello"}]"#)
        .unwrap();
    assert!(closed_silently(&mut conn), "closed without an ack");
    sidecar
        .await_metrics("the JSON request refused", |m| {
            metric_sum(m, r#"claimcheck_requests_refused_total{reason="json"}"#) == 1.0
        })
        .await;
    let m = sidecar.metrics().await;
    assert_eq!(metric_sum(&m, "claimcheck_events_skipped_total"), 0.0);
    assert_eq!(metric_sum(&m, "claimcheck_events_received_total"), 0.0);
}

/// A Forward mode request (its entries an array) whose options say `compressed`: only packed
/// entries (a str or bin) can be compressed, and Fluentd reads the option only for them, so
/// these are plain entries, stored and acked, not a failed decompression that closes the
/// connection at every resend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_compressed_option_of_entries_in_an_array_is_ignored_as_fluentd_does() {
    let sidecar = Sidecar::standalone(&[]);
    let mut request = vec![0x93];
    request.extend(pack(&"fwd.array".into()));
    rmp::encode::write_array_len(&mut request, 2).unwrap();
    request.extend(entries("array", now_secs(), 2, false));
    request.extend(pack(&Value::Map(vec![
        ("chunk".into(), "YXJyYXktZ3ppcA==".into()),
        ("compressed".into(), "gzip".into()),
    ])));
    let mut conn = connect(sidecar.port);
    conn.write_all(&request).unwrap();
    expect_ack(&mut conn, b"YXJyYXktZ3ppcA==");
    assert_eq!(
        sidecar.metric("claimcheck_events_received_total").await,
        2.0
    );
}

/// A request whose tag is not a string has its events skipped as invalid and is acked, as
/// Fluentd does: refused without an ack, a sender that waits for one would resend it for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_tag_is_not_a_string_is_skipped_and_acked() {
    let sidecar = Sidecar::standalone(&[]);
    let mut request = vec![0x93, 0xc0];
    rmp::encode::write_array_len(&mut request, 1).unwrap();
    request.extend(entries("no-tag", now_secs(), 1, false));
    request.extend(pack(&Value::Map(vec![("chunk".into(), "bm8tdGFn".into())])));
    let mut conn = connect(sidecar.port);
    conn.write_all(&request).unwrap();
    expect_ack(&mut conn, b"bm8tdGFn");
    let m = sidecar.metrics().await;
    assert_eq!(
        metric_sum(
            &m,
            r#"claimcheck_events_skipped_total{reason="invalid tag"}"#
        ),
        1.0
    );
    assert_eq!(metric_sum(&m, "claimcheck_events_received_total"), 0.0);
}

/// A request refused (here gzip that does not decompress) closes its connection; the requests
/// before it on that connection, stored, are acked first, so that their senders need not
/// resend them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_request_is_answered_after_the_stored_ones_before_it() {
    let sidecar = Sidecar::standalone(&[]);
    let base = now_secs();
    let mut both = fluentd_request(
        "fd.first",
        &entries("first", base, 2, false),
        2,
        "text",
        "Zmlyc3Q=\n",
    );
    both.extend(fluentd_request(
        "fd.second",
        b"\x1f\x8b\x08\x00 not gzip after all",
        1,
        "gzip",
        "c2Vjb25k\n",
    ));
    let mut conn = connect(sidecar.port);
    conn.write_all(&both).unwrap();
    expect_ack(&mut conn, b"Zmlyc3Q=\n");
    assert!(closed_silently(&mut conn), "no ack for the refused one");
    let m = sidecar.metrics().await;
    assert_eq!(metric_sum(&m, "claimcheck_events_received_total"), 2.0);
    assert_eq!(
        metric_sum(
            &m,
            r#"claimcheck_requests_refused_total{reason="decompression"}"#
        ),
        1.0
    );
}
