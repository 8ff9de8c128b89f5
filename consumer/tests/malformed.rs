//! Bodies and pointers at the edges of the format: read as the format says, never a panic.

use claimcheck_consumer::pointer::Checksum;
use claimcheck_consumer::{Compression, Decoder, EventTime, Format, Pointer};

/// An uncompressed msgpack body and its pointer.
fn pointer_for(body: &[u8], records: u64) -> Pointer {
    Pointer {
        v: 1,
        chunk_id: "00".repeat(16),
        bucket: "b".into(),
        key: "k".into(),
        tag: "t".into(),
        timekey: 0,
        first_time: EventTime::new(1, 0),
        last_time: EventTime::new(1, 0),
        records,
        bytes: body.len() as u64,
        stored_bytes: body.len() as u64,
        format: Format::Msgpack,
        compression: Compression::None,
        checksum: Checksum {
            crc32c: claimcheck_consumer::crc::crc32c(body),
        },
        producer: "h".into(),
        created_at: "2026-01-01T00:00:00.000Z".into(),
        inline: None,
    }
}

/// `[[time], {}]`: a time slot that is an array of one (the forward protocol's "array of 1 or
/// more"), with no metadata after the time.
#[test]
fn a_time_slot_of_the_time_alone_is_read_without_metadata() {
    let mut body = vec![0x92, 0x91, 0xd7, 0x00];
    body.extend_from_slice(&1_763_740_800u32.to_be_bytes());
    body.extend_from_slice(&0u32.to_be_bytes());
    body.push(0x80);
    let p = pointer_for(&body, 1);
    let events: Vec<_> = Decoder::new(&p, &body[..])
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].time(), EventTime::new(1_763_740_800, 0));
    assert_eq!(events[0].metadata_json(), None);
}

/// The pointer format: a record without `v` is version 1.
#[test]
fn a_pointer_without_v_is_read_as_version_1() {
    let p = pointer_for(b"", 0);
    let json = String::from_utf8(p.to_json())
        .unwrap()
        .replace(r#""v":1,"#, "");
    assert!(!json.contains(r#""v""#));
    assert_eq!(Pointer::from_record(json.as_bytes()).unwrap(), p);
}
