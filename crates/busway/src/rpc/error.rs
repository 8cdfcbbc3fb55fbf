//! What can go wrong with a call.

use std::time::Duration;

use busway_core::{CodecError, ConsumeError, DeclareError, NameError, PublishError};

/// A remote call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RpcError {
    /// No reply came within the timeout. The server may still run the
    /// request; a reply arriving later is dropped and counted in
    /// [`BusStats::late_replies`](crate::BusStats::late_replies).
    #[error("`{service}.{method}` did not reply within {timeout:?}")]
    Timeout {
        /// The service called.
        service: String,
        /// The method called.
        method: String,
        /// The timeout that passed.
        timeout: Duration,
    },
    /// The server answered with an error response (unknown method, bad
    /// params, handler error or panic). Retrying the same call rarely helps.
    #[error("`{service}.{method}` failed: {message}")]
    Remote {
        /// The service called.
        service: String,
        /// The method called.
        method: String,
        /// The server's `message`.
        message: String,
    },
    /// Nothing listens on the service's queue `rpc_{service}`.
    #[error("no service `{0}` (its queue does not exist)")]
    NoSuchService(String),
    /// The params could not be encoded.
    #[error("encoding the params failed")]
    Encode(#[source] CodecError),
    /// The reply is not a reference response, or its `data` does not fit the expected type.
    #[error("the reply of `{service}.{method}` could not be decoded: {message}")]
    Decode {
        /// The service called.
        service: String,
        /// The method called.
        method: String,
        /// What did not fit.
        message: String,
    },
    /// The service name makes an invalid queue name.
    #[error(transparent)]
    InvalidName(#[from] NameError),
    /// Setting up this client's reply queue failed.
    #[error("setting up the reply queue failed")]
    ReplyQueue(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// Sending the request failed.
    #[error("sending the request failed")]
    Publish(#[source] PublishError),
    /// The bus has been shut down.
    #[error("the bus has been shut down")]
    ShutDown,
    /// A middleware layer on the call refused or gave up on it (timeout,
    /// open circuit breaker, rate limit).
    #[error(transparent)]
    Layer(#[from] busway_middleware::LayerError),
}

impl RpcError {
    /// Whether calling again may succeed: timeouts and transient transport
    /// failures may; error responses, bad input and shutdown do not.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Timeout { .. } | Self::NoSuchService(_) | Self::ReplyQueue(_) => true,
            Self::Publish(e) => e.is_retryable(),
            Self::Layer(e) => e.is_retryable(),
            _ => false,
        }
    }
}

impl From<DeclareError> for RpcError {
    fn from(e: DeclareError) -> Self {
        Self::ReplyQueue(Box::new(e))
    }
}

impl From<ConsumeError> for RpcError {
    fn from(e: ConsumeError) -> Self {
        Self::ReplyQueue(Box::new(e))
    }
}
