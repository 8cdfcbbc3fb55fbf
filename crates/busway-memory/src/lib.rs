//! An in-process [`Transport`](busway_core::Transport) for busway.
//!
//! [`MemoryTransport`] keeps queues in memory and implements the full
//! transport semantics natively: topic routing with AMQP patterns, direct
//! queues, competing consumers with prefetch, delayed delivery, priority
//! queues, per-queue and per-message TTL, max attempts and dead-letter
//! queues. It is the reference backend of the conformance suite and the
//! fastest one, for tests and single-process applications. Nothing survives
//! the process.
//!
//! ```
//! use busway_core::{Binding, ConsumeOptions, Message, Publish, QueueName, QueueSpec, Topic,
//!     TopicPattern, Transport};
//! use busway_memory::MemoryTransport;
//! use futures::StreamExt;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let transport = MemoryTransport::new();
//! let emails = QueueName::new("emails")?;
//! transport.declare_queue(&QueueSpec::new(emails.clone())).await?;
//! transport.bind(&Binding::new(emails.clone(), TopicPattern::new("user.*")?)).await?;
//!
//! let event = Message::new("user.registered", r#"{"user_id":7}"#);
//! transport.publish(Publish::to_topic(Topic::new("user.registered")?, event)).await?;
//!
//! let mut deliveries = transport.consume(&emails, ConsumeOptions::with_prefetch(8)).await?;
//! let delivery = deliveries.next().await.ok_or("stream ended")??;
//! assert_eq!(delivery.topic().map(|t| t.as_str()), Some("user.registered"));
//! delivery.ack().await?;
//! transport.close().await;
//! assert!(deliveries.next().await.is_none());
//! # Ok(())
//! # }
//! ```

mod consumer;
mod event_store;
mod queue;
mod saga_store;
mod transport;

pub use event_store::MemoryEventStore;
pub use saga_store::MemorySagaStore;
pub use transport::{MemoryConfig, MemoryTransport};
