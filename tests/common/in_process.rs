//! The whole sidecar in this process (`Sidecar::run_with`) on 127.0.0.1:0, delivering to the
//! in-memory S3 and Kinesis of `claimcheck::testing`, with its admin endpoint on a port of its
//! own choosing: for tests that need neither a real process nor the AWS APIs.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use claimcheck::testing::{self, MemorySink, MemoryStore};
use claimcheck::Sidecar;
use claimcheck_consumer::{Event, Pointer};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::{await_metrics_at, metric_sum, samples, scrape};

/// A sidecar running in this process.
pub struct InProcess {
    pub addr: SocketAddr,
    /// The admin endpoint's port (`/metrics`, `/readyz`, `/api/v1/buffer`).
    pub admin: u16,
    pub store: Arc<MemoryStore>,
    pub sink: Arc<MemorySink>,
    pub buffer_dir: PathBuf,
    stop: oneshot::Sender<()>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl InProcess {
    /// A sidecar on a buffer directory of its own (kept until `dir` is dropped), with `args`.
    pub async fn start(dir: &tempfile::TempDir, args: &[&str]) -> InProcess {
        let store = Arc::new(MemoryStore::new("in-memory"));
        let sink = Arc::new(MemorySink::new());
        InProcess::start_on(&dir.path().join("buffer"), args, store, sink).await
    }

    /// A sidecar on `buffer_dir` (which may hold what an earlier run left), delivering to
    /// `store` and `sink`.
    pub async fn start_on(
        buffer_dir: &Path,
        args: &[&str],
        store: Arc<MemoryStore>,
        sink: Arc<MemorySink>,
    ) -> InProcess {
        let address_file = buffer_dir.with_extension("addr");
        let _ = std::fs::remove_file(&address_file);
        let address = address_file.to_str().expect("a UTF-8 path");
        let mut all = vec!["--metrics-listen", "127.0.0.1:0", "--address-file", address];
        all.extend_from_slice(args);
        let config = testing::config(buffer_dir, &all).unwrap();
        let sidecar = Sidecar::open(config).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(sidecar.run_with(
            listener,
            async move {
                let _ = stopped.await;
            },
            store.clone(),
            sink.clone(),
        ));
        // The address file is written once the sidecar serves.
        let deadline = Instant::now() + Duration::from_secs(30);
        let admin = loop {
            if let Ok(text) = std::fs::read_to_string(&address_file) {
                let addresses: Value = serde_json::from_str(&text).expect("address file is JSON");
                let admin: SocketAddr = addresses["metrics"]
                    .as_str()
                    .and_then(|a| a.parse().ok())
                    .expect("the admin address");
                break admin.port();
            }
            assert!(!task.is_finished(), "the sidecar stopped before serving");
            assert!(
                Instant::now() < deadline,
                "the sidecar did not start serving"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        InProcess {
            addr,
            admin,
            store,
            sink,
            buffer_dir: buffer_dir.to_path_buf(),
            stop,
            task,
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Every sample of a scrape of `/metrics`. Only the buffer's series (`claimcheck_buffer_*`,
    /// `claimcheck_chunks_dropped`, `claimcheck_events_dropped`, `claimcheck_chunks_dead_lettered`,
    /// `claimcheck_files_quarantined`, `claimcheck_ready`) belong to this sidecar alone; the
    /// other counters are shared by every sidecar in the process.
    pub async fn metrics(&self) -> HashMap<String, f64> {
        samples(&scrape(self.admin, "/metrics").await.1)
    }

    /// Sum of the samples of `metric`: a name (all its label sets) or one series.
    pub async fn metric(&self, metric: &str) -> f64 {
        metric_sum(&self.metrics().await, metric)
    }

    /// Waits up to a minute until `check` holds for the sidecar's metrics.
    pub async fn await_metrics(&self, what: &str, check: impl Fn(&HashMap<String, f64>) -> bool) {
        await_metrics_at(self.admin, what, check, String::new).await
    }

    /// The events of every published pointer, in publish order.
    pub fn delivered(&self) -> Vec<(Pointer, Vec<Event>)> {
        delivered(&self.store, &self.sink)
    }

    /// True until the sidecar's task ends (it never should before [`InProcess::shut_down`]).
    pub fn running(&self) -> bool {
        !self.task.is_finished()
    }

    /// Waits up to a minute for the sidecar to stop by itself (not asked to); its result.
    pub async fn stopped_by_itself(self) -> anyhow::Result<()> {
        let InProcess { stop, task, .. } = self;
        let ended = tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .expect("the sidecar stops by itself")
            .expect("the sidecar's task does not panic");
        // Held until here: dropped, it would have asked the sidecar to stop.
        drop(stop);
        ended
    }

    /// Stops accepting, lets the sidecar seal and deliver everything, and waits for it to end.
    pub async fn shut_down(self) -> (Arc<MemoryStore>, Arc<MemorySink>) {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(60), self.task)
            .await
            .expect("the sidecar stops")
            .unwrap()
            .expect("the sidecar ran without error");
        (self.store, self.sink)
    }
}

/// The events of every pointer in `sink`, read from `store` (or inline), in publish order.
pub fn delivered(store: &MemoryStore, sink: &MemorySink) -> Vec<(Pointer, Vec<Event>)> {
    sink.pointers()
        .into_iter()
        .map(|p| {
            let events = testing::events(store, &p).unwrap_or_else(|e| panic!("{p:?}: {e}"));
            assert_eq!(events.len() as u64, p.records, "{p:?}");
            (p, events)
        })
        .collect()
}

/// Event id (the `id` field of `common::load`'s records) -> times delivered.
pub fn id_counts(delivered: &[(Pointer, Vec<Event>)]) -> HashMap<u64, usize> {
    super::load::times_delivered(delivered.iter().flat_map(|(_, events)| events))
}
