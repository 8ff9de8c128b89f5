//! Uploaded chunk → pointer record on Kinesis → chunk deleted.
//!
//! Pointers are batched into PutRecords requests (at most 500 records and 5 MiB including
//! partition keys, Kinesis' limits). A request can succeed while some of its records fail
//! (throttling); only those records are retried, with backoff. A chunk's files are deleted
//! only after Kinesis accepted its pointer; a crash before that publishes it again (the same
//! chunk id, which consumers drop).

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::aws::BackendError;
use crate::buffer::UploadedChunk;
use crate::key_template::{KeyTemplate, KeyValues};
use crate::retry::Backoff;

/// Kinesis PutRecords limits.
pub const MAX_BATCH_RECORDS: usize = 500;
pub const MAX_BATCH_BYTES: usize = 5 << 20;
/// Kinesis partition keys are at most 256 Unicode characters.
pub const MAX_PARTITION_KEY_CHARS: usize = 256;

/// One record to put.
#[derive(Debug, Clone)]
pub struct PointerRecord {
    pub partition_key: String,
    pub data: Bytes,
}

/// What happened to one record of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryResult {
    Accepted {
        shard_id: String,
        sequence_number: String,
    },
    Failed {
        code: String,
        message: String,
    },
}

/// Where pointer records go (Kinesis in production, a fake in tests).
pub trait PointerSink: Send + Sync + 'static {
    /// Puts a batch; on success, one result per record, in order.
    fn put_records(
        &self,
        records: &[PointerRecord],
    ) -> impl Future<Output = Result<Vec<EntryResult>, BackendError>> + Send;
}

/// Settings of the publisher.
#[derive(Debug, Clone)]
pub struct PublisherConfig {
    pub partition_key: KeyTemplate,
    pub backoff: Backoff,
}

impl PublisherConfig {
    fn partition_key(&self, chunk: &UploadedChunk) -> String {
        let p = &chunk.pointer;
        let ext = claimcheck_consumer::body::file_extension(p.format, p.compression);
        let key = self.partition_key.render(KeyValues {
            tag: &p.tag,
            chunk_id: &p.chunk_id,
            timekey: p.timekey,
            file_extension: &ext,
        });
        let key: String = key.chars().take(MAX_PARTITION_KEY_CHARS).collect();
        if key.is_empty() {
            p.chunk_id.clone()
        } else {
            key
        }
    }
}

struct Job {
    chunk: UploadedChunk,
    record: PointerRecord,
    attempt: u32,
}

/// Publishes pointers forever, deleting each chunk once its pointer is accepted.
pub async fn run<P: PointerSink>(
    sink: Arc<P>,
    config: Arc<PublisherConfig>,
    mut uploaded: mpsc::UnboundedReceiver<UploadedChunk>,
) {
    let (retry_tx, mut retry_rx) = mpsc::unbounded_channel::<Job>();
    let new_job = |chunk: UploadedChunk| {
        let record = PointerRecord {
            partition_key: config.partition_key(&chunk),
            data: Bytes::from(chunk.pointer.to_json()),
        };
        Job {
            chunk,
            record,
            attempt: 0,
        }
    };
    loop {
        let first = tokio::select! {
            Some(chunk) = uploaded.recv() => new_job(chunk),
            Some(job) = retry_rx.recv() => job,
        };
        let mut bytes = first.record.data.len() + first.record.partition_key.len();
        let mut batch = vec![first];
        // Take whatever else is ready, without waiting: batches grow with load by themselves.
        while batch.len() < MAX_BATCH_RECORDS {
            let next = match retry_rx.try_recv() {
                Ok(job) => job,
                Err(_) => match uploaded.try_recv() {
                    Ok(chunk) => new_job(chunk),
                    Err(_) => break,
                },
            };
            let size = next.record.data.len() + next.record.partition_key.len();
            if bytes + size > MAX_BATCH_BYTES {
                let _ = retry_tx.send(next);
                break;
            }
            bytes += size;
            batch.push(next);
        }
        publish(&*sink, &config, batch, &retry_tx).await;
    }
}

async fn publish<P: PointerSink>(
    sink: &P,
    config: &PublisherConfig,
    batch: Vec<Job>,
    retry_tx: &mpsc::UnboundedSender<Job>,
) {
    let records: Vec<PointerRecord> = batch.iter().map(|j| j.record.clone()).collect();
    let started = std::time::Instant::now();
    let results = match sink.put_records(&records).await {
        Ok(results) => results,
        Err(e) => {
            let attempt = batch.iter().map(|j| j.attempt).max().unwrap_or(0) + 1;
            let delay = config.backoff.delay(attempt);
            if e.retryable {
                warn!(records = batch.len(), attempt, retry_in = ?delay, cause = %e, "PutRecords failed; will retry");
            } else {
                error!(records = batch.len(), attempt, retry_in = ?delay, cause = %e, "PutRecords failed and needs attention; will retry");
            }
            retry_later(
                batch
                    .into_iter()
                    .map(|mut j| {
                        j.attempt = attempt;
                        j
                    })
                    .collect(),
                delay,
                retry_tx,
            );
            return;
        }
    };
    let elapsed_ms = started.elapsed().as_millis() as u64;
    let mut published = Vec::new();
    let mut failed = Vec::new();
    for (mut job, result) in batch.into_iter().zip(results) {
        match result {
            EntryResult::Accepted {
                shard_id,
                sequence_number,
            } => {
                info!(chunk_id = %job.chunk.pointer.chunk_id, key = %job.chunk.pointer.key, %shard_id, %sequence_number, elapsed_ms, "pointer published");
                published.push(job.chunk.paths);
            }
            EntryResult::Failed { code, message } => {
                job.attempt += 1;
                warn!(chunk_id = %job.chunk.pointer.chunk_id, attempt = job.attempt, %code, %message, "pointer not accepted; will retry");
                failed.push(job);
            }
        }
    }
    if !failed.is_empty() {
        let attempt = failed.iter().map(|j| j.attempt).max().unwrap_or(1);
        retry_later(failed, config.backoff.delay(attempt), retry_tx);
    }
    if !published.is_empty() {
        let removed = tokio::task::spawn_blocking(move || {
            for paths in published {
                if let Err(e) = paths.remove() {
                    // The next start sees the chunk and publishes it again: a duplicate, not a loss.
                    error!(path = %paths.data.display(), cause = %e, "cannot delete a published chunk");
                }
            }
        })
        .await;
        if let Err(e) = removed {
            error!(cause = %e, "deleting published chunks failed");
        }
    }
}

fn retry_later(jobs: Vec<Job>, delay: std::time::Duration, retry_tx: &mpsc::UnboundedSender<Job>) {
    let tx = retry_tx.clone();
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        for job in jobs {
            let _ = tx.send(job);
        }
    });
}

#[cfg(test)]
mod tests;
