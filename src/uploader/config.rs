//! The uploader's settings, and the object key they give a chunk.

use std::path::PathBuf;

use claimcheck_consumer::body::{self, Compression, Format};

use crate::key_template::{KeyTemplate, KeyValues};
use crate::retry::RetryPolicy;

/// Settings of the uploader.
#[derive(Debug, Clone)]
pub struct UploaderConfig {
    pub format: Format,
    pub compression: Compression,
    pub compression_level: Option<i32>,
    pub key_template: KeyTemplate,
    /// Prepended to every key.
    pub prefix: String,
    /// Host name written into pointers.
    pub producer: String,
    /// Chunks uploaded at once (Fluentd's `flush_thread_count`).
    pub workers: usize,
    pub retry: RetryPolicy,
    /// Bodies up to this size go by one PutObject; larger ones by multipart upload.
    pub multipart_threshold: u64,
    /// Part size of multipart uploads (at least S3's minimum of 5 MiB).
    pub part_size: u64,
    /// Records (pointer JSON, newline, body) up to this size carry their body inline, and no
    /// object is stored; 0: every body goes to S3.
    pub inline_max_bytes: u64,
    /// The buffer directory, for `dead/` and `quarantine/`.
    pub buffer_dir: PathBuf,
}

impl UploaderConfig {
    /// The object key of a chunk.
    pub fn key(&self, tag: &str, chunk_id: &str, timekey: i64) -> String {
        let ext = body::file_extension(self.format, self.compression);
        let key = self.key_template.render(KeyValues {
            tag,
            chunk_id,
            timekey,
            file_extension: &ext,
        });
        match self.prefix.as_str() {
            "" => key,
            p if p.ends_with('/') => format!("{p}{key}"),
            p => format!("{p}/{key}"),
        }
    }
}
