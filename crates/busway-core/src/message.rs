//! The message envelope.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use uuid::Uuid;

use crate::codec::{Codec, CodecError, CONTENT_TYPE_JSON};

/// Message headers: string keys to string values, kept sorted.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Headers(BTreeMap<String, String>);

impl Headers {
    /// No headers.
    pub fn new() -> Self {
        Self::default()
    }
    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }
    /// Sets `key` to `value`, returning the previous value.
    pub fn insert(&mut self, key: impl Into<String>, value: impl Into<String>) -> Option<String> {
        self.0.insert(key.into(), value.into())
    }
    /// Removes `key`, returning its value.
    pub fn remove(&mut self, key: &str) -> Option<String> {
        self.0.remove(key)
    }
    /// Number of headers.
    pub fn len(&self) -> usize {
        self.0.len()
    }
    /// Whether there are no headers.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// Iterates over the headers in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

impl FromIterator<(String, String)> for Headers {
    fn from_iter<I: IntoIterator<Item = (String, String)>>(iter: I) -> Self {
        Self(iter.into_iter().collect())
    }
}

/// A message priority from 0 (lowest, the default) to 9 (highest).
///
/// ```
/// use busway_core::Priority;
/// assert_eq!(Priority::new(7).map(Priority::get), Some(7));
/// assert_eq!(Priority::new(10), None);
/// assert_eq!(Priority::saturating(200), Priority::MAX);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Priority(u8);

impl Priority {
    /// The highest priority, 9.
    pub const MAX: Priority = Priority(9);
    /// The lowest priority, 0.
    pub const MIN: Priority = Priority(0);

    /// `Some` if `p` is within 0–9.
    pub fn new(p: u8) -> Option<Self> {
        (p <= 9).then_some(Self(p))
    }
    /// Clamps `p` to 0–9.
    pub fn saturating(p: u8) -> Self {
        Self(p.min(9))
    }
    /// The priority as a number.
    pub fn get(self) -> u8 {
        self.0
    }
}

impl<'de> Deserialize<'de> for Priority {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let p = u8::deserialize(d)?;
        Priority::new(p).ok_or_else(|| serde::de::Error::custom("priority must be within 0-9"))
    }
}

/// A message: metadata plus an opaque payload.
///
/// Build one with [`Message::new`] (raw bytes) or [`Message::json`] (serde),
/// then refine it with the `with_*` methods.
///
/// ```
/// use busway_core::{Message, Priority};
/// use std::time::Duration;
///
/// #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
/// struct SendEmail { email: String }
///
/// let message = Message::json("send_email", &SendEmail { email: "a@b.test".into() })?
///     .with_priority(Priority::MAX)
///     .with_ttl(Duration::from_secs(60))
///     .with_header("tenant", "acme");
/// let back: SendEmail = message.decode()?;
/// assert_eq!(back.email, "a@b.test");
/// # Ok::<(), busway_core::CodecError>(())
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct Message {
    /// Unique id (UUIDv7, so ids sort by creation time).
    pub id: Uuid,
    /// The message type, such as `order.created` or `send_email`.
    pub kind: String,
    /// Ties together the messages of one conversation or request.
    pub correlation_id: Option<String>,
    /// The id of the message that caused this one.
    pub causation_id: Option<String>,
    /// Where a reply should be sent.
    pub reply_to: Option<String>,
    /// Free-form headers.
    pub headers: Headers,
    /// How the payload is encoded (`application/json` by default).
    pub content_type: String,
    /// When the message was created.
    pub timestamp: SystemTime,
    /// 0 (lowest) to 9 (highest). Honoured by queues declared with a max priority.
    pub priority: Priority,
    /// After this instant the message is no longer delivered; it is dead-lettered as `expired`.
    pub expires_at: Option<SystemTime>,
    /// The encoded body.
    pub payload: Bytes,
}

impl Message {
    /// A message of type `kind` with a raw payload (content type `application/octet-stream`).
    pub fn new(kind: impl Into<String>, payload: impl Into<Bytes>) -> Self {
        Self {
            id: Uuid::now_v7(),
            kind: kind.into(),
            correlation_id: None,
            causation_id: None,
            reply_to: None,
            headers: Headers::new(),
            content_type: "application/octet-stream".into(),
            timestamp: SystemTime::now(),
            priority: Priority::MIN,
            expires_at: None,
            payload: payload.into(),
        }
    }

    /// A message of type `kind` whose payload is `value` encoded as JSON.
    pub fn json<T: Serialize + ?Sized>(
        kind: impl Into<String>,
        value: &T,
    ) -> Result<Self, CodecError> {
        Self::encoded(kind, Codec::Json, value)
    }

    /// A message of type `kind` whose payload is `value` encoded with `codec`.
    pub fn encoded<T: Serialize + ?Sized>(
        kind: impl Into<String>,
        codec: Codec,
        value: &T,
    ) -> Result<Self, CodecError> {
        let payload = codec.encode(value)?;
        let mut message = Self::new(kind, payload);
        message.content_type = codec.content_type().into();
        Ok(message)
    }

    /// Decodes the payload with the codec its content type names.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, CodecError> {
        Codec::for_content_type(&self.content_type)?.decode(&self.payload)
    }

    /// Sets a header.
    pub fn with_header(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(key, value);
        self
    }
    /// Sets the priority.
    pub fn with_priority(mut self, priority: Priority) -> Self {
        self.priority = priority;
        self
    }
    /// Expires the message `ttl` from now.
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.expires_at = Some(SystemTime::now() + ttl);
        self
    }
    /// Sets the correlation id.
    pub fn with_correlation_id(mut self, id: impl Into<String>) -> Self {
        self.correlation_id = Some(id.into());
        self
    }
    /// Sets the causation id.
    pub fn with_causation_id(mut self, id: impl Into<String>) -> Self {
        self.causation_id = Some(id.into());
        self
    }
    /// Sets the reply address.
    pub fn with_reply_to(mut self, reply_to: impl Into<String>) -> Self {
        self.reply_to = Some(reply_to.into());
        self
    }
    /// Sets the content type of the payload.
    pub fn with_content_type(mut self, content_type: impl Into<String>) -> Self {
        self.content_type = content_type.into();
        self
    }

    /// Whether the message has expired at `now`.
    pub fn is_expired_at(&self, now: SystemTime) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }
}

impl Default for Message {
    fn default() -> Self {
        Self::new("", Bytes::new()).with_content_type(CONTENT_TYPE_JSON)
    }
}

impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Message")
            .field("id", &self.id)
            .field("kind", &self.kind)
            .field("correlation_id", &self.correlation_id)
            .field("priority", &self.priority.get())
            .field("content_type", &self.content_type)
            .field("payload_len", &self.payload.len())
            .finish_non_exhaustive()
    }
}

/// Milliseconds since the Unix epoch (negative before 1970), saturating.
pub fn unix_millis(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_millis()).unwrap_or(i64::MAX),
    }
}
