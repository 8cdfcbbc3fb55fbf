//! The shared conformance suite, run against [`MemoryTransport`].

use std::sync::Arc;

use busway_core::Transport;
use busway_memory::MemoryTransport;

/// Each case gets a fresh in-process transport.
struct MemoryHarness(MemoryTransport);

#[async_trait::async_trait]
impl busway_conformance::Harness for MemoryHarness {
    async fn open(&self) -> anyhow::Result<Arc<dyn Transport>> {
        Ok(Arc::new(self.0.clone()))
    }
}

busway_conformance::conformance_tests!(MemoryHarness(MemoryTransport::new()));
