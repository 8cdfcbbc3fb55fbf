//! The cases every [`EventStore`] backend must pass. Each is a plain async
//! function taking the store; every case uses streams with a fresh random
//! prefix, so cases may share one store and run in parallel.
//!
//! A backend calls [`event_store_tests!`](crate::event_store_tests) with an
//! expression that opens a store: a future of
//! `anyhow::Result<(Arc<dyn EventStore>, Guard)>`, where `Guard` is
//! anything the store needs kept alive during the case (a temporary
//! directory), dropped when the case ends.

use std::sync::Arc;

use anyhow::{ensure, Context};
use busway_core::event_store::{
    AppendError, EventStore, ExpectedVersion, NewEvent, ReadError, Snapshot, StoreWriteError,
    StreamRead,
};
use uuid::Uuid;

/// A stream name no other test uses.
pub fn unique_stream(what: &str) -> String {
    format!("{what}-{}", Uuid::new_v4().simple())
}

fn event(kind: &str, n: u64) -> NewEvent {
    NewEvent::new(kind, format!("{{\"n\":{n}}}"))
}

/// Appends, reads forwards and backwards, and checks versions and positions.
pub async fn append_and_read(store: Arc<dyn EventStore>) -> anyhow::Result<()> {
    let stream = unique_stream("read");
    let first = store
        .append(
            &stream,
            ExpectedVersion::NoStream,
            vec![event("a", 1), event("b", 2)],
        )
        .await?;
    ensure!(first.version == 2 && !first.deduplicated, "{first:?}");
    let second = store
        .append(&stream, ExpectedVersion::Exact(2), vec![event("c", 3)])
        .await?;
    ensure!(second.version == 3, "{second:?}");
    ensure!(second.position > first.position, "positions must increase");

    let all = store.read_stream(&stream, StreamRead::all()).await?;
    let kinds: Vec<_> = all.iter().map(|e| e.event_type.as_str()).collect();
    ensure!(kinds == ["a", "b", "c"], "{kinds:?}");
    let versions: Vec<_> = all.iter().map(|e| e.version).collect();
    ensure!(versions == [1, 2, 3], "{versions:?}");
    ensure!(all[0].data_json()?["n"] == 1);
    ensure!(all[2].position == second.position);

    let from_two = store
        .read_stream(&stream, StreamRead::forwards_from(2).limit(1))
        .await?;
    ensure!(from_two.len() == 1 && from_two[0].version == 2);
    let backwards = store
        .read_stream(&stream, StreamRead::backwards_from_end())
        .await?;
    let versions: Vec<_> = backwards.iter().map(|e| e.version).collect();
    ensure!(versions == [3, 2, 1], "{versions:?}");
    let back_from_two = store
        .read_stream(&stream, StreamRead::backwards_from(2))
        .await?;
    ensure!(back_from_two.iter().map(|e| e.version).eq([2, 1]));

    let none = store
        .read_stream(&unique_stream("missing"), StreamRead::all())
        .await?;
    ensure!(none.is_empty());
    let info = store.stream_info(&stream).await?.context("stream info")?;
    ensure!(info.version == 3 && !info.deleted);
    ensure!(store
        .stream_info(&unique_stream("missing"))
        .await?
        .is_none());
    Ok(())
}

/// Stale expected versions are refused with the actual version; `Any` always appends.
pub async fn expected_version_conflicts(store: Arc<dyn EventStore>) -> anyhow::Result<()> {
    let stream = unique_stream("conflict");
    store
        .append(&stream, ExpectedVersion::Exact(0), vec![event("a", 1)])
        .await?;
    let err = store
        .append(&stream, ExpectedVersion::NoStream, vec![event("b", 2)])
        .await
        .err()
        .context("NoStream on an existing stream must fail")?;
    ensure!(
        matches!(err, AppendError::Conflict { actual: 1, expected: ExpectedVersion::NoStream, ref stream } if stream.starts_with("conflict-")),
        "{err:?}"
    );
    ensure!(!err.is_retryable());
    let err = store
        .append(&stream, ExpectedVersion::Exact(5), vec![event("b", 2)])
        .await
        .err()
        .context("a wrong version must fail")?;
    ensure!(
        matches!(err, AppendError::Conflict { actual: 1, .. }),
        "{err:?}"
    );
    let ok = store
        .append(&stream, ExpectedVersion::Any, vec![event("b", 2)])
        .await?;
    ensure!(ok.version == 2);
    let all = store.read_stream(&stream, StreamRead::all()).await?;
    ensure!(all.len() == 2, "a refused append wrote something: {all:?}");
    Ok(())
}

/// Retrying an append with the same event ids is not a duplicate; reusing
/// an id elsewhere is refused.
pub async fn idempotent_append(store: Arc<dyn EventStore>) -> anyhow::Result<()> {
    let stream = unique_stream("idem");
    let batch = vec![event("a", 1), event("b", 2)];
    let first = store
        .append(&stream, ExpectedVersion::NoStream, batch.clone())
        .await?;
    let retry = store
        .append(&stream, ExpectedVersion::NoStream, batch.clone())
        .await?;
    ensure!(retry.deduplicated, "{retry:?}");
    ensure!(retry.version == first.version && retry.position == first.position);
    ensure!(
        store.read_stream(&stream, StreamRead::all()).await?.len() == 2,
        "the retry wrote duplicates"
    );
    // The same id in another stream, or mixed with new events, is a caller bug.
    let other = unique_stream("idem");
    let err = store
        .append(&other, ExpectedVersion::Any, vec![batch[0].clone()])
        .await
        .err()
        .context("reusing an id on another stream must fail")?;
    ensure!(
        matches!(err, AppendError::DuplicateEventId { .. }),
        "{err:?}"
    );
    let err = store
        .append(
            &stream,
            ExpectedVersion::Any,
            vec![event("c", 3), batch[1].clone()],
        )
        .await
        .err()
        .context("a partly stored batch must fail")?;
    ensure!(
        matches!(err, AppendError::DuplicateEventId { .. }),
        "{err:?}"
    );
    ensure!(store.read_stream(&stream, StreamRead::all()).await?.len() == 2);
    // Invalid input is a clear error.
    let err = store
        .append(&stream, ExpectedVersion::Any, Vec::new())
        .await
        .err()
        .context("an empty batch must fail")?;
    ensure!(matches!(err, AppendError::Invalid { .. }), "{err:?}");
    Ok(())
}

/// The global log returns events of every stream in position order, from a position.
pub async fn read_all_in_global_order(store: Arc<dyn EventStore>) -> anyhow::Result<()> {
    let start = store.head_position().await?;
    let a = unique_stream("all");
    let b = unique_stream("all");
    store
        .append(&a, ExpectedVersion::Any, vec![event("x", 1)])
        .await?;
    store
        .append(&b, ExpectedVersion::Any, vec![event("x", 2), event("x", 3)])
        .await?;
    let last = store
        .append(&a, ExpectedVersion::Any, vec![event("x", 4)])
        .await?;
    ensure!(store.head_position().await? >= last.position);
    let mut mine = Vec::new();
    let mut after = start;
    loop {
        let page = store.read_all(after, 2).await?;
        ensure!(page.len() <= 2, "limit ignored");
        let Some(last) = page.last() else { break };
        after = last.position;
        mine.extend(page.into_iter().filter(|e| e.stream == a || e.stream == b));
    }
    let ns: Vec<_> = mine
        .iter()
        .map(|e| e.data_json().map(|v| v["n"].as_u64()))
        .collect::<Result<_, _>>()?;
    ensure!(
        ns == [Some(1), Some(2), Some(3), Some(4)],
        "global order: {ns:?}"
    );
    ensure!(mine.windows(2).all(|w| w[0].position < w[1].position));
    Ok(())
}

/// Stream metadata and soft delete.
pub async fn metadata_and_soft_delete(store: Arc<dyn EventStore>) -> anyhow::Result<()> {
    let stream = unique_stream("meta");
    store
        .append(&stream, ExpectedVersion::NoStream, vec![event("a", 1)])
        .await?;
    let mut metadata = serde_json::Map::new();
    metadata.insert("owner".into(), "team-a".into());
    store.set_stream_metadata(&stream, metadata.clone()).await?;
    let info = store.stream_info(&stream).await?.context("info")?;
    ensure!(info.metadata == metadata, "{info:?}");

    let err = store
        .delete_stream(&stream, ExpectedVersion::Exact(7))
        .await
        .err()
        .context("delete at a wrong version must fail")?;
    ensure!(
        matches!(err, StoreWriteError::Conflict { actual: 1, .. }),
        "{err:?}"
    );
    let position = store.head_position().await?;
    store
        .delete_stream(&stream, ExpectedVersion::Exact(1))
        .await?;
    let err = store
        .read_stream(&stream, StreamRead::all())
        .await
        .err()
        .context("reading a deleted stream must fail")?;
    ensure!(matches!(err, ReadError::StreamDeleted { .. }), "{err:?}");
    let err = store
        .append(&stream, ExpectedVersion::Any, vec![event("b", 2)])
        .await
        .err()
        .context("appending to a deleted stream must fail")?;
    ensure!(matches!(err, AppendError::StreamDeleted { .. }), "{err:?}");
    let info = store.stream_info(&stream).await?.context("info")?;
    ensure!(info.deleted && info.version == 1);
    // The history stays in the global log.
    let log = store.read_all(position.saturating_sub(50), 100).await?;
    ensure!(log.iter().any(|e| e.stream == stream));
    Ok(())
}

/// Snapshots replace each other; checkpoints and parked events are kept per projection.
pub async fn snapshots_checkpoints_parking(store: Arc<dyn EventStore>) -> anyhow::Result<()> {
    let stream = unique_stream("snap");
    ensure!(store.load_snapshot(&stream).await?.is_none());
    store
        .save_snapshot(Snapshot::new(&stream, 3, 1, "{\"a\":1}".into()))
        .await?;
    store
        .save_snapshot(Snapshot::new(&stream, 6, 2, "{\"a\":2}".into()))
        .await?;
    let snap = store.load_snapshot(&stream).await?.context("snapshot")?;
    ensure!(snap.version == 6 && snap.schema_version == 2 && snap.state == "{\"a\":2}");

    let projection = unique_stream("projection");
    ensure!(store.load_checkpoint(&projection).await?.is_none());
    store.save_checkpoint(&projection, 10).await?;
    store.save_checkpoint(&projection, 12).await?;
    ensure!(store.load_checkpoint(&projection).await? == Some(12));

    let appended = store
        .append(&stream, ExpectedVersion::Any, vec![event("bad", 1)])
        .await?;
    let stored = store.read_stream(&stream, StreamRead::all()).await?;
    let parked = busway_core::event_store::ParkedEvent::new(&projection, &stored[0], "bad data");
    store.park_event(parked.clone()).await?;
    let list = store.parked_events(&projection).await?;
    ensure!(list == vec![parked], "{list:?}");
    ensure!(list[0].position == appended.position);
    ensure!(store.parked_events(&unique_stream("p")).await?.is_empty());
    Ok(())
}

/// `rounds` rounds of `writers` concurrent appends at the same expected
/// version: exactly one wins each round, the others get a conflict with the
/// winner's version.
pub async fn one_winner_per_round(
    store: Arc<dyn EventStore>,
    rounds: u64,
    writers: usize,
) -> anyhow::Result<()> {
    let stream = unique_stream("race");
    for round in 0..rounds {
        let attempts = (0..writers).map(|w| {
            let store = store.clone();
            let stream = stream.clone();
            tokio::spawn(async move {
                store
                    .append(
                        &stream,
                        ExpectedVersion::Exact(round),
                        vec![event("race", w as u64)],
                    )
                    .await
            })
        });
        let results = futures::future::join_all(attempts).await;
        let mut wins = 0;
        for result in results {
            match result? {
                Ok(outcome) => {
                    ensure!(outcome.version == round + 1);
                    wins += 1;
                }
                Err(AppendError::Conflict { actual, .. }) => {
                    ensure!(actual == round + 1, "round {round}: actual {actual}")
                }
                Err(e) => return Err(e).context(format!("round {round}")),
            }
        }
        ensure!(wins == 1, "round {round}: {wins} winners");
    }
    let all = store.read_stream(&stream, StreamRead::all()).await?;
    ensure!(all.len() as u64 == rounds);
    Ok(())
}

/// Expands to one `#[tokio::test]` per event-store case; `$open` is an
/// expression evaluating to a future of `anyhow::Result<(Arc<dyn EventStore>, Guard)>`.
#[macro_export]
macro_rules! event_store_tests {
    ($open:expr) => {
        $crate::event_store_tests!(@case $open;
            append_and_read, expected_version_conflicts, idempotent_append,
            read_all_in_global_order, metadata_and_soft_delete, snapshots_checkpoints_parking);

        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn one_winner_per_round_1000x16() -> anyhow::Result<()> {
            let (store, _guard) = $open.await?;
            $crate::event_store::one_winner_per_round(store, 1000, 16).await
        }
    };
    (@case $open:expr; $($case:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() -> anyhow::Result<()> {
                let (store, _guard) = $open.await?;
                $crate::event_store::$case(store).await
            }
        )*
    };
}
