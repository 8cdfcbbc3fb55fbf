//! What handlers return, and how failed deliveries are retried.

use std::any::Any;
use std::fmt;
use std::time::Duration;

pub(crate) use crate::metrics::DeadLetterReason;

/// A handler failed. Any error converts into it with `?`; build one by hand
/// with [`HandlerError::new`] (retried) or [`HandlerError::permanent`]
/// (dead-lettered, or answered as an error, without retrying).
///
/// ```
/// use busway::HandlerError;
///
/// fn parse(s: &str) -> Result<u32, HandlerError> {
///     let n: u32 = s.parse()?; // a ParseIntError becomes a HandlerError
///     if n == 0 {
///         return Err(HandlerError::permanent("zero is not a valid quantity"));
///     }
///     Ok(n)
/// }
/// assert!(parse("x").is_err());
/// assert!(!parse("0").unwrap_err().is_retryable());
/// ```
pub struct HandlerError {
    message: String,
    permanent: bool,
}

impl HandlerError {
    /// A failure that may pass on a later attempt.
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            permanent: false,
        }
    }
    /// A failure no retry can fix: tasks and events go to the dead-letter queue at once.
    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            permanent: true,
        }
    }
    /// The message (sent back in RPC error responses, recorded in dead letters).
    pub fn message(&self) -> &str {
        &self.message
    }
    /// Whether another attempt may succeed.
    pub fn is_retryable(&self) -> bool {
        !self.permanent
    }
}

impl<E: std::error::Error + Send + Sync + 'static> From<E> for HandlerError {
    fn from(e: E) -> Self {
        let mut message = e.to_string();
        let mut source = e.source();
        while let Some(s) = source {
            message.push_str(": ");
            message.push_str(&s.to_string());
            source = s.source();
        }
        Self::new(message)
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerError")
            .field("message", &self.message)
            .field("permanent", &self.permanent)
            .finish()
    }
}

/// The text of a caught panic.
pub(crate) fn panic_message(panic: &(dyn Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        format!("handler panicked: {s}")
    } else if let Some(s) = panic.downcast_ref::<String>() {
        format!("handler panicked: {s}")
    } else {
        "handler panicked".to_owned()
    }
}

/// How failed tasks and events are retried: exponential backoff with jitter,
/// then the dead-letter queue.
///
/// The n-th retry waits `initial_backoff × multiplier^(n-1)`, capped at
/// `max_backoff`, less a random share of up to `jitter` (0–1) of it, so
/// failing consumers do not retry in lockstep.
///
/// ```
/// use busway::RetryPolicy;
/// use std::time::Duration;
///
/// let policy = RetryPolicy::default()
///     .with_max_attempts(3)
///     .with_backoff(Duration::from_millis(100), Duration::from_secs(10));
/// let wait = policy.backoff(2);
/// assert!(wait <= Duration::from_millis(200));
/// assert!(wait >= Duration::from_millis(100)); // jitter takes at most 50% by default
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    /// Deliveries before the message is dead-lettered (≥ 1; 1 means no retry).
    pub max_attempts: u32,
    /// The wait before the first retry.
    pub initial_backoff: Duration,
    /// The longest wait.
    pub max_backoff: Duration,
    /// Growth per retry (≥ 1).
    pub multiplier: f64,
    /// The largest share of a wait taken off at random (0–1).
    pub jitter: f64,
}

impl Default for RetryPolicy {
    /// 5 attempts, 200 ms doubling up to 30 s, 50 % jitter.
    fn default() -> Self {
        Self {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(30),
            multiplier: 2.0,
            jitter: 0.5,
        }
    }
}

impl RetryPolicy {
    /// Sets the number of deliveries before dead-lettering (at least 1).
    pub fn with_max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }
    /// Sets the first and the longest wait.
    pub fn with_backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.initial_backoff = initial;
        self.max_backoff = max.max(initial);
        self
    }
    /// Sets the jitter share (clamped to 0–1).
    pub fn with_jitter(mut self, jitter: f64) -> Self {
        self.jitter = jitter.clamp(0.0, 1.0);
        self
    }

    /// The wait before retrying after failed attempt number `attempt` (1-based).
    pub fn backoff(&self, attempt: u32) -> Duration {
        let exponent = i32::try_from(attempt.saturating_sub(1)).unwrap_or(i32::MAX);
        let base = self.initial_backoff.as_secs_f64() * self.multiplier.max(1.0).powi(exponent);
        let capped = base.min(self.max_backoff.as_secs_f64());
        let jitter = self.jitter.clamp(0.0, 1.0) * rand::random::<f64>();
        Duration::try_from_secs_f64(capped * (1.0 - jitter)).unwrap_or(self.max_backoff)
    }

    /// Whether delivery number `attempt` was the last one allowed.
    pub fn is_last(&self, attempt: u32) -> bool {
        attempt >= self.max_attempts
    }
}

/// Settles a delivery whose handler failed: dead-letter when the failure is
/// permanent or this was the last attempt, otherwise retry after a backoff.
pub(crate) async fn settle_failure(
    delivery: busway_core::Delivery,
    policy: &RetryPolicy,
    what: &str,
    error: HandlerError,
    counters: &crate::bus::Counters,
) {
    use crate::bus::{settle_logged, Counters};
    let queue = delivery.queue().clone();
    let attempt = delivery.attempt();
    if !error.is_retryable() || policy.is_last(attempt) {
        let (reason, kind) = if error.is_retryable() {
            let reason = format!("{what} failed after {attempt} attempts: {error}");
            (reason, DeadLetterReason::Failed)
        } else {
            let reason = format!("{what} failed permanently: {error}");
            (reason, DeadLetterReason::Permanent)
        };
        reject(delivery, kind, reason, counters).await;
    } else {
        Counters::bump(&counters.retried);
        let wait = policy.backoff(attempt);
        tracing::debug!(queue = %queue, attempt, ?wait, %error, "retrying");
        let result = delivery.nack(Some(wait)).await;
        if result.is_ok() {
            crate::metrics::retried();
        }
        settle_logged(result, &queue, "nacking").await;
    }
}

/// Acknowledges a handled delivery (logging, not failing, when the backend refuses).
pub(crate) async fn ack(delivery: busway_core::Delivery, what: &str) {
    let queue = delivery.queue().clone();
    let result = delivery.ack().await;
    if result.is_ok() {
        crate::metrics::acked();
    }
    crate::bus::settle_logged(result, &queue, what).await;
}

/// Dead-letters a delivery that can never be handled (malformed, unknown
/// type, past its attempts) with `reason`.
pub(crate) async fn reject(
    delivery: busway_core::Delivery,
    kind: DeadLetterReason,
    reason: String,
    counters: &crate::bus::Counters,
) {
    use crate::bus::{settle_logged, Counters};
    Counters::bump(&counters.dead_lettered);
    let queue = delivery.queue().clone();
    tracing::warn!(queue = %queue, %reason, "dead-lettering");
    let result = delivery.dead_letter(reason).await;
    if result.is_ok() {
        crate::metrics::dead_lettered(kind);
    }
    settle_logged(result, &queue, "dead-lettering").await;
}

/// Runs a handler future, turning a panic into a (retryable) failure.
pub(crate) async fn run_caught<F>(
    future: F,
    counters: &crate::bus::Counters,
) -> Result<(), HandlerError>
where
    F: std::future::Future<Output = Result<(), HandlerError>>,
{
    use futures::FutureExt;
    match std::panic::AssertUnwindSafe(future).catch_unwind().await {
        Ok(result) => result,
        Err(panic) => {
            crate::bus::Counters::bump(&counters.panics);
            Err(HandlerError::new(panic_message(panic.as_ref())))
        }
    }
}
