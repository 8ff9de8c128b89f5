//! In-memory backends, to run the whole sidecar in-process without AWS: [`MemoryStore`] keeps
//! objects as S3 would, [`MemorySink`] keeps pointer records as Kinesis would, and both can be
//! taken down and brought back. Our own tests use them with [`crate::Sidecar::run_with`]; so
//! can users who embed the sidecar (feature `testing`).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use bytes::{Bytes, BytesMut};
use claimcheck_consumer::crc;
use claimcheck_consumer::{verify_and_decode, Error, Event, Pointer};
use tokio::sync::Notify;

use crate::aws::BackendError;
use crate::backends::{
    ChunkStore, EntryResult, ObjectMeta, PointerRecord, PointerSink, UploadedPart, MIN_PART_SIZE,
};
use crate::config::{Config, ServeArgs};

/// The sidecar's configuration as `claimcheck serve` would build it from `args`, with its
/// buffer in `buffer_dir` and placeholder bucket and stream names (the in-memory backends
/// ignore them), listening on 127.0.0.1, any free port.
pub fn config(buffer_dir: &Path, args: &[&str]) -> Result<Config, String> {
    #[derive(clap::Parser)]
    struct Serve {
        #[command(flatten)]
        serve: ServeArgs,
    }
    let dir = buffer_dir
        .to_str()
        .ok_or("the buffer directory is not UTF-8")?;
    let mut all = vec![
        "serve",
        "--buffer-dir",
        dir,
        "--listen",
        "127.0.0.1:0",
        "--s3-bucket",
        "in-memory",
        "--kinesis-stream",
        "in-memory",
    ];
    all.extend_from_slice(args);
    <Serve as clap::Parser>::try_parse_from(all)
        .map_err(|e| e.to_string())?
        .serve
        .into_config()
}

fn unavailable(operation: &'static str) -> BackendError {
    BackendError {
        operation,
        code: "ServiceUnavailable".into(),
        message: "the in-memory backend is down".into(),
        retryable: true,
    }
}

/// A multipart upload in progress: what it was started with, and its parts by number.
#[derive(Debug)]
struct Upload {
    meta: ObjectMeta,
    parts: BTreeMap<i32, Bytes>,
}

/// An S3 bucket in memory.
#[derive(Debug, Default)]
pub struct MemoryStore {
    bucket: String,
    /// Each object's bytes, and what it was written with (tags, metadata, content type).
    objects: Mutex<BTreeMap<String, (Bytes, ObjectMeta)>>,
    uploads: Mutex<HashMap<String, Upload>>,
    next_upload: AtomicU64,
    down: AtomicBool,
    calls: AtomicU64,
    /// Calls still to fail, by operation.
    fail_next: Mutex<HashMap<&'static str, u32>>,
    aborted: AtomicU64,
    panic_next: AtomicBool,
}

impl MemoryStore {
    pub fn new(bucket: &str) -> MemoryStore {
        MemoryStore {
            bucket: bucket.into(),
            ..MemoryStore::default()
        }
    }

    /// While down, every call fails with a retryable error.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// Fails the next `n` calls of `operation` (`PutObject`, `UploadPart`, …) with a retryable
    /// error.
    pub fn fail_next(&self, operation: &'static str, n: u32) {
        self.fail_next.lock().unwrap().insert(operation, n);
    }

    /// Makes the next call panic, as a bug in delivery would.
    pub fn panic_next(&self) {
        self.panic_next.store(true, Ordering::SeqCst);
    }

    /// Multipart uploads aborted.
    pub fn aborted_uploads(&self) -> u64 {
        self.aborted.load(Ordering::SeqCst)
    }

    /// What the object under `key` was written with: tags, metadata, content type.
    pub fn meta(&self, key: &str) -> Option<ObjectMeta> {
        self.objects
            .lock()
            .unwrap()
            .get(key)
            .map(|(_, m)| m.clone())
    }

    /// Every stored object, by key.
    pub fn objects(&self) -> Vec<(String, Bytes)> {
        let objects = self.objects.lock().unwrap();
        objects
            .iter()
            .map(|(k, (body, _))| (k.clone(), body.clone()))
            .collect()
    }

    /// Calls made, failed or not.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }

    /// The object stored under `key`.
    pub fn object(&self, key: &str) -> Option<Bytes> {
        self.objects
            .lock()
            .unwrap()
            .get(key)
            .map(|(b, _)| b.clone())
    }

    /// Every stored object's key, in order.
    pub fn keys(&self) -> Vec<String> {
        self.objects.lock().unwrap().keys().cloned().collect()
    }

    /// Multipart uploads started and neither completed nor aborted.
    pub fn open_uploads(&self) -> usize {
        self.uploads.lock().unwrap().len()
    }

    fn call(&self, operation: &'static str) -> Result<(), BackendError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.panic_next.swap(false, Ordering::SeqCst) {
            panic!("a {operation} call panicked (MemoryStore::panic_next)");
        }
        if let Some(n) = self.fail_next.lock().unwrap().get_mut(operation) {
            if *n > 0 {
                *n -= 1;
                return Err(BackendError {
                    operation,
                    code: "InternalError".into(),
                    message: "failure injected by fail_next".into(),
                    retryable: true,
                });
            }
        }
        match self.down.load(Ordering::SeqCst) {
            true => Err(unavailable(operation)),
            false => Ok(()),
        }
    }
}

fn etag(body: &[u8]) -> Option<String> {
    Some(format!("\"{:08x}\"", crc::crc32c(body)))
}

fn check(body: &[u8], crc32c: u32, operation: &'static str) -> Result<(), BackendError> {
    if crc::crc32c(body) == crc32c {
        return Ok(());
    }
    Err(BackendError {
        operation,
        code: "BadDigest".into(),
        message: "the CRC32C checksum does not match the body".into(),
        retryable: false,
    })
}

impl ChunkStore for MemoryStore {
    fn bucket(&self) -> &str {
        &self.bucket
    }

    async fn put_object(
        &self,
        meta: &ObjectMeta,
        body: Bytes,
        crc32c: u32,
    ) -> Result<Option<String>, BackendError> {
        self.call("PutObject")?;
        check(&body, crc32c, "PutObject")?;
        let tag = etag(&body);
        self.objects
            .lock()
            .unwrap()
            .insert(meta.key.clone(), (body, meta.clone()));
        Ok(tag)
    }

    async fn create_multipart(&self, meta: &ObjectMeta) -> Result<String, BackendError> {
        self.call("CreateMultipartUpload")?;
        let id = self.next_upload.fetch_add(1, Ordering::SeqCst).to_string();
        let upload = Upload {
            meta: meta.clone(),
            parts: BTreeMap::new(),
        };
        self.uploads.lock().unwrap().insert(id.clone(), upload);
        Ok(id)
    }

    async fn upload_part(
        &self,
        _: &ObjectMeta,
        upload_id: &str,
        number: i32,
        body: Bytes,
        crc32c: u32,
    ) -> Result<Option<String>, BackendError> {
        self.call("UploadPart")?;
        check(&body, crc32c, "UploadPart")?;
        let tag = etag(&body);
        let mut uploads = self.uploads.lock().unwrap();
        let upload = uploads.get_mut(upload_id).ok_or_else(|| BackendError {
            operation: "UploadPart",
            code: "NoSuchUpload".into(),
            message: upload_id.into(),
            retryable: false,
        })?;
        upload.parts.insert(number, body);
        Ok(tag)
    }

    async fn complete_multipart(
        &self,
        meta: &ObjectMeta,
        upload_id: &str,
        parts: &[UploadedPart],
    ) -> Result<Option<String>, BackendError> {
        self.call("CompleteMultipartUpload")?;
        // As S3: the upload must exist; parts are listed in ascending order, each uploaded,
        // all but the last at least 5 MiB; the object gets what the upload was started with.
        let refuse = |code: &str, message: String| BackendError {
            operation: "CompleteMultipartUpload",
            code: code.into(),
            message,
            retryable: false,
        };
        let Some(upload) = self.uploads.lock().unwrap().remove(upload_id) else {
            return Err(refuse("NoSuchUpload", upload_id.into()));
        };
        if !parts.windows(2).all(|w| w[0].number < w[1].number) {
            return Err(refuse("InvalidPartOrder", "parts out of order".into()));
        }
        let mut body = BytesMut::new();
        for (i, part) in parts.iter().enumerate() {
            let bytes = upload.parts.get(&part.number).ok_or_else(|| {
                refuse(
                    "InvalidPart",
                    format!("part {} was not uploaded", part.number),
                )
            })?;
            if i + 1 < parts.len() && (bytes.len() as u64) < MIN_PART_SIZE {
                return Err(refuse(
                    "EntityTooSmall",
                    format!("part {} is {} bytes", part.number, bytes.len()),
                ));
            }
            body.extend_from_slice(bytes);
        }
        let body = body.freeze();
        let tag = etag(&body);
        self.objects
            .lock()
            .unwrap()
            .insert(meta.key.clone(), (body, upload.meta));
        Ok(tag)
    }

    async fn abort_multipart(&self, _: &ObjectMeta, upload_id: &str) -> Result<(), BackendError> {
        self.call("AbortMultipartUpload")?;
        self.uploads.lock().unwrap().remove(upload_id);
        self.aborted.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// A Kinesis stream in memory: every accepted record, in order.
#[derive(Debug, Default)]
pub struct MemorySink {
    records: Mutex<Vec<PointerRecord>>,
    down: AtomicBool,
    failed: AtomicU64,
    added: Notify,
    panic_next: AtomicBool,
}

impl MemorySink {
    pub fn new() -> MemorySink {
        MemorySink::default()
    }

    /// While down, every PutRecords fails with a retryable error.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// Makes the next PutRecords call panic, as a bug in delivery would.
    pub fn panic_next(&self) {
        self.panic_next.store(true, Ordering::SeqCst);
    }

    /// PutRecords calls that failed because the sink was down.
    pub fn failed_calls(&self) -> u64 {
        self.failed.load(Ordering::SeqCst)
    }

    /// Every accepted record, in order.
    pub fn records(&self) -> Vec<PointerRecord> {
        self.records.lock().unwrap().clone()
    }

    /// Every accepted record's pointer, in order.
    pub fn pointers(&self) -> Vec<Pointer> {
        self.records()
            .iter()
            .map(|r| Pointer::from_record(&r.data).expect("the sidecar writes valid records"))
            .collect()
    }

    /// Waits until at least `n` records were accepted; returns how many there are.
    pub async fn wait_for(&self, n: usize) -> usize {
        loop {
            let added = self.added.notified();
            let len = self.records.lock().unwrap().len();
            if len >= n {
                return len;
            }
            added.await;
        }
    }
}

impl PointerSink for MemorySink {
    async fn put_records(
        &self,
        records: &[PointerRecord],
    ) -> Result<Vec<EntryResult>, BackendError> {
        if self.panic_next.swap(false, Ordering::SeqCst) {
            panic!("a PutRecords call panicked (MemorySink::panic_next)");
        }
        if self.down.load(Ordering::SeqCst) {
            self.failed.fetch_add(1, Ordering::SeqCst);
            return Err(unavailable("PutRecords"));
        }
        let mut stored = self.records.lock().unwrap();
        let first = stored.len();
        stored.extend_from_slice(records);
        drop(stored);
        self.added.notify_waiters();
        Ok((0..records.len())
            .map(|i| EntryResult::Accepted {
                shard_id: "shardId-000000000000".into(),
                sequence_number: (first + i).to_string(),
            })
            .collect())
    }
}

/// The events of the chunk `pointer` names: its inline body, or its object in `store`,
/// checked against the pointer and decoded.
pub fn events(store: &MemoryStore, pointer: &Pointer) -> Result<Vec<Event>, Error> {
    let body = match &pointer.inline {
        Some(body) => body.clone(),
        None => store
            .object(&pointer.key)
            .ok_or_else(|| Error::ObjectMissing {
                bucket: pointer.bucket.clone(),
                key: pointer.key.clone(),
            })?,
    };
    verify_and_decode(pointer, &body)
}
