//! Shared by the pattern tests: backends to run on, unique names, waiting.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use busway::{ConsumeOptions, Delivery, QueueName, Transport};
use futures::StreamExt;

/// The broker URL from `BUSWAY_TEST_AMQP_URL`; `None` means skip (see
/// `busway_conformance::environment::broker_url`).
pub(crate) fn amqp_url() -> anyhow::Result<Option<String>> {
    busway_conformance::environment::broker_url("BUSWAY_TEST_AMQP_URL")
}

/// A transport to run a case on, and what keeps it alive.
pub(crate) struct Backend {
    pub(crate) transport: Arc<dyn Transport>,
    _dir: Option<tempfile::TempDir>,
}

pub(crate) fn memory() -> Backend {
    Backend {
        transport: Arc::new(busway::memory::MemoryTransport::new()),
        _dir: None,
    }
}

pub(crate) async fn sqlite() -> anyhow::Result<Backend> {
    let dir = tempfile::tempdir()?;
    let url = format!("sqlite://{}", dir.path().join("bus.db").display());
    Ok(Backend {
        transport: busway::connect(&url).await?,
        _dir: Some(dir),
    })
}

pub(crate) async fn rabbitmq() -> anyhow::Result<Option<Backend>> {
    let Some(url) = amqp_url()? else {
        return Ok(None);
    };
    Ok(Some(Backend {
        transport: Arc::new(busway_rabbitmq::RabbitMqTransport::connect(&url).await?),
        _dir: None,
    }))
}

/// A name no other test uses.
pub(crate) fn unique(prefix: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("t_{prefix}_{}", &id[..12])
}

/// Generous bound on waiting for something that must happen.
pub(crate) const PATIENCE: Duration = Duration::from_secs(30);

/// The next dead letter of `queue`, acknowledged.
pub(crate) async fn next_dead_letter(
    transport: &Arc<dyn Transport>,
    queue: &QueueName,
) -> anyhow::Result<Delivery> {
    next_message(transport, &queue.dead_letter_queue()).await
}

/// Runs each named `async fn(Arc<dyn Transport>) -> anyhow::Result<()>` of the
/// calling test file as one test per backend: `memory::case`, `sqlite::case`,
/// `rabbitmq::case` (skipped without `BUSWAY_TEST_AMQP_URL`, failing with
/// `BUSWAY_REQUIRE_BROKERS=1`).
#[allow(unused_macros)]
macro_rules! on_every_backend {
    ($($case:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() -> anyhow::Result<()> {
                    let backend: super::support::Backend = super::support::memory();
                    super::$case(backend.transport.clone()).await
                }
            )*
        }
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() -> anyhow::Result<()> {
                    let backend: super::support::Backend = super::support::sqlite().await?;
                    let result = super::$case(backend.transport.clone()).await;
                    backend.transport.close().await;
                    result
                }
            )*
        }
        mod rabbitmq {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() -> anyhow::Result<()> {
                    let Some(backend) = super::support::rabbitmq().await? else {
                        return Ok(());
                    };
                    let result = super::$case(backend.transport.clone()).await;
                    backend.transport.close().await;
                    result
                }
            )*
        }
    };
}
#[allow(unused_imports)]
pub(crate) use on_every_backend;

/// The next message of `queue`, unsettled.
pub(crate) async fn next_message(
    transport: &Arc<dyn Transport>,
    queue: &QueueName,
) -> anyhow::Result<Delivery> {
    let mut stream = transport
        .consume(queue, ConsumeOptions::with_prefetch(1))
        .await?;
    let delivery = tokio::time::timeout(PATIENCE, stream.next())
        .await
        .context("no message arrived")?
        .context("the stream ended")??;
    Ok(delivery)
}
