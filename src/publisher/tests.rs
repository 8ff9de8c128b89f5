use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use claimcheck_consumer::body::{Compression, Format};
use claimcheck_consumer::pointer::{Checksum, Pointer};
use claimcheck_consumer::EventTime;

use super::*;
use crate::buffer::chunk::{ChunkHeader, ChunkPaths};

/// Answers each call with the next scripted outcome (accept everything when the script ends)
/// and remembers the partition keys and pointer ids of every call.
#[derive(Default)]
struct FakeSink {
    script: Mutex<VecDeque<Outcome>>,
    calls: Mutex<Vec<Vec<(String, String)>>>,
}

enum Outcome {
    /// Fail the records at these positions with a throttling error.
    Throttle(Vec<usize>),
    /// Fail the whole request.
    Down,
}

impl PointerSink for FakeSink {
    async fn put_records(
        &self,
        records: &[PointerRecord],
    ) -> Result<Vec<EntryResult>, BackendError> {
        let ids = records
            .iter()
            .map(|r| {
                (
                    r.partition_key.clone(),
                    Pointer::from_json(&r.data).unwrap().chunk_id,
                )
            })
            .collect();
        self.calls.lock().unwrap().push(ids);
        let throttled = match self.script.lock().unwrap().pop_front() {
            Some(Outcome::Down) => {
                return Err(BackendError {
                    operation: "PutRecords",
                    code: "dispatch".into(),
                    message: "down".into(),
                    retryable: true,
                })
            }
            Some(Outcome::Throttle(positions)) => positions,
            None => Vec::new(),
        };
        Ok((0..records.len())
            .map(|i| match throttled.contains(&i) {
                true => EntryResult::Failed {
                    code: "ProvisionedThroughputExceededException".into(),
                    message: "slow down".into(),
                },
                false => EntryResult::Accepted {
                    shard_id: "shardId-0".into(),
                    sequence_number: i.to_string(),
                },
            })
            .collect())
    }
}

fn uploaded(dir: &std::path::Path, n: usize) -> UploadedChunk {
    let id = format!("{n:032x}");
    let paths = ChunkPaths::new(dir, &id);
    std::fs::write(&paths.data, b"data").unwrap();
    std::fs::write(&paths.state, b"{}").unwrap();
    let header = ChunkHeader {
        chunk_id: id.clone(),
        tag: format!("app.t{}", n % 3),
        timekey: 0,
        created_ms: 0,
    };
    let pointer = Pointer {
        v: 1,
        chunk_id: id.clone(),
        bucket: "b".into(),
        key: format!("k/{id}"),
        tag: header.tag.clone(),
        timekey: 0,
        first_time: EventTime::default(),
        last_time: EventTime::default(),
        records: 1,
        bytes: 1,
        stored_bytes: 1,
        format: Format::Msgpack,
        compression: Compression::Zstd,
        checksum: Checksum { crc32c: 0 },
        producer: "h".into(),
        created_at: "2026-01-01T00:00:00.000Z".into(),
    };
    UploadedChunk {
        header,
        paths,
        pointer,
    }
}

fn config() -> PublisherConfig {
    PublisherConfig {
        partition_key: KeyTemplate::parse("${tag}", "h").unwrap(),
        backoff: Backoff {
            wait: Duration::from_millis(10),
            max_interval: Duration::from_millis(50),
        },
    }
}

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..2000 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("timed out waiting until {what}");
}

#[tokio::test]
async fn only_failed_entries_are_retried_and_chunks_go_only_once_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Arc::new(FakeSink::default());
    sink.script
        .lock()
        .unwrap()
        .push_back(Outcome::Throttle(vec![1, 3]));
    let chunks: Vec<_> = (0..5).map(|n| uploaded(dir.path(), n)).collect();
    let (tx, rx) = mpsc::unbounded_channel();
    for c in &chunks {
        tx.send(c.clone()).unwrap();
    }
    let task = tokio::spawn(run(sink.clone(), Arc::new(config()), rx));
    wait_until("every chunk is deleted", || {
        chunks
            .iter()
            .all(|c| !c.paths.data.exists() && !c.paths.state.exists())
    })
    .await;
    task.abort();

    let calls = sink.calls.lock().unwrap();
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert_eq!(calls[0].len(), 5, "ready pointers share one request");
    let retried: Vec<&str> = calls[1].iter().map(|(_, id)| id.as_str()).collect();
    assert_eq!(
        retried,
        vec![
            chunks[1].pointer.chunk_id.as_str(),
            chunks[3].pointer.chunk_id.as_str()
        ]
    );
    assert_eq!(calls[0][2].0, "app.t2", "the partition key is the tag");
}

#[tokio::test]
async fn a_failed_request_keeps_every_chunk_until_it_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Arc::new(FakeSink::default());
    sink.script
        .lock()
        .unwrap()
        .extend([Outcome::Down, Outcome::Down]);
    let chunk = uploaded(dir.path(), 7);
    let (tx, rx) = mpsc::unbounded_channel();
    tx.send(chunk.clone()).unwrap();
    let task = tokio::spawn(run(sink.clone(), Arc::new(config()), rx));
    wait_until("two calls failed", || sink.calls.lock().unwrap().len() >= 2).await;
    assert!(sink.calls.lock().unwrap().len() < 3 || !chunk.paths.data.exists());
    wait_until("the chunk is deleted", || !chunk.paths.data.exists()).await;
    task.abort();
    assert_eq!(sink.calls.lock().unwrap().len(), 3);
}

#[tokio::test]
async fn batches_respect_the_record_limit() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Arc::new(FakeSink::default());
    let chunks: Vec<_> = (0..1100).map(|n| uploaded(dir.path(), n)).collect();
    let (tx, rx) = mpsc::unbounded_channel();
    for c in &chunks {
        tx.send(c.clone()).unwrap();
    }
    let task = tokio::spawn(run(sink.clone(), Arc::new(config()), rx));
    wait_until("every chunk is deleted", || {
        chunks.iter().all(|c| !c.paths.data.exists())
    })
    .await;
    task.abort();
    let sizes: Vec<usize> = sink.calls.lock().unwrap().iter().map(Vec::len).collect();
    assert_eq!(sizes, vec![500, 500, 100]);
}

#[test]
fn partition_keys_are_cut_to_kinesis_limit() {
    let dir = tempfile::tempdir().unwrap();
    let mut chunk = uploaded(dir.path(), 1);
    chunk.pointer.tag = "t".repeat(400);
    assert_eq!(
        config().partition_key(&chunk).chars().count(),
        MAX_PARTITION_KEY_CHARS
    );
}
