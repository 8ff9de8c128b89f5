//! Sealed chunk → compressed object in S3 → `uploaded` state.
//!
//! The chunk's frames are read back (checking every frame's CRC32C), converted to the body
//! format and compressed on a blocking thread, which hands the output over in pieces: a body
//! that ends within `multipart_threshold` goes as one PutObject from memory; a larger one is
//! sent by multipart upload, part by part while it is being compressed. Memory therefore stays
//! within about two parts per upload whatever the chunk size, and no copy of the body is kept
//! on disk, which matters when the disk is full. Compression is deterministic, so a retry, even
//! after a crash, writes the same bytes to the same key (derived from the chunk id). Only after
//! S3 confirmed the object is the `uploaded` state (with the pointer) written.
//!
//! A body whose whole Kinesis record (pointer JSON, newline, body) fits in `inline_max_bytes`
//! is not stored in S3 at all: it rides in the record (an inline pointer, version 2), and the
//! `uploaded` state keeps the body until Kinesis accepted it. The bytes and the checksum are
//! the ones the object would have held.
//!
//! A failed upload is retried with backoff until the retry budget is spent; the chunk then
//! moves to `dead/` for `claimcheck replay`. A chunk whose data turns out to be damaged is
//! moved to `quarantine/` at once: no retry can repair it.

use std::fs::File;
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use claimcheck_consumer::body::{self, Compression, Encoder, Format};
use claimcheck_consumer::pointer::{Checksum, Pointer};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, error, info, Instrument};

use crate::aws::BackendError;
use crate::buffer::chunk::{self, ChunkState, ReadError};
use crate::buffer::dead_letter;
use crate::buffer::registry::{Phase, Registry};
use crate::buffer::{SealedChunk, UploadedChunk};
use crate::key_template::{KeyTemplate, KeyValues};
use crate::metrics::metrics;
use crate::outage::{Failure, Stage};
use crate::retry::{Attempts, Retried, RetryPolicy, RetryStep};

pub use crate::backends::{ChunkStore, ObjectMeta, UploadedPart, MIN_PART_SIZE};

/// What the outage reporter hears of a failed upload.
impl From<&UploadError> for Failure {
    fn from(e: &UploadError) -> Failure {
        let code = match e {
            UploadError::Store(b) => return Failure::from(b),
            UploadError::Read(_) => "read",
            UploadError::Body(_) => "body",
            UploadError::State(_) => "state",
        };
        Failure {
            code: code.into(),
            cause: e.to_string(),
            retryable: e.is_retryable(),
        }
    }
}

/// Settings of the uploader.
#[derive(Debug, Clone)]
pub struct UploaderConfig {
    pub format: Format,
    pub compression: Compression,
    pub compression_level: Option<i32>,
    pub key_template: KeyTemplate,
    /// Prepended to every key.
    pub prefix: String,
    /// Host name written into pointers.
    pub producer: String,
    /// Chunks uploaded at once (Fluentd's `flush_thread_count`).
    pub workers: usize,
    pub retry: RetryPolicy,
    /// Bodies up to this size go by one PutObject; larger ones by multipart upload.
    pub multipart_threshold: u64,
    /// Part size of multipart uploads (at least S3's minimum of 5 MiB).
    pub part_size: u64,
    /// Records (pointer JSON, newline, body) up to this size carry their body inline, and no
    /// object is stored; 0: every body goes to S3.
    pub inline_max_bytes: u64,
    /// The buffer directory, for `dead/` and `quarantine/`.
    pub buffer_dir: PathBuf,
}

impl UploaderConfig {
    /// The object key of a chunk.
    pub fn key(&self, tag: &str, chunk_id: &str, timekey: i64) -> String {
        let ext = body::file_extension(self.format, self.compression);
        let key = self.key_template.render(KeyValues {
            tag,
            chunk_id,
            timekey,
            file_extension: &ext,
        });
        match self.prefix.as_str() {
            "" => key,
            p if p.ends_with('/') => format!("{p}{key}"),
            p => format!("{p}/{key}"),
        }
    }
}

/// Why an upload attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("cannot read chunk: {0}")]
    Read(#[from] ReadError),
    #[error("cannot build the object: {0}")]
    Body(#[source] io::Error),
    #[error(transparent)]
    Store(#[from] BackendError),
    #[error("cannot record the upload: {0}")]
    State(#[source] io::Error),
}

impl UploadError {
    /// The chunk file itself is damaged: no retry can help.
    pub fn is_damaged(&self) -> bool {
        matches!(
            self,
            UploadError::Read(
                ReadError::BadMagic | ReadError::BadHeader(_) | ReadError::BadFrame { .. }
            )
        )
    }

    /// Whether retrying alone can help (access denied or a missing bucket will not heal).
    pub fn is_retryable(&self) -> bool {
        match self {
            UploadError::Store(e) => e.retryable,
            other => !other.is_damaged(),
        }
    }
}

/// The stored object's size and checksum, and the body size before compression.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodySummary {
    pub stored_bytes: u64,
    pub crc32c: u32,
    pub body_bytes: u64,
}

struct Job {
    chunk: SealedChunk,
    attempts: Attempts,
}

impl Retried for Job {
    fn chunk_id(&self) -> &str {
        &self.chunk.header.chunk_id
    }

    fn paths(&self) -> &chunk::ChunkPaths {
        &self.chunk.paths
    }

    fn events(&self) -> u64 {
        self.chunk.stats.records
    }

    fn attempts(&mut self) -> &mut Attempts {
        &mut self.attempts
    }
}

/// Uploads sealed chunks, `config.workers` at a time, for as long as it runs; failed chunks
/// are retried with backoff until the retry budget is spent. Uploaded chunks go to `publish`.
pub async fn run<S: ChunkStore>(
    store: Arc<S>,
    config: Arc<UploaderConfig>,
    registry: Arc<Registry>,
    mut sealed: mpsc::UnboundedReceiver<SealedChunk>,
    publish: mpsc::UnboundedSender<UploadedChunk>,
) {
    let (retry_tx, mut retry_rx) = mpsc::unbounded_channel::<Job>();
    let retry = Arc::new(RetryStep::new(
        Stage::Upload,
        config.retry,
        config.buffer_dir.clone(),
        registry.clone(),
        retry_tx,
    ));
    let permits = Arc::new(Semaphore::new(config.workers.max(1)));
    let mut tasks = JoinSet::new();
    loop {
        let job = tokio::select! {
            Some(chunk) = sealed.recv() => Job { chunk, attempts: Attempts::default() },
            Some(job) = retry_rx.recv() => job,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
        };
        let permit = permits
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let (store, config, registry) = (store.clone(), config.clone(), registry.clone());
        let (retry, publish) = (retry.clone(), publish.clone());
        let span = tracing::info_span!("chunk", chunk_id = %job.chunk.header.chunk_id);
        tasks.spawn(
            async move {
                let id = job.chunk.header.chunk_id.clone();
                if !registry.set_phase(&id, Phase::Uploading) {
                    debug!("chunk is no longer in the buffer (dropped); not uploading it");
                    return;
                }
                let result = upload(&*store, &config, &job.chunk).await;
                drop(permit);
                match result {
                    Ok(mut uploaded) => {
                        registry.set_phase(&id, Phase::Uploaded);
                        if let Some(body) = uploaded.pointer.inline.take() {
                            // The state file now holds the body too (base64), until published.
                            // The publisher reads it from there when it sends the record, so
                            // that chunks queued behind a slow Kinesis hold no bodies in memory.
                            registry.grow(&id, (body.len().div_ceil(3) * 4) as i64, 0);
                        }
                        registry.outage(Stage::Upload).succeeded(1);
                        let _ = publish.send(uploaded);
                    }
                    Err(e) if e.is_damaged() => quarantine(&config, &registry, &job.chunk, &e),
                    Err(e) => {
                        retry.failed(job, &Failure::from(&e));
                    }
                }
            }
            .instrument(span),
        );
    }
}

fn quarantine(config: &UploaderConfig, registry: &Registry, chunk: &SealedChunk, e: &UploadError) {
    let paths = &chunk.paths;
    match dead_letter::quarantine(&config.buffer_dir, &[&paths.data, &paths.state]) {
        Ok(to) => {
            metrics().files_quarantined.inc_by(2);
            error!(cause = %e, to = %to.display(), events = chunk.stats.records,
                   "chunk data is damaged and cannot be delivered; moved to quarantine");
        }
        Err(q) => {
            error!(cause = %e, quarantine_error = %q, "chunk data is damaged and cannot be moved to quarantine")
        }
    }
    registry.remove(&chunk.header.chunk_id);
}

/// Builds the body, stores it, records the pointer.
pub async fn upload<S: ChunkStore>(
    store: &S,
    config: &UploaderConfig,
    chunk: &SealedChunk,
) -> Result<UploadedChunk, UploadError> {
    let header = &chunk.header;
    let meta = ObjectMeta {
        key: config.key(&header.tag, &header.chunk_id, header.timekey),
        content_type: config.format.content_type(),
        content_encoding: config.compression.content_encoding(),
        chunk_id: header.chunk_id.clone(),
    };
    let started = std::time::Instant::now();
    let (tx, mut pieces) = mpsc::channel::<Piece>(1);
    let (c, cfg) = (chunk.clone(), config.clone());
    let build = tokio::task::spawn_blocking(move || write_body(&c, &cfg, tx));
    let pointer = |summary: BodySummary| Pointer {
        v: Pointer::OBJECT_VERSION,
        chunk_id: header.chunk_id.clone(),
        bucket: store.bucket().to_string(),
        key: meta.key.clone(),
        tag: header.tag.clone(),
        timekey: header.timekey,
        first_time: chunk.stats.first_time,
        last_time: chunk.stats.last_time,
        records: chunk.stats.records,
        bytes: summary.body_bytes,
        stored_bytes: summary.stored_bytes,
        format: config.format,
        compression: config.compression,
        checksum: Checksum {
            crc32c: summary.crc32c,
        },
        producer: config.producer.clone(),
        created_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        inline: None,
    };
    let etag = match pieces.recv().await {
        Some(Piece::Whole(body)) => {
            let summary = join(build).await?;
            if let Some(inline) = inline_pointer(config, pointer(summary), &body) {
                let uploaded = record_uploaded(chunk, inline, None).await?;
                info!(
                    bytes = summary.body_bytes,
                    stored_bytes = summary.stored_bytes,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "body stored inline"
                );
                return Ok(uploaded);
            }
            store
                .put_object(&meta, body, summary.crc32c)
                .await
                .map(|etag| (etag, summary))
                .map_err(UploadError::from)
        }
        Some(Piece::Part(first, done)) => {
            multipart(store, &meta, (first, done), &mut pieces, build).await
        }
        None => {
            return Err(join(build)
                .await
                .err()
                .unwrap_or_else(|| UploadError::Body(io::Error::other("no body"))))
        }
    };
    let (etag, summary) = etag?;
    let pointer = pointer(summary);
    info!(key = %pointer.key, bytes = summary.body_bytes, stored_bytes = summary.stored_bytes,
          elapsed_ms = started.elapsed().as_millis() as u64, "object stored");
    metrics().chunks_uploaded.inc();
    metrics().stored_bytes.inc_by(summary.stored_bytes);
    record_uploaded(chunk, pointer, etag).await
}

/// The inline form of `pointer`, if its record (JSON, newline, body) fits in
/// `inline_max_bytes`.
fn inline_pointer(config: &UploaderConfig, pointer: Pointer, body: &Bytes) -> Option<Pointer> {
    if body.len() as u64 >= config.inline_max_bytes {
        return None;
    }
    let inline = pointer.into_inline(body.clone());
    let record_len = inline.to_json().len() as u64 + 1 + body.len() as u64;
    (record_len <= config.inline_max_bytes).then_some(inline)
}

/// Writes the `uploaded` state (atomically), after which the pointer can be published.
async fn record_uploaded(
    chunk: &SealedChunk,
    pointer: Pointer,
    etag: Option<String>,
) -> Result<UploadedChunk, UploadError> {
    let state = ChunkState::uploaded(chunk.header.clone(), chunk.stats, pointer.clone(), etag);
    let path = chunk.paths.state.clone();
    tokio::task::spawn_blocking(move || chunk::write_state(&path, &state))
        .await
        .map_err(|e| UploadError::State(io::Error::other(e)))?
        .map_err(UploadError::State)?;
    Ok(UploadedChunk {
        header: chunk.header.clone(),
        paths: chunk.paths.clone(),
        pointer,
    })
}

async fn join(
    build: tokio::task::JoinHandle<Result<BodySummary, UploadError>>,
) -> Result<BodySummary, UploadError> {
    build
        .await
        .map_err(|e| UploadError::Body(io::Error::other(e)))?
}

/// Sends parts as the body is built; aborts the upload on any error.
async fn multipart<S: ChunkStore>(
    store: &S,
    meta: &ObjectMeta,
    first: (Bytes, PartDone),
    pieces: &mut mpsc::Receiver<Piece>,
    build: tokio::task::JoinHandle<Result<BodySummary, UploadError>>,
) -> Result<(Option<String>, BodySummary), UploadError> {
    let upload_id = store.create_multipart(meta).await?;
    let mut parts = Vec::new();
    let result = async {
        let mut next = Some(first);
        while let Some((body, done)) = next.take() {
            let number = parts.len() as i32 + 1;
            let crc = crc32c::crc32c(&body);
            let size = body.len();
            let etag = store
                .upload_part(meta, &upload_id, number, body, crc)
                .await?;
            // The compressing thread may go on to the part after next.
            drop(done);
            debug!(key = %meta.key, part = number, bytes = size, "part uploaded");
            parts.push(UploadedPart {
                number,
                etag,
                crc32c: crc,
            });
            next = match pieces.recv().await {
                Some(Piece::Part(b, done)) => Some((b, done)),
                Some(Piece::Whole(b)) => Some((b, oneshot::channel().0)),
                None => None,
            };
        }
        let summary = join(build).await?;
        let etag = store.complete_multipart(meta, &upload_id, &parts).await?;
        Ok((etag, summary))
    }
    .await;
    if result.is_err() {
        // Best effort; a bucket lifecycle rule (AbortIncompleteMultipartUpload) cleans up
        // after crashes, when this cannot run. At debug: with S3 down it fails on every retry,
        // and the outage reporter already says that S3 fails.
        if let Err(e) = store.abort_multipart(meta, &upload_id).await {
            debug!(key = %meta.key, cause = %e, "cannot abort a multipart upload");
        }
    }
    result
}

/// A piece of a body on its way from the compressing thread to the upload.
enum Piece {
    /// The whole body, within the multipart threshold.
    Whole(Bytes),
    /// The next part of a multipart upload, and the signal that it has been uploaded.
    Part(Bytes, PartDone),
}

/// Dropped once a part has been uploaded (or the upload gave up on it).
type PartDone = oneshot::Sender<()>;

/// Compressed output on its way to S3, in an anonymous memory map rather than on the heap:
/// its memory goes back to the system as soon as the part is uploaded. Multi-MiB heap buffers
/// freed by the blocking threads stayed in malloc's per-thread arenas instead, and peak RSS grew
/// with the chunk size (see docs/performance.md).
struct Block {
    map: memmap2::MmapMut,
    len: usize,
}

impl Block {
    fn new(capacity: usize) -> io::Result<Block> {
        Ok(Block {
            map: memmap2::MmapMut::map_anon(capacity.max(1))?,
            len: 0,
        })
    }

    fn room(&self) -> usize {
        self.map.len() - self.len
    }

    /// Copies as much of `data` as fits; returns how much that was.
    fn fill(&mut self, data: &[u8]) -> usize {
        let n = data.len().min(self.room());
        self.map[self.len..self.len + n].copy_from_slice(&data[..n]);
        self.len += n;
        n
    }

    /// Moves the contents into a block of at least `capacity` bytes.
    fn grow(self, capacity: usize) -> io::Result<Block> {
        let mut bigger = Block::new(capacity)?;
        bigger.fill(&self.map[..self.len]);
        Ok(bigger)
    }

    fn freeze(self) -> Bytes {
        let len = self.len;
        Bytes::from_owner(self.map).slice(..len)
    }
}

/// Collects compressed output, checksums it, and hands it to the upload in parts.
struct PartSink {
    /// Output not yet handed over: until the body passes `threshold`, all of it.
    block: Option<Block>,
    threshold: usize,
    part_size: usize,
    multipart: bool,
    tx: mpsc::Sender<Piece>,
    /// Resolves when the last part sent has been uploaded.
    uploaded: Option<oneshot::Receiver<()>>,
    len: u64,
    crc: u32,
}

impl PartSink {
    fn send(&self, piece: Piece) -> io::Result<()> {
        self.tx
            .blocking_send(piece)
            .map_err(|_| io::Error::other("the upload stopped"))
    }

    /// Waits until the last part handed over has been uploaded.
    fn wait_uploaded(&mut self) {
        if let Some(uploaded) = self.uploaded.take() {
            // Err means the sender was dropped: uploaded, or the upload stopped (then the
            // next send fails).
            let _ = uploaded.blocking_recv();
        }
    }

    /// Hands over the next part once the one before it is uploaded, so that an upload holds
    /// a bounded number of parts whatever the chunk size.
    fn send_part(&mut self, part: Bytes) -> io::Result<()> {
        self.wait_uploaded();
        let (done, uploaded) = oneshot::channel();
        self.uploaded = Some(uploaded);
        self.send(Piece::Part(part, done))
    }

    /// The body passed the threshold: what was collected goes out as parts (slices of one
    /// block, no copy), all but the tail, which starts the next part's block.
    fn start_multipart(&mut self, collected: Block) -> io::Result<()> {
        self.multipart = true;
        let mut bytes = collected.freeze();
        while bytes.len() >= self.part_size {
            let part = bytes.split_to(self.part_size);
            self.send_part(part)?;
        }
        let mut tail = Block::new(self.part_size)?;
        tail.fill(&bytes);
        self.block = Some(tail);
        Ok(())
    }

    fn finish(mut self) -> io::Result<(u64, u32)> {
        let rest = self.block.take().map_or_else(Bytes::new, Block::freeze);
        if self.multipart {
            if !rest.is_empty() {
                self.send_part(rest)?;
            }
        } else {
            self.send(Piece::Whole(rest))?;
        }
        Ok((self.len, self.crc))
    }
}

/// Thresholds below this get their whole block at once (address space, not memory).
const RESERVE_UP_TO: usize = 1 << 30;
/// First block of a body under a larger threshold; it doubles as the body grows.
const FIRST_BLOCK: usize = 1 << 20;

impl Write for PartSink {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.len += data.len() as u64;
        self.crc = crc32c::crc32c_append(self.crc, data);
        let mut rest = data;
        while !rest.is_empty() {
            let mut block = match self.block.take() {
                Some(b) => b,
                None if self.multipart => {
                    // The next part is compressed once the last one is uploaded: an upload
                    // holds one part at a time (the workers overlap each other instead).
                    self.wait_uploaded();
                    Block::new(self.part_size)?
                }
                // Room for the whole threshold at once: a map takes memory only where it is
                // written, and growing by copies would hold two blocks for a while.
                None if self.threshold < RESERVE_UP_TO => Block::new(self.threshold + 1)?,
                None => Block::new(FIRST_BLOCK)?,
            };
            if block.room() == 0 {
                if self.multipart {
                    self.send_part(block.freeze())?;
                    continue;
                }
                if block.len > self.threshold {
                    self.start_multipart(block)?;
                    continue;
                }
                // Below the threshold: double, up to just past it.
                let capacity = (block.len * 2).min(self.threshold + 1).max(block.len + 1);
                block = block.grow(capacity)?;
            }
            let n = block.fill(rest);
            rest = &rest[n..];
            self.block = Some(block);
        }
        // A body that just passed the threshold goes multipart now, not on the next write.
        if !self.multipart && self.block.as_ref().is_some_and(|b| b.len > self.threshold) {
            let block = self.block.take().expect("checked above");
            self.start_multipart(block)?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Counts what passes through it.
struct Counting<W> {
    inner: W,
    len: u64,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Piece size for reading a chunk back.
const READ_PIECE: usize = 1 << 20;

/// Reads a chunk, builds its body in the configured format and compression, and sends it to
/// `tx` (blocking).
fn write_body(
    chunk: &SealedChunk,
    config: &UploaderConfig,
    tx: mpsc::Sender<Piece>,
) -> Result<BodySummary, UploadError> {
    let threshold = config.multipart_threshold.max(1) as usize;
    let part_size = config.part_size.max(MIN_PART_SIZE) as usize;
    let sink = PartSink {
        block: None,
        threshold,
        part_size,
        multipart: false,
        tx,
        uploaded: None,
        len: 0,
        crc: 0,
    };
    let encoder = Encoder::new(config.compression, config.compression_level, sink)
        .map_err(UploadError::Body)?;
    let mut body = Counting {
        inner: encoder,
        len: 0,
    };
    let mut data = File::open(&chunk.paths.data).map_err(ReadError::Io)?;
    let (_, start) = chunk::read_header(&mut data)?;
    let mut frames =
        chunk::FrameReader::new(data, start, chunk.stats.data_len).map_err(ReadError::Io)?;
    let mut piece = Vec::new();
    match config.format {
        Format::Msgpack => {
            while frames.next_piece(&mut piece, READ_PIECE)? {
                body.write_all(&piece).map_err(UploadError::Body)?;
            }
        }
        // JSON needs whole entries: read whole frames (each holds whole entries only).
        Format::Json => {
            while frames.next_piece(&mut piece, usize::MAX)? {
                body::write_json_lines(&chunk.header.tag, &piece, &mut body).map_err(|e| {
                    UploadError::Body(io::Error::new(io::ErrorKind::InvalidData, e))
                })?;
            }
        }
    }
    let body_bytes = body.len;
    let sink = body.inner.finish().map_err(UploadError::Body)?;
    let (stored_bytes, crc32c) = sink.finish().map_err(UploadError::Body)?;
    Ok(BodySummary {
        stored_bytes,
        crc32c,
        body_bytes,
    })
}

#[cfg(test)]
mod tests;
