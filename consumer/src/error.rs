//! The one public error type of the crate.

use std::error::Error as StdError;

#[cfg(feature = "aws")]
use aws_smithy_types::error::display::DisplayErrorContext;

/// An error and its sources, for messages: the SDK's own rendering when it is there.
#[cfg(not(feature = "aws"))]
struct DisplayErrorContext<'a, E: ?Sized>(&'a E);

#[cfg(not(feature = "aws"))]
impl<E: StdError + ?Sized> std::fmt::Display for DisplayErrorContext<'_, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(e) = source {
            write!(f, ": {e}")?;
            source = e.source();
        }
        Ok(())
    }
}

/// A boxed error source, as kept by the AWS and checkpoint variants.
pub type BoxError = Box<dyn StdError + Send + Sync>;

/// Everything that can go wrong between a pointer record and its events.
///
/// Errors about one pointer or its object ([`Error::is_chunk_error`]) leave other pointers
/// unaffected: a reader can skip the pointer or stop. The AWS variants keep the SDK error as
/// their [`source`](StdError::source), so callers can downcast it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The record is not a pointer (bad JSON, a missing or ill-typed field).
    #[error("malformed pointer: {0}")]
    MalformedPointer(#[source] serde_json::Error),
    /// The pointer was written by a newer producer than this crate understands.
    #[error("pointer version {version} is newer than this reader understands (2)")]
    UnsupportedVersion { version: u64 },
    /// The object the pointer names does not exist (deleted by someone else, or wrong bucket).
    #[error("object s3://{bucket}/{key} is missing")]
    ObjectMissing { bucket: String, key: String },
    /// The object was replaced between the read that verified it and the read that decoded it
    /// (see [`Verification::BeforeEvents`](crate::Verification::BeforeEvents)), three times
    /// in a row.
    #[error("object s3://{bucket}/{key} changed while it was being read")]
    ObjectChanged { bucket: String, key: String },
    /// The stored object's CRC32C is not the pointer's: the object was changed or damaged.
    #[error("checksum mismatch: pointer says crc32c {expected:08x}, object has {actual:08x}")]
    ChecksumMismatch { expected: u32, actual: u32 },
    /// A size recorded in the pointer does not match what was read.
    #[error("{what} is {actual}, the pointer says {expected}")]
    SizeMismatch {
        /// `"stored object bytes"`, `"inline body bytes"`, `"decompressed body bytes"` or
        /// `"event count"`.
        what: &'static str,
        expected: u64,
        actual: u64,
    },
    /// The pointer's body is larger than the resolver accepts
    /// ([`Resolver::max_body_bytes`](crate::Resolver::max_body_bytes)).
    #[error("body of {bytes} bytes is over this reader's limit of {limit}")]
    BodyTooLarge { bytes: u64, limit: u64 },
    /// The body could not be decompressed.
    #[error("cannot decompress body: {0}")]
    Decompress(#[source] std::io::Error),
    /// The decompressed body is not valid in its format.
    #[error("cannot decode body: {0}")]
    Decode(String),
    /// A record does not deserialize into the type asked for
    /// ([`Event::deserialize_record`](crate::Event::deserialize_record)).
    #[error("record does not deserialize: {0}")]
    Deserialize(#[source] BoxError),
    /// A call to S3 failed (after the SDK's own retries).
    #[error("s3 {operation} failed: {}", DisplayErrorContext(&**source))]
    S3 {
        operation: &'static str,
        #[source]
        source: BoxError,
    },
    /// A call to Kinesis failed (after the SDK's own retries).
    #[error("kinesis {operation} failed: {}", DisplayErrorContext(&**source))]
    Kinesis {
        operation: &'static str,
        #[source]
        source: BoxError,
    },
    /// A call to DynamoDB failed (`DynamoDbCheckpointStore`, feature `dynamodb`).
    #[error("dynamodb {operation} failed: {}", DisplayErrorContext(&**source))]
    DynamoDb {
        operation: &'static str,
        #[source]
        source: BoxError,
    },
    /// A checkpoint could not be loaded or saved, or does not fit the stream.
    #[error("checkpoint: {reason}")]
    Checkpoint {
        reason: String,
        #[source]
        source: Option<BoxError>,
    },
    /// Local I/O failed.
    #[error("i/o error: {0}")]
    Io(#[source] std::io::Error),
    /// [`Delivery::events`](crate::Delivery::events) called again after it, or
    /// [`Delivery::next_event`](crate::Delivery::next_event), handed out an error: the error
    /// said again, so that a second call cannot pass for a chunk read and verified.
    #[error("this delivery failed already: {message}")]
    Failed {
        message: String,
        /// Whether the first error was a chunk error ([`Error::is_chunk_error`]).
        chunk_error: bool,
    },
}

impl Error {
    /// True when the error is about one pointer or its object — not a pointer, object missing
    /// or changed, damaged, undecodable — so reading it again will fail the same way, whatever
    /// reads it. Such a pointer can be skipped; everything else may succeed when retried.
    ///
    /// Not chunk errors: [`Error::UnsupportedVersion`] and [`Error::BodyTooLarge`] are about
    /// this reader (a pointer from a newer sidecar, a body over its `max_body_bytes`): a newer
    /// reader, or one with a higher limit, reads the chunk, so skipping it would lose it. So
    /// are AWS calls, checkpoints and local I/O, which may succeed when retried.
    pub fn is_chunk_error(&self) -> bool {
        if let Error::Failed { chunk_error, .. } = self {
            return *chunk_error;
        }
        matches!(
            self,
            Error::MalformedPointer(_)
                | Error::ObjectMissing { .. }
                | Error::ObjectChanged { .. }
                | Error::ChecksumMismatch { .. }
                | Error::SizeMismatch { .. }
                | Error::Decompress(_)
                | Error::Decode(_)
        )
    }

    #[cfg(feature = "aws")]
    pub(crate) fn checkpoint(reason: impl Into<String>, source: impl Into<BoxError>) -> Error {
        Error::Checkpoint {
            reason: reason.into(),
            source: Some(source.into()),
        }
    }
}
