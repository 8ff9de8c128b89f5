//! Why an upload attempt fails, and what the outage reporter hears of it.

use std::io;

use crate::aws::BackendError;
use crate::buffer::chunk::ReadError;
use crate::outage::Failure;

/// What the outage reporter hears of a failed upload.
impl From<&UploadError> for Failure {
    fn from(e: &UploadError) -> Failure {
        let code = match e {
            UploadError::Store(b) => return Failure::from(b),
            UploadError::Read(_) => "read",
            UploadError::Body(_) => "body",
            UploadError::State(_) => "state",
        };
        Failure {
            code: code.into(),
            cause: e.to_string(),
            retryable: e.is_retryable(),
        }
    }
}

/// Why an upload attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("cannot read chunk: {0}")]
    Read(#[from] ReadError),
    #[error("cannot build the object: {0}")]
    Body(#[source] io::Error),
    #[error(transparent)]
    Store(#[from] BackendError),
    #[error("cannot record the upload: {0}")]
    State(#[source] io::Error),
}

impl UploadError {
    /// The chunk file itself is damaged: no retry can help.
    pub fn is_damaged(&self) -> bool {
        matches!(
            self,
            UploadError::Read(
                ReadError::BadMagic | ReadError::BadHeader(_) | ReadError::BadFrame { .. }
            )
        )
    }

    /// Whether retrying alone can help (access denied or a missing bucket will not heal).
    pub fn is_retryable(&self) -> bool {
        match self {
            UploadError::Store(e) => e.retryable,
            other => !other.is_damaged(),
        }
    }
}
