//! WAL checkpoints on a thread of their own, so the writer never waits for
//! the fsyncs of a checkpoint.
//!
//! After commits, the writer signals the checkpointer; it waits a moment to
//! gather more commits, then copies the WAL into the database file with a
//! `PASSIVE` checkpoint, which waits for no one. The writer keeps SQLite's own
//! automatic checkpoint, with a high threshold, as a backstop: it is what lets
//! the WAL start over from its beginning under a load that never pauses.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::time::Duration;

use crate::config::SqliteConfig;
use crate::schema;

/// How long the checkpointer gathers commits before checkpointing.
const GATHER: Duration = Duration::from_millis(100);

/// The writer's side: tells the checkpointer there is something to copy.
/// Dropping it stops the thread.
pub(crate) struct Checkpointer {
    pending: Arc<AtomicBool>,
    tx: Sender<()>,
}

impl Checkpointer {
    /// Starts the checkpoint thread for the database at `path`.
    pub(crate) fn spawn(path: PathBuf, config: SqliteConfig) -> std::io::Result<Self> {
        let pending = Arc::new(AtomicBool::new(false));
        let (tx, rx) = channel();
        let flag = pending.clone();
        std::thread::Builder::new()
            .name("busway-sqlite-checkpoint".into())
            .spawn(move || run(path, config, flag, rx))?;
        Ok(Self { pending, tx })
    }

    /// Called after each commit; cheap when a checkpoint is already due.
    pub(crate) fn committed(&self) {
        if !self.pending.swap(true, Ordering::AcqRel) {
            let _ = self.tx.send(());
        }
    }
}

fn run(path: PathBuf, config: SqliteConfig, pending: Arc<AtomicBool>, rx: Receiver<()>) {
    let mut conn = None;
    // Blocks while nothing is committed; ends when the writer is gone.
    while rx.recv().is_ok() {
        std::thread::sleep(GATHER);
        pending.store(false, Ordering::Release);
        let conn = match &mut conn {
            Some(conn) => conn,
            empty => match schema::open_connection(&path, &config) {
                Ok(opened) => empty.insert(opened),
                Err(e) => {
                    tracing::debug!(error = %e, "could not open a connection for checkpoints");
                    continue;
                }
            },
        };
        let result: rusqlite::Result<(i64, i64, i64)> =
            conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            });
        if let Err(e) = result {
            tracing::debug!(error = %e, "WAL checkpoint failed; the next one catches up");
        }
    }
}
