//! [`SqliteTransport`]: the handle applications hold.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::SystemTime;

use async_trait::async_trait;
use busway_core::{
    unix_millis, Binding, Capabilities, ConnectError, ConsumeError, ConsumeOptions, DeclareError,
    DeliveryStream, Durability, Publish, PublishError, QueueName, QueueSpec, QueueStats,
    StatsError, Support, Transport,
};
use rusqlite::{Connection, OptionalExtension};
use tokio::sync::{oneshot, watch, Semaphore};
use uuid::Uuid;

use crate::checkpoint::Checkpointer;
use crate::config::{SqliteConfig, Synchronous};
use crate::consumer::{self, ConsumerState, ConsumerStream};
use crate::error::FromSqlite;
use crate::job::{Job, TypedJob, WriteError, WriteTx};
use crate::schema;
use crate::sync::Syncer;
use crate::wake::Wakers;
use crate::writer::{self, Command, WriterSettings};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The embedded, durable busway transport: queues in one SQLite file.
///
/// Several processes may open the same file: they share its queues, compete
/// for messages, and see each other's commits within
/// [`poll_interval`](SqliteConfig::poll_interval). Messages are durable once
/// a publish returns (with [`Synchronous::Full`](crate::Synchronous::Full),
/// the default, even across a power cut). A delivery that its consumer's
/// process stops holding (crash, kill) comes back after
/// [`lease`](SqliteConfig::lease).
///
/// Delays, priorities, TTLs, max attempts and dead-letter queues are
/// implemented by busway on top of SQLite (hence [`Support::Emulated`] in
/// [`capabilities`](Transport::capabilities)).
///
/// Cloning is cheap and every clone is the same transport; it shuts down when
/// [`close`](Transport::close) is called or the last clone is dropped.
///
/// ```
/// use busway_core::{ConsumeOptions, Message, Publish, QueueName, QueueSpec, Transport};
/// use busway_sqlite::SqliteTransport;
/// use futures::StreamExt;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # tokio::runtime::Runtime::new()?.block_on(async {
/// let dir = tempfile::tempdir()?;
/// let transport = SqliteTransport::open(dir.path().join("busway.db"))?;
///
/// let queue = QueueName::new("task_queue")?;
/// transport.declare_queue(&QueueSpec::new(queue.clone())).await?;
/// transport.publish(Publish::to_queue(queue.clone(), Message::new("ping", "hello"))).await?;
///
/// let mut deliveries = transport.consume(&queue, ConsumeOptions::default()).await?;
/// if let Some(delivery) = deliveries.next().await {
///     let delivery = delivery?;
///     assert_eq!(&delivery.message().payload[..], b"hello");
///     delivery.ack().await?;
/// }
/// transport.close().await;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// # })
/// # }
/// ```
#[derive(Clone)]
pub struct SqliteTransport {
    handle: Arc<Handle>,
}

/// Shuts the transport down when the last clone goes.
struct Handle {
    shared: Arc<Shared>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        let _ = self.shared.shut_down();
    }
}

/// State shared by the transport, its consumers and their tasks.
pub(crate) struct Shared {
    path: PathBuf,
    pub(crate) config: SqliteConfig,
    /// Commands for the writer thread.
    pub(crate) tx: Sender<Command>,
    /// Bounds the publish commands queued for the writer.
    publish_slots: Arc<Semaphore>,
    closed: AtomicBool,
    /// Becomes `true` when the transport closes.
    pub(crate) shutdown: watch::Sender<bool>,
    pub(crate) wakers: Arc<Wakers>,
    /// The live consumers, so closing can end them.
    pub(crate) consumers: Mutex<HashMap<String, Arc<ConsumerState>>>,
    /// Idle read connections (statistics, [`SqliteTransport::read`]),
    /// opened on demand.
    readers: Mutex<Vec<Connection>>,
}

impl Shared {
    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Starts closing: refuses new work, ends every consumer and asks the
    /// writer to release this transport's leases and stop. `None` if the
    /// transport was already closing.
    fn shut_down(&self) -> Option<oneshot::Receiver<()>> {
        if self.closed.swap(true, Ordering::SeqCst) {
            return None;
        }
        self.shutdown.send_replace(true);
        let consumers: Vec<_> = lock(&self.consumers).drain().map(|(_, c)| c).collect();
        let undelivered = consumers.iter().flat_map(|c| c.end()).collect();
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Close {
                undelivered,
                reply: Some(reply),
            })
            .ok()?;
        Some(rx)
    }

    fn stats(&self, queue: &QueueName) -> Result<QueueStats, StatsError> {
        self.with_reader(|conn| read_stats(conn, queue))
            .map_err(StatsFail::Sql)
            .and_then(|r| r)
            .map_err(|e| match e {
                StatsFail::Sql(e) => StatsError::from_sqlite(e),
                StatsFail::NotFound => StatsError::QueueNotFound(queue.clone()),
            })
    }

    /// The names of every declared queue, sorted.
    fn queue_names(&self) -> Result<Vec<QueueName>, StatsError> {
        self.with_reader(|conn| -> rusqlite::Result<Vec<String>> {
            let mut statement =
                conn.prepare_cached("SELECT name FROM busway_queues ORDER BY name")?;
            let names = statement.query_map([], |r| r.get::<_, String>(0))?;
            names.collect()
        })
        .and_then(|r| r)
        .map_err(StatsError::from_sqlite)
        .map(|names| {
            // Names were validated when declared; a row that no longer is valid is skipped.
            names
                .iter()
                .filter_map(|n| QueueName::new(n).ok())
                .collect()
        })
    }

    /// Runs `f` with an idle read connection (opening one if none is idle)
    /// and keeps the connection for later.
    fn with_reader<T>(&self, f: impl FnOnce(&mut Connection) -> T) -> Result<T, rusqlite::Error> {
        let idle = lock(&self.readers).pop();
        let mut conn = match idle {
            Some(conn) => conn,
            None => schema::open_connection(&self.path, &self.config)?,
        };
        let result = f(&mut conn);
        if conn.is_autocommit() {
            let mut readers = lock(&self.readers);
            if readers.len() < MAX_IDLE_READERS {
                readers.push(conn);
            }
        }
        Ok(result)
    }
}

/// How many idle read connections a transport keeps open.
const MAX_IDLE_READERS: usize = 8;

enum StatsFail {
    Sql(rusqlite::Error),
    NotFound,
}

impl From<rusqlite::Error> for StatsFail {
    fn from(e: rusqlite::Error) -> Self {
        StatsFail::Sql(e)
    }
}

fn read_stats(conn: &mut Connection, queue: &QueueName) -> Result<QueueStats, StatsFail> {
    // One read transaction: every count comes from the same snapshot.
    let tx = conn.transaction()?;
    let json: Option<String> = tx
        .prepare_cached("SELECT spec FROM busway_queues WHERE name = ?1")?
        .query_row([queue.as_str()], |r| r.get(0))
        .optional()?;
    let spec: QueueSpec = match json {
        None => return Err(StatsFail::NotFound),
        Some(json) => serde_json::from_str(&json).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
        })?,
    };
    let now = unix_millis(SystemTime::now());
    let count = |sql: &str, params: &[&dyn rusqlite::ToSql]| -> rusqlite::Result<u64> {
        let n: i64 = tx.prepare_cached(sql)?.query_row(params, |r| r.get(0))?;
        Ok(u64::try_from(n).unwrap_or(0))
    };
    let name = queue.as_str();
    let ready = count(
        "SELECT count(*) FROM busway_messages WHERE queue = ?1 AND visible_at <= ?2",
        &[&name, &now],
    )?;
    let later = count(
        "SELECT count(*) FROM busway_messages WHERE queue = ?1 AND visible_at > ?2",
        &[&name, &now],
    )?;
    let in_flight = count(
        "SELECT count(*) FROM busway_messages \
         WHERE queue = ?1 AND visible_at > ?2 AND lease_owner IS NOT NULL",
        &[&name, &now],
    )?;
    let consumers = count(
        "SELECT count(*) FROM busway_consumers WHERE queue = ?1 AND heartbeat_at + ttl_ms > ?2",
        &[&name, &now],
    )?;
    let dead_lettered = match &spec.dead_letter {
        Some(dlq) => count(
            "SELECT count(*) FROM busway_messages WHERE queue = ?1",
            &[&dlq.as_str()],
        )?,
        None => 0,
    };
    Ok(QueueStats {
        ready,
        delayed: later.saturating_sub(in_flight),
        in_flight,
        consumers,
        dead_lettered,
    })
}

impl SqliteTransport {
    /// Opens (creating if needed) the database at `path` with the default
    /// [`SqliteConfig`].
    ///
    /// ```
    /// use busway_sqlite::SqliteTransport;
    ///
    /// let dir = tempfile::tempdir()?;
    /// let transport = SqliteTransport::open(dir.path().join("busway.db"))?;
    /// assert_eq!(transport.path(), dir.path().join("busway.db"));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn open(path: impl AsRef<Path>) -> Result<SqliteTransport, ConnectError> {
        Self::open_with(path, SqliteConfig::default())
    }

    /// Opens (creating if needed) the database at `path` with `config`.
    ///
    /// Applies any missing schema migrations; a file written by a newer
    /// busway is refused. Does not need an async runtime, but consuming does.
    ///
    /// ```
    /// use busway_sqlite::{SqliteConfig, SqliteTransport, Synchronous};
    /// use std::time::Duration;
    ///
    /// let dir = tempfile::tempdir()?;
    /// let config = SqliteConfig {
    ///     synchronous: Synchronous::Normal,
    ///     lease: Duration::from_secs(10),
    ///     ..SqliteConfig::default()
    /// };
    /// let transport = SqliteTransport::open_with(dir.path().join("busway.db"), config)?;
    /// assert_eq!(transport.config().lease, Duration::from_secs(10));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn open_with(
        path: impl AsRef<Path>,
        config: SqliteConfig,
    ) -> Result<SqliteTransport, ConnectError> {
        let path = path.as_ref().to_path_buf();
        let config = config.normalized();
        let backend = |source: busway_core::BoxError, retryable: bool| ConnectError::Backend {
            backend: "sqlite",
            location: path.display().to_string(),
            source,
            retryable,
        };
        let mut conn = schema::open_connection(&path, &config).map_err(|e| {
            let retryable = crate::error::is_retryable(&e);
            backend(Box::new(e), retryable)
        })?;
        // The writer keeps a larger page cache: it touches the hot pages of
        // every queue.
        conn.pragma_update(None, "cache_size", -16_000)
            .map_err(|e| backend(Box::new(e), false))?;
        // The writer commits without fsync; with `Synchronous::Full` the sync
        // thread fsyncs the WAL before durable replies (see `sync`).
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(|e| backend(Box::new(e), false))?;
        // Checkpoints run on their own thread; the writer's automatic one is
        // a rare backstop (see `checkpoint`). The WAL file is cut back to
        // 64 MiB whenever it starts over.
        conn.pragma_update(None, "wal_autocheckpoint", 16_384)
            .map_err(|e| backend(Box::new(e), false))?;
        conn.pragma_update(None, "journal_size_limit", 64 * 1024 * 1024)
            .map_err(|e| backend(Box::new(e), false))?;
        schema::migrate(&mut conn).map_err(|e| {
            let retryable = e.is_retryable();
            backend(Box::new(e), retryable)
        })?;

        // 62 random bits of a fresh UUIDv7: unique among the processes
        // sharing the file.
        let owner =
            i64::try_from(Uuid::now_v7().as_u64_pair().1 & (u64::MAX >> 1)).unwrap_or_default();
        let wakers = Arc::new(Wakers::default());
        let (tx, rx) = std::sync::mpsc::channel();
        let checkpointer = Checkpointer::spawn(path.clone(), config.clone())
            .map_err(|e| backend(Box::new(e), true))?;
        let syncer = match config.synchronous {
            Synchronous::Full => {
                Some(Syncer::spawn(&path).map_err(|e| backend(Box::new(e), true))?)
            }
            Synchronous::Normal => None,
        };
        writer::spawn(
            conn,
            WriterSettings {
                owner,
                lease: config.lease,
                poll_interval: config.poll_interval,
                max_batch: config.max_batch,
                max_payload_bytes: config.max_payload_bytes,
            },
            checkpointer,
            syncer,
            wakers.clone(),
            rx,
        )
        .map_err(|e| backend(Box::new(e), true))?;
        let publish_slots = Arc::new(Semaphore::new(config.max_batch.saturating_mul(4).max(64)));
        let (shutdown, _) = watch::channel(false);
        Ok(SqliteTransport {
            handle: Arc::new(Handle {
                shared: Arc::new(Shared {
                    path,
                    config,
                    tx,
                    publish_slots,
                    closed: AtomicBool::new(false),
                    shutdown,
                    wakers,
                    consumers: Mutex::new(HashMap::new()),
                    readers: Mutex::new(Vec::new()),
                }),
            }),
        })
    }

    /// Opens the database named by a `sqlite://` URL (see
    /// [`SqliteConfig::from_url`]).
    ///
    /// ```
    /// use busway_sqlite::SqliteTransport;
    ///
    /// let dir = tempfile::tempdir()?;
    /// let url = format!("sqlite://{}?synchronous=normal", dir.path().join("bus.db").display());
    /// let transport = SqliteTransport::open_url(&url)?;
    /// # drop(transport);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn open_url(url: &str) -> Result<SqliteTransport, ConnectError> {
        let (path, config) = SqliteConfig::from_url(url)?;
        Self::open_with(path, config)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.shared().path
    }

    /// The settings in force (out-of-range values raised to their minimum).
    pub fn config(&self) -> &SqliteConfig {
        &self.shared().config
    }

    /// Runs `job` on the writer thread, inside the group-commit transaction
    /// that also carries the queue's writes, in a savepoint of its own: the
    /// building block of the stores kept in this database (event store, saga
    /// store, inbox, outbox).
    ///
    /// An `Err` from the job rolls back its savepoint alone and is returned
    /// at once. `Ok` is returned once the transaction is committed — with
    /// [`Synchronous::Full`], once it is on disk. Concurrent calls share one
    /// commit and one fsync. Messages published through
    /// [`WriteTx::publish`](crate::WriteTx::publish) become visible exactly
    /// when the job's own rows do.
    ///
    /// The job runs on the thread every write of this transport goes
    /// through: keep it short, and never block in it.
    ///
    /// ```
    /// use busway_core::{Message, Publish, QueueName, QueueSpec, Transport};
    /// use busway_sqlite::{SqliteTransport, WriteError};
    ///
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # tokio::runtime::Runtime::new()?.block_on(async {
    /// let dir = tempfile::tempdir()?;
    /// let transport = SqliteTransport::open(dir.path().join("busway.db"))?;
    /// let queue = QueueName::new("order_events")?;
    /// transport.declare_queue(&QueueSpec::new(queue.clone())).await?;
    /// transport
    ///     .write(|tx| {
    ///         tx.connection().execute_batch(
    ///             "CREATE TABLE IF NOT EXISTS busway_example_orders (id TEXT PRIMARY KEY)",
    ///         )?;
    ///         Ok::<_, WriteError>(())
    ///     })
    ///     .await?;
    /// // One transaction: the row and the message announcing it.
    /// let announce = Publish::to_queue(queue.clone(), Message::new("order.created", "o-1"));
    /// transport
    ///     .write(move |tx| {
    ///         tx.connection()
    ///             .execute("INSERT INTO busway_example_orders (id) VALUES (?1)", ["o-1"])?;
    ///         tx.publish(&[announce])?;
    ///         Ok::<_, WriteError>(())
    ///     })
    ///     .await?;
    /// let orders: i64 = transport
    ///     .read(|conn| conn.query_row("SELECT count(*) FROM busway_example_orders", [], |r| r.get(0)))
    ///     .await?;
    /// assert_eq!(orders, 1);
    /// assert_eq!(transport.queue_stats(&queue).await?.ready, 1);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// # })
    /// # }
    /// ```
    pub async fn write<R, E, F>(&self, job: F) -> Result<R, E>
    where
        F: FnOnce(&mut WriteTx<'_>) -> Result<R, E> + Send + 'static,
        R: Send + 'static,
        E: From<WriteError> + Send + 'static,
    {
        self.run_job(job, false).await
    }

    /// Like [`write`](Self::write), but answered as soon as the job ran,
    /// before its transaction commits: a crash may still lose it. What this
    /// transport does after it returns (an ack, another write) commits in
    /// the same transaction or a later one, never before it — enough for
    /// bookkeeping whose loss only means work is done again, at the cost of
    /// no commit wait.
    pub async fn write_buffered<R, E, F>(&self, job: F) -> Result<R, E>
    where
        F: FnOnce(&mut WriteTx<'_>) -> Result<R, E> + Send + 'static,
        R: Send + 'static,
        E: From<WriteError> + Send + 'static,
    {
        self.run_job(job, true).await
    }

    async fn run_job<R, E, F>(&self, job: F, buffered: bool) -> Result<R, E>
    where
        F: FnOnce(&mut WriteTx<'_>) -> Result<R, E> + Send + 'static,
        R: Send + 'static,
        E: From<WriteError> + Send + 'static,
    {
        let shared = self.shared();
        if shared.is_closed() {
            return Err(E::from(WriteError::Closed));
        }
        let (reply, rx) = oneshot::channel();
        let job: Box<dyn Job> = Box::new(TypedJob { job, reply });
        if shared.tx.send(Command::Job { job, buffered }).is_err() {
            return Err(E::from(WriteError::Closed));
        }
        match rx.await {
            Ok(result) => result,
            // The job was dropped unanswered: it panicked, or the writer stopped.
            Err(_) if shared.is_closed() => Err(E::from(WriteError::Closed)),
            Err(_) => Err(E::from(WriteError::JobPanicked)),
        }
    }

    /// Runs `f` on a blocking thread with a read connection of its own. It
    /// sees what is committed when it starts (WAL snapshot; wrap several
    /// statements in a transaction for one consistent view), including
    /// everything written by `write` calls that have returned.
    pub async fn read<R, F>(&self, f: F) -> Result<R, WriteError>
    where
        F: FnOnce(&Connection) -> rusqlite::Result<R> + Send + 'static,
        R: Send + 'static,
    {
        let shared = self.shared().clone();
        if shared.is_closed() {
            return Err(WriteError::Closed);
        }
        tokio::task::spawn_blocking(move || shared.with_reader(|conn| f(conn)))
            .await
            .map_err(|_| WriteError::JobPanicked)?
            .and_then(|r| r)
            .map_err(WriteError::from)
    }

    fn shared(&self) -> &Arc<Shared> {
        &self.handle.shared
    }

    /// Stops the writer thread without releasing this transport's leases,
    /// as if the process had been killed.
    #[cfg(test)]
    pub(crate) fn crash(&self) {
        self.shared().closed.store(true, Ordering::SeqCst);
        self.shared().shutdown.send_replace(true);
        let _ = self.shared().tx.send(Command::Crash);
    }
}

impl fmt::Debug for SqliteTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteTransport")
            .field("path", &self.shared().path)
            .field("closed", &self.shared().is_closed())
            .finish_non_exhaustive()
    }
}

/// Sends a command and waits for its answer; a writer that is gone means
/// the transport is closed.
async fn request<T, E: FromSqlite>(
    shared: &Shared,
    make: impl FnOnce(oneshot::Sender<Result<T, E>>) -> Command,
) -> Result<T, E> {
    if shared.is_closed() {
        return Err(E::closed());
    }
    let (reply, rx) = oneshot::channel();
    shared.tx.send(make(reply)).map_err(|_| E::closed())?;
    rx.await.unwrap_or_else(|_| Err(E::closed()))
}

#[async_trait]
impl Transport for SqliteTransport {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            delay: Support::Emulated,
            priority: Support::Emulated,
            ttl: Support::Emulated,
            dead_letter: Support::Emulated,
            ordering: Support::Emulated,
            persistence: Support::Native,
            multi_process: Support::Native,
            max_payload_bytes: self.shared().config.max_payload_bytes,
        }
    }

    async fn declare_queue(&self, spec: &QueueSpec) -> Result<(), DeclareError> {
        spec.validate()?;
        let spec = spec.clone();
        request(self.shared(), |reply| Command::Declare { spec, reply }).await
    }

    async fn bind(&self, binding: &Binding) -> Result<(), DeclareError> {
        let binding = binding.clone();
        request(self.shared(), |reply| Command::Bind { binding, reply }).await
    }

    async fn publish_batch(
        &self,
        batch: Vec<Publish>,
        durability: Durability,
    ) -> Result<(), PublishError> {
        let shared = self.shared();
        if shared.is_closed() {
            return Err(PublishError::Closed);
        }
        if batch.is_empty() {
            return Ok(());
        }
        for publish in &batch {
            publish.check_payload(shared.config.max_payload_bytes)?;
        }
        let permit = shared
            .publish_slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| PublishError::Closed)?;
        request(shared, |reply| Command::Publish {
            batch,
            durability,
            reply,
            permit,
        })
        .await
    }

    async fn consume(
        &self,
        queue: &QueueName,
        options: ConsumeOptions,
    ) -> Result<DeliveryStream, ConsumeError> {
        if options.prefetch == 0 {
            return Err(ConsumeError::InvalidOptions(
                "prefetch must be at least 1".into(),
            ));
        }
        let shared = self.shared();
        let id = Uuid::now_v7().to_string();
        request(shared, |reply| Command::AddConsumer {
            id: id.clone(),
            queue: queue.clone(),
            reply,
        })
        .await?;
        let state = Arc::new(ConsumerState::new(id.clone(), queue.clone()));
        {
            let mut consumers = lock(&shared.consumers);
            if shared.is_closed() {
                // The close already removed this transport's consumer rows.
                return Err(ConsumeError::Closed);
            }
            consumers.insert(id, state.clone());
        }
        tokio::spawn(consumer::feed(
            shared.clone(),
            state.clone(),
            usize::from(options.prefetch),
        ));
        Ok(Box::pin(ConsumerStream {
            shared: shared.clone(),
            state,
        }))
    }

    async fn queue_stats(&self, queue: &QueueName) -> Result<QueueStats, StatsError> {
        let shared = self.shared().clone();
        if shared.is_closed() {
            return Err(StatsError::Closed);
        }
        // Read our own writes: wait until everything sent so far is committed.
        let (reply, flushed) = oneshot::channel();
        if shared.tx.send(Command::Flush { reply }).is_ok() {
            let _ = flushed.await;
        }
        let queue = queue.clone();
        tokio::task::spawn_blocking(move || shared.stats(&queue))
            .await
            .map_err(|e| StatsError::Backend {
                source: Box::new(e),
                retryable: false,
            })?
    }

    async fn list_queues(&self) -> Result<Vec<QueueName>, StatsError> {
        let shared = self.shared().clone();
        if shared.is_closed() {
            return Err(StatsError::Closed);
        }
        let (reply, flushed) = oneshot::channel();
        if shared.tx.send(Command::Flush { reply }).is_ok() {
            let _ = flushed.await;
        }
        tokio::task::spawn_blocking(move || shared.queue_names())
            .await
            .map_err(|e| StatsError::Backend {
                source: Box::new(e),
                retryable: false,
            })?
    }

    async fn close(&self) {
        if let Some(done) = self.shared().shut_down() {
            let _ = done.await;
        }
    }
}
