//! [`SqliteEventStore`]: event streams in the same SQLite file as the queues.

use std::sync::Arc;

use async_trait::async_trait;
use busway_core::event_store::{
    validate_append, AppendError, AppendOutcome, Direction, EventStore, ExpectedVersion, NewEvent,
    ParkedEvent, ReadError, Snapshot, StoreWriteError, StoredEvent, StreamInfo, StreamRead,
};
use busway_core::{BoxError, Publish};
use futures::future::BoxFuture;
use rusqlite::{params, Connection, OptionalExtension, Row};
use serde_json::{Map, Value};
use tokio::sync::watch;
use uuid::Uuid;

use crate::job::{WriteError, WriteTx};
use crate::transport::SqliteTransport;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS busway_events (
    position INTEGER PRIMARY KEY,
    stream TEXT NOT NULL,
    version INTEGER NOT NULL,
    event_id BLOB NOT NULL,
    event_type TEXT NOT NULL,
    schema_version INTEGER NOT NULL,
    data BLOB NOT NULL,
    metadata TEXT,
    recorded_at_ms INTEGER NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS busway_events_stream_version ON busway_events (stream, version);
CREATE UNIQUE INDEX IF NOT EXISTS busway_events_event_id ON busway_events (event_id);
CREATE TABLE IF NOT EXISTS busway_streams (
    stream TEXT PRIMARY KEY,
    version INTEGER NOT NULL,
    deleted INTEGER NOT NULL DEFAULT 0,
    metadata TEXT
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS busway_snapshots (
    stream TEXT PRIMARY KEY,
    version INTEGER NOT NULL,
    schema_version INTEGER NOT NULL,
    state BLOB NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS busway_checkpoints (
    projection TEXT PRIMARY KEY,
    position INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS busway_parked_events (
    id INTEGER PRIMARY KEY,
    projection TEXT NOT NULL,
    stream TEXT NOT NULL,
    version INTEGER NOT NULL,
    position INTEGER NOT NULL,
    reason TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS busway_parked_events_projection ON busway_parked_events (projection, position);
";

const EVENT_COLUMNS: &str =
    "stream, version, position, event_id, event_type, schema_version, data, metadata, recorded_at_ms";

/// A durable [`EventStore`] in the database of a [`SqliteTransport`].
///
/// Every append is a job of the transport's writer: the expected-version
/// check and the insert run in one transaction, and concurrent appends
/// share one commit and one fsync (group commit). Positions in the global
/// log are the rowids of `busway_events`: one writer at a time per file, so
/// they grow in commit order without gaps.
///
/// **Outbox.** [`append_announced`](EventStore::append_announced) enqueues
/// the announcing messages in the same transaction as the events, on the
/// transport's own queues: committed together or not at all, so no relay
/// is needed — the queue *is* the outbox.
///
/// **Read models.** [`apply_projection`](Self::apply_projection) runs a
/// projection's SQL and saves its checkpoint in one transaction, so a read
/// model in this file is exactly as current as its checkpoint says, even
/// after a crash.
///
/// Tables: `busway_events`, `busway_streams`, `busway_snapshots`,
/// `busway_checkpoints`, `busway_parked_events`.
///
/// ```
/// use busway_core::event_store::{EventStore, ExpectedVersion, NewEvent, StreamRead};
/// use busway_sqlite::{SqliteEventStore, SqliteTransport};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # tokio::runtime::Runtime::new()?.block_on(async {
/// let dir = tempfile::tempdir()?;
/// let transport = SqliteTransport::open(dir.path().join("busway.db"))?;
/// let store = SqliteEventStore::open(transport).await?;
/// let event = NewEvent::json("user.registered", &serde_json::json!({"name": "Ann"}))?;
/// store.append("user-1", ExpectedVersion::NoStream, vec![event]).await?;
/// let events = store.read_stream("user-1", StreamRead::all()).await?;
/// assert_eq!(events[0].version, 1);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// # })
/// # }
/// ```
#[derive(Clone)]
pub struct SqliteEventStore {
    transport: SqliteTransport,
    head: Arc<watch::Sender<u64>>,
}

impl std::fmt::Debug for SqliteEventStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteEventStore")
            .field("head", &*self.head.borrow())
            .finish_non_exhaustive()
    }
}

fn backend(e: WriteError) -> BoxError {
    Box::new(e)
}

impl From<WriteError> for AppendError {
    fn from(e: WriteError) -> Self {
        match e {
            WriteError::Closed => AppendError::Closed,
            e => AppendError::Backend(backend(e)),
        }
    }
}

fn read_error(e: WriteError) -> ReadError {
    match e {
        WriteError::Closed => ReadError::Closed,
        WriteError::Database { source, .. }
            if matches!(
                *source,
                rusqlite::Error::FromSqlConversionFailure(..)
                    | rusqlite::Error::InvalidColumnType(..)
            ) =>
        {
            ReadError::Corrupted(source.to_string())
        }
        e => ReadError::Backend(backend(e)),
    }
}

/// A write job's own failure, or the transport's.
enum JobError {
    Write(WriteError),
    Store(StoreWriteError),
}

impl From<WriteError> for JobError {
    fn from(e: WriteError) -> Self {
        JobError::Write(e)
    }
}

impl From<rusqlite::Error> for JobError {
    fn from(e: rusqlite::Error) -> Self {
        JobError::Write(e.into())
    }
}

impl From<JobError> for StoreWriteError {
    fn from(e: JobError) -> Self {
        match e {
            JobError::Store(e) => e,
            JobError::Write(WriteError::Closed) => StoreWriteError::Closed,
            JobError::Write(e) => StoreWriteError::Backend(backend(e)),
        }
    }
}

fn corrupted(column: usize, what: impl Into<BoxError>) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(column, rusqlite::types::Type::Blob, what.into())
}

fn metadata_text(metadata: &Map<String, Value>) -> Option<String> {
    if metadata.is_empty() {
        None
    } else {
        Some(Value::Object(metadata.clone()).to_string())
    }
}

fn parse_metadata(column: usize, text: Option<String>) -> rusqlite::Result<Map<String, Value>> {
    match text {
        None => Ok(Map::new()),
        Some(text) => serde_json::from_str(&text).map_err(|e| corrupted(column, e)),
    }
}

fn u64_column(row: &Row<'_>, column: usize) -> rusqlite::Result<u64> {
    let value: i64 = row.get(column)?;
    u64::try_from(value).map_err(|e| corrupted(column, e))
}

fn event_from_row(row: &Row<'_>) -> rusqlite::Result<StoredEvent> {
    let id: Vec<u8> = row.get(3)?;
    let id = Uuid::from_slice(&id).map_err(|e| corrupted(3, e))?;
    let schema_version: i64 = row.get(5)?;
    let event = NewEvent::new(row.get::<_, String>(4)?, row.get::<_, Vec<u8>>(6)?)
        .with_id(id)
        .with_schema_version(u32::try_from(schema_version).map_err(|e| corrupted(5, e))?);
    let mut event = event;
    event.metadata = parse_metadata(7, row.get(7)?)?;
    Ok(StoredEvent::new(
        row.get(0)?,
        u64_column(row, 1)?,
        u64_column(row, 2)?,
        event,
        u64_column(row, 8)?,
    ))
}

fn as_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// `(version, deleted)` of a stream.
fn stream_state(conn: &Connection, stream: &str) -> rusqlite::Result<Option<(u64, bool)>> {
    conn.prepare_cached("SELECT version, deleted FROM busway_streams WHERE stream = ?1")?
        .query_row([stream], |row| Ok((u64_column(row, 0)?, row.get(1)?)))
        .optional()
}

/// If the batch's first id is stored: the stored outcome when the whole
/// batch is stored as consecutive events of `stream`, else a clash.
fn find_retry(
    conn: &Connection,
    stream: &str,
    events: &[NewEvent],
) -> Result<Option<AppendOutcome>, AppendError> {
    let mut lookup = conn
        .prepare_cached("SELECT stream, version, position FROM busway_events WHERE event_id = ?1")
        .map_err(WriteError::from)?;
    let mut find = |id: Uuid| -> Result<Option<(String, u64, u64)>, AppendError> {
        lookup
            .query_row([id.as_bytes().as_slice()], |row| {
                Ok((row.get(0)?, u64_column(row, 1)?, u64_column(row, 2)?))
            })
            .optional()
            .map_err(|e| WriteError::from(e).into())
    };
    let Some((first_stream, first_version, mut position)) = find(events[0].id)? else {
        return Ok(None);
    };
    let clash = |id: Uuid| AppendError::DuplicateEventId {
        stream: stream.to_owned(),
        id,
    };
    if first_stream != stream {
        return Err(clash(events[0].id));
    }
    for (i, event) in events.iter().enumerate().skip(1) {
        match find(event.id)? {
            Some((s, v, p)) if s == stream && v == first_version + i as u64 => position = p,
            _ => return Err(clash(event.id)),
        }
    }
    Ok(Some(AppendOutcome::new(
        first_version + events.len() as u64 - 1,
        position,
        true,
    )))
}

fn append_in(
    tx: &mut WriteTx<'_>,
    stream: &str,
    expected: ExpectedVersion,
    events: Vec<NewEvent>,
    announcements: &[Publish],
) -> Result<AppendOutcome, AppendError> {
    let outcome = insert_events(tx.connection(), tx.now_millis(), stream, expected, &events)?;
    if !outcome.deduplicated && !announcements.is_empty() {
        tx.publish(announcements).map_err(WriteError::from)?;
    }
    Ok(outcome)
}

fn insert_events(
    conn: &Connection,
    now: i64,
    stream: &str,
    expected: ExpectedVersion,
    events: &[NewEvent],
) -> Result<AppendOutcome, AppendError> {
    if let Some(outcome) = find_retry(conn, stream, events)? {
        return Ok(outcome);
    }
    let state = stream_state(conn, stream).map_err(WriteError::from)?;
    if state.is_some_and(|(_, deleted)| deleted) {
        return Err(AppendError::StreamDeleted {
            stream: stream.to_owned(),
        });
    }
    let actual = state.map_or(0, |(version, _)| version);
    if !expected.accepts(Some(actual)) {
        return Err(AppendError::Conflict {
            stream: stream.to_owned(),
            expected,
            actual,
        });
    }
    let mut insert = conn
        .prepare_cached(
            "INSERT INTO busway_events (stream, version, event_id, event_type, schema_version, \
             data, metadata, recorded_at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )
        .map_err(WriteError::from)?;
    let mut version = actual;
    for event in events {
        version += 1;
        let inserted = insert.execute(params![
            stream,
            as_i64(version),
            event.id.as_bytes().as_slice(),
            event.event_type,
            event.schema_version,
            event.data.as_ref(),
            metadata_text(&event.metadata),
            now,
        ]);
        match inserted {
            Ok(_) => {}
            Err(rusqlite::Error::SqliteFailure(f, _))
                if f.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                return Err(AppendError::DuplicateEventId {
                    stream: stream.to_owned(),
                    id: event.id,
                })
            }
            Err(e) => return Err(WriteError::from(e).into()),
        }
    }
    let position = u64::try_from(conn.last_insert_rowid()).unwrap_or(0);
    conn.prepare_cached(
        "INSERT INTO busway_streams (stream, version) VALUES (?1, ?2) \
         ON CONFLICT (stream) DO UPDATE SET version = excluded.version",
    )
    .and_then(|mut s| s.execute(params![stream, as_i64(version)]))
    .map_err(WriteError::from)?;
    Ok(AppendOutcome::new(version, position, false))
}

impl SqliteEventStore {
    /// The event store in `transport`'s database; creates its tables if needed.
    pub async fn open(transport: SqliteTransport) -> Result<Self, WriteError> {
        transport
            .write(|tx| {
                tx.connection().execute_batch(SCHEMA)?;
                Ok::<_, WriteError>(())
            })
            .await?;
        let head = transport
            .read(|conn| {
                conn.query_row(
                    "SELECT coalesce(max(position), 0) FROM busway_events",
                    [],
                    |r| u64_column(r, 0),
                )
            })
            .await?;
        Ok(Self {
            transport,
            head: Arc::new(watch::channel(head).0),
        })
    }

    /// The transport whose database holds the store.
    pub fn transport(&self) -> &SqliteTransport {
        &self.transport
    }

    fn advance_head(&self, position: u64) {
        self.head.send_if_modified(|head| {
            let newer = position > *head;
            if newer {
                *head = position;
            }
            newer
        });
    }

    /// Runs `update` (a projection's writes to its read model, in this
    /// database) and records `projection`'s checkpoint at `position`, in one
    /// transaction: after a crash the read model and the checkpoint agree.
    ///
    /// ```
    /// use busway_sqlite::{SqliteEventStore, SqliteTransport};
    /// use busway_core::event_store::EventStore;
    ///
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # tokio::runtime::Runtime::new()?.block_on(async {
    /// let dir = tempfile::tempdir()?;
    /// let store = SqliteEventStore::open(SqliteTransport::open(dir.path().join("busway.db"))?).await?;
    /// store.apply_projection("user_count", 7, |conn| {
    ///     conn.execute_batch("CREATE TABLE IF NOT EXISTS user_count (n INTEGER)")
    /// }).await?;
    /// assert_eq!(store.load_checkpoint("user_count").await?, Some(7));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// # })
    /// # }
    /// ```
    pub async fn apply_projection<F>(
        &self,
        projection: &str,
        position: u64,
        update: F,
    ) -> Result<(), StoreWriteError>
    where
        F: FnOnce(&Connection) -> rusqlite::Result<()> + Send + 'static,
    {
        let projection = projection.to_owned();
        self.transport
            .write(move |tx| {
                let conn = tx.connection();
                update(conn)?;
                save_checkpoint_in(conn, &projection, position)?;
                Ok::<_, JobError>(())
            })
            .await
            .map_err(StoreWriteError::from)
    }

    /// Runs `f` with a read connection of the database (to query read
    /// models kept next to the events).
    pub async fn read<R, F>(&self, f: F) -> Result<R, ReadError>
    where
        F: FnOnce(&Connection) -> rusqlite::Result<R> + Send + 'static,
        R: Send + 'static,
    {
        self.transport.read(f).await.map_err(read_error)
    }
}

fn save_checkpoint_in(conn: &Connection, projection: &str, position: u64) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO busway_checkpoints (projection, position) VALUES (?1, ?2) \
         ON CONFLICT (projection) DO UPDATE SET position = excluded.position",
    )?
    .execute(params![projection, as_i64(position)])?;
    Ok(())
}

#[async_trait]
impl EventStore for SqliteEventStore {
    async fn append_announced(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
        announcements: Vec<Publish>,
    ) -> Result<AppendOutcome, AppendError> {
        validate_append(stream, &events)?;
        let stream = stream.to_owned();
        let outcome = self
            .transport
            .write(move |tx| append_in(tx, &stream, expected, events, &announcements))
            .await?;
        self.advance_head(outcome.position);
        Ok(outcome)
    }

    async fn read_stream(
        &self,
        stream: &str,
        read: StreamRead,
    ) -> Result<Vec<StoredEvent>, ReadError> {
        let name = stream.to_owned();
        let result = self
            .transport
            .read(move |conn| {
                let tx = conn.unchecked_transaction()?;
                let Some((_, deleted)) = stream_state(&tx, &name)? else {
                    return Ok(None);
                };
                if deleted {
                    return Ok(Some(Err(())));
                }
                let sql = match read.direction {
                    Direction::Forwards => format!(
                        "SELECT {EVENT_COLUMNS} FROM busway_events WHERE stream = ?1 \
                         AND version >= ?2 ORDER BY version LIMIT ?3"
                    ),
                    Direction::Backwards => format!(
                        "SELECT {EVENT_COLUMNS} FROM busway_events WHERE stream = ?1 \
                         AND version <= ?2 ORDER BY version DESC LIMIT ?3"
                    ),
                };
                let limit = i64::try_from(read.limit).unwrap_or(i64::MAX);
                let events = tx
                    .prepare_cached(&sql)?
                    .query_map(params![name, as_i64(read.from), limit], event_from_row)?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                Ok(Some(Ok(events)))
            })
            .await
            .map_err(read_error)?;
        match result {
            None => Ok(Vec::new()),
            Some(Ok(events)) => Ok(events),
            Some(Err(())) => Err(ReadError::StreamDeleted {
                stream: stream.to_owned(),
            }),
        }
    }

    async fn read_all(&self, after: u64, limit: usize) -> Result<Vec<StoredEvent>, ReadError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.transport
            .read(move |conn| {
                conn.prepare_cached(&format!(
                    "SELECT {EVENT_COLUMNS} FROM busway_events WHERE position > ?1 \
                     ORDER BY position LIMIT ?2"
                ))?
                .query_map(params![as_i64(after), limit], event_from_row)?
                .collect()
            })
            .await
            .map_err(read_error)
    }

    async fn head_position(&self) -> Result<u64, ReadError> {
        let head = self
            .transport
            .read(|conn| {
                conn.query_row(
                    "SELECT coalesce(max(position), 0) FROM busway_events",
                    [],
                    |r| u64_column(r, 0),
                )
            })
            .await
            .map_err(read_error)?;
        self.advance_head(head);
        Ok(head)
    }

    fn appended_after(&self, after: u64) -> BoxFuture<'static, ()> {
        let mut head = self.head.subscribe();
        Box::pin(async move {
            let _ = head.wait_for(|&h| h > after).await;
        })
    }

    async fn stream_info(&self, stream: &str) -> Result<Option<StreamInfo>, ReadError> {
        let name = stream.to_owned();
        self.transport
            .read(move |conn| {
                conn.prepare_cached(
                    "SELECT version, deleted, metadata FROM busway_streams WHERE stream = ?1",
                )?
                .query_row([&name], |row| {
                    Ok(StreamInfo::new(
                        name.clone(),
                        u64_column(row, 0)?,
                        row.get(1)?,
                        parse_metadata(2, row.get(2)?)?,
                    ))
                })
                .optional()
            })
            .await
            .map_err(read_error)
    }

    async fn set_stream_metadata(
        &self,
        stream: &str,
        metadata: Map<String, Value>,
    ) -> Result<(), StoreWriteError> {
        if stream.is_empty() {
            return Err(StoreWriteError::Invalid("the stream name is empty".into()));
        }
        let stream = stream.to_owned();
        self.transport
            .write(move |tx| {
                tx.connection()
                    .prepare_cached(
                        "INSERT INTO busway_streams (stream, version, metadata) VALUES (?1, 0, ?2) \
                         ON CONFLICT (stream) DO UPDATE SET metadata = excluded.metadata",
                    )?
                    .execute(params![stream, metadata_text(&metadata)])?;
                Ok::<_, JobError>(())
            })
            .await
            .map_err(StoreWriteError::from)
    }

    async fn delete_stream(
        &self,
        stream: &str,
        expected: ExpectedVersion,
    ) -> Result<(), StoreWriteError> {
        let stream = stream.to_owned();
        self.transport
            .write(move |tx| {
                let conn = tx.connection();
                let actual = stream_state(conn, &stream)?.map_or(0, |(v, _)| v);
                if !expected.accepts(Some(actual)) {
                    return Err(JobError::Store(StoreWriteError::Conflict {
                        stream,
                        expected,
                        actual,
                    }));
                }
                conn.prepare_cached(
                    "INSERT INTO busway_streams (stream, version, deleted) VALUES (?1, 0, 1) \
                     ON CONFLICT (stream) DO UPDATE SET deleted = 1",
                )?
                .execute([&stream])?;
                conn.prepare_cached("DELETE FROM busway_snapshots WHERE stream = ?1")?
                    .execute([&stream])?;
                Ok(())
            })
            .await
            .map_err(StoreWriteError::from)
    }

    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<(), StoreWriteError> {
        self.transport
            .write(move |tx| {
                tx.connection()
                    .prepare_cached(
                        "INSERT INTO busway_snapshots (stream, version, schema_version, state) \
                         VALUES (?1, ?2, ?3, ?4) ON CONFLICT (stream) DO UPDATE SET \
                         version = excluded.version, schema_version = excluded.schema_version, \
                         state = excluded.state",
                    )?
                    .execute(params![
                        snapshot.stream,
                        as_i64(snapshot.version),
                        snapshot.schema_version,
                        snapshot.state.as_ref()
                    ])?;
                Ok::<_, JobError>(())
            })
            .await
            .map_err(StoreWriteError::from)
    }

    async fn load_snapshot(&self, stream: &str) -> Result<Option<Snapshot>, ReadError> {
        let stream = stream.to_owned();
        self.transport
            .read(move |conn| {
                conn.prepare_cached(
                    "SELECT version, schema_version, state FROM busway_snapshots WHERE stream = ?1",
                )?
                .query_row([&stream], |row| {
                    let schema_version: i64 = row.get(1)?;
                    Ok(Snapshot::new(
                        stream.clone(),
                        u64_column(row, 0)?,
                        u32::try_from(schema_version).map_err(|e| corrupted(1, e))?,
                        row.get::<_, Vec<u8>>(2)?.into(),
                    ))
                })
                .optional()
            })
            .await
            .map_err(read_error)
    }

    async fn load_checkpoint(&self, projection: &str) -> Result<Option<u64>, ReadError> {
        let projection = projection.to_owned();
        self.transport
            .read(move |conn| {
                conn.prepare_cached(
                    "SELECT position FROM busway_checkpoints WHERE projection = ?1",
                )?
                .query_row([&projection], |row| u64_column(row, 0))
                .optional()
            })
            .await
            .map_err(read_error)
    }

    async fn save_checkpoint(
        &self,
        projection: &str,
        position: u64,
    ) -> Result<(), StoreWriteError> {
        let projection = projection.to_owned();
        self.transport
            .write(move |tx| {
                save_checkpoint_in(tx.connection(), &projection, position)?;
                Ok::<_, JobError>(())
            })
            .await
            .map_err(StoreWriteError::from)
    }

    async fn park_event(&self, parked: ParkedEvent) -> Result<(), StoreWriteError> {
        self.transport
            .write(move |tx| {
                tx.connection()
                    .prepare_cached(
                        "INSERT INTO busway_parked_events (projection, stream, version, position, \
                         reason) VALUES (?1, ?2, ?3, ?4, ?5)",
                    )?
                    .execute(params![
                        parked.projection,
                        parked.stream,
                        as_i64(parked.version),
                        as_i64(parked.position),
                        parked.reason
                    ])?;
                Ok::<_, JobError>(())
            })
            .await
            .map_err(StoreWriteError::from)
    }

    async fn parked_events(&self, projection: &str) -> Result<Vec<ParkedEvent>, ReadError> {
        let projection = projection.to_owned();
        self.transport
            .read(move |conn| {
                conn.prepare_cached(
                    "SELECT stream, version, position, reason FROM busway_parked_events \
                     WHERE projection = ?1 ORDER BY position",
                )?
                .query_map([&projection], |row| {
                    Ok(ParkedEvent::from_parts(
                        projection.clone(),
                        row.get(0)?,
                        u64_column(row, 1)?,
                        u64_column(row, 2)?,
                        row.get(3)?,
                    ))
                })?
                .collect()
            })
            .await
            .map_err(read_error)
    }
}
