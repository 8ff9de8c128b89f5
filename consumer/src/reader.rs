//! A simple reader over every shard of a Kinesis stream, for tools, tests and small
//! deployments. Production consumers scale with shards (one reader per shard, or Lambda).

use std::collections::{HashMap, HashSet, VecDeque};

use aws_sdk_kinesis::operation::get_records::GetRecordsError;
use aws_sdk_kinesis::types::ShardIteratorType;

use crate::{Error, Pointer, ResolvedChunk, Resolver};

/// Where a reader starts in each shard it finds when it opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartPosition {
    /// The oldest record still in the stream.
    TrimHorizon,
    /// Only records written after the reader opened.
    Latest,
}

#[derive(Debug)]
struct Shard {
    id: String,
    iterator: Option<String>,
    last_sequence: Option<String>,
    start: ShardIteratorType,
    finished: bool,
}

/// The ids of the most recent chunks yielded, to drop re-published pointers.
#[derive(Debug)]
struct RecentIds {
    set: HashSet<String>,
    order: VecDeque<String>,
    capacity: usize,
}

impl RecentIds {
    fn new(capacity: usize) -> Self {
        RecentIds {
            set: HashSet::new(),
            order: VecDeque::new(),
            capacity,
        }
    }

    fn contains(&self, id: &str) -> bool {
        self.set.contains(id)
    }

    fn insert(&mut self, id: &str) {
        if self.set.insert(id.to_string()) {
            self.order.push_back(id.to_string());
            if self.order.len() > self.capacity {
                if let Some(old) = self.order.pop_front() {
                    self.set.remove(&old);
                }
            }
        }
    }
}

/// Reads pointers from every shard of a stream and resolves them, in per-shard order.
///
/// A chunk id already yielded (a pointer re-published after a sidecar crash) is dropped, for
/// the last [`StreamReader::DEDUP_WINDOW`] chunk ids. When a shard closes (resharding), its
/// children are read from their start once all of their parents are finished.
#[derive(Debug)]
pub struct StreamReader {
    kinesis: aws_sdk_kinesis::Client,
    resolver: Resolver,
    stream: String,
    start: ShardIteratorType,
    /// Shard ids listed when the reader opened.
    initial: Option<HashSet<String>>,
    shards: Vec<Shard>,
    recent: RecentIds,
    duplicates: u64,
}

fn kinesis_err<E: std::error::Error + Send + Sync + 'static>(
    operation: &'static str,
) -> impl FnOnce(E) -> Error {
    move |e| Error::Kinesis {
        operation,
        source: Box::new(e),
    }
}

impl StreamReader {
    /// How many recent chunk ids are remembered for dropping duplicates.
    pub const DEDUP_WINDOW: usize = 100_000;

    /// Lists the stream's shards and positions a reader at `start` in each open one.
    pub async fn open(
        kinesis: aws_sdk_kinesis::Client,
        resolver: Resolver,
        stream: impl Into<String>,
        start: StartPosition,
    ) -> Result<Self, Error> {
        let start = match start {
            StartPosition::TrimHorizon => ShardIteratorType::TrimHorizon,
            StartPosition::Latest => ShardIteratorType::Latest,
        };
        let mut reader = StreamReader {
            kinesis,
            resolver,
            stream: stream.into(),
            start,
            initial: None,
            shards: Vec::new(),
            recent: RecentIds::new(Self::DEDUP_WINDOW),
            duplicates: 0,
        };
        reader.discover_shards().await?;
        Ok(reader)
    }

    /// Pointers dropped so far because their chunk id had already been yielded.
    pub fn duplicates_dropped(&self) -> u64 {
        self.duplicates
    }

    /// Reads each open shard once and resolves the pointers found, in order per shard.
    ///
    /// The outer error is a failure to read Kinesis; an inner error belongs to one pointer
    /// (malformed, object missing, checksum mismatch…) and leaves the others unaffected.
    pub async fn poll(&mut self) -> Result<Vec<Result<ResolvedChunk, Error>>, Error> {
        let mut out = Vec::new();
        let mut closed_any = false;
        for i in 0..self.shards.len() {
            if self.shards[i].finished {
                continue;
            }
            let data = self.read_shard(i).await?;
            closed_any |= self.shards[i].finished;
            for record in data {
                match Pointer::from_json(&record) {
                    Ok(p) if self.recent.contains(&p.chunk_id) => self.duplicates += 1,
                    Ok(p) => {
                        let resolved = self.resolver.resolve(&p).await;
                        if resolved.is_ok() {
                            self.recent.insert(&p.chunk_id);
                        }
                        out.push(resolved);
                    }
                    Err(e) => out.push(Err(e)),
                }
            }
        }
        if closed_any {
            self.discover_shards().await?;
        }
        Ok(out)
    }

    async fn read_shard(&mut self, i: usize) -> Result<Vec<Vec<u8>>, Error> {
        if self.shards[i].iterator.is_none() {
            self.position(i).await?;
        }
        let Some(iterator) = self.shards[i].iterator.clone() else {
            return Ok(Vec::new());
        };
        let result = self
            .kinesis
            .get_records()
            .shard_iterator(iterator)
            .limit(1000)
            .send()
            .await;
        let out = match result {
            Ok(out) => out,
            Err(e)
                if matches!(
                    e.as_service_error(),
                    Some(GetRecordsError::ExpiredIteratorException(_))
                ) =>
            {
                // Iterators live five minutes; take a new one after the last record read.
                self.shards[i].iterator = None;
                return Ok(Vec::new());
            }
            Err(e) => return Err(kinesis_err("GetRecords")(e)),
        };
        let shard = &mut self.shards[i];
        let mut data = Vec::with_capacity(out.records.len());
        for record in out.records {
            shard.last_sequence = Some(record.sequence_number);
            data.push(record.data.into_inner());
        }
        shard.iterator = out.next_shard_iterator;
        if shard.iterator.is_none() {
            shard.finished = true;
        }
        Ok(data)
    }

    /// Gets a shard iterator: after the last record read, else at the shard's start position.
    async fn position(&mut self, i: usize) -> Result<(), Error> {
        let shard = &self.shards[i];
        let mut req = self
            .kinesis
            .get_shard_iterator()
            .stream_name(&self.stream)
            .shard_id(&shard.id);
        req = match &shard.last_sequence {
            Some(seq) => req
                .shard_iterator_type(ShardIteratorType::AfterSequenceNumber)
                .starting_sequence_number(seq),
            None => req.shard_iterator_type(shard.start.clone()),
        };
        let out = req.send().await.map_err(kinesis_err("GetShardIterator"))?;
        let shard = &mut self.shards[i];
        shard.iterator = out.shard_iterator;
        if shard.iterator.is_none() {
            shard.finished = true;
        }
        Ok(())
    }

    /// Adds shards not known yet. A child shard is added only once every parent still in the
    /// stream has been read to its end, so a key's records are yielded in order across a
    /// reshard. Shards that existed when the reader opened start at the reader's start
    /// position; shards created later start at their beginning.
    async fn discover_shards(&mut self) -> Result<(), Error> {
        let mut listed = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let req = match &token {
                Some(t) => self.kinesis.list_shards().next_token(t),
                None => self.kinesis.list_shards().stream_name(&self.stream),
            };
            let out = req.send().await.map_err(kinesis_err("ListShards"))?;
            listed.extend(out.shards.unwrap_or_default());
            token = out.next_token;
            if token.is_none() {
                break;
            }
        }
        let listed_ids: HashSet<String> = listed.iter().map(|s| s.shard_id.clone()).collect();
        let initial = self.initial.get_or_insert_with(|| listed_ids.clone());
        let known: HashMap<String, bool> = self
            .shards
            .iter()
            .map(|s| (s.id.clone(), s.finished))
            .collect();
        for s in listed {
            if known.contains_key(&s.shard_id) {
                continue;
            }
            let mut parents = s
                .parent_shard_id
                .iter()
                .chain(s.adjacent_parent_shard_id.iter());
            let ready = parents.all(|p| !listed_ids.contains(p) || known.get(p) == Some(&true));
            if !ready {
                continue;
            }
            let start = if initial.contains(&s.shard_id) {
                self.start.clone()
            } else {
                ShardIteratorType::TrimHorizon
            };
            self.shards.push(Shard {
                id: s.shard_id,
                iterator: None,
                last_sequence: None,
                start,
                finished: false,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::RecentIds;

    #[test]
    fn recent_ids_forget_the_oldest() {
        let mut r = RecentIds::new(2);
        r.insert("a");
        r.insert("b");
        r.insert("a");
        assert!(r.contains("a") && r.contains("b"));
        r.insert("c");
        assert!(!r.contains("a") && r.contains("b") && r.contains("c"));
    }
}
