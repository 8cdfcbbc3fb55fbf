//! A received message and the handle that settles it.

use std::fmt;
use std::time::Duration;

use futures::future::BoxFuture;

use crate::address::{QueueName, Topic};
use crate::error::SettleError;
use crate::message::Message;

/// How a delivery was settled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Settlement {
    /// Processed: remove the message.
    Ack,
    /// Not processed: deliver again, after `retry_after` if given. Counts as an
    /// attempt; past the queue's max attempts the message is dead-lettered.
    Nack {
        /// How long to wait before the redelivery.
        retry_after: Option<Duration>,
    },
    /// Never deliverable: move to the dead-letter queue with this reason.
    DeadLetter {
        /// Why, recorded in the dead letter's headers.
        reason: String,
    },
}

/// The backend side of a delivery: settles it, or returns it to the queue
/// when the [`Delivery`] is dropped unsettled.
pub trait Acker: Send + Sync + 'static {
    /// Settles the delivery. Resolves once the backend has recorded the outcome.
    fn settle(
        self: Box<Self>,
        settlement: Settlement,
    ) -> BoxFuture<'static, Result<(), SettleError>>;
    /// Called when the delivery is dropped without being settled: make it
    /// available for redelivery (without blocking).
    fn release(self: Box<Self>);
}

/// A message delivered from a queue. Settle it exactly once with
/// [`ack`](Self::ack), [`nack`](Self::nack) or [`dead_letter`](Self::dead_letter);
/// each consumes the delivery, so settling twice does not compile. Dropping it
/// unsettled returns the message to the queue for redelivery.
pub struct Delivery {
    message: Message,
    attempt: u32,
    queue: QueueName,
    topic: Option<Topic>,
    acker: Option<Box<dyn Acker>>,
}

impl Delivery {
    /// Assembles a delivery (for backends).
    pub fn new(
        message: Message,
        attempt: u32,
        queue: QueueName,
        topic: Option<Topic>,
        acker: Box<dyn Acker>,
    ) -> Self {
        Self {
            message,
            attempt,
            queue,
            topic,
            acker: Some(acker),
        }
    }

    /// The message.
    pub fn message(&self) -> &Message {
        &self.message
    }
    /// Which delivery of this message this is: 1 on the first.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }
    /// The queue it was delivered from.
    pub fn queue(&self) -> &QueueName {
        &self.queue
    }
    /// The topic it was published to, if it was published to a topic.
    pub fn topic(&self) -> Option<&Topic> {
        self.topic.as_ref()
    }

    /// Acknowledges: the message is done and removed.
    pub async fn ack(self) -> Result<(), SettleError> {
        self.settle(Settlement::Ack).await
    }
    /// Returns the message for redelivery, after `retry_after` if given.
    pub async fn nack(self, retry_after: Option<Duration>) -> Result<(), SettleError> {
        self.settle(Settlement::Nack { retry_after }).await
    }
    /// Moves the message to the queue's dead-letter queue with `reason`.
    pub async fn dead_letter(self, reason: impl Into<String>) -> Result<(), SettleError> {
        self.settle(Settlement::DeadLetter {
            reason: reason.into(),
        })
        .await
    }

    /// Settles with an explicit [`Settlement`].
    pub async fn settle(mut self, settlement: Settlement) -> Result<(), SettleError> {
        match self.acker.take() {
            Some(acker) => acker.settle(settlement).await,
            // Unreachable: the acker is only taken here, and this consumes self.
            None => Err(SettleError::Closed),
        }
    }
}

impl Drop for Delivery {
    fn drop(&mut self) {
        if let Some(acker) = self.acker.take() {
            acker.release();
        }
    }
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("message", &self.message)
            .field("attempt", &self.attempt)
            .field("queue", &self.queue)
            .field("topic", &self.topic)
            .finish()
    }
}
