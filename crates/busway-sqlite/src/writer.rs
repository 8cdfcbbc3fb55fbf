//! The writer thread: it owns the write connection and runs every mutation.
//!
//! Commands arrive over a channel. The thread blocks for the first one,
//! opens one `BEGIN IMMEDIATE` transaction and keeps executing whatever is
//! queued, including commands that arrive meanwhile, up to `max_batch`; then
//! it commits once (group commit).
//!
//! Every transaction commits with `synchronous = NORMAL`: once `COMMIT`
//! returns it survives the death of the process. Replies:
//! - leases are answered as soon as they are applied, before the commit: a
//!   lease lost to a crash only means the message is delivered again. A lease
//!   settled within the same transaction is never written at all;
//! - settlements (ack, nack, dead-letter), consumer registrations and flushes
//!   are answered after the commit;
//! - durable publishes, declarations, bindings and close are answered after
//!   the commit too, and with `Synchronous::Full` only once the WAL is fsynced
//!   by the sync thread (see `sync`), while this thread goes on with the next
//!   batch;
//! - buffered publishes are answered before the commit.
//!
//! A batch nobody waits on (leases, releases, buffered publishes) stays open
//! up to `LINGER` for more commands, so a busy consumer's lease cycles share
//! commits.
//!
//! A command that fails runs inside its own savepoint and is rolled back
//! alone; the others commit. Rule for the operations below: a refusal
//! (`Fail::Op`) is decided before the operation writes anything, except the
//! deliberate release that accompanies `SettleError::NoDeadLetterQueue`. So a
//! savepoint is rolled back only when SQLite itself failed.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use busway_core::{
    headers, unix_millis, Binding, ConsumeError, DeclareError, Destination, Durability, Publish,
    PublishError, QueueName, QueueSpec, SettleError, Settlement, Topic, TopicPattern,
};
use rusqlite::{params, Connection, OptionalExtension, Params};
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use crate::checkpoint::Checkpointer;
use crate::error::{Fail, FromSqlite};
use crate::job::{Finish, Job, WriteError, WriteTx};
use crate::row::{millis, StoredRow, ROW_COLUMNS};
use crate::sync::{Syncer, Waiter};
use crate::wake::Wakers;

/// Identifies one lease of one row: the row and the token of the lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct LeaseId {
    pub(crate) seq: i64,
    pub(crate) token: i64,
}

/// Rows leased for a consumer.
#[derive(Debug)]
pub(crate) struct LeaseBatch {
    /// The rows, in delivery order, with `attempt` already counting this delivery.
    pub(crate) rows: Vec<StoredRow>,
    /// One prefetch permit per row.
    pub(crate) permits: Vec<OwnedSemaphorePermit>,
    /// How many rows were asked for (free permits when the lease ran).
    pub(crate) requested: usize,
    /// The lease token of every row of the batch.
    pub(crate) token: i64,
    /// When fewer rows than asked were ready: the earliest future moment a
    /// row of the queue becomes visible (delay, retry backoff, lease expiry).
    pub(crate) next_visible_at: Option<i64>,
}

/// A reply channel.
type Reply<T, E> = oneshot::Sender<Result<T, E>>;

/// Everything the writer does.
pub(crate) enum Command {
    Declare {
        spec: QueueSpec,
        reply: Reply<(), DeclareError>,
    },
    Bind {
        binding: Binding,
        reply: Reply<(), DeclareError>,
    },
    Publish {
        batch: Vec<Publish>,
        durability: Durability,
        reply: Reply<(), PublishError>,
        /// Bounds the publishes queued for the writer; freed once executed.
        permit: OwnedSemaphorePermit,
    },
    AddConsumer {
        id: String,
        queue: QueueName,
        reply: Reply<(), ConsumeError>,
    },
    RemoveConsumer {
        id: String,
    },
    /// Leases as many rows as `slots` has free permits when it runs: by
    /// then more of the consumer's deliveries may have been settled than
    /// when it asked.
    Lease {
        queue: QueueName,
        slots: Arc<Semaphore>,
        reply: Reply<LeaseBatch, ConsumeError>,
    },
    Settle {
        lease: LeaseId,
        queue: QueueName,
        settlement: Settlement,
        reply: Reply<(), SettleError>,
    },
    /// Returns a delivery to its queue. `undelivered`: it never reached the
    /// application, so the lease does not count as an attempt.
    Release {
        lease: LeaseId,
        queue: QueueName,
        undelivered: bool,
    },
    /// Answered once everything sent before it is committed.
    Flush {
        reply: oneshot::Sender<()>,
    },
    /// Releases every lease of this transport, removes its consumers, and
    /// stops the thread. `undelivered` leases do not count as attempts.
    Close {
        undelivered: Vec<LeaseId>,
        reply: Option<oneshot::Sender<()>>,
    },
    /// A store's own work, in its own savepoint of the open transaction.
    /// `buffered`: answered once it ran, before the commit.
    Job {
        job: Box<dyn Job>,
        buffered: bool,
    },
    /// Stops the thread without releasing anything, as a crash would.
    #[cfg(test)]
    Crash,
}

impl Command {
    fn is_close(&self) -> bool {
        match self {
            Command::Close { .. } => true,
            #[cfg(test)]
            Command::Crash => true,
            _ => false,
        }
    }

    /// Whether someone waits for this command's commit: the batch then
    /// commits without lingering.
    fn awaits_commit(&self) -> bool {
        match self {
            Command::Publish { durability, .. } => *durability == Durability::Durable,
            Command::Declare { .. }
            | Command::Bind { .. }
            | Command::AddConsumer { .. }
            | Command::Settle { .. }
            | Command::Flush { .. }
            | Command::Job {
                buffered: false, ..
            }
            | Command::Close { .. } => true,
            _ => false,
        }
    }

    /// Answers the command with "closed" without running it.
    fn refuse_closed(self) {
        match self {
            Command::Declare { reply, .. } | Command::Bind { reply, .. } => {
                let _ = reply.send(Err(DeclareError::Closed));
            }
            Command::Publish { reply, .. } => {
                let _ = reply.send(Err(PublishError::Closed));
            }
            Command::AddConsumer { reply, .. } => {
                let _ = reply.send(Err(ConsumeError::Closed));
            }
            Command::Lease { reply, .. } => {
                let _ = reply.send(Err(ConsumeError::Closed));
            }
            Command::Settle { reply, .. } => {
                let _ = reply.send(Err(SettleError::Closed));
            }
            Command::Flush { reply } => {
                let _ = reply.send(());
            }
            Command::Close { reply, .. } => {
                if let Some(reply) = reply {
                    let _ = reply.send(());
                }
            }
            Command::Job { job, .. } => job.abort(WriteError::Closed),
            Command::RemoveConsumer { .. } | Command::Release { .. } => {}
            #[cfg(test)]
            Command::Crash => {}
        }
    }

    /// Answers a command whose transaction failed with `e`; internal
    /// commands are kept to run again.
    fn fail(self, e: &rusqlite::Error, retry: &mut Vec<Command>) {
        match self {
            Command::Declare { reply, .. } | Command::Bind { reply, .. } => {
                let _ = reply.send(Err(sql_error(e)));
            }
            Command::Publish { reply, .. } => {
                let _ = reply.send(Err(sql_error(e)));
            }
            Command::AddConsumer { reply, .. } => {
                let _ = reply.send(Err(sql_error(e)));
            }
            Command::Lease { reply, .. } => {
                let _ = reply.send(Err(sql_error(e)));
            }
            Command::Settle {
                reply,
                lease,
                queue,
                ..
            } => {
                // The application hears of the failure and lets go of the
                // delivery: return it, or renewal would keep it forever.
                retry.push(Command::Release {
                    lease,
                    queue,
                    undelivered: false,
                });
                let _ = reply.send(Err(sql_error(e)));
            }
            internal @ (Command::Release { .. } | Command::RemoveConsumer { .. }) => {
                retry.push(internal);
            }
            Command::Flush { reply } => {
                let _ = reply.send(());
            }
            Command::Close { reply, .. } => {
                if let Some(reply) = reply {
                    let _ = reply.send(());
                }
            }
            Command::Job { job, .. } => job.abort(WriteError::from(clone_error(e))),
            #[cfg(test)]
            Command::Crash => {}
        }
    }
}

/// A copy of an SQLite error, for answering several waiters with it.
fn clone_error(e: &rusqlite::Error) -> rusqlite::Error {
    match e {
        rusqlite::Error::SqliteFailure(code, message) => {
            rusqlite::Error::SqliteFailure(*code, message.clone())
        }
        other => rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ERROR),
            Some(other.to_string()),
        ),
    }
}

/// What the writer needs to know.
pub(crate) struct WriterSettings {
    pub(crate) owner: i64,
    pub(crate) lease: Duration,
    pub(crate) poll_interval: Duration,
    pub(crate) max_batch: usize,
    pub(crate) max_payload_bytes: usize,
}

/// Starts the writer thread. `syncer`: fsync the WAL before answering
/// durable commands (`Synchronous::Full`).
pub(crate) fn spawn(
    conn: Connection,
    settings: WriterSettings,
    checkpointer: Checkpointer,
    syncer: Option<Syncer>,
    wakers: Arc<Wakers>,
    rx: Receiver<Command>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let writer = Writer {
        conn,
        checkpointer,
        syncer,
        owner: settings.owner,
        lease_ms: millis(settings.lease),
        renew_every: settings.lease / 3,
        poll_interval: settings.poll_interval,
        max_batch: settings.max_batch,
        max_payload_bytes: settings.max_payload_bytes,
        wakers,
        specs: HashMap::new(),
        bindings: None,
        data_version: None,
        lengths: HashMap::new(),
        touched: HashSet::new(),
        last_now: 0,
        next_token: 1,
        consumers: HashSet::new(),
        held: HashMap::new(),
        pending: HashMap::new(),
        cursors: HashMap::new(),
        retry: Vec::new(),
    };
    std::thread::Builder::new()
        .name("busway-sqlite-writer".into())
        .spawn(move || writer.run(rx))
}

/// A reply that waits for the batch's commit.
enum Done {
    /// Durable: answered once on disk (after the WAL fsync with `Full`).
    Publish(Reply<(), PublishError>),
    Declare(Reply<(), DeclareError>),
    Close(Option<oneshot::Sender<()>>),
    /// Answered once committed.
    AddConsumer(Reply<(), ConsumeError>, String),
    Flush(oneshot::Sender<()>),
    Settle(
        Reply<(), SettleError>,
        Result<(), SettleError>,
        LeaseId,
        QueueName,
    ),
    /// A job, answered once committed and on disk.
    Job(Finish),
}

/// How long to wait before retrying internal commands after a failure.
const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// How long a batch that nobody waits on (leases, releases, buffered
/// publishes) stays open for more commands before it commits.
const LINGER: Duration = Duration::from_millis(5);

pub(crate) struct Writer {
    conn: Connection,
    checkpointer: Checkpointer,
    syncer: Option<Syncer>,
    /// This transport's id, written into `lease_owner`.
    owner: i64,
    lease_ms: i64,
    renew_every: Duration,
    poll_interval: Duration,
    max_batch: usize,
    max_payload_bytes: usize,
    wakers: Arc<Wakers>,
    /// Queue specs read so far; cleared when another process commits.
    specs: HashMap<QueueName, QueueSpec>,
    /// All bindings, once read; cleared when another process commits.
    bindings: Option<Vec<Binding>>,
    /// The last `PRAGMA data_version` seen.
    data_version: Option<i64>,
    /// Lengths of `max_length` queues counted during the current batch.
    lengths: HashMap<QueueName, u64>,
    /// Queues whose consumers to wake after the current batch commits.
    touched: HashSet<QueueName>,
    /// The clock never goes backwards within one writer.
    last_now: i64,
    next_token: i64,
    /// Consumers of this transport; while there are any, the thread polls
    /// for other processes' commits and heartbeats.
    consumers: HashSet<String>,
    /// The leases this transport holds (row → token): renewed every
    /// `lease / 3`, released at close.
    held: HashMap<i64, i64>,
    /// Leases handed out in the open transaction and not yet written
    /// (row → token). Nobody else can see the rows before the commit, so a
    /// lease settled within the same transaction is never written at all;
    /// the others are written just before the commit.
    pending: HashMap<i64, i64>,
    /// Per queue and lane, the last row the open transaction's leases read
    /// (visible_at, seq): later leases start after it, so they do not read
    /// rows already handed out. A row released behind it is found by the
    /// next transaction.
    cursors: HashMap<(QueueName, i64), (i64, i64)>,
    /// Internal commands (releases, consumer removals) to run again after
    /// their transaction failed: they must not be lost.
    retry: Vec<Command>,
}

impl Writer {
    fn run(mut self, rx: Receiver<Command>) {
        let mut last_poll = Instant::now();
        let mut last_renew = Instant::now();
        loop {
            let mut batch: VecDeque<Command> = std::mem::take(&mut self.retry).into();
            if !batch.is_empty() {
                std::thread::sleep(RETRY_PAUSE);
            } else {
                let deadline = self.next_deadline(last_poll, last_renew);
                let first = match deadline {
                    None => match rx.recv() {
                        Ok(c) => Some(c),
                        Err(_) => return,
                    },
                    Some(at) => match rx.recv_timeout(at.saturating_duration_since(Instant::now()))
                    {
                        Ok(c) => Some(c),
                        Err(RecvTimeoutError::Timeout) => None,
                        Err(RecvTimeoutError::Disconnected) => return,
                    },
                };
                batch.extend(first);
            }
            let renew_due = self.renew_active() && last_renew.elapsed() >= self.renew_every;
            if batch.is_empty() && !renew_due {
                if self.poll_active() && last_poll.elapsed() >= self.poll_interval {
                    last_poll = Instant::now();
                    self.poll_data_version();
                }
                continue;
            }
            if renew_due {
                last_renew = Instant::now();
            }
            last_poll = Instant::now();
            if self.run_batch(batch, renew_due, &rx) {
                return;
            }
        }
    }

    fn poll_active(&self) -> bool {
        !self.consumers.is_empty()
    }

    fn renew_active(&self) -> bool {
        !self.consumers.is_empty() || !self.held.is_empty()
    }

    /// When the thread must wake up on its own, if ever.
    fn next_deadline(&self, last_poll: Instant, last_renew: Instant) -> Option<Instant> {
        let poll = self.poll_active().then(|| last_poll + self.poll_interval);
        let renew = self.renew_active().then(|| last_renew + self.renew_every);
        match (poll, renew) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn now(&mut self) -> i64 {
        let now = unix_millis(SystemTime::now()).max(self.last_now);
        self.last_now = now;
        now
    }

    fn exec<P: Params>(&self, sql: &str, params: P) -> rusqlite::Result<usize> {
        self.conn.prepare_cached(sql)?.execute(params)
    }

    /// Checks whether another connection committed since the last look; if
    /// so, forgets cached topology and wakes every consumer.
    fn check_data_version(&mut self) -> rusqlite::Result<()> {
        let version: i64 = self
            .conn
            .prepare_cached("PRAGMA data_version")?
            .query_row([], |r| r.get(0))?;
        if self.data_version != Some(version) {
            if self.data_version.is_some() {
                self.invalidate_caches();
                self.wakers.bump_all();
            }
            self.data_version = Some(version);
        }
        Ok(())
    }

    fn poll_data_version(&mut self) {
        if let Err(e) = self.check_data_version() {
            tracing::debug!(error = %e, "polling data_version failed");
        }
    }

    fn invalidate_caches(&mut self) {
        self.specs.clear();
        self.bindings = None;
        self.lengths.clear();
    }

    /// Runs one batch in one transaction: `batch`, then whatever arrives
    /// while it runs, up to `max_batch` commands. Returns whether the thread
    /// stops.
    fn run_batch(
        &mut self,
        mut batch: VecDeque<Command>,
        renew: bool,
        rx: &Receiver<Command>,
    ) -> bool {
        self.lengths.clear();
        self.touched.clear();
        self.cursors.clear();
        self.pending.clear();
        if let Err(e) = self.exec("BEGIN IMMEDIATE", []) {
            tracing::warn!(error = %e, "could not start a write transaction");
            let mut stop = false;
            for command in batch {
                stop |= command.is_close();
                command.fail(&e, &mut self.retry);
            }
            return stop;
        }
        if let Err(e) = self.check_data_version() {
            tracing::debug!(error = %e, "reading data_version failed");
            self.invalidate_caches();
        }
        let mut done = Vec::with_capacity(batch.len());
        let mut stop = false;
        let mut lost: Option<rusqlite::Error> = None;
        let mut executed = 0;
        let started = Instant::now();
        let mut awaited = false;
        loop {
            let command = match batch.pop_front() {
                Some(command) => command,
                None if stop || executed >= self.max_batch => break,
                None => match rx.try_recv() {
                    Ok(command) => command,
                    Err(TryRecvError::Disconnected) => break,
                    Err(TryRecvError::Empty) if awaited => break,
                    Err(TryRecvError::Empty) => {
                        // Nobody waits for this commit yet: linger for more.
                        let left = LINGER.saturating_sub(started.elapsed());
                        if left.is_zero() {
                            break;
                        }
                        match rx.recv_timeout(left) {
                            Ok(command) => command,
                            Err(_) => break,
                        }
                    }
                },
            };
            if stop {
                command.refuse_closed();
                continue;
            }
            stop |= command.is_close();
            awaited |= command.awaits_commit();
            let now = self.now();
            self.execute(command, now, &mut done);
            executed += 1;
            if !awaited {
                // Consumers lease through this same transaction, so they see
                // its changes already.
                for queue in &self.touched {
                    self.wakers.bump(queue);
                }
            }
            if self.conn.is_autocommit() {
                // SQLite rolled the whole transaction back (I/O error, disk
                // full, ...): nothing of this batch is stored.
                lost = Some(rusqlite::Error::SqliteFailure(
                    rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ABORT),
                    Some("the transaction was rolled back by SQLite".into()),
                ));
                break;
            }
        }
        if lost.is_none() {
            let now = self.now();
            if let Err(e) = self.write_pending_leases(now) {
                // Leases handed out but not recorded: the batch must not
                // commit without them.
                lost = Some(e);
            }
        }
        self.pending.clear();
        if renew && lost.is_none() {
            let now = self.now();
            if let Err(e) = self.renew(now) {
                tracing::warn!(error = %e, "renewing leases failed");
            }
        }
        let outcome = match lost {
            Some(e) => Err(e),
            None => self.exec("COMMIT", []).map(|_| ()),
        };
        if let Err(e) = &outcome {
            tracing::warn!(error = %e, "committing a batch failed; it was rolled back");
            if !self.conn.is_autocommit() {
                let _ = self.exec("ROLLBACK", []);
            }
            self.invalidate_caches();
            for command in batch {
                stop |= command.is_close();
                command.fail(e, &mut self.retry);
            }
        }
        let error = outcome.err();
        if error.is_none() {
            self.checkpointer.committed();
        }
        let mut durable: Vec<Waiter> = Vec::new();
        for d in done {
            self.finish(d, error.as_ref(), &mut durable);
        }
        if !durable.is_empty() {
            match &self.syncer {
                Some(syncer) => syncer.after_sync(durable),
                None => {
                    for waiter in durable {
                        waiter(None);
                    }
                }
            }
        }
        if error.is_none() {
            for queue in self.touched.drain() {
                self.wakers.bump(&queue);
            }
        }
        stop
    }

    /// Answers what waited for the commit; what also waits for the disk goes
    /// to `durable`.
    fn finish(&mut self, done: Done, error: Option<&rusqlite::Error>, durable: &mut Vec<Waiter>) {
        match done {
            Done::Publish(reply) => match error {
                Some(e) => {
                    let _ = reply.send(Err(sql_error(e)));
                }
                None => durable.push(Box::new(move |synced: Option<&std::io::Error>| {
                    let _ = reply.send(synced.map_or(Ok(()), |e| Err(io_error(e))));
                })),
            },
            Done::Declare(reply) => match error {
                Some(e) => {
                    let _ = reply.send(Err(sql_error(e)));
                }
                None => durable.push(Box::new(move |synced: Option<&std::io::Error>| {
                    let _ = reply.send(synced.map_or(Ok(()), |e| Err(io_error(e))));
                })),
            },
            Done::Close(reply) => {
                if let Some(reply) = reply {
                    durable.push(Box::new(move |_: Option<&std::io::Error>| {
                        let _ = reply.send(());
                    }));
                }
            }
            Done::AddConsumer(reply, id) => {
                if error.is_some() {
                    self.consumers.remove(&id);
                }
                let _ = reply.send(error.map_or(Ok(()), |e| Err(sql_error(e))));
            }
            Done::Flush(reply) => {
                let _ = reply.send(());
            }
            Done::Job(finish) => match error {
                Some(e) => finish(Err(WriteError::from(clone_error(e)))),
                None => durable.push(Box::new(move |synced: Option<&std::io::Error>| {
                    finish(synced.map_or(Ok(()), |e| {
                        Err(WriteError::Disk(Arc::new(std::io::Error::new(
                            e.kind(),
                            e.to_string(),
                        ))))
                    }));
                })),
            },
            Done::Settle(reply, result, lease, queue) => {
                let result = match error {
                    Some(e) => Err(sql_error(e)),
                    None => result,
                };
                if matches!(result, Err(SettleError::Backend { .. })) {
                    // Not settled, and the application lets go of the
                    // delivery: return it, or renewal would keep it forever.
                    self.retry.push(Command::Release {
                        lease,
                        queue,
                        undelivered: false,
                    });
                }
                let _ = reply.send(result);
            }
        }
    }

    /// Runs one command inside the open transaction.
    fn execute(&mut self, command: Command, now: i64, done: &mut Vec<Done>) {
        match command {
            Command::Publish {
                batch,
                durability,
                reply,
                permit,
            } => {
                let result = self.publish(&batch, now).map_err(Fail::into_error);
                drop(permit);
                if result.is_err() || durability == Durability::Buffered {
                    let _ = reply.send(result);
                } else {
                    done.push(Done::Publish(reply));
                }
            }
            Command::Declare { spec, reply } => match self.in_savepoint(|w| w.declare(&spec)) {
                Ok(()) => done.push(Done::Declare(reply)),
                Err(e) => {
                    let _ = reply.send(Err(e.into_error()));
                }
            },
            Command::Bind { binding, reply } => match self.bind(&binding) {
                Ok(()) => done.push(Done::Declare(reply)),
                Err(e) => {
                    let _ = reply.send(Err(e.into_error()));
                }
            },
            Command::AddConsumer { id, queue, reply } => {
                match self.add_consumer(&id, &queue, now) {
                    Ok(()) => {
                        self.consumers.insert(id.clone());
                        done.push(Done::AddConsumer(reply, id));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e.into_error()));
                    }
                }
            }
            Command::RemoveConsumer { id } => {
                match self.exec("DELETE FROM busway_consumers WHERE id = ?1", [&id]) {
                    Ok(_) => {
                        self.consumers.remove(&id);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "removing a consumer failed; will retry");
                        self.retry.push(Command::RemoveConsumer { id });
                    }
                }
            }
            Command::Lease {
                queue,
                slots,
                reply,
            } => {
                let mut permits = Vec::new();
                while let Ok(permit) = slots.clone().try_acquire_owned() {
                    permits.push(permit);
                }
                let max = permits.len();
                let leased = if max == 0 {
                    Ok(LeaseBatch {
                        rows: Vec::new(),
                        permits: Vec::new(),
                        requested: 0,
                        token: 0,
                        next_visible_at: None,
                    })
                } else {
                    self.in_savepoint(|w| w.lease(&queue, max, now))
                };
                match leased {
                    Ok(mut batch) => {
                        permits.truncate(batch.rows.len());
                        batch.permits = permits;
                        batch.requested = max;
                        if let Err(Ok(batch)) = reply.send(Ok(batch)) {
                            // The consumer is gone: give the rows back.
                            for row in batch.rows {
                                let lease = LeaseId {
                                    seq: row.seq,
                                    token: batch.token,
                                };
                                if let Err(e) = self.release(lease, &queue, true) {
                                    tracing::warn!(error = %e, "releasing an unwanted lease failed; will retry");
                                    self.retry.push(Command::Release {
                                        lease,
                                        queue: queue.clone(),
                                        undelivered: true,
                                    });
                                }
                            }
                        }
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e.into_error()));
                    }
                }
            }
            Command::Settle {
                lease,
                queue,
                settlement,
                reply,
            } => {
                let result = self
                    .settle(lease, &queue, settlement, now)
                    .map_err(Fail::into_error);
                done.push(Done::Settle(reply, result, lease, queue));
            }
            Command::Release {
                lease,
                queue,
                undelivered,
            } => {
                if let Err(e) = self.release(lease, &queue, undelivered) {
                    tracing::warn!(error = %e, "releasing a delivery failed; will retry");
                    self.retry.push(Command::Release {
                        lease,
                        queue,
                        undelivered,
                    });
                }
            }
            Command::Flush { reply } => done.push(Done::Flush(reply)),
            Command::Job { job, buffered } => self.run_job(job, buffered, now, done),
            Command::Close { undelivered, reply } => {
                if let Err(e) = self.close(&undelivered) {
                    tracing::warn!(error = %e, "releasing leases at close failed; they expire after the lease time");
                }
                done.push(Done::Close(reply));
            }
            #[cfg(test)]
            Command::Crash => {}
        }
    }

    /// Runs a store's job in a savepoint of its own, rolled back if the job
    /// fails or panics.
    fn run_job(&mut self, job: Box<dyn Job>, buffered: bool, now: i64, done: &mut Vec<Done>) {
        if let Err(e) = self.exec("SAVEPOINT busway_job", []) {
            job.abort(WriteError::from(e));
            return;
        }
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            job.run(&mut WriteTx { writer: self, now })
        }));
        match ran {
            Ok(Some(finish)) => match self.exec("RELEASE busway_job", []) {
                Ok(_) if buffered => {
                    finish(Ok(()));
                    return;
                }
                Ok(_) => {
                    done.push(Done::Job(finish));
                    return;
                }
                Err(e) => finish(Err(WriteError::from(e))),
            },
            Ok(None) => {}
            Err(_) => tracing::error!("a write job panicked; its changes are rolled back"),
        }
        if !self.conn.is_autocommit() {
            let _ = self.exec("ROLLBACK TO busway_job", []);
            let _ = self.exec("RELEASE busway_job", []);
        }
        self.invalidate_caches();
    }

    /// The write connection.
    pub(crate) fn connection(&self) -> &Connection {
        &self.conn
    }

    /// Publishes from a job: like a publish command, inside the job's savepoint.
    pub(crate) fn publish_in_job(
        &mut self,
        batch: &[Publish],
        now: i64,
    ) -> Result<(), Fail<PublishError>> {
        self.publish(batch, now)
    }

    /// Runs `f` in a savepoint, rolled back if SQLite fails.
    fn in_savepoint<T, E>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, Fail<E>>,
    ) -> Result<T, Fail<E>> {
        self.exec("SAVEPOINT busway_command", [])?;
        let result = f(self);
        if let Err(Fail::Sql(_)) = &result {
            if !self.conn.is_autocommit() {
                let _ = self.exec("ROLLBACK TO busway_command", []);
                let _ = self.exec("RELEASE busway_command", []);
            }
            self.invalidate_caches();
            return result;
        }
        self.exec("RELEASE busway_command", [])?;
        result
    }

    // ---- topology ----------------------------------------------------------

    /// The spec of `queue`, if declared.
    fn spec(&mut self, queue: &QueueName) -> rusqlite::Result<Option<QueueSpec>> {
        if let Some(spec) = self.specs.get(queue) {
            return Ok(Some(spec.clone()));
        }
        let json: Option<String> = self
            .conn
            .prepare_cached("SELECT spec FROM busway_queues WHERE name = ?1")?
            .query_row([queue.as_str()], |r| r.get(0))
            .optional()?;
        let Some(json) = json else {
            return Ok(None);
        };
        let spec: QueueSpec = serde_json::from_str(&json).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
        })?;
        self.specs.insert(queue.clone(), spec.clone());
        Ok(Some(spec))
    }

    fn insert_spec(&mut self, spec: &QueueSpec) -> rusqlite::Result<()> {
        let json = serde_json::to_string(spec)
            .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
        self.exec(
            "INSERT INTO busway_queues (name, spec) VALUES (?1, ?2)",
            params![spec.name.as_str(), json],
        )?;
        self.specs.insert(spec.name.clone(), spec.clone());
        Ok(())
    }

    fn declare(&mut self, spec: &QueueSpec) -> Result<(), Fail<DeclareError>> {
        spec.validate()?;
        match self.spec(&spec.name)? {
            Some(existing) => existing.check_redeclare(spec)?,
            None => self.insert_spec(spec)?,
        }
        if let Some(dead_letter) = spec.dead_letter_spec() {
            // An existing dead-letter queue is accepted whatever its spec.
            if self.spec(&dead_letter.name)?.is_none() {
                self.insert_spec(&dead_letter)?;
            }
        }
        Ok(())
    }

    fn bind(&mut self, binding: &Binding) -> Result<(), Fail<DeclareError>> {
        if self.spec(&binding.queue)?.is_none() {
            return Err(DeclareError::QueueNotFound(binding.queue.clone()).into());
        }
        let added = self.exec(
            "INSERT OR IGNORE INTO busway_bindings (queue, pattern) VALUES (?1, ?2)",
            params![binding.queue.as_str(), binding.pattern.as_str()],
        )?;
        if added > 0 {
            if let Some(bindings) = &mut self.bindings {
                bindings.push(binding.clone());
            }
        }
        Ok(())
    }

    /// The queues a message published to `topic` goes to, each once.
    fn route(&mut self, topic: &Topic) -> rusqlite::Result<Vec<QueueName>> {
        if self.bindings.is_none() {
            let mut stmt = self
                .conn
                .prepare_cached("SELECT queue, pattern FROM busway_bindings")?;
            let rows =
                stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
            let mut bindings = Vec::new();
            for row in rows {
                let (queue, pattern) = row?;
                match (QueueName::new(&queue), TopicPattern::new(&pattern)) {
                    (Ok(q), Ok(p)) => bindings.push(Binding::new(q, p)),
                    _ => tracing::warn!(queue, pattern, "ignoring an unreadable binding"),
                }
            }
            self.bindings = Some(bindings);
        }
        let mut queues: Vec<QueueName> = Vec::new();
        for binding in self.bindings.iter().flatten() {
            if binding.pattern.matches(topic) && !queues.contains(&binding.queue) {
                queues.push(binding.queue.clone());
            }
        }
        Ok(queues)
    }

    // ---- publishing --------------------------------------------------------

    /// Messages stored in `queue`, counted once per batch (for `max_length`).
    fn length(&mut self, queue: &QueueName) -> rusqlite::Result<u64> {
        if let Some(n) = self.lengths.get(queue) {
            return Ok(*n);
        }
        let n: i64 = self
            .conn
            .prepare_cached("SELECT count(*) FROM busway_messages WHERE queue = ?1")?
            .query_row([queue.as_str()], |r| r.get(0))?;
        let n = u64::try_from(n).unwrap_or(0);
        self.lengths.insert(queue.clone(), n);
        Ok(n)
    }

    fn publish(&mut self, batch: &[Publish], now: i64) -> Result<(), Fail<PublishError>> {
        for publish in batch {
            publish.check_payload(self.max_payload_bytes)?;
        }
        // Route everything and check every limit before writing anything.
        let mut targets: Vec<(usize, QueueSpec)> = Vec::with_capacity(batch.len());
        for (i, publish) in batch.iter().enumerate() {
            match &publish.destination {
                Destination::Queue(queue) => {
                    let spec = self
                        .spec(queue)?
                        .ok_or_else(|| PublishError::QueueNotFound(queue.clone()))?;
                    targets.push((i, spec));
                }
                Destination::Topic(topic) => {
                    for queue in self.route(topic)? {
                        // A binding whose queue is gone routes nowhere.
                        if let Some(spec) = self.spec(&queue)? {
                            targets.push((i, spec));
                        }
                    }
                }
            }
        }
        // (queue, max_length, messages this batch adds)
        let mut adding: Vec<(QueueName, u64, u64)> = Vec::new();
        for (_, spec) in &targets {
            if let Some(max_length) = spec.max_length {
                match adding.iter_mut().find(|(q, _, _)| q == &spec.name) {
                    Some(entry) => entry.2 += 1,
                    None => adding.push((spec.name.clone(), max_length, 1)),
                }
            }
        }
        for (queue, max_length, adds) in adding {
            if self.length(&queue)?.saturating_add(adds) > max_length {
                return Err(PublishError::QueueFull { queue, max_length }.into());
            }
        }
        let insert_all = |w: &mut Self| -> Result<(), Fail<PublishError>> {
            for (i, spec) in &targets {
                let publish = &batch[*i];
                w.insert_published(publish, spec, now)?;
            }
            Ok(())
        };
        if targets.len() > 1 {
            self.in_savepoint(insert_all)?;
        } else {
            insert_all(self)?;
        }
        for (_, spec) in &targets {
            if let Some(n) = self.lengths.get_mut(&spec.name) {
                *n += 1;
            }
            self.touched.insert(spec.name.clone());
        }
        Ok(())
    }

    fn insert_published(
        &self,
        publish: &Publish,
        spec: &QueueSpec,
        now: i64,
    ) -> rusqlite::Result<()> {
        let m = &publish.message;
        let visible_at = now.saturating_add(publish.delay.map_or(0, millis));
        let ttl_expiry = spec.message_ttl.map(|ttl| now.saturating_add(millis(ttl)));
        let expires_at = match (m.expires_at.map(unix_millis), ttl_expiry) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let topic = match &publish.destination {
            Destination::Topic(t) => Some(t.as_str()),
            Destination::Queue(_) => None,
        };
        let headers = if m.headers.is_empty() {
            None
        } else {
            Some(
                serde_json::to_string(&m.headers)
                    .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?,
            )
        };
        let priority = i64::from(m.priority.get());
        self.insert_row(&NewRow {
            queue: &spec.name,
            id: &m.id.hyphenated().to_string(),
            kind: &m.kind,
            correlation_id: m.correlation_id.as_deref(),
            causation_id: m.causation_id.as_deref(),
            reply_to: m.reply_to.as_deref(),
            content_type: &m.content_type,
            headers: headers.as_deref(),
            timestamp: unix_millis(m.timestamp),
            priority,
            lane: lane(spec, priority),
            expires_at,
            topic,
            payload: &m.payload,
            visible_at,
        })
    }

    fn insert_row(&self, row: &NewRow<'_>) -> rusqlite::Result<()> {
        self.exec(
            "INSERT INTO busway_messages (queue, id, kind, correlation_id, causation_id, reply_to, \
             content_type, headers, timestamp, priority, lane, expires_at, topic, payload, \
             enqueued_at, visible_at, attempt) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?15, 0)",
            params![
                row.queue.as_str(),
                row.id,
                row.kind,
                row.correlation_id,
                row.causation_id,
                row.reply_to,
                row.content_type,
                row.headers,
                row.timestamp,
                row.priority,
                row.lane,
                row.expires_at,
                row.topic,
                row.payload,
                row.visible_at,
            ],
        )?;
        Ok(())
    }

    // ---- consuming ---------------------------------------------------------

    fn add_consumer(
        &mut self,
        id: &str,
        queue: &QueueName,
        now: i64,
    ) -> Result<(), Fail<ConsumeError>> {
        if self.spec(queue)?.is_none() {
            return Err(ConsumeError::QueueNotFound(queue.clone()).into());
        }
        // Forget consumers of crashed processes long gone.
        self.exec(
            "DELETE FROM busway_consumers WHERE heartbeat_at + 10 * ttl_ms < ?1",
            [now],
        )?;
        self.exec(
            "INSERT OR REPLACE INTO busway_consumers (id, queue, owner, heartbeat_at, ttl_ms) \
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![id, queue.as_str(), self.owner, now, self.lease_ms],
        )?;
        Ok(())
    }

    /// Leases up to `max` ready rows of `queue`, dead-lettering the expired
    /// ones and those out of attempts on the way.
    fn lease(
        &mut self,
        queue: &QueueName,
        max: usize,
        now: i64,
    ) -> Result<LeaseBatch, Fail<ConsumeError>> {
        let spec = self
            .spec(queue)?
            .ok_or_else(|| ConsumeError::QueueNotFound(queue.clone()))?;
        let token = self.next_token;
        self.next_token += 1;
        let lanes = lanes(&spec);
        let mut rows = Vec::new();
        for &lane in &lanes {
            loop {
                let want = max.saturating_sub(rows.len());
                if want == 0 {
                    break;
                }
                let candidates = self.select_ready(queue, lane, now, want)?;
                let found = candidates.len();
                if let Some(last) = candidates.last() {
                    self.cursors
                        .insert((queue.clone(), lane), (last.visible_at, last.seq));
                }
                for mut row in candidates {
                    if row.expires_at.is_some_and(|at| at <= now) {
                        let attempts = row.attempt;
                        self.dead_letter_row(&row, queue, &spec, "expired", attempts, now)?;
                        continue;
                    }
                    if let Some(max_attempts) = spec.max_attempts {
                        if row.attempt >= i64::from(max_attempts) {
                            let reason = format!("max attempts ({max_attempts}) exceeded");
                            let attempts = row.attempt;
                            self.dead_letter_row(&row, queue, &spec, &reason, attempts, now)?;
                            continue;
                        }
                    }
                    row.attempt += 1;
                    self.pending.insert(row.seq, token);
                    rows.push(row);
                }
                if found < want {
                    break;
                }
            }
        }
        let next_visible_at = if rows.len() < max {
            self.next_visible_at(queue, &lanes, now)?
        } else {
            None
        };
        Ok(LeaseBatch {
            rows,
            permits: Vec::new(),
            requested: max,
            token,
            next_visible_at,
        })
    }

    fn select_ready(
        &self,
        queue: &QueueName,
        lane: i64,
        now: i64,
        limit: usize,
    ) -> rusqlite::Result<Vec<StoredRow>> {
        let (after_visible_at, after_seq) = self
            .cursors
            .get(&(queue.clone(), lane))
            .copied()
            .unwrap_or((i64::MIN, i64::MIN));
        let mut stmt = self.conn.prepare_cached(&select_ready_sql())?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = stmt.query_map(
            params![
                queue.as_str(),
                lane,
                now,
                limit,
                after_visible_at,
                after_seq
            ],
            StoredRow::from_row,
        )?;
        rows.collect()
    }

    fn next_visible_at(
        &self,
        queue: &QueueName,
        lanes: &[i64],
        now: i64,
    ) -> rusqlite::Result<Option<i64>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT min(visible_at) FROM busway_messages \
             WHERE queue = ?1 AND lane = ?2 AND visible_at > ?3",
        )?;
        let mut earliest: Option<i64> = None;
        for &lane in lanes {
            let at: Option<i64> =
                stmt.query_row(params![queue.as_str(), lane, now], |r| r.get(0))?;
            earliest = match (earliest, at) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        Ok(earliest)
    }

    /// The row of a lease this transport holds, if it still holds it.
    fn leased_row(&self, lease: LeaseId) -> rusqlite::Result<Option<StoredRow>> {
        self.conn
            .prepare_cached(&format!(
                "SELECT {ROW_COLUMNS} FROM busway_messages \
                 WHERE seq = ?1 AND lease_owner = ?2 AND lease_token = ?3"
            ))?
            .query_row(
                params![lease.seq, self.owner, lease.token],
                StoredRow::from_row,
            )
            .optional()
    }

    /// Moves `row` from `from` to the queue's dead-letter queue (or drops it,
    /// with a warning, if the queue has none).
    fn dead_letter_row(
        &mut self,
        row: &StoredRow,
        from: &QueueName,
        spec: &QueueSpec,
        reason: &str,
        attempts: i64,
        now: i64,
    ) -> rusqlite::Result<()> {
        self.exec("DELETE FROM busway_messages WHERE seq = ?1", [row.seq])?;
        self.lengths.remove(from);
        let Some(dead_letter) = &spec.dead_letter else {
            tracing::warn!(
                queue = %from,
                id = %row.id,
                reason,
                "dropping a message: its queue has no dead-letter queue"
            );
            return Ok(());
        };
        let mut headers = row.parse_headers();
        headers.insert(headers::DEAD_LETTER_REASON, reason);
        if let Some(topic) = &row.topic {
            headers.insert(headers::ORIGINAL_TOPIC, topic.as_str());
        }
        headers.insert(headers::ORIGINAL_QUEUE, from.as_str());
        headers.insert(headers::ATTEMPTS, attempts.to_string());
        headers.insert(headers::DEAD_LETTERED_AT, now.to_string());
        let headers = serde_json::to_string(&headers)
            .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
        let target = match self.spec(dead_letter)? {
            Some(target) => target,
            None => {
                let target = QueueSpec::dead_letter_queue(dead_letter.clone());
                self.insert_spec(&target)?;
                target
            }
        };
        self.insert_row(&NewRow {
            queue: &target.name,
            id: &row.id,
            kind: &row.kind,
            correlation_id: row.correlation_id.as_deref(),
            causation_id: row.causation_id.as_deref(),
            reply_to: row.reply_to.as_deref(),
            content_type: &row.content_type,
            headers: Some(&headers),
            timestamp: row.timestamp,
            priority: row.priority,
            lane: lane(&target, row.priority),
            expires_at: None,
            topic: None,
            payload: &row.payload,
            visible_at: now,
        })?;
        self.lengths.remove(&target.name);
        self.touched.insert(target.name);
        Ok(())
    }

    fn settle(
        &mut self,
        lease: LeaseId,
        queue: &QueueName,
        settlement: Settlement,
        now: i64,
    ) -> Result<(), Fail<SettleError>> {
        if self.take_pending(lease) {
            if settlement == Settlement::Ack {
                // Leased and acknowledged in the same transaction: the
                // lease was never written.
                self.exec("DELETE FROM busway_messages WHERE seq = ?1", [lease.seq])?;
                self.lengths.remove(queue);
                return Ok(());
            }
            self.write_lease(lease, now)?;
        }
        // Settled or lost, it is no longer ours to renew. (If settling fails,
        // a release or a retried settlement follows.)
        self.forget(lease);
        match settlement {
            Settlement::Ack => {
                let deleted = self.exec(
                    "DELETE FROM busway_messages \
                     WHERE seq = ?1 AND lease_owner = ?2 AND lease_token = ?3",
                    params![lease.seq, self.owner, lease.token],
                )?;
                if deleted == 0 {
                    return Err(SettleError::LeaseLost.into());
                }
                self.lengths.remove(queue);
                Ok(())
            }
            Settlement::Nack { retry_after } => self.in_savepoint(|w| {
                let row = w.leased_row(lease)?.ok_or(SettleError::LeaseLost)?;
                let spec = w.spec(queue)?;
                let limit = spec.as_ref().and_then(|s| s.max_attempts);
                if let (Some(spec), Some(max_attempts)) = (&spec, limit) {
                    if row.attempt >= i64::from(max_attempts) {
                        let reason = format!("max attempts ({max_attempts}) exceeded");
                        let attempts = row.attempt;
                        w.dead_letter_row(&row, queue, spec, &reason, attempts, now)?;
                        return Ok(());
                    }
                }
                match retry_after {
                    Some(delay) => w.exec(
                        "UPDATE busway_messages SET lease_owner = NULL, lease_token = NULL, \
                         visible_at = ?2 WHERE seq = ?1",
                        params![lease.seq, now.saturating_add(millis(delay))],
                    )?,
                    None => w.exec(
                        "UPDATE busway_messages SET lease_owner = NULL, lease_token = NULL, \
                         visible_at = enqueued_at WHERE seq = ?1",
                        [lease.seq],
                    )?,
                };
                w.touched.insert(queue.clone());
                Ok(())
            }),
            Settlement::DeadLetter { reason } => self.in_savepoint(|w| {
                let row = w.leased_row(lease)?.ok_or(SettleError::LeaseLost)?;
                match w.spec(queue)? {
                    Some(spec) if spec.dead_letter.is_some() => {
                        let attempts = row.attempt;
                        w.dead_letter_row(&row, queue, &spec, &reason, attempts, now)?;
                        Ok(())
                    }
                    _ => {
                        w.release(lease, queue, false)?;
                        Err(SettleError::NoDeadLetterQueue(queue.clone()).into())
                    }
                }
            }),
        }
    }

    fn release(
        &mut self,
        lease: LeaseId,
        queue: &QueueName,
        undelivered: bool,
    ) -> rusqlite::Result<()> {
        if self.take_pending(lease) {
            // The row never left its place. A delivery the application saw
            // counts as an attempt.
            if !undelivered {
                self.exec(
                    "UPDATE busway_messages SET attempt = attempt + 1 WHERE seq = ?1",
                    [lease.seq],
                )?;
            }
            self.touched.insert(queue.clone());
            return Ok(());
        }
        let released = self.exec(
            "UPDATE busway_messages SET lease_owner = NULL, lease_token = NULL, \
             visible_at = enqueued_at, attempt = max(attempt - ?4, 0) \
             WHERE seq = ?1 AND lease_owner = ?2 AND lease_token = ?3",
            params![lease.seq, self.owner, lease.token, i64::from(undelivered)],
        )?;
        self.forget(lease);
        if released > 0 {
            self.touched.insert(queue.clone());
        }
        Ok(())
    }

    /// Whether `lease` was handed out in the open transaction and not yet
    /// written; it no longer is afterwards.
    fn take_pending(&mut self, lease: LeaseId) -> bool {
        if self.pending.get(&lease.seq) == Some(&lease.token) {
            self.pending.remove(&lease.seq);
            true
        } else {
            false
        }
    }

    /// Writes a lease handed out in the open transaction.
    fn write_lease(&mut self, lease: LeaseId, now: i64) -> rusqlite::Result<()> {
        self.exec(
            "UPDATE busway_messages SET lease_owner = ?1, lease_token = ?2, \
             visible_at = ?3, attempt = attempt + 1 WHERE seq = ?4",
            params![
                self.owner,
                lease.token,
                now.saturating_add(self.lease_ms),
                lease.seq
            ],
        )?;
        self.held.insert(lease.seq, lease.token);
        Ok(())
    }

    /// Writes every lease still unsettled, before the commit.
    fn write_pending_leases(&mut self, now: i64) -> rusqlite::Result<()> {
        let pending: Vec<(i64, i64)> = self.pending.drain().collect();
        for (seq, token) in pending {
            self.write_lease(LeaseId { seq, token }, now)?;
        }
        Ok(())
    }

    fn forget(&mut self, lease: LeaseId) {
        if self.held.get(&lease.seq) == Some(&lease.token) {
            self.held.remove(&lease.seq);
        }
    }

    /// Extends every lease this transport holds and heartbeats its consumers.
    fn renew(&mut self, now: i64) -> rusqlite::Result<()> {
        let deadline = now.saturating_add(self.lease_ms);
        let mut lost = Vec::new();
        {
            let mut stmt = self.conn.prepare_cached(
                "UPDATE busway_messages SET visible_at = ?1 \
                 WHERE seq = ?2 AND lease_owner = ?3 AND lease_token = ?4",
            )?;
            for (&seq, &token) in &self.held {
                if stmt.execute(params![deadline, seq, self.owner, token])? == 0 {
                    lost.push(seq);
                }
            }
        }
        for seq in lost {
            self.held.remove(&seq);
        }
        if !self.consumers.is_empty() {
            self.exec(
                "UPDATE busway_consumers SET heartbeat_at = ?1 WHERE owner = ?2",
                params![now, self.owner],
            )?;
        }
        Ok(())
    }

    fn close(&mut self, undelivered: &[LeaseId]) -> rusqlite::Result<()> {
        let now = self.now();
        self.write_pending_leases(now)?;
        for lease in undelivered {
            self.exec(
                "UPDATE busway_messages SET attempt = max(attempt - 1, 0) \
                 WHERE seq = ?1 AND lease_owner = ?2 AND lease_token = ?3",
                params![lease.seq, self.owner, lease.token],
            )?;
        }
        {
            let mut stmt = self.conn.prepare_cached(
                "UPDATE busway_messages SET lease_owner = NULL, lease_token = NULL, \
                 visible_at = enqueued_at WHERE seq = ?1 AND lease_owner = ?2 AND lease_token = ?3",
            )?;
            for (&seq, &token) in &self.held {
                stmt.execute(params![seq, self.owner, token])?;
            }
        }
        self.held.clear();
        self.exec(
            "DELETE FROM busway_consumers WHERE owner = ?1",
            [self.owner],
        )?;
        self.consumers.clear();
        Ok(())
    }
}

/// A new row of `busway_messages`.
struct NewRow<'a> {
    queue: &'a QueueName,
    id: &'a str,
    kind: &'a str,
    correlation_id: Option<&'a str>,
    causation_id: Option<&'a str>,
    reply_to: Option<&'a str>,
    content_type: &'a str,
    headers: Option<&'a str>,
    timestamp: i64,
    priority: i64,
    lane: i64,
    expires_at: Option<i64>,
    topic: Option<&'a str>,
    payload: &'a [u8],
    visible_at: i64,
}

/// The dequeue: ready rows of one lane of a queue, in delivery order, after
/// the row (?5 = visible_at, ?6 = seq) the transaction read last. A range
/// scan of `busway_messages_ready`. (`LIMIT ?4 + 0`: with a bare
/// parameter as LIMIT, SQLite recompiles the statement on every run.)
pub(crate) fn select_ready_sql() -> String {
    format!(
        "SELECT {ROW_COLUMNS} FROM busway_messages \
         WHERE queue = ?1 AND lane = ?2 AND visible_at <= ?3 \
         AND visible_at >= ?5 AND NOT (visible_at = ?5 AND seq <= ?6) \
         ORDER BY visible_at, seq LIMIT ?4 + 0"
    )
}

/// The priority a queue orders a message by: its priority capped at the
/// queue's maximum, or 0 on queues without priorities.
fn lane(spec: &QueueSpec, priority: i64) -> i64 {
    match spec.max_priority {
        Some(max) => priority.clamp(0, i64::from(max)),
        None => 0,
    }
}

/// The lanes of a queue, highest first.
fn lanes(spec: &QueueSpec) -> Vec<i64> {
    match spec.max_priority {
        Some(max) => (0..=i64::from(max)).rev().collect(),
        None => vec![0],
    }
}

/// A failed WAL fsync as a busway error: the commit happened, so whether
/// it survives a power cut is unknown; retrying may store a duplicate.
fn io_error<E: FromSqlite>(e: &std::io::Error) -> E {
    E::from_sqlite(rusqlite::Error::SqliteFailure(
        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_IOERR),
        Some(format!("fsync of the WAL failed: {e}")),
    ))
}

/// A copy of an SQLite error as a busway error (SQLite errors are not `Clone`).
fn sql_error<E: FromSqlite>(e: &rusqlite::Error) -> E {
    let copy = match e {
        rusqlite::Error::SqliteFailure(code, message) => {
            rusqlite::Error::SqliteFailure(*code, message.clone())
        }
        other => rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ERROR),
            Some(other.to_string()),
        ),
    };
    E::from_sqlite(copy)
}
