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
//! - **Quorum queues** are opt-in: see below.
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
//!
//! # Quorum queues
//!
//! For replicated deployments, [`RabbitMqConfig::with_queue_type`] with
//! [`QueueType::Quorum`] declares every queue spec, and its dead-letter
//! queue, as a quorum queue (`x-queue-type: quorum`). Temporary queues (RPC
//! reply queues) stay classic and exclusive, and so do the short-lived delay
//! queues (`busway.delay.…`): a message waiting out a delay is not
//! replicated until it is back in its quorum queue.
//!
//! - `max_attempts` becomes the broker's `x-delivery-limit` as well as
//!   busway's own count. The broker counts every return of a message
//!   (`x-delivery-count`), so a handler that keeps crashing sees attempts
//!   1, 2, 3, … and the message is dead-lettered by busway with the reason,
//!   origin and attempt count on the delivery after the last allowed one.
//!   The broker's limit, one return later, catches consumers that are not
//!   busway; its dead letters read `max attempts exceeded (delivery_limit…)`.
//! - Quorum queues are always durable, and on RabbitMQ 3.x have no
//!   priorities: a spec with `durable: false` or a `max_priority` is refused
//!   with [`DeclareError::InvalidSpec`] naming the reason, and
//!   [`Capabilities::priority`] is [`Support::Unsupported`]. (The reference
//!   RPC queue `rpc_{service}` is non-durable; serve RPC through a transport
//!   with classic queues.)
//! - Declaring a queue that already exists with the other type fails with an
//!   error naming both types.
//!
//! ```no_run
//! use busway_core::{QueueName, QueueSpec, Support, Transport};
//! use busway_rabbitmq::{QueueType, RabbitMqConfig, RabbitMqTransport};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let config = RabbitMqConfig::default().with_queue_type(QueueType::Quorum);
//! let transport =
//!     RabbitMqTransport::connect_with("amqp://guest:guest@127.0.0.1:5672/%2f", config).await?;
//! assert_eq!(transport.capabilities().priority, Support::Unsupported);
//! // A quorum queue with `x-delivery-limit: 5`, dead-lettering to the quorum
//! // queue `dead_letter_orders`.
//! let queue = QueueName::new("orders")?;
//! transport
//!     .declare_queue(&QueueSpec::new(queue).with_max_attempts(5))
//!     .await?;
//! // Priorities need classic queues.
//! let refused = transport
//!     .declare_queue(&QueueSpec::new(QueueName::new("urgent")?).with_max_priority(9))
//!     .await;
//! assert!(matches!(refused, Err(busway_core::DeclareError::InvalidSpec { .. })));
//! # Ok(())
//! # }
//! ```

mod config;
mod connection;
mod consumer;
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

use connection::{reply_code, reply_text, Fail, Inner, NOT_FOUND, PRECONDITION_FAILED};
use topology::{existing_from_reply, queue_type_conflict, type_refusal};

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
    /// Connects with the default [`RabbitMqConfig`].
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), busway_core::ConnectError> {
    /// let transport = busway_rabbitmq::RabbitMqTransport::connect("amqp://guest:guest@127.0.0.1:5672/%2f").await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn connect(url: &str) -> Result<Self, ConnectError> {
        Self::connect_with(url, RabbitMqConfig::default()).await
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
        inner
            .connect_first()
            .await
            .map_err(|e| ConnectError::Backend {
                backend: "rabbitmq",
                location: inner.location.clone(),
                retryable: e.is_io_error() || reply_code(&e).is_none(),
                source: Box::new(e),
            })?;
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
            priority: match self.inner.config.queue_type {
                QueueType::Classic => Support::Native,
                QueueType::Quorum => Support::Unsupported,
            },
            ttl: Support::Native,
            dead_letter: Support::Emulated,
            ordering: Support::Native,
            persistence: Support::Native,
            multi_process: Support::Native,
            max_payload_bytes: self.inner.config.max_payload_bytes,
        }
    }

    async fn declare_queue(&self, spec: &QueueSpec) -> Result<(), DeclareError> {
        spec.validate()?;
        let queue_type = self.inner.queue_type_for(&spec.name);
        if let Some(reason) = type_refusal(spec, queue_type) {
            return Err(DeclareError::InvalidSpec {
                queue: spec.name.clone(),
                reason,
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
                if let Some(message) = queue_type_conflict(spec, queue_type, &text) {
                    return Err(DeclareError::Backend {
                        source: message.into(),
                        retryable: false,
                    });
                }
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

    /// An exclusive queue (as the reference RPC clients declare their reply
    /// queues): only this transport's connection may use it, the broker
    /// deletes it when the connection closes, and a reconnect declares it
    /// again, empty.
    async fn declare_temporary_queue(&self, name: &QueueName) -> Result<(), DeclareError> {
        self.inner.mark_exclusive(name);
        self.declare_queue(&QueueSpec::temporary(name.clone()))
            .await
    }

    async fn bind(&self, binding: &Binding) -> Result<(), DeclareError> {
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

    async fn publish_batch(
        &self,
        batch: Vec<Publish>,
        durability: Durability,
    ) -> Result<(), PublishError> {
        self.inner.publish_batch(batch, durability).await
    }

    async fn consume(
        &self,
        queue: &QueueName,
        options: ConsumeOptions,
    ) -> Result<DeliveryStream, busway_core::ConsumeError> {
        consumer::start(self.inner.clone(), queue.clone(), options.prefetch).await
    }

    async fn queue_stats(&self, queue: &QueueName) -> Result<QueueStats, StatsError> {
        let stats_error = |f: Fail| match f {
            Fail::Closed => StatsError::Closed,
            f => StatsError::Backend {
                retryable: f.retryable(),
                source: f.into_source(),
            },
        };
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
        let mut consumers = u64::from(consumers);
        if self.inner.queue_type_for(queue) == QueueType::Quorum {
            // A quorum queue still counts a cancelled consumer until what it
            // was delivered is settled; leave out the ones cancelled here.
            let cancelled = self.inner.cancelled(queue).load(Ordering::SeqCst);
            consumers = consumers.saturating_sub(cancelled);
        }
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
            consumers,
            dead_lettered,
        })
    }

    async fn close(&self) {
        self.inner.close().await;
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
