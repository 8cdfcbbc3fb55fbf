//! Publishing with pipelined publisher confirms.

use std::time::Duration;

use busway_core::{Destination, Durability, Publish, PublishError, QueueName};
use bytes::Bytes;
use lapin::options::BasicPublishOptions;
use lapin::types::ShortString;
use lapin::{BasicProperties, Confirmation};
use tokio::time::Instant;

use crate::connection::{reply_code, Fail, Inner, Live, NOT_FOUND, NO_ROUTE};
use crate::topology::{delay_tier, DelayQueue};
use crate::wire::{encode, short, Envelope};

/// One AMQP publish.
pub(crate) struct Outgoing {
    pub(crate) exchange: ShortString,
    pub(crate) routing_key: ShortString,
    pub(crate) mandatory: bool,
    pub(crate) payload: Bytes,
    pub(crate) properties: BasicProperties,
    /// The queue the message is meant for, to name it in errors.
    pub(crate) queue: Option<QueueName>,
}

/// Whether `queue` is a reply address RabbitMQ generated for a direct
/// reply-to caller (`amq.rabbitmq.reply-to.…`).
pub(crate) fn is_direct_reply_address(queue: &str) -> bool {
    queue.starts_with("amq.rabbitmq.reply-to.")
}

/// Maps an internal failure to a publish error.
pub(crate) fn publish_error(f: Fail) -> PublishError {
    match f {
        Fail::Closed => PublishError::Closed,
        f => PublishError::Backend {
            retryable: f.retryable(),
            source: f.into_source(),
        },
    }
}

impl Inner {
    /// Turns a `Publish` into what goes on the wire, declaring the delay
    /// queue it needs.
    pub(crate) async fn prepare(&self, live: &Live, p: Publish) -> Result<Outgoing, PublishError> {
        let delay = p.delay.filter(|d| !d.is_zero());
        match (p.destination, delay) {
            (Destination::Queue(q), None) => Ok(Outgoing {
                exchange: ShortString::default(),
                routing_key: short("queue name", q.as_str())?,
                // The broker counts a direct reply as routed to no queue.
                mandatory: !is_direct_reply_address(q.as_str()),
                properties: encode(
                    &p.message,
                    &Envelope {
                        broker_expiry: true,
                        ..Envelope::default()
                    },
                )?,
                payload: p.message.payload,
                queue: Some(q),
            }),
            (Destination::Queue(q), Some(d)) => {
                if self.registered(&q).is_none() {
                    // The broker would drop a due message for a missing queue: check now.
                    match self.passive(&live.connection, q.as_str()).await {
                        Ok(Some(_)) => {}
                        Ok(None) => return Err(PublishError::QueueNotFound(q)),
                        Err(e) => return Err(publish_error(e.into())),
                    }
                }
                let dq = DelayQueue::for_queue(&q, delay_tier(d));
                let routing_key = short("delay queue name", &dq.name)?;
                self.ensure_delay(live, dq, Some(&q))
                    .await
                    .map_err(|e| publish_error(e.into()))?;
                Ok(Outgoing {
                    exchange: ShortString::default(),
                    routing_key,
                    mandatory: true,
                    properties: encode(&p.message, &Envelope::default())?,
                    payload: p.message.payload,
                    queue: Some(q),
                })
            }
            (Destination::Topic(t), None) => Ok(Outgoing {
                exchange: short("topic exchange", &self.config.topic_exchange)?,
                routing_key: short("topic", t.as_str())?,
                mandatory: false,
                properties: encode(
                    &p.message,
                    &Envelope {
                        broker_expiry: true,
                        ..Envelope::default()
                    },
                )?,
                payload: p.message.payload,
                queue: None,
            }),
            (Destination::Topic(t), Some(d)) => {
                let dq =
                    DelayQueue::for_topic(&self.config.topic_exchange, t.as_str(), delay_tier(d));
                let routing_key = short("delay queue name", &dq.name)?;
                self.ensure_delay(live, dq, None)
                    .await
                    .map_err(|e| publish_error(e.into()))?;
                Ok(Outgoing {
                    exchange: ShortString::default(),
                    routing_key,
                    mandatory: true,
                    properties: encode(
                        &p.message,
                        &Envelope {
                            topic: Some(t.as_str()),
                            ..Envelope::default()
                        },
                    )?,
                    payload: p.message.payload,
                    queue: None,
                })
            }
        }
    }

    /// Publishes a batch: checks sizes, then sends everything on one channel
    /// (so the batch keeps its order) with confirms in flight together.
    pub(crate) async fn publish_batch(
        &self,
        batch: Vec<Publish>,
        durability: Durability,
    ) -> Result<(), PublishError> {
        for p in &batch {
            p.check_payload(self.config.max_payload_bytes)?;
        }
        if self.is_closed() {
            return Err(PublishError::Closed);
        }
        if batch.is_empty() {
            return Ok(());
        }
        let live = self.live().await.map_err(publish_error)?;
        let mut outgoing = Vec::with_capacity(batch.len());
        for p in batch {
            outgoing.push(self.prepare(&live, p).await?);
        }
        self.send(outgoing, durability).await
    }

    /// Sends prepared messages, retrying the whole batch on a new connection
    /// if the connection is lost before every confirm arrived (at least once:
    /// a message is never reported sent unless the broker confirmed it).
    pub(crate) async fn send(
        &self,
        outgoing: Vec<Outgoing>,
        durability: Durability,
    ) -> Result<(), PublishError> {
        let deadline = Instant::now() + self.config.reconnect_timeout;
        loop {
            let live = self.live().await.map_err(publish_error)?;
            match self.send_once(&live, &outgoing, durability).await {
                Ok(()) => return Ok(()),
                Err(SendFail::Final(e)) => return Err(e),
                Err(SendFail::Connection(e)) => {
                    if self.is_closed() {
                        return Err(PublishError::Closed);
                    }
                    if Instant::now() >= deadline {
                        return Err(publish_error(Fail::Unavailable(Box::new(e))));
                    }
                    tracing::debug!(error = %e, "publish interrupted; retrying on a new connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    async fn send_once(
        &self,
        live: &Live,
        outgoing: &[Outgoing],
        durability: Durability,
    ) -> Result<(), SendFail> {
        if durability == Durability::Buffered
            && live.direct_replies.status().connected()
            && outgoing.iter().all(|o| {
                o.exchange.as_str().is_empty() && is_direct_reply_address(o.routing_key.as_str())
            })
        {
            // Replies to direct reply-to callers: nothing to confirm.
            for o in outgoing {
                live.direct_replies
                    .basic_publish(
                        o.exchange.clone(),
                        o.routing_key.clone(),
                        BasicPublishOptions::default(),
                        &o.payload,
                        o.properties.clone(),
                    )
                    .await
                    .map_err(SendFail::classify)?;
            }
            return Ok(());
        }
        let channel = live.publisher().ok_or_else(|| {
            SendFail::Connection(crate::connection::lapin_other(
                "no open publisher channel".into(),
            ))
        })?;
        let mut confirms = Vec::with_capacity(outgoing.len());
        for o in outgoing {
            let confirm = channel
                .basic_publish(
                    o.exchange.clone(),
                    o.routing_key.clone(),
                    BasicPublishOptions {
                        mandatory: o.mandatory,
                        ..Default::default()
                    },
                    &o.payload,
                    o.properties.clone(),
                )
                .await
                .map_err(SendFail::classify)?;
            confirms.push(confirm);
        }
        if durability == Durability::Buffered {
            let queues: Vec<Option<QueueName>> = outgoing.iter().map(|o| o.queue.clone()).collect();
            tokio::spawn(async move {
                for (c, q) in confirms.into_iter().zip(queues) {
                    if let Err(e) = check(c.await, q.as_ref(), None) {
                        tracing::warn!(error = %e, "buffered publish was not confirmed");
                    }
                }
            });
            return Ok(());
        }
        let mut first_error = None;
        for (c, o) in confirms.into_iter().zip(outgoing) {
            let confirmation = c.await;
            // Only a negative confirm needs the queue's length limit.
            let max_length = match &confirmation {
                Ok(Confirmation::Nack(None)) => o
                    .queue
                    .as_ref()
                    .and_then(|q| self.registered(q))
                    .and_then(|s| s.max_length),
                _ => None,
            };
            if let Err(e) = check(confirmation, o.queue.as_ref(), max_length) {
                first_error.get_or_insert(e);
            }
        }
        match first_error {
            None => Ok(()),
            Some(e) => Err(e),
        }
    }
}

/// Why a send failed.
pub(crate) enum SendFail {
    /// The connection or channel went away: retry on a new one.
    Connection(lapin::Error),
    /// The broker answered: report it.
    Final(PublishError),
}

impl std::fmt::Display for SendFail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendFail::Connection(e) => write!(f, "connection lost: {e}"),
            SendFail::Final(e) => write!(f, "{e}"),
        }
    }
}

impl SendFail {
    pub(crate) fn classify(e: lapin::Error) -> Self {
        if e.is_amqp_soft_error() {
            SendFail::Final(PublishError::Backend {
                source: Box::new(e),
                retryable: false,
            })
        } else {
            SendFail::Connection(e)
        }
    }
}

/// Maps a publisher confirm (and a returned message) to the outcome of a publish.
pub(crate) fn check(
    confirmation: lapin::Result<Confirmation>,
    queue: Option<&QueueName>,
    max_length: Option<u64>,
) -> Result<(), SendFail> {
    match confirmation {
        Ok(Confirmation::Ack(None)) | Ok(Confirmation::NotRequested) => Ok(()),
        Ok(Confirmation::Ack(Some(returned))) | Ok(Confirmation::Nack(Some(returned))) => {
            Err(SendFail::Final(match queue {
                Some(q) if returned.reply_code == NO_ROUTE => {
                    PublishError::QueueNotFound(q.clone())
                }
                _ => PublishError::Backend {
                    source: format!(
                        "the broker returned the message: {} {}",
                        returned.reply_code, returned.reply_text
                    )
                    .into(),
                    retryable: false,
                },
            }))
        }
        Ok(Confirmation::Nack(None)) => Err(SendFail::Final(match (queue, max_length) {
            (Some(q), Some(max)) => PublishError::QueueFull {
                queue: q.clone(),
                max_length: max,
            },
            _ => PublishError::Backend {
                source: "the broker refused the message (negative confirm)".into(),
                retryable: true,
            },
        })),
        Err(e) if reply_code(&e) == Some(NOT_FOUND) => Err(SendFail::Final(match queue {
            Some(q) => PublishError::QueueNotFound(q.clone()),
            None => PublishError::Backend {
                source: Box::new(e),
                retryable: false,
            },
        })),
        Err(e) => Err(SendFail::classify(e)),
    }
}
