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
    /// Tags of every object, their values with the key's placeholders.
    pub object_tags: Vec<(String, KeyTemplate)>,
    /// User metadata of every object, the same way.
    pub object_metadata: Vec<(String, KeyTemplate)>,
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

    /// The `x-amz-tagging` value of a chunk's object (URL-encoded `k=v&…`), if it has tags.
    pub fn tagging(&self, tag: &str, chunk_id: &str, timekey: i64) -> Option<String> {
        if self.object_tags.is_empty() {
            return None;
        }
        let mut out = form_urlencoded::Serializer::new(String::new());
        for (k, v) in self.render(&self.object_tags, tag, chunk_id, timekey) {
            out.append_pair(&k, &v);
        }
        Some(out.finish())
    }

    /// The user metadata of a chunk's object.
    pub fn metadata(&self, tag: &str, chunk_id: &str, timekey: i64) -> Vec<(String, String)> {
        self.render(&self.object_metadata, tag, chunk_id, timekey)
    }

    fn render(
        &self,
        pairs: &[(String, KeyTemplate)],
        tag: &str,
        chunk_id: &str,
        timekey: i64,
    ) -> Vec<(String, String)> {
        let ext = body::file_extension(self.format, self.compression);
        let values = KeyValues {
            tag,
            chunk_id,
            timekey,
            file_extension: &ext,
        };
        pairs
            .iter()
            .map(|(k, t)| (k.clone(), t.render(values)))
            .collect()
    }
}
