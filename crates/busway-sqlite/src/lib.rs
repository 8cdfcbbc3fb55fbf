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
//! - **Storage.** WAL mode. Queues, bindings, messages and consumers live in
//!   tables prefixed `busway_`; the schema is versioned with
//!   `PRAGMA user_version` and migrated on open.
//! - **One writer thread per transport** owns the write connection. Every
//!   mutation (publish, lease, ack, nack, dead-letter, release, declare,
//!   bind, lease renewal) is a command on a channel; the thread runs all
//!   commands queued at that moment, and those arriving meanwhile, in one
//!   transaction and commits once (group commit). A failing command is
//!   rolled back alone, in its own savepoint.
//! - **Durability.** A commit returns once the transaction is in the
//!   operating system: it survives the death of the process. With
//!   [`Synchronous::Full`] (the default) a second thread fsyncs the WAL and
//!   only then confirms durable publishes, declarations and bindings, while
//!   the writer goes on with the next batch: one fsync covers every batch
//!   committed before it, and the writer never waits for the disk.
//!   Settlements are confirmed after their commit (see [`Synchronous`]).
//!   Checkpoints run on a third thread.
//! - **Leases.** A consumer leases messages: they become invisible to others
//!   for [`SqliteConfig::lease`]. The transport renews the leases it holds
//!   every `lease / 3`; when a process dies its leases run out and the
//!   messages are delivered again, with the attempt counted. A lease settled
//!   in the transaction that took it is never written at all.
//! - **Waking.** Consumers wake at once after a commit of their own transport
//!   that touched their queue, within [`SqliteConfig::poll_interval`] after
//!   commits of other processes (`PRAGMA data_version`), and when a delayed
//!   message becomes due. Idle consumers do not spin.
//! - **Emulated features.** Delays, priorities (for queues declared with a
//!   max priority), TTLs, max attempts and dead-letter queues are implemented
//!   in the SQL above; expired messages and messages out of attempts are
//!   dead-lettered when they reach the head of their queue.
//! - **Delivery order.** A queue delivers by `(priority if the queue has a
//!   max priority, time the message became visible, publish order)`. A
//!   message returned without delay (nack, dropped delivery, close) goes back
//!   to its place; one returned with a delay queues up when the delay ends.

mod checkpoint;
mod config;
mod consumer;
mod error;
mod event_store;
mod inbox;
mod job;
mod row;
mod saga_store;
mod schema;
mod sync;
mod transport;
mod wake;
mod writer;

pub use config::{SqliteConfig, Synchronous};
pub use event_store::SqliteEventStore;
pub use inbox::SqliteInbox;
pub use job::{WriteError, WriteTx};
/// The SQLite bindings [`WriteTx::connection`] and [`SqliteTransport::read`] hand out.
pub use rusqlite;
pub use saga_store::SqliteSagaStore;
pub use transport::SqliteTransport;

#[cfg(test)]
mod tests;
