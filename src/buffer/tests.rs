use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use claimcheck_consumer::entry::{self, EventTime};
use tokio::sync::mpsc;

use super::chunk::{self, ChunkState, ChunkWriter, FRAME_HEADER};
use super::*;

pub(super) fn config(dir: &Path) -> BufferConfig {
    BufferConfig {
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
    }
}

fn registry() -> Arc<Registry> {
    Arc::new(Registry::new())
}

pub(super) fn entry_at(secs: i64, pad: usize) -> Bytes {
    let mut b = vec![0x92];
    entry::encode::event_time(&mut b, EventTime::new(secs, 7));
    let record = rmpv::Value::Map(vec![("pad".into(), "x".repeat(pad).into())]);
    rmpv::encode::write_value(&mut b, &record).unwrap();
    Bytes::from(b)
}

pub(super) fn group_of(timekey: i64, entries: &[Bytes]) -> Group {
    let mut g = Group::new(timekey);
    for e in entries {
        let t = entry::scan_entry(e).unwrap().time;
        g.push(e.clone(), 1, t, t);
    }
    g
}

fn body_of(sealed: &SealedChunk) -> Vec<u8> {
    let mut file = File::open(&sealed.paths.data).unwrap();
    let (_, frames) = chunk::read_header(&mut file).unwrap();
    let mut r = chunk::FrameReader::new(file, frames, sealed.stats.data_len).unwrap();
    let (mut out, mut piece) = (Vec::new(), Vec::new());
    while r.next_piece(&mut piece, 1 << 20).unwrap() {
        out.extend_from_slice(&piece);
    }
    out
}

async fn recv(rx: &mut mpsc::UnboundedReceiver<SealedChunk>) -> SealedChunk {
    tokio::time::timeout(Duration::from_secs(30), rx.recv())
        .await
        .expect("a chunk is sealed in time")
        .unwrap()
}

#[tokio::test]
async fn appends_are_durable_then_sealed_by_flush_interval_without_new_input() {
    let dir = tempfile::tempdir().unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut cfg = config(dir.path());
    cfg.flush_interval = Duration::from_millis(300);
    let (buffer, recovered) = Buffer::open(cfg, registry(), tx).unwrap();
    assert!(recovered.sealed.is_empty());
    let handle = buffer.handle.clone();
    let task = tokio::spawn(buffer.run());

    let entries = [entry_at(120, 10), entry_at(130, 20)];
    handle
        .append("app".into(), vec![group_of(120, &entries)])
        .await
        .await
        .unwrap();
    let sealed = recv(&mut rx).await;
    assert_eq!(
        (
            sealed.stats.records,
            sealed.header.tag.as_str(),
            sealed.header.timekey
        ),
        (2, "app", 120)
    );
    assert_eq!(
        body_of(&sealed),
        [&entries[0][..], &entries[1][..]].concat()
    );
    assert!(matches!(
        chunk::read_state(&sealed.paths.state).unwrap(),
        ChunkState::Sealed { .. }
    ));
    drop(handle);
    task.await.unwrap().unwrap();
}

/// Found by the connection fuzz target: an event time near i64::MAX seconds (a valid uint64
/// time) overflowed the seal deadline's arithmetic, and the panic stopped the writer.
#[tokio::test]
async fn an_event_time_near_the_end_of_time_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (buffer, _) = Buffer::open(config(dir.path()), registry(), tx).unwrap();
    let handle = buffer.handle.clone();
    let task = tokio::spawn(buffer.run());

    let secs = i64::MAX - 1;
    let mut e = vec![0x92, 0xcf];
    e.extend_from_slice(&(secs as u64).to_be_bytes());
    e.push(0x80);
    let e = Bytes::from(e);
    let timekey = secs - secs.rem_euclid(60);
    handle
        .append("app".into(), vec![group_of(timekey, &[e])])
        .await
        .await
        .expect("stored");
    drop(handle);
    task.await.unwrap().unwrap();
    let sealed = recv(&mut rx).await;
    assert_eq!((sealed.stats.records, sealed.header.timekey), (1, timekey));
}

#[tokio::test]
async fn chunks_split_by_tag_timekey_size_and_records_and_seal_at_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut cfg = config(dir.path());
    let one = entry_at(60, 100).len() as u64;
    cfg.chunk_limit_size = one * 3;
    cfg.chunk_limit_records = Some(100);
    let (buffer, _) = Buffer::open(cfg, registry(), tx).unwrap();
    let handle = buffer.handle.clone();
    let task = tokio::spawn(buffer.run());

    // Seven entries in one timekey of tag a: chunks of 3, 3, 1.
    let a: Vec<Bytes> = (0..7).map(|i| entry_at(60 + i, 100)).collect();
    // Tag b, two timekeys in one request, plus one entry bigger than a whole chunk.
    let b1 = [entry_at(0, 100)];
    let b2 = [entry_at(120, 1000)];
    let d1 = handle.append("a".into(), vec![group_of(60, &a)]).await;
    let d2 = handle
        .append("b".into(), vec![group_of(0, &b1), group_of(120, &b2)])
        .await;
    d1.await.unwrap();
    d2.await.unwrap();
    drop(handle);
    task.await.unwrap().unwrap();

    let mut sealed = Vec::new();
    while let Ok(s) = rx.try_recv() {
        sealed.push(s);
    }
    let mut shapes: Vec<(String, i64, u64)> = sealed
        .iter()
        .map(|s| (s.header.tag.clone(), s.header.timekey, s.stats.records))
        .collect();
    shapes.sort();
    assert_eq!(
        shapes,
        vec![
            ("a".into(), 60, 1),
            ("a".into(), 60, 3),
            ("a".into(), 60, 3),
            ("b".into(), 0, 1),
            ("b".into(), 120, 1)
        ]
    );
    // Every entry of tag a is stored once, in order across chunks ordered by id.
    let mut a_chunks: Vec<_> = sealed.iter().filter(|s| s.header.tag == "a").collect();
    a_chunks.sort_by(|x, y| x.header.chunk_id.cmp(&y.header.chunk_id));
    let stored: Vec<u8> = a_chunks.iter().flat_map(|s| body_of(s)).collect();
    assert_eq!(stored, a.concat());
    for s in &sealed {
        assert!(
            s.stats.body_bytes <= one * 3 || s.stats.records == 1,
            "{:?}",
            s.stats
        );
    }
}

#[tokio::test]
async fn records_limit_seals_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut cfg = config(dir.path());
    cfg.chunk_limit_records = Some(2);
    let (buffer, _) = Buffer::open(cfg, registry(), tx).unwrap();
    let handle = buffer.handle.clone();
    let task = tokio::spawn(buffer.run());
    let a: Vec<Bytes> = (0..5).map(|i| entry_at(60 + i, 3)).collect();
    handle
        .append("a".into(), vec![group_of(60, &a)])
        .await
        .await
        .unwrap();
    // Two full chunks are sealed at once, without waiting for time or shutdown.
    assert_eq!(recv(&mut rx).await.stats.records, 2);
    assert_eq!(recv(&mut rx).await.stats.records, 2);
    drop(handle);
    task.await.unwrap().unwrap();
    assert_eq!(recv(&mut rx).await.stats.records, 1);
}

#[tokio::test]
async fn a_second_process_cannot_open_the_same_buffer() {
    let dir = tempfile::tempdir().unwrap();
    let (tx, _rx) = mpsc::unbounded_channel();
    let (_first, _) = Buffer::open(config(dir.path()), registry(), tx.clone()).unwrap();
    let err = Buffer::open(config(dir.path()), registry(), tx)
        .err()
        .expect("second open fails");
    assert!(err.to_string().contains("in use"), "{err}");
}

#[test]
fn recovery_seals_open_chunks_cuts_torn_tails_and_requeues_sealed_ones() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let chunks = chunks_dir(dir.path());
    std::fs::create_dir_all(&chunks).unwrap();
    let header = header_of;

    // An open chunk with two whole frames and a torn third.
    let open_paths = ChunkPaths::new(&chunks, &"1".repeat(32));
    let mut w = ChunkWriter::create(&open_paths.data, &header(&"1".repeat(32))).unwrap();
    w.append(&[entry_at(1, 5)], &[]).unwrap();
    w.append(&[entry_at(2, 5), entry_at(3, 5)], &[]).unwrap();
    let good = w.valid_len();
    drop(w);
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&open_paths.data)
        .unwrap();
    f.write_all(&[200, 0, 0, 0, 0, 0, 0, 0, 0x92, 0xd7])
        .unwrap();

    // A sealed chunk and an uploaded one.
    let sealed_paths = ChunkPaths::new(&chunks, &"2".repeat(32));
    let mut w = ChunkWriter::create(&sealed_paths.data, &header(&"2".repeat(32))).unwrap();
    w.append(&[entry_at(4, 5)], &[]).unwrap();
    let stats = ChunkStats {
        records: 1,
        data_len: w.valid_len(),
        ..ChunkStats::default()
    };
    chunk::write_state(
        &sealed_paths.state,
        &ChunkState::Sealed {
            header: header(&"2".repeat(32)),
            stats,
        },
    )
    .unwrap();

    let uploaded_paths = ChunkPaths::new(&chunks, &"5".repeat(32));
    let mut w = ChunkWriter::create(&uploaded_paths.data, &header(&"5".repeat(32))).unwrap();
    w.append(&[entry_at(6, 5)], &[]).unwrap();
    let pointer = claimcheck_consumer::Pointer::from_json(
        br#"{"v":1,"chunk_id":"55555555555555555555555555555555","bucket":"b","key":"k","tag":"t","timekey":0,"first_time":6.000000007,"last_time":6.000000007,"records":1,"bytes":1,"stored_bytes":1,"format":"msgpack","compression":"zstd","checksum":{"crc32c":"00000000"},"producer":"p","created_at":"c"}"#,
    )
    .unwrap();
    // An inline one: its body stays in the state file until the publisher reads it.
    let pointer = pointer.into_inline(Bytes::from_static(b"\x01"));
    let state = ChunkState::uploaded(header(&"5".repeat(32)), stats, pointer.clone(), None);
    chunk::write_state(&uploaded_paths.state, &state).unwrap();

    // Leftovers of a published chunk, an interrupted state write, and garbage.
    std::fs::write(chunks.join(format!("{}.state", "3".repeat(32))), b"{}").unwrap();
    std::fs::write(chunks.join("x.state.tmp"), b"{").unwrap();
    std::fs::write(
        chunks.join(format!("{}.chunk", "4".repeat(32))),
        b"not a chunk at all",
    )
    .unwrap();

    let (tx, _rx) = mpsc::unbounded_channel();
    let (_buffer, recovered) = Buffer::open(config(dir.path()), registry(), tx).unwrap();
    let ids: Vec<&str> = recovered
        .sealed
        .iter()
        .map(|s| s.header.chunk_id.as_str())
        .collect();
    assert_eq!(ids, vec!["1".repeat(32), "2".repeat(32)]);
    assert_eq!(recovered.uploaded.len(), 1);
    let uploaded = &recovered.uploaded[0];
    assert!(uploaded.body_on_disk());
    assert_eq!(
        uploaded.pointer,
        claimcheck_consumer::Pointer {
            inline: None,
            ..pointer.clone()
        }
    );
    let state = chunk::read_state(&uploaded.paths.state).unwrap();
    assert_eq!(state.into_pointer(), Some(pointer));
    let opened = &recovered.sealed[0];
    assert_eq!((opened.stats.records, opened.stats.data_len), (3, good));
    assert_eq!(std::fs::metadata(&open_paths.data).unwrap().len(), good);
    assert!(matches!(
        chunk::read_state(&open_paths.state).unwrap(),
        ChunkState::Sealed { .. }
    ));
    assert_eq!(recovered.quarantined.len(), 1);
    assert!(dir
        .path()
        .join("quarantine")
        .join(format!("{}.chunk", "4".repeat(32)))
        .exists());
    assert!(!chunks.join(format!("{}.state", "3".repeat(32))).exists());
    assert!(!chunks.join("x.state.tmp").exists());
}

/// A data file that cannot be read (an I/O error, here a directory where the file should be)
/// stays where it is rather than going to quarantine with its acknowledged events, and is
/// tried again while the sidecar runs ([`rescan`]); one whose bytes are wrong goes to
/// quarantine.
#[test]
fn an_unreadable_data_file_stays_and_is_recovered_once_it_reads_and_a_damaged_one_goes_aside() {
    let dir = tempfile::tempdir().unwrap();
    let chunks = dir.path().join("chunks");
    std::fs::create_dir_all(&chunks).unwrap();
    let id = "5".repeat(32);
    let unreadable = chunks.join(format!("{id}.chunk"));
    std::fs::create_dir_all(&unreadable).unwrap();
    let damaged = chunks.join(format!("{}.chunk", "6".repeat(32)));
    std::fs::write(
        &damaged,
        b"not a chunk file at all, but long enough to read",
    )
    .unwrap();
    let (tx, _rx) = mpsc::unbounded_channel();
    let registry = registry();
    let (_buffer, recovered) = Buffer::open(config(dir.path()), registry.clone(), tx).unwrap();
    assert!(recovered.sealed.is_empty());
    assert!(unreadable.is_dir(), "left in place");
    assert_eq!(
        recovered.quarantined,
        vec![dir
            .path()
            .join("quarantine")
            .join(damaged.file_name().unwrap())]
    );
    assert_eq!(registry.left_ids().len(), 1);

    // Still unreadable: left for the next try.
    let found = rescan(&chunks, &registry);
    assert!(found.sealed.is_empty() && found.quarantined.is_empty());
    assert_eq!(registry.left_ids().len(), 1);

    // Readable now (the open chunk's file, as the writer left it): sealed and delivered.
    std::fs::remove_dir(&unreadable).unwrap();
    let header = header_of(&id);
    let mut w = ChunkWriter::create(&unreadable, &header).unwrap();
    w.append(&[entry_at(1, 5), entry_at(2, 5)], &[]).unwrap();
    w.sync().unwrap();
    drop(w);
    let found = rescan(&chunks, &registry);
    assert_eq!(found.sealed.len(), 1);
    assert_eq!(found.sealed[0].header.chunk_id, id);
    assert_eq!(found.sealed[0].stats.records, 2);
    assert!(
        chunks.join(format!("{id}.state")).exists(),
        "sealed on disk"
    );
    assert!(registry.contains(&id));
    assert_eq!(registry.left_ids().len(), 0);
    assert!(rescan(&chunks, &registry).sealed.is_empty(), "once");
}

/// A sealed chunk whose file ends before the length its state records (the end of it lost):
/// its whole frames are recovered and sealed again, its old state kept in quarantine; not the
/// whole chunk set aside with the events that did survive.
#[test]
fn a_sealed_chunk_shorter_than_its_state_keeps_its_whole_frames() {
    let dir = tempfile::tempdir().unwrap();
    let chunks = chunks_dir(dir.path());
    std::fs::create_dir_all(&chunks).unwrap();
    let id = "6".repeat(32);
    let header = header_of(&id);
    let paths = ChunkPaths::new(&chunks, &id);
    let mut w = ChunkWriter::create(&paths.data, &header).unwrap();
    w.append(&[entry_at(1, 5), entry_at(2, 5)], &[]).unwrap();
    let first = w.valid_len();
    w.append(&[entry_at(3, 5)], &[]).unwrap();
    let stats = ChunkStats {
        records: 3,
        data_len: w.valid_len(),
        ..ChunkStats::default()
    };
    drop(w);
    chunk::write_state(&paths.state, &ChunkState::Sealed { header, stats }).unwrap();
    chunk::truncate(&paths.data, first + 5).unwrap();

    let (tx, _rx) = mpsc::unbounded_channel();
    let (_buffer, recovered) = Buffer::open(config(dir.path()), registry(), tx).unwrap();
    assert_eq!(recovered.sealed.len(), 1);
    let sealed = &recovered.sealed[0];
    assert_eq!((sealed.stats.records, sealed.stats.data_len), (2, first));
    assert_eq!(std::fs::metadata(&paths.data).unwrap().len(), first);
    match chunk::read_state(&paths.state).unwrap() {
        ChunkState::Sealed { stats, .. } => assert_eq!(stats.records, 2),
        other => panic!("sealed again, not {other:?}"),
    }
    let state_kept = dir.path().join("quarantine").join(format!("{id}.state"));
    assert!(recovered.quarantined.contains(&state_kept));
    assert!(state_kept.exists());
}

#[test]
fn split_front_keeps_order_and_takes_at_least_one_entry() {
    let entries: Vec<Bytes> = (0..4).map(|i| entry_at(i, 10)).collect();
    let one = entries[0].len() as u64;
    let mut g = group_of(0, &entries);
    let front = g.split_front(one * 2 + 1, u64::MAX);
    assert_eq!((front.records, g.records), (2, 2));
    assert_eq!(front.slices.concat(), entries[..2].concat());
    assert_eq!((g.first.secs, g.last.secs), (2, 3));
    let tiny = g.split_front(1, u64::MAX);
    assert_eq!((tiny.records, g.records), (1, 1));
    let by_count = group_of(0, &entries).split_front(u64::MAX, 3);
    assert_eq!(by_count.records, 3);
}

/// A buffer over `config`, its registry, handle, sealed-chunk receiver and writer task.
fn start(
    config: BufferConfig,
) -> (
    Arc<Registry>,
    BufferHandle,
    mpsc::UnboundedReceiver<SealedChunk>,
    tokio::task::JoinHandle<anyhow::Result<DirLock>>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let registry = registry();
    let (buffer, _) = Buffer::open(config, registry.clone(), tx).unwrap();
    let handle = buffer.handle.clone();
    (registry, handle, rx, tokio::spawn(buffer.run()))
}

/// Delivers a sealed chunk the way the publisher does in the end: files gone, index updated.
fn deliver(registry: &Registry, sealed: &SealedChunk) {
    sealed.paths.remove().unwrap();
    registry.remove(&sealed.header.chunk_id);
}

#[tokio::test]
async fn a_full_buffer_holds_acks_until_delivery_frees_space() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    let one = entry_at(60, 1000);
    cfg.total_limit_size = Some(3 * one.len() as u64);
    let (registry, handle, mut sealed_rx, task) = start(cfg);

    // Fill the buffer: these are acknowledged.
    for i in 0..3 {
        handle
            .append("full".into(), vec![group_of(60, &[entry_at(60 + i, 1000)])])
            .await
            .await
            .unwrap();
    }
    // Full now: the open chunk is sealed so that delivery can free space...
    let sealed = recv(&mut sealed_rx).await;
    assert_eq!(sealed.stats.records, 3);
    // ...and the next request waits, unacknowledged, counted as waiting.
    assert_eq!(registry.requests_waiting(), 0);
    let mut waiting = Box::pin(
        handle
            .append("full".into(), vec![group_of(60, &[entry_at(70, 1000)])])
            .await,
    );
    assert_eq!(registry.requests_waiting(), 1);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut waiting)
            .await
            .is_err(),
        "no ack while the buffer is full"
    );
    assert_eq!(registry.requests_waiting(), 1);
    assert!(registry.usage() >= 3 * one.len() as u64);

    deliver(&registry, &sealed);
    tokio::time::timeout(Duration::from_secs(30), waiting)
        .await
        .expect("acked once there is room")
        .unwrap();
    assert_eq!(registry.requests_waiting(), 0);
    drop(handle);
    task.await.unwrap().unwrap();
    assert_eq!(recv(&mut sealed_rx).await.stats.records, 1);
}

/// At shutdown every connection is gone, their handles with them, while the buffer is full
/// and delivery frees nothing: the writer stops all the same (it did not, and the sidecar
/// never exited), and the request that waited is not acked.
#[tokio::test]
async fn a_full_buffer_stops_once_every_handle_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    let one = entry_at(60, 1000);
    cfg.total_limit_size = Some(one.len() as u64);
    let (registry, handle, _sealed_rx, task) = start(cfg);
    handle
        .append("full".into(), vec![group_of(60, &[entry_at(60, 1000)])])
        .await
        .await
        .unwrap();
    let waiting = handle
        .append("full".into(), vec![group_of(60, &[entry_at(61, 1000)])])
        .await;
    assert_eq!(registry.requests_waiting(), 1);
    drop(handle);
    tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .expect("the writer stops")
        .unwrap()
        .unwrap();
    assert!(waiting.await.is_err(), "the waiting request is not acked");
}

#[tokio::test]
async fn drop_oldest_chunk_deletes_waiting_chunks_and_keeps_acking() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    let one = entry_at(60, 1000).len() as u64;
    cfg.total_limit_size = Some(3 * one);
    cfg.chunk_limit_records = Some(1);
    cfg.overflow_action = OverflowAction::DropOldestChunk;
    let (registry, handle, mut sealed_rx, task) = start(cfg);

    for i in 0..8 {
        tokio::time::timeout(
            Duration::from_secs(30),
            handle
                .append("drop".into(), vec![group_of(60, &[entry_at(60 + i, 1000)])])
                .await,
        )
        .await
        .expect("acks keep coming: old chunks are dropped instead")
        .unwrap();
    }
    let mut sealed = Vec::new();
    while let Ok(s) = sealed_rx.try_recv() {
        sealed.push(s);
    }
    let (dropped_chunks, dropped_events, _) = registry.losses();
    assert!(dropped_chunks >= 4, "dropped {dropped_chunks}");
    assert_eq!(dropped_chunks, dropped_events);
    // The dropped ones are the oldest, and their files are gone; the newest are kept.
    let kept: Vec<_> = sealed.iter().filter(|s| s.paths.data.exists()).collect();
    assert!(sealed
        .iter()
        .take(dropped_chunks as usize)
        .all(|s| !s.paths.data.exists()));
    assert!(!kept.is_empty() && registry.usage() <= 4 * one);
    drop(handle);
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn sync_interval_and_none_ack_after_the_write_and_keep_every_event() {
    for sync in [SyncPolicy::Interval, SyncPolicy::None] {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path());
        cfg.sync = sync;
        cfg.sync_interval = Duration::from_millis(50);
        let (registry, handle, mut sealed_rx, task) = start(cfg);
        let entries: Vec<Bytes> = (0..20).map(|i| entry_at(60 + i, 50)).collect();
        for e in &entries {
            handle
                .append("sync".into(), vec![group_of(60, std::slice::from_ref(e))])
                .await
                .await
                .unwrap();
        }
        assert_eq!(registry.snapshot()[0].records, 20, "{sync:?}");
        drop(handle);
        task.await.unwrap().unwrap();
        let sealed = recv(&mut sealed_rx).await;
        assert_eq!(body_of(&sealed), entries.concat(), "{sync:?}");
    }
}

/// Data files of chunks under `dir` that this process holds open.
fn open_chunk_files(dir: &Path) -> usize {
    let chunks = chunks_dir(dir).canonicalize().unwrap();
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| {
            target.starts_with(&chunks) && target.extension().is_some_and(|x| x == chunk::DATA_EXT)
        })
        .count()
}

#[tokio::test]
async fn many_tags_hold_at_most_max_open_chunk_files_and_keep_every_event() {
    for sync in [SyncPolicy::Always, SyncPolicy::Interval, SyncPolicy::None] {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path());
        cfg.sync = sync;
        cfg.max_open_files = Some(4);
        let (registry, handle, mut sealed_rx, task) = start(cfg);
        let tags: Vec<String> = (0..50).map(|t| format!("tag.{t}")).collect();
        // Events of 2100: no chunk is due before the end of the test.
        let (t0, timekey) = (4_102_444_800, 4_102_444_800);
        let mut sent: HashMap<&str, Vec<Bytes>> = HashMap::new();

        // All tags at once: most of them land in the same rounds.
        let mut acks = Vec::new();
        for (t, tag) in tags.iter().enumerate() {
            let e = entry_at(t0 + t as i64, 10);
            sent.entry(tag).or_default().push(e.clone());
            acks.push(
                handle
                    .append(tag.as_str().into(), vec![group_of(timekey, &[e])])
                    .await,
            );
        }
        for ack in acks {
            ack.await.unwrap();
        }
        assert!(open_chunk_files(dir.path()) <= 4, "{sync:?}");

        // Then one tag at a time, round after round: every write after the first four of a
        // pass reopens a file that was closed for another tag's.
        for pass in 0..2 {
            for (t, tag) in tags.iter().enumerate() {
                let e = entry_at(t0 + 1 + t as i64, 20 + pass);
                sent.entry(tag).or_default().push(e.clone());
                handle
                    .append(tag.as_str().into(), vec![group_of(timekey, &[e])])
                    .await
                    .await
                    .unwrap();
                assert!(open_chunk_files(dir.path()) <= 4, "{sync:?}");
            }
        }
        assert_eq!(registry.snapshot().len(), 50, "one open chunk per tag");

        drop(handle);
        task.await.unwrap().unwrap();
        assert_eq!(open_chunk_files(dir.path()), 0);
        let mut sealed = Vec::new();
        while let Ok(s) = sealed_rx.try_recv() {
            sealed.push(s);
        }
        assert_eq!(sealed.len(), 50, "{sync:?}");
        for s in &sealed {
            let events = &sent[s.header.tag.as_str()];
            assert_eq!(s.stats.records, 3);
            assert_eq!(body_of(s), events.concat(), "{sync:?} {}", s.header.tag);
        }
    }
}

#[tokio::test]
async fn seals_due_at_once_are_spread_over_rounds_and_appends_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let chunks = chunks_dir(dir.path());
    std::fs::create_dir_all(&chunks).unwrap();
    let (tx, mut sealed_rx) = mpsc::unbounded_channel();
    let mut cfg = config(dir.path());
    cfg.max_open_files = Some(8);
    cfg.flush_interval = Duration::ZERO;
    let reg = registry();
    let mut writer = Writer::new(Arc::new(cfg), chunks, reg.clone(), tx);
    writer.set_seal_budget(Duration::ZERO);
    let append = |tag: &str, secs: i64| {
        let groups = vec![group_of(60, &[entry_at(secs, 10)])];
        let (append, durable) = Append::new(tag.into(), groups, None, &reg);
        (append, durable.0)
    };

    // With no flush interval, all forty are due as soon as they are written.
    let now = tokio::time::Instant::now;
    let (batch, mut acks): (Vec<_>, Vec<_>) = (0..40).map(|t| append(&format!("t{t}"), 60)).unzip();
    assert_eq!(reg.requests_waiting(), 40);
    writer.round(batch, now());
    for ack in &mut acks {
        ack.try_recv().unwrap().unwrap();
    }
    assert_eq!(reg.requests_waiting(), 0, "every request answered");

    // Each round seals what its budget allows (here, one batch), after answering the
    // requests of the round, and says that more is due at once.
    let mut sealed_tags = Vec::new();
    for round in 0..5 {
        let (a, mut ack) = append("other", 70 + round);
        writer.round(vec![a], now());
        ack.try_recv()
            .expect("answered within its round")
            .expect("stored");
        writer.tick(now());
        let mut sealed = Vec::new();
        while let Ok(s) = sealed_rx.try_recv() {
            sealed.push(s.header.tag);
        }
        assert_eq!(sealed.len(), writer::SYNC_THREADS, "round {round}");
        sealed_tags.extend(sealed);
        if sealed_tags.len() < 40 {
            assert!(writer.next_deadline().expect("more is due") <= now());
        }
    }
    sealed_tags.sort();
    let mut first: Vec<String> = (0..40).map(|t| format!("t{t}")).collect();
    first.sort();
    assert_eq!(sealed_tags, first, "the forty were due first");
    // "other" came after the others were due: it is sealed last.
    writer.tick(now());
    let last = sealed_rx.try_recv().unwrap();
    assert_eq!((last.header.tag.as_str(), last.stats.records), ("other", 5));
}

/// The header of a chunk of tag `t` at timekey 0.
fn header_of(id: &str) -> ChunkHeader {
    ChunkHeader {
        chunk_id: id.into(),
        tag: "t".into(),
        timekey: 0,
        created_ms: 0,
        reused: false,
    }
}

fn is_stored(dedup: &Arc<crate::dedup::Dedup>, token: &'static [u8]) -> bool {
    matches!(
        dedup.check(
            "10.0.0.9".parse().unwrap(),
            &Bytes::from_static(token),
            crate::dedup::Origin {
                link: crate::dedup::Link::new(),
                answer: 0,
            },
            false
        ),
        crate::dedup::Seen::Stored
    )
}

#[tokio::test]
async fn tokens_are_durable_with_their_events_and_rebuild_the_window_after_a_crash() {
    use crate::dedup::Dedup;
    let dir = tempfile::tempdir().unwrap();
    let (tx, _rx) = mpsc::unbounded_channel();
    let window = Duration::from_secs(600);
    let (buffer, _) = Buffer::open_with(
        config(dir.path()),
        registry(),
        tx,
        Some(Dedup::new(window, 100)),
    )
    .unwrap();
    let handle = buffer.handle.clone();
    let task = tokio::spawn(buffer.run());
    let sender: std::net::IpAddr = "10.0.0.9".parse().unwrap();
    // A request over two timekeys: two chunks, each with a record of it (parts = 2).
    let (a, b) = (entry_at(60, 10), entry_at(120, 10));
    let token = Some((sender, Bytes::from_static(b"two-chunks")));
    let split = vec![
        group_of(60, std::slice::from_ref(&a)),
        group_of(120, std::slice::from_ref(&b)),
    ];
    handle
        .append_with_token("t".into(), split, token)
        .await
        .await
        .unwrap();
    let one = Some((sender, Bytes::from_static(b"one-chunk")));
    handle
        .append_with_token(
            "t".into(),
            vec![group_of(60, std::slice::from_ref(&a))],
            one,
        )
        .await
        .await
        .unwrap();
    handle
        .append("t".into(), vec![group_of(60, std::slice::from_ref(&a))])
        .await
        .await
        .unwrap();
    // A crash: no seal, no shutdown.
    task.abort();
    let _ = task.await;
    drop(handle);

    let dedup = Dedup::new(window, 100);
    let (tx, _rx) = mpsc::unbounded_channel();
    let registry = registry();
    let (_buffer, recovered) = Buffer::open_with(
        config(dir.path()),
        registry.clone(),
        tx,
        Some(dedup.clone()),
    )
    .unwrap();
    assert!(is_stored(&dedup, b"two-chunks"));
    assert!(is_stored(&dedup, b"one-chunk"));
    assert!(!is_stored(&dedup, b"unknown"));
    // Token frames are not body: the bodies are exactly the entries.
    let mut bodies: Vec<Vec<u8>> = recovered.sealed.iter().map(body_of).collect();
    bodies.sort();
    let mut expected = vec![[a.clone(), a.clone(), a.clone()].concat(), b.to_vec()];
    expected.sort();
    assert_eq!(bodies, expected);
    assert_eq!(
        recovered
            .sealed
            .iter()
            .map(|c| c.stats.records)
            .sum::<u64>(),
        4
    );

    // Delivered: the tokens go to the journal before the files go, and outlive them.
    let tokens = registry.tokens().expect("the journal is open").clone();
    let paths: Vec<_> = recovered.sealed.iter().map(|c| &c.paths).collect();
    tokens.retire(&paths).unwrap();
    recovered
        .sealed
        .iter()
        .for_each(|c| c.paths.remove().unwrap());
    assert_eq!(tokens.journaled(), 3);
    drop(_buffer);
    let dedup = Dedup::new(window, 100);
    let (tx, _rx) = mpsc::unbounded_channel();
    Buffer::open_with(
        config(dir.path()),
        super::Arc::new(Registry::new()),
        tx,
        Some(dedup.clone()),
    )
    .unwrap();
    assert!(is_stored(&dedup, b"two-chunks"));
    assert!(is_stored(&dedup, b"one-chunk"));
}

#[test]
fn half_of_a_request_found_at_recovery_is_not_taken_as_stored() {
    use crate::dedup::Dedup;
    let dir = tempfile::tempdir().unwrap();
    let chunks = chunks_dir(dir.path());
    std::fs::create_dir_all(&chunks).unwrap();
    // The first of two parts was written, the crash came before the second: not acknowledged.
    let mut w = ChunkWriter::create(
        &chunks.join(format!("{}.chunk", "a".repeat(32))),
        &header_of(&"a".repeat(32)),
    )
    .unwrap();
    let mut records = Vec::new();
    token_record::TokenRecord {
        sender: "10.0.0.9".parse().unwrap(),
        token: Bytes::from_static(b"half"),
        request: token_record::TokenRecord::new_request(),
        parts: 2,
        part: Some(0),
    }
    .encode(&mut records);
    w.append(&[entry_at(1, 5)], &records).unwrap();
    w.sync().unwrap();
    drop(w);
    let dedup = Dedup::new(Duration::from_secs(600), 100);
    let (tx, _rx) = mpsc::unbounded_channel();
    let (_b, recovered) =
        Buffer::open_with(config(dir.path()), registry(), tx, Some(dedup.clone())).unwrap();
    assert_eq!(recovered.sealed.len(), 1);
    assert!(
        !is_stored(&dedup, b"half"),
        "its resend must be stored again"
    );
}

#[test]
fn version_1_and_2_data_files_are_still_recovered() {
    use std::io::Write;
    // Versions 1 and 2 differ from 3 in their frames' CRCs (not seeded); 1 has no token frames.
    for magic in [chunk::MAGIC_V1, chunk::MAGIC_V2] {
        let dir = tempfile::tempdir().unwrap();
        let chunks = chunks_dir(dir.path());
        std::fs::create_dir_all(&chunks).unwrap();
        let id = "b".repeat(32);
        let header = serde_json::to_vec(&ChunkHeader {
            chunk_id: id.clone(),
            tag: "t".into(),
            timekey: 0,
            created_ms: 0,
            reused: false,
        })
        .unwrap();
        let mut file = magic.to_vec();
        file.extend_from_slice(&(header.len() as u32).to_le_bytes());
        file.extend_from_slice(&claimcheck_consumer::crc::crc32c(&header).to_le_bytes());
        file.extend_from_slice(&header);
        let e = [entry_at(1, 5), entry_at(2, 5)].concat();
        file.extend_from_slice(&(e.len() as u32).to_le_bytes());
        file.extend_from_slice(&claimcheck_consumer::crc::crc32c(&e).to_le_bytes());
        file.extend_from_slice(&e);
        std::fs::File::create(chunks.join(format!("{id}.chunk")))
            .unwrap()
            .write_all(&file)
            .unwrap();
        let (tx, _rx) = mpsc::unbounded_channel();
        let (_b, recovered) = Buffer::open(config(dir.path()), registry(), tx).unwrap();
        assert_eq!(recovered.sealed.len(), 1);
        assert_eq!(recovered.sealed[0].stats.records, 2);
        assert_eq!(body_of(&recovered.sealed[0]), e);
    }
}

#[tokio::test]
async fn a_request_that_fits_in_a_chunk_is_not_split_across_two() {
    let dir = tempfile::tempdir().unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut cfg = config(dir.path());
    let one = entry_at(60, 100).len() as u64;
    cfg.chunk_limit_size = one * 3;
    let (buffer, _) = Buffer::open(cfg, registry(), tx).unwrap();
    let handle = buffer.handle.clone();
    let task = tokio::spawn(buffer.run());
    let first: Vec<Bytes> = (0..2).map(|i| entry_at(60 + i, 100)).collect();
    let second: Vec<Bytes> = (2..4).map(|i| entry_at(60 + i, 100)).collect();
    for request in [&first, &second] {
        handle
            .append("a".into(), vec![group_of(60, request)])
            .await
            .await
            .unwrap();
    }
    // The second request does not fit in what is left of the first chunk: it goes whole to
    // a new one, rather than one entry here and one there.
    let full = recv(&mut rx).await;
    assert_eq!(body_of(&full), first.concat());
    drop(handle);
    task.await.unwrap().unwrap();
    assert_eq!(body_of(&recv(&mut rx).await), second.concat());
}

#[tokio::test]
async fn a_delivered_chunks_file_is_reused_and_a_crash_recovers_only_the_new_events() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let chunks = chunks_dir(dir.path());
    let mut cfg = config(dir.path());
    cfg.chunk_limit_records = Some(100);
    let (registry, handle, mut sealed_rx, task) = start(cfg.clone());

    // A chunk of 100 events in 4 frames, sealed and delivered: its file becomes a spare.
    let old: Vec<Bytes> = (0..100).map(|i| entry_at(120 + i % 60, 1000)).collect();
    let first = entry_at(120, 100);
    for part in [
        std::slice::from_ref(&first),
        &old[1..30],
        &old[30..60],
        &old[60..],
    ] {
        handle
            .append("t".into(), vec![group_of(120, part)])
            .await
            .await
            .unwrap();
    }
    let delivered = recv(&mut sealed_rx).await;
    assert_eq!(delivered.stats.records, 100);
    let (_, frames) = chunk::read_header(&mut File::open(&delivered.paths.data).unwrap()).unwrap();
    let inode = std::fs::metadata(&delivered.paths.data).unwrap().ino();
    registry.spares().retire(&delivered.paths).unwrap();
    registry.remove(&delivered.header.chunk_id);
    assert_eq!(registry.spares().len(), 1);
    assert!(!delivered.paths.data.exists() && !delivered.paths.state.exists());

    // The next chunk overwrites it: the same file, renamed, holding the old chunk's leftover
    // after the new event. Its header is 14 bytes longer (`,"reused":true`), its event 14
    // bytes shorter than the old first one: the leftover starts with whole old frames.
    let new = entry_at(200, 100 - 14);
    handle
        .append("t".into(), vec![group_of(180, std::slice::from_ref(&new))])
        .await
        .await
        .unwrap();
    assert!(registry.spares().is_empty());
    let open: Vec<_> = std::fs::read_dir(&chunks)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(open.len(), 1, "{open:?}");
    let reused = std::fs::metadata(&open[0]).unwrap();
    assert_eq!(reused.ino(), inode);
    assert_eq!(
        reused.len(),
        delivered.stats.data_len,
        "not cut before the seal"
    );

    // A crash before the seal. The leftover frames are whole, but their CRCs are seeded with
    // the old chunk's id: recovery keeps the one new event only, and copies none of them.
    task.abort();
    let _ = task.await;
    drop(handle);
    // Also left behind: a spare renamed for a chunk whose header a power loss lost (the file
    // holds another chunk's header), and a spare.
    let stale = ChunkPaths::new(&chunks, &"d".repeat(32));
    let mut h = delivered.header.clone();
    h.chunk_id = "c".repeat(32);
    let mut w = ChunkWriter::create(&stale.data, &h).unwrap();
    w.append(&[entry_at(121, 5)], &[]).unwrap();
    w.sync().unwrap();
    drop(w);
    let spare = chunks.join(format!("{}.free", "e".repeat(32)));
    std::fs::write(&spare, b"an old chunk").unwrap();

    let (tx, _rx) = mpsc::unbounded_channel();
    let registry = super::Arc::new(Registry::new());
    let (_buffer, recovered) = Buffer::open(cfg, registry.clone(), tx).unwrap();
    assert_eq!(recovered.sealed.len(), 1);
    let chunk = &recovered.sealed[0];
    assert!(chunk.header.reused);
    assert_eq!(
        chunk.stats.data_len,
        frames.start + (FRAME_HEADER + first.len()) as u64,
        "the new event ends where an old frame starts"
    );
    assert_eq!(chunk.stats.records, 1);
    assert_eq!(body_of(chunk), new.to_vec());
    assert_eq!(
        std::fs::metadata(&chunk.paths.data).unwrap().len(),
        chunk.stats.data_len
    );
    // Not recovered as a chunk, and not deleted either: kept aside.
    assert_eq!(
        recovered.quarantined,
        vec![dir
            .path()
            .join("quarantine")
            .join(stale.data.file_name().unwrap())]
    );
    assert!(!stale.data.exists());
    assert_eq!(registry.spares().len(), 1);
    assert!(spare.exists());
}

#[tokio::test]
async fn spare_files_count_toward_total_limit_size_and_go_first() {
    let one = entry_at(60, 1000);
    for (limit, kept) in [(3, false), (100, true)] {
        let dir = tempfile::tempdir().unwrap();
        let chunks = chunks_dir(dir.path());
        std::fs::create_dir_all(&chunks).unwrap();
        // Two spares from an earlier run, 4 events' worth together.
        let spares: Vec<_> = ['e', 'f']
            .iter()
            .map(|c| chunks.join(format!("{}.free", c.to_string().repeat(32))))
            .collect();
        for s in &spares {
            std::fs::write(s, vec![0u8; 2 * one.len()]).unwrap();
        }
        let mut cfg = config(dir.path());
        cfg.total_limit_size = Some(limit * one.len() as u64);
        let (registry, handle, _sealed_rx, task) = start(cfg);
        tokio::time::timeout(
            Duration::from_secs(30),
            handle
                .append("t".into(), vec![group_of(60, std::slice::from_ref(&one))])
                .await,
        )
        .await
        .expect("acked: spares never hold requests back")
        .unwrap();
        let left = spares.iter().filter(|s| s.exists()).count();
        if kept {
            // Under the limit: one spare taken by the new chunk, one left.
            assert_eq!((left, registry.spares().len()), (1, 1));
        } else {
            // Over it with the spares: they were deleted before the request was taken.
            assert_eq!((left, registry.spares().len()), (0, 0));
        }
        drop(handle);
        task.await.unwrap().unwrap();
    }
}

/// Waits until the writer thread sleeps, waiting for requests: only then is a request written
/// in place.
async fn writer_idle(handle: &BufferHandle) {
    tokio::time::timeout(Duration::from_secs(30), async {
        while handle.shared.lock().unwrap().thread == WriterThread::Busy {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .expect("the writer thread waits for requests");
}

/// Appends `entries` (of the timekey at 120 s) through `appender`, the sender having nothing
/// more on its way; returns the future of its answer.
async fn append_of(appender: &Appender, entries: &[Bytes]) -> Durable {
    appender
        .append_with_token("app".into(), vec![group_of(120, entries)], None, false)
        .await
}

/// Appends `entries` (of the timekey at 120 s) through `appender` and says whether they were
/// written in place: the future comes back resolved, and the buffer counts one more.
async fn append_through(appender: &Appender, more_coming: bool, entries: &[Bytes]) -> bool {
    let before = appender.handle.written_in_place();
    let durable = appender
        .append_with_token(
            "app".into(),
            vec![group_of(120, entries)],
            None,
            more_coming,
        )
        .await;
    let in_place = appender.handle.written_in_place() > before;
    if in_place {
        let answered = futures::FutureExt::now_or_never(durable);
        assert!(matches!(answered, Some(Ok(()))), "answered at once");
    } else {
        durable.await.unwrap();
    }
    in_place
}

#[tokio::test]
async fn a_lone_connection_writes_in_place_what_nothing_waits_with() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    // A chunk created in place is sealed on time: the writer thread is woken for it.
    cfg.flush_interval = Duration::from_millis(200);
    let (_, handle, mut sealed_rx, task) = start(cfg);
    let one = handle.appender();
    let entries: Vec<Bytes> = (0..6).map(|i| entry_at(120 + i, 10)).collect();
    let quiet = |q: Duration| handle.shared.recent.lock().unwrap().quiet = q;

    writer_idle(&handle).await;
    assert!(append_through(&one, false, &entries[..1]).await);
    assert_eq!(body_of(&recv(&mut sealed_rx).await), entries[0]);
    // The sender's next request has started to arrive: this one waits for the writer, to be
    // synced with what follows.
    assert!(!append_through(&one, true, &entries[1..2]).await);
    // A second connection that has not appended (an idle keep-alive connection): no matter.
    let two = handle.appender();
    writer_idle(&handle).await;
    assert!(append_through(&one, false, &entries[2..3]).await);
    // Once it appends, and for the quiet time after, both send their requests to the writer.
    quiet(Duration::from_secs(3600));
    assert!(!append_through(&two, false, &entries[3..4]).await);
    writer_idle(&handle).await;
    assert!(!append_through(&one, false, &entries[4..5]).await);
    // A request waiting for the writer thread is not overtaken.
    quiet(Duration::ZERO);
    handle.shared.queued.fetch_add(1, Ordering::AcqRel);
    writer_idle(&handle).await;
    assert!(!append_through(&one, false, &entries[5..6]).await);
    handle.shared.queued.fetch_sub(1, Ordering::AcqRel);

    let sealed = recv(&mut sealed_rx).await;
    assert_eq!(
        body_of(&sealed),
        entries[1..].concat(),
        "in order, once each"
    );
    assert_eq!(handle.written_in_place(), 2);
    drop((one, two, handle));
    task.await.unwrap().unwrap();
}

#[test]
fn another_connection_counts_for_the_quiet_time_after_its_latest_append() {
    let t0 = Instant::now();
    let at = |ms: u64| t0 + Duration::from_millis(ms);
    let mut recent = RecentAppends::new();
    recent.quiet = Duration::from_millis(10);
    assert!(!recent.record(1, at(0)), "nobody else appended");
    assert!(!recent.record(1, at(1)), "its own appends do not count");
    assert!(recent.record(2, at(5)), "1 appended 4 ms before");
    assert!(recent.record(1, at(9)), "2 appended 4 ms before");
    assert!(recent.record(1, at(14)), "2's latest was 9 ms before");
    assert!(!recent.record(1, at(15)), "and now 10 ms");
    // Three connections: the latest of the others counts, whichever it is.
    assert!(!recent.record(3, at(40)));
    assert!(recent.record(2, at(45)), "3 appended 5 ms before");
    assert!(recent.record(2, at(47)), "3 still, not 1 (25 ms before)");
    assert!(recent.record(1, at(52)), "2 appended 5 ms before");
}

#[tokio::test]
async fn nothing_is_written_in_place_once_the_writer_is_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let (_, handle, _sealed_rx, task) = start(config(dir.path()));
    let one = handle.appender();
    writer_idle(&handle).await;
    assert!(append_through(&one, false, &[entry_at(120, 10)]).await);

    // As a crash would: `run` dropped, its directory lock let go at once.
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    let durable = append_of(&one, &[entry_at(121, 10)]).await;
    assert!(matches!(durable.await, Err(BufferError::Closed)));
    assert_eq!(handle.written_in_place(), 1);

    // The next owner of the directory finds the acknowledged request alone.
    let (tx, _rx) = mpsc::unbounded_channel();
    let (_, recovered) = Buffer::open(config(dir.path()), registry(), tx).unwrap();
    let records: u64 = recovered.sealed.iter().map(|s| s.stats.records).sum();
    assert_eq!(records, 1);
}

#[tokio::test]
async fn the_writer_thread_writes_nothing_once_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let (_, handle, _sealed_rx, task) = start(config(dir.path()));
    let one = handle.appender();
    writer_idle(&handle).await;
    // While another thread holds the lock, the request goes to the writer thread, which
    // takes it and waits for the lock; meanwhile `run` stops, as its `StopOnDrop` does when
    // it is dropped.
    let (locked_tx, locked_rx) = std::sync::mpsc::channel();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let shared = handle.shared.clone();
    let holder = std::thread::spawn(move || {
        let mut desk = shared.lock().unwrap();
        locked_tx.send(()).unwrap();
        go_rx.recv().unwrap();
        desk.stopped = true;
    });
    locked_rx.recv().unwrap();
    let durable = append_of(&one, &[entry_at(121, 10)]).await;
    go_tx.send(()).unwrap();
    holder.join().unwrap();
    assert!(matches!(durable.await, Err(BufferError::Closed)));
    assert_eq!(handle.written_in_place(), 0);
    task.await.unwrap().unwrap();
    let written: Vec<_> = std::fs::read_dir(dir.path().join("chunks"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(written.is_empty(), "nothing written: {written:?}");
}

#[tokio::test]
async fn a_request_is_written_in_place_while_the_writer_thread_seals() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.flush_interval = Duration::from_millis(200);
    let (_, handle, mut sealed_rx, task) = start(cfg);
    let one = handle.appender();
    let entries: Vec<Bytes> = (0..2).map(|i| entry_at(120 + i, 10)).collect();

    // The seal's I/O is held (from another thread) until `go`.
    let (paused_tx, paused_rx) = std::sync::mpsc::channel();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let shared = handle.shared.clone();
    let pauser = std::thread::spawn(move || {
        let _paused = shared.seal_pause.write().unwrap();
        paused_tx.send(()).unwrap();
        go_rx.recv().unwrap();
    });
    paused_rx.recv().unwrap();

    writer_idle(&handle).await;
    assert!(append_through(&one, false, &entries[..1]).await);
    // Its chunk falls due; the writer thread takes it out and seals it without the lock.
    tokio::time::timeout(Duration::from_secs(30), async {
        while handle.shared.lock().unwrap().thread != WriterThread::Sealing {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .expect("the writer thread seals the chunk without the lock");
    // Meanwhile the next request is written in place, into a new chunk, and answered, even
    // though the sender has more on its way: the writer thread would take it only once the
    // seal is done.
    assert!(append_through(&one, true, &entries[1..]).await);
    assert!(
        sealed_rx.try_recv().is_err(),
        "the first chunk is not sealed yet"
    );

    go_tx.send(()).unwrap();
    pauser.join().unwrap();
    assert_eq!(body_of(&recv(&mut sealed_rx).await), entries[0]);
    assert_eq!(body_of(&recv(&mut sealed_rx).await), entries[1]);
    assert_eq!(handle.written_in_place(), 2);
    drop((one, handle));
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_seal_that_panics_stops_writes_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.flush_interval = Duration::from_millis(200);
    let (_, handle, _sealed_rx, task) = start(cfg);
    let one = handle.appender();
    let entries: Vec<Bytes> = (0..2).map(|i| entry_at(120 + i, 10)).collect();
    handle.panic_at_next_seal();

    writer_idle(&handle).await;
    assert!(append_through(&one, false, &entries[..1]).await);
    // Its chunk falls due and the seal panics without the lock: the writer thread is gone,
    // and `run` says so...
    let ended = tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .expect("the writer thread ends");
    assert!(ended.unwrap().is_err(), "run says the writer failed");
    // ...and once it has, nothing is written in place any more, where nothing would seal it.
    let durable = append_of(&one, &entries[1..]).await;
    assert!(matches!(durable.await, Err(BufferError::Closed)));
    assert_eq!(handle.written_in_place(), 1);
}
