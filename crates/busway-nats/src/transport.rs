//! The transport: connection, topology, publishing and statistics.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, SystemTime};

use async_nats::jetstream::{self, consumer::pull, stream};
use async_nats::{HeaderMap, Subject};
use async_trait::async_trait;
use busway_core::{
    unix_millis, Binding, Capabilities, ConnectError, ConsumeError, ConsumeOptions, DeclareError,
    DeliveryStream, Destination, Durability, Message, Publish, PublishError, QueueName, QueueSpec,
    QueueStats, SettleError, StatsError, Support, Topic, TopicPattern, Transport,
};
use bytes::Bytes;
use futures::TryStreamExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{valid_prefix, NatsConfig};
use crate::consumer;
use crate::names::{self, QueueInfo};
use busway_core::envelope;

/// Room left under the server's `max_payload` for the envelope and headers.
const ENVELOPE_ROOM: usize = 16 * 1024;
/// How long a live consumer's registration lasts without a heartbeat.
pub(crate) const LIVE_MAX_AGE: Duration = Duration::from_secs(15);
/// How often a live consumer renews its registration.
pub(crate) const HEARTBEAT: Duration = Duration::from_secs(5);

/// A [`Transport`] on NATS JetStream. Cheap to clone; clones share the
/// connection. See the [crate docs](crate) for how it works.
#[derive(Clone)]
pub struct NatsTransport {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for NatsTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsTransport")
            .field("location", &self.inner.location)
            .field("prefix", &self.inner.config.prefix)
            .finish_non_exhaustive()
    }
}

/// A delivery handed out and not yet settled.
pub(crate) struct InFlight {
    pub(crate) queue: Arc<QueueInfo>,
    pub(crate) level: usize,
    pub(crate) reply: Subject,
    pub(crate) blob: Bytes,
    pub(crate) attempt: u32,
}

pub(crate) struct Inner {
    pub(crate) client: async_nats::Client,
    pub(crate) js: jetstream::Context,
    pub(crate) config: NatsConfig,
    pub(crate) location: String,
    max_payload: usize,
    pub(crate) bindings: stream::Stream,
    pub(crate) live: stream::Stream,
    queues: RwLock<HashMap<QueueName, Arc<QueueInfo>>>,
    patterns: Mutex<HashMap<String, Option<TopicPattern>>>,
    pub(crate) closed: AtomicBool,
    pub(crate) close_tx: watch::Sender<bool>,
    /// Unsettled deliveries by token.
    pub(crate) in_flight: Mutex<HashMap<u64, InFlight>>,
    pub(crate) next_token: AtomicU64,
    pub(crate) tasks: Mutex<Vec<JoinHandle<()>>>,
    /// Streams of temporary queues, deleted on close.
    temporaries: Mutex<Vec<String>>,
}

/// An error on its way into one of the core error enums.
pub(crate) struct Boxed {
    pub(crate) source: Box<dyn std::error::Error + Send + Sync>,
    pub(crate) retryable: bool,
}

pub(crate) fn backend<E: From<Boxed>>(
    e: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    retryable: bool,
) -> E {
    E::from(Boxed {
        source: e.into(),
        retryable,
    })
}

/// A failed request to the server: retryable (the connection, not the request).
pub(crate) fn io<E: From<Boxed>>(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> E {
    backend(e, true)
}

macro_rules! from_boxed {
    ($($t:ident),*) => {$(
        impl From<Boxed> for busway_core::$t {
            fn from(e: Boxed) -> Self {
                Self::Backend { source: e.source, retryable: e.retryable }
            }
        }
    )*};
}
from_boxed!(
    DeclareError,
    PublishError,
    ConsumeError,
    StatsError,
    SettleError
);

/// Whether a JetStream API error is "not found" (stream or consumer).
fn is_not_found(e: &impl std::fmt::Display) -> bool {
    let text = e.to_string();
    text.contains("10059") || text.contains("10014") || text.contains("not found")
}

/// Stream config for a queue.
fn stream_config(info: &QueueInfo) -> Result<stream::Config, DeclareError> {
    let description =
        serde_json::to_string(&info.spec).map_err(|e| backend::<DeclareError>(e, false))?;
    let max_messages = info
        .spec
        .max_length
        .map_or(-1, |m| i64::try_from(m).unwrap_or(i64::MAX));
    Ok(stream::Config {
        name: info.stream.clone(),
        description: Some(description),
        subjects: vec![format!("{}.*", info.subject_base)],
        retention: stream::RetentionPolicy::WorkQueue,
        storage: if info.spec.durable {
            stream::StorageType::File
        } else {
            stream::StorageType::Memory
        },
        max_messages,
        discard: stream::DiscardPolicy::New,
        ..Default::default()
    })
}

/// Config of a durable pull consumer.
fn consumer_config(name: String, filter: String, ack_wait: Duration) -> pull::Config {
    pull::Config {
        durable_name: Some(name),
        filter_subject: filter,
        ack_policy: jetstream::consumer::AckPolicy::Explicit,
        ack_wait,
        max_deliver: -1,
        max_ack_pending: -1,
        ..Default::default()
    }
}

impl Inner {
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    fn cached(&self, name: &QueueName) -> Option<Arc<QueueInfo>> {
        self.queues.read().ok().and_then(|q| q.get(name).cloned())
    }

    pub(crate) fn forget_queue(&self, name: &QueueName) {
        if let Ok(mut q) = self.queues.write() {
            q.remove(name);
        }
    }

    fn remember(&self, spec: QueueSpec) -> Arc<QueueInfo> {
        let info = Arc::new(QueueInfo::new(&self.config.prefix, spec));
        if let Ok(mut q) = self.queues.write() {
            q.insert(info.name.clone(), info.clone());
        }
        info
    }

    /// The spec stored in a queue stream's description.
    fn spec_of(&self, stream: &stream::Info) -> Option<QueueSpec> {
        let spec: QueueSpec = serde_json::from_str(stream.config.description.as_deref()?).ok()?;
        (spec.name.as_str()
            == names::queue_of_stream(&self.config.prefix, &stream.config.name)?.as_str())
        .then_some(spec)
    }

    /// The queue's info, from the cache or from the server. `None` if it does not exist.
    pub(crate) async fn queue(&self, name: &QueueName) -> Result<Option<Arc<QueueInfo>>, Boxed> {
        if let Some(info) = self.cached(name) {
            return Ok(Some(info));
        }
        let stream = names::stream_name(&self.config.prefix, name.as_str());
        match self.js.get_stream(&stream).await {
            Ok(s) => Ok(self
                .spec_of(s.cached_info())
                .map(|spec| self.remember(spec))),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(Boxed {
                source: e.into(),
                retryable: true,
            }),
        }
    }

    /// Creates the stream of `spec` or checks the existing one against it
    /// (`keep_existing`: an existing queue is taken as it is, for
    /// dead-letter queues); then creates its consumers.
    async fn declare(
        &self,
        spec: &QueueSpec,
        keep_existing: bool,
    ) -> Result<Arc<QueueInfo>, DeclareError> {
        let wanted = QueueInfo::new(&self.config.prefix, spec.clone());
        let config = stream_config(&wanted)?;
        let stream = match self.js.get_stream(&wanted.stream).await {
            Ok(s) => s,
            Err(e) if is_not_found(&e) => match self.js.create_stream(config).await {
                Ok(s) => s,
                // Created concurrently by someone else: read theirs.
                Err(_) => self
                    .js
                    .get_stream(&wanted.stream)
                    .await
                    .map_err(io::<DeclareError>)?,
            },
            Err(e) => return Err(io(e)),
        };
        let existing = self.spec_of(stream.cached_info()).ok_or_else(|| {
            backend::<DeclareError>(
                format!(
                    "stream {} exists and does not hold a busway queue",
                    wanted.stream
                ),
                false,
            )
        })?;
        if !keep_existing {
            existing.check_redeclare(spec)?;
        }
        let info = self.remember(existing);
        for level in 0..info.levels {
            let name = QueueInfo::level_consumer(level);
            let config = consumer_config(
                name.clone(),
                info.level_subject(level),
                self.config.ack_wait,
            );
            stream
                .get_or_create_consumer(&name, config)
                .await
                .map_err(io::<DeclareError>)?;
        }
        let delayed = consumer_config(
            names::DELAYED_CONSUMER.into(),
            info.delayed_subject(),
            self.config.ack_wait,
        );
        stream
            .get_or_create_consumer(names::DELAYED_CONSUMER, delayed)
            .await
            .map_err(io::<DeclareError>)?;
        Ok(info)
    }

    /// The queues bound to each topic in `topics`.
    async fn routes(&self, topics: &[&Topic]) -> Result<HashMap<Topic, Vec<QueueName>>, Boxed> {
        let filter = format!("{}.bind.>", self.config.prefix);
        let subjects: Vec<(String, usize)> = self
            .bindings
            .info_with_subjects(filter)
            .await
            .map_err(|e| Boxed {
                source: e.into(),
                retryable: true,
            })?
            .try_collect()
            .await
            .map_err(|e| Boxed {
                source: e.into(),
                retryable: true,
            })?;
        let mut bindings = Vec::new();
        for (subject, _) in subjects {
            let mut tokens = subject.rsplit('.');
            let (Some(pattern), Some(queue)) = (tokens.next(), tokens.next()) else {
                continue;
            };
            let (Some(pattern), Some(queue)) = (names::unhex(pattern), names::unhex(queue)) else {
                continue;
            };
            if let Ok(queue) = QueueName::new(queue) {
                bindings.push((queue, pattern));
            }
        }
        let mut patterns = self
            .patterns
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut out = HashMap::new();
        for topic in topics {
            let mut queues: Vec<QueueName> = Vec::new();
            for (queue, pattern) in &bindings {
                let parsed = patterns
                    .entry(pattern.clone())
                    .or_insert_with(|| TopicPattern::new(pattern).ok());
                if parsed.as_ref().is_some_and(|p| p.matches(topic)) && !queues.contains(queue) {
                    queues.push(queue.clone());
                }
            }
            out.insert((*topic).clone(), queues);
        }
        Ok(out)
    }

    /// Stores a message in a queue's stream and waits for JetStream's ack.
    pub(crate) async fn store(
        &self,
        subject: String,
        headers: HeaderMap,
        blob: Bytes,
    ) -> Result<(), SettleError> {
        let sent = if headers.is_empty() {
            self.js.publish(subject, blob).await
        } else {
            self.js.publish_with_headers(subject, headers, blob).await
        };
        let ack = sent.map_err(io::<SettleError>)?;
        ack.await.map_err(io::<SettleError>)?;
        Ok(())
    }

    /// Acknowledges a delivery and waits for the server to confirm.
    pub(crate) async fn ack(&self, reply: &Subject) -> Result<(), SettleError> {
        self.client
            .request(reply.clone(), Bytes::from_static(b"+ACK"))
            .await
            .map_err(io::<SettleError>)?;
        Ok(())
    }

    /// Stores a copy of a delivered message at the end of its queue (after
    /// `delay`, if given) with `attempts` deliveries counted, then acks
    /// the delivery. A failure between the two leaves both (a duplicate,
    /// never a loss).
    pub(crate) async fn requeue(
        &self,
        queue: &QueueInfo,
        level: usize,
        reply: &Subject,
        blob: Bytes,
        attempts: u32,
        delay: Option<Duration>,
    ) -> Result<(), SettleError> {
        let mut headers = HeaderMap::new();
        if attempts > 0 {
            headers.insert(names::ATTEMPTS, attempts.to_string().as_str());
        }
        let subject = match delay.filter(|d| !d.is_zero()) {
            None => queue.level_subject(level),
            Some(delay) => {
                let due = unix_millis(SystemTime::now())
                    + i64::try_from(delay.as_millis()).unwrap_or(i64::MAX / 4)
                    + 1;
                headers.insert(names::DUE, due.to_string().as_str());
                headers.insert(names::LEVEL, level.to_string().as_str());
                queue.delayed_subject()
            }
        };
        self.store(subject, headers, blob).await?;
        self.ack(reply).await
    }

    /// Messages stored in a queue's stream (ready, in flight and delayed).
    async fn stored(&self, stream: &str) -> Result<u64, Boxed> {
        match self.js.get_stream(stream).await {
            Ok(s) => Ok(s.cached_info().state.messages),
            Err(e) if is_not_found(&e) => Ok(0),
            Err(e) => Err(Boxed {
                source: e.into(),
                retryable: true,
            }),
        }
    }

    async fn consumer_counts(&self, stream: &str, consumer: &str) -> Result<(u64, u64), Boxed> {
        let subject = format!("CONSUMER.INFO.{stream}.{consumer}");
        let reply: jetstream::response::Response<jetstream::consumer::Info> = self
            .js
            .request(subject, &serde_json::json!({}))
            .await
            .map_err(|e| Boxed {
                source: e.into(),
                retryable: true,
            })?;
        match reply {
            jetstream::response::Response::Ok(info) => {
                Ok((info.num_pending, info.num_ack_pending as u64))
            }
            jetstream::response::Response::Err { error } => Err(Boxed {
                source: error.into(),
                retryable: false,
            }),
        }
    }
}

impl NatsTransport {
    /// Connects with the settings in the URL (`?prefix=`, `?ack_wait=`) and
    /// otherwise the defaults.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), busway_core::ConnectError> {
    /// let transport = busway_nats::NatsTransport::connect("nats://127.0.0.1:4222").await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn connect(url: &str) -> Result<Self, ConnectError> {
        let (url, config) = NatsConfig::from_url(url)?;
        Self::connect_with(&url, config).await
    }

    /// Connects to the server at `url` (`nats://host:port`, `tls://…`, a
    /// comma-separated list of servers, user and password in the URL).
    /// Errors name the server and the cause, never the password.
    pub async fn connect_with(url: &str, config: NatsConfig) -> Result<Self, ConnectError> {
        let location = busway_core::redact_url(url);
        if !valid_prefix(&config.prefix) {
            return Err(ConnectError::InvalidUrl {
                url: location,
                reason: format!(
                    "invalid prefix `{}`: ASCII letters, digits and `-` only",
                    config.prefix
                ),
            });
        }
        let fail = |source: Box<dyn std::error::Error + Send + Sync>, retryable: bool| {
            ConnectError::Backend {
                backend: "nats",
                location: location.clone(),
                retryable,
                source,
            }
        };
        let client = async_nats::ConnectOptions::new()
            .name("busway")
            .connection_timeout(Duration::from_secs(5))
            .request_timeout(Some(Duration::from_secs(10)))
            .connect(url)
            .await
            .map_err(|e| {
                let retryable = matches!(
                    e.kind(),
                    async_nats::ConnectErrorKind::Io
                        | async_nats::ConnectErrorKind::TimedOut
                        | async_nats::ConnectErrorKind::Dns
                );
                fail(e.into(), retryable)
            })?;
        let js = jetstream::new(client.clone());
        let prefix = &config.prefix;
        let bindings = js
            .get_or_create_stream(stream::Config {
                name: format!("{prefix}-bindings"),
                description: Some("busway topic bindings".into()),
                subjects: vec![format!("{prefix}.bind.>")],
                max_messages_per_subject: 1,
                ..Default::default()
            })
            .await
            .map_err(|e| fail(format!("JetStream unavailable: {e}").into(), true))?;
        let live = js
            .get_or_create_stream(stream::Config {
                name: format!("{prefix}-live"),
                description: Some("busway live consumers".into()),
                subjects: vec![format!("{prefix}.live.>")],
                max_messages_per_subject: 1,
                max_age: LIVE_MAX_AGE,
                storage: stream::StorageType::Memory,
                ..Default::default()
            })
            .await
            .map_err(|e| fail(format!("JetStream unavailable: {e}").into(), true))?;
        let max_payload = config.max_payload_bytes.min(
            client
                .server_info()
                .max_payload
                .saturating_sub(ENVELOPE_ROOM),
        );
        let (close_tx, _) = watch::channel(false);
        let inner = Arc::new(Inner {
            client,
            js,
            config,
            location,
            max_payload,
            bindings,
            live,
            queues: RwLock::new(HashMap::new()),
            patterns: Mutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
            close_tx,
            in_flight: Mutex::new(HashMap::new()),
            next_token: AtomicU64::new(0),
            tasks: Mutex::new(Vec::new()),
            temporaries: Mutex::new(Vec::new()),
        });
        tokio::spawn(renew(Arc::downgrade(&inner)));
        Ok(Self { inner })
    }

    /// Where this transport is connected (without any password).
    pub fn location(&self) -> &str {
        &self.inner.location
    }

    /// The NATS client this transport uses (for monitoring or cleanup).
    pub fn client(&self) -> &async_nats::Client {
        &self.inner.client
    }
}

/// Tells the server this transport is still working on its unsettled
/// deliveries (`+WPI`), every third of the ack wait, until it is dropped.
async fn renew(inner: Weak<Inner>) {
    let Some(period) = inner.upgrade().map(|i| i.config.ack_wait / 3) else {
        return;
    };
    loop {
        tokio::time::sleep(period).await;
        let Some(inner) = inner.upgrade() else { return };
        if inner.is_closed() {
            return;
        }
        let replies: Vec<Subject> = inner
            .in_flight
            .lock()
            .map(|m| m.values().map(|f| f.reply.clone()).collect())
            .unwrap_or_default();
        for reply in replies {
            if let Err(e) = inner
                .client
                .publish(reply, Bytes::from_static(b"+WPI"))
                .await
            {
                tracing::warn!(error = %e, "renewing a delivery failed");
            }
        }
    }
}

#[async_trait]
impl Transport for NatsTransport {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            delay: Support::Emulated,
            priority: Support::Emulated,
            ttl: Support::Emulated,
            dead_letter: Support::Emulated,
            ordering: Support::Native,
            persistence: Support::Native,
            multi_process: Support::Native,
            max_payload_bytes: self.inner.max_payload,
        }
    }

    async fn declare_queue(&self, spec: &QueueSpec) -> Result<(), DeclareError> {
        if self.inner.is_closed() {
            return Err(DeclareError::Closed);
        }
        spec.validate()?;
        if let Some(dlq) = spec.dead_letter_spec() {
            self.inner.declare(&dlq, true).await?;
        }
        self.inner.declare(spec, false).await?;
        Ok(())
    }

    async fn declare_temporary_queue(&self, name: &QueueName) -> Result<(), DeclareError> {
        let spec = QueueSpec::temporary(name.clone());
        self.declare_queue(&spec).await?;
        if let Ok(mut t) = self.inner.temporaries.lock() {
            t.push(names::stream_name(&self.inner.config.prefix, name.as_str()));
        }
        Ok(())
    }

    async fn bind(&self, binding: &Binding) -> Result<(), DeclareError> {
        let inner = &self.inner;
        if inner.is_closed() {
            return Err(DeclareError::Closed);
        }
        if inner.queue(&binding.queue).await?.is_none() {
            return Err(DeclareError::QueueNotFound(binding.queue.clone()));
        }
        let subject = format!(
            "{}.bind.{}.{}",
            inner.config.prefix,
            names::hex(binding.queue.as_str()),
            names::hex(binding.pattern.as_str())
        );
        let ack = inner
            .js
            .publish(subject, Bytes::new())
            .await
            .map_err(io::<DeclareError>)?;
        ack.await.map_err(io::<DeclareError>)?;
        Ok(())
    }

    async fn publish_batch(
        &self,
        batch: Vec<Publish>,
        durability: Durability,
    ) -> Result<(), PublishError> {
        let inner = &self.inner;
        if inner.is_closed() {
            return Err(PublishError::Closed);
        }
        for p in &batch {
            p.check_payload(inner.max_payload)?;
        }
        let topics: Vec<&Topic> = batch
            .iter()
            .filter_map(|p| match &p.destination {
                Destination::Topic(t) => Some(t),
                Destination::Queue(_) => None,
            })
            .collect();
        let routes = if topics.is_empty() {
            HashMap::new()
        } else {
            inner.routes(&topics).await?
        };
        let mut infos: HashMap<QueueName, Option<Arc<QueueInfo>>> = HashMap::new();
        let mut targets: Vec<(Arc<QueueInfo>, usize)> = Vec::with_capacity(batch.len());
        for (i, p) in batch.iter().enumerate() {
            let queues = match &p.destination {
                Destination::Queue(q) => std::slice::from_ref(q),
                Destination::Topic(t) => routes.get(t).map_or(&[][..], Vec::as_slice),
            };
            for q in queues {
                if !infos.contains_key(q) {
                    let info = inner.queue(q).await?;
                    infos.insert(q.clone(), info);
                }
                match infos.get(q).cloned().flatten() {
                    Some(info) => targets.push((info, i)),
                    None if matches!(p.destination, Destination::Queue(_)) => {
                        return Err(PublishError::QueueNotFound(q.clone()));
                    }
                    // A binding to a queue that no longer exists: nothing to deliver to.
                    None => {}
                }
            }
        }
        let now = SystemTime::now();
        let mut acks = Vec::with_capacity(targets.len());
        for (info, i) in targets {
            let p = &batch[i];
            let topic = match &p.destination {
                Destination::Topic(t) => Some(t),
                Destination::Queue(_) => None,
            };
            let blob = encode_for(&p.message, topic, &info, now)?;
            let level = info.level(p.message.priority.get());
            let mut headers = HeaderMap::new();
            let subject = match p.delay.filter(|d| !d.is_zero()) {
                None => info.level_subject(level),
                Some(delay) => {
                    let due = unix_millis(now)
                        + i64::try_from(delay.as_millis()).unwrap_or(i64::MAX / 4)
                        + 1;
                    headers.insert(names::DUE, due.to_string().as_str());
                    headers.insert(names::LEVEL, level.to_string().as_str());
                    info.delayed_subject()
                }
            };
            // Without headers: a plain PUB, cheaper for the server than an HPUB.
            let sent = if headers.is_empty() {
                inner.js.publish(subject, blob).await
            } else {
                inner.js.publish_with_headers(subject, headers, blob).await
            };
            let ack = sent.map_err(|e| publish_error(inner, &info, e))?;
            acks.push((info, ack));
        }
        if durability == Durability::Buffered {
            inner.client.flush().await.map_err(io::<PublishError>)?;
            return Ok(());
        }
        let results = futures::future::join_all(
            acks.into_iter()
                .map(|(info, ack)| async move { ack.await.map_err(|e| (info, e)) }),
        )
        .await;
        for r in results {
            if let Err((info, e)) = r {
                return Err(publish_error(inner, &info, e));
            }
        }
        Ok(())
    }

    async fn consume(
        &self,
        queue: &QueueName,
        options: ConsumeOptions,
    ) -> Result<DeliveryStream, ConsumeError> {
        if self.inner.is_closed() {
            return Err(ConsumeError::Closed);
        }
        if options.prefetch == 0 {
            return Err(ConsumeError::InvalidOptions(
                "prefetch must be at least 1".into(),
            ));
        }
        let info = self
            .inner
            .queue(queue)
            .await?
            .ok_or_else(|| ConsumeError::QueueNotFound(queue.clone()))?;
        consumer::start(self.inner.clone(), info, options).await
    }

    async fn queue_stats(&self, queue: &QueueName) -> Result<QueueStats, StatsError> {
        let inner = &self.inner;
        if inner.is_closed() {
            return Err(StatsError::Closed);
        }
        let info = inner
            .queue(queue)
            .await?
            .ok_or_else(|| StatsError::QueueNotFound(queue.clone()))?;
        let mut ready = 0;
        let mut in_flight = 0;
        for level in 0..info.levels {
            let consumer = QueueInfo::level_consumer(level);
            let (pending, ack_pending) = match inner.consumer_counts(&info.stream, &consumer).await
            {
                Ok(counts) => counts,
                Err(e) if is_not_found(&e.source) => {
                    inner.forget_queue(queue);
                    return Err(StatsError::QueueNotFound(queue.clone()));
                }
                Err(e) => return Err(e.into()),
            };
            ready += pending;
            in_flight += ack_pending;
        }
        let (pending, ack_pending) = inner
            .consumer_counts(&info.stream, names::DELAYED_CONSUMER)
            .await?;
        let delayed = pending + ack_pending;
        let consumers = inner
            .live
            .info_with_subjects(format!("{}.*", info.live_base))
            .await
            .map_err(io::<StatsError>)?
            .try_fold(0u64, |n, _| async move { Ok(n + 1) })
            .await
            .map_err(io::<StatsError>)?;
        let dead_lettered = match &info.spec.dead_letter {
            Some(dlq) => {
                inner
                    .stored(&names::stream_name(&inner.config.prefix, dlq.as_str()))
                    .await?
            }
            None => 0,
        };
        Ok(QueueStats {
            ready,
            delayed,
            in_flight,
            consumers,
            dead_lettered,
        })
    }

    async fn list_queues(&self) -> Result<Vec<QueueName>, StatsError> {
        let inner = &self.inner;
        if inner.is_closed() {
            return Err(StatsError::Closed);
        }
        let streams: Vec<String> = inner
            .js
            .stream_names()
            .try_collect()
            .await
            .map_err(io::<StatsError>)?;
        let mut names: Vec<QueueName> = streams
            .iter()
            .filter_map(|s| names::queue_of_stream(&inner.config.prefix, s))
            .collect();
        names.sort();
        names.dedup();
        Ok(names)
    }

    async fn close(&self) {
        let inner = &self.inner;
        if inner.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        inner.close_tx.send_replace(true);
        let tasks: Vec<_> = inner
            .tasks
            .lock()
            .map(|mut t| t.drain(..).collect())
            .unwrap_or_default();
        for task in tasks {
            let _ = tokio::time::timeout(inner.config.block + Duration::from_secs(5), task).await;
        }
        // Hand every unsettled delivery back, with the attempt counted.
        let held: Vec<_> = inner
            .in_flight
            .lock()
            .map(|mut m| m.drain().map(|(_, f)| f).collect())
            .unwrap_or_default();
        let returns = held.into_iter().map(|f| async move {
            let result = inner
                .requeue(&f.queue, f.level, &f.reply, f.blob, f.attempt, None)
                .await;
            if let Err(e) = result {
                tracing::warn!(queue = %f.queue.name, error = %e, "returning a delivery on close failed; it is redelivered after the ack wait");
            }
        });
        futures::future::join_all(returns).await;
        let temporaries: Vec<String> = inner
            .temporaries
            .lock()
            .map(|mut t| t.drain(..).collect())
            .unwrap_or_default();
        for stream in temporaries {
            if let Err(e) = inner.js.delete_stream(&stream).await {
                tracing::warn!(%stream, error = %e, "deleting a temporary queue failed");
            }
        }
        if let Err(e) = inner.client.flush().await {
            tracing::debug!(error = %e, "flushing on close failed");
        }
    }
}

/// Maps a failed publish; forgets a queue whose stream is gone.
fn publish_error(
    inner: &Inner,
    info: &QueueInfo,
    e: async_nats::jetstream::context::PublishError,
) -> PublishError {
    use async_nats::jetstream::context::PublishErrorKind as K;
    match e.kind() {
        K::StreamNotFound => {
            inner.forget_queue(&info.name);
            PublishError::QueueNotFound(info.name.clone())
        }
        K::MaxPayloadExceeded => backend(e, false),
        K::Other if e.to_string().contains("maximum messages") => PublishError::QueueFull {
            queue: info.name.clone(),
            max_length: info.spec.max_length.unwrap_or(0),
        },
        _ => backend(e, true),
    }
}

/// Encodes `message` for `info`, applying the queue's TTL.
fn encode_for(
    message: &Message,
    topic: Option<&Topic>,
    info: &QueueInfo,
    now: SystemTime,
) -> Result<Bytes, PublishError> {
    let expires_at = match (message.expires_at, info.spec.message_ttl) {
        (at, None) => at,
        (None, Some(ttl)) => Some(now + ttl),
        (Some(at), Some(ttl)) => Some(at.min(now + ttl)),
    };
    let result = if expires_at == message.expires_at {
        envelope::encode(message, topic)
    } else {
        let mut m = message.clone();
        m.expires_at = expires_at;
        envelope::encode(&m, topic)
    };
    result.map_err(|e| PublishError::InvalidMessage(e.to_string()))
}
