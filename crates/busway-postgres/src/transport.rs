//! [`PostgresTransport`]: the handle applications hold.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
use busway_core::{
    Binding, BoxError, Capabilities, ConnectError, ConsumeError, ConsumeOptions, DeclareError,
    DeliveryStream, Durability, Publish, PublishError, QueueName, QueueSpec, QueueStats,
    StatsError, Support, Transport,
};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Postgres, Row};
use tokio::sync::{mpsc, oneshot, watch};
use uuid::Uuid;

use crate::config::PostgresConfig;
use crate::consumer::{self, ConsumerState, ConsumerStream, QueueInfo};
use crate::error::{Fail, FromSql};
use crate::publish::{self, PublishRequest};
use crate::row::millis;
use crate::schema;
use crate::settle::{self, LeaseId, SettleRequest};
use crate::wake::{self, Wakers};

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Publish and settle workers per transport: while one waits for its
/// commit, the next gathers the following group.
const PUBLISH_WORKERS: usize = 3;
const SETTLE_WORKERS: usize = 2;
/// Publish requests queued for the workers before `publish_batch` waits.
const PUBLISH_QUEUE: usize = 4096;

/// The PostgreSQL busway transport: queues in `busway_` tables of one
/// schema of your database.
///
/// Several processes may connect to the same database and schema: they
/// share its queues and compete for messages. A publish returns once its
/// transaction has committed. A delivery that its consumer's process stops
/// holding (crash, kill, lost connection) comes back after
/// [`lease`](PostgresConfig::lease).
///
/// Delays, priorities, TTLs, max attempts and dead-letter queues are
/// implemented by busway in SQL (hence [`Support::Emulated`] in
/// [`capabilities`](Transport::capabilities)).
///
/// Cloning is cheap and every clone is the same transport; it shuts down when
/// [`close`](Transport::close) is called or the last clone is dropped.
#[derive(Clone)]
pub struct PostgresTransport {
    handle: Arc<Handle>,
}

/// Shuts the transport down when the last clone goes.
struct Handle {
    shared: Arc<Shared>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        if let Some(cleanup) = self.shared.shut_down() {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(cleanup);
            }
        }
    }
}

/// State shared by the transport, its consumers and their tasks.
pub(crate) struct Shared {
    pub(crate) pool: PgPool,
    pub(crate) config: PostgresConfig,
    /// `host:port/database`, for errors and logs (never credentials).
    pub(crate) location: String,
    /// The LISTEN/NOTIFY channel of the schema.
    pub(crate) channel: String,
    /// Queue specs read so far (a declared spec never changes).
    pub(crate) specs: Mutex<HashMap<QueueName, QueueSpec>>,
    /// The leases this transport holds (row → token), renewed every
    /// `lease / 3` and returned at close.
    held: Mutex<HashMap<i64, i64>>,
    next_token: AtomicI64,
    /// This transport's id in `busway_consumers`.
    owner: i64,
    closed: AtomicBool,
    /// Becomes `true` when the transport closes.
    pub(crate) shutdown: watch::Sender<bool>,
    pub(crate) wakers: Arc<Wakers>,
    publish_tx: mpsc::Sender<PublishRequest>,
    settle_tx: mpsc::UnboundedSender<SettleRequest>,
    /// The live consumers, so closing can end them.
    consumers: Mutex<HashMap<String, Arc<ConsumerState>>>,
}

/// 62 random bits.
fn random_id() -> i64 {
    i64::try_from(Uuid::new_v4().as_u64_pair().1 >> 2).unwrap_or_default()
}

impl Shared {
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    pub(crate) fn next_token(&self) -> i64 {
        self.next_token.fetch_add(1, Ordering::Relaxed)
    }

    /// Records a lease handed to a consumer, for renewal.
    pub(crate) fn hold(&self, lease: LeaseId) {
        lock(&self.held).insert(lease.seq, lease.token);
    }

    /// Forgets a lease that was settled or lost.
    pub(crate) fn forget(&self, lease: LeaseId) {
        let mut held = lock(&self.held);
        if held.get(&lease.seq) == Some(&lease.token) {
            held.remove(&lease.seq);
        }
    }

    /// Hands a settlement to the settle workers; false once closed.
    pub(crate) fn settle(&self, request: SettleRequest) -> bool {
        !self.is_closed() && self.settle_tx.send(request).is_ok()
    }

    /// Returns leases whose rows never reached the application, without
    /// counting the attempt.
    pub(crate) async fn return_undelivered(&self, leases: &[LeaseId]) {
        if leases.is_empty() {
            return;
        }
        for lease in leases {
            self.forget(*lease);
        }
        let seqs: Vec<i64> = leases.iter().map(|l| l.seq).collect();
        let tokens: Vec<i64> = leases.iter().map(|l| l.token).collect();
        let delays = vec![None; leases.len()];
        let undo = vec![1; leases.len()];
        let returned = async {
            let mut conn = self.pool.acquire().await?;
            settle::requeue_rows(&mut conn, &seqs, &tokens, &delays, &undo, &self.channel).await
        };
        if let Err(e) = returned.await {
            tracing::warn!(error = %e, "returning unused leases failed; they run out by themselves");
        }
    }

    pub(crate) async fn remove_consumer(&self, id: &str) {
        lock(&self.consumers).remove(id);
        if let Err(e) = sqlx::query("DELETE FROM busway_consumers WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await
        {
            tracing::warn!(error = %e, "removing a consumer failed; it expires by itself");
        }
    }

    /// Starts closing: refuses new work and ends every consumer. Returns
    /// the cleanup to run (return the leases, deregister the consumers), or
    /// `None` if the transport was already closing.
    fn shut_down(
        self: &Arc<Self>,
    ) -> Option<impl std::future::Future<Output = ()> + Send + 'static> {
        if self.closed.swap(true, Ordering::SeqCst) {
            return None;
        }
        self.shutdown.send_replace(true);
        let consumers: Vec<_> = lock(&self.consumers).drain().map(|(_, c)| c).collect();
        let undelivered: Vec<LeaseId> = consumers.iter().flat_map(|c| c.end()).collect();
        let shared = self.clone();
        Some(async move {
            shared.return_undelivered(&undelivered).await;
            let held: Vec<(i64, i64)> = lock(&shared.held).drain().collect();
            if !held.is_empty() {
                let seqs: Vec<i64> = held.iter().map(|h| h.0).collect();
                let tokens: Vec<i64> = held.iter().map(|h| h.1).collect();
                let delays = vec![None; held.len()];
                let undo = vec![0; held.len()];
                let released = async {
                    let mut conn = shared.pool.acquire().await?;
                    settle::requeue_rows(&mut conn, &seqs, &tokens, &delays, &undo, &shared.channel)
                        .await
                };
                if let Err(e) = released.await {
                    tracing::warn!(error = %e, "returning leases at close failed; they run out by themselves");
                }
            }
            if let Err(e) = sqlx::query("DELETE FROM busway_consumers WHERE owner = $1")
                .bind(shared.owner)
                .execute(&shared.pool)
                .await
            {
                tracing::warn!(error = %e, "removing consumers at close failed; they expire by themselves");
            }
        })
    }

    /// Extends every lease this transport holds and heartbeats its consumers.
    async fn renew(&self) -> Result<(), sqlx::Error> {
        let held: Vec<(i64, i64)> = lock(&self.held).iter().map(|(s, t)| (*s, *t)).collect();
        if !held.is_empty() {
            let seqs: Vec<i64> = held.iter().map(|h| h.0).collect();
            let tokens: Vec<i64> = held.iter().map(|h| h.1).collect();
            let renewed = sqlx::query(
                "UPDATE busway_messages m SET visible_at = busway_now_ms() + $3 \
                 FROM unnest($1::bigint[], $2::bigint[]) AS a(seq, token) \
                 WHERE m.seq = a.seq AND m.lease_token = a.token RETURNING m.seq",
            )
            .bind(&seqs)
            .bind(&tokens)
            .bind(millis(self.config.lease))
            .fetch_all(&self.pool)
            .await?;
            let renewed: std::collections::HashSet<i64> = renewed
                .iter()
                .filter_map(|r| r.try_get::<i64, _>(0).ok())
                .collect();
            for (seq, token) in held {
                if !renewed.contains(&seq) {
                    self.forget(LeaseId { seq, token });
                }
            }
        }
        if !lock(&self.consumers).is_empty() {
            sqlx::query(
                "UPDATE busway_consumers SET heartbeat_at = busway_now_ms() WHERE owner = $1",
            )
            .bind(self.owner)
            .execute(&self.pool)
            .await?;
        }
        Ok(())
    }

    async fn stats(&self, queue: &QueueName) -> Result<QueueStats, Fail<StatsError>> {
        let mut conn = self.pool.acquire().await?;
        let spec = self
            .spec(&mut conn, queue)
            .await?
            .ok_or_else(|| StatsError::QueueNotFound(queue.clone()))?;
        let dead_letter = spec.dead_letter.as_ref().map(|q| q.as_str());
        let row = sqlx::query(
            "SELECT
                 count(*) FILTER (WHERE visible_at <= n.now) AS ready,
                 count(*) FILTER (WHERE visible_at > n.now AND lease_token IS NULL) AS delayed,
                 count(*) FILTER (WHERE visible_at > n.now AND lease_token IS NOT NULL) AS in_flight,
                 (SELECT count(*) FROM busway_consumers
                  WHERE queue = $1 AND heartbeat_at + ttl_ms > n.now) AS consumers,
                 (SELECT count(*) FROM busway_messages WHERE queue = $2) AS dead_lettered
             FROM (SELECT busway_now_ms() AS now) n
             LEFT JOIN busway_messages m ON m.queue = $1
             GROUP BY n.now",
        )
        .bind(queue.as_str())
        .bind(dead_letter)
        .fetch_one(&mut *conn)
        .await?;
        let count = |name: &str| -> Result<u64, sqlx::Error> {
            Ok(u64::try_from(row.try_get::<i64, _>(name)?).unwrap_or(0))
        };
        Ok(QueueStats {
            ready: count("ready")?,
            delayed: count("delayed")?,
            in_flight: count("in_flight")?,
            consumers: count("consumers")?,
            dead_lettered: count("dead_lettered")?,
        })
    }
}

/// Renews leases every `lease / 3` until the transport closes.
async fn renew_leases(shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.subscribe();
    let every = shared.config.lease / 3;
    loop {
        tokio::select! {
            _ = shutdown.wait_for(|closed| *closed) => return,
            _ = tokio::time::sleep(every) => {}
        }
        if let Err(e) = shared.renew().await {
            tracing::warn!(error = %e, "renewing leases failed");
        }
    }
}

impl PostgresTransport {
    /// Connects to the database a `postgres://` URL names (see
    /// [`PostgresConfig::from_url`] for the busway parameters) and brings
    /// busway's tables up to date.
    ///
    /// An unreachable server, refused credentials or a missing database is a
    /// [`ConnectError::Backend`] naming the server (never the password) with
    /// the cause as its source.
    ///
    /// ```no_run
    /// use busway_postgres::PostgresTransport;
    ///
    /// # async fn run() -> Result<(), busway_core::ConnectError> {
    /// let transport =
    ///     PostgresTransport::connect("postgres://postgres@127.0.0.1:5432/test?schema=orders").await?;
    /// assert_eq!(transport.config().schema, "orders");
    /// # Ok(())
    /// # }
    /// ```
    pub async fn connect(url: &str) -> Result<PostgresTransport, ConnectError> {
        let (url, config) = PostgresConfig::from_url(url)?;
        let options = PgConnectOptions::from_str(&url).map_err(|e| ConnectError::InvalidUrl {
            url: busway_core::redact_url(&url),
            reason: e.to_string(),
        })?;
        Self::connect_with(options, config).await
    }

    /// Connects with driver options and busway settings given separately.
    pub async fn connect_with(
        options: PgConnectOptions,
        config: PostgresConfig,
    ) -> Result<PostgresTransport, ConnectError> {
        config
            .validate()
            .map_err(|reason| ConnectError::InvalidUrl {
                url: location(&options),
                reason,
            })?;
        let config = config.normalized();
        let location = location(&options);
        let backend = |source: BoxError, retryable: bool| ConnectError::Backend {
            backend: "postgres",
            location: location.clone(),
            source,
            retryable,
        };
        let options = options.options([("search_path", config.schema.as_str())]);
        let pool = PgPoolOptions::new()
            .max_connections(config.max_connections)
            .min_connections(0)
            .acquire_timeout(config.connect_timeout)
            // Failures are handled where they happen; a ping per acquire
            // would cost a round trip per statement.
            .test_before_acquire(false)
            .connect_with(options)
            .await
            .map_err(|e| {
                let retryable = crate::error::is_retryable(&e);
                backend(Box::new(e), retryable)
            })?;
        schema::migrate(
            &pool,
            &config.schema,
            "transport",
            schema::TRANSPORT_MIGRATIONS,
        )
        .await
        .map_err(|e| {
            let retryable = e.is_retryable();
            backend(Box::new(e), retryable)
        })?;
        let (shutdown, _) = watch::channel(false);
        let (publish_tx, publish_rx) = mpsc::channel(PUBLISH_QUEUE);
        let (settle_tx, settle_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            channel: config.channel(),
            pool,
            config,
            location,
            specs: Mutex::new(HashMap::new()),
            held: Mutex::new(HashMap::new()),
            next_token: AtomicI64::new(random_id()),
            owner: random_id(),
            closed: AtomicBool::new(false),
            shutdown,
            wakers: Arc::new(Wakers::default()),
            publish_tx,
            settle_tx,
            consumers: Mutex::new(HashMap::new()),
        });
        tokio::spawn(wake::listen(
            shared.pool.clone(),
            shared.channel.clone(),
            shared.wakers.clone(),
            shared.shutdown.subscribe(),
        ));
        let publish_rx = Arc::new(tokio::sync::Mutex::new(publish_rx));
        for _ in 0..PUBLISH_WORKERS {
            tokio::spawn(publish::worker(shared.clone(), publish_rx.clone()));
        }
        let settle_rx = Arc::new(tokio::sync::Mutex::new(settle_rx));
        for _ in 0..SETTLE_WORKERS {
            tokio::spawn(settle::worker(shared.clone(), settle_rx.clone()));
        }
        tokio::spawn(renew_leases(shared.clone()));
        Ok(PostgresTransport {
            handle: Arc::new(Handle { shared }),
        })
    }

    fn shared(&self) -> &Arc<Shared> {
        &self.handle.shared
    }

    /// The connection pool, for the stores that share the transport's
    /// database (event store, saga store, outbox).
    ///
    /// Every connection has its `search_path` set to the transport's
    /// schema, so unqualified `busway_` table names resolve there. Because
    /// the stores and the queues live in one database, one transaction can
    /// append events, update a saga and enqueue messages (see
    /// [`publish_in`](Self::publish_in)): an outbox needs no second system.
    pub fn pool(&self) -> &PgPool {
        &self.shared().pool
    }

    /// Publishes `batch` inside the caller's transaction: the messages are
    /// stored, and their consumers woken, only if and when `tx` commits.
    /// This is the outbox: change your own tables and publish what the
    /// change means in one atomic commit.
    ///
    /// Routing, queue limits and payload sizes are checked as by
    /// [`publish_batch`](Transport::publish_batch). An error leaves `tx`
    /// usable only if PostgreSQL did not abort it; roll it back to be safe.
    ///
    /// ```no_run
    /// use busway_core::{Message, Publish, QueueName, QueueSpec, Transport};
    /// use busway_postgres::PostgresTransport;
    ///
    /// # async fn run(transport: PostgresTransport) -> Result<(), Box<dyn std::error::Error>> {
    /// let queue = QueueName::new("emails")?;
    /// transport.declare_queue(&QueueSpec::new(queue.clone())).await?;
    /// let mut tx = transport.pool().begin().await?;
    /// sqlx::query("UPDATE accounts SET verified = true WHERE id = $1")
    ///     .bind(42_i64)
    ///     .execute(&mut *tx)
    ///     .await?;
    /// let email = Publish::to_queue(queue, Message::new("send_welcome_email", "42"));
    /// transport.publish_in(&mut tx, &[email]).await?;
    /// tx.commit().await?; // the account change and the message, or neither
    /// # Ok(())
    /// # }
    /// ```
    pub async fn publish_in(
        &self,
        tx: &mut sqlx::Transaction<'_, Postgres>,
        batch: &[Publish],
    ) -> Result<(), PublishError> {
        let shared = self.shared();
        if shared.is_closed() {
            return Err(PublishError::Closed);
        }
        shared
            .publish_on(&mut *tx, batch)
            .await
            .map_err(Fail::into_error)
    }

    /// The settings in force (out-of-range values raised to their minimum).
    pub fn config(&self) -> &PostgresConfig {
        &self.shared().config
    }
}

impl fmt::Debug for PostgresTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresTransport")
            .field("location", &self.shared().location)
            .field("schema", &self.shared().config.schema)
            .field("closed", &self.shared().is_closed())
            .finish_non_exhaustive()
    }
}

/// `host:port/database` of the options, never the credentials.
fn location(options: &PgConnectOptions) -> String {
    format!(
        "{}:{}/{}",
        options.get_host(),
        options.get_port(),
        options.get_database().unwrap_or("(default database)")
    )
}

#[async_trait]
impl Transport for PostgresTransport {
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
        let shared = self.shared();
        if shared.is_closed() {
            return Err(DeclareError::Closed);
        }
        spec.validate()?;
        let mut conn = shared
            .pool
            .acquire()
            .await
            .map_err(DeclareError::from_sql)?;
        shared
            .declare(&mut conn, spec)
            .await
            .map_err(Fail::into_error)
    }

    async fn bind(&self, binding: &Binding) -> Result<(), DeclareError> {
        let shared = self.shared();
        if shared.is_closed() {
            return Err(DeclareError::Closed);
        }
        let mut conn = shared
            .pool
            .acquire()
            .await
            .map_err(DeclareError::from_sql)?;
        shared
            .bind(&mut conn, binding)
            .await
            .map_err(Fail::into_error)
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
        let (reply, rx) = oneshot::channel();
        shared
            .publish_tx
            .send(PublishRequest {
                batch,
                durability,
                reply,
            })
            .await
            .map_err(|_| PublishError::Closed)?;
        rx.await.unwrap_or(Err(PublishError::Closed))
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
        if shared.is_closed() {
            return Err(ConsumeError::Closed);
        }
        let mut conn = shared
            .pool
            .acquire()
            .await
            .map_err(ConsumeError::from_sql)?;
        let spec = shared
            .spec(&mut conn, queue)
            .await
            .map_err(ConsumeError::from_sql)?
            .ok_or_else(|| ConsumeError::QueueNotFound(queue.clone()))?;
        let dead_letter = match &spec.dead_letter {
            Some(name) => Some(
                shared
                    .spec(&mut conn, name)
                    .await
                    .map_err(ConsumeError::from_sql)?
                    .unwrap_or_else(|| QueueSpec::dead_letter_queue(name.clone())),
            ),
            None => None,
        };
        let id = Uuid::now_v7().to_string();
        sqlx::query(
            "INSERT INTO busway_consumers (id, queue, owner, heartbeat_at, ttl_ms) \
             VALUES ($1, $2, $3, busway_now_ms(), $4)",
        )
        .bind(&id)
        .bind(queue.as_str())
        .bind(shared.owner)
        .bind(millis(shared.config.lease))
        .execute(&mut *conn)
        .await
        .map_err(ConsumeError::from_sql)?;
        // Forget consumers of crashed processes long gone.
        sqlx::query(
            "DELETE FROM busway_consumers WHERE heartbeat_at + 10 * ttl_ms < busway_now_ms()",
        )
        .execute(&mut *conn)
        .await
        .map_err(ConsumeError::from_sql)?;
        drop(conn);
        let info = Arc::new(QueueInfo { spec, dead_letter });
        let state = Arc::new(ConsumerState::new(id.clone(), info));
        {
            let mut consumers = lock(&shared.consumers);
            if shared.is_closed() {
                drop(consumers);
                shared.remove_consumer(&id).await;
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
        let shared = self.shared();
        if shared.is_closed() {
            return Err(StatsError::Closed);
        }
        shared.stats(queue).await.map_err(Fail::into_error)
    }

    async fn list_queues(&self) -> Result<Vec<QueueName>, StatsError> {
        let shared = self.shared();
        if shared.is_closed() {
            return Err(StatsError::Closed);
        }
        let names: Vec<String> = sqlx::query_scalar("SELECT name FROM busway_queues ORDER BY name")
            .fetch_all(&shared.pool)
            .await
            .map_err(|e| Fail::<StatsError>::Sql(e).into_error())?;
        // Names were validated when declared; a row that no longer is valid is skipped.
        Ok(names
            .iter()
            .filter_map(|n| QueueName::new(n).ok())
            .collect())
    }

    async fn close(&self) {
        if let Some(cleanup) = self.shared().shut_down() {
            cleanup.await;
        }
    }
}
