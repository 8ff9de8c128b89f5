//! The reader against an in-process stream that behaves like Kinesis (closed shards keep
//! their records and end; writes go to open shards) and an in-memory bucket.

use std::sync::Mutex;

use super::*;
use crate::body::{Compression, Format};
use crate::decode::tests::stored;
use crate::kinesis::InMemoryStream;
use crate::source::InMemoryBucket as Bucket;

const LOW: u128 = 0;
const HIGH: u128 = u128::MAX;

#[derive(Clone, Default)]
struct MemoryStore(Arc<Mutex<Option<Checkpoint>>>);

impl CheckpointStore for MemoryStore {
    async fn load(&self) -> Result<Option<Checkpoint>, Error> {
        Ok(self.0.lock().unwrap().clone())
    }

    async fn save(&self, checkpoint: &Checkpoint) -> Result<(), Error> {
        *self.0.lock().unwrap() = Some(checkpoint.clone());
        Ok(())
    }
}

/// A stream, a bucket, and chunks numbered from 0 (one event each, `{"n": n}`).
struct World {
    stream: Arc<InMemoryStream>,
    bucket: Arc<Bucket>,
    next: u32,
    published: Vec<Pointer>,
}

impl World {
    fn new(shards: u128) -> Self {
        World {
            stream: Arc::new(InMemoryStream::with_shards(shards)),
            bucket: Arc::new(Bucket::default()),
            next: 0,
            published: Vec::new(),
        }
    }

    fn pointer(&mut self, tag: &str) -> Pointer {
        let n = self.next;
        self.next += 1;
        let record = rmpv::Value::Map(vec![("n".into(), n.into())]);
        let event =
            Event::new(tag, crate::EventTime::new(1_763_740_800, n), &record, None).unwrap();
        let (mut p, bytes) = stored(Format::Msgpack, Compression::Zstd, event.entry_msgpack(), 1);
        p.chunk_id = format!("{n:032x}");
        p.key = format!("{tag}/{n}");
        p.tag = tag.into();
        self.bucket.put(&p.key, bytes);
        self.published.push(p.clone());
        p
    }

    /// Publishes a new chunk with the partition hash `hash`; returns its number.
    fn publish(&mut self, hash: u128) -> u32 {
        let p = self.pointer("app");
        self.stream.put(hash, &p.to_json());
        self.next - 1
    }

    /// Publishes chunk `n`'s pointer again.
    fn republish(&self, n: u32, hash: u128) {
        self.stream.put(hash, &self.published[n as usize].to_json());
    }

    fn builder(&self) -> StreamReaderBuilder {
        StreamReader::builder_with(
            self.stream.clone(),
            Resolver::from_source(self.bucket.clone()),
            "pointers".into(),
        )
        .shard_refresh_interval(Duration::ZERO)
    }
}

/// The chunk number of a delivery's only event.
async fn number(delivery: &mut Delivery) -> u32 {
    let events = delivery.events().await.expect("the chunk resolves");
    assert_eq!(events.len(), 1);
    events[0].record_json()["n"].as_u64().unwrap() as u32
}

/// Reads until caught up, committing everything; returns (shard, chunk number) in order.
async fn drain(reader: &mut StreamReader) -> Vec<(String, u32)> {
    let mut got = Vec::new();
    while let Some(mut d) = reader.next().await.unwrap() {
        got.push((d.position().shard_id.clone(), number(&mut d).await));
        reader.commit(d.position());
    }
    got
}

fn numbers(got: &[(String, u32)]) -> Vec<u32> {
    let mut n: Vec<u32> = got.iter().map(|(_, n)| *n).collect();
    n.sort();
    n
}

#[tokio::test]
async fn every_shard_in_order_with_several_chunks_resolved_at_once() {
    let mut world = World::new(3);
    let hashes = [LOW, u128::MAX / 2, HIGH];
    let mut sent: HashMap<String, Vec<u32>> = HashMap::new();
    for i in 0..30 {
        let hash = hashes[i % 3];
        let n = world.publish(hash);
        let (shard, _) = world.stream.put(hash, b"");
        // The empty record above is not a pointer: it comes back as an error delivery.
        sent.entry(shard).or_default().push(n);
    }
    let mut reader = world.builder().concurrency(8).open().await.unwrap();
    let mut got: HashMap<String, Vec<u32>> = HashMap::new();
    let mut errors = 0;
    while let Some(mut d) = reader.next().await.unwrap() {
        match d.events().await {
            Ok(events) => got
                .entry(d.position().shard_id.clone())
                .or_default()
                .push(events[0].record_json()["n"].as_u64().unwrap() as u32),
            Err(e) => {
                assert!(matches!(e, Error::MalformedPointer(_)), "{e}");
                assert!(d.pointer().is_none());
                errors += 1;
            }
        }
        reader.commit(d.position());
    }
    assert_eq!(got, sent, "each shard's chunks, in order");
    assert_eq!(errors, 30);
    assert_eq!(reader.stats().delivered, 60);
}

#[tokio::test]
async fn children_are_read_after_their_parents_across_a_split_and_a_merge() {
    let mut world = World::new(1);
    for hash in [LOW, HIGH, LOW] {
        world.publish(hash);
    }
    // One record per read, so that a shard takes several reads to end.
    let mut reader = world
        .builder()
        .concurrency(2)
        .records_per_read(1)
        .open()
        .await
        .unwrap();
    let mut first = reader.next().await.unwrap().unwrap();
    let mut got = vec![(first.position().shard_id.clone(), number(&mut first).await)];
    reader.commit(first.position());

    // Split while the reader is in the parent, then merge the children.
    let (left, right) = world.stream.split("shardId-000000000000");
    for hash in [LOW, HIGH, HIGH] {
        world.publish(hash);
    }
    let merged = world.stream.merge(&left, &right);
    for hash in [HIGH, LOW] {
        world.publish(hash);
    }
    got.extend(drain(&mut reader).await);

    assert_eq!(
        numbers(&got),
        (0..8).collect::<Vec<_>>(),
        "nothing lost or repeated"
    );
    let at = |shard: &str| -> Vec<usize> {
        got.iter()
            .enumerate()
            .filter(|(_, (s, _))| s == shard)
            .map(|(i, _)| i)
            .collect()
    };
    let parent = at("shardId-000000000000");
    let children = [at(&left), at(&right)].concat();
    let grandchild = at(&merged);
    assert_eq!((parent.len(), children.len(), grandchild.len()), (3, 3, 2));
    assert!(parent.iter().max() < children.iter().min(), "{got:?}");
    assert!(children.iter().max() < grandchild.iter().min(), "{got:?}");
    assert!(reader.shards().iter().take(3).all(|(_, ended)| *ended));
    assert_read_after_parents(
        &world,
        &[
            (&left, &[parent_id()]),
            (&right, &[parent_id()]),
            (&merged, &[&left, &right]),
        ],
    );
}

#[tokio::test]
async fn an_empty_page_does_not_end_a_closed_shard_unless_asked() {
    let mut world = World::new(1);
    for hash in [LOW, HIGH, LOW] {
        world.publish(hash);
    }
    let (left, _) = world.stream.split(parent_id());
    world.publish(LOW);
    let mut reader = world.builder().records_per_read(1).open().await.unwrap();
    let mut first = reader.next().await.unwrap().unwrap();
    let mut got = vec![(first.position().shard_id.clone(), number(&mut first).await)];
    reader.commit(first.position());
    // The closed parent's next page comes back empty before its last records, claiming to be
    // caught up: only a null iterator ends the shard. The reader has nothing new after that
    // page; asked again, it reads the rest.
    world.stream.empty_next_read();
    assert!(reader.next().await.unwrap().is_none());
    got.extend(drain(&mut reader).await);
    assert_eq!(numbers(&got), (0..4).collect::<Vec<_>>(), "{got:?}");
    assert_eq!(got.last().unwrap(), &(left.clone(), 3));

    // An emulator that never ends a closed shard: its children wait for ever unless the
    // reader is told to end a closed shard that is caught up.
    let mut world = World::new(1);
    world.stream.never_end_shards();
    world.publish(LOW);
    let (left, _) = world.stream.split(parent_id());
    world.publish(LOW);
    let mut reader = world.builder().open().await.unwrap();
    let got = drain(&mut reader).await;
    assert_eq!(got, [(parent_id().to_string(), 0)], "the child waits");
    let mut reader = world
        .builder()
        .closed_shards_end_when_caught_up(true)
        .open()
        .await
        .unwrap();
    let got = drain(&mut reader).await;
    assert_eq!(got, [(parent_id().to_string(), 0), (left, 1)]);
}

fn parent_id() -> &'static str {
    "shardId-000000000000"
}

/// Each child's first GetRecords came after its parents' last one (the read that ended them).
fn assert_read_after_parents(world: &World, family: &[(&str, &[&str])]) {
    let reads = world.stream.reads.lock().unwrap().clone();
    for (child, parents) in family {
        let first = reads.iter().position(|s| s == child).expect("child read");
        for parent in *parents {
            let last = reads
                .iter()
                .rposition(|s| s == parent)
                .expect("parent read");
            assert!(
                last < first,
                "{child} read before {parent} ended: {reads:?}"
            );
        }
    }
}

#[tokio::test]
async fn a_reader_opened_after_a_reshard_reads_the_parents_first() {
    let mut world = World::new(2);
    for hash in [LOW, HIGH, LOW, HIGH, LOW] {
        world.publish(hash);
    }
    let merged = world
        .stream
        .merge("shardId-000000000000", "shardId-000000000001");
    world.publish(LOW);
    let mut reader = world.builder().records_per_read(1).open().await.unwrap();
    let got = drain(&mut reader).await;
    assert_eq!(numbers(&got), (0..6).collect::<Vec<_>>());
    assert_eq!(got.last().unwrap(), &(merged.clone(), 5));
    assert_read_after_parents(
        &world,
        &[(&merged, &["shardId-000000000000", "shardId-000000000001"])],
    );
}

#[tokio::test]
async fn restart_from_a_checkpoint_resumes_after_what_was_committed() {
    let mut world = World::new(1);
    for _ in 0..5 {
        world.publish(LOW);
    }
    let store = MemoryStore::default();
    let mut reader = world
        .builder()
        .checkpoints(store.clone())
        .open()
        .await
        .unwrap();
    let mut handed = Vec::new();
    for _ in 0..3 {
        handed.push(reader.next().await.unwrap().unwrap());
    }
    // Committed out of order: the checkpoint moves only over a processed prefix.
    reader.commit(handed[1].position());
    reader.checkpoint().await.unwrap();
    let saved = store.0.lock().unwrap().clone().unwrap();
    assert_eq!(saved.shard("shardId-000000000000"), None);
    reader.commit(handed[0].position());
    reader.checkpoint().await.unwrap();
    let saved = store.0.lock().unwrap().clone().unwrap();
    assert_eq!(
        saved.shard("shardId-000000000000"),
        Some(&ShardCheckpoint::After(
            handed[1].position().sequence_number.clone()
        ))
    );
    assert_eq!(
        saved.recent_chunk_id_count(),
        2,
        "only committed chunk ids are saved"
    );
    drop(handed);
    drop(reader);

    // Chunk 0 is published again, as by a sidecar restarted after a crash.
    world.republish(0, LOW);

    let mut reader = world
        .builder()
        .checkpoints(store.clone())
        .open()
        .await
        .unwrap();
    let got = drain(&mut reader).await;
    assert_eq!(
        numbers(&got),
        vec![2, 3, 4],
        "chunk 2 was handed out but not committed"
    );
    assert_eq!(
        reader.stats().duplicates_dropped,
        1,
        "the window survived the restart"
    );
    reader.checkpoint().await.unwrap();
    let saved = store.0.lock().unwrap().clone().unwrap();
    assert_eq!(saved.recent_chunk_id_count(), 5);
}

#[tokio::test]
async fn a_finished_parent_is_not_read_again_after_a_restart() {
    let mut world = World::new(1);
    world.publish(LOW);
    world.publish(HIGH);
    let (left, right) = world.stream.split("shardId-000000000000");
    world.publish(LOW);
    world.publish(HIGH);
    let store = MemoryStore::default();
    let mut reader = world
        .builder()
        .checkpoints(store.clone())
        .open()
        .await
        .unwrap();
    assert_eq!(numbers(&drain(&mut reader).await), vec![0, 1, 2, 3]);
    reader.checkpoint().await.unwrap();
    let saved = store.0.lock().unwrap().clone().unwrap();
    assert_eq!(
        saved.shard("shardId-000000000000"),
        Some(&ShardCheckpoint::Finished)
    );
    assert!(matches!(
        saved.shard(&left),
        Some(ShardCheckpoint::After(_))
    ));
    assert!(matches!(
        saved.shard(&right),
        Some(ShardCheckpoint::After(_))
    ));

    world.stream.reads.lock().unwrap().clear();
    world.publish(HIGH);
    let mut reader = world.builder().checkpoints(store).open().await.unwrap();
    let got = drain(&mut reader).await;
    assert_eq!(got, vec![(right.clone(), 4)]);
    let reads = world.stream.reads.lock().unwrap().clone();
    assert!(
        !reads.contains(&"shardId-000000000000".to_string()),
        "{reads:?}"
    );
}

#[tokio::test]
async fn duplicates_filtered_pointers_and_bad_records_count_for_the_checkpoint() {
    let mut world = World::new(1);
    let a = world.pointer("app.keep");
    let b = world.pointer("app.drop");
    for p in [&a, &b] {
        world.stream.put(LOW, &p.to_json());
    }
    world.republish(0, LOW);
    world.stream.put(LOW, b"not a pointer");
    let store = MemoryStore::default();
    let mut reader = world
        .builder()
        .filter(|p| p.tag == "app.keep")
        .checkpoints(store.clone())
        .open()
        .await
        .unwrap();
    let mut first = reader.next().await.unwrap().unwrap();
    assert_eq!(number(&mut first).await, 0);
    let mut bad = reader.next().await.unwrap().unwrap();
    assert!(matches!(
        bad.next_event().await,
        Some(Err(Error::MalformedPointer(_)))
    ));
    assert!(bad.next_event().await.is_none());
    assert!(reader.next().await.unwrap().is_none());
    assert_eq!(
        (reader.stats().filtered, reader.stats().duplicates_dropped),
        (1, 1)
    );
    // Skip the bad record; the first chunk is still being processed.
    reader.commit(bad.position());
    reader.checkpoint().await.unwrap();
    assert!(store
        .0
        .lock()
        .unwrap()
        .clone()
        .unwrap()
        .shard("shardId-000000000000")
        .is_none());
    reader.commit(first.position());
    reader.checkpoint().await.unwrap();
    let saved = store.0.lock().unwrap().clone().unwrap();
    assert_eq!(
        saved.shard("shardId-000000000000"),
        Some(&ShardCheckpoint::After(
            bad.position().sequence_number.clone()
        ))
    );
}

/// A reader from `latest`, keeping its checkpoint in `store` if given.
async fn open_at_latest_with(world: &World, store: Option<&MemoryStore>) -> StreamReader {
    let builder = world.builder().start(StartPosition::Latest);
    match store {
        Some(store) => builder.checkpoints(store.clone()).open().await,
        None => builder.open().await,
    }
    .unwrap()
}

/// A first run from `latest` with a checkpoint in `store`: chunk 1 arrives after the open, is
/// read and committed, and the checkpoint saved.
async fn first_run_at_latest(world: &mut World, store: &MemoryStore) {
    let mut reader = open_at_latest_with(world, Some(store)).await;
    world.publish(LOW);
    assert_eq!(numbers(&drain(&mut reader).await), vec![1]);
    reader.checkpoint().await.unwrap();
}

async fn open_at_latest(world: &World) -> StreamReader {
    open_at_latest_with(world, None).await
}

#[tokio::test]
async fn latest_starts_after_open_and_missing_objects_are_errors_to_skip() {
    let mut world = World::new(1);
    world.publish(LOW);
    let mut reader = open_at_latest(&world).await;
    let n = world.publish(LOW);
    world.bucket.delete(&format!("app/{n}"));
    world.publish(LOW);
    let mut missing = reader.next().await.unwrap().unwrap();
    let err = missing.events().await.unwrap_err();
    assert!(matches!(err, Error::ObjectMissing { .. }), "{err}");
    assert!(err.is_chunk_error());
    // Asked again, it fails again: an empty list would pass for a chunk read.
    let again = missing.events().await.unwrap_err();
    assert!(
        matches!(
            again,
            Error::Failed {
                chunk_error: true,
                ..
            }
        ),
        "{again}"
    );
    reader.commit(missing.position());
    assert_eq!(numbers(&drain(&mut reader).await), vec![2]);
}

#[tokio::test]
async fn latest_reads_what_arrived_after_open_when_the_first_iterator_expires() {
    let mut world = World::new(1);
    world.publish(LOW);
    let mut reader = open_at_latest(&world).await;
    // The first read finds its iterator expired (the caller was away for five minutes); a
    // record arrived after the open meanwhile. The reader takes a new iterator at once.
    world.stream.expire_next_read();
    world.publish(LOW);
    let mut got = reader.next().await.unwrap().expect("read on at once");
    assert_eq!(number(&mut got).await, 1);
}

/// Kinesis can give empty pages behind a shard's tip (on sparse stretches): the reader reads
/// on at once rather than say there is nothing new. A throttled read gives nothing new for
/// now, and says the reader is behind, so that a caller waiting for the stream to go idle
/// (`claimcheck tail --until-idle`) does not stop there.
#[tokio::test]
async fn an_empty_page_behind_the_tip_is_read_past_and_a_throttled_read_is_behind() {
    let mut world = World::new(1);
    let mut reader = world.builder().open().await.unwrap();
    world.publish(LOW);
    world.stream.behind_next_read();
    let first = reader
        .next()
        .await
        .unwrap()
        .expect("read past the empty page");
    reader.commit(first.position());
    assert!(!reader.is_behind());
    world.publish(LOW);
    world.stream.throttle_next_read();
    assert!(reader.next().await.unwrap().is_none(), "throttled: later");
    assert!(reader.is_behind());
    assert_eq!(numbers(&drain(&mut reader).await), vec![1]);
    assert!(!reader.is_behind());
}

#[tokio::test]
async fn latest_does_not_replay_the_children_of_a_shard_split_before_open() {
    let mut world = World::new(1);
    world.publish(LOW);
    world.stream.split("shardId-000000000000");
    world.publish(LOW);
    let mut reader = open_at_latest(&world).await;
    world.publish(LOW);
    world.publish(HIGH);
    assert_eq!(numbers(&drain(&mut reader).await), vec![2, 3]);
}

/// Kinesis in memory, with GetRecords on one shard failing once or slow.
#[derive(Debug)]
struct Faulty {
    inner: Arc<InMemoryStream>,
    shard: &'static str,
    fail_once: std::sync::atomic::AtomicBool,
    delay: Duration,
}

impl Faulty {
    fn builder(self, world: &World) -> StreamReaderBuilder {
        StreamReader::builder_with(
            Arc::new(self),
            Resolver::from_source(world.bucket.clone()),
            "pointers".into(),
        )
    }
}

impl ShardSource for Faulty {
    fn list_shards<'a>(
        &'a self,
        stream: &'a str,
    ) -> futures::future::BoxFuture<'a, Result<Vec<kinesis::ShardInfo>, Error>> {
        self.inner.list_shards(stream)
    }

    fn iterator<'a>(
        &'a self,
        stream: &'a str,
        shard_id: &'a str,
        start: &'a IteratorStart,
    ) -> futures::future::BoxFuture<'a, Result<Option<String>, Error>> {
        self.inner.iterator(stream, shard_id, start)
    }

    fn records<'a>(
        &'a self,
        stream: &'a str,
        iterator: &'a str,
        limit: i32,
    ) -> futures::future::BoxFuture<'a, Result<Read, Error>> {
        let this_shard = iterator.starts_with(self.shard);
        Box::pin(async move {
            if this_shard {
                tokio::time::sleep(self.delay).await;
                if self
                    .fail_once
                    .swap(false, std::sync::atomic::Ordering::SeqCst)
                {
                    return Err(Error::Kinesis {
                        operation: "GetRecords",
                        source: "InternalFailure".into(),
                    });
                }
            }
            self.inner.records(stream, iterator, limit).await
        })
    }
}

/// A read round whose read of one shard fails keeps what it read from the others: the caller
/// that goes on after the error gets every record, and the checkpoint passes none unread.
#[tokio::test]
async fn a_failed_read_of_one_shard_loses_nothing_read_from_another() {
    let mut world = World::new(2);
    world.publish(HIGH); // 0 and 1 on the second shard
    world.publish(HIGH);
    let faulty = Faulty {
        inner: world.stream.clone(),
        shard: "shardId-000000000000",
        fail_once: true.into(),
        delay: Duration::ZERO,
    };
    let store = MemoryStore::default();
    let mut reader = faulty
        .builder(&world)
        .checkpoints(store.clone())
        .open()
        .await
        .unwrap();
    let err = reader.next().await.unwrap_err();
    assert!(matches!(err, Error::Kinesis { .. }), "{err}");
    world.publish(HIGH);
    assert_eq!(numbers(&drain(&mut reader).await), vec![0, 1, 2]);
}

/// `next()` may be dropped while it reads (a caller's `select!` or timeout): a record another
/// shard's read had returned meanwhile is read again, not lost.
#[tokio::test]
async fn a_next_dropped_while_reading_loses_no_record() {
    let mut world = World::new(2);
    world.publish(HIGH); // 0, on the second shard
    let slow = Faulty {
        inner: world.stream.clone(),
        shard: "shardId-000000000000",
        fail_once: false.into(),
        delay: Duration::from_millis(300),
    };
    let mut reader = slow.builder(&world).open().await.unwrap();
    let dropped = tokio::time::timeout(Duration::from_millis(50), reader.next()).await;
    assert!(dropped.is_err(), "given up while the first shard is read");
    world.publish(HIGH);
    assert_eq!(numbers(&drain(&mut reader).await), vec![0, 1]);
}

/// A reader resumed from its checkpoint reads the shards that the checkpoint does not name from
/// where its first run started: here the children of a split made while it was away, written
/// to meanwhile.
#[tokio::test]
async fn a_resumed_reader_reads_the_children_of_a_split_made_while_it_was_away() {
    let mut world = World::new(1);
    world.publish(LOW); // 0, before the first open
    let store = MemoryStore::default();
    first_run_at_latest(&mut world, &store).await;
    world.stream.split("shardId-000000000000");
    world.publish(LOW); // 2 and 3, on the children, while no reader runs
    world.publish(HIGH);
    let mut reader = open_at_latest_with(&world, Some(&store)).await;
    world.publish(LOW);
    assert_eq!(numbers(&drain(&mut reader).await), vec![2, 3, 4]);
}

/// Resumed `--from latest`, a shard that no commit named is read from the first run's start:
/// what was written to it while the reader was away arrives, what was there before the first
/// run does not.
#[tokio::test]
async fn a_resumed_reader_reads_a_quiet_shard_from_its_first_start() {
    let mut world = World::new(2);
    world.publish(HIGH); // 0, on the second shard, before the first run
                         // Checkpoints keep milliseconds, as AT_TIMESTAMP does: open in a later one.
    let ms = || {
        SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis()
    };
    let published = ms();
    while ms() == published {
        std::hint::spin_loop();
    }
    let store = MemoryStore::default();
    first_run_at_latest(&mut world, &store).await;
    world.publish(HIGH); // 2, on the quiet shard while no reader runs
    let mut reader = open_at_latest_with(&world, Some(&store)).await;
    assert_eq!(numbers(&drain(&mut reader).await), vec![2]);
}
