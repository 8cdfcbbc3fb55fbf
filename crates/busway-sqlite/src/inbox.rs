//! The inbox on SQLite: handled message keys in the queue's own database.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use busway_core::inbox::{Claim, Inbox, InboxError};
use rusqlite::OptionalExtension;

use crate::job::WriteError;
use crate::row::millis;
use crate::SqliteTransport;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS busway_inbox (
    key           TEXT PRIMARY KEY NOT NULL,
    done          INTEGER NOT NULL,
    claimed_until INTEGER NOT NULL,
    done_at       INTEGER
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS busway_inbox_done_at ON busway_inbox (done_at) WHERE done = 1;
";

/// How many finished keys between two sweeps of expired ones.
const SWEEP_EVERY: u64 = 1024;

/// An [`Inbox`] in the SQLite database of a [`SqliteTransport`], shared by
/// every process that opens the file.
///
/// Claims and outcomes are written through the transport's writer thread,
/// without waiting for the commit ([`SqliteTransport::write_buffered`]):
/// the acknowledgement that follows a `finish` commits in the same
/// transaction or a later one, so the inbox never forgets a key whose
/// delivery was acknowledged. A claim runs out after
/// [`claim_timeout`](Self::claim_timeout), so a consumer that died while
/// handling does not block the message forever; a handled key is forgotten
/// after [`retention`](Self::retention).
///
/// ```
/// use busway_core::inbox::{Claim, Inbox};
/// use busway_sqlite::{SqliteInbox, SqliteTransport};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # tokio::runtime::Runtime::new()?.block_on(async {
/// let dir = tempfile::tempdir()?;
/// let transport = SqliteTransport::open(dir.path().join("busway.db"))?;
/// let inbox = SqliteInbox::open(&transport).await?;
/// assert_eq!(inbox.begin("order-17").await?, Claim::New);
/// inbox.finish("order-17", true).await?;
/// // Delivered again: already handled.
/// assert_eq!(inbox.begin("order-17").await?, Claim::Done);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// # })
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct SqliteInbox {
    transport: SqliteTransport,
    claim_ms: i64,
    retention_ms: i64,
    finished: std::sync::Arc<AtomicU64>,
}

impl SqliteInbox {
    /// Opens the inbox of `transport`'s database, creating its table if
    /// needed. Claims run out after 5 minutes, handled keys are kept 7 days.
    pub async fn open(transport: &SqliteTransport) -> Result<Self, WriteError> {
        transport
            .write(|tx| {
                tx.connection().execute_batch(SCHEMA)?;
                Ok::<_, WriteError>(())
            })
            .await?;
        Ok(Self {
            transport: transport.clone(),
            claim_ms: millis(Duration::from_secs(5 * 60)),
            retention_ms: millis(Duration::from_secs(7 * 24 * 3600)),
            finished: Default::default(),
        })
    }

    /// How long a claim holds before another consumer may take the key over
    /// (longer than the slowest handler).
    pub fn claim_timeout(mut self, timeout: Duration) -> Self {
        self.claim_ms = millis(timeout).max(1);
        self
    }

    /// How long handled keys are remembered (longer than any redelivery or
    /// duplicate publish may come late).
    pub fn retention(mut self, retention: Duration) -> Self {
        self.retention_ms = millis(retention).max(1);
        self
    }

    /// Forgets handled keys older than the retention; returns how many.
    pub async fn forget_expired(&self) -> Result<u64, WriteError> {
        let retention = self.retention_ms;
        self.transport
            .write(move |tx| {
                let cutoff = tx.now_millis() - retention;
                let n = tx
                    .connection()
                    .prepare_cached("DELETE FROM busway_inbox WHERE done = 1 AND done_at < ?1")?
                    .execute([cutoff])?;
                Ok::<_, WriteError>(n as u64)
            })
            .await
    }
}

fn inbox_error(e: WriteError) -> InboxError {
    match e {
        WriteError::Closed => InboxError::Closed,
        other => InboxError::Backend {
            retryable: other.is_retryable(),
            source: Box::new(other),
        },
    }
}

#[async_trait]
impl Inbox for SqliteInbox {
    async fn begin(&self, key: &str) -> Result<Claim, InboxError> {
        let key = key.to_owned();
        let claim_ms = self.claim_ms;
        self.transport
            .write_buffered(move |tx| {
                let now = tx.now_millis();
                let conn = tx.connection();
                let known: Option<(bool, i64)> = conn
                    .prepare_cached("SELECT done, claimed_until FROM busway_inbox WHERE key = ?1")?
                    .query_row([&key], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()?;
                let claim = match known {
                    Some((true, _)) => return Ok(Claim::Done),
                    Some((false, until)) if until > now => return Ok(Claim::InProgress),
                    _ => Claim::New,
                };
                conn.prepare_cached(
                    "INSERT INTO busway_inbox (key, done, claimed_until) VALUES (?1, 0, ?2)
                     ON CONFLICT (key) DO UPDATE SET claimed_until = excluded.claimed_until",
                )?
                .execute(rusqlite::params![key, now + claim_ms])?;
                Ok::<_, WriteError>(claim)
            })
            .await
            .map_err(inbox_error)
    }

    async fn finish(&self, key: &str, succeeded: bool) -> Result<(), InboxError> {
        let key = key.to_owned();
        let sweep = self.finished.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1;
        let retention = self.retention_ms;
        self.transport
            .write_buffered(move |tx| {
                let now = tx.now_millis();
                let conn = tx.connection();
                if succeeded {
                    conn.prepare_cached(
                        "UPDATE busway_inbox SET done = 1, done_at = ?2 WHERE key = ?1",
                    )?
                    .execute(rusqlite::params![key, now])?;
                } else {
                    conn.prepare_cached("DELETE FROM busway_inbox WHERE key = ?1 AND done = 0")?
                        .execute([&key])?;
                }
                if sweep {
                    conn.prepare_cached(
                        "DELETE FROM busway_inbox WHERE done = 1 AND done_at < ?1",
                    )?
                    .execute([now - retention])?;
                }
                Ok::<_, WriteError>(())
            })
            .await
            .map_err(inbox_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_handled_key_stays_done_across_processes_and_a_failed_one_runs_again() -> TestResult {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("b.db");
        let first = SqliteInbox::open(&SqliteTransport::open(&path)?).await?;
        let second = SqliteInbox::open(&SqliteTransport::open(&path)?).await?;

        assert_eq!(first.begin("a").await?, Claim::New);
        first.finish("a", true).await?;
        assert_eq!(first.begin("b").await?, Claim::New);
        first.finish("b", false).await?;
        assert_eq!(first.begin("c").await?, Claim::New);
        // Buffered writes are in the database once anything later commits.
        first.forget_expired().await?;

        assert_eq!(second.begin("a").await?, Claim::Done);
        assert_eq!(second.begin("b").await?, Claim::New);
        assert_eq!(second.begin("c").await?, Claim::InProgress);
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_claim_runs_out_and_old_keys_are_forgotten() -> TestResult {
        let dir = tempfile::tempdir()?;
        let transport = SqliteTransport::open(dir.path().join("b.db"))?;
        let inbox = SqliteInbox::open(&transport)
            .await?
            .claim_timeout(Duration::from_millis(1))
            .retention(Duration::from_millis(1));
        assert_eq!(inbox.begin("crashed").await?, Claim::New);
        tokio::time::sleep(Duration::from_millis(20)).await;
        // The consumer holding it died: the next one takes it over.
        assert_eq!(inbox.begin("crashed").await?, Claim::New);
        inbox.finish("crashed", true).await?;
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(inbox.forget_expired().await?, 1);
        assert_eq!(inbox.begin("crashed").await?, Claim::New);
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_claims_of_one_key_let_exactly_one_through() -> TestResult {
        let dir = tempfile::tempdir()?;
        let transport = SqliteTransport::open(dir.path().join("b.db"))?;
        let inbox = SqliteInbox::open(&transport).await?;
        for round in 0..50 {
            let key = format!("k{round}");
            let claims = futures::future::join_all((0..8).map(|_| inbox.begin(&key))).await;
            let new = claims
                .into_iter()
                .filter(|c| matches!(c, Ok(Claim::New)))
                .count();
            assert_eq!(new, 1, "round {round}");
        }
        Ok(())
    }
}
