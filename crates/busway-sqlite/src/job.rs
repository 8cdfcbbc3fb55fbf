//! Custom work in the writer's transaction: what the stores built on this
//! database (event store, saga store, inbox, outbox) use to write.
//!
//! A [`Job`] runs on the writer thread, inside the group-commit transaction
//! that carries the queue's own writes, in a savepoint of its own. So a job
//! can append events and enqueue the messages announcing them in one atomic
//! step ([`WriteTx::publish`]), and many concurrent jobs share one commit and
//! one fsync.

use std::fmt;
use std::io;
use std::sync::Arc;

use busway_core::{Publish, PublishError};
use rusqlite::Connection;
use tokio::sync::oneshot;

use crate::error::{is_retryable, Fail};
use crate::writer::Writer;

/// Why a write through [`SqliteTransport::write`](crate::SqliteTransport::write)
/// or a read through [`SqliteTransport::read`](crate::SqliteTransport::read)
/// failed, apart from the job's own error.
#[derive(Debug)]
#[non_exhaustive]
pub enum WriteError {
    /// The transport is closed.
    Closed,
    /// SQLite failed; the job's changes were rolled back.
    Database {
        /// What SQLite said.
        source: Arc<rusqlite::Error>,
        /// Whether the failure may go away (a lock, a full disk).
        retryable: bool,
    },
    /// The transaction committed, but flushing it to disk failed: it may not
    /// survive a power cut.
    Disk(Arc<io::Error>),
    /// The job panicked; its changes were rolled back.
    JobPanicked,
    /// A message the job published through [`WriteTx::publish`] was refused.
    Publish(PublishError),
}

impl WriteError {
    /// Whether trying again may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            WriteError::Database { retryable, .. } => *retryable,
            WriteError::Disk(_) => true,
            WriteError::Closed | WriteError::JobPanicked => false,
            WriteError::Publish(e) => e.is_retryable(),
        }
    }
}

impl From<PublishError> for WriteError {
    fn from(e: PublishError) -> Self {
        WriteError::Publish(e)
    }
}

impl From<rusqlite::Error> for WriteError {
    fn from(e: rusqlite::Error) -> Self {
        WriteError::Database {
            retryable: is_retryable(&e),
            source: Arc::new(e),
        }
    }
}

impl fmt::Display for WriteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WriteError::Closed => f.write_str("the SQLite transport is closed"),
            WriteError::Database { source, .. } => write!(f, "SQLite failed: {source}"),
            WriteError::Disk(e) => write!(f, "flushing the SQLite WAL to disk failed: {e}"),
            WriteError::JobPanicked => f.write_str("the write job panicked and was rolled back"),
            WriteError::Publish(e) => write!(f, "publishing from a write job failed: {e}"),
        }
    }
}

impl std::error::Error for WriteError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            WriteError::Database { source, .. } => Some(source.as_ref()),
            WriteError::Disk(e) => Some(e.as_ref()),
            WriteError::Publish(e) => Some(e),
            WriteError::Closed | WriteError::JobPanicked => None,
        }
    }
}

/// The open write transaction, as a job sees it.
pub struct WriteTx<'a> {
    pub(crate) writer: &'a mut Writer,
    pub(crate) now: i64,
}

impl WriteTx<'_> {
    /// The write connection, inside the open transaction. Use
    /// `prepare_cached` for statements run often.
    pub fn connection(&self) -> &Connection {
        self.writer.connection()
    }

    /// Enqueues messages in this same transaction: they become visible to
    /// consumers exactly when the job's other writes do, and are lost with
    /// them if the job fails (an outbox that needs no relay).
    pub fn publish(&mut self, batch: &[Publish]) -> Result<(), PublishError> {
        let now = self.now;
        self.writer
            .publish_in_job(batch, now)
            .map_err(Fail::into_error)
    }

    /// The writer's clock, in milliseconds since the Unix epoch (never goes
    /// backwards within one transport).
    pub fn now_millis(&self) -> i64 {
        self.now
    }
}

/// Answers a job once its transaction is committed (and on disk with
/// `Synchronous::Full`), or failed.
pub(crate) type Finish = Box<dyn FnOnce(Result<(), WriteError>) + Send>;

/// A closure for the writer thread, with the channel for its answer.
pub(crate) trait Job: Send {
    /// Runs the job. `None`: it failed and was answered; roll it back.
    fn run(self: Box<Self>, tx: &mut WriteTx<'_>) -> Option<Finish>;
    /// Answers without running.
    fn abort(self: Box<Self>, error: WriteError);
}

pub(crate) struct TypedJob<F, R, E> {
    pub(crate) job: F,
    pub(crate) reply: oneshot::Sender<Result<R, E>>,
}

impl<F, R, E> Job for TypedJob<F, R, E>
where
    F: FnOnce(&mut WriteTx<'_>) -> Result<R, E> + Send + 'static,
    R: Send + 'static,
    E: From<WriteError> + Send + 'static,
{
    fn run(self: Box<Self>, tx: &mut WriteTx<'_>) -> Option<Finish> {
        let TypedJob { job, reply } = *self;
        match job(tx) {
            Ok(value) => Some(Box::new(move |outcome: Result<(), WriteError>| {
                let _ = reply.send(outcome.map(|()| value).map_err(E::from));
            })),
            Err(e) => {
                let _ = reply.send(Err(e));
                None
            }
        }
    }

    fn abort(self: Box<Self>, error: WriteError) {
        let _ = self.reply.send(Err(E::from(error)));
    }
}
