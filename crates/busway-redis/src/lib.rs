//! The Redis Streams transport for busway (`redis://`), built on redis-rs
//! with its connection manager.
//!
//! # How busway maps onto Redis
//!
//! Every key starts with the configured prefix (`?prefix=` in the URL,
//! default `busway`); the queue's name sits in braces so all keys of one
//! queue hash to the same cluster slot.
//!
//! - **Queues** are streams with one consumer group (`busway`). A queue
//!   declared with a max priority `N` has `N + 1` streams, one per priority
//!   (`{prefix}:{queue}:s0` … `sN`); consumers read the highest non-empty
//!   stream first, so higher priorities overtake lower ones and each
//!   priority stays in publish order. Specs live in the hash
//!   `{prefix}:queues`, bindings in the set `{prefix}:bindings`.
//! - **Topics**: a publish to a topic is appended to every queue whose
//!   binding pattern matches (AMQP semantics, `*` one word, `#` any number).
//! - **Settling** runs a Lua script, so each settlement is atomic: an ack
//!   is `XACK` + `XDEL`; a nack appends a copy with the next attempt count
//!   and removes the original; a dead letter appends the message, with the
//!   reason and origin in its headers, to the dead-letter queue's stream.
//!   Acks settled at about the same time share one script call per stream
//!   (each still atomic on its own, each answered once the server applied
//!   it): a busy consumer pays a round trip per batch, not per message.
//! - **Delays** (delayed publish, `nack(retry_after)`) wait in the sorted
//!   set `{prefix}:{queue}:delayed`, scored by due time in server
//!   milliseconds; a scheduler task beside every consumer moves what is due
//!   into the streams.
//! - **Crashed consumers**: a delivery is leased to its consumer; a live
//!   transport renews its leases (`XCLAIM … JUSTID`) every third of
//!   [`RedisConfig::lease`]. Deliveries idle for longer than the lease are
//!   taken with `XAUTOCLAIM` by the scheduler of another consumer of the
//!   queue and put back with the attempt counted.
//! - **TTL** (queue or message) is checked when a message is read: expired
//!   messages are dead-lettered as `expired`, never delivered.
//! - **Max length** is checked before each publish (not atomically with it:
//!   concurrent publishers may overshoot it by their batch sizes).
//!
//! # Durability
//!
//! A publish returns once Redis has the message in memory. Whether it
//! survives a restart of Redis depends on the server's persistence settings:
//! with `appendonly yes` and `appendfsync always` every write is on disk
//! before the reply; with `appendfsync everysec` (Redis's default for AOF)
//! up to one second of writes can be lost; RDB snapshots (`save`) lose
//! everything since the last snapshot; and a server with neither, such as
//! one started with `--save "" --appendonly no`, keeps nothing on disk: a
//! restart loses every queue. [`RedisTransport::connect`] reads the
//! server's settings: [`Capabilities::persistence`] is
//! [`Support::Native`] when AOF or RDB is on, [`Support::Unsupported`]
//! when neither is.
//!
//! # TLS
//!
//! `rediss://` speaks TLS with rustls (the ring provider, as the other
//! backends). The server's certificate is checked against the system's
//! roots, or only against the certificates given with `tls_ca=/path/ca.pem`
//! in the URL or [`RedisConfig::with_tls_ca_pem`]. A certificate that
//! cannot be verified fails [`RedisTransport::connect`] with an error
//! naming the host, never the password.
//!
//! # Recovery
//!
//! The connection manager reconnects by itself after the server drops the
//! connection (`CLIENT KILL`, a restart); the command in flight fails and
//! is reported (a publish that fails was not confirmed). A consumer whose
//! read failed takes back what the server may have handed it during the
//! failure, and declares its queue again if the server lost it.
//!
//! ```no_run
//! use busway_core::{ConsumeOptions, Message, Publish, QueueName, QueueSpec, Transport};
//! use busway_redis::RedisTransport;
//! use futures::StreamExt;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let transport = RedisTransport::connect("redis://127.0.0.1:6379/?prefix=shop").await?;
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

mod acks;
mod config;
mod consumer;
mod scripts;
mod transport;

pub use config::RedisConfig;
pub use transport::RedisTransport;

#[doc(no_inline)]
pub use busway_core::{Capabilities, Support};
