//! claimcheck: a Fluentd forward target that stores chunks of events in S3 and publishes small
//! pointer records to Kinesis (the claim-check pattern).
//!
//! # Layout, following one record
//!
//! 1. [`server`] accepts a TCP connection; [`forward::connection`] reads bytes into a buffer.
//! 2. [`forward::frame`] finds one whole forward request and parses it without copying;
//!    [`forward::entries`] decompresses, validates entries and groups them by timekey;
//!    [`dedup`] answers a resent request (its ack token stored already) without storing it.
//! 3. [`buffer`] appends each group to the open chunk file of its (tag, timekey), fsyncs once
//!    for every append of the round, and only then lets the connection send `{"ack": token}`.
//! 4. The buffer seals chunks (size, records, timekey + wait, flush interval, shutdown) and
//!    hands them to the [`uploader`], which compresses the body in memory and PUTs it to S3
//!    through [`aws::s3`] at a key derived from the chunk id.
//! 5. The [`publisher`] batches pointer records ([`claimcheck_consumer::Pointer`]) into Kinesis
//!    PutRecords through [`aws::kinesis`], retries only failed entries, and deletes the chunk
//!    once its pointer is accepted.
//! 6. The `claimcheck-consumer` crate turns pointers back into events.
//!
//! While S3 or Kinesis fails, [`outage`] turns the retries of thousands of chunks into a few log
//! lines with counts.

#![forbid(unsafe_code)]

pub mod admin;
pub mod aws;
pub mod backends;
pub mod bench;
pub mod buffer;
pub mod config;
pub mod consume;
pub mod dedup;
pub mod delivery;
pub mod forward;
pub mod key_template;
pub mod metrics;
pub mod outage;
pub mod publisher;
pub mod retry;
pub mod server;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
mod time;
pub mod timekey;
pub mod uploader;

use std::future::Future;
use std::path::Path;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use aws::settings::CheckOnStart;
use backends::{ChunkStore, PointerSink};
use buffer::registry::Registry;
use buffer::{Buffer, Recovered};
use config::Config;

/// A sidecar whose buffer is open and recovered, ready to serve.
pub struct Sidecar {
    config: Config,
    buffer: Buffer,
    recovered: Recovered,
    registry: Arc<Registry>,
    queues: delivery::Queues,
}

impl Sidecar {
    /// Opens the buffer directory (locking it) and recovers what a previous run left.
    pub fn open(config: Config) -> anyhow::Result<Sidecar> {
        let (sealed_tx, sealed_rx) = mpsc::unbounded_channel();
        let registry = Arc::new(Registry::new());
        let (buffer, recovered) = Buffer::open_with(
            config.buffer.clone(),
            registry.clone(),
            sealed_tx.clone(),
            Some(config.connection.dedup.clone()),
        )?;
        let queues = delivery::Queues {
            sealed_tx,
            sealed_rx,
        };
        Ok(Sidecar {
            config,
            buffer,
            recovered,
            registry,
            queues,
        })
    }

    /// Serves `listener` until `shutdown` resolves, then stops accepting, lets connections
    /// finish, seals every open chunk and delivers until `shutdown_timeout`. Delivers to the
    /// configured S3 bucket and Kinesis stream.
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> anyhow::Result<()> {
        // Settings no start-up check can try: only a chunk with a long tag would fail.
        for problem in self
            .config
            .uploader
            .limits_exceeded(forward::connection::MAX_TAG_BYTES)
        {
            warn!("{problem}");
        }
        match self.config.aws.check_on_start {
            CheckOnStart::Off => {}
            CheckOnStart::Fail => {
                let problems = delivery::Delivery::check_on_start(&self.config).await;
                for p in &problems {
                    error!("start-up check: {p}");
                }
                if !problems.is_empty() {
                    anyhow::bail!(
                        "the start-up check failed (--check-on-start fail): {}",
                        problems.join("; ")
                    );
                }
                info!("start-up check passed: the bucket and the stream take what delivery sends");
            }
            // In the background: serving does not wait for AWS.
            CheckOnStart::Warn => {
                let config = self.config.clone();
                tokio::spawn(async move {
                    let problems = delivery::Delivery::check_on_start(&config).await;
                    for p in &problems {
                        warn!("start-up check: {p}");
                    }
                    if problems.is_empty() {
                        info!("start-up check passed: the bucket and the stream take what delivery sends");
                    }
                });
            }
        }
        self.serve(listener, shutdown, delivery::Delivery::start)
            .await
    }

    /// [`Sidecar::run`] with any store and sink in place of S3 and Kinesis, such as the
    /// in-memory ones of `claimcheck::testing` (feature `testing`).
    pub async fn run_with<S: ChunkStore, P: PointerSink>(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
        store: Arc<S>,
        sink: Arc<P>,
    ) -> anyhow::Result<()> {
        self.serve(listener, shutdown, |config, registry, queues, recovered| {
            delivery::Delivery::start_with(config, registry, queues, recovered, async move {
                (store, sink)
            })
        })
        .await
    }

    /// What [`Sidecar::run`] and [`Sidecar::run_with`] share: everything but how delivery
    /// starts.
    async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
        start_delivery: impl FnOnce(
            &Config,
            Arc<Registry>,
            delivery::Queues,
            Recovered,
        ) -> delivery::Delivery,
    ) -> anyhow::Result<()> {
        let Sidecar {
            config,
            buffer,
            recovered,
            registry,
            queues,
        } = self;
        let mut delivery = start_delivery(&config, registry.clone(), queues, recovered);
        let token = CancellationToken::new();
        // The admin endpoint serves until the sidecar ends, through the delivery at shutdown:
        // probes and scrapes see it drain.
        let admin_token = CancellationToken::new();
        let _admin_stops = admin_token.clone().drop_guard();
        let mut metrics = None;
        if let Some(addr) = config.metrics_listen {
            let admin = admin::bind(addr).await?;
            metrics = Some(admin.local_addr()?);
            tokio::spawn(admin::run(
                admin,
                registry.clone(),
                config.buffer.total_limit_size,
                admin_token,
            ));
        }
        let handle = buffer.handle.clone();
        let max_open_chunk_files = buffer.max_open_files();
        let mut writer = tokio::spawn(buffer.run());
        let listen = listener
            .local_addr()
            .map_or_else(|_| config.listen.to_string(), |a| a.to_string());
        let heartbeat = server::bind_heartbeats(&listener, &config.listener).await;
        // Before the first connection is taken: a sidecar that cannot write it stops with
        // nothing acked. The listener is bound, so whoever reads it can connect at once.
        let metrics_listen = metrics.map(|a| a.to_string());
        if let Some(path) = &config.address_file {
            write_address_file(path, &listen, metrics_listen.as_deref()).map_err(|e| {
                anyhow::anyhow!("cannot write {} (--address-file): {e}", path.display())
            })?;
        }
        let server = tokio::spawn(server::run(
            listener,
            heartbeat,
            handle,
            config.connection.clone(),
            config.listener.clone(),
            token.clone(),
        ));
        let worker_threads = tokio::runtime::Handle::current().metrics().num_workers();
        info!(%listen, metrics_listen, buffer_dir = %config.buffer.dir.display(), max_open_chunk_files,
              worker_threads, "claimcheck is serving");

        // The writer or delivery ends before shutdown only if it failed (a panic): nothing would
        // be written, or delivered, any more. The sidecar stops, with an error, for whatever
        // supervises it to start it again (recovery picks up where the buffer stands), rather
        // than go on acking what it would never deliver.
        let failed = tokio::select! {
            () = shutdown => None,
            ended = &mut writer => Some(Failed::Writer(ended)),
            ended = delivery.stopped() => Some(Failed::Delivery(ended)),
        };
        match &failed {
            Some(Failed::Writer(_)) => error!("the buffer writer stopped; shutting down"),
            Some(Failed::Delivery(_)) => error!("delivery stopped; shutting down"),
            None => {}
        }
        info!("shutting down: no new connections; finishing requests in flight");
        registry.set_shutting_down();
        token.cancel();
        server.await?;
        match failed {
            Some(Failed::Writer(ended)) => {
                return Err(match ended {
                    Ok(Ok(_lock)) => anyhow::anyhow!("the buffer writer stopped before shutdown"),
                    Ok(Err(e)) => e.context("the buffer writer failed"),
                    Err(e) => anyhow::Error::new(e).context("the buffer writer failed"),
                });
            }
            Some(Failed::Delivery(ended)) => {
                // The requests in flight are written and sealed as at any shutdown.
                let _lock = writer.await??;
                return Err(match ended {
                    Ok(()) => anyhow::anyhow!("delivery stopped before shutdown"),
                    Err(e) => anyhow::Error::new(e).context("delivery failed"),
                });
            }
            None => {}
        }
        // Every connection is gone, so every buffer handle is gone: the writer seals and stops.
        // Its lock on the directory is held until delivery has stopped as well.
        let _lock = writer.await??;
        info!(timeout = ?config.shutdown_timeout, "delivering sealed chunks before exit");
        let left = delivery.drain(config.shutdown_timeout).await;
        let (dropped, dropped_events, dead) = registry.losses();
        if dropped > 0 || dead > 0 {
            warn!(
                dropped_chunks = dropped,
                dropped_events,
                dead_lettered_chunks = dead,
                "chunks were dropped or dead-lettered during this run"
            );
        }
        if left > 0 {
            warn!(
                chunks = left,
                "chunks left in the buffer; they are delivered on the next start"
            );
        } else {
            info!("buffer is empty");
        }
        Ok(())
    }
}

/// What stopped the sidecar before its shutdown was asked for.
enum Failed<W> {
    Writer(Result<W, tokio::task::JoinError>),
    Delivery(Result<(), tokio::task::JoinError>),
}

/// Writes the bound addresses to `path` atomically (a temporary file renamed), so that a reader
/// never sees half of it.
fn write_address_file(path: &Path, forward: &str, metrics: Option<&str>) -> std::io::Result<()> {
    let json = serde_json::json!({"forward": forward, "metrics": metrics});
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{json}\n"))?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn the_sidecar_stops_with_an_error_when_its_buffer_writer_fails() {
        let dir = tempfile::tempdir().unwrap();
        let config =
            testing::config(&dir.path().join("buffer"), &["--flush-interval", "200ms"]).unwrap();
        let sidecar = Sidecar::open(config).unwrap();
        sidecar.buffer.handle.panic_at_next_seal();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let store = Arc::new(testing::MemoryStore::new("in-memory"));
        let sink = Arc::new(testing::MemorySink::new());
        let task = tokio::spawn(sidecar.run_with(listener, std::future::pending(), store, sink));

        // An event, acked once stored; its chunk falls due 200 ms later and the seal panics.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let message = rmpv::Value::Array(vec![
            "app".into(),
            now.into(),
            rmpv::Value::Map(vec![("message".into(), "hello".into())]),
            rmpv::Value::Map(vec![("chunk".into(), "token-1".into())]),
        ]);
        let mut bytes = Vec::new();
        rmpv::encode::write_value(&mut bytes, &message).unwrap();
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        conn.write_all(&bytes).await.unwrap();
        let mut ack = [0u8; 64];
        assert!(conn.read(&mut ack).await.unwrap() > 0, "acked");

        let ended = tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("the sidecar stops by itself")
            .unwrap();
        let error = ended.expect_err("with an error");
        assert!(format!("{error:#}").contains("buffer writer"), "{error:#}");
    }
}
