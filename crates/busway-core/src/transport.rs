//! The transport trait every backend implements.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;

use crate::address::{Destination, QueueName, Topic};
use crate::delivery::Delivery;
use crate::error::{ConsumeError, DeclareError, PublishError, StatsError};
use crate::message::Message;
use crate::topology::{Binding, QueueSpec};

/// The default largest payload a transport accepts: 4 MiB.
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 4 * 1024 * 1024;

/// One message to publish, with where it goes and when it becomes visible.
///
/// ```
/// use busway_core::{Message, Publish, QueueName};
/// use std::time::Duration;
///
/// let publish = Publish::to_queue(QueueName::new("task_queue")?, Message::new("ping", "hi"))
///     .with_delay(Duration::from_secs(5));
/// assert_eq!(publish.delay, Some(Duration::from_secs(5)));
/// # Ok::<(), busway_core::NameError>(())
/// ```
#[derive(Clone, Debug)]
pub struct Publish {
    /// Where the message goes.
    pub destination: Destination,
    /// The message.
    pub message: Message,
    /// Deliver no earlier than this long after publishing.
    pub delay: Option<Duration>,
}

impl Publish {
    /// Publishes `message` to `topic`.
    pub fn to_topic(topic: Topic, message: Message) -> Self {
        Self {
            destination: Destination::Topic(topic),
            message,
            delay: None,
        }
    }
    /// Sends `message` straight to `queue`.
    pub fn to_queue(queue: QueueName, message: Message) -> Self {
        Self {
            destination: Destination::Queue(queue),
            message,
            delay: None,
        }
    }
    /// Delays delivery by `delay`.
    pub fn with_delay(mut self, delay: Duration) -> Self {
        self.delay = Some(delay);
        self
    }
}

/// When a publish call returns.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Durability {
    /// Once the backend has made the message durable (fsync, commit, confirm).
    #[default]
    Durable,
    /// As soon as the backend has accepted the message; it is made durable
    /// shortly after. Faster, but a crash can lose what was just published.
    Buffered,
}

/// Options for a consumer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConsumeOptions {
    /// How many unsettled deliveries this consumer may hold at once (≥ 1).
    pub prefetch: u16,
}

impl Default for ConsumeOptions {
    fn default() -> Self {
        Self { prefetch: 32 }
    }
}

impl ConsumeOptions {
    /// Options with the given prefetch.
    pub fn with_prefetch(prefetch: u16) -> Self {
        Self { prefetch }
    }
}

/// The deliveries of one consumer. Ends when the transport is closed.
pub type DeliveryStream = BoxStream<'static, Result<Delivery, ConsumeError>>;

/// How a backend provides a feature.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Support {
    /// The backend does it itself.
    Native,
    /// busway emulates it on top of the backend (see the backend's docs for how).
    Emulated,
    /// Not available on this backend.
    Unsupported,
}

impl Support {
    /// Native or emulated.
    pub fn is_supported(self) -> bool {
        self != Support::Unsupported
    }
}

/// What a transport offers and how.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// Delayed publish and `nack(retry_after)`.
    pub delay: Support,
    /// Priority queues.
    pub priority: Support,
    /// Per-queue and per-message TTL.
    pub ttl: Support,
    /// Max attempts and dead-letter queues.
    pub dead_letter: Support,
    /// Messages of equal priority reach a single consumer in publish order.
    pub ordering: Support,
    /// Messages survive a restart of the process and of the machine.
    pub persistence: Support,
    /// Several processes can share the same queues.
    pub multi_process: Support,
    /// Largest payload accepted.
    pub max_payload_bytes: usize,
}

/// A snapshot of a queue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Messages waiting to be delivered now.
    pub ready: u64,
    /// Messages waiting for their delay or retry backoff to pass.
    pub delayed: u64,
    /// Messages delivered and not yet settled.
    pub in_flight: u64,
    /// Consumers attached.
    pub consumers: u64,
    /// Messages in this queue's dead-letter queue.
    pub dead_lettered: u64,
}

/// Where requests are sent when their replies come straight back to the
/// sender, with no reply queue: RabbitMQ's direct reply-to. Obtained from
/// [`Transport::direct_replies`] together with the stream of replies.
#[async_trait]
pub trait DirectReplyChannel: Send + Sync + 'static {
    /// The `reply_to` address the requests sent here must carry.
    fn reply_to(&self) -> &str;

    /// Sends a request whose `reply_to` is [`reply_to`](Self::reply_to);
    /// its replies arrive on the [`DirectReplies::replies`] stream. Returns
    /// once the backend accepted the request, with
    /// [`PublishError::QueueNotFound`] when nothing consumes its queue.
    async fn send(&self, publish: Publish) -> Result<(), PublishError>;
}

/// A [`DirectReplyChannel`] and the replies that come back on it.
///
/// Replies are acknowledged by the backend as they arrive (there is no
/// queue to return them to). Replies to requests sent before the
/// connection was lost are lost with it; the channel reopens on the next
/// send. The stream ends when the transport is closed.
pub struct DirectReplies {
    /// Where requests go.
    pub channel: Arc<dyn DirectReplyChannel>,
    /// The replies, in arrival order.
    pub replies: BoxStream<'static, Message>,
}

impl std::fmt::Debug for DirectReplies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectReplies")
            .field("reply_to", &self.channel.reply_to())
            .finish_non_exhaustive()
    }
}

/// A message transport: the one trait every backend implements.
///
/// It is dyn-compatible, so applications hold an `Arc<dyn Transport>` and
/// choose the backend by URL at run time.
///
/// ```
/// use busway_core::Transport;
/// fn assert_object_safe(_: &dyn Transport) {}
/// ```
#[async_trait]
pub trait Transport: Send + Sync + 'static {
    /// What this transport offers and how.
    fn capabilities(&self) -> Capabilities;

    /// Declares a queue (and its dead-letter queue). Idempotent for the same spec.
    async fn declare_queue(&self, spec: &QueueSpec) -> Result<(), DeclareError>;

    /// Declares a temporary queue for this transport's own use, such as the
    /// reply queue of an RPC client: not durable, no dead-letter queue, and
    /// gone when the transport goes where the backend can arrange it.
    ///
    /// The provided implementation declares
    /// [`QueueSpec::temporary`]`(name)`, which suits in-process backends.
    /// Brokers override it to tie the queue to the connection (RabbitMQ: an
    /// exclusive queue, deleted with its connection and declared again on
    /// reconnect). Backends that can do neither leave an empty queue behind.
    ///
    /// ```
    /// use busway_core::{QueueName, QueueSpec};
    /// let spec = QueueSpec::temporary(QueueName::new("rpc_reply_0f3a")?);
    /// assert!(!spec.durable && spec.dead_letter.is_none());
    /// # Ok::<(), busway_core::NameError>(())
    /// ```
    async fn declare_temporary_queue(&self, name: &QueueName) -> Result<(), DeclareError> {
        self.declare_queue(&QueueSpec::temporary(name.clone()))
            .await
    }

    /// Opens a [`DirectReplyChannel`] where the backend has one (RabbitMQ's
    /// `amq.rabbitmq.reply-to`): requests sent on it get their replies
    /// without a reply queue. `Ok(None)` (the provided implementation) means
    /// callers use a [temporary queue](Self::declare_temporary_queue) instead.
    ///
    /// ```
    /// # async fn run(transport: &dyn busway_core::Transport) -> Result<(), busway_core::ConsumeError> {
    /// match transport.direct_replies().await? {
    ///     Some(direct) => println!("replies come back to {}", direct.channel.reply_to()),
    ///     None => println!("declare a reply queue"),
    /// }
    /// # Ok(())
    /// # }
    /// ```
    async fn direct_replies(&self) -> Result<Option<DirectReplies>, ConsumeError> {
        Ok(None)
    }

    /// Binds a queue to a topic pattern. Idempotent.
    async fn bind(&self, binding: &Binding) -> Result<(), DeclareError>;

    /// Publishes a batch. Returns when every message is durable (or, with
    /// [`Durability::Buffered`], accepted). A batch is all-or-nothing where the
    /// backend allows it.
    async fn publish_batch(
        &self,
        batch: Vec<Publish>,
        durability: Durability,
    ) -> Result<(), PublishError>;

    /// Publishes one message and returns when it is durable.
    async fn publish(&self, publish: Publish) -> Result<(), PublishError> {
        self.publish_batch(vec![publish], Durability::Durable).await
    }

    /// Starts a consumer on `queue`.
    async fn consume(
        &self,
        queue: &QueueName,
        options: ConsumeOptions,
    ) -> Result<DeliveryStream, ConsumeError>;

    /// A snapshot of a queue's counts.
    async fn queue_stats(&self, queue: &QueueName) -> Result<QueueStats, StatsError>;

    /// The queues that exist on the backend, sorted by name: every queue
    /// declared by any process sharing it, dead-letter and temporary queues
    /// included, the backend's own internal queues (such as RabbitMQ's delay
    /// queues) left out. Read their counts with [`queue_stats`](Self::queue_stats).
    ///
    /// The provided implementation answers [`StatsError::Unsupported`].
    ///
    /// ```
    /// # async fn run(transport: &dyn busway_core::Transport) -> Result<(), busway_core::StatsError> {
    /// for queue in transport.list_queues().await? {
    ///     let stats = transport.queue_stats(&queue).await?;
    ///     println!("{queue}: {} ready", stats.ready);
    /// }
    /// # Ok(())
    /// # }
    /// ```
    async fn list_queues(&self) -> Result<Vec<QueueName>, StatsError> {
        Err(StatsError::Unsupported(
            "this backend cannot list its queues".into(),
        ))
    }

    /// Stops consumers and returns their unsettled deliveries to their queues.
    async fn close(&self);
}

impl Publish {
    /// Checks the payload size against `max_payload_bytes` (for backends).
    pub fn check_payload(&self, max_payload_bytes: usize) -> Result<(), PublishError> {
        let size = self.message.payload.len();
        if size > max_payload_bytes {
            return Err(PublishError::PayloadTooLarge {
                size,
                max: max_payload_bytes,
            });
        }
        Ok(())
    }
}
