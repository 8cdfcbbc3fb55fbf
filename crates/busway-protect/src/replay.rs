//! Replay protection: a time window on when a message was sent, and the ids
//! already received within it.

use std::collections::{HashSet, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use uuid::Uuid;

use crate::error::ProtectError;

/// Rejects messages sent outside a time window, and messages whose id was
/// already received on the same queue within it.
///
/// Ids older than the window are forgotten (their messages fail the window
/// check anyway), and at most `capacity` ids are remembered: past it the
/// oldest are forgotten first. The memory is per process; redeliveries by the
/// transport (attempt 2 and later) are not replays and are not checked
/// against the ids.
///
/// ```
/// use busway_protect::{ProtectError, ReplayGuard};
/// use std::time::Duration;
///
/// let guard = ReplayGuard::new(Duration::from_secs(60));
/// let id = uuid::Uuid::now_v7();
/// let now_ms = 1_800_000_000_000;
/// assert!(guard.check("orders", id, now_ms - 1_000, now_ms).is_ok());
/// assert_eq!(guard.check("orders", id, now_ms - 1_000, now_ms), Err(ProtectError::Replayed { id }));
/// assert!(matches!(
///     guard.check("orders", uuid::Uuid::now_v7(), now_ms - 120_000, now_ms),
///     Err(ProtectError::Expired { .. })
/// ));
/// ```
#[derive(Debug)]
pub struct ReplayGuard {
    window: Duration,
    capacity: usize,
    seen: Mutex<Seen>,
}

#[derive(Debug, Default)]
struct Seen {
    ids: HashSet<(String, Uuid)>,
    order: VecDeque<(i64, String, Uuid)>,
}

impl ReplayGuard {
    /// A guard accepting messages sent at most `window` ago (or ahead, for
    /// clock skew), remembering up to a million ids.
    pub fn new(window: Duration) -> Self {
        Self::with_capacity(window, 1_000_000)
    }

    /// A guard remembering at most `capacity` ids.
    pub fn with_capacity(window: Duration, capacity: usize) -> Self {
        Self {
            window,
            capacity: capacity.max(1),
            seen: Mutex::new(Seen::default()),
        }
    }

    /// The window.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// Checks only the window: `sent_at_ms` within `window` of `now_ms`.
    pub fn check_window(&self, sent_at_ms: i64, now_ms: i64) -> Result<(), ProtectError> {
        let age_ms = now_ms.saturating_sub(sent_at_ms);
        let window_ms = i64::try_from(self.window.as_millis()).unwrap_or(i64::MAX);
        if age_ms > window_ms || age_ms < window_ms.saturating_neg() {
            return Err(ProtectError::Expired {
                age_ms,
                window: self.window,
            });
        }
        Ok(())
    }

    /// Checks the window, then that `id` was not received on `scope` (a
    /// queue) before, and remembers it.
    pub fn check(
        &self,
        scope: &str,
        id: Uuid,
        sent_at_ms: i64,
        now_ms: i64,
    ) -> Result<(), ProtectError> {
        self.check_window(sent_at_ms, now_ms)?;
        let window_ms = i64::try_from(self.window.as_millis()).unwrap_or(i64::MAX);
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let key = (scope.to_owned(), id);
        if seen.ids.contains(&key) {
            return Err(ProtectError::Replayed { id });
        }
        let horizon = now_ms.saturating_sub(window_ms);
        while let Some((at, _, _)) = seen.order.front() {
            if *at >= horizon && seen.ids.len() < self.capacity {
                break;
            }
            if let Some((_, scope, id)) = seen.order.pop_front() {
                seen.ids.remove(&(scope, id));
            }
        }
        seen.ids.insert(key);
        seen.order.push_back((sent_at_ms, scope.to_owned(), id));
        Ok(())
    }
}
