//! The RabbitMQ transport for busway, built on lapin, speaking the reference
//! wire format so services written with the reference (pika) code and busway
//! services share exchanges and queues.
//!
//! - **Topics** go to the durable topic exchange `event_bus`; a subscription
//!   group is a durable queue bound with its patterns. Direct-to-queue
//!   messages go through the default exchange.
//! - **Queues** are declared with the reference arguments: `x-message-ttl`,
//!   `x-dead-letter-exchange: dead_letter_exchange`,
//!   `x-dead-letter-routing-key: dead_letter_{queue}`, and opt-in
//!   `x-max-priority` and `x-max-length` (+ `x-overflow: reject-publish`).
//!   The `dead_letter_exchange` (direct, durable) and a bound
//!   `dead_letter_{queue}` queue are declared too, so dead letters are kept.
//! - **Publishing** waits for publisher confirms, pipelined over a pool of
//!   confirm-mode channels; a broker nack or an unroutable direct message is
//!   an error.
//! - **Metadata** (id, kind as AMQP `type`, correlation id, reply-to,
//!   timestamp, priority, expiration, attempt, headers) rides in AMQP
//!   properties and headers; bodies stay exactly what the application wrote.
//! - **Emulated**: attempt counting (a nack republishes with the next attempt
//!   and acks the original), `nack(retry_after)` and delayed publishing
//!   through TTL + dead-letter delay queues (`busway.delay.{ms}.…`, expiring
//!   when idle; no plugin needed), max attempts → dead-letter queue with
//!   reason and origin headers. Messages the broker dead-letters itself (TTL
//!   expiry, length limit) are described with the same headers when consumed.
//! - **Recovery**: a lost connection is reopened on the next use, the
//!   topology declared through this transport is declared again, and
//!   consumers subscribe again.
//!
//! ```no_run
//! use busway_core::{ConsumeOptions, Message, Publish, QueueName, QueueSpec, Transport};
//! use busway_rabbitmq::RabbitMqTransport;
//! use futures::StreamExt;
//! use std::time::Duration;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let transport = RabbitMqTransport::connect("amqp://guest:guest@127.0.0.1:5672/%2f").await?;
//! // Exactly the reference `task_queue`.
//! let queue = QueueName::new("task_queue")?;
//! transport
//!     .declare_queue(&QueueSpec::new(queue.clone()).with_message_ttl(Duration::from_secs(86_400)))
//!     .await?;
//! transport.publish(Publish::to_queue(queue.clone(), Message::new("send_email", "{}"))).await?;
//! let mut deliveries = transport.consume(&queue, ConsumeOptions::with_prefetch(10)).await?;
//! if let Some(delivery) = deliveries.next().await {
//!     delivery?.ack().await?;
//! }
//! # Ok(())
//! # }
//! ```

mod config;
mod connection;
mod consumer;
mod direct_reply;
mod management;
mod publish;
mod topology;
mod wire;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use async_trait::async_trait;
use busway_core::{
    Binding, Capabilities, ConnectError, ConsumeOptions, DeclareError, DeliveryStream, Durability,
    Publish, PublishError, QueueName, QueueSpec, QueueStats, StatsError, Support, Transport,
};
use lapin::uri::AMQPUri;

pub use config::{QueueType, RabbitMqConfig};
pub use management::ManagementQueue;

use connection::{reply_code, reply_text, Fail, Inner, NOT_FOUND, PRECONDITION_FAILED};
use topology::existing_from_reply;

/// A [`Transport`] on RabbitMQ. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct RabbitMqTransport {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RabbitMqTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitMqTransport")
            .field("location", &self.inner.location)
            .finish_non_exhaustive()
    }
}

impl RabbitMqTransport {
    /// Connects with the default [`RabbitMqConfig`] and the settings in the
    /// URL's query string ([`RabbitMqConfig::with_url_settings`]:
    /// `queue_type=quorum`, `tls_ca=PATH`, `topic_exchange=NAME`).
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), busway_core::ConnectError> {
    /// let transport = busway_rabbitmq::RabbitMqTransport::connect("amqp://guest:guest@127.0.0.1:5672/%2f").await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn connect(url: &str) -> Result<Self, ConnectError> {
        let config = RabbitMqConfig::default()
            .with_url_settings(url)
            .map_err(|reason| ConnectError::InvalidUrl {
                url: busway_core::redact_url(url),
                reason,
            })?;
        Self::connect_with(url, config).await
    }

    /// Connects to the broker at `url` (`amqp://` or `amqps://`). Errors
    /// name the host and the cause, never the password.
    pub async fn connect_with(url: &str, config: RabbitMqConfig) -> Result<Self, ConnectError> {
        let uri: AMQPUri = url
            .parse()
            .map_err(|reason: String| ConnectError::InvalidUrl {
                url: busway_core::redact_url(url),
                reason,
            })?;
        let inner = Arc::new(Inner::new(uri, config));
        let limit = inner.config.operation_timeout;
        match tokio::time::timeout(limit, inner.connect_first()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                return Err(ConnectError::Backend {
                    backend: "rabbitmq",
                    location: inner.location.clone(),
                    retryable: e.is_io_error() || reply_code(&e).is_none(),
                    source: Box::new(e),
                })
            }
            Err(_) => {
                return Err(ConnectError::Backend {
                    backend: "rabbitmq",
                    location: inner.location.clone(),
                    retryable: true,
                    source: format!("no answer from the broker within {limit:?}").into(),
                })
            }
        }
        Ok(Self { inner })
    }

    /// How many connections this transport has opened (1 until the first
    /// recovery); useful to observe reconnects.
    pub fn connections_opened(&self) -> u64 {
        self.inner.connections_opened.load(Ordering::SeqCst)
    }

    /// The configuration in use.
    pub fn config(&self) -> &RabbitMqConfig {
        &self.inner.config
    }
}

fn stats_error(f: Fail) -> StatsError {
    match f {
        Fail::Closed => StatsError::Closed,
        f => StatsError::Backend {
            retryable: f.retryable(),
            source: f.into_source(),
        },
    }
}

fn consume_error(f: Fail) -> busway_core::ConsumeError {
    match f {
        Fail::Closed => busway_core::ConsumeError::Closed,
        f => busway_core::ConsumeError::Backend {
            retryable: f.retryable(),
            source: f.into_source(),
        },
    }
}

fn declare_error(f: Fail) -> DeclareError {
    match f {
        Fail::Closed => DeclareError::Closed,
        f => DeclareError::Backend {
            retryable: f.retryable(),
            source: f.into_source(),
        },
    }
}

#[async_trait]
impl Transport for RabbitMqTransport {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            delay: Support::Emulated,
            priority: Support::Native,
            ttl: Support::Native,
            dead_letter: Support::Emulated,
            ordering: Support::Native,
            persistence: Support::Native,
            multi_process: Support::Native,
            max_payload_bytes: self.inner.config.max_payload_bytes,
        }
    }

    async fn declare_queue(&self, spec: &QueueSpec) -> Result<(), DeclareError> {
        self.within(self.declare_queue_now(spec))
            .await
            .unwrap_or_else(|e| Err(declare_error(e)))
    }

    /// An exclusive queue (as the reference RPC clients declare their reply
    /// queues): only this transport's connection may use it, the broker
    /// deletes it when the connection closes, and a reconnect declares it
    /// again, empty.
    async fn declare_temporary_queue(&self, name: &QueueName) -> Result<(), DeclareError> {
        self.inner.mark_exclusive(name);
        self.declare_queue(&QueueSpec::temporary(name.clone()))
            .await
    }

    /// RabbitMQ's direct reply-to: requests carry `reply_to:
    /// amq.rabbitmq.reply-to` and are published (with confirms) on a
    /// channel that consumes that pseudo-queue without acks, so replies need
    /// no queue at all.
    async fn direct_replies(
        &self,
    ) -> Result<Option<busway_core::DirectReplies>, busway_core::ConsumeError> {
        self.within(direct_reply::open(self.inner.clone()))
            .await
            .unwrap_or_else(|e| Err(consume_error(e)))
            .map(Some)
    }

    async fn bind(&self, binding: &Binding) -> Result<(), DeclareError> {
        self.within(self.bind_now(binding))
            .await
            .unwrap_or_else(|e| Err(declare_error(e)))
    }

    async fn publish_batch(
        &self,
        batch: Vec<Publish>,
        durability: Durability,
    ) -> Result<(), PublishError> {
        self.within(self.inner.publish_batch(batch, durability))
            .await
            .unwrap_or_else(|e| Err(publish::publish_error(e)))
    }

    async fn consume(
        &self,
        queue: &QueueName,
        options: ConsumeOptions,
    ) -> Result<DeliveryStream, busway_core::ConsumeError> {
        self.within(consumer::start(
            self.inner.clone(),
            queue.clone(),
            options.prefetch,
        ))
        .await
        .unwrap_or_else(|e| Err(consume_error(e)))
    }

    async fn queue_stats(&self, queue: &QueueName) -> Result<QueueStats, StatsError> {
        self.within(self.queue_stats_now(queue))
            .await
            .unwrap_or_else(|e| Err(stats_error(e)))
    }

    /// Lists through the management HTTP API (see [`management_queues`](RabbitMqTransport::management_queues)).
    async fn list_queues(&self) -> Result<Vec<QueueName>, StatsError> {
        Ok(self
            .management_queues()
            .await?
            .into_iter()
            .map(|q| q.name)
            .collect())
    }

    async fn close(&self) {
        let _ = self.within(self.inner.close()).await;
    }
}

impl RabbitMqTransport {
    /// The queues of this vhost with the broker's own counts, read from the
    /// management HTTP API (AMQP 0-9-1 cannot list queues): sorted by name,
    /// without busway's delay queues, server-named (`amq.…`) and exclusive
    /// queues. Unlike [`Transport::queue_stats`], `unacknowledged` and
    /// `consumers` count every connection; the broker refreshes these counts
    /// every few seconds.
    ///
    /// The API is at [`RabbitMqConfig::management_url`], by default
    /// `http://{amqp host}:15672` with the AMQP credentials. When it cannot
    /// be reached the error says how to enable it
    /// (`rabbitmq-plugins enable rabbitmq_management`).
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// let transport = busway_rabbitmq::RabbitMqTransport::connect("amqp://guest:guest@127.0.0.1:5672/%2f").await?;
    /// for queue in transport.management_queues().await? {
    ///     println!("{}: {} ready, {} unacked", queue.name, queue.ready, queue.unacknowledged);
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn management_queues(&self) -> Result<Vec<ManagementQueue>, StatsError> {
        if self.inner.is_closed() {
            return Err(StatsError::Closed);
        }
        management::list(self.inner.uri(), &self.inner.config).await
    }

    /// Runs one operation within [`RabbitMqConfig::operation_timeout`].
    async fn within<T>(&self, operation: impl std::future::Future<Output = T>) -> Result<T, Fail> {
        let limit = self.inner.config.operation_timeout;
        tokio::time::timeout(limit, operation).await.map_err(|_| {
            Fail::Unavailable(
                format!(
                    "RabbitMQ at {} did not answer within {limit:?}",
                    self.inner.location
                )
                .into(),
            )
        })
    }

    async fn declare_queue_now(&self, spec: &QueueSpec) -> Result<(), DeclareError> {
        spec.validate()?;
        if self.inner.quorum() && spec.durable && spec.max_priority.is_some() {
            return Err(DeclareError::InvalidSpec {
                queue: spec.name.clone(),
                reason: "RabbitMQ quorum queues have no priorities; declare this queue \
                         without max_priority or connect with classic queues"
                    .into(),
            });
        }
        if self.inner.is_closed() {
            return Err(DeclareError::Closed);
        }
        if let Some(existing) = self.inner.registered(&spec.name) {
            existing.check_redeclare(spec)?;
        }
        let live = self.inner.live().await.map_err(declare_error)?;
        match self.inner.declare_spec_on(&live.connection, spec).await {
            Ok(()) => {
                self.inner.register(spec);
                Ok(())
            }
            Err(e) if reply_code(&e) == Some(PRECONDITION_FAILED) => {
                let text = reply_text(&e).unwrap_or_default();
                match existing_from_reply(spec, &text) {
                    Some(existing) => Err(DeclareError::Conflict {
                        existing: Box::new(existing),
                        requested: Box::new(spec.clone()),
                    }),
                    None => Err(DeclareError::Backend {
                        source: format!(
                            "queue `{}` exists with other arguments than requested ({spec}): {text}",
                            spec.name
                        )
                        .into(),
                        retryable: false,
                    }),
                }
            }
            Err(e) => Err(declare_error(e.into())),
        }
    }

    async fn bind_now(&self, binding: &Binding) -> Result<(), DeclareError> {
        if self.inner.is_closed() {
            return Err(DeclareError::Closed);
        }
        let live = self.inner.live().await.map_err(declare_error)?;
        match self.inner.bind_on(&live.connection, binding).await {
            Ok(()) => {
                self.inner.register_binding(binding);
                Ok(())
            }
            Err(e) if reply_code(&e) == Some(NOT_FOUND) => {
                Err(DeclareError::QueueNotFound(binding.queue.clone()))
            }
            Err(e) => Err(declare_error(e.into())),
        }
    }

    async fn queue_stats_now(&self, queue: &QueueName) -> Result<QueueStats, StatsError> {
        let live = self.inner.live().await.map_err(stats_error)?;
        let conn = &live.connection;
        let passive = |name: String| async move {
            self.inner
                .passive(conn, &name)
                .await
                .map_err(|e| stats_error(e.into()))
        };
        let Some((ready, consumers)) = passive(queue.as_str().to_owned()).await? else {
            return Err(StatsError::QueueNotFound(queue.clone()));
        };
        let mut delayed = 0u64;
        for name in self.inner.delay_queues_of(queue) {
            match passive(name.clone()).await? {
                Some((n, _)) => delayed += u64::from(n),
                None => self.inner.forget_delay_queue(queue, &name),
            }
        }
        let dead_lettered = match self.inner.spec_for(queue).dead_letter {
            Some(dlq) => passive(dlq.as_str().to_owned())
                .await?
                .map_or(0, |(n, _)| u64::from(n)),
            None => 0,
        };
        Ok(QueueStats {
            ready: u64::from(ready),
            delayed,
            in_flight: self.inner.in_flight(queue).load(Ordering::SeqCst),
            consumers: u64::from(consumers),
            dead_lettered,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transport_is_send_and_sync() {
        fn check<T: Send + Sync + 'static>() {}
        check::<RabbitMqTransport>();
    }

    #[tokio::test]
    async fn unreachable_broker_names_host_not_password() {
        let err = RabbitMqTransport::connect("amqp://user:hunter2@127.0.0.1:1/%2f")
            .await
            .err()
            .map(|e| format!("{e} {:?}", std::error::Error::source(&e)));
        let err = err.unwrap_or_default();
        assert!(err.contains("127.0.0.1:1"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
    }
}
