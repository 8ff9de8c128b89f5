//! Small helpers for deadlines.

use tokio::time::Instant;

/// Sleeps until `deadline`, or forever when there is none (a `select!` branch that never
/// fires).
pub(crate) async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
