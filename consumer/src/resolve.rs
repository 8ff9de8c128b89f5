//! Pointer → S3 object → verified events.

use aws_sdk_s3::operation::get_object::GetObjectError;

use crate::body;
use crate::{Error, Event, Pointer};

/// A chunk whose body was fetched, verified and decoded.
#[derive(Debug, Clone)]
pub struct ResolvedChunk {
    pub pointer: Pointer,
    pub events: Vec<Event>,
}

/// Fetches and verifies the objects pointers name.
#[derive(Debug, Clone)]
pub struct Resolver {
    s3: aws_sdk_s3::Client,
    max_body_bytes: u64,
}

impl Resolver {
    /// Bodies larger than this (decompressed) are refused unless raised with
    /// [`Resolver::max_body_bytes`]: 4 GiB.
    pub const DEFAULT_MAX_BODY_BYTES: u64 = 4 << 30;

    pub fn new(s3: aws_sdk_s3::Client) -> Self {
        Resolver {
            s3,
            max_body_bytes: Self::DEFAULT_MAX_BODY_BYTES,
        }
    }

    /// Refuse pointers whose decompressed body is larger than `limit`.
    pub fn max_body_bytes(mut self, limit: u64) -> Self {
        self.max_body_bytes = limit;
        self
    }

    /// Fetches the object, checks its size and CRC32C against the pointer, decompresses it,
    /// checks the body size and decodes the events. No event of a body that fails a check is
    /// returned.
    pub async fn resolve(&self, pointer: &Pointer) -> Result<ResolvedChunk, Error> {
        if pointer.bytes > self.max_body_bytes {
            return Err(Error::SizeMismatch {
                what: "body (over the reader's limit)",
                expected: self.max_body_bytes,
                actual: pointer.bytes,
            });
        }
        let stored = self.fetch(pointer).await?;
        let events = verify_and_decode(pointer, &stored)?;
        Ok(ResolvedChunk {
            pointer: pointer.clone(),
            events,
        })
    }

    async fn fetch(&self, p: &Pointer) -> Result<Vec<u8>, Error> {
        let out = self
            .s3
            .get_object()
            .bucket(&p.bucket)
            .key(&p.key)
            .send()
            .await
            .map_err(|e| {
                if matches!(e.as_service_error(), Some(GetObjectError::NoSuchKey(_))) {
                    Error::ObjectMissing {
                        bucket: p.bucket.clone(),
                        key: p.key.clone(),
                    }
                } else {
                    Error::S3 {
                        operation: "GetObject",
                        source: Box::new(e),
                    }
                }
            })?;
        let data = out.body.collect().await.map_err(|e| Error::S3 {
            operation: "GetObject body",
            source: Box::new(e),
        })?;
        Ok(data.to_vec())
    }
}

/// The checks and decoding of [`Resolver::resolve`] on bytes already fetched.
pub fn verify_and_decode(p: &Pointer, stored: &[u8]) -> Result<Vec<Event>, Error> {
    if stored.len() as u64 != p.stored_bytes {
        return Err(Error::SizeMismatch {
            what: "stored object",
            expected: p.stored_bytes,
            actual: stored.len() as u64,
        });
    }
    let actual = crc32c::crc32c(stored);
    if actual != p.checksum.crc32c {
        return Err(Error::ChecksumMismatch {
            expected: p.checksum.crc32c,
            actual,
        });
    }
    let body = body::decompress(p.compression, stored, p.bytes)?;
    if body.len() as u64 != p.bytes {
        return Err(Error::SizeMismatch {
            what: "decompressed body",
            expected: p.bytes,
            actual: body.len() as u64,
        });
    }
    let events = body::decode(p.format, &p.tag, &body)?;
    if events.len() as u64 != p.records {
        return Err(Error::SizeMismatch {
            what: "event count",
            expected: p.records,
            actual: events.len() as u64,
        });
    }
    Ok(events)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;
    use crate::body::{Compression, Encoder, Format};
    use crate::pointer::Checksum;
    use crate::EventTime;

    fn stored(body: &[u8]) -> (Pointer, Vec<u8>) {
        let mut enc = Encoder::new(Compression::Zstd, None, Vec::new()).unwrap();
        enc.write_all(body).unwrap();
        let stored = enc.finish().unwrap();
        let p = Pointer {
            v: 1,
            chunk_id: "00".repeat(16),
            bucket: "b".into(),
            key: "k".into(),
            tag: "t".into(),
            timekey: 0,
            first_time: EventTime::new(1, 0),
            last_time: EventTime::new(1, 0),
            records: 1,
            bytes: body.len() as u64,
            stored_bytes: stored.len() as u64,
            format: Format::Msgpack,
            compression: Compression::Zstd,
            checksum: Checksum {
                crc32c: crc32c::crc32c(&stored),
            },
            producer: "h".into(),
            created_at: "2026-01-01T00:00:00.000Z".into(),
        };
        (p, stored)
    }

    #[test]
    fn verifies_checksum_and_sizes_before_decoding() {
        let body = [0x92, 0x01, 0x81, 0xa1, b'a', 0x01];
        let (p, bytes) = stored(&body);
        assert_eq!(verify_and_decode(&p, &bytes).unwrap().len(), 1);

        let mut corrupt = bytes.clone();
        let last = corrupt.len() - 1;
        corrupt[last] ^= 0xff;
        assert!(matches!(
            verify_and_decode(&p, &corrupt),
            Err(Error::ChecksumMismatch { .. })
        ));
        assert!(matches!(
            verify_and_decode(&p, &bytes[1..]),
            Err(Error::SizeMismatch { .. })
        ));

        let mut wrong_count = p.clone();
        wrong_count.records = 2;
        assert!(matches!(
            verify_and_decode(&wrong_count, &bytes),
            Err(Error::SizeMismatch { .. })
        ));
    }
}
