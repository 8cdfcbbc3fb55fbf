//! Flushing the WAL to disk on a thread of its own (pipelined group commit).
//!
//! The writer commits every transaction with `synchronous = NORMAL`: when
//! `COMMIT` returns, the transaction is in the operating system and survives
//! the death of the process, but not yet a power cut. With
//! [`Synchronous::Full`](crate::Synchronous::Full) the replies that promise
//! durability (durable publishes, declarations, close) go to this thread
//! instead: it fsyncs the WAL file, which makes every transaction written so
//! far durable, then answers them. Meanwhile the writer already runs the next
//! batch, so its throughput does not depend on how long an fsync takes; one
//! fsync covers all the batches committed while the previous one ran.
//!
//! The file is the database's own `-wal` file, opened once: the writer's
//! connection stays open for the transport's life, so SQLite never deletes
//! or replaces it meanwhile (it rewrites and truncates it in place). The
//! directory is fsynced once too, so the WAL file's own entry is durable.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, Sender};

/// Runs once the transactions committed before it are on disk (with the
/// error if the fsync failed).
pub(crate) type Waiter = Box<dyn FnOnce(Option<&io::Error>) + Send>;

/// The writer's side. Dropping it stops the thread once it has answered
/// every waiter.
pub(crate) struct Syncer {
    tx: Sender<Vec<Waiter>>,
}

impl Syncer {
    /// Starts the thread for the database at `db`.
    pub(crate) fn spawn(db: &Path) -> io::Result<Self> {
        let mut wal = db.as_os_str().to_owned();
        wal.push("-wal");
        let wal = PathBuf::from(wal);
        let dir = db
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
        let (tx, rx) = channel();
        std::thread::Builder::new()
            .name("busway-sqlite-sync".into())
            .spawn(move || run(&wal, &dir, rx))?;
        Ok(Self { tx })
    }

    /// Answers `waiters` once everything committed so far is on disk.
    pub(crate) fn after_sync(&self, waiters: Vec<Waiter>) {
        if let Err(unsent) = self.tx.send(waiters) {
            // The thread is gone (it cannot be, while the writer holds us):
            // answer with an error rather than never.
            let e = io::Error::other("the WAL sync thread stopped");
            for waiter in unsent.0 {
                waiter(Some(&e));
            }
        }
    }
}

fn run(wal: &Path, dir: &Path, rx: Receiver<Vec<Waiter>>) {
    let mut file: Option<File> = None;
    while let Ok(mut waiters) = rx.recv() {
        while let Ok(more) = rx.try_recv() {
            waiters.extend(more);
        }
        let result = sync(wal, dir, &mut file);
        if let Err(e) = &result {
            tracing::warn!(path = %wal.display(), error = %e, "fsync of the WAL failed");
            // Reopen next time, in case the handle is what failed.
            file = None;
        }
        let error = result.err();
        for waiter in waiters {
            waiter(error.as_ref());
        }
    }
}

fn sync(wal: &Path, dir: &Path, file: &mut Option<File>) -> io::Result<()> {
    let handle = match file {
        Some(handle) => handle,
        empty => {
            let opened = File::open(wal)?;
            // The WAL file may be new: make its directory entry durable.
            #[cfg(unix)]
            File::open(dir)?.sync_all()?;
            #[cfg(not(unix))]
            let _ = dir;
            empty.insert(opened)
        }
    };
    handle.sync_data()
}
