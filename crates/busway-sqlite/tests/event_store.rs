//! The event-store conformance cases on SQLite, each in a database of its own.

use std::sync::Arc;

use busway_core::event_store::EventStore;
use busway_sqlite::{SqliteEventStore, SqliteTransport};
use tempfile::TempDir;

async fn open() -> anyhow::Result<(Arc<dyn EventStore>, TempDir)> {
    let dir = tempfile::tempdir()?;
    let transport = SqliteTransport::open(dir.path().join("busway.db"))?;
    Ok((Arc::new(SqliteEventStore::open(transport).await?), dir))
}

busway_conformance::event_store_tests!(open());

/// The outbox on SQLite is the queue itself: an append's announcements are
/// enqueued in its transaction, and a refused append enqueues nothing.
#[tokio::test]
async fn announcements_commit_with_their_events() -> anyhow::Result<()> {
    use busway_core::event_store::{ExpectedVersion, NewEvent};
    use busway_core::{Message, Publish, QueueName, QueueSpec, Transport};

    let dir = tempfile::tempdir()?;
    let transport = SqliteTransport::open(dir.path().join("busway.db"))?;
    let store = SqliteEventStore::open(transport.clone()).await?;
    let queue = QueueName::new("user_events")?;
    transport
        .declare_queue(&QueueSpec::new(queue.clone()))
        .await?;
    let announce = || Publish::to_queue(queue.clone(), Message::new("user.registered", "{}"));
    let registered = NewEvent::new("user.registered", "{}");
    store
        .append_announced(
            "user-1",
            ExpectedVersion::NoStream,
            vec![registered.clone()],
            vec![announce()],
        )
        .await?;
    anyhow::ensure!(transport.queue_stats(&queue).await?.ready == 1);
    // A retry is deduplicated and announces nothing again.
    let retry = store
        .append_announced(
            "user-1",
            ExpectedVersion::NoStream,
            vec![registered],
            vec![announce()],
        )
        .await?;
    anyhow::ensure!(retry.deduplicated);
    // A conflict rolls the announcement back with the events.
    let refused = store
        .append_announced(
            "user-1",
            ExpectedVersion::NoStream,
            vec![NewEvent::new("user.registered", "{}")],
            vec![announce()],
        )
        .await;
    anyhow::ensure!(refused.is_err());
    anyhow::ensure!(transport.queue_stats(&queue).await?.ready == 1);
    // Reopening sees the same log.
    transport.close().await;
    let transport = SqliteTransport::open(dir.path().join("busway.db"))?;
    let store = SqliteEventStore::open(transport.clone()).await?;
    anyhow::ensure!(store.head_position().await? == 1);
    anyhow::ensure!(transport.queue_stats(&queue).await?.ready == 1);
    Ok(())
}
