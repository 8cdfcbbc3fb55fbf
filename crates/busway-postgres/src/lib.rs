//! The PostgreSQL transport for busway: durable queues in tables of your
//! database, `FOR UPDATE SKIP LOCKED` dequeues, `LISTEN/NOTIFY` wake-ups.
//!
//! ```no_run
//! use busway_core::{Message, Publish, QueueName, QueueSpec, Transport};
//! use busway_postgres::PostgresTransport;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let transport = PostgresTransport::connect("postgres://postgres@127.0.0.1:5432/test").await?;
//! let queue = QueueName::new("task_queue")?;
//! transport.declare_queue(&QueueSpec::new(queue.clone())).await?;
//! transport.publish(Publish::to_queue(queue.clone(), Message::new("ping", "hi"))).await?;
//! assert_eq!(transport.queue_stats(&queue).await?.ready, 1);
//! # Ok(())
//! # }
//! ```

mod config;
mod consumer;
mod error;
mod publish;
mod row;
mod schema;
mod settle;
mod topology;
mod transport;
mod wake;

pub use config::PostgresConfig;
pub use transport::PostgresTransport;
