//! The universal conformance suite against the broker named by
//! `BUSWAY_TEST_AMQP_URL`.

mod support;

use std::sync::Arc;

use busway_core::Transport;
use busway_rabbitmq::RabbitMqTransport;

struct RabbitHarness(String);

#[async_trait::async_trait]
impl busway_conformance::Harness for RabbitHarness {
    async fn open(&self) -> anyhow::Result<Arc<dyn Transport>> {
        Ok(Arc::new(RabbitMqTransport::connect(&self.0).await?))
    }

    fn messages_per_publisher(&self) -> usize {
        2_000
    }
}

macro_rules! harness {
    () => {
        match support::amqp_url()? {
            Some(url) => RabbitHarness(url),
            None => return Ok(()),
        }
    };
}

busway_conformance::conformance_tests!(harness!());
