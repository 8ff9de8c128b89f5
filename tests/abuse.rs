//! Peers that are idle, slow, many or hostile: none of them may stop the sidecar from serving
//! the others, or make its memory grow without bound. Memory is read from /proc (resident
//! and peak set size), never inferred from timing.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::wire::*;
use common::*;

/// Lets this test process hold `n` more sockets.
fn allow_open_files(n: u64) {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    let want = n + 256;
    if limit.current.is_some_and(|c| c < want) {
        limit.current = Some(limit.maximum.map_or(want, |m| m.min(want)));
        setrlimit(Resource::Nofile, limit).expect("raise the open files limit");
    }
}

#[test]
fn a_thousand_idle_connections_cost_little_and_block_nobody() {
    allow_open_files(1100);
    let sidecar = Sidecar::standalone(&[]);
    let base = minute_of(now_secs());
    let before = sidecar.memory_kib("VmRSS");
    let idle: Vec<TcpStream> = (0..1000).map(|_| connect(sidecar.port)).collect();
    // Half of them started a request and stopped.
    for conn in idle.iter().step_by(2) {
        (&*conn)
            .write_all(&[0x93, 0xa4, b'i', b'd', b'l', b'e'])
            .unwrap();
    }
    let mut active = connect(sidecar.port);
    for i in 0..20 {
        let token = format!("aWRsZQ{i}");
        active
            .write_all(&fluentd_request(
                "busy",
                &entries("busy", base, 50, false),
                50,
                "text",
                &token,
            ))
            .unwrap();
        expect_ack(&mut active, token.as_bytes());
    }
    let after = sidecar.memory_kib("VmRSS");
    let grown_mib = after.saturating_sub(before) / 1024;
    eprintln!("1000 idle connections: resident {before} KiB -> {after} KiB");
    assert!(
        grown_mib < 48,
        "1000 idle connections grew the sidecar by {grown_mib} MiB"
    );
    drop(idle);
}

#[test]
fn a_slow_sender_does_not_hold_up_the_others() {
    let sidecar = Sidecar::standalone(&[]);
    let base = minute_of(now_secs());
    let slow_request = fluentd_request(
        "slow",
        &entries("slow", base, 15, false),
        15,
        "text",
        "c2xvdw==",
    );
    assert!(
        slow_request.len() > 300,
        "a request that takes seconds to trickle in"
    );
    let done = Arc::new(AtomicBool::new(false));
    let mut slow = connect(sidecar.port);
    let trickle = {
        let (mut slow, done, request) = (
            slow.try_clone().unwrap(),
            done.clone(),
            slow_request.clone(),
        );
        std::thread::spawn(move || {
            for byte in request {
                slow.write_all(&[byte]).unwrap();
                std::thread::sleep(Duration::from_millis(10));
            }
            done.store(true, Ordering::SeqCst);
        })
    };
    // Several connections, each a few requests, all acked while the slow one is still sending.
    sidecar.await_metrics_blocking("the slow sender is connected", |m| {
        m["claimcheck_connections_open"] >= 1.0
    });
    for c in 0..5 {
        let mut fast = connect(sidecar.port);
        for i in 0..4 {
            let token = format!("ZmFzdA{c}{i}");
            fast.write_all(&fluentd_request(
                "fast",
                &entries("fast", base, 10, false),
                10,
                "text",
                &token,
            ))
            .unwrap();
            expect_ack(&mut fast, token.as_bytes());
        }
    }
    assert!(
        !done.load(Ordering::SeqCst),
        "every fast request was acked before the slow one finished arriving"
    );
    trickle.join().unwrap();
    expect_ack(&mut slow, b"c2xvdw==");
}

#[test]
fn bombs_oversized_requests_and_garbage_close_only_their_connection_in_bounded_memory() {
    let sidecar = Sidecar::standalone(&[
        "--chunk-size-limit",
        "1MiB",
        "--decompression-size-limit",
        "16MiB",
    ]);
    let base = minute_of(now_secs());
    let mut good = connect(sidecar.port);
    // 256 MiB of zeros is a few hundred KiB of gzip: far over the decompression limit.
    let bomb = fluentd_request(
        "bomb",
        &gzip_members(&vec![0u8; 256 << 20], 1),
        1,
        "gzip",
        "Ym9tYg==",
    );
    let zstd_bomb = fluentd_request(
        "bomb",
        &zstd::encode_all(&vec![b'a'; 256 << 20][..], 3).unwrap(),
        1,
        "zstd",
        "enN0ZA==",
    );
    let oversized = fluentd_request(
        "big",
        &entries("big", base, 60_000, false),
        60_000,
        "text",
        "Ymln",
    );
    let mut garbage = vec![0xc1u8; 1 << 16];
    garbage[0] = 0x93;
    // Many at once, on their own connections.
    let hostile: Vec<std::thread::JoinHandle<bool>> = (0..24)
        .map(|i| {
            let bytes = match i % 4 {
                0 => bomb.clone(),
                1 => zstd_bomb.clone(),
                2 => oversized.clone(),
                _ => garbage.clone(),
            };
            let port = sidecar.port;
            std::thread::spawn(move || {
                let mut c = connect(port);
                let _ = c.write_all(&bytes);
                closed_silently(&mut c)
            })
        })
        .collect();
    for h in hostile {
        assert!(
            h.join().unwrap(),
            "a hostile connection was closed without an ack"
        );
    }
    good.write_all(&fluentd_request(
        "fine",
        &entries("fine", base, 5, false),
        5,
        "text",
        "ZmluZQ==",
    ))
    .unwrap();
    expect_ack(&mut good, b"ZmluZQ==");
    let peak_mib = sidecar.memory_kib("VmHWM") / 1024;
    eprintln!("peak resident set after 24 hostile connections: {peak_mib} MiB");
    assert!(
        peak_mib < 160,
        "peak resident set {peak_mib} MiB: decompression is not bounded"
    );
    // Each refusal is counted by its reason.
    sidecar.await_metrics_blocking("each kind of refusal is counted", |m| {
        ["decompression", "too_large", "not_msgpack"]
            .iter()
            .all(|r| {
                metric_sum(
                    m,
                    &format!("claimcheck_requests_refused_total{{reason=\"{r}\"}}"),
                ) >= 1.0
            })
    });
}
