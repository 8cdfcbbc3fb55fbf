//! The transport: connection, topology, publishing and statistics.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use busway_core::{
    unix_millis, Binding, Capabilities, ConnectError, ConsumeError, ConsumeOptions, DeclareError,
    DeliveryStream, Destination, Durability, Message, Publish, PublishError, QueueName, QueueSpec,
    QueueStats, StatsError, Support, Topic, TopicPattern, Transport,
};
use bytes::Bytes;
use redis::aio::ConnectionManager;
use redis::{AsyncCommands, RedisError};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::acks::AckBatcher;
use crate::config::RedisConfig;
use crate::consumer;
use busway_core::envelope;

/// The consumer group every queue stream has.
pub(crate) const GROUP: &str = "busway";

/// A [`Transport`] on Redis Streams. Cheap to clone; clones share the
/// connection. See the [crate docs](crate) for how it works.
#[derive(Clone)]
pub struct RedisTransport {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RedisTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTransport")
            .field("location", &self.inner.location)
            .field("prefix", &self.inner.config.prefix)
            .finish_non_exhaustive()
    }
}

/// What a transport knows about a declared queue.
pub(crate) struct QueueInfo {
    pub(crate) name: QueueName,
    pub(crate) spec: QueueSpec,
    /// Stream keys by priority (index 0 = priority 0).
    pub(crate) streams: Vec<String>,
    /// The prefix of the stream keys; the priority digit follows.
    pub(crate) stream_prefix: String,
    pub(crate) delayed: String,
    pub(crate) consumers: String,
}

impl QueueInfo {
    fn new(prefix: &str, spec: QueueSpec) -> Self {
        let base = format!("{prefix}:{{{}}}", spec.name);
        let levels = spec.max_priority.map_or(1, |m| usize::from(m) + 1);
        let stream_prefix = format!("{base}:s");
        Self {
            name: spec.name.clone(),
            streams: (0..levels).map(|p| format!("{stream_prefix}{p}")).collect(),
            stream_prefix,
            delayed: format!("{base}:delayed"),
            consumers: format!("{base}:consumers"),
            spec,
        }
    }

    /// The priority level a message of priority `p` goes to.
    pub(crate) fn level(&self, p: u8) -> usize {
        usize::from(p).min(self.streams.len() - 1)
    }
}

/// A delivery handed out and not yet settled, renewed while this transport lives.
pub(crate) struct InFlight {
    pub(crate) queue: Arc<QueueInfo>,
    pub(crate) consumer: String,
    pub(crate) blob: Bytes,
    pub(crate) attempts: u32,
}

pub(crate) struct Inner {
    pub(crate) client: redis::Client,
    pub(crate) conn: ConnectionManager,
    pub(crate) config: RedisConfig,
    pub(crate) location: String,
    persistence: Support,
    queues: RwLock<HashMap<QueueName, Arc<QueueInfo>>>,
    patterns: Mutex<HashMap<String, Option<TopicPattern>>>,
    pub(crate) closed: AtomicBool,
    pub(crate) close_tx: watch::Sender<bool>,
    /// Unsettled deliveries by (stream, entry id).
    pub(crate) in_flight: Mutex<HashMap<(Arc<str>, String), InFlight>>,
    /// Sends acks to the server in batches.
    pub(crate) acks: AckBatcher,
    pub(crate) tasks: Mutex<Vec<JoinHandle<()>>>,
    /// Server clock minus local clock, in milliseconds.
    clock_offset_ms: i64,
}

pub(crate) fn backend<E: From<BoxedRedis>>(e: RedisError) -> E {
    E::from(BoxedRedis(e))
}

/// A redis error on its way into one of the core error enums.
pub(crate) struct BoxedRedis(pub(crate) RedisError);

impl BoxedRedis {
    fn retryable(&self) -> bool {
        retryable(&self.0)
    }
}

/// Whether the same call may succeed later (the connection failed, not the command).
pub(crate) fn retryable(e: &RedisError) -> bool {
    e.is_io_error() || e.is_timeout() || e.is_connection_dropped()
}

macro_rules! from_redis {
    ($($t:ident),*) => {$(
        impl From<BoxedRedis> for busway_core::$t {
            fn from(e: BoxedRedis) -> Self {
                let retryable = e.retryable();
                Self::Backend { source: Box::new(e.0), retryable }
            }
        }
    )*};
}
from_redis!(
    DeclareError,
    PublishError,
    ConsumeError,
    StatsError,
    SettleError
);

impl Inner {
    /// The server's clock, in milliseconds since the Unix epoch, as estimated locally.
    pub(crate) fn server_now_ms(&self) -> i64 {
        unix_millis(SystemTime::now()) + self.clock_offset_ms
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    fn cached(&self, name: &QueueName) -> Option<Arc<QueueInfo>> {
        self.queues.read().ok().and_then(|q| q.get(name).cloned())
    }

    /// The queue's info, from the cache or from the server. `None` if it does not exist.
    pub(crate) async fn queue(
        &self,
        name: &QueueName,
    ) -> Result<Option<Arc<QueueInfo>>, RedisError> {
        if let Some(info) = self.cached(name) {
            return Ok(Some(info));
        }
        let mut conn = self.conn.clone();
        let raw: Option<String> = conn.hget(self.queues_key(), name.as_str()).await?;
        let Some(raw) = raw else { return Ok(None) };
        let Ok(spec) = serde_json::from_str::<QueueSpec>(&raw) else {
            return Ok(None);
        };
        Ok(Some(self.remember(spec)))
    }

    fn remember(&self, spec: QueueSpec) -> Arc<QueueInfo> {
        let info = Arc::new(QueueInfo::new(&self.config.prefix, spec));
        if let Ok(mut q) = self.queues.write() {
            q.insert(info.name.clone(), info.clone());
        }
        info
    }

    fn queues_key(&self) -> String {
        format!("{}:queues", self.config.prefix)
    }

    fn bindings_key(&self) -> String {
        format!("{}:bindings", self.config.prefix)
    }

    /// Creates the streams and their consumer group (idempotent).
    pub(crate) async fn create_streams(&self, info: &QueueInfo) -> Result<(), RedisError> {
        let mut conn = self.conn.clone();
        for stream in &info.streams {
            let created: Result<(), RedisError> = redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(stream)
                .arg(GROUP)
                .arg("0")
                .arg("MKSTREAM")
                .query_async(&mut conn)
                .await;
            match created {
                Err(e) if e.code() == Some("BUSYGROUP") => {}
                other => other?,
            }
        }
        Ok(())
    }

    /// Stores `spec` unless a spec is stored; returns the stored one.
    async fn store_spec(&self, spec: &QueueSpec) -> Result<QueueSpec, DeclareError> {
        let mut conn = self.conn.clone();
        let json = serde_json::to_string(spec).map_err(|e| DeclareError::Backend {
            source: Box::new(e),
            retryable: false,
        })?;
        let (_, stored): (bool, String) = redis::pipe()
            .atomic()
            .hset_nx(self.queues_key(), spec.name.as_str(), &json)
            .hget(self.queues_key(), spec.name.as_str())
            .query_async(&mut conn)
            .await
            .map_err(backend::<DeclareError>)?;
        match serde_json::from_str::<QueueSpec>(&stored) {
            Ok(existing) => Ok(existing),
            // Unreadable (written by something else): ours replaces it.
            Err(_) => {
                let _: () = conn
                    .hset(self.queues_key(), spec.name.as_str(), &json)
                    .await
                    .map_err(backend::<DeclareError>)?;
                Ok(spec.clone())
            }
        }
    }

    /// Declares `spec`: stores it, creates its streams, remembers it.
    pub(crate) async fn declare(&self, spec: &QueueSpec) -> Result<Arc<QueueInfo>, DeclareError> {
        let existing = self.store_spec(spec).await?;
        existing.check_redeclare(spec)?;
        let info = self.remember(existing);
        self.create_streams(&info)
            .await
            .map_err(backend::<DeclareError>)?;
        Ok(info)
    }

    /// The queues bound to `topic`.
    async fn routes(&self, topic: &Topic) -> Result<Vec<QueueName>, RedisError> {
        let mut conn = self.conn.clone();
        let members: Vec<String> = conn.smembers(self.bindings_key()).await?;
        let mut out = Vec::new();
        let mut patterns = self
            .patterns
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for member in members {
            let Some((queue, pattern)) = member.split_once(' ') else {
                continue;
            };
            let parsed = patterns
                .entry(pattern.to_owned())
                .or_insert_with(|| TopicPattern::new(pattern).ok());
            let matched = parsed.as_ref().is_some_and(|p| p.matches(topic));
            if matched {
                if let Ok(q) = QueueName::new(queue) {
                    if !out.contains(&q) {
                        out.push(q);
                    }
                }
            }
        }
        Ok(out)
    }

    /// Messages stored in `info` (ready, in flight and delayed).
    async fn stored(&self, info: &QueueInfo) -> Result<u64, RedisError> {
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        for s in &info.streams {
            pipe.xlen(s);
        }
        pipe.zcard(&info.delayed);
        let counts: Vec<u64> = pipe.query_async(&mut conn).await?;
        Ok(counts.iter().sum())
    }
}

impl RedisTransport {
    /// Connects with the settings in the URL (`?prefix=`) and otherwise the defaults.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), busway_core::ConnectError> {
    /// let transport = busway_redis::RedisTransport::connect("redis://127.0.0.1:6379").await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn connect(url: &str) -> Result<Self, ConnectError> {
        let (url, config) = RedisConfig::from_url(url)?;
        Self::connect_with(&url, config).await
    }

    /// Connects to the server at `url` (`redis://`, `rediss://` or
    /// `redis+unix://`). Errors name the server and the cause, never the password.
    pub async fn connect_with(url: &str, config: RedisConfig) -> Result<Self, ConnectError> {
        let location = busway_core::redact_url(url);
        let fail = |source: RedisError| ConnectError::Backend {
            backend: "redis",
            location: location.clone(),
            retryable: retryable(&source),
            source: Box::new(source),
        };
        let invalid = |reason: String| ConnectError::InvalidUrl {
            url: location.clone(),
            reason,
        };
        let client = match &config.tls_ca_pem {
            None => redis::Client::open(url),
            Some(_) if !url.starts_with("rediss://") => {
                return Err(invalid(
                    "a CA to trust (tls_ca) needs a `rediss://` URL".to_owned(),
                ));
            }
            Some(pem) => redis::Client::build_with_tls(
                url,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem.as_bytes().to_vec()),
                },
            ),
        }
        .map_err(|e| invalid(e.to_string()))?;
        let conn = ConnectionManager::new_with_config(client.clone(), manager_config(None))
            .await
            .map_err(fail)?;
        let mut probe = conn.clone();
        let info: String = redis::cmd("INFO")
            .arg("server")
            .query_async(&mut probe)
            .await
            .map_err(fail)?;
        check_version(&info).map_err(|reason| ConnectError::Backend {
            backend: "redis",
            location: location.clone(),
            retryable: false,
            source: reason.into(),
        })?;
        let before = unix_millis(SystemTime::now());
        let (secs, micros): (i64, i64) = redis::cmd("TIME")
            .query_async(&mut probe)
            .await
            .map_err(fail)?;
        let after = unix_millis(SystemTime::now());
        let clock_offset_ms = secs * 1000 + micros / 1000 - (before + after) / 2;
        let persistence = persistence(&mut probe).await;
        // Acks on a connection of their own: behind a burst of publishes on
        // the shared one, they would wait for every publish queued before
        // them, and consumers waiting on their acks with them.
        let ack_conn = ConnectionManager::new_with_config(client.clone(), manager_config(None))
            .await
            .map_err(fail)?;
        let (close_tx, _) = watch::channel(false);
        let inner = Arc::new(Inner {
            client,
            conn: conn.clone(),
            config,
            location,
            persistence,
            queues: RwLock::new(HashMap::new()),
            patterns: Mutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
            close_tx,
            in_flight: Mutex::new(HashMap::new()),
            acks: AckBatcher::spawn(ack_conn),
            tasks: Mutex::new(Vec::new()),
            clock_offset_ms,
        });
        tokio::spawn(renew_leases(Arc::downgrade(&inner)));
        Ok(Self { inner })
    }

    /// Where this transport is connected (without any password).
    pub fn location(&self) -> &str {
        &self.inner.location
    }
}

/// The connection manager's settings; `response_timeout` longer for blocking reads.
pub(crate) fn manager_config(
    response_timeout: Option<Duration>,
) -> redis::aio::ConnectionManagerConfig {
    redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(Some(response_timeout.unwrap_or(Duration::from_secs(10))))
        .set_number_of_retries(3)
        .set_max_delay(Duration::from_secs(1))
}

fn check_version(info: &str) -> Result<(), String> {
    let version = info
        .lines()
        .find_map(|l| l.strip_prefix("redis_version:"))
        .map(str::trim)
        .unwrap_or("0");
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let major = parts.next().unwrap_or(0);
    let minor = parts.next().unwrap_or(0);
    if (major, minor) < (6, 2) {
        return Err(format!(
            "Redis {version} lacks XAUTOCLAIM; busway needs Redis 6.2 or later"
        ));
    }
    Ok(())
}

/// Whether the server keeps anything on disk (AOF or RDB snapshots).
async fn persistence(conn: &mut ConnectionManager) -> Support {
    let read = async {
        let aof: Vec<String> = redis::cmd("CONFIG")
            .arg("GET")
            .arg("appendonly")
            .query_async(conn)
            .await?;
        let save: Vec<String> = redis::cmd("CONFIG")
            .arg("GET")
            .arg("save")
            .query_async(conn)
            .await?;
        Ok::<_, RedisError>((
            aof.get(1).is_some_and(|v| v == "yes"),
            save.get(1).is_some_and(|v| !v.trim().is_empty()),
        ))
    };
    match read.await {
        Ok((false, false)) => Support::Unsupported,
        // On, or not readable (CONFIG disabled by a managed service): assume configured.
        _ => Support::Native,
    }
}

/// Renews the leases of this transport's unsettled deliveries until it is dropped.
async fn renew_leases(inner: Weak<Inner>) {
    let Some(period) = inner.upgrade().map(|i| i.config.lease / 3) else {
        return;
    };
    loop {
        tokio::time::sleep(period).await;
        let Some(inner) = inner.upgrade() else { return };
        if inner.is_closed() {
            return;
        }
        let mut by_owner: HashMap<(Arc<str>, String), Vec<String>> = HashMap::new();
        if let Ok(map) = inner.in_flight.lock() {
            for ((stream, id), f) in map.iter() {
                by_owner
                    .entry((stream.clone(), f.consumer.clone()))
                    .or_default()
                    .push(id.clone());
            }
        }
        let mut conn = inner.conn.clone();
        for ((stream, consumer), ids) in by_owner {
            for chunk in ids.chunks(500) {
                let renewed: Result<redis::Value, _> = redis::cmd("XCLAIM")
                    .arg(&*stream)
                    .arg(GROUP)
                    .arg(&consumer)
                    .arg(0)
                    .arg(chunk)
                    .arg("JUSTID")
                    .query_async(&mut conn)
                    .await;
                if let Err(e) = renewed {
                    tracing::warn!(%stream, error = %e, "renewing delivery leases failed");
                }
            }
        }
    }
}

#[async_trait]
impl Transport for RedisTransport {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            delay: Support::Emulated,
            priority: Support::Emulated,
            ttl: Support::Emulated,
            dead_letter: Support::Emulated,
            ordering: Support::Native,
            persistence: self.inner.persistence,
            multi_process: Support::Native,
            max_payload_bytes: self.inner.config.max_payload_bytes,
        }
    }

    async fn declare_queue(&self, spec: &QueueSpec) -> Result<(), DeclareError> {
        if self.inner.is_closed() {
            return Err(DeclareError::Closed);
        }
        spec.validate()?;
        if let Some(dlq) = spec.dead_letter_spec() {
            // An existing dead-letter queue is kept as it is.
            let existing = self.inner.store_spec(&dlq).await?;
            let info = self.inner.remember(existing);
            self.inner
                .create_streams(&info)
                .await
                .map_err(backend::<DeclareError>)?;
        }
        self.inner.declare(spec).await?;
        Ok(())
    }

    async fn bind(&self, binding: &Binding) -> Result<(), DeclareError> {
        if self.inner.is_closed() {
            return Err(DeclareError::Closed);
        }
        if self
            .inner
            .queue(&binding.queue)
            .await
            .map_err(backend::<DeclareError>)?
            .is_none()
        {
            return Err(DeclareError::QueueNotFound(binding.queue.clone()));
        }
        let mut conn = self.inner.conn.clone();
        let member = format!("{} {}", binding.queue, binding.pattern.as_str());
        let _: () = conn
            .sadd(self.inner.bindings_key(), member)
            .await
            .map_err(backend::<DeclareError>)?;
        Ok(())
    }

    async fn publish_batch(
        &self,
        batch: Vec<Publish>,
        _durability: Durability,
    ) -> Result<(), PublishError> {
        let inner = &self.inner;
        if inner.is_closed() {
            return Err(PublishError::Closed);
        }
        for p in &batch {
            p.check_payload(inner.config.max_payload_bytes)?;
        }
        let mut routes: HashMap<Topic, Vec<QueueName>> = HashMap::new();
        let mut targets: Vec<(Arc<QueueInfo>, usize)> = Vec::new();
        let mut infos: HashMap<QueueName, Option<Arc<QueueInfo>>> = HashMap::new();
        for (i, p) in batch.iter().enumerate() {
            let queues = match &p.destination {
                Destination::Queue(q) => vec![q.clone()],
                Destination::Topic(t) => {
                    if !routes.contains_key(t) {
                        let r = inner.routes(t).await.map_err(backend::<PublishError>)?;
                        routes.insert(t.clone(), r);
                    }
                    routes.get(t).cloned().unwrap_or_default()
                }
            };
            for q in queues {
                if !infos.contains_key(&q) {
                    let info = inner.queue(&q).await.map_err(backend::<PublishError>)?;
                    infos.insert(q.clone(), info);
                }
                match infos.get(&q).cloned().flatten() {
                    Some(info) => targets.push((info, i)),
                    None if matches!(p.destination, Destination::Queue(_)) => {
                        return Err(PublishError::QueueNotFound(q));
                    }
                    // A binding to a queue that no longer exists: nothing to deliver to.
                    None => {}
                }
            }
        }
        if targets.is_empty() {
            return Ok(());
        }
        // Length limits.
        let mut per_queue: HashMap<QueueName, (Arc<QueueInfo>, u64)> = HashMap::new();
        for (info, _) in targets.iter().filter(|(i, _)| i.spec.max_length.is_some()) {
            per_queue
                .entry(info.name.clone())
                .or_insert_with(|| (info.clone(), 0))
                .1 += 1;
        }
        for (info, n) in per_queue.values() {
            if let Some(max) = info.spec.max_length {
                let stored = inner.stored(info).await.map_err(backend::<PublishError>)?;
                if stored.saturating_add(*n) > max {
                    return Err(PublishError::QueueFull {
                        queue: info.name.clone(),
                        max_length: max,
                    });
                }
            }
        }
        let now = SystemTime::now();
        let mut conn = inner.conn.clone();
        if let [(info, i)] = targets.as_slice() {
            // One entry: a command on its own, no pipeline around it.
            let cmd = entry_command(inner, &batch[*i], info, now)?;
            return cmd
                .query_async::<redis::Value>(&mut conn)
                .await
                .map(drop)
                .map_err(backend::<PublishError>);
        }
        let mut pipe = redis::pipe();
        // Several entries go in all or none.
        pipe.atomic();
        for (info, i) in &targets {
            pipe.add_command(entry_command(inner, &batch[*i], info, now)?)
                .ignore();
        }
        pipe.query_async::<()>(&mut conn)
            .await
            .map_err(backend::<PublishError>)?;
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
            .await
            .map_err(backend::<ConsumeError>)?
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
            .await
            .map_err(backend::<StatsError>)?
            .ok_or_else(|| StatsError::QueueNotFound(queue.clone()))?;
        let dlq = match &info.spec.dead_letter {
            Some(d) => inner.queue(d).await.map_err(backend::<StatsError>)?,
            None => None,
        };
        let mut pipe = redis::pipe();
        for s in &info.streams {
            pipe.xlen(s);
            pipe.cmd("XPENDING").arg(s).arg(GROUP);
        }
        pipe.zcard(&info.delayed);
        pipe.zcount(&info.consumers, inner.server_now_ms(), "+inf");
        if let Some(dlq) = &dlq {
            for s in &dlq.streams {
                pipe.xlen(s);
            }
            pipe.zcard(&dlq.delayed);
        }
        let mut conn = inner.conn.clone();
        let values: Vec<redis::Value> = pipe
            .query_async(&mut conn)
            .await
            .map_err(backend::<StatsError>)?;
        let int = |v: &redis::Value| match v {
            redis::Value::Int(n) => u64::try_from(*n).unwrap_or(0),
            _ => 0,
        };
        let mut it = values.iter();
        let (mut length, mut pending) = (0, 0);
        for _ in &info.streams {
            length += it.next().map_or(0, int);
            pending += match it.next() {
                Some(redis::Value::Array(summary)) => summary.first().map_or(0, int),
                _ => 0,
            };
        }
        let delayed = it.next().map_or(0, int);
        let consumers = it.next().map_or(0, int);
        let dead_lettered = it.map(int).sum();
        Ok(QueueStats {
            ready: length.saturating_sub(pending),
            delayed,
            in_flight: pending,
            consumers,
            dead_lettered,
        })
    }

    async fn list_queues(&self) -> Result<Vec<QueueName>, StatsError> {
        let inner = &self.inner;
        if inner.is_closed() {
            return Err(StatsError::Closed);
        }
        let mut conn = inner.conn.clone();
        let names: Vec<String> = conn
            .hkeys(inner.queues_key())
            .await
            .map_err(backend::<StatsError>)?;
        // Names were validated when declared; a field that no longer is valid is skipped.
        let mut names: Vec<QueueName> = names
            .iter()
            .filter_map(|n| QueueName::new(n).ok())
            .collect();
        names.sort();
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
            .map(|mut m| m.drain().collect())
            .unwrap_or_default();
        for ((stream, id), f) in held {
            if let Err(e) = consumer::requeue(inner, &stream, &id, &f.blob, f.attempts + 1).await {
                tracing::warn!(queue = %f.queue.name, error = %e, "returning a delivery on close failed");
            }
        }
    }
}

/// The command storing `p` in `info`: an `XADD` to the stream of its
/// priority, or a `ZADD` to the delayed set. The envelope is encoded
/// straight into the command's buffer.
fn entry_command(
    inner: &Inner,
    p: &Publish,
    info: &QueueInfo,
    now: SystemTime,
) -> Result<redis::Cmd, PublishError> {
    let topic = match &p.destination {
        Destination::Topic(t) => Some(t),
        Destination::Queue(_) => None,
    };
    let message = &p.message;
    let expires_at = expiry(message, info, now);
    let level = info.level(message.priority.get());
    let invalid = |e: busway_core::CodecError| PublishError::InvalidMessage(e.to_string());
    match p.delay.filter(|d| !d.is_zero()) {
        None => {
            let mut cmd = redis::cmd("XADD");
            cmd.arg(&info.streams[level]).arg("*").arg("m");
            envelope::encode_into(
                redis::RedisWrite::writer_for_next_arg(&mut cmd),
                message,
                topic,
                expires_at,
            )
            .map_err(invalid)?;
            cmd.arg("a").arg(0);
            Ok(cmd)
        }
        Some(delay) => {
            let due = inner.server_now_ms()
                + i64::try_from(delay.as_millis()).unwrap_or(i64::MAX / 4)
                + 1;
            let blob = envelope::encode_with_expiry(message, topic, expires_at).map_err(invalid)?;
            let mut cmd = redis::cmd("ZADD");
            cmd.arg(&info.delayed)
                .arg(due)
                .arg(delayed_member(level, 0, &blob));
            Ok(cmd)
        }
    }
}

/// When `message` expires in `info`: the earlier of its own expiry and the queue's TTL.
fn expiry(message: &Message, info: &QueueInfo, now: SystemTime) -> Option<SystemTime> {
    match (message.expires_at, info.spec.message_ttl) {
        (at, None) => at,
        (None, Some(ttl)) => Some(now + ttl),
        (Some(at), Some(ttl)) => Some(at.min(now + ttl)),
    }
}

/// A delayed-set member: `{level}|{attempts}|{token}|{blob}`.
pub(crate) fn delayed_member(level: usize, attempts: u32, blob: &[u8]) -> Vec<u8> {
    let token = uuid::Uuid::new_v4().simple().to_string();
    let mut member = format!("{level}|{attempts}|{token}|").into_bytes();
    member.extend_from_slice(blob);
    member
}
