//! A circuit breaker with the reference semantics: closed → open after
//! `failure_threshold` consecutive failures; open rejects calls until
//! `recovery_timeout` has passed, then lets trial calls through (half-open);
//! `success_threshold` successes close it again, one failure reopens it.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::watch;
use tokio::time::Instant;
use tower::{Layer, Service};

use crate::error::LayerError;

/// Where a circuit breaker is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CircuitState {
    /// Calls go through; consecutive failures are counted.
    Closed,
    /// Calls are rejected with [`LayerError::CircuitOpen`] until the recovery timeout passes.
    Open,
    /// Trial calls go through: enough successes close the circuit, one failure reopens it.
    HalfOpen,
}

impl CircuitState {
    /// Whether calls flow normally.
    pub fn is_closed(self) -> bool {
        self == Self::Closed
    }
    /// A lower-case name for metrics and health reports (`closed`, `open`, `half_open`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
        }
    }
}

impl fmt::Display for CircuitState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The thresholds of a circuit breaker (the reference defaults: 5 failures,
/// 30 s recovery timeout, 2 successes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CircuitBreakerConfig {
    /// Consecutive failures that open the circuit (at least 1).
    pub failure_threshold: u32,
    /// How long the circuit stays open before trial calls are let through.
    pub recovery_timeout: Duration,
    /// Successful trial calls that close a half-open circuit (at least 1).
    pub success_threshold: u32,
}

impl Default for CircuitBreakerConfig {
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            recovery_timeout: Duration::from_secs(30),
            success_threshold: 2,
        }
    }
}

/// Counters of a circuit breaker, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CircuitStats {
    /// Calls that completed successfully.
    pub successes: u64,
    /// Calls that failed (as the failure classifier sees it).
    pub failures: u64,
    /// Calls rejected because the circuit was open.
    pub rejected: u64,
    /// How many times the circuit opened.
    pub opened: u64,
}

#[derive(Debug)]
struct Breaker {
    config: CircuitBreakerConfig,
    state: CircuitState,
    failure_count: u32,
    success_count: u32,
    opened_at: Option<Instant>,
    stats: CircuitStats,
    gauge: Option<StateGauge>,
}

/// `busway_circuit_breaker_state{breaker}`: 0 closed, 1 half-open, 2 open.
struct StateGauge {
    name: String,
    gauge: metrics::Gauge,
}

impl StateGauge {
    fn new(name: String, state: CircuitState) -> Self {
        let gauge = metrics::gauge!("busway_circuit_breaker_state", "breaker" => name.clone());
        let this = Self { name, gauge };
        this.set(state);
        this
    }

    fn set(&self, state: CircuitState) {
        self.gauge.set(match state {
            CircuitState::Closed => 0.0,
            CircuitState::HalfOpen => 1.0,
            CircuitState::Open => 2.0,
        });
    }
}

impl fmt::Debug for StateGauge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("StateGauge").field(&self.name).finish()
    }
}

#[derive(Debug)]
struct Shared {
    breaker: Mutex<Breaker>,
    state_tx: watch::Sender<CircuitState>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Breaker> {
        self.breaker.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set(&self, breaker: &mut Breaker, state: CircuitState) {
        if breaker.state != state {
            tracing::info!(from = %breaker.state, to = %state, "circuit breaker state change");
            breaker.state = state;
            if state == CircuitState::Open {
                breaker.stats.opened += 1;
            }
            if let Some(gauge) = &breaker.gauge {
                gauge.set(state);
            }
            self.state_tx.send_replace(state);
        }
    }

    /// Whether a call may go through now.
    fn admit(&self) -> Result<(), LayerError> {
        let mut b = self.lock();
        if b.state == CircuitState::Open {
            let opened_at = b.opened_at.unwrap_or_else(Instant::now);
            let elapsed = opened_at.elapsed();
            if elapsed >= b.config.recovery_timeout {
                b.success_count = 0;
                self.set(&mut b, CircuitState::HalfOpen);
            } else {
                b.stats.rejected += 1;
                return Err(LayerError::CircuitOpen {
                    retry_in: b.config.recovery_timeout - elapsed,
                });
            }
        }
        Ok(())
    }

    fn on_success(&self) {
        let mut b = self.lock();
        b.stats.successes += 1;
        b.failure_count = 0;
        if b.state == CircuitState::HalfOpen {
            b.success_count += 1;
            if b.success_count >= b.config.success_threshold {
                b.success_count = 0;
                self.set(&mut b, CircuitState::Closed);
            }
        }
    }

    fn on_failure(&self) {
        let mut b = self.lock();
        b.stats.failures += 1;
        b.failure_count = b.failure_count.saturating_add(1);
        let trip = b.state == CircuitState::HalfOpen
            || (b.state == CircuitState::Closed && b.failure_count >= b.config.failure_threshold);
        if trip {
            b.opened_at = Some(Instant::now());
            b.success_count = 0;
            self.set(&mut b, CircuitState::Open);
        }
    }
}

/// Watches a circuit breaker from outside: its state (also as a
/// [`watch::Receiver`] for health checks) and its counters.
#[derive(Clone, Debug)]
pub struct CircuitBreakerHandle {
    shared: Arc<Shared>,
}

impl CircuitBreakerHandle {
    /// The current state. An open circuit whose recovery timeout has passed
    /// still reads `Open` until the next call tries it.
    pub fn state(&self) -> CircuitState {
        self.shared.lock().state
    }
    /// Follows state changes.
    pub fn subscribe(&self) -> watch::Receiver<CircuitState> {
        self.shared.state_tx.subscribe()
    }
    /// The counters so far.
    pub fn stats(&self) -> CircuitStats {
        self.shared.lock().stats
    }
    /// The thresholds.
    pub fn config(&self) -> CircuitBreakerConfig {
        self.shared.lock().config
    }
}

/// Which errors count as failures of the callee.
pub trait CountsAsFailure<Err> {
    /// Whether `error` counts as a failure.
    fn counts_as_failure(&self, error: &Err) -> bool;
}

/// The default: every error counts as a failure, as in the reference.
#[derive(Clone, Copy, Debug, Default)]
pub struct EveryError;

impl<Err> CountsAsFailure<Err> for EveryError {
    fn counts_as_failure(&self, _error: &Err) -> bool {
        true
    }
}

impl<Err, F: Fn(&Err) -> bool> CountsAsFailure<Err> for F {
    fn counts_as_failure(&self, error: &Err) -> bool {
        self(error)
    }
}

/// Builds [`CircuitBreaker`] services that all share one breaker (so every
/// clone of a handler, and every worker, trips the same circuit).
///
/// By default every error counts as a failure, as in the reference; use
/// [`count_failures_if`](Self::count_failures_if) to count only some (an
/// error that does not count is treated as a success: the callee answered).
///
/// ```
/// use std::time::Duration;
/// use busway_middleware::{CircuitBreakerConfig, CircuitBreakerLayer, CircuitState};
///
/// let layer = CircuitBreakerLayer::new(CircuitBreakerConfig {
///     failure_threshold: 3,
///     recovery_timeout: Duration::from_secs(10),
///     success_threshold: 1,
/// });
/// let health = layer.handle();
/// assert_eq!(health.state(), CircuitState::Closed);
/// ```
pub struct CircuitBreakerLayer<C = EveryError> {
    shared: Arc<Shared>,
    counts: Arc<C>,
}

impl<C> Clone for CircuitBreakerLayer<C> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
            counts: self.counts.clone(),
        }
    }
}

impl<C> fmt::Debug for CircuitBreakerLayer<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreakerLayer")
            .field("state", &self.shared.lock().state)
            .finish_non_exhaustive()
    }
}

impl Default for CircuitBreakerLayer {
    fn default() -> Self {
        Self::new(CircuitBreakerConfig::default())
    }
}

impl CircuitBreakerLayer {
    /// A closed breaker with these thresholds.
    pub fn new(config: CircuitBreakerConfig) -> Self {
        let config = CircuitBreakerConfig {
            failure_threshold: config.failure_threshold.max(1),
            success_threshold: config.success_threshold.max(1),
            ..config
        };
        Self {
            shared: Arc::new(Shared {
                breaker: Mutex::new(Breaker {
                    config,
                    state: CircuitState::Closed,
                    failure_count: 0,
                    success_count: 0,
                    opened_at: None,
                    stats: CircuitStats::default(),
                    gauge: None,
                }),
                state_tx: watch::channel(CircuitState::Closed).0,
            }),
            counts: Arc::new(EveryError),
        }
    }
}

impl CircuitBreakerLayer {
    /// A closed breaker with the default thresholds, named `name`: its state
    /// is the gauge `busway_circuit_breaker_state{breaker="name"}` (0 closed,
    /// 1 half-open, 2 open), set on every transition.
    ///
    /// ```
    /// use busway_middleware::CircuitBreakerLayer;
    /// let payments = CircuitBreakerLayer::named("payments");
    /// ```
    pub fn named(name: impl Into<String>) -> Self {
        Self::default().with_name(name)
    }
}

impl<C> CircuitBreakerLayer<C> {
    /// Names this breaker: its state becomes the gauge
    /// `busway_circuit_breaker_state{breaker="name"}` (0 closed, 1 half-open,
    /// 2 open), set now and on every transition.
    pub fn with_name(self, name: impl Into<String>) -> Self {
        {
            let mut breaker = self.shared.lock();
            let state = breaker.state;
            breaker.gauge = Some(StateGauge::new(name.into(), state));
        }
        self
    }

    /// Counts only the errors `is_failure` accepts as failures, such as
    /// `|e: &RpcError| !matches!(e, RpcError::Remote { .. })`.
    pub fn count_failures_if<D>(self, is_failure: D) -> CircuitBreakerLayer<D> {
        CircuitBreakerLayer {
            shared: self.shared,
            counts: Arc::new(is_failure),
        }
    }
    /// A handle on the breaker's state and counters.
    pub fn handle(&self) -> CircuitBreakerHandle {
        CircuitBreakerHandle {
            shared: self.shared.clone(),
        }
    }
}

impl<S, C> Layer<S> for CircuitBreakerLayer<C> {
    type Service = CircuitBreaker<S, C>;
    fn layer(&self, inner: S) -> CircuitBreaker<S, C> {
        CircuitBreaker {
            inner,
            shared: self.shared.clone(),
            counts: self.counts.clone(),
        }
    }
}

/// The service [`CircuitBreakerLayer`] builds.
pub struct CircuitBreaker<S, C = EveryError> {
    inner: S,
    shared: Arc<Shared>,
    counts: Arc<C>,
}

impl<S: Clone, C> Clone for CircuitBreaker<S, C> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
            counts: self.counts.clone(),
        }
    }
}

impl<S: fmt::Debug, C> fmt::Debug for CircuitBreaker<S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("inner", &self.inner)
            .field("state", &self.shared.lock().state)
            .finish_non_exhaustive()
    }
}

impl<S, C> CircuitBreaker<S, C> {
    /// A handle on the breaker's state and counters.
    pub fn handle(&self) -> CircuitBreakerHandle {
        CircuitBreakerHandle {
            shared: self.shared.clone(),
        }
    }
    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
    /// Unwraps the service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, Req, C> Service<Req> for CircuitBreaker<S, C>
where
    S: Service<Req>,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
    S::Error: From<LayerError> + Send + 'static,
    C: CountsAsFailure<S::Error> + Send + Sync + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        if let Err(rejected) = self.shared.admit() {
            return Box::pin(std::future::ready(Err(rejected.into())));
        }
        let call = self.inner.call(req);
        let shared = self.shared.clone();
        let counts = self.counts.clone();
        Box::pin(async move {
            let result = call.await;
            match &result {
                Err(error) if counts.counts_as_failure(error) => shared.on_failure(),
                _ => shared.on_success(),
            }
            result
        })
    }
}
