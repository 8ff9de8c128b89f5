//! The pointer record: what the sidecar publishes to Kinesis for each chunk.
//!
//! One JSON object, well under 1 KiB for ordinary tags. Readers ignore fields they do not know;
//! a `v` higher than [`Pointer::VERSION`] is [`Error::UnsupportedVersion`]. Times are exact
//! decimal numbers of seconds (`1763740801.123456789`), never rounded through a float.
//!
//! ```json
//! {"v":1,"chunk_id":"0193a1c2e4f87d3e9a5b6c7d8e9f0a1b","bucket":"logs",
//!  "key":"app.web/2026/11/21/16/0193a1c2e4f87d3e9a5b6c7d8e9f0a1b.msgpack.zst",
//!  "tag":"app.web","timekey":1763740800,"first_time":1763740801.123456789,"last_time":1763740859.5,
//!  "records":18234,"bytes":7340032,"stored_bytes":1200311,"format":"msgpack","compression":"zstd",
//!  "checksum":{"crc32c":"b5c3a1f2"},"producer":"ip-10-0-1-7","created_at":"2026-11-21T16:01:02.345Z"}
//! ```

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;

use crate::body::{Compression, Format};
use crate::entry::EventTime;
use crate::Error;

/// A pointer to one chunk body stored in S3.
///
/// Parse it with [`Pointer::from_json`] (or `serde_json` directly): the exact times are read as
/// raw JSON numbers, which serde cannot do through buffered forms such as `serde_json::Value`
/// or internally tagged enums.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pointer {
    /// Format version of this record.
    pub v: u32,
    /// The chunk's unique id: 32 lowercase hex characters (a UUIDv7, so ids sort by time).
    pub chunk_id: String,
    pub bucket: String,
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
    /// The version this crate writes and the highest it reads.
    pub const VERSION: u32 = 1;

    /// Parses a pointer record, checking its version first so that a newer producer gives a
    /// clear [`Error::UnsupportedVersion`] rather than a confusing missing-field error.
    pub fn from_json(data: &[u8]) -> Result<Pointer, Error> {
        let version: VersionOnly = serde_json::from_slice(data).map_err(Error::MalformedPointer)?;
        match version.v {
            Some(v) if v > u64::from(Self::VERSION) => {
                Err(Error::UnsupportedVersion { version: v })
            }
            _ => serde_json::from_slice(data).map_err(Error::MalformedPointer),
        }
    }

    /// The record as compact JSON.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a pointer always serializes")
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
        }
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
        let newer = br#"{"v":2,"chunk_id":"x"}"#;
        assert!(matches!(
            Pointer::from_json(newer),
            Err(Error::UnsupportedVersion { version: 2 })
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
