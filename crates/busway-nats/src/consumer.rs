//! Consumers: pulling from the level consumers, the scheduler beside each
//! consumer (delayed messages and the live registration), and settling
//! deliveries.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_nats::jetstream::{self, consumer::pull, AckKind};
use async_nats::{HeaderMap, Subject};
use busway_core::{
    headers, unix_millis, Acker, ConsumeError, ConsumeOptions, Delivery, DeliveryStream, Message,
    SettleError, Settlement, Topic,
};
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::StreamExt;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};

use crate::names::{self, QueueInfo};
use crate::transport::{backend, io, InFlight, Inner, HEARTBEAT};
use busway_core::envelope;

/// How soon the scheduler sees again a delayed message it failed to move.
const RETRY_PROMOTE: Duration = Duration::from_millis(200);

type PullConsumer = jetstream::consumer::Consumer<pull::Config>;
type Sender = mpsc::Sender<Result<Delivery, ConsumeError>>;

/// Starts a consumer: a pulling task and a scheduler task.
pub(crate) async fn start(
    inner: Arc<Inner>,
    queue: Arc<QueueInfo>,
    options: ConsumeOptions,
) -> Result<DeliveryStream, ConsumeError> {
    let mut levels = Vec::with_capacity(queue.levels);
    for level in 0..queue.levels {
        levels.push(consumer_handle(&inner, &queue, &QueueInfo::level_consumer(level)).await?);
    }
    let delayed = consumer_handle(&inner, &queue, names::DELAYED_CONSUMER).await?;
    let id = uuid::Uuid::new_v4().simple().to_string();
    let live = format!("{}.{id}", queue.live_base);
    register(&inner, &live).await.map_err(io::<ConsumeError>)?;
    // Priority queues wait for any publish to the queue's subjects between polls.
    let doorbell = if queue.levels > 1 {
        Some(
            inner
                .client
                .subscribe(format!("{}.*", queue.subject_base))
                .await
                .map_err(io::<ConsumeError>)?,
        )
    } else {
        None
    };
    let prefetch = usize::from(options.prefetch);
    let (tx, rx) = mpsc::channel(prefetch);
    let releasing = Arc::new(AtomicUsize::new(0));
    let ctx = Reader {
        inner: inner.clone(),
        queue: queue.clone(),
        levels,
        doorbell,
        permits: Arc::new(Semaphore::new(prefetch)),
        prefetch,
        releasing: releasing.clone(),
        tx,
        live: live.clone(),
    };
    let scheduler = tokio::spawn(schedule(
        inner.clone(),
        queue,
        delayed,
        live,
        ctx.tx.downgrade(),
    ));
    let reader = tokio::spawn(ctx.run());
    if let Ok(mut tasks) = inner.tasks.lock() {
        tasks.retain(|t| !t.is_finished());
        tasks.push(reader);
        tasks.push(scheduler);
    }
    Ok(
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|d| (d, rx)) })
            .boxed(),
    )
}

async fn consumer_handle(
    inner: &Inner,
    queue: &QueueInfo,
    name: &str,
) -> Result<PullConsumer, ConsumeError> {
    match inner
        .js
        .get_consumer_from_stream::<pull::Config, _, _>(name, &queue.stream)
        .await
    {
        Ok(c) => Ok(c),
        Err(e) if e.to_string().contains("not found") => {
            inner.forget_queue(&queue.name);
            Err(ConsumeError::QueueNotFound(queue.name.clone()))
        }
        Err(e) => Err(io(e)),
    }
}

/// Marks a consumer alive for [`LIVE_MAX_AGE`](crate::transport::LIVE_MAX_AGE).
async fn register(inner: &Inner, live: &str) -> Result<(), String> {
    let ack = inner
        .js
        .publish(live.to_owned(), Bytes::new())
        .await
        .map_err(|e| e.to_string())?;
    ack.await.map_err(|e| e.to_string())?;
    Ok(())
}

/// The deliveries counted before this copy was stored, from its headers.
fn header_u64(headers: Option<&HeaderMap>, name: &str) -> Option<i64> {
    headers?.get(name)?.as_str().parse().ok()
}

struct Reader {
    inner: Arc<Inner>,
    queue: Arc<QueueInfo>,
    levels: Vec<PullConsumer>,
    doorbell: Option<async_nats::Subscriber>,
    permits: Arc<Semaphore>,
    prefetch: usize,
    /// Dropped deliveries of this consumer still being returned.
    releasing: Arc<AtomicUsize>,
    tx: Sender,
    live: String,
}

/// What one pull brought.
enum Pulled {
    /// This many deliveries handed out.
    Some(usize),
    /// The consumer is stopping.
    Stop,
}

impl Reader {
    async fn run(mut self) {
        let mut close = self.inner.close_tx.subscribe();
        let mut backoff = Duration::from_millis(50);
        let mut idle = Duration::from_millis(5);
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
            let pulled = if self.levels.len() == 1 {
                self.pull(0, &mut permits, true, &mut close).await
            } else {
                self.pull_by_priority(&mut permits, &mut close).await
            };
            match pulled {
                Ok(Pulled::Stop) => break,
                Ok(Pulled::Some(n)) => {
                    backoff = Duration::from_millis(50);
                    if n == 0 && self.levels.len() > 1 {
                        // Nothing at any level: wait for a publish (or a
                        // redelivery, which rings no bell) before polling again.
                        drop(permits);
                        let rung = async {
                            match self.doorbell.as_mut() {
                                Some(bell) => {
                                    bell.next().await;
                                }
                                None => futures::future::pending::<()>().await,
                            }
                        };
                        tokio::select! {
                            _ = rung => idle = Duration::from_millis(5),
                            _ = tokio::time::sleep(idle) => idle = (idle * 2).min(Duration::from_millis(200)),
                            _ = close.changed() => break,
                            _ = self.tx.closed() => break,
                        }
                    } else {
                        idle = Duration::from_millis(5);
                    }
                }
                Err(e) => {
                    if self.inner.is_closed() {
                        break;
                    }
                    if matches!(e, ConsumeError::QueueNotFound(_)) {
                        let _ = self.tx.send(Err(e)).await;
                        break;
                    }
                    tracing::warn!(queue = %self.queue.name, error = %e, "pulling from the queue failed; retrying");
                    drop(permits);
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = close.changed() => break,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
        // Deliveries dropped with the stream are being returned: let them
        // land before this consumer stops counting as live.
        tokio::time::sleep(Duration::from_millis(10)).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while self.releasing.load(Ordering::SeqCst) > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if let Err(e) = self.inner.live.purge().filter(self.live.clone()).await {
            tracing::debug!(queue = %self.queue.name, error = %e, "unregistering the consumer failed");
        }
    }

    /// Polls the levels from the highest down without waiting; stops at the
    /// first level that had anything, so higher levels are looked at again first.
    async fn pull_by_priority(
        &mut self,
        permits: &mut Vec<OwnedSemaphorePermit>,
        close: &mut watch::Receiver<bool>,
    ) -> Result<Pulled, ConsumeError> {
        for level in (0..self.levels.len()).rev() {
            match self.pull(level, permits, false, close).await? {
                Pulled::Some(0) => continue,
                other => return Ok(other),
            }
        }
        Ok(Pulled::Some(0))
    }

    /// One pull request for as many messages as there are permits, waiting
    /// up to the block time (`wait`) or answered at once.
    async fn pull(
        &mut self,
        level: usize,
        permits: &mut Vec<OwnedSemaphorePermit>,
        wait: bool,
        close: &mut watch::Receiver<bool>,
    ) -> Result<Pulled, ConsumeError> {
        let consumer = &self.levels[level];
        let block = self.inner.config.block;
        let batch = if wait {
            consumer
                .batch()
                .max_messages(permits.len())
                .expires(block)
                .messages()
                .await
        } else {
            consumer
                .fetch()
                .max_messages(permits.len())
                .messages()
                .await
        };
        let mut batch = match batch {
            Ok(b) => b,
            Err(e) if e.to_string().contains("not found") => {
                self.inner.forget_queue(&self.queue.name);
                return Err(ConsumeError::QueueNotFound(self.queue.name.clone()));
            }
            Err(e) => return Err(io(e)),
        };
        // A request lost with the connection never ends by itself.
        let deadline = tokio::time::sleep(block + Duration::from_secs(3));
        tokio::pin!(deadline);
        let mut stopping = false;
        let mut handed = 0;
        loop {
            tokio::select! {
                m = batch.next() => match m {
                    None => break,
                    Some(Err(e)) => {
                        tracing::debug!(queue = %self.queue.name, error = %e, "pull request ended");
                        break;
                    }
                    Some(Ok(m)) => {
                        let permit = if stopping { None } else { permits.pop() };
                        let Some(permit) = permit else {
                            // Read but never handed out: back unchanged.
                            self.give_back(m, level).await;
                            continue;
                        };
                        if let Some(delivery) = self.prepare(m, level, permit).await {
                            handed += 1;
                            if let Err(mpsc::error::SendError(d)) = self.tx.send(Ok(delivery)).await {
                                drop(d);
                                stopping = true;
                            }
                        } else {
                            // Settled on the spot (dead letter): counts as progress.
                            handed += 1;
                        }
                    }
                },
                // Keep reading what the request still brings, to give it back.
                _ = close.changed(), if !stopping => stopping = true,
                _ = self.tx.closed(), if !stopping => stopping = true,
                _ = &mut deadline => break,
            }
        }
        Ok(if stopping {
            Pulled::Stop
        } else {
            Pulled::Some(handed)
        })
    }

    /// Stores a message that was pulled but not handed out again, with its
    /// attempts as they were, and acks the pulled copy.
    async fn give_back(&self, m: jetstream::Message, level: usize) {
        let delivered = m.info().map_or(1, |i| i.delivered.max(1));
        let base = header_u64(m.headers.as_ref(), names::ATTEMPTS).unwrap_or(0);
        let attempts = u32::try_from(base + delivered - 1).unwrap_or(u32::MAX);
        let Some(reply) = m.reply.clone() else { return };
        let result = self
            .inner
            .requeue(
                &self.queue,
                level,
                &reply,
                m.payload.clone(),
                attempts,
                None,
            )
            .await;
        if let Err(e) = result {
            tracing::warn!(queue = %self.queue.name, error = %e, "returning an undelivered message failed; it is redelivered after the ack wait");
        }
    }

    /// Turns a message into a delivery, or settles it on the spot if it is
    /// malformed, expired or past its attempts.
    async fn prepare(
        &self,
        m: jetstream::Message,
        level: usize,
        permit: OwnedSemaphorePermit,
    ) -> Option<Delivery> {
        let delivered = m.info().map_or(1, |i| i.delivered.max(1));
        let base = header_u64(m.headers.as_ref(), names::ATTEMPTS).unwrap_or(0);
        let attempt = u32::try_from(base + delivered).unwrap_or(u32::MAX);
        let Some(reply) = m.reply.clone() else {
            tracing::warn!(queue = %self.queue.name, "a message without a reply subject; skipped");
            return None;
        };
        let blob = m.payload.clone();
        let (message, topic) = match envelope::decode(&blob) {
            Ok(decoded) => decoded,
            Err(e) => {
                let reason = format!("malformed message: {e}");
                let message = Message::new("busway.malformed", blob);
                self.discard(&reply, message, None, &reason, attempt).await;
                return None;
            }
        };
        if message.is_expired_at(SystemTime::now()) {
            self.discard(&reply, message, topic.as_ref(), "expired", attempt - 1)
                .await;
            return None;
        }
        if let Some(max) = self.queue.spec.max_attempts {
            // Redelivered by the server after crashes past the limit.
            if attempt > max {
                let reason = format!("max attempts ({max}) exceeded");
                self.discard(&reply, message, topic.as_ref(), &reason, attempt - 1)
                    .await;
                return None;
            }
        }
        let token = self.inner.next_token.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut map) = self.inner.in_flight.lock() {
            map.insert(
                token,
                InFlight {
                    queue: self.queue.clone(),
                    level,
                    reply: reply.clone(),
                    blob: blob.clone(),
                    attempt,
                },
            );
        }
        let acker = NatsAcker {
            inner: self.inner.clone(),
            queue: self.queue.clone(),
            token,
            level,
            reply,
            blob,
            attempt,
            releasing: self.releasing.clone(),
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

    /// Dead-letters (or, without a dead-letter queue, drops) a message that
    /// cannot be delivered.
    async fn discard(
        &self,
        reply: &Subject,
        message: Message,
        topic: Option<&Topic>,
        reason: &str,
        attempts: u32,
    ) {
        let result = dead_letter(
            &self.inner,
            &self.queue,
            reply,
            message,
            topic,
            reason,
            attempts,
        )
        .await;
        if let Err(e) = result {
            tracing::warn!(queue = %self.queue.name, error = %e, %reason, "dead-lettering failed; the message is redelivered after the ack wait");
        }
    }
}

/// The scheduler beside a consumer: moves due delayed messages into their
/// level, holds back the others with a delayed `-NAK`, and keeps the
/// consumer registered.
async fn schedule(
    inner: Arc<Inner>,
    queue: Arc<QueueInfo>,
    delayed: PullConsumer,
    live: String,
    alive: mpsc::WeakSender<Result<Delivery, ConsumeError>>,
) {
    let mut close = inner.close_tx.subscribe();
    let mut next_beat = tokio::time::Instant::now() + HEARTBEAT;
    loop {
        if *close.borrow() || alive.upgrade().is_none() {
            return;
        }
        let now = tokio::time::Instant::now();
        if now >= next_beat {
            next_beat = now + HEARTBEAT;
            if let Err(e) = register(&inner, &live).await {
                tracing::debug!(queue = %queue.name, error = %e, "consumer heartbeat failed");
            }
        }
        let block = inner.config.block;
        let batch = delayed
            .batch()
            .max_messages(100)
            .expires(block)
            .messages()
            .await;
        let mut batch = match batch {
            Ok(b) => b,
            Err(e) => {
                tracing::debug!(queue = %queue.name, error = %e, "pulling delayed messages failed");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    _ = close.changed() => return,
                }
                continue;
            }
        };
        let deadline = tokio::time::sleep(block + Duration::from_secs(3));
        tokio::pin!(deadline);
        loop {
            let m = tokio::select! {
                m = batch.next() => m,
                _ = &mut deadline => None,
            };
            let Some(Ok(m)) = m else { break };
            if let Err(e) = promote(&inner, &queue, &m).await {
                tracing::debug!(queue = %queue.name, error = %e, "moving a delayed message failed; trying again shortly");
                // Back to the scheduler soon rather than after the ack wait.
                let _ = m.ack_with(AckKind::Nak(Some(RETRY_PROMOTE))).await;
            }
        }
    }
}

/// Moves a due delayed message into its level, or holds it back until due.
async fn promote(inner: &Inner, queue: &QueueInfo, m: &jetstream::Message) -> Result<(), String> {
    let due = header_u64(m.headers.as_ref(), names::DUE).unwrap_or(0);
    let now = unix_millis(SystemTime::now());
    if due > now {
        let wait = Duration::from_millis(u64::try_from(due - now).unwrap_or(0));
        return m
            .ack_with(AckKind::Nak(Some(wait)))
            .await
            .map_err(|e| e.to_string());
    }
    let level = header_u64(m.headers.as_ref(), names::LEVEL)
        .and_then(|l| usize::try_from(l).ok())
        .unwrap_or(0)
        .min(queue.levels - 1);
    let attempts = header_u64(m.headers.as_ref(), names::ATTEMPTS)
        .and_then(|a| u32::try_from(a).ok())
        .unwrap_or(0);
    let Some(reply) = m.reply.clone() else {
        return Err("delayed message without a reply subject".into());
    };
    inner
        .requeue(queue, level, &reply, m.payload.clone(), attempts, None)
        .await
        .map_err(|e| e.to_string())
}

/// A nack of a delivery of `attempt`: back to the queue (after `delay`),
/// or to the dead letters when the attempts are used up.
async fn nack(
    inner: &Inner,
    queue: &QueueInfo,
    level: usize,
    reply: &Subject,
    blob: &Bytes,
    attempt: u32,
    delay: Option<Duration>,
) -> Result<(), SettleError> {
    if let Some(max) = queue.spec.max_attempts {
        if attempt >= max {
            let (message, topic) = envelope::decode(blob)
                .unwrap_or_else(|_| (Message::new("busway.malformed", blob.clone()), None));
            let reason = format!("max attempts ({max}) exceeded");
            return dead_letter(
                inner,
                queue,
                reply,
                message,
                topic.as_ref(),
                &reason,
                attempt,
            )
            .await;
        }
    }
    inner
        .requeue(queue, level, reply, blob.clone(), attempt, delay)
        .await
}

/// Stores a message in the queue's dead-letter queue with the reason and
/// origin in its headers, then acks the delivery; without a dead-letter
/// queue, acks it (the message is dropped, with a warning).
async fn dead_letter(
    inner: &Inner,
    queue: &QueueInfo,
    reply: &Subject,
    mut message: Message,
    topic: Option<&Topic>,
    reason: &str,
    attempts: u32,
) -> Result<(), SettleError> {
    let dlq = match &queue.spec.dead_letter {
        Some(d) => inner.queue(d).await?,
        None => None,
    };
    let Some(dlq) = dlq else {
        tracing::warn!(queue = %queue.name, message_id = %message.id, %reason, "no dead-letter queue; message dropped");
        return inner.ack(reply).await;
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
    let blob = envelope::encode(&message, topic).map_err(|e| backend::<SettleError>(e, false))?;
    let mut nats_headers = HeaderMap::new();
    // The reason in a NATS header too, for tools that do not decode the body.
    let printable: String = reason
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    nats_headers.insert(names::REASON, printable.as_str());
    tracing::debug!(queue = %queue.name, dead_letter_queue = %dlq.name, message_id = %message.id, %reason, "message dead-lettered");
    inner
        .store(dlq.level_subject(0), nats_headers, blob)
        .await?;
    inner.ack(reply).await
}

/// Settles one delivery.
struct NatsAcker {
    inner: Arc<Inner>,
    queue: Arc<QueueInfo>,
    token: u64,
    level: usize,
    reply: Subject,
    blob: Bytes,
    attempt: u32,
    releasing: Arc<AtomicUsize>,
    _permit: OwnedSemaphorePermit,
}

impl NatsAcker {
    fn forget(&self) -> bool {
        self.inner
            .in_flight
            .lock()
            .map(|mut m| m.remove(&self.token).is_some())
            .unwrap_or(false)
    }

    async fn settle_now(self, settlement: Settlement) -> Result<(), SettleError> {
        if self.inner.is_closed() || !self.forget() {
            // Closed: the delivery was handed back to its queue.
            return Err(SettleError::Closed);
        }
        let inner = &self.inner;
        match settlement {
            Settlement::Ack => inner.ack(&self.reply).await,
            Settlement::Nack { retry_after } => {
                nack(
                    inner,
                    &self.queue,
                    self.level,
                    &self.reply,
                    &self.blob,
                    self.attempt,
                    retry_after,
                )
                .await
            }
            Settlement::DeadLetter { reason } => {
                if self.queue.spec.dead_letter.is_none() {
                    inner
                        .requeue(
                            &self.queue,
                            self.level,
                            &self.reply,
                            self.blob.clone(),
                            self.attempt,
                            None,
                        )
                        .await?;
                    return Err(SettleError::NoDeadLetterQueue(self.queue.name.clone()));
                }
                let (message, topic) = envelope::decode(&self.blob).unwrap_or_else(|_| {
                    (Message::new("busway.malformed", self.blob.clone()), None)
                });
                dead_letter(
                    inner,
                    &self.queue,
                    &self.reply,
                    message,
                    topic.as_ref(),
                    &reason,
                    self.attempt,
                )
                .await
            }
        }
    }
}

impl Acker for NatsAcker {
    fn settle(
        self: Box<Self>,
        settlement: Settlement,
    ) -> BoxFuture<'static, Result<(), SettleError>> {
        Box::pin(self.settle_now(settlement))
    }

    fn release(self: Box<Self>) {
        if self.inner.is_closed() || !self.forget() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // No runtime to run on: the server redelivers after the ack wait.
            return;
        };
        self.releasing.fetch_add(1, Ordering::SeqCst);
        runtime.spawn(async move {
            if let Err(e) = nack(
                &self.inner,
                &self.queue,
                self.level,
                &self.reply,
                &self.blob,
                self.attempt,
                None,
            )
            .await
            {
                tracing::warn!(queue = %self.queue.name, error = %e, "returning a dropped delivery failed; it is redelivered after the ack wait");
            }
            self.releasing.fetch_sub(1, Ordering::SeqCst);
        });
    }
}
