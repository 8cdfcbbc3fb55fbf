//! The database schema: versioned migrations, one list per component.
//!
//! `busway_schema_version` holds, per component (`transport`, and the
//! stores that share the database), how many entries of that component's
//! migration list a schema has had applied. [`migrate`] applies the missing
//! ones in order, in one transaction, under an advisory lock so processes
//! starting together do not race; a schema written by a newer busway (a
//! higher version than this build knows) is refused. Entries already
//! released never change; new tables are new entries at the end of a list.
//! Every table is prefixed `busway_`.

use std::fmt;
use std::future::Future;
use std::pin::Pin;

use sqlx::{Connection, Executor, PgConnection, PgPool};

/// Migration 1 of the transport: queues, bindings, messages, consumers.
///
/// Times are milliseconds since the Unix epoch on the database server's
/// clock (`busway_now_ms()`: the start of the current transaction, stable
/// within a statement so the dequeue can use the index), so processes on
/// hosts with skewed clocks agree on delays and leases. A binding keeps its
/// pattern as a regular expression over `'.' || topic`, so publishing routes
/// with one query and sees bindings made by other processes at once. `busway_messages.visible_at` is when the row may
/// next be leased: the publish time (plus delay) for a fresh message, the
/// lease deadline while a consumer holds it, the retry time after a delayed
/// nack. `enqueued_at` is the row's original `visible_at`, restored when a
/// delivery is released so it returns to its place. `lane` is the priority
/// the queue orders by (0 on queues without `max_priority`), `priority` the
/// message's own. The ready index serves the dequeue in delivery order.
/// `lease_token` identifies the lease a consumer holds; settling checks it,
/// so a delivery whose lease ran out cannot settle its redelivery.
const TRANSPORT_V1: &str = r#"
CREATE FUNCTION busway_now_ms() RETURNS bigint
    LANGUAGE sql STABLE
    AS $$ SELECT (extract(epoch FROM now()) * 1000)::bigint $$;

CREATE TABLE busway_queues (
    name TEXT PRIMARY KEY,
    spec TEXT NOT NULL
);

CREATE TABLE busway_bindings (
    queue   TEXT NOT NULL,
    pattern TEXT NOT NULL,
    regex   TEXT NOT NULL,
    PRIMARY KEY (queue, pattern)
);

CREATE TABLE busway_messages (
    seq            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    queue          TEXT NOT NULL,
    id             UUID NOT NULL,
    kind           TEXT NOT NULL,
    correlation_id TEXT,
    causation_id   TEXT,
    reply_to       TEXT,
    content_type   TEXT NOT NULL,
    headers        TEXT,
    timestamp      BIGINT NOT NULL,
    priority       SMALLINT NOT NULL DEFAULT 0,
    lane           SMALLINT NOT NULL DEFAULT 0,
    expires_at     BIGINT,
    topic          TEXT,
    payload        BYTEA NOT NULL,
    enqueued_at    BIGINT NOT NULL,
    visible_at     BIGINT NOT NULL,
    attempt        INTEGER NOT NULL DEFAULT 0,
    lease_token    BIGINT
);
CREATE INDEX busway_messages_ready ON busway_messages (queue, lane DESC, visible_at, seq);

CREATE TABLE busway_consumers (
    id           TEXT PRIMARY KEY,
    queue        TEXT NOT NULL,
    owner        BIGINT NOT NULL,
    heartbeat_at BIGINT NOT NULL,
    ttl_ms       BIGINT NOT NULL
);
CREATE INDEX busway_consumers_queue ON busway_consumers (queue);
CREATE INDEX busway_consumers_owner ON busway_consumers (owner);
"#;

/// The transport's migrations, in order.
pub(crate) const TRANSPORT_MIGRATIONS: &[&str] = &[TRANSPORT_V1];

/// Why a schema could not be prepared.
#[derive(Debug)]
pub(crate) enum SchemaError {
    /// PostgreSQL failed.
    Sql(sqlx::Error),
    /// The schema was written by a newer busway.
    TooNew {
        /// The component.
        component: String,
        /// The schema's version.
        found: i64,
        /// The newest version this build knows.
        supported: i64,
    },
}

impl fmt::Display for SchemaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SchemaError::Sql(e) => write!(f, "{e}"),
            SchemaError::TooNew {
                component,
                found,
                supported,
            } => write!(
                f,
                "the busway {component} tables have schema version {found}, but this version of \
                 busway only knows versions up to {supported}; use a newer busway"
            ),
        }
    }
}

impl std::error::Error for SchemaError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            SchemaError::Sql(e) => Some(e),
            SchemaError::TooNew { .. } => None,
        }
    }
}

impl From<sqlx::Error> for SchemaError {
    fn from(e: sqlx::Error) -> Self {
        SchemaError::Sql(e)
    }
}

impl SchemaError {
    pub(crate) fn is_retryable(&self) -> bool {
        match self {
            SchemaError::Sql(e) => crate::error::is_retryable(e),
            SchemaError::TooNew { .. } => false,
        }
    }
}

/// Brings `component`'s tables in `schema` up to date with `migrations`,
/// creating the schema if needed. Returns how many migrations were applied.
///
/// The stores sharing the transport's database call this with their own
/// component name and list.
pub(crate) fn migrate<'a>(
    pool: &'a PgPool,
    schema: &'a str,
    component: &'a str,
    migrations: &'a [&'a str],
) -> Pin<Box<dyn Future<Output = Result<usize, SchemaError>> + Send + 'a>> {
    // Boxed here, where the lifetimes are concrete: callers then see a
    // plain `Send` future.
    Box::pin(async move {
        let mut conn = pool.acquire().await?;
        migrate_on(&mut conn, schema, component, migrations).await
    })
}

async fn migrate_on(
    conn: &mut PgConnection,
    schema: &str,
    component: &str,
    migrations: &[&str],
) -> Result<usize, SchemaError> {
    let supported = i64::try_from(migrations.len()).unwrap_or(i64::MAX);
    let mut tx = conn.begin().await?;
    // One migrator per schema at a time, across processes.
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('busway_migrate:' || $1))")
        .bind(schema)
        .execute(&mut *tx)
        .await?;
    // The schema name was validated (letters, digits, `_`), so quoting it is safe.
    let create = format!(r#"CREATE SCHEMA IF NOT EXISTS "{schema}""#);
    sqlx::query(&create).execute(&mut *tx).await?;
    let search_path = format!(r#"SET LOCAL search_path TO "{schema}""#);
    sqlx::query(&search_path).execute(&mut *tx).await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS busway_schema_version (
             component TEXT PRIMARY KEY,
             version   BIGINT NOT NULL
         )",
    )
    .execute(&mut *tx)
    .await?;
    let found: Option<i64> =
        sqlx::query_scalar("SELECT version FROM busway_schema_version WHERE component = $1")
            .bind(component)
            .fetch_optional(&mut *tx)
            .await?;
    let found = found.unwrap_or(0);
    if found > supported {
        return Err(SchemaError::TooNew {
            component: component.into(),
            found,
            supported,
        });
    }
    let start = usize::try_from(found).unwrap_or(usize::MAX);
    let pending: Vec<String> = migrations
        .iter()
        .skip(start)
        .map(|sql| (*sql).to_owned())
        .collect();
    let applied = pending.len();
    for sql in pending {
        // Without arguments, the simple query protocol: several statements at once.
        (&mut *tx).execute(sql.as_str()).await?;
    }
    if applied > 0 {
        sqlx::query(
            "INSERT INTO busway_schema_version (component, version) VALUES ($1, $2)
             ON CONFLICT (component) DO UPDATE SET version = EXCLUDED.version",
        )
        .bind(component)
        .bind(supported)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(applied)
}
