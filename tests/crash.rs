//! Crash anywhere: kill the sidecar at random moments and at chosen phases under steady load,
//! restart it on the same buffer, repeat, then drain and read everything back through the
//! consumer.
//!
//! The load resends each request whose ack it did not get, with the same token, once the
//! sidecar is back (as Fluentd does). Pass: every acknowledged event is delivered; each event
//! id is delivered in exactly one chunk (the consumer drops repeated chunk ids), so no resend
//! of a request stored before the crash was stored again; below the consumer, duplicates only
//! ever come as whole chunks published again. Each phase a kill aims at must have been hit:
//! the kill between the fsync and the ack is the fault point (`CLAIMCHECK_FAULT`), confirmed
//! by the process dying of SIGABRT; the delivery phases are confirmed by the log line that
//! starts them.
//!
//! `CLAIMCHECK_CRASH_CYCLES` sets the number of kills (default 20), e.g.
//! `CLAIMCHECK_CRASH_CYCLES=200 cargo test --release --test crash -- --nocapture`.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

use aws_sdk_kinesis::types::ShardIteratorType;
use claimcheck_consumer::{Pointer, Resolver, StartPosition, StreamReader};
use common::load::{Load, LoadResult};
use common::*;

/// Where a cycle kills the sidecar.
#[derive(Clone, Copy)]
enum Target {
    /// SIGKILL after a random time: mostly while receiving, writing and fsyncing.
    Random,
    /// The process aborts itself after the fsync of a write round and before its acks (the
    /// fault point, after a random number of rounds).
    AfterSyncBeforeAck,
    /// SIGKILL right after the log shows `marker`, within `max_delay_ms`. With inline bodies,
    /// the "upload" writes the uploaded state holding the body and logs "body stored inline".
    Marker(&'static str, u64),
}

const TARGETS: [(&str, Target); 6] = [
    ("a random moment", Target::Random),
    ("between fsync and ack", Target::AfterSyncBeforeAck),
    ("mid-upload", Target::Marker("chunk sealed", 8)),
    ("between upload and publish", Target::Marker(" stored", 2)),
    ("mid-PutRecords", Target::Marker("sending PutRecords", 4)),
    (
        "between PutRecords and delete",
        Target::Marker("pointer published", 1),
    ),
];

/// The most a cycle waits for its phase.
const PHASE_TIMEOUT: Duration = Duration::from_secs(30);

/// Kills the sidecar at `target`; returns whether the target was hit (false: killed anyway,
/// after waiting [`PHASE_TIMEOUT`] for it).
async fn kill_at(sidecar: &mut Sidecar, target: Target) -> bool {
    let hit = match target {
        Target::Random => {
            tokio::time::sleep(Duration::from_millis(rand::random_range(100..1200))).await;
            true
        }
        Target::AfterSyncBeforeAck => {
            let status = tokio::task::block_in_place(|| sidecar.wait_exit(PHASE_TIMEOUT));
            status.is_some_and(|s| s.signal() == Some(SIGABRT))
        }
        Target::Marker(marker, max_delay_ms) => {
            // Only occurrences logged after this point count.
            let seen = sidecar.log_text().matches(marker).count();
            let deadline = Instant::now() + PHASE_TIMEOUT;
            loop {
                if sidecar.log_text().matches(marker).count() > seen {
                    tokio::time::sleep(Duration::from_millis(rand::random_range(0..=max_delay_ms)))
                        .await;
                    break true;
                }
                if Instant::now() > deadline {
                    break false;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    };
    sidecar.kill9();
    hit
}

/// The signal of `std::process::abort`.
const SIGABRT: i32 = 6;

/// What the sidecar logs when it acks a resent request without storing it.
const RESEND_RECOGNISED: &str = "acknowledging a resent request again";

fn median_ms(d: &mut [Duration]) -> f64 {
    d.sort();
    d.get(d.len() / 2).map_or(0.0, |m| m.as_secs_f64() * 1000.0)
}

fn cycles() -> usize {
    std::env::var("CLAIMCHECK_CRASH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20)
}

/// Reads every record of the stream's shard from the start: pointers as published.
async fn raw_pointers(env: &Emulated) -> Vec<Pointer> {
    let k = &env.aws.kinesis;
    let shards = k
        .list_shards()
        .stream_name(&env.stream)
        .send()
        .await
        .unwrap()
        .shards
        .unwrap_or_default();
    let mut out = Vec::new();
    for shard in shards {
        let mut it = k
            .get_shard_iterator()
            .stream_name(&env.stream)
            .shard_id(shard.shard_id)
            .shard_iterator_type(ShardIteratorType::TrimHorizon)
            .send()
            .await
            .unwrap()
            .shard_iterator;
        while let Some(iterator) = it {
            let page = k
                .get_records()
                .shard_iterator(iterator)
                .limit(10_000)
                .send()
                .await
                .unwrap();
            if page.records.is_empty() {
                break;
            }
            out.extend(
                page.records
                    .iter()
                    .map(|r| Pointer::from_record(r.data.as_ref()).expect("a pointer")),
            );
            it = page.next_shard_iterator;
        }
    }
    out
}

/// Waits until the buffer holds no chunk, then reads the stream through the consumer.
async fn drain_and_read(env: &Emulated, load: &LoadResult) -> (HashMap<u64, Vec<String>>, u64) {
    let deadline = Instant::now() + Duration::from_secs(180);
    while !chunk_files(&env.buffer_dir()).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the buffer did not drain: {:?}",
            chunk_files(&env.buffer_dir())
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let resolver = Resolver::new(env.aws.s3.clone());
    let mut reader = StreamReader::open(
        env.aws.kinesis.clone(),
        resolver,
        &env.stream,
        StartPosition::TrimHorizon,
    )
    .await
    .unwrap();
    // Event id -> chunk ids it was found in.
    let mut seen: HashMap<u64, Vec<String>> = HashMap::new();
    let mut idle = 0;
    while idle < 5 || load.acked.iter().any(|id| !seen.contains_key(id)) {
        match reader.next().await.unwrap() {
            Some(mut delivery) => {
                idle = 0;
                let chunk = delivery.resolve().await.expect("every pointer resolves");
                for event in &chunk.events {
                    let id = event.record_json()["id"]
                        .as_u64()
                        .expect("events carry their id");
                    seen.entry(id)
                        .or_default()
                        .push(chunk.pointer.chunk_id.clone());
                }
                reader.commit(delivery.position());
            }
            None => {
                idle += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        assert!(
            Instant::now() < deadline + Duration::from_secs(60),
            "acknowledged events are missing after the drain"
        );
    }
    (seen, reader.stats().duplicates_dropped)
}

/// `inline_max_bytes`: `0` sends every body to S3; the default sends these (small) chunks
/// inline. `connections`: with one, its requests are written in place by the connection that
/// read them (the fault point is then in that round); with more, by the writer thread.
async fn crash_cycles(sync: &str, inline_max_bytes: &str, connections: usize, cycles: usize) {
    let env = Emulated::start("crash").await;
    let args = [
        "--inline-max-bytes",
        inline_max_bytes,
        "--flush-interval",
        "200ms",
        "--timekey-wait",
        "0s",
        "--chunk-limit-size",
        "64KiB",
        "--retry-wait",
        "100ms",
        "--retry-max-interval",
        "500ms",
        "--sync",
        sync,
    ];
    // Each restart listens on a port of its own choosing; the load follows it.
    let load = Load::start_resending(0, connections, 25, 4);
    // Phase -> (kills aimed at it, kills that hit it).
    let mut phases: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    let started = Instant::now();
    let mut restarts: Vec<Duration> = Vec::new();
    // Resends acked without storing them again, for the figures (the sidecar's counter dies
    // with each process).
    let mut recognised = 0;
    for cycle in 0..cycles {
        let (phase, target) = TARGETS[cycle % TARGETS.len()];
        let fault = format!("abort-after-sync:{}", rand::random_range(1..=40));
        let extra: &[(&str, &str)] = match target {
            Target::AfterSyncBeforeAck => &[("CLAIMCHECK_FAULT", &fault)],
            _ => &[],
        };
        let restart = Instant::now();
        let mut sidecar = env.sidecar_env(0, extra, &args);
        restarts.push(restart.elapsed());
        load.follow(sidecar.port);
        if !matches!(target, Target::AfterSyncBeforeAck) {
            // Let the load reach the new process before aiming at a phase.
            tokio::time::sleep(Duration::from_millis(rand::random_range(50..300))).await;
        }
        let hit = kill_at(&mut sidecar, target).await;
        recognised += sidecar.log_text().matches(RESEND_RECOGNISED).count();
        let counts = phases.entry(phase).or_default();
        counts.0 += 1;
        counts.1 += usize::from(hit);
    }
    let acked_before_last = load.acked_count();
    let final_sidecar = env.sidecar_at(0, None, &args);
    load.follow(final_sidecar.port);
    // The rounds ran where this run means them to.
    final_sidecar.await_rounds_for(connections).await;
    let load = load.stop().await;
    let (seen, duplicates_dropped) = drain_and_read(&env, &load).await;
    recognised += final_sidecar.log_text().matches(RESEND_RECOGNISED).count();
    drop(final_sidecar);
    // Delivered chunks' data files were kept for new chunks to overwrite all along (the kills
    // hit chunks written into reused files too); the last ones are still there.
    assert!(
        !spare_files(&env.buffer_dir()).is_empty(),
        "no delivered chunk's data file kept for reuse"
    );

    let missing: Vec<_> = load
        .acked
        .iter()
        .filter(|id| !seen.contains_key(id))
        .take(5)
        .collect();
    assert!(
        missing.is_empty(),
        "acknowledged events were lost, e.g. {missing:x?}"
    );
    let twice: Vec<_> = seen
        .iter()
        .filter(|(_, chunks)| chunks.len() > 1)
        .take(5)
        .collect();
    if let Some((id, _)) = twice.first() {
        // The whole request of the first one: which of its events went where.
        let request = **id & !0xfff;
        let mut parts: Vec<_> = (request..request + 0x1000)
            .filter_map(|i| Some((i & 0xfff, seen.get(&i)?)))
            .collect();
        parts.sort();
        panic!("events delivered in more than one chunk: {twice:?}; their request: {parts:?}");
    }
    // Below the consumer: a chunk id published more than once must name the same object.
    let raw = raw_pointers(&env).await;
    let mut by_id: HashMap<&str, Vec<&Pointer>> = HashMap::new();
    raw.iter()
        .for_each(|p| by_id.entry(&p.chunk_id).or_default().push(p));
    let republished = by_id.values().filter(|v| v.len() > 1).count();
    for copies in by_id.values().filter(|v| v.len() > 1) {
        let first = copies[0];
        for p in copies {
            assert_eq!(
                (&p.key, p.checksum, p.records, p.stored_bytes),
                (
                    &first.key,
                    first.checksum,
                    first.records,
                    first.stored_bytes
                ),
                "a republished chunk is the same whole chunk"
            );
        }
    }
    let unacked_delivered = seen.keys().filter(|id| !load.acked.contains(id)).count();
    let resent = load.unacked_requests;
    let ids: HashSet<&str> = raw.iter().map(|p| p.chunk_id.as_str()).collect();
    println!(
        "crash harness (sync {sync}, inline_max_bytes {inline_max_bytes}, {connections} connections): {cycles} kills in {:.0} s; {} events acked ({} before the last restart), {} sent; \
         {} delivered, 0 lost, 0 duplicated for the consumer; {} requests resent after a lost ack, {} of them acked without storing them again; {} unacked events delivered once; {} chunks, {} republished \
         (whole chunks, {} pointers dropped by the consumer); restart to listening: median {:.0} ms, max {:.0} ms; \
         kills by phase: {:?}",
        started.elapsed().as_secs_f64(),
        load.acked.len(),
        acked_before_last,
        load.sent,
        seen.len(),
        resent,
        recognised,
        unacked_delivered,
        ids.len(),
        republished,
        duplicates_dropped,
        median_ms(&mut restarts),
        restarts.iter().max().unwrap_or(&Duration::ZERO).as_secs_f64() * 1000.0,
        phases.iter().map(|(p, (_, hit))| (*p, *hit)).collect::<BTreeMap<_, _>>()
    );
    for (phase, (aimed, hit)) in &phases {
        assert_eq!(
            hit, aimed,
            "{phase}: {aimed} kills aimed at it, {hit} hit it"
        );
    }
    assert!(
        load.acked.len() > 1000,
        "the load made progress ({} acked)",
        load.acked.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acked_event_survives_random_kill_9_sync_always() {
    crash_cycles("always", "24KiB", 3, cycles()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acked_event_survives_random_kill_9_sync_always_written_in_place() {
    crash_cycles("always", "24KiB", 1, cycles().div_ceil(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acked_event_survives_random_kill_9_sync_none() {
    // Without fsync the page cache still holds every write when only the process dies.
    crash_cycles("none", "0", 3, cycles().div_ceil(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_stores_or_refuses_each_request_and_exits_zero() {
    let env = Emulated::start("term-load").await;
    let args = ["--flush-interval", "1h", "--shutdown-timeout", "20s"];
    let mut sidecar = env.sidecar_at(0, None, &args);
    let load = Load::start(sidecar.port, 3, 25, 4);
    while load.acked_count() < 3000 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = sidecar.terminate(Duration::from_secs(60));
    assert!(status.success(), "exit status {status}");
    // Every chunk left behind was sealed at shutdown: each data file has its state file.
    let chunks = env.buffer_dir().join("chunks");
    for entry in std::fs::read_dir(&chunks).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "chunk") {
            assert!(
                path.with_extension("state").exists(),
                "{} left open",
                path.display()
            );
        }
    }
    let load = load.stop().await;
    // Whatever was not delivered before the deadline is delivered by the next start.
    let _restarted = env.sidecar_at(0, None, &args);
    let (seen, _) = drain_and_read(&env, &load).await;
    let missing = load
        .acked
        .iter()
        .filter(|id| !seen.contains_key(id))
        .count();
    assert_eq!(
        missing, 0,
        "acknowledged events missing after SIGTERM and restart"
    );
    assert!(seen.values().all(|c| c.len() == 1));
    println!(
        "SIGTERM under load: {} acked, {} delivered, {} requests cut unacknowledged",
        load.acked.len(),
        seen.len(),
        load.unacked_requests
    );
}
