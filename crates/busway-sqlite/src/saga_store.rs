//! [`SqliteSagaStore`]: sagas in the same SQLite file as the queues.

use std::collections::BTreeMap;

use async_trait::async_trait;
use busway_core::saga_store::{
    CreateSagaError, LoadSagaError, SagaEvent, SagaQuery, SagaRecord, SagaStatus, SagaStore,
    StepRecord, StepResultError, UpdateSagaError,
};
use rusqlite::{params, Connection, OptionalExtension};
use serde_json::Value;

use crate::job::{WriteError, WriteTx};
use crate::transport::SqliteTransport;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS busway_sagas (
    id TEXT PRIMARY KEY,
    definition TEXT NOT NULL,
    status TEXT NOT NULL,
    version INTEGER NOT NULL,
    input TEXT NOT NULL,
    steps TEXT NOT NULL,
    error TEXT,
    created_at_ms INTEGER NOT NULL,
    updated_at_ms INTEGER NOT NULL,
    due_at_ms INTEGER
);
CREATE INDEX IF NOT EXISTS busway_sagas_due ON busway_sagas (due_at_ms)
    WHERE due_at_ms IS NOT NULL;
CREATE INDEX IF NOT EXISTS busway_sagas_status ON busway_sagas (status);
CREATE TABLE IF NOT EXISTS busway_saga_events (
    seq INTEGER PRIMARY KEY,
    saga_id TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    kind TEXT NOT NULL,
    step_id TEXT,
    attempt INTEGER NOT NULL,
    detail TEXT
);
CREATE INDEX IF NOT EXISTS busway_saga_events_saga ON busway_saga_events (saga_id, seq);
CREATE TABLE IF NOT EXISTS busway_saga_step_results (
    key TEXT PRIMARY KEY,
    result TEXT NOT NULL
);
";

const COLUMNS: &str =
    "id, definition, status, version, input, steps, error, created_at_ms, updated_at_ms, due_at_ms";

/// A durable [`SagaStore`] in the database of a [`SqliteTransport`]: every
/// save is a job of the transport's writer, so it shares the queue's group
/// commit (and fsync) with everything else written at that moment.
///
/// Tables: `busway_sagas` (one row per saga, its steps as JSON),
/// `busway_saga_events` (the history) and `busway_saga_step_results`
/// (participants' results by idempotency key).
///
/// ```
/// use busway_core::saga_store::{SagaRecord, SagaStatus, SagaStore};
/// use busway_sqlite::{SqliteSagaStore, SqliteTransport};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # tokio::runtime::Runtime::new()?.block_on(async {
/// let dir = tempfile::tempdir()?;
/// let transport = SqliteTransport::open(dir.path().join("busway.db"))?;
/// let store = SqliteSagaStore::open(transport).await?;
/// let saga = SagaRecord {
///     id: "order_saga_123".into(), definition: "order".into(), status: SagaStatus::Running,
///     version: 1, input: serde_json::json!({"order_id": "o-1"}), steps: vec![], error: None,
///     created_at_ms: 0, updated_at_ms: 0, due_at_ms: Some(0),
/// };
/// store.create(&saga, &[]).await?;
/// assert_eq!(store.load("order_saga_123").await?, Some(saga));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// # })
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct SqliteSagaStore {
    transport: SqliteTransport,
}

impl SqliteSagaStore {
    /// A saga store in `transport`'s database; creates its tables if needed.
    pub async fn open(transport: SqliteTransport) -> Result<Self, WriteError> {
        transport
            .write(|tx| {
                tx.connection().execute_batch(SCHEMA)?;
                Ok::<_, WriteError>(())
            })
            .await?;
        Ok(Self { transport })
    }

    /// The transport whose database holds the sagas.
    pub fn transport(&self) -> &SqliteTransport {
        &self.transport
    }

    /// The step result stored under idempotency key `key` (JSON text), read
    /// inside a write job: a participant whose effect is a write to this
    /// database checks, runs and saves in one transaction.
    pub fn step_result_in(tx: &WriteTx<'_>, key: &str) -> rusqlite::Result<Option<String>> {
        tx.connection()
            .prepare_cached("SELECT result FROM busway_saga_step_results WHERE key = ?1")?
            .query_row([key], |r| r.get(0))
            .optional()
    }

    /// Stores `result` (JSON text) under `key` inside a write job unless a
    /// result is stored there already; returns the stored one (the first wins).
    pub fn save_step_result_in(
        tx: &WriteTx<'_>,
        key: &str,
        result: &str,
    ) -> rusqlite::Result<String> {
        let conn = tx.connection();
        conn.prepare_cached(
            "INSERT INTO busway_saga_step_results (key, result) VALUES (?1, ?2)
             ON CONFLICT (key) DO NOTHING",
        )?
        .execute(params![key, result])?;
        conn.prepare_cached("SELECT result FROM busway_saga_step_results WHERE key = ?1")?
            .query_row([key], |r| r.get(0))
    }
}

/// A failure inside a write job.
enum Fail {
    Write(WriteError),
    Exists,
    NotFound,
    Conflict(u64),
}

impl From<WriteError> for Fail {
    fn from(e: WriteError) -> Self {
        Fail::Write(e)
    }
}

impl From<rusqlite::Error> for Fail {
    fn from(e: rusqlite::Error) -> Self {
        Fail::Write(WriteError::from(e))
    }
}

macro_rules! from_write_error {
    ($($t:ty),*) => {$(
        impl From<WriteErrorOf> for $t {
            fn from(WriteErrorOf(e): WriteErrorOf) -> Self {
                match e {
                    WriteError::Closed => <$t>::Closed,
                    e => {
                        let retryable = e.is_retryable();
                        <$t>::backend(e, retryable)
                    }
                }
            }
        }
    )*};
}

/// A [`WriteError`] on its way into a saga store error.
struct WriteErrorOf(WriteError);
from_write_error!(
    CreateSagaError,
    UpdateSagaError,
    LoadSagaError,
    StepResultError
);

fn write_error<E: From<WriteErrorOf>>(e: WriteError) -> E {
    E::from(WriteErrorOf(e))
}

/// A saga row as stored, decoded after the read.
struct Row {
    id: String,
    definition: String,
    status: String,
    version: i64,
    input: String,
    steps: String,
    error: Option<String>,
    created_at_ms: i64,
    updated_at_ms: i64,
    due_at_ms: Option<i64>,
}

impl Row {
    fn read(r: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
            id: r.get(0)?,
            definition: r.get(1)?,
            status: r.get(2)?,
            version: r.get(3)?,
            input: r.get(4)?,
            steps: r.get(5)?,
            error: r.get(6)?,
            created_at_ms: r.get(7)?,
            updated_at_ms: r.get(8)?,
            due_at_ms: r.get(9)?,
        })
    }

    fn decode(self) -> Result<SagaRecord, LoadSagaError> {
        let corrupt = |reason: String| LoadSagaError::Corrupt {
            id: self.id.clone(),
            reason,
        };
        let status: SagaStatus = self.status.parse().map_err(|e| corrupt(format!("{e}")))?;
        let input: Value =
            serde_json::from_str(&self.input).map_err(|e| corrupt(format!("input: {e}")))?;
        let steps: Vec<StepRecord> =
            serde_json::from_str(&self.steps).map_err(|e| corrupt(format!("steps: {e}")))?;
        let version = u64::try_from(self.version).map_err(|e| corrupt(format!("version: {e}")))?;
        Ok(SagaRecord {
            id: self.id,
            definition: self.definition,
            status,
            version,
            input,
            steps,
            error: self.error,
            created_at_ms: self.created_at_ms,
            updated_at_ms: self.updated_at_ms,
            due_at_ms: self.due_at_ms,
        })
    }
}

/// A saga's columns, encoded before the write job.
struct Encoded {
    saga: SagaRecord,
    input: String,
    steps: String,
    version: i64,
}

fn encode(saga: &SagaRecord) -> Result<Encoded, serde_json::Error> {
    Ok(Encoded {
        input: serde_json::to_string(&saga.input)?,
        steps: serde_json::to_string(&saga.steps)?,
        version: i64::try_from(saga.version).unwrap_or(i64::MAX),
        saga: saga.clone(),
    })
}

fn insert_events(conn: &Connection, id: &str, events: &[SagaEvent]) -> rusqlite::Result<()> {
    if events.is_empty() {
        return Ok(());
    }
    let mut stmt = conn.prepare_cached(
        "INSERT INTO busway_saga_events (saga_id, at_ms, kind, step_id, attempt, detail)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?;
    for e in events {
        stmt.execute(params![
            id,
            e.at_ms,
            e.kind.as_str(),
            e.step_id,
            e.attempt,
            e.detail
        ])?;
    }
    Ok(())
}

fn query_rows(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
) -> rusqlite::Result<Vec<Row>> {
    let mut stmt = conn.prepare_cached(sql)?;
    let rows = stmt.query_map(params, Row::read)?;
    rows.collect()
}

fn decode_all(rows: Vec<Row>) -> Result<Vec<SagaRecord>, LoadSagaError> {
    rows.into_iter().map(Row::decode).collect()
}

fn limit(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[async_trait]
impl SagaStore for SqliteSagaStore {
    async fn create(&self, saga: &SagaRecord, events: &[SagaEvent]) -> Result<(), CreateSagaError> {
        let encoded = encode(saga).map_err(|e| CreateSagaError::backend(e, false))?;
        let events = events.to_vec();
        let result = self
            .transport
            .write(move |tx| {
                let conn = tx.connection();
                let s = &encoded.saga;
                let inserted = conn
                    .prepare_cached(
                        "INSERT INTO busway_sagas (id, definition, status, version, input, steps,
                             error, created_at_ms, updated_at_ms, due_at_ms)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
                         ON CONFLICT (id) DO NOTHING",
                    )?
                    .execute(params![
                        s.id,
                        s.definition,
                        s.status.as_str(),
                        encoded.version,
                        encoded.input,
                        encoded.steps,
                        s.error,
                        s.created_at_ms,
                        s.updated_at_ms,
                        s.due_at_ms
                    ])?;
                if inserted == 0 {
                    return Err(Fail::Exists);
                }
                insert_events(conn, &s.id, &events)?;
                Ok(())
            })
            .await;
        result.map_err(|e| match e {
            Fail::Exists => CreateSagaError::AlreadyExists {
                id: saga.id.clone(),
            },
            Fail::Write(e) => write_error(e),
            Fail::NotFound | Fail::Conflict(_) => {
                CreateSagaError::backend("unexpected conflict on insert", false)
            }
        })
    }

    async fn update(
        &self,
        saga: &SagaRecord,
        expected_version: u64,
        events: &[SagaEvent],
    ) -> Result<(), UpdateSagaError> {
        let encoded = encode(saga).map_err(|e| UpdateSagaError::backend(e, false))?;
        let events = events.to_vec();
        let expected = i64::try_from(expected_version).unwrap_or(i64::MAX);
        let result = self
            .transport
            .write(move |tx| {
                let conn = tx.connection();
                let s = &encoded.saga;
                let updated = conn
                    .prepare_cached(
                        "UPDATE busway_sagas SET definition = ?2, status = ?3, version = ?4,
                             input = ?5, steps = ?6, error = ?7, updated_at_ms = ?8, due_at_ms = ?9
                         WHERE id = ?1 AND version = ?10",
                    )?
                    .execute(params![
                        s.id,
                        s.definition,
                        s.status.as_str(),
                        encoded.version,
                        encoded.input,
                        encoded.steps,
                        s.error,
                        s.updated_at_ms,
                        s.due_at_ms,
                        expected
                    ])?;
                if updated == 0 {
                    let actual: Option<i64> = conn
                        .prepare_cached("SELECT version FROM busway_sagas WHERE id = ?1")?
                        .query_row([&s.id], |r| r.get(0))
                        .optional()?;
                    return Err(match actual {
                        None => Fail::NotFound,
                        Some(v) => Fail::Conflict(u64::try_from(v).unwrap_or(0)),
                    });
                }
                insert_events(conn, &s.id, &events)?;
                Ok(())
            })
            .await;
        result.map_err(|e| match e {
            Fail::NotFound => UpdateSagaError::NotFound {
                id: saga.id.clone(),
            },
            Fail::Conflict(actual) => UpdateSagaError::Conflict {
                id: saga.id.clone(),
                expected: expected_version,
                actual,
            },
            Fail::Write(e) => write_error(e),
            Fail::Exists => UpdateSagaError::backend("unexpected duplicate on update", false),
        })
    }

    async fn load(&self, id: &str) -> Result<Option<SagaRecord>, LoadSagaError> {
        let id = id.to_owned();
        let row = self
            .transport
            .read(move |conn| {
                conn.prepare_cached(&format!("SELECT {COLUMNS} FROM busway_sagas WHERE id = ?1"))?
                    .query_row([id], Row::read)
                    .optional()
            })
            .await
            .map_err(write_error::<LoadSagaError>)?;
        row.map(Row::decode).transpose()
    }

    async fn due(&self, now_ms: i64, n: usize) -> Result<Vec<SagaRecord>, LoadSagaError> {
        let rows = self
            .transport
            .read(move |conn| {
                query_rows(
                    conn,
                    &format!(
                        "SELECT {COLUMNS} FROM busway_sagas
                         WHERE due_at_ms IS NOT NULL AND due_at_ms <= ?1
                           AND status IN ('pending', 'running', 'compensating')
                         ORDER BY due_at_ms LIMIT ?2"
                    ),
                    params![now_ms, limit(n)],
                )
            })
            .await
            .map_err(write_error::<LoadSagaError>)?;
        decode_all(rows)
    }

    async fn list(&self, query: &SagaQuery) -> Result<Vec<SagaRecord>, LoadSagaError> {
        let query = query.clone();
        let rows = self
            .transport
            .read(move |conn| {
                let status = query.status.map(SagaStatus::as_str);
                query_rows(
                    conn,
                    &format!(
                        "SELECT {COLUMNS} FROM busway_sagas
                         WHERE (?1 IS NULL OR status = ?1)
                           AND (?2 IS NULL OR updated_at_ms < ?2)
                           AND (?3 = 0 OR status IN ('pending', 'running', 'compensating'))
                         ORDER BY rowid LIMIT ?4"
                    ),
                    params![
                        status,
                        query.updated_before_ms,
                        query.active_only,
                        limit(query.limit)
                    ],
                )
            })
            .await
            .map_err(write_error::<LoadSagaError>)?;
        decode_all(rows)
    }

    async fn count_by_status(&self) -> Result<BTreeMap<SagaStatus, u64>, LoadSagaError> {
        let rows: Vec<(String, i64)> = self
            .transport
            .read(|conn| {
                let mut stmt = conn
                    .prepare_cached("SELECT status, count(*) FROM busway_sagas GROUP BY status")?;
                let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
                rows.collect()
            })
            .await
            .map_err(write_error::<LoadSagaError>)?;
        let mut counts = BTreeMap::new();
        for (status, n) in rows {
            let status: SagaStatus = status.parse().map_err(|e| LoadSagaError::Corrupt {
                id: String::new(),
                reason: format!("{e}"),
            })?;
            counts.insert(status, u64::try_from(n).unwrap_or(0));
        }
        Ok(counts)
    }

    async fn history(&self, id: &str) -> Result<Vec<SagaEvent>, LoadSagaError> {
        let saga_id = id.to_owned();
        type EventRow = (i64, String, Option<String>, u32, Option<String>);
        let rows: Vec<EventRow> = self
            .transport
            .read(move |conn| {
                let mut stmt = conn.prepare_cached(
                    "SELECT at_ms, kind, step_id, attempt, detail FROM busway_saga_events
                     WHERE saga_id = ?1 ORDER BY seq",
                )?;
                let rows = stmt.query_map([saga_id], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                })?;
                rows.collect()
            })
            .await
            .map_err(write_error::<LoadSagaError>)?;
        rows.into_iter()
            .map(|(at_ms, kind, step_id, attempt, detail)| {
                let kind = kind.parse().map_err(|e| LoadSagaError::Corrupt {
                    id: id.to_owned(),
                    reason: format!("history: {e}"),
                })?;
                Ok(SagaEvent {
                    at_ms,
                    kind,
                    step_id,
                    attempt,
                    detail,
                })
            })
            .collect()
    }

    async fn step_result(&self, key: &str) -> Result<Option<Value>, StepResultError> {
        let key = key.to_owned();
        let stored: Option<String> = self
            .transport
            .read(move |conn| {
                conn.prepare_cached("SELECT result FROM busway_saga_step_results WHERE key = ?1")?
                    .query_row([key], |r| r.get(0))
                    .optional()
            })
            .await
            .map_err(write_error::<StepResultError>)?;
        stored
            .map(|s| serde_json::from_str(&s).map_err(|e| StepResultError::backend(e, false)))
            .transpose()
    }

    async fn save_step_result(&self, key: &str, result: &Value) -> Result<Value, StepResultError> {
        let key = key.to_owned();
        let encoded =
            serde_json::to_string(result).map_err(|e| StepResultError::backend(e, false))?;
        let stored: String = self
            .transport
            .write(move |tx| Ok::<_, WriteError>(Self::save_step_result_in(tx, &key, &encoded)?))
            .await
            .map_err(write_error::<StepResultError>)?;
        serde_json::from_str(&stored).map_err(|e| StepResultError::backend(e, false))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use busway_core::saga_store::{SagaEventKind, StepStatus};

    fn saga(id: &str, due: Option<i64>) -> SagaRecord {
        SagaRecord {
            id: id.into(),
            definition: "order".into(),
            status: SagaStatus::Running,
            version: 1,
            input: serde_json::json!({"amount": 5}),
            steps: vec![StepRecord::new("a"), StepRecord::new("b")],
            error: None,
            created_at_ms: 10,
            updated_at_ms: 10,
            due_at_ms: due,
        }
    }

    #[tokio::test]
    async fn versions_history_due_and_step_results() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let transport = SqliteTransport::open(dir.path().join("sagas.db"))?;
        let store = SqliteSagaStore::open(transport.clone()).await?;
        let created = SagaEvent::new(10, SagaEventKind::Created);
        store
            .create(&saga("s1", Some(100)), std::slice::from_ref(&created))
            .await?;
        store.create(&saga("s2", None), &[]).await?;
        let again = store.create(&saga("s1", None), &[]).await;
        assert!(matches!(again, Err(CreateSagaError::AlreadyExists { .. })));

        let mut s1 = store.load("s1").await?.ok_or("s1 missing")?;
        s1.version = 2;
        s1.steps[0].status = StepStatus::Completed;
        s1.steps[0].output = Some(serde_json::json!({"order_id": "o-1"}));
        let done = SagaEvent::new(20, SagaEventKind::ActionCompleted).step("a", 1);
        store.update(&s1, 1, std::slice::from_ref(&done)).await?;
        let stale = store.update(&s1, 1, &[]).await;
        assert!(
            matches!(stale, Err(UpdateSagaError::Conflict { actual: 2, .. })),
            "{stale:?}"
        );
        assert_eq!(store.load("s1").await?, Some(s1.clone()));
        assert_eq!(store.history("s1").await?, vec![created, done]);

        assert!(store.due(99, 10).await?.is_empty());
        assert_eq!(store.due(100, 10).await?.len(), 1);
        let running = store.list(&SagaQuery::status(SagaStatus::Running)).await?;
        assert_eq!(running.len(), 2);
        assert_eq!(
            store.count_by_status().await?.get(&SagaStatus::Running),
            Some(&2)
        );

        let first = serde_json::json!({"charged": 1});
        let second = serde_json::json!({"charged": 2});
        assert_eq!(store.step_result("k").await?, None);
        assert_eq!(store.save_step_result("k", &first).await?, first);
        assert_eq!(store.save_step_result("k", &second).await?, first);
        assert_eq!(store.step_result("k").await?, Some(first));
        Ok(())
    }
}
