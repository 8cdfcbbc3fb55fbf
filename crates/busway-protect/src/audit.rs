//! The audit trail: who published and who consumed what.

use std::sync::Mutex;
use std::time::SystemTime;

use uuid::Uuid;

/// What happened to a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum AuditAction {
    /// It was protected and handed to the transport.
    Published,
    /// It was received and opened, and goes to a handler.
    Consumed,
    /// It was received and refused (dead-lettered).
    Rejected,
}

impl AuditAction {
    /// `published`, `consumed` or `rejected`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Published => "published",
            Self::Consumed => "consumed",
            Self::Rejected => "rejected",
        }
    }
}

/// One entry of the audit trail. It names the message, never its content.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct AuditRecord {
    /// What happened.
    pub action: AuditAction,
    /// Who did it: the principal configured on the protection.
    pub principal: String,
    /// The message's id.
    pub message_id: Uuid,
    /// The message's type.
    pub kind: String,
    /// The topic or queue it was published to, or the queue it was consumed from.
    pub address: String,
    /// The key that protected it, if any.
    pub key_id: Option<String>,
    /// Why it was rejected.
    pub reason: Option<String>,
    /// When.
    pub at: SystemTime,
}

impl AuditRecord {
    /// A record of `action` by `principal` on the message `message_id` of type `kind` at `address`, now.
    pub fn new(
        action: AuditAction,
        principal: impl Into<String>,
        message_id: Uuid,
        kind: impl Into<String>,
        address: impl Into<String>,
    ) -> Self {
        Self {
            action,
            principal: principal.into(),
            message_id,
            kind: kind.into(),
            address: address.into(),
            key_id: None,
            reason: None,
            at: SystemTime::now(),
        }
    }

    /// Sets the key id.
    pub fn with_key_id(mut self, key_id: Option<String>) -> Self {
        self.key_id = key_id;
        self
    }

    /// Sets the reason.
    pub fn with_reason(mut self, reason: impl Into<String>) -> Self {
        self.reason = Some(reason.into());
        self
    }
}

/// Where audit records go. Implementations must not block for long: they
/// run on the publish and consume paths.
///
/// ```
/// use busway_protect::{AuditAction, AuditRecord, AuditSink, MemoryAuditLog};
/// let log = MemoryAuditLog::default();
/// log.record(&AuditRecord::new(AuditAction::Published, "billing", uuid::Uuid::now_v7(), "invoice.sent", "invoice.sent"));
/// assert_eq!(log.records()[0].principal, "billing");
/// ```
pub trait AuditSink: Send + Sync + 'static {
    /// Records one entry.
    fn record(&self, record: &AuditRecord);
}

/// Writes audit records as `tracing` events at INFO level with target
/// `busway::audit`, so a subscriber can route them to their own log file.
///
/// ```
/// use busway_protect::{AuditAction, AuditRecord, AuditSink, TracingAuditLog};
/// TracingAuditLog.record(&AuditRecord::new(AuditAction::Consumed, "mailer", uuid::Uuid::now_v7(), "send_email", "task_queue"));
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct TracingAuditLog;

impl AuditSink for TracingAuditLog {
    fn record(&self, r: &AuditRecord) {
        tracing::info!(
            target: "busway::audit",
            action = r.action.as_str(),
            principal = %r.principal,
            message_id = %r.message_id,
            kind = %r.kind,
            address = %r.address,
            key_id = r.key_id.as_deref().unwrap_or(""),
            reason = r.reason.as_deref().unwrap_or(""),
            "audit"
        );
    }
}

/// Keeps audit records in memory (for tests, or to forward in batches).
#[derive(Debug, Default)]
pub struct MemoryAuditLog {
    records: Mutex<Vec<AuditRecord>>,
}

impl MemoryAuditLog {
    /// The records so far, oldest first.
    pub fn records(&self) -> Vec<AuditRecord> {
        self.records
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl AuditSink for MemoryAuditLog {
    fn record(&self, record: &AuditRecord) {
        self.records
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(record.clone());
    }
}
