//! Work queues: tasks in the reference shape on a durable queue, run by
//! competing workers with retries and a dead-letter queue.
//!
//! The queue (default [`TASK_QUEUE`], `task_queue`) is declared exactly as
//! the reference declares it: durable, `x-message-ttl` 24 h, dead letters to
//! `dead_letter_exchange` / `dead_letter_{queue}`. A task is published to it
//! with body `{"type", "params", "timestamp", "priority"}` and the priority
//! also set on the message.

use std::borrow::Cow;
use std::collections::HashMap;
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use busway_core::{
    CodecError, ConsumeOptions, Delivery, Message, Priority, Publish, QueueName, QueueSpec,
};
use futures::future::BoxFuture;
use futures::FutureExt;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;
use tokio::sync::OnceCell;
use tracing::Instrument;
use uuid::Uuid;

use crate::bus::{lock, Bus, Counters, SendError, SetupError};
use crate::handler::{
    panic_message, reject, run_caught, settle_failure, DeadLetterReason, HandlerError, RetryPolicy,
};
use crate::middleware::{Envelope, HandlerLayers, HandlerService, MessageContext, TaskRequest};
use crate::params::Params;

/// The reference task queue's name.
pub const TASK_QUEUE: &str = "task_queue";

/// How long a task waits in the queue before it expires (the reference's `x-message-ttl`).
pub const TASK_TTL: Duration = Duration::from_secs(86_400);

/// The reference task body, as read from a payload in another encoding
/// than JSON.
#[derive(Debug, Deserialize)]
struct TaskBody {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    params: Value,
    #[serde(default)]
    #[allow(dead_code)]
    timestamp: Option<String>,
    #[serde(default)]
    #[allow(dead_code)]
    priority: Option<i64>,
}

/// The reference task body, as published: the params are JSON text already.
#[derive(Serialize)]
struct TaskBodyOut<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    params: &'a RawValue,
    timestamp: String,
    priority: i64,
}

/// The reference task body read from JSON, its params left as text in the
/// payload. The timestamp and priority are checked for their types only.
#[derive(Deserialize)]
struct TaskBodyIn<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(default, borrow)]
    params: Option<&'a RawValue>,
    #[serde(default, borrow)]
    #[allow(dead_code)]
    timestamp: Option<Cow<'a, str>>,
    #[serde(default)]
    #[allow(dead_code)]
    priority: Option<i64>,
}

/// A received task: its type, and its params.
struct Task {
    kind: String,
    params: Params,
}

impl Task {
    /// Reads the task in `message`, leaving JSON params undecoded.
    fn decode(message: &Message) -> Result<Self, CodecError> {
        if let Some(body) = crate::params::read_json::<TaskBodyIn<'_>>(message)? {
            return Ok(Self {
                kind: body.kind.into_owned(),
                params: Params::located(&message.payload, body.params),
            });
        }
        let body: TaskBody = message.decode()?;
        Ok(Self {
            kind: body.kind,
            params: Params::Value(body.params),
        })
    }
}

/// The params as a handler receives them.
#[derive(Clone, Copy)]
enum ParamsRef<'a> {
    Text(&'a str),
    Value(&'a Value),
}

/// A task handler, erased: decodes the params into its type, then runs.
type TaskFn =
    Arc<dyn Fn(ParamsRef<'_>) -> BoxFuture<'static, Result<(), HandlerError>> + Send + Sync>;

/// The handlers and declaration state of one task queue on a bus.
#[derive(Default)]
pub(crate) struct TaskQueueState {
    handlers: RwLock<HashMap<String, TaskFn>>,
    declared: OnceCell<()>,
}

/// A work queue on a [`Bus`]: register handlers per task type, start
/// workers, submit tasks. [`Bus::task_queue`] opens one by name; the `Bus`
/// methods [`register_task_handler`](Bus::register_task_handler),
/// [`start_task_workers`](Bus::start_task_workers) and
/// [`submit_task`](Bus::submit_task) use the reference [`TASK_QUEUE`].
///
/// ```
/// use busway::{Bus, RetryPolicy};
/// use serde::Deserialize;
///
/// #[derive(Deserialize)]
/// struct SendEmail { email: String }
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let bus = Bus::connect("memory://").await?;
/// let emails = bus.task_queue("email_tasks")?;
/// emails.register_handler("send_email", |task: SendEmail| async move {
///     println!("sending to {}", task.email);
///     Ok(())
/// });
/// emails.start_workers().workers(2).retry(RetryPolicy::default().with_max_attempts(3)).await?;
/// emails.submit("send_email", &serde_json::json!({"email": "a@b.test"})).priority(5).await?;
/// # bus.shutdown().await;
/// # Ok(())
/// # }
/// # tokio::runtime::Runtime::new().unwrap().block_on(run()).unwrap();
/// ```
#[derive(Clone)]
pub struct TaskQueue {
    bus: Bus,
    queue: QueueName,
    state: Arc<TaskQueueState>,
}

impl std::fmt::Debug for TaskQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskQueue")
            .field("queue", &self.queue)
            .finish_non_exhaustive()
    }
}

impl Bus {
    /// The work queue `name` (declared on first use with the reference arguments).
    pub fn task_queue(&self, name: &str) -> Result<TaskQueue, busway_core::NameError> {
        Ok(self.task_queue_named(QueueName::new(name)?))
    }

    fn task_queue_named(&self, queue: QueueName) -> TaskQueue {
        let state = lock(&self.inner.task_queues)
            .entry(queue.clone())
            .or_default()
            .clone();
        TaskQueue {
            bus: self.clone(),
            queue,
            state,
        }
    }

    fn default_task_queue(&self) -> TaskQueue {
        match QueueName::new(TASK_QUEUE) {
            Ok(queue) => self.task_queue_named(queue),
            Err(_) => unreachable!("`task_queue` is a valid queue name"),
        }
    }

    /// Registers `handler` for tasks of type `task_type` on `task_queue`;
    /// see [`TaskQueue::register_handler`].
    pub fn register_task_handler<P, F, Fut>(&self, task_type: &str, handler: F)
    where
        P: DeserializeOwned + Send + 'static,
        F: Fn(P) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
    {
        self.default_task_queue()
            .register_handler(task_type, handler);
    }

    /// Starts workers on `task_queue`; see [`TaskQueue::start_workers`].
    pub fn start_task_workers(&self) -> StartWorkers {
        self.default_task_queue().start_workers()
    }

    /// Submits a task to `task_queue`; see [`TaskQueue::submit`].
    pub fn submit_task(&self, task_type: &str, params: &(impl Serialize + ?Sized)) -> SubmitTask {
        self.default_task_queue().submit(task_type, params)
    }
}

impl TaskQueue {
    /// The queue's name.
    pub fn name(&self) -> &QueueName {
        &self.queue
    }

    /// Runs `handler` for tasks of type `task_type`, with `params` decoded
    /// as `P`. Replaces an earlier handler of that type. Register every type
    /// before starting workers: a task whose type has no handler is
    /// dead-lettered at once.
    pub fn register_handler<P, F, Fut>(&self, task_type: &str, handler: F)
    where
        P: DeserializeOwned + Send + 'static,
        F: Fn(P) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
    {
        let handler = Arc::new(handler);
        let name = task_type.to_owned();
        let erased: TaskFn = Arc::new(move |params: ParamsRef<'_>| {
            let params: Result<P, serde_json::Error> = match params {
                ParamsRef::Text(text) => serde_json::from_str(text),
                ParamsRef::Value(value) => P::deserialize(value),
            };
            let handler = handler.clone();
            let name = name.clone();
            async move {
                let params = params.map_err(|e| {
                    HandlerError::permanent(format!("invalid params for task `{name}`: {e}"))
                })?;
                handler(params).await
            }
            .boxed()
        });
        self.state
            .handlers
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(task_type.to_owned(), erased);
    }

    /// Starts the workers (configure, then `.await`).
    pub fn start_workers(&self) -> StartWorkers {
        StartWorkers {
            queue: self.clone(),
            workers: 4,
            prefetch: 1,
            concurrency: 1,
            retry: RetryPolicy::default(),
            layers: HandlerLayers::default(),
        }
    }

    /// Submits a task of type `task_type` with `params` (configure, then
    /// `.await` for the message id).
    pub fn submit(&self, task_type: &str, params: &(impl Serialize + ?Sized)) -> SubmitTask {
        SubmitTask {
            queue: self.clone(),
            task_type: task_type.to_owned(),
            params: serde_json::value::to_raw_value(params),
            priority: Priority::MIN,
            delay: None,
        }
    }

    async fn declare(&self) -> Result<(), busway_core::DeclareError> {
        self.state
            .declared
            .get_or_try_init(|| async {
                let spec = QueueSpec::new(self.queue.clone()).with_message_ttl(TASK_TTL);
                self.bus.inner.transport.declare_queue(&spec).await
            })
            .await
            .map(|_| ())
    }

    fn handler(&self, task_type: &str) -> Option<TaskFn> {
        self.state
            .handlers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(task_type)
            .cloned()
    }
}

/// Starting workers: set their number, prefetch, retry policy and
/// middleware, then `.await`.
#[must_use = "the workers start when this is awaited"]
pub struct StartWorkers {
    queue: TaskQueue,
    workers: usize,
    prefetch: u16,
    concurrency: usize,
    retry: RetryPolicy,
    layers: HandlerLayers<TaskRequest, ()>,
}

impl std::fmt::Debug for StartWorkers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StartWorkers")
            .field("queue", &self.queue)
            .field("workers", &self.workers)
            .field("prefetch", &self.prefetch)
            .field("concurrency", &self.concurrency)
            .field("retry", &self.retry)
            .field("layers", &self.layers.len())
            .finish()
    }
}

impl StartWorkers {
    /// How many workers (consumers handling one task at a time; default 4).
    pub fn workers(mut self, workers: usize) -> Self {
        self.workers = workers.max(1);
        self
    }
    /// How many tasks each worker may hold unsettled (default 1, as the reference).
    pub fn prefetch(mut self, prefetch: u16) -> Self {
        self.prefetch = prefetch.max(1);
        self
    }
    /// How failures are retried before the task is dead-lettered.
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }
    /// How many tasks each worker runs at once (default 1; at most its
    /// prefetch is useful).
    pub fn concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = concurrency.max(1);
        self
    }
    /// Runs every task of these workers through `layer` (see
    /// [`middleware`](crate::middleware)); the first layer added is the
    /// outermost. A layer's request is a [`TaskRequest`] (the params as JSON,
    /// the task type in `kind`). Unknown task types and malformed bodies are
    /// dead-lettered before the layers run.
    ///
    /// ```
    /// use std::time::Duration;
    /// use busway::middleware::{ConcurrencyLimitLayer, TimeoutLayer};
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// let bus = busway::Bus::connect("memory://").await?;
    /// bus.register_task_handler("resize", |_: serde_json::Value| async { Ok(()) });
    /// bus.start_task_workers()
    ///     .workers(2)
    ///     .prefetch(8)
    ///     .concurrency(8)
    ///     .layer(ConcurrencyLimitLayer::new(4)) // at most 4 resizes at once, all workers together
    ///     .layer(TimeoutLayer::new(Duration::from_secs(30)))
    ///     .await?;
    /// # bus.shutdown().await;
    /// # Ok(())
    /// # }
    /// # tokio::runtime::Runtime::new().unwrap().block_on(run()).unwrap();
    /// ```
    pub fn layer<L>(mut self, layer: L) -> Self
    where
        L: tower::Layer<HandlerService<TaskRequest, ()>> + Send + Sync + 'static,
        L::Service: tower::Service<TaskRequest, Response = (), Error = HandlerError>
            + Clone
            + Send
            + Sync
            + 'static,
        <L::Service as tower::Service<TaskRequest>>::Future: Send + 'static,
    {
        self.layers.push(layer);
        self
    }
}

impl IntoFuture for StartWorkers {
    type Output = Result<(), SetupError>;
    type IntoFuture = Pin<Box<dyn Future<Output = Result<(), SetupError>> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            let queue = self.queue;
            if queue.bus.is_shut_down() {
                return Err(SetupError::ShutDown);
            }
            queue.declare().await?;
            let retry = Arc::new(self.retry);
            let service = (!self.layers.is_empty()).then(|| self.layers.wrap(dispatch(&queue)));
            for _ in 0..self.workers {
                let stream = queue
                    .bus
                    .inner
                    .transport
                    .consume(&queue.queue, ConsumeOptions::with_prefetch(self.prefetch))
                    .await?;
                let worker_queue = queue.clone();
                let retry = retry.clone();
                let service = service.clone();
                queue.bus.spawn_consumer(
                    queue.queue.clone(),
                    stream,
                    self.concurrency,
                    move |delivery| {
                        run_task(
                            worker_queue.clone(),
                            retry.clone(),
                            service.clone(),
                            delivery,
                        )
                    },
                );
            }
            Ok(())
        })
    }
}

/// The task handlers of `queue` as one service, dispatching on the task type.
fn dispatch(queue: &TaskQueue) -> HandlerService<TaskRequest, ()> {
    let queue = queue.clone();
    HandlerService::new(tower::service_fn(move |task: TaskRequest| {
        match queue.handler(&task.kind) {
            Some(handler) => handler(ParamsRef::Value(&task.body)),
            None => {
                let error = HandlerError::permanent(format!("unknown task type: {}", task.kind));
                std::future::ready(Err(error)).boxed()
            }
        }
    }))
}

async fn run_task(
    queue: TaskQueue,
    retry: Arc<RetryPolicy>,
    service: Option<HandlerService<TaskRequest, ()>>,
    delivery: Delivery,
) {
    let message = delivery.message();
    let incoming = crate::trace::extract(message);
    let span = crate::trace::consume_span(
        delivery.queue().as_str(),
        delivery.queue().as_str(),
        message,
        delivery.attempt(),
        incoming.as_ref(),
    );
    let run = run_task_traced(queue, retry, service, delivery);
    crate::trace::process(span, incoming, run).await
}

async fn run_task_traced(
    queue: TaskQueue,
    retry: Arc<RetryPolicy>,
    service: Option<HandlerService<TaskRequest, ()>>,
    delivery: Delivery,
) {
    let counters = queue.bus.inner.counters.clone();
    if delivery.attempt() > retry.max_attempts {
        let reason = format!("max attempts ({}) exceeded", retry.max_attempts);
        return reject(delivery, DeadLetterReason::MaxAttempts, reason, &counters).await;
    }
    let task = match Task::decode(delivery.message()) {
        Ok(task) => task,
        Err(e) => {
            Counters::bump(&counters.malformed);
            let reason = format!("malformed task: {e}");
            return reject(delivery, DeadLetterReason::Malformed, reason, &counters).await;
        }
    };
    let Some(handler) = queue.handler(&task.kind) else {
        let reason = format!("unknown task type: {}", task.kind);
        return reject(delivery, DeadLetterReason::UnknownType, reason, &counters).await;
    };
    let timer = crate::metrics::HandlerTimer::start(&task.kind);
    let span = crate::trace::handle_span("task", &task.kind);
    let outcome = match service {
        None => {
            let params = match &task.params {
                Params::Raw(range) => {
                    crate::params::text(delivery.message(), range).map(ParamsRef::Text)
                }
                Params::Value(value) => Ok(ParamsRef::Value(value)),
            };
            // The handler decodes its params before it returns its future:
            // a panicking `Deserialize` is caught like a panicking handler.
            let run = params.and_then(|params| {
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handler(params))).map_err(
                    |panic| {
                        Counters::bump(&counters.panics);
                        HandlerError::new(panic_message(panic.as_ref()))
                    },
                )
            });
            match run {
                Ok(run) => run_caught(run, &counters).instrument(span.clone()).await,
                Err(e) => Err(e),
            }
        }
        Some(service) => {
            use tower::ServiceExt;
            let params = match task.params {
                Params::Value(value) => Ok(value),
                Params::Raw(range) => {
                    crate::params::text(delivery.message(), &range).and_then(|text| {
                        serde_json::from_str(text)
                            .map_err(|e| HandlerError::permanent(format!("invalid params: {e}")))
                    })
                }
            };
            match params {
                Ok(params) => {
                    let request = Envelope::new(
                        delivery.message().clone(),
                        delivery.attempt(),
                        task.kind.clone(),
                        Arc::new(params),
                    );
                    run_caught(service.oneshot(request), &counters)
                        .instrument(span.clone())
                        .await
                }
                Err(e) => Err(e),
            }
        }
    };
    timer.finish(outcome.is_ok());
    if outcome.is_err() {
        crate::trace::record_error(&span);
        crate::trace::record_error(&tracing::Span::current());
    }
    match outcome {
        Ok(()) => crate::handler::ack(delivery, "acking a task").await,
        Err(error) => {
            let what = format!("task `{}`", task.kind);
            settle_failure(delivery, &retry, &what, error, &counters).await
        }
    }
}

/// A task being submitted: set [`priority`](Self::priority) and
/// [`delay`](Self::delay), then `.await` it for the message id.
#[must_use = "the task is submitted when this is awaited"]
#[derive(Debug)]
pub struct SubmitTask {
    queue: TaskQueue,
    task_type: String,
    params: Result<Box<RawValue>, serde_json::Error>,
    priority: Priority,
    delay: Option<Duration>,
}

impl SubmitTask {
    /// The priority, 0 (default) to 9; larger values are clamped. Honoured by
    /// queues with a max priority (the reference `task_queue` has none).
    pub fn priority(mut self, priority: u8) -> Self {
        self.priority = Priority::saturating(priority);
        self
    }
    /// Runs the task no earlier than `delay` from now.
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = Some(delay);
        self
    }
}

impl IntoFuture for SubmitTask {
    type Output = Result<Uuid, SendError>;
    type IntoFuture = Pin<Box<dyn Future<Output = Result<Uuid, SendError>> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            let queue = self.queue;
            if queue.bus.is_shut_down() {
                return Err(SendError::ShutDown);
            }
            let params = self.params.map_err(|e| busway_core::CodecError::Encode {
                content_type: busway_core::CONTENT_TYPE_JSON,
                message: e.to_string(),
            })?;
            queue.declare().await?;
            let body = TaskBodyOut {
                kind: &self.task_type,
                params: &params,
                timestamp: crate::time::now_iso8601(),
                priority: i64::from(self.priority.get()),
            };
            let message = Message::json(&self.task_type, &body)?;
            let mut message = MessageContext::stamp(message.with_priority(self.priority));
            let span = crate::trace::publish_span(queue.queue.as_str(), &message);
            crate::trace::inject(&span, &mut message.headers);
            let id = message.id;
            let mut publish = Publish::to_queue(queue.queue.clone(), message);
            if let Some(delay) = self.delay {
                publish = publish.with_delay(delay);
            }
            queue
                .bus
                .inner
                .transport
                .publish(publish)
                .instrument(span)
                .await?;
            queue.bus.inner.metrics.published(queue.queue.as_str());
            Ok(id)
        })
    }
}

impl std::fmt::Debug for TaskQueueState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskQueueState").finish_non_exhaustive()
    }
}
