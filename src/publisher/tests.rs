use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use claimcheck_consumer::body::{Compression, Format};
use claimcheck_consumer::pointer::{Checksum, Pointer};
use claimcheck_consumer::EventTime;

use super::*;
use crate::aws::BackendError;
use crate::buffer::chunk::{ChunkHeader, ChunkPaths};
use crate::buffer::registry::ChunkInfo;
use crate::retry::Backoff;

/// Answers each call with the next scripted outcome (accept everything when the script ends)
/// and remembers the partition keys and pointer ids of every call.
#[derive(Default)]
struct FakeSink {
    script: Mutex<VecDeque<Outcome>>,
    calls: Mutex<Vec<Vec<(String, String)>>>,
    /// Every record sent, as sent.
    records: Mutex<Vec<Bytes>>,
    /// When each call came (tokio's clock).
    at: Mutex<Vec<tokio::time::Instant>>,
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
                    Pointer::from_record(&r.data).unwrap().chunk_id,
                )
            })
            .collect();
        self.calls.lock().unwrap().push(ids);
        self.at.lock().unwrap().push(tokio::time::Instant::now());
        self.records
            .lock()
            .unwrap()
            .extend(records.iter().map(|r| r.data.clone()));
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

fn uploaded(dir: &std::path::Path, registry: &Registry, n: usize) -> UploadedChunk {
    let chunks = crate::buffer::chunks_dir(dir);
    std::fs::create_dir_all(&chunks).unwrap();
    let id = format!("{n:032x}");
    let paths = ChunkPaths::new(&chunks, &id);
    std::fs::write(&paths.data, b"data").unwrap();
    std::fs::write(&paths.state, b"{}").unwrap();
    let header = ChunkHeader {
        chunk_id: id.clone(),
        tag: format!("app.t{}", n % 3),
        timekey: 0,
        created_ms: 0,
        reused: false,
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
        bytes: 32 << 20,
        // An object of a full default chunk: its pointer record is small all the same.
        stored_bytes: 8 << 20,
        format: Format::Msgpack,
        compression: Compression::Zstd,
        checksum: Checksum { crc32c: 0 },
        producer: "h".into(),
        created_at: "2026-01-01T00:00:00.000Z".into(),
        inline: None,
    };
    registry.insert(ChunkInfo {
        chunk_id: id,
        tag: header.tag.clone(),
        timekey: 0,
        phase: Phase::Uploaded,
        created_ms: 0,
        records: 1,
        bytes: 4,
        attempts: 0,
        last_error: None,
        next_retry_ms: None,
    });
    UploadedChunk {
        header,
        paths,
        pointer,
    }
}

fn config(dir: &std::path::Path) -> PublisherConfig {
    PublisherConfig {
        partition_key: KeyTemplate::parse("${tag}", "h").unwrap(),
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
        buffer_dir: dir.to_path_buf(),
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

/// Starts the publisher with `chunks` queued.
fn start(
    sink: &Arc<FakeSink>,
    config: PublisherConfig,
    registry: &Arc<Registry>,
    chunks: &[UploadedChunk],
) -> tokio::task::JoinHandle<()> {
    let (tx, rx) = mpsc::unbounded_channel();
    for c in chunks {
        tx.send(c.clone()).unwrap();
    }
    // The sender is kept by the task so that the publisher keeps running.
    tokio::spawn({
        let (sink, registry) = (sink.clone(), registry.clone());
        async move {
            let _tx = tx;
            run(sink, Arc::new(config), registry, rx).await
        }
    })
}

#[tokio::test]
async fn only_failed_entries_are_retried_and_chunks_go_only_once_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Arc::new(Registry::new());
    let sink = Arc::new(FakeSink::default());
    sink.script
        .lock()
        .unwrap()
        .push_back(Outcome::Throttle(vec![1, 3]));
    let chunks: Vec<_> = (0..5).map(|n| uploaded(dir.path(), &registry, n)).collect();
    let task = start(&sink, config(dir.path()), &registry, &chunks);
    wait_until("every chunk is deleted", || {
        chunks
            .iter()
            .all(|c| !c.paths.data.exists() && !c.paths.state.exists())
    })
    .await;
    wait_until("the registry is empty", || registry.snapshot().is_empty()).await;
    task.abort();

    let calls = sink.calls.lock().unwrap();
    assert_eq!(calls[0].len(), 5, "ready pointers share one request");
    // Each failed entry is retried on its own backoff (with jitter), alone or together.
    let mut retried: Vec<&str> = calls[1..]
        .iter()
        .flatten()
        .map(|(_, id)| id.as_str())
        .collect();
    retried.sort();
    assert_eq!(
        retried,
        vec![
            chunks[1].pointer.chunk_id.as_str(),
            chunks[3].pointer.chunk_id.as_str()
        ],
        "{calls:?}"
    );
    assert_eq!(calls[0][2].0, "app.t2", "the partition key is the tag");
    assert_eq!(registry.usage(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_failed_request_is_retried_on_its_backoff_and_keeps_the_chunk_until_it_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Arc::new(Registry::new());
    let sink = Arc::new(FakeSink::default());
    sink.script
        .lock()
        .unwrap()
        .extend([Outcome::Down, Outcome::Down, Outcome::Down]);
    let chunk = uploaded(dir.path(), &registry, 7);
    let mut config = config(dir.path());
    config.retry.backoff = Backoff {
        wait: Duration::from_secs(1),
        max_interval: Duration::from_secs(30),
        randomize: false,
    };
    let started = tokio::time::Instant::now();
    let task = start(&sink, config, &registry, std::slice::from_ref(&chunk));
    wait_until("three calls failed", || {
        sink.calls.lock().unwrap().len() == 3
    })
    .await;
    // Between the failed attempts, the chunk is kept and the registry says why and when next.
    assert!(chunk.paths.data.exists() && chunk.paths.state.exists());
    let info = registry.snapshot();
    assert_eq!(info.len(), 1);
    assert_eq!(info[0].attempts, 3, "{info:?}");
    assert!(info[0]
        .last_error
        .as_deref()
        .is_some_and(|e| e.contains("down")));
    assert!(info[0].next_retry_ms.is_some());
    wait_until("the chunk is deleted", || !chunk.paths.data.exists()).await;
    wait_until("the registry is empty", || registry.snapshot().is_empty()).await;
    task.abort();
    let at: Vec<u64> = sink
        .at
        .lock()
        .unwrap()
        .iter()
        .map(|t| (*t - started).as_millis() as u64)
        .collect();
    // The first attempt at once, then retries after 1, 2 and 4 s.
    assert_eq!(at, vec![0, 1_000, 3_000, 7_000]);
    assert!(!chunk.paths.state.exists());
}

/// An uploaded chunk whose body goes inline, with its `uploaded` state on disk.
fn uploaded_inline(dir: &std::path::Path, registry: &Registry, n: usize) -> UploadedChunk {
    let body = Bytes::from(format!("body {n}\nwith a newline").into_bytes());
    uploaded_inline_with(dir, registry, n, body)
}

/// [`uploaded_inline`] with this body.
fn uploaded_inline_with(
    dir: &std::path::Path,
    registry: &Registry,
    n: usize,
    body: Bytes,
) -> UploadedChunk {
    let mut chunk = uploaded(dir, registry, n);
    chunk.pointer = Pointer {
        stored_bytes: body.len() as u64,
        checksum: Checksum {
            crc32c: claimcheck_consumer::crc::crc32c(&body),
        },
        ..chunk.pointer
    }
    .into_inline(body);
    let state = chunk::ChunkState::uploaded(
        chunk.header.clone(),
        Default::default(),
        chunk.pointer.clone(),
        None,
    );
    chunk::write_state(&chunk.paths.state, &state).unwrap();
    chunk
}

#[tokio::test]
async fn inline_records_carry_their_body_on_every_attempt_and_go_only_once_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Arc::new(Registry::new());
    let sink = Arc::new(FakeSink::default());
    sink.script
        .lock()
        .unwrap()
        .extend([Outcome::Down, Outcome::Throttle(vec![0])]);
    let in_memory = uploaded_inline(dir.path(), &registry, 1);
    // As after a restart: the body is in the state file only.
    let mut on_disk = uploaded_inline(dir.path(), &registry, 2);
    let expected = [in_memory.pointer.to_record(), on_disk.pointer.to_record()];
    on_disk.pointer.inline = None;
    assert!(on_disk.body_on_disk());
    let object = uploaded(dir.path(), &registry, 3);
    let chunks = [in_memory, on_disk, object];
    let task = start(&sink, config(dir.path()), &registry, &chunks);
    wait_until("the first call failed", || {
        !sink.calls.lock().unwrap().is_empty()
    })
    .await;
    wait_until("every chunk is deleted", || {
        chunks.iter().all(|c| !c.paths.data.exists())
    })
    .await;
    wait_until("the registry is empty", || registry.snapshot().is_empty()).await;
    task.abort();

    let records = sink.records.lock().unwrap();
    let calls = sink.calls.lock().unwrap();
    // Down for all three; then one of them is throttled once (retries have their own
    // jitter, so they go together or apart).
    assert_eq!(calls[0].len(), 3);
    let attempts = |c: &UploadedChunk| {
        calls
            .iter()
            .flatten()
            .filter(|(_, id)| *id == c.pointer.chunk_id)
            .count()
    };
    let mut counts: Vec<usize> = chunks.iter().map(attempts).collect();
    counts.sort();
    assert_eq!(counts, [2, 2, 3], "{calls:?}");
    for record in records.iter() {
        let p = Pointer::from_record(record).unwrap();
        match chunks.iter().position(|c| c.pointer.chunk_id == p.chunk_id) {
            Some(i @ 0..=1) => assert_eq!(record[..], expected[i][..], "attempts resend the body"),
            Some(_) => assert!(!p.is_inline()),
            None => panic!("unknown chunk {}", p.chunk_id),
        }
    }
    assert_eq!(registry.usage(), 0);
}

/// An inline chunk whose body in the state file no longer matches its pointer (damaged on
/// disk): never published, put back to `sealed` with its data file kept, and out of the
/// registry for the rescan to hand to the uploader; the others go as usual.
#[tokio::test]
async fn an_inline_body_damaged_on_disk_is_not_published_but_uploaded_again() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Arc::new(Registry::new());
    let sink = Arc::new(FakeSink::default());
    // As the uploader and recovery hand inline chunks over: the body in the state file only.
    let damaged = |n| {
        let mut chunk = uploaded_inline(dir.path(), &registry, n);
        let mut body = chunk.pointer.inline.clone().unwrap().to_vec();
        body[0] ^= 1;
        let mut pointer = chunk.pointer.clone();
        pointer.inline = Some(body.into());
        let state =
            chunk::ChunkState::uploaded(chunk.header.clone(), Default::default(), pointer, None);
        chunk::write_state(&chunk.paths.state, &state).unwrap();
        chunk.pointer.inline = None;
        chunk
    };
    let (first, second) = (damaged(1), damaged(2));
    let sound = uploaded_inline(dir.path(), &registry, 3);
    let chunks = [first, second, sound];
    let task = start(&sink, config(dir.path()), &registry, &chunks);
    wait_until("the sound chunk is deleted", || {
        !chunks[2].paths.data.exists()
    })
    .await;
    wait_until("the damaged ones leave the registry", || {
        registry.snapshot().is_empty()
    })
    .await;
    task.abort();

    let published: Vec<String> = sink
        .calls
        .lock()
        .unwrap()
        .iter()
        .flatten()
        .map(|(_, id)| id.clone())
        .collect();
    assert_eq!(published, [chunks[2].pointer.chunk_id.clone()]);
    for damaged in &chunks[..2] {
        assert!(damaged.paths.data.exists(), "the data file is kept");
        match chunk::read_state(&damaged.paths.state).unwrap() {
            chunk::ChunkState::Sealed { header, .. } => assert_eq!(header, damaged.header),
            other => panic!("not put back to sealed: {other:?}"),
        }
    }
}

#[tokio::test]
async fn batches_respect_the_record_limit() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Arc::new(Registry::new());
    let sink = Arc::new(FakeSink::default());
    let chunks: Vec<_> = (0..1100)
        .map(|n| uploaded(dir.path(), &registry, n))
        .collect();
    let task = start(&sink, config(dir.path()), &registry, &chunks);
    wait_until("every chunk is deleted", || {
        chunks.iter().all(|c| !c.paths.data.exists())
    })
    .await;
    task.abort();
    let sizes: Vec<usize> = sink.calls.lock().unwrap().iter().map(Vec::len).collect();
    assert_eq!(sizes, vec![500, 500, 100]);
}

/// A published chunk whose files cannot be deleted (here the place its data file is renamed to,
/// as a spare, is taken by a directory) is deleted later, not kept until the next start: its
/// bytes would count toward the buffer's limit, which nothing else frees. Its token is
/// journaled once, however many tries the deletion takes.
#[tokio::test]
async fn a_published_chunk_that_cannot_be_deleted_yet_is_deleted_later() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Arc::new(Registry::new());
    let dedup = crate::dedup::Dedup::new(Duration::from_secs(600), 100);
    let tokens =
        Arc::new(crate::buffer::tokens::Tokens::open(dir.path(), dedup, Vec::new()).unwrap());
    registry.set_tokens(tokens.clone());
    let sink = Arc::new(FakeSink::default());
    let chunk = uploaded(dir.path(), &registry, 4);
    // A chunk file holding one request's token.
    std::fs::remove_file(&chunk.paths.data).unwrap();
    let mut w = chunk::ChunkWriter::create(&chunk.paths.data, &chunk.header).unwrap();
    let mut record = Vec::new();
    crate::buffer::token_record::TokenRecord {
        sender: "10.0.0.1".parse().unwrap(),
        token: Bytes::from_static(b"dG9rZW4=\n"),
        request: crate::buffer::token_record::TokenRecord::new_request(),
        parts: 1,
        part: Some(0),
    }
    .encode(&mut record);
    let mut entry = vec![0x92];
    claimcheck_consumer::entry::encode::event_time(&mut entry, EventTime::new(1, 0));
    entry.extend_from_slice(&[0x80]);
    w.append(&[Bytes::from(entry)], &record).unwrap();
    w.sync().unwrap();
    let spare = chunk.paths.data.with_extension(chunk::SPARE_EXT);
    std::fs::create_dir_all(spare.join("in-the-way")).unwrap();
    let task = start(
        &sink,
        config(dir.path()),
        &registry,
        std::slice::from_ref(&chunk),
    );
    wait_until("the pointer is published", || {
        sink.calls.lock().unwrap().len() == 1
    })
    .await;
    // Tried again and again while its data file cannot go.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(chunk.paths.data.exists());
    assert_eq!(
        registry.snapshot().len(),
        1,
        "not forgotten while its files are there"
    );
    std::fs::remove_dir_all(&spare).unwrap();
    wait_until("the chunk is forgotten", || registry.snapshot().is_empty()).await;
    task.abort();
    assert_eq!(sink.calls.lock().unwrap().len(), 1, "published once");
    assert_eq!(registry.usage(), 0);
    assert_eq!(
        tokens.journaled(),
        1,
        "its token journaled once, not once per try"
    );
}

#[tokio::test]
async fn a_pointer_that_exhausts_its_budget_moves_to_dead_letters() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Arc::new(Registry::new());
    let sink = Arc::new(FakeSink::default());
    sink.script
        .lock()
        .unwrap()
        .extend((0..10).map(|_| Outcome::Throttle(vec![0])));
    let chunk = uploaded(dir.path(), &registry, 3);
    let mut cfg = config(dir.path());
    cfg.retry.max_times = Some(1);
    let task = start(&sink, cfg, &registry, std::slice::from_ref(&chunk));
    wait_until("the chunk is dead-lettered", || {
        dir.path()
            .join("dead")
            .join(format!("{}.chunk", chunk.pointer.chunk_id))
            .exists()
    })
    .await;
    task.abort();
    assert_eq!(
        sink.calls.lock().unwrap().len(),
        2,
        "the first attempt and one retry"
    );
    assert!(!chunk.paths.data.exists() && registry.snapshot().is_empty());
    assert_eq!(registry.losses().2, 1);
}

#[test]
fn partition_keys_are_cut_to_kinesis_limit() {
    let dir = tempfile::tempdir().unwrap();
    let mut chunk = uploaded(dir.path(), &Registry::new(), 1);
    chunk.pointer.tag = "t".repeat(400);
    assert_eq!(
        config(dir.path()).partition_key(&chunk).chars().count(),
        MAX_PARTITION_KEY_CHARS
    );
    // Counted in UTF-16 code units, as a Java service may count them: an emoji takes two.
    chunk.pointer.tag = "🦀".repeat(200);
    let key = config(dir.path()).partition_key(&chunk);
    assert_eq!(key.encode_utf16().count(), MAX_PARTITION_KEY_CHARS);
    assert_eq!(key.chars().count(), MAX_PARTITION_KEY_CHARS / 2);
}

/// Holds the first PutRecords call until `release` is notified.
#[derive(Default)]
struct GatedSink {
    calls: Mutex<Vec<Vec<Bytes>>>,
    first_call: tokio::sync::Notify,
    release: tokio::sync::Notify,
}

impl PointerSink for GatedSink {
    async fn put_records(
        &self,
        records: &[PointerRecord],
    ) -> Result<Vec<EntryResult>, BackendError> {
        let first = {
            let mut calls = self.calls.lock().unwrap();
            calls.push(records.iter().map(|r| r.data.clone()).collect());
            calls.len() == 1
        };
        if first {
            self.first_call.notify_one();
            self.release.notified().await;
        }
        Ok((0..records.len())
            .map(|i| EntryResult::Accepted {
                shard_id: "s".into(),
                sequence_number: i.to_string(),
            })
            .collect())
    }
}

/// A backlog of inline chunks of nearly 1 MB, bodies on disk only (as after a restart): about
/// five go in one PutRecords, and the others wait for theirs without their bodies in memory.
/// Their state files are rewritten while the first call is in flight; what they send must be
/// read after that.
#[tokio::test]
async fn inline_jobs_that_wait_for_a_later_batch_hold_no_body() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Arc::new(Registry::new());
    let sink = Arc::new(GatedSink::default());
    let make = |n: usize, fill: u8| {
        let body = Bytes::from(vec![fill; 1000 * 1024 - 600]);
        let mut chunk = uploaded_inline_with(dir.path(), &registry, n, body);
        chunk.pointer.inline = None;
        chunk
    };
    let chunks: Vec<_> = (0..20).map(|n| make(n, b'a')).collect();
    let (tx, rx) = mpsc::unbounded_channel();
    for c in &chunks {
        tx.send(c.clone()).unwrap();
    }
    let task = tokio::spawn({
        let (sink, registry, config) = (sink.clone(), registry.clone(), config(dir.path()));
        async move {
            let _tx = tx;
            run(sink, Arc::new(config), registry, rx).await
        }
    });
    sink.first_call.notified().await;
    let first: Vec<String> = sink.calls.lock().unwrap()[0]
        .iter()
        .map(|r| Pointer::from_record(r).unwrap().chunk_id)
        .collect();
    let mut rewritten = 0;
    for (n, c) in chunks.iter().enumerate() {
        if !first.contains(&c.pointer.chunk_id) {
            make(n, b'b');
            rewritten += 1;
        }
    }
    assert_eq!(rewritten, 20 - first.len());
    sink.release.notify_one();
    wait_until("all deleted", || {
        chunks.iter().all(|c| !c.paths.data.exists())
    })
    .await;
    task.abort();
    let calls = sink.calls.lock().unwrap();
    assert_eq!(calls.iter().map(Vec::len).sum::<usize>(), 20);
    let stale = calls
        .iter()
        .skip(1)
        .flatten()
        .filter(|r| *r.last().unwrap() == b'a')
        .count();
    assert_eq!(stale, 0, "bodies read before the first call were kept");
}
