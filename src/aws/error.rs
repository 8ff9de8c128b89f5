//! Classifying SDK errors: can a retry help, or must an operator act?

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;

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

/// The remedy for a call that failed for want of a region, as construction or dispatch.
const NO_REGION: &str = "no region: set AWS_REGION, --s3-region or --kinesis-region";

/// What an operator should change for an error that retrying alone will not fix: the setting
/// to look at first, and why. `None` for errors that heal by themselves (throttling, 5xx,
/// timeouts) or that we cannot tell apart.
pub fn remedy(kinesis: bool, code: &str, message: &str) -> Option<&'static str> {
    let kms = message.contains("KMS") || message.contains("kms");
    let credentials = message.contains("credentials") || message.contains("AssumeRole");
    Some(match (kinesis, code) {
        (_, "ExpiredToken" | "ExpiredTokenException" | "TokenRefreshRequired" | "RequestExpired") => {
            "the credentials expired: with --role-arn they are renewed before expiry; otherwise renew what the standard chain reads (AWS_SESSION_TOKEN, the profile, the web identity token)"
        }
        (_, "InvalidAccessKeyId" | "UnrecognizedClientException" | "InvalidClientTokenId" | "SignatureDoesNotMatch") => {
            "the credentials are not valid in this account or partition: check the standard chain's credentials and --role-arn"
        }
        (false, "AccessDenied") if kms => {
            "--s3-sse-kms-key-id: the key's policy must let this role use it (kms:GenerateDataKey, kms:Decrypt), and the key must be in the bucket's region"
        }
        (false, "AccessDenied") => {
            "--s3-role-arn / --role-arn: the role needs s3:PutObject on the bucket (and s3:PutObjectTagging with --s3-object-tags, s3:PutObjectAcl with --s3-acl, s3:AbortMultipartUpload); a bucket policy may also require --s3-sse, --s3-sse-kms-key-id or --s3-acl bucket-owner-full-control"
        }
        (false, "KMS.DisabledException" | "KMS.KMSInvalidStateException" | "KMSDisabledException" | "KMSInvalidStateException") => {
            "--s3-sse-kms-key-id: the KMS key is disabled or pending deletion; enable it or name another key"
        }
        (false, "KMS.NotFoundException" | "KMSNotFoundException" | "KMS.InvalidKeyUsageException") => {
            "--s3-sse-kms-key-id: no such symmetric KMS key in the bucket's region"
        }
        (false, "InvalidStorageClass") => {
            "--s3-storage-class: this bucket does not take that storage class (directory buckets take EXPRESS_ONEZONE only)"
        }
        (false, "PermanentRedirect" | "AuthorizationHeaderMalformed" | "IllegalLocationConstraintException" | "301") => {
            "--s3-region: the bucket is in another region; set --s3-region to the bucket's region"
        }
        (false, "NoSuchBucket") => "--s3-bucket: no such bucket (in this account and --s3-region)",
        (false, "InvalidArgument") => {
            "--s3-sse / --s3-sse-kms-key-id / --s3-acl / --s3-object-tags / --s3-metadata: S3 refused one of the object settings"
        }
        (false, "KeyTooLongError") => {
            "--s3-prefix / --s3-object-key-format: the object key is over S3's 1,024 bytes (a long tag in ${tag})"
        }
        (false, "MetadataTooLarge") => {
            "--s3-metadata: the object's user metadata is over S3's 2 KB (a long tag in ${tag})"
        }
        (false, "AccessControlListNotSupported") => {
            "--s3-acl: the bucket has ACLs disabled (BucketOwnerEnforced); remove --s3-acl"
        }
        (true, "ResourceNotFoundException") => {
            "--kinesis-stream / --kinesis-region: no such stream in this account and region"
        }
        (true, "AccessDeniedException") => {
            "--kinesis-role-arn / --role-arn: the role needs kinesis:PutRecords on the stream (and kms:GenerateDataKey on its key if the stream is encrypted)"
        }
        (true, "KMSAccessDeniedException" | "KMSDisabledException" | "KMSNotFoundException" | "KMSInvalidStateException" | "KMSOptInRequired") => {
            "the stream's KMS key is not usable by this role (kms:GenerateDataKey), or is disabled or gone"
        }
        (_, "credentials") => {
            "no AWS credentials: the standard chain (environment, profile, web identity / IRSA, ECS task role, instance profile) found none, or --role-arn / --s3-role-arn / --kinesis-role-arn (with --external-id, --role-session-name) could not be assumed"
        }
        (_, "construction" | "dispatch") if credentials => {
            "--role-arn / --external-id / --role-session-name: no credentials (the role cannot be assumed, or the standard chain has none)"
        }
        (_, "construction") if message.contains("region") => NO_REGION,
        (_, "dispatch") if message.contains("region must be set") => NO_REGION,
        _ => return None,
    })
}

/// Causes already explained in the log, by service (S3 false, Kinesis true) and code, with
/// when each was last refused.
#[derive(Debug, Default)]
struct Explained(BTreeMap<(bool, String), Instant>);

impl Explained {
    /// A call was refused for `code` at `now`: true if this cause is not explained yet.
    fn refused(&mut self, kinesis: bool, code: &str, now: Instant) -> bool {
        self.0.insert((kinesis, code.to_string()), now).is_none()
    }

    /// A call started at `started` succeeded: the service's causes last refused before that
    /// are taken as fixed, and explained again should they come back. A call already under
    /// way at a refusal (it passed before the cause appeared, or between two refusals) says
    /// nothing about whether the cause is gone; with several uploads in flight such calls
    /// often finish just after the first refusal.
    fn succeeded(&mut self, kinesis: bool, started: Instant) {
        self.0
            .retain(|(k, _), last| *k != kinesis || *last > started);
    }
}

static EXPLAINED: Mutex<Explained> = Mutex::new(Explained(BTreeMap::new()));

/// Logs, once per cause, an error that needs an operator with the setting that fixes it (the
/// chunk is retried all the same). A cause is explained again if it comes back after a call
/// to the same service, started after the cause's last refusal, succeeded.
pub fn explain(kinesis: bool, operation: &str, code: &str, message: &str) {
    let Some(fix) = remedy(kinesis, code, message) else {
        return;
    };
    let first =
        EXPLAINED
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .refused(kinesis, code, Instant::now());
    if first {
        let service = if kinesis { "Kinesis" } else { "S3" };
        tracing::error!(
            service,
            operation,
            code,
            cause = message,
            fix,
            "{service} {operation} failed (retried until this is fixed): {fix}"
        );
    }
}

/// A call to `kinesis` (or S3), started at `started`, succeeded.
pub fn succeeded(kinesis: bool, started: Instant) {
    let mut explained = EXPLAINED.lock().unwrap_or_else(|e| e.into_inner());
    if !explained.0.is_empty() {
        explained.succeeded(kinesis, started);
    }
}

/// Whether an error code is one that retrying alone will not fix: those above, and every code
/// [`remedy`] names a setting for (in either service). Also for the per-record codes of
/// PutRecords (`KMSAccessDeniedException`…), which arrive inside a successful call.
pub fn needs_operator(code: &str) -> bool {
    NEEDS_OPERATOR.contains(&code)
        || [false, true]
            .into_iter()
            .any(|kinesis| remedy(kinesis, code, "").is_some())
}

impl BackendError {
    pub fn from_sdk<E, R>(operation: &'static str, err: SdkError<E, R>) -> Self
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
        R: std::fmt::Debug,
    {
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
        // No credentials to sign with arrive as a dispatch (or construction) failure; they are
        // told apart, for the alerts and the log's level: retrying alone will not bring them.
        let no_credentials = message.contains("loading credentials")
            || message.contains("no credentials")
            || message.contains("credential provider");
        let (code, retryable) = match &err {
            SdkError::ServiceError(e) => {
                let code = e.err().code().unwrap_or("unknown").to_string();
                let retryable = !needs_operator(&code);
                (code, retryable)
            }
            SdkError::DispatchFailure(_) | SdkError::ConstructionFailure(_) if no_credentials => {
                ("credentials".into(), false)
            }
            SdkError::TimeoutError(_) => ("timeout".into(), true),
            SdkError::DispatchFailure(_) => ("dispatch".into(), true),
            SdkError::ResponseError(_) => ("response".into(), true),
            // Building the request failed: a configuration problem such as a missing region.
            SdkError::ConstructionFailure(_) => ("construction".into(), false),
            _ => ("unknown".into(), true),
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn what_has_a_remedy_needs_an_operator_and_what_heals_does_not() {
        for code in [
            "InvalidClientTokenId",
            "KMS.DisabledException",
            "PermanentRedirect",
            "AccessControlListNotSupported",
            "InvalidStorageClass",
            "KeyTooLongError",
            "MetadataTooLarge",
            "KMSOptInRequired",
            "ValidationException",
            "credentials",
        ] {
            assert!(needs_operator(code), "{code}");
        }
        for code in [
            "SlowDown",
            "ThrottlingException",
            "ProvisionedThroughputExceededException",
            "InternalError",
            "ServiceUnavailable",
            "timeout",
            "dispatch",
            "local",
        ] {
            assert!(!needs_operator(code), "{code}");
        }
    }

    #[test]
    fn a_cause_is_explained_again_only_after_a_call_started_since_it_succeeded() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut explained = Explained::default();
        assert!(explained.refused(false, "PermanentRedirect", at(10)));
        assert!(!explained.refused(false, "PermanentRedirect", at(20)));
        // Under way before the last refusal: the cause may still be there.
        explained.succeeded(false, at(15));
        assert!(!explained.refused(false, "PermanentRedirect", at(30)));
        // The other service's success says nothing about S3.
        explained.succeeded(true, at(40));
        assert!(!explained.refused(false, "PermanentRedirect", at(50)));
        // Started after the last refusal and succeeded: fixed, so a return is explained.
        assert!(explained.refused(true, "AccessDeniedException", at(55)));
        explained.succeeded(false, at(60));
        assert!(explained.refused(false, "PermanentRedirect", at(70)));
        assert!(!explained.refused(true, "AccessDeniedException", at(80)));
    }
}
