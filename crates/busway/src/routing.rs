//! Content-based routing: pick a handler or a topic by what a message says
//! — its headers, its type, or its body.
//!
//! A [`ContentRouter`] is an ordered list of `(predicate, route)` pairs; the
//! first predicate that holds picks the route. It works two ways:
//!
//! - **to handlers**: as a layer on a handler registration, it sends
//!   matching requests to the route's handler and the rest to the handler
//!   it wraps (tasks, events, RPC methods alike);
//! - **to topics**: [`Bus::route_events`] republishes each event of a
//!   subscription to the topic its route names (unrouted events are
//!   dead-lettered with the reason, never lost).
//!
//! ```
//! use busway::middleware::TaskRequest;
//! use busway::routing::{handler, ContentRouter, Predicate};
//! use busway::{Bus, Event, HandlerError};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let bus = Bus::connect("memory://").await?;
//!
//! // Tasks: priority customers to their own handler, the rest to the default one.
//! bus.register_task_handler("ship", |_: serde_json::Value| async { Ok(()) });
//! let express = handler(|task: TaskRequest| async move {
//!     println!("express shipping for {}", task.body["order"]);
//!     Ok::<_, HandlerError>(())
//! });
//! bus.start_task_workers()
//!     .layer(ContentRouter::new().route(Predicate::header_eq("tier", "gold"), express))
//!     .await?;
//!
//! // Events: large orders republished to their own topic.
//! let topics = ContentRouter::new()
//!     .route(Predicate::body(|data| data["total"].as_f64().is_some_and(|t| t >= 1000.0)), "order.large")
//!     .otherwise("order.regular");
//! bus.route_events("order.placed", "order_router", topics).await?;
//! bus.register_event_handler("order.large", "fraud_checks", |e: Event| async move { Ok(()) }).await?;
//! bus.publish_event(&Event::new("order.placed", "o1", serde_json::json!({"total": 5000.0}))).await?;
//! # bus.shutdown().await;
//! # Ok(())
//! # }
//! # tokio::runtime::Runtime::new().unwrap().block_on(run()).unwrap();
//! ```

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use busway_core::{Message, Publish, Topic};
use futures::future::BoxFuture;
use futures::FutureExt;
use serde_json::Value;
use tower::{Layer, Service, ServiceExt};

use crate::bus::SetupError;
use crate::middleware::{Envelope, EventRequest, HandlerService};
use crate::pubsub::Event;
use crate::{Bus, HandlerError};

type Test = Arc<dyn Fn(&Message, &Value) -> bool + Send + Sync>;

/// A condition on a message: its headers, its type, or its body (for tasks
/// and RPC methods the params, for events the event's `data`).
#[derive(Clone)]
pub struct Predicate(Test);

impl fmt::Debug for Predicate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Predicate")
    }
}

impl Predicate {
    /// Any condition on the message and its body.
    pub fn new(test: impl Fn(&Message, &Value) -> bool + Send + Sync + 'static) -> Self {
        Self(Arc::new(test))
    }
    /// Header `key` equals `value`.
    ///
    /// ```
    /// use busway::routing::Predicate;
    /// let eu = Predicate::header_eq("region", "eu");
    /// let m = busway::Message::new("t", "").with_header("region", "eu");
    /// assert!(eu.matches(&m, &serde_json::Value::Null));
    /// ```
    pub fn header_eq(key: impl Into<String>, value: impl Into<String>) -> Self {
        let (key, value) = (key.into(), value.into());
        Self::new(move |m, _| m.headers.get(&key) == Some(value.as_str()))
    }
    /// Header `key` is present.
    pub fn has_header(key: impl Into<String>) -> Self {
        let key = key.into();
        Self::new(move |m, _| m.headers.get(&key).is_some())
    }
    /// The body value at JSON pointer `pointer` (`/customer/tier`) equals `value`.
    ///
    /// ```
    /// use busway::routing::Predicate;
    /// let gold = Predicate::body_eq("/customer/tier", "gold");
    /// let body = serde_json::json!({"customer": {"tier": "gold"}});
    /// assert!(gold.matches(&busway::Message::default(), &body));
    /// ```
    pub fn body_eq(pointer: impl Into<String>, value: impl Into<Value>) -> Self {
        let (pointer, value) = (pointer.into(), value.into());
        Self::new(move |_, body| body.pointer(&pointer) == Some(&value))
    }
    /// Any condition on the body.
    pub fn body(test: impl Fn(&Value) -> bool + Send + Sync + 'static) -> Self {
        Self::new(move |_, body| test(body))
    }
    /// Both conditions hold.
    pub fn and(self, other: Predicate) -> Self {
        Self::new(move |m, b| (self.0)(m, b) && (other.0)(m, b))
    }
    /// Either condition holds.
    pub fn or(self, other: Predicate) -> Self {
        Self::new(move |m, b| (self.0)(m, b) || (other.0)(m, b))
    }
    /// The condition does not hold.
    pub fn negate(self) -> Self {
        Self::new(move |m, b| !(self.0)(m, b))
    }
    /// Whether `message` with decoded `body` meets the condition.
    pub fn matches(&self, message: &Message, body: &Value) -> bool {
        (self.0)(message, body)
    }
}

/// Ordered routes: the first predicate that holds picks its route; if none
/// does, the fallback set with [`otherwise`](Self::otherwise), if any.
#[derive(Clone)]
pub struct ContentRouter<R> {
    routes: Vec<(Predicate, R)>,
    fallback: Option<R>,
}

impl<R> fmt::Debug for ContentRouter<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ContentRouter")
            .field("routes", &self.routes.len())
            .field("fallback", &self.fallback.is_some())
            .finish()
    }
}

impl<R> Default for ContentRouter<R> {
    fn default() -> Self {
        Self {
            routes: Vec::new(),
            fallback: None,
        }
    }
}

impl<R> ContentRouter<R> {
    /// No routes.
    pub fn new() -> Self {
        Self::default()
    }
    /// Adds a route, tried after the ones added before.
    pub fn route(mut self, when: Predicate, to: R) -> Self {
        self.routes.push((when, to));
        self
    }
    /// The route taken when no predicate holds.
    pub fn otherwise(mut self, to: R) -> Self {
        self.fallback = Some(to);
        self
    }
    /// The route for `message` with decoded `body`.
    ///
    /// ```
    /// use busway::routing::{ContentRouter, Predicate};
    /// let router = ContentRouter::new()
    ///     .route(Predicate::body_eq("/country", "FR"), "orders.eu")
    ///     .otherwise("orders.other");
    /// let m = busway::Message::default();
    /// assert_eq!(router.select(&m, &serde_json::json!({"country": "FR"})), Some(&"orders.eu"));
    /// assert_eq!(router.select(&m, &serde_json::json!({"country": "US"})), Some(&"orders.other"));
    /// ```
    pub fn select(&self, message: &Message, body: &Value) -> Option<&R> {
        self.routes
            .iter()
            .find(|(when, _)| when.matches(message, body))
            .map(|(_, to)| to)
            .or(self.fallback.as_ref())
    }
}

/// A handler for a route: an async function of the request, as a service.
pub fn handler<Req, Res, F, Fut>(f: F) -> HandlerService<Req, Res>
where
    Req: Send + 'static,
    F: Fn(Req) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Res, HandlerError>> + Send + 'static,
{
    HandlerService::new(tower::service_fn(f))
}

/// What routing predicates see as the body of a request.
pub trait RouteBody {
    /// The body: a task's or method's params; an event's `data`.
    fn route_body(&self) -> &Value;
}

impl RouteBody for Value {
    fn route_body(&self) -> &Value {
        self
    }
}

impl RouteBody for Event<Value> {
    fn route_body(&self) -> &Value {
        &self.data
    }
}

impl<B: RouteBody + ?Sized> RouteBody for std::sync::Arc<B> {
    fn route_body(&self) -> &Value {
        (**self).route_body()
    }
}

impl<S, R: Clone> Layer<S> for ContentRouter<R> {
    type Service = Routed<S, R>;
    fn layer(&self, inner: S) -> Routed<S, R> {
        Routed {
            inner,
            router: Arc::new(self.clone()),
        }
    }
}

/// A handler behind a [`ContentRouter`]: matching requests go to their
/// route, the rest to the handler itself (or the router's fallback).
pub struct Routed<S, R> {
    inner: S,
    router: Arc<ContentRouter<R>>,
}

impl<S: Clone, R> Clone for Routed<S, R> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            router: self.router.clone(),
        }
    }
}

impl<S, R> fmt::Debug for Routed<S, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Routed")
            .field("router", &self.router)
            .finish_non_exhaustive()
    }
}

impl<S, R, B> Service<Envelope<B>> for Routed<S, R>
where
    B: RouteBody + Send + 'static,
    S: Service<Envelope<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    R: Service<Envelope<B>, Response = S::Response, Error = S::Error>
        + Clone
        + Send
        + Sync
        + 'static,
    R::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Envelope<B>) -> Self::Future {
        match self
            .router
            .select(&request.message, request.body.route_body())
        {
            Some(route) => route.clone().oneshot(request).boxed(),
            None => self.inner.call(request).boxed(),
        }
    }
}

impl Bus {
    /// Subscribes group `group` to events matching `pattern` and republishes
    /// each to the topic `router` picks for it (the same event, as a new
    /// message caused by the original). An event no route
    /// takes is dead-lettered to `dead_letter_{group}` with the reason.
    /// See the [module docs](crate::routing) for an example.
    pub async fn route_events<T>(
        &self,
        pattern: &str,
        group: &str,
        router: ContentRouter<T>,
    ) -> Result<(), SetupError>
    where
        T: AsRef<str> + Send + Sync + 'static,
    {
        let routes = router.routes.iter().map(|(_, topic)| topic);
        for topic in routes.chain(router.fallback.iter()) {
            Topic::new(topic.as_ref())?;
        }
        let router = Arc::new(router);
        let transport = self.inner.transport.clone();
        let republish = tower::layer::layer_fn(move |_unused: HandlerService<EventRequest, ()>| {
            let router = router.clone();
            let transport = transport.clone();
            tower::service_fn(move |request: EventRequest| {
                let topic = router
                    .select(&request.message, &request.body.data)
                    .map(|t| Topic::new(t.as_ref()));
                let transport = transport.clone();
                async move {
                    let topic = match topic {
                        Some(Ok(topic)) => topic,
                        Some(Err(e)) => return Err(HandlerError::permanent(e.to_string())),
                        None => {
                            return Err(HandlerError::permanent(format!(
                                "no route for event `{}`",
                                request.body.event_type
                            )))
                        }
                    };
                    // A new message caused by the routed one, in the same conversation.
                    let mut message = Message::clone(&request.message);
                    message.causation_id = Some(message.id.to_string());
                    message.id = uuid::Uuid::now_v7();
                    transport.publish(Publish::to_topic(topic, message)).await?;
                    Ok(())
                }
            })
        });
        self.register_event_handler(pattern, group, |_: Event| async { Ok(()) })
            .layer(republish)
            .await
    }
}
