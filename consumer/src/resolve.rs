//! Pointer → S3 object → verified events, streamed with bounded memory.
//!
//! [`Resolver::stream`] starts a task that reads the object, decompresses and decodes it on a
//! blocking thread ([`crate::decode`]) and passes events through a small bounded channel to an
//! [`EventStream`]. What the crate holds per stream is the splitter's block, one entry, a few
//! batches of events and — for objects up to [`Resolver::in_memory_object_bytes`] only — the
//! stored (compressed) object itself.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use futures::Stream;
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::decode::{self, Gauge, Outcome, Sink};
use crate::source::{Object, ObjectSource, S3};
use crate::{entry, Error, Event, Pointer};

/// When a chunk's events may be handed out relative to the checks of its object.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Verification {
    /// No event is handed out before the whole object was checked: stored size, CRC32C,
    /// decompressed size and event count. Objects up to
    /// [`Resolver::in_memory_object_bytes`] are read once and kept (compressed) in memory for
    /// the check; larger objects are read twice, the second time pinned to the ETag of the
    /// first (`If-Match`), so memory stays bounded. An object replaced in between (a retried
    /// upload of the same bytes gets a new ETag under SSE-KMS) is checked again from the start,
    /// twice at most, before [`Error::ObjectChanged`].
    #[default]
    BeforeEvents,
    /// Events are handed out as they are decoded, from a single read; the checks run at the
    /// end and a failure is the stream's last item. A caller that opts in must be ready to
    /// discard what it got from a stream that ends in an error.
    AtEnd,
}

/// Memory and requests of one [`EventStream`], from the crate's own accounting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ResolveStats {
    /// Most bytes held at once on this stream's behalf: a spooled object, the decoder's read
    /// block and pending entry, and decoded events not yet handed out. The decompressor's own
    /// window comes on top (zstd: 2 MiB at the sidecar's default level 3, at most 128 MiB at
    /// level 22; gzip: 32 KiB).
    pub peak_buffered_bytes: u64,
    /// GetObject requests made: 1, or 2 for a large object verified before its events.
    pub object_reads: u64,
}

/// A chunk whose body was fetched, verified and decoded.
#[derive(Debug, Clone)]
pub struct ResolvedChunk {
    pub pointer: Pointer,
    pub events: Vec<Event>,
}

/// Fetches and verifies the objects pointers name.
///
/// Cheap to clone (one S3 client, a few settings). Needs a Tokio runtime.
///
/// ```no_run
/// # async fn run(pointer: claimcheck_consumer::Pointer) -> Result<(), claimcheck_consumer::Error> {
/// use claimcheck_consumer::Resolver;
///
/// let config = aws_config::load_from_env().await;
/// let resolver = Resolver::new(aws_sdk_s3::Client::new(&config));
///
/// // All events at once…
/// let chunk = resolver.resolve(&pointer).await?;
/// println!("{} events of {}", chunk.events.len(), chunk.pointer.tag);
///
/// // …or streamed, holding only a few batches whatever the body's size.
/// let mut events = resolver.stream(pointer);
/// while let Some(event) = events.next().await {
///     let event = event?;
///     println!("{} {}", event.time(), event.record_json());
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Resolver {
    source: Arc<dyn ObjectSource>,
    options: Options,
}

#[derive(Debug, Clone, Copy)]
struct Options {
    max_body_bytes: u64,
    in_memory_object_bytes: u64,
    verification: Verification,
}

/// Events handed from the decoding thread at a time, at most.
const BATCH_EVENTS: usize = 256;
/// Entry bytes per batch, at most (one larger entry makes a batch of its own).
const BATCH_BYTES: usize = 64 * 1024;
/// Batches waiting in the channel, at most.
const QUEUED_BATCHES: usize = 2;

impl Resolver {
    /// Bodies larger than this (decompressed) are refused unless raised with
    /// [`Resolver::max_body_bytes`]: 4 GiB.
    pub const DEFAULT_MAX_BODY_BYTES: u64 = 4 << 30;
    /// Objects up to this size are read once and kept in memory while they are verified:
    /// 16 MiB.
    pub const DEFAULT_IN_MEMORY_OBJECT_BYTES: u64 = 16 << 20;

    /// A resolver reading objects with `s3`.
    pub fn new(s3: aws_sdk_s3::Client) -> Self {
        Resolver::from_source(Arc::new(S3(s3)))
    }

    /// A resolver that reads objects from `source` instead of S3: an [`InMemoryBucket`] to test
    /// a consumer offline, or another store.
    ///
    /// [`InMemoryBucket`]: crate::source::InMemoryBucket
    pub fn from_source(source: Arc<dyn ObjectSource>) -> Self {
        Resolver {
            source,
            options: Options {
                max_body_bytes: Self::DEFAULT_MAX_BODY_BYTES,
                in_memory_object_bytes: Self::DEFAULT_IN_MEMORY_OBJECT_BYTES,
                verification: Verification::default(),
            },
        }
    }

    /// Refuses pointers whose decompressed body is larger than `limit`
    /// ([`Error::BodyTooLarge`]), before reading anything.
    pub fn max_body_bytes(mut self, limit: u64) -> Self {
        self.options.max_body_bytes = limit;
        self
    }

    /// With [`Verification::BeforeEvents`], objects up to `limit` stored bytes are read once
    /// and held in memory while checked; larger ones are read twice. 0 always reads twice.
    pub fn in_memory_object_bytes(mut self, limit: u64) -> Self {
        self.options.in_memory_object_bytes = limit;
        self
    }

    /// When events may be handed out; [`Verification::BeforeEvents`] unless changed.
    pub fn verification(mut self, verification: Verification) -> Self {
        self.options.verification = verification;
        self
    }

    /// Starts resolving `pointer`; the events arrive through the returned stream.
    ///
    /// The work starts at once, in the background, and pauses when the stream's small buffer
    /// is full; dropping the stream stops it.
    pub fn stream(&self, pointer: Pointer) -> EventStream {
        let (tx, rx) = mpsc::channel(QUEUED_BATCHES);
        let gauge = Arc::new(Gauge::default());
        let task = tokio::spawn(produce(
            self.source.clone(),
            pointer.clone(),
            self.options,
            gauge.clone(),
            tx,
        ));
        EventStream {
            pointer,
            rx,
            ready: VecDeque::new(),
            gauge,
            done: false,
            task,
        }
    }

    /// Resolves `pointer` into all of its events, verified.
    pub async fn resolve(&self, pointer: &Pointer) -> Result<ResolvedChunk, Error> {
        self.stream(pointer.clone()).collect().await
    }
}

enum Message {
    Events(Vec<Event>),
    /// The last message: `Ok` when every check passed.
    End(Result<(), Error>),
}

async fn produce(
    source: Arc<dyn ObjectSource>,
    pointer: Pointer,
    options: Options,
    gauge: Arc<Gauge>,
    tx: mpsc::Sender<Message>,
) {
    let result = run(&*source, Arc::new(pointer), options, gauge, tx.clone()).await;
    let _ = tx.send(Message::End(result)).await;
}

async fn run(
    source: &dyn ObjectSource,
    p: Arc<Pointer>,
    options: Options,
    gauge: Arc<Gauge>,
    tx: mpsc::Sender<Message>,
) -> Result<(), Error> {
    if p.bytes > options.max_body_bytes {
        return Err(Error::BodyTooLarge {
            bytes: p.bytes,
            limit: options.max_body_bytes,
        });
    }
    if let Some(body) = p.inline.clone() {
        // The body came with the record: nothing to fetch, and it is already in memory.
        return blocking(p, gauge, tx, move |p, gauge, sink| {
            match options.verification {
                Verification::BeforeEvents => {
                    match decode::decode_object(p, &body[..], gauge, &mut Unless(&*sink))? {
                        Outcome::Verified => decode::decode_object(p, &body[..], gauge, sink),
                        Outcome::Stopped => Ok(Outcome::Stopped),
                    }
                }
                Verification::AtEnd => decode::decode_object(p, &body[..], gauge, sink),
            }
        })
        .await
        .map(drop);
    }
    let object = get(source, &p, None, &gauge).await?;
    match options.verification {
        Verification::BeforeEvents if p.stored_bytes <= options.in_memory_object_bytes => {
            let stored = Spool::read(object, &p, gauge.clone()).await?;
            blocking(
                p,
                gauge,
                tx,
                move |p, gauge, sink| match decode::decode_object(
                    p,
                    &stored.bytes[..],
                    gauge,
                    &mut Unless(&*sink),
                )? {
                    Outcome::Verified => decode::decode_object(p, &stored.bytes[..], gauge, sink),
                    Outcome::Stopped => Ok(Outcome::Stopped),
                },
            )
            .await
            .map(drop)
        }
        Verification::BeforeEvents => {
            let mut object = object;
            let mut changes = 0;
            // The object read and checked, then read again only if it is still that one.
            let object = loop {
                let etag = object.etag.clone();
                let first = tokio_util::io::SyncIoBridge::new(object.body);
                let checked = blocking(
                    p.clone(),
                    gauge.clone(),
                    tx.clone(),
                    move |p, gauge, sink| {
                        decode::decode_object(p, first, gauge, &mut Unless(&*sink))
                    },
                )
                .await?;
                if checked == Outcome::Stopped {
                    return Ok(());
                }
                match get(source, &p, etag.as_deref(), &gauge).await {
                    // Replaced in between, before any event went out: a retried upload of the
                    // same bytes has a new ETag under SSE-KMS. Checked again from the start.
                    Err(Error::ObjectChanged { .. }) if changes < MAX_OBJECT_CHANGES => {
                        changes += 1;
                        object = get(source, &p, None, &gauge).await?;
                    }
                    second => break second?,
                }
            };
            let second = tokio_util::io::SyncIoBridge::new(object.body);
            blocking(p, gauge, tx, move |p, gauge, sink| {
                decode::decode_object(p, second, gauge, sink)
            })
            .await
            .map(drop)
        }
        Verification::AtEnd => {
            let body = tokio_util::io::SyncIoBridge::new(object.body);
            blocking(p, gauge, tx, move |p, gauge, sink| {
                decode::decode_object(p, body, gauge, sink)
            })
            .await
            .map(drop)
        }
    }
}

/// How many times an object replaced between its two reads is read again from the start
/// before [`Error::ObjectChanged`].
const MAX_OBJECT_CHANGES: u32 = 2;

/// Starts a read and checks the object's size, when S3 says it, before anything is read.
async fn get(
    source: &dyn ObjectSource,
    p: &Pointer,
    if_match: Option<&str>,
    gauge: &Gauge,
) -> Result<Object, Error> {
    let object = source.get(&p.bucket, &p.key, if_match).await?;
    gauge.object_read();
    match object.length {
        Some(len) if len != p.stored_bytes => Err(Error::SizeMismatch {
            what: "stored object bytes",
            expected: p.stored_bytes,
            actual: len,
        }),
        _ => Ok(object),
    }
}

/// Runs a decoding pass on a blocking thread, sending events to `tx`.
async fn blocking<F>(
    p: Arc<Pointer>,
    gauge: Arc<Gauge>,
    tx: mpsc::Sender<Message>,
    pass: F,
) -> Result<Outcome, Error>
where
    F: FnOnce(&Pointer, &Gauge, &mut Batches) -> Result<Outcome, Error> + Send + 'static,
{
    let task = tokio::task::spawn_blocking(move || {
        let mut sink = Batches {
            tx,
            batch: Vec::new(),
            bytes: 0,
            gauge: gauge.clone(),
        };
        let outcome = pass(&p, &gauge, &mut sink);
        if !matches!(outcome, Ok(Outcome::Stopped)) {
            sink.flush();
        }
        outcome
    });
    match task.await {
        Ok(outcome) => outcome,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// The stored object held in memory, reported to the gauge while it lives.
struct Spool {
    bytes: Vec<u8>,
    gauge: Arc<Gauge>,
}

impl Spool {
    async fn read(object: Object, p: &Pointer, gauge: Arc<Gauge>) -> Result<Spool, Error> {
        // One byte more than expected shows an object that is too long.
        let capacity = p.stored_bytes as usize + 1;
        gauge.add(capacity);
        let mut spool = Spool {
            bytes: Vec::with_capacity(capacity),
            gauge,
        };
        object
            .body
            .take(p.stored_bytes + 1)
            .read_to_end(&mut spool.bytes)
            .await
            .map_err(|e| Error::S3 {
                operation: "GetObject body",
                source: Box::new(e),
            })?;
        Ok(spool)
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        self.gauge.sub(self.bytes.capacity());
    }
}

/// Sends events in batches; stops when the stream is gone.
struct Batches {
    tx: mpsc::Sender<Message>,
    batch: Vec<Event>,
    bytes: usize,
    gauge: Arc<Gauge>,
}

impl Batches {
    fn flush(&mut self) -> bool {
        if self.batch.is_empty() {
            return true;
        }
        self.bytes = 0;
        let batch = std::mem::take(&mut self.batch);
        self.tx.blocking_send(Message::Events(batch)).is_ok()
    }
}

impl Sink for Batches {
    fn event(&mut self, event: Event) -> bool {
        let len = event.entry_msgpack().len();
        self.gauge.add(len);
        self.bytes += len;
        self.batch.push(event);
        if self.batch.len() >= BATCH_EVENTS || self.bytes >= BATCH_BYTES {
            return self.flush();
        }
        true
    }
}

/// The verification pass: drops events, and stops once nobody is listening any more.
struct Unless<'a>(&'a Batches);

impl Sink for Unless<'_> {
    fn event(&mut self, _: Event) -> bool {
        !self.0.tx.is_closed()
    }

    fn block(&mut self, _: &Arc<str>, _: Bytes, _: &[entry::EntryInfo]) -> bool {
        !self.0.tx.is_closed()
    }
}

/// The events of one chunk, as they are decoded. See [`Resolver::stream`].
///
/// Also a [`futures::Stream`] of `Result<Event, Error>`. After an error item the stream ends;
/// with [`Verification::BeforeEvents`] (the default) an error about the object comes before
/// any event.
#[derive(Debug)]
pub struct EventStream {
    pointer: Pointer,
    rx: mpsc::Receiver<Message>,
    ready: VecDeque<Event>,
    gauge: Arc<Gauge>,
    done: bool,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Message::Events(batch) => write!(f, "Events({})", batch.len()),
            Message::End(result) => write!(f, "End({result:?})"),
        }
    }
}

impl EventStream {
    /// The pointer being resolved.
    pub fn pointer(&self) -> &Pointer {
        &self.pointer
    }

    /// The next event; `None` after the last one (all checks passed) or after an error.
    pub async fn next(&mut self) -> Option<Result<Event, Error>> {
        futures::StreamExt::next(self).await
    }

    /// The next events that are ready (at least one); `None` as for [`EventStream::next`].
    pub async fn next_batch(&mut self) -> Option<Result<Vec<Event>, Error>> {
        let first = match self.next().await? {
            Ok(event) => event,
            Err(e) => return Some(Err(e)),
        };
        let mut batch = Vec::with_capacity(self.ready.len() + 1);
        batch.push(first);
        while let Some(event) = self.ready.pop_front() {
            self.gauge.sub(event.entry_msgpack().len());
            batch.push(event);
        }
        Some(Ok(batch))
    }

    /// All remaining events.
    pub async fn collect(mut self) -> Result<ResolvedChunk, Error> {
        let mut events = Vec::new();
        while let Some(batch) = self.next_batch().await {
            events.extend(batch?);
        }
        Ok(ResolvedChunk {
            pointer: self.pointer.clone(),
            events,
        })
    }

    /// Memory and requests so far.
    pub fn stats(&self) -> ResolveStats {
        ResolveStats {
            peak_buffered_bytes: self.gauge.peak(),
            object_reads: self.gauge.object_reads(),
        }
    }
}

impl Stream for EventStream {
    type Item = Result<Event, Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(event) = this.ready.pop_front() {
                this.gauge.sub(event.entry_msgpack().len());
                return Poll::Ready(Some(Ok(event)));
            }
            if this.done {
                return Poll::Ready(None);
            }
            match ready!(this.rx.poll_recv(cx)) {
                Some(Message::Events(batch)) => this.ready.extend(batch),
                Some(Message::End(Ok(()))) => this.done = true,
                Some(Message::End(Err(e))) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(e)));
                }
                None => {
                    // The task ended without its last message: it panicked.
                    let joined = ready!(Pin::new(&mut this.task).poll(cx));
                    this.done = true;
                    if let Err(e) = joined {
                        if e.is_panic() {
                            std::panic::resume_unwind(e.into_panic());
                        }
                    }
                    return Poll::Ready(Some(Err(Error::Io(std::io::Error::other(
                        "the resolving task stopped before the end of the object",
                    )))));
                }
            }
        }
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::body::{Compression, Format};
    use crate::decode::tests::{body, stored};
    use crate::source::InMemoryBucket as Bucket;

    fn setup(compression: Compression) -> (Arc<Bucket>, Pointer, Vec<Event>) {
        let (msgpack, events) = body();
        let (p, bytes) = stored(Format::Msgpack, compression, &msgpack, 5);
        let bucket = Arc::new(Bucket::default());
        bucket.put(&p.key, bytes);
        (bucket, p, events)
    }

    #[tokio::test]
    async fn small_objects_are_read_once_large_ones_twice_pinned_to_their_etag() {
        let (bucket, p, events) = setup(Compression::Zstd);
        let resolver = Resolver::from_source(bucket.clone());
        let mut stream = resolver.stream(p.clone());
        let mut got = Vec::new();
        while let Some(e) = stream.next().await {
            got.push(e.unwrap());
        }
        assert_eq!(got, events);
        assert_eq!(stream.stats().object_reads, 1);

        let resolver = resolver.in_memory_object_bytes(0);
        let stream = resolver.stream(p.clone());
        let stats_later = stream.collect().await.unwrap();
        assert_eq!(stats_later.events, events);
        let reads = bucket.reads.lock().unwrap().clone();
        assert_eq!(reads.len(), 3);
        assert_eq!(reads[1], (p.key.clone(), None));
        assert_eq!(reads[2], (p.key.clone(), Some("\"1\"".to_string())));
    }

    /// The same chunk as an inline pointer: its stored bytes in the record, no object.
    fn inlined(p: &Pointer, bytes: Vec<u8>) -> Pointer {
        p.clone().into_inline(bytes.into())
    }

    #[tokio::test]
    async fn an_inline_pointer_is_resolved_without_reading_s3() {
        let (msgpack, events) = body();
        for compression in [Compression::Zstd, Compression::Gzip, Compression::None] {
            let (p, bytes) = stored(Format::Msgpack, compression, &msgpack, 5);
            let p = Pointer::from_record(&inlined(&p, bytes).to_record()).unwrap();
            let bucket = Arc::new(Bucket::default());
            let resolver = Resolver::from_source(bucket.clone());
            for verification in [Verification::BeforeEvents, Verification::AtEnd] {
                let resolver = resolver.clone().verification(verification);
                let mut stream = resolver.stream(p.clone());
                let mut got = Vec::new();
                while let Some(e) = stream.next().await {
                    got.push(e.unwrap());
                }
                assert_eq!(got, events);
                assert_eq!(stream.stats().object_reads, 0);
            }
            assert!(bucket.reads.lock().unwrap().is_empty());
        }
    }

    #[tokio::test]
    async fn a_damaged_inline_body_yields_no_event() {
        let (msgpack, _) = body();
        let (p, mut bytes) = stored(Format::Msgpack, Compression::Zstd, &msgpack, 5);
        let last = bytes.len() - 1;
        bytes[last] ^= 0x01;
        let p = inlined(&p, bytes);
        let resolver = Resolver::from_source(Arc::new(Bucket::default()));
        let mut stream = resolver.stream(p);
        let first = stream.next().await.expect("an error, not the end");
        assert!(
            matches!(first, Err(Error::ChecksumMismatch { .. })),
            "{first:?}"
        );
        assert!(stream.next().await.is_none());
    }

    #[tokio::test]
    async fn a_damaged_object_yields_no_event_unless_the_caller_opted_in() {
        let (bucket, p, _) = setup(Compression::None);
        let mut damaged = stored(Format::Msgpack, Compression::None, &body().0, 5).1;
        let last = damaged.len() - 1;
        damaged[last] ^= 0x01;
        bucket.put(&p.key, damaged);
        for in_memory in [Resolver::DEFAULT_IN_MEMORY_OBJECT_BYTES, 0] {
            let resolver = Resolver::from_source(bucket.clone()).in_memory_object_bytes(in_memory);
            let mut stream = resolver.stream(p.clone());
            let first = stream.next().await.unwrap();
            assert!(
                matches!(first, Err(Error::ChecksumMismatch { .. })),
                "{first:?}"
            );
            assert!(stream.next().await.is_none());
        }

        let resolver = Resolver::from_source(bucket.clone()).verification(Verification::AtEnd);
        let mut stream = resolver.stream(p.clone());
        let mut events = 0;
        let last = loop {
            match stream.next().await {
                Some(Ok(_)) => events += 1,
                Some(Err(e)) => break e,
                None => panic!("a damaged object must end in an error"),
            }
        };
        assert_eq!(events, 5, "opted in: the events came first");
        assert!(matches!(last, Error::ChecksumMismatch { .. }), "{last}");
    }

    #[tokio::test]
    async fn missing_replaced_oversized_and_wrongly_sized_objects() {
        let (bucket, p, _) = setup(Compression::Gzip);
        let resolver = Resolver::from_source(bucket.clone());

        let mut other = p.clone();
        other.key = "gone".into();
        let err = resolver.resolve(&other).await.unwrap_err();
        assert!(matches!(err, Error::ObjectMissing { .. }), "{err}");
        assert!(err.is_chunk_error());

        // Uploaded again between the two reads, the same bytes under a new ETag (as a retried
        // upload is under SSE-KMS): read again from the start, not an error.
        let same = bucket.take(&p.key).unwrap();
        bucket.put(&p.key, same.clone());
        *bucket.replace_after_read.lock().unwrap() = Some((p.key.clone(), same));
        bucket.reads.lock().unwrap().clear();
        // Objects above this are read twice.
        let read_twice = resolver.clone().in_memory_object_bytes(0);
        let chunk = read_twice.resolve(&p).await.unwrap();
        assert_eq!(chunk.events.len() as u64, p.records);
        let gets = bucket.reads.lock().unwrap().len();
        assert_eq!(
            gets, 4,
            "read, changed, read from the start again and twice"
        );

        // Replaced by other bytes: read again, and found wrong.
        *bucket.replace_after_read.lock().unwrap() = Some((p.key.clone(), b"new".to_vec()));
        let err = read_twice.resolve(&p).await.unwrap_err();
        assert!(matches!(err, Error::SizeMismatch { .. }), "{err}");

        let err = resolver
            .clone()
            .max_body_bytes(10)
            .resolve(&p)
            .await
            .unwrap_err();
        assert!(
            matches!(err, Error::BodyTooLarge { limit: 10, .. }),
            "{err}"
        );
        assert!(!err.is_chunk_error(), "a higher limit reads it");

        // The object is now b"new": its size is wrong before a byte is read.
        let err = resolver.resolve(&p).await.unwrap_err();
        assert!(
            matches!(
                err,
                Error::SizeMismatch {
                    what: "stored object bytes",
                    actual: 3,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[tokio::test]
    async fn decoding_runs_only_a_few_batches_ahead_of_the_caller() {
        let mut msgpack = Vec::new();
        for i in 0..20_000u32 {
            let entry = rmpv::Value::Array(vec![
                i.into(),
                rmpv::Value::Map(vec![("i".into(), i.into())]),
            ]);
            rmpv::encode::write_value(&mut msgpack, &entry).unwrap();
        }
        let (p, bytes) = stored(Format::Msgpack, Compression::Zstd, &msgpack, 20_000);
        let bucket = Arc::new(Bucket::default());
        bucket.put(&p.key, bytes);
        let resolver = Resolver::from_source(bucket.clone()).verification(Verification::AtEnd);
        let mut stream = resolver.stream(p.clone());
        assert!(stream.next().await.unwrap().is_ok());
        // Give the decoder every chance to run ahead.
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
        let stats = stream.stats();
        // Only a few batches were ever decoded ahead of the caller.
        assert!(
            stats.peak_buffered_bytes < 512 * 1024,
            "{}",
            stats.peak_buffered_bytes
        );
    }

    /// A pointer that says 100 bytes, over a small zstd object that decompresses to one
    /// 16 MiB entry: found out once 101 bytes are read, never the entry held.
    #[tokio::test]
    async fn a_body_larger_than_its_pointer_says_is_refused_early() {
        let mut msgpack = Vec::new();
        let entry = rmpv::Value::Array(vec![
            1.into(),
            rmpv::Value::Map(vec![("x".into(), "a".repeat(16 << 20).into())]),
        ]);
        rmpv::encode::write_value(&mut msgpack, &entry).unwrap();
        let (mut p, bytes) = stored(Format::Msgpack, Compression::Zstd, &msgpack, 1);
        assert!(bytes.len() < 64 * 1024);
        p.bytes = 100;
        let bucket = Arc::new(Bucket::default());
        bucket.put(&p.key, bytes);
        let resolver = Resolver::from_source(bucket.clone()).max_body_bytes(1 << 20);
        let mut stream = resolver.stream(p);
        let err = stream.next().await.unwrap().unwrap_err();
        assert!(
            matches!(
                err,
                Error::SizeMismatch {
                    what: "decompressed body bytes",
                    expected: 100,
                    ..
                }
            ),
            "{err}"
        );
        let peak = stream.stats().peak_buffered_bytes;
        assert!(peak < 1 << 20, "{peak} bytes held for a body of 100");
    }
}
