//! Publish-subscribe: events in the reference shape on topics, received by
//! subscription groups.
//!
//! An event is published to the topic named by its `event_type` (on
//! RabbitMQ: the `event_bus` topic exchange, routing key = event type). A
//! group is a durable queue bound with the patterns of its handlers
//! (`order.*`, `#`): every group gets its own copy of each matching event,
//! and the members of one group (several processes registering the same
//! group) share the work.

use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::{Arc, RwLock};

use busway_core::{
    Binding, ConsumeOptions, Delivery, Message, Publish, QueueName, QueueSpec, Topic, TopicPattern,
};
use futures::future::BoxFuture;
use futures::FutureExt;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};
use tracing::Instrument;

use crate::bus::{lock, Bus, Counters, SendError, SetupError};
use crate::handler::{
    reject, run_caught, settle_failure, DeadLetterReason, HandlerError, RetryPolicy,
};
use crate::middleware::{Envelope, EventRequest, HandlerLayers, HandlerService, MessageContext};

/// An event in the reference shape:
/// `{"event_id", "event_type", "aggregate_id", "data", "timestamp", "version", "metadata"}`.
///
/// ```
/// use busway::Event;
/// let event = Event::new("user.registered", "user_123", serde_json::json!({"email": "a@b.test"}))
///     .with_version(2)
///     .with_metadata("source", "signup");
/// let json = serde_json::to_value(&event)?;
/// assert_eq!(json["event_type"], "user.registered");
/// assert_eq!(json["metadata"]["source"], "signup");
/// # Ok::<(), serde_json::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event<D = Value> {
    /// Unique id (a UUID string).
    pub event_id: String,
    /// The type, also the topic it is published to: `user.registered`.
    pub event_type: String,
    /// The entity it is about: `user_123`.
    pub aggregate_id: String,
    /// The payload.
    pub data: D,
    /// When it happened: ISO-8601, UTC (the reference writes no offset).
    pub timestamp: String,
    /// The version of the aggregate after this event.
    pub version: u64,
    /// Free-form metadata (correlation ids, source, …).
    #[serde(default, deserialize_with = "null_as_empty")]
    pub metadata: Map<String, Value>,
}

fn null_as_empty<'de, D: Deserializer<'de>>(d: D) -> Result<Map<String, Value>, D::Error> {
    Ok(Option::<Map<String, Value>>::deserialize(d)?.unwrap_or_default())
}

impl<D> Event<D> {
    /// The same event with its data converted by `convert` (for example
    /// decoded from JSON into the handler's type); the other fields stay.
    pub fn try_map_data<E, Err>(
        self,
        convert: impl FnOnce(D) -> Result<E, Err>,
    ) -> Result<Event<E>, Err> {
        Ok(Event {
            data: convert(self.data)?,
            event_id: self.event_id,
            event_type: self.event_type,
            aggregate_id: self.aggregate_id,
            timestamp: self.timestamp,
            version: self.version,
            metadata: self.metadata,
        })
    }

    /// A new event: fresh id, now, version 1, no metadata.
    pub fn new(event_type: impl Into<String>, aggregate_id: impl Into<String>, data: D) -> Self {
        Self {
            event_id: uuid::Uuid::new_v4().to_string(),
            event_type: event_type.into(),
            aggregate_id: aggregate_id.into(),
            data,
            timestamp: crate::time::now_iso8601(),
            version: 1,
            metadata: Map::new(),
        }
    }
    /// Sets the version.
    pub fn with_version(mut self, version: u64) -> Self {
        self.version = version;
        self
    }
    /// Adds a metadata entry.
    pub fn with_metadata(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }
}

type EventFn =
    Arc<dyn Fn(EventRequest) -> BoxFuture<'static, Result<(), HandlerError>> + Send + Sync>;

/// The handlers of one group on this bus.
#[derive(Default)]
pub(crate) struct GroupTable {
    handlers: RwLock<Vec<(TopicPattern, EventFn)>>,
}

impl GroupTable {
    fn matching(&self, topic: &Topic) -> Vec<EventFn> {
        self.handlers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(p, _)| p.matches(topic))
            .map(|(_, h)| h.clone())
            .collect()
    }
}

/// Registering an event handler: optionally set the group's retry policy
/// and concurrency, then `.await` it.
#[must_use = "the handler is registered when this is awaited"]
pub struct RegisterEventHandler {
    bus: Bus,
    pattern: String,
    group: String,
    handler: EventFn,
    retry: RetryPolicy,
    concurrency: usize,
    layers: HandlerLayers<EventRequest, ()>,
}

impl std::fmt::Debug for RegisterEventHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegisterEventHandler")
            .field("pattern", &self.pattern)
            .field("group", &self.group)
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

impl RegisterEventHandler {
    /// How failures are retried before the event is dead-lettered to
    /// `dead_letter_{group}`. Takes effect with the group's first handler.
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }
    /// How many events of the group are handled at once (default 1, in order).
    /// Takes effect with the group's first handler.
    pub fn concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = concurrency.max(1);
        self
    }
    /// Runs this handler's events through `layer` (see
    /// [`middleware`](crate::middleware)); the first layer added is the
    /// outermost. A layer's request is an [`EventRequest`] (the event with
    /// its data as JSON). Other handlers of the group are not affected.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use std::time::Duration;
    /// use busway::middleware::{DedupLayer, MemoryDedupStore};
    /// use busway::{Bus, Event};
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// let bus = Bus::connect("memory://").await?;
    /// let seen = Arc::new(MemoryDedupStore::new(10_000, Duration::from_secs(600)));
    /// bus.register_event_handler("payment.*", "ledger", |e: Event| async move { Ok(()) })
    ///     .layer(DedupLayer::new(seen)) // a redelivered event is not booked twice
    ///     .await?;
    /// # bus.shutdown().await;
    /// # Ok(())
    /// # }
    /// # tokio::runtime::Runtime::new().unwrap().block_on(run()).unwrap();
    /// ```
    pub fn layer<L>(mut self, layer: L) -> Self
    where
        L: tower::Layer<HandlerService<EventRequest, ()>> + Send + Sync + 'static,
        L::Service: tower::Service<EventRequest, Response = (), Error = HandlerError>
            + Clone
            + Send
            + Sync
            + 'static,
        <L::Service as tower::Service<EventRequest>>::Future: Send + 'static,
    {
        self.layers.push(layer);
        self
    }
}

impl IntoFuture for RegisterEventHandler {
    type Output = Result<(), SetupError>;
    type IntoFuture = Pin<Box<dyn Future<Output = Result<(), SetupError>> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(register(self))
    }
}

impl Bus {
    /// Publishes `event` to the topic named by its `event_type`; returns
    /// once the transport has made it durable.
    ///
    /// ```
    /// use busway::{Bus, Event};
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// let bus = Bus::connect("memory://").await?;
    /// bus.publish_event(&Event::new("order.created", "order_1", serde_json::json!({"total": 12.5}))).await?;
    /// # Ok(())
    /// # }
    /// # tokio::runtime::Runtime::new().unwrap().block_on(run()).unwrap();
    /// ```
    pub async fn publish_event<D: Serialize>(&self, event: &Event<D>) -> Result<(), SendError> {
        if self.is_shut_down() {
            return Err(SendError::ShutDown);
        }
        let topic = Topic::new(&event.event_type)?;
        let mut message = MessageContext::stamp(Message::json(event.event_type.clone(), event)?);
        let span = crate::trace::publish_span(topic.as_str(), &message);
        crate::trace::inject(&span, &mut message.headers);
        self.inner
            .transport
            .publish(Publish::to_topic(topic, message))
            .instrument(span)
            .await?;
        self.inner.metrics.published(&event.event_type);
        Ok(())
    }

    /// Runs `handler` for every event whose type matches `pattern` (`*` one
    /// word, `#` any number) in subscription group `group`, a durable queue
    /// of that name. Several handlers may share a group; each event runs
    /// every matching one. A failure (or panic) is retried with backoff, then
    /// the event is dead-lettered to `dead_letter_{group}` with the reason;
    /// a body that is not an event, or whose `data` does not decode as `D`,
    /// is dead-lettered at once.
    ///
    /// ```
    /// use busway::{Bus, Event};
    /// use serde::Deserialize;
    ///
    /// #[derive(Deserialize)]
    /// struct Registered { email: String }
    ///
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// let bus = Bus::connect("memory://").await?;
    /// bus.register_event_handler("user.*", "welcome_emails", |event: Event<Registered>| async move {
    ///     println!("welcome, {}", event.data.email);
    ///     Ok(())
    /// })
    /// .await?;
    /// # Ok(())
    /// # }
    /// # tokio::runtime::Runtime::new().unwrap().block_on(run()).unwrap();
    /// ```
    pub fn register_event_handler<D, F, Fut>(
        &self,
        pattern: &str,
        group: &str,
        handler: F,
    ) -> RegisterEventHandler
    where
        D: DeserializeOwned + Send + 'static,
        F: Fn(Event<D>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
    {
        let handler = Arc::new(handler);
        let erased: EventFn = Arc::new(move |request: EventRequest| {
            let handler = handler.clone();
            async move {
                let event = request.body.try_map_data(|data| {
                    serde_json::from_value::<D>(data).map_err(|e| {
                        HandlerError::permanent(format!("event data does not fit the handler: {e}"))
                    })
                })?;
                handler(event).await
            }
            .boxed()
        });
        RegisterEventHandler {
            bus: self.clone(),
            pattern: pattern.to_owned(),
            group: group.to_owned(),
            handler: erased,
            retry: RetryPolicy::default(),
            concurrency: 1,
            layers: HandlerLayers::default(),
        }
    }
}

async fn register(reg: RegisterEventHandler) -> Result<(), SetupError> {
    let bus = reg.bus;
    if bus.is_shut_down() {
        return Err(SetupError::ShutDown);
    }
    let pattern = TopicPattern::new(&reg.pattern)?;
    let handler = if reg.layers.is_empty() {
        reg.handler
    } else {
        let erased = reg.handler;
        let base = HandlerService::new(tower::service_fn(move |request: EventRequest| {
            erased(request)
        }));
        let service = reg.layers.wrap(base);
        let layered: EventFn = Arc::new(move |request: EventRequest| {
            use tower::ServiceExt;
            service.clone().oneshot(request).boxed()
        });
        layered
    };
    let queue = QueueName::new(&reg.group)?;
    let transport = &bus.inner.transport;
    transport
        .declare_queue(&QueueSpec::new(queue.clone()))
        .await?;
    transport
        .bind(&Binding::new(queue.clone(), pattern.clone()))
        .await?;
    let (table, start) = {
        let mut groups = lock(&bus.inner.groups);
        match groups.get(&reg.group) {
            Some(table) => (table.clone(), false),
            None => {
                let table = Arc::new(GroupTable::default());
                groups.insert(reg.group.clone(), table.clone());
                (table, true)
            }
        }
    };
    table
        .handlers
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .push((pattern, handler));
    if !start {
        return Ok(());
    }
    let prefetch = u16::try_from(reg.concurrency).unwrap_or(u16::MAX);
    let stream = match transport
        .consume(&queue, ConsumeOptions::with_prefetch(prefetch))
        .await
    {
        Ok(stream) => stream,
        Err(e) => {
            lock(&bus.inner.groups).remove(&reg.group);
            return Err(e.into());
        }
    };
    let counters = bus.inner.counters.clone();
    let retry = Arc::new(reg.retry);
    bus.spawn_consumer(queue, stream, reg.concurrency, move |delivery| {
        handle(table.clone(), retry.clone(), counters.clone(), delivery)
    });
    Ok(())
}

async fn handle(
    table: Arc<GroupTable>,
    retry: Arc<RetryPolicy>,
    counters: Arc<Counters>,
    delivery: Delivery,
) {
    let message = delivery.message();
    let incoming = crate::trace::extract(message);
    let span = crate::trace::consume_span(
        delivery
            .topic()
            .map_or(delivery.queue().as_str(), Topic::as_str),
        delivery.queue().as_str(),
        message,
        delivery.attempt(),
        incoming.as_ref(),
    );
    let handled = handle_delivery(table, retry, counters, delivery);
    crate::trace::process(span, incoming, handled).await
}

async fn handle_delivery(
    table: Arc<GroupTable>,
    retry: Arc<RetryPolicy>,
    counters: Arc<Counters>,
    delivery: Delivery,
) {
    if delivery.attempt() > retry.max_attempts {
        let reason = format!("max attempts ({}) exceeded", retry.max_attempts);
        return reject(delivery, DeadLetterReason::MaxAttempts, reason, &counters).await;
    }
    let event: Event<Value> = match delivery.message().decode() {
        Ok(event) => event,
        Err(e) => {
            Counters::bump(&counters.malformed);
            let reason = format!("malformed event: {e}");
            return reject(delivery, DeadLetterReason::Malformed, reason, &counters).await;
        }
    };
    let topic = match delivery.topic() {
        Some(topic) => topic.clone(),
        None => match Topic::new(&event.event_type) {
            Ok(topic) => topic,
            Err(e) => {
                Counters::bump(&counters.malformed);
                let reason = format!("malformed event: {e}");
                return reject(delivery, DeadLetterReason::Malformed, reason, &counters).await;
            }
        },
    };
    let what = format!("event `{}`", event.event_type);
    let message = Arc::new(delivery.message().clone());
    for handler in table.matching(&topic) {
        let request = Envelope::new(
            message.clone(),
            delivery.attempt(),
            event.event_type.clone(),
            event.clone(),
        );
        let span = crate::trace::handle_span("event", &event.event_type);
        let timer = crate::metrics::HandlerTimer::start(&event.event_type);
        let outcome = run_caught(handler(request), &counters)
            .instrument(span.clone())
            .await;
        timer.finish(outcome.is_ok());
        if let Err(error) = outcome {
            crate::trace::record_error(&span);
            crate::trace::record_error(&tracing::Span::current());
            return settle_failure(delivery, &retry, &what, error, &counters).await;
        }
    }
    crate::handler::ack(delivery, "acking an event").await;
}
