//! Classifying SDK errors: can a retry help, or must an operator act?

use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};

pub use crate::backends::BackendError;

/// Service error codes that need an operator (credentials, permissions, missing resources).
const NEEDS_OPERATOR: &[&str] = &[
    "AccessDenied",
    "AccessDeniedException",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "UnrecognizedClientException",
    "NoSuchBucket",
    "ResourceNotFoundException",
    "InvalidArgumentException",
    "ValidationException",
    "KMSAccessDeniedException",
    "KMSDisabledException",
    "KMSNotFoundException",
];

/// Whether an error code is one that retrying alone will not fix. Also for the per-record
/// codes of PutRecords (`KMSAccessDeniedException`…), which arrive inside a successful call.
pub fn needs_operator(code: &str) -> bool {
    NEEDS_OPERATOR.contains(&code)
}

impl BackendError {
    pub fn from_sdk<E, R>(operation: &'static str, err: SdkError<E, R>) -> Self
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
        R: std::fmt::Debug,
    {
        let (code, retryable) = match &err {
            SdkError::ServiceError(e) => {
                let code = e.err().code().unwrap_or("unknown").to_string();
                let retryable = !needs_operator(&code);
                (code, retryable)
            }
            SdkError::TimeoutError(_) => ("timeout".into(), true),
            SdkError::DispatchFailure(_) => ("dispatch".into(), true),
            SdkError::ResponseError(_) => ("response".into(), true),
            // Building the request failed: a configuration problem such as a missing region.
            SdkError::ConstructionFailure(_) => ("construction".into(), false),
            _ => ("unknown".into(), true),
        };
        let message = match &err {
            SdkError::ServiceError(e) => e
                .err()
                .message()
                .map(str::to_string)
                .unwrap_or_else(|| e.err().to_string()),
            other => {
                std::error::Error::source(other).map_or_else(|| other.to_string(), error_chain)
            }
        };
        BackendError {
            operation,
            code,
            message,
            retryable,
        }
    }

    /// An error of our own around an AWS call (reading the staged file, a bad response).
    pub fn local(operation: &'static str, message: impl ToString) -> Self {
        BackendError {
            operation,
            code: "local".into(),
            message: message.to_string(),
            retryable: true,
        }
    }
}

/// "outer: inner: innermost", so that "dispatch failure" says why (connection refused…).
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let s = e.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = e.source();
    }
    out
}
