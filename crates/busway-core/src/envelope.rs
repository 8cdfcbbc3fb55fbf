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

/// The stored form of a message, as read back.
#[derive(Deserialize)]
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

/// The stored form of a message, as written: borrows every field of the
/// message, so encoding copies each byte once, straight into the output.
/// Field for field the same as [`Envelope`] (names, order and types).
#[derive(Serialize)]
struct EnvelopeRef<'a> {
    id: &'a Uuid,
    kind: &'a str,
    correlation_id: Option<&'a str>,
    causation_id: Option<&'a str>,
    reply_to: Option<&'a str>,
    headers: &'a Headers,
    content_type: &'a str,
    timestamp_us: i64,
    priority: u8,
    expires_at_ms: Option<i64>,
    topic: Option<&'a str>,
    payload: &'a Bytes,
}

/// Room for the envelope's fixed part: field names, id, numbers.
const ENVELOPE_OVERHEAD: usize = 192;

/// Encodes a message (and the topic it was published to).
pub fn encode(message: &Message, topic: Option<&Topic>) -> Result<Bytes, CodecError> {
    encode_with_expiry(message, topic, message.expires_at)
}

/// Encodes a message (and the topic it was published to) as if its expiry
/// were `expires_at`: what a transport applying a queue's TTL stores,
/// without copying the message to change one field.
pub fn encode_with_expiry(
    message: &Message,
    topic: Option<&Topic>,
    expires_at: Option<SystemTime>,
) -> Result<Bytes, CodecError> {
    let mut out = Vec::with_capacity(encoded_len_hint(message, topic));
    encode_into(&mut out, message, topic, expires_at)?;
    Ok(Bytes::from(out))
}

/// Writes the encoding of a message (see [`encode_with_expiry`]) to `out`,
/// for a caller that owns the buffer the bytes end up in (a command being
/// built, a frame), so they are written once, in place.
pub fn encode_into<W: std::io::Write>(
    out: W,
    message: &Message,
    topic: Option<&Topic>,
    expires_at: Option<SystemTime>,
) -> Result<(), CodecError> {
    let envelope = EnvelopeRef {
        id: &message.id,
        kind: &message.kind,
        correlation_id: message.correlation_id.as_deref(),
        causation_id: message.causation_id.as_deref(),
        reply_to: message.reply_to.as_deref(),
        headers: &message.headers,
        content_type: &message.content_type,
        timestamp_us: unix_micros(message.timestamp),
        priority: message.priority.get(),
        expires_at_ms: expires_at.map(unix_millis),
        topic: topic.map(Topic::as_str),
        payload: &message.payload,
    };
    let mut out = out;
    rmp_serde::encode::write_named(&mut out, &envelope).map_err(|e| CodecError::Encode {
        content_type: CONTENT_TYPE_MSGPACK,
        message: e.to_string(),
    })
}

/// About how many bytes the encoding of `message` takes (a little more,
/// usually), to size a buffer once.
pub fn encoded_len_hint(message: &Message, topic: Option<&Topic>) -> usize {
    ENVELOPE_OVERHEAD
        + message.kind.len()
        + message.content_type.len()
        + message.correlation_id.as_ref().map_or(0, String::len)
        + message.causation_id.as_ref().map_or(0, String::len)
        + message.reply_to.as_ref().map_or(0, String::len)
        + topic.map_or(0, |t| t.as_str().len())
        + message
            .headers
            .iter()
            .map(|(k, v)| k.len() + v.len() + 10)
            .sum::<usize>()
        + message.payload.len()
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
    fn a_borrowed_encoding_reads_as_the_owned_envelope() -> Result<(), Box<dyn std::error::Error>> {
        let m = Message::new("k", "body").with_header("h", "v");
        let at = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        let (back, t) = decode(&encode_with_expiry(&m, None, Some(at))?)?;
        assert_eq!(t, None);
        assert_eq!(back.expires_at, Some(at));
        assert_eq!((back.kind, back.payload), (m.kind, m.payload));
        Ok(())
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(decode(b"\xff\x00garbage").is_err());
    }
}
