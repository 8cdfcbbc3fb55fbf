//! The embedded, durable busway transport on SQLite: zero setup, one file,
//! several processes.
//!
//! ```
//! use busway_core::{Message, Publish, QueueName, QueueSpec, Transport};
//! use busway_sqlite::SqliteTransport;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # tokio::runtime::Runtime::new()?.block_on(async {
//! let dir = tempfile::tempdir()?;
//! let transport = SqliteTransport::open(dir.path().join("busway.db"))?;
//! let queue = QueueName::new("task_queue")?;
//! transport.declare_queue(&QueueSpec::new(queue.clone())).await?;
//! transport.publish(Publish::to_queue(queue.clone(), Message::new("ping", "hi"))).await?;
//! assert_eq!(transport.queue_stats(&queue).await?.ready, 1);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # })
//! # }
//! ```
//!
//! # How it works
//!
//! - **Storage.** WAL mode; `synchronous = FULL` by default. Queues, bindings,
//!   messages and consumers live in tables prefixed `busway_`; the schema is
//!   versioned with `PRAGMA user_version` and migrated on open.
//! - **One writer thread per transport** owns the write connection. Every
//!   mutation (publish, lease, ack, nack, dead-letter, release, declare,
//!   bind, lease renewal) is a command on a channel; the thread runs all
//!   commands queued at that moment in one transaction and commits once, so
//!   one fsync covers them all (group commit). A failing command is rolled
//!   back alone, in its own savepoint.
//! - **Leases.** A consumer leases messages: they become invisible to others
//!   for [`SqliteConfig::lease`]. The transport renews the leases it holds
//!   every `lease / 3`; when a process dies its leases run out and the
//!   messages are delivered again, with the attempt counted.
//! - **Waking.** Consumers wake at once after a commit of their own transport
//!   that touched their queue, after [`SqliteConfig::poll_interval`] for
//!   commits of other processes (`PRAGMA data_version`), and when a delayed
//!   message becomes due. Idle consumers do not spin.
//! - **Emulated features.** Delays, priorities (for queues declared with a
//!   max priority), TTLs, max attempts and dead-letter queues are implemented
//!   in the SQL above; expired messages and messages out of attempts are
//!   dead-lettered when they reach the head of their queue.

mod checkpoint;
mod config;
mod consumer;
mod error;
mod row;
mod schema;
mod transport;
mod wake;
mod writer;

pub use config::{SqliteConfig, Synchronous};
pub use transport::SqliteTransport;

#[cfg(test)]
mod tests;
