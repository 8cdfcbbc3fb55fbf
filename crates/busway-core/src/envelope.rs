//! The whole message as one MessagePack body: id, kind, correlation and
//! causation ids, reply address, headers, content type, timestamp,
//! priority, expiry, the topic it was published to, and the payload. How
//! broker transports that have no fields of their own for these (Redis
//! Streams, NATS JetStream) store a message; what changes between
//! deliveries (attempts, due times) travels beside it, so the body is
//! never decoded to be moved.
//!
//! ```
//! use busway_core::{envelope, Message, Topic};
//!
//! let topic = Topic::new("order.created")?;
//! let message = Message::new("order.created", "{}").with_header("tenant", "a");
//! let (back, to) = envelope::decode(&envelope::encode(&message, Some(&topic))?)?;
//! assert_eq!((back.id, to), (message.id, Some(topic)));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::codec::{CodecError, CONTENT_TYPE_MSGPACK};
use crate::{unix_millis, Headers, Message, Priority, Topic};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The stored form of a message.
#[derive(Serialize, Deserialize)]
struct Envelope {
    id: Uuid,
    kind: String,
    correlation_id: Option<String>,
    causation_id: Option<String>,
    reply_to: Option<String>,
    headers: Headers,
    content_type: String,
    timestamp_us: i64,
    priority: u8,
    expires_at_ms: Option<i64>,
    topic: Option<String>,
    payload: Bytes,
}

/// Encodes a message (and the topic it was published to).
pub fn encode(message: &Message, topic: Option<&Topic>) -> Result<Bytes, CodecError> {
    let envelope = Envelope {
        id: message.id,
        kind: message.kind.clone(),
        correlation_id: message.correlation_id.clone(),
        causation_id: message.causation_id.clone(),
        reply_to: message.reply_to.clone(),
        headers: message.headers.clone(),
        content_type: message.content_type.clone(),
        timestamp_us: unix_micros(message.timestamp),
        priority: message.priority.get(),
        expires_at_ms: message.expires_at.map(unix_millis),
        topic: topic.map(|t| t.as_str().to_owned()),
        payload: message.payload.clone(),
    };
    rmp_serde::to_vec_named(&envelope)
        .map(Bytes::from)
        .map_err(|e| CodecError::Encode {
            content_type: CONTENT_TYPE_MSGPACK,
            message: e.to_string(),
        })
}

/// Decodes what [`encode`] wrote.
pub fn decode(blob: &[u8]) -> Result<(Message, Option<Topic>), CodecError> {
    let malformed = |message: String| CodecError::Decode {
        content_type: CONTENT_TYPE_MSGPACK,
        message,
    };
    let e: Envelope = rmp_serde::from_slice(blob).map_err(|e| malformed(e.to_string()))?;
    let topic = match e.topic {
        Some(t) => Some(Topic::new(t).map_err(|e| malformed(e.to_string()))?),
        None => None,
    };
    let message = Message {
        id: e.id,
        kind: e.kind,
        correlation_id: e.correlation_id,
        causation_id: e.causation_id,
        reply_to: e.reply_to,
        headers: e.headers,
        content_type: e.content_type,
        timestamp: from_unix_micros(e.timestamp_us),
        priority: Priority::saturating(e.priority),
        expires_at: e.expires_at_ms.map(from_unix_millis),
        payload: e.payload,
    };
    Ok((message, topic))
}

fn unix_micros(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_micros()).unwrap_or(i64::MAX),
    }
}

fn from_unix_micros(us: i64) -> SystemTime {
    if us >= 0 {
        UNIX_EPOCH + Duration::from_micros(us.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_micros(us.unsigned_abs())
    }
}

fn from_unix_millis(ms: i64) -> SystemTime {
    from_unix_micros(ms.saturating_mul(1000))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_round_trips() -> Result<(), Box<dyn std::error::Error>> {
        let topic = Topic::new("order.created")?;
        let m = Message::new("k", "body")
            .with_header("h", "v")
            .with_correlation_id("c")
            .with_priority(Priority::MAX)
            .with_ttl(Duration::from_secs(5));
        let (back, t) = decode(&encode(&m, Some(&topic))?)?;
        assert_eq!(t, Some(topic));
        assert_eq!(back.id, m.id);
        assert_eq!(back.headers, m.headers);
        assert_eq!(back.payload, m.payload);
        assert_eq!(back.priority, Priority::MAX);
        assert!(back.expires_at.is_some());
        Ok(())
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(decode(b"\xff\x00garbage").is_err());
    }
}
