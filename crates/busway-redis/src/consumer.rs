//! Consumers: reading the streams, the scheduler beside each consumer
//! (delays and crashed consumers), and settling deliveries.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use busway_core::{
    headers, unix_millis, Acker, ConsumeError, ConsumeOptions, Delivery, DeliveryStream, Message,
    SettleError, Settlement, Topic,
};
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::StreamExt;
use redis::aio::ConnectionManager;
use redis::{RedisError, Value};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::scripts;
use crate::transport::{backend, manager_config, InFlight, Inner, QueueInfo, GROUP};
use busway_core::envelope;

/// One entry read from a stream.
struct Entry {
    stream: Arc<str>,
    id: String,
    blob: Option<Bytes>,
    attempts: u32,
}

/// Starts a consumer: a reading task and a scheduler task.
pub(crate) async fn start(
    inner: Arc<Inner>,
    queue: Arc<QueueInfo>,
    options: ConsumeOptions,
) -> Result<DeliveryStream, ConsumeError> {
    let block = inner.config.block;
    let reader = ConnectionManager::new_with_config(
        inner.client.clone(),
        manager_config(Some(block + Duration::from_secs(10))),
    )
    .await
    .map_err(backend::<ConsumeError>)?;
    let consumer = format!("c-{}", uuid::Uuid::new_v4().simple());
    let mut conn = inner.conn.clone();
    register(&inner, &mut conn, &queue, &consumer)
        .await
        .map_err(backend::<ConsumeError>)?;
    let prefetch = usize::from(options.prefetch);
    let (tx, rx) = mpsc::channel(prefetch);
    let ctx = Consumer {
        inner: inner.clone(),
        queue,
        name: consumer,
        reader,
        permits: Arc::new(Semaphore::new(prefetch)),
        prefetch,
        tx,
    };
    let scheduler = tokio::spawn(schedule(
        inner.clone(),
        ctx.queue.clone(),
        ctx.name.clone(),
        ctx.tx.downgrade(),
    ));
    let reader = tokio::spawn(ctx.run());
    if let Ok(mut tasks) = inner.tasks.lock() {
        tasks.retain(|t| !t.is_finished());
        tasks.push(reader);
        tasks.push(scheduler);
    }
    Ok(tokio_stream(rx))
}

fn tokio_stream(rx: mpsc::Receiver<Result<Delivery, ConsumeError>>) -> DeliveryStream {
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|d| (d, rx)) }).boxed()
}

/// Marks the consumer alive for three heartbeats.
async fn register(
    inner: &Inner,
    conn: &mut ConnectionManager,
    queue: &QueueInfo,
    consumer: &str,
) -> Result<(), RedisError> {
    let until = inner.server_now_ms() + 3 * heartbeat(inner).as_millis() as i64;
    redis::pipe()
        .zadd(&queue.consumers, consumer, until)
        .ignore()
        .zrembyscore(&queue.consumers, "-inf", inner.server_now_ms())
        .ignore()
        .query_async::<()>(conn)
        .await
}

fn heartbeat(inner: &Inner) -> Duration {
    (inner.config.lease / 3).min(Duration::from_secs(5))
}

struct Consumer {
    inner: Arc<Inner>,
    queue: Arc<QueueInfo>,
    name: String,
    reader: ConnectionManager,
    permits: Arc<Semaphore>,
    prefetch: usize,
    tx: mpsc::Sender<Result<Delivery, ConsumeError>>,
}

impl Consumer {
    async fn run(mut self) {
        let mut close = self.inner.close_tx.subscribe();
        let mut backoff = Duration::from_millis(50);
        loop {
            if *close.borrow() || self.tx.is_closed() {
                break;
            }
            let first = tokio::select! {
                p = self.permits.clone().acquire_owned() => p,
                _ = close.changed() => break,
                _ = self.tx.closed() => break,
            };
            let Ok(first) = first else { break };
            let mut permits = vec![first];
            while permits.len() < self.prefetch {
                match self.permits.clone().try_acquire_owned() {
                    Ok(p) => permits.push(p),
                    Err(_) => break,
                }
            }
            let entries = match self.read(permits.len()).await {
                Ok(entries) => {
                    backoff = Duration::from_millis(50);
                    entries
                }
                Err(e) => {
                    if self.inner.is_closed() {
                        break;
                    }
                    tracing::warn!(queue = %self.queue.name, error = %e, "reading the queue failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    self.recover(&e).await;
                    continue;
                }
            };
            let mut entries = entries.into_iter();
            while let Some(entry) = entries.next() {
                if self.inner.is_closed() || self.tx.is_closed() {
                    // Read but never handed out: back unchanged.
                    self.give_back(std::iter::once(entry).chain(entries.by_ref()))
                        .await;
                    break;
                }
                let Some(permit) = permits.pop() else {
                    self.give_back(std::iter::once(entry)).await;
                    continue;
                };
                if let Some(delivery) = self.prepare(entry, permit).await {
                    if let Err(mpsc::error::SendError(d)) = self.tx.send(Ok(delivery)).await {
                        drop(d);
                        break;
                    }
                }
            }
        }
        let mut conn = self.inner.conn.clone();
        let _: Result<(), _> = redis::cmd("ZREM")
            .arg(&self.queue.consumers)
            .arg(&self.name)
            .query_async(&mut conn)
            .await;
    }

    /// Reads up to `n` new entries, highest priority first, waiting up to the block time.
    async fn read(&mut self, n: usize) -> Result<Vec<Entry>, RedisError> {
        let streams = &self.queue.streams;
        if streams.len() > 1 {
            let mut inv = scripts::READ_BY_PRIORITY.prepare_invoke();
            for s in streams.iter().rev() {
                inv.key(s);
            }
            inv.arg(GROUP).arg(&self.name).arg(n);
            let value: Value = inv.invoke_async(&mut self.reader).await?;
            let entries = parse_flat(value);
            if !entries.is_empty() {
                return Ok(entries);
            }
        }
        // Wait for anything, on every stream at once.
        let count = if streams.len() > 1 { 1 } else { n };
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(GROUP)
            .arg(&self.name)
            .arg("COUNT")
            .arg(count)
            .arg("BLOCK")
            .arg(self.inner.config.block.as_millis() as u64)
            .arg("STREAMS");
        for s in streams.iter().rev() {
            cmd.arg(s);
        }
        for _ in streams {
            cmd.arg(">");
        }
        let value: Value = cmd.query_async(&mut self.reader).await?;
        Ok(parse_xread(value))
    }

    /// After a failed read: declare the queue again if the server lost it,
    /// and take back what the server handed this consumer during the failure.
    async fn recover(&mut self, error: &RedisError) {
        if error.code() == Some("NOGROUP") {
            if let Err(e) = self.inner.declare(&self.queue.spec).await {
                tracing::warn!(queue = %self.queue.name, error = %e, "declaring the queue again failed");
            }
            return;
        }
        let mut conn = self.inner.conn.clone();
        for stream in &self.queue.streams {
            let pending: Result<Value, _> = redis::cmd("XPENDING")
                .arg(stream)
                .arg(GROUP)
                .arg("-")
                .arg("+")
                .arg(1000)
                .arg(&self.name)
                .query_async(&mut conn)
                .await;
            let Ok(Value::Array(rows)) = pending else {
                continue;
            };
            let held: Vec<String> = rows
                .iter()
                .filter_map(|r| match r {
                    Value::Array(f) => f.first().and_then(as_string),
                    _ => None,
                })
                .filter(|id| {
                    self.inner
                        .in_flight
                        .lock()
                        .map(|m| !m.contains_key(&(Arc::from(stream.as_str()), id.clone())))
                        .unwrap_or(false)
                })
                .collect();
            if held.is_empty() {
                continue;
            }
            let claimed: Result<Value, _> = redis::cmd("XCLAIM")
                .arg(stream)
                .arg(GROUP)
                .arg(&self.name)
                .arg(0)
                .arg(&held)
                .query_async(&mut conn)
                .await;
            if let Ok(claimed) = claimed {
                let stream: Arc<str> = Arc::from(stream.as_str());
                self.give_back(parse_entries(&stream, claimed).into_iter())
                    .await;
            }
        }
    }

    /// Puts entries that were read but never delivered back, attempts unchanged.
    async fn give_back(&self, entries: impl Iterator<Item = Entry>) {
        for e in entries {
            let result = match &e.blob {
                Some(blob) => requeue(&self.inner, &e.stream, &e.id, blob, e.attempts)
                    .await
                    .map(drop),
                None => Ok(()),
            };
            if let Err(err) = result {
                tracing::warn!(queue = %self.queue.name, error = %err, "returning an undelivered entry failed; its lease will expire");
            }
        }
    }

    /// Turns an entry into a delivery, or settles it on the spot if it is
    /// malformed or expired.
    async fn prepare(&self, entry: Entry, permit: OwnedSemaphorePermit) -> Option<Delivery> {
        let Some(blob) = entry.blob.clone() else {
            let reason = "malformed entry: no message field";
            self.discard(
                &entry,
                Message::new("busway.malformed", Bytes::new()),
                None,
                reason,
            )
            .await;
            return None;
        };
        let (message, topic) = match envelope::decode(&blob) {
            Ok(decoded) => decoded,
            Err(e) => {
                let reason = format!("malformed entry: {e}");
                self.discard(
                    &entry,
                    Message::new("busway.malformed", blob),
                    None,
                    &reason,
                )
                .await;
                return None;
            }
        };
        if message.is_expired_at(SystemTime::now()) {
            self.discard(&entry, message, topic.as_ref(), "expired")
                .await;
            return None;
        }
        let attempt = entry.attempts + 1;
        let key = (entry.stream, entry.id);
        if let Ok(mut map) = self.inner.in_flight.lock() {
            map.insert(
                key.clone(),
                InFlight {
                    queue: self.queue.clone(),
                    consumer: self.name.clone(),
                    blob: blob.clone(),
                    attempts: entry.attempts,
                },
            );
        }
        let acker = RedisAcker {
            inner: self.inner.clone(),
            queue: self.queue.clone(),
            key,
            blob,
            attempts: entry.attempts,
            _permit: permit,
        };
        Some(Delivery::new(
            message,
            attempt,
            self.queue.name.clone(),
            topic,
            Box::new(acker),
        ))
    }

    /// Dead-letters (or, without a dead-letter queue, drops) an entry that
    /// cannot be delivered.
    async fn discard(&self, entry: &Entry, message: Message, topic: Option<&Topic>, reason: &str) {
        let result = dead_letter(
            &self.inner,
            &self.queue,
            &entry.stream,
            &entry.id,
            message,
            topic,
            reason,
            entry.attempts,
        )
        .await;
        if let Err(e) = result {
            tracing::warn!(queue = %self.queue.name, error = %e, %reason, "dead-lettering failed; the entry will be retried");
        }
    }
}

/// The scheduler beside a consumer: moves due delayed messages into the
/// streams, takes back deliveries whose lease expired, and keeps the
/// consumer registered.
async fn schedule(
    inner: Arc<Inner>,
    queue: Arc<QueueInfo>,
    consumer: String,
    alive: mpsc::WeakSender<Result<Delivery, ConsumeError>>,
) {
    let mut close = inner.close_tx.subscribe();
    let mut conn = inner.conn.clone();
    let tick = Duration::from_millis(100);
    let beat = heartbeat(&inner);
    let reap_every = inner.config.lease / 2;
    let mut next_beat = tokio::time::Instant::now() + beat;
    let mut next_reap = tokio::time::Instant::now();
    loop {
        if *close.borrow() || alive.upgrade().is_none() {
            return;
        }
        let mut wait = tick;
        let promoted: Result<(i64, i64), _> = scripts::PROMOTE
            .key(&queue.delayed)
            .arg(&queue.stream_prefix)
            .arg(500)
            .invoke_async(&mut conn)
            .await;
        match promoted {
            Ok((moved, next)) => {
                if moved >= 500 {
                    wait = Duration::ZERO;
                } else if next >= 0 {
                    wait = wait.min(Duration::from_millis(next.unsigned_abs()));
                }
            }
            Err(e) => {
                tracing::debug!(queue = %queue.name, error = %e, "moving delayed messages failed")
            }
        }
        let now = tokio::time::Instant::now();
        if now >= next_beat {
            next_beat = now + beat;
            if let Err(e) = register(&inner, &mut conn, &queue, &consumer).await {
                tracing::debug!(queue = %queue.name, error = %e, "consumer heartbeat failed");
            }
        }
        if now >= next_reap {
            next_reap = now + reap_every;
            reap(&inner, &mut conn, &queue, &consumer).await;
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = close.changed() => return,
        }
    }
}

/// Takes back deliveries idle for longer than the lease (their consumer
/// died) and puts them back with the attempt counted.
async fn reap(
    inner: &Arc<Inner>,
    conn: &mut ConnectionManager,
    queue: &Arc<QueueInfo>,
    consumer: &str,
) {
    let lease_ms = inner.config.lease.as_millis() as u64;
    for stream in &queue.streams {
        let stream: Arc<str> = Arc::from(stream.as_str());
        let claimed: Result<Value, _> = redis::cmd("XAUTOCLAIM")
            .arg(&*stream)
            .arg(GROUP)
            .arg(consumer)
            .arg(lease_ms)
            .arg("0-0")
            .arg("COUNT")
            .arg(100)
            .query_async(conn)
            .await;
        let entries = match claimed {
            Ok(Value::Array(parts)) => match parts.into_iter().nth(1) {
                Some(entries @ Value::Array(_)) => parse_entries(&stream, entries),
                _ => continue,
            },
            Ok(_) => continue,
            Err(e) => {
                tracing::debug!(queue = %queue.name, error = %e, "XAUTOCLAIM failed");
                continue;
            }
        };
        for e in entries {
            let Some(blob) = &e.blob else { continue };
            tracing::info!(queue = %queue.name, id = %e.id, "taking back a delivery whose consumer stopped renewing it");
            if let Err(err) = nack(inner, queue, &e.stream, &e.id, blob, e.attempts + 1, None).await
            {
                tracing::warn!(queue = %queue.name, error = %err, "taking back a delivery failed");
            }
        }
    }
}

/// Puts an entry back at the end of its stream with `attempts` deliveries counted.
pub(crate) async fn requeue(
    inner: &Inner,
    stream: &str,
    id: &str,
    blob: &[u8],
    attempts: u32,
) -> Result<bool, RedisError> {
    let mut conn = inner.conn.clone();
    let moved: i64 = scripts::MOVE
        .key(stream)
        .key(stream)
        .arg(GROUP)
        .arg(id)
        .arg("s")
        .arg(blob)
        .arg(attempts)
        .arg(0)
        .arg(0)
        .arg("0")
        .invoke_async(&mut conn)
        .await?;
    Ok(moved == 1)
}

/// A nack after `attempts` deliveries: back to the queue (after `delay`),
/// or to the dead letters when the attempts are used up.
async fn nack(
    inner: &Arc<Inner>,
    queue: &Arc<QueueInfo>,
    stream: &str,
    id: &str,
    blob: &Bytes,
    attempts: u32,
    delay: Option<Duration>,
) -> Result<bool, SettleError> {
    if let Some(max) = queue.spec.max_attempts {
        if attempts >= max {
            let (message, topic) = envelope::decode(blob)
                .unwrap_or_else(|_| (Message::new("busway.malformed", blob.clone()), None));
            let reason = format!("max attempts ({max}) exceeded");
            return dead_letter(
                inner,
                queue,
                stream,
                id,
                message,
                topic.as_ref(),
                &reason,
                attempts,
            )
            .await;
        }
    }
    match delay.filter(|d| !d.is_zero()) {
        None => requeue(inner, stream, id, blob, attempts)
            .await
            .map_err(backend::<SettleError>),
        Some(delay) => {
            let level = stream
                .strip_prefix(&queue.stream_prefix)
                .unwrap_or("0")
                .to_owned();
            let token = uuid::Uuid::new_v4().simple().to_string();
            let mut conn = inner.conn.clone();
            let moved: i64 = scripts::MOVE
                .key(stream)
                .key(&queue.delayed)
                .arg(GROUP)
                .arg(id)
                .arg("z")
                .arg(&blob[..])
                .arg(attempts)
                .arg(delay.as_millis() as u64)
                .arg(level)
                .arg(token)
                .invoke_async(&mut conn)
                .await
                .map_err(backend::<SettleError>)?;
            Ok(moved == 1)
        }
    }
}

/// Moves an entry to the queue's dead-letter queue with the reason and
/// origin in its headers; without one, removes it.
#[allow(clippy::too_many_arguments)]
async fn dead_letter(
    inner: &Inner,
    queue: &QueueInfo,
    stream: &str,
    id: &str,
    mut message: Message,
    topic: Option<&Topic>,
    reason: &str,
    attempts: u32,
) -> Result<bool, SettleError> {
    let mut conn = inner.conn.clone();
    let dlq = match &queue.spec.dead_letter {
        Some(d) => inner.queue(d).await.map_err(backend::<SettleError>)?,
        None => None,
    };
    let Some(dlq) = dlq else {
        tracing::warn!(queue = %queue.name, message_id = %message.id, %reason, "no dead-letter queue; message dropped");
        let done: i64 = scripts::ACK
            .key(stream)
            .arg(GROUP)
            .arg(id)
            .invoke_async(&mut conn)
            .await
            .map_err(backend::<SettleError>)?;
        return Ok(done == 1);
    };
    message.expires_at = None;
    let h = &mut message.headers;
    h.insert(headers::DEAD_LETTER_REASON, reason);
    if let Some(topic) = topic {
        h.insert(headers::ORIGINAL_TOPIC, topic.as_str());
    }
    h.insert(headers::ORIGINAL_QUEUE, queue.name.as_str());
    h.insert(headers::ATTEMPTS, attempts.to_string());
    h.insert(
        headers::DEAD_LETTERED_AT,
        unix_millis(SystemTime::now()).to_string(),
    );
    let blob = envelope::encode(&message, topic).map_err(|e| SettleError::Backend {
        source: e.into(),
        retryable: false,
    })?;
    tracing::debug!(queue = %queue.name, dead_letter_queue = %dlq.name, message_id = %message.id, %reason, "message dead-lettered");
    let moved: i64 = scripts::MOVE
        .key(stream)
        .key(&dlq.streams[0])
        .arg(GROUP)
        .arg(id)
        .arg("s")
        .arg(&blob[..])
        .arg(0)
        .arg(0)
        .arg(0)
        .arg("0")
        .invoke_async(&mut conn)
        .await
        .map_err(backend::<SettleError>)?;
    Ok(moved == 1)
}

/// Settles one delivery.
struct RedisAcker {
    inner: Arc<Inner>,
    queue: Arc<QueueInfo>,
    /// The stream and the entry id.
    key: (Arc<str>, String),
    blob: Bytes,
    attempts: u32,
    _permit: OwnedSemaphorePermit,
}

impl RedisAcker {
    fn forget(&self) -> bool {
        self.inner
            .in_flight
            .lock()
            .map(|mut m| m.remove(&self.key).is_some())
            .unwrap_or(false)
    }

    async fn settle_now(self, settlement: Settlement) -> Result<(), SettleError> {
        if self.inner.is_closed() {
            return Err(SettleError::Closed);
        }
        self.forget();
        let inner = &self.inner;
        let attempt = self.attempts + 1;
        let (stream, id) = (&self.key.0, &self.key.1);
        let done = match settlement {
            Settlement::Ack => inner
                .acks
                .ack(stream.clone(), id.clone())
                .await
                .map_err(backend::<SettleError>)?,
            Settlement::Nack { retry_after } => {
                nack(
                    inner,
                    &self.queue,
                    stream,
                    id,
                    &self.blob,
                    attempt,
                    retry_after,
                )
                .await?
            }
            Settlement::DeadLetter { reason } => {
                if self.queue.spec.dead_letter.is_none() {
                    requeue(inner, stream, id, &self.blob, attempt)
                        .await
                        .map_err(backend::<SettleError>)?;
                    return Err(SettleError::NoDeadLetterQueue(self.queue.name.clone()));
                }
                let (message, topic) = envelope::decode(&self.blob).unwrap_or_else(|_| {
                    (Message::new("busway.malformed", self.blob.clone()), None)
                });
                dead_letter(
                    inner,
                    &self.queue,
                    stream,
                    id,
                    message,
                    topic.as_ref(),
                    &reason,
                    attempt,
                )
                .await?
            }
        };
        if done {
            Ok(())
        } else {
            Err(SettleError::LeaseLost)
        }
    }
}

impl Acker for RedisAcker {
    fn settle(
        self: Box<Self>,
        settlement: Settlement,
    ) -> BoxFuture<'static, Result<(), SettleError>> {
        if settlement != Settlement::Ack || self.inner.is_closed() {
            return Box::pin(self.settle_now(settlement));
        }
        // Queued for the next batch now, and settled as far as prefetch
        // goes: the consumer may read the next entry while the ack is on
        // its way (as the other backends free the slot once the ack is sent).
        let this = *self;
        this.forget();
        let (stream, id) = this.key;
        let acked = this.inner.acks.ack(stream, id);
        drop(this._permit);
        Box::pin(async move {
            match acked.await {
                Ok(true) => Ok(()),
                Ok(false) => Err(SettleError::LeaseLost),
                Err(e) => Err(backend::<SettleError>(e)),
            }
        })
    }

    fn release(self: Box<Self>) {
        if self.inner.is_closed() || !self.forget() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // No runtime to run on: the lease expires and another consumer takes it.
            return;
        };
        runtime.spawn(async move {
            let attempt = self.attempts + 1;
            let (stream, id) = (&self.key.0, &self.key.1);
            if let Err(e) = nack(&self.inner, &self.queue, stream, id, &self.blob, attempt, None).await {
                tracing::warn!(queue = %self.queue.name, error = %e, "returning a dropped delivery failed; its lease will expire");
            }
        });
    }
}

fn as_string(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

fn into_string(v: Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b).ok(),
        Value::SimpleString(s) => Some(s),
        _ => None,
    }
}

/// The bytes of a string reply, taken over without a copy.
fn into_bytes(v: Value) -> Option<Bytes> {
    match v {
        Value::BulkString(b) => Some(Bytes::from(b)),
        Value::SimpleString(s) => Some(Bytes::from(s.into_bytes())),
        _ => None,
    }
}

/// Whether a field name reply is `name`.
fn is_field(v: &Value, name: &str) -> bool {
    match v {
        Value::BulkString(b) => b == name.as_bytes(),
        Value::SimpleString(s) => s == name,
        _ => false,
    }
}

/// Parses `[id, [field, value, ...]]`.
fn parse_entry(stream: &Arc<str>, v: Value) -> Option<Entry> {
    let Value::Array(parts) = v else { return None };
    let mut parts = parts.into_iter();
    let id = parts.next().and_then(into_string)?;
    Some(parse_fields(stream, id, parts.next()))
}

/// Reads the fields of an entry: `m` (the envelope) and `a` (attempts).
fn parse_fields(stream: &Arc<str>, id: String, fields: Option<Value>) -> Entry {
    let mut blob = None;
    let mut attempts = 0;
    if let Some(Value::Array(fields)) = fields {
        let mut fields = fields.into_iter();
        while let (Some(name), Some(value)) = (fields.next(), fields.next()) {
            if is_field(&name, "m") {
                blob = into_bytes(value);
            } else if is_field(&name, "a") {
                attempts = into_string(value).and_then(|s| s.parse().ok()).unwrap_or(0);
            }
        }
    }
    Entry {
        stream: stream.clone(),
        id,
        blob,
        attempts,
    }
}

/// Parses the entries of a reply that lists them: `[entry, ...]`.
fn parse_entries(stream: &Arc<str>, v: Value) -> Vec<Entry> {
    match v {
        Value::Array(entries) => entries
            .into_iter()
            .filter_map(|e| parse_entry(stream, e))
            .collect(),
        _ => Vec::new(),
    }
}

/// Parses an `XREADGROUP` reply: `[[stream, [entry, ...]], ...]`.
fn parse_xread(v: Value) -> Vec<Entry> {
    let streams: Vec<(Value, Value)> = match v {
        Value::Array(s) => s
            .into_iter()
            .filter_map(|s| match s {
                Value::Array(kv) if kv.len() == 2 => {
                    let mut kv = kv.into_iter();
                    Some((kv.next()?, kv.next()?))
                }
                _ => None,
            })
            .collect(),
        Value::Map(m) => m,
        _ => Vec::new(),
    };
    let mut out = Vec::new();
    for (key, entries) in streams {
        let Some(key) = into_string(key) else {
            continue;
        };
        let key: Arc<str> = Arc::from(key);
        if let Value::Array(entries) = entries {
            out.reserve(entries.len());
            out.extend(entries.into_iter().filter_map(|e| parse_entry(&key, e)));
        }
    }
    out
}

/// Parses the priority script's reply: `[[stream, id, [field, value, ...]], ...]`.
fn parse_flat(v: Value) -> Vec<Entry> {
    let Value::Array(rows) = v else {
        return Vec::new();
    };
    rows.into_iter()
        .filter_map(|r| match r {
            Value::Array(parts) if parts.len() == 3 => {
                let mut parts = parts.into_iter();
                let stream: Arc<str> = Arc::from(into_string(parts.next()?)?);
                let id = into_string(parts.next()?)?;
                Some(parse_fields(&stream, id, parts.next()))
            }
            _ => None,
        })
        .collect()
}
