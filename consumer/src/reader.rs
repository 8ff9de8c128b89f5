//! A reader over every shard of a Kinesis stream, for tools, tests and small deployments.
//! Production consumers scale with shards: Lambda (the `lambda` feature) or one reader per
//! shard of their own.
//!
//! # What it guarantees
//!
//! * **Per-shard order.** Deliveries of one shard come in sequence-number order; shards are
//!   read side by side. Up to [`concurrency`](StreamReaderBuilder::concurrency) pointers are
//!   resolved ahead of the caller, and still handed out in order.
//! * **Resharding.** A child shard is read only after each of its parents still in the stream
//!   has been read to its end, so a partition key's records stay in order across a split or
//!   merge. Shards that existed when the reader opened start at its [`StartPosition`]; shards
//!   born later start at their beginning.
//! * **Duplicates dropped.** A pointer whose chunk id is among the last
//!   [`dedup_window`](StreamReaderBuilder::dedup_window) chunk ids handed out (default
//!   [`StreamReader::DEFAULT_DEDUP_WINDOW`]) is dropped. With a checkpoint store the ids of
//!   committed chunks are saved too, so the window survives a restart.
//! * **Checkpoints only after commits.** A position is saved only once the caller
//!   [`commit`](StreamReader::commit)ted it and everything before it in its shard; dropped
//!   duplicates and filtered pointers count as committed.
//!
//! A shard is read to its end when Kinesis returns no next iterator (a closed shard). Some
//! emulators (moto) never do that; for them,
//! [`closed_shards_end_when_caught_up`](StreamReaderBuilder::closed_shards_end_when_caught_up)
//! also treats a shard that ListShards reports closed as ended once a read of it comes back
//! empty with `MillisBehindLatest` 0.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::checkpoint::{Checkpoint, CheckpointStore, DynStore, ShardCheckpoint};
use crate::dedup::{chunk_key, RecentIds};
use crate::kinesis::{self, IteratorStart, Read, ShardSource};
use crate::{Error, Event, EventStream, Pointer, ResolveStats, ResolvedChunk, Resolver};

/// Where a reader starts in each shard that has no checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StartPosition {
    /// The oldest record still in the stream.
    TrimHorizon,
    /// Only records written after the reader opened: read from the time it opened
    /// (`AT_TIMESTAMP`), so that an iterator that expires before a shard's first record, and
    /// the children of a shard split before the reader opened, start there too.
    Latest,
    /// Records that arrived at or after this time.
    AtTimestamp(SystemTime),
}

/// Where a record is in a stream: its shard and sequence number.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Position {
    pub shard_id: String,
    pub sequence_number: String,
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.shard_id, self.sequence_number)
    }
}

/// One pointer record handed out by a [`StreamReader`]: its position and its chunk's events.
///
/// Read the events with [`Delivery::events`] (all at once) or [`Delivery::next_event`]
/// (streamed), then [`commit`](StreamReader::commit) the position. A record that is not a
/// pointer, or whose object cannot be read or verified, yields an error instead; the caller
/// decides whether to skip it (commit) or stop.
#[derive(Debug)]
pub struct Delivery {
    position: Position,
    chunk: Result<EventStream, Option<Error>>,
    /// The error handed out, if one was: what [`Delivery::events`] says if called again.
    failed: Option<(String, bool)>,
}

impl Delivery {
    /// Where the record is.
    pub fn position(&self) -> &Position {
        &self.position
    }

    /// The pointer, unless the record is not one.
    pub fn pointer(&self) -> Option<&Pointer> {
        self.chunk.as_ref().ok().map(EventStream::pointer)
    }

    /// The next event; `None` after the last one or after an error.
    pub async fn next_event(&mut self) -> Option<Result<Event, Error>> {
        let next = match &mut self.chunk {
            Ok(stream) => stream.next().await,
            Err(e) => e.take().map(Err),
        };
        if let Some(Err(e)) = &next {
            self.failed
                .get_or_insert_with(|| (e.to_string(), e.is_chunk_error()));
        }
        next
    }

    /// Every remaining event, verified. Once an error was handed out, an error again
    /// ([`Error::Failed`]): the events were not all verified, so none can be taken for read.
    pub async fn events(&mut self) -> Result<Vec<Event>, Error> {
        if let Some((message, chunk_error)) = &self.failed {
            return Err(Error::Failed {
                message: message.clone(),
                chunk_error: *chunk_error,
            });
        }
        let mut events = Vec::new();
        while let Some(event) = self.next_event().await {
            events.push(event?);
        }
        Ok(events)
    }

    /// The pointer and every remaining event.
    pub async fn resolve(&mut self) -> Result<ResolvedChunk, Error> {
        let events = self.events().await?;
        let pointer = self
            .pointer()
            .expect("a record that is not a pointer errs")
            .clone();
        Ok(ResolvedChunk { pointer, events })
    }

    /// Memory and requests of resolving the chunk so far.
    pub fn stats(&self) -> Option<ResolveStats> {
        self.chunk.as_ref().ok().map(EventStream::stats)
    }
}

/// Counts of what a reader did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReaderStats {
    /// Deliveries handed out (chunks and errors).
    pub delivered: u64,
    /// Pointers dropped because their chunk id was in the dedup window.
    pub duplicates_dropped: u64,
    /// Pointers dropped by the [`filter`](StreamReaderBuilder::filter).
    pub filtered: u64,
}

type Filter = Arc<dyn Fn(&Pointer) -> bool + Send + Sync>;

/// Settings of a [`StreamReader`]; see [`StreamReader::builder`].
pub struct StreamReaderBuilder {
    kinesis: Arc<dyn ShardSource>,
    resolver: Resolver,
    stream: String,
    start: StartPosition,
    store: Option<Box<dyn DynStore>>,
    concurrency: usize,
    dedup_window: usize,
    shard_refresh: Duration,
    records_per_read: i32,
    filter: Option<Filter>,
    end_when_caught_up: bool,
}

impl std::fmt::Debug for StreamReaderBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamReaderBuilder")
            .field("stream", &self.stream)
            .field("start", &self.start)
            .field("concurrency", &self.concurrency)
            .field("dedup_window", &self.dedup_window)
            .finish_non_exhaustive()
    }
}

impl StreamReaderBuilder {
    /// Where the shards start on a first run, without a checkpoint; [`StartPosition::TrimHorizon`]
    /// unless set. A reader resumed from a checkpoint reads the shards it does not name (new
    /// since, a reshard while the reader was away, or none of their records committed) from
    /// where its first run started: the time it opened for `Latest`, the time given, or the
    /// start of the shards.
    pub fn start(mut self, start: StartPosition) -> Self {
        self.start = start;
        self
    }

    /// Loads the position from `store` on open and saves committed positions to it.
    pub fn checkpoints(mut self, store: impl CheckpointStore) -> Self {
        self.store = Some(Box::new(store));
        self
    }

    /// How many pointers are resolved at once, ahead of the caller (at least 1; default 4).
    /// Memory grows with it: each holds at most a few batches of events, plus its object when
    /// that is verified in memory ([`Resolver::in_memory_object_bytes`]).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// How many recent chunk ids are remembered to drop duplicates (default
    /// [`StreamReader::DEFAULT_DEDUP_WINDOW`]; 0 turns dropping off). About 40 bytes each in
    /// memory and 24 in a checkpoint.
    pub fn dedup_window(mut self, ids: usize) -> Self {
        self.dedup_window = ids;
        self
    }

    /// How often the shard list is read again while the stream is quiet, to find shards a
    /// reshard created (default 10 s). The list is always read again when a shard ends.
    pub fn shard_refresh_interval(mut self, interval: Duration) -> Self {
        self.shard_refresh = interval;
        self
    }

    /// Records asked for per GetRecords call (Kinesis' `Limit`, 1 to 10 000; default 1000).
    pub fn records_per_read(mut self, n: u16) -> Self {
        self.records_per_read = i32::from(n.clamp(1, 10_000));
        self
    }

    /// Pointers for which `keep` is false are dropped without reading their objects, and count
    /// as processed for checkpoints.
    pub fn filter(mut self, keep: impl Fn(&Pointer) -> bool + Send + Sync + 'static) -> Self {
        self.filter = Some(Arc::new(keep));
        self
    }

    /// Also ends a shard that ListShards reports closed when a read of it comes back empty
    /// with `MillisBehindLatest` 0, not only when GetRecords returns no next iterator (off
    /// unless set). For emulators that never return a null iterator for a closed shard, such
    /// as moto, whose closed parents would otherwise hold their children back forever. Leave
    /// it off against Kinesis: an empty page is no proof that a shard was read to its end
    /// there, and records after it would be skipped.
    pub fn closed_shards_end_when_caught_up(mut self, on: bool) -> Self {
        self.end_when_caught_up = on;
        self
    }

    /// Loads the checkpoint, if any, and lists the stream's shards.
    pub async fn open(self) -> Result<StreamReader, Error> {
        let mut recent = RecentIds::new(self.dedup_window);
        let mut restored = HashMap::new();
        let start = match self.start {
            StartPosition::Latest => StartPosition::AtTimestamp(SystemTime::now()),
            start => start,
        };
        let mut since = match start {
            StartPosition::AtTimestamp(t) => Some(t),
            _ => None,
        };
        let mut resumed = false;
        if let Some(store) = &self.store {
            if let Some(cp) = store.load_boxed().await? {
                resumed = true;
                since = cp.since();
                if cp.stream() != self.stream {
                    return Err(Error::Checkpoint {
                        reason: format!(
                            "the checkpoint is for stream {:?}, not {:?}",
                            cp.stream(),
                            self.stream
                        ),
                        source: None,
                    });
                }
                for &id in cp.recent_ids() {
                    recent.insert(id);
                }
                restored = cp
                    .shards()
                    .map(|(id, at)| (id.to_string(), at.clone()))
                    .collect();
            }
        }
        let mut reader = StreamReader {
            kinesis: self.kinesis,
            resolver: self.resolver,
            stream: self.stream,
            start,
            store: self.store,
            concurrency: self.concurrency,
            shard_refresh: self.shard_refresh,
            records_per_read: self.records_per_read,
            filter: self.filter,
            end_when_caught_up: self.end_when_caught_up,
            initial: None,
            restored,
            resumed,
            since,
            shards: Vec::new(),
            queue: VecDeque::new(),
            in_flight: VecDeque::new(),
            recent,
            stats: ReaderStats::default(),
            dirty: false,
            listed_at: Instant::now(),
            behind: false,
        };
        reader.discover_shards().await?;
        // Position every shard now, so that `Latest` means "after open", not "after the first
        // read".
        let kinesis = reader.kinesis.clone();
        for shard in reader.shards.iter_mut().filter(|s| !s.ended) {
            shard.iterator = kinesis
                .iterator(&reader.stream, &shard.id, &shard.start)
                .await?;
            shard.ended = shard.iterator.is_none();
        }
        Ok(reader)
    }
}

/// What the reader knows about one shard.
#[derive(Debug)]
struct Shard {
    id: String,
    /// ListShards says a reshard closed it.
    closed: bool,
    /// Where the first iterator starts.
    start: IteratorStart,
    iterator: Option<String>,
    /// The last sequence number read, to take a new iterator after it.
    last_read: Option<String>,
    /// Read to its end.
    ended: bool,
    /// Records handed out or dropped and not yet part of the checkpoint, in order.
    pending: VecDeque<Pending>,
    /// The checkpoint: every record up to here is processed.
    committed: Option<String>,
}

#[derive(Debug)]
struct Pending {
    sequence_number: String,
    done: bool,
    chunk: Option<u128>,
}

impl Shard {
    /// Moves the checkpoint over the done records at the front.
    fn advance(&mut self) {
        while self.pending.front().is_some_and(|p| p.done) {
            let p = self.pending.pop_front().expect("checked");
            self.committed = Some(p.sequence_number);
        }
    }
}

/// A record read from Kinesis and not yet handed out.
#[derive(Debug)]
struct Queued {
    shard: usize,
    sequence_number: String,
    data: Vec<u8>,
}

/// Reads pointers from every shard of a stream and resolves them; see the
/// [module documentation](self) for the guarantees.
///
/// ```no_run
/// # async fn run() -> Result<(), claimcheck_consumer::Error> {
/// use std::time::Duration;
/// use claimcheck_consumer::{FileCheckpointStore, Resolver, StartPosition, StreamReader};
///
/// let config = aws_config::load_from_env().await;
/// let resolver = Resolver::new(aws_sdk_s3::Client::new(&config));
/// let kinesis = aws_sdk_kinesis::Client::new(&config);
/// let mut reader = StreamReader::builder(kinesis, resolver, "pointers")
///     .start(StartPosition::TrimHorizon)
///     .checkpoints(FileCheckpointStore::new("pointers.checkpoint"))
///     .open()
///     .await?;
/// loop {
///     let Some(mut delivery) = reader.next().await? else {
///         tokio::time::sleep(Duration::from_secs(1)).await; // caught up
///         continue;
///     };
///     match delivery.events().await {
///         Ok(events) => {
///             for event in events {
///                 println!("{}", event.to_json());
///             }
///         }
///         // Missing, damaged or not a pointer: skip it (or stop, to look into it).
///         Err(e) if e.is_chunk_error() => eprintln!("skipping {}: {e}", delivery.position()),
///         Err(e) => return Err(e),
///     }
///     reader.commit(delivery.position());
/// }
/// # }
/// ```
pub struct StreamReader {
    kinesis: Arc<dyn ShardSource>,
    resolver: Resolver,
    stream: String,
    start: StartPosition,
    store: Option<Box<dyn DynStore>>,
    concurrency: usize,
    shard_refresh: Duration,
    records_per_read: i32,
    filter: Option<Filter>,
    /// [`StreamReaderBuilder::closed_shards_end_when_caught_up`].
    end_when_caught_up: bool,
    /// Shard ids listed when the reader opened.
    initial: Option<HashSet<String>>,
    /// Positions from the checkpoint, for shards not known yet.
    restored: HashMap<String, ShardCheckpoint>,
    /// A checkpoint was loaded: the start position is for a first run only.
    resumed: bool,
    /// Where the first run started, if at a time: a resumed reader starts there the shards its
    /// checkpoint does not name.
    since: Option<SystemTime>,
    shards: Vec<Shard>,
    queue: VecDeque<Queued>,
    in_flight: VecDeque<Delivery>,
    recent: RecentIds,
    stats: ReaderStats,
    /// Something was committed since the last save.
    dirty: bool,
    listed_at: Instant,
    /// See [`StreamReader::is_behind`].
    behind: bool,
}

impl std::fmt::Debug for StreamReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamReader")
            .field("stream", &self.stream)
            .field("shards", &self.shards)
            .field("queued", &self.queue.len())
            .field("in_flight", &self.in_flight.len())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl StreamReader {
    /// Chunk ids remembered to drop duplicates, unless changed with
    /// [`StreamReaderBuilder::dedup_window`]: 10 000.
    pub const DEFAULT_DEDUP_WINDOW: usize = 10_000;

    /// A reader of `stream` (a name or an ARN) with default settings, to adjust before
    /// [`open`](StreamReaderBuilder::open).
    pub fn builder(
        kinesis: aws_sdk_kinesis::Client,
        resolver: Resolver,
        stream: impl Into<String>,
    ) -> StreamReaderBuilder {
        Self::builder_with(Arc::new(kinesis::Aws(kinesis)), resolver, stream.into())
    }

    /// [`StreamReader::builder`] reading shards from `kinesis` instead of Kinesis: an
    /// [`InMemoryStream`](crate::kinesis::InMemoryStream) to test a consumer offline.
    pub fn builder_with(
        kinesis: Arc<dyn ShardSource>,
        resolver: Resolver,
        stream: String,
    ) -> StreamReaderBuilder {
        StreamReaderBuilder {
            kinesis,
            resolver,
            stream,
            start: StartPosition::TrimHorizon,
            store: None,
            concurrency: 4,
            dedup_window: Self::DEFAULT_DEDUP_WINDOW,
            shard_refresh: Duration::from_secs(10),
            records_per_read: 1000,
            filter: None,
            end_when_caught_up: false,
        }
    }

    /// Opens a reader with default settings at `start`, without checkpoints.
    pub async fn open(
        kinesis: aws_sdk_kinesis::Client,
        resolver: Resolver,
        stream: impl Into<String>,
        start: StartPosition,
    ) -> Result<Self, Error> {
        Self::builder(kinesis, resolver, stream)
            .start(start)
            .open()
            .await
    }

    /// The next pointer record, in per-shard order; `Ok(None)` when the stream has nothing new
    /// right now, or Kinesis throttled the read ([`StreamReader::is_behind`]): call again
    /// later. Empty pages behind a shard's tip and expired iterators are read past at once.
    ///
    /// Saves the checkpoint first when something was committed and Kinesis is about to be read.
    /// The error is a failure to read Kinesis or to save the checkpoint; problems with one
    /// pointer come inside the [`Delivery`]. After an error, calling again goes on where the
    /// reader stands, with nothing read lost; so does a call after one that was dropped
    /// unfinished (in a `select!` or a timeout).
    pub async fn next(&mut self) -> Result<Option<Delivery>, Error> {
        loop {
            self.schedule();
            if let Some(delivery) = self.in_flight.pop_front() {
                self.schedule();
                self.stats.delivered += 1;
                return Ok(Some(delivery));
            }
            if !self.read_round().await? {
                return Ok(None);
            }
        }
    }

    /// Whether the last read of Kinesis found a shard with more to read than it gave: Kinesis
    /// throttled the read, or gave an empty page behind the shard's tip. [`StreamReader::next`]
    /// reads again at once after such a page, but returns `Ok(None)` after a throttled read
    /// (call again later): a caller that stops once the stream is idle should not count that
    /// time as idle.
    pub fn is_behind(&self) -> bool {
        self.behind
    }

    /// Marks a delivery as processed. Its position goes into the next checkpoint once every
    /// earlier record of its shard is processed too.
    pub fn commit(&mut self, position: &Position) {
        let Some(shard) = self.shards.iter_mut().find(|s| s.id == position.shard_id) else {
            tracing::warn!(%position, "commit of a position this reader did not hand out");
            return;
        };
        match shard
            .pending
            .iter_mut()
            .find(|p| p.sequence_number == position.sequence_number)
        {
            Some(p) => p.done = true,
            None => {
                tracing::warn!(%position, "commit of a position that is not pending");
                return;
            }
        }
        shard.advance();
        self.dirty = true;
    }

    /// Saves the checkpoint now, if there is a store and anything changed.
    pub async fn checkpoint(&mut self) -> Result<(), Error> {
        let Some(store) = &self.store else {
            return Ok(());
        };
        if !self.dirty {
            return Ok(());
        }
        store.save_boxed(&self.snapshot()).await?;
        self.dirty = false;
        Ok(())
    }

    /// Counts of deliveries and dropped pointers so far.
    pub fn stats(&self) -> ReaderStats {
        self.stats
    }

    /// Ids of the shards known to the reader and whether each was read to its end.
    pub fn shards(&self) -> Vec<(String, bool)> {
        self.shards
            .iter()
            .map(|s| (s.id.clone(), s.ended))
            .collect()
    }

    /// The checkpoint as it stands.
    fn snapshot(&self) -> Checkpoint {
        let mut positions = BTreeMap::new();
        let mut uncommitted = HashSet::new();
        for (i, shard) in self.shards.iter().enumerate() {
            uncommitted.extend(
                shard
                    .pending
                    .iter()
                    .filter(|p| !p.done)
                    .filter_map(|p| p.chunk),
            );
            let queued = self.queue.iter().any(|q| q.shard == i);
            if shard.ended && shard.pending.is_empty() && !queued {
                positions.insert(shard.id.clone(), ShardCheckpoint::Finished);
            } else if let Some(seq) = &shard.committed {
                positions.insert(shard.id.clone(), ShardCheckpoint::After(seq.clone()));
            }
        }
        // Restored positions of shards not reached yet stay as they were.
        for (id, at) in &self.restored {
            positions.entry(id.clone()).or_insert_with(|| at.clone());
        }
        // Only ids of processed chunks: a handed-out chunk that was not committed is read
        // again after a restart and must not be taken for a duplicate then.
        let ids = self
            .recent
            .iter()
            .filter(|id| !uncommitted.contains(id))
            .collect();
        Checkpoint::new(&self.stream, positions, ids, self.since)
    }

    /// Moves queued records into resolution, up to the concurrency, dropping duplicates and
    /// filtered pointers on the way.
    fn schedule(&mut self) {
        while self.in_flight.len() < self.concurrency {
            let Some(q) = self.queue.pop_front() else {
                return;
            };
            let shard = &mut self.shards[q.shard];
            let position = Position {
                shard_id: shard.id.clone(),
                sequence_number: q.sequence_number.clone(),
            };
            let mut pending = Pending {
                sequence_number: q.sequence_number,
                done: false,
                chunk: None,
            };
            match Pointer::from_record(&q.data) {
                Err(e) => self.in_flight.push_back(Delivery {
                    position,
                    chunk: Err(Some(e)),
                    failed: None,
                }),
                Ok(p) if self.filter.as_ref().is_some_and(|keep| !keep(&p)) => {
                    self.stats.filtered += 1;
                    pending.done = true;
                }
                Ok(p) => {
                    let key = chunk_key(&p.chunk_id);
                    if self.recent.contains(key) {
                        tracing::debug!(chunk_id = %p.chunk_id, %position, "duplicate pointer dropped");
                        self.stats.duplicates_dropped += 1;
                        pending.done = true;
                    } else {
                        self.recent.insert(key);
                        pending.chunk = Some(key);
                        self.in_flight.push_back(Delivery {
                            position,
                            chunk: Ok(self.resolver.stream(p)),
                            failed: None,
                        });
                    }
                }
            }
            let dropped = pending.done;
            shard.pending.push_back(pending);
            if dropped {
                shard.advance();
                self.dirty = true;
            }
        }
    }

    /// Saves the checkpoint if needed, then reads every shard that can be read once. True when
    /// records arrived or shards changed, so that reading again may give more.
    async fn read_round(&mut self) -> Result<bool, Error> {
        self.checkpoint().await?;
        let kinesis = self.kinesis.clone();
        let stream = self.stream.as_str();
        let limit = self.records_per_read;
        let end_when_caught_up = self.end_when_caught_up;
        let reads = self
            .shards
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.ended)
            .map(|(i, shard)| {
                let kinesis = &*kinesis;
                async move {
                    (
                        i,
                        read_shard(kinesis, stream, shard, limit, end_when_caught_up).await,
                    )
                }
            });
        // The reads change no shard: what they found is applied here, all of it, once every
        // read is back. So a read that fails does not lose the records the others read, and a
        // caller that drops this future (a `select!`, a timeout) loses no position either.
        let results = futures::future::join_all(reads).await;
        let mut progress = false;
        let mut ended = false;
        let mut failed = None;
        self.behind = false;
        for (i, result) in results {
            let shard = &mut self.shards[i];
            let read = match result {
                Ok(read) => read,
                Err(e) => {
                    // The next read takes a new iterator, after the last record read.
                    shard.iterator = None;
                    failed.get_or_insert(e);
                    continue;
                }
            };
            if let Some(last) = read.records.last() {
                shard.last_read = Some(last.sequence_number.clone());
            }
            shard.iterator = read.iterator;
            if read.ended {
                shard.ended = true;
                shard.iterator = None;
            }
            ended |= read.ended;
            progress |= !read.records.is_empty() || read.behind;
            self.behind |= read.behind || read.throttled;
            self.queue.extend(read.records.into_iter().map(|r| Queued {
                shard: i,
                sequence_number: r.sequence_number,
                data: r.data,
            }));
        }
        if let Some(e) = failed {
            self.dirty |= ended;
            return Err(e);
        }
        if ended || (!progress && self.listed_at.elapsed() >= self.shard_refresh) {
            // New shards, or a shard newly closed (which may end at the next read), are worth
            // reading again at once.
            progress |= self.discover_shards().await?;
        }
        // A shard that ended with nothing pending belongs in the checkpoint as finished.
        self.dirty |= ended;
        Ok(progress || ended)
    }

    /// Lists the stream's shards and adds those that can be read: each of their parents still
    /// in the stream has been read to its end. True when a shard was added or newly closed.
    async fn discover_shards(&mut self) -> Result<bool, Error> {
        let listed = self.kinesis.list_shards(&self.stream).await?;
        self.listed_at = Instant::now();
        let listed_ids: HashSet<&str> = listed.iter().map(|s| s.id.as_str()).collect();
        // Checkpointed shards that left the stream (past its retention) are forgotten.
        self.restored
            .retain(|id, _| listed_ids.contains(id.as_str()));
        let initial = self
            .initial
            .get_or_insert_with(|| listed_ids.iter().map(|s| s.to_string()).collect())
            .clone();
        let mut changed = false;
        for s in &listed {
            if let Some(known) = self.shards.iter_mut().find(|k| k.id == s.id) {
                changed |= s.closed && !known.closed && !known.ended;
                known.closed = s.closed;
            }
        }
        // Adding a shard restored as finished can make its children ready: repeat until stable.
        loop {
            let mut added = false;
            for s in &listed {
                if self.shards.iter().any(|k| k.id == s.id) {
                    continue;
                }
                let ready = s.parents.iter().all(|p| {
                    !listed_ids.contains(p.as_str())
                        || self.shards.iter().any(|k| &k.id == p && k.ended)
                });
                if !ready {
                    continue;
                }
                let restored = self.restored.remove(&s.id);
                let mut shard = Shard {
                    id: s.id.clone(),
                    closed: s.closed,
                    start: IteratorStart::TrimHorizon,
                    iterator: None,
                    last_read: None,
                    ended: false,
                    pending: VecDeque::new(),
                    committed: None,
                };
                match restored {
                    Some(ShardCheckpoint::Finished) => shard.ended = true,
                    Some(ShardCheckpoint::After(seq)) => {
                        shard.start = IteratorStart::AfterSequence(seq.clone());
                        shard.committed = Some(seq);
                    }
                    // Resumed, a shard the checkpoint does not name is new since (a child of a
                    // reshard while the reader was away), or nothing of it was committed:
                    // read from where the first run started (the checkpoint's chunk ids drop
                    // what was processed).
                    None if self.resumed => {
                        if let Some(t) = self.since {
                            shard.start = IteratorStart::AtTimestamp(t);
                        }
                    }
                    // A shard listed at open, the child of one listed too (split before or
                    // after the start) included: what arrived from the start on.
                    None if initial.contains(&s.id) => {
                        shard.start = match self.start {
                            StartPosition::TrimHorizon => IteratorStart::TrimHorizon,
                            StartPosition::Latest => IteratorStart::Latest,
                            StartPosition::AtTimestamp(t) => IteratorStart::AtTimestamp(t),
                        }
                    }
                    None => {}
                }
                tracing::debug!(shard_id = %shard.id, start = ?shard.start, ended = shard.ended, "reading shard");
                self.shards.push(shard);
                added = true;
            }
            if !added {
                return Ok(changed);
            }
            changed = true;
        }
    }
}

/// What one read of a shard found, for [`StreamReader::read_round`] to apply.
struct ShardRead {
    records: Vec<kinesis::Record>,
    /// The iterator to read on with; `None` to take a new one after the last record read.
    iterator: Option<String>,
    /// The shard was read to its end.
    ended: bool,
    /// Nothing was read, but the shard has more: an empty page behind its tip (Kinesis gives
    /// those on sparse stretches) or an expired iterator; read again at once.
    behind: bool,
    /// Kinesis throttled the read: read again later.
    throttled: bool,
}

/// Reads one page of a shard, changing nothing (a shard iterator may be used again).
async fn read_shard(
    kinesis: &dyn ShardSource,
    stream: &str,
    shard: &Shard,
    limit: i32,
    end_when_caught_up: bool,
) -> Result<ShardRead, Error> {
    let nothing = |iterator, ended| ShardRead {
        records: Vec::new(),
        iterator,
        ended,
        behind: false,
        throttled: false,
    };
    let iterator = match &shard.iterator {
        Some(it) => it.clone(),
        None => {
            let start = match &shard.last_read {
                Some(seq) => IteratorStart::AfterSequence(seq.clone()),
                None => shard.start.clone(),
            };
            match kinesis.iterator(stream, &shard.id, &start).await? {
                Some(it) => it,
                None => return Ok(nothing(None, true)),
            }
        }
    };
    Ok(match kinesis.records(stream, &iterator, limit).await? {
        Read::Page {
            records,
            next,
            caught_up,
        } => {
            let ended = next.is_none()
                || (end_when_caught_up && shard.closed && records.is_empty() && caught_up);
            ShardRead {
                behind: records.is_empty() && !caught_up && !ended,
                throttled: false,
                records,
                iterator: next,
                ended,
            }
        }
        Read::Expired => ShardRead {
            behind: true,
            ..nothing(None, false)
        },
        Read::Throttled => ShardRead {
            throttled: true,
            ..nothing(Some(iterator), false)
        },
    })
}

#[cfg(test)]
mod tests;
