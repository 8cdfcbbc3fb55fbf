//! [`PostgresSagaStore`]: sagas in the transport's PostgreSQL database.

use std::collections::BTreeMap;

use async_trait::async_trait;
use busway_core::saga_store::{
    CreateSagaError, LoadSagaError, SagaEvent, SagaQuery, SagaRecord, SagaStatus, SagaStore,
    StepRecord, StepResultError, UpdateSagaError,
};
use serde_json::Value;
use sqlx::postgres::PgRow;
use sqlx::{PgPool, Row};

use crate::transport::PostgresTransport;

const SCHEMA: [&str; 6] = [
    "CREATE TABLE IF NOT EXISTS busway_sagas (
        seq BIGSERIAL UNIQUE,
        id TEXT PRIMARY KEY,
        definition TEXT NOT NULL,
        status TEXT NOT NULL,
        version BIGINT NOT NULL,
        input TEXT NOT NULL,
        steps TEXT NOT NULL,
        error TEXT,
        created_at_ms BIGINT NOT NULL,
        updated_at_ms BIGINT NOT NULL,
        due_at_ms BIGINT
    )",
    "CREATE INDEX IF NOT EXISTS busway_sagas_due ON busway_sagas (due_at_ms)
        WHERE due_at_ms IS NOT NULL",
    "CREATE INDEX IF NOT EXISTS busway_sagas_status ON busway_sagas (status, seq)",
    "CREATE TABLE IF NOT EXISTS busway_saga_events (
        seq BIGSERIAL PRIMARY KEY,
        saga_id TEXT NOT NULL,
        at_ms BIGINT NOT NULL,
        kind TEXT NOT NULL,
        step_id TEXT,
        attempt BIGINT NOT NULL,
        detail TEXT
    )",
    "CREATE INDEX IF NOT EXISTS busway_saga_events_saga ON busway_saga_events (saga_id, seq)",
    "CREATE TABLE IF NOT EXISTS busway_saga_step_results (
        key TEXT PRIMARY KEY,
        result TEXT NOT NULL
    )",
];

const COLUMNS: &str =
    "id, definition, status, version, input, steps, error, created_at_ms, updated_at_ms, due_at_ms";

/// A durable [`SagaStore`] in the database (and schema) of a
/// [`PostgresTransport`], on its connection pool. Tables: `busway_sagas`,
/// `busway_saga_events` (the history), `busway_saga_step_results`
/// (participants' results by idempotency key). Any number of orchestrator
/// processes may share it: saves are conditional on the version read.
///
/// ```no_run
/// use busway_core::saga_store::SagaStore;
/// use busway_postgres::{PostgresSagaStore, PostgresTransport};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let transport = PostgresTransport::connect("postgres://postgres@127.0.0.1/test").await?;
/// let store = PostgresSagaStore::open(transport).await?;
/// assert!(store.load("order_saga_123").await?.is_none());
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct PostgresSagaStore {
    transport: PostgresTransport,
}

impl PostgresSagaStore {
    /// A saga store in `transport`'s database; creates its tables if needed.
    pub async fn open(transport: PostgresTransport) -> Result<Self, sqlx::Error> {
        let mut tx = transport.pool().begin().await?;
        // Several processes may open the store at once.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('busway_saga_store_schema'))")
            .execute(&mut *tx)
            .await?;
        for statement in SCHEMA {
            sqlx::query(statement).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(Self { transport })
    }

    /// The transport whose database holds the sagas.
    pub fn transport(&self) -> &PostgresTransport {
        &self.transport
    }

    fn pool(&self) -> &PgPool {
        self.transport.pool()
    }
}

fn is_retryable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::Protocol(_) => true,
        // serialization_failure, deadlock_detected, too_many_connections, admin shutdown…
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|c| matches!(&*c, "40001" | "40P01" | "53300" | "57P01" | "57P03")),
        _ => false,
    }
}

macro_rules! from_sqlx {
    ($($t:ty),*) => {$(
        impl From<Sqlx> for $t {
            fn from(Sqlx(e): Sqlx) -> Self {
                match e {
                    sqlx::Error::PoolClosed => <$t>::Closed,
                    e => {
                        let retryable = is_retryable(&e);
                        <$t>::backend(e, retryable)
                    }
                }
            }
        }
    )*};
}

/// An sqlx error on its way into a saga store error.
struct Sqlx(sqlx::Error);
from_sqlx!(
    CreateSagaError,
    UpdateSagaError,
    LoadSagaError,
    StepResultError
);

fn sqlx<E: From<Sqlx>>(e: sqlx::Error) -> E {
    E::from(Sqlx(e))
}

fn decode(row: &PgRow) -> Result<SagaRecord, LoadSagaError> {
    let id: String = row.try_get("id").map_err(sqlx::<LoadSagaError>)?;
    let corrupt = |reason: String| LoadSagaError::Corrupt {
        id: id.clone(),
        reason,
    };
    let get_err = |e: sqlx::Error| corrupt(e.to_string());
    let status: String = row.try_get("status").map_err(get_err)?;
    let status: SagaStatus = status.parse().map_err(|e| corrupt(format!("{e}")))?;
    let input: String = row.try_get("input").map_err(get_err)?;
    let input: Value = serde_json::from_str(&input).map_err(|e| corrupt(format!("input: {e}")))?;
    let steps: String = row.try_get("steps").map_err(get_err)?;
    let steps: Vec<StepRecord> =
        serde_json::from_str(&steps).map_err(|e| corrupt(format!("steps: {e}")))?;
    let version: i64 = row.try_get("version").map_err(get_err)?;
    Ok(SagaRecord {
        definition: row.try_get("definition").map_err(get_err)?,
        status,
        version: u64::try_from(version).map_err(|e| corrupt(format!("version: {e}")))?,
        input,
        steps,
        error: row.try_get("error").map_err(get_err)?,
        created_at_ms: row.try_get("created_at_ms").map_err(get_err)?,
        updated_at_ms: row.try_get("updated_at_ms").map_err(get_err)?,
        due_at_ms: row.try_get("due_at_ms").map_err(get_err)?,
        id,
    })
}

fn decode_all(rows: &[PgRow]) -> Result<Vec<SagaRecord>, LoadSagaError> {
    rows.iter().map(decode).collect()
}

async fn insert_events(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    id: &str,
    events: &[SagaEvent],
) -> Result<(), sqlx::Error> {
    for e in events {
        sqlx::query(
            "INSERT INTO busway_saga_events (saga_id, at_ms, kind, step_id, attempt, detail)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(id)
        .bind(e.at_ms)
        .bind(e.kind.as_str())
        .bind(e.step_id.as_deref())
        .bind(i64::from(e.attempt))
        .bind(e.detail.as_deref())
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

fn version(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn limit(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[async_trait]
impl SagaStore for PostgresSagaStore {
    async fn create(&self, saga: &SagaRecord, events: &[SagaEvent]) -> Result<(), CreateSagaError> {
        let input =
            serde_json::to_string(&saga.input).map_err(|e| CreateSagaError::backend(e, false))?;
        let steps =
            serde_json::to_string(&saga.steps).map_err(|e| CreateSagaError::backend(e, false))?;
        let mut tx = self.pool().begin().await.map_err(sqlx::<CreateSagaError>)?;
        let inserted = sqlx::query(
            "INSERT INTO busway_sagas (id, definition, status, version, input, steps, error,
                 created_at_ms, updated_at_ms, due_at_ms)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(&saga.id)
        .bind(&saga.definition)
        .bind(saga.status.as_str())
        .bind(version(saga.version))
        .bind(input)
        .bind(steps)
        .bind(saga.error.as_deref())
        .bind(saga.created_at_ms)
        .bind(saga.updated_at_ms)
        .bind(saga.due_at_ms)
        .execute(&mut *tx)
        .await
        .map_err(sqlx::<CreateSagaError>)?;
        if inserted.rows_affected() == 0 {
            return Err(CreateSagaError::AlreadyExists {
                id: saga.id.clone(),
            });
        }
        insert_events(&mut tx, &saga.id, events)
            .await
            .map_err(sqlx::<CreateSagaError>)?;
        tx.commit().await.map_err(sqlx::<CreateSagaError>)
    }

    async fn update(
        &self,
        saga: &SagaRecord,
        expected_version: u64,
        events: &[SagaEvent],
    ) -> Result<(), UpdateSagaError> {
        let input =
            serde_json::to_string(&saga.input).map_err(|e| UpdateSagaError::backend(e, false))?;
        let steps =
            serde_json::to_string(&saga.steps).map_err(|e| UpdateSagaError::backend(e, false))?;
        let mut tx = self.pool().begin().await.map_err(sqlx::<UpdateSagaError>)?;
        let updated = sqlx::query(
            "UPDATE busway_sagas SET definition = $2, status = $3, version = $4, input = $5,
                 steps = $6, error = $7, updated_at_ms = $8, due_at_ms = $9
             WHERE id = $1 AND version = $10",
        )
        .bind(&saga.id)
        .bind(&saga.definition)
        .bind(saga.status.as_str())
        .bind(version(saga.version))
        .bind(input)
        .bind(steps)
        .bind(saga.error.as_deref())
        .bind(saga.updated_at_ms)
        .bind(saga.due_at_ms)
        .bind(version(expected_version))
        .execute(&mut *tx)
        .await
        .map_err(sqlx::<UpdateSagaError>)?;
        if updated.rows_affected() == 0 {
            let actual: Option<i64> =
                sqlx::query_scalar("SELECT version FROM busway_sagas WHERE id = $1")
                    .bind(&saga.id)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(sqlx::<UpdateSagaError>)?;
            return Err(match actual {
                None => UpdateSagaError::NotFound {
                    id: saga.id.clone(),
                },
                Some(actual) => UpdateSagaError::Conflict {
                    id: saga.id.clone(),
                    expected: expected_version,
                    actual: u64::try_from(actual).unwrap_or(0),
                },
            });
        }
        insert_events(&mut tx, &saga.id, events)
            .await
            .map_err(sqlx::<UpdateSagaError>)?;
        tx.commit().await.map_err(sqlx::<UpdateSagaError>)
    }

    async fn load(&self, id: &str) -> Result<Option<SagaRecord>, LoadSagaError> {
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM busway_sagas WHERE id = $1"))
            .bind(id)
            .fetch_optional(self.pool())
            .await
            .map_err(sqlx::<LoadSagaError>)?;
        row.as_ref().map(decode).transpose()
    }

    async fn due(&self, now_ms: i64, n: usize) -> Result<Vec<SagaRecord>, LoadSagaError> {
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM busway_sagas
             WHERE due_at_ms IS NOT NULL AND due_at_ms <= $1
               AND status IN ('pending', 'running', 'compensating')
             ORDER BY due_at_ms LIMIT $2"
        ))
        .bind(now_ms)
        .bind(limit(n))
        .fetch_all(self.pool())
        .await
        .map_err(sqlx::<LoadSagaError>)?;
        decode_all(&rows)
    }

    async fn list(&self, query: &SagaQuery) -> Result<Vec<SagaRecord>, LoadSagaError> {
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM busway_sagas
             WHERE ($1::TEXT IS NULL OR status = $1)
               AND ($2::BIGINT IS NULL OR updated_at_ms < $2)
               AND (NOT $3 OR status IN ('pending', 'running', 'compensating'))
             ORDER BY seq LIMIT $4"
        ))
        .bind(query.status.map(SagaStatus::as_str))
        .bind(query.updated_before_ms)
        .bind(query.active_only)
        .bind(limit(query.limit))
        .fetch_all(self.pool())
        .await
        .map_err(sqlx::<LoadSagaError>)?;
        decode_all(&rows)
    }

    async fn count_by_status(&self) -> Result<BTreeMap<SagaStatus, u64>, LoadSagaError> {
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT status, count(*) FROM busway_sagas GROUP BY status")
                .fetch_all(self.pool())
                .await
                .map_err(sqlx::<LoadSagaError>)?;
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
        type EventRow = (i64, String, Option<String>, i64, Option<String>);
        let rows: Vec<EventRow> = sqlx::query_as(
            "SELECT at_ms, kind, step_id, attempt, detail FROM busway_saga_events
             WHERE saga_id = $1 ORDER BY seq",
        )
        .bind(id)
        .fetch_all(self.pool())
        .await
        .map_err(sqlx::<LoadSagaError>)?;
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
                    attempt: u32::try_from(attempt).unwrap_or(u32::MAX),
                    detail,
                })
            })
            .collect()
    }

    async fn step_result(&self, key: &str) -> Result<Option<Value>, StepResultError> {
        let stored: Option<String> =
            sqlx::query_scalar("SELECT result FROM busway_saga_step_results WHERE key = $1")
                .bind(key)
                .fetch_optional(self.pool())
                .await
                .map_err(sqlx::<StepResultError>)?;
        stored
            .map(|s| serde_json::from_str(&s).map_err(|e| StepResultError::backend(e, false)))
            .transpose()
    }

    async fn save_step_result(&self, key: &str, result: &Value) -> Result<Value, StepResultError> {
        let encoded =
            serde_json::to_string(result).map_err(|e| StepResultError::backend(e, false))?;
        // Insert, or keep the first result and return it, in one statement.
        let stored: Option<String> = sqlx::query_scalar(
            "WITH inserted AS (
                 INSERT INTO busway_saga_step_results (key, result) VALUES ($1, $2)
                 ON CONFLICT (key) DO NOTHING RETURNING result
             )
             SELECT result FROM inserted
             UNION ALL
             SELECT result FROM busway_saga_step_results WHERE key = $1
             LIMIT 1",
        )
        .bind(key)
        .bind(encoded)
        .fetch_optional(self.pool())
        .await
        .map_err(sqlx::<StepResultError>)?;
        let stored = match stored {
            Some(stored) => stored,
            // A concurrent insert committed after this statement's snapshot.
            None => {
                sqlx::query_scalar("SELECT result FROM busway_saga_step_results WHERE key = $1")
                    .bind(key)
                    .fetch_one(self.pool())
                    .await
                    .map_err(sqlx::<StepResultError>)?
            }
        };
        serde_json::from_str(&stored).map_err(|e| StepResultError::backend(e, false))
    }
}
