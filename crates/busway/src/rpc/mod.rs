//! Request-response (RPC) in the reference wire format.
//!
//! A service listens on queue `rpc_{service}`. A request carries
//! `reply_to` (the caller's reply queue) and a `correlation_id`, with body
//! `{"method", "params", "timestamp"}`; the reply carries the same
//! correlation id and `{"status":"success","data"}` or
//! `{"status":"error","message"}`. Services and callers written with the
//! reference Python code interoperate with these on RabbitMQ.
//!
//! Each [`Bus`](crate::Bus) has one reply queue (a temporary queue; on
//! RabbitMQ an exclusive one, as the reference clients declare), created on
//! the first call; any number of calls may be in flight on it.

mod client;
mod error;
mod server;
mod service;
pub(crate) mod wire;

pub use client::{Request, DEFAULT_TIMEOUT};
pub use error::RpcError;
pub use server::{RegisterRequestHandler, DEFAULT_RPC_CONCURRENCY};
pub use service::{RpcCall, RpcService};

pub(crate) use client::RpcClient;
pub(crate) use server::MethodTable;
