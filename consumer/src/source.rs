//! Where objects come from: S3 behind a narrow trait, [`ObjectSource`], so that a [`Resolver`]
//! can read from anything (another store, a cache) and be tested offline against
//! [`InMemoryBucket`] (`Resolver::from_source`). The SDK types stay in this file.
//!
//! [`Resolver`]: crate::Resolver

use std::fmt::Debug;
use std::pin::Pin;

use aws_sdk_s3::operation::get_object::GetObjectError;
use futures::future::BoxFuture;
use tokio::io::AsyncRead;

use crate::Error;

/// An object being read.
pub struct Object {
    /// Identifies this version of the object, for a second read of the same bytes.
    pub etag: Option<String>,
    /// The object's size, when the response says.
    pub length: Option<u64>,
    pub body: Pin<Box<dyn AsyncRead + Send>>,
}

/// Reads objects: S3 through the SDK (`Resolver::new`), [`InMemoryBucket`], or your own.
pub trait ObjectSource: Debug + Send + Sync {
    /// Starts reading `bucket/key`; with `if_match`, only if its ETag is still that one
    /// ([`Error::ObjectChanged`] otherwise).
    fn get<'a>(
        &'a self,
        bucket: &'a str,
        key: &'a str,
        if_match: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Object, Error>>;
}

/// S3 through the AWS SDK.
#[derive(Debug, Clone)]
pub(crate) struct S3(pub aws_sdk_s3::Client);

impl ObjectSource for S3 {
    fn get<'a>(
        &'a self,
        bucket: &'a str,
        key: &'a str,
        if_match: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Object, Error>> {
        Box::pin(async move {
            // https://docs.aws.amazon.com/AmazonS3/latest/API/API_GetObject.html
            let out = self
                .0
                .get_object()
                .bucket(bucket)
                .key(key)
                .set_if_match(if_match.map(str::to_string))
                .send()
                .await
                .map_err(|e| {
                    let status = e.raw_response().map(|r| r.status().as_u16());
                    if matches!(e.as_service_error(), Some(GetObjectError::NoSuchKey(_))) {
                        Error::ObjectMissing {
                            bucket: bucket.into(),
                            key: key.into(),
                        }
                    } else if status == Some(412) {
                        Error::ObjectChanged {
                            bucket: bucket.into(),
                            key: key.into(),
                        }
                    } else {
                        Error::S3 {
                            // Without s3:ListBucket, S3 answers a missing key with 403.
                            operation: if status == Some(403) {
                                "GetObject (access denied: a missing object reads so unless the reader has s3:ListBucket on the bucket)"
                            } else {
                                "GetObject"
                            },
                            source: Box::new(e),
                        }
                    }
                })?;
            Ok(Object {
                etag: out.e_tag,
                length: out.content_length.and_then(|n| u64::try_from(n).ok()),
                body: Box::pin(out.body.into_async_read()),
            })
        })
    }
}

mod in_memory {
    use std::collections::HashMap;
    use std::sync::Mutex;

    use super::*;

    /// A bucket in memory, to resolve pointers offline (tests, examples): objects by key; every
    /// object's ETag is a counter bumped on each write, so `if_match` behaves as S3's does.
    #[derive(Debug, Default)]
    pub struct InMemoryBucket {
        objects: Mutex<HashMap<String, (u64, Vec<u8>)>>,
        pub(crate) reads: Mutex<Vec<(String, Option<String>)>>,
        /// Replaces an object right after its first read (to test `ObjectChanged`).
        pub(crate) replace_after_read: Mutex<Option<(String, Vec<u8>)>>,
    }

    impl InMemoryBucket {
        pub fn new() -> InMemoryBucket {
            InMemoryBucket::default()
        }

        /// Stores (or replaces) the object under `key`; the bucket name is not checked.
        pub fn put(&self, key: &str, bytes: Vec<u8>) {
            let mut objects = self.objects.lock().unwrap();
            let version = objects.get(key).map_or(1, |(v, _)| v + 1);
            objects.insert(key.into(), (version, bytes));
        }

        pub fn delete(&self, key: &str) {
            self.objects.lock().unwrap().remove(key);
        }

        /// Removes an object and returns its bytes.
        pub fn take(&self, key: &str) -> Option<Vec<u8>> {
            self.objects.lock().unwrap().remove(key).map(|(_, b)| b)
        }
    }

    impl ObjectSource for InMemoryBucket {
        fn get<'a>(
            &'a self,
            bucket: &'a str,
            key: &'a str,
            if_match: Option<&'a str>,
        ) -> BoxFuture<'a, Result<Object, Error>> {
            Box::pin(async move {
                self.reads
                    .lock()
                    .unwrap()
                    .push((key.to_string(), if_match.map(str::to_string)));
                let found = self.objects.lock().unwrap().get(key).cloned();
                let (version, bytes) = found.ok_or_else(|| Error::ObjectMissing {
                    bucket: bucket.into(),
                    key: key.into(),
                })?;
                let etag = format!("\"{version}\"");
                if if_match.is_some_and(|m| m != etag) {
                    return Err(Error::ObjectChanged {
                        bucket: bucket.into(),
                        key: key.into(),
                    });
                }
                if let Some((k, replacement)) = self.replace_after_read.lock().unwrap().take() {
                    self.put(&k, replacement);
                }
                Ok(Object {
                    etag: Some(etag),
                    length: Some(bytes.len() as u64),
                    body: Box::pin(std::io::Cursor::new(bytes)),
                })
            })
        }
    }
}

pub use in_memory::InMemoryBucket;
