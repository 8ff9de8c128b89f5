//! Small helpers for deadlines.

use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The wait after a failed `accept` (out of file descriptors and the like, which leaves the
/// listener readable: retrying at once would spin): 100 ms, twice as long after each failure
/// up to 5 s, 100 ms again after a success.
#[derive(Debug)]
pub(crate) struct AcceptBackoff(Duration);

impl AcceptBackoff {
    const FIRST: Duration = Duration::from_millis(100);

    pub(crate) fn new() -> Self {
        AcceptBackoff(Self::FIRST)
    }

    /// An accept succeeded.
    pub(crate) fn reset(&mut self) {
        self.0 = Self::FIRST;
    }

    /// The next wait, for the log.
    pub(crate) fn next(&self) -> Duration {
        self.0
    }

    /// Waits before the next attempt; false if `shutdown` came first.
    pub(crate) async fn wait(&mut self, shutdown: &CancellationToken) -> bool {
        let waited = tokio::select! {
            () = shutdown.cancelled() => false,
            () = tokio::time::sleep(self.0) => true,
        };
        self.0 = (self.0 * 2).min(Duration::from_secs(5));
        waited
    }
}

/// Sleeps until `deadline`, or forever when there is none (a `select!` branch that never
/// fires).
pub(crate) async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
