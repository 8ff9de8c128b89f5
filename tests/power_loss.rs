//! Power loss: the sidecar's buffer lives on a file system that drops every byte and every
//! directory change not made durable by fsync (`support/powerfs.rs`, FUSE, mounted by the
//! test). Under a load that resends unacknowledged requests with their token, the power is cut
//! at random moments: the sidecar is killed, everything not synced is thrown away, and the
//! sidecar starts again on what is left, as after a reboot.
//!
//! Pass, with `--sync always`: every acknowledged event is delivered, and none twice. With
//! `--sync interval`: what was acknowledged before an interval sync that completed before a
//! cut is delivered, and none twice. Recovery never fails on what a cut leaves (torn tails, missing state files,
//! renames that did not survive). Each policy runs with one connection (requests written in
//! place) and with two (written by the writer thread). And one cut at a chosen moment: a
//! request stored in pieces, whose last piece (with its token) is on disk and an earlier one
//! is not.

#[path = "support/powerfs.rs"]
mod powerfs;

mod common;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use common::load::{times_delivered, Load};
use common::*;
use powerfs::PowerFs;

/// Interval syncs completed (`--sync interval`), from `/metrics`.
const INTERVAL_SYNCS: &str = r#"claimcheck_buffer_fsync_duration_seconds_count{kind="interval"}"#;

/// The emulators, and a buffer on a file system whose power the test cuts.
struct Powered {
    env: Emulated,
    fs: PowerFs,
    mnt: std::path::PathBuf,
    session: Option<fuser::BackgroundSession>,
}

impl Powered {
    async fn start(name: &str) -> Powered {
        let env = Emulated::start(name).await;
        let mnt = env.dir.path().join("mnt");
        std::fs::create_dir_all(&mnt).unwrap();
        let mut powered = Powered {
            env,
            fs: PowerFs::default(),
            mnt,
            session: None,
        };
        powered.mount();
        powered
    }

    fn mount(&mut self) {
        let session = self.fs.mount(&self.mnt).unwrap_or_else(|e| {
            panic!("this test mounts a FUSE file system (it needs /dev/fuse and the right to mount, as root): {e}")
        });
        self.session = Some(session);
    }

    fn buffer(&self) -> std::path::PathBuf {
        self.mnt.join("buffer")
    }

    /// A sidecar on the buffer, delivering to the emulators.
    fn sidecar(&self, args: &[&str]) -> Sidecar {
        let env = &self.env;
        let aws = aws_env(env.moto.port);
        Sidecar::start_with(0, &self.buffer(), &aws, &env.bucket, &env.stream, args)
    }

    /// Throws away everything not made durable, as a power cut does (the sidecar killed
    /// first).
    fn cut(&mut self) {
        let session = self.session.take().expect("mounted");
        PowerFs::unmount(session, &self.mnt).expect("unmount the file system");
        self.fs.cut_power();
        self.mount();
    }
}

/// `connections`: with one, its requests are written and synced in place by the connection
/// that read them; with more, by the buffer's writer thread.
async fn power_cuts(sync: &str, connections: usize, cycles: usize) {
    let mut power = Powered::start("power").await;
    let buffer = power.buffer();
    let args = [
        "--sync",
        sync,
        "--sync-interval",
        "500ms",
        "--flush-interval",
        "300ms",
        "--timekey-wait",
        "0s",
        "--chunk-limit-size",
        "64KiB",
        "--retry-wait",
        "100ms",
        "--retry-max-interval",
        "500ms",
    ];
    let load = Load::start_resending(0, connections, 20, 3);
    // Events that must survive the cuts: under `always` every acked one, under `interval` those
    // acked before a completed interval sync; each with the number of the first cut it faced
    // (`cycles` for none), for the failure message. Each cut promises only what was acked
    // since the one before, so no event is promised twice.
    let mut promised: HashMap<u64, usize> = HashMap::new();
    let mut at_last_cut: HashSet<u64> = HashSet::new();
    for cut in 0..cycles {
        let mut sidecar = power.sidecar(&args);
        load.follow(sidecar.port);
        let acked_before = load.acked_count();
        tokio::time::sleep(Duration::from_millis(rand::random_range(300..1500))).await;
        if sync == "interval" {
            // What was acked before an interval sync began is durable once that sync is done.
            // The first sync to end after this snapshot may have begun before it: wait for two
            // (a typed signal, so that a slow machine only makes the test slower), then cut
            // at a random moment after.
            let snapshot = load.acked_ids();
            let syncs = |m: &std::collections::HashMap<String, f64>| {
                m.get(INTERVAL_SYNCS).copied().unwrap_or(0.0)
            };
            let before = syncs(&sidecar.metrics().await);
            await_metrics_at(
                sidecar.admin,
                "two interval syncs after the snapshot",
                |m| syncs(m) >= before + 2.0,
                String::new,
            )
            .await;
            tokio::time::sleep(Duration::from_millis(rand::random_range(0..300))).await;
            // Less what was acked before the previous cut: its last interval was at stake then.
            promised.extend(snapshot.difference(&at_last_cut).map(|id| (*id, cut)));
        }
        sidecar.kill9();
        // Every ack the sidecar sent before it died, some of them read after the kill.
        let acked_at_cut = load.acked_when_disconnected().await;
        if sync == "always" {
            // Every ack came before the kill: every one is promised.
            promised.extend(acked_at_cut.difference(&at_last_cut).map(|id| (*id, cut)));
        }
        at_last_cut = acked_at_cut;
        power.cut();
        assert!(
            load.acked_count() > acked_before,
            "the load was acked between cuts"
        );
    }
    let last = power.sidecar(&args);
    load.follow(last.port);
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The rounds ran where this run means them to.
    last.await_rounds_for(connections).await;
    let load = load.stop().await;
    // What was acked after the last cut faced no cut.
    promised.extend(load.acked.difference(&at_last_cut).map(|id| (*id, cycles)));
    // Everything left is delivered: the buffer empties.
    let deadline = Instant::now() + Duration::from_secs(120);
    while !chunk_files(&buffer).is_empty() {
        assert!(Instant::now() < deadline, "the buffer did not drain");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let chunks = power.env.read_events(promised.len()).await;
    let seen = times_delivered(chunks.iter().flat_map(|c| &c.events));
    let mut lost: Vec<(u64, usize)> = promised
        .iter()
        .filter(|(id, _)| !seen.contains_key(id))
        .map(|(id, cut)| (*id, *cut))
        .collect();
    lost.sort_unstable();
    assert!(
        lost.is_empty(),
        "{} acknowledged events lost by a power cut, e.g. (id, the first cut it faced: 0 to {}, \
         or {cycles} for none): {:?}",
        lost.len(),
        cycles - 1,
        &lost[..lost.len().min(5)]
    );
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).take(5).collect();
    assert!(twice.is_empty(), "events delivered twice: {twice:?}");
    let (written, synced) = power.fs.bytes_written_and_synced();
    let acked_lost = load
        .acked
        .iter()
        .filter(|id| !seen.contains_key(id))
        .count();
    println!(
        "sync {sync}, {connections} connections: {cycles} power cuts, {} events acked, {} of them promised (acked before a \
         completed sync before a cut, or after the last cut) and all delivered once; {acked_lost} \
         acked events lost, all acked after the last completed sync before a cut; {written} bytes written, \
         {synced} made durable",
        load.acked.len(),
        promised.len(),
    );
    drop(last);
    drop(power);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_always_loses_nothing_acknowledged_to_a_power_cut() {
    power_cuts("always", 2, 8).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_always_loses_nothing_acknowledged_to_a_power_cut_written_in_place() {
    power_cuts("always", 1, 6).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_interval_loses_at_most_the_last_interval_to_a_power_cut() {
    power_cuts("interval", 2, 6).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_interval_loses_at_most_the_last_interval_to_a_power_cut_written_in_place() {
    power_cuts("interval", 1, 6).await;
}

/// A process crash, a restart that recovers and seals an open chunk, then a power cut before
/// the page cache was written back: the chunk's synced frames must survive. Recovery fsyncs
/// the data before the `sealed` state that records its length; the other way round, the
/// state would survive and the unsynced frame not, and the whole chunk would look short
/// (into `quarantine/`, with its acknowledged events).
#[test]
fn a_chunk_sealed_by_recovery_keeps_its_synced_events_through_a_later_power_cut() {
    use std::sync::Arc;

    use bytes::Bytes;
    use claimcheck::buffer::chunk::{self, ChunkHeader, ChunkPaths, ChunkWriter};
    use claimcheck::buffer::registry::Registry;
    use claimcheck::buffer::{chunks_dir, Buffer, BufferConfig, OverflowAction, SyncPolicy};

    fn entry(t: u32) -> Bytes {
        let mut b = vec![0x92, 0xce];
        b.extend_from_slice(&t.to_be_bytes());
        b.extend_from_slice(&[0x81, 0xa1, b'a', 0x01]);
        Bytes::from(b)
    }
    let open = |dir: &std::path::Path| {
        let config = BufferConfig {
            dir: dir.to_path_buf(),
            timekey: Duration::from_secs(60),
            timekey_wait: Duration::from_secs(0),
            chunk_limit_size: 1 << 20,
            chunk_limit_records: None,
            flush_interval: Duration::from_secs(3600),
            total_limit_size: None,
            overflow_action: OverflowAction::Block,
            sync: SyncPolicy::Always,
            sync_interval: Duration::from_secs(1),
            max_open_files: None,
        };
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        Buffer::open(config, Arc::new(Registry::new()), tx).unwrap()
    };

    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let fs = PowerFs::default();
    let session = fs.mount(&mnt).unwrap();
    let buffer = mnt.join("buffer");
    let chunks = chunks_dir(&buffer);
    chunk::create_dir_durably(&chunks).unwrap();
    let id = "1".repeat(32);
    let paths = ChunkPaths::new(&chunks, &id);
    let header = ChunkHeader {
        chunk_id: id.clone(),
        tag: "t".into(),
        timekey: 0,
        created_ms: 0,
        reused: false,
    };
    let mut writer = ChunkWriter::create(&paths.data, &header).unwrap();
    // Written, fsynced with its directory entry, acknowledged.
    writer.append(&[entry(1)], &[]).unwrap();
    writer.sync().unwrap();
    chunk::sync_dir(&chunks).unwrap();
    // Written; the process dies before the fsync.
    writer.append(&[entry(2)], &[]).unwrap();
    drop(writer);

    let (buffer_1, recovered) = open(&buffer);
    assert_eq!(recovered.sealed.len(), 1);
    assert_eq!(recovered.sealed[0].stats.records, 2);
    drop(buffer_1);
    PowerFs::unmount(session, &mnt).unwrap();
    fs.cut_power();

    let session = fs.mount(&mnt).unwrap();
    let (buffer_2, recovered) = open(&buffer);
    let sealed: Vec<u64> = recovered.sealed.iter().map(|c| c.stats.records).collect();
    let quarantined = recovered.quarantined.clone();
    drop(buffer_2);
    PowerFs::unmount(session, &mnt).unwrap();
    assert_eq!(quarantined, Vec::<std::path::PathBuf>::new());
    assert_eq!(sealed, [2], "the chunk, with what recovery synced");
}

/// A request that expands beyond `--decompression-size-limit` is stored a piece at a time, the
/// token with the last piece. Under `sync interval` an earlier piece can still be in the page
/// cache, in a chunk of its own, when the last piece's chunk is on disk: here the request's
/// first events fall in a timekey a day ahead (their chunk waits, unsynced), the rest in one
/// two days back (sealed, so synced, and delivered at once). The power is cut, as if before
/// the sender read the ack; its resend to the restarted sidecar must be stored again, not
/// acked as stored for the events the cut took.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_stored_in_pieces_is_stored_again_when_resent_after_a_power_cut() {
    use common::wire::{self, connect, expect_ack};
    use std::io::Write;

    const DAY: i64 = 86_400;
    let mut power = Powered::start("power-pieces").await;
    let args = [
        "--sync",
        "interval",
        "--sync-interval",
        "1h",
        "--timekey",
        "1d",
        "--timekey-wait",
        "0s",
        "--flush-interval",
        "1h",
        "--decompression-size-limit",
        "64KiB",
    ];
    let today = now_secs() / DAY * DAY;
    let (ahead, behind) = (today + DAY, today - 2 * DAY);
    let (n_ahead, n_behind) = (5, 20_000);
    let mut entries = wire::entries("ahead", ahead, n_ahead, false);
    entries.extend(wire::entries("behind", behind, n_behind, false));
    assert!(
        entries.len() > 10 * 65536,
        "the request is at least ten pieces"
    );
    let token = "cGllY2VzLXRoZW4tY3V0IQ==\n";
    let request = wire::fluentd_request(
        "fd.pieces",
        &wire::gzip_members(&entries, 1),
        n_ahead + n_behind,
        "gzip",
        token,
    );

    let mut sidecar = power.sidecar(&args);
    let mut conn = connect(sidecar.port);
    conn.write_all(&request).unwrap();
    expect_ack(&mut conn, token.as_bytes());
    sidecar
        .await_metrics("the events two days back published", |m| {
            m.get("claimcheck_events_published_total").copied() == Some(n_behind as f64)
        })
        .await;
    assert_eq!(
        sidecar.metric("claimcheck_requests_in_pieces_total").await,
        1.0
    );
    sidecar.kill9();
    power.cut();

    // The sender never read the ack: it resends to the restarted sidecar.
    let mut sidecar = power.sidecar(&args);
    let mut conn = connect(sidecar.port);
    conn.write_all(&request).unwrap();
    expect_ack(&mut conn, token.as_bytes());
    assert_eq!(
        sidecar.metric("claimcheck_duplicate_requests_total").await,
        0.0,
        "the resend was not taken for stored"
    );
    assert_eq!(
        sidecar.metric("claimcheck_events_received_total").await,
        (n_ahead + n_behind) as f64
    );
    drop(conn);
    // The shutdown seals the chunk a day ahead and delivers it.
    assert!(sidecar.terminate(Duration::from_secs(60)).success());
    let chunks = power.env.read_events(n_ahead + 2 * n_behind).await;
    let seen: HashSet<_> = chunks
        .iter()
        .flat_map(|c| &c.events)
        .map(event_key)
        .collect();
    let lost: Vec<_> = wire::expected("fd.pieces", "ahead", ahead, n_ahead)
        .iter()
        .map(TestEvent::key)
        .filter(|k| !seen.contains(k))
        .collect();
    assert!(
        lost.is_empty(),
        "events of the resent request lost: {lost:?}"
    );
}
