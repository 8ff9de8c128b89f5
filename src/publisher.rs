//! Uploaded chunk → pointer record on Kinesis → chunk deleted.
//!
//! A record is the pointer's JSON, or for an inline chunk the JSON and the body. Inline bodies
//! are held in memory only for an attempt: a chunk arrives from the uploader (or from recovery)
//! without its body, and has it read from its state file when its batch is made, again for each
//! retry. Every inline body is checked against its pointer's length and CRC32C before it is
//! sent: one damaged in its state file is never published; its chunk goes back to `sealed`
//! and is compressed again from its data file.
//!
//! Pointers are batched into PutRecords requests (at most 500 records and 5 MiB including
//! partition keys, Kinesis' limits). A request can succeed while some of its records fail
//! (throttling); only those records are retried, with backoff, until the retry budget is spent
//! and the chunk moves to `dead/`. A chunk's files are deleted only after Kinesis accepted its
//! pointer; a crash before that publishes it again (the same chunk id, which consumers drop).

use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use claimcheck_consumer::Pointer;
use tokio::sync::mpsc;
use tracing::{debug, error, info};

use crate::buffer::registry::{Phase, Registry};
use crate::buffer::{chunk, UploadedChunk};
use crate::key_template::{KeyTemplate, KeyValues};
use crate::metrics::{metrics, Code};
use crate::outage::{Failure, Stage};
use crate::retry::{Attempts, Backoff, Retried, RetryPolicy, RetryStep};

pub use crate::backends::{EntryResult, PointerRecord, PointerSink};

/// Kinesis PutRecords limits.
pub const MAX_BATCH_RECORDS: usize = 500;
pub const MAX_BATCH_BYTES: usize = 5 << 20;
/// Kinesis partition keys are at most 256 Unicode characters (counted here in UTF-16 code
/// units, which is never more than Kinesis may count).
pub const MAX_PARTITION_KEY_CHARS: usize = 256;

/// Settings of the publisher.
#[derive(Debug, Clone)]
pub struct PublisherConfig {
    pub partition_key: KeyTemplate,
    pub retry: RetryPolicy,
    /// The buffer directory, for `dead/`.
    pub buffer_dir: PathBuf,
}

impl PublisherConfig {
    fn partition_key(&self, chunk: &UploadedChunk) -> String {
        let p = &chunk.pointer;
        let ext = claimcheck_consumer::body::file_extension(p.format, p.compression);
        let values = KeyValues {
            tag: &p.tag,
            chunk_id: &p.chunk_id,
            timekey: p.timekey,
            file_extension: &ext,
        };
        // Counted as Kinesis may count them, in UTF-16 code units: a character beyond the
        // Basic Multilingual Plane (an emoji in a tag) takes two.
        let mut units = 0;
        let key: String = self
            .partition_key
            .render(values)
            .chars()
            .take_while(|c| {
                units += c.len_utf16();
                units <= MAX_PARTITION_KEY_CHARS
            })
            .collect();
        if key.is_empty() {
            p.chunk_id.clone()
        } else {
            key
        }
    }
}

struct Job {
    chunk: UploadedChunk,
    partition_key: String,
    /// The record; `None` for an inline record whose body is on disk only.
    data: Option<Bytes>,
    attempts: Attempts,
}

impl Job {
    fn new(config: &PublisherConfig, chunk: UploadedChunk) -> Job {
        let data = (!chunk.body_on_disk()).then(|| Bytes::from(chunk.pointer.to_record()));
        Job {
            partition_key: config.partition_key(&chunk),
            chunk,
            data,
            attempts: Attempts::default(),
        }
    }

    fn size(&self) -> usize {
        self.data.as_ref().map_or(0, Bytes::len) + self.partition_key.len()
    }

    /// Reads an inline body back from the chunk's state file (blocking).
    fn load(&mut self) -> Result<(), Unloadable> {
        let state = chunk::read_state(&self.chunk.paths.state).map_err(|e| {
            Unloadable::Unreadable(format!(
                "cannot read the inline body from the state file: {e}"
            ))
        })?;
        match state.into_pointer() {
            Some(pointer) if pointer.is_inline() => {
                if damaged_inline(&pointer) {
                    return Err(Unloadable::Damaged);
                }
                self.data = Some(Bytes::from(pointer.to_record()));
                Ok(())
            }
            _ => Err(Unloadable::Unreadable(
                "the state file holds no inline body".into(),
            )),
        }
    }
}

/// Why an inline body could not be put in its record.
enum Unloadable {
    /// The state file cannot be read (or holds no inline body): try again later.
    Unreadable(String),
    /// The body read back does not match its pointer: the state file was damaged on disk.
    Damaged,
}

/// An inline body whose length or CRC32C differs from what its pointer says. Its events would
/// be lost to every consumer (which refuses such a body) once the chunk is deleted, so it is
/// never published: the chunk is compressed again from its data file, whose frames carry their
/// own checksums.
fn damaged_inline(pointer: &Pointer) -> bool {
    pointer.inline.as_ref().is_some_and(|body| {
        body.len() as u64 != pointer.stored_bytes
            || claimcheck_consumer::crc::crc32c(body) != pointer.checksum.crc32c
    })
}

/// Puts a chunk whose inline body was damaged back to `sealed` and out of the registry, so
/// that the buffer's rescan (within 5 s) hands it to the uploader again, which builds its body
/// anew from the data file (blocking). Until then its bytes do not count toward the buffer's
/// size.
fn upload_again(registry: &Registry, chunk: &UploadedChunk) -> std::io::Result<()> {
    let sealed = match chunk::read_state(&chunk.paths.state)? {
        chunk::ChunkState::Uploaded { header, stats, .. }
        | chunk::ChunkState::Sealed { header, stats } => {
            chunk::ChunkState::Sealed { header, stats }
        }
    };
    chunk::write_state(&chunk.paths.state, &sealed)?;
    registry.remove(&chunk.pointer.chunk_id);
    Ok(())
}

/// Publishes pointers for as long as it runs, deleting each chunk once its pointer is accepted.
pub async fn run<P: PointerSink>(
    sink: Arc<P>,
    config: Arc<PublisherConfig>,
    registry: Arc<Registry>,
    mut uploaded: mpsc::UnboundedReceiver<UploadedChunk>,
) {
    let (retry_tx, mut retry_rx) = mpsc::unbounded_channel::<Job>();
    let retry = RetryStep::new(
        Stage::Publish,
        config.retry,
        config.buffer_dir.clone(),
        registry.clone(),
        retry_tx.clone(),
    );
    loop {
        let first = tokio::select! {
            Some(chunk) = uploaded.recv() => Job::new(&config, chunk),
            Some(job) = retry_rx.recv() => job,
        };
        // Take whatever else is ready, without waiting: batches grow with load by themselves.
        let mut jobs = vec![first];
        while jobs.len() < MAX_BATCH_RECORDS {
            let next = retry_rx
                .try_recv()
                .ok()
                .or_else(|| uploaded.try_recv().ok().map(|c| Job::new(&config, c)));
            match next {
                Some(job) => jobs.push(job),
                None => break,
            }
        }
        jobs.retain(|job| {
            let id = &job.chunk.pointer.chunk_id;
            let present = registry.set_phase(id, Phase::Publishing);
            if !present {
                debug!(chunk_id = %id, "chunk is no longer in the buffer (dropped); not publishing it");
            }
            present
        });
        // Bodies are read for the jobs one batch can carry, an inline body not read yet
        // counted by its stored size (its record holds at least that); the others wait
        // without one.
        let mut estimate = 0;
        let (jobs, later): (Vec<Job>, Vec<Job>) = jobs.into_iter().partition(|job| {
            let size = match job.data {
                Some(_) => job.size(),
                None => job.size() + job.chunk.pointer.stored_bytes as usize,
            };
            estimate += size;
            estimate == size || estimate <= MAX_BATCH_BYTES
        });
        let jobs = load_bodies(jobs, &registry, &retry).await;
        let mut bytes = 0;
        let mut batch = Vec::new();
        let wait = |mut job: Job| {
            registry.set_phase(&job.chunk.pointer.chunk_id, Phase::Uploaded);
            job.unload();
            let _ = retry_tx.send(job);
        };
        for job in jobs {
            let size = job.size();
            if !batch.is_empty() && bytes + size > MAX_BATCH_BYTES {
                wait(job);
                continue;
            }
            bytes += size;
            batch.push(job);
        }
        later.into_iter().for_each(wait);
        if !batch.is_empty() {
            publish(&*sink, &registry, batch, &retry, config.retry.backoff).await;
        }
    }
}

impl Retried for Job {
    fn chunk_id(&self) -> &str {
        &self.chunk.pointer.chunk_id
    }

    fn paths(&self) -> &chunk::ChunkPaths {
        &self.chunk.paths
    }

    fn events(&self) -> u64 {
        self.chunk.pointer.records
    }

    fn attempts(&mut self) -> &mut Attempts {
        &mut self.attempts
    }

    /// Lets go of an inline body while the job waits: it is read again for the next attempt,
    /// so that chunks waiting for Kinesis hold no bodies in memory.
    fn unload(&mut self) {
        if self.chunk.pointer.v == Pointer::INLINE_VERSION {
            self.data = None;
            self.chunk.pointer.inline = None;
        }
    }
}

/// Reads the inline bodies that are on disk only (every inline body: the uploader and
/// recovery leave them there) and checks them against their pointers; a job whose body cannot
/// be read is retried later (and dead-lettered when its budget is spent), one whose body is
/// damaged goes back to the uploader.
async fn load_bodies(jobs: Vec<Job>, registry: &Arc<Registry>, retry: &RetryStep<Job>) -> Vec<Job> {
    if jobs.iter().all(|j| j.data.is_some()) {
        return jobs;
    }
    let registry = registry.clone();
    let loaded = tokio::task::spawn_blocking(move || {
        jobs.into_iter()
            .filter_map(|mut job| {
                if job.data.is_some() {
                    return Some((job, Ok(())));
                }
                match job.load() {
                    Ok(()) => return Some((job, Ok(()))),
                    Err(Unloadable::Unreadable(e)) => return Some((job, Err(e))),
                    Err(Unloadable::Damaged) => {}
                }
                let id = &job.chunk.pointer.chunk_id;
                match upload_again(&registry, &job.chunk) {
                    Ok(()) => {
                        error!(chunk_id = %id, "the inline body read back does not match its pointer (damaged on disk); the chunk is compressed again from its data file");
                        None
                    }
                    Err(e) => Some((
                        job,
                        Err(format!(
                            "the inline body read back does not match its pointer, and the chunk cannot be set to be uploaded again: {e}"
                        )),
                    )),
                }
            })
            .collect::<Vec<_>>()
    })
    .await
    .expect("reading state files does not panic");
    let mut ready = Vec::with_capacity(loaded.len());
    for (job, result) in loaded {
        match result {
            Ok(()) => ready.push(job),
            Err(e) => {
                error!(chunk_id = %job.chunk.pointer.chunk_id, cause = %e, "cannot publish an inline chunk");
                let failure = Failure {
                    code: "state".into(),
                    cause: e,
                    retryable: true,
                };
                retry.failed(job, &failure);
            }
        }
    }
    ready
}

async fn publish<P: PointerSink>(
    sink: &P,
    registry: &Arc<Registry>,
    batch: Vec<Job>,
    retry: &RetryStep<Job>,
    backoff: Backoff,
) {
    let records: Vec<PointerRecord> = batch
        .iter()
        .map(|j| PointerRecord {
            partition_key: j.partition_key.clone(),
            data: j
                .data
                .clone()
                .expect("bodies are loaded before a batch is sent"),
        })
        .collect();
    debug!(records = records.len(), "sending PutRecords");
    let started = std::time::Instant::now();
    let results = match sink.put_records(&records).await {
        Ok(results) => results,
        Err(e) => {
            // Per request at debug: the outage reporter says it once for all of them.
            debug!(records = batch.len(), cause = %e, retryable = e.retryable, "PutRecords failed; will retry");
            let failure = Failure::from(&e);
            for job in batch {
                retry.failed(job, &failure);
            }
            return;
        }
    };
    let elapsed_ms = started.elapsed().as_millis() as u64;
    let mut published = Vec::new();
    for (job, result) in batch.into_iter().zip(results) {
        match result {
            EntryResult::Accepted {
                shard_id,
                sequence_number,
            } => {
                let p = &job.chunk.pointer;
                info!(chunk_id = %p.chunk_id, body = %p.location(), %shard_id, %sequence_number, elapsed_ms, "pointer published");
                metrics().chunks_published.inc();
                metrics().events_published.inc_by(p.records);
                metrics().delivered(
                    p.v == Pointer::INLINE_VERSION,
                    p.stored_bytes,
                    job.size() as u64,
                );
                registry.set_phase(&p.chunk_id, Phase::Published);
                published.push(job.chunk);
            }
            EntryResult::Failed { code, message } => {
                debug!(chunk_id = %job.chunk.pointer.chunk_id, %code, %message, "pointer not accepted; will retry");
                crate::aws::explain(true, "PutRecords", &code, &message);
                metrics()
                    .put_records_failed_entries
                    .get_or_create(&Code { code: code.clone() })
                    .inc();
                let failure = Failure::record(&code, &message);
                retry.failed(job, &failure);
            }
        }
    }
    if published.is_empty() {
        return;
    }
    registry
        .outage(Stage::Publish)
        .succeeded(published.len() as u64);
    let (kept, journaled) = retire(registry, published, false).await;
    if !kept.is_empty() {
        // Accepted already: what is left is to delete them, tried again on the retry
        // policy's backoff without holding up the next batches.
        let registry = registry.clone();
        tokio::spawn(async move {
            let (mut kept, mut journaled) = (kept, journaled);
            for attempt in 1.. {
                tokio::time::sleep(backoff.delay(attempt)).await;
                (kept, journaled) = retire(&registry, kept, journaled).await;
                if kept.is_empty() {
                    break;
                }
            }
        });
    }
}

/// Deletes published chunks, their tokens journaled first (unless `journaled` says they are
/// already), and forgets them; returns those still there, to be deleted later (a restart in
/// between publishes them again: a duplicate pointer, which consumers drop, not a loss), and
/// whether their tokens are journaled. A chunk's tokens are journaled once, however many tries
/// its deletion takes, so that the journal does not fill with copies of them.
async fn retire(
    registry: &Registry,
    chunks: Vec<UploadedChunk>,
    journaled: bool,
) -> (Vec<UploadedChunk>, bool) {
    let tokens = registry.tokens().cloned().filter(|_| !journaled);
    let spares = registry.spares().clone();
    let retired = tokio::task::spawn_blocking(move || {
        // Their tokens go to the journal first: once the files are gone, it is what recognises
        // a resend of their requests for the rest of the window.
        if let Some(tokens) = tokens {
            let paths: Vec<_> = chunks.iter().map(|c| &c.paths).collect();
            if let Err(e) = tokens.retire(&paths) {
                error!(chunks = paths.len(), cause = %e,
                       "cannot journal the tokens of published chunks; keeping them, to try again");
                return (Vec::new(), chunks, false);
            }
        }
        let mut removed = Vec::new();
        let mut kept = Vec::new();
        for chunk in chunks {
            match spares.retire(&chunk.paths) {
                Ok(()) => removed.push(chunk.pointer.chunk_id),
                Err(e) => {
                    error!(path = %chunk.paths.data.display(), cause = %e,
                           "cannot delete a published chunk; will try again");
                    kept.push(chunk);
                }
            }
        }
        (removed, kept, true)
    })
    .await;
    match retired {
        Ok((removed, kept, journaled)) => {
            removed.iter().for_each(|id| {
                registry.remove(id);
            });
            (kept, journaled)
        }
        Err(e) if e.is_panic() => {
            // Its chunks would stay in the buffer, never deleted, until a restart: delivery
            // stops, and with it the sidecar, for its supervisor to start it again.
            error!("deleting published chunks panicked; stopping delivery");
            std::panic::resume_unwind(e.into_panic())
        }
        Err(e) => {
            error!(cause = %e, "deleting published chunks failed; the next start publishes them again");
            (Vec::new(), journaled)
        }
    }
}

#[cfg(test)]
mod tests;
