//! Outgoing calls as a tower service, to wrap in middleware.

use std::future::IntoFuture;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use serde_json::Value;

use super::{RpcError, DEFAULT_TIMEOUT};
use crate::Bus;

/// One call through an [`RpcService`]: `method` of `service` with `params`.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct RpcCall {
    /// The service called (its queue is `rpc_{service}`).
    pub service: String,
    /// The method called.
    pub method: String,
    /// The params, as JSON.
    pub params: Value,
    /// How long to wait for the reply.
    pub timeout: Duration,
}

impl RpcCall {
    /// A call with the default timeout.
    pub fn new(service: impl Into<String>, method: impl Into<String>, params: Value) -> Self {
        Self {
            service: service.into(),
            method: method.into(),
            params,
            timeout: DEFAULT_TIMEOUT,
        }
    }
    /// Sets how long to wait for the reply.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
}

/// The bus's RPC client as a [`tower::Service`]: a call's response is the
/// reply's `data`. Wrap it in layers (retry, circuit breaker, rate limit,
/// bulkhead…) to protect the caller and the callee; errors the layers
/// raise arrive as [`RpcError::Layer`].
///
/// ```
/// use std::time::Duration;
/// use busway::middleware::{Backoff, CircuitBreakerLayer, RetryLayer};
/// use busway::rpc::{RpcCall, RpcError};
/// use busway::Bus;
/// use tower::{ServiceBuilder, ServiceExt};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let bus = Bus::connect("memory://").await?;
/// bus.register_request_handler("math", "double", |n: i64| async move { Ok(n * 2) }).await?;
///
/// let breaker = CircuitBreakerLayer::default()
///     // An error response means the service is up: only transport trouble counts.
///     .count_failures_if(|e: &RpcError| !matches!(e, RpcError::Remote { .. }));
/// let health = breaker.handle();
/// let math = ServiceBuilder::new()
///     .layer(RetryLayer::new(Backoff::default().with_max_attempts(3)))
///     .layer(breaker)
///     .service(bus.rpc_service());
/// let call = RpcCall::new("math", "double", serde_json::json!(21)).with_timeout(Duration::from_secs(5));
/// assert_eq!(math.oneshot(call).await?, serde_json::json!(42));
/// assert!(health.state().is_closed());
/// # bus.shutdown().await;
/// # Ok(())
/// # }
/// # tokio::runtime::Runtime::new().unwrap().block_on(run()).unwrap();
/// ```
#[derive(Clone, Debug)]
pub struct RpcService {
    bus: Bus,
}

impl Bus {
    /// This bus's RPC client as a tower service; see [`RpcService`].
    pub fn rpc_service(&self) -> RpcService {
        RpcService { bus: self.clone() }
    }
}

impl tower::Service<RpcCall> for RpcService {
    type Response = Value;
    type Error = RpcError;
    type Future = BoxFuture<'static, Result<Value, RpcError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), RpcError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, call: RpcCall) -> Self::Future {
        self.bus
            .request::<Value>(&call.service, &call.method, &call.params)
            .timeout(call.timeout)
            .into_future()
    }
}
