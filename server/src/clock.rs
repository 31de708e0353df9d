//! A monotonic clock in nanoseconds on `tokio::time` (so paused-time tests step it), so
//! instants fit in atomics. A leaf: it imports nothing from the crate.

use std::sync::OnceLock;
use std::time::Duration;
use tokio::time::Instant;

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(|| Instant::now() - Duration::from_secs(1))
}

/// `at` as nanoseconds (never 0).
pub fn nanos(at: Instant) -> u64 {
    (at.saturating_duration_since(epoch()).as_nanos() as u64).max(1)
}

/// Nanoseconds back to an instant.
pub fn instant(nanos: u64) -> Instant {
    epoch() + Duration::from_nanos(nanos)
}
