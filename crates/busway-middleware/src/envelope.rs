//! The request a handler stack receives.

use std::sync::Arc;

use busway_core::Message;

/// A received message as a handler's middleware sees it: the message (id,
/// correlation, headers…), which delivery this is, what it asks for
/// (a task type, an event type, an RPC method) and the decoded body.
///
/// Cheap to clone (the message is shared), so the retry layer can resend it.
///
/// ```
/// use busway_core::Message;
/// use busway_middleware::{Envelope, MessageInfo};
///
/// let envelope = Envelope::new(Message::new("send_email", "{}"), 1, "send_email", ());
/// assert_eq!(envelope.message().kind, "send_email");
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Envelope<B> {
    /// The message as received.
    pub message: Arc<Message>,
    /// Which delivery of it this is: 1 on the first.
    pub attempt: u32,
    /// What it asks for: the task type, the event type or the RPC method.
    pub kind: String,
    /// The decoded body handed to the handler.
    pub body: B,
}

impl<B> Envelope<B> {
    /// An envelope around `message`.
    pub fn new(
        message: impl Into<Arc<Message>>,
        attempt: u32,
        kind: impl Into<String>,
        body: B,
    ) -> Self {
        Self {
            message: message.into(),
            attempt,
            kind: kind.into(),
            body,
        }
    }
    /// The same envelope with its body converted.
    pub fn map_body<C>(self, convert: impl FnOnce(B) -> C) -> Envelope<C> {
        Envelope {
            message: self.message,
            attempt: self.attempt,
            kind: self.kind,
            body: convert(self.body),
        }
    }
}

/// A request that carries a received [`Message`]: what the dedup and
/// correlation layers read ids from.
pub trait MessageInfo {
    /// The message.
    fn message(&self) -> &Message;
}

impl MessageInfo for Message {
    fn message(&self) -> &Message {
        self
    }
}

impl MessageInfo for Arc<Message> {
    fn message(&self) -> &Message {
        self
    }
}

impl<B> MessageInfo for Envelope<B> {
    fn message(&self) -> &Message {
        &self.message
    }
}
