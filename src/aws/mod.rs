//! The only users of the AWS SDK: client set-up, and the S3 and Kinesis implementations of
//! [`ChunkStore`](crate::backends::ChunkStore) and [`PointerSink`](crate::backends::PointerSink).
//!
//! Settings come from the standard chain: environment, profile, web identity (IRSA), ECS and
//! IMDS credentials, `AWS_REGION`, `AWS_ENDPOINT_URL` / `AWS_ENDPOINT_URL_S3` /
//! `AWS_ENDPOINT_URL_KINESIS`. When an endpoint is overridden (LocalStack, moto, MinIO) S3 uses
//! path-style addressing, since emulators rarely resolve virtual-host bucket names.

pub mod check;
mod error;
pub mod kinesis;
pub mod s3;
pub mod settings;

use std::time::Duration;

use aws_config::sts::AssumeRoleProvider;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_credential_types::provider::SharedCredentialsProvider;
use aws_sdk_s3::error::SdkError;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;
pub use error::{explain, needs_operator, remedy, BackendError};
use settings::Access;

/// Loads the AWS configuration of one destination: the standard chain, with `access`'s
/// region and a role assumed on top of the chain's credentials (refreshed before they
/// expire). Never fails: a missing region or credentials, or a role that cannot be assumed,
/// show up as errors of the first calls, which are retried, so the sidecar starts without AWS.
pub async fn load_config(access: &Access) -> SdkConfig {
    let timeouts = TimeoutConfig::builder()
        .connect_timeout(Duration::from_secs(5))
        .read_timeout(Duration::from_secs(60))
        .operation_attempt_timeout(Duration::from_secs(120))
        .build();
    let mut loader = aws_config::defaults(BehaviorVersion::latest()).timeout_config(timeouts);
    if let Some(region) = &access.region {
        loader = loader.region(Region::new(region.clone()));
    }
    let config = loader.load().await;
    if config.region().is_none() {
        tracing::warn!("no AWS region is configured (set AWS_REGION, --s3-region or --kinesis-region); S3 and Kinesis calls will fail until one is");
    }
    let Some(role) = &access.role else {
        return config;
    };
    let mut provider = AssumeRoleProvider::builder(&role.arn)
        .configure(&config)
        .session_name(&role.session_name);
    if let Some(id) = &role.external_id {
        provider = provider.external_id(id);
    }
    let provider = provider.build().await;
    config
        .into_builder()
        .credentials_provider(SharedCredentialsProvider::new(provider))
        .build()
}

/// The configurations of S3 and Kinesis: one, shared (credentials, an assumed role's session
/// and its refreshes included), when both destinations are reached the same way.
pub async fn load_configs(s3: &Access, kinesis: &Access) -> (SdkConfig, SdkConfig) {
    let s3_config = load_config(s3).await;
    let kinesis_config = match kinesis == s3 {
        true => s3_config.clone(),
        false => load_config(kinesis).await,
    };
    (s3_config, kinesis_config)
}

/// Awaits an SDK call, recording its duration and its error code if it failed in the metrics.
async fn timed<T, E, R>(
    kinesis: bool,
    operation: &'static str,
    call: impl std::future::Future<Output = Result<T, SdkError<E, R>>>,
) -> Result<T, BackendError>
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    let started = std::time::Instant::now();
    let result = call.await.map_err(|e| BackendError::from_sdk(operation, e));
    match &result {
        Ok(_) => error::succeeded(kinesis, started),
        Err(e) => error::explain(kinesis, operation, &e.code, &e.message),
    }
    let code = result.as_ref().err().map(|e| e.code.as_str());
    crate::metrics::metrics().aws_call(kinesis, operation, started.elapsed(), code);
    result
}

/// The endpoint override configured for a service, if any: its own variable, then
/// `AWS_ENDPOINT_URL`, then the SDK config's.
fn endpoint_url(config: &SdkConfig, service_variable: &str) -> Option<String> {
    let set = |v: &str| std::env::var(v).ok().filter(|s| !s.is_empty());
    set(service_variable)
        .or_else(|| set("AWS_ENDPOINT_URL"))
        .or_else(|| config.endpoint_url().map(str::to_string))
}

/// True when Kinesis is reached at an endpoint outside AWS's own domains: an emulator, most
/// likely. VPC interface and FIPS endpoints, overridden as they may be, are under
/// `amazonaws.com`.
pub fn kinesis_endpoint_is_emulator(config: &SdkConfig) -> bool {
    endpoint_url(config, "AWS_ENDPOINT_URL_KINESIS").is_some_and(|url| !is_aws_host(&url))
}

/// Whether the host of `url` is in one of AWS's domains.
fn is_aws_host(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let host = rest
        .split(['/', ':', '?'])
        .next()
        .unwrap_or_default()
        .trim_end_matches('.')
        .to_ascii_lowercase();
    ["amazonaws.com", "amazonaws.com.cn", "api.aws"]
        .iter()
        .any(|domain| host == *domain || host.ends_with(&format!(".{domain}")))
}

/// An S3 client; path-style when an endpoint is overridden.
pub fn s3_client(config: &SdkConfig) -> aws_sdk_s3::Client {
    let s3 = aws_sdk_s3::config::Builder::from(config)
        .force_path_style(endpoint_url(config, "AWS_ENDPOINT_URL_S3").is_some())
        .build();
    aws_sdk_s3::Client::from_conf(s3)
}

pub fn kinesis_client(config: &SdkConfig) -> aws_sdk_kinesis::Client {
    aws_sdk_kinesis::Client::new(config)
}

#[cfg(test)]
mod tests {
    use super::is_aws_host;

    #[test]
    fn aws_hosts_are_told_from_emulators() {
        for aws in [
            "https://kinesis.eu-west-1.amazonaws.com",
            "https://vpce-0a1b2c3d-e4f5.kinesis.us-east-1.vpce.amazonaws.com/",
            "https://kinesis-fips.us-gov-west-1.amazonaws.com:443",
            "https://kinesis.cn-north-1.amazonaws.com.cn",
            "https://kinesis.us-east-1.api.aws",
        ] {
            assert!(is_aws_host(aws), "{aws}");
        }
        for emulator in [
            "http://127.0.0.1:5000",
            "http://localhost:4566",
            "http://moto:5000",
            "http://[::1]:5000",
            "https://notamazonaws.com",
            "https://amazonaws.com.example.org",
        ] {
            assert!(!is_aws_host(emulator), "{emulator}");
        }
    }
}
