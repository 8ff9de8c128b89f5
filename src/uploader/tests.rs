use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use claimcheck_consumer::body::{self, Compression, Format};
use claimcheck_consumer::entry::{self, EventTime};
use claimcheck_consumer::verify_and_decode;

use super::*;
use crate::buffer::chunk::{ChunkHeader, ChunkPaths, ChunkStats, ChunkWriter};

/// Remembers every object put; fails the first `fail_first` calls.
#[derive(Default)]
struct FakeStore {
    puts: Mutex<Vec<(String, Vec<u8>, u32)>>,
    fail_first: Mutex<u32>,
}

impl ChunkStore for FakeStore {
    fn bucket(&self) -> &str {
        "fake-bucket"
    }

    async fn put(&self, upload: &ObjectUpload) -> Result<Option<String>, BackendError> {
        let bytes = std::fs::read(&upload.path).unwrap();
        assert_eq!(bytes.len() as u64, upload.len);
        self.puts
            .lock()
            .unwrap()
            .push((upload.key.clone(), bytes, upload.crc32c));
        let mut fail = self.fail_first.lock().unwrap();
        if *fail > 0 {
            *fail -= 1;
            return Err(BackendError {
                operation: "PutObject",
                code: "InternalError".into(),
                message: "injected".into(),
                retryable: true,
            });
        }
        Ok(Some("\"etag\"".into()))
    }
}

fn config(format: Format, compression: Compression) -> UploaderConfig {
    UploaderConfig {
        format,
        compression,
        compression_level: None,
        key_template: KeyTemplate::parse("${tag}/%Y/%m/%d/${chunk_id}.%{file_extension}", "host")
            .unwrap(),
        prefix: "logs".into(),
        producer: "host-1".into(),
        workers: 2,
        backoff: Backoff {
            wait: Duration::from_millis(10),
            max_interval: Duration::from_millis(50),
        },
    }
}

/// A sealed chunk on disk with `n` events, written in two frames.
fn sealed_chunk(dir: &std::path::Path, n: u32) -> (SealedChunk, Vec<u8>) {
    let id = uuid::Uuid::now_v7().simple().to_string();
    let header = ChunkHeader {
        chunk_id: id.clone(),
        tag: "app.web".into(),
        timekey: 1_763_740_800,
        created_ms: 0,
    };
    let paths = ChunkPaths::new(dir, &id);
    let mut writer = ChunkWriter::create(&paths.data, &header).unwrap();
    let mut body = Vec::new();
    let mut stats = ChunkStats::default();
    let mut frame = Vec::new();
    for i in 0..n {
        let mut e = vec![0x92];
        let t = EventTime::new(1_763_740_800 + i64::from(i), i);
        entry::encode::event_time(&mut e, t);
        rmpv::encode::write_value(&mut e, &rmpv::Value::Map(vec![("i".into(), i.into())])).unwrap();
        stats.add(1, e.len() as u64, t, t);
        body.extend_from_slice(&e);
        frame.push(Bytes::from(e));
        if i == n / 2 {
            writer.append(&std::mem::take(&mut frame)).unwrap();
        }
    }
    writer.append(&frame).unwrap();
    stats.data_len = writer.valid_len();
    chunk::write_state(
        &paths.state,
        &ChunkState::Sealed {
            header: header.clone(),
            stats,
        },
    )
    .unwrap();
    (
        SealedChunk {
            header,
            stats,
            paths,
        },
        body,
    )
}

async fn upload_through_run(
    store: Arc<FakeStore>,
    config: UploaderConfig,
    chunk: SealedChunk,
) -> UploadedChunk {
    let (sealed_tx, sealed_rx) = mpsc::unbounded_channel();
    let (publish_tx, mut publish_rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(run(store, Arc::new(config), sealed_rx, publish_tx));
    sealed_tx.send(chunk).unwrap();
    let uploaded = tokio::time::timeout(Duration::from_secs(20), publish_rx.recv())
        .await
        .unwrap()
        .unwrap();
    task.abort();
    uploaded
}

#[tokio::test]
async fn uploads_a_verifiable_object_then_records_the_pointer() {
    let dir = tempfile::tempdir().unwrap();
    let (chunk, body) = sealed_chunk(dir.path(), 9);
    let store = Arc::new(FakeStore::default());
    let uploaded = upload_through_run(
        store.clone(),
        config(Format::Msgpack, Compression::Zstd),
        chunk.clone(),
    )
    .await;

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
    let puts = store.puts.lock().unwrap();
    let (_, stored, crc) = &puts[0];
    assert_eq!(
        (*crc, p.checksum.crc32c, p.stored_bytes),
        (crc32c::crc32c(stored), *crc, stored.len() as u64)
    );
    assert_eq!(verify_and_decode(p, stored).unwrap().len(), 9);
    assert_eq!(
        body::decompress(Compression::Zstd, stored, 1 << 20).unwrap(),
        body
    );

    match chunk::read_state(&chunk.paths.state).unwrap() {
        ChunkState::Uploaded { pointer, etag, .. } => {
            assert_eq!((&*pointer, etag.as_deref()), (p, Some("\"etag\"")))
        }
        other => panic!("state not recorded: {other:?}"),
    }
    assert!(
        !chunk.paths.object.exists(),
        "the staged object is removed once S3 has it"
    );
    assert!(
        chunk.paths.data.exists(),
        "the data stays until the pointer is published"
    );
}

#[tokio::test]
async fn a_failed_upload_is_retried_at_the_same_key_with_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let (chunk, _) = sealed_chunk(dir.path(), 4);
    let store = Arc::new(FakeStore {
        fail_first: Mutex::new(2),
        ..FakeStore::default()
    });
    let uploaded = upload_through_run(
        store.clone(),
        config(Format::Msgpack, Compression::Gzip),
        chunk,
    )
    .await;
    let puts = store.puts.lock().unwrap();
    assert_eq!(puts.len(), 3);
    assert!(puts
        .iter()
        .all(|(k, b, c)| (k, b, c) == (&puts[0].0, &puts[0].1, &puts[0].2)));
    assert_eq!(uploaded.pointer.key, puts[0].0);
}

#[tokio::test]
async fn json_bodies_carry_tag_time_and_record() {
    let dir = tempfile::tempdir().unwrap();
    let (chunk, _) = sealed_chunk(dir.path(), 3);
    let store = Arc::new(FakeStore::default());
    let uploaded = upload_through_run(
        store.clone(),
        config(Format::Json, Compression::None),
        chunk,
    )
    .await;
    let puts = store.puts.lock().unwrap();
    let text = String::from_utf8(puts[0].1.clone()).unwrap();
    assert_eq!(
        text.lines().next().unwrap(),
        r#"{"time":"2025-11-21T16:00:00.000000000Z","tag":"app.web","record":{"i":0}}"#
    );
    assert_eq!(uploaded.pointer.bytes, text.len() as u64);
    assert!(uploaded.pointer.key.ends_with(".json"));
    assert_eq!(
        verify_and_decode(&uploaded.pointer, &puts[0].1)
            .unwrap()
            .len(),
        3
    );
}

#[test]
fn a_damaged_chunk_is_not_uploaded_and_not_retryable() {
    let dir = tempfile::tempdir().unwrap();
    let (chunk, _) = sealed_chunk(dir.path(), 4);
    let mut bytes = std::fs::read(&chunk.paths.data).unwrap();
    let last = bytes.len() - 2;
    bytes[last] ^= 0x55;
    std::fs::write(&chunk.paths.data, bytes).unwrap();
    let err = stage(&chunk, Format::Msgpack, Compression::Zstd, None).unwrap_err();
    assert!(
        matches!(err, UploadError::Read(ReadError::BadFrame { .. })),
        "{err}"
    );
    assert!(!err.is_retryable());
}
