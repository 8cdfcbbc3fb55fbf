//! Queue and binding specifications.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::address::{QueueName, TopicPattern};
use crate::error::DeclareError;

/// How a queue behaves. Declaring the same spec twice is a no-op; declaring
/// a different spec for an existing queue is a [`DeclareError::Conflict`].
///
/// ```
/// use busway_core::{QueueName, QueueSpec};
/// use std::time::Duration;
///
/// let spec = QueueSpec::new(QueueName::new("task_queue")?)
///     .with_max_priority(9)
///     .with_message_ttl(Duration::from_secs(86_400))
///     .with_max_attempts(5);
/// assert_eq!(spec.dead_letter.as_ref().map(|q| q.as_str()), Some("dead_letter_task_queue"));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSpec {
    /// The queue's name.
    pub name: QueueName,
    /// Whether messages survive a restart (always true on the embedded backend).
    pub durable: bool,
    /// `Some(n)` makes this a priority queue honouring priorities 0..=n (n ≤ 9);
    /// `None` delivers in publish order regardless of priority.
    pub max_priority: Option<u8>,
    /// Messages older than this are dead-lettered as expired.
    #[serde(with = "opt_millis")]
    pub message_ttl: Option<Duration>,
    /// After this many deliveries a nacked or abandoned message is dead-lettered.
    pub max_attempts: Option<u32>,
    /// Where dead letters go. `None` only for dead-letter queues themselves.
    pub dead_letter: Option<QueueName>,
    /// Publishing to a full queue fails with `PublishError::QueueFull`.
    pub max_length: Option<u64>,
}

impl QueueSpec {
    /// A durable queue without priorities, TTL, attempt limit or length limit,
    /// dead-lettering to `dead_letter_{name}`.
    pub fn new(name: QueueName) -> Self {
        Self {
            dead_letter: Some(name.dead_letter_queue()),
            name,
            durable: true,
            max_priority: None,
            message_ttl: None,
            max_attempts: None,
            max_length: None,
        }
    }

    /// The spec of a dead-letter queue: durable, no limits, no dead-letter queue of its own.
    pub fn dead_letter_queue(name: QueueName) -> Self {
        Self {
            dead_letter: None,
            ..Self::new(name)
        }
    }

    /// The spec of a temporary queue (see
    /// [`Transport::declare_temporary_queue`](crate::Transport::declare_temporary_queue)):
    /// not durable, no dead-letter queue, no limits.
    pub fn temporary(name: QueueName) -> Self {
        Self {
            durable: false,
            dead_letter: None,
            ..Self::new(name)
        }
    }

    /// Sets durability.
    pub fn with_durable(mut self, durable: bool) -> Self {
        self.durable = durable;
        self
    }
    /// Makes this a priority queue for priorities 0..=`max` (at most 9).
    pub fn with_max_priority(mut self, max: u8) -> Self {
        self.max_priority = Some(max);
        self
    }
    /// Sets the per-queue message TTL.
    pub fn with_message_ttl(mut self, ttl: Duration) -> Self {
        self.message_ttl = Some(ttl);
        self
    }
    /// Sets the maximum number of deliveries before dead-lettering.
    pub fn with_max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = Some(attempts);
        self
    }
    /// Sets (or with `None` removes) the dead-letter queue.
    pub fn with_dead_letter(mut self, queue: Option<QueueName>) -> Self {
        self.dead_letter = queue;
        self
    }
    /// Sets the maximum number of messages the queue holds.
    pub fn with_max_length(mut self, max: u64) -> Self {
        self.max_length = Some(max);
        self
    }

    /// Checks the spec on its own.
    pub fn validate(&self) -> Result<(), DeclareError> {
        let invalid = |reason: &str| {
            Err(DeclareError::InvalidSpec {
                queue: self.name.clone(),
                reason: reason.into(),
            })
        };
        if self.max_priority.is_some_and(|p| p > 9) {
            return invalid("max_priority must be within 0-9");
        }
        if self.max_attempts == Some(0) {
            return invalid("max_attempts must be at least 1");
        }
        if self.max_length == Some(0) {
            return invalid("max_length must be at least 1");
        }
        if self.message_ttl == Some(Duration::ZERO) {
            return invalid("message_ttl must be positive");
        }
        if self.dead_letter.as_ref() == Some(&self.name) {
            return invalid("a queue cannot be its own dead-letter queue");
        }
        Ok(())
    }

    /// The spec to declare for this queue's dead-letter queue, if it has one.
    pub fn dead_letter_spec(&self) -> Option<QueueSpec> {
        self.dead_letter.clone().map(QueueSpec::dead_letter_queue)
    }

    /// `Ok` if a queue declared as `self` may be re-declared as `requested`.
    pub fn check_redeclare(&self, requested: &QueueSpec) -> Result<(), DeclareError> {
        if self == requested {
            Ok(())
        } else {
            Err(DeclareError::Conflict {
                existing: Box::new(self.clone()),
                requested: Box::new(requested.clone()),
            })
        }
    }
}

impl fmt::Display for QueueSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "durable={}", self.durable)?;
        let opt = |v: Option<String>| v.unwrap_or_else(|| "none".into());
        write!(
            f,
            ", max_priority={}",
            opt(self.max_priority.map(|v| v.to_string()))
        )?;
        write!(
            f,
            ", message_ttl={}",
            opt(self.message_ttl.map(|v| format!("{}ms", v.as_millis())))
        )?;
        write!(
            f,
            ", max_attempts={}",
            opt(self.max_attempts.map(|v| v.to_string()))
        )?;
        write!(
            f,
            ", dead_letter={}",
            opt(self.dead_letter.as_ref().map(|v| v.to_string()))
        )?;
        write!(
            f,
            ", max_length={}",
            opt(self.max_length.map(|v| v.to_string()))
        )
    }
}

/// Routes messages published to topics matching `pattern` into `queue`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Binding {
    /// The queue that receives the messages.
    pub queue: QueueName,
    /// The topic pattern.
    pub pattern: TopicPattern,
}

impl Binding {
    /// A binding of `queue` to `pattern`.
    pub fn new(queue: QueueName, pattern: TopicPattern) -> Self {
        Self { queue, pattern }
    }
}

mod opt_millis {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub(super) fn serialize<S: Serializer>(v: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(d) => s.serialize_some(&u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        Ok(Option::<u64>::deserialize(d)?.map(Duration::from_millis))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conflict_names_both_specs() -> Result<(), Box<dyn std::error::Error>> {
        let a = QueueSpec::new(QueueName::new("q")?);
        let b = a.clone().with_max_priority(9);
        a.check_redeclare(&a)?;
        let message = a
            .check_redeclare(&b)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(message.contains("max_priority=none"), "{message}");
        assert!(message.contains("max_priority=9"), "{message}");
        Ok(())
    }

    #[test]
    fn spec_round_trips_through_json() -> Result<(), Box<dyn std::error::Error>> {
        let spec = QueueSpec::new(QueueName::new("q")?)
            .with_message_ttl(Duration::from_millis(1500))
            .with_max_attempts(3);
        let back: QueueSpec = serde_json::from_str(&serde_json::to_string(&spec)?)?;
        assert_eq!(back, spec);
        Ok(())
    }
}
