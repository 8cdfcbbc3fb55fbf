//! The event store: append-only streams of events with optimistic
//! concurrency, one global order, snapshots, projection checkpoints and an
//! outbox. Backends implement [`EventStore`]; this module does no I/O.
//!
//! Every event belongs to a **stream** (`user-42`) and has a **version** in
//! it (1, 2, 3, …) and a **position** in the global log of the store
//! (strictly increasing in commit order; there may be gaps). Appends check
//! an [`ExpectedVersion`] inside the write, so two writers racing on one
//! stream cannot both win, and are idempotent by event id: appending the
//! same events again (a retry after a lost reply) returns the first
//! outcome instead of writing duplicates.
//!
//! ```
//! use busway_core::event_store::{ExpectedVersion, NewEvent};
//!
//! let event = NewEvent::json("user.registered", &serde_json::json!({"email": "a@b.test"}))?;
//! assert_eq!(event.event_type, "user.registered");
//! assert_eq!(event.schema_version, 1);
//! assert!(ExpectedVersion::Exact(3).accepts(Some(3)));
//! assert!(!ExpectedVersion::NoStream.accepts(Some(1)));
//! # Ok::<(), serde_json::Error>(())
//! ```

use std::fmt;

use async_trait::async_trait;
use bytes::Bytes;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::error::BoxError;
use crate::message::unix_millis;
use crate::transport::Publish;

/// The longest stream name a store accepts, in bytes.
pub const MAX_STREAM_NAME_BYTES: usize = 512;

/// An event to append.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct NewEvent {
    /// Unique id; appending an event whose id is already stored is a retry, not a new event.
    pub id: Uuid,
    /// The type name: `user.registered`.
    pub event_type: String,
    /// The version of the payload's shape for this type (for upcasting), starting at 1.
    pub schema_version: u32,
    /// The payload, JSON.
    pub data: Bytes,
    /// Free-form metadata: correlation and causation ids, user, source, …
    pub metadata: Map<String, Value>,
}

impl NewEvent {
    /// An event with a fresh UUIDv7 id, schema version 1, no metadata, `data` as given (JSON).
    pub fn new(event_type: impl Into<String>, data: impl Into<Bytes>) -> Self {
        Self {
            id: Uuid::now_v7(),
            event_type: event_type.into(),
            schema_version: 1,
            data: data.into(),
            metadata: Map::new(),
        }
    }
    /// An event whose payload is `data` encoded as JSON.
    pub fn json<T: Serialize + ?Sized>(
        event_type: impl Into<String>,
        data: &T,
    ) -> Result<Self, serde_json::Error> {
        Ok(Self::new(event_type, serde_json::to_vec(data)?))
    }
    /// Sets the id (to make a retried append idempotent, keep the ids of the first try).
    pub fn with_id(mut self, id: Uuid) -> Self {
        self.id = id;
        self
    }
    /// Sets the schema version.
    pub fn with_schema_version(mut self, version: u32) -> Self {
        self.schema_version = version;
        self
    }
    /// Adds a metadata entry.
    pub fn with_metadata(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }
}

/// An event as stored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct StoredEvent {
    /// The stream it belongs to.
    pub stream: String,
    /// Its version in the stream, from 1.
    pub version: u64,
    /// Its position in the global log of the store, from 1, increasing in commit order.
    pub position: u64,
    /// Its unique id.
    pub id: Uuid,
    /// The type name.
    pub event_type: String,
    /// The version of the payload's shape.
    pub schema_version: u32,
    /// The payload, JSON.
    pub data: Bytes,
    /// Metadata.
    pub metadata: Map<String, Value>,
    /// When it was appended, milliseconds since the Unix epoch.
    pub recorded_at_ms: u64,
}

impl StoredEvent {
    /// Builds a stored event (for backends).
    pub fn new(
        stream: String,
        version: u64,
        position: u64,
        event: NewEvent,
        recorded_at_ms: u64,
    ) -> Self {
        Self {
            stream,
            version,
            position,
            id: event.id,
            event_type: event.event_type,
            schema_version: event.schema_version,
            data: event.data,
            metadata: event.metadata,
            recorded_at_ms,
        }
    }
    /// The payload decoded from JSON.
    pub fn data_json(&self) -> Result<Value, serde_json::Error> {
        serde_json::from_slice(&self.data)
    }
}

/// What the writer believes the stream's version is; checked inside the append.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ExpectedVersion {
    /// No check.
    Any,
    /// The stream must not exist (no event yet).
    NoStream,
    /// The stream's last event must have this version (`Exact(0)` = no event yet, like `NoStream`).
    Exact(u64),
}

impl ExpectedVersion {
    /// Whether a stream whose current version is `actual` (`None`: no event) passes the check.
    pub fn accepts(self, actual: Option<u64>) -> bool {
        match self {
            Self::Any => true,
            Self::NoStream => actual.unwrap_or(0) == 0,
            Self::Exact(v) => actual.unwrap_or(0) == v,
        }
    }
}

impl fmt::Display for ExpectedVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Any => f.write_str("any version"),
            Self::NoStream => f.write_str("no stream"),
            Self::Exact(v) => write!(f, "version {v}"),
        }
    }
}

/// What an append did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct AppendOutcome {
    /// The stream's version after the append (the version of its last event).
    pub version: u64,
    /// The global position of the last event appended (or found, for a retry).
    pub position: u64,
    /// `true` when every event was already stored (a retried append): nothing was written.
    pub deduplicated: bool,
}

impl AppendOutcome {
    /// Builds an outcome (for backends).
    pub fn new(version: u64, position: u64, deduplicated: bool) -> Self {
        Self {
            version,
            position,
            deduplicated,
        }
    }
}

/// Appending failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AppendError {
    /// Another writer got there first: the stream is at `actual`, not at
    /// `expected`. Reload the stream, decide again, and append with the new
    /// version; nothing was written.
    #[error("stream `{stream}` expected at {expected} but is at version {actual}")]
    Conflict {
        /// The stream.
        stream: String,
        /// What the caller expected.
        expected: ExpectedVersion,
        /// The stream's version now (0: no event).
        actual: u64,
    },
    /// Some of the events' ids are stored, but not as exactly this batch on
    /// this stream: the caller reused ids. Nothing was written; do not retry.
    #[error("event id {id} is already stored, but not as part of this same append to `{stream}`")]
    DuplicateEventId {
        /// The stream.
        stream: String,
        /// The first clashing id.
        id: Uuid,
    },
    /// The stream was deleted. Nothing was written.
    #[error("stream `{stream}` is deleted")]
    StreamDeleted {
        /// The stream.
        stream: String,
    },
    /// The stream name or an event is not acceptable (empty name, empty batch, bad JSON …).
    #[error("invalid append to `{stream}`: {reason}")]
    Invalid {
        /// The stream.
        stream: String,
        /// What is wrong.
        reason: String,
    },
    /// The store is closed.
    #[error("the event store is closed")]
    Closed,
    /// The backend failed; whether the events were written is unknown, so
    /// retry with the same event ids (the append is idempotent).
    #[error("the event store failed")]
    Backend(#[source] BoxError),
}

impl AppendError {
    /// Whether the same append may succeed if tried again unchanged. A
    /// [`Conflict`](Self::Conflict) is not: the caller must decide again on fresh state.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Backend(_))
    }
}

/// Reading failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReadError {
    /// The stream was deleted.
    #[error("stream `{stream}` is deleted")]
    StreamDeleted {
        /// The stream.
        stream: String,
    },
    /// The store is closed.
    #[error("the event store is closed")]
    Closed,
    /// A stored row could not be read back (corrupted column).
    #[error("corrupted record: {0}")]
    Corrupted(String),
    /// The backend failed.
    #[error("the event store failed")]
    Backend(#[source] BoxError),
}

impl ReadError {
    /// Whether reading again may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Backend(_))
    }
}

/// A write other than an append (metadata, delete, snapshot, checkpoint, outbox) failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreWriteError {
    /// The stream is not at the expected version.
    #[error("stream `{stream}` expected at {expected} but is at version {actual}")]
    Conflict {
        /// The stream.
        stream: String,
        /// What the caller expected.
        expected: ExpectedVersion,
        /// The stream's version now.
        actual: u64,
    },
    /// The input is not acceptable.
    #[error("invalid write: {0}")]
    Invalid(String),
    /// The store is closed.
    #[error("the event store is closed")]
    Closed,
    /// The backend failed.
    #[error("the event store failed")]
    Backend(#[source] BoxError),
}

impl StoreWriteError {
    /// Whether writing again may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Backend(_))
    }
}

/// The direction of a stream read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// From the given version up.
    Forwards,
    /// From the given version down.
    Backwards,
}

/// A stream read: from which version, which way, how many.
///
/// ```
/// use busway_core::event_store::{Direction, StreamRead};
/// let read = StreamRead::forwards_from(5).limit(100);
/// assert_eq!((read.from, read.direction, read.limit), (5, Direction::Forwards, 100));
/// let last = StreamRead::backwards_from_end().limit(1);
/// assert_eq!(last.from, u64::MAX);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct StreamRead {
    /// The first version to return (inclusive).
    pub from: u64,
    /// Which way.
    pub direction: Direction,
    /// The most events to return.
    pub limit: usize,
}

impl StreamRead {
    /// Every event, oldest first.
    pub fn all() -> Self {
        Self::forwards_from(1)
    }
    /// Events with version ≥ `from`, oldest first.
    pub fn forwards_from(from: u64) -> Self {
        Self {
            from,
            direction: Direction::Forwards,
            limit: usize::MAX,
        }
    }
    /// Events with version ≤ `from`, newest first.
    pub fn backwards_from(from: u64) -> Self {
        Self {
            from,
            direction: Direction::Backwards,
            limit: usize::MAX,
        }
    }
    /// Every event, newest first.
    pub fn backwards_from_end() -> Self {
        Self::backwards_from(u64::MAX)
    }
    /// Returns at most `limit` events.
    pub fn limit(mut self, limit: usize) -> Self {
        self.limit = limit;
        self
    }
    /// Whether `version` is within the read's range (for backends).
    pub fn includes(&self, version: u64) -> bool {
        match self.direction {
            Direction::Forwards => version >= self.from,
            Direction::Backwards => version <= self.from,
        }
    }
}

/// What the store knows about a stream.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct StreamInfo {
    /// The stream.
    pub stream: String,
    /// The version of its last event (0: none).
    pub version: u64,
    /// Whether it was deleted (soft delete: its events stay in the global log).
    pub deleted: bool,
    /// Metadata set with [`EventStore::set_stream_metadata`].
    pub metadata: Map<String, Value>,
}

impl StreamInfo {
    /// Builds stream info (for backends).
    pub fn new(stream: String, version: u64, deleted: bool, metadata: Map<String, Value>) -> Self {
        Self {
            stream,
            version,
            deleted,
            metadata,
        }
    }
}

/// A snapshot of an aggregate's state at a version of its stream.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct Snapshot {
    /// The stream.
    pub stream: String,
    /// The stream version the state includes.
    pub version: u64,
    /// The version of the state's shape: a snapshot whose shape version
    /// differs from the aggregate's current one is ignored (full replay).
    pub schema_version: u32,
    /// The state, JSON.
    pub state: Bytes,
}

impl Snapshot {
    /// A snapshot of `stream` at `version`.
    pub fn new(stream: impl Into<String>, version: u64, schema_version: u32, state: Bytes) -> Self {
        Self {
            stream: stream.into(),
            version,
            schema_version,
            state,
        }
    }
}

/// An event a projection could not handle and skipped, kept with the reason.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct ParkedEvent {
    /// The projection that skipped it.
    pub projection: String,
    /// The stream of the event.
    pub stream: String,
    /// Its version in the stream.
    pub version: u64,
    /// Its global position.
    pub position: u64,
    /// Why it was skipped.
    pub reason: String,
}

impl ParkedEvent {
    /// A parked event record.
    pub fn new(
        projection: impl Into<String>,
        event: &StoredEvent,
        reason: impl Into<String>,
    ) -> Self {
        Self {
            projection: projection.into(),
            stream: event.stream.clone(),
            version: event.version,
            position: event.position,
            reason: reason.into(),
        }
    }
}

impl ParkedEvent {
    /// A parked event record from its parts (for backends reading them back).
    pub fn from_parts(
        projection: String,
        stream: String,
        version: u64,
        position: u64,
        reason: String,
    ) -> Self {
        Self {
            projection,
            stream,
            version,
            position,
            reason,
        }
    }
}

/// A message committed with the events it announces, waiting for the relay.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct OutboxEntry {
    /// The entry's id in the outbox (increasing).
    pub id: u64,
    /// What to publish.
    pub publish: Publish,
}

impl OutboxEntry {
    /// An outbox entry (for backends).
    pub fn new(id: u64, publish: Publish) -> Self {
        Self { id, publish }
    }
}

/// A durable, append-only event store. Object safe: use it as
/// `Arc<dyn EventStore>`.
///
/// ```
/// use busway_core::event_store::{EventStore, ExpectedVersion, NewEvent, StreamRead};
///
/// async fn register(store: &dyn EventStore) -> Result<(), Box<dyn std::error::Error>> {
///     let event = NewEvent::json("user.registered", &serde_json::json!({"email": "a@b.test"}))?;
///     let outcome = store.append("user-1", ExpectedVersion::NoStream, vec![event]).await?;
///     assert_eq!(outcome.version, 1);
///     let events = store.read_stream("user-1", StreamRead::all()).await?;
///     assert_eq!(events[0].event_type, "user.registered");
///     Ok(())
/// }
/// ```
#[async_trait]
pub trait EventStore: Send + Sync + 'static {
    /// Appends `events` to `stream` if it is at `expected`, atomically (all
    /// or nothing), and returns the new version. Retrying an append whose
    /// events are already stored returns the stored outcome with
    /// `deduplicated: true`.
    async fn append(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendOutcome, AppendError> {
        self.append_announced(stream, expected, events, Vec::new())
            .await
    }

    /// Like [`append`](Self::append), and commits `announcements` in the
    /// same transaction (the outbox): they reach the transport even if the
    /// process dies right after the commit. Backends whose queue lives in
    /// the same database enqueue them directly; the others keep them in an
    /// outbox that a relay drains ([`fetch_outbox`](Self::fetch_outbox)).
    /// A deduplicated retry does not announce again.
    async fn append_announced(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
        announcements: Vec<Publish>,
    ) -> Result<AppendOutcome, AppendError>;

    /// Events of one stream, as [`StreamRead`] says. A stream with no event returns none.
    async fn read_stream(
        &self,
        stream: &str,
        read: StreamRead,
    ) -> Result<Vec<StoredEvent>, ReadError>;

    /// Up to `limit` events of every stream with a position greater than
    /// `after`, in global order (`after = 0`: from the start). Deleted
    /// streams' events are included: the log is the history.
    async fn read_all(&self, after: u64, limit: usize) -> Result<Vec<StoredEvent>, ReadError>;

    /// The position of the last event committed (0: none).
    async fn head_position(&self) -> Result<u64, ReadError>;

    /// Resolves when events after position `after` may have been committed;
    /// a hint for followers, who also poll. The default never resolves.
    fn appended_after(&self, after: u64) -> BoxFuture<'static, ()> {
        let _ = after;
        Box::pin(futures::future::pending())
    }

    /// What the store knows about `stream`; `None` if it never had an event or metadata.
    async fn stream_info(&self, stream: &str) -> Result<Option<StreamInfo>, ReadError>;

    /// Replaces the stream's metadata.
    async fn set_stream_metadata(
        &self,
        stream: &str,
        metadata: Map<String, Value>,
    ) -> Result<(), StoreWriteError>;

    /// Soft-deletes `stream` if it is at `expected`: reads and appends then
    /// fail with `StreamDeleted`, its events stay in the global log.
    async fn delete_stream(
        &self,
        stream: &str,
        expected: ExpectedVersion,
    ) -> Result<(), StoreWriteError>;

    /// Stores a snapshot, replacing the stream's previous one.
    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<(), StoreWriteError>;

    /// The stream's latest snapshot.
    async fn load_snapshot(&self, stream: &str) -> Result<Option<Snapshot>, ReadError>;

    /// The position a projection has handled up to (`None`: never ran).
    async fn load_checkpoint(&self, projection: &str) -> Result<Option<u64>, ReadError>;

    /// Records that `projection` has handled every event up to `position`.
    async fn save_checkpoint(&self, projection: &str, position: u64)
        -> Result<(), StoreWriteError>;

    /// Keeps an event a projection skipped, with the reason.
    async fn park_event(&self, parked: ParkedEvent) -> Result<(), StoreWriteError>;

    /// The events `projection` has skipped.
    async fn parked_events(&self, projection: &str) -> Result<Vec<ParkedEvent>, ReadError>;

    /// Up to `limit` announcements waiting in the outbox, oldest first.
    /// Backends that enqueue announcements in the same transaction return none.
    async fn fetch_outbox(&self, limit: usize) -> Result<Vec<OutboxEntry>, ReadError> {
        let _ = limit;
        Ok(Vec::new())
    }

    /// Removes announcements the relay has published.
    async fn remove_from_outbox(&self, ids: &[u64]) -> Result<(), StoreWriteError> {
        let _ = ids;
        Ok(())
    }
}

/// Checks a stream name and a batch before an append (for backends).
pub fn validate_append(stream: &str, events: &[NewEvent]) -> Result<(), AppendError> {
    let invalid = |reason: String| AppendError::Invalid {
        stream: stream.to_owned(),
        reason,
    };
    if stream.is_empty() {
        return Err(invalid("the stream name is empty".into()));
    }
    if stream.len() > MAX_STREAM_NAME_BYTES {
        return Err(invalid(format!(
            "the stream name is {} bytes long; the maximum is {MAX_STREAM_NAME_BYTES}",
            stream.len()
        )));
    }
    if events.is_empty() {
        return Err(invalid("no events to append".into()));
    }
    for (i, event) in events.iter().enumerate() {
        if event.event_type.is_empty() {
            return Err(invalid(format!("event {i} has an empty type")));
        }
        if events[..i].iter().any(|e| e.id == event.id) {
            return Err(invalid(format!("event id {} appears twice", event.id)));
        }
    }
    Ok(())
}

/// Milliseconds since the Unix epoch, now (for backends).
pub fn now_ms() -> u64 {
    u64::try_from(unix_millis(std::time::SystemTime::now())).unwrap_or(0)
}
