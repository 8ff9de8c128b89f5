//! Retries, Fluentd style: exponential backoff with jitter, and a budget.
//!
//! The n-th retry waits `retry_wait * 2^(n-1)`, capped at `retry_max_interval`, then moved by a
//! random ±12.5 % (Fluentd's `retry_randomize`) so that chunks failing together do not retry
//! together. A chunk's budget is spent after `retry_max_times` retries or `retry_timeout` after
//! its first failure, whichever comes first, unless `retry_forever`; the chunk then goes to the
//! dead-letter folder, never away.

use std::time::{Duration, Instant};

/// Retry timing shared by the uploader and the publisher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// First wait (Fluentd's `retry_wait`).
    pub wait: Duration,
    /// Longest wait (Fluentd's `retry_max_interval`).
    pub max_interval: Duration,
}

impl Backoff {
    /// How long to wait before attempt `attempt + 1`, after `attempt` failures (`attempt >= 1`).
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(32);
        let base = self
            .wait
            .saturating_mul(1u32 << exp.min(31))
            .min(self.max_interval);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_counts_retries_and_time_unless_forever() {
        let backoff = Backoff {
            wait: Duration::from_millis(1),
            max_interval: Duration::from_millis(2),
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
