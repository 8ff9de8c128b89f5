//! A body larger than the multipart threshold goes to S3 as a multipart upload, part by part
//! while it is being compressed.

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tracing::debug;

use super::body::{join, BodySummary};
use super::error::UploadError;
use super::sink::{PartDone, Piece};
use crate::backends::{ChunkStore, ObjectMeta, UploadedPart};

/// Sends parts as the body is built; aborts the upload on any error.
pub(super) async fn multipart<S: ChunkStore>(
    store: &S,
    meta: &ObjectMeta,
    first: (Bytes, PartDone),
    pieces: &mut mpsc::Receiver<Piece>,
    build: tokio::task::JoinHandle<Result<BodySummary, UploadError>>,
) -> Result<(Option<String>, BodySummary), UploadError> {
    let upload_id = store.create_multipart(meta).await?;
    let mut parts = Vec::new();
    let result = async {
        let mut next = Some(first);
        while let Some((body, done)) = next.take() {
            let number = parts.len() as i32 + 1;
            let crc = claimcheck_consumer::crc::crc32c(&body);
            let size = body.len();
            let etag = store
                .upload_part(meta, &upload_id, number, body, crc)
                .await?;
            // The compressing thread may go on to the part after next.
            drop(done);
            debug!(key = %meta.key, part = number, bytes = size, "part uploaded");
            parts.push(UploadedPart {
                number,
                etag,
                crc32c: crc,
            });
            next = match pieces.recv().await {
                Some(Piece::Part(b, done)) => Some((b, done)),
                Some(Piece::Whole(b)) => Some((b, oneshot::channel().0)),
                None => None,
            };
        }
        let summary = join(build).await?;
        let etag = store.complete_multipart(meta, &upload_id, &parts).await?;
        Ok((etag, summary))
    }
    .await;
    if result.is_err() {
        // Best effort; a bucket lifecycle rule (AbortIncompleteMultipartUpload) cleans up
        // after crashes, when this cannot run. At debug: with S3 down it fails on every retry,
        // and the outage reporter already says that S3 fails.
        if let Err(e) = store.abort_multipart(meta, &upload_id).await {
            debug!(key = %meta.key, cause = %e, "cannot abort a multipart upload");
        }
    }
    result
}
