//! An in-process [`EventStore`]: the reference implementation, for tests
//! and single-process applications. Nothing survives the process.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use async_trait::async_trait;
use busway_core::event_store::{
    now_ms, validate_append, AppendError, AppendOutcome, Direction, EventStore, ExpectedVersion,
    NewEvent, OutboxEntry, ParkedEvent, ReadError, Snapshot, StoreWriteError, StoredEvent,
    StreamInfo, StreamRead,
};
use busway_core::Publish;
use futures::future::BoxFuture;
use serde_json::{Map, Value};
use tokio::sync::watch;
use uuid::Uuid;

#[derive(Default)]
struct Stream {
    /// Indexes into `State::log`.
    events: Vec<usize>,
    deleted: bool,
    metadata: Map<String, Value>,
}

#[derive(Default)]
struct State {
    log: Vec<StoredEvent>,
    streams: HashMap<String, Stream>,
    ids: HashMap<Uuid, usize>,
    snapshots: HashMap<String, Snapshot>,
    checkpoints: HashMap<String, u64>,
    parked: Vec<ParkedEvent>,
    outbox: Vec<OutboxEntry>,
    next_outbox_id: u64,
}

/// An in-memory event store: appends are serialized by a lock, so the
/// expected-version check and the write are one step.
///
/// ```
/// use busway_core::event_store::{EventStore, ExpectedVersion, NewEvent, AppendError};
/// use busway_memory::MemoryEventStore;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store = MemoryEventStore::new();
/// let registered = NewEvent::json("user.registered", &serde_json::json!({"name": "Ann"}))?;
/// store.append("user-1", ExpectedVersion::NoStream, vec![registered.clone()]).await?;
/// // A retry of the same append is recognised by the event ids:
/// let again = store.append("user-1", ExpectedVersion::NoStream, vec![registered]).await?;
/// assert!(again.deduplicated);
/// // A competing writer with a stale version is refused:
/// let late = NewEvent::json("user.registered", &serde_json::json!({"name": "Bob"}))?;
/// let err = store.append("user-1", ExpectedVersion::NoStream, vec![late]).await.unwrap_err();
/// assert!(matches!(err, AppendError::Conflict { actual: 1, .. }));
/// # Ok(())
/// # }
/// ```
pub struct MemoryEventStore {
    state: Mutex<State>,
    head: watch::Sender<u64>,
}

impl Default for MemoryEventStore {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for MemoryEventStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryEventStore")
            .field("head", &*self.head.borrow())
            .finish_non_exhaustive()
    }
}

impl MemoryEventStore {
    /// An empty store.
    pub fn new() -> Self {
        Self {
            state: Mutex::new(State::default()),
            head: watch::channel(0).0,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Whether `events` are exactly stored already as consecutive events of
/// `stream`: `Ok(Some(outcome))` for a retry, `Ok(None)` if none is stored.
fn find_retry(
    state: &State,
    stream: &str,
    events: &[NewEvent],
) -> Result<Option<AppendOutcome>, AppendError> {
    let clash = |id: Uuid| AppendError::DuplicateEventId {
        stream: stream.to_owned(),
        id,
    };
    let Some(&first) = state.ids.get(&events[0].id) else {
        if let Some(e) = events.iter().find(|e| state.ids.contains_key(&e.id)) {
            return Err(clash(e.id));
        }
        return Ok(None);
    };
    let first = &state.log[first];
    let mut last = first;
    for (i, event) in events.iter().enumerate() {
        let stored = state.ids.get(&event.id).map(|&at| &state.log[at]);
        match stored {
            Some(s) if s.stream == stream && s.version == first.version + i as u64 => last = s,
            _ => return Err(clash(event.id)),
        }
    }
    Ok(Some(AppendOutcome::new(last.version, last.position, true)))
}

#[async_trait]
impl EventStore for MemoryEventStore {
    async fn append_announced(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
        announcements: Vec<Publish>,
    ) -> Result<AppendOutcome, AppendError> {
        validate_append(stream, &events)?;
        let mut state = self.lock();
        if let Some(outcome) = find_retry(&state, stream, &events)? {
            return Ok(outcome);
        }
        let entry = state.streams.get(stream);
        if entry.is_some_and(|s| s.deleted) {
            return Err(AppendError::StreamDeleted {
                stream: stream.to_owned(),
            });
        }
        let actual = entry.map_or(0, |s| s.events.len() as u64);
        if !expected.accepts(Some(actual)) {
            return Err(AppendError::Conflict {
                stream: stream.to_owned(),
                expected,
                actual,
            });
        }
        let now = now_ms();
        let mut version = actual;
        let mut position = state.log.len() as u64;
        for event in events {
            version += 1;
            position += 1;
            let at = state.log.len();
            state.ids.insert(event.id, at);
            state.log.push(StoredEvent::new(
                stream.to_owned(),
                version,
                position,
                event,
                now,
            ));
            state
                .streams
                .entry(stream.to_owned())
                .or_default()
                .events
                .push(at);
        }
        for publish in announcements {
            state.next_outbox_id += 1;
            let id = state.next_outbox_id;
            state.outbox.push(OutboxEntry::new(id, publish));
        }
        drop(state);
        self.head.send_replace(position);
        Ok(AppendOutcome::new(version, position, false))
    }

    async fn read_stream(
        &self,
        stream: &str,
        read: StreamRead,
    ) -> Result<Vec<StoredEvent>, ReadError> {
        let state = self.lock();
        let Some(entry) = state.streams.get(stream) else {
            return Ok(Vec::new());
        };
        if entry.deleted {
            return Err(ReadError::StreamDeleted {
                stream: stream.to_owned(),
            });
        }
        let pick = |&at: &usize| &state.log[at];
        let events: Vec<StoredEvent> = match read.direction {
            Direction::Forwards => entry
                .events
                .iter()
                .map(pick)
                .filter(|e| read.includes(e.version))
                .take(read.limit)
                .cloned()
                .collect(),
            Direction::Backwards => entry
                .events
                .iter()
                .rev()
                .map(pick)
                .filter(|e| read.includes(e.version))
                .take(read.limit)
                .cloned()
                .collect(),
        };
        Ok(events)
    }

    async fn read_all(&self, after: u64, limit: usize) -> Result<Vec<StoredEvent>, ReadError> {
        let state = self.lock();
        let start = usize::try_from(after).unwrap_or(usize::MAX);
        Ok(state.log.iter().skip(start).take(limit).cloned().collect())
    }

    async fn head_position(&self) -> Result<u64, ReadError> {
        Ok(*self.head.borrow())
    }

    fn appended_after(&self, after: u64) -> BoxFuture<'static, ()> {
        let mut head = self.head.subscribe();
        Box::pin(async move {
            let _ = head.wait_for(|&h| h > after).await;
        })
    }

    async fn stream_info(&self, stream: &str) -> Result<Option<StreamInfo>, ReadError> {
        let state = self.lock();
        Ok(state.streams.get(stream).map(|s| {
            StreamInfo::new(
                stream.to_owned(),
                s.events.len() as u64,
                s.deleted,
                s.metadata.clone(),
            )
        }))
    }

    async fn set_stream_metadata(
        &self,
        stream: &str,
        metadata: Map<String, Value>,
    ) -> Result<(), StoreWriteError> {
        if stream.is_empty() {
            return Err(StoreWriteError::Invalid("the stream name is empty".into()));
        }
        self.lock()
            .streams
            .entry(stream.to_owned())
            .or_default()
            .metadata = metadata;
        Ok(())
    }

    async fn delete_stream(
        &self,
        stream: &str,
        expected: ExpectedVersion,
    ) -> Result<(), StoreWriteError> {
        let mut state = self.lock();
        let entry = state.streams.entry(stream.to_owned()).or_default();
        let actual = entry.events.len() as u64;
        if !expected.accepts(Some(actual)) {
            return Err(StoreWriteError::Conflict {
                stream: stream.to_owned(),
                expected,
                actual,
            });
        }
        entry.deleted = true;
        state.snapshots.remove(stream);
        Ok(())
    }

    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<(), StoreWriteError> {
        self.lock()
            .snapshots
            .insert(snapshot.stream.clone(), snapshot);
        Ok(())
    }

    async fn load_snapshot(&self, stream: &str) -> Result<Option<Snapshot>, ReadError> {
        Ok(self.lock().snapshots.get(stream).cloned())
    }

    async fn load_checkpoint(&self, projection: &str) -> Result<Option<u64>, ReadError> {
        Ok(self.lock().checkpoints.get(projection).copied())
    }

    async fn save_checkpoint(
        &self,
        projection: &str,
        position: u64,
    ) -> Result<(), StoreWriteError> {
        self.lock()
            .checkpoints
            .insert(projection.to_owned(), position);
        Ok(())
    }

    async fn park_event(&self, parked: ParkedEvent) -> Result<(), StoreWriteError> {
        self.lock().parked.push(parked);
        Ok(())
    }

    async fn parked_events(&self, projection: &str) -> Result<Vec<ParkedEvent>, ReadError> {
        Ok(self
            .lock()
            .parked
            .iter()
            .filter(|p| p.projection == projection)
            .cloned()
            .collect())
    }

    async fn fetch_outbox(&self, limit: usize) -> Result<Vec<OutboxEntry>, ReadError> {
        Ok(self.lock().outbox.iter().take(limit).cloned().collect())
    }

    async fn remove_from_outbox(&self, ids: &[u64]) -> Result<(), StoreWriteError> {
        self.lock().outbox.retain(|e| !ids.contains(&e.id));
        Ok(())
    }
}
