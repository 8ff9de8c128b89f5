//! The uploader's settings, and the object (key, tags, metadata) they give a chunk.

use std::path::PathBuf;

use claimcheck_consumer::body::{self, Compression, Format};

use crate::backends::ObjectMeta;
use crate::key_template::{KeyTemplate, KeyValues};
use crate::retry::RetryPolicy;

/// S3's longest object key, in bytes.
pub const MAX_KEY_BYTES: usize = 1024;
/// S3's most user metadata (`x-amz-meta-*` names and values), in bytes.
pub const MAX_METADATA_BYTES: usize = 2048;

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
    /// What a chunk's object is written with: its key, content type and encoding, and its
    /// tags and metadata, every template rendered with the chunk's values.
    pub fn object_meta(&self, tag: &str, chunk_id: &str, timekey: i64) -> ObjectMeta {
        let ext = body::file_extension(self.format, self.compression);
        let values = KeyValues {
            tag,
            chunk_id,
            timekey,
            file_extension: &ext,
        };
        // Each value rendered, then made what S3 takes.
        let render = |pairs: &[(String, KeyTemplate)], fit: fn(String) -> String| {
            pairs
                .iter()
                .map(|(k, t)| (k.clone(), fit(t.render(values))))
                .collect::<Vec<_>>()
        };
        let key = self.key_template.render(values);
        // `x-amz-tagging`: URL-encoded `k=v&…`, each value as S3 takes it.
        let tagging = (!self.object_tags.is_empty()).then(|| {
            form_urlencoded::Serializer::new(String::new())
                .extend_pairs(render(&self.object_tags, tag_value))
                .finish()
        });
        ObjectMeta {
            key: match self.prefix.as_str() {
                "" => key,
                p if p.ends_with('/') => format!("{p}{key}"),
                p => format!("{p}/{key}"),
            },
            content_type: self.format.content_type(),
            content_encoding: self.compression.content_encoding(),
            chunk_id: chunk_id.to_string(),
            tagging,
            metadata: render(&self.object_metadata, header_value),
        }
    }

    /// What a chunk whose tag is `longest_tag` bytes would exceed of S3's limits, with the
    /// settings that make it so: its upload would fail on every try, whatever the retries.
    pub fn limits_exceeded(&self, longest_tag: usize) -> Vec<String> {
        let meta = self.object_meta(&"x".repeat(longest_tag), &"0".repeat(32), 0);
        let mut out = Vec::new();
        if meta.key.len() > MAX_KEY_BYTES {
            out.push(format!(
                "with a tag of {longest_tag} bytes (the longest accepted) an object key is {} \
                 bytes, over S3's {MAX_KEY_BYTES}: shorten --s3-prefix or \
                 --s3-object-key-format (${{tag[N]}} takes one part of the tag)",
                meta.key.len()
            ));
        }
        let metadata = crate::backends::CHUNK_ID_METADATA.len()
            + meta.chunk_id.len()
            + meta
                .metadata
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>();
        if metadata > MAX_METADATA_BYTES {
            out.push(format!(
                "with a tag of {longest_tag} bytes (the longest accepted) an object's user \
                 metadata is {metadata} bytes, over S3's {MAX_METADATA_BYTES}: shorten \
                 --s3-metadata"
            ));
        }
        out
    }
}

/// A tag value S3 takes whatever the chunk's tag holds (a rendered `${tag}`): at most 256
/// characters, of letters, digits, spaces and `+ - = . _ : / @` (others become `_`). A value
/// S3 refuses would fail every upload of the chunk.
fn tag_value(value: String) -> String {
    value
        .chars()
        .take(256)
        .map(|c| if is_tag_char(c) { c } else { '_' })
        .collect()
}

fn is_tag_char(c: char) -> bool {
    c.is_alphanumeric() || c == ' ' || "+-=._:/@".contains(c)
}

/// Whether S3 takes `text` as an object tag's key or value of at most `max` characters.
pub fn is_tag_text(text: &str, max: usize) -> bool {
    text.chars().count() <= max && text.chars().all(is_tag_char)
}

/// A metadata value as an HTTP header carries it: printable ASCII as it is, anything else
/// (a tag with `é`) in RFC 2047's `=?UTF-8?B?…?=`, as S3 stores and returns such values. The
/// SDK cannot build a request with a non-ASCII header: the chunk could never be uploaded.
fn header_value(value: String) -> String {
    if value.bytes().all(|b| (b' '..=b'~').contains(&b)) {
        return value;
    }
    use base64::Engine;
    format!(
        "=?UTF-8?B?{}?=",
        base64::engine::general_purpose::STANDARD.encode(value)
    )
}
