//! The shared state of a transport: the live connection with its publisher
//! channel pool, reconnection with topology replay, and the registry of
//! what was declared.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use busway_core::{Binding, BoxError, QueueName, QueueSpec};
use lapin::options::{
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{FieldTable, LongString, ShortString};
use lapin::uri::AMQPUri;
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};
use tokio::time::Instant;

use crate::config::RabbitMqConfig;
use crate::topology::{queue_arguments, DelayQueue};

/// AMQP reply codes busway reacts to.
pub(crate) const NOT_FOUND: u16 = 404;
pub(crate) const PRECONDITION_FAILED: u16 = 406;
pub(crate) const NO_ROUTE: u16 = 312;

/// Why an internal operation failed, before it is mapped to the public
/// error of the operation.
#[derive(Debug)]
pub(crate) enum Fail {
    /// The transport was closed.
    Closed,
    /// The broker could not be reached within the reconnect timeout.
    Unavailable(BoxError),
    /// The broker or the client library failed.
    Broker(lapin::Error),
}

impl Fail {
    pub(crate) fn retryable(&self) -> bool {
        match self {
            Fail::Closed => false,
            Fail::Unavailable(_) => true,
            Fail::Broker(e) => !e.is_amqp_soft_error(),
        }
    }
    pub(crate) fn into_source(self) -> BoxError {
        match self {
            Fail::Closed => "the transport is closed".into(),
            Fail::Unavailable(e) => e,
            Fail::Broker(e) => Box::new(e),
        }
    }
}

impl From<lapin::Error> for Fail {
    fn from(e: lapin::Error) -> Self {
        Fail::Broker(e)
    }
}

/// The AMQP reply code of a protocol error.
pub(crate) fn reply_code(e: &lapin::Error) -> Option<u16> {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(p) => Some(p.get_id()),
        _ => None,
    }
}

/// The reply text of a protocol error.
pub(crate) fn reply_text(e: &lapin::Error) -> Option<String> {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(p) => Some(p.get_message().to_string()),
        _ => None,
    }
}

/// One open connection and its publisher channels.
pub(crate) struct Live {
    pub(crate) connection: Connection,
    publishers: Vec<Channel>,
    next: AtomicUsize,
    /// A channel without publisher confirms, for replies to direct reply-to
    /// addresses: the broker hands those straight to a channel, so there is
    /// nothing to confirm.
    pub(crate) direct_replies: Channel,
}

impl Live {
    fn healthy(&self) -> bool {
        self.connection.status().connected()
            && self.publishers.iter().any(|c| c.status().connected())
    }

    /// A publisher channel, round robin over the healthy ones.
    pub(crate) fn publisher(&self) -> Option<&Channel> {
        let n = self.publishers.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|i| &self.publishers[(start + i) % n])
            .find(|c| c.status().connected())
    }
}

/// A delay queue as last declared.
struct DelayEntry {
    queue: DelayQueue,
    declared: Instant,
}

/// Redeclare a delay queue this often while it is used, so it never expires
/// under messages still waiting in it.
const DELAY_REDECLARE: Duration = Duration::from_secs(10);

/// State shared by a transport, its consumers and its deliveries.
pub(crate) struct Inner {
    uri: AMQPUri,
    pub(crate) location: String,
    pub(crate) config: RabbitMqConfig,
    live: Mutex<Option<Arc<Live>>>,
    reconnecting: tokio::sync::Mutex<()>,
    closed: AtomicBool,
    closed_tx: tokio::sync::watch::Sender<bool>,
    specs: Mutex<HashMap<QueueName, QueueSpec>>,
    bindings: Mutex<HashSet<Binding>>,
    delays: Mutex<HashMap<String, DelayEntry>>,
    delays_by_queue: Mutex<HashMap<QueueName, HashSet<String>>>,
    in_flight: Mutex<HashMap<QueueName, Arc<AtomicU64>>>,
    /// Temporary queues: declared exclusive, so they go with the connection.
    exclusive: Mutex<HashSet<QueueName>>,
    /// Connections opened so far (1 after connect; more after recoveries).
    pub(crate) connections_opened: AtomicU64,
}

/// Locks a mutex, ignoring poisoning (the guarded maps stay consistent).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Inner {
    pub(crate) fn new(uri: AMQPUri, config: RabbitMqConfig) -> Self {
        let location = format!(
            "{}:{}/{}",
            uri.authority.host, uri.authority.port, uri.vhost
        );
        Self {
            uri,
            location,
            config,
            live: Mutex::new(None),
            reconnecting: tokio::sync::Mutex::new(()),
            closed: AtomicBool::new(false),
            closed_tx: tokio::sync::watch::channel(false).0,
            specs: Mutex::new(HashMap::new()),
            bindings: Mutex::new(HashSet::new()),
            delays: Mutex::new(HashMap::new()),
            delays_by_queue: Mutex::new(HashMap::new()),
            in_flight: Mutex::new(HashMap::new()),
            exclusive: Mutex::new(HashSet::new()),
            connections_opened: AtomicU64::new(0),
        }
    }

    /// The URI connected to.
    pub(crate) fn uri(&self) -> &AMQPUri {
        &self.uri
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Resolves when the transport is closed.
    pub(crate) fn closed_signal(&self) -> tokio::sync::watch::Receiver<bool> {
        self.closed_tx.subscribe()
    }

    fn current(&self) -> Option<Arc<Live>> {
        lock(&self.live).as_ref().filter(|l| l.healthy()).cloned()
    }

    /// The live connection, reconnecting (and replaying the topology) if it
    /// was lost. Waits at most the reconnect timeout.
    pub(crate) async fn live(&self) -> Result<Arc<Live>, Fail> {
        if self.is_closed() {
            return Err(Fail::Closed);
        }
        if let Some(l) = self.current() {
            return Ok(l);
        }
        let deadline = Instant::now() + self.config.reconnect_timeout;
        let _guard = self.reconnecting.lock().await;
        let mut backoff = Duration::from_millis(50);
        loop {
            if self.is_closed() {
                return Err(Fail::Closed);
            }
            if let Some(l) = self.current() {
                return Ok(l);
            }
            let stale = lock(&self.live).take();
            if let Some(stale) = stale {
                // Release what the broker still holds for the dead connection.
                let _ = stale.connection.close(320, "reconnecting".into()).await;
            }
            match self.open().await {
                Ok(l) => {
                    if self.is_closed() {
                        let _ = l.connection.close(200, "closed".into()).await;
                        return Err(Fail::Closed);
                    }
                    *lock(&self.live) = Some(l.clone());
                    return Ok(l);
                }
                Err(e) => {
                    if Instant::now() + backoff > deadline {
                        return Err(Fail::Unavailable(
                            format!(
                                "RabbitMQ at {} unavailable for {:?}: {e}",
                                self.location, self.config.reconnect_timeout
                            )
                            .into(),
                        ));
                    }
                    tracing::debug!(location = %self.location, error = %e, "reconnect failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    /// Opens the first connection, failing at once if the broker is not there.
    pub(crate) async fn connect_first(&self) -> Result<(), lapin::Error> {
        let live = self.open().await?;
        *lock(&self.live) = Some(live);
        Ok(())
    }

    /// Opens a connection, declares the exchanges, replays the topology this
    /// transport declared, and opens the publisher channels.
    pub(crate) async fn open(&self) -> Result<Arc<Live>, lapin::Error> {
        let props = ConnectionProperties::default().with_connection_name(LongString::from(
            self.config.connection_name.as_bytes().to_vec(),
        ));
        let connection = match &self.config.tls_ca_pem {
            None => Connection::connect_uri(self.uri.clone(), props).await?,
            Some(pem) => {
                let tls = lapin::tcp::OwnedTLSConfig {
                    identity: None,
                    cert_chain: Some(pem.clone()),
                };
                let runtime = lapin::runtime::default_runtime()?;
                Connection::connect_uri_with_config(self.uri.clone(), props, tls, runtime).await?
            }
        };
        let setup = connection.create_channel().await?;
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        setup
            .exchange_declare(
                ShortString::try_new(self.config.topic_exchange.as_str())
                    .map_err(|e| lapin_other(e.to_string()))?,
                ExchangeKind::Topic,
                durable,
                FieldTable::default(),
            )
            .await?;
        setup
            .exchange_declare(
                ShortString::try_new(self.config.dead_letter_exchange.as_str())
                    .map_err(|e| lapin_other(e.to_string()))?,
                ExchangeKind::Direct,
                durable,
                FieldTable::default(),
            )
            .await?;
        let generation = self.connections_opened.fetch_add(1, Ordering::SeqCst);
        if generation > 0 {
            self.replay(&connection).await;
        }
        let _ = setup.close(200, "setup done".into()).await;
        let mut publishers = Vec::with_capacity(self.config.publisher_channels.max(1));
        for _ in 0..self.config.publisher_channels.max(1) {
            let ch = connection.create_channel().await?;
            ch.confirm_select(ConfirmSelectOptions::default()).await?;
            publishers.push(ch);
        }
        let direct_replies = connection.create_channel().await?;
        Ok(Arc::new(Live {
            connection,
            publishers,
            next: AtomicUsize::new(0),
            direct_replies,
        }))
    }

    /// Re-declares queues, dead-letter queues, bindings and delay queues
    /// after a reconnect (a broker restart may have lost non-durable ones).
    async fn replay(&self, connection: &Connection) {
        let specs: Vec<QueueSpec> = lock(&self.specs).values().cloned().collect();
        let bindings: Vec<Binding> = lock(&self.bindings).iter().cloned().collect();
        let delays: Vec<DelayQueue> = lock(&self.delays)
            .values()
            .map(|d| d.queue.clone())
            .collect();
        for spec in specs {
            if let Err(e) = self.declare_spec_on(connection, &spec).await {
                tracing::warn!(queue = %spec.name, error = %e, "re-declaring after reconnect failed");
            }
        }
        for b in bindings {
            if let Err(e) = self.bind_on(connection, &b).await {
                tracing::warn!(queue = %b.queue, error = %e, "re-binding after reconnect failed");
            }
        }
        for d in delays {
            if let Err(e) = declare_delay_on(connection, &d).await {
                tracing::warn!(queue = %d.name, error = %e, "re-declaring a delay queue failed");
            }
        }
    }

    /// Declares the queue of `spec` and its dead-letter queue, bound to the
    /// dead-letter exchange, on a channel of its own (a failed declare
    /// closes its channel).
    pub(crate) async fn declare_spec_on(
        &self,
        connection: &Connection,
        spec: &QueueSpec,
    ) -> Result<(), lapin::Error> {
        let ch = connection.create_channel().await?;
        let exclusive = self.is_exclusive(&spec.name);
        let quorum = self.quorum() && spec.durable && !exclusive;
        let result = async {
            ch.queue_declare(
                short(spec.name.as_str())?,
                QueueDeclareOptions {
                    durable: spec.durable,
                    exclusive,
                    ..Default::default()
                },
                queue_arguments(spec, &self.config.dead_letter_exchange, quorum),
            )
            .await?;
            if let Some(dlq) = &spec.dead_letter {
                self.declare_dead_letter_on(&ch, dlq).await?;
            }
            Ok(())
        }
        .await;
        if ch.status().connected() {
            let _ = ch.close(200, "declared".into()).await;
        }
        result
    }

    async fn declare_dead_letter_on(
        &self,
        ch: &Channel,
        dlq: &QueueName,
    ) -> Result<(), lapin::Error> {
        let mut args = FieldTable::default();
        if self.quorum() {
            args.insert("x-queue-type".into(), crate::wire::str_value("quorum"));
        }
        ch.queue_declare(
            short(dlq.as_str())?,
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await?;
        ch.queue_bind(
            short(dlq.as_str())?,
            short(&self.config.dead_letter_exchange)?,
            short(dlq.as_str())?,
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
    }

    /// Declares a dead-letter queue bound to the dead-letter exchange.
    pub(crate) async fn declare_dead_letter_queue(
        &self,
        connection: &Connection,
        dlq: &QueueName,
    ) -> Result<(), lapin::Error> {
        let ch = connection.create_channel().await?;
        let result = self.declare_dead_letter_on(&ch, dlq).await;
        if ch.status().connected() {
            let _ = ch.close(200, "declared".into()).await;
        }
        if result.is_ok() {
            lock(&self.specs)
                .entry(dlq.clone())
                .or_insert_with(|| QueueSpec::dead_letter_queue(dlq.clone()));
        }
        result
    }

    pub(crate) async fn bind_on(
        &self,
        connection: &Connection,
        binding: &Binding,
    ) -> Result<(), lapin::Error> {
        let ch = connection.create_channel().await?;
        let result = ch
            .queue_bind(
                short(binding.queue.as_str())?,
                short(&self.config.topic_exchange)?,
                short(binding.pattern.as_str())?,
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await;
        if ch.status().connected() {
            let _ = ch.close(200, "bound".into()).await;
        }
        result
    }

    /// `(ready, consumers)` of a queue, or `None` if it does not exist.
    pub(crate) async fn passive(
        &self,
        connection: &Connection,
        queue: &str,
    ) -> Result<Option<(u32, u32)>, lapin::Error> {
        let ch = connection.create_channel().await?;
        let result = ch
            .queue_declare(
                short(queue)?,
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await;
        match result {
            Ok(q) => {
                let _ = ch.close(200, "checked".into()).await;
                Ok(Some((q.message_count(), q.consumer_count())))
            }
            Err(e) if reply_code(&e) == Some(NOT_FOUND) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Makes sure a delay queue exists, declaring it again if it was not
    /// declared recently (declaring resets its idle expiry).
    pub(crate) async fn ensure_delay(
        &self,
        live: &Live,
        queue: DelayQueue,
        target: Option<&QueueName>,
    ) -> Result<(), lapin::Error> {
        let fresh = lock(&self.delays)
            .get(&queue.name)
            .is_some_and(|d| d.declared.elapsed() < DELAY_REDECLARE);
        if !fresh {
            declare_delay_on(&live.connection, &queue).await?;
            if let Some(t) = target {
                lock(&self.delays_by_queue)
                    .entry(t.clone())
                    .or_default()
                    .insert(queue.name.clone());
            }
            lock(&self.delays).insert(
                queue.name.clone(),
                DelayEntry {
                    queue,
                    declared: Instant::now(),
                },
            );
        }
        Ok(())
    }

    /// Names of the delay queues in front of `queue`.
    pub(crate) fn delay_queues_of(&self, queue: &QueueName) -> Vec<String> {
        lock(&self.delays_by_queue)
            .get(queue)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }

    pub(crate) fn forget_delay_queue(&self, queue: &QueueName, name: &str) {
        if let Some(set) = lock(&self.delays_by_queue).get_mut(queue) {
            set.remove(name);
        }
        lock(&self.delays).remove(name);
    }

    /// The spec registered for `queue`.
    pub(crate) fn registered(&self, queue: &QueueName) -> Option<QueueSpec> {
        lock(&self.specs).get(queue).cloned()
    }

    /// The spec of `queue`: as declared here, or as busway would declare it.
    pub(crate) fn spec_for(&self, queue: &QueueName) -> QueueSpec {
        self.registered(queue).unwrap_or_else(|| {
            if queue.as_str().starts_with("dead_letter_") {
                QueueSpec::dead_letter_queue(queue.clone())
            } else {
                QueueSpec::new(queue.clone())
            }
        })
    }

    pub(crate) fn register(&self, spec: &QueueSpec) {
        let mut specs = lock(&self.specs);
        specs.insert(spec.name.clone(), spec.clone());
        if let Some(dlq) = spec.dead_letter_spec() {
            specs.entry(dlq.name.clone()).or_insert(dlq);
        }
    }

    /// Marks `queue` as temporary: declared exclusive from now on.
    pub(crate) fn mark_exclusive(&self, queue: &QueueName) {
        lock(&self.exclusive).insert(queue.clone());
    }

    /// Whether durable queues are declared as quorum queues.
    pub(crate) fn quorum(&self) -> bool {
        self.config.queue_type == crate::QueueType::Quorum
    }

    fn is_exclusive(&self, queue: &QueueName) -> bool {
        lock(&self.exclusive).contains(queue)
    }

    pub(crate) fn register_binding(&self, binding: &Binding) {
        lock(&self.bindings).insert(binding.clone());
    }

    /// The in-flight counter of `queue`.
    pub(crate) fn in_flight(&self, queue: &QueueName) -> Arc<AtomicU64> {
        lock(&self.in_flight)
            .entry(queue.clone())
            .or_default()
            .clone()
    }

    /// Closes the connection; the broker requeues unsettled deliveries.
    pub(crate) async fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        let _ = self.closed_tx.send(true);
        let _guard = self.reconnecting.lock().await;
        let live = lock(&self.live).take();
        if let Some(live) = live {
            let _ = live.connection.close(200, "closed by busway".into()).await;
        }
    }
}

async fn declare_delay_on(connection: &Connection, queue: &DelayQueue) -> Result<(), lapin::Error> {
    let ch = connection.create_channel().await?;
    let result = ch
        .queue_declare(
            short(&queue.name)?,
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            queue.arguments(),
        )
        .await;
    if ch.status().connected() {
        let _ = ch.close(200, "declared".into()).await;
    }
    result.map(|_| ())
}

pub(crate) fn lapin_other(message: String) -> lapin::Error {
    lapin::Error::from(std::io::Error::new(
        std::io::ErrorKind::InvalidInput,
        message,
    ))
}

/// A short string from a name busway already validated (at most 255 bytes).
pub(crate) fn short(s: &str) -> Result<ShortString, lapin::Error> {
    ShortString::try_new(s).map_err(|_| lapin_other(format!("name `{s}` is longer than 255 bytes")))
}
