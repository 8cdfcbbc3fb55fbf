//! Correlation and causation propagation.
//!
//! [`CorrelationLayer`] runs a handler inside the [`MessageContext`] of the
//! message it handles: the conversation's correlation id and the message's
//! own id. Messages the handler sends meanwhile (tasks, events, requests
//! sent through the bus) carry the same correlation id and, as causation
//! id, the id of the message that caused them — so a trace of a whole
//! conversation can be put back together from the messages alone.
//!
//! The context is task-local: it follows the handler's future, not tasks
//! the handler spawns (wrap those in [`MessageContext::scope`] to carry it).

use std::future::Future;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use tower::{Layer, Service, ServiceExt};

use crate::envelope::MessageInfo;
use busway_core::Message;

/// The header that carries the conversation's correlation id where the
/// message's own `correlation_id` field has another use (RPC requests,
/// whose correlation id pairs a reply with its call).
pub const CORRELATION_HEADER: &str = "x-correlation-id";

tokio::task_local! {
    static CURRENT: MessageContext;
}

/// The message a handler is working on, as far as messages it sends care.
///
/// ```
/// use busway_core::Message;
/// use busway_middleware::MessageContext;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let incoming = Message::new("order.placed", "{}").with_correlation_id("conv-1");
/// let context = MessageContext::of(&incoming);
/// context.scope(async {
///     let outgoing = MessageContext::stamp(Message::new("reserve_stock", "{}"));
///     assert_eq!(outgoing.correlation_id.as_deref(), Some("conv-1"));
///     assert_eq!(outgoing.causation_id, Some(incoming.id.to_string()));
/// }).await;
/// # }
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct MessageContext {
    /// The conversation the message belongs to.
    pub correlation_id: String,
    /// The id of the message being handled: the causation id of what it causes.
    pub message_id: String,
}

impl MessageContext {
    /// The context of handling `message`: its conversation is the
    /// [`CORRELATION_HEADER`] if set, else its correlation id, else it
    /// starts one with its own id.
    pub fn of(message: &Message) -> Self {
        let message_id = message.id.to_string();
        let correlation_id = message
            .headers
            .get(CORRELATION_HEADER)
            .map(str::to_owned)
            .or_else(|| message.correlation_id.clone())
            .unwrap_or_else(|| message_id.clone());
        Self {
            correlation_id,
            message_id,
        }
    }

    /// The context of the handler running now, if it runs inside one.
    pub fn current() -> Option<Self> {
        CURRENT.try_with(Clone::clone).ok()
    }

    /// Runs `future` inside this context.
    pub fn scope<F: Future>(self, future: F) -> impl Future<Output = F::Output> {
        CURRENT.scope(self, future)
    }

    /// Stamps `message` with the current context, if any: its correlation id
    /// (unless already set) and causation id (unless already set).
    pub fn stamp(mut message: Message) -> Message {
        if let Some(context) = Self::current() {
            message.correlation_id.get_or_insert(context.correlation_id);
            message.causation_id.get_or_insert(context.message_id);
        }
        message
    }

    /// Stamps a message whose `correlation_id` field is taken (an RPC
    /// request): the conversation goes in the [`CORRELATION_HEADER`].
    pub fn stamp_header(mut message: Message) -> Message {
        if let Some(context) = Self::current() {
            if message.headers.get(CORRELATION_HEADER).is_none() {
                message
                    .headers
                    .insert(CORRELATION_HEADER, context.correlation_id);
            }
            message.causation_id.get_or_insert(context.message_id);
        }
        message
    }
}

/// Runs the inner service inside the [`MessageContext`] of each request's message.
///
/// ```
/// use busway_core::Message;
/// use busway_middleware::{CorrelationLayer, LayerError, MessageContext};
/// use tower::{service_fn, Layer, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), LayerError> {
/// let handler = CorrelationLayer.layer(service_fn(|_m: Message| async {
///     Ok::<_, LayerError>(MessageContext::current().map(|c| c.correlation_id))
/// }));
/// let seen = handler.oneshot(Message::new("a", "").with_correlation_id("c-7")).await?;
/// assert_eq!(seen.as_deref(), Some("c-7"));
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct CorrelationLayer;

impl<S> Layer<S> for CorrelationLayer {
    type Service = Correlation<S>;
    fn layer(&self, inner: S) -> Correlation<S> {
        Correlation { inner }
    }
}

/// The service [`CorrelationLayer`] builds.
#[derive(Clone, Debug)]
pub struct Correlation<S> {
    inner: S,
}

impl<S, Req> Service<Req> for Correlation<S>
where
    S: Service<Req> + Clone + Send + 'static,
    S::Future: Send + 'static,
    Req: MessageInfo + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let context = MessageContext::of(req.message());
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        // The inner call itself (not only its future) runs inside the context.
        Box::pin(context.scope(inner.oneshot(req)))
    }
}
