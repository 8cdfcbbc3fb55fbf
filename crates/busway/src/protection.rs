//! Payload protection on the bus: a [`Transport`] wrapper that protects
//! every message published through it and opens every message delivered
//! from it (see [`busway_protect`]).
//!
//! A delivery that fails to open (tampered, unknown key, bad signature,
//! replayed, expired, oversized, a compression bomb) never reaches a
//! handler: it is dead-lettered with the reason, counted in the metric
//! `busway_messages_rejected_total{reason, queue}`, and, with an audit sink,
//! recorded as rejected.

use std::sync::Arc;

use async_trait::async_trait;
use busway_core::{
    Acker, Binding, Capabilities, ConsumeError, ConsumeOptions, DeclareError, Delivery,
    DeliveryStream, Destination, DirectReplies, DirectReplyChannel, Durability, Message, Publish,
    PublishError, QueueName, QueueSpec, QueueStats, SettleError, Settlement, StatsError, Transport,
};
use busway_protect::{AuditAction, PayloadProtection, ProtectError};
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};

/// The name of the counter of deliveries refused by payload protection.
pub const REJECTED_METRIC: &str = "busway_messages_rejected_total";

/// A [`Transport`] that applies a [`PayloadProtection`] to what passes
/// through it. [`Bus::builder`](crate::Bus::builder)`(..).protect(..)` puts
/// one under a bus; it can also wrap a transport used on its own.
///
/// ```
/// use std::sync::Arc;
/// use busway::protect::{Keyring, PayloadProtection, SecretKey};
/// use busway::{ConsumeOptions, Message, Publish, QueueName, QueueSpec, Transport};
/// use busway::protection::ProtectedTransport;
/// use futures::StreamExt;
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let raw = busway::connect("memory://").await?;
/// let protection = PayloadProtection::encrypt(Keyring::new().with_key("k1", SecretKey::generate()));
/// let transport = ProtectedTransport::new(raw.clone(), Arc::new(protection));
/// let queue = QueueName::new("jobs")?;
/// transport.declare_queue(&QueueSpec::new(queue.clone())).await?;
/// transport.publish(Publish::to_queue(queue.clone(), Message::new("job", "secret"))).await?;
///
/// let delivery = transport.consume(&queue, ConsumeOptions::default()).await?.next().await.unwrap()?;
/// assert_eq!(&delivery.message().payload[..], b"secret");
/// delivery.ack().await?;
/// # Ok(())
/// # }
/// # tokio::runtime::Runtime::new().unwrap().block_on(run()).unwrap();
/// ```
pub struct ProtectedTransport {
    inner: Arc<dyn Transport>,
    protection: Arc<PayloadProtection>,
}

impl std::fmt::Debug for ProtectedTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProtectedTransport")
            .field("protection", &self.protection)
            .finish_non_exhaustive()
    }
}

impl ProtectedTransport {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn Transport>, protection: Arc<PayloadProtection>) -> Self {
        Self { inner, protection }
    }

    /// The transport underneath (which sees protected messages).
    pub fn inner(&self) -> &Arc<dyn Transport> {
        &self.inner
    }

    /// The protection.
    pub fn protection(&self) -> &Arc<PayloadProtection> {
        &self.protection
    }
}

fn publish_error(error: ProtectError) -> PublishError {
    match error {
        ProtectError::TooLarge { size, max } => PublishError::PayloadTooLarge { size, max },
        other => PublishError::InvalidMessage(format!("payload protection: {other}")),
    }
}

fn protect(protection: &PayloadProtection, publish: Publish) -> Result<Publish, PublishError> {
    let Publish {
        destination,
        message,
        delay,
    } = publish;
    let message = protection.protect(message).map_err(publish_error)?;
    if protection.is_auditing() {
        let address = match &destination {
            Destination::Topic(topic) => topic.as_str(),
            Destination::Queue(queue) => queue.as_str(),
        };
        protection.audit(AuditAction::Published, &message, address, None);
    }
    Ok(Publish {
        destination,
        message,
        delay,
    })
}

fn count_rejection(error: &ProtectError, queue: &str) {
    metrics::counter!(REJECTED_METRIC, "reason" => error.reason(), "queue" => queue.to_owned())
        .increment(1);
}

/// Opens `delivery`, or dead-letters it with the reason and returns `None`.
async fn open(protection: Arc<PayloadProtection>, delivery: Delivery) -> Option<Delivery> {
    let queue = delivery.queue().clone();
    let opened = protection.unprotect_delivery(
        delivery.message().clone(),
        queue.as_str(),
        delivery.attempt(),
    );
    match opened {
        Ok(message) => {
            if protection.is_auditing() {
                protection.audit(
                    AuditAction::Consumed,
                    delivery.message(),
                    queue.as_str(),
                    None,
                );
            }
            let attempt = delivery.attempt();
            let topic = delivery.topic().cloned();
            Some(Delivery::new(
                message,
                attempt,
                queue,
                topic,
                Box::new(Inner(delivery)),
            ))
        }
        Err(error) => {
            let reason = format!("payload protection ({}): {error}", error.reason());
            count_rejection(&error, queue.as_str());
            tracing::warn!(queue = %queue, message_id = %delivery.message().id, reason = %reason, "delivery rejected");
            if protection.is_auditing() {
                protection.audit(
                    AuditAction::Rejected,
                    delivery.message(),
                    queue.as_str(),
                    Some(&reason),
                );
            }
            crate::bus::settle_logged(
                delivery.dead_letter(reason).await,
                &queue,
                "dead-lettering a rejected delivery",
            )
            .await;
            None
        }
    }
}

/// Settles the transport's delivery on behalf of the opened one.
struct Inner(Delivery);

impl Acker for Inner {
    fn settle(
        self: Box<Self>,
        settlement: Settlement,
    ) -> BoxFuture<'static, Result<(), SettleError>> {
        self.0.settle(settlement).boxed()
    }

    fn release(self: Box<Self>) {
        drop(self.0);
    }
}

struct ProtectedChannel {
    inner: Arc<dyn DirectReplyChannel>,
    protection: Arc<PayloadProtection>,
}

#[async_trait]
impl DirectReplyChannel for ProtectedChannel {
    fn reply_to(&self) -> &str {
        self.inner.reply_to()
    }

    async fn send(&self, publish: Publish) -> Result<(), PublishError> {
        self.inner.send(protect(&self.protection, publish)?).await
    }
}

fn open_reply(protection: &PayloadProtection, message: Message) -> Option<Message> {
    match protection.unprotect(message) {
        Ok(message) => Some(message),
        Err(error) => {
            count_rejection(&error, "direct-reply");
            tracing::warn!(reason = %error, "reply rejected");
            None
        }
    }
}

#[async_trait]
impl Transport for ProtectedTransport {
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    async fn declare_queue(&self, spec: &QueueSpec) -> Result<(), DeclareError> {
        self.inner.declare_queue(spec).await
    }

    async fn declare_temporary_queue(&self, name: &QueueName) -> Result<(), DeclareError> {
        self.inner.declare_temporary_queue(name).await
    }

    async fn direct_replies(&self) -> Result<Option<DirectReplies>, ConsumeError> {
        let Some(direct) = self.inner.direct_replies().await? else {
            return Ok(None);
        };
        let protection = self.protection.clone();
        let channel = Arc::new(ProtectedChannel {
            inner: direct.channel,
            protection: protection.clone(),
        });
        let replies = direct
            .replies
            .filter_map(move |message| {
                let opened = open_reply(&protection, message);
                async move { opened }
            })
            .boxed();
        Ok(Some(DirectReplies { channel, replies }))
    }

    async fn bind(&self, binding: &Binding) -> Result<(), DeclareError> {
        self.inner.bind(binding).await
    }

    async fn publish_batch(
        &self,
        batch: Vec<Publish>,
        durability: Durability,
    ) -> Result<(), PublishError> {
        let batch = batch
            .into_iter()
            .map(|publish| protect(&self.protection, publish))
            .collect::<Result<Vec<_>, _>>()?;
        self.inner.publish_batch(batch, durability).await
    }

    async fn publish(&self, publish: Publish) -> Result<(), PublishError> {
        self.inner
            .publish(protect(&self.protection, publish)?)
            .await
    }

    async fn consume(
        &self,
        queue: &QueueName,
        options: ConsumeOptions,
    ) -> Result<DeliveryStream, ConsumeError> {
        let stream = self.inner.consume(queue, options).await?;
        let protection = self.protection.clone();
        Ok(stream
            .filter_map(move |item| {
                let protection = protection.clone();
                async move {
                    match item {
                        Ok(delivery) => open(protection, delivery).await.map(Ok),
                        Err(error) => Some(Err(error)),
                    }
                }
            })
            .boxed())
    }

    async fn queue_stats(&self, queue: &QueueName) -> Result<QueueStats, StatsError> {
        self.inner.queue_stats(queue).await
    }

    async fn list_queues(&self) -> Result<Vec<QueueName>, StatsError> {
        self.inner.list_queues().await
    }

    async fn close(&self) {
        self.inner.close().await;
    }
}
