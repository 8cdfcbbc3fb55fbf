//! Fault tests for busway's durable backends. The tests live in `tests/`; the
//! `busway-crash-child` binary is the process they kill.
//!
//! The child speaks a line protocol on stdout, printing a line only after the
//! backend has confirmed the operation:
//! - `busway-crash-child publish URL QUEUE FIRST_ID` publishes ids `FIRST_ID..`
//!   forever and prints `P <id>` once each publish is durable;
//! - `busway-crash-child consume URL QUEUE` prints `D <id>` for each delivery,
//!   acknowledges it and prints `A <id>` once the acknowledgement is durable.
//! - `busway-es-crash-child append URL` appends batches of 1 to 5 events to
//!   the streams `es-0` … `es-63` from 16 tasks forever, and prints
//!   `A <stream> <first version> <count> <last position> <batch id>` once
//!   each append has returned (committed with `synchronous=FULL`);
//! - `busway-es-crash-child project URL` runs the [`Balances`] projection
//!   into its read model in the same SQLite file until killed, printing
//!   `B <checkpoint>` after each batch has committed.

pub mod saga;

use busway::es::{Envelope, Projection};
use busway::sqlite::rusqlite::{self, params};
use busway::sqlite::SqliteEventStore;
use serde_json::Value;

/// How many streams the appending child writes to.
pub const ES_STREAMS: usize = 64;

/// A read model of per-stream totals in the event store's SQLite file:
/// table `crash_balances (stream, total, events, last_version)`. Its
/// checkpoint is saved in the same transaction as its rows
/// ([`SqliteEventStore::apply_projection`]), so after any crash each event
/// is counted exactly once: `events` is the number of events applied,
/// `total` the sum of their `amount`s, `last_version` the last one applied.
#[derive(Debug, Clone)]
pub struct Balances {
    store: SqliteEventStore,
    progress: bool,
}

impl Balances {
    /// The projection name (its checkpoint key).
    pub const NAME: &'static str = "crash_balances";

    /// The projection, writing into `store`'s database.
    pub fn new(store: SqliteEventStore) -> Self {
        Self {
            store,
            progress: false,
        }
    }

    /// Prints `B <checkpoint>` on stdout after each batch has committed.
    pub fn printing_progress(mut self) -> Self {
        self.progress = true;
        self
    }

    /// Creates the read model's table if needed.
    pub async fn create_table(&self) -> anyhow::Result<()> {
        self.store
            .apply_projection("crash_balances_schema", 0, |conn| {
                conn.execute_batch(
                    "CREATE TABLE IF NOT EXISTS crash_balances (
                         stream TEXT PRIMARY KEY,
                         total INTEGER NOT NULL,
                         events INTEGER NOT NULL,
                         last_version INTEGER NOT NULL
                     )",
                )
            })
            .await?;
        Ok(())
    }

    /// The read model's rows: `(stream, total, events, last_version)`, by stream.
    pub async fn rows(&self) -> anyhow::Result<Vec<(String, i64, i64, i64)>> {
        Ok(self
            .store
            .read(|conn| {
                conn.prepare(
                    "SELECT stream, total, events, last_version FROM crash_balances ORDER BY stream",
                )?
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
                .collect()
            })
            .await?)
    }
}

/// The `amount` of an event appended by the crash tests.
pub fn amount(data: &Value) -> i64 {
    data["amount"].as_i64().unwrap_or(0)
}

#[async_trait::async_trait]
impl Projection for Balances {
    type Event = Value;

    fn name(&self) -> &str {
        Self::NAME
    }

    async fn apply(&self, events: Vec<Envelope<Value>>, checkpoint: u64) -> Result<(), String> {
        let rows: Vec<(String, i64, i64)> = events
            .into_iter()
            .map(|e| {
                let version = i64::try_from(e.version).unwrap_or(i64::MAX);
                (e.stream, amount(&e.event["data"]), version)
            })
            .collect();
        self.store
            .apply_projection(Self::NAME, checkpoint, move |conn| {
                let mut upsert = conn.prepare_cached(
                    "INSERT INTO crash_balances (stream, total, events, last_version)
                     VALUES (?1, ?2, 1, ?3)
                     ON CONFLICT (stream) DO UPDATE SET total = total + excluded.total,
                         events = events + 1, last_version = excluded.last_version",
                )?;
                for (stream, amount, version) in &rows {
                    upsert.execute(params![stream, amount, version])?;
                }
                Ok::<_, rusqlite::Error>(())
            })
            .await
            .map_err(|e| e.to_string())?;
        if self.progress {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            writeln!(out, "B {checkpoint}")
                .and_then(|()| out.flush())
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    fn saves_checkpoint(&self) -> bool {
        true
    }

    async fn reset(&self) -> Result<(), String> {
        self.store
            .apply_projection(Self::NAME, 0, |conn| {
                conn.execute_batch("DELETE FROM crash_balances")
            })
            .await
            .map_err(|e| e.to_string())
    }
}
