//! A timeout that keeps the service's error type.

use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use tower::{Layer, Service};

use crate::error::LayerError;

/// Fails a call that takes longer than a duration with
/// [`LayerError::TimedOut`], converted into the service's error.
///
/// tower's own `Timeout` boxes every error; this one keeps the handler's or
/// the caller's error type, so it composes with [`Retryable`](crate::Retryable)
/// classification and typed error handling.
///
/// ```
/// use std::time::Duration;
/// use busway_middleware::{LayerError, TimeoutLayer};
/// use tower::{service_fn, ServiceBuilder, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// let slow = service_fn(|_: ()| async {
///     tokio::time::sleep(Duration::from_secs(10)).await;
///     Ok::<_, LayerError>(())
/// });
/// let service = ServiceBuilder::new().layer(TimeoutLayer::new(Duration::from_secs(1))).service(slow);
/// let err = service.oneshot(()).await.unwrap_err();
/// assert_eq!(err, LayerError::TimedOut { after: Duration::from_secs(1) });
/// # }
/// ```
#[derive(Clone, Copy, Debug)]
pub struct TimeoutLayer {
    after: Duration,
}

impl TimeoutLayer {
    /// Calls fail after `after`.
    pub fn new(after: Duration) -> Self {
        Self { after }
    }
}

impl<S> Layer<S> for TimeoutLayer {
    type Service = Timeout<S>;
    fn layer(&self, inner: S) -> Timeout<S> {
        Timeout::new(inner, self.after)
    }
}

/// The service [`TimeoutLayer`] builds.
#[derive(Clone, Debug)]
pub struct Timeout<S> {
    inner: S,
    after: Duration,
}

impl<S> Timeout<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, after: Duration) -> Self {
        Self { inner, after }
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

impl<S, Req> Service<Req> for Timeout<S>
where
    S: Service<Req>,
    S::Future: Send + 'static,
    S::Error: From<LayerError>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let after = self.after;
        let call = self.inner.call(req);
        Box::pin(async move {
            match tokio::time::timeout(after, call).await {
                Ok(result) => result,
                Err(_) => Err(LayerError::TimedOut { after }.into()),
            }
        })
    }
}
