//! The event-store conformance cases on the server named by
//! `BUSWAY_TEST_POSTGRES_URL`, each in a schema of its own; then what is
//! PostgreSQL's own: announcements in the append's transaction, and a
//! global log that readers follow without skipping events whose commit
//! comes late.

#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context};
use busway_core::event_store::{EventStore, ExpectedVersion, NewEvent};
use busway_postgres::{PostgresEventStore, PostgresTransport};
use support::TestSchema;

/// A store in a fresh schema; `None` when no server is configured.
async fn open() -> anyhow::Result<Option<(PostgresEventStore, TestSchema)>> {
    let Some(url) = support::postgres_url()? else {
        return Ok(None);
    };
    let schema = TestSchema::new(&url);
    let transport = PostgresTransport::connect(&schema.transport_url("")).await?;
    let store = PostgresEventStore::open(transport.clone()).await?;
    // Opening again (another process starting) is harmless.
    PostgresEventStore::open(transport).await?;
    Ok(Some((store, schema)))
}

macro_rules! cases {
    ($($case:ident),*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $case() -> anyhow::Result<()> {
            let Some((store, _schema)) = open().await? else { return Ok(()) };
            busway_conformance::event_store::$case(Arc::new(store)).await
        }
    )*};
}

cases!(
    append_and_read,
    expected_version_conflicts,
    idempotent_append,
    read_all_in_global_order,
    metadata_and_soft_delete,
    snapshots_checkpoints_parking
);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_winner_per_round_1000x16() -> anyhow::Result<()> {
    let Some((store, _schema)) = open().await? else {
        return Ok(());
    };
    busway_conformance::event_store::one_winner_per_round(Arc::new(store), 1000, 16).await
}

/// An append's announcements are enqueued in its transaction; a retry or a
/// refused append enqueues nothing.
#[tokio::test]
async fn announcements_commit_with_their_events() -> anyhow::Result<()> {
    use busway_core::{Message, Publish, QueueName, QueueSpec, Transport};

    let Some((store, _schema)) = open().await? else {
        return Ok(());
    };
    let transport = store.transport().clone();
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
    ensure!(transport.queue_stats(&queue).await?.ready == 1);
    let retry = store
        .append_announced(
            "user-1",
            ExpectedVersion::NoStream,
            vec![registered],
            vec![announce()],
        )
        .await?;
    ensure!(retry.deduplicated);
    let refused = store
        .append_announced(
            "user-1",
            ExpectedVersion::NoStream,
            vec![NewEvent::new("user.registered", "{}")],
            vec![announce()],
        )
        .await;
    ensure!(refused.is_err(), "{refused:?}");
    ensure!(transport.queue_stats(&queue).await?.ready == 1);
    Ok(())
}

/// An append that takes its position first but commits last is not
/// skipped: while it is open, the global log stops before it, even though
/// a later position is already committed; once it commits, both come in
/// position order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_commits_are_not_skipped() -> anyhow::Result<()> {
    let Some((store, _schema)) = open().await? else {
        return Ok(());
    };
    let start = store.head_position().await?;
    // The slow writer: its append runs, its transaction stays open.
    let mut slow = store.transport().pool().begin().await?;
    let (slow_position,): (i64,) = sqlx::query_as(
        "SELECT out_position FROM busway_append('slow', NULL, ARRAY[$1::uuid], \
         ARRAY['slow.happened'], ARRAY[1], ARRAY['{}'::bytea], ARRAY[NULL::text])",
    )
    .bind(uuid::Uuid::now_v7().to_string())
    .fetch_one(&mut *slow)
    .await
    .context("the slow append")?;
    let slow_position = u64::try_from(slow_position)?;
    let fast = store
        .append(
            "fast",
            ExpectedVersion::NoStream,
            vec![NewEvent::new("fast", "{}")],
        )
        .await?;
    ensure!(fast.position > slow_position);

    // A follower reads while the slow append is still open.
    let follower = {
        let store = store.clone();
        tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut after = start;
            // Until the fast append: a follower that skipped the slow one
            // ends with only the fast one.
            while after < fast.position {
                for event in store.read_all(after, 100).await? {
                    after = event.position;
                    seen.push(event.position);
                }
            }
            anyhow::Ok(seen)
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    slow.commit().await?;
    let seen = follower.await??;
    ensure!(
        seen == [slow_position, fast.position],
        "the follower saw {seen:?}, expected [{slow_position}, {}]",
        fast.position
    );
    Ok(())
}

/// Concurrent retries of one batch, at any version: one of them stores it
/// (the others meet its ids in the unique key, or find them stored), and
/// every one returns its outcome; the stream holds the batch once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_retries_store_a_batch_once() -> anyhow::Result<()> {
    use busway_core::event_store::StreamRead;

    let Some((store, _schema)) = open().await? else {
        return Ok(());
    };
    for round in 0..20 {
        let stream = format!("retried-{round}");
        let batch: Vec<NewEvent> = (0..(1 + round % 3))
            .map(|i| NewEvent::new("retried", format!("{{\"n\":{i}}}")))
            .collect();
        let tries: Vec<_> = (0..8)
            .map(|_| {
                let store = store.clone();
                let (stream, batch) = (stream.clone(), batch.clone());
                tokio::spawn(
                    async move { store.append(&stream, ExpectedVersion::Any, batch).await },
                )
            })
            .collect();
        let mut outcomes = Vec::new();
        for attempt in tries {
            outcomes.push(attempt.await??);
        }
        let stored = outcomes.iter().filter(|o| !o.deduplicated).count();
        ensure!(
            stored == 1,
            "round {round}: {stored} appends stored the batch"
        );
        ensure!(
            outcomes
                .iter()
                .all(|o| o.version == outcomes[0].version && o.position == outcomes[0].position),
            "round {round}: {outcomes:?}"
        );
        let events = store.read_stream(&stream, StreamRead::all()).await?;
        ensure!(events.len() == batch.len(), "round {round}: {events:?}");
    }
    Ok(())
}
