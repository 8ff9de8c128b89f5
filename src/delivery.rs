//! Wires the uploader and the publisher to S3 and Kinesis, picks up chunks put back in the
//! buffer (by `claimcheck replay`), summarises outages in the log, and drains delivery at
//! shutdown.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::aws::{self, kinesis::KinesisSink, s3::S3Store};
use crate::backends::{ChunkStore, PointerSink};
use crate::buffer::registry::Registry;
use crate::buffer::{self, chunk, Recovered, SealedChunk, UploadedChunk};
use crate::config::Config;
use crate::outage::{self, Stage};
use crate::{publisher, uploader};

/// The configured bucket and stream, each reached with its own region and role.
async fn aws_backends(config: &Config) -> (S3Store, KinesisSink) {
    let (s3, kinesis) = aws::load_configs(&config.aws.s3, &config.aws.kinesis).await;
    let store = S3Store::new(
        aws::s3_client(&s3),
        config.s3_bucket.clone(),
        config.aws.objects.clone(),
    );
    let sink = KinesisSink::new(aws::kinesis_client(&kinesis), config.kinesis_stream.clone());
    (store, sink)
}

/// How often the buffer is checked for chunks put back by `claimcheck replay`.
const RESCAN_INTERVAL: Duration = Duration::from_secs(5);

/// The running uploader and publisher.
pub struct Delivery {
    task: JoinHandle<()>,
    chunks_dir: PathBuf,
}

/// The queues between the buffer and delivery.
pub struct Queues {
    pub sealed_tx: mpsc::UnboundedSender<SealedChunk>,
    pub sealed_rx: mpsc::UnboundedReceiver<SealedChunk>,
}

impl Delivery {
    /// Starts delivery against AWS. The AWS configuration is loaded inside the task, so that
    /// the listener never waits for it (the sidecar must start with AWS unreachable).
    pub fn start(
        config: &Config,
        registry: Arc<Registry>,
        queues: Queues,
        recovered: Recovered,
    ) -> Delivery {
        let c = config.clone();
        let backends = async move {
            let (store, sink) = aws_backends(&c).await;
            info!(bucket = %c.s3_bucket, stream = %c.kinesis_stream, "delivery started");
            (Arc::new(store), Arc::new(sink))
        };
        Delivery::start_with(config, registry, queues, recovered, backends)
    }

    /// `--check-on-start`: whether the configured bucket and stream take what delivery will
    /// send (see [`aws::check`]); one line per problem.
    pub async fn check_on_start(config: &Config) -> Vec<String> {
        let (store, sink) = aws_backends(config).await;
        // An object as delivery would write it, under the same prefix and key format.
        let (tag, id) = (
            "claimcheck.start-check",
            uuid::Uuid::now_v7().simple().to_string(),
        );
        let now = chrono::Utc::now().timestamp();
        let meta = config.uploader.object_meta(tag, &id, now);
        aws::check::check(&store, &meta, &sink).await.0
    }

    /// Starts delivery to the store and sink that `backends` gives, once it gives them.
    pub fn start_with<S: ChunkStore, P: PointerSink>(
        config: &Config,
        registry: Arc<Registry>,
        queues: Queues,
        recovered: Recovered,
        backends: impl Future<Output = (Arc<S>, Arc<P>)> + Send + 'static,
    ) -> Delivery {
        let c = config.clone();
        let task = tokio::spawn(async move {
            let (store, sink) = backends.await;
            run(store, sink, &c, registry, queues, recovered).await;
        });
        Delivery {
            task,
            chunks_dir: buffer::chunks_dir(&config.buffer.dir),
        }
    }

    /// Resolves if delivery stops by itself, which only a panic makes it do: from then on
    /// nothing would be delivered.
    pub async fn stopped(&mut self) -> Result<(), tokio::task::JoinError> {
        (&mut self.task).await
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

/// Runs the uploader, the publisher, the rescan and the outage summaries with any store and
/// sink.
pub async fn run<S: ChunkStore, P: PointerSink>(
    store: Arc<S>,
    sink: Arc<P>,
    config: &Config,
    registry: Arc<Registry>,
    queues: Queues,
    recovered: Recovered,
) {
    let (uploaded_tx, uploaded_rx) = mpsc::unbounded_channel();
    let Queues {
        sealed_tx,
        sealed_rx,
    } = queues;
    enqueue(recovered, &sealed_tx, &uploaded_tx);
    let chunks_dir = buffer::chunks_dir(&config.buffer.dir);
    tokio::join!(
        uploader::run(
            store,
            config.uploader.clone(),
            registry.clone(),
            sealed_rx,
            uploaded_tx.clone()
        ),
        publisher::run(
            sink,
            config.publisher.clone(),
            registry.clone(),
            uploaded_rx
        ),
        rescan(chunks_dir, registry.clone(), sealed_tx, uploaded_tx),
        outage_summaries(registry),
    );
}

fn enqueue(
    found: Recovered,
    sealed: &mpsc::UnboundedSender<SealedChunk>,
    uploaded: &mpsc::UnboundedSender<UploadedChunk>,
) {
    for chunk in found.sealed {
        let _ = sealed.send(chunk);
    }
    for chunk in found.uploaded {
        let _ = uploaded.send(chunk);
    }
}

/// Logs the summaries of failing stages, for as long as delivery runs.
async fn outage_summaries(registry: Arc<Registry>) {
    let mut tick = tokio::time::interval(outage::TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for stage in Stage::ALL {
            registry
                .outage(stage)
                .summarize(|last_error| registry.backlog(stage, last_error));
        }
    }
}

/// Picks up sealed or uploaded chunks that appear in the buffer while running.
async fn rescan(
    dir: PathBuf,
    registry: Arc<Registry>,
    sealed: mpsc::UnboundedSender<SealedChunk>,
    uploaded: mpsc::UnboundedSender<UploadedChunk>,
) {
    loop {
        tokio::time::sleep(RESCAN_INTERVAL).await;
        let (dir, registry) = (dir.clone(), registry.clone());
        match tokio::task::spawn_blocking(move || buffer::rescan(&dir, &registry)).await {
            Ok(found) => enqueue(found, &sealed, &uploaded),
            Err(e) => warn!(cause = %e, "buffer rescan failed"),
        }
    }
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
