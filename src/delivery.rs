//! Wires the uploader and the publisher to S3 and Kinesis, and drains them at shutdown.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::aws::{self, kinesis::KinesisSink, s3::S3Store};
use crate::buffer::{chunk, Recovered, SealedChunk};
use crate::config::Config;
use crate::publisher::{self, PointerSink};
use crate::uploader::{self, ChunkStore};

/// The running uploader and publisher.
pub struct Delivery {
    task: JoinHandle<()>,
    chunks_dir: PathBuf,
}

impl Delivery {
    /// Starts delivery against AWS. The AWS configuration is loaded inside the task, so that
    /// the listener never waits for it (the sidecar must start with AWS unreachable).
    pub fn start(
        config: &Config,
        sealed: mpsc::UnboundedReceiver<SealedChunk>,
        recovered_uploaded: Recovered,
    ) -> Delivery {
        let c = config.clone();
        let (uploaded_tx, uploaded_rx) = mpsc::unbounded_channel();
        for chunk in recovered_uploaded.uploaded {
            let _ = uploaded_tx.send(chunk);
        }
        let task = tokio::spawn(async move {
            let sdk = aws::load_config().await;
            let store = S3Store::new(
                aws::s3_client(&sdk),
                c.s3_bucket.clone(),
                c.s3_multipart_threshold,
                c.s3_part_size,
            );
            let sink = KinesisSink::new(aws::kinesis_client(&sdk), c.kinesis_stream.clone());
            info!(bucket = %c.s3_bucket, stream = %c.kinesis_stream, "delivery started");
            run(
                Arc::new(store),
                Arc::new(sink),
                &c,
                sealed,
                uploaded_tx,
                uploaded_rx,
            )
            .await;
        });
        Delivery {
            task,
            chunks_dir: chunk_dir_of(config),
        }
    }

    /// Waits until every chunk in the buffer is published or `timeout` passes, then stops.
    /// Returns how many chunks are left for the next start.
    pub async fn drain(self, timeout: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut left = count_chunks(&self.chunks_dir);
        while left > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
            left = count_chunks(&self.chunks_dir);
        }
        self.task.abort();
        let _ = self.task.await;
        left
    }
}

fn chunk_dir_of(config: &Config) -> PathBuf {
    crate::buffer::chunks_dir(&config.buffer.dir)
}

/// Runs the uploader and the publisher with any store and sink.
pub async fn run<S: ChunkStore, P: PointerSink>(
    store: Arc<S>,
    sink: Arc<P>,
    config: &Config,
    sealed: mpsc::UnboundedReceiver<SealedChunk>,
    uploaded_tx: mpsc::UnboundedSender<crate::buffer::UploadedChunk>,
    uploaded_rx: mpsc::UnboundedReceiver<crate::buffer::UploadedChunk>,
) {
    tokio::join!(
        uploader::run(store, config.uploader.clone(), sealed, uploaded_tx),
        publisher::run(sink, config.publisher.clone(), uploaded_rx),
    );
}

/// Chunk data files in the buffer (sealed or not, not yet published).
fn count_chunks(dir: &Path) -> usize {
    match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(Result::ok)
            .filter(|e| e.path().extension().is_some_and(|x| x == chunk::DATA_EXT))
            .count(),
        Err(e) => {
            warn!(dir = %dir.display(), cause = %e, "cannot list the buffer");
            0
        }
    }
}
