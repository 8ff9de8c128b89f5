use std::time::Duration;

use bytes::Bytes;
use claimcheck_consumer::body::{self, Compression, Format};
use claimcheck_consumer::crc;
use claimcheck_consumer::entry::{self, EventTime};
use claimcheck_consumer::verify_and_decode;

use super::*;
use crate::buffer::chunk::{ChunkHeader, ChunkPaths, ChunkStats, ChunkWriter};
use crate::buffer::registry::ChunkInfo;
use crate::key_template::KeyTemplate;
use crate::retry::{Backoff, RetryPolicy};
use crate::testing::MemoryStore;

fn config(dir: &std::path::Path, format: Format, compression: Compression) -> UploaderConfig {
    UploaderConfig {
        format,
        compression,
        compression_level: None,
        key_template: KeyTemplate::parse("${tag}/%Y/%m/%d/${chunk_id}.%{file_extension}", "host")
            .unwrap(),
        prefix: "logs".into(),
        producer: "host-1".into(),
        workers: 2,
        retry: RetryPolicy {
            backoff: Backoff {
                wait: Duration::from_millis(10),
                max_interval: Duration::from_millis(50),
                randomize: true,
            },
            timeout: Duration::from_secs(3600),
            max_times: None,
            forever: false,
        },
        multipart_threshold: 16 << 20,
        part_size: 5 << 20,
        // Most tests here are about S3: every body goes there unless a test says otherwise.
        inline_max_bytes: 0,
        buffer_dir: dir.to_path_buf(),
        object_tags: Vec::new(),
        object_metadata: Vec::new(),
    }
}

/// A sealed chunk on disk (in `<dir>/chunks`) with `n` events of about `pad` bytes, written in
/// two frames, and registered.
fn sealed_chunk(
    dir: &std::path::Path,
    registry: &Registry,
    n: u32,
    pad: usize,
) -> (SealedChunk, Vec<u8>) {
    let chunks = crate::buffer::chunks_dir(dir);
    std::fs::create_dir_all(&chunks).unwrap();
    let id = uuid::Uuid::now_v7().simple().to_string();
    let header = ChunkHeader {
        chunk_id: id.clone(),
        tag: "app.web".into(),
        timekey: 1_763_740_800,
        created_ms: 0,
        reused: false,
    };
    let paths = ChunkPaths::new(&chunks, &id);
    let mut writer = ChunkWriter::create(&paths.data, &header).unwrap();
    let (mut body, mut stats, mut frame) = (Vec::new(), ChunkStats::default(), Vec::new());
    for i in 0..n {
        let mut e = vec![0x92];
        let t = EventTime::new(1_763_740_800 + i64::from(i), i);
        entry::encode::event_time(&mut e, t);
        let record = rmpv::Value::Map(vec![
            ("i".into(), i.into()),
            ("pad".into(), format!("{i:07}").repeat(pad / 7 + 1).into()),
        ]);
        rmpv::encode::write_value(&mut e, &record).unwrap();
        stats.add(1, e.len() as u64, t, t);
        body.extend_from_slice(&e);
        frame.push(Bytes::from(e));
        if i == n / 2 {
            writer.append(&std::mem::take(&mut frame), &[]).unwrap();
        }
    }
    writer.append(&frame, &[]).unwrap();
    stats.data_len = writer.valid_len();
    chunk::write_state(
        &paths.state,
        &ChunkState::Sealed {
            header: header.clone(),
            stats,
        },
    )
    .unwrap();
    registry.insert(ChunkInfo {
        chunk_id: id,
        tag: header.tag.clone(),
        timekey: header.timekey,
        phase: Phase::Sealed,
        created_ms: 0,
        records: stats.records,
        bytes: stats.data_len,
        attempts: 0,
        last_error: None,
        next_retry_ms: None,
    });
    (
        SealedChunk {
            header,
            stats,
            paths,
        },
        body,
    )
}

/// Runs the uploader on one chunk until it is uploaded, or until `gone` is true (the chunk
/// left for quarantine or dead letters), or for at most 20 s.
async fn run_until(
    store: Arc<MemoryStore>,
    config: UploaderConfig,
    registry: Arc<Registry>,
    chunk: SealedChunk,
    gone: impl Fn() -> bool,
) -> Option<UploadedChunk> {
    let (sealed_tx, sealed_rx) = mpsc::unbounded_channel();
    let (publish_tx, mut publish_rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(run(
        store,
        Arc::new(config),
        registry,
        sealed_rx,
        publish_tx,
    ));
    sealed_tx.send(chunk).unwrap();
    let mut uploaded = None;
    for _ in 0..200 {
        if let Ok(Some(u)) =
            tokio::time::timeout(Duration::from_millis(100), publish_rx.recv()).await
        {
            uploaded = Some(u);
            break;
        }
        if gone() {
            break;
        }
    }
    task.abort();
    uploaded
}

async fn run_one(
    store: Arc<MemoryStore>,
    config: UploaderConfig,
    registry: Arc<Registry>,
    chunk: SealedChunk,
) -> Option<UploadedChunk> {
    run_until(store, config, registry, chunk, || false).await
}

#[tokio::test]
async fn uploads_a_verifiable_object_then_records_the_pointer() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Arc::new(Registry::new());
    let (chunk, body) = sealed_chunk(dir.path(), &registry, 9, 20);
    let store = Arc::new(MemoryStore::new("fake-bucket"));
    let cfg = config(dir.path(), Format::Msgpack, Compression::Zstd);
    let uploaded = run_one(store.clone(), cfg, registry.clone(), chunk.clone())
        .await
        .expect("uploaded");

    let p = &uploaded.pointer;
    assert_eq!(
        p.key,
        format!(
            "logs/app.web/2025/11/21/{}.msgpack.zst",
            chunk.header.chunk_id
        )
    );
    assert_eq!(
        (p.bucket.as_str(), p.records, p.bytes, p.producer.as_str()),
        ("fake-bucket", 9, body.len() as u64, "host-1")
    );
    assert_eq!(
        (p.first_time, p.last_time),
        (
            EventTime::new(1_763_740_800, 0),
            EventTime::new(1_763_740_808, 8)
        )
    );
    let stored = store.objects();
    let (_, bytes) = &stored[0];
    assert_eq!(
        (p.checksum.crc32c, p.stored_bytes),
        (crc::crc32c(bytes), bytes.len() as u64)
    );
    assert_eq!(verify_and_decode(p, bytes).unwrap().len(), 9);
    assert_eq!(
        body::decompress(Compression::Zstd, bytes, 1 << 20).unwrap(),
        body
    );
    match chunk::read_state(&chunk.paths.state).unwrap() {
        ChunkState::Uploaded { pointer, etag, .. } => {
            let stored_etag = format!("\"{:08x}\"", crc::crc32c(bytes));
            assert_eq!(
                (&*pointer, etag),
                (p, Some(stored_etag)),
                "the store's ETag"
            )
        }
        other => panic!("state not recorded: {other:?}"),
    }
    assert!(
        chunk.paths.data.exists(),
        "the data stays until the pointer is published"
    );
    assert_eq!(registry.snapshot()[0].phase, Phase::Uploaded);
}

#[tokio::test]
async fn a_small_body_goes_inline_with_the_bytes_and_checksum_the_object_would_have() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Arc::new(Registry::new());
    let (chunk, body) = sealed_chunk(dir.path(), &registry, 9, 20);
    // What the object would have been, from an upload to S3 of the same chunk.
    let s3 = Arc::new(MemoryStore::new("fake-bucket"));
    let cfg = config(dir.path(), Format::Msgpack, Compression::Zstd);
    let as_object = run_one(s3.clone(), cfg.clone(), registry.clone(), chunk.clone())
        .await
        .expect("uploaded");
    let object = s3.objects()[0].1.clone();

    let store = Arc::new(MemoryStore::new("fake-bucket"));
    let cfg = UploaderConfig {
        inline_max_bytes: 24 << 10,
        ..cfg
    };
    let uploaded = run_one(store.clone(), cfg, registry.clone(), chunk.clone())
        .await
        .expect("uploaded");
    assert!(store.objects().is_empty(), "no object stored");
    // The body is in the state file, which keeps it until Kinesis accepted the record; the
    // chunk handed to the publisher does not hold it (the publisher reads it from there).
    assert!(uploaded.body_on_disk());
    let state = chunk::read_state(&chunk.paths.state).unwrap();
    let p = &state.into_pointer().expect("an uploaded state");
    assert_eq!(
        Pointer {
            inline: None,
            ..p.clone()
        },
        uploaded.pointer
    );
    assert_eq!(p.v, Pointer::INLINE_VERSION);
    assert_eq!((p.bucket.as_str(), p.key.as_str()), ("", ""));
    assert_eq!(p.inline.as_deref(), Some(&object[..]));
    assert_eq!(
        (p.checksum, p.stored_bytes, p.bytes, p.records),
        (
            as_object.pointer.checksum,
            as_object.pointer.stored_bytes,
            body.len() as u64,
            9
        )
    );
    assert_eq!(verify_and_decode(p, &object).unwrap().len(), 9);
    assert!(chunk.paths.data.exists());
}

#[tokio::test]
async fn a_record_over_inline_max_bytes_goes_to_s3() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Arc::new(Registry::new());
    // Uncompressed, about 2 KiB of body.
    let (chunk, body) = sealed_chunk(dir.path(), &registry, 20, 100);
    let cfg = config(dir.path(), Format::Msgpack, Compression::None);
    // The body alone fits, but not with the pointer's JSON in front of it.
    let limit = body.len() as u64 + 100;
    for (inline_max_bytes, inline) in [(limit, false), (limit + 1024, true)] {
        let store = Arc::new(MemoryStore::new("fake-bucket"));
        let cfg = UploaderConfig {
            inline_max_bytes,
            ..cfg.clone()
        };
        let uploaded = run_one(store.clone(), cfg, registry.clone(), chunk.clone())
            .await
            .expect("uploaded");
        assert_eq!(uploaded.body_on_disk(), inline, "{inline_max_bytes}");
        assert_eq!(store.objects().len(), usize::from(!inline));
        let state = chunk::read_state(&chunk.paths.state).unwrap();
        let recorded = state.into_pointer().expect("an uploaded state");
        assert_eq!(recorded.is_inline(), inline);
        if inline {
            assert!(recorded.to_record().len() as u64 <= inline_max_bytes);
        }
    }
}

#[tokio::test]
async fn large_bodies_stream_by_multipart_in_parts_of_the_set_size() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Arc::new(Registry::new());
    // About 12 MiB uncompressed, stored as is: above a 6 MiB threshold, parts of 5 MiB.
    let (chunk, body) = sealed_chunk(dir.path(), &registry, 24, 512 * 1024);
    let store = Arc::new(MemoryStore::new("fake-bucket"));
    let mut cfg = config(dir.path(), Format::Msgpack, Compression::None);
    cfg.multipart_threshold = 6 << 20;
    let uploaded = run_one(store.clone(), cfg, registry, chunk)
        .await
        .expect("uploaded");
    let stored = store.objects();
    assert_eq!(stored[0].1, body, "the parts add up to the body");
    assert_eq!(
        uploaded.pointer.checksum.crc32c,
        crc::crc32c(&body),
        "the pointer checksums the whole object"
    );
    assert_eq!(
        verify_and_decode(&uploaded.pointer, &stored[0].1)
            .unwrap()
            .len(),
        24
    );
}

#[tokio::test]
async fn objects_carry_their_tags_and_metadata_by_put_and_by_multipart() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Arc::new(Registry::new());
    let template = |t: &str| KeyTemplate::parse(t, "host-1").unwrap();
    for (events, event_bytes) in [(3, 64), (24, 512 * 1024)] {
        let (chunk, _) = sealed_chunk(dir.path(), &registry, events, event_bytes);
        let store = Arc::new(MemoryStore::new("fake-bucket"));
        let mut cfg = config(dir.path(), Format::Msgpack, Compression::None);
        cfg.multipart_threshold = 6 << 20;
        cfg.object_tags = vec![
            ("team".into(), template("sre + ops")),
            ("source".into(), template("${tag[1]}/%Y")),
        ];
        cfg.object_metadata = vec![("host".into(), template("%{hostname}"))];
        let uploaded = run_one(store.clone(), cfg, registry.clone(), chunk)
            .await
            .expect("uploaded");
        let meta = store.meta(&uploaded.pointer.key).expect("stored");
        let year = chrono::DateTime::from_timestamp(uploaded.pointer.timekey, 0)
            .unwrap()
            .format("%Y");
        assert_eq!(
            meta.tagging.as_deref(),
            Some(format!("team=sre+%2B+ops&source=web%2F{year}").as_str()),
            "{events} events"
        );
        assert_eq!(meta.metadata, vec![("host".into(), "host-1".into())]);
    }
}

/// Any UTF-8 tag is a valid forward tag; rendered into metadata and object tags, it still
/// makes a request S3 takes: metadata in RFC 2047 beyond printable ASCII, tag values cut to
/// 256 characters of those S3 allows.
#[test]
fn tag_values_of_any_chunk_make_valid_metadata_and_object_tags() {
    let dir = tempfile::tempdir().unwrap();
    let template = |t: &str| KeyTemplate::parse(t, "host-1").unwrap();
    let mut cfg = config(dir.path(), Format::Msgpack, Compression::None);
    cfg.object_tags = vec![("source".into(), template("${tag}"))];
    cfg.object_metadata = vec![("source".into(), template("${tag}"))];
    let tag = format!("kube.café#1.{}", "x".repeat(300));
    let meta = cfg.object_meta(&tag, "0193a1c2e4f87d3e9a5b6c7d8e9f0a1b", 0);
    let (_, value) = &meta.metadata[0];
    let encoded = value
        .strip_prefix("=?UTF-8?B?")
        .and_then(|v| v.strip_suffix("?="))
        .expect("RFC 2047");
    use base64::Engine;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .unwrap();
    assert_eq!(String::from_utf8(decoded).unwrap(), tag);
    let tagging: Vec<(String, String)> =
        form_urlencoded::parse(meta.tagging.as_deref().unwrap().as_bytes())
            .into_owned()
            .collect();
    let value = &tagging[0].1;
    assert_eq!(value.chars().count(), 256);
    assert!(value.starts_with("kube.café_1.xxx"), "{value}");
    // Printable ASCII goes as it is.
    let meta = cfg.object_meta("app.web", "0193a1c2e4f87d3e9a5b6c7d8e9f0a1b", 0);
    assert_eq!(meta.metadata, vec![("source".into(), "app.web".into())]);
    assert_eq!(meta.tagging.as_deref(), Some("source=app.web"));
}

/// Settings that only a long tag makes too long for S3 are found at start, not after days of
/// retries of that tag's chunks.
#[test]
fn settings_a_long_tag_makes_too_long_for_s3_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let template = |t: &str| KeyTemplate::parse(t, "host-1").unwrap();
    let mut cfg = config(dir.path(), Format::Msgpack, Compression::Zstd);
    cfg.prefix = "logs".into();
    cfg.key_template = template("${tag}/%Y/%m/%d/%H/${chunk_id}.%{file_extension}");
    cfg.object_metadata = vec![("source".into(), template("${tag}"))];
    assert_eq!(cfg.limits_exceeded(512), Vec::<String>::new());

    cfg.key_template = template("${tag}/%Y/${tag}-${chunk_id}");
    cfg.object_metadata = (0..4)
        .map(|i| (format!("m{i}"), template("${tag}")))
        .collect();
    let problems = cfg.limits_exceeded(512);
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(
        problems[0].contains("--s3-object-key-format"),
        "{problems:?}"
    );
    assert!(problems[1].contains("--s3-metadata"), "{problems:?}");
    assert_eq!(cfg.limits_exceeded(100), Vec::<String>::new());
}

#[tokio::test]
async fn failed_uploads_are_retried_at_the_same_key_with_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Arc::new(Registry::new());
    let (chunk, _) = sealed_chunk(dir.path(), &registry, 4, 10);
    let store = Arc::new(MemoryStore::new("fake-bucket"));
    store.fail_next("PutObject", 2);
    let cfg = config(dir.path(), Format::Msgpack, Compression::Gzip);
    let uploaded = run_one(store.clone(), cfg, registry.clone(), chunk)
        .await
        .expect("uploaded after retries");
    let first = store.objects().clone();
    assert_eq!(first.len(), 1);
    assert_eq!(uploaded.pointer.key, first[0].0);
    let info = &registry.snapshot()[0];
    assert_eq!(
        (
            info.attempts,
            info.last_error.as_deref().map(|e| e.contains("injected"))
        ),
        (2, Some(true))
    );
    // Deterministic compression: building the upload again (as after a crash) gives the same
    // key and bytes.
    let store2 = Arc::new(MemoryStore::new("fake-bucket"));
    let again = run_one(
        store2.clone(),
        config(dir.path(), Format::Msgpack, Compression::Gzip),
        registry,
        upload_source(&uploaded),
    )
    .await
    .unwrap();
    assert_eq!(again.pointer.key, uploaded.pointer.key);
    assert_eq!(store2.objects()[0], first[0]);
}

/// The sealed chunk behind an uploaded one (as a restart that lost the uploaded state sees it).
fn upload_source(u: &UploadedChunk) -> SealedChunk {
    let ChunkState::Uploaded { header, stats, .. } = chunk::read_state(&u.paths.state).unwrap()
    else {
        panic!()
    };
    SealedChunk {
        header,
        stats,
        paths: u.paths.clone(),
    }
}

#[tokio::test]
async fn a_failed_part_aborts_the_multipart_upload_and_retries_it_whole() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Arc::new(Registry::new());
    let (chunk, body) = sealed_chunk(dir.path(), &registry, 24, 512 * 1024);
    let store = Arc::new(MemoryStore::new("fake-bucket"));
    store.fail_next("UploadPart", 1);
    let mut cfg = config(dir.path(), Format::Msgpack, Compression::None);
    cfg.multipart_threshold = 6 << 20;
    run_one(store.clone(), cfg, registry.clone(), chunk)
        .await
        .expect("uploaded on the retry");
    assert_eq!(store.aborted_uploads(), 1);
    assert_eq!(store.objects()[0].1, body);
    assert_eq!(registry.snapshot()[0].attempts, 1);
}

#[tokio::test]
async fn json_bodies_carry_tag_time_and_record() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Arc::new(Registry::new());
    let (chunk, _) = sealed_chunk(dir.path(), &registry, 3, 1);
    let store = Arc::new(MemoryStore::new("fake-bucket"));
    let uploaded = run_one(
        store.clone(),
        config(dir.path(), Format::Json, Compression::None),
        registry,
        chunk,
    )
    .await
    .unwrap();
    let stored = store.objects();
    let text = String::from_utf8(stored[0].1.to_vec()).unwrap();
    assert_eq!(
        text.lines().next().unwrap(),
        r#"{"time":"2025-11-21T16:00:00.000000000Z","tag":"app.web","record":{"i":0,"pad":"0000000"}}"#
    );
    assert_eq!(uploaded.pointer.bytes, text.len() as u64);
    assert!(uploaded.pointer.key.ends_with(".json"));
    assert_eq!(
        verify_and_decode(&uploaded.pointer, &stored[0].1)
            .unwrap()
            .len(),
        3
    );
}

/// A sealed chunk of 4 events whose last frame fails its CRC.
fn damaged_chunk(dir: &std::path::Path, registry: &Registry) -> SealedChunk {
    let (chunk, _) = sealed_chunk(dir, registry, 4, 10);
    let mut bytes = std::fs::read(&chunk.paths.data).unwrap();
    let last = bytes.len() - 2;
    bytes[last] ^= 0x55;
    std::fs::write(&chunk.paths.data, bytes).unwrap();
    chunk
}

#[tokio::test]
async fn a_damaged_chunk_goes_to_quarantine_without_retries() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Arc::new(Registry::new());
    let chunk = damaged_chunk(dir.path(), &registry);
    let store = Arc::new(MemoryStore::new("fake-bucket"));
    let id = chunk.header.chunk_id.clone();
    let cfg = config(dir.path(), Format::Msgpack, Compression::Zstd);
    let moved = dir.path().join("quarantine").join(format!("{id}.chunk"));
    assert!(
        run_until(store.clone(), cfg, registry.clone(), chunk.clone(), || {
            moved.exists()
        })
        .await
        .is_none()
    );
    assert!(store.objects().is_empty());
    assert!(dir
        .path()
        .join("quarantine")
        .join(format!("{id}.chunk"))
        .exists());
    assert!(!chunk.paths.data.exists());
    assert!(!registry.contains(&id));
}

/// A damaged chunk that cannot be moved to quarantine (here `quarantine` is a file) stays in
/// the buffer, known to the registry with the reason (so not taken by a rescan for a chunk put
/// back), and the move is tried again on the retry backoff: once it can be made, it is.
#[tokio::test]
async fn a_damaged_chunk_that_cannot_be_quarantined_yet_is_moved_there_later() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Arc::new(Registry::new());
    let chunk = damaged_chunk(dir.path(), &registry);
    let in_the_way = dir.path().join("quarantine");
    std::fs::write(&in_the_way, b"in the way").unwrap();
    let store = Arc::new(MemoryStore::new("fake-bucket"));
    let id = chunk.header.chunk_id.clone();
    let cfg = config(dir.path(), Format::Msgpack, Compression::Zstd);
    let moved = dir.path().join("quarantine").join(format!("{id}.chunk"));
    let chunks = crate::buffer::chunks_dir(dir.path());
    let refused = std::cell::Cell::new(false);
    let done = || {
        if in_the_way.is_file() {
            let Some(info) = registry.snapshot().into_iter().find(|c| c.chunk_id == id) else {
                return false;
            };
            let Some(error) = info.last_error else {
                return false;
            };
            assert!(error.contains("quarantine"), "{error}");
            assert!(chunk.paths.data.exists() && chunk.paths.state.exists());
            assert!(
                crate::buffer::rescan(&chunks, &registry).sealed.is_empty(),
                "not picked up as a chunk put back"
            );
            refused.set(true);
            std::fs::remove_file(&in_the_way).unwrap();
        }
        moved.exists() && !registry.contains(&id)
    };
    assert!(
        run_until(store.clone(), cfg, registry.clone(), chunk.clone(), done)
            .await
            .is_none()
    );
    assert!(refused.get(), "the first move failed");
    assert!(moved.exists(), "moved on a later try");
    assert!(store.objects().is_empty());
    assert!(!chunk.paths.data.exists());
    assert!(!registry.contains(&id));
}

#[tokio::test]
async fn a_chunk_that_exhausts_its_budget_moves_to_dead_letters_and_replays() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Arc::new(Registry::new());
    let (chunk, _) = sealed_chunk(dir.path(), &registry, 4, 10);
    let id = chunk.header.chunk_id.clone();
    let store = Arc::new(MemoryStore::new("fake-bucket"));
    store.fail_next("PutObject", 100);
    let mut cfg = config(dir.path(), Format::Msgpack, Compression::Zstd);
    cfg.retry.max_times = Some(2);
    let moved = dir.path().join("dead").join(format!("{id}.state"));
    assert!(
        run_until(store, cfg, registry.clone(), chunk.clone(), || moved
            .exists())
        .await
        .is_none()
    );
    assert_eq!(
        crate::buffer::dead_letter::list_dead(dir.path()).unwrap(),
        vec![id.clone()]
    );
    assert!(!chunk.paths.data.exists() && !registry.contains(&id));
    assert_eq!(registry.losses().2, 1);

    assert_eq!(
        crate::buffer::dead_letter::replay(dir.path(), &[]).unwrap(),
        vec![id.clone()]
    );
    let found = crate::buffer::rescan(&crate::buffer::chunks_dir(dir.path()), &registry);
    assert_eq!(
        found
            .sealed
            .iter()
            .map(|c| c.header.chunk_id.clone())
            .collect::<Vec<_>>(),
        vec![id.clone()]
    );
    let store = Arc::new(MemoryStore::new("fake-bucket"));
    let uploaded = run_one(
        store,
        config(dir.path(), Format::Msgpack, Compression::Zstd),
        registry,
        found.sealed[0].clone(),
    )
    .await;
    assert_eq!(uploaded.map(|u| u.pointer.chunk_id), Some(id));
}

#[tokio::test]
async fn a_dropped_chunk_is_not_uploaded() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Arc::new(Registry::new());
    let (chunk, _) = sealed_chunk(dir.path(), &registry, 2, 10);
    assert!(registry.take_oldest_waiting().is_some());
    let store = Arc::new(MemoryStore::new("fake-bucket"));
    let cfg = config(dir.path(), Format::Msgpack, Compression::Zstd);
    // Give it a second: an upload would take a few milliseconds.
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    assert!(run_until(
        store.clone(),
        cfg,
        registry,
        chunk,
        || std::time::Instant::now() > deadline
    )
    .await
    .is_none());
    assert!(store.objects().is_empty());
}

#[tokio::test]
async fn zstd_bodies_are_the_same_events_in_one_call_or_streamed() {
    // 400 events of about 20 KB: 8 MB of body. Within the default threshold it is compressed
    // in one call; with a threshold below its size, streamed (and, with these events, still one
    // object: they compress well).
    let dir = tempfile::tempdir().unwrap();
    let registry = Arc::new(Registry::new());
    let (chunk, body) = sealed_chunk(dir.path(), &registry, 400, 20_000);
    for threshold in [16 << 20, 6 << 20] {
        let store = Arc::new(MemoryStore::new("fake-bucket"));
        let mut cfg = config(dir.path(), Format::Msgpack, Compression::Zstd);
        cfg.multipart_threshold = threshold;
        let uploaded = run_one(store.clone(), cfg, registry.clone(), chunk.clone())
            .await
            .expect("uploaded");
        let p = &uploaded.pointer;
        let stored = store.objects();
        let (_, bytes) = &stored[0];
        assert_eq!(
            (p.checksum.crc32c, p.stored_bytes, p.bytes),
            (crc::crc32c(bytes), bytes.len() as u64, body.len() as u64),
            "threshold {threshold}"
        );
        assert_eq!(verify_and_decode(p, bytes).unwrap().len(), 400);
        assert_eq!(
            body::decompress(Compression::Zstd, bytes, 16 << 20).unwrap(),
            body
        );
    }
}

#[tokio::test]
async fn a_body_counts_its_compressor_s_cpu_time_and_nothing_without_compression() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Arc::new(Registry::new());
    let (chunk, _) = sealed_chunk(dir.path(), &registry, 400, 20_000);
    // zstd in one call and streamed, gzip (streamed), and no compression.
    for (compression, threshold) in [
        (Compression::Zstd, 16 << 20),
        (Compression::Zstd, 6 << 20),
        (Compression::Gzip, 16 << 20),
        (Compression::None, 16 << 20),
    ] {
        let mut cfg = config(dir.path(), Format::Msgpack, compression);
        cfg.multipart_threshold = threshold;
        let (tx, mut rx) = tokio::sync::mpsc::channel(4);
        let chunk = chunk.clone();
        let build = tokio::task::spawn_blocking(move || super::body::write_body(&chunk, &cfg, tx));
        while rx.recv().await.is_some() {}
        let summary = build.await.unwrap().unwrap();
        assert_eq!(
            summary.codec_cpu > Duration::ZERO,
            compression != Compression::None,
            "{compression:?} below a threshold of {threshold}: {:?}",
            summary.codec_cpu
        );
    }
}
