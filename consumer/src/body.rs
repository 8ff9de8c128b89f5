//! Chunk bodies: the two formats, the three compressions, and events.
//!
//! * `msgpack` — the Fluentd buffer format: concatenated msgpack `[time, record]` entries,
//!   byte for byte as the forward client sent them (Fluent Bit's `[[time, metadata], record]`
//!   kept as is). The tag is not repeated per entry; it is in the pointer.
//! * `json` — one JSON object per line:
//!   `{"time":"<RFC 3339 UTC, 9 fraction digits>","tag":"...","record":{...}}`, plus
//!   `"metadata":{...}` when the event carried Fluent Bit metadata.
//!
//! Msgpack values become JSON like this: str and bin become strings (invalid UTF-8 replaced by
//! U+FFFD); map keys that are not strings become their JSON text; an EventTime (ext 0) or
//! msgpack timestamp (ext -1) becomes an RFC 3339 string; any other ext becomes
//! `{"ext":<type>,"data":"<base64>"}`; NaN and infinities become `null`.
//!
//! Compression is applied to the whole body: `zstd` (frames), `gzip` (members) or `none`.

use std::io::{self, Read, Write};

use std::sync::Arc;

use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::entry::{self, EventTime};
use crate::{Error, Event};

/// How events are laid out in a body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Msgpack,
    Json,
}

/// How a body is compressed in S3.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    Zstd,
    Gzip,
    None,
}

impl Format {
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Msgpack => "msgpack",
            Format::Json => "json",
        }
    }

    /// Content-Type of the stored object.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Msgpack => "application/msgpack",
            Format::Json => "application/x-ndjson",
        }
    }
}

impl Compression {
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::Zstd => "zstd",
            Compression::Gzip => "gzip",
            Compression::None => "none",
        }
    }

    /// Content-Encoding of the stored object, if any.
    pub fn content_encoding(self) -> Option<&'static str> {
        match self {
            Compression::Zstd => Some("zstd"),
            Compression::Gzip => Some("gzip"),
            Compression::None => None,
        }
    }
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "msgpack" => Ok(Format::Msgpack),
            "json" => Ok(Format::Json),
            other => Err(format!(
                "unknown format {other:?} (expected msgpack or json)"
            )),
        }
    }
}

impl std::str::FromStr for Compression {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "zstd" => Ok(Compression::Zstd),
            "gzip" => Ok(Compression::Gzip),
            "none" => Ok(Compression::None),
            other => Err(format!(
                "unknown compression {other:?} (expected zstd, gzip or none)"
            )),
        }
    }
}

/// The object file extension, e.g. `msgpack.zst`, `json.gz`, `msgpack`.
pub fn file_extension(format: Format, compression: Compression) -> String {
    match compression {
        Compression::Zstd => format!("{}.zst", format.as_str()),
        Compression::Gzip => format!("{}.gz", format.as_str()),
        Compression::None => format.as_str().to_string(),
    }
}

/// zstd's level when none is set.
pub const ZSTD_DEFAULT_LEVEL: i32 = 3;

/// A streaming compressor over any writer; `finish` flushes the last frame and returns it.
pub enum Encoder<W: Write> {
    Zstd(zstd::stream::write::Encoder<'static, W>),
    Gzip(flate2::write::GzEncoder<W>),
    None(W),
}

impl<W: Write> Encoder<W> {
    /// `level` is the codec's own scale (zstd 1..=22, gzip 0..=9); `None` is the default.
    pub fn new(compression: Compression, level: Option<i32>, inner: W) -> io::Result<Self> {
        Ok(match compression {
            Compression::Zstd => Encoder::Zstd(zstd::stream::write::Encoder::new(
                inner,
                level.unwrap_or(ZSTD_DEFAULT_LEVEL),
            )?),
            Compression::Gzip => {
                let level = level.map_or(flate2::Compression::default(), |l| {
                    flate2::Compression::new(l.clamp(0, 9) as u32)
                });
                Encoder::Gzip(flate2::write::GzEncoder::new(inner, level))
            }
            Compression::None => Encoder::None(inner),
        })
    }

    pub fn finish(self) -> io::Result<W> {
        match self {
            Encoder::Zstd(e) => e.finish(),
            Encoder::Gzip(e) => e.finish(),
            Encoder::None(w) => Ok(w),
        }
    }
}

impl<W: Write> Write for Encoder<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Encoder::Zstd(e) => e.write(buf),
            Encoder::Gzip(e) => e.write(buf),
            Encoder::None(w) => w.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Encoder::Zstd(e) => e.flush(),
            Encoder::Gzip(e) => e.flush(),
            Encoder::None(w) => w.flush(),
        }
    }
}

/// Counts the bytes that pass through it, read or written: a body's size before compression
/// or after decompression.
pub struct Counting<T> {
    inner: T,
    bytes: u64,
}

impl<T> Counting<T> {
    pub fn new(inner: T) -> Self {
        Counting { inner, bytes: 0 }
    }

    /// Bytes read or written so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    pub fn get_mut(&mut self) -> &mut T {
        &mut self.inner
    }

    pub fn into_inner(self) -> T {
        self.inner
    }
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A streaming decompressor: every zstd frame and every gzip member, back to back.
pub fn decoder<'a, R: Read + Send + 'a>(
    compression: Compression,
    inner: R,
) -> io::Result<Box<dyn Read + Send + 'a>> {
    Ok(match compression {
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(inner)?),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(inner)),
        Compression::None => Box::new(inner),
    })
}

/// Decompresses a whole stored object in memory, refusing to produce more than `limit` bytes
/// ([`Error::BodyTooLarge`], which then reports `limit + 1` bytes: decompression stops there).
pub fn decompress(compression: Compression, stored: &[u8], limit: u64) -> Result<Vec<u8>, Error> {
    let mut out = Vec::new();
    decoder(compression, stored)
        .and_then(|d| d.take(limit.saturating_add(1)).read_to_end(&mut out))
        .map_err(Error::Decompress)?;
    if out.len() as u64 > limit {
        return Err(Error::BodyTooLarge {
            bytes: out.len() as u64,
            limit,
        });
    }
    Ok(out)
}

/// Writes the entries of a msgpack body (whole entries only) as `json` body lines.
pub fn write_json_lines<W: Write>(tag: &str, msgpack: &[u8], out: &mut W) -> Result<(), Error> {
    let tag: Arc<str> = tag.into();
    for e in entry::entries(msgpack) {
        let (bytes, _) = e.map_err(|e| Error::Decode(format!("msgpack entry: {e}")))?;
        let event = Event::from_entry(tag.clone(), bytes)?;
        serde_json::to_writer(&mut *out, &event.to_json()).map_err(|e| Error::Io(e.into()))?;
        out.write_all(b"\n").map_err(Error::Io)?;
    }
    Ok(())
}

/// Converts a msgpack value to JSON by the rules in this module's documentation.
pub fn to_json(v: &rmpv::Value) -> serde_json::Value {
    value_ref_to_json(&v.as_ref())
}

/// [`to_json`] for a borrowed value, such as [`Event::record`].
pub fn value_ref_to_json(v: &rmpv::ValueRef<'_>) -> serde_json::Value {
    use rmpv::ValueRef as M;
    use serde_json::Value as J;
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    match v {
        M::Nil => J::Null,
        M::Boolean(b) => J::Bool(*b),
        M::Integer(i) => match (i.as_u64(), i.as_i64()) {
            (Some(u), _) => J::from(u),
            (None, Some(s)) => J::from(s),
            _ => J::Null,
        },
        M::F32(f) => serde_json::Number::from_f64(f64::from(*f)).map_or(J::Null, J::Number),
        M::F64(f) => serde_json::Number::from_f64(*f).map_or(J::Null, J::Number),
        M::String(s) => J::String(text(s.as_bytes())),
        M::Binary(b) => J::String(text(b)),
        M::Array(items) => J::Array(items.iter().map(value_ref_to_json).collect()),
        M::Map(pairs) => J::Object(
            pairs
                .iter()
                .map(|(k, v)| {
                    let key = match k {
                        M::String(s) => text(s.as_bytes()),
                        M::Binary(b) => text(b),
                        other => value_ref_to_json(other).to_string(),
                    };
                    (key, value_ref_to_json(v))
                })
                .collect(),
        ),
        M::Ext(0, data) if data.len() == 8 => {
            let secs = u32::from_be_bytes(data[..4].try_into().expect("4 bytes"));
            let nanos = u32::from_be_bytes(data[4..].try_into().expect("4 bytes"));
            J::String(EventTime::new(i64::from(secs), nanos).to_rfc3339())
        }
        M::Ext(-1, data) if matches!(data.len(), 4 | 8 | 12) => {
            J::String(msgpack_timestamp(data).to_rfc3339())
        }
        M::Ext(ty, data) => serde_json::json!({
            "ext": ty,
            "data": base64::engine::general_purpose::STANDARD.encode(data),
        }),
    }
}

/// The msgpack timestamp extension (type -1) in its three sizes.
fn msgpack_timestamp(data: &[u8]) -> EventTime {
    match data.len() {
        4 => EventTime::new(
            i64::from(u32::from_be_bytes(data.try_into().expect("4"))),
            0,
        ),
        8 => {
            let v = u64::from_be_bytes(data.try_into().expect("8"));
            EventTime::new((v & 0x3_ffff_ffff) as i64, (v >> 34) as u32)
        }
        _ => {
            let nanos = u32::from_be_bytes(data[..4].try_into().expect("4"));
            let secs = i64::from_be_bytes(data[4..].try_into().expect("8"));
            EventTime::new(secs, nanos)
        }
    }
}

/// Converts JSON to a msgpack value (the inverse of [`to_json`] for plain JSON data).
pub fn from_json(v: serde_json::Value) -> rmpv::Value {
    use rmpv::Value as M;
    use serde_json::Value as J;
    match v {
        J::Null => M::Nil,
        J::Bool(b) => M::Boolean(b),
        J::Number(n) => {
            if let Some(u) = n.as_u64() {
                M::from(u)
            } else if let Some(i) = n.as_i64() {
                M::from(i)
            } else {
                M::F64(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        J::String(s) => M::from(s),
        J::Array(items) => M::Array(items.into_iter().map(from_json).collect()),
        J::Object(map) => M::Map(
            map.into_iter()
                .map(|(k, v)| (M::from(k), from_json(v)))
                .collect(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries() -> Vec<u8> {
        let mut bytes = Vec::new();
        for i in 0..5u32 {
            let entry = rmpv::Value::Array(vec![
                i.into(),
                rmpv::Value::Map(vec![("msg".into(), format!("line {i}").into())]),
            ]);
            rmpv::encode::write_value(&mut bytes, &entry).unwrap();
        }
        bytes
    }

    #[test]
    fn json_lines_have_a_fixed_field_order() {
        let mut bytes = Vec::new();
        entry::encode::event_time(&mut bytes, EventTime::new(0, 0));
        let mut entry = vec![0x92, 0x92];
        entry::encode::event_time(&mut entry, EventTime::new(1_763_740_800, 7));
        rmpv::encode::write_value(
            &mut entry,
            &rmpv::Value::Map(vec![("pod".into(), "web-1".into())]),
        )
        .unwrap();
        rmpv::encode::write_value(
            &mut entry,
            &rmpv::Value::Map(vec![
                ("z".into(), 1.into()),
                ("a".into(), rmpv::Value::Binary(b"raw".to_vec())),
            ]),
        )
        .unwrap();
        let mut lines = Vec::new();
        write_json_lines("app.web", &entry, &mut lines).unwrap();
        assert_eq!(
            String::from_utf8(lines).unwrap(),
            "{\"time\":\"2025-11-21T16:00:00.000000007Z\",\"tag\":\"app.web\",\
             \"record\":{\"z\":1,\"a\":\"raw\"},\"metadata\":{\"pod\":\"web-1\"}}\n"
        );
        let mut cut = Vec::new();
        assert!(write_json_lines("t", &entry[..entry.len() - 1], &mut cut).is_err());
    }

    #[test]
    fn every_compression_round_trips_and_multi_member_gzip_decodes() {
        let bytes = entries();
        for c in [Compression::Zstd, Compression::Gzip, Compression::None] {
            let mut enc = Encoder::new(c, None, Vec::new()).unwrap();
            enc.write_all(&bytes).unwrap();
            let stored = enc.finish().unwrap();
            assert_eq!(decompress(c, &stored, 1 << 20).unwrap(), bytes, "{c:?}");
            assert!(
                matches!(
                    decompress(c, &stored, 10),
                    Err(Error::BodyTooLarge { limit: 10, .. })
                ),
                "{c:?}"
            );
        }
        // Two gzip members and two zstd frames back to back.
        for c in [Compression::Gzip, Compression::Zstd] {
            let mut stored = Vec::new();
            for half in [&bytes[..10], &bytes[10..]] {
                let mut enc = Encoder::new(c, None, Vec::new()).unwrap();
                enc.write_all(half).unwrap();
                stored.extend(enc.finish().unwrap());
            }
            assert_eq!(decompress(c, &stored, 1 << 20).unwrap(), bytes, "{c:?}");
        }
        assert!(matches!(
            decompress(Compression::Zstd, b"garbage", 100),
            Err(Error::Decompress(_))
        ));
    }

    #[test]
    fn json_conversion_rules() {
        let v = rmpv::Value::Map(vec![
            (1.into(), "int key".into()),
            (
                "t".into(),
                rmpv::Value::Ext(0, vec![0, 0, 0, 1, 0, 0, 0, 2]),
            ),
            ("x".into(), rmpv::Value::Ext(7, vec![1, 2])),
            ("nan".into(), f64::NAN.into()),
            ("neg".into(), (-4).into()),
        ]);
        assert_eq!(
            to_json(&v),
            serde_json::json!({"1": "int key", "t": "1970-01-01T00:00:01.000000002Z",
                               "x": {"ext": 7, "data": "AQI="}, "nan": null, "neg": -4})
        );
    }
}
