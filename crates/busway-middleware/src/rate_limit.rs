//! A rate limit shared by every clone of a service.

use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};

use crate::error::LayerError;

/// Lets at most `rate` calls per `per` through, with bursts of up to
/// `burst` calls (a token bucket, computed as a generic cell rate).
/// By default a call over the limit waits for its slot; with
/// [`rejecting`](Self::rejecting) it fails at once with
/// [`LayerError::RateLimited`].
///
/// All services built by one layer (and their clones) share the limit,
/// unlike tower's `RateLimit`, whose budget is per service instance — the
/// bus clones a handler's service for every delivery.
///
/// ```
/// use std::time::Duration;
/// use busway_middleware::RateLimitLayer;
///
/// // 100 calls a second, at most 10 back to back.
/// let layer = RateLimitLayer::new(100, Duration::from_secs(1)).with_burst(10);
/// # let _ = layer;
/// ```
#[derive(Clone, Debug)]
pub struct RateLimitLayer {
    limiter: Arc<Limiter>,
}

#[derive(Debug)]
struct Limiter {
    /// Time between two calls at the sustained rate.
    interval: Duration,
    /// How far ahead of now the schedule may run (the burst).
    tolerance: Duration,
    reject: bool,
    /// The theoretical arrival time of the next call.
    next: Mutex<Option<Instant>>,
}

impl Limiter {
    /// Reserves a slot: `Ok(when)` to start at `when` (now or later), or
    /// `Err(retry_in)` when rejecting and over the limit.
    fn reserve(&self) -> Result<Instant, Duration> {
        let now = Instant::now();
        let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
        let tat = next.map_or(now, |t| t.max(now));
        let start = tat.checked_sub(self.tolerance).unwrap_or(now).max(now);
        if self.reject && start > now {
            return Err(start - now);
        }
        *next = Some(tat + self.interval);
        Ok(start)
    }
}

impl RateLimitLayer {
    /// `rate` calls per `per` (rate at least 1), in bursts of one.
    pub fn new(rate: u32, per: Duration) -> Self {
        let interval = per / rate.max(1);
        Self {
            limiter: Arc::new(Limiter {
                interval,
                tolerance: Duration::ZERO,
                reject: false,
                next: Mutex::new(None),
            }),
        }
    }
    /// Allows up to `burst` calls back to back (at least 1).
    pub fn with_burst(self, burst: u32) -> Self {
        let interval = self.limiter.interval;
        Self {
            limiter: Arc::new(Limiter {
                interval,
                tolerance: interval * burst.max(1).saturating_sub(1),
                reject: self.limiter.reject,
                next: Mutex::new(None),
            }),
        }
    }
    /// Fails calls over the limit instead of delaying them.
    pub fn rejecting(self) -> Self {
        Self {
            limiter: Arc::new(Limiter {
                interval: self.limiter.interval,
                tolerance: self.limiter.tolerance,
                reject: true,
                next: Mutex::new(None),
            }),
        }
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;
    fn layer(&self, inner: S) -> RateLimit<S> {
        RateLimit {
            inner,
            limiter: self.limiter.clone(),
        }
    }
}

/// The service [`RateLimitLayer`] builds.
#[derive(Clone, Debug)]
pub struct RateLimit<S> {
    inner: S,
    limiter: Arc<Limiter>,
}

impl<S> RateLimit<S> {
    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
    /// Unwraps the service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, Req> Service<Req> for RateLimit<S>
where
    S: Service<Req> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
    S::Error: From<LayerError> + Send + 'static,
    Req: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let start = match self.limiter.reserve() {
            Ok(start) => start,
            Err(retry_in) => {
                return Box::pin(std::future::ready(Err(LayerError::RateLimited {
                    retry_in,
                }
                .into())))
            }
        };
        if start <= Instant::now() {
            return Box::pin(self.inner.call(req));
        }
        // The ready service goes with the call; this one keeps a fresh clone.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            tokio::time::sleep_until(start).await;
            inner.oneshot(req).await
        })
    }
}
