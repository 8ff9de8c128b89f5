//! Sealed chunk → compressed object in S3 → `uploaded` state.
//!
//! Each chunk is first staged: its frames are read back (checking every frame's CRC32C),
//! converted to the body format, compressed, and written to `<id>.object` while the CRC32C and
//! size of the result are computed. Staging streams in 1 MiB pieces, so memory does not grow
//! with chunk size, and a retry reuses the staged file instead of compressing again. The
//! object key is derived from the chunk id, so any retry, even after a crash, rewrites the same
//! key. Only after S3 confirmed the object is the `uploaded` state (with the pointer) written.

use std::fs::File;
use std::future::Future;
use std::io::{self, BufWriter, Write};
use std::path::PathBuf;
use std::sync::Arc;

use claimcheck_consumer::body::{self, Compression, Encoder, Format};
use claimcheck_consumer::pointer::{Checksum, Pointer};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, error, info, warn, Instrument};

use crate::aws::BackendError;
use crate::buffer::chunk::{self, ChunkState, ReadError};
use crate::buffer::{SealedChunk, UploadedChunk};
use crate::key_template::{KeyTemplate, KeyValues};
use crate::retry::Backoff;

/// One object to store.
#[derive(Debug, Clone)]
pub struct ObjectUpload {
    pub key: String,
    /// The staged object file.
    pub path: PathBuf,
    pub len: u64,
    pub crc32c: u32,
    pub content_type: &'static str,
    pub content_encoding: Option<&'static str>,
    pub chunk_id: String,
}

/// Where chunk bodies are stored (S3 in production, a fake in tests).
pub trait ChunkStore: Send + Sync + 'static {
    fn bucket(&self) -> &str;
    /// Stores the object, replacing any object at the same key. Returns the ETag.
    fn put(
        &self,
        upload: &ObjectUpload,
    ) -> impl Future<Output = Result<Option<String>, BackendError>> + Send;
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
    pub backoff: Backoff,
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
    #[error("cannot stage object: {0}")]
    Stage(#[source] io::Error),
    #[error(transparent)]
    Store(#[from] BackendError),
    #[error("cannot record upload: {0}")]
    State(#[source] io::Error),
}

impl UploadError {
    /// Whether retrying alone can help (a damaged chunk file or access denied will not heal).
    pub fn is_retryable(&self) -> bool {
        match self {
            UploadError::Read(ReadError::Io(_)) | UploadError::Stage(_) | UploadError::State(_) => {
                true
            }
            UploadError::Read(_) => false,
            UploadError::Store(e) => e.retryable,
        }
    }
}

/// The staged object of a chunk.
#[derive(Debug, Clone, Copy)]
pub struct Staged {
    pub len: u64,
    pub crc32c: u32,
    /// Body bytes before compression (for `json`, the JSON text).
    pub body_bytes: u64,
}

struct Job {
    chunk: SealedChunk,
    attempt: u32,
    staged: Option<Staged>,
}

/// Uploads sealed chunks with `config.workers` at a time, forever; failed chunks are retried
/// with backoff. Uploaded chunks go to `publish`.
pub async fn run<S: ChunkStore>(
    store: Arc<S>,
    config: Arc<UploaderConfig>,
    mut sealed: mpsc::UnboundedReceiver<SealedChunk>,
    publish: mpsc::UnboundedSender<UploadedChunk>,
) {
    let (retry_tx, mut retry_rx) = mpsc::unbounded_channel::<Job>();
    let permits = Arc::new(Semaphore::new(config.workers.max(1)));
    let mut tasks = JoinSet::new();
    loop {
        let job = tokio::select! {
            Some(chunk) = sealed.recv() => Job { chunk, attempt: 0, staged: None },
            Some(job) = retry_rx.recv() => job,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
        };
        let permit = permits
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let (store, config, retry_tx, publish) = (
            store.clone(),
            config.clone(),
            retry_tx.clone(),
            publish.clone(),
        );
        let span = tracing::info_span!("chunk", chunk_id = %job.chunk.header.chunk_id);
        tasks.spawn(
            async move {
                let mut job = job;
                let result = upload(&*store, &config, &mut job).await;
                drop(permit);
                match result {
                    Ok(uploaded) => {
                        let _ = publish.send(uploaded);
                    }
                    Err(e) => {
                        job.attempt += 1;
                        let delay = config.backoff.delay(job.attempt);
                        if e.is_retryable() {
                            warn!(attempt = job.attempt, retry_in = ?delay, cause = %e, "upload failed; will retry");
                        } else {
                            error!(attempt = job.attempt, retry_in = ?delay, cause = %e, "upload failed and needs attention; will retry");
                        }
                        tokio::spawn(async move {
                            tokio::time::sleep(delay).await;
                            let _ = retry_tx.send(job);
                        });
                    }
                }
            }
            .instrument(span),
        );
    }
}

async fn upload<S: ChunkStore>(
    store: &S,
    config: &UploaderConfig,
    job: &mut Job,
) -> Result<UploadedChunk, UploadError> {
    let chunk = &job.chunk;
    let staged = match job.staged {
        Some(s) => s,
        None => {
            let (c, cfg) = (
                chunk.clone(),
                (config.format, config.compression, config.compression_level),
            );
            let s = tokio::task::spawn_blocking(move || stage(&c, cfg.0, cfg.1, cfg.2))
                .await
                .map_err(|e| UploadError::Stage(io::Error::other(e)))??;
            job.staged = Some(s);
            s
        }
    };
    let header = &chunk.header;
    let key = config.key(&header.tag, &header.chunk_id, header.timekey);
    let upload = ObjectUpload {
        key: key.clone(),
        path: chunk.paths.object.clone(),
        len: staged.len,
        crc32c: staged.crc32c,
        content_type: config.format.content_type(),
        content_encoding: config.compression.content_encoding(),
        chunk_id: header.chunk_id.clone(),
    };
    let started = std::time::Instant::now();
    let etag = store.put(&upload).await?;
    let pointer = Pointer {
        v: Pointer::VERSION,
        chunk_id: header.chunk_id.clone(),
        bucket: store.bucket().to_string(),
        key,
        tag: header.tag.clone(),
        timekey: header.timekey,
        first_time: chunk.stats.first_time,
        last_time: chunk.stats.last_time,
        records: chunk.stats.records,
        bytes: staged.body_bytes,
        stored_bytes: staged.len,
        format: config.format,
        compression: config.compression,
        checksum: Checksum {
            crc32c: staged.crc32c,
        },
        producer: config.producer.clone(),
        created_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    };
    info!(key = %pointer.key, bytes = staged.body_bytes, stored_bytes = staged.len,
          elapsed_ms = started.elapsed().as_millis() as u64, "object stored");
    let state = ChunkState::Uploaded {
        header: header.clone(),
        stats: chunk.stats,
        pointer: Box::new(pointer.clone()),
        etag,
    };
    let paths = chunk.paths.clone();
    tokio::task::spawn_blocking(move || {
        chunk::write_state(&paths.state, &state)?;
        // The staged object is no longer needed: the pointer has all the publisher needs.
        match std::fs::remove_file(&paths.object) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    })
    .await
    .map_err(|e| UploadError::State(io::Error::other(e)))?
    .map_err(UploadError::State)?;
    Ok(UploadedChunk {
        header: chunk.header.clone(),
        paths: chunk.paths.clone(),
        pointer,
    })
}

/// Counts and checksums what passes through it.
struct Counting<W> {
    inner: W,
    len: u64,
    crc: u32,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.len += n as u64;
        self.crc = crc32c::crc32c_append(self.crc, &buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Piece size for reading a chunk back.
const PIECE: usize = 1 << 20;

/// Writes a chunk's compressed body to its staged object file (blocking).
pub fn stage(
    chunk: &SealedChunk,
    format: Format,
    compression: Compression,
    level: Option<i32>,
) -> Result<Staged, UploadError> {
    let tmp = chunk.paths.object.with_extension("object.tmp");
    let out = File::create(&tmp).map_err(UploadError::Stage)?;
    let stored = Counting {
        inner: BufWriter::with_capacity(PIECE, out),
        len: 0,
        crc: 0,
    };
    let encoder = Encoder::new(compression, level, stored).map_err(UploadError::Stage)?;
    let mut body = Counting {
        inner: encoder,
        len: 0,
        crc: 0,
    };

    let mut data = File::open(&chunk.paths.data).map_err(ReadError::Io)?;
    let (_, start) = chunk::read_header(&mut data)?;
    let mut frames =
        chunk::FrameReader::new(data, start, chunk.stats.data_len).map_err(ReadError::Io)?;
    let mut piece = Vec::new();
    match format {
        Format::Msgpack => {
            while frames.next_piece(&mut piece, PIECE)? {
                body.write_all(&piece).map_err(UploadError::Stage)?;
            }
        }
        // JSON needs whole entries: read whole frames (each holds whole entries only).
        Format::Json => {
            while frames.next_piece(&mut piece, usize::MAX)? {
                body::write_json_lines(&chunk.header.tag, &piece, &mut body).map_err(|e| {
                    UploadError::Stage(io::Error::new(io::ErrorKind::InvalidData, e))
                })?;
            }
        }
    }
    let body_bytes = body.len;
    let mut stored = body.inner.finish().map_err(UploadError::Stage)?;
    stored.flush().map_err(UploadError::Stage)?;
    std::fs::rename(&tmp, &chunk.paths.object).map_err(UploadError::Stage)?;
    debug!(chunk_id = %chunk.header.chunk_id, body_bytes, stored_bytes = stored.len, "object staged");
    Ok(Staged {
        len: stored.len,
        crc32c: stored.crc,
        body_bytes,
    })
}

#[cfg(test)]
mod tests;
