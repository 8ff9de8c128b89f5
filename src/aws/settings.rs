//! How the sidecar reaches AWS as a company runs it: a region and an assumed role per
//! destination (S3 and Kinesis may live in other accounts and regions than the sidecar), and
//! the settings every object is written with (encryption, storage class, ACL, tags, metadata).
//!
//! Everything not set here comes from the SDK's standard chain, which also covers what needs
//! no flag: `HTTPS_PROXY` / `NO_PROXY`, `AWS_USE_FIPS_ENDPOINT`, `AWS_USE_DUALSTACK_ENDPOINT`,
//! `AWS_STS_REGIONAL_ENDPOINTS`, `AWS_ENDPOINT_URL_STS` and the other endpoint variables (VPC
//! endpoints), web identity (IRSA) and ECS task roles.

use aws_sdk_s3::types::{ObjectCannedAcl, ServerSideEncryption, StorageClass};

/// Credentials and regions: `serve`, `tail` and `resolve` take the same flags.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct AccessArgs {
    /// IAM role to assume (STS AssumeRole) on top of the standard credentials chain, for both
    /// S3 and Kinesis unless `s3_role_arn` / `kinesis_role_arn` say otherwise. The assumed
    /// credentials are refreshed before they expire.
    #[arg(long, env = "CLAIMCHECK_ROLE_ARN")]
    pub role_arn: Option<String>,

    /// External id to pass when assuming a role (the trust policy's `sts:ExternalId`).
    #[arg(long, env = "CLAIMCHECK_EXTERNAL_ID", hide_env_values = true)]
    pub external_id: Option<String>,

    /// Session name of assumed roles, as CloudTrail shows it.
    #[arg(
        long,
        env = "CLAIMCHECK_ROLE_SESSION_NAME",
        default_value = "claimcheck"
    )]
    pub role_session_name: String,

    /// Role to assume for S3 only (a bucket in another account); overrides `role_arn`.
    #[arg(long, env = "CLAIMCHECK_S3_ROLE_ARN")]
    pub s3_role_arn: Option<String>,

    /// External id for `s3_role_arn`; defaults to `external_id`.
    #[arg(long, env = "CLAIMCHECK_S3_EXTERNAL_ID", hide_env_values = true)]
    pub s3_external_id: Option<String>,

    /// Role to assume for Kinesis only (a stream in another account); overrides `role_arn`.
    #[arg(long, env = "CLAIMCHECK_KINESIS_ROLE_ARN")]
    pub kinesis_role_arn: Option<String>,

    /// External id for `kinesis_role_arn`; defaults to `external_id`.
    #[arg(long, env = "CLAIMCHECK_KINESIS_EXTERNAL_ID", hide_env_values = true)]
    pub kinesis_external_id: Option<String>,

    /// Region of the bucket; defaults to the standard chain's (`AWS_REGION`, the profile).
    #[arg(long, env = "CLAIMCHECK_S3_REGION")]
    pub s3_region: Option<String>,

    /// Region of the stream; defaults to the region of a stream given as an ARN, else the
    /// standard chain's.
    #[arg(long, env = "CLAIMCHECK_KINESIS_REGION")]
    pub kinesis_region: Option<String>,
}

/// What S3 objects are written with, and the start-up check.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ObjectArgs {
    /// Server-side encryption of every object: `AES256` (SSE-S3), `aws:kms` (SSE-KMS) or
    /// `aws:kms:dsse` (dual-layer SSE-KMS); default: the bucket's default encryption.
    #[arg(long, env = "CLAIMCHECK_S3_SSE")]
    pub s3_sse: Option<String>,

    /// KMS key (id, ARN or alias ARN) for `aws:kms` and `aws:kms:dsse`; default: the bucket's
    /// default key, or the AWS managed key `aws/s3`.
    #[arg(long, env = "CLAIMCHECK_S3_SSE_KMS_KEY_ID")]
    pub s3_sse_kms_key_id: Option<String>,

    /// Use an S3 Bucket Key with SSE-KMS, which cuts the KMS requests (and their cost) of
    /// every object.
    #[arg(long, env = "CLAIMCHECK_S3_BUCKET_KEY", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub s3_bucket_key: bool,

    /// Storage class of every object (`STANDARD`, `STANDARD_IA`, `INTELLIGENT_TIERING`,
    /// `GLACIER_IR`, … any class PutObject takes); default: STANDARD.
    #[arg(long, env = "CLAIMCHECK_S3_STORAGE_CLASS")]
    pub s3_storage_class: Option<String>,

    /// Canned ACL of every object, such as `bucket-owner-full-control` for a bucket in
    /// another account whose policy requires it; default: none (the bucket's ownership
    /// setting decides).
    #[arg(long, env = "CLAIMCHECK_S3_ACL")]
    pub s3_acl: Option<String>,

    /// Object tag `KEY=VALUE`; the value may use the object key's placeholders (`${tag}`,
    /// `${tag[N]}`, `%{hostname}`, strftime of the timekey). Repeat the flag (at most 10 tags);
    /// a table in the file. Needs `s3:PutObjectTagging`.
    #[arg(long, env = "CLAIMCHECK_S3_OBJECT_TAGS")]
    pub s3_object_tags: Vec<String>,

    /// User metadata `KEY=VALUE` (`x-amz-meta-KEY`) of every object, with the same
    /// placeholders. Repeat the flag; a table in the file.
    #[arg(long, env = "CLAIMCHECK_S3_METADATA")]
    pub s3_metadata: Vec<String>,

    /// Check at start that the bucket and the stream take what delivery will send, with these
    /// settings: `off` (the default: start and buffer even with AWS unreachable), `warn` (log
    /// what fails, serve anyway) or `fail` (exit before serving). The S3 check starts a
    /// multipart upload with every object setting and aborts it (no object is written); the
    /// Kinesis check calls DescribeStreamSummary, the one permission delivery itself does not
    /// need (`kinesis:DescribeStreamSummary`).
    #[arg(
        long,
        env = "CLAIMCHECK_CHECK_ON_START",
        value_enum,
        default_value = "off"
    )]
    pub check_on_start: CheckOnStart,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CheckOnStart {
    #[default]
    Off,
    Warn,
    Fail,
}

/// A role to assume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Role {
    pub arn: String,
    pub external_id: Option<String>,
    pub session_name: String,
}

/// How to reach one destination: its region and role, when not the standard chain's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Access {
    pub region: Option<String>,
    pub role: Option<Role>,
}

/// The validated settings every object is written with.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ObjectSettings {
    pub sse: Option<ServerSideEncryption>,
    pub kms_key_id: Option<String>,
    pub bucket_key: bool,
    pub storage_class: Option<StorageClass>,
    pub acl: Option<ObjectCannedAcl>,
}

/// Everything about AWS that `serve` was given.
#[derive(Debug, Clone, Default)]
pub struct AwsSettings {
    pub s3: Access,
    pub kinesis: Access,
    pub objects: ObjectSettings,
    pub check_on_start: CheckOnStart,
}

impl AccessArgs {
    /// The S3 and the Kinesis destination's access.
    pub fn destinations(&self) -> Result<(Access, Access), String> {
        let role = |arn: &Option<String>, external_id: &Option<String>| -> Result<_, String> {
            let Some(arn) = arn.as_ref().or(self.role_arn.as_ref()) else {
                return Ok(None);
            };
            if !arn.starts_with("arn:") {
                return Err(format!("a role ARN starts with arn: (got {arn:?})"));
            }
            Ok(Some(Role {
                arn: arn.clone(),
                external_id: external_id.clone().or_else(|| self.external_id.clone()),
                session_name: self.role_session_name.clone(),
            }))
        };
        let session = &self.role_session_name;
        let valid_session = (2..=64).contains(&session.len())
            && session
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+=,.@_-".contains(c));
        if !valid_session {
            return Err(format!(
                "--role-session-name {session:?}: 2 to 64 letters, digits or +=,.@_-"
            ));
        }
        Ok((
            Access {
                region: self.s3_region.clone(),
                role: role(&self.s3_role_arn, &self.s3_external_id)
                    .map_err(|e| format!("--s3-role-arn / --role-arn: {e}"))?,
            },
            Access {
                region: self.kinesis_region.clone(),
                role: role(&self.kinesis_role_arn, &self.kinesis_external_id)
                    .map_err(|e| format!("--kinesis-role-arn / --role-arn: {e}"))?,
            },
        ))
    }
}

impl Access {
    /// The access to the Kinesis stream `stream` (a name or an ARN): an ARN names its region,
    /// which requests must go to, so it is the region unless one is set, and a region set
    /// otherwise is refused.
    pub fn for_stream(mut self, stream: &str) -> Result<Access, String> {
        if let Some(in_arn) = arn_region(stream) {
            match &self.region {
                None => self.region = Some(in_arn.to_string()),
                Some(r) if r != in_arn => {
                    return Err(format!(
                        "--kinesis-region {r} is not the region of the stream's ARN ({in_arn})"
                    ))
                }
                Some(_) => {}
            }
        }
        Ok(self)
    }
}

/// The region of a Kinesis stream ARN (`arn:aws:kinesis:REGION:ACCOUNT:stream/NAME`).
fn arn_region(stream: &str) -> Option<&str> {
    let mut parts = stream.strip_prefix("arn:")?.split(':');
    let (_partition, service, region) = (parts.next()?, parts.next()?, parts.next()?);
    (service == "kinesis" && !region.is_empty()).then_some(region)
}

/// The server-side encryptions PutObject takes (the SDK also knows `aws:fsx`, for FSx only).
const SSE: [&str; 3] = ["AES256", "aws:kms", "aws:kms:dsse"];

/// `value` if it is one of `known`'s, else an error listing them.
fn one_of<T: Clone>(
    flag: &str,
    value: &str,
    known: &[&str],
    make: impl Fn(&str) -> T,
) -> Result<T, String> {
    match known.contains(&value) {
        true => Ok(make(value)),
        false => Err(format!(
            "{flag} {value:?} is not one of: {}",
            known.join(", ")
        )),
    }
}

impl ObjectArgs {
    /// Checks the object settings.
    pub fn objects(&self) -> Result<ObjectSettings, String> {
        let sse = self
            .s3_sse
            .as_deref()
            .map(|v| one_of("--s3-sse", v, &SSE, |v| ServerSideEncryption::from(v)))
            .transpose()?;
        let kms = matches!(
            sse,
            Some(ServerSideEncryption::AwsKms | ServerSideEncryption::AwsKmsDsse)
        );
        if self.s3_sse_kms_key_id.is_some() && !kms {
            return Err("--s3-sse-kms-key-id needs --s3-sse aws:kms or aws:kms:dsse".into());
        }
        if self.s3_bucket_key && !kms {
            return Err("--s3-bucket-key needs --s3-sse aws:kms or aws:kms:dsse".into());
        }
        let storage_class = self
            .s3_storage_class
            .as_deref()
            .map(|v| {
                one_of("--s3-storage-class", v, StorageClass::values(), |v| {
                    StorageClass::from(v)
                })
            })
            .transpose()?;
        let acl = self
            .s3_acl
            .as_deref()
            .map(|v| {
                one_of("--s3-acl", v, ObjectCannedAcl::values(), |v| {
                    ObjectCannedAcl::from(v)
                })
            })
            .transpose()?;
        Ok(ObjectSettings {
            sse,
            kms_key_id: self.s3_sse_kms_key_id.clone().filter(|k| !k.is_empty()),
            bucket_key: self.s3_bucket_key,
            storage_class,
            acl,
        })
    }
}

/// Splits `KEY=VALUE` pairs of `flag`, checking the keys.
pub fn pairs(flag: &str, items: &[String]) -> Result<Vec<(String, String)>, String> {
    let mut out: Vec<(String, String)> = Vec::new();
    for item in items {
        let Some((key, value)) = item.split_once('=') else {
            return Err(format!("{flag} {item:?}: expected KEY=VALUE"));
        };
        let key = key.trim();
        if key.is_empty() {
            return Err(format!("{flag} {item:?}: the key is empty"));
        }
        if out.iter().any(|(k, _)| k == key) {
            return Err(format!("{flag}: the key {key:?} is given twice"));
        }
        out.push((key.to_string(), value.to_string()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_settings_are_checked_at_start() {
        let args = |f: &dyn Fn(&mut ObjectArgs)| {
            let mut a = ObjectArgs::default();
            f(&mut a);
            a.objects()
        };
        let ok = args(&|a| {
            a.s3_sse = Some("aws:kms".into());
            a.s3_sse_kms_key_id = Some("alias/logs".into());
            a.s3_bucket_key = true;
            a.s3_storage_class = Some("STANDARD_IA".into());
            a.s3_acl = Some("bucket-owner-full-control".into());
        })
        .unwrap();
        assert_eq!(ok.sse, Some(ServerSideEncryption::AwsKms));
        assert_eq!(ok.storage_class, Some(StorageClass::StandardIa));
        assert_eq!(ok.acl, Some(ObjectCannedAcl::BucketOwnerFullControl));
        for (what, err) in [
            (
                args(&|a| a.s3_sse = Some("kms".into())),
                "--s3-sse \"kms\" is not one of: AES256, aws:kms, aws:kms:dsse",
            ),
            (
                args(&|a| a.s3_storage_class = Some("COLD".into())),
                "--s3-storage-class \"COLD\" is not one of",
            ),
            (
                args(&|a| a.s3_acl = Some("owner".into())),
                "--s3-acl \"owner\" is not one of",
            ),
            (
                args(&|a| a.s3_sse_kms_key_id = Some("k".into())),
                "--s3-sse-kms-key-id needs --s3-sse aws:kms",
            ),
            (args(&|a| a.s3_bucket_key = true), "--s3-bucket-key needs"),
        ] {
            let got = what.unwrap_err();
            assert!(got.starts_with(err), "{got}");
        }
    }

    #[test]
    fn roles_fall_back_to_the_shared_one_per_destination() {
        let mut a = AccessArgs {
            role_arn: Some("arn:aws:iam::111122223333:role/logs".into()),
            external_id: Some("x".into()),
            role_session_name: "claimcheck".into(),
            kinesis_role_arn: Some("arn:aws:iam::444455556666:role/stream".into()),
            kinesis_external_id: Some("y".into()),
            kinesis_region: Some("eu-west-1".into()),
            ..AccessArgs::default()
        };
        let (s3, kinesis) = a.destinations().unwrap();
        assert_eq!(
            s3.role.as_ref().unwrap().arn,
            "arn:aws:iam::111122223333:role/logs"
        );
        assert_eq!(s3.role.unwrap().external_id.as_deref(), Some("x"));
        let k = kinesis.role.unwrap();
        assert_eq!(
            (k.arn.as_str(), k.external_id.as_deref()),
            ("arn:aws:iam::444455556666:role/stream", Some("y"))
        );
        assert_eq!(kinesis.region.as_deref(), Some("eu-west-1"));
        a.role_session_name = "has space".into();
        assert!(a
            .destinations()
            .unwrap_err()
            .contains("--role-session-name"));
        a.role_session_name = "ok".into();
        a.s3_role_arn = Some("logs".into());
        assert!(a.destinations().unwrap_err().starts_with("--s3-role-arn"));
    }

    #[test]
    fn pairs_are_key_value() {
        let items = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            pairs(
                "--s3-object-tags",
                &items(&["team=sre", "source=${tag}", "empty="])
            )
            .unwrap(),
            vec![
                ("team".into(), "sre".into()),
                ("source".into(), "${tag}".into()),
                ("empty".into(), String::new())
            ]
        );
        assert!(pairs("--s3-metadata", &items(&["novalue"]))
            .unwrap_err()
            .contains("KEY=VALUE"));
        assert!(pairs("--s3-metadata", &items(&["a=1", "a=2"]))
            .unwrap_err()
            .contains("twice"));
    }
}
