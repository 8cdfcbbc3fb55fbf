//! busway: messaging patterns for Rust microservices.
//!
//! Pick a backend by URL and get a [`Transport`]:
//!
//! | URL | backend |
//! |---|---|
//! | `sqlite://PATH` (the default, [`DEFAULT_URL`]) | embedded, durable, zero setup |
//! | `memory://` | in-process, fastest, not durable |
//! | `amqp://`, `amqps://` | RabbitMQ (feature `rabbitmq`), reference wire format |
//! | `postgres://`, `postgresql://` | PostgreSQL (feature `postgres`), queues in your database |
//! | `redis://`, `rediss://` | Redis Streams (feature `redis`) |
//! | `nats://` | NATS JetStream (feature `nats`) |
//!
//! ```
//! use busway::{Message, Publish, QueueName, QueueSpec, ConsumeOptions};
//! use futures::StreamExt;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let transport = busway::connect("memory://").await?;
//! let queue = QueueName::new("task_queue")?;
//! transport.declare_queue(&QueueSpec::new(queue.clone())).await?;
//! transport.publish(Publish::to_queue(queue.clone(), Message::new("send_email", "hi"))).await?;
//!
//! let mut deliveries = transport.consume(&queue, ConsumeOptions::default()).await?;
//! if let Some(delivery) = deliveries.next().await {
//!     let delivery = delivery?;
//!     assert_eq!(delivery.message().kind, "send_email");
//!     delivery.ack().await?;
//! }
//! # Ok(())
//! # }
//! # tokio::runtime::Runtime::new().unwrap().block_on(run()).unwrap();
//! ```

use std::sync::Arc;

mod bus;
pub mod dead_letters;
pub mod es;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
mod handler;
pub mod health;
pub mod metrics;
pub mod middleware;
mod params;
#[cfg(feature = "protect")]
pub mod protection;
pub mod pubsub;
pub mod routing;
pub mod rpc;
pub mod saga;
pub mod stream;
pub mod tasks;
mod time;
pub mod trace;

pub use bus::{Bus, BusBuilder, BusStats, SendError, SetupError};
pub use busway_core::*;
#[cfg(feature = "memory")]
pub use busway_memory as memory;
#[cfg(feature = "nats")]
pub use busway_nats as nats;
#[cfg(feature = "postgres")]
pub use busway_postgres as postgres;
/// Payload protection: encryption, signing, compression, limits, replay windows (feature `protect`).
#[cfg(feature = "protect")]
pub use busway_protect as protect;
#[cfg(feature = "rabbitmq")]
pub use busway_rabbitmq as rabbitmq;
#[cfg(feature = "redis")]
pub use busway_redis as redis;
#[cfg(feature = "sqlite")]
pub use busway_sqlite as sqlite;
pub use handler::{HandlerError, RetryPolicy};
pub use pubsub::Event;
pub use rpc::{Request, RpcError};
pub use tasks::{TaskQueue, TASK_QUEUE};

/// The URL used when none is given: an embedded database in the working directory.
pub const DEFAULT_URL: &str = "sqlite://busway.db";

/// Opens the transport a URL names. See the crate docs for the schemes.
pub async fn connect(url: &str) -> Result<Arc<dyn Transport>, ConnectError> {
    let scheme = url.split_once("://").map(|(s, _)| s).unwrap_or(url);
    match scheme {
        #[cfg(feature = "memory")]
        "memory" => Ok(Arc::new(busway_memory::MemoryTransport::new())),
        #[cfg(feature = "sqlite")]
        "sqlite" => {
            let (path, config) = busway_sqlite::SqliteConfig::from_url(url)?;
            Ok(Arc::new(busway_sqlite::SqliteTransport::open_with(
                path, config,
            )?))
        }
        #[cfg(feature = "rabbitmq")]
        "amqp" | "amqps" => Ok(Arc::new(
            busway_rabbitmq::RabbitMqTransport::connect(url).await?,
        )),
        #[cfg(feature = "postgres")]
        "postgres" | "postgresql" => Ok(Arc::new(
            busway_postgres::PostgresTransport::connect(url).await?,
        )),
        #[cfg(feature = "redis")]
        "redis" | "rediss" => Ok(Arc::new(busway_redis::RedisTransport::connect(url).await?)),
        #[cfg(feature = "nats")]
        "nats" => Ok(Arc::new(busway_nats::NatsTransport::connect(url).await?)),
        _ => Err(ConnectError::InvalidUrl {
            url: redact_url(url),
            reason: format!(
                "unknown or disabled scheme `{scheme}`; this build supports: {}",
                supported_schemes().join(", ")
            ),
        }),
    }
}

/// The URL schemes this build can open.
pub fn supported_schemes() -> Vec<&'static str> {
    let schemes: [(bool, &[&'static str]); 6] = [
        (cfg!(feature = "sqlite"), &["sqlite://"]),
        (cfg!(feature = "memory"), &["memory://"]),
        (cfg!(feature = "rabbitmq"), &["amqp://", "amqps://"]),
        (
            cfg!(feature = "postgres"),
            &["postgres://", "postgresql://"],
        ),
        (cfg!(feature = "redis"), &["redis://", "rediss://"]),
        (cfg!(feature = "nats"), &["nats://"]),
    ];
    schemes
        .into_iter()
        .filter(|(enabled, _)| *enabled)
        .flat_map(|(_, schemes)| schemes.iter().copied())
        .collect()
}

/// The README's examples, compiled as doctests.
#[doc = include_str!("../../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

/// The guide's examples (`docs/guide`), compiled as doctests.
#[cfg(doctest)]
pub mod guide {
    #[doc = include_str!("../../../docs/guide/rpc.md")]
    pub struct Rpc;
    #[doc = include_str!("../../../docs/guide/pubsub.md")]
    pub struct PubSub;
    #[doc = include_str!("../../../docs/guide/work-queues.md")]
    pub struct WorkQueues;
    #[doc = include_str!("../../../docs/guide/event-sourcing.md")]
    pub struct EventSourcing;
    #[doc = include_str!("../../../docs/guide/sagas.md")]
    pub struct Sagas;
    #[doc = include_str!("../../../docs/guide/streams.md")]
    pub struct Streams;
    #[doc = include_str!("../../../docs/guide/middleware.md")]
    pub struct Middleware;
    #[doc = include_str!("../../../docs/guide/operations.md")]
    pub struct Operations;
    #[doc = include_str!("../../../docs/guide/backends.md")]
    pub struct Backends;
    #[doc = include_str!("../../../docs/guide/tracing.md")]
    pub struct Tracing;
    #[doc = include_str!("../../../docs/guide/dashboard.md")]
    pub struct Dashboard;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn unknown_scheme_is_a_clear_error() {
        let err = connect("kafka://user:pw@host")
            .await
            .err()
            .map(|e| e.to_string());
        let err = err.unwrap_or_default();
        assert!(err.contains("kafka"), "{err}");
        assert!(!err.contains("pw"), "password leaked: {err}");
    }
}
