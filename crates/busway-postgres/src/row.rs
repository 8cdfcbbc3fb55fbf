//! A message as stored in `busway_messages`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use busway_core::{Headers, Message, Priority, Topic};
use bytes::Bytes;
use sqlx::postgres::PgRow;
use sqlx::Row;
use uuid::Uuid;

/// The columns selected for a row that is about to be delivered, prefixed
/// with the table alias `m`.
pub(crate) const ROW_COLUMNS: &str = "m.seq, m.id::text AS id, m.kind, m.correlation_id, \
     m.causation_id, m.reply_to, m.content_type, m.headers, m.timestamp, m.priority, \
     m.expires_at, m.topic, m.payload, m.attempt";

/// One stored message, as read for delivery.
#[derive(Debug)]
pub(crate) struct StoredRow {
    pub(crate) seq: i64,
    pub(crate) id: String,
    pub(crate) kind: String,
    pub(crate) correlation_id: Option<String>,
    pub(crate) causation_id: Option<String>,
    pub(crate) reply_to: Option<String>,
    pub(crate) content_type: String,
    pub(crate) headers: Option<String>,
    pub(crate) timestamp: i64,
    pub(crate) priority: i16,
    pub(crate) expires_at: Option<i64>,
    pub(crate) topic: Option<String>,
    pub(crate) payload: Vec<u8>,
    /// Deliveries so far, this one included.
    pub(crate) attempt: i32,
}

impl StoredRow {
    /// Reads a row selected with [`ROW_COLUMNS`].
    pub(crate) fn from_row(r: &PgRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            seq: r.try_get("seq")?,
            id: r.try_get("id")?,
            kind: r.try_get("kind")?,
            correlation_id: r.try_get("correlation_id")?,
            causation_id: r.try_get("causation_id")?,
            reply_to: r.try_get("reply_to")?,
            content_type: r.try_get("content_type")?,
            headers: r.try_get("headers")?,
            timestamp: r.try_get("timestamp")?,
            priority: r.try_get("priority")?,
            expires_at: r.try_get("expires_at")?,
            topic: r.try_get("topic")?,
            payload: r.try_get("payload")?,
            attempt: r.try_get("attempt")?,
        })
    }

    /// The stored headers; a corrupt column reads as no headers.
    pub(crate) fn parse_headers(&self) -> Headers {
        match self.headers.as_deref() {
            None => Headers::new(),
            Some(json) => serde_json::from_str(json).unwrap_or_else(|e| {
                tracing::warn!(seq = self.seq, error = %e, "unreadable headers column; delivering without headers");
                Headers::new()
            }),
        }
    }

    /// The topic the message was published to, if any.
    pub(crate) fn topic(&self) -> Option<Topic> {
        self.topic.as_deref().and_then(|t| Topic::new(t).ok())
    }

    /// The message; its strings and payload are moved, not copied.
    pub(crate) fn into_message(self) -> Message {
        let id = Uuid::parse_str(&self.id).unwrap_or_else(|_| {
            tracing::warn!(seq = self.seq, id = %self.id, "unreadable message id");
            Uuid::nil()
        });
        let headers = self.parse_headers();
        Message {
            id,
            kind: self.kind,
            correlation_id: self.correlation_id,
            causation_id: self.causation_id,
            reply_to: self.reply_to,
            headers,
            content_type: self.content_type,
            timestamp: from_millis(self.timestamp),
            priority: Priority::saturating(u8::try_from(self.priority.clamp(0, 9)).unwrap_or(0)),
            expires_at: self.expires_at.map(from_millis),
            payload: Bytes::from(self.payload),
        }
    }

    /// The attempt as busway counts it.
    pub(crate) fn attempt(&self) -> u32 {
        u32::try_from(self.attempt.max(0)).unwrap_or(u32::MAX)
    }
}

/// The instant `ms` milliseconds after the Unix epoch (before it if negative).
pub(crate) fn from_millis(ms: i64) -> SystemTime {
    let magnitude = Duration::from_millis(ms.unsigned_abs());
    if ms >= 0 {
        UNIX_EPOCH.checked_add(magnitude).unwrap_or(UNIX_EPOCH)
    } else {
        UNIX_EPOCH.checked_sub(magnitude).unwrap_or(UNIX_EPOCH)
    }
}

/// A duration in whole milliseconds, saturating.
pub(crate) fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}
