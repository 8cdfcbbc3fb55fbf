//! The universal conformance suite against the broker named by
//! `BUSWAY_TEST_AMQP_URL`, with every queue the transport declares a quorum
//! queue (`RabbitMqConfig::with_queue_type(QueueType::Quorum)`). Priorities
//! are reported unsupported, so the suite checks that priority queues are
//! refused.

mod support;

use std::sync::Arc;

use busway_core::Transport;
use busway_rabbitmq::{QueueType, RabbitMqConfig, RabbitMqTransport};

struct QuorumHarness(String);

#[async_trait::async_trait]
impl busway_conformance::Harness for QuorumHarness {
    async fn open(&self) -> anyhow::Result<Arc<dyn Transport>> {
        let config = RabbitMqConfig::default().with_queue_type(QueueType::Quorum);
        Ok(Arc::new(
            RabbitMqTransport::connect_with(&self.0, config).await?,
        ))
    }

    fn messages_per_publisher(&self) -> usize {
        2_000
    }
}

macro_rules! harness {
    () => {
        match support::amqp_url()? {
            Some(url) => QuorumHarness(url),
            None => return Ok(()),
        }
    };
}

busway_conformance::conformance_tests!(harness!());
