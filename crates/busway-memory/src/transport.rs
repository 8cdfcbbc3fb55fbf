//! [`MemoryTransport`]: the registry of queues and bindings, routing, and
//! the [`Transport`] implementation.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{
    Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak,
};

use async_trait::async_trait;
use busway_core::{
    Binding, Capabilities, ConsumeError, ConsumeOptions, DeclareError, DeliveryStream, Destination,
    Durability, Publish, PublishError, QueueName, QueueSpec, QueueStats, StatsError, Support,
    Topic, Transport, DEFAULT_MAX_PAYLOAD_BYTES,
};
use futures::StreamExt;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::consumer::ConsumerStream;
use crate::queue::{instant_after, DeadReason, Entry, Queue, QueueState, Signal};

/// Topics whose routes are remembered before the cache starts over.
const ROUTE_CACHE_CAPACITY: usize = 4096;

/// Settings of a [`MemoryTransport`].
///
/// ```
/// use busway_memory::MemoryConfig;
/// let config = MemoryConfig { max_payload_bytes: 64 * 1024 };
/// assert!(config.max_payload_bytes < MemoryConfig::default().max_payload_bytes);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryConfig {
    /// The largest payload accepted; bigger ones fail with
    /// `PublishError::PayloadTooLarge`. Defaults to
    /// [`DEFAULT_MAX_PAYLOAD_BYTES`](busway_core::DEFAULT_MAX_PAYLOAD_BYTES).
    pub max_payload_bytes: usize,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
        }
    }
}

/// State every queue and consumer of one transport can see.
pub(crate) struct Shared {
    closed: AtomicBool,
    /// Woken (all waiters) when the transport closes.
    pub(crate) close: Notify,
    /// Every consumer stream, to be woken when the transport closes.
    consumers: Mutex<Vec<Weak<Signal>>>,
}

impl Shared {
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.close.notify_waiters();
        let consumers = std::mem::take(&mut *self.consumers_lock());
        for signal in consumers.iter().filter_map(Weak::upgrade) {
            signal.wake();
        }
    }

    fn consumers_lock(&self) -> MutexGuard<'_, Vec<Weak<Signal>>> {
        self.consumers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// A signal for a new consumer, woken on close.
    fn consumer_signal(&self) -> Arc<Signal> {
        let signal = Arc::new(Signal::default());
        let mut consumers = self.consumers_lock();
        consumers.retain(|weak| weak.strong_count() > 0);
        consumers.push(Arc::downgrade(&signal));
        signal
    }
}

#[derive(Default)]
struct Registry {
    queues: HashMap<QueueName, Arc<Queue>>,
    bindings: Vec<(Binding, Arc<Queue>)>,
    bound: HashSet<Binding>,
    next_id: u64,
}

impl Registry {
    fn add_queue(
        &mut self,
        spec: QueueSpec,
        dlq: Option<Arc<Queue>>,
        shared: &Arc<Shared>,
    ) -> Arc<Queue> {
        self.next_id += 1;
        let queue = Queue::new(self.next_id, spec, dlq, Arc::clone(shared));
        self.queues.insert(queue.name.clone(), Arc::clone(&queue));
        queue
    }
}

struct Inner {
    config: MemoryConfig,
    shared: Arc<Shared>,
    registry: RwLock<Registry>,
    /// Topic → the queues it reaches, sorted by id. Cleared on every bind.
    routes: RwLock<HashMap<Topic, Arc<[Arc<Queue>]>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Nobody can publish any more: end the streams instead of leaving
        // them waiting forever.
        self.shared.close();
    }
}

/// The queues a publish reaches.
enum Route {
    Queue(Arc<Queue>),
    Topic(Arc<[Arc<Queue>]>),
}

impl Route {
    fn queues(&self) -> &[Arc<Queue>] {
        match self {
            Route::Queue(queue) => std::slice::from_ref(queue),
            Route::Topic(queues) => queues,
        }
    }
}

/// An in-process transport with the full busway semantics: topics and
/// queues, competing consumers with prefetch, delays, priorities, TTL, max
/// attempts and dead-letter queues. Nothing survives the process.
///
/// Cloning is cheap and every clone shares the same queues. Dropping the
/// last clone closes it.
///
/// ```
/// use busway_core::{ConsumeOptions, Message, Publish, QueueName, QueueSpec, Transport};
/// use busway_memory::MemoryTransport;
/// use futures::StreamExt;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let transport = MemoryTransport::new();
/// let queue = QueueName::new("task_queue")?;
/// transport.declare_queue(&QueueSpec::new(queue.clone())).await?;
/// transport
///     .publish(Publish::to_queue(queue.clone(), Message::new("send_email", "hello")))
///     .await?;
///
/// let mut deliveries = transport.consume(&queue, ConsumeOptions::default()).await?;
/// let delivery = deliveries.next().await.ok_or("stream ended")??;
/// assert_eq!(delivery.message().kind, "send_email");
/// assert_eq!(delivery.attempt(), 1);
/// delivery.ack().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct MemoryTransport {
    inner: Arc<Inner>,
}

impl MemoryTransport {
    /// A transport with the default [`MemoryConfig`].
    ///
    /// ```
    /// use busway_core::Transport;
    /// let transport = busway_memory::MemoryTransport::new();
    /// assert!(!transport.capabilities().persistence.is_supported());
    /// ```
    pub fn new() -> Self {
        Self::with_config(MemoryConfig::default())
    }

    /// A transport with the given settings.
    ///
    /// ```
    /// use busway_core::Transport;
    /// use busway_memory::{MemoryConfig, MemoryTransport};
    /// let transport = MemoryTransport::with_config(MemoryConfig { max_payload_bytes: 1024 });
    /// assert_eq!(transport.capabilities().max_payload_bytes, 1024);
    /// ```
    pub fn with_config(config: MemoryConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                config,
                shared: Arc::new(Shared {
                    closed: AtomicBool::new(false),
                    close: Notify::new(),
                    consumers: Mutex::new(Vec::new()),
                }),
                registry: RwLock::new(Registry::default()),
                routes: RwLock::new(HashMap::new()),
            }),
        }
    }

    /// The settings this transport was created with.
    pub fn config(&self) -> &MemoryConfig {
        &self.inner.config
    }

    fn registry(&self) -> RwLockReadGuard<'_, Registry> {
        self.inner
            .registry
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn registry_mut(&self) -> RwLockWriteGuard<'_, Registry> {
        self.inner
            .registry
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn queue(&self, name: &QueueName) -> Option<Arc<Queue>> {
        self.registry().queues.get(name).cloned()
    }

    fn route(&self, destination: &Destination) -> Result<Route, PublishError> {
        match destination {
            Destination::Queue(name) => self
                .queue(name)
                .map(Route::Queue)
                .ok_or_else(|| PublishError::QueueNotFound(name.clone())),
            Destination::Topic(topic) => Ok(Route::Topic(self.topic_route(topic))),
        }
    }

    fn topic_route(&self, topic: &Topic) -> Arc<[Arc<Queue>]> {
        // Holding the registry keeps a concurrent bind from clearing the
        // cache between computing a route and storing it.
        let registry = self.registry();
        let cached = self
            .inner
            .routes
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(topic)
            .cloned();
        if let Some(route) = cached {
            return route;
        }
        let mut queues: Vec<Arc<Queue>> = registry
            .bindings
            .iter()
            .filter(|(binding, _)| binding.pattern.matches(topic))
            .map(|(_, queue)| Arc::clone(queue))
            .collect();
        queues.sort_by_key(|queue| queue.id());
        queues.dedup_by_key(|queue| queue.id());
        let route: Arc<[Arc<Queue>]> = queues.into();
        let mut routes = self
            .inner
            .routes
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if routes.len() >= ROUTE_CACHE_CAPACITY {
            routes.clear();
        }
        routes.insert(topic.clone(), Arc::clone(&route));
        route
    }

    /// Stores one message in one queue: the common case, without allocating.
    fn store_one(
        queue: &Queue,
        publish: Publish,
        topic: Option<Topic>,
    ) -> Result<(), PublishError> {
        let now = Instant::now();
        let visible_at = publish
            .delay
            .filter(|d| !d.is_zero())
            .map(|d| instant_after(now, d));
        let mut dead = Vec::new();
        let mut state = queue.lock();
        let result = if state.has_room(queue.spec.max_length, 1, now, &mut dead) {
            let entry = Entry::new(publish.message, topic, now, queue.spec.message_ttl);
            state.insert(entry, visible_at, now, false);
            Ok(())
        } else {
            Err(full(queue))
        };
        queue.finish(state);
        if !dead.is_empty() {
            queue.dead_letter(dead);
        }
        result
    }

    /// Stores a batch, all or nothing: every target queue is locked (in id
    /// order) while the lengths are checked and the messages stored.
    fn store_batch(&self, batch: Vec<Publish>) -> Result<(), PublishError> {
        let routes = batch
            .iter()
            .map(|publish| self.route(&publish.destination))
            .collect::<Result<Vec<_>, _>>()?;
        let mut targets: Vec<&Arc<Queue>> = routes.iter().flat_map(Route::queues).collect();
        targets.sort_by_key(|queue| queue.id());
        targets.dedup_by_key(|queue| queue.id());
        let position = |queue: &Queue| {
            targets
                .binary_search_by_key(&queue.id(), |target| target.id())
                .ok()
        };
        let mut counts = vec![0_usize; targets.len()];
        for queue in routes.iter().flat_map(Route::queues) {
            if let Some(count) = position(queue).and_then(|i| counts.get_mut(i)) {
                *count += 1;
            }
        }

        let now = Instant::now();
        let mut dead: Vec<(usize, Vec<(Entry, DeadReason)>)> = Vec::new();
        let mut guards: Vec<MutexGuard<'_, QueueState>> =
            targets.iter().map(|queue| queue.lock()).collect();
        let mut result = Ok(());
        for (i, ((queue, state), count)) in targets.iter().zip(&mut guards).zip(&counts).enumerate()
        {
            let mut expired = Vec::new();
            let fits = state.has_room(queue.spec.max_length, *count, now, &mut expired);
            if !expired.is_empty() {
                dead.push((i, expired));
            }
            if !fits {
                result = Err(full(queue));
                break;
            }
        }

        if result.is_ok() {
            for (publish, route) in batch.into_iter().zip(&routes) {
                let Publish {
                    destination,
                    message,
                    delay,
                } = publish;
                let topic = match destination {
                    Destination::Topic(topic) => Some(topic),
                    Destination::Queue(_) => None,
                };
                let visible_at = delay
                    .filter(|d| !d.is_zero())
                    .map(|d| instant_after(now, d));
                let queues = route.queues();
                let mut message = Some(message);
                for (k, queue) in queues.iter().enumerate() {
                    let copy = if k + 1 == queues.len() {
                        message.take()
                    } else {
                        message.clone()
                    };
                    let (Some(copy), Some(state)) =
                        (copy, position(queue).and_then(|i| guards.get_mut(i)))
                    else {
                        continue;
                    };
                    let entry = Entry::new(copy, topic.clone(), now, queue.spec.message_ttl);
                    state.insert(entry, visible_at, now, false);
                }
            }
        }

        for (queue, state) in targets.iter().zip(guards) {
            queue.finish(state);
        }
        for (i, expired) in dead {
            if let Some(queue) = targets.get(i) {
                queue.dead_letter(expired);
            }
        }
        result
    }
}

fn full(queue: &Queue) -> PublishError {
    PublishError::QueueFull {
        queue: queue.name.clone(),
        max_length: queue.spec.max_length.unwrap_or_default(),
    }
}

impl Default for MemoryTransport {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for MemoryTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryTransport")
            .field("config", &self.inner.config)
            .field("closed", &self.inner.shared.is_closed())
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl Transport for MemoryTransport {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            delay: Support::Native,
            priority: Support::Native,
            ttl: Support::Native,
            dead_letter: Support::Native,
            ordering: Support::Native,
            persistence: Support::Unsupported,
            multi_process: Support::Unsupported,
            max_payload_bytes: self.inner.config.max_payload_bytes,
        }
    }

    async fn declare_queue(&self, spec: &QueueSpec) -> Result<(), DeclareError> {
        if self.inner.shared.is_closed() {
            return Err(DeclareError::Closed);
        }
        spec.validate()?;
        let dlq_spec = spec.dead_letter_spec();
        if let Some(dlq_spec) = &dlq_spec {
            dlq_spec.validate()?;
        }
        let mut registry = self.registry_mut();
        if let Some(existing) = registry.queues.get(&spec.name) {
            return existing.spec.check_redeclare(spec);
        }
        // Check everything before creating anything.
        let dlq = match dlq_spec {
            Some(dlq_spec) => match registry.queues.get(&dlq_spec.name) {
                Some(existing) => {
                    existing.spec.check_redeclare(&dlq_spec)?;
                    Some(Arc::clone(existing))
                }
                None => Some(registry.add_queue(dlq_spec, None, &self.inner.shared)),
            },
            None => None,
        };
        registry.add_queue(spec.clone(), dlq, &self.inner.shared);
        Ok(())
    }

    async fn bind(&self, binding: &Binding) -> Result<(), DeclareError> {
        if self.inner.shared.is_closed() {
            return Err(DeclareError::Closed);
        }
        let mut registry = self.registry_mut();
        let Some(queue) = registry.queues.get(&binding.queue).cloned() else {
            return Err(DeclareError::QueueNotFound(binding.queue.clone()));
        };
        if registry.bound.insert(binding.clone()) {
            registry.bindings.push((binding.clone(), queue));
            self.inner
                .routes
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .clear();
        }
        Ok(())
    }

    async fn publish_batch(
        &self,
        mut batch: Vec<Publish>,
        _durability: Durability,
    ) -> Result<(), PublishError> {
        if self.inner.shared.is_closed() {
            return Err(PublishError::Closed);
        }
        let max = self.inner.config.max_payload_bytes;
        for publish in &batch {
            publish.check_payload(max)?;
        }
        if batch.len() == 1 {
            if let Some(publish) = batch.pop() {
                let route = self.route(&publish.destination)?;
                return match route.queues() {
                    [] => Ok(()),
                    [queue] => {
                        let topic = match &publish.destination {
                            Destination::Topic(topic) => Some(topic.clone()),
                            Destination::Queue(_) => None,
                        };
                        Self::store_one(queue, publish, topic)
                    }
                    _ => self.store_batch(vec![publish]),
                };
            }
        }
        self.store_batch(batch)
    }

    async fn consume(
        &self,
        queue: &QueueName,
        options: ConsumeOptions,
    ) -> Result<DeliveryStream, ConsumeError> {
        if self.inner.shared.is_closed() {
            return Err(ConsumeError::Closed);
        }
        if options.prefetch == 0 {
            return Err(ConsumeError::InvalidOptions(
                "prefetch must be at least 1".into(),
            ));
        }
        let queue = self
            .queue(queue)
            .ok_or_else(|| ConsumeError::QueueNotFound(queue.clone()))?;
        let signal = self.inner.shared.consumer_signal();
        // Closed while registering: the stream ends at once.
        Ok(ConsumerStream::new(queue, usize::from(options.prefetch), signal).boxed())
    }

    async fn queue_stats(&self, queue: &QueueName) -> Result<QueueStats, StatsError> {
        if self.inner.shared.is_closed() {
            return Err(StatsError::Closed);
        }
        let queue = self
            .queue(queue)
            .ok_or_else(|| StatsError::QueueNotFound(queue.clone()))?;
        Ok(queue.stats())
    }

    async fn list_queues(&self) -> Result<Vec<QueueName>, StatsError> {
        if self.inner.shared.is_closed() {
            return Err(StatsError::Closed);
        }
        let mut names: Vec<QueueName> = self.registry().queues.keys().cloned().collect();
        names.sort();
        Ok(names)
    }

    async fn close(&self) {
        self.inner.shared.close();
    }
}
