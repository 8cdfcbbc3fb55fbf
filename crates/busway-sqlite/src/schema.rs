//! The database schema: connection settings and versioned migrations.
//!
//! `PRAGMA user_version` holds how many entries of [`MIGRATIONS`] a file has
//! had applied. Opening applies the missing ones in order, in one
//! transaction; an up-to-date file is left untouched; a file written by a
//! newer busway (a higher version than this one knows) is refused.
//!
//! New stores (event store, saga store, inbox, outbox) add their tables as new
//! entries at the end of the list; entries already released never change.
//! Every table is prefixed `busway_`.

use std::fmt;
use std::path::Path;

use rusqlite::{Connection, OpenFlags, TransactionBehavior};

use crate::config::SqliteConfig;

/// Migration 1: queues, bindings, messages, consumers.
///
/// `busway_messages.visible_at` is when the row may next be leased: the
/// publish time (plus delay) for a fresh message, the lease deadline while a
/// consumer holds it, the retry time after a delayed nack. `enqueued_at` is
/// the row's original `visible_at`, restored when a delivery is released so
/// it returns to its place. `lane` is the priority the queue orders by (0 on
/// queues without `max_priority`), `priority` the message's own. The ready
/// index `(queue, lane, visible_at)` makes a dequeue a range scan in
/// delivery order, however many rows are leased or delayed. `lease_owner`
/// is a random 63-bit id of the transport holding the lease; each transport
/// remembers the rows it leased, so no index on it is needed.
const V1: &str = "
CREATE TABLE busway_queues (
    name TEXT PRIMARY KEY NOT NULL,
    spec TEXT NOT NULL
) WITHOUT ROWID;

CREATE TABLE busway_bindings (
    queue   TEXT NOT NULL,
    pattern TEXT NOT NULL,
    PRIMARY KEY (queue, pattern)
) WITHOUT ROWID;

CREATE TABLE busway_messages (
    seq            INTEGER PRIMARY KEY,
    queue          TEXT NOT NULL,
    id             TEXT NOT NULL,
    kind           TEXT NOT NULL,
    correlation_id TEXT,
    causation_id   TEXT,
    reply_to       TEXT,
    content_type   TEXT NOT NULL,
    headers        TEXT,
    timestamp      INTEGER NOT NULL,
    priority       INTEGER NOT NULL DEFAULT 0,
    lane           INTEGER NOT NULL DEFAULT 0,
    expires_at     INTEGER,
    topic          TEXT,
    payload        BLOB NOT NULL,
    enqueued_at    INTEGER NOT NULL,
    visible_at     INTEGER NOT NULL,
    attempt        INTEGER NOT NULL DEFAULT 0,
    lease_owner    INTEGER,
    lease_token    INTEGER
);
CREATE INDEX busway_messages_ready ON busway_messages (queue, lane, visible_at);

CREATE TABLE busway_consumers (
    id           TEXT PRIMARY KEY NOT NULL,
    queue        TEXT NOT NULL,
    owner        INTEGER NOT NULL,
    heartbeat_at INTEGER NOT NULL,
    ttl_ms       INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX busway_consumers_queue ON busway_consumers (queue);
CREATE INDEX busway_consumers_owner ON busway_consumers (owner);
";

/// The migrations, in order. `PRAGMA user_version` = how many are applied.
pub(crate) const MIGRATIONS: &[&str] = &[V1];

/// The schema version this build writes.
pub(crate) fn current_version() -> u32 {
    u32::try_from(MIGRATIONS.len()).unwrap_or(u32::MAX)
}

/// Why a database could not be prepared.
#[derive(Debug)]
pub(crate) enum SchemaError {
    /// SQLite failed.
    Sqlite(rusqlite::Error),
    /// The file was written by a newer busway.
    TooNew {
        /// The file's version.
        found: u32,
        /// The newest version this build knows.
        supported: u32,
    },
}

impl fmt::Display for SchemaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SchemaError::Sqlite(e) => write!(f, "{e}"),
            SchemaError::TooNew { found, supported } => write!(
                f,
                "the database has schema version {found}, but this version of busway only knows \
                 versions up to {supported}; open it with a newer busway"
            ),
        }
    }
}

impl std::error::Error for SchemaError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            SchemaError::Sqlite(e) => Some(e),
            SchemaError::TooNew { .. } => None,
        }
    }
}

impl From<rusqlite::Error> for SchemaError {
    fn from(e: rusqlite::Error) -> Self {
        SchemaError::Sqlite(e)
    }
}

impl SchemaError {
    pub(crate) fn is_retryable(&self) -> bool {
        match self {
            SchemaError::Sqlite(e) => crate::error::is_retryable(e),
            SchemaError::TooNew { .. } => false,
        }
    }
}

/// Opens a connection to `path` with busway's settings: WAL, the configured
/// `synchronous`, a busy timeout so several processes can share the file.
pub(crate) fn open_connection(
    path: &Path,
    config: &SqliteConfig,
) -> Result<Connection, rusqlite::Error> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(config.busy_timeout)?;
    // WAL is persistent in the file, but setting it again is cheap and covers
    // files created by other tools.
    let mode: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        tracing::warn!(path = %path.display(), mode, "SQLite refused WAL mode");
    }
    conn.pragma_update(None, "synchronous", config.synchronous.pragma_value())?;
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
}

/// Brings the schema up to date. Returns how many migrations were applied.
pub(crate) fn migrate(conn: &mut Connection) -> Result<u32, SchemaError> {
    let supported = current_version();
    // Cheap check first, so an up-to-date file takes no write lock.
    let found: u32 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if found == supported {
        return Ok(0);
    }
    if found > supported {
        return Err(SchemaError::TooNew { found, supported });
    }
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    // Another process may have migrated meanwhile: read again under the lock.
    let found: u32 = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if found > supported {
        return Err(SchemaError::TooNew { found, supported });
    }
    let start = usize::try_from(found).unwrap_or(usize::MAX);
    let mut applied = 0;
    for sql in MIGRATIONS.iter().skip(start) {
        tx.execute_batch(sql)?;
        applied += 1;
    }
    tx.pragma_update(None, "user_version", supported)?;
    tx.commit()?;
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_idempotent_and_refuse_newer_files() -> Result<(), Box<dyn std::error::Error>>
    {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("m.db");
        let config = SqliteConfig::default();
        let mut conn = open_connection(&path, &config)?;
        assert_eq!(migrate(&mut conn)?, current_version());
        assert_eq!(migrate(&mut conn)?, 0);
        drop(conn);

        let mut conn = open_connection(&path, &config)?;
        assert_eq!(migrate(&mut conn)?, 0);
        let tables: i64 = conn.query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name LIKE 'busway_%'",
            [],
            |r| r.get(0),
        )?;
        assert_eq!(tables, 4);

        conn.pragma_update(None, "user_version", current_version() + 1)?;
        match migrate(&mut conn) {
            Err(e @ SchemaError::TooNew { .. }) => {
                assert!(e.to_string().contains("newer busway"), "{e}")
            }
            other => panic!("expected TooNew, got {other:?}"),
        }
        Ok(())
    }
}
