//! Publishing: routing, limits, and one multi-row `INSERT` per batch.
//!
//! Concurrent `publish_batch` calls are grouped: a few worker tasks each
//! take every request queued at that moment (up to `max_batch` messages)
//! and store them with one `INSERT ... SELECT FROM unnest(...)` statement,
//! which also sends one `NOTIFY` per queue it touched. One commit (one WAL
//! flush) then confirms the whole group.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use busway_core::{
    unix_millis, Destination, Durability, Publish, PublishError, QueueName, QueueSpec,
};
use sqlx::{Connection, PgConnection, Row};
use tokio::sync::{mpsc, oneshot, Mutex};

use crate::error::{is_connection_lost, Fail, FromSql};
use crate::row::millis;
use crate::transport::Shared;

/// One `publish_batch` call waiting for a worker.
pub(crate) struct PublishRequest {
    pub(crate) batch: Vec<Publish>,
    pub(crate) durability: Durability,
    pub(crate) reply: oneshot::Sender<Result<(), PublishError>>,
}

/// The statement storing a batch: one row per (message, queue), then a
/// `NOTIFY` per queue. `LEAST` ignores NULLs: the earlier of the message's
/// own expiry and the queue's TTL.
const INSERT_SQL: &str = "
WITH ins AS (
    INSERT INTO busway_messages (queue, id, kind, correlation_id, causation_id, reply_to,
        content_type, headers, timestamp, priority, lane, expires_at, topic, payload,
        enqueued_at, visible_at)
    SELECT t.queue, t.id::uuid, t.kind, t.correlation_id, t.causation_id, t.reply_to,
        t.content_type, t.headers, t.ts, t.priority, t.lane,
        LEAST(t.expires_at, n.now + t.ttl), t.topic, t.payload,
        n.now + t.delay, n.now + t.delay
    FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                $7::text[], $8::text[], $9::bigint[], $10::int2[], $11::int2[], $12::bigint[],
                $13::text[], $14::bytea[], $15::bigint[], $16::bigint[])
         WITH ORDINALITY AS t(queue, id, kind, correlation_id, causation_id, reply_to,
                content_type, headers, ts, priority, lane, expires_at, topic, payload,
                delay, ttl, ord)
    CROSS JOIN (SELECT busway_now_ms() AS now) n
    ORDER BY t.ord
    RETURNING queue
)
SELECT pg_notify($17, q.queue) FROM (SELECT DISTINCT queue FROM ins) q";

/// One message bound for one queue.
struct Target<'a> {
    publish: &'a Publish,
    spec: Arc<QueueSpec>,
}

/// The columns of [`INSERT_SQL`], one array each.
#[derive(Default)]
struct Columns<'a> {
    queue: Vec<&'a str>,
    id: Vec<String>,
    kind: Vec<&'a str>,
    correlation_id: Vec<Option<&'a str>>,
    causation_id: Vec<Option<&'a str>>,
    reply_to: Vec<Option<&'a str>>,
    content_type: Vec<&'a str>,
    headers: Vec<Option<String>>,
    timestamp: Vec<i64>,
    priority: Vec<i16>,
    lane: Vec<i16>,
    expires_at: Vec<Option<i64>>,
    topic: Vec<Option<&'a str>>,
    payload: Vec<&'a [u8]>,
    delay: Vec<i64>,
    ttl: Vec<Option<i64>>,
}

impl<'a> Columns<'a> {
    fn push(&mut self, target: &'a Target<'a>) -> Result<(), sqlx::Error> {
        let m = &target.publish.message;
        let spec = &target.spec;
        self.queue.push(spec.name.as_str());
        self.id.push(m.id.hyphenated().to_string());
        self.kind.push(&m.kind);
        self.correlation_id.push(m.correlation_id.as_deref());
        self.causation_id.push(m.causation_id.as_deref());
        self.reply_to.push(m.reply_to.as_deref());
        self.content_type.push(&m.content_type);
        self.headers.push(if m.headers.is_empty() {
            None
        } else {
            Some(serde_json::to_string(&m.headers).map_err(|e| sqlx::Error::Encode(Box::new(e)))?)
        });
        self.timestamp.push(unix_millis(m.timestamp));
        let priority = i16::from(m.priority.get());
        self.priority.push(priority);
        self.lane.push(lane(spec, priority));
        self.expires_at.push(m.expires_at.map(unix_millis));
        self.topic.push(match &target.publish.destination {
            Destination::Topic(t) => Some(t.as_str()),
            Destination::Queue(_) => None,
        });
        self.payload.push(&m.payload);
        self.delay.push(target.publish.delay.map_or(0, millis));
        self.ttl.push(spec.message_ttl.map(millis));
        Ok(())
    }

    async fn insert(self, conn: &mut PgConnection, channel: &str) -> Result<(), sqlx::Error> {
        if self.queue.is_empty() {
            return Ok(());
        }
        sqlx::query(INSERT_SQL)
            .bind(self.queue)
            .bind(self.id)
            .bind(self.kind)
            .bind(self.correlation_id)
            .bind(self.causation_id)
            .bind(self.reply_to)
            .bind(self.content_type)
            .bind(self.headers)
            .bind(self.timestamp)
            .bind(self.priority)
            .bind(self.lane)
            .bind(self.expires_at)
            .bind(self.topic)
            .bind(self.payload)
            .bind(self.delay)
            .bind(self.ttl)
            .bind(channel)
            .execute(&mut *conn)
            .await?;
        Ok(())
    }
}

/// The priority a queue orders a message by: its priority capped at the
/// queue's maximum, or 0 on queues without priorities.
pub(crate) fn lane(spec: &QueueSpec, priority: i16) -> i16 {
    match spec.max_priority {
        Some(max) => priority.clamp(0, i16::from(max)),
        None => 0,
    }
}

impl Shared {
    /// The queues each request's messages go to: per request, the targets
    /// or the refusal (an unknown queue).
    async fn resolve<'a>(
        &self,
        conn: &mut PgConnection,
        requests: &[&'a [Publish]],
    ) -> Result<Vec<Result<Vec<Target<'a>>, PublishError>>, sqlx::Error> {
        let mut topics: Vec<&str> = Vec::new();
        let mut direct: Vec<&QueueName> = Vec::new();
        for publish in requests.iter().flat_map(|r| r.iter()) {
            match &publish.destination {
                Destination::Topic(t) => topics.push(t.as_str()),
                Destination::Queue(q) => direct.push(q),
            }
        }
        topics.sort_unstable();
        topics.dedup();
        let mut routes: HashMap<String, Vec<QueueName>> = HashMap::new();
        if !topics.is_empty() {
            let rows = sqlx::query(
                "SELECT t.topic, b.queue FROM unnest($1::text[]) AS t(topic) \
                 JOIN busway_bindings b ON ('.' || t.topic) ~ b.regex \
                 ORDER BY t.topic, b.queue",
            )
            .bind(&topics)
            .fetch_all(&mut *conn)
            .await?;
            for row in rows {
                let topic: String = row.try_get("topic")?;
                let queue: String = row.try_get("queue")?;
                match QueueName::new(&queue) {
                    Ok(queue) => routes.entry(topic).or_default().push(queue),
                    Err(_) => tracing::warn!(queue, "ignoring a binding to an invalid queue name"),
                }
            }
        }
        let mut wanted: Vec<&QueueName> = direct;
        wanted.extend(routes.values().flatten());
        self.load_specs(conn, &wanted).await?;

        // Each queue's spec is looked up once per group, however many
        // messages go to it.
        let mut specs: Vec<(QueueName, Option<Arc<QueueSpec>>)> = Vec::new();
        let mut spec_of = |queue: &QueueName| -> Option<Arc<QueueSpec>> {
            if let Some((_, spec)) = specs.iter().find(|(q, _)| q == queue) {
                return spec.clone();
            }
            let spec = self.cached_spec(queue).map(Arc::new);
            specs.push((queue.clone(), spec.clone()));
            spec
        };
        let mut resolved = Vec::with_capacity(requests.len());
        'request: for batch in requests {
            let mut targets = Vec::with_capacity(batch.len());
            for publish in batch.iter() {
                match &publish.destination {
                    Destination::Queue(queue) => match spec_of(queue) {
                        Some(spec) => targets.push(Target { publish, spec }),
                        None => {
                            resolved.push(Err(PublishError::QueueNotFound(queue.clone())));
                            continue 'request;
                        }
                    },
                    Destination::Topic(topic) => {
                        for queue in routes.get(topic.as_str()).into_iter().flatten() {
                            // A binding whose queue is gone routes nowhere.
                            if let Some(spec) = spec_of(queue) {
                                targets.push(Target { publish, spec });
                            }
                        }
                    }
                }
            }
            resolved.push(Ok(targets));
        }
        Ok(resolved)
    }

    /// Checks the `max_length` of the queues `targets` go to, inside the
    /// open transaction on `conn`, holding a per-queue lock until it ends so
    /// concurrent publishers count one after the other.
    async fn check_lengths(
        &self,
        conn: &mut PgConnection,
        targets: &[Target<'_>],
    ) -> Result<(), Fail<PublishError>> {
        let mut adding: Vec<(QueueName, u64, u64)> = Vec::new();
        for target in targets {
            if let Some(max_length) = target.spec.max_length {
                match adding.iter_mut().find(|(q, _, _)| q == &target.spec.name) {
                    Some(entry) => entry.2 += 1,
                    None => adding.push((target.spec.name.clone(), max_length, 1)),
                }
            }
        }
        // A fixed order, so two publishers never wait for each other's locks.
        adding.sort_by(|a, b| a.0.cmp(&b.0));
        for (queue, max_length, adds) in adding {
            sqlx::query(
                "SELECT pg_advisory_xact_lock(hashtext('busway_length:' || $1 || ':' || $2))",
            )
            .bind(&self.config.schema)
            .bind(queue.as_str())
            .execute(&mut *conn)
            .await?;
            let stored: i64 =
                sqlx::query_scalar("SELECT count(*) FROM busway_messages WHERE queue = $1")
                    .bind(queue.as_str())
                    .fetch_one(&mut *conn)
                    .await?;
            if u64::try_from(stored).unwrap_or(0).saturating_add(adds) > max_length {
                return Err(PublishError::QueueFull { queue, max_length }.into());
            }
        }
        Ok(())
    }

    /// Publishes `batch` inside the open transaction on `conn`.
    pub(crate) async fn publish_on(
        &self,
        conn: &mut PgConnection,
        batch: &[Publish],
    ) -> Result<(), Fail<PublishError>> {
        for publish in batch {
            publish.check_payload(self.config.max_payload_bytes)?;
        }
        let mut resolved = self.resolve(conn, &[batch]).await?;
        let targets = match resolved.pop() {
            Some(targets) => targets?,
            None => return Ok(()),
        };
        self.check_lengths(conn, &targets).await?;
        let mut columns = Columns::default();
        for target in &targets {
            columns.push(target)?;
        }
        columns.insert(conn, &self.channel).await?;
        Ok(())
    }

    /// Stores a group of requests, answering each as soon as its outcome is
    /// known; answered requests leave their slot empty, so a retry after a
    /// lost connection stores only the rest.
    async fn publish_group(
        &self,
        group: &mut Vec<Option<PublishRequest>>,
    ) -> Result<(), sqlx::Error> {
        group.retain(Option::is_some);
        let mut conn = self.pool.acquire().await?;
        let batches: Vec<&[Publish]> = group.iter().flatten().map(|r| r.batch.as_slice()).collect();
        let all_buffered = group
            .iter()
            .flatten()
            .all(|r| r.durability == Durability::Buffered);
        let resolved = self.resolve(&mut conn, &batches).await?;
        // Requests into queues with a length limit each get a transaction
        // of their own; the others share one statement.
        let mut shared_columns = Columns::default();
        let mut shared_members = Vec::new();
        let mut limited = Vec::new();
        let mut answers = Vec::new();
        for (i, targets) in resolved.iter().enumerate() {
            match targets {
                Err(e) => answers.push((i, Err(clone_refusal(e)))),
                Ok(targets) if targets.iter().any(|t| t.spec.max_length.is_some()) => {
                    limited.push((i, targets))
                }
                Ok(targets) => {
                    for target in targets {
                        shared_columns.push(target)?;
                    }
                    shared_members.push(i);
                }
            }
        }
        if !shared_members.is_empty() {
            if all_buffered {
                let mut tx = conn.begin().await?;
                sqlx::query("SET LOCAL synchronous_commit TO off")
                    .execute(&mut *tx)
                    .await?;
                shared_columns.insert(&mut tx, &self.channel).await?;
                tx.commit().await?;
            } else {
                shared_columns.insert(&mut conn, &self.channel).await?;
            }
            answers.extend(shared_members.into_iter().map(|i| (i, Ok(()))));
        }
        let mut limited_answers = Vec::new();
        let mut failure = None;
        for (i, targets) in limited {
            match self.publish_limited(&mut conn, targets).await {
                Ok(result) => limited_answers.push((i, result)),
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        drop(resolved);
        answers.extend(limited_answers);
        for (i, result) in answers {
            if let Some(request) = group.get_mut(i).and_then(Option::take) {
                let _ = request.reply.send(result);
            }
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Stores the targets of one request into length-limited queues, in a
    /// transaction of its own. `Ok(Err(_))`: refused (the queue is full).
    async fn publish_limited(
        &self,
        conn: &mut PgConnection,
        targets: &[Target<'_>],
    ) -> Result<Result<(), PublishError>, sqlx::Error> {
        let mut tx = conn.begin().await?;
        match self.check_lengths(&mut tx, targets).await {
            Ok(()) => {
                let mut columns = Columns::default();
                for target in targets {
                    columns.push(target)?;
                }
                columns.insert(&mut tx, &self.channel).await?;
                tx.commit().await?;
                Ok(Ok(()))
            }
            Err(Fail::Sql(e)) => Err(e),
            Err(Fail::Op(e)) => {
                tx.rollback().await?;
                Ok(Err(e))
            }
        }
    }
}

/// A refusal decided during routing, for its request.
fn clone_refusal(e: &PublishError) -> PublishError {
    match e {
        PublishError::QueueNotFound(q) => PublishError::QueueNotFound(q.clone()),
        other => PublishError::InvalidMessage(other.to_string()),
    }
}

/// How often a group is tried again after its connection was lost.
const PUBLISH_RETRIES: u32 = 5;

/// A publish worker: takes every request queued at that moment (up to
/// `max_batch` messages) and stores them together.
pub(crate) async fn worker(
    shared: Arc<Shared>,
    requests: Arc<Mutex<mpsc::Receiver<PublishRequest>>>,
) {
    let mut shutdown = shared.shutdown.subscribe();
    loop {
        let mut group = Vec::new();
        {
            let mut rx = tokio::select! {
                _ = shutdown.wait_for(|closed| *closed) => return,
                rx = requests.lock() => rx,
            };
            let first = tokio::select! {
                _ = shutdown.wait_for(|closed| *closed) => return,
                first = rx.recv() => first,
            };
            let Some(first) = first else { return };
            let mut messages = first.batch.len();
            group.push(Some(first));
            while messages < shared.config.max_batch {
                match rx.try_recv() {
                    Ok(request) => {
                        messages += request.batch.len();
                        group.push(Some(request));
                    }
                    Err(_) => break,
                }
            }
        }
        let mut tries = 0;
        loop {
            match shared.publish_group(&mut group).await {
                Ok(()) => break,
                // The statement did not run, or its outcome is unknown:
                // store again (at least once; a message may be stored twice
                // if the connection died during its commit).
                Err(e)
                    if is_connection_lost(&e) && tries < PUBLISH_RETRIES && !shared.is_closed() =>
                {
                    tries += 1;
                    tracing::warn!(error = %e, tries, "publishing lost its connection; trying again");
                    tokio::time::sleep(Duration::from_millis(50 * u64::from(tries))).await;
                }
                Err(e) => {
                    let error = sqlx_copy(&e);
                    for request in group.drain(..).flatten() {
                        let _ = request
                            .reply
                            .send(Err(PublishError::from_sql(sqlx_copy(&error))));
                    }
                    break;
                }
            }
        }
    }
}

/// A copy of an sqlx error (they are not `Clone`), keeping its message and
/// whether it is retryable.
pub(crate) fn sqlx_copy(e: &sqlx::Error) -> sqlx::Error {
    if crate::error::is_retryable(e) {
        sqlx::Error::Io(std::io::Error::other(e.to_string()))
    } else {
        sqlx::Error::Configuration(e.to_string().into())
    }
}
