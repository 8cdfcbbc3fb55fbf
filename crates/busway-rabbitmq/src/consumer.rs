//! Consumers: one channel each with `basic.qos` = prefetch, deliveries
//! forwarded to a stream, resubscribed after a reconnect; and the acker that
//! settles them (ack, nack by republishing with the next attempt, dead-letter).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use busway_core::{
    headers, unix_millis, Acker, ConsumeError, Delivery, DeliveryStream, Durability, Message,
    QueueName, SettleError, Settlement, Topic,
};
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::Channel;
use tokio::sync::mpsc;

use crate::connection::{short, Fail, Inner, Live, NOT_FOUND};
use crate::publish::Outgoing;
use crate::topology::{delay_tier, DelayQueue};
use crate::wire::{self, encode, Envelope};

/// A consumer's channel, shared by the consumer task and its deliveries.
/// Settlements go through one ack task per channel, which coalesces acks
/// that settle in delivery order into one `basic.ack multiple` and closes
/// the channel when the consumer and all its deliveries are gone.
pub(crate) struct ChannelGuard {
    channel: Channel,
    acks: mpsc::UnboundedSender<AckCmd>,
}

impl ChannelGuard {
    fn new(channel: Channel) -> Self {
        let (acks, rx) = mpsc::unbounded_channel();
        tokio::spawn(ack_task(channel.clone(), rx));
        Self { channel, acks }
    }

    fn connected(&self) -> bool {
        self.channel.status().connected()
    }
}

/// What the ack task is told, in order.
#[derive(Debug)]
enum AckCmd {
    /// The broker delivered this tag; it is unsettled.
    Delivered(u64),
    /// The handler settled this tag as done.
    Ack(u64),
    /// Return this tag to the queue.
    Requeue(u64),
}

/// Owns the acks of one channel. Tags acked by handlers are sent as one
/// `multiple` ack up to the highest tag below every still-unsettled tag, so
/// a message the handler has not settled is never acknowledged.
async fn ack_task(channel: Channel, mut rx: mpsc::UnboundedReceiver<AckCmd>) {
    use std::collections::BTreeSet;
    let mut outstanding: BTreeSet<u64> = BTreeSet::new();
    let mut ready: BTreeSet<u64> = BTreeSet::new();
    let mut batch = Vec::new();
    while rx.recv_many(&mut batch, 1024).await > 0 {
        for cmd in batch.drain(..) {
            match cmd {
                AckCmd::Delivered(tag) => {
                    outstanding.insert(tag);
                }
                AckCmd::Ack(tag) => {
                    if outstanding.remove(&tag) {
                        ready.insert(tag);
                    }
                }
                AckCmd::Requeue(tag) => {
                    if outstanding.remove(&tag) {
                        // Acks below it go first, one at a time: a `multiple`
                        // ack must not cover the tag being returned.
                        for t in std::mem::take(&mut ready) {
                            if t < tag {
                                let _ = channel.basic_ack(t, BasicAckOptions::default()).await;
                            } else {
                                ready.insert(t);
                            }
                        }
                        let _ = channel
                            .basic_nack(
                                tag,
                                BasicNackOptions {
                                    requeue: true,
                                    multiple: false,
                                },
                            )
                            .await;
                    }
                }
            }
        }
        // Everything ready below the lowest unsettled tag goes in one frame.
        let limit = outstanding.first().copied().unwrap_or(u64::MAX);
        let upto = ready.range(..limit).next_back().copied();
        if let Some(upto) = upto {
            let rest = ready.split_off(&(upto + 1));
            let single = ready.len() == 1;
            ready = rest;
            let _ = channel
                .basic_ack(upto, BasicAckOptions { multiple: !single })
                .await;
        }
    }
    // The consumer and every delivery are gone: send what is left one by one
    // (out-of-order acks), then close; the broker requeues anything unsettled.
    for t in ready {
        let _ = channel.basic_ack(t, BasicAckOptions::default()).await;
    }
    if channel.status().connected() {
        let _ = channel.close(200, "consumer done".into()).await;
    }
}

fn consume_error(f: Fail) -> ConsumeError {
    match f {
        Fail::Closed => ConsumeError::Closed,
        f => ConsumeError::Backend {
            retryable: f.retryable(),
            source: f.into_source(),
        },
    }
}

struct Subscription {
    guard: Arc<ChannelGuard>,
    consumer: lapin::Consumer,
    tag: ShortString,
}

async fn subscribe(
    live: &Live,
    queue: &QueueName,
    prefetch: u16,
) -> Result<Subscription, lapin::Error> {
    let ch = live.connection.create_channel().await?;
    let guard = Arc::new(ChannelGuard::new(ch.clone()));
    ch.basic_qos(prefetch, BasicQosOptions::default()).await?;
    let tag = short(&format!("busway-{}", uuid::Uuid::new_v4().simple()))?;
    let consumer = ch
        .basic_consume(
            short(queue.as_str())?,
            tag.clone(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok(Subscription {
        guard,
        consumer,
        tag,
    })
}

/// Starts a consumer on `queue`.
pub(crate) async fn start(
    inner: Arc<Inner>,
    queue: QueueName,
    prefetch: u16,
) -> Result<DeliveryStream, ConsumeError> {
    if prefetch == 0 {
        return Err(ConsumeError::InvalidOptions(
            "prefetch must be at least 1".into(),
        ));
    }
    let live = inner.live().await.map_err(consume_error)?;
    let sub = match subscribe(&live, &queue, prefetch).await {
        Ok(s) => s,
        Err(e) if crate::connection::reply_code(&e) == Some(NOT_FOUND) => {
            return Err(ConsumeError::QueueNotFound(queue))
        }
        Err(e) => return Err(consume_error(e.into())),
    };
    let (tx, rx) = mpsc::channel(usize::from(prefetch));
    tokio::spawn(run(inner, queue, prefetch, sub, tx));
    Ok(
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|d| (d, rx)) })
            .boxed(),
    )
}

async fn wait_closed(rx: &mut tokio::sync::watch::Receiver<bool>) {
    loop {
        if *rx.borrow() {
            return;
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

type Tx = mpsc::Sender<Result<Delivery, ConsumeError>>;

async fn run(inner: Arc<Inner>, queue: QueueName, prefetch: u16, mut sub: Subscription, tx: Tx) {
    let mut closed = inner.closed_signal();
    loop {
        loop {
            let item = tokio::select! {
                _ = tx.closed() => {
                    // The stream was dropped: stop receiving; deliveries still
                    // held keep the channel open until they are settled.
                    stop(&mut sub).await;
                    return;
                }
                _ = wait_closed(&mut closed) => return,
                item = sub.consumer.next() => item,
            };
            match item {
                Some(Ok(d)) => {
                    if let Some(delivery) = admit(&inner, &queue, &sub.guard, d).await {
                        if tx.send(Ok(delivery)).await.is_err() {
                            stop(&mut sub).await;
                            return;
                        }
                    }
                }
                Some(Err(e)) => {
                    tracing::debug!(queue = %queue, error = %e, "consumer interrupted");
                    break;
                }
                None => break,
            }
        }
        // The channel or connection went away: subscribe again once the
        // connection is back (the topology is replayed by the reconnect).
        loop {
            if inner.is_closed() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            let live = match inner.live().await {
                Ok(l) => l,
                Err(Fail::Closed) => return,
                Err(e) => {
                    tracing::warn!(queue = %queue, error = ?e, "still waiting for the broker");
                    continue;
                }
            };
            match subscribe(&live, &queue, prefetch).await {
                Ok(s) => {
                    sub = s;
                    break;
                }
                Err(e) if crate::connection::reply_code(&e) == Some(NOT_FOUND) => {
                    let _ = tx
                        .send(Err(ConsumeError::QueueNotFound(queue.clone())))
                        .await;
                    return;
                }
                Err(e) => tracing::warn!(queue = %queue, error = %e, "resubscribing failed"),
            }
        }
    }
}

/// Cancels the consumer and returns what the broker had already sent but
/// the stream never yielded; deliveries still held stay valid.
async fn stop(sub: &mut Subscription) {
    let _ = sub
        .guard
        .channel
        .basic_cancel(sub.tag.clone(), BasicCancelOptions::default())
        .await;
    let drain = async {
        while let Some(Ok(d)) = sub.consumer.next().await {
            let _ = sub.guard.acks.send(AckCmd::Delivered(d.delivery_tag));
            let _ = sub.guard.acks.send(AckCmd::Requeue(d.delivery_tag));
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), drain).await;
}

/// Turns a broker delivery into a busway one, or settles it here when it
/// must not reach the handler (expired, or past its attempt limit).
async fn admit(
    inner: &Arc<Inner>,
    queue: &QueueName,
    guard: &Arc<ChannelGuard>,
    d: lapin::message::Delivery,
) -> Option<Delivery> {
    let decoded = wire::decode(
        &d.properties,
        Bytes::from(d.data),
        d.exchange.as_str(),
        d.routing_key.as_str(),
        &inner.config.topic_exchange,
    );
    let attempt = decoded
        .prior_attempts
        .saturating_add(1)
        .saturating_add(u32::from(d.redelivered));
    let counter = inner.in_flight(queue);
    counter.fetch_add(1, Ordering::SeqCst);
    let tag = d.delivery_tag;
    let _ = guard.acks.send(AckCmd::Delivered(tag));
    let acker = RabbitAcker {
        inner: inner.clone(),
        guard: guard.clone(),
        tag,
        queue: queue.clone(),
        topic: decoded.topic.clone(),
        message: decoded.message.clone(),
        attempt,
        counter,
    };
    let spec = inner.spec_for(queue);
    let delivery = Delivery::new(
        decoded.message,
        attempt,
        queue.clone(),
        decoded.topic,
        Box::new(acker),
    );
    // A dead letter is kept whatever its age; a queue without a dead-letter
    // queue delivers what it has.
    let dead_letter_possible = spec.dead_letter.is_some()
        && delivery
            .message()
            .headers
            .get(headers::DEAD_LETTER_REASON)
            .is_none();
    let reason = if !dead_letter_possible {
        None
    } else if delivery.message().is_expired_at(SystemTime::now()) {
        Some("expired".to_owned())
    } else {
        spec.max_attempts
            .filter(|max| attempt > *max)
            .map(|max| format!("max attempts ({max}) exceeded"))
    };
    match reason {
        None => Some(delivery),
        Some(reason) => {
            if let Err(e) = delivery.dead_letter(reason).await {
                tracing::warn!(queue = %queue, error = %e, "dead-lettering on arrival failed");
            }
            None
        }
    }
}

/// Settles one RabbitMQ delivery.
struct RabbitAcker {
    inner: Arc<Inner>,
    guard: Arc<ChannelGuard>,
    tag: u64,
    queue: QueueName,
    topic: Option<Topic>,
    message: Message,
    attempt: u32,
    counter: Arc<AtomicU64>,
}

fn settle_error(f: Fail) -> SettleError {
    match f {
        Fail::Closed => SettleError::Closed,
        f => SettleError::Backend {
            retryable: f.retryable(),
            source: f.into_source(),
        },
    }
}

impl RabbitAcker {
    fn done(&self) {
        let _ = self
            .counter
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
    }

    async fn ack(&self) -> Result<(), SettleError> {
        if self.inner.is_closed() {
            return Err(SettleError::Closed);
        }
        if !self.guard.connected() {
            return Err(SettleError::LeaseLost);
        }
        self.guard
            .acks
            .send(AckCmd::Ack(self.tag))
            .map_err(|_| SettleError::LeaseLost)
    }

    /// Returns the message to the queue as it is (the broker marks it redelivered).
    fn requeue(&self) {
        let _ = self.guard.acks.send(AckCmd::Requeue(self.tag));
    }

    async fn settle(self, settlement: Settlement) -> Result<(), SettleError> {
        let limit = self.inner.config.operation_timeout;
        let result = tokio::time::timeout(limit, self.settle_inner(settlement))
            .await
            .unwrap_or_else(|_| {
                // Unsettled on the broker: it comes back once the channel goes.
                Err(SettleError::Backend {
                    source: format!(
                        "RabbitMQ at {} did not answer within {limit:?}",
                        self.inner.location
                    )
                    .into(),
                    retryable: true,
                })
            });
        self.done();
        result
    }

    async fn settle_inner(&self, settlement: Settlement) -> Result<(), SettleError> {
        match settlement {
            Settlement::Ack => self.ack().await,
            Settlement::Nack { retry_after } => {
                let spec = self.inner.spec_for(&self.queue);
                if let Some(max) = spec.max_attempts.filter(|max| self.attempt >= *max) {
                    return self
                        .dead_letter(format!("max attempts ({max}) exceeded"))
                        .await;
                }
                self.retry(retry_after.filter(|d| !d.is_zero())).await
            }
            Settlement::DeadLetter { reason } => self.dead_letter(reason).await,
        }
    }

    fn preflight(&self) -> Result<(), SettleError> {
        if self.inner.is_closed() {
            return Err(SettleError::Closed);
        }
        if !self.guard.connected() {
            return Err(SettleError::LeaseLost);
        }
        Ok(())
    }

    /// Publishes the message's replacement (a retry or a dead letter), and
    /// only once the broker confirmed it acks the original: a failure leaves
    /// the original in the queue, so the message is never lost.
    async fn republish_then_ack(&self, outgoing: Outgoing) -> Result<(), SettleError> {
        if let Err(e) = self.inner.send(vec![outgoing], Durability::Durable).await {
            self.requeue();
            return Err(SettleError::Backend {
                source: Box::new(e),
                retryable: true,
            });
        }
        self.ack().await
    }

    /// Republishes with the attempt count (through a delay queue when
    /// `delay` is set), then acks the original: the message is never lost.
    async fn retry(&self, delay: Option<Duration>) -> Result<(), SettleError> {
        self.preflight()?;
        let live = self.inner.live().await.map_err(settle_error)?;
        let topic = self.topic.as_ref().map(Topic::as_str);
        let (routing_key, broker_expiry) = match delay {
            None => (self.queue.as_str().to_owned(), true),
            Some(d) => {
                let dq = DelayQueue::for_queue(&self.queue, delay_tier(d));
                let name = dq.name.clone();
                self.inner
                    .ensure_delay(&live, dq, Some(&self.queue))
                    .await
                    .map_err(|e| settle_error(e.into()))?;
                (name, false)
            }
        };
        let properties = encode(
            &self.message,
            &Envelope {
                attempts: self.attempt,
                topic,
                broker_expiry,
            },
        )
        .map_err(|e| SettleError::Backend {
            source: Box::new(e),
            retryable: false,
        })?;
        let outgoing = Outgoing {
            exchange: ShortString::default(),
            routing_key: short(&routing_key).map_err(|e| settle_error(e.into()))?,
            mandatory: true,
            payload: self.message.payload.clone(),
            properties,
            queue: Some(self.queue.clone()),
        };
        self.republish_then_ack(outgoing).await
    }

    /// Publishes to the dead-letter queue with the reason and origin, then
    /// acks the original.
    async fn dead_letter(&self, reason: String) -> Result<(), SettleError> {
        self.preflight()?;
        let spec = self.inner.spec_for(&self.queue);
        let Some(dlq) = spec.dead_letter.clone() else {
            self.requeue();
            return Err(SettleError::NoDeadLetterQueue(self.queue.clone()));
        };
        let live = self.inner.live().await.map_err(settle_error)?;
        if self.inner.registered(&dlq).is_none() {
            // A queue declared elsewhere (by a reference service): make sure
            // its dead-letter queue exists before routing to it.
            self.inner
                .declare_dead_letter_queue(&live.connection, &dlq)
                .await
                .map_err(|e| settle_error(e.into()))?;
        }
        let mut message = self.message.clone();
        message.headers.insert(headers::DEAD_LETTER_REASON, reason);
        message
            .headers
            .insert(headers::ORIGINAL_QUEUE, self.queue.as_str());
        if let Some(t) = &self.topic {
            message.headers.insert(headers::ORIGINAL_TOPIC, t.as_str());
        }
        message
            .headers
            .insert(headers::ATTEMPTS, self.attempt.to_string());
        message.headers.insert(
            headers::DEAD_LETTERED_AT,
            unix_millis(SystemTime::now()).to_string(),
        );
        message.expires_at = None;
        let properties = encode(
            &message,
            &Envelope {
                attempts: self.attempt,
                topic: None,
                broker_expiry: false,
            },
        )
        .map_err(|e| SettleError::Backend {
            source: Box::new(e),
            retryable: false,
        })?;
        let outgoing = Outgoing {
            exchange: short(&self.inner.config.dead_letter_exchange)
                .map_err(|e| settle_error(e.into()))?,
            routing_key: short(dlq.as_str()).map_err(|e| settle_error(e.into()))?,
            mandatory: true,
            payload: message.payload.clone(),
            properties,
            queue: Some(dlq),
        };
        self.republish_then_ack(outgoing).await
    }
}

impl Acker for RabbitAcker {
    fn settle(
        self: Box<Self>,
        settlement: Settlement,
    ) -> BoxFuture<'static, Result<(), SettleError>> {
        Box::pin(async move { (*self).settle(settlement).await })
    }

    fn release(self: Box<Self>) {
        self.done();
        self.requeue();
    }
}
