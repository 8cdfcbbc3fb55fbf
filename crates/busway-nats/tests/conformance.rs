//! The universal conformance suite against the server named by
//! `BUSWAY_TEST_NATS_URL`. Each case works under a prefix of its own, whose
//! streams are deleted when the case ends.

mod support;

use std::sync::Arc;

use busway_core::Transport;
use busway_nats::NatsTransport;

busway_conformance::conformance_tests!(match support::IsolatedNats::new()? {
    Some(nats) => nats,
    None => return Ok(()),
});

#[async_trait::async_trait]
impl busway_conformance::Harness for support::IsolatedNats {
    async fn open(&self) -> anyhow::Result<Arc<dyn Transport>> {
        Ok(Arc::new(NatsTransport::connect(&self.url()).await?))
    }

    fn messages_per_publisher(&self) -> usize {
        2_000
    }
}
