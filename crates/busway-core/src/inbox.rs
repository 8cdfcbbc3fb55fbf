//! The inbox: which messages a consumer has already handled, so a
//! redelivery (a lost ack, a consumer that died after its side effect, a
//! duplicate publish) never repeats the handler's effect.
//!
//! A consumer asks [`Inbox::begin`] with the message's key (its id, or an
//! idempotency key) before handling it, and tells [`Inbox::finish`] how the
//! handling ended. Backends keep the keys in their own store, durable and
//! shared by every process of the service, and forget handled keys after a
//! retention period.
//!
//! The order that makes this safe: `finish(key, true)` is recorded before the
//! delivery is acknowledged. A crash between the two redelivers a message the
//! inbox already knows as done, which is then acknowledged without running.

use async_trait::async_trait;

use crate::error::BoxError;

/// What the inbox knows of a key when a consumer asks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Claim {
    /// Never handled, or forgotten, or claimed by a consumer whose claim ran
    /// out: the caller holds it now and must [`finish`](Inbox::finish) it.
    New,
    /// Another consumer is handling it right now.
    InProgress,
    /// Handled successfully before: do not handle it again.
    Done,
}

/// Where handled message keys are remembered. See the [module docs](self).
#[async_trait]
pub trait Inbox: Send + Sync + std::fmt::Debug + 'static {
    /// Checks `key` and, if it is new, claims it for the caller.
    async fn begin(&self, key: &str) -> Result<Claim, InboxError>;

    /// Records how handling a claimed `key` ended: a success makes it done,
    /// a failure forgets it so a later delivery runs again.
    async fn finish(&self, key: &str, succeeded: bool) -> Result<(), InboxError>;
}

/// An inbox operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InboxError {
    /// The store is closed.
    #[error("the inbox is closed")]
    Closed,
    /// The backend failed.
    #[error("the inbox's store failed")]
    Backend {
        /// The cause.
        #[source]
        source: BoxError,
        /// Whether retrying may succeed.
        retryable: bool,
    },
}

impl InboxError {
    /// Whether retrying may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Backend { retryable, .. } => *retryable,
            Self::Closed => false,
        }
    }
}
