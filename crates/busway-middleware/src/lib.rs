//! Resilience middleware for busway, as [tower] layers.
//!
//! Every layer here works on any [`tower::Service`], so the same stack wraps
//! a handler on the [`Bus`](https://docs.rs/busway) (tasks, events, RPC
//! methods) or an outgoing call:
//!
//! | concern | layer | notes |
//! |---|---|---|
//! | retry with exponential backoff and jitter | [`RetryLayer`] + [`Backoff`] | tower's `Retry` with a busway policy; asks the error whether it is [`Retryable`] |
//! | timeout | [`TimeoutLayer`] | keeps the service's own error type ([`LayerError::TimedOut`] converts into it) |
//! | circuit breaker | [`CircuitBreakerLayer`] | closed / open / half-open; state observable through a [`CircuitBreakerHandle`] |
//! | bulkhead (concurrency limit) | [`ConcurrencyLimitLayer`] | tower's, re-exported |
//! | rate limit | [`RateLimitLayer`] | shared by every clone of the service; waits or rejects |
//! | dedup by message id | [`DedupLayer`] | bounded in-memory store with a TTL, or any [`DedupStore`] |
//! | correlation / causation | [`CorrelationLayer`] | handlers run inside a [`MessageContext`] that outgoing messages pick up |
//! | W3C trace context | [`trace_context`] | `traceparent` / `tracestate` in message headers, parsed and passed on |
//!
//! Layers that can fail on their own (timeout, open circuit, rate limit,
//! duplicate in progress) produce a [`LayerError`] and convert it into the
//! service's error type, so a handler stack keeps returning the handler's
//! error and an RPC stack the RPC error.
//!
//! ```
//! use std::time::Duration;
//! use busway_middleware::{Backoff, CircuitBreakerLayer, LayerError, RetryLayer, TimeoutLayer};
//! use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), LayerError> {
//! let breaker = CircuitBreakerLayer::default();
//! let health = breaker.handle();
//! let mut service = ServiceBuilder::new()
//!     .layer(RetryLayer::new(Backoff::default().with_max_attempts(3)))
//!     .layer(breaker)
//!     .layer(TimeoutLayer::new(Duration::from_secs(1)))
//!     .service(service_fn(|n: u32| async move { Ok::<_, LayerError>(n * 2) }));
//! assert_eq!(service.ready().await?.call(21).await?, 42);
//! assert!(health.state().is_closed());
//! # Ok(())
//! # }
//! ```

mod circuit_breaker;
pub mod correlation;
pub mod dedup;
mod envelope;
mod error;
mod inbox;
mod rate_limit;
mod retry;
mod timeout;
pub mod trace_context;

pub use circuit_breaker::{
    CircuitBreaker, CircuitBreakerConfig, CircuitBreakerHandle, CircuitBreakerLayer, CircuitState,
    CircuitStats, CountsAsFailure, EveryError,
};
pub use correlation::{Correlation, CorrelationLayer, MessageContext};
pub use dedup::{Dedup, DedupLayer, DedupStore, MemoryDedupStore, Seen};
pub use envelope::{Envelope, MessageInfo};
pub use error::{LayerError, Retryable};
pub use rate_limit::{RateLimit, RateLimitLayer};
pub use retry::{Backoff, Classify, Retry, RetryLayer, RetryRetryable};
pub use timeout::{Timeout, TimeoutLayer};
/// Bulkhead: at most N calls in the inner service at once (tower's
/// `ConcurrencyLimit`; clones share the permits).
pub use tower::limit::{ConcurrencyLimit, ConcurrencyLimitLayer};
pub use trace_context::{TraceContext, TraceParent};
