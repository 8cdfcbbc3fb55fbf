//! Direct reply-to: requests published on a channel that consumes the
//! pseudo-queue `amq.rabbitmq.reply-to` (without acks, as RabbitMQ
//! requires) get their replies on that channel, with no reply queue to
//! declare, bind or delete.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use busway_core::{
    ConsumeError, DirectReplies, DirectReplyChannel, Message, Publish, PublishError,
};
use bytes::Bytes;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use lapin::Channel;
use lapin::{Confirmation, PublisherConfirm};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::connection::{lock, short, Fail, Inner};
use crate::publish::{check, publish_error, SendFail};
use crate::wire;

/// The pseudo-queue a client consumes, and the `reply_to` its requests carry.
pub(crate) const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// The channel requests go out on and replies come back on; opened again
/// on the next send after it was lost.
pub(crate) struct RabbitDirectReply {
    inner: Arc<Inner>,
    channel: Mutex<Option<Channel>>,
    reopening: tokio::sync::Mutex<()>,
    replies: mpsc::UnboundedSender<Message>,
    /// Every request's confirm, awaited to the end by one task (see
    /// [`await_confirms`]) and passed on to its sender if still waiting.
    confirms: mpsc::UnboundedSender<(
        PublisherConfirm,
        oneshot::Sender<lapin::Result<Confirmation>>,
    )>,
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

/// Opens the direct reply channel of a transport.
pub(crate) async fn open(inner: Arc<Inner>) -> Result<DirectReplies, ConsumeError> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (confirms, pending) = mpsc::unbounded_channel();
    tokio::spawn(await_confirms(pending));
    let direct = Arc::new(RabbitDirectReply {
        inner,
        channel: Mutex::new(None),
        reopening: tokio::sync::Mutex::new(()),
        replies: tx,
        confirms,
    });
    direct.channel().await.map_err(consume_error)?;
    let replies = futures::stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed();
    Ok(DirectReplies {
        channel: direct,
        replies,
    })
}

/// Awaits each request's confirm and hands it to the request's sender,
/// which may be gone: a call whose reply came first stops waiting for its
/// confirm. A confirm dropped while pending would be kept by lapin for
/// `wait_for_confirms` (never called here) for the channel's lifetime, and
/// waking every call for its confirm costs more than one task taking them
/// all. Ends when the direct reply channel is dropped and every confirm
/// has settled (a lost channel settles its confirms with an error).
async fn await_confirms(
    mut pending: mpsc::UnboundedReceiver<(
        PublisherConfirm,
        oneshot::Sender<lapin::Result<Confirmation>>,
    )>,
) {
    let mut waiting = FuturesUnordered::new();
    loop {
        tokio::select! {
            next = pending.recv() => match next {
                Some((confirm, tx)) => waiting.push(async move {
                    let _ = tx.send(confirm.await);
                }),
                None => break,
            },
            Some(()) = waiting.next(), if !waiting.is_empty() => {}
        }
    }
    while waiting.next().await.is_some() {}
}

impl RabbitDirectReply {
    /// The open channel, or a new one consuming the replies.
    async fn channel(&self) -> Result<Channel, Fail> {
        if let Some(ch) = self.open_channel() {
            return Ok(ch);
        }
        let _reopening = self.reopening.lock().await;
        if let Some(ch) = self.open_channel() {
            return Ok(ch);
        }
        let live = self.inner.live().await?;
        let ch = live.connection.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        let tag = short(&format!("busway-replies-{}", uuid::Uuid::new_v4().simple()))?;
        let consumer = ch
            .basic_consume(
                DIRECT_REPLY_TO.into(),
                tag,
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        // Each reply is decoded and handed on where lapin reads it, with no
        // task between the socket and the caller's stream.
        let (tx, inner) = (self.replies.clone(), self.inner.clone());
        let ended = Arc::new(tokio::sync::Notify::new());
        let ending = ended.clone();
        consumer.set_delegate(move |item: lapin::message::DeliveryResult| {
            let Ok(Some(d)) = item else {
                // Cancelled or failed: the next send opens a new channel.
                ending.notify_one();
                return std::future::ready(());
            };
            let decoded = wire::decode(
                &d.properties,
                Bytes::from(d.data),
                d.exchange.as_str(),
                d.routing_key.as_str(),
                &inner.config.topic_exchange,
            );
            // A send fails only once the caller's stream is gone; the
            // watcher below then closes the channel.
            let _ = tx.send(decoded.message);
            std::future::ready(())
        });
        // Holds the consumer (dropping it cancels it) until it ends, or the
        // caller's stream or the transport is gone, then closes the channel.
        let (tx, inner, watched) = (self.replies.clone(), self.inner.clone(), ch.clone());
        tokio::spawn(async move {
            let _consumer = consumer;
            let mut closed = inner.closed_signal();
            tokio::select! {
                _ = tx.closed() => {}
                _ = closed.wait_for(|c| *c) => {}
                _ = ended.notified() => {}
            }
            if watched.status().connected() {
                let _ = watched.close(200, "replies done".into()).await;
            }
        });
        *lock(&self.channel) = Some(ch.clone());
        Ok(ch)
    }

    fn open_channel(&self) -> Option<Channel> {
        lock(&self.channel)
            .as_ref()
            .filter(|c| c.status().connected())
            .cloned()
    }
}

#[async_trait]
impl DirectReplyChannel for RabbitDirectReply {
    fn reply_to(&self) -> &str {
        DIRECT_REPLY_TO
    }

    async fn send(&self, publish: Publish) -> Result<(), PublishError> {
        let limit = self.inner.config.operation_timeout;
        tokio::time::timeout(limit, self.send_now(publish))
            .await
            .unwrap_or_else(|_| {
                Err(publish_error(Fail::Unavailable(
                    format!(
                        "RabbitMQ at {} did not answer within {limit:?}",
                        self.inner.location
                    )
                    .into(),
                )))
            })
    }
}

impl RabbitDirectReply {
    async fn send_now(&self, publish: Publish) -> Result<(), PublishError> {
        publish.check_payload(self.inner.config.max_payload_bytes)?;
        if self.inner.is_closed() {
            return Err(PublishError::Closed);
        }
        let live = self.inner.live().await.map_err(publish_error)?;
        let outgoing = self.inner.prepare(&live, publish).await?;
        drop(live);
        let deadline = Instant::now() + self.inner.config.reconnect_timeout;
        loop {
            let ch = self.channel().await.map_err(publish_error)?;
            let sent = async {
                let confirm = ch
                    .basic_publish(
                        outgoing.exchange.clone(),
                        outgoing.routing_key.clone(),
                        BasicPublishOptions {
                            mandatory: outgoing.mandatory,
                            ..Default::default()
                        },
                        &outgoing.payload,
                        outgoing.properties.clone(),
                    )
                    .await
                    .map_err(SendFail::classify)?;
                let (tx, rx) = oneshot::channel();
                let confirmation = match self.confirms.send((confirm, tx)) {
                    Ok(()) => rx
                        .await
                        .map_err(|_| SendFail::Final(PublishError::Closed))?,
                    // Not reached while `self` lives; awaited here if it is.
                    Err(mpsc::error::SendError((confirm, _))) => confirm.await,
                };
                check(confirmation, outgoing.queue.as_ref(), None)
            };
            match sent.await {
                Ok(()) => return Ok(()),
                Err(SendFail::Final(e)) => return Err(e),
                Err(SendFail::Connection(e)) => {
                    if self.inner.is_closed() {
                        return Err(PublishError::Closed);
                    }
                    if Instant::now() >= deadline {
                        return Err(publish_error(Fail::Unavailable(Box::new(e))));
                    }
                    tracing::debug!(error = %e, "request interrupted; sending again on a new channel");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}
