//! Kinesis behind a narrow trait, [`ShardSource`]: the three calls the stream reader makes, so
//! that its shard logic (resharding, positions, checkpoints) runs against [`InMemoryStream`],
//! which behaves like Kinesis (`StreamReader::builder_with`), as well as against Kinesis or an
//! emulator through the SDK.

use std::fmt::Debug;
use std::time::SystemTime;

use aws_sdk_kinesis::operation::get_records::GetRecordsError;
use aws_sdk_kinesis::types::ShardIteratorType;
use futures::future::BoxFuture;

use crate::Error;

/// A shard as ListShards describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardInfo {
    pub id: String,
    /// The parent and, after a merge, the adjacent parent.
    pub parents: Vec<String>,
    /// The shard has an ending sequence number: a reshard closed it.
    pub closed: bool,
}

/// Where a shard iterator starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IteratorStart {
    TrimHorizon,
    Latest,
    AtTimestamp(SystemTime),
    AfterSequence(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub sequence_number: String,
    pub data: Vec<u8>,
}

/// What one GetRecords call gave.
#[derive(Debug)]
pub enum Read {
    Page {
        records: Vec<Record>,
        /// `None`: the shard is closed and was read to its end.
        next: Option<String>,
        /// The page reaches the newest record in the shard (`MillisBehindLatest` is 0).
        caught_up: bool,
    },
    /// The iterator is older than five minutes: take a new one.
    Expired,
    /// The shard's read limit (5 calls, 2 MB per second) was hit: try again later.
    Throttled,
}

pub trait ShardSource: Debug + Send + Sync {
    fn list_shards<'a>(&'a self, stream: &'a str) -> BoxFuture<'a, Result<Vec<ShardInfo>, Error>>;

    /// `None` when the shard has nothing more to give from there (closed and read).
    fn iterator<'a>(
        &'a self,
        stream: &'a str,
        shard_id: &'a str,
        start: &'a IteratorStart,
    ) -> BoxFuture<'a, Result<Option<String>, Error>>;

    fn records<'a>(
        &'a self,
        stream: &'a str,
        iterator: &'a str,
        limit: i32,
    ) -> BoxFuture<'a, Result<Read, Error>>;
}

fn kinesis_err<E: std::error::Error + Send + Sync + 'static>(
    operation: &'static str,
) -> impl FnOnce(E) -> Error {
    move |e| Error::Kinesis {
        operation,
        source: Box::new(e),
    }
}

fn is_arn(stream: &str) -> bool {
    stream.starts_with("arn:")
}

/// Kinesis through the AWS SDK. The stream is a name or an ARN.
#[derive(Debug, Clone)]
pub(crate) struct Aws(pub aws_sdk_kinesis::Client);

impl ShardSource for Aws {
    fn list_shards<'a>(&'a self, stream: &'a str) -> BoxFuture<'a, Result<Vec<ShardInfo>, Error>> {
        Box::pin(async move {
            // https://docs.aws.amazon.com/kinesis/latest/APIReference/API_ListShards.html
            let mut listed = Vec::new();
            let mut token: Option<String> = None;
            loop {
                let req = self.0.list_shards();
                // NextToken excludes the stream name.
                let req = match (&token, is_arn(stream)) {
                    (Some(t), _) => req.next_token(t),
                    (None, true) => req.stream_arn(stream),
                    (None, false) => req.stream_name(stream),
                };
                let out = req.send().await.map_err(kinesis_err("ListShards"))?;
                for s in out.shards.unwrap_or_default() {
                    listed.push(ShardInfo {
                        closed: s
                            .sequence_number_range
                            .as_ref()
                            .is_some_and(|r| r.ending_sequence_number.is_some()),
                        parents: s
                            .parent_shard_id
                            .into_iter()
                            .chain(s.adjacent_parent_shard_id)
                            .collect(),
                        id: s.shard_id,
                    });
                }
                token = out.next_token;
                if token.is_none() {
                    return Ok(listed);
                }
            }
        })
    }

    fn iterator<'a>(
        &'a self,
        stream: &'a str,
        shard_id: &'a str,
        start: &'a IteratorStart,
    ) -> BoxFuture<'a, Result<Option<String>, Error>> {
        Box::pin(async move {
            // https://docs.aws.amazon.com/kinesis/latest/APIReference/API_GetShardIterator.html
            let req = self.0.get_shard_iterator().shard_id(shard_id);
            let req = if is_arn(stream) {
                req.stream_arn(stream)
            } else {
                req.stream_name(stream)
            };
            let req = match start {
                IteratorStart::TrimHorizon => {
                    req.shard_iterator_type(ShardIteratorType::TrimHorizon)
                }
                IteratorStart::Latest => req.shard_iterator_type(ShardIteratorType::Latest),
                IteratorStart::AtTimestamp(t) => req
                    .shard_iterator_type(ShardIteratorType::AtTimestamp)
                    .timestamp(aws_smithy_types::DateTime::from(*t)),
                IteratorStart::AfterSequence(seq) => req
                    .shard_iterator_type(ShardIteratorType::AfterSequenceNumber)
                    .starting_sequence_number(seq),
            };
            let out = req.send().await.map_err(kinesis_err("GetShardIterator"))?;
            Ok(out.shard_iterator)
        })
    }

    fn records<'a>(
        &'a self,
        stream: &'a str,
        iterator: &'a str,
        limit: i32,
    ) -> BoxFuture<'a, Result<Read, Error>> {
        Box::pin(async move {
            // https://docs.aws.amazon.com/kinesis/latest/APIReference/API_GetRecords.html
            let req = self.0.get_records().shard_iterator(iterator).limit(limit);
            let req = if is_arn(stream) {
                req.stream_arn(stream)
            } else {
                req
            };
            let out = match req.send().await {
                Ok(out) => out,
                Err(e) => {
                    return match e.as_service_error() {
                        Some(GetRecordsError::ExpiredIteratorException(_)) => Ok(Read::Expired),
                        Some(GetRecordsError::ProvisionedThroughputExceededException(_)) => {
                            Ok(Read::Throttled)
                        }
                        _ => Err(kinesis_err("GetRecords")(e)),
                    }
                }
            };
            Ok(Read::Page {
                caught_up: out.millis_behind_latest == Some(0),
                records: out
                    .records
                    .into_iter()
                    .map(|r| Record {
                        sequence_number: r.sequence_number,
                        data: r.data.into_inner(),
                    })
                    .collect(),
                next: out.next_shard_iterator,
            })
        })
    }
}

mod in_memory {

    use std::sync::Mutex;

    use super::*;

    #[derive(Debug)]
    struct Shard {
        info: ShardInfo,
        range: (u128, u128),
        records: Vec<Record>,
        /// When each record arrived, for `AT_TIMESTAMP`.
        arrivals: Vec<std::time::SystemTime>,
    }

    /// A stream in memory that behaves like Kinesis where the emulator does not: writes go to
    /// the open shard owning the hash key, a closed shard keeps its records and ends with a null
    /// `NextShardIterator`, children start empty. For testing consumers offline.
    #[derive(Debug, Default)]
    pub struct InMemoryStream {
        shards: Mutex<Vec<Shard>>,
        next_sequence: Mutex<u64>,
        /// GetRecords calls made, per shard id.
        pub(crate) reads: Mutex<Vec<String>>,
        /// What the next GetRecords calls give instead of records, one each, in order.
        next_reads: Mutex<std::collections::VecDeque<NextRead>>,
        /// Closed shards never end with a null iterator, as in moto.
        never_null: std::sync::atomic::AtomicBool,
    }

    /// What a GetRecords call gives instead of records ([`InMemoryStream::expire_next_read`]
    /// and the like).
    #[derive(Debug, Clone, Copy)]
    enum NextRead {
        Expired,
        Throttled,
        /// An empty page, at the shard's tip (`MillisBehindLatest` 0) or behind it.
        Empty {
            caught_up: bool,
        },
    }

    impl InMemoryStream {
        /// A stream of `n` open shards splitting the hash key space evenly.
        pub fn with_shards(n: u128) -> Self {
            let stream = InMemoryStream::default();
            let step = u128::MAX / n;
            for i in 0..n {
                let end = if i == n - 1 {
                    u128::MAX
                } else {
                    (i + 1) * step - 1
                };
                stream.add(Vec::new(), (i * step, end));
            }
            stream
        }

        fn add(&self, parents: Vec<String>, range: (u128, u128)) -> String {
            let mut shards = self.shards.lock().unwrap();
            let id = format!("shardId-{:012}", shards.len());
            shards.push(Shard {
                info: ShardInfo {
                    id: id.clone(),
                    parents,
                    closed: false,
                },
                range,
                records: Vec::new(),
                arrivals: Vec::new(),
            });
            id
        }

        /// Makes the next GetRecords call find its iterator expired, as Kinesis does after
        /// five minutes without a call.
        pub fn expire_next_read(&self) {
            self.next_read(NextRead::Expired);
        }

        /// Makes the next GetRecords call return an empty page with `MillisBehindLatest` 0 and
        /// an iterator at the same place, whatever lies after it.
        pub fn empty_next_read(&self) {
            self.next_read(NextRead::Empty { caught_up: true });
        }

        /// Makes the next GetRecords call return an empty page behind the stream's tip
        /// (`MillisBehindLatest` above 0) and an iterator at the same place.
        pub fn behind_next_read(&self) {
            self.next_read(NextRead::Empty { caught_up: false });
        }

        /// Makes the next GetRecords call fail with `ProvisionedThroughputExceededException`.
        pub fn throttle_next_read(&self) {
            self.next_read(NextRead::Throttled);
        }

        /// Queues what a coming GetRecords call gives: the next one not given something else.
        fn next_read(&self, read: NextRead) {
            self.next_reads.lock().unwrap().push_back(read);
        }

        /// From now on a closed shard read to its end gives an empty page with a next iterator
        /// instead of a null one, as moto does.
        pub fn never_end_shards(&self) {
            self.never_null
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }

        /// Appends to the open shard owning `hash`; returns its id and the sequence number.
        pub fn put(&self, hash: u128, data: &[u8]) -> (String, String) {
            let mut seq = self.next_sequence.lock().unwrap();
            *seq += 1;
            let mut shards = self.shards.lock().unwrap();
            let shard = shards
                .iter_mut()
                .find(|s| !s.info.closed && s.range.0 <= hash && hash <= s.range.1)
                .expect("an open shard owns every hash key");
            let sequence_number = format!("{:020}", *seq);
            shard.records.push(Record {
                sequence_number: sequence_number.clone(),
                data: data.to_vec(),
            });
            shard.arrivals.push(std::time::SystemTime::now());
            (shard.info.id.clone(), sequence_number)
        }

        fn close(&self, id: &str) -> (u128, u128) {
            let mut shards = self.shards.lock().unwrap();
            let shard = shards.iter_mut().find(|s| s.info.id == id).unwrap();
            assert!(!shard.info.closed, "{id} is already closed");
            shard.info.closed = true;
            shard.range
        }

        /// Closes shard `id` and opens two children, each with half its hash range.
        pub fn split(&self, id: &str) -> (String, String) {
            let (lo, hi) = self.close(id);
            let mid = lo + (hi - lo) / 2;
            (
                self.add(vec![id.into()], (lo, mid)),
                self.add(vec![id.into()], (mid + 1, hi)),
            )
        }

        /// Closes the adjacent shards `a` and `b` and opens their merged child.
        pub fn merge(&self, a: &str, b: &str) -> String {
            let (lo, _) = self.close(a);
            let (_, hi) = self.close(b);
            self.add(vec![a.into(), b.into()], (lo, hi))
        }

        fn position(&self, shard: &str, after: u64) -> String {
            format!("{shard}:{after}")
        }
    }

    fn seq(s: &str) -> u64 {
        s.parse().unwrap()
    }

    impl ShardSource for InMemoryStream {
        fn list_shards<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Result<Vec<ShardInfo>, Error>> {
            let listed = self
                .shards
                .lock()
                .unwrap()
                .iter()
                .map(|s| s.info.clone())
                .collect();
            Box::pin(async move { Ok(listed) })
        }

        fn iterator<'a>(
            &'a self,
            _: &'a str,
            shard_id: &'a str,
            start: &'a IteratorStart,
        ) -> BoxFuture<'a, Result<Option<String>, Error>> {
            let shards = self.shards.lock().unwrap();
            let shard = shards.iter().find(|s| s.info.id == shard_id).unwrap();
            let after = match start {
                IteratorStart::TrimHorizon => 0,
                IteratorStart::Latest => {
                    shard.records.last().map_or(0, |r| seq(&r.sequence_number))
                }
                IteratorStart::AfterSequence(s) => seq(s),
                // After the last record that arrived before `t`.
                IteratorStart::AtTimestamp(t) => {
                    let before = shard.arrivals.iter().take_while(|a| *a < t).count();
                    before
                        .checked_sub(1)
                        .map_or(0, |i| seq(&shard.records[i].sequence_number))
                }
            };
            let it = self.position(shard_id, after);
            Box::pin(async move { Ok(Some(it)) })
        }

        fn records<'a>(
            &'a self,
            _: &'a str,
            iterator: &'a str,
            limit: i32,
        ) -> BoxFuture<'a, Result<Read, Error>> {
            let instead = self.next_reads.lock().unwrap().pop_front();
            match instead {
                Some(NextRead::Expired) => return Box::pin(async { Ok(Read::Expired) }),
                Some(NextRead::Throttled) => return Box::pin(async { Ok(Read::Throttled) }),
                _ => {}
            }
            let (id, after) = iterator.split_once(':').unwrap();
            let after: u64 = after.parse().unwrap();
            self.reads.lock().unwrap().push(id.to_string());
            if let Some(NextRead::Empty { caught_up }) = instead {
                let next = Some(self.position(id, after));
                return Box::pin(async move {
                    Ok(Read::Page {
                        records: Vec::new(),
                        next,
                        caught_up,
                    })
                });
            }
            let shards = self.shards.lock().unwrap();
            let shard = shards.iter().find(|s| s.info.id == id).unwrap();
            let rest: Vec<&Record> = shard
                .records
                .iter()
                .filter(|r| seq(&r.sequence_number) > after)
                .collect();
            let page: Vec<Record> = rest
                .iter()
                .take(limit as usize)
                .map(|r| (*r).clone())
                .collect();
            let last = page.last().map_or(after, |r| seq(&r.sequence_number));
            let caught_up = page.len() == rest.len();
            let never_null = self.never_null.load(std::sync::atomic::Ordering::Relaxed);
            let next = if shard.info.closed && caught_up && !never_null {
                None
            } else {
                Some(self.position(id, last))
            };
            Box::pin(async move {
                Ok(Read::Page {
                    records: page,
                    next,
                    caught_up,
                })
            })
        }
    }
}

pub use in_memory::InMemoryStream;
