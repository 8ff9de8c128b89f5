//! A consumer tested offline, through the public API only: chunks in an `InMemoryBucket`,
//! pointer records (an object's and an inline one) in an `InMemoryStream` that is resharded
//! midway, read back by a `StreamReader` — no AWS, no emulator.

use std::io::Write;
use std::sync::Arc;

use bytes::Bytes;
use claimcheck_consumer::body::Encoder;
use claimcheck_consumer::kinesis::InMemoryStream;
use claimcheck_consumer::pointer::Checksum;
use claimcheck_consumer::source::InMemoryBucket;
use claimcheck_consumer::{
    Compression, Event, EventTime, Format, Pointer, Resolver, StartPosition, StreamReader,
};

/// A chunk of `events` events of `tag` (records `{"n": first..}`), stored with zstd: its
/// pointer (to `bucket`, key `tag/n`) and stored bytes.
fn chunk(tag: &str, first: u32, events: u32) -> (Pointer, Vec<u8>) {
    let mut body = Vec::new();
    for n in first..first + events {
        let record = rmpv::Value::Map(vec![("n".into(), n.into())]);
        let event = Event::new(tag, EventTime::new(1_763_740_800, n), &record, None).unwrap();
        body.extend_from_slice(event.entry_msgpack());
    }
    let mut encoder = Encoder::new(Compression::Zstd, None, Vec::new()).unwrap();
    encoder.write_all(&body).unwrap();
    let stored = encoder.finish().unwrap();
    let pointer = Pointer {
        v: 1,
        chunk_id: format!("{first:032x}"),
        bucket: "logs".into(),
        key: format!("{tag}/{first}"),
        tag: tag.into(),
        timekey: 0,
        first_time: EventTime::new(1_763_740_800, first),
        last_time: EventTime::new(1_763_740_800, first + events - 1),
        records: u64::from(events),
        bytes: body.len() as u64,
        stored_bytes: stored.len() as u64,
        format: Format::Msgpack,
        compression: Compression::Zstd,
        checksum: Checksum {
            crc32c: claimcheck_consumer::crc::crc32c(&stored),
        },
        producer: "test".into(),
        created_at: "2025-11-21T16:00:00Z".into(),
        inline: None,
    };
    (pointer, stored)
}

#[tokio::test]
async fn a_consumer_reads_objects_and_inline_records_from_in_memory_sources() {
    let bucket = Arc::new(InMemoryBucket::new());
    let stream = Arc::new(InMemoryStream::with_shards(1));
    let (object, stored) = chunk("app", 0, 3);
    bucket.put(&object.key, stored);
    stream.put(0, &object.to_record());
    // The shard splits; the next record, an inline one, goes to a child.
    let (first_child, _) = stream.split("shardId-000000000000");
    let (inline, body) = chunk("app", 3, 2);
    let inline = inline.into_inline(Bytes::from(body));
    let (shard, _) = stream.put(0, &inline.to_record());
    assert_eq!(shard, first_child);

    let mut reader = StreamReader::builder_with(
        stream.clone(),
        Resolver::from_source(bucket.clone()),
        "pointers".into(),
    )
    .start(StartPosition::TrimHorizon)
    .open()
    .await
    .unwrap();
    let mut seen = Vec::new();
    while let Some(mut delivery) = reader.next().await.unwrap() {
        for event in delivery.events().await.unwrap() {
            seen.push(event.record_json()["n"].as_u64().unwrap());
        }
        reader.commit(delivery.position());
    }
    assert_eq!(
        seen,
        vec![0, 1, 2, 3, 4],
        "the parent's records, then the child's"
    );
    // The object was read once; the inline record needed no read.
    assert!(bucket.take(&object.key).is_some());
}
