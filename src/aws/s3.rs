//! Chunk bodies to S3. Every request carries the CRC32C of its bytes
//! (`x-amz-checksum-crc32c`), so S3 itself rejects a corrupted upload.

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart};
use bytes::Bytes;
use claimcheck_consumer::pointer::crc32c_base64;

use super::settings::ObjectSettings;
use super::{timed, BackendError};
use crate::backends::{ChunkStore, ObjectMeta, UploadedPart};

#[derive(Debug, Clone)]
pub struct S3Store {
    client: aws_sdk_s3::Client,
    bucket: String,
    objects: ObjectSettings,
}

impl S3Store {
    /// Stores objects in `bucket`, each written with `objects`' settings.
    pub fn new(client: aws_sdk_s3::Client, bucket: String, objects: ObjectSettings) -> Self {
        S3Store {
            client,
            bucket,
            objects,
        }
    }
}

/// The settings of every object, on PutObject and CreateMultipartUpload alike (the builders
/// are of different types with the same setters).
macro_rules! with_object_settings {
    ($request:expr, $objects:expr, $meta:expr) => {{
        let o: &ObjectSettings = $objects;
        let meta: &ObjectMeta = $meta;
        let mut request = $request
            .content_type(meta.content_type)
            .set_content_encoding(meta.content_encoding.map(str::to_string))
            .metadata(crate::backends::CHUNK_ID_METADATA, &meta.chunk_id)
            .set_server_side_encryption(o.sse.clone())
            .set_ssekms_key_id(o.kms_key_id.clone())
            .set_storage_class(o.storage_class.clone())
            .set_acl(o.acl.clone())
            .set_tagging(meta.tagging.clone());
        if o.bucket_key {
            request = request.bucket_key_enabled(true);
        }
        for (k, v) in &meta.metadata {
            request = request.metadata(k, v);
        }
        request
    }};
}

impl ChunkStore for S3Store {
    fn bucket(&self) -> &str {
        &self.bucket
    }

    // Bodies go with `UNSIGNED-PAYLOAD` (the request's headers are still signed): their
    // integrity is the CRC32C checksum that S3 verifies before it stores them, and hashing
    // every body with SHA-256 for the signature cost about 0.7 CPU-seconds per GB
    // (docs/performance.md).
    async fn put_object(
        &self,
        meta: &ObjectMeta,
        body: Bytes,
        crc32c: u32,
    ) -> Result<Option<String>, BackendError> {
        let out = timed(
            false,
            "PutObject",
            with_object_settings!(
                self.client
                    .put_object()
                    .bucket(&self.bucket)
                    .key(&meta.key)
                    .content_length(body.len() as i64)
                    .body(ByteStream::from(body))
                    .checksum_crc32_c(crc32c_base64(crc32c)),
                &self.objects,
                meta
            )
            .customize()
            .disable_payload_signing()
            .send(),
        )
        .await?;
        Ok(out.e_tag)
    }

    async fn create_multipart(&self, meta: &ObjectMeta) -> Result<String, BackendError> {
        let out = timed(
            false,
            "CreateMultipartUpload",
            with_object_settings!(
                self.client
                    .create_multipart_upload()
                    .bucket(&self.bucket)
                    .key(&meta.key)
                    .checksum_algorithm(ChecksumAlgorithm::Crc32C),
                &self.objects,
                meta
            )
            .send(),
        )
        .await?;
        out.upload_id.ok_or_else(|| {
            BackendError::local("CreateMultipartUpload", "no upload id in the response")
        })
    }

    async fn upload_part(
        &self,
        meta: &ObjectMeta,
        upload_id: &str,
        number: i32,
        body: Bytes,
        crc32c: u32,
    ) -> Result<Option<String>, BackendError> {
        let out = timed(
            false,
            "UploadPart",
            self.client
                .upload_part()
                .bucket(&self.bucket)
                .key(&meta.key)
                .upload_id(upload_id)
                .part_number(number)
                .content_length(body.len() as i64)
                .checksum_crc32_c(crc32c_base64(crc32c))
                .body(ByteStream::from(body))
                .customize()
                .disable_payload_signing()
                .send(),
        )
        .await?;
        Ok(out.e_tag)
    }

    async fn complete_multipart(
        &self,
        meta: &ObjectMeta,
        upload_id: &str,
        parts: &[UploadedPart],
    ) -> Result<Option<String>, BackendError> {
        let parts = parts
            .iter()
            .map(|p| {
                CompletedPart::builder()
                    .part_number(p.number)
                    .set_e_tag(p.etag.clone())
                    .checksum_crc32_c(crc32c_base64(p.crc32c))
                    .build()
            })
            .collect();
        let out = timed(
            false,
            "CompleteMultipartUpload",
            self.client
                .complete_multipart_upload()
                .bucket(&self.bucket)
                .key(&meta.key)
                .upload_id(upload_id)
                .multipart_upload(
                    CompletedMultipartUpload::builder()
                        .set_parts(Some(parts))
                        .build(),
                )
                .send(),
        )
        .await?;
        Ok(out.e_tag)
    }

    async fn abort_multipart(
        &self,
        meta: &ObjectMeta,
        upload_id: &str,
    ) -> Result<(), BackendError> {
        let _out = timed(
            false,
            "AbortMultipartUpload",
            self.client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(&meta.key)
                .upload_id(upload_id)
                .send(),
        )
        .await?;
        Ok(())
    }
}
