//! What delivery needs from S3 and Kinesis, as two traits: [`ChunkStore`] (bodies) and
//! [`PointerSink`] (pointer records), with the types they speak. The uploader and the publisher
//! are written against these; `aws::s3` and `aws::kinesis` implement them for AWS, and
//! `testing` in memory.

use std::future::Future;

use bytes::Bytes;

/// A call to a backend (S3, Kinesis) failed. (`aws` classifies the SDK's errors into it.)
#[derive(Debug, thiserror::Error)]
#[error("{operation} failed ({code}): {message}")]
pub struct BackendError {
    pub operation: &'static str,
    /// The service's error code, or a transport class (`dispatch`, `timeout`, `response`).
    pub code: String,
    pub message: String,
    /// False for errors that retrying alone will not fix (access denied, missing bucket or
    /// stream, bad request): the sidecar still retries, but logs them at ERROR.
    pub retryable: bool,
}

/// S3 requires every part but the last to be at least 5 MiB.
pub const MIN_PART_SIZE: u64 = 5 << 20;

/// The name of the user metadata (`x-amz-meta-*`) that holds an object's chunk id.
pub const CHUNK_ID_METADATA: &str = "claimcheck-chunk-id";

/// What is stored, besides the bytes.
#[derive(Debug, Clone)]
pub struct ObjectMeta {
    pub key: String,
    pub content_type: &'static str,
    pub content_encoding: Option<&'static str>,
    pub chunk_id: String,
    /// `x-amz-tagging`: URL-encoded `key=value&…`.
    pub tagging: Option<String>,
    /// User metadata (`x-amz-meta-*`) besides the chunk id.
    pub metadata: Vec<(String, String)>,
}

/// A part of a multipart upload, as S3 confirmed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadedPart {
    pub number: i32,
    pub etag: Option<String>,
    pub crc32c: u32,
}

/// Where chunk bodies are stored (S3 in production, a fake in tests). Every call carries the
/// CRC32C of its bytes, for the store to verify. Writing an existing key replaces the object.
pub trait ChunkStore: Send + Sync + 'static {
    fn bucket(&self) -> &str;
    /// Stores a whole object; returns its ETag.
    fn put_object(
        &self,
        meta: &ObjectMeta,
        body: Bytes,
        crc32c: u32,
    ) -> impl Future<Output = Result<Option<String>, BackendError>> + Send;
    /// Starts a multipart upload; returns its upload id.
    fn create_multipart(
        &self,
        meta: &ObjectMeta,
    ) -> impl Future<Output = Result<String, BackendError>> + Send;
    /// Stores part `number` (from 1); returns its ETag.
    fn upload_part(
        &self,
        meta: &ObjectMeta,
        upload_id: &str,
        number: i32,
        body: Bytes,
        crc32c: u32,
    ) -> impl Future<Output = Result<Option<String>, BackendError>> + Send;
    fn complete_multipart(
        &self,
        meta: &ObjectMeta,
        upload_id: &str,
        parts: &[UploadedPart],
    ) -> impl Future<Output = Result<Option<String>, BackendError>> + Send;
    fn abort_multipart(
        &self,
        meta: &ObjectMeta,
        upload_id: &str,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;
}

/// One record to put.
#[derive(Debug, Clone)]
pub struct PointerRecord {
    pub partition_key: String,
    pub data: Bytes,
}

/// What happened to one record of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryResult {
    Accepted {
        shard_id: String,
        sequence_number: String,
    },
    Failed {
        code: String,
        message: String,
    },
}

/// Where pointer records go (Kinesis in production, a fake in tests).
pub trait PointerSink: Send + Sync + 'static {
    /// Puts a batch; on success, one result per record, in order.
    fn put_records(
        &self,
        records: &[PointerRecord],
    ) -> impl Future<Output = Result<Vec<EntryResult>, BackendError>> + Send;
}
