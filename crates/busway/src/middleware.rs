//! Middleware on handlers and calls: tower layers from
//! [`busway_middleware`], plus what ties them to the [`Bus`](crate::Bus).
//!
//! Put layers on a handler with `.layer(...)` on its registration
//! ([`RegisterRequestHandler`](crate::rpc::RegisterRequestHandler),
//! [`RegisterEventHandler`](crate::pubsub::RegisterEventHandler),
//! [`StartWorkers`](crate::tasks::StartWorkers)); the first layer added is
//! the outermost, as with tower's `ServiceBuilder`. A handler stack receives
//! an [`Envelope`] (the message, the attempt, the task type / event type /
//! method, and the decoded body) and fails with a [`HandlerError`]; errors
//! the layers raise themselves ([`LayerError`]: timeout, open circuit, rate
//! limit, duplicate in progress) become retryable handler errors.
//!
//! Outgoing calls go through [`Bus::rpc_service`](crate::Bus::rpc_service),
//! a tower service to wrap with the same layers.
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//! use busway::middleware::{
//!     Backoff, CircuitBreakerLayer, CorrelationLayer, DedupLayer, MemoryDedupStore, RetryLayer,
//!     TimeoutLayer,
//! };
//! use busway::{Bus, HandlerError};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let bus = Bus::connect("memory://").await?;
//! let emails = bus.task_queue("emails")?;
//! emails.register_handler("send_email", |to: String| async move {
//!     println!("sending to {to}");
//!     Ok(())
//! });
//! emails
//!     .start_workers()
//!     .layer(CorrelationLayer)
//!     .layer(DedupLayer::new(Arc::new(MemoryDedupStore::new(100_000, Duration::from_secs(3600)))))
//!     .layer(RetryLayer::new(Backoff::default().with_max_attempts(3)))
//!     .layer(TimeoutLayer::new(Duration::from_secs(10)))
//!     .await?;
//! emails.submit("send_email", "a@b.test").await?;
//! # bus.shutdown().await;
//! # Ok(())
//! # }
//! # tokio::runtime::Runtime::new().unwrap().block_on(run()).unwrap();
//! ```

use std::sync::Arc;

pub use busway_middleware::*;
use serde_json::Value;
use tower::util::BoxCloneSyncService;
use tower::{Layer, Service};

use crate::pubsub::Event;
use crate::{HandlerError, RpcError};

impl Retryable for HandlerError {
    fn is_retryable(&self) -> bool {
        HandlerError::is_retryable(self)
    }
}

impl Retryable for RpcError {
    fn is_retryable(&self) -> bool {
        RpcError::is_retryable(self)
    }
}

/// What a task handler's layers receive: the task's `params` as JSON
/// (shared, so the retry layer's copies are cheap), its type in `kind`.
pub type TaskRequest = Envelope<Arc<Value>>;
/// What an event handler's layers receive: the whole event.
pub type EventRequest = Envelope<Event<Value>>;
/// What a request handler's layers receive: the request's `params` as JSON, the method in `kind`.
pub type MethodRequest = Envelope<Value>;

/// A handler as a type-erased, cloneable service.
pub type HandlerService<Req, Res> = BoxCloneSyncService<Req, Res, HandlerError>;

type Wrap<Req, Res> =
    Arc<dyn Fn(HandlerService<Req, Res>) -> HandlerService<Req, Res> + Send + Sync>;

/// The layers put on a handler, in the order they were added.
pub(crate) struct HandlerLayers<Req, Res> {
    wraps: Vec<Wrap<Req, Res>>,
}

impl<Req, Res> Default for HandlerLayers<Req, Res> {
    fn default() -> Self {
        Self { wraps: Vec::new() }
    }
}

impl<Req, Res> Clone for HandlerLayers<Req, Res> {
    fn clone(&self) -> Self {
        Self {
            wraps: self.wraps.clone(),
        }
    }
}

impl<Req: 'static, Res: 'static> HandlerLayers<Req, Res> {
    pub(crate) fn is_empty(&self) -> bool {
        self.wraps.is_empty()
    }

    pub(crate) fn len(&self) -> usize {
        self.wraps.len()
    }

    pub(crate) fn push<L>(&mut self, layer: L)
    where
        L: Layer<HandlerService<Req, Res>> + Send + Sync + 'static,
        L::Service:
            Service<Req, Response = Res, Error = HandlerError> + Clone + Send + Sync + 'static,
        <L::Service as Service<Req>>::Future: Send + 'static,
    {
        self.wraps.push(Arc::new(move |inner| {
            BoxCloneSyncService::new(layer.layer(inner))
        }));
    }

    /// `handler` inside every layer, the first added outermost.
    pub(crate) fn wrap(&self, handler: HandlerService<Req, Res>) -> HandlerService<Req, Res> {
        self.wraps
            .iter()
            .rev()
            .fold(handler, |service, wrap| wrap(service))
    }
}
