//! Retries, Fluentd style: exponential backoff with jitter, a budget, and the one step that
//! both delivery stages take after a failed attempt.
//!
//! The n-th retry waits `retry_wait * 2^(n-1)`, capped at `retry_max_interval`, then moved by a
//! random ±12.5 % (Fluentd's `retry_randomize`, on by default) so that chunks failing together
//! do not retry together. A chunk's budget is spent after `retry_max_times` retries or
//! `retry_timeout` after its first failure, whichever comes first, unless `retry_forever`; the
//! chunk then goes to the dead-letter folder, never away.
//!
//! [`RetryStep::failed`] is what the uploader and the publisher do with a chunk whose attempt
//! failed: record the failure (registry, outage reporter, metrics), then either move the chunk to
//! `dead/` or put it back in the stage's queue once its backoff has passed. Time is tokio's, so
//! tests run it on a paused clock.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, error};

use crate::buffer::chunk::ChunkPaths;
use crate::buffer::dead_letter;
use crate::buffer::registry::{self, Registry};
use crate::metrics::metrics;
use crate::outage::{Failure, Stage};

/// Retry timing shared by the uploader and the publisher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// First wait (Fluentd's `retry_wait`).
    pub wait: Duration,
    /// Longest wait (Fluentd's `retry_max_interval`).
    pub max_interval: Duration,
    /// Move each wait by a random ±12.5 % (Fluentd's `retry_randomize`).
    pub randomize: bool,
}

impl Backoff {
    /// How long to wait before attempt `attempt + 1`, after `attempt` failures (`attempt >= 1`).
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(31);
        let base = self.wait.saturating_mul(1u32 << exp).min(self.max_interval);
        if !self.randomize {
            return base;
        }
        let jitter: f64 = rand::random_range(-0.125..=0.125);
        base.mul_f64(1.0 + jitter)
            .min(self.max_interval.mul_f64(1.125))
    }
}

/// Backoff and budget of the uploader and the publisher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub backoff: Backoff,
    /// Give up this long after the first failure (Fluentd's `retry_timeout`).
    pub timeout: Duration,
    /// Give up after this many retries (Fluentd's `retry_max_times`).
    pub max_times: Option<u32>,
    /// Never give up (Fluentd's `retry_forever`).
    pub forever: bool,
}

/// The failures of one chunk at one stage.
#[derive(Debug, Clone, Copy, Default)]
pub struct Attempts {
    failures: u32,
    first_failure: Option<Instant>,
}

impl Attempts {
    pub fn failed(&mut self) {
        self.failures += 1;
        self.first_failure.get_or_insert_with(Instant::now);
    }

    pub fn count(&self) -> u32 {
        self.failures
    }

    /// True once the budget is spent: no retry is left.
    pub fn exhausted(&self, policy: &RetryPolicy) -> bool {
        if policy.forever || self.failures == 0 {
            return false;
        }
        let retries = self.failures - 1;
        policy.max_times.is_some_and(|max| retries >= max)
            || self
                .first_failure
                .is_some_and(|t| t.elapsed() >= policy.timeout)
    }

    /// How long to wait before the next attempt.
    pub fn delay(&self, policy: &RetryPolicy) -> Duration {
        policy.backoff.delay(self.failures.max(1))
    }
}

/// A chunk's attempt at one stage, as the retry step sees it.
pub trait Retried: Send + 'static {
    fn chunk_id(&self) -> &str;
    fn paths(&self) -> &ChunkPaths;
    /// Events in the chunk, for the dead-letter line.
    fn events(&self) -> u64;
    fn attempts(&mut self) -> &mut Attempts;
    /// Lets go of what the job need not hold while it waits (an inline body).
    fn unload(&mut self) {}
}

/// What became of a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Next {
    /// Back in the queue after this long.
    Retry(Duration),
    /// Budget spent: moved to `dead/`. (If that move fails, the chunk stays in the buffer and
    /// is re-queued as for a retry, the move tried again when it fails once more.)
    DeadLettered,
}

/// The step after a failed attempt at one stage: dead-letter, or back off and re-queue.
pub struct RetryStep<J> {
    stage: Stage,
    policy: RetryPolicy,
    buffer_dir: PathBuf,
    registry: Arc<Registry>,
    queue: mpsc::UnboundedSender<J>,
}

impl<J: Retried> RetryStep<J> {
    /// A step for `stage` that puts jobs back on `queue`.
    pub fn new(
        stage: Stage,
        policy: RetryPolicy,
        buffer_dir: PathBuf,
        registry: Arc<Registry>,
        queue: mpsc::UnboundedSender<J>,
    ) -> Self {
        RetryStep {
            stage,
            policy,
            buffer_dir,
            registry,
            queue,
        }
    }

    /// Records the failure of `job`'s attempt and dead-letters it or re-queues it after its
    /// backoff. Per chunk at debug: the outage reporter says it once for all of them.
    pub fn failed(&self, mut job: J, failure: &Failure) -> Next {
        let id = job.chunk_id().to_owned();
        job.attempts().failed();
        job.unload();
        let attempts = *job.attempts();
        // Dead-lettered while still in its working phase: a chunk marked waiting could be
        // chosen by `drop_oldest_chunk` meanwhile, its files deleted under the move.
        if attempts.exhausted(&self.policy) {
            match dead_letter::move_to_dead(&self.buffer_dir, job.paths()) {
                Ok(()) => {
                    self.registry.remove(&id);
                    self.registry.count_dead_letter();
                    error!(chunk_id = %id, stage = self.stage.name(), attempts = attempts.count(),
                           events = job.events(), cause = %failure.cause,
                           "retry budget exhausted; chunk moved to the dead-letter folder (claimcheck replay re-queues it)");
                    return Next::DeadLettered;
                }
                // Left where it is, it would wait for the next start: tried again instead.
                Err(e) => {
                    error!(chunk_id = %id, stage = self.stage.name(), cause = %failure.cause, move_error = %e,
                           "retry budget exhausted but the chunk cannot be moved to the dead-letter folder; it stays in the buffer and is tried again")
                }
            }
        }
        let [waiting, _] = registry::phases_of(self.stage);
        self.registry.failed(&id, waiting, failure.cause.clone());
        let delay = attempts.delay(&self.policy);
        metrics().retry(self.stage.name());
        self.registry.retry_in(&id, delay);
        self.registry
            .outage(self.stage)
            .failed(failure.clone(), attempts.count());
        debug!(chunk_id = %id, stage = self.stage.name(), attempt = attempts.count(), retry_in = ?delay,
               cause = %failure.cause, retryable = failure.retryable, "{} failed; will retry", self.stage.name());
        let queue = self.queue.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = queue.send(job);
        });
        Next::Retry(delay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct TestJob {
        id: String,
        paths: ChunkPaths,
        attempts: Attempts,
    }

    impl Retried for TestJob {
        fn chunk_id(&self) -> &str {
            &self.id
        }

        fn paths(&self) -> &ChunkPaths {
            &self.paths
        }

        fn events(&self) -> u64 {
            1
        }

        fn attempts(&mut self) -> &mut Attempts {
            &mut self.attempts
        }
    }

    /// Fails one chunk until the step gives up; returns the delays the step chose and when (on
    /// the paused clock, from the first failure) the chunk came back to the queue.
    async fn fail_until_given_up(policy: RetryPolicy) -> (Vec<Duration>, Vec<Duration>) {
        let dir = tempfile::tempdir().unwrap();
        let chunks = crate::buffer::chunks_dir(dir.path());
        std::fs::create_dir_all(&chunks).unwrap();
        let id = "0123456789abcdef0123456789abcdef".to_string();
        let paths = ChunkPaths::new(&chunks, &id);
        std::fs::write(&paths.data, b"data").unwrap();
        std::fs::write(&paths.state, b"{}").unwrap();
        let registry = Arc::new(Registry::new());
        let (tx, mut rx) = mpsc::unbounded_channel();
        let step = RetryStep::new(
            Stage::Upload,
            policy,
            dir.path().to_path_buf(),
            registry.clone(),
            tx,
        );
        let failure = Failure {
            code: "InternalError".into(),
            cause: "injected".into(),
            retryable: true,
        };
        let mut job = TestJob {
            id: id.clone(),
            paths: paths.clone(),
            attempts: Attempts::default(),
        };
        let (mut delays, mut back) = (Vec::new(), Vec::new());
        let started = Instant::now();
        while let Next::Retry(delay) = step.failed(job, &failure) {
            delays.push(delay);
            assert!(paths.data.exists(), "a chunk waiting for a retry stays");
            job = rx.recv().await.expect("the chunk comes back");
            back.push(started.elapsed());
        }
        assert!(!paths.data.exists() && !paths.state.exists());
        let dead = crate::buffer::dead_letter::list_dead(dir.path()).unwrap();
        assert_eq!(dead, vec![id]);
        assert_eq!(registry.losses().2, 1, "counted as dead-lettered");
        (delays, back)
    }

    fn secs(v: &[u64]) -> Vec<Duration> {
        v.iter().map(|&s| Duration::from_secs(s)).collect()
    }

    const EXACT: Backoff = Backoff {
        wait: Duration::from_secs(1),
        max_interval: Duration::from_secs(4),
        randomize: false,
    };

    #[tokio::test(start_paused = true)]
    async fn a_chunk_comes_back_after_each_backoff_until_its_retries_are_spent() {
        let (delays, back) = fail_until_given_up(RetryPolicy {
            backoff: EXACT,
            timeout: Duration::from_secs(3600),
            max_times: Some(4),
            forever: false,
        })
        .await;
        // The first attempt and 4 retries; the waits double up to the longest interval.
        assert_eq!(delays, secs(&[1, 2, 4, 4]));
        assert_eq!(back, secs(&[1, 3, 7, 11]));
    }

    #[tokio::test(start_paused = true)]
    async fn a_chunk_goes_to_dead_letters_once_retry_timeout_has_passed_since_its_first_failure() {
        let (delays, back) = fail_until_given_up(RetryPolicy {
            backoff: EXACT,
            timeout: Duration::from_secs(5),
            max_times: None,
            forever: false,
        })
        .await;
        // Failures at 0, 1, 3 and 7 s: the one at 7 s is past the 5 s budget.
        assert_eq!(delays, secs(&[1, 2, 4]));
        assert_eq!(back, secs(&[1, 3, 7]));
    }

    #[tokio::test(start_paused = true)]
    async fn a_chunk_that_cannot_be_moved_to_dead_letters_is_tried_again() {
        let dir = tempfile::tempdir().unwrap();
        let chunks = crate::buffer::chunks_dir(dir.path());
        std::fs::create_dir_all(&chunks).unwrap();
        // `dead` cannot be made: a file has its name.
        std::fs::write(dir.path().join("dead"), b"").unwrap();
        let id = "0123456789abcdef0123456789abcdef".to_string();
        let paths = ChunkPaths::new(&chunks, &id);
        std::fs::write(&paths.data, b"data").unwrap();
        std::fs::write(&paths.state, b"{}").unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let step = RetryStep::new(
            Stage::Upload,
            RetryPolicy {
                backoff: EXACT,
                timeout: Duration::from_secs(3600),
                max_times: Some(0),
                forever: false,
            },
            dir.path().to_path_buf(),
            Arc::new(Registry::new()),
            tx,
        );
        let failure = Failure {
            code: "InternalError".into(),
            cause: "injected".into(),
            retryable: true,
        };
        let job = TestJob {
            id,
            paths: paths.clone(),
            attempts: Attempts::default(),
        };
        assert_eq!(step.failed(job, &failure), Next::Retry(EXACT.wait));
        let job = rx.recv().await.expect("the chunk comes back");
        assert!(paths.data.exists() && paths.state.exists());
        std::fs::remove_file(dir.path().join("dead")).unwrap();
        assert_eq!(step.failed(job, &failure), Next::DeadLettered);
        assert!(!paths.data.exists());
    }

    #[test]
    fn the_budget_counts_retries_and_time_unless_forever() {
        let backoff = Backoff {
            wait: Duration::from_millis(1),
            max_interval: Duration::from_millis(2),
            randomize: true,
        };
        let times = RetryPolicy {
            backoff,
            timeout: Duration::from_secs(3600),
            max_times: Some(2),
            forever: false,
        };
        let mut a = Attempts::default();
        assert!(!a.exhausted(&times));
        a.failed(); // the first attempt
        a.failed(); // retry 1
        assert!(!a.exhausted(&times));
        a.failed(); // retry 2: the last one allowed
        assert!(a.exhausted(&times));
        assert!(!a.exhausted(&RetryPolicy {
            forever: true,
            ..times
        }));
        let timeout = RetryPolicy {
            timeout: Duration::ZERO,
            max_times: None,
            ..times
        };
        let mut b = Attempts::default();
        b.failed();
        assert!(b.exhausted(&timeout));
    }

    #[test]
    fn grows_exponentially_with_jitter_and_stays_bounded() {
        let b = Backoff {
            wait: Duration::from_secs(1),
            max_interval: Duration::from_secs(30),
            randomize: true,
        };
        for (attempt, base) in [
            (1, 1.0),
            (2, 2.0),
            (3, 4.0),
            (5, 16.0),
            (6, 30.0),
            (40, 30.0),
        ] {
            for _ in 0..50 {
                let d = b.delay(attempt).as_secs_f64();
                assert!(
                    d >= base * 0.875 - 1e-9 && d <= base * 1.125 + 1e-9,
                    "attempt {attempt}: {d}"
                );
            }
        }
    }
}
