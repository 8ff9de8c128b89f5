//! Checkpoints: how far a [`StreamReader`](crate::StreamReader) got, saved only for what the
//! caller said it processed.
//!
//! A checkpoint holds, per shard, the sequence number up to which every record was processed
//! (or that the shard was read to its end), the chunk ids of the most recently processed
//! chunks, so that the dedup window survives a restart, and, when the reader first started at a
//! time (`latest`, or a time), that time in Unix milliseconds (`since_ms`): a shard the
//! checkpoint does not name (a reshard's child, or one whose records were never committed) is
//! read from there on a resume. It is one small JSON document:
//!
//! ```json
//! {"v":1,"stream":"pointers",
//!  "shards":{"shardId-000000000000":"finished","shardId-000000000001":{"after":"49590338271"}},
//!  "recent_chunk_ids":"AZOhwuT4fT6aW2x9jp8KGw==","since_ms":1796081400123}
//! ```
//!
//! `recent_chunk_ids` is base64 of the 16-byte big-endian chunk ids, oldest first.
//! [`FileCheckpointStore`] keeps it in a file; `DynamoDbCheckpointStore` (feature `dynamodb`) in
//! a DynamoDB table; any other store implements [`CheckpointStore`].

use std::collections::BTreeMap;
use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use futures::future::BoxFuture;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::Error;

#[cfg(feature = "dynamodb")]
mod dynamodb;
#[cfg(feature = "dynamodb")]
pub use dynamodb::DynamoDbCheckpointStore;

/// How far a reader got in one shard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ShardCheckpoint {
    /// Every record up to and including this sequence number was processed.
    After(String),
    /// The shard was closed by a reshard and every record in it was processed.
    Finished,
}

/// A saved reader position: see the [module documentation](self) for its JSON form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    v: u32,
    stream: String,
    shards: BTreeMap<String, ShardCheckpoint>,
    #[serde(default, with = "ids")]
    recent_chunk_ids: Vec<u128>,
    /// Where the reader first started, Unix milliseconds, if at a time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    since_ms: Option<i64>,
}

impl Checkpoint {
    /// The format version this crate writes and the highest it reads.
    pub const VERSION: u32 = 1;

    pub(crate) fn new(
        stream: &str,
        shards: BTreeMap<String, ShardCheckpoint>,
        recent_chunk_ids: Vec<u128>,
        since: Option<SystemTime>,
    ) -> Self {
        Checkpoint {
            v: Self::VERSION,
            stream: stream.into(),
            shards,
            recent_chunk_ids,
            since_ms: since.map(|t| match t.duration_since(UNIX_EPOCH) {
                Ok(d) => d.as_millis() as i64,
                Err(e) => -(e.duration().as_millis() as i64),
            }),
        }
    }

    /// Where the reader that saved it first started, if at a time.
    pub fn since(&self) -> Option<SystemTime> {
        self.since_ms.map(|ms| match u64::try_from(ms) {
            Ok(ms) => UNIX_EPOCH + Duration::from_millis(ms),
            Err(_) => UNIX_EPOCH - Duration::from_millis(ms.unsigned_abs()),
        })
    }

    /// The stream the checkpoint belongs to, as the reader was given it (name or ARN).
    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// Where the reader got in `shard_id`, if anywhere.
    pub fn shard(&self, shard_id: &str) -> Option<&ShardCheckpoint> {
        self.shards.get(shard_id)
    }

    /// Every shard with a position.
    pub fn shards(&self) -> impl Iterator<Item = (&str, &ShardCheckpoint)> {
        self.shards.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// How many recently processed chunk ids the checkpoint carries.
    pub fn recent_chunk_id_count(&self) -> usize {
        self.recent_chunk_ids.len()
    }

    pub(crate) fn recent_ids(&self) -> &[u128] {
        &self.recent_chunk_ids
    }

    /// The checkpoint as JSON, for stores that keep bytes.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a checkpoint always serializes")
    }

    /// Reads what [`Checkpoint::to_json`] wrote.
    pub fn from_json(data: &[u8]) -> Result<Checkpoint, Error> {
        #[derive(Deserialize)]
        struct VersionOnly {
            v: u64,
        }
        let not_one = |e| Error::checkpoint("not a checkpoint", e);
        let version: VersionOnly = serde_json::from_slice(data).map_err(not_one)?;
        if version.v > u64::from(Self::VERSION) {
            return Err(Error::Checkpoint {
                reason: format!(
                    "version {} is newer than this reader understands ({})",
                    version.v,
                    Self::VERSION
                ),
                source: None,
            });
        }
        serde_json::from_slice(data).map_err(not_one)
    }
}

mod ids {
    use super::*;

    pub fn serialize<S: Serializer>(ids: &[u128], s: S) -> Result<S::Ok, S::Error> {
        let bytes: Vec<u8> = ids.iter().flat_map(|id| id.to_be_bytes()).collect();
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u128>, D::Error> {
        let text: String = Deserialize::deserialize(d)?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(serde::de::Error::custom)?;
        if bytes.len() % 16 != 0 {
            return Err(serde::de::Error::custom(
                "recent_chunk_ids is not a whole number of 16-byte ids",
            ));
        }
        Ok(bytes
            .chunks_exact(16)
            .map(|c| u128::from_be_bytes(c.try_into().expect("16 bytes")))
            .collect())
    }
}

/// Where a reader keeps its [`Checkpoint`].
///
/// The reader calls [`load`](CheckpointStore::load) once when it opens and
/// [`save`](CheckpointStore::save) whenever the caller committed something since the last save:
/// before it reads Kinesis again, and when asked to with
/// [`StreamReader::checkpoint`](crate::StreamReader::checkpoint). One reader per store: two
/// readers saving to the same place overwrite each other.
pub trait CheckpointStore: Send + Sync + 'static {
    /// The last saved checkpoint, or `None` if there is none yet.
    fn load(&self) -> impl Future<Output = Result<Option<Checkpoint>, Error>> + Send;
    /// Replaces the saved checkpoint.
    fn save(&self, checkpoint: &Checkpoint) -> impl Future<Output = Result<(), Error>> + Send;
}

/// [`CheckpointStore`] behind a pointer, for the reader.
pub(crate) trait DynStore: Send + Sync {
    fn load_boxed(&self) -> BoxFuture<'_, Result<Option<Checkpoint>, Error>>;
    fn save_boxed<'a>(&'a self, checkpoint: &'a Checkpoint) -> BoxFuture<'a, Result<(), Error>>;
}

impl<S: CheckpointStore> DynStore for S {
    fn load_boxed(&self) -> BoxFuture<'_, Result<Option<Checkpoint>, Error>> {
        Box::pin(CheckpointStore::load(self))
    }

    fn save_boxed<'a>(&'a self, checkpoint: &'a Checkpoint) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(CheckpointStore::save(self, checkpoint))
    }
}

/// A checkpoint in a local file, replaced atomically (write, fsync, rename, fsync directory)
/// so that a crash leaves either the old or the new checkpoint, never a torn one.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), claimcheck_consumer::Error> {
/// use claimcheck_consumer::{CheckpointStore, FileCheckpointStore};
///
/// let dir = tempfile::tempdir().unwrap();
/// let store = FileCheckpointStore::new(dir.path().join("pointers.checkpoint"));
/// assert!(store.load().await?.is_none()); // no file yet: start at the reader's start position
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct FileCheckpointStore {
    path: PathBuf,
}

impl FileCheckpointStore {
    /// A store at `path`; the file is created on the first save.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        FileCheckpointStore { path: path.into() }
    }

    /// Where the checkpoint is kept.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn replace_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    let tmp = dir.join(name);
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

impl CheckpointStore for FileCheckpointStore {
    async fn load(&self) -> Result<Option<Checkpoint>, Error> {
        match tokio::fs::read(&self.path).await {
            Ok(bytes) => Checkpoint::from_json(&bytes).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::checkpoint(
                format!("cannot read {}", self.path.display()),
                e,
            )),
        }
    }

    async fn save(&self, checkpoint: &Checkpoint) -> Result<(), Error> {
        let path = self.path.clone();
        let bytes = checkpoint.to_json();
        tokio::task::spawn_blocking(move || replace_file(&path, &bytes))
            .await
            .map_err(|e| Error::checkpoint("checkpoint writer failed", e))?
            .map_err(|e| Error::checkpoint(format!("cannot write {}", self.path.display()), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Checkpoint {
        let mut shards = BTreeMap::new();
        shards.insert("shardId-000000000000".into(), ShardCheckpoint::Finished);
        shards.insert(
            "shardId-000000000001".into(),
            ShardCheckpoint::After("49590338271".into()),
        );
        Checkpoint::new(
            "pointers",
            shards,
            vec![0x0193a1c2e4f87d3e9a5b6c7d8e9f0a1b],
            None,
        )
    }

    #[test]
    fn json_form_is_the_documented_one() {
        let json = String::from_utf8(sample().to_json()).unwrap();
        assert_eq!(
            json,
            r#"{"v":1,"stream":"pointers","shards":{"shardId-000000000000":"finished","shardId-000000000001":{"after":"49590338271"}},"recent_chunk_ids":"AZOhwuT4fT6aW2x9jp8KGw=="}"#
        );
        assert_eq!(Checkpoint::from_json(json.as_bytes()).unwrap(), sample());
        let newer = json.replace(r#""v":1"#, r#""v":2"#);
        assert!(matches!(
            Checkpoint::from_json(newer.as_bytes()),
            Err(Error::Checkpoint { .. })
        ));
        assert!(Checkpoint::from_json(b"{}").is_err());

        // A reader that first started at a time keeps it, in milliseconds.
        let at = UNIX_EPOCH + Duration::from_millis(1_796_081_400_123) + Duration::from_micros(7);
        let mut since = sample();
        since.since_ms = Checkpoint::new("pointers", BTreeMap::new(), vec![], Some(at)).since_ms;
        let json = String::from_utf8(since.to_json()).unwrap();
        assert!(json.ends_with(r#","since_ms":1796081400123}"#), "{json}");
        let read = Checkpoint::from_json(json.as_bytes()).unwrap();
        assert_eq!(
            read.since(),
            Some(UNIX_EPOCH + Duration::from_millis(1_796_081_400_123))
        );
    }

    #[tokio::test]
    async fn file_store_replaces_the_file_whole() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileCheckpointStore::new(dir.path().join("cp.json"));
        assert_eq!(store.load().await.unwrap(), None);
        store.save(&sample()).await.unwrap();
        let mut second = sample();
        second.shards.clear();
        store.save(&second).await.unwrap();
        assert_eq!(store.load().await.unwrap(), Some(second));
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("cp.json")]);

        std::fs::write(store.path(), b"garbage").unwrap();
        assert!(matches!(store.load().await, Err(Error::Checkpoint { .. })));
    }
}
