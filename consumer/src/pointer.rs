//! The pointer record: what the sidecar publishes to Kinesis for each chunk.
//!
//! Two versions, told apart by `v`:
//!
//! * **1, in S3**: one JSON object, well under 1 KiB for ordinary tags, naming the `bucket` and
//!   `key` of the stored object.
//! * **2, inline**: a small body rides in the record itself. The record is the same JSON
//!   object without `bucket` and `key`, then one newline (`0x0a`), then exactly
//!   `stored_bytes` bytes: the stored (compressed) body, byte for byte what the object would
//!   have held, with the same checksum. The body is raw, not base64 in the JSON, so that it
//!   costs no more than its size: Kinesis bills records by the KiB (on demand) or by 25 KB
//!   (provisioned). A reader that knows only version 1 fails on such a record (a newer
//!   version, or JSON followed by other bytes) instead of fetching an object that does not
//!   exist.
//!
//! Readers ignore fields they do not know; a `v` higher than [`Pointer::VERSION`] is
//! [`Error::UnsupportedVersion`]. Times are exact decimal numbers of seconds
//! (`1763740801.123456789`), never rounded through a float.
//!
//! ```json
//! {"v":1,"chunk_id":"0193a1c2e4f87d3e9a5b6c7d8e9f0a1b","bucket":"logs",
//!  "key":"app.web/2026/11/21/16/0193a1c2e4f87d3e9a5b6c7d8e9f0a1b.msgpack.zst",
//!  "tag":"app.web","timekey":1763740800,"first_time":1763740801.123456789,"last_time":1763740859.5,
//!  "records":18234,"bytes":7340032,"stored_bytes":1200311,"format":"msgpack","compression":"zstd",
//!  "checksum":{"crc32c":"b5c3a1f2"},"producer":"ip-10-0-1-7","created_at":"2026-11-21T16:01:02.345Z"}
//! ```

use bytes::Bytes;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;

use crate::body::{Compression, Format};
use crate::entry::EventTime;
use crate::Error;

/// A pointer to one chunk body: stored in S3 (version 1), or carried inline (version 2).
///
/// Parse a Kinesis record with [`Pointer::from_record`] and make one with
/// [`Pointer::to_record`]. The serde implementations cover the JSON part only (for an inline
/// pointer, the part before the body); the exact times are read as raw JSON numbers, which
/// serde cannot do through buffered forms such as `serde_json::Value` or internally tagged
/// enums.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pointer {
    /// Format version of this record: [`Pointer::OBJECT_VERSION`] or
    /// [`Pointer::INLINE_VERSION`]. A record without one is version 1.
    #[serde(default = "Pointer::object_version")]
    pub v: u32,
    /// The chunk's unique id: 32 lowercase hex characters (a UUIDv7, so ids sort by time).
    pub chunk_id: String,
    /// Bucket of the stored object; empty for an inline pointer.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub bucket: String,
    /// Key of the stored object; empty for an inline pointer.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub key: String,
    /// The Fluentd tag of every event in the chunk.
    pub tag: String,
    /// Start of the chunk's timekey window, in Unix seconds.
    pub timekey: i64,
    /// Earliest and latest event time in the chunk.
    #[serde(with = "decimal_time")]
    pub first_time: EventTime,
    #[serde(with = "decimal_time")]
    pub last_time: EventTime,
    /// Number of events.
    pub records: u64,
    /// Size of the body before compression.
    pub bytes: u64,
    /// Size of the stored (compressed) object.
    pub stored_bytes: u64,
    pub format: Format,
    pub compression: Compression,
    /// Checksum of the stored object.
    pub checksum: Checksum,
    /// Host name of the sidecar that stored the chunk.
    pub producer: String,
    /// When the pointer was made, RFC 3339 UTC with milliseconds.
    pub created_at: String,
    /// The stored body itself, for an inline pointer: exactly `stored_bytes` bytes, what the
    /// object would have held. `None` for a pointer to an S3 object.
    #[serde(skip)]
    pub inline: Option<Bytes>,
}

/// Checksums of the stored object. CRC32C is rendered as 8 lowercase hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checksum {
    #[serde(with = "hex_u32")]
    pub crc32c: u32,
}

#[derive(Deserialize)]
struct VersionOnly {
    v: Option<u64>,
}

impl Pointer {
    /// The highest version this crate reads.
    pub const VERSION: u32 = 2;
    /// The version of a pointer to an S3 object.
    pub const OBJECT_VERSION: u32 = 1;

    fn object_version() -> u32 {
        Pointer::OBJECT_VERSION
    }
    /// The version of a record that carries its body inline.
    pub const INLINE_VERSION: u32 = 2;

    /// Parses a pointer record of either version, checking the version first so that a newer
    /// producer gives a clear [`Error::UnsupportedVersion`] rather than a confusing
    /// missing-field error.
    pub fn from_record(data: &[u8]) -> Result<Pointer, Error> {
        let mut values = serde_json::Deserializer::from_slice(data).into_iter::<VersionOnly>();
        let version = match values.next() {
            Some(v) => v.map_err(Error::MalformedPointer)?,
            None => return Err(malformed("the record is empty")),
        };
        match version.v {
            Some(v) if v > u64::from(Self::VERSION) => {
                Err(Error::UnsupportedVersion { version: v })
            }
            Some(v) if v == u64::from(Self::INLINE_VERSION) => {
                let end = values.byte_offset();
                let body = match data[end..].split_first() {
                    Some((b'\n', body)) => body,
                    _ => return Err(malformed("an inline record needs a newline after its JSON")),
                };
                let mut p: Pointer =
                    serde_json::from_slice(&data[..end]).map_err(Error::MalformedPointer)?;
                if body.len() as u64 != p.stored_bytes {
                    return Err(Error::SizeMismatch {
                        what: "inline body bytes",
                        expected: p.stored_bytes,
                        actual: body.len() as u64,
                    });
                }
                p.inline = Some(Bytes::copy_from_slice(body));
                Ok(p)
            }
            _ => {
                let p: Pointer = serde_json::from_slice(data).map_err(Error::MalformedPointer)?;
                if p.bucket.is_empty() || p.key.is_empty() {
                    return Err(malformed("missing field `bucket` or `key`"));
                }
                Ok(p)
            }
        }
    }

    /// Same as [`Pointer::from_record`] (the name from when every record was JSON).
    pub fn from_json(data: &[u8]) -> Result<Pointer, Error> {
        Pointer::from_record(data)
    }

    /// The Kinesis record: compact JSON, followed for an inline pointer by a newline and the
    /// body.
    pub fn to_record(&self) -> Vec<u8> {
        let mut out = self.to_json();
        if let Some(body) = &self.inline {
            out.reserve(1 + body.len());
            out.push(b'\n');
            out.extend_from_slice(body);
        }
        out
    }

    /// The JSON part of the record: the whole record for a pointer to an S3 object.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a pointer always serializes")
    }

    /// This pointer with `body` carried inline (version 2, without bucket and key). The
    /// checksum and sizes are kept: they describe the stored body, in S3 or inline alike.
    pub fn into_inline(self, body: Bytes) -> Pointer {
        Pointer {
            v: Self::INLINE_VERSION,
            bucket: String::new(),
            key: String::new(),
            inline: Some(body),
            ..self
        }
    }

    /// Whether the body rides in the record rather than in S3.
    pub fn is_inline(&self) -> bool {
        self.inline.is_some()
    }

    /// Where the body is, for messages: `s3://bucket/key` or `inline`.
    pub fn location(&self) -> String {
        match self.inline {
            Some(_) => "inline".to_string(),
            None => format!("s3://{}/{}", self.bucket, self.key),
        }
    }

    /// The S3 checksum header value for the stored object (`x-amz-checksum-crc32c`):
    /// base64 of the big-endian CRC.
    pub fn crc32c_base64(&self) -> String {
        crc32c_base64(self.checksum.crc32c)
    }
}

/// Base64 of a big-endian CRC32C, as S3 expects in `x-amz-checksum-crc32c`.
pub fn crc32c_base64(crc: u32) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(crc.to_be_bytes())
}

fn malformed(why: &str) -> Error {
    Error::MalformedPointer(<serde_json::Error as serde::de::Error>::custom(why))
}

mod decimal_time {
    use super::*;

    pub fn serialize<S: Serializer>(t: &EventTime, s: S) -> Result<S::Ok, S::Error> {
        let raw = RawValue::from_string(t.to_decimal()).map_err(serde::ser::Error::custom)?;
        raw.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<EventTime, D::Error> {
        let raw: Box<RawValue> = Deserialize::deserialize(d)?;
        let text = raw.get();
        if let Some(t) = EventTime::parse_decimal(text) {
            return Ok(t);
        }
        // Another producer may have written a float in exponent form; accept it, less exactly.
        let f: f64 = text
            .parse()
            .map_err(|_| serde::de::Error::custom(format!("not a time in seconds: {text}")))?;
        if !f.is_finite() {
            return Err(serde::de::Error::custom("time is not finite"));
        }
        let secs = f.floor();
        let nanos = ((f - secs) * 1e9).round().min(999_999_999.0) as u32;
        Ok(EventTime::new(secs as i64, nanos))
    }
}

mod hex_u32 {
    use super::*;

    pub fn serialize<S: Serializer>(v: &u32, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{v:08x}"))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
        let s: String = Deserialize::deserialize(d)?;
        if s.len() != 8 {
            return Err(serde::de::Error::custom("crc32c must be 8 hex digits"));
        }
        u32::from_str_radix(&s, 16).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> Pointer {
        Pointer {
            v: 1,
            chunk_id: "0193a1c2e4f87d3e9a5b6c7d8e9f0a1b".into(),
            bucket: "logs".into(),
            key: "app.web/2026/11/21/16/0193a1c2e4f87d3e9a5b6c7d8e9f0a1b.msgpack.zst".into(),
            tag: "app.web".into(),
            timekey: 1_763_740_800,
            first_time: EventTime::new(1_763_740_801, 123_456_789),
            last_time: EventTime::new(1_763_740_859, 500_000_000),
            records: 18234,
            bytes: 7_340_032,
            stored_bytes: 1_200_311,
            format: Format::Msgpack,
            compression: Compression::Zstd,
            checksum: Checksum { crc32c: 0xb5c3a1f2 },
            producer: "ip-10-0-1-7".into(),
            created_at: "2026-11-21T16:01:02.345Z".into(),
            inline: None,
        }
    }

    fn inline_sample() -> Pointer {
        let body = Bytes::from_static(b"\x28\xb5\x2f\xfd\nbody with a newline\n");
        Pointer {
            stored_bytes: body.len() as u64,
            checksum: Checksum {
                crc32c: crate::crc::crc32c(&body),
            },
            ..sample()
        }
        .into_inline(body)
    }

    /// The pointer format: a record without `v` is version 1.
    #[test]
    fn a_pointer_without_v_is_read_as_version_1() {
        let p = sample();
        let json = String::from_utf8(p.to_json())
            .unwrap()
            .replace(r#""v":1,"#, "");
        assert!(!json.contains(r#""v""#));
        assert_eq!(Pointer::from_record(json.as_bytes()).unwrap(), p);
    }

    #[test]
    fn inline_record_is_json_newline_raw_body() {
        let p = inline_sample();
        let record = p.to_record();
        let json_end = record.iter().position(|&b| b == b'\n').unwrap();
        let json = std::str::from_utf8(&record[..json_end]).unwrap();
        assert!(json.starts_with(r#"{"v":2,"chunk_id":"#), "{json}");
        assert!(
            !json.contains("bucket") && !json.contains(r#""key""#),
            "{json}"
        );
        assert_eq!(&record[json_end + 1..], &p.inline.as_ref().unwrap()[..]);
        assert_eq!(Pointer::from_record(&record).unwrap(), p);
        assert!(p.is_inline());
        assert_eq!(p.location(), "inline");
    }

    #[test]
    fn inline_records_with_a_wrong_length_or_no_newline_are_refused() {
        let p = inline_sample();
        let mut record = p.to_record();
        record.push(0);
        assert!(matches!(
            Pointer::from_record(&record),
            Err(Error::SizeMismatch {
                what: "inline body bytes",
                ..
            })
        ));
        record.truncate(record.len() - 3);
        assert!(matches!(
            Pointer::from_record(&record),
            Err(Error::SizeMismatch { .. })
        ));
        let json_only = p.to_json();
        let err = Pointer::from_record(&json_only).unwrap_err();
        assert!(matches!(err, Error::MalformedPointer(_)), "{err}");
    }

    #[test]
    fn a_version_1_reader_fails_on_an_inline_record() {
        // What a reader that knows only version 1 does: parse the record as one JSON object.
        let record = inline_sample().to_record();
        let as_v1: Result<serde_json::Value, _> = serde_json::from_slice(&record);
        assert!(as_v1.is_err());
        // And one that checks the version first sees 2.
        let mut values = serde_json::Deserializer::from_slice(&record).into_iter::<VersionOnly>();
        assert_eq!(values.next().unwrap().unwrap().v, Some(2));
    }

    #[test]
    fn an_s3_pointer_needs_bucket_and_key() {
        let json = String::from_utf8(sample().to_json()).unwrap();
        let no_bucket = json.replace(r#""bucket":"logs","#, "");
        let err = Pointer::from_record(no_bucket.as_bytes()).unwrap_err();
        assert!(matches!(err, Error::MalformedPointer(_)), "{err}");
        assert_eq!(sample().to_record(), sample().to_json());
    }

    #[test]
    fn round_trips_with_exact_times() {
        let p = sample();
        let json = String::from_utf8(p.to_json()).unwrap();
        assert!(
            json.contains(r#""first_time":1763740801.123456789"#),
            "{json}"
        );
        assert!(
            json.contains(r#""last_time":1763740859.500000000"#),
            "{json}"
        );
        assert!(
            json.contains(r#""checksum":{"crc32c":"b5c3a1f2"}"#),
            "{json}"
        );
        assert!(
            json.contains(r#""format":"msgpack","compression":"zstd""#),
            "{json}"
        );
        assert_eq!(Pointer::from_json(json.as_bytes()).unwrap(), p);
    }

    #[test]
    fn reads_the_design_example_and_ignores_unknown_fields() {
        let json = r#"{"v":1,"chunk_id":"0193a1c2e4f87d3e9a5b6c7d8e9f0a1b","bucket":"logs","key":"app.web/2026/11/21/16/0193a1c2e4f87d3e9a5b6c7d8e9f0a1b.msgpack.zst",
 "tag":"app.web","timekey":1763740800,"first_time":1763740801.123456789,"last_time":1763740859.5,
 "records":18234,"bytes":7340032,"stored_bytes":1200311,"format":"msgpack","compression":"zstd",
 "checksum":{"crc32c":"b5c3a1f2","sha256":"later"},"producer":"ip-10-0-1-7","created_at":"2026-11-21T16:01:02.345Z",
 "something_new":{"a":[1,2]}}"#;
        assert_eq!(Pointer::from_json(json.as_bytes()).unwrap(), sample());
    }

    #[test]
    fn newer_version_and_missing_fields_are_typed_errors() {
        let newer = br#"{"v":3,"chunk_id":"x"}"#;
        assert!(matches!(
            Pointer::from_json(newer),
            Err(Error::UnsupportedVersion { version: 3 })
        ));
        let missing = br#"{"v":1,"chunk_id":"x"}"#;
        let err = Pointer::from_json(missing).unwrap_err();
        assert!(matches!(err, Error::MalformedPointer(_)), "{err}");
        assert!(err.to_string().contains("missing field"), "{err}");
        assert!(matches!(
            Pointer::from_json(b"not json"),
            Err(Error::MalformedPointer(_))
        ));
    }

    #[test]
    fn s3_checksum_header_is_base64_big_endian() {
        assert_eq!(sample().crc32c_base64(), "tcOh8g==");
    }
}
