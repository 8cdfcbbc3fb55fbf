//! The errors layers produce themselves, and how a layer asks an error whether to retry.

use std::time::Duration;

/// A layer refused or gave up on a call. Each layer converts it into the
/// service's own error type (`E: From<LayerError>`), so handler errors stay
/// handler errors and RPC errors stay RPC errors.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LayerError {
    /// The call did not finish within the timeout.
    #[error("timed out after {after:?}")]
    TimedOut {
        /// The timeout that passed.
        after: Duration,
    },
    /// The circuit breaker is open: the call was not made.
    #[error("circuit breaker is open; next trial in {retry_in:?}")]
    CircuitOpen {
        /// How long until the breaker lets a trial call through.
        retry_in: Duration,
    },
    /// The rate limit is exhausted and the limiter rejects instead of waiting.
    #[error("rate limit exceeded; next slot in {retry_in:?}")]
    RateLimited {
        /// How long until a call would be allowed.
        retry_in: Duration,
    },
    /// Another delivery of the same message is being handled right now.
    #[error("message `{key}` is already being handled")]
    DuplicateInProgress {
        /// The dedup key (the message id by default).
        key: String,
    },
    /// The dedup store failed.
    #[error("dedup store failed: {0}")]
    Store(String),
}

impl LayerError {
    /// Every layer error is transient: a later attempt may pass.
    pub fn is_retryable(&self) -> bool {
        true
    }
}

/// Whether another attempt may succeed. The [`Backoff`](crate::Backoff)
/// retry policy asks this by default; implement it for your error types
/// (busway's `HandlerError` and `RpcError` implement it).
///
/// ```
/// use busway_middleware::{LayerError, Retryable};
/// assert!(LayerError::DuplicateInProgress { key: "m1".into() }.is_retryable());
/// ```
pub trait Retryable {
    /// Whether another attempt may succeed.
    fn is_retryable(&self) -> bool;
}

impl Retryable for LayerError {
    fn is_retryable(&self) -> bool {
        LayerError::is_retryable(self)
    }
}
