//! Chunk bodies to S3: one PutObject up to a threshold, multipart above it, streamed from the
//! staged object file so memory does not grow with chunk size. Every request carries the
//! CRC32C of its bytes, so S3 itself rejects a corrupted upload.

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart};
use claimcheck_consumer::pointer::crc32c_base64;
use tokio::io::AsyncReadExt;
use tracing::{debug, warn};

use super::BackendError;
use crate::uploader::{ChunkStore, ObjectUpload};

/// S3 requires every part but the last to be at least 5 MiB.
pub const MIN_PART_SIZE: u64 = 5 << 20;

#[derive(Debug, Clone)]
pub struct S3Store {
    client: aws_sdk_s3::Client,
    bucket: String,
    multipart_threshold: u64,
    part_size: u64,
}

impl S3Store {
    pub fn new(
        client: aws_sdk_s3::Client,
        bucket: String,
        multipart_threshold: u64,
        part_size: u64,
    ) -> Self {
        S3Store {
            client,
            bucket,
            multipart_threshold,
            part_size: part_size.max(MIN_PART_SIZE),
        }
    }

    async fn put_single(&self, u: &ObjectUpload) -> Result<Option<String>, BackendError> {
        let body = ByteStream::from_path(&u.path)
            .await
            .map_err(|e| BackendError::local("PutObject", e))?;
        let out = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(&u.key)
            .body(body)
            .content_length(u.len as i64)
            .checksum_crc32_c(crc32c_base64(u.crc32c))
            .content_type(u.content_type)
            .set_content_encoding(u.content_encoding.map(str::to_string))
            .metadata("claimcheck-chunk-id", &u.chunk_id)
            .send()
            .await
            .map_err(|e| BackendError::from_sdk("PutObject", e))?;
        Ok(out.e_tag)
    }

    async fn put_multipart(&self, u: &ObjectUpload) -> Result<Option<String>, BackendError> {
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(&u.key)
            .checksum_algorithm(ChecksumAlgorithm::Crc32C)
            .content_type(u.content_type)
            .set_content_encoding(u.content_encoding.map(str::to_string))
            .metadata("claimcheck-chunk-id", &u.chunk_id)
            .send()
            .await
            .map_err(|e| BackendError::from_sdk("CreateMultipartUpload", e))?;
        let upload_id = created.upload_id.ok_or_else(|| {
            BackendError::local("CreateMultipartUpload", "no upload id in the response")
        })?;
        match self.upload_parts(u, &upload_id).await {
            Ok(etag) => Ok(etag),
            Err(e) => {
                // Best effort; a bucket lifecycle rule (AbortIncompleteMultipartUpload) cleans
                // up after crashes, when this cannot run.
                let abort = self
                    .client
                    .abort_multipart_upload()
                    .bucket(&self.bucket)
                    .key(&u.key)
                    .upload_id(&upload_id)
                    .send()
                    .await;
                if let Err(a) = abort {
                    warn!(key = %u.key, cause = %BackendError::from_sdk("AbortMultipartUpload", a), "cannot abort multipart upload");
                }
                Err(e)
            }
        }
    }

    async fn upload_parts(
        &self,
        u: &ObjectUpload,
        upload_id: &str,
    ) -> Result<Option<String>, BackendError> {
        let mut file = tokio::fs::File::open(&u.path)
            .await
            .map_err(|e| BackendError::local("UploadPart", e))?;
        let mut parts = Vec::new();
        let mut offset = 0u64;
        let mut number = 1i32;
        while offset < u.len {
            let size = self.part_size.min(u.len - offset) as usize;
            let mut buf = vec![0u8; size];
            file.read_exact(&mut buf)
                .await
                .map_err(|e| BackendError::local("UploadPart", e))?;
            let crc = crc32c_base64(crc32c::crc32c(&buf));
            let out = self
                .client
                .upload_part()
                .bucket(&self.bucket)
                .key(&u.key)
                .upload_id(upload_id)
                .part_number(number)
                .content_length(size as i64)
                .checksum_crc32_c(&crc)
                .body(ByteStream::from(buf))
                .send()
                .await
                .map_err(|e| BackendError::from_sdk("UploadPart", e))?;
            debug!(key = %u.key, part = number, bytes = size, "part uploaded");
            parts.push(
                CompletedPart::builder()
                    .part_number(number)
                    .set_e_tag(out.e_tag)
                    .checksum_crc32_c(crc)
                    .build(),
            );
            offset += size as u64;
            number += 1;
        }
        let out = self
            .client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(&u.key)
            .upload_id(upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| BackendError::from_sdk("CompleteMultipartUpload", e))?;
        Ok(out.e_tag)
    }
}

impl ChunkStore for S3Store {
    fn bucket(&self) -> &str {
        &self.bucket
    }

    async fn put(&self, upload: &ObjectUpload) -> Result<Option<String>, BackendError> {
        if upload.len <= self.multipart_threshold {
            self.put_single(upload).await
        } else {
            self.put_multipart(upload).await
        }
    }
}
