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
mod handler;
pub mod middleware;
pub mod pubsub;
pub mod routing;
pub mod rpc;
pub mod saga;
pub mod stream;
pub mod tasks;
mod time;

pub use bus::{Bus, BusStats, SendError, SetupError};
pub use busway_core::*;
#[cfg(feature = "memory")]
pub use busway_memory as memory;
#[cfg(feature = "postgres")]
pub use busway_postgres as postgres;
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
    #[allow(unused_mut)]
    let mut schemes = Vec::new();
    #[cfg(feature = "sqlite")]
    schemes.push("sqlite://");
    #[cfg(feature = "memory")]
    schemes.push("memory://");
    #[cfg(feature = "rabbitmq")]
    schemes.extend(["amqp://", "amqps://"]);
    #[cfg(feature = "postgres")]
    schemes.extend(["postgres://", "postgresql://"]);
    #[cfg(feature = "redis")]
    schemes.extend(["redis://", "rediss://"]);
    schemes
}

/// The README's examples, compiled as doctests.
#[doc = include_str!("../../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

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
