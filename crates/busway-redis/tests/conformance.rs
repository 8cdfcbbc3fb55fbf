//! The universal conformance suite against the server named by
//! `BUSWAY_TEST_REDIS_URL`. Each case works under a key prefix of its own,
//! deleted when the case ends.

mod support;

use std::sync::Arc;

use busway_core::Transport;
use busway_redis::RedisTransport;

busway_conformance::conformance_tests!(match support::IsolatedRedis::new()? {
    Some(redis) => redis,
    None => return Ok(()),
});

#[async_trait::async_trait]
impl busway_conformance::Harness for support::IsolatedRedis {
    async fn open(&self) -> anyhow::Result<Arc<dyn Transport>> {
        Ok(Arc::new(RedisTransport::connect(&self.url()).await?))
    }

    fn messages_per_publisher(&self) -> usize {
        2_000
    }
}
