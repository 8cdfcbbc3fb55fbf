//! The universal conformance suite against the server named by
//! `BUSWAY_TEST_POSTGRES_URL`, each case in a schema of its own.

mod support;

use std::sync::Arc;

use busway_core::Transport;
use support::TestSchema;

struct PostgresHarness(TestSchema);

#[async_trait::async_trait]
impl busway_conformance::Harness for PostgresHarness {
    async fn open(&self) -> anyhow::Result<Arc<dyn Transport>> {
        self.0.open().await
    }

    fn messages_per_publisher(&self) -> usize {
        2_000
    }
}

macro_rules! harness {
    () => {
        match support::postgres_url()? {
            Some(url) => PostgresHarness(TestSchema::new(&url)),
            None => return Ok(()),
        }
    };
}

busway_conformance::conformance_tests!(harness!());
