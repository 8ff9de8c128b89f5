//! `--check-on-start`: can delivery write to the bucket and put to the stream, with the
//! configured credentials, regions and object settings? Each problem is one line that names the
//! setting to look at.
//!
//! * S3: CreateMultipartUpload with every object setting (encryption and its KMS key, storage
//!   class, ACL, tags, metadata) under the configured prefix, then AbortMultipartUpload. S3
//!   checks the permissions, the bucket policy and the KMS key at creation, and no object is
//!   left behind. Delivery needs both permissions already.
//! * Kinesis: DescribeStreamSummary, the one call delivery itself does not make (it needs
//!   `kinesis:DescribeStreamSummary`); the stream must be ACTIVE or UPDATING.

use aws_sdk_kinesis::types::StreamStatus;

use super::kinesis::KinesisSink;
use super::s3::S3Store;
use super::{remedy, BackendError};
use crate::backends::{ChunkStore, ObjectMeta};

/// What the check found wrong, one line each.
#[derive(Debug, Default)]
pub struct Problems(pub Vec<String>);

/// One line for a failed call: what failed, and the setting that fixes it when known.
fn line(what: &str, kinesis: bool, e: &BackendError) -> String {
    match remedy(kinesis, &e.code, &e.message) {
        Some(fix) => format!("{what}: {fix} ({e})"),
        None => format!("{what}: {e}"),
    }
}

/// Starts and aborts a multipart upload of `meta` (an object as delivery would write it).
pub async fn check_s3(store: &S3Store, meta: &ObjectMeta) -> Result<(), String> {
    let what = format!("cannot write to s3://{}/{}", store.bucket(), meta.key);
    let upload_id = store
        .create_multipart(meta)
        .await
        .map_err(|e| line(&what, false, &e))?;
    store
        .abort_multipart(meta, &upload_id)
        .await
        .map_err(|e| line(&format!("{what} (aborting the check's upload)"), false, &e))
}

/// Describes the stream and checks that it takes records.
pub async fn check_kinesis(sink: &KinesisSink) -> Result<(), String> {
    let what = format!("cannot put to the Kinesis stream {}", sink.stream());
    let status = sink.status().await.map_err(|e| line(&what, true, &e))?;
    match status {
        StreamStatus::Active | StreamStatus::Updating => Ok(()),
        other => Err(format!(
            "{what}: --kinesis-stream: the stream is {}, not ACTIVE",
            other.as_str()
        )),
    }
}

/// Both checks.
pub async fn check(store: &S3Store, meta: &ObjectMeta, sink: &KinesisSink) -> Problems {
    let (s3, kinesis) = tokio::join!(check_s3(store, meta), check_kinesis(sink));
    Problems([s3.err(), kinesis.err()].into_iter().flatten().collect())
}
