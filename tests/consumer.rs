//! The consumer crate against the moto emulator: real GetObject streams, real shards, real
//! resharding calls. Chunks are stored and published here the way the sidecar does it
//! (tests/common::make_chunk), so each test controls exactly what is in the stream.

mod common;

use std::collections::{HashMap, HashSet};
use std::io::Write;

use claimcheck_consumer::body::{Compression, Counting, Encoder, Format};
use claimcheck_consumer::checkpoint::DynamoDbCheckpointStore;
use claimcheck_consumer::lambda::Consumer;
use claimcheck_consumer::pointer::Checksum;
use claimcheck_consumer::{
    CheckpointStore, Delivery, Error, Event, EventTime, FileCheckpointStore, Pointer, Resolver,
    StartPosition, StreamReader, Verification,
};
use common::*;

const FORMATS: [Format; 2] = [Format::Msgpack, Format::Json];
const COMPRESSIONS: [Compression; 3] = [Compression::Zstd, Compression::Gzip, Compression::None];

/// Events with integer and nanosecond times, one with Fluent Bit metadata, one with a `bin`.
fn varied_events(tag: &str) -> Vec<Event> {
    let meta = rmpv::Value::Map(vec![("pod".into(), "web-1".into())]);
    (0..50u32)
        .map(|i| {
            let record = rmpv::Value::Map(vec![
                ("i".into(), i.into()),
                (
                    "msg".into(),
                    format!("event {i} {}", "x".repeat(i as usize * 40)).into(),
                ),
                (
                    "nested".into(),
                    rmpv::Value::Array(vec![true.into(), (-1).into()]),
                ),
                ("raw".into(), rmpv::Value::Binary(b"bytes".to_vec())),
            ]);
            let time = EventTime::new(1_795_276_800 + i64::from(i), if i % 3 == 0 { 0 } else { i });
            Event::new(tag, time, &record, (i % 5 == 0).then_some(&meta)).unwrap()
        })
        .collect()
}

fn json_of(events: &[Event]) -> Vec<serde_json::Value> {
    events.iter().map(Event::to_json).collect()
}

async fn stream_all(resolver: &Resolver, pointer: &Pointer) -> Result<Vec<Event>, Error> {
    let mut stream = resolver.stream(pointer.clone());
    let mut events = Vec::new();
    while let Some(e) = stream.next().await {
        events.push(e?);
    }
    Ok(events)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolves_both_formats_and_every_compression_from_s3() {
    let env = Emulated::start("formats").await;
    let events = varied_events("app.web");
    let once = Resolver::new(env.aws.s3.clone());
    let twice = once.clone().in_memory_object_bytes(0);
    let at_end = once.clone().verification(Verification::AtEnd);
    for format in FORMATS {
        for compression in COMPRESSIONS {
            let what = format!("{format:?}/{compression:?}");
            let (pointer, stored) =
                make_chunk(&env.bucket, "app.web", &events, format, compression);
            env.aws.put_object(&pointer, stored).await;
            for (how, resolver) in [("once", &once), ("twice", &twice), ("at end", &at_end)] {
                let got = stream_all(resolver, &pointer).await.unwrap();
                assert_eq!(json_of(&got), json_of(&events), "{what} read {how}");
                if format == Format::Msgpack {
                    assert_eq!(
                        got, events,
                        "{what}: msgpack entries come back byte for byte"
                    );
                }
            }
            let chunk = once.resolve(&pointer).await.unwrap();
            assert_eq!(chunk.events.len(), 50, "{what}");
            let mut stream = twice.stream(pointer.clone());
            while stream.next().await.is_some() {}
            assert_eq!(stream.stats().object_reads, 2, "{what}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_object_is_a_checksum_error_before_any_event() {
    let env = Emulated::start("corrupt").await;
    let events = varied_events("app.web");
    for compression in [Compression::Zstd, Compression::None] {
        let (pointer, mut stored) = make_chunk(
            &env.bucket,
            "app.web",
            &events,
            Format::Msgpack,
            compression,
        );
        let middle = stored.len() / 2;
        stored[middle] ^= 0x5a;
        env.aws.put_object(&pointer, stored).await;

        for in_memory in [Resolver::DEFAULT_IN_MEMORY_OBJECT_BYTES, 0] {
            let resolver = Resolver::new(env.aws.s3.clone()).in_memory_object_bytes(in_memory);
            let mut stream = resolver.stream(pointer.clone());
            let first = stream.next().await.expect("an item");
            assert!(
                matches!(first, Err(Error::ChecksumMismatch { .. })),
                "{compression:?}: {first:?}"
            );
            assert!(stream.next().await.is_none());
        }

        // Opting in: what decodes is handed out, and the stream ends with the verdict.
        let resolver = Resolver::new(env.aws.s3.clone()).verification(Verification::AtEnd);
        let mut stream = resolver.stream(pointer.clone());
        let mut last = None;
        while let Some(item) = stream.next().await {
            last = Some(item);
        }
        assert!(
            matches!(last, Some(Err(Error::ChecksumMismatch { .. }))),
            "{compression:?}: {last:?}"
        );
    }
}

/// What one delivery gave: its shard, and the `record.chunk` label of its first event or the
/// error.
type Got = (String, Result<String, Error>);

/// Takes one delivery's events, commits it, and returns what it gave.
async fn take(reader: &mut StreamReader, mut d: Delivery) -> Got {
    let label = d.events().await.map(|events| {
        events[0].record_json()["chunk"]
            .as_str()
            .unwrap()
            .to_string()
    });
    reader.commit(d.position());
    (d.position().shard_id.clone(), label)
}

/// Reads until the reader is caught up, committing every delivery.
async fn drain(reader: &mut StreamReader) -> Vec<Got> {
    drain_watching_parents(reader, &HashMap::new()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_objects_are_errors_to_skip_and_duplicate_pointers_are_dropped() {
    let env = Emulated::start("reader").await;
    let mut pointers = Vec::new();
    for label in ["a", "b", "c"] {
        let events = sample_events("app.web", label, 3);
        pointers.push(
            env.publish("app.web", &events, Format::Msgpack, Compression::Zstd)
                .await,
        );
    }
    env.aws
        .s3
        .delete_object()
        .bucket(&env.bucket)
        .key(&pointers[1].key)
        .send()
        .await
        .unwrap();
    // Pointer "a" again, as a sidecar restarted after a crash would publish it.
    env.aws.put_pointer(&env.stream, &pointers[0]).await;

    let resolver = Resolver::new(env.aws.s3.clone());
    let mut reader = StreamReader::open(
        env.aws.kinesis.clone(),
        resolver,
        &env.stream,
        StartPosition::TrimHorizon,
    )
    .await
    .unwrap();
    let got = drain(&mut reader).await;
    assert_eq!(got.len(), 3, "{got:?}");
    assert_eq!(got[0].1.as_deref().unwrap(), "a");
    assert!(
        matches!(&got[1].1, Err(e @ Error::ObjectMissing { .. }) if e.is_chunk_error()),
        "{:?}",
        got[1].1
    );
    assert_eq!(got[2].1.as_deref().unwrap(), "c");
    assert_eq!(reader.stats().duplicates_dropped, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_restarted_from_its_checkpoint_goes_on_where_it_stopped() {
    let env = Emulated::start("restart").await;
    for label in ["a", "b", "c", "d"] {
        let events = sample_events("app.web", label, 2);
        env.publish("app.web", &events, Format::Json, Compression::Gzip)
            .await;
    }
    let store = FileCheckpointStore::new(env.dir.path().join("reader.checkpoint"));
    let open = || {
        StreamReader::builder(
            env.aws.kinesis.clone(),
            Resolver::new(env.aws.s3.clone()),
            env.stream.clone(),
        )
        .checkpoints(store.clone())
        .open()
    };
    let mut reader = open().await.unwrap();
    let mut first = reader.next().await.unwrap().unwrap();
    let mut second = reader.next().await.unwrap().unwrap();
    let _third = reader.next().await.unwrap().unwrap();
    for d in [&mut first, &mut second] {
        d.events().await.unwrap();
        reader.commit(d.position());
    }
    // The third was handed out but not processed when the reader stopped.
    reader.checkpoint().await.unwrap();
    drop(reader);

    // Chunk "a" is published again while the reader is down: the saved window drops it.
    let a = first.pointer().unwrap().clone();
    env.aws.put_pointer(&env.stream, &a).await;
    let mut reader = open().await.unwrap();
    let labels: Vec<String> = drain(&mut reader)
        .await
        .into_iter()
        .map(|(_, l)| l.unwrap())
        .collect();
    assert_eq!(labels, ["c", "d"]);
    assert_eq!(reader.stats().duplicates_dropped, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamodb_checkpoints_resume_refuse_a_second_writer_and_outlive_a_lost_answer() {
    let env = Emulated::start("dynamodb").await;
    let dynamodb = Aws::dynamodb(env.moto.port);
    let table = unique("checkpoints");
    DynamoDbCheckpointStore::create_table(&dynamodb, &table)
        .await
        .unwrap();
    for label in ["a", "b", "c"] {
        let events = sample_events("app.web", label, 2);
        env.publish("app.web", &events, Format::Msgpack, Compression::Zstd)
            .await;
    }
    let store = || DynamoDbCheckpointStore::new(dynamodb.clone(), &table, "tail");
    let open = |store| {
        StreamReader::builder(
            env.aws.kinesis.clone(),
            Resolver::new(env.aws.s3.clone()),
            env.stream.clone(),
        )
        .checkpoints(store)
        .open()
    };
    let mut reader = open(store()).await.unwrap();
    for _ in 0..2 {
        let mut d = reader.next().await.unwrap().unwrap();
        d.events().await.unwrap();
        reader.commit(d.position());
    }
    reader.checkpoint().await.unwrap();
    drop(reader);

    env.publish(
        "app.web",
        &sample_events("app.web", "d", 1),
        Format::Json,
        Compression::None,
    )
    .await;
    let mut reader = open(store()).await.unwrap();
    let labels: Vec<String> = drain(&mut reader)
        .await
        .into_iter()
        .map(|(_, l)| l.unwrap())
        .collect();
    assert_eq!(labels, ["c", "d"]);
    reader.checkpoint().await.unwrap();

    // Two stores of the same name: whoever saves another checkpoint second was overtaken and
    // is told so.
    let (first, second) = (store(), store());
    let saved = first.load().await.unwrap().expect("a saved checkpoint");
    second.load().await.unwrap();
    first.save(&saved).await.unwrap();
    let mut other: serde_json::Value = serde_json::from_slice(&saved.to_json()).unwrap();
    other["shards"] = serde_json::json!({});
    let other =
        claimcheck_consumer::checkpoint::Checkpoint::from_json(&other.to_string().into_bytes())
            .unwrap();
    let err = second.save(&other).await.unwrap_err();
    assert!(
        matches!(&err, Error::Checkpoint { reason, .. } if reason.contains("another reader")),
        "{err}"
    );

    // A write that landed but whose answer was lost is retried by the SDK, and the retry fails
    // its condition against that very write: the same checkpoint at the version it was
    // written for is taken as saved, and the store goes on from there.
    let (landed, retried) = (store(), store());
    landed.load().await.unwrap();
    retried.load().await.unwrap();
    landed.save(&saved).await.unwrap();
    retried.save(&saved).await.unwrap();
    retried.save(&other).await.unwrap();
    assert_eq!(store().load().await.unwrap(), Some(other.clone()));

    // Every answer to a save lost, the SDK's retries spent, though the write landed: the
    // store's next save takes that write up rather than refuse it, and every later one, as
    // another reader's.
    use common::proxy::{Fault, Proxy, Service};
    // A proxy that forwards DynamoDB's JSON calls as it does Kinesis's.
    let proxy = Proxy::start(Service::Kinesis, env.moto.port, Default::default()).await;
    let lossy = DynamoDbCheckpointStore::new(Aws::dynamodb(proxy.port), &table, "tail");
    lossy.load().await.unwrap();
    proxy.set(Fault::AnswerLost);
    lossy.save(&saved).await.unwrap_err();
    proxy.set(Fault::None);
    assert_eq!(
        store().load().await.unwrap(),
        Some(saved.clone()),
        "the lost save landed"
    );
    lossy.save(&other).await.unwrap();
    assert_eq!(store().load().await.unwrap(), Some(other));
}

/// The records of the stream's first shard as Lambda's event source mapping would hand them over.
async fn lambda_event(env: &Emulated) -> claimcheck_consumer::lambda::KinesisEvent {
    use base64::Engine;
    let iterator = env
        .aws
        .kinesis
        .get_shard_iterator()
        .stream_name(&env.stream)
        .shard_id("shardId-000000000000")
        .shard_iterator_type(aws_sdk_kinesis::types::ShardIteratorType::TrimHorizon)
        .send()
        .await
        .unwrap()
        .shard_iterator
        .unwrap();
    let out = env
        .aws
        .kinesis
        .get_records()
        .shard_iterator(iterator)
        .send()
        .await
        .unwrap();
    let records: Vec<serde_json::Value> = out
        .records
        .iter()
        .map(|r| {
            serde_json::json!({
                "kinesis": {
                    "kinesisSchemaVersion": "1.0",
                    "partitionKey": r.partition_key,
                    "sequenceNumber": r.sequence_number,
                    "data": base64::engine::general_purpose::STANDARD.encode(r.data.as_ref()),
                    "approximateArrivalTimestamp": r
                        .approximate_arrival_timestamp
                        .map_or(0.0, |t| t.as_secs_f64()),
                },
                "eventSource": "aws:kinesis",
                "eventVersion": "1.0",
                "eventID": format!("shardId-000000000000:{}", r.sequence_number),
                "eventName": "aws:kinesis:record",
                "awsRegion": "us-east-1",
                "eventSourceARN": format!("arn:aws:kinesis:us-east-1:123456789012:stream/{}", env.stream),
            })
        })
        .collect();
    serde_json::from_value(serde_json::json!({ "Records": records })).expect("a KinesisEvent")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lambda_batch_resolves_through_s3_and_stops_at_a_missing_object() {
    let env = Emulated::start("lambda").await;
    let mut pointers = Vec::new();
    for label in ["a", "b", "c", "d"] {
        let events = sample_events("app.web", label, 3);
        pointers.push(
            env.publish("app.web", &events, Format::Json, Compression::Zstd)
                .await,
        );
    }
    env.aws.put_pointer(&env.stream, &pointers[0]).await;
    env.aws
        .s3
        .delete_object()
        .bucket(&env.bucket)
        .key(&pointers[2].key)
        .send()
        .await
        .unwrap();
    let event = lambda_event(&env).await;
    assert_eq!(event.records.len(), 5);
    let failed_at = event.records[2].kinesis.sequence_number.clone();

    let consumer = Consumer::new(Resolver::new(env.aws.s3.clone()));
    let mut labels = Vec::new();
    let response = consumer
        .handle(&event, async |chunk| {
            assert_eq!(chunk.events.len(), 3);
            labels.push(
                chunk.events[0].record_json()["chunk"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            );
            Ok::<_, Error>(())
        })
        .await
        .unwrap();
    assert_eq!(labels, ["a", "b"]);
    let failures: Vec<_> = response
        .batch_item_failures
        .iter()
        .map(|f| f.item_identifier.clone().unwrap())
        .collect();
    assert_eq!(
        failures,
        [failed_at],
        "Lambda retries from the missing object"
    );

    // Skipping what cannot be mended: the rest of the batch, without the duplicate of "a".
    let consumer =
        Consumer::new(Resolver::new(env.aws.s3.clone())).skip_errors(Error::is_chunk_error);
    let mut labels = Vec::new();
    let response = consumer
        .handle(&event, async |chunk| {
            labels.push(
                chunk.events[0].record_json()["chunk"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            );
            Ok::<_, Error>(())
        })
        .await
        .unwrap();
    assert_eq!(labels, ["a", "b", "d"]);
    assert!(response.batch_item_failures.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latest_starts_after_open() {
    let env = Emulated::start("latest").await;
    env.publish(
        "app.web",
        &sample_events("app.web", "before", 1),
        Format::Msgpack,
        Compression::Zstd,
    )
    .await;
    let mut reader = StreamReader::open(
        env.aws.kinesis.clone(),
        Resolver::new(env.aws.s3.clone()),
        &env.stream,
        StartPosition::Latest,
    )
    .await
    .unwrap();
    env.publish(
        "app.web",
        &sample_events("app.web", "after", 1),
        Format::Msgpack,
        Compression::Zstd,
    )
    .await;
    let labels: Vec<String> = drain(&mut reader)
        .await
        .into_iter()
        .map(|(_, l)| l.unwrap())
        .collect();
    assert_eq!(labels, ["after"]);
}

/// Publishes chunks labelled `prefix0`, `prefix1`, … (at least four) until each of `shards` has
/// one; adds the labels to `sent`.
async fn publish_on_every_shard(
    env: &Emulated,
    stream: &str,
    shards: &[&str],
    prefix: &str,
    sent: &mut Vec<String>,
) {
    let mut covered = HashSet::new();
    for i in 0.. {
        let tag = format!("app.{prefix}{i}");
        let label = format!("{prefix}{i}");
        let (pointer, stored) = make_chunk(
            &env.bucket,
            &tag,
            &sample_events(&tag, &label, 2),
            Format::Msgpack,
            Compression::Zstd,
        );
        env.aws.put_object(&pointer, stored).await;
        let (shard, _) = env.aws.put_pointer(stream, &pointer).await;
        sent.push(label);
        covered.insert(shard);
        if shards.iter().all(|s| covered.contains(*s)) && i >= 3 {
            return;
        }
    }
}

/// [`drain`], checking before every delivery that no child shard (a key of `parents`) is
/// being read before its parents ended.
async fn drain_watching_parents(
    reader: &mut StreamReader,
    parents: &HashMap<String, Vec<String>>,
) -> Vec<Got> {
    let mut got = Vec::new();
    loop {
        let shards: HashMap<String, bool> = reader.shards().into_iter().collect();
        for (child, its_parents) in parents {
            if shards.contains_key(child) {
                for p in its_parents {
                    assert_eq!(
                        shards.get(p),
                        Some(&true),
                        "{child} is read while its parent {p} has not ended: {shards:?}"
                    );
                }
            }
        }
        let Some(d) = reader.next().await.expect("read the stream") else {
            return got;
        };
        got.push(take(reader, d).await);
    }
}

fn labels_once(got: &[Got], sent: &[String]) {
    let mut labels: Vec<String> = got
        .iter()
        .map(|(_, l)| l.as_ref().unwrap().clone())
        .collect();
    labels.sort();
    let mut want = sent.to_vec();
    want.sort();
    assert_eq!(labels, want, "every chunk exactly once");
}

/// moto 5.2.5 reshards only partly like Kinesis: a closed parent keeps its records but also
/// keeps receiving every later write (children stay empty after a split), a merge copies the
/// parents' records into the child, and GetRecords never ends a closed shard. What it does
/// model — the shard tree, closed parents in ListShards, records in closed parents — is what
/// this test reads across; the unit tests cover Kinesis' own routing with a faithful fake. The
/// readers end a closed parent once it is caught up, as `claimcheck tail` does against an
/// overridden endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resharding_mid_read_loses_nothing_and_reads_parents_first() {
    let env = Emulated::start("reshard").await;
    let kinesis = &env.aws.kinesis;
    let open = |stream: String| {
        StreamReader::builder(kinesis.clone(), Resolver::new(env.aws.s3.clone()), stream)
            .shard_refresh_interval(std::time::Duration::ZERO)
            .closed_shards_end_when_caught_up(true)
            .open()
    };

    // A split, by UpdateShardCount as an operator would do it.
    let mut sent = Vec::new();
    publish_on_every_shard(&env, &env.stream, &["shardId-000000000000"], "s", &mut sent).await;
    let mut reader = open(env.stream.clone()).await.unwrap();
    let first = reader.next().await.unwrap().unwrap();
    let mut got = vec![take(&mut reader, first).await];
    kinesis
        .update_shard_count()
        .stream_name(&env.stream)
        .target_shard_count(2)
        .scaling_type(aws_sdk_kinesis::types::ScalingType::UniformScaling)
        .send()
        .await
        .unwrap();
    publish_on_every_shard(&env, &env.stream, &["shardId-000000000000"], "t", &mut sent).await;
    let parents: HashMap<String, Vec<String>> = [
        (
            "shardId-000000000001".into(),
            vec!["shardId-000000000000".into()],
        ),
        (
            "shardId-000000000002".into(),
            vec!["shardId-000000000000".into()],
        ),
    ]
    .into();
    got.extend(drain_watching_parents(&mut reader, &parents).await);
    labels_once(&got, &sent);
    let shards: HashMap<String, bool> = reader.shards().into_iter().collect();
    assert_eq!(shards.len(), 3, "both children were found: {shards:?}");
    assert!(
        shards["shardId-000000000000"],
        "the parent ended: {shards:?}"
    );

    // A merge of two shards, in the middle of the read.
    let stream = unique("merge");
    env.aws.create_stream(&stream, 2).await;
    let both = ["shardId-000000000000", "shardId-000000000001"];
    let mut sent = Vec::new();
    publish_on_every_shard(&env, &stream, &both, "m", &mut sent).await;
    let mut reader = open(stream.clone()).await.unwrap();
    let first = reader.next().await.unwrap().unwrap();
    let mut got = vec![take(&mut reader, first).await];
    kinesis
        .merge_shards()
        .stream_name(&stream)
        .shard_to_merge(both[0])
        .adjacent_shard_to_merge(both[1])
        .send()
        .await
        .unwrap();
    publish_on_every_shard(&env, &stream, &both, "n", &mut sent).await;
    let parents: HashMap<String, Vec<String>> = [(
        "shardId-000000000002".into(),
        both.map(String::from).to_vec(),
    )]
    .into();
    got.extend(drain_watching_parents(&mut reader, &parents).await);
    labels_once(&got, &sent);
    assert!(
        got.iter().all(|(shard, _)| both.contains(&shard.as_str())),
        "everything came from the parents, first: {got:?}"
    );
    let copies = sent.iter().filter(|l| l.starts_with('m')).count() as u64;
    assert_eq!(
        reader.stats().duplicates_dropped,
        copies,
        "the child's copies of the parents' records were read last and dropped"
    );

    // A reader opened after the merge, one record per read, so that the parents take many
    // reads: the child must not be read before both of them ended.
    let mut reader = StreamReader::builder(
        kinesis.clone(),
        Resolver::new(env.aws.s3.clone()),
        stream.clone(),
    )
    .shard_refresh_interval(std::time::Duration::ZERO)
    .closed_shards_end_when_caught_up(true)
    .records_per_read(1)
    .open()
    .await
    .unwrap();
    let got = drain_watching_parents(&mut reader, &parents).await;
    labels_once(&got, &sent);
    assert!(got.iter().all(|(shard, _)| both.contains(&shard.as_str())));
}

/// Writes a body of `records` events of about 1 KiB each straight into a zstd encoder, so that
/// neither the test nor the reader ever holds it whole. Returns the pointer and stored bytes.
fn large_chunk(bucket: &str, records: u64) -> (Pointer, Vec<u8>) {
    let mut body = Counting::new(Encoder::new(Compression::Zstd, Some(1), Vec::new()).unwrap());
    let filler = "lorem ipsum dolor sit amet ".repeat(37);
    let mut entry = Vec::with_capacity(1200);
    for i in 0..records {
        entry.clear();
        entry.push(0x92);
        claimcheck_consumer::entry::encode::event_time(
            &mut entry,
            EventTime::new(1_795_276_800 + (i / 1000) as i64, (i % 1000) as u32),
        );
        let record = rmpv::Value::Map(vec![
            ("i".into(), i.into()),
            ("msg".into(), format!("{i:012} {filler}").into()),
        ]);
        rmpv::encode::write_value(&mut entry, &record).unwrap();
        body.write_all(&entry).unwrap();
    }
    let bytes = body.bytes();
    let stored = body.into_inner().finish().unwrap();
    let chunk_id = "0193a1c2e4f87d3e9a5b6c7d8e9f0a1b".to_string();
    let pointer = Pointer {
        v: 1,
        key: format!("big/{chunk_id}.msgpack.zst"),
        chunk_id,
        bucket: bucket.into(),
        tag: "big".into(),
        timekey: 1_795_276_800,
        first_time: EventTime::new(1_795_276_800, 0),
        last_time: EventTime::new(1_795_276_800 + (records / 1000) as i64, 999),
        records,
        bytes,
        stored_bytes: stored.len() as u64,
        format: Format::Msgpack,
        compression: Compression::Zstd,
        checksum: Checksum {
            crc32c: claimcheck_consumer::crc::crc32c(&stored),
        },
        producer: "tests".into(),
        created_at: "2026-11-21T16:01:02.345Z".into(),
        inline: None,
    };
    (pointer, stored)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolving_a_256_mib_body_keeps_the_readers_memory_bounded() {
    let env = Emulated::start("large").await;
    // 256 MiB of ~1 KiB events.
    let records = (256u64 << 20) / 1024;
    let (pointer, stored) = large_chunk(&env.bucket, records);
    assert!(pointer.bytes >= 256 << 20, "{}", pointer.bytes);
    env.aws.put_object(&pointer, stored).await;

    // Verified before the first event by a first streaming pass, then decoded from a second.
    let resolver = Resolver::new(env.aws.s3.clone()).in_memory_object_bytes(0);
    let mut stream = resolver.stream(pointer.clone());
    let mut count = 0u64;
    while let Some(batch) = stream.next_batch().await {
        for event in batch.unwrap() {
            assert_eq!(event.time().nanos as u64, count % 1000);
            count += 1;
        }
    }
    assert_eq!(count, records);
    let stats = stream.stats();
    assert_eq!(stats.object_reads, 2);
    // The crate's own accounting: read block, one entry, a few batches — not the body.
    assert!(
        stats.peak_buffered_bytes < 1 << 20,
        "peak {} bytes buffered for a {} byte body",
        stats.peak_buffered_bytes,
        pointer.bytes
    );
    eprintln!(
        "256 MiB body: peak {} bytes buffered by the crate",
        stats.peak_buffered_bytes
    );
}
