//! One error enum per operation. Each says whether retrying the same call
//! may succeed ([`is_retryable`](PublishError::is_retryable)).

use crate::address::QueueName;
use crate::topology::QueueSpec;

/// A boxed error from a backend's driver, kept as the `source()`.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A queue name, topic or pattern that is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NameError {
    /// The name is empty.
    #[error("{what} must not be empty")]
    Empty {
        /// What kind of name it was.
        what: &'static str,
    },
    /// The name is longer than allowed.
    #[error("{what} is {len} bytes long; the maximum is {max}")]
    TooLong {
        /// What kind of name it was.
        what: &'static str,
        /// Its length in bytes.
        len: usize,
        /// The maximum length in bytes.
        max: usize,
    },
    /// The name contains a character that is not allowed.
    #[error("{what} `{name}` contains the character {character:?}, which is not allowed")]
    InvalidCharacter {
        /// What kind of name it was.
        what: &'static str,
        /// The name.
        name: String,
        /// The offending character.
        character: char,
    },
    /// Two dots in a row, or a dot at either end.
    #[error("{what} `{name}` has an empty word (two dots in a row, or a dot at either end)")]
    EmptyWord {
        /// What kind of name it was.
        what: &'static str,
        /// The name.
        name: String,
    },
    /// A topic to publish to contains `*` or `#`; those belong in patterns.
    #[error("topic `{topic}` contains a wildcard; `*` and `#` are only allowed in subscription patterns")]
    WildcardInTopic {
        /// The topic.
        topic: String,
    },
    /// A pattern word mixes a wildcard with other characters (`order*`).
    #[error(
        "pattern `{pattern}` has the word `{word}`; a wildcard must be a whole word (`*` or `#`)"
    )]
    PartialWildcard {
        /// The pattern.
        pattern: String,
        /// The offending word.
        word: String,
    },
}

/// Opening a transport failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The URL could not be parsed or names an unknown scheme.
    #[error("invalid transport URL `{url}`: {reason}")]
    InvalidUrl {
        /// The URL, with any password removed.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The backend could not be reached or opened.
    #[error("could not open {backend} at {location}")]
    Backend {
        /// Which backend.
        backend: &'static str,
        /// Host or path, never credentials.
        location: String,
        /// The cause.
        #[source]
        source: BoxError,
        /// Whether trying again later may succeed.
        retryable: bool,
    },
}

impl ConnectError {
    /// Whether trying again later may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::InvalidUrl { .. } => false,
            Self::Backend { retryable, .. } => *retryable,
        }
    }
}

/// Declaring a queue or a binding failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeclareError {
    /// The queue exists with different settings. Delete it or declare the same spec.
    #[error("queue `{}` already exists as ({existing}); the requested declaration ({requested}) conflicts with it", existing.name)]
    Conflict {
        /// The spec the queue has.
        existing: Box<QueueSpec>,
        /// The spec that was requested.
        requested: Box<QueueSpec>,
    },
    /// A binding names a queue that was never declared.
    #[error("queue `{0}` does not exist; declare it before binding it")]
    QueueNotFound(QueueName),
    /// The spec is not valid on its own (for example a max priority above 9).
    #[error("invalid queue spec for `{queue}`: {reason}")]
    InvalidSpec {
        /// The queue.
        queue: QueueName,
        /// What is wrong.
        reason: String,
    },
    /// The transport was closed.
    #[error("the transport is closed")]
    Closed,
    /// The backend failed.
    #[error("backend error while declaring")]
    Backend {
        /// The cause.
        #[source]
        source: BoxError,
        /// Whether retrying may succeed.
        retryable: bool,
    },
}

impl DeclareError {
    /// Whether retrying the same declaration may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Backend { retryable, .. } => *retryable,
            _ => false,
        }
    }
}

/// Publishing failed. Unless the error says otherwise, the message was not stored.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// The payload is larger than the transport's configured maximum.
    #[error("payload of {size} bytes exceeds the maximum of {max} bytes")]
    PayloadTooLarge {
        /// The payload size.
        size: usize,
        /// The configured maximum.
        max: usize,
    },
    /// The message was sent to a queue that does not exist.
    #[error("queue `{0}` does not exist")]
    QueueNotFound(QueueName),
    /// The queue is at its configured maximum length; nothing was stored.
    #[error("queue `{queue}` is full ({max_length} messages)")]
    QueueFull {
        /// The queue.
        queue: QueueName,
        /// Its maximum length.
        max_length: u64,
    },
    /// The message itself is invalid (for example its priority is above the maximum).
    #[error("invalid message: {0}")]
    InvalidMessage(String),
    /// The transport was closed.
    #[error("the transport is closed")]
    Closed,
    /// The backend failed; whether the message was stored is unknown unless `retryable`.
    #[error("backend error while publishing")]
    Backend {
        /// The cause.
        #[source]
        source: BoxError,
        /// Whether retrying may succeed.
        retryable: bool,
    },
}

impl PublishError {
    /// Whether retrying the same publish may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::QueueFull { .. } => true,
            Self::Backend { retryable, .. } => *retryable,
            _ => false,
        }
    }
}

/// Starting or continuing a consumer failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConsumeError {
    /// The queue does not exist.
    #[error("queue `{0}` does not exist")]
    QueueNotFound(QueueName),
    /// The consume options are invalid (for example a prefetch of 0).
    #[error("invalid consume options: {0}")]
    InvalidOptions(String),
    /// The transport was closed.
    #[error("the transport is closed")]
    Closed,
    /// The backend failed.
    #[error("backend error while consuming")]
    Backend {
        /// The cause.
        #[source]
        source: BoxError,
        /// Whether retrying may succeed.
        retryable: bool,
    },
}

impl ConsumeError {
    /// Whether consuming again may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Backend { retryable, .. } => *retryable,
            _ => false,
        }
    }
}

/// Settling (ack, nack, dead-letter) a delivery failed. The delivery will be
/// redelivered once its lease runs out.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SettleError {
    /// The lease on the delivery expired and it was (or will be) redelivered elsewhere.
    #[error("the delivery's lease expired; it has been returned to the queue")]
    LeaseLost,
    /// The queue has no dead-letter queue to move the message to; it stays in the queue.
    #[error("queue `{0}` has no dead-letter queue; the message was returned to the queue")]
    NoDeadLetterQueue(QueueName),
    /// The transport was closed.
    #[error("the transport is closed")]
    Closed,
    /// The backend failed.
    #[error("backend error while settling")]
    Backend {
        /// The cause.
        #[source]
        source: BoxError,
        /// Whether retrying may succeed.
        retryable: bool,
    },
}

impl SettleError {
    /// Whether the settlement can be retried. A lost lease cannot: the message
    /// is already back in the queue.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Backend { retryable, .. } => *retryable,
            _ => false,
        }
    }
}

/// Reading queue statistics failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StatsError {
    /// The queue does not exist.
    #[error("queue `{0}` does not exist")]
    QueueNotFound(QueueName),
    /// The transport was closed.
    #[error("the transport is closed")]
    Closed,
    /// The backend cannot answer this (the text says why and what would
    /// make it possible). Retrying does not help.
    #[error("not supported: {0}")]
    Unsupported(String),
    /// The backend failed.
    #[error("backend error while reading statistics")]
    Backend {
        /// The cause.
        #[source]
        source: BoxError,
        /// Whether retrying may succeed.
        retryable: bool,
    },
}

impl StatsError {
    /// Whether retrying may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Backend { retryable, .. } => *retryable,
            _ => false,
        }
    }
}
