//! The orchestrator's clock: wall-clock milliseconds that advance with
//! tokio's clock, so a paused test clock (virtual time) moves due times too.

use std::time::{Duration, SystemTime};

use tokio::time::Instant;

#[derive(Clone, Copy, Debug)]
pub(crate) struct Clock {
    base_ms: i64,
    base: Instant,
}

impl Clock {
    pub(crate) fn new() -> Self {
        Self {
            base_ms: busway_core::unix_millis(SystemTime::now()),
            base: Instant::now(),
        }
    }

    /// Milliseconds since the Unix epoch.
    pub(crate) fn now_ms(&self) -> i64 {
        let elapsed = i64::try_from(self.base.elapsed().as_millis()).unwrap_or(i64::MAX);
        self.base_ms.saturating_add(elapsed)
    }

    /// The tokio instant at `at_ms`.
    pub(crate) fn instant_at(&self, at_ms: i64) -> Instant {
        let offset = u64::try_from(at_ms.saturating_sub(self.base_ms)).unwrap_or(0);
        self.base + Duration::from_millis(offset)
    }
}

/// `d` in whole milliseconds, saturating.
pub(crate) fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}
