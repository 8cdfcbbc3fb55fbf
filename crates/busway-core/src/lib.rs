//! The core of busway: the message model, addressing, topology and the
//! transport traits that every backend implements. This crate does no I/O.
//!
//! ```
//! use busway_core::{Message, Publish, Topic};
//!
//! let topic = Topic::new("order.created")?;
//! let message = Message::json("order.created", &serde_json::json!({"order_id": 7}))?;
//! let publish = Publish::to_topic(topic, message);
//! assert_eq!(publish.message.kind, "order.created");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod address;
mod codec;
mod delivery;
#[cfg(feature = "msgpack")]
pub mod envelope;
mod error;
pub mod event_store;
pub mod headers;
pub mod inbox;
mod message;
pub mod saga_store;
mod topology;
mod transport;
mod url;

pub use address::{Destination, QueueName, Topic, TopicPattern};
pub use codec::{Codec, CodecError, CONTENT_TYPE_JSON, CONTENT_TYPE_MSGPACK};
pub use delivery::{Acker, Delivery, Settlement};
pub use error::{
    BoxError, ConnectError, ConsumeError, DeclareError, NameError, PublishError, SettleError,
    StatsError,
};
pub use message::{unix_millis, Headers, Message, Priority};
pub use topology::{Binding, QueueSpec};
pub use transport::{
    Capabilities, ConsumeOptions, DeliveryStream, DirectReplies, DirectReplyChannel, Durability,
    Publish, QueueStats, Support, Transport, DEFAULT_MAX_PAYLOAD_BYTES,
};
pub use url::redact_url;
