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
//!
//! # How it works
//!
//! - **Storage.** Queues, bindings, messages and consumers live in tables
//!   prefixed `busway_` in one schema (`?schema=NAME`, default `public`),
//!   created by versioned migrations recorded in `busway_schema_version`
//!   (one version per component, applied under an advisory lock, so
//!   processes starting together do not race; a schema written by a newer
//!   busway is refused). Times are the database server's clock.
//! - **Publishing.** Concurrent publishes are grouped: a few worker tasks
//!   each take every publish queued at that moment and store the group with
//!   one `INSERT ... SELECT FROM unnest(...)` statement, which also sends one
//!   `NOTIFY` per queue it filled. One commit confirms the group. Topics are
//!   routed in the same round of queries, against bindings stored as regular
//!   expressions, so a binding made by any process counts at once.
//! - **Dequeue.** A consumer leases up to its free prefetch slots with one
//!   `UPDATE ... FROM (SELECT ... ORDER BY lane DESC, visible_at, seq LIMIT n
//!   FOR UPDATE SKIP LOCKED)`: competing consumers never wait for each
//!   other. A lease makes the row invisible until its deadline and gives it
//!   a token; the transport renews the leases it holds every `lease / 3`.
//!   When a process dies, its leases run out and the messages are delivered
//!   again with the attempt counted. Acks are grouped like publishes: one
//!   `DELETE` settles every ack queued at that moment.
//! - **Waking.** The transport `LISTEN`s on `busway_wake_{schema}`. A
//!   consumer with nothing to lease sleeps until a notification names its
//!   queue, until the next row of its queue becomes visible (a delay, a retry
//!   backoff, a lease running out), or at most 10 s as a backstop. Idle
//!   consumers do not poll.
//! - **Emulated features.** Delays, priorities (queues declared with a max
//!   priority order by lane), TTLs, max attempts and dead-letter queues are
//!   implemented in the SQL above; expired messages and messages out of
//!   attempts are dead-lettered, with the reason, original topic, queue and
//!   attempt count in their headers, when they reach the head of their queue.
//! - **Reconnecting.** The pool replaces connections the server dropped
//!   (`pg_terminate_backend`, a restart). A publish or settlement whose
//!   connection was lost is tried again, up to 5 times; a publish whose
//!   commit was interrupted may therefore be stored twice (same message id),
//!   never lost once confirmed. Consumers lease again; the listener listens
//!   again and wakes every consumer, since notifications may have been missed
//!   meanwhile.
//!
//! # Durability
//!
//! A publish with [`Durability::Durable`](busway_core::Durability) returns
//! once its transaction has committed. What a commit guarantees is
//! PostgreSQL's `synchronous_commit` setting (of the server, the database or
//! the role):
//!
//! - `on` (PostgreSQL's default): the commit waits until its WAL record is
//!   flushed to disk. Confirmed messages survive a crash of the server or of
//!   the machine. With synchronous replicas configured, `remote_write`,
//!   `remote_apply` and `on` also wait for the standbys.
//! - `off`: the commit returns before the flush. A crash of the server may
//!   lose the publishes (and acks) of the last moments (up to three times
//!   `wal_writer_delay`, 600 ms by default), never corrupt the queues.
//!
//! [`Durability::Buffered`](busway_core::Durability) asks for exactly that
//! trade for one group of publishes (`SET LOCAL synchronous_commit TO off`).
//! Settlements commit like publishes; an ack lost to a crash means the
//! message is delivered again, never lost.
//!
//! # Capabilities
//!
//! | feature | support | how |
//! |---|---|---|
//! | delayed publish, `nack(retry_after)` | emulated | `visible_at` in the future |
//! | priority | emulated | `lane` column, leased highest first |
//! | per-queue and per-message TTL | emulated | `expires_at`, dead-lettered as `expired` |
//! | max attempts, dead-letter queues | emulated | attempt counter, rows moved in one statement |
//! | ordering | emulated | publish order within a priority, per consumer |
//! | persistence | native | PostgreSQL commits (see durability) |
//! | several processes | native | row locks with `SKIP LOCKED`, leases |
//!
//! Temporary queues (RPC replies) are ordinary queues here: they stay, empty,
//! after their transport goes.
//!
//! # Sharing the database
//!
//! [`PostgresTransport::pool`] is the transport's connection pool; the
//! event store, saga store and outbox use it, with their tables in the same
//! schema, so one transaction can change them and enqueue messages
//! ([`PostgresTransport::publish_in`]). The pool holds at most
//! [`PostgresConfig::max_connections`] connections, the wake-up listener's
//! included.

mod config;
mod consumer;
mod error;
mod event_store;
mod publish;
mod row;
mod saga_store;
mod schema;
mod settle;
mod topology;
mod transport;
mod wake;

pub use config::PostgresConfig;
pub use event_store::PostgresEventStore;
pub use saga_store::PostgresSagaStore;
pub use transport::PostgresTransport;
