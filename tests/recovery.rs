//! Torn and broken buffers, and dead letters, at the process level: whatever a crash or a bad
//! disk leaves in the buffer directory, the sidecar starts, delivers every whole entry, and
//! keeps what it cannot read in `quarantine/` with an ERROR line. Chunks that exhaust their
//! retry budget wait in `dead/` until `claimcheck replay` puts them back.

mod common;

use std::io::Write;
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use claimcheck::buffer::chunk::{
    self, ChunkHeader, ChunkPaths, ChunkState, ChunkStats, ChunkWriter,
};
use claimcheck_consumer::entry::{encode, EventTime};
use common::load::{record_of, Load};
use common::proxy::Fault;
use common::*;

/// Writes an open chunk with `frames` frames of `per_frame` events (ids from `first_id`).
fn open_chunk(
    dir: &std::path::Path,
    tag: &str,
    first_id: u64,
    frames: u64,
    per_frame: u64,
) -> (ChunkPaths, ChunkHeader, ChunkStats) {
    let id = uuid::Uuid::now_v7().simple().to_string();
    let secs = minute_of(now_secs()) - 600;
    let header = ChunkHeader {
        chunk_id: id.clone(),
        tag: tag.into(),
        timekey: secs,
        created_ms: 0,
    };
    let paths = ChunkPaths::new(dir, &id);
    let mut w = ChunkWriter::create(&paths.data, &header).unwrap();
    let mut stats = ChunkStats::default();
    for f in 0..frames {
        let mut frame = Vec::new();
        for i in 0..per_frame {
            let t = EventTime::new(secs + 1, 0);
            frame.push(0x92);
            encode::event_time(&mut frame, t);
            rmpv::encode::write_value(&mut frame, &record_of(first_id + f * per_frame + i))
                .unwrap();
            stats.add(1, 0, t, t);
        }
        stats.body_bytes += frame.len() as u64;
        w.append(&[Bytes::from(frame)], &[]).unwrap();
    }
    w.sync().unwrap();
    stats.data_len = w.valid_len();
    (paths, header, stats)
}

fn ids_of(chunks: &[claimcheck_consumer::ResolvedChunk]) -> Vec<u64> {
    let mut ids: Vec<u64> = chunks
        .iter()
        .flat_map(|c| &c.events)
        .map(|e| e.record_json()["id"].as_u64().unwrap())
        .collect();
    ids.sort();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torn_tails_broken_states_and_strangers_are_kept_aside_and_every_whole_entry_delivered() {
    let env = Emulated::start("torn").await;
    let chunks = env.buffer_dir().join("chunks");
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

    let sidecar = env.sidecar(&["--flush-interval", "1s"]);
    let delivered = ids_of(&env.read_events(50).await);
    let want: Vec<u64> = (0..30).chain(100..120).chain(200..210).collect();
    assert_eq!(
        delivered, want,
        "every whole entry is delivered once, nothing else"
    );

    let quarantine = env.buffer_dir().join("quarantine");
    let kept: Vec<String> = std::fs::read_dir(&quarantine)
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
    let log = sidecar.log_text();
    for what in [
        "unknown file in the buffer",
        "chunk data file is unreadable",
        "chunk state file is unreadable",
    ] {
        assert!(
            log.lines().any(|l| l.contains("ERROR") && l.contains(what)),
            "ERROR line for {what}:\n{log}"
        );
    }
    assert!(log.contains("cut a torn tail"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_out_of_retries_wait_in_dead_letters_until_replayed() {
    let env = Emulated::start("dead").await;
    let proxies = env.proxies().await;
    let s3 = &proxies.s3;
    s3.set(Fault::Down);
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
    let sidecar = env.sidecar_behind(&proxies, &args);
    let load = Load::start(sidecar.port, 2, 20, 3);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !sidecar
        .log_text()
        .contains("moved to the dead-letter folder")
    {
        assert!(Instant::now() < deadline, "nothing was dead-lettered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let load = load.stop().await;
    // Let the last chunks exhaust their retries too.
    let chunks_dir = env.buffer_dir().join("chunks");
    while std::fs::read_dir(&chunks_dir).unwrap().count() > 0 {
        assert!(
            Instant::now() < deadline,
            "chunks were neither delivered nor dead-lettered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let claimcheck = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_claimcheck"))
            .args(args)
            .arg("--buffer-dir")
            .arg(env.buffer_dir())
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
            .collect::<Vec<_>>()
    };
    let dead = claimcheck(&["replay", "--list"]);
    assert!(!dead.is_empty());
    assert!(sidecar
        .log_text()
        .lines()
        .any(|l| l.contains("ERROR") && l.contains("retry budget exhausted")));

    // S3 is back; replaying one chunk, then the rest, while the sidecar runs.
    s3.set(Fault::None);
    assert_eq!(claimcheck(&["replay", &dead[0]]), vec![dead[0].clone()]);
    assert_eq!(claimcheck(&["replay"]), dead[1..].to_vec());
    assert!(claimcheck(&["replay", "--list"]).is_empty());
    let delivered = env.read_events(load.acked.len()).await;
    let ids = ids_of(&delivered);
    assert!(
        load.acked.iter().all(|id| ids.binary_search(id).is_ok()),
        "every acknowledged event arrives after the replay"
    );
    assert!(ids.windows(2).all(|w| w[0] != w[1]), "once each");
    assert!(sidecar
        .log_text()
        .contains("picked up a chunk put back in the buffer"));
}
