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

use std::io;
use std::sync::Arc;

use bytes::Bytes;
use claimcheck_consumer::pointer::{Checksum, Pointer};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, error, info, Instrument};

use crate::buffer::chunk::{self, ChunkState};
use crate::buffer::dead_letter;
use crate::buffer::registry::{Phase, Registry};
use crate::buffer::{SealedChunk, UploadedChunk};
use crate::metrics::metrics;
use crate::outage::{Failure, Stage};
use crate::retry::{Attempts, Retried, RetryStep};

mod block;
mod body;
pub mod config;
mod error;
mod multipart;
mod sink;

pub use body::BodySummary;
pub use config::UploaderConfig;
pub use error::UploadError;

use body::{join, write_body};
use multipart::multipart;
use sink::Piece;

pub use crate::backends::{ChunkStore, ObjectMeta, UploadedPart, MIN_PART_SIZE};

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
            Some(joined) = tasks.join_next(), if !tasks.is_empty() => {
                if let Err(e) = joined {
                    if e.is_panic() {
                        // Its chunk would stay `uploading`, never retried, until a restart:
                        // delivery stops, and with it the sidecar, for its supervisor to
                        // start it again.
                        error!("an upload task panicked; stopping delivery");
                        std::panic::resume_unwind(e.into_panic());
                    }
                }
                continue;
            }
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
                    Err(e) if e.is_damaged() => {
                        if let Err(failure) = quarantine(&config, &registry, &job.chunk, &e) {
                            retry.failed(job, &failure);
                        }
                    }
                    Err(e) => {
                        retry.failed(job, &Failure::from(&e));
                    }
                }
            }
            .instrument(span),
        );
    }
}

/// Moves a damaged chunk to `quarantine/`. If that fails, the chunk stays in the buffer and
/// the move is tried again on the retry backoff (the failure returned), until the retry budget
/// sends it to `dead/`: left in the registry, it is not taken by the rescan for a chunk put
/// back in the buffer, and it is not forgotten until the next start either.
fn quarantine(
    config: &UploaderConfig,
    registry: &Registry,
    chunk: &SealedChunk,
    e: &UploadError,
) -> Result<(), Failure> {
    let paths = &chunk.paths;
    match dead_letter::quarantine(&config.buffer_dir, &[&paths.data, &paths.state], registry) {
        Ok(to) => {
            error!(cause = %e, to = %to.display(), events = chunk.stats.records,
                   "chunk data is damaged and cannot be delivered; moved to quarantine");
            registry.remove(&chunk.header.chunk_id);
            Ok(())
        }
        // Moved in part: the data is in quarantine, the state file left behind is no chunk.
        Err(q) if matches!(paths.data.try_exists(), Ok(false)) => {
            error!(cause = %e, quarantine_error = %q, events = chunk.stats.records,
                   "chunk data is damaged and cannot be delivered; its data was moved to quarantine, its state file not");
            registry.remove(&chunk.header.chunk_id);
            Ok(())
        }
        Err(q) => {
            error!(cause = %e, quarantine_error = %q, events = chunk.stats.records,
                   "chunk data is damaged and cannot be moved to quarantine; it stays in the buffer and the move is tried again");
            Err(Failure {
                code: "quarantine".into(),
                cause: format!("damaged ({e}), and cannot be moved to quarantine: {q}"),
                retryable: false,
            })
        }
    }
}

/// Builds the body, stores it, records the pointer.
pub async fn upload<S: ChunkStore>(
    store: &S,
    config: &UploaderConfig,
    chunk: &SealedChunk,
) -> Result<UploadedChunk, UploadError> {
    let header = &chunk.header;
    let meta = config.object_meta(&header.tag, &header.chunk_id, header.timekey);
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

#[cfg(test)]
mod tests;
