//! Retry with exponential backoff and jitter: tower's `Retry` driven by a
//! [`Backoff`] policy.

use std::time::Duration;

use crate::error::Retryable;

/// tower's retry middleware; use it with a [`Backoff`] policy.
pub use tower::retry::{Retry, RetryLayer};

/// Decides whether an error is worth another attempt.
pub trait Classify<E> {
    /// Whether another attempt may succeed after `error`.
    fn is_retryable(&self, error: &E) -> bool;
}

/// The default classifier: asks the error itself ([`Retryable`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct RetryRetryable;

impl<E: Retryable> Classify<E> for RetryRetryable {
    fn is_retryable(&self, error: &E) -> bool {
        error.is_retryable()
    }
}

impl<E, F: Fn(&E) -> bool> Classify<E> for F {
    fn is_retryable(&self, error: &E) -> bool {
        self(error)
    }
}

/// A retry policy for [`RetryLayer`]: up to `max_attempts` calls in all,
/// the n-th retry after `initial × multiplier^(n-1)` capped at `max`, less a
/// random share of up to `jitter` (0–1) of it, so many callers that failed
/// together do not retry in lockstep. Only errors the classifier calls
/// retryable are retried (by default, those whose [`Retryable::is_retryable`]
/// says so).
///
/// ```
/// use std::time::Duration;
/// use busway_middleware::{Backoff, RetryLayer};
///
/// let policy = Backoff::default()
///     .with_max_attempts(4)
///     .with_backoff(Duration::from_millis(50), Duration::from_secs(2))
///     .with_jitter(0.2);
/// assert!(policy.delay(3) <= Duration::from_millis(200));
/// assert!(policy.delay(3) >= Duration::from_millis(160));
/// let layer = RetryLayer::new(policy);
/// # let _ = layer;
/// ```
#[derive(Clone, Debug)]
pub struct Backoff<C = RetryRetryable> {
    max_attempts: u32,
    initial: Duration,
    max: Duration,
    multiplier: f64,
    jitter: f64,
    classifier: C,
    /// The attempt the current call is on (tower clones the policy per call).
    attempt: u32,
}

impl Default for Backoff {
    /// 3 attempts, 100 ms doubling up to 10 s, 50 % jitter, retrying what is [`Retryable`].
    fn default() -> Self {
        Self {
            max_attempts: 3,
            initial: Duration::from_millis(100),
            max: Duration::from_secs(10),
            multiplier: 2.0,
            jitter: 0.5,
            classifier: RetryRetryable,
            attempt: 1,
        }
    }
}

impl<C> Backoff<C> {
    /// Calls in all, the first included (at least 1; 1 means no retry).
    pub fn with_max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }
    /// The wait before the first retry, and the longest wait.
    pub fn with_backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.initial = initial;
        self.max = max.max(initial);
        self
    }
    /// Growth of the wait per retry (at least 1).
    pub fn with_multiplier(mut self, multiplier: f64) -> Self {
        self.multiplier = multiplier.max(1.0);
        self
    }
    /// The largest share of a wait taken off at random (clamped to 0–1).
    pub fn with_jitter(mut self, jitter: f64) -> Self {
        self.jitter = jitter.clamp(0.0, 1.0);
        self
    }
    /// Retries the errors `classifier` accepts instead, such as
    /// `|e: &MyError| e.is_transient()`.
    pub fn retry_if<D>(self, classifier: D) -> Backoff<D> {
        Backoff {
            max_attempts: self.max_attempts,
            initial: self.initial,
            max: self.max,
            multiplier: self.multiplier,
            jitter: self.jitter,
            classifier,
            attempt: self.attempt,
        }
    }
    /// The number of calls allowed in all.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// The wait after failed attempt number `attempt` (1-based), jitter included.
    pub fn delay(&self, attempt: u32) -> Duration {
        let exponent = i32::try_from(attempt.saturating_sub(1)).unwrap_or(i32::MAX);
        let base = self.initial.as_secs_f64() * self.multiplier.max(1.0).powi(exponent);
        let capped = base.min(self.max.as_secs_f64());
        let jitter = self.jitter.clamp(0.0, 1.0) * rand::random::<f64>();
        Duration::try_from_secs_f64(capped * (1.0 - jitter)).unwrap_or(self.max)
    }
}

impl<Req, Res, E, C> tower::retry::Policy<Req, Res, E> for Backoff<C>
where
    Req: Clone,
    C: Classify<E>,
{
    type Future = tokio::time::Sleep;

    fn retry(&mut self, _req: &mut Req, result: &mut Result<Res, E>) -> Option<Self::Future> {
        let Err(error) = result else { return None };
        if self.attempt >= self.max_attempts || !self.classifier.is_retryable(error) {
            return None;
        }
        let wait = self.delay(self.attempt);
        self.attempt += 1;
        tracing::debug!(attempt = self.attempt, ?wait, "retrying");
        Some(tokio::time::sleep(wait))
    }

    fn clone_request(&mut self, req: &Req) -> Option<Req> {
        Some(req.clone())
    }
}
