//! The message envelope on the wire: busway metadata in AMQP properties and
//! headers, the body untouched, so the reference (pika) services read it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use busway_core::{headers, Headers, Message, Priority, PublishError, Topic};
use bytes::Bytes;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::BasicProperties;
use uuid::Uuid;

/// How many deliveries the message had before this publish (0 when new).
pub(crate) const H_ATTEMPT: &str = "x-busway-attempt";
/// The causation id.
pub(crate) const H_CAUSATION: &str = "x-busway-causation-id";
/// The creation time in milliseconds (the AMQP timestamp has whole seconds).
pub(crate) const H_TIMESTAMP_MS: &str = "x-busway-timestamp-ms";
/// When the message expires, in milliseconds since the epoch.
pub(crate) const H_EXPIRES_AT: &str = "x-busway-expires-at";
/// The topic the message was first published to, kept across republishes.
pub(crate) const H_TOPIC: &str = "x-busway-topic";
/// RabbitMQ's own dead-lettering history.
const X_DEATH: &str = "x-death";
/// Prefix of the headers busway keeps to itself.
const INTERNAL_PREFIX: &str = "x-busway-";

/// AMQP delivery mode 2: the broker writes the message to disk.
const PERSISTENT: u8 = 2;

pub(crate) fn short(what: &str, value: &str) -> Result<ShortString, PublishError> {
    ShortString::try_new(value).map_err(|_| {
        PublishError::InvalidMessage(format!(
            "{what} is {} bytes long; AMQP allows at most 255",
            value.len()
        ))
    })
}

/// An integer argument or header, encoded as pika encodes a Python int.
pub(crate) fn int_value(v: i64) -> AMQPValue {
    match i32::try_from(v) {
        Ok(small) => AMQPValue::LongInt(small),
        Err(_) => AMQPValue::LongLongInt(v),
    }
}

pub(crate) fn str_value(v: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(v.as_bytes().to_vec()))
}

fn millis_since_epoch(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// What to put on the wire besides the message itself.
#[derive(Clone, Debug, Default)]
pub(crate) struct Envelope<'a> {
    /// Deliveries so far.
    pub(crate) attempts: u32,
    /// The original topic, when the route no longer shows it.
    pub(crate) topic: Option<&'a str>,
    /// Whether to set the AMQP `expiration` (not on delay queues, whose own
    /// TTL must win; the expiry header is checked on delivery instead).
    pub(crate) broker_expiry: bool,
}

/// The AMQP properties for `message`.
pub(crate) fn encode(
    message: &Message,
    env: &Envelope<'_>,
) -> Result<BasicProperties, PublishError> {
    let mut table = FieldTable::default();
    for (k, v) in message.headers.iter() {
        if k.starts_with(INTERNAL_PREFIX) {
            continue;
        }
        table.insert(short("header name", k)?, str_value(v));
    }
    if env.attempts > 0 {
        table.insert(H_ATTEMPT.into(), int_value(i64::from(env.attempts)));
    }
    if let Some(c) = &message.causation_id {
        table.insert(H_CAUSATION.into(), str_value(c));
    }
    let ts_ms = millis_since_epoch(message.timestamp);
    table.insert(
        H_TIMESTAMP_MS.into(),
        int_value(i64::try_from(ts_ms).unwrap_or(i64::MAX)),
    );
    if let Some(topic) = env.topic {
        table.insert(H_TOPIC.into(), str_value(topic));
    }
    let mut props = BasicProperties::default()
        .with_delivery_mode(PERSISTENT)
        .with_content_type(short("content type", &message.content_type)?)
        .with_message_id(short("message id", &message.id.to_string())?)
        .with_type(short("message kind", &message.kind)?)
        .with_timestamp(ts_ms / 1000);
    if message.priority.get() > 0 {
        props = props.with_priority(message.priority.get());
    }
    if let Some(c) = &message.correlation_id {
        props = props.with_correlation_id(short("correlation id", c)?);
    }
    if let Some(r) = &message.reply_to {
        props = props.with_reply_to(short("reply_to", r)?);
    }
    if let Some(at) = message.expires_at {
        let at_ms = millis_since_epoch(at);
        table.insert(
            H_EXPIRES_AT.into(),
            int_value(i64::try_from(at_ms).unwrap_or(i64::MAX)),
        );
        if env.broker_expiry {
            let left = at_ms.saturating_sub(millis_since_epoch(SystemTime::now()));
            props = props.with_expiration(short("expiration", &left.max(1).to_string())?);
        }
    }
    Ok(props.with_headers(table))
}

/// A header value as text, for scalar values.
pub(crate) fn value_text(v: &AMQPValue) -> Option<String> {
    Some(match v {
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::ShortShortInt(n) => n.to_string(),
        AMQPValue::ShortShortUInt(n) => n.to_string(),
        AMQPValue::ShortInt(n) => n.to_string(),
        AMQPValue::ShortUInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::LongUInt(n) => n.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::Float(n) => n.to_string(),
        AMQPValue::Double(n) => n.to_string(),
        AMQPValue::ShortString(s) => s.as_str().to_owned(),
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::Timestamp(t) => t.to_string(),
        _ => return None,
    })
}

fn value_int(v: &AMQPValue) -> Option<i64> {
    value_text(v)?.parse().ok()
}

/// A message decoded from a delivery.
pub(crate) struct Decoded {
    pub(crate) message: Message,
    /// Deliveries before this one, as recorded by busway.
    pub(crate) prior_attempts: u32,
    pub(crate) topic: Option<Topic>,
}

/// Decodes AMQP properties and body into a busway message. Messages from
/// other clients (pika) without busway headers decode too.
pub(crate) fn decode(
    props: &BasicProperties,
    payload: Bytes,
    exchange: &str,
    routing_key: &str,
    topic_exchange: &str,
) -> Decoded {
    let empty = FieldTable::default();
    let table = props.headers().as_ref().unwrap_or(&empty);
    let get = |k: &str| table.inner().get(k);
    let mut hdrs = Headers::new();
    for (k, v) in table.inner() {
        let k = k.as_str();
        if k.starts_with(INTERNAL_PREFIX) || k == X_DEATH {
            continue;
        }
        if let Some(text) = value_text(v) {
            hdrs.insert(k, text);
        }
    }
    let prior_attempts = get(H_ATTEMPT)
        .and_then(value_int)
        .and_then(|n| u32::try_from(n).ok())
        .unwrap_or(0);
    let topic = get(H_TOPIC)
        .and_then(value_text)
        .and_then(|t| Topic::new(t).ok())
        .or_else(|| {
            (exchange == topic_exchange && !exchange.is_empty())
                .then(|| Topic::new(routing_key).ok())
                .flatten()
        });
    if hdrs.get(headers::DEAD_LETTER_REASON).is_none() {
        if let Some(AMQPValue::FieldArray(deaths)) = get(X_DEATH) {
            if let Some(AMQPValue::FieldTable(death)) = deaths.as_slice().first() {
                translate_death(
                    death,
                    &mut hdrs,
                    prior_attempts,
                    topic.as_ref(),
                    topic_exchange,
                );
            }
        }
    }
    let timestamp = get(H_TIMESTAMP_MS)
        .and_then(value_int)
        .and_then(|ms| u64::try_from(ms).ok())
        .map(|ms| UNIX_EPOCH + Duration::from_millis(ms))
        .or_else(|| {
            props
                .timestamp()
                .map(|s| UNIX_EPOCH + Duration::from_secs(s))
        })
        .unwrap_or_else(SystemTime::now);
    let expires_at = get(H_EXPIRES_AT)
        .and_then(value_int)
        .and_then(|ms| u64::try_from(ms).ok())
        .map(|ms| UNIX_EPOCH + Duration::from_millis(ms));
    let kind = props
        .kind()
        .as_ref()
        .map(|k| k.as_str().to_owned())
        .unwrap_or_else(|| routing_key.to_owned());
    let message = Message {
        id: props
            .message_id()
            .as_ref()
            .and_then(|id| Uuid::parse_str(id.as_str()).ok())
            .unwrap_or_else(Uuid::now_v7),
        kind,
        correlation_id: props.correlation_id().as_ref().map(|c| c.to_string()),
        causation_id: get(H_CAUSATION).and_then(value_text),
        reply_to: props.reply_to().as_ref().map(|r| r.to_string()),
        headers: hdrs,
        content_type: props
            .content_type()
            .as_ref()
            .map(|c| c.to_string())
            .unwrap_or_else(|| busway_core::CONTENT_TYPE_JSON.to_owned()),
        timestamp,
        priority: Priority::saturating(props.priority().unwrap_or(0)),
        expires_at,
        payload,
    };
    Decoded {
        message,
        prior_attempts,
        topic,
    }
}

/// RabbitMQ dead-lettered the message itself (expiry, length limit, reject):
/// describe it with busway's dead-letter headers.
fn translate_death(
    death: &FieldTable,
    hdrs: &mut Headers,
    attempts: u32,
    topic: Option<&Topic>,
    topic_exchange: &str,
) {
    let field = |k: &str| death.inner().get(k).and_then(value_text);
    let reason = field("reason").unwrap_or_else(|| "dead-lettered by the broker".into());
    hdrs.insert(headers::DEAD_LETTER_REASON, reason);
    if let Some(q) = field("queue") {
        hdrs.insert(headers::ORIGINAL_QUEUE, q);
    }
    let original_topic = topic.map(|t| t.as_str().to_owned()).or_else(|| {
        (field("exchange").as_deref() == Some(topic_exchange))
            .then(|| match death.inner().get("routing-keys") {
                Some(AMQPValue::FieldArray(keys)) => keys.as_slice().first().and_then(value_text),
                _ => None,
            })
            .flatten()
    });
    if let Some(t) = original_topic {
        hdrs.insert(headers::ORIGINAL_TOPIC, t);
    }
    hdrs.insert(headers::ATTEMPTS, attempts.to_string());
    if let Some(AMQPValue::Timestamp(secs)) = death.inner().get("time") {
        hdrs.insert(
            headers::DEAD_LETTERED_AT,
            secs.saturating_mul(1000).to_string(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_keeps_metadata() -> Result<(), Box<dyn std::error::Error>> {
        let m = Message::new("greeting", "hi")
            .with_correlation_id("c")
            .with_causation_id("k")
            .with_reply_to("r")
            .with_header("tenant", "acme")
            .with_priority(Priority::saturating(4))
            .with_ttl(Duration::from_secs(60));
        let props = encode(
            &m,
            &Envelope {
                attempts: 2,
                topic: Some("a.b"),
                broker_expiry: true,
            },
        )?;
        let d = decode(&props, m.payload.clone(), "", "q", "event_bus");
        assert_eq!(d.message.id, m.id);
        assert_eq!(d.message.kind, "greeting");
        assert_eq!(d.message.causation_id.as_deref(), Some("k"));
        assert_eq!(d.message.headers.get("tenant"), Some("acme"));
        assert_eq!(d.message.headers.len(), 1);
        assert_eq!(d.message.priority.get(), 4);
        assert_eq!(d.prior_attempts, 2);
        assert_eq!(d.topic.as_ref().map(Topic::as_str), Some("a.b"));
        assert!(d.message.expires_at.is_some());
        Ok(())
    }

    #[test]
    fn foreign_message_takes_kind_from_routing_key() {
        let d = decode(
            &BasicProperties::default(),
            Bytes::from_static(b"{}"),
            "event_bus",
            "user.registered",
            "event_bus",
        );
        assert_eq!(d.message.kind, "user.registered");
        assert_eq!(d.prior_attempts, 0);
        assert_eq!(d.topic.as_ref().map(Topic::as_str), Some("user.registered"));
    }
}
