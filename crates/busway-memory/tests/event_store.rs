//! The event-store conformance cases on the in-memory store.

use std::sync::Arc;

use busway_core::event_store::EventStore;
use busway_memory::MemoryEventStore;

async fn open() -> anyhow::Result<(Arc<dyn EventStore>, ())> {
    Ok((Arc::new(MemoryEventStore::new()), ()))
}

busway_conformance::event_store_tests!(open());
