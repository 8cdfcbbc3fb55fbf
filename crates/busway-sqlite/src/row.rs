//! A message as stored in `busway_messages`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use busway_core::{Headers, Message, Priority, Topic};
use bytes::Bytes;
use uuid::Uuid;

/// The columns selected for a row that is about to be delivered or moved.
pub(crate) const ROW_COLUMNS: &str = "seq, id, kind, correlation_id, causation_id, reply_to, \
     content_type, headers, timestamp, priority, expires_at, topic, payload, attempt, visible_at";

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
    pub(crate) priority: i64,
    pub(crate) expires_at: Option<i64>,
    pub(crate) topic: Option<String>,
    pub(crate) payload: Vec<u8>,
    /// Deliveries so far (after a lease: including this one).
    pub(crate) attempt: i64,
    /// When the row was (or will be) visible, as read.
    pub(crate) visible_at: i64,
}

impl StoredRow {
    /// Reads a row selected with [`ROW_COLUMNS`].
    pub(crate) fn from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
            seq: r.get(0)?,
            id: r.get(1)?,
            kind: r.get(2)?,
            correlation_id: r.get(3)?,
            causation_id: r.get(4)?,
            reply_to: r.get(5)?,
            content_type: r.get(6)?,
            headers: r.get(7)?,
            timestamp: r.get(8)?,
            priority: r.get(9)?,
            expires_at: r.get(10)?,
            topic: r.get(11)?,
            payload: r.get(12)?,
            attempt: r.get(13)?,
            visible_at: r.get(14)?,
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

    /// The message, the attempt number and the topic it was published to.
    pub(crate) fn into_message(self) -> (Message, u32, Option<Topic>) {
        let headers = self.parse_headers();
        let id = Uuid::parse_str(&self.id).unwrap_or_else(|_| {
            tracing::warn!(seq = self.seq, id = %self.id, "unreadable message id");
            Uuid::nil()
        });
        let topic = self.topic.as_deref().and_then(|t| Topic::new(t).ok());
        let attempt = u32::try_from(self.attempt.max(0)).unwrap_or(u32::MAX);
        let message = Message {
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
        };
        (message, attempt, topic)
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
