//! AWS Lambda (feature `lambda`): a Kinesis event source mapping hands a function batches of
//! pointer records; [`Consumer::handle`] turns them into chunks of events.
//!
//! ```no_run
//! use claimcheck_consumer::lambda::{Consumer, KinesisEvent};
//! use claimcheck_consumer::Resolver;
//! use lambda_runtime::{service_fn, Error, LambdaEvent};
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Error> {
//!     let config = aws_config::load_from_env().await;
//!     let consumer = &Consumer::new(Resolver::new(aws_sdk_s3::Client::new(&config)));
//!     lambda_runtime::run(service_fn(move |event: LambdaEvent<KinesisEvent>| async move {
//!         let response = consumer.handle(&event.payload, async |chunk| {
//!             for event in &chunk.events {
//!                 println!("{}", event.to_json());
//!             }
//!             Ok::<_, Error>(())
//!         });
//!         Ok::<_, Error>(response.await?)
//!     }))
//!     .await
//! }
//! ```
//!
//! Chunks are handed to the function in record order (Lambda delivers one shard per batch).
//! When a pointer cannot be resolved or the function returns an error, the batch stops there
//! and the response names that record, so Lambda retries from it. This needs
//! `FunctionResponseTypes: ["ReportBatchItemFailures"]` on the event source mapping; without
//! it, use [`Consumer::report_batch_item_failures`]`(false)`, which fails the invocation
//! instead. Lambda keeps the shard's position itself; there is no checkpoint to manage.
//!
//! Duplicates (a pointer re-published after a sidecar crash, or a batch retried) are dropped
//! when their chunk id is among the last [`Consumer::dedup_window`] chunks this consumer
//! processed. The window lives in the function's memory: it carries over between invocations
//! of a warm execution environment and starts empty in a new one. A re-published pointer
//! usually lands in the same shard (the partition key is the tag), but a new environment or a
//! `ParallelizationFactor` above 1 can still see it; make the processing idempotent by
//! `chunk_id` where a repeat would matter.

use std::fmt;
use std::sync::Mutex;

pub use aws_lambda_events::event::kinesis::KinesisEvent;
pub use aws_lambda_events::event::streams::KinesisEventResponse;
use futures::StreamExt;

use crate::dedup::{chunk_key, RecentIds};
use crate::error::BoxError;
use crate::{Error, Pointer, Position, ResolvedChunk, Resolver, StreamReader};

/// The position and pointer of each record of `event`, in order.
///
/// The shard id comes from the record's `eventID` (`shardId-…:sequence`).
pub fn pointers(event: &KinesisEvent) -> Vec<(Position, Result<Pointer, Error>)> {
    event
        .records
        .iter()
        .map(|r| {
            let shard_id = r
                .event_id
                .as_deref()
                .and_then(|id| id.split_once(':'))
                .map(|(shard, _)| shard.to_string())
                .unwrap_or_default();
            let position = Position {
                shard_id,
                sequence_number: r.kinesis.sequence_number.clone(),
            };
            (position, Pointer::from_record(&r.kinesis.data.0))
        })
        .collect()
}

/// A batch stopped at a record (with [`Consumer::report_batch_item_failures`]`(false)`).
#[derive(Debug)]
pub struct BatchFailed {
    /// The record that failed; those before it were processed.
    pub position: Position,
    pub cause: BoxError,
}

impl fmt::Display for BatchFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "record {} failed: {}", self.position, self.cause)
    }
}

impl std::error::Error for BatchFailed {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.cause)
    }
}

/// Resolves the pointers of Lambda Kinesis events; see the [module documentation](self).
#[derive(Debug)]
pub struct Consumer {
    resolver: Resolver,
    concurrency: usize,
    report_failures: bool,
    skip: fn(&Error) -> bool,
    recent: Mutex<RecentIds>,
}

enum Step {
    Duplicate,
    Chunk(u128, Box<ResolvedChunk>),
    Failed(Error),
}

impl Consumer {
    /// A consumer resolving with `resolver`: 4 pointers at once, the default dedup window,
    /// every failure reported.
    pub fn new(resolver: Resolver) -> Self {
        Consumer {
            resolver,
            concurrency: 4,
            report_failures: true,
            skip: |_| false,
            recent: Mutex::new(RecentIds::new(StreamReader::DEFAULT_DEDUP_WINDOW)),
        }
    }

    /// How many pointers of a batch are resolved at once (at least 1).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// How many processed chunk ids are remembered to drop duplicates (0: none).
    pub fn dedup_window(self, ids: usize) -> Self {
        *self.recent.lock().expect("not poisoned") = RecentIds::new(ids);
        self
    }

    /// Errors for which `skip` is true are logged and the record skipped, instead of stopping
    /// the batch. [`Error::is_chunk_error`] skips pointers whose objects are missing or damaged
    /// (which a retry would not mend); by default nothing is skipped.
    pub fn skip_errors(mut self, skip: fn(&Error) -> bool) -> Self {
        self.skip = skip;
        self
    }

    /// With `true` (the default) a failure is reported in the response as a batch item
    /// failure; with `false` it fails the invocation with [`BatchFailed`], so that Lambda
    /// retries the whole batch (the chunks processed before it are then dropped as
    /// duplicates by a warm environment).
    pub fn report_batch_item_failures(mut self, report: bool) -> Self {
        self.report_failures = report;
        self
    }

    /// Resolves the pointers of `event` and calls `process` with each chunk, in order.
    ///
    /// Stops at the first pointer that cannot be resolved (unless skipped) or chunk that
    /// `process` fails; the response (or the [`BatchFailed`] error) names that record.
    pub async fn handle<F, E>(
        &self,
        event: &KinesisEvent,
        mut process: F,
    ) -> Result<KinesisEventResponse, BatchFailed>
    where
        F: AsyncFnMut(ResolvedChunk) -> Result<(), E>,
        E: Into<BoxError>,
    {
        // Duplicates known now are not even fetched; the window is updated as chunks succeed.
        let steps: Vec<(Position, Option<Result<Pointer, Error>>)> = {
            let recent = self.recent.lock().expect("not poisoned");
            let mut in_batch = std::collections::HashSet::new();
            pointers(event)
                .into_iter()
                .map(|(position, pointer)| match pointer {
                    Ok(p) => {
                        let key = chunk_key(&p.chunk_id);
                        if recent.contains(key) || !in_batch.insert(key) {
                            (position, None)
                        } else {
                            (position, Some(Ok(p)))
                        }
                    }
                    Err(e) => (position, Some(Err(e))),
                })
                .collect()
        };
        let resolver = &self.resolver;
        let mut resolved = futures::stream::iter(steps)
            .map(|(position, pointer)| async move {
                let step = match pointer {
                    None => Step::Duplicate,
                    Some(Err(e)) => Step::Failed(e),
                    Some(Ok(p)) => match resolver.resolve(&p).await {
                        Ok(chunk) => Step::Chunk(chunk_key(&p.chunk_id), Box::new(chunk)),
                        Err(e) => Step::Failed(e),
                    },
                };
                (position, step)
            })
            .buffered(self.concurrency);
        while let Some((position, step)) = resolved.next().await {
            let failure: BoxError = match step {
                Step::Duplicate => {
                    tracing::debug!(%position, "duplicate pointer dropped");
                    continue;
                }
                Step::Chunk(key, chunk) => match process(*chunk).await {
                    Ok(()) => {
                        self.recent.lock().expect("not poisoned").insert(key);
                        continue;
                    }
                    Err(e) => e.into(),
                },
                Step::Failed(e) => {
                    if (self.skip)(&e) {
                        tracing::warn!(%position, cause = %e, "skipping a pointer");
                        continue;
                    }
                    Box::new(e)
                }
            };
            tracing::error!(%position, cause = %failure, "batch stopped; Lambda will retry from this record");
            if !self.report_failures {
                return Err(BatchFailed {
                    position,
                    cause: failure,
                });
            }
            let mut response = KinesisEventResponse::default();
            response.add_failure(position.sequence_number);
            return Ok(response);
        }
        Ok(KinesisEventResponse::default())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::body::{Compression, Format};
    use crate::decode::tests::stored;
    use crate::source::InMemoryBucket as Bucket;
    use crate::{Event, EventTime};

    fn chunk(bucket: &Bucket, n: u32) -> Pointer {
        let record = rmpv::Value::Map(vec![("n".into(), n.into())]);
        let event = Event::new("app", EventTime::new(1, n), &record, None).unwrap();
        let (mut p, bytes) = stored(Format::Msgpack, Compression::Gzip, event.entry_msgpack(), 1);
        p.chunk_id = format!("{n:032x}");
        p.key = format!("app/{n}");
        bucket.put(&p.key, bytes);
        p
    }

    /// The JSON Lambda sends, for `records` on shard 0 with sequence numbers 1, 2, …
    fn event(records: &[Vec<u8>]) -> KinesisEvent {
        use base64::Engine;
        let records: Vec<serde_json::Value> = records
            .iter()
            .enumerate()
            .map(|(i, data)| {
                serde_json::json!({
                    "kinesis": {
                        "kinesisSchemaVersion": "1.0",
                        "partitionKey": "app",
                        "sequenceNumber": (i + 1).to_string(),
                        "data": base64::engine::general_purpose::STANDARD.encode(data),
                        "approximateArrivalTimestamp": 1_795_276_800.5
                    },
                    "eventSource": "aws:kinesis",
                    "eventVersion": "1.0",
                    "eventID": format!("shardId-000000000007:{}", i + 1),
                    "eventName": "aws:kinesis:record",
                    "awsRegion": "us-east-1",
                    "eventSourceARN": "arn:aws:kinesis:us-east-1:123456789012:stream/pointers"
                })
            })
            .collect();
        serde_json::from_value(serde_json::json!({ "Records": records })).unwrap()
    }

    async fn run(
        consumer: &Consumer,
        event: &KinesisEvent,
    ) -> (Vec<u64>, Result<KinesisEventResponse, BatchFailed>) {
        let mut seen = Vec::new();
        let response = consumer
            .handle(event, async |chunk: ResolvedChunk| {
                seen.push(chunk.events[0].record_json()["n"].as_u64().unwrap());
                Ok::<_, Error>(())
            })
            .await;
        (seen, response)
    }

    fn failed(response: &KinesisEventResponse) -> Vec<String> {
        response
            .batch_item_failures
            .iter()
            .map(|f| f.item_identifier.clone().unwrap())
            .collect()
    }

    #[tokio::test]
    async fn chunks_in_order_duplicates_dropped_within_and_across_invocations() {
        let bucket = Arc::new(Bucket::default());
        let ps: Vec<Pointer> = (0..5).map(|n| chunk(&bucket, n)).collect();
        let mut records: Vec<Vec<u8>> = ps.iter().map(Pointer::to_record).collect();
        records.insert(2, ps[0].to_json());
        let consumer = Consumer::new(Resolver::from_source(bucket.clone())).concurrency(3);
        let ev = event(&records);
        let positions = pointers(&ev);
        assert_eq!(positions[1].0.shard_id, "shardId-000000000007");
        assert_eq!(positions[1].0.sequence_number, "2");

        let (seen, response) = run(&consumer, &ev).await;
        assert_eq!(seen, [0, 1, 2, 3, 4]);
        assert!(response.unwrap().batch_item_failures.is_empty());
        // Lambda retries the same batch: a warm environment drops it all.
        let (seen, _) = run(&consumer, &ev).await;
        assert!(seen.is_empty(), "{seen:?}");
    }

    #[tokio::test]
    async fn a_failure_stops_the_batch_at_its_record() {
        let bucket = Arc::new(Bucket::default());
        let ps: Vec<Pointer> = (0..4).map(|n| chunk(&bucket, n)).collect();
        bucket.delete(&ps[2].key);
        let records: Vec<Vec<u8>> = ps.iter().map(Pointer::to_record).collect();
        let ev = event(&records);

        let consumer = Consumer::new(Resolver::from_source(bucket.clone()));
        let (seen, response) = run(&consumer, &ev).await;
        assert_eq!(seen, [0, 1]);
        assert_eq!(failed(&response.unwrap()), ["3"]);

        let skipping =
            Consumer::new(Resolver::from_source(bucket.clone())).skip_errors(Error::is_chunk_error);
        let (seen, response) = run(&skipping, &ev).await;
        assert_eq!(seen, [0, 1, 3]);
        assert!(response.unwrap().batch_item_failures.is_empty());
        // A pointer from a newer sidecar is not skipped: a newer reader reads it.
        let mut newer = records.clone();
        newer[2] = br#"{"v":3,"chunk_id":"from-a-newer-sidecar"}"#.to_vec();
        let skipping =
            Consumer::new(Resolver::from_source(bucket.clone())).skip_errors(Error::is_chunk_error);
        let (seen, response) = run(&skipping, &event(&newer)).await;
        assert_eq!(seen, [0, 1]);
        assert_eq!(failed(&response.unwrap()), ["3"]);

        let whole =
            Consumer::new(Resolver::from_source(bucket.clone())).report_batch_item_failures(false);
        let mut calls = 0;
        let err = whole
            .handle(&ev, async |_| {
                calls += 1;
                if calls == 2 {
                    Err("the database is down")
                } else {
                    Ok(())
                }
            })
            .await
            .unwrap_err();
        assert_eq!(err.position.sequence_number, "2");
        assert!(err.to_string().contains("the database is down"), "{err}");
    }

    #[tokio::test]
    async fn inline_records_and_pointers_to_objects_mix_in_one_batch() {
        let bucket = Arc::new(Bucket::default());
        let ps: Vec<Pointer> = (0..4).map(|n| chunk(&bucket, n)).collect();
        // Chunks 1 and 3 carry their bodies inline; their objects are gone.
        let records: Vec<Vec<u8>> = ps
            .iter()
            .enumerate()
            .map(|(i, p)| match i % 2 {
                0 => p.to_record(),
                _ => {
                    let body = bucket.take(&p.key).expect("stored");
                    p.clone().into_inline(body.into()).to_record()
                }
            })
            .collect();
        let consumer = Consumer::new(Resolver::from_source(bucket.clone()));
        let (seen, response) = run(&consumer, &event(&records)).await;
        assert_eq!(seen, [0, 1, 2, 3]);
        assert!(response.unwrap().batch_item_failures.is_empty());
        let reads = bucket.reads.lock().unwrap().len();
        assert_eq!(reads, 2, "only the pointers to objects read S3");
    }
}
