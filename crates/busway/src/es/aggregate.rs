//! Aggregates and the repository that loads, decides and appends.

use std::marker::PhantomData;
use std::sync::Arc;

use busway_core::event_store::{
    AppendError, EventStore, ExpectedVersion, ReadError, Snapshot, StoredEvent, StreamRead,
};
use busway_core::{Message, Publish, Topic};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::codec::{decode_event, encode_event, DecodeError, EncodeError, Upcasters};

/// A consistency boundary whose state is the fold of its events.
///
/// `handle` decides: it checks a command against the current state and
/// returns the events that record the decision (or refuses). `apply`
/// evolves the state by one event and must not fail: events are facts.
///
/// ```
/// use busway::es::Aggregate;
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Default, Serialize, Deserialize)]
/// struct Counter { value: u64 }
///
/// #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
/// #[serde(tag = "type", content = "data")]
/// enum CounterEvent { #[serde(rename = "counter.added")] Added { by: u64 } }
///
/// #[derive(Debug, thiserror::Error)]
/// #[error("cannot add zero")]
/// struct AddZero;
///
/// impl Aggregate for Counter {
///     const TYPE: &'static str = "counter";
///     type Command = u64;
///     type Event = CounterEvent;
///     type Error = AddZero;
///     fn handle(&self, by: u64) -> Result<Vec<CounterEvent>, AddZero> {
///         if by == 0 { return Err(AddZero); }
///         Ok(vec![CounterEvent::Added { by }])
///     }
///     fn apply(&mut self, event: &CounterEvent) {
///         match event { CounterEvent::Added { by } => self.value += by }
///     }
/// }
/// ```
pub trait Aggregate: Default + Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The aggregate's type name; its streams are named `{TYPE}-{id}`.
    const TYPE: &'static str;
    /// The version of the state's serialized shape. Bump it when the state
    /// struct changes: older snapshots are then ignored and the state is
    /// rebuilt from the events.
    const SNAPSHOT_VERSION: u32 = 1;
    /// What it is asked to do.
    type Command: Send + 'static;
    /// What it records (an adjacently tagged enum, see [`encode_event`]).
    type Event: Serialize + DeserializeOwned + Clone + Send + Sync + 'static;
    /// Why it refuses a command.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Decides on `command`.
    fn handle(&self, command: Self::Command) -> Result<Vec<Self::Event>, Self::Error>;
    /// Evolves the state by one event.
    fn apply(&mut self, event: &Self::Event);
}

/// An aggregate as loaded.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Loaded<A> {
    /// Its state.
    pub state: A,
    /// The version of its stream that the state includes (0: new).
    pub version: u64,
    /// The snapshot version the load started from, if any.
    pub snapshot_version: Option<u64>,
    /// How many events were read and applied after the snapshot.
    pub events_applied: usize,
}

/// A command handled and its events stored.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Executed<A: Aggregate> {
    /// The state after the new events.
    pub state: A,
    /// The stream's version after the append.
    pub version: u64,
    /// The global position of the last event appended (0 if none).
    pub position: u64,
    /// The events the command produced (empty: nothing to record).
    pub events: Vec<A::Event>,
}

/// Loading an aggregate or handling a command failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RepositoryError<E: std::error::Error + 'static> {
    /// The aggregate refused the command; nothing was written.
    #[error("the command was refused: {0}")]
    Rejected(#[source] E),
    /// Another writer changed the aggregate in the meantime (retries, if
    /// any were allowed, are spent); nothing was written. Try again.
    #[error("stream `{stream}` changed concurrently: expected version {expected}, found {actual}")]
    Conflict {
        /// The stream.
        stream: String,
        /// The version the decision was based on.
        expected: u64,
        /// The version found.
        actual: u64,
    },
    /// A stored event could not be decoded.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// A new event could not be encoded.
    #[error(transparent)]
    Encode(#[from] EncodeError),
    /// A snapshot's state could not be encoded.
    #[error("encoding the snapshot failed: {0}")]
    Snapshot(String),
    /// Reading the stream failed.
    #[error("reading the stream failed")]
    Read(#[source] ReadError),
    /// Appending failed.
    #[error("appending failed")]
    Append(#[source] AppendError),
}

impl<E: std::error::Error + 'static> RepositoryError<E> {
    /// Whether executing the same command again may succeed (a conflict is
    /// decided again on the fresh state).
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Conflict { .. } => true,
            Self::Read(e) => e.is_retryable(),
            Self::Append(e) => e.is_retryable(),
            _ => false,
        }
    }
}

/// When the repository snapshots an aggregate by itself.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum SnapshotPolicy {
    /// Only on demand ([`Repository::snapshot`]).
    #[default]
    Never,
    /// Whenever an append crosses a multiple of this many events.
    Every(u64),
}

/// Loads aggregates from an [`EventStore`] (latest snapshot plus the events
/// after it), handles commands, and appends the new events with the
/// version the decision was based on.
///
/// ```
/// # use busway::es::Aggregate;
/// # use serde::{Deserialize, Serialize};
/// # #[derive(Default, Serialize, Deserialize)]
/// # struct Counter { value: u64 }
/// # #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
/// # #[serde(tag = "type", content = "data")]
/// # enum CounterEvent { #[serde(rename = "counter.added")] Added { by: u64 } }
/// # #[derive(Debug, thiserror::Error)]
/// # #[error("cannot add zero")]
/// # struct AddZero;
/// # impl Aggregate for Counter {
/// #     const TYPE: &'static str = "counter";
/// #     type Command = u64;
/// #     type Event = CounterEvent;
/// #     type Error = AddZero;
/// #     fn handle(&self, by: u64) -> Result<Vec<CounterEvent>, AddZero> {
/// #         if by == 0 { return Err(AddZero); }
/// #         Ok(vec![CounterEvent::Added { by }])
/// #     }
/// #     fn apply(&mut self, event: &CounterEvent) {
/// #         match event { CounterEvent::Added { by } => self.value += by }
/// #     }
/// # }
/// use std::sync::Arc;
/// use busway::es::{Repository, SnapshotPolicy};
/// use busway::memory::MemoryEventStore;
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let repository = Repository::<Counter>::new(Arc::new(MemoryEventStore::new()))
///     .with_snapshots(SnapshotPolicy::Every(100));
/// repository.execute("c1", 2).await?;
/// let done = repository.execute_retrying("c1", 3, 5).await?;
/// assert_eq!((done.state.value, done.version), (5, 2));
/// assert_eq!(repository.load("c1").await?.state.value, 5);
/// # Ok(())
/// # }
/// # tokio::runtime::Runtime::new().unwrap().block_on(run()).unwrap();
/// ```
pub struct Repository<A> {
    store: Arc<dyn EventStore>,
    upcasters: Arc<Upcasters>,
    snapshots: SnapshotPolicy,
    announce: bool,
    _aggregate: PhantomData<fn() -> A>,
}

impl<A> Clone for Repository<A> {
    fn clone(&self) -> Self {
        Self {
            store: self.store.clone(),
            upcasters: self.upcasters.clone(),
            snapshots: self.snapshots,
            announce: self.announce,
            _aggregate: PhantomData,
        }
    }
}

impl<A> std::fmt::Debug for Repository<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Repository")
            .field("snapshots", &self.snapshots)
            .field("announce", &self.announce)
            .finish_non_exhaustive()
    }
}

type RepoResult<T, A> = Result<T, RepositoryError<<A as Aggregate>::Error>>;

impl<A: Aggregate> Repository<A> {
    /// A repository on `store`; no snapshots, no announcements, no upcasters.
    pub fn new(store: Arc<dyn EventStore>) -> Self {
        Self {
            store,
            upcasters: Arc::new(Upcasters::new()),
            snapshots: SnapshotPolicy::Never,
            announce: false,
            _aggregate: PhantomData,
        }
    }

    /// Applies `upcasters` to events read, and writes their current schema versions.
    pub fn with_upcasters(mut self, upcasters: Upcasters) -> Self {
        self.upcasters = Arc::new(upcasters);
        self
    }

    /// Snapshots by itself as `policy` says.
    pub fn with_snapshots(mut self, policy: SnapshotPolicy) -> Self {
        self.snapshots = policy;
        self
    }

    /// Announces every appended event on the bus, through the store's
    /// outbox (committed with the events): as a reference-shaped
    /// [`Event`](crate::Event) published to the topic named by its type,
    /// so [`Bus::register_event_handler`](crate::Bus::register_event_handler) receives it.
    pub fn announcing(mut self) -> Self {
        self.announce = true;
        self
    }

    /// The store underneath.
    pub fn store(&self) -> &Arc<dyn EventStore> {
        &self.store
    }

    /// The stream name of aggregate `id`: `{TYPE}-{id}`.
    pub fn stream_name(id: &str) -> String {
        format!("{}-{id}", A::TYPE)
    }

    /// Loads aggregate `id`: its latest usable snapshot, then the events after it.
    pub async fn load(&self, id: &str) -> RepoResult<Loaded<A>, A> {
        let stream = Self::stream_name(id);
        let snapshot = self
            .store
            .load_snapshot(&stream)
            .await
            .map_err(RepositoryError::Read)?
            .filter(|s| s.schema_version == A::SNAPSHOT_VERSION)
            .and_then(|s| match serde_json::from_slice::<A>(&s.state) {
                Ok(state) => Some((state, s.version)),
                Err(e) => {
                    tracing::warn!(stream, error = %e, "ignoring a snapshot that does not decode");
                    None
                }
            });
        let (mut state, snapshot_version) = match snapshot {
            Some((state, version)) => (state, Some(version)),
            None => (A::default(), None),
        };
        let from = snapshot_version.unwrap_or(0) + 1;
        let events = self
            .store
            .read_stream(&stream, StreamRead::forwards_from(from))
            .await
            .map_err(RepositoryError::Read)?;
        let mut version = snapshot_version.unwrap_or(0);
        for stored in &events {
            let event: A::Event = decode_event(stored, &self.upcasters)?;
            state.apply(&event);
            version = stored.version;
        }
        Ok(Loaded {
            state,
            version,
            snapshot_version,
            events_applied: events.len(),
        })
    }

    /// Loads `id`, handles `command`, and appends the events expecting the
    /// version it loaded. A concurrent change is a
    /// [`Conflict`](RepositoryError::Conflict); see [`execute_retrying`](Self::execute_retrying).
    pub async fn execute(&self, id: &str, command: A::Command) -> RepoResult<Executed<A>, A> {
        let loaded = self.load(id).await?;
        self.decide_and_append(id, loaded, command).await
    }

    /// Like [`execute`](Self::execute), deciding again on fresh state up to
    /// `attempts` times in all while other writers win the race.
    pub async fn execute_retrying(
        &self,
        id: &str,
        command: A::Command,
        attempts: u32,
    ) -> RepoResult<Executed<A>, A>
    where
        A::Command: Clone,
    {
        let mut attempt = 1;
        loop {
            match self.execute(id, command.clone()).await {
                Err(RepositoryError::Conflict { .. }) if attempt < attempts => attempt += 1,
                other => return other,
            }
        }
    }

    async fn decide_and_append(
        &self,
        id: &str,
        loaded: Loaded<A>,
        command: A::Command,
    ) -> RepoResult<Executed<A>, A> {
        let Loaded {
            mut state, version, ..
        } = loaded;
        let events = state.handle(command).map_err(RepositoryError::Rejected)?;
        if events.is_empty() {
            return Ok(Executed {
                state,
                version,
                position: 0,
                events,
            });
        }
        let stream = Self::stream_name(id);
        let mut new_events = Vec::with_capacity(events.len());
        let mut announcements = Vec::new();
        for (i, event) in events.iter().enumerate() {
            let encoded = encode_event(event, &self.upcasters)?;
            if self.announce {
                announcements.push(announcement(id, version + 1 + i as u64, &encoded)?);
            }
            new_events.push(encoded);
        }
        let outcome = self
            .store
            .append_announced(
                &stream,
                ExpectedVersion::Exact(version),
                new_events,
                announcements,
            )
            .await
            .map_err(|e| match e {
                AppendError::Conflict { stream, actual, .. } => RepositoryError::Conflict {
                    stream,
                    expected: version,
                    actual,
                },
                e => RepositoryError::Append(e),
            })?;
        for event in &events {
            state.apply(event);
        }
        if let SnapshotPolicy::Every(n) = self.snapshots {
            if n > 0 && version / n != outcome.version / n {
                if let Err(e) = self.save_snapshot(&stream, &state, outcome.version).await {
                    tracing::warn!(stream, error = %e, "saving a snapshot failed; loads replay more events");
                }
            }
        }
        Ok(Executed {
            state,
            version: outcome.version,
            position: outcome.position,
            events,
        })
    }

    async fn save_snapshot(&self, stream: &str, state: &A, version: u64) -> RepoResult<(), A> {
        let bytes =
            serde_json::to_vec(state).map_err(|e| RepositoryError::Snapshot(e.to_string()))?;
        self.store
            .save_snapshot(Snapshot::new(
                stream,
                version,
                A::SNAPSHOT_VERSION,
                bytes.into(),
            ))
            .await
            .map_err(|e| RepositoryError::Snapshot(e.to_string()))
    }

    /// Snapshots aggregate `id` now; returns the version snapshotted.
    pub async fn snapshot(&self, id: &str) -> RepoResult<u64, A> {
        let loaded = self.load(id).await?;
        self.save_snapshot(&Self::stream_name(id), &loaded.state, loaded.version)
            .await?;
        Ok(loaded.version)
    }

    /// The stored events of aggregate `id`, oldest first.
    pub async fn history(&self, id: &str) -> RepoResult<Vec<StoredEvent>, A> {
        self.store
            .read_stream(&Self::stream_name(id), StreamRead::all())
            .await
            .map_err(RepositoryError::Read)
    }
}

/// The reference-shaped event announcing `encoded`, to the topic of its type.
fn announcement<E: std::error::Error + 'static>(
    aggregate_id: &str,
    version: u64,
    encoded: &busway_core::event_store::NewEvent,
) -> Result<Publish, RepositoryError<E>> {
    let encode = |e: String| RepositoryError::Encode(EncodeError::from_reason(e));
    let data: serde_json::Value =
        serde_json::from_slice(&encoded.data).map_err(|e| encode(e.to_string()))?;
    let mut event =
        crate::Event::new(encoded.event_type.clone(), aggregate_id, data).with_version(version);
    event.event_id = encoded.id.to_string();
    event.metadata = encoded.metadata.clone();
    let topic = Topic::new(&encoded.event_type).map_err(|e| encode(e.to_string()))?;
    let message =
        Message::json(encoded.event_type.clone(), &event).map_err(|e| encode(e.to_string()))?;
    Ok(Publish::to_topic(topic, message))
}
