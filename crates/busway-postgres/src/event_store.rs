//! [`PostgresEventStore`]: event streams in the transport's PostgreSQL
//! database, next to its queues.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use busway_core::event_store::{
    validate_append, AppendError, AppendOutcome, Direction, EventStore, ExpectedVersion, NewEvent,
    ParkedEvent, ReadError, Snapshot, StoreWriteError, StoredEvent, StreamInfo, StreamRead,
};
use busway_core::{ConnectError, Publish};
use futures::future::BoxFuture;
use serde_json::{Map, Value};
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, PgPool, Row};
use tokio::sync::watch;
use uuid::Uuid;

use crate::schema;
use crate::transport::PostgresTransport;

/// Migration 1 of the event store.
///
/// `busway_events.tx_id` is the id of the transaction that appended the row
/// and `position` comes from `busway_event_positions`; an append takes
/// both under one short advisory lock, so among appends, a later
/// transaction id always means higher positions (see the type's docs for
/// why readers need that). The store sends its appends as plain statements
/// (`APPEND_*`, no function call); `busway_append` does the same append in
/// PL/pgSQL, under the same lock, for SQL callers: the first write of a
/// transaction that goes on with writes of its own.
const EVENT_STORE_V1: &str = r#"
CREATE SEQUENCE busway_event_positions AS BIGINT;

CREATE TABLE busway_events (
    position       BIGINT PRIMARY KEY,
    tx_id          xid8 NOT NULL,
    stream         TEXT NOT NULL,
    version        BIGINT NOT NULL,
    event_id       UUID NOT NULL,
    event_type     TEXT NOT NULL,
    schema_version INTEGER NOT NULL,
    data           BYTEA NOT NULL,
    metadata       TEXT,
    recorded_at_ms BIGINT NOT NULL,
    CONSTRAINT busway_events_stream_version UNIQUE (stream, version),
    CONSTRAINT busway_events_event_id UNIQUE (event_id)
);

CREATE TABLE busway_streams (
    stream   TEXT PRIMARY KEY,
    version  BIGINT NOT NULL,
    deleted  BOOLEAN NOT NULL DEFAULT false,
    metadata TEXT
);

CREATE TABLE busway_snapshots (
    stream         TEXT PRIMARY KEY,
    version        BIGINT NOT NULL,
    schema_version INTEGER NOT NULL,
    state          BYTEA NOT NULL
);

CREATE TABLE busway_checkpoints (
    projection TEXT PRIMARY KEY,
    position   BIGINT NOT NULL
);

CREATE TABLE busway_parked_events (
    id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    projection TEXT NOT NULL,
    stream     TEXT NOT NULL,
    version    BIGINT NOT NULL,
    position   BIGINT NOT NULL,
    reason     TEXT NOT NULL
);
CREATE INDEX busway_parked_events_projection ON busway_parked_events (projection, position);

-- Errors: BWDUP (an id stored elsewhere; message: the id), BWDEL (the
-- stream is deleted), BWCNF (expected version not met; message: the actual
-- version), BWTXN (called in a transaction that already wrote).
CREATE FUNCTION busway_append(
    p_stream TEXT, p_expected BIGINT, p_ids UUID[], p_types TEXT[],
    p_schema_versions INTEGER[], p_data BYTEA[], p_metadata TEXT[],
    OUT out_version BIGINT, OUT out_position BIGINT, OUT out_deduplicated BOOLEAN
)
LANGUAGE plpgsql AS $$
DECLARE
    n INTEGER := cardinality(p_ids);
    stored RECORD;
    found_count INTEGER := 0;
    first_version BIGINT;
    tx_xid xid8;
    positions BIGINT[];
BEGIN
    -- A retry of a stored append returns its outcome.
    FOR stored IN
        SELECT e.stream, e.version, e.position, e.event_id,
               array_position(p_ids, e.event_id) AS idx
        FROM busway_events e WHERE e.event_id = ANY (p_ids) ORDER BY 5
    LOOP
        IF found_count = 0 THEN
            first_version := stored.version;
        END IF;
        IF stored.stream <> p_stream OR stored.idx <> found_count + 1
           OR stored.version <> first_version + found_count THEN
            RAISE EXCEPTION USING ERRCODE = 'BWDUP', MESSAGE = stored.event_id::TEXT;
        END IF;
        found_count := found_count + 1;
        out_position := stored.position;
    END LOOP;
    IF found_count = n THEN
        out_version := first_version + n - 1;
        out_deduplicated := true;
        RETURN;
    ELSIF found_count > 0 THEN
        RAISE EXCEPTION USING ERRCODE = 'BWDUP', MESSAGE = p_ids[found_count + 1]::TEXT;
    END IF;

    -- The transaction id and the positions, together, under a lock held
    -- for this statement only (evaluated left to right): among appends, a
    -- later transaction id means higher positions.
    IF pg_current_xact_id_if_assigned() IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'BWTXN',
            MESSAGE = 'busway_append must be the first write of its transaction';
    END IF;
    SELECT x, p INTO tx_xid, positions FROM (
        SELECT pg_advisory_lock(hashtext('busway_event_positions:' || current_schema())) AS l,
               pg_current_xact_id() AS x,
               ARRAY(SELECT nextval('busway_event_positions') FROM generate_series(1, n)) AS p,
               pg_advisory_unlock(hashtext('busway_event_positions:' || current_schema())) AS u
    ) AS taken;

    -- The stream's row serializes its writers (the upsert waits for the
    -- previous writer's commit and sees its version); the events go in in
    -- the same statement, and a failed check below rolls everything back.
    WITH bumped AS (
        INSERT INTO busway_streams AS s (stream, version) VALUES (p_stream, n)
        ON CONFLICT (stream) DO UPDATE SET version = s.version + n WHERE NOT s.deleted
        RETURNING s.version
    ), inserted AS (
        INSERT INTO busway_events (position, tx_id, stream, version, event_id, event_type,
                                   schema_version, data, metadata, recorded_at_ms)
        SELECT positions[i], tx_xid, p_stream, bumped.version - n + i, p_ids[i], p_types[i],
               p_schema_versions[i], p_data[i], p_metadata[i], busway_now_ms()
        FROM bumped, generate_series(1, n) AS i
    )
    SELECT version INTO out_version FROM bumped;
    IF out_version IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'BWDEL', MESSAGE = p_stream;
    END IF;
    IF p_expected IS NOT NULL AND out_version - n <> p_expected THEN
        RAISE EXCEPTION USING ERRCODE = 'BWCNF', MESSAGE = (out_version - n)::TEXT;
    END IF;
    out_position := positions[n];
    out_deduplicated := false;
END
$$;
"#;

/// The event store's migrations, in order.
const EVENT_STORE_MIGRATIONS: &[&str] = &[EVENT_STORE_V1];

const EVENT_COLUMNS: &str = "stream, version, position, event_id::text AS event_id, event_type, \
     schema_version, data, metadata, recorded_at_ms";

/// How long [`EventStore::read_all`] waits for older transactions to end
/// when the next event in the log is committed but not yet safe to hand
/// out, before returning an empty page (the caller polls again).
const HOLDBACK_WAIT: Duration = Duration::from_secs(2);

/// A durable [`EventStore`] in the database (and schema) of a
/// [`PostgresTransport`], on its connection pool. Any number of processes
/// may append and read at once.
///
/// **Appends** are one statement, one round trip like a plain `INSERT`: it
/// moves the stream's row in `busway_streams` from the expected version
/// (the row lock serializes the writers of one stream, and the version is
/// checked against the one the previous writer committed, so of several
/// writers racing at one version exactly one wins) and inserts the events,
/// all in the statement's transaction. A statement that writes nothing
/// (the row was not at the expected version, or is deleted), or hits the
/// unique key on event ids, is followed by one query that tells a retry
/// (all the ids stored, in order, on this stream: the stored outcome,
/// `deduplicated`) from a duplicate id ([`AppendError::DuplicateEventId`]),
/// a deleted stream and a conflict ([`AppendError::Conflict`] with the
/// actual version); an append that succeeds never looks for its ids.
/// Writers of different streams do not wait for each other, and their
/// commits share WAL flushes (group commit) like plain `INSERT`s do.
///
/// **The global order, and readers that never skip.** Positions come from
/// a sequence, so two concurrent appends may commit in the opposite order
/// of their positions: a reader that saw position 8 and then asks for
/// "after 8" would miss a position-7 event committed a moment later. The
/// usual cure, `pg_advisory_xact_lock` around the position assignment, holds
/// the lock until the commit has been flushed, so appends commit one at a
/// time: on the development server that was 300 appends/s against 4,900
/// plain `INSERT`s/s (16 writers, `synchronous_commit = on`). This store
/// uses transaction ids instead:
///
/// - an append takes its transaction id (`pg_current_xact_id()`, as its
///   first write) and its positions under one advisory lock held only for
///   those two calls, so among appends a higher transaction id means higher
///   positions; each event row keeps its transaction id (`tx_id`);
/// - [`read_all`](EventStore::read_all) hands out events in position order
///   and stops at the first one whose transaction is not older than
///   `pg_snapshot_xmin(pg_current_snapshot())`, the oldest transaction
///   still running. Every transaction that may still commit events is at
///   least that new, so it holds higher positions than every event handed
///   out: nothing can appear behind a reader's position. When the next
///   event is held back, `read_all` waits (up to 2 s) for the older
///   transactions to end.
///
/// The price: a long transaction of any kind on the server (one that has
/// written something) holds followers back until it ends; they never skip.
///
/// **Announcements.** [`append_announced`](EventStore::append_announced)
/// enqueues the messages with [`PostgresTransport::publish_in`] in the
/// append's transaction: committed with the events or not at all, no relay
/// needed.
///
/// **Following.** [`appended_after`](EventStore::appended_after) wakes on
/// this process's appends; appends of other processes are found by the
/// followers' polling (a `NOTIFY` per append would serialize the commits
/// again, since PostgreSQL queues notifications under one lock held to the
/// end of the commit).
///
/// Tables: `busway_events`, `busway_streams`, `busway_snapshots`,
/// `busway_checkpoints`, `busway_parked_events`, and the sequence
/// `busway_event_positions`, created by migrations recorded under the
/// component `event_store`.
///
/// ```no_run
/// use busway_core::event_store::{EventStore, ExpectedVersion, NewEvent, StreamRead};
/// use busway_postgres::{PostgresEventStore, PostgresTransport};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let transport = PostgresTransport::connect("postgres://postgres@127.0.0.1/test").await?;
/// let store = PostgresEventStore::open(transport).await?;
/// let event = NewEvent::json("user.registered", &serde_json::json!({"name": "Ann"}))?;
/// store.append("user-1", ExpectedVersion::NoStream, vec![event]).await?;
/// let events = store.read_stream("user-1", StreamRead::all()).await?;
/// assert_eq!(events[0].version, 1);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct PostgresEventStore {
    transport: PostgresTransport,
    head: Arc<watch::Sender<u64>>,
}

impl std::fmt::Debug for PostgresEventStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresEventStore")
            .field("schema", &self.transport.config().schema)
            .field("head", &*self.head.borrow())
            .finish_non_exhaustive()
    }
}

fn as_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn limit(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn metadata_text(metadata: &Map<String, Value>) -> Option<String> {
    if metadata.is_empty() {
        None
    } else {
        Some(Value::Object(metadata.clone()).to_string())
    }
}

fn parse_metadata(text: Option<String>) -> Result<Map<String, Value>, ReadError> {
    match text {
        None => Ok(Map::new()),
        Some(text) => {
            serde_json::from_str(&text).map_err(|e| ReadError::Corrupted(format!("metadata: {e}")))
        }
    }
}

fn u64_of(value: i64, what: &str) -> Result<u64, ReadError> {
    u64::try_from(value).map_err(|e| ReadError::Corrupted(format!("{what}: {e}")))
}

fn read_error(e: sqlx::Error) -> ReadError {
    match e {
        sqlx::Error::PoolClosed => ReadError::Closed,
        e @ (sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_)) => {
            ReadError::Corrupted(e.to_string())
        }
        e => ReadError::Backend(Box::new(e)),
    }
}

fn write_error(e: sqlx::Error) -> StoreWriteError {
    match e {
        sqlx::Error::PoolClosed => StoreWriteError::Closed,
        e => StoreWriteError::Backend(Box::new(e)),
    }
}

fn event_from_row(row: &PgRow) -> Result<StoredEvent, ReadError> {
    let id: String = row.try_get("event_id").map_err(read_error)?;
    let id = Uuid::parse_str(&id).map_err(|e| ReadError::Corrupted(format!("event id: {e}")))?;
    let schema_version: i32 = row.try_get("schema_version").map_err(read_error)?;
    let schema_version = u32::try_from(schema_version)
        .map_err(|e| ReadError::Corrupted(format!("schema version: {e}")))?;
    let mut event = NewEvent::new(
        row.try_get::<String, _>("event_type").map_err(read_error)?,
        row.try_get::<Vec<u8>, _>("data").map_err(read_error)?,
    )
    .with_id(id)
    .with_schema_version(schema_version);
    event.metadata = parse_metadata(row.try_get("metadata").map_err(read_error)?)?;
    Ok(StoredEvent::new(
        row.try_get("stream").map_err(read_error)?,
        u64_of(row.try_get("version").map_err(read_error)?, "version")?,
        u64_of(row.try_get("position").map_err(read_error)?, "position")?,
        event,
        u64_of(
            row.try_get("recorded_at_ms").map_err(read_error)?,
            "recorded_at_ms",
        )?,
    ))
}

/// The append statements (see [`PostgresEventStore`]): one statement, so
/// one round trip, like a plain `INSERT`. `$1` the stream, `$2` the
/// expected version (`NULL` for any), `$3`..`$7` the events' ids, types,
/// schema versions, data and metadata: scalars for one event, arrays
/// (`$3` gives their length) for several.
///
/// `taken` holds the transaction id `x` and the positions `p`, taken
/// together under the position lock, held for those calls only (a select
/// list is evaluated left to right, and nothing writes before it: every
/// write reads from it). `bumped` moves the stream's row from the expected
/// version, if it is there, it is not deleted, and (for a new stream) the
/// expected version is "no stream" or any: the row lock serializes the
/// writers of a stream and the version is checked against the row the
/// previous writer committed. The events go in only if the row moved. No
/// row back means the append was refused, or is a retry: nothing was
/// written, and [`PostgresEventStore::explain_refusal`] finds out which.
///
/// At an exact version (the usual append), `taken` is a subquery of the
/// `UPDATE`, which hands `x` and `p` on: no CTE of its own to materialize.
macro_rules! append_sql {
    (taken, one) => {
        "SELECT pg_advisory_lock(hashtext('busway_event_positions:' || current_schema())) AS l, \
                pg_current_xact_id() AS x, \
                nextval('busway_event_positions') AS p, \
                pg_advisory_unlock(hashtext('busway_event_positions:' || current_schema())) AS u"
    };
    (taken, many) => {
        "SELECT pg_advisory_lock(hashtext('busway_event_positions:' || current_schema())) AS l, \
                pg_current_xact_id() AS x, \
                ARRAY(SELECT nextval('busway_event_positions') \
                      FROM generate_series(1, cardinality($3::text[]))) AS p, \
                pg_advisory_unlock(hashtext('busway_event_positions:' || current_schema())) AS u"
    };
    // A new stream, or one at version 0 (metadata only): expected no stream or any.
    (upsert, $taken:ident, $n:literal) => {
        concat!(
            "WITH taken AS MATERIALIZED (",
            append_sql!(taken, $taken),
            "), bumped AS ( \
                 INSERT INTO busway_streams AS s (stream, version) \
                 SELECT $1::text, ",
            $n,
            " FROM taken \
                 ON CONFLICT (stream) DO UPDATE SET version = s.version + EXCLUDED.version \
                 WHERE NOT s.deleted AND ($2::bigint IS NULL OR s.version = $2::bigint) \
                 RETURNING s.version \
             ), "
        )
    };
    // An existing stream at an exact version.
    (update, $taken:ident, $n:literal) => {
        concat!(
            "WITH bumped AS ( \
                 UPDATE busway_streams AS s SET version = s.version + ",
            $n,
            " FROM (",
            append_sql!(taken, $taken),
            " OFFSET 0) AS taken \
                 WHERE s.stream = $1::text AND s.version = $2::bigint AND NOT s.deleted \
                 RETURNING s.version, taken.x, taken.p \
             ) "
        )
    };
    (insert, one) => {
        "INSERT INTO busway_events (position, tx_id, stream, version, event_id, event_type, \
                                    schema_version, data, metadata, recorded_at_ms) \
         SELECT p, x, $1::text, version, $3::text::uuid, $4::text, \
                $5::int4, $6::bytea, $7::text, busway_now_ms()"
    };
    (insert, many) => {
        "INSERT INTO busway_events (position, tx_id, stream, version, event_id, event_type, \
                                    schema_version, data, metadata, recorded_at_ms) \
         SELECT p[e.i], x, $1::text, version - cardinality($3::text[]) + e.i, \
                e.id::uuid, e.t, e.sv, e.d, e.m, busway_now_ms()"
    };
    (events) => {
        "unnest($3::text[], $4::text[], $5::int4[], $6::bytea[], $7::text[]) \
         WITH ORDINALITY AS e (id, t, sv, d, m, i)"
    };
}

/// One event; a new stream, or expected no stream or any.
const APPEND_ONE_UPSERT: &str = concat!(
    append_sql!(upsert, one, "1"),
    "inserted AS (",
    append_sql!(insert, one),
    " FROM bumped, taken) SELECT version, p FROM bumped, taken"
);
/// One event at an exact version.
const APPEND_ONE_UPDATE: &str = concat!(
    append_sql!(update, one, "1"),
    append_sql!(insert, one),
    " FROM bumped RETURNING version, position"
);
/// Several events; a new stream, or expected no stream or any.
const APPEND_MANY_UPSERT: &str = concat!(
    append_sql!(upsert, many, "cardinality($3::text[])"),
    "inserted AS (",
    append_sql!(insert, many),
    " FROM bumped, taken, ",
    append_sql!(events),
    ") SELECT version, p[cardinality(p)] FROM bumped, taken"
);
/// Several events at an exact version.
const APPEND_MANY_UPDATE: &str = concat!(
    append_sql!(update, many, "cardinality($3::text[])"),
    ", inserted AS (",
    append_sql!(insert, many),
    " FROM bumped, ",
    append_sql!(events),
    ") SELECT version, p[cardinality(p)] FROM bumped"
);

/// Why an append wrote nothing: the ids already stored (in the batch's
/// order) and the stream's row, in one query.
const REFUSAL_SQL: &str = "SELECT s.version AS stream_version, s.deleted, e.stream, e.version, \
         e.position, e.event_id::text AS event_id, e.idx \
     FROM (SELECT 1) AS one \
     LEFT JOIN busway_streams s ON s.stream = $1 \
     LEFT JOIN LATERAL ( \
         SELECT e.stream, e.version, e.position, e.event_id, \
                array_position($2::text[]::uuid[], e.event_id) AS idx \
         FROM busway_events e WHERE e.event_id = ANY ($2::text[]::uuid[]) \
     ) e ON true \
     ORDER BY e.idx";

/// How many times an append is tried when the explanation of a refusal
/// finds the stream ready for it after all (other writers moved it
/// meanwhile).
const MAX_TRIES: usize = 16;

/// The columns of a batch, as the statement's parameters (borrowing the
/// events' types and data).
struct Columns<'a> {
    ids: Vec<String>,
    types: Vec<&'a str>,
    schema_versions: Vec<i32>,
    data: Vec<&'a [u8]>,
    metadata: Vec<Option<String>>,
}

impl<'a> Columns<'a> {
    fn of(events: &'a [NewEvent]) -> Self {
        Columns {
            ids: events.iter().map(|e| e.id.to_string()).collect(),
            types: events.iter().map(|e| e.event_type.as_str()).collect(),
            schema_versions: events
                .iter()
                .map(|e| i32::try_from(e.schema_version).unwrap_or(i32::MAX))
                .collect(),
            data: events.iter().map(|e| e.data.as_ref()).collect(),
            metadata: events.iter().map(|e| metadata_text(&e.metadata)).collect(),
        }
    }
}

impl PostgresEventStore {
    /// The event store in `transport`'s database (and schema); creates or
    /// upgrades its tables if needed. Several processes may open it at once.
    pub async fn open(transport: PostgresTransport) -> Result<Self, ConnectError> {
        let schema = transport.config().schema.clone();
        schema::migrate(
            transport.pool(),
            &schema,
            "event_store",
            EVENT_STORE_MIGRATIONS,
        )
        .await
        .map_err(|e| {
            let retryable = e.is_retryable();
            ConnectError::Backend {
                backend: "postgres",
                location: format!("the event store in schema `{schema}`"),
                source: Box::new(e),
                retryable,
            }
        })?;
        let head: i64 = sqlx::query_scalar("SELECT coalesce(max(position), 0) FROM busway_events")
            .fetch_one(transport.pool())
            .await
            .map_err(|e| {
                let retryable = crate::error::is_retryable(&e);
                ConnectError::Backend {
                    backend: "postgres",
                    location: format!("the event store in schema `{schema}`"),
                    source: Box::new(e),
                    retryable,
                }
            })?;
        Ok(Self {
            transport,
            head: Arc::new(watch::channel(u64::try_from(head).unwrap_or(0)).0),
        })
    }

    /// The transport whose database holds the store.
    pub fn transport(&self) -> &PostgresTransport {
        &self.transport
    }

    fn pool(&self) -> &PgPool {
        self.transport.pool()
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

    /// One try: the append statement, in a transaction of its own when
    /// messages are published with it. `None`: nothing was written (a
    /// refusal, or a retry of a stored append).
    async fn try_append(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        columns: &Columns<'_>,
        announcements: &[Publish],
    ) -> Result<Option<AppendOutcome>, AppendError> {
        let mut conn = self.pool().acquire().await.map_err(append_error)?;
        let result = if announcements.is_empty() {
            call_append(&mut conn, stream, expected, columns).await
        } else {
            let mut tx = sqlx::Connection::begin(&mut *conn)
                .await
                .map_err(append_error)?;
            match call_append(&mut tx, stream, expected, columns).await {
                Ok(Some(outcome)) => {
                    self.transport
                        .publish_in(&mut tx, announcements)
                        .await
                        .map_err(|e| AppendError::Backend(Box::new(e)))?;
                    tx.commit().await.map_err(append_error)?;
                    Ok(Some(outcome))
                }
                Ok(None) => {
                    tx.rollback().await.map_err(append_error)?;
                    Ok(None)
                }
                // Dropping the transaction rolls it back.
                Err(e) => Err(e),
            }
        };
        let error = match result {
            Ok(outcome) => return Ok(outcome),
            Err(e) => e,
        };
        if let Some(db) = error.as_database_error() {
            // One of the ids is stored (the check waited for the append
            // that stored it to commit): a retry, or a duplicate.
            if db.code().as_deref() == Some("23505")
                && db.constraint() == Some("busway_events_event_id")
            {
                return Ok(None);
            }
        }
        // Interrupted between taking and releasing the position lock (a
        // cancel): release it before the connection goes back to the pool.
        let _ = sqlx::query("SELECT pg_advisory_unlock_all()")
            .execute(&mut *conn)
            .await;
        Err(append_error(error))
    }

    /// Why an append wrote nothing: `Some` is the final answer (the outcome
    /// of the stored append it retries, or the error); `None` when the
    /// stream is ready for it after all (other writers moved it since):
    /// try again.
    async fn explain_refusal(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        columns: &Columns<'_>,
    ) -> Result<Option<Result<AppendOutcome, AppendError>>, AppendError> {
        type Row = (
            Option<i64>,
            Option<bool>,
            Option<String>,
            Option<i64>,
            Option<i64>,
            Option<String>,
            Option<i32>,
        );
        let rows: Vec<Row> = sqlx::query_as(REFUSAL_SQL)
            .bind(stream)
            .bind(&columns.ids)
            .fetch_all(self.pool())
            .await
            .map_err(append_error)?;
        let duplicate = |id: &str| AppendError::DuplicateEventId {
            stream: stream.to_owned(),
            id: Uuid::parse_str(id).unwrap_or_default(),
        };
        // A retry of a stored append: all its ids, in order, at consecutive
        // versions of this stream. Any other stored id is a duplicate.
        let mut found: Option<(u64, u64)> = None;
        let mut found_count: usize = 0;
        for row in &rows {
            let (_, _, Some(row_stream), Some(version), Some(position), Some(id), Some(idx)) = row
            else {
                continue;
            };
            let version = u64::try_from(*version).unwrap_or(0);
            let first = found.map_or(version, |(first, _)| first);
            if row_stream != stream
                || usize::try_from(*idx).ok() != Some(found_count + 1)
                || version != first + found_count as u64
            {
                return Ok(Some(Err(duplicate(id))));
            }
            found = Some((first, u64::try_from(*position).unwrap_or(0)));
            found_count += 1;
        }
        if let Some((first, position)) = found {
            if found_count == columns.ids.len() {
                let version = first + found_count as u64 - 1;
                return Ok(Some(Ok(AppendOutcome::new(version, position, true))));
            }
            return Ok(Some(Err(duplicate(&columns.ids[0]))));
        }
        let (version, deleted) = rows.first().map_or((None, None), |row| (row.0, row.1));
        if deleted == Some(true) {
            return Ok(Some(Err(AppendError::StreamDeleted {
                stream: stream.to_owned(),
            })));
        }
        let actual = version.map(|v| u64::try_from(v).unwrap_or(0));
        if expected.accepts(actual) {
            return Ok(None);
        }
        Ok(Some(Err(AppendError::Conflict {
            stream: stream.to_owned(),
            expected,
            actual: actual.unwrap_or(0),
        })))
    }
}

fn append_error(e: sqlx::Error) -> AppendError {
    match e {
        sqlx::Error::PoolClosed => AppendError::Closed,
        e => AppendError::Backend(Box::new(e)),
    }
}

/// Runs the append statement on `conn`; `None` when it wrote nothing.
async fn call_append(
    conn: &mut PgConnection,
    stream: &str,
    expected: ExpectedVersion,
    columns: &Columns<'_>,
) -> Result<Option<AppendOutcome>, sqlx::Error> {
    let expected = match expected {
        ExpectedVersion::Any => None,
        ExpectedVersion::NoStream => Some(0),
        ExpectedVersion::Exact(v) => Some(as_i64(v)),
    };
    let upsert = expected.is_none_or(|v| v == 0);
    let query = if let ([id], [event_type], [schema_version], [data], [metadata]) = (
        &columns.ids[..],
        &columns.types[..],
        &columns.schema_versions[..],
        &columns.data[..],
        &columns.metadata[..],
    ) {
        sqlx::query_as(if upsert {
            APPEND_ONE_UPSERT
        } else {
            APPEND_ONE_UPDATE
        })
        .bind(stream)
        .bind(expected)
        .bind(id)
        .bind(event_type)
        .bind(schema_version)
        .bind(data)
        .bind(metadata)
    } else {
        sqlx::query_as(if upsert {
            APPEND_MANY_UPSERT
        } else {
            APPEND_MANY_UPDATE
        })
        .bind(stream)
        .bind(expected)
        .bind(&columns.ids)
        .bind(&columns.types)
        .bind(&columns.schema_versions)
        .bind(&columns.data)
        .bind(&columns.metadata)
    };
    let row: Option<(i64, i64)> = query.fetch_optional(conn).await?;
    Ok(row.map(|(version, position)| {
        AppendOutcome::new(
            u64::try_from(version).unwrap_or(0),
            u64::try_from(position).unwrap_or(0),
            false,
        )
    }))
}

#[async_trait]
impl EventStore for PostgresEventStore {
    async fn append_announced(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
        announcements: Vec<Publish>,
    ) -> Result<AppendOutcome, AppendError> {
        validate_append(stream, &events)?;
        let columns = Columns::of(&events);
        for _ in 0..MAX_TRIES {
            let outcome = match self
                .try_append(stream, expected, &columns, &announcements)
                .await?
            {
                Some(outcome) => outcome,
                None => match self.explain_refusal(stream, expected, &columns).await? {
                    Some(answer) => answer?,
                    None => continue,
                },
            };
            self.advance_head(outcome.position);
            return Ok(outcome);
        }
        Err(AppendError::Backend(
            format!("the append to `{stream}` kept racing other writers; giving up").into(),
        ))
    }

    async fn read_stream(
        &self,
        stream: &str,
        read: StreamRead,
    ) -> Result<Vec<StoredEvent>, ReadError> {
        let deleted: Option<bool> =
            sqlx::query_scalar("SELECT deleted FROM busway_streams WHERE stream = $1")
                .bind(stream)
                .fetch_optional(self.pool())
                .await
                .map_err(read_error)?;
        match deleted {
            None => return Ok(Vec::new()),
            Some(true) => {
                return Err(ReadError::StreamDeleted {
                    stream: stream.to_owned(),
                })
            }
            Some(false) => {}
        }
        let sql = match read.direction {
            Direction::Forwards => format!(
                "SELECT {EVENT_COLUMNS} FROM busway_events WHERE stream = $1 \
                 AND version >= $2 ORDER BY version LIMIT $3"
            ),
            Direction::Backwards => format!(
                "SELECT {EVENT_COLUMNS} FROM busway_events WHERE stream = $1 \
                 AND version <= $2 ORDER BY version DESC LIMIT $3"
            ),
        };
        let rows = sqlx::query(&sql)
            .bind(stream)
            .bind(as_i64(read.from))
            .bind(limit(read.limit))
            .fetch_all(self.pool())
            .await
            .map_err(read_error)?;
        rows.iter().map(event_from_row).collect()
    }

    async fn read_all(&self, after: u64, limit_: usize) -> Result<Vec<StoredEvent>, ReadError> {
        if limit_ == 0 {
            return Ok(Vec::new());
        }
        let sql = format!(
            "SELECT {EVENT_COLUMNS}, tx_id < pg_snapshot_xmin(pg_current_snapshot()) AS safe \
             FROM busway_events WHERE position > $1 ORDER BY position LIMIT $2"
        );
        let started = tokio::time::Instant::now();
        let mut pause = Duration::from_millis(1);
        loop {
            let rows = sqlx::query(&sql)
                .bind(as_i64(after))
                .bind(limit(limit_))
                .fetch_all(self.pool())
                .await
                .map_err(read_error)?;
            let mut events = Vec::with_capacity(rows.len());
            for row in &rows {
                let safe: bool = row.try_get("safe").map_err(read_error)?;
                if !safe {
                    break;
                }
                events.push(event_from_row(row)?);
            }
            // The next event is committed, but a transaction older than it
            // may still commit events before it: wait for that one to end.
            if !events.is_empty() || rows.is_empty() || started.elapsed() >= HOLDBACK_WAIT {
                return Ok(events);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }

    async fn head_position(&self) -> Result<u64, ReadError> {
        let head: i64 = sqlx::query_scalar("SELECT coalesce(max(position), 0) FROM busway_events")
            .fetch_one(self.pool())
            .await
            .map_err(read_error)?;
        let head = u64_of(head, "position")?;
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
        let row: Option<(i64, bool, Option<String>)> = sqlx::query_as(
            "SELECT version, deleted, metadata FROM busway_streams WHERE stream = $1",
        )
        .bind(stream)
        .fetch_optional(self.pool())
        .await
        .map_err(read_error)?;
        row.map(|(version, deleted, metadata)| {
            Ok(StreamInfo::new(
                stream.to_owned(),
                u64_of(version, "version")?,
                deleted,
                parse_metadata(metadata)?,
            ))
        })
        .transpose()
    }

    async fn set_stream_metadata(
        &self,
        stream: &str,
        metadata: Map<String, Value>,
    ) -> Result<(), StoreWriteError> {
        if stream.is_empty() {
            return Err(StoreWriteError::Invalid("the stream name is empty".into()));
        }
        sqlx::query(
            "INSERT INTO busway_streams (stream, version, metadata) VALUES ($1, 0, $2) \
             ON CONFLICT (stream) DO UPDATE SET metadata = EXCLUDED.metadata",
        )
        .bind(stream)
        .bind(metadata_text(&metadata))
        .execute(self.pool())
        .await
        .map_err(write_error)?;
        Ok(())
    }

    async fn delete_stream(
        &self,
        stream: &str,
        expected: ExpectedVersion,
    ) -> Result<(), StoreWriteError> {
        let mut tx = self.pool().begin().await.map_err(write_error)?;
        // Lock the row (or, for a stream without one, create it) so no
        // append slips in between the check and the delete.
        sqlx::query(
            "INSERT INTO busway_streams (stream, version) VALUES ($1, 0) \
             ON CONFLICT (stream) DO NOTHING",
        )
        .bind(stream)
        .execute(&mut *tx)
        .await
        .map_err(write_error)?;
        let actual: i64 =
            sqlx::query_scalar("SELECT version FROM busway_streams WHERE stream = $1 FOR UPDATE")
                .bind(stream)
                .fetch_one(&mut *tx)
                .await
                .map_err(write_error)?;
        let actual = u64::try_from(actual).unwrap_or(0);
        if !expected.accepts(Some(actual)) {
            return Err(StoreWriteError::Conflict {
                stream: stream.to_owned(),
                expected,
                actual,
            });
        }
        sqlx::query("UPDATE busway_streams SET deleted = true WHERE stream = $1")
            .bind(stream)
            .execute(&mut *tx)
            .await
            .map_err(write_error)?;
        sqlx::query("DELETE FROM busway_snapshots WHERE stream = $1")
            .bind(stream)
            .execute(&mut *tx)
            .await
            .map_err(write_error)?;
        tx.commit().await.map_err(write_error)
    }

    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<(), StoreWriteError> {
        sqlx::query(
            "INSERT INTO busway_snapshots (stream, version, schema_version, state) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (stream) DO UPDATE SET \
             version = EXCLUDED.version, schema_version = EXCLUDED.schema_version, \
             state = EXCLUDED.state",
        )
        .bind(&snapshot.stream)
        .bind(as_i64(snapshot.version))
        .bind(i32::try_from(snapshot.schema_version).unwrap_or(i32::MAX))
        .bind(snapshot.state.as_ref())
        .execute(self.pool())
        .await
        .map_err(write_error)?;
        Ok(())
    }

    async fn load_snapshot(&self, stream: &str) -> Result<Option<Snapshot>, ReadError> {
        let row: Option<(i64, i32, Vec<u8>)> = sqlx::query_as(
            "SELECT version, schema_version, state FROM busway_snapshots WHERE stream = $1",
        )
        .bind(stream)
        .fetch_optional(self.pool())
        .await
        .map_err(read_error)?;
        row.map(|(version, schema_version, state)| {
            Ok(Snapshot::new(
                stream,
                u64_of(version, "version")?,
                u32::try_from(schema_version)
                    .map_err(|e| ReadError::Corrupted(format!("schema version: {e}")))?,
                state.into(),
            ))
        })
        .transpose()
    }

    async fn load_checkpoint(&self, projection: &str) -> Result<Option<u64>, ReadError> {
        let position: Option<i64> =
            sqlx::query_scalar("SELECT position FROM busway_checkpoints WHERE projection = $1")
                .bind(projection)
                .fetch_optional(self.pool())
                .await
                .map_err(read_error)?;
        position.map(|p| u64_of(p, "position")).transpose()
    }

    async fn save_checkpoint(
        &self,
        projection: &str,
        position: u64,
    ) -> Result<(), StoreWriteError> {
        sqlx::query(
            "INSERT INTO busway_checkpoints (projection, position) VALUES ($1, $2) \
             ON CONFLICT (projection) DO UPDATE SET position = EXCLUDED.position",
        )
        .bind(projection)
        .bind(as_i64(position))
        .execute(self.pool())
        .await
        .map_err(write_error)?;
        Ok(())
    }

    async fn park_event(&self, parked: ParkedEvent) -> Result<(), StoreWriteError> {
        sqlx::query(
            "INSERT INTO busway_parked_events (projection, stream, version, position, reason) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&parked.projection)
        .bind(&parked.stream)
        .bind(as_i64(parked.version))
        .bind(as_i64(parked.position))
        .bind(&parked.reason)
        .execute(self.pool())
        .await
        .map_err(write_error)?;
        Ok(())
    }

    async fn parked_events(&self, projection: &str) -> Result<Vec<ParkedEvent>, ReadError> {
        let rows: Vec<(String, i64, i64, String)> = sqlx::query_as(
            "SELECT stream, version, position, reason FROM busway_parked_events \
             WHERE projection = $1 ORDER BY position, id",
        )
        .bind(projection)
        .fetch_all(self.pool())
        .await
        .map_err(read_error)?;
        rows.into_iter()
            .map(|(stream, version, position, reason)| {
                Ok(ParkedEvent::from_parts(
                    projection.to_owned(),
                    stream,
                    u64_of(version, "version")?,
                    u64_of(position, "position")?,
                    reason,
                ))
            })
            .collect()
    }
}
