//! The one public error type of the crate.

use std::error::Error as StdError;

use aws_smithy_types::error::display::DisplayErrorContext;

/// Everything that can go wrong between a pointer record and its events.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The record is not a pointer (bad JSON, a missing or ill-typed field).
    #[error("malformed pointer: {0}")]
    MalformedPointer(#[source] serde_json::Error),
    /// The pointer was written by a newer producer than this crate understands.
    #[error("pointer version {version} is newer than this reader understands (1)")]
    UnsupportedVersion { version: u64 },
    /// The object the pointer names does not exist (deleted by someone else, or wrong bucket).
    #[error("object s3://{bucket}/{key} is missing")]
    ObjectMissing { bucket: String, key: String },
    /// The stored object's CRC32C is not the pointer's: the object was changed or damaged.
    #[error("checksum mismatch: pointer says crc32c {expected:08x}, object has {actual:08x}")]
    ChecksumMismatch { expected: u32, actual: u32 },
    /// A size recorded in the pointer does not match what was read.
    #[error("{what} is {actual} bytes, expected {expected}")]
    SizeMismatch {
        what: &'static str,
        expected: u64,
        actual: u64,
    },
    /// The body could not be decompressed.
    #[error("cannot decompress body: {0}")]
    Decompress(#[source] std::io::Error),
    /// The decompressed body is not valid in its format.
    #[error("cannot decode body: {0}")]
    Decode(String),
    /// A call to S3 failed.
    #[error("s3 {operation} failed: {}", DisplayErrorContext(&**source))]
    S3 {
        operation: &'static str,
        #[source]
        source: Box<dyn StdError + Send + Sync>,
    },
    /// A call to Kinesis failed.
    #[error("kinesis {operation} failed: {}", DisplayErrorContext(&**source))]
    Kinesis {
        operation: &'static str,
        #[source]
        source: Box<dyn StdError + Send + Sync>,
    },
    /// Local I/O failed.
    #[error("i/o error: {0}")]
    Io(#[source] std::io::Error),
}
