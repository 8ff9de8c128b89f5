//! Torn and broken buffers, and dead letters: whatever a crash or a bad disk leaves in the
//! buffer directory, the sidecar starts, delivers every whole entry, and keeps what it cannot
//! read in `quarantine/` (counted, with an ERROR line). Chunks that exhaust their retry budget
//! wait in `dead/` until `claimcheck replay` (the real binary) puts them back. The sidecar runs
//! in-process on the in-memory backends.

mod common;

use std::io::Write;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use claimcheck::buffer::chunk::{self, ChunkState};
use claimcheck::testing::{MemorySink, MemoryStore};
use common::in_process::{delivered, id_counts, InProcess};
use common::load::Load;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torn_tails_broken_states_and_strangers_are_kept_aside_and_every_whole_entry_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let buffer = dir.path().join("buffer");
    let chunks = buffer.join("chunks");
    std::fs::create_dir_all(&chunks).unwrap();

    // 1. An open chunk whose last frame was torn by a crash (never acknowledged).
    let (torn, _, _) = open_chunk(&chunks, "torn", 0, 3, 10);
    std::fs::OpenOptions::new()
        .append(true)
        .open(&torn.data)
        .unwrap()
        .write_all(&[200, 1, 0, 0, 9, 9, 9, 9, 0x92, 0xd7, 0])
        .unwrap();
    // 2. A sealed chunk whose state file is damaged.
    let (bad_state, header, stats) = open_chunk(&chunks, "state", 100, 2, 10);
    chunk::write_state(&bad_state.state, &ChunkState::Sealed { header, stats }).unwrap();
    std::fs::write(&bad_state.state, b"{\"sealed\": {\"header\": tru").unwrap();
    // 3. A chunk whose state file is missing altogether (crash before the seal was written).
    let (_no_state, _, _) = open_chunk(&chunks, "nostate", 200, 2, 5);
    // 4. A stranger and a data file that is not one.
    std::fs::write(chunks.join("notes.txt"), b"someone left this here").unwrap();
    let garbage = chunks.join(format!("{}.chunk", "f".repeat(32)));
    std::fs::write(&garbage, b"this is not a chunk file at all").unwrap();

    let sidecar = InProcess::start_on(
        &buffer,
        &["--flush-interval", "1s"],
        Arc::new(MemoryStore::new("in-memory")),
        Arc::new(MemorySink::new()),
    )
    .await;
    // The stranger, the garbage, the damaged state file and a copy of the torn tail.
    assert_eq!(
        sidecar.metric("claimcheck_files_quarantined_total").await,
        4.0
    );
    tokio::time::timeout(Duration::from_secs(60), sidecar.sink.wait_for(3))
        .await
        .expect("the three chunks with whole entries are published");
    let (store, sink) = sidecar.shut_down().await;
    let delivered = delivered(&store, &sink);
    assert_eq!(delivered.len(), 3);
    let mut ids: Vec<u64> = id_counts(&delivered).into_keys().collect();
    ids.sort();
    let want: Vec<u64> = (0..30).chain(100..120).chain(200..210).collect();
    assert_eq!(
        ids, want,
        "every whole entry is delivered once, nothing else"
    );

    let kept: Vec<String> = std::fs::read_dir(buffer.join("quarantine"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    for name in [
        "notes.txt".to_string(),
        format!("{}.chunk", "f".repeat(32)),
        format!("{}", bad_state.state.file_name().unwrap().to_string_lossy()),
    ] {
        assert!(kept.contains(&name), "{name} kept in quarantine: {kept:?}");
    }
    assert!(
        kept.iter().any(|n| n.contains(".tail-")),
        "the torn tail is kept too: {kept:?}"
    );
    assert_eq!(kept.len(), 4, "{kept:?}");
}

/// Runs `claimcheck ARGS --buffer-dir BUFFER`; its stdout lines.
fn claimcheck(buffer: &std::path::Path, args: &[&str]) -> Vec<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_claimcheck"))
        .args(args)
        .arg("--buffer-dir")
        .arg(buffer)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_out_of_retries_wait_in_dead_letters_until_replayed() {
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "--flush-interval",
        "300ms",
        "--timekey-wait",
        "0s",
        "--retry-wait",
        "100ms",
        "--retry-max-interval",
        "200ms",
        "--retry-max-times",
        "2",
        "--inline-max-bytes",
        "0",
    ];
    let sidecar = InProcess::start(&dir, &args).await;
    sidecar.store.set_down(true);
    let load = Load::start(sidecar.port(), 2, 20, 3);
    sidecar
        .await_metrics("a chunk is dead-lettered", |m| {
            m["claimcheck_chunks_dead_lettered_total"] > 0.0
        })
        .await;
    let load = load.stop().await;
    // The last chunks are sealed and exhaust their retries too.
    sidecar
        .await_metrics("every chunk is dead-lettered", |m| {
            metric_sum(m, "claimcheck_buffer_chunks") == 0.0
        })
        .await;
    let buffer = &sidecar.buffer_dir;
    let dead = claimcheck(buffer, &["replay", "--list"]);
    assert_eq!(
        dead.len() as f64,
        sidecar
            .metric("claimcheck_chunks_dead_lettered_total")
            .await
    );
    assert!(sidecar.sink.records().is_empty());

    // S3 is back; replaying one chunk, then the rest, while the sidecar runs.
    sidecar.store.set_down(false);
    assert_eq!(
        claimcheck(buffer, &["replay", &dead[0]]),
        vec![dead[0].clone()]
    );
    assert_eq!(claimcheck(buffer, &["replay"]), dead[1..].to_vec());
    assert!(claimcheck(buffer, &["replay", "--list"]).is_empty());
    tokio::time::timeout(Duration::from_secs(60), sidecar.sink.wait_for(dead.len()))
        .await
        .expect("every replayed chunk is published");
    let (store, sink) = sidecar.shut_down().await;
    let seen = id_counts(&delivered(&store, &sink));
    assert!(
        load.acked.iter().all(|id| seen.contains_key(id)),
        "every acknowledged event arrives after the replay"
    );
    assert!(seen.values().all(|n| *n == 1), "once each");
    assert_eq!(sink.records().len(), dead.len());
}
