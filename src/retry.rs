//! Exponential backoff with jitter, Fluentd style.
//!
//! The n-th retry waits `retry_wait * 2^(n-1)`, capped at `retry_max_interval`, then moved by a
//! random ±12.5 % (Fluentd's `retry_randomize`) so that chunks failing together do not retry
//! together.

use std::time::Duration;

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

#[cfg(test)]
mod tests {
    use super::*;

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
