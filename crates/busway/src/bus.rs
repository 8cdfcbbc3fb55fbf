//! The [`Bus`]: one handle for RPC, publish-subscribe and work queues.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use busway_core::{
    CodecError, ConnectError, ConsumeError, DeclareError, Delivery, DeliveryStream, NameError,
    PublishError, QueueName, Transport,
};
use futures::StreamExt;
use tokio::sync::{watch, OnceCell};
use tokio::task::JoinHandle;

use crate::pubsub::GroupTable;
use crate::rpc::{MethodTable, RpcClient};
use crate::tasks::TaskQueueState;

/// Registering a handler or starting workers failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SetupError {
    /// A service, queue, group or pattern name is not valid.
    #[error(transparent)]
    InvalidName(#[from] NameError),
    /// Declaring the queue or binding failed.
    #[error("declaring the queue failed")]
    Declare(#[from] DeclareError),
    /// Starting the consumer failed.
    #[error("starting the consumer failed")]
    Consume(#[from] ConsumeError),
    /// The bus has been shut down.
    #[error("the bus has been shut down")]
    ShutDown,
    /// A transactional saga handler was registered on a participant that
    /// has no SQLite store to run it in.
    #[error(
        "saga participant `{service}` has no SQLite store for transactional handlers \
         (create it with SagaParticipant::with_sqlite_store)"
    )]
    NotTransactional {
        /// The participant's service.
        service: String,
    },
}

impl SetupError {
    /// Whether trying again may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Declare(e) => e.is_retryable(),
            Self::Consume(e) => e.is_retryable(),
            _ => false,
        }
    }
}

/// Publishing an event or submitting a task failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// The event type or queue name is not valid.
    #[error(transparent)]
    InvalidName(#[from] NameError),
    /// The payload could not be encoded.
    #[error("encoding the payload failed")]
    Encode(#[from] CodecError),
    /// Declaring the destination queue failed.
    #[error("declaring the queue failed")]
    Declare(#[from] DeclareError),
    /// The transport refused or lost the message.
    #[error("publishing failed")]
    Publish(#[from] PublishError),
    /// The bus has been shut down.
    #[error("the bus has been shut down")]
    ShutDown,
}

impl SendError {
    /// Whether sending again may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Declare(e) => e.is_retryable(),
            Self::Publish(e) => e.is_retryable(),
            _ => false,
        }
    }
}

/// Counters of what the bus has done, for metrics and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct BusStats {
    /// RPC replies that arrived after their call timed out, or for no call of this client.
    pub late_replies: u64,
    /// Requests answered with an error response (unknown method, bad params, handler error).
    pub rpc_errors: u64,
    /// Deliveries whose body could not be decoded.
    pub malformed: u64,
    /// Deliveries this bus moved to a dead-letter queue.
    pub dead_lettered: u64,
    /// Deliveries returned for a retry after a handler failed.
    pub retried: u64,
    /// Handler panics caught.
    pub panics: u64,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) late_replies: AtomicU64,
    pub(crate) rpc_errors: AtomicU64,
    pub(crate) malformed: AtomicU64,
    pub(crate) dead_lettered: AtomicU64,
    pub(crate) retried: AtomicU64,
    pub(crate) panics: AtomicU64,
}

impl Counters {
    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
    fn snapshot(&self) -> BusStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        BusStats {
            late_replies: get(&self.late_replies),
            rpc_errors: get(&self.rpc_errors),
            malformed: get(&self.malformed),
            dead_lettered: get(&self.dead_lettered),
            retried: get(&self.retried),
            panics: get(&self.panics),
        }
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) struct BusInner {
    pub(crate) transport: Arc<dyn Transport>,
    owns_transport: bool,
    shutdown: watch::Sender<bool>,
    pub(crate) workers: Mutex<Vec<JoinHandle<()>>>,
    pub(crate) counters: Arc<Counters>,
    pub(crate) metrics: crate::metrics::BusMetrics,
    pub(crate) rpc_client: OnceCell<Arc<RpcClient>>,
    pub(crate) services: Mutex<HashMap<String, Arc<MethodTable>>>,
    pub(crate) groups: Mutex<HashMap<String, Arc<GroupTable>>>,
    pub(crate) task_queues: Mutex<HashMap<QueueName, Arc<TaskQueueState>>>,
    pub(crate) health: crate::health::Registry,
}

/// One handle for the messaging patterns: request-response (RPC),
/// publish-subscribe (events) and work queues (tasks), on any transport.
///
/// Cheap to clone; clones share everything. Handlers run on the tokio
/// runtime until [`shutdown`](Self::shutdown).
///
/// ```
/// use busway::Bus;
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let bus = Bus::connect("memory://").await?;
/// bus.register_request_handler("math", "add", |(a, b): (i64, i64)| async move { Ok(a + b) })
///     .await?;
/// let sum: i64 = bus.request("math", "add", &(2, 3)).await?;
/// assert_eq!(sum, 5);
/// bus.shutdown().await;
/// # Ok(())
/// # }
/// # tokio::runtime::Runtime::new().unwrap().block_on(run()).unwrap();
/// ```
#[derive(Clone)]
pub struct Bus {
    pub(crate) inner: Arc<BusInner>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl Bus {
    /// Opens the transport `url` names (see [`connect`](crate::connect)) and
    /// builds a bus on it; [`shutdown`](Self::shutdown) closes the transport.
    /// [`DEFAULT_URL`](crate::DEFAULT_URL) is the embedded default.
    ///
    /// ```
    /// # async fn run() -> Result<(), busway::ConnectError> {
    /// let bus = busway::Bus::connect("memory://").await?;
    /// # Ok(())
    /// # }
    /// # tokio::runtime::Runtime::new().unwrap().block_on(run()).unwrap();
    /// ```
    pub async fn connect(url: &str) -> Result<Self, ConnectError> {
        let transport = crate::connect(url).await?;
        Ok(Self::build(transport, true))
    }

    /// A bus on an existing transport, which may be shared; [`shutdown`](Self::shutdown)
    /// stops this bus's consumers but leaves the transport open.
    ///
    /// ```
    /// # async fn run() -> Result<(), busway::ConnectError> {
    /// let transport = busway::connect("memory://").await?;
    /// let bus = busway::Bus::new(transport.clone());
    /// # Ok(())
    /// # }
    /// # tokio::runtime::Runtime::new().unwrap().block_on(run()).unwrap();
    /// ```
    pub fn new(transport: Arc<dyn Transport>) -> Self {
        Self::build(transport, false)
    }

    /// Configures a bus on `transport` before building it, for options
    /// such as payload [protection](BusBuilder::protect).
    ///
    /// ```
    /// # async fn run() -> Result<(), busway::ConnectError> {
    /// let transport = busway::connect("memory://").await?;
    /// let bus = busway::Bus::builder(transport).build();
    /// # Ok(())
    /// # }
    /// # tokio::runtime::Runtime::new().unwrap().block_on(run()).unwrap();
    /// ```
    pub fn builder(transport: Arc<dyn Transport>) -> BusBuilder {
        BusBuilder {
            transport,
            owns_transport: false,
        }
    }

    fn build(transport: Arc<dyn Transport>, owns_transport: bool) -> Self {
        Self {
            inner: Arc::new(BusInner {
                transport,
                owns_transport,
                shutdown: watch::channel(false).0,
                workers: Mutex::new(Vec::new()),
                counters: Arc::new(Counters::default()),
                metrics: crate::metrics::BusMetrics::default(),
                rpc_client: OnceCell::new(),
                services: Mutex::new(HashMap::new()),
                groups: Mutex::new(HashMap::new()),
                task_queues: Mutex::new(HashMap::new()),
                health: crate::health::Registry::default(),
            }),
        }
    }

    /// The transport underneath.
    pub fn transport(&self) -> &Arc<dyn Transport> {
        &self.inner.transport
    }

    /// What the bus has counted so far.
    pub fn stats(&self) -> BusStats {
        self.inner.counters.snapshot()
    }

    pub(crate) fn is_shut_down(&self) -> bool {
        *self.inner.shutdown.borrow()
    }

    /// Stops every consumer of this bus, waits for the handlers that are
    /// running to finish (unstarted deliveries return to their queues),
    /// fails calls still waiting for a reply, and closes the transport if
    /// the bus opened it. Idempotent.
    pub async fn shutdown(&self) {
        self.inner.shutdown.send_replace(true);
        let workers = std::mem::take(&mut *lock(&self.inner.workers));
        for worker in workers {
            let _ = worker.await;
        }
        if let Some(client) = self.inner.rpc_client.get() {
            client.fail_pending();
        }
        if self.inner.owns_transport {
            self.inner.transport.close().await;
        }
    }

    /// Runs `task` until it ends or the bus shuts down; shutdown waits for it.
    pub(crate) fn spawn_worker<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let mut shutdown = self.inner.shutdown.subscribe();
        let worker = tokio::spawn(async move {
            tokio::select! {
                _ = shutdown.wait_for(|stop| *stop) => {}
                _ = task => {}
            }
        });
        lock(&self.inner.workers).push(worker);
    }

    /// Runs `handle` for each delivery of `stream`, at most `concurrency` at
    /// once, until the stream ends or the bus shuts down.
    ///
    /// Deliveries are handled by a pool of worker tasks that take turns on
    /// the stream: the worker holding it takes the next delivery, hands the
    /// stream to an idle worker and runs the handler itself. A delivery thus
    /// reaches its handler in the task the transport woke, with no task
    /// spawned per message, while handlers still run in parallel. Workers
    /// are started as the load needs them, up to `concurrency`.
    pub(crate) fn spawn_consumer<F, Fut>(
        &self,
        queue: QueueName,
        stream: DeliveryStream,
        concurrency: usize,
        handle: F,
    ) where
        F: Fn(Delivery) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let (alive, mut all_done) = tokio::sync::mpsc::channel::<()>(1);
        let metrics = self.inner.metrics.consumer(&queue);
        let pool = Arc::new(ConsumerPool {
            queue,
            stream: tokio::sync::Mutex::new(Some(stream)),
            handle,
            idle: AtomicUsize::new(1),
            started: AtomicUsize::new(1),
            max_workers: concurrency.max(1),
            shutdown: self.inner.shutdown.subscribe(),
            metrics,
            _alive: alive,
        });
        start_worker(pool);
        // Ends once every worker has (each holds the pool, which holds a sender).
        let worker = tokio::spawn(async move {
            let _ = all_done.recv().await;
        });
        lock(&self.inner.workers).push(worker);
    }
}

/// The workers of one consumer and the stream they take turns on.
struct ConsumerPool<F> {
    queue: QueueName,
    /// `None` once the stream ended, failed for good or the bus shut down.
    stream: tokio::sync::Mutex<Option<DeliveryStream>>,
    handle: F,
    /// Workers not running a handler.
    idle: AtomicUsize,
    /// Workers started so far.
    started: AtomicUsize,
    max_workers: usize,
    shutdown: watch::Receiver<bool>,
    metrics: Arc<crate::metrics::ConsumerMetrics>,
    /// Closed when the last worker ends.
    _alive: tokio::sync::mpsc::Sender<()>,
}

impl<F> ConsumerPool<F> {
    /// Called by the worker that took a delivery, before it hands the
    /// stream on: if no worker is left to wait for the next delivery and
    /// there is room for one more, a new worker is needed.
    fn needs_worker(&self) -> bool {
        if self.idle.fetch_sub(1, Ordering::AcqRel) > 1 {
            return false;
        }
        let grew = self
            .started
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_workers).then_some(n + 1)
            })
            .is_ok();
        if grew {
            self.idle.fetch_add(1, Ordering::AcqRel);
        }
        grew
    }
}

fn start_worker<F, Fut>(pool: Arc<ConsumerPool<F>>)
where
    F: Fn(Delivery) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    tokio::spawn(consume(pool));
}

/// One worker: waits for its turn on the stream, takes a delivery, hands
/// the stream on and handles the delivery; until the stream ends or the bus
/// shuts down. A handler that panics is logged and the worker carries on.
async fn consume<F, Fut>(pool: Arc<ConsumerPool<F>>)
where
    F: Fn(Delivery) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    use futures::FutureExt;

    let mut shutdown = pool.shutdown.clone();
    loop {
        let delivery = {
            let mut stream = tokio::select! {
                _ = shutdown.wait_for(|stop| *stop) => break,
                stream = pool.stream.lock() => stream,
            };
            let Some(deliveries) = stream.as_mut() else {
                break;
            };
            let next = tokio::select! {
                _ = shutdown.wait_for(|stop| *stop) => None,
                next = deliveries.next() => next,
            };
            match next {
                Some(Ok(delivery)) => {
                    if pool.needs_worker() {
                        start_worker(pool.clone());
                    }
                    delivery
                }
                Some(Err(e)) if e.is_retryable() => {
                    tracing::warn!(queue = %pool.queue, error = %e, "consumer error; continuing");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                Some(Err(e)) => {
                    tracing::error!(queue = %pool.queue, error = %e, "consumer stopped");
                    // Unstarted deliveries go back to their queue now.
                    *stream = None;
                    break;
                }
                None => {
                    *stream = None;
                    break;
                }
            }
        };
        pool.metrics
            .received(delivery.message(), delivery.attempt());
        let handled =
            std::panic::AssertUnwindSafe(pool.metrics.clone().scope((pool.handle)(delivery)))
                .catch_unwind()
                .await;
        if handled.is_err() {
            tracing::error!(queue = %pool.queue, "a delivery handler panicked");
        }
        pool.idle.fetch_add(1, Ordering::AcqRel);
    }
}

/// Configures a [`Bus`]; from [`Bus::builder`].
#[must_use = "call `build` to get the bus"]
pub struct BusBuilder {
    transport: Arc<dyn Transport>,
    owns_transport: bool,
}

impl std::fmt::Debug for BusBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BusBuilder")
            .field("owns_transport", &self.owns_transport)
            .finish_non_exhaustive()
    }
}

impl BusBuilder {
    /// Protects every message the bus publishes (compress, then encrypt or
    /// sign) and opens every message it receives; a delivery that fails to
    /// open is dead-lettered with the reason and never reaches a handler.
    /// See [`protection`](crate::protection).
    ///
    /// ```
    /// use busway::protect::{ContentEncoding, Keyring, PayloadProtection, SecretKey};
    ///
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// let keyring = Keyring::new().with_key("2026-11", SecretKey::generate());
    /// let bus = busway::Bus::builder(busway::connect("memory://").await?)
    ///     .protect(PayloadProtection::encrypt(keyring).compress(ContentEncoding::Zstd))
    ///     .build();
    /// bus.register_request_handler("math", "double", |n: i64| async move { Ok(n * 2) }).await?;
    /// let doubled: i64 = bus.request("math", "double", &21).await?;
    /// assert_eq!(doubled, 42);
    /// # bus.shutdown().await;
    /// # Ok(())
    /// # }
    /// # tokio::runtime::Runtime::new().unwrap().block_on(run()).unwrap();
    /// ```
    #[cfg(feature = "protect")]
    pub fn protect(
        mut self,
        protection: impl Into<Arc<busway_protect::PayloadProtection>>,
    ) -> Self {
        self.transport = Arc::new(crate::protection::ProtectedTransport::new(
            self.transport,
            protection.into(),
        ));
        self
    }

    /// Closes the transport on [`Bus::shutdown`] (off by default: the
    /// transport may be shared).
    pub fn owns_transport(mut self, owns: bool) -> Self {
        self.owns_transport = owns;
        self
    }

    /// The bus.
    pub fn build(self) -> Bus {
        Bus::build(self.transport, self.owns_transport)
    }
}

/// Settles a delivery, logging (not failing) when the backend refuses: the
/// delivery then returns to its queue by itself.
pub(crate) async fn settle_logged(
    result: Result<(), busway_core::SettleError>,
    queue: &QueueName,
    what: &str,
) {
    if let Err(e) = result {
        tracing::warn!(queue = %queue, error = %e, "{what} failed; the message will be redelivered");
    }
}
