//! The NATS JetStream transport for busway (`nats://`), built on async-nats.
//!
//! # How busway maps onto JetStream
//!
//! Every stream name starts with the configured prefix (`?prefix=` in the
//! URL, default `busway`), and every subject with `{prefix}.`.
//!
//! - **Queues** are streams with **work-queue retention**
//!   (`{prefix}_{queue}`, subjects `{prefix}.q.{queue}.*`): a message is
//!   removed once acknowledged, so the stream holds exactly what is ready,
//!   in flight or delayed. Each priority level has its own subject
//!   (`….p0`…`….p9`) and its own durable pull consumer (`p0`…`p9`), so a
//!   queue is shared by every process that consumes it. The queue's spec
//!   is kept as JSON in the stream's description: a declare with the same
//!   spec is a no-op, a different one is a
//!   [`DeclareError::Conflict`](busway_core::DeclareError::Conflict) naming
//!   both. `max_length` is the stream's `max_msgs` with `discard: new`.
//! - **Topics** are routed by busway, not by NATS subjects: a binding is a
//!   subject in the `{prefix}-bindings` stream, and a publish to a topic is
//!   stored in every queue whose pattern matches, with AMQP semantics (`*`
//!   one word, `#` zero or more words; NATS's `>` needs at least one and
//!   JetStream refuses streams with overlapping subjects, so queues cannot
//!   listen on topic subjects themselves).
//! - **Publishing** waits for JetStream's acknowledgement of every message
//!   of the batch ([`Durability::Durable`](busway_core::Durability)); with
//!   `Durability::Buffered` it returns once the messages are flushed to the
//!   server. A batch is not atomic: a failure can leave its first messages
//!   stored.
//! - **Settling**: an ack is an acknowledgement the server confirms
//!   (`+ACK` as a request). A nack stores a copy at the end of the queue
//!   with the attempts counted in the `Busway-Attempts` header, then acks
//!   the delivery; a dead letter stores the message, with the reason and
//!   origin in its headers, in the dead-letter queue, then acks. Between
//!   the two steps a crash leaves a duplicate, never a loss. The attempt of
//!   a delivery is `Busway-Attempts` plus JetStream's delivery count, so
//!   redeliveries after a crash (the ack wait expired) count too; max
//!   attempts are enforced by busway, the consumers' `max_deliver` is
//!   unlimited.
//! - **Delays** (delayed publish, `nack(retry_after)`) are emulated: the
//!   message goes to the queue's `….delayed` subject with its due time in
//!   a header; a scheduler beside every consumer pulls it from the
//!   `delayed` consumer and holds it back with a delayed `-NAK` until due,
//!   then stores it in its level. Delays progress while the queue has a
//!   consumer.
//! - **Priorities** are emulated: consumers of a priority queue poll the
//!   levels from the highest down, so higher priorities overtake lower
//!   ones and each level stays in publish order; when every level is empty
//!   they wait for a publish to the queue's subjects.
//! - **TTL** (queue or message) is checked when a message is pulled:
//!   expired messages are dead-lettered as `expired`, never delivered.
//! - **Crashed consumers**: deliveries unsettled for the ack wait
//!   ([`NatsConfig::ack_wait`], 30 s) are delivered again by the server;
//!   a live transport renews its deliveries (`+WPI`) every third of it.
//! - **Statistics** come from the consumers' `num_pending` (ready) and
//!   `num_ack_pending` (in flight), the `delayed` consumer (delayed), the
//!   dead-letter stream's size, and a registration per live consumer in
//!   the `{prefix}-live` stream (15 s without a heartbeat and it is gone).
//!
//! Streams are stored on file (`durable` queues) or in memory (temporary
//! queues, which [`Transport::close`](busway_core::Transport::close)
//! deletes).
//!
//! # Server versions
//!
//! Tested with nats-server 2.9. The client is async-nats without its
//! `server_2_10`… features, which make it expect replies only newer
//! servers send.
//!
//! # Recovery
//!
//! The client reconnects by itself; requests in flight during the outage
//! fail and are reported (a publish that fails was not confirmed), and
//! deliveries whose ack could not be confirmed are delivered again after
//! the ack wait.
//!
//! ```no_run
//! use busway_core::{ConsumeOptions, Message, Publish, QueueName, QueueSpec, Transport};
//! use busway_nats::NatsTransport;
//! use futures::StreamExt;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let transport = NatsTransport::connect("nats://127.0.0.1:4222?prefix=shop").await?;
//! let queue = QueueName::new("task_queue")?;
//! transport.declare_queue(&QueueSpec::new(queue.clone()).with_max_attempts(5)).await?;
//! transport.publish(Publish::to_queue(queue.clone(), Message::new("send_email", "{}"))).await?;
//! let mut deliveries = transport.consume(&queue, ConsumeOptions::with_prefetch(10)).await?;
//! if let Some(delivery) = deliveries.next().await {
//!     delivery?.ack().await?;
//! }
//! # Ok(())
//! # }
//! ```

mod config;
mod consumer;
mod names;
mod transport;

pub use config::NatsConfig;
pub use transport::NatsTransport;

#[doc(no_inline)]
pub use busway_core::{Capabilities, Support};
