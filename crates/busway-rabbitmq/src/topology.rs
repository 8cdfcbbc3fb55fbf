//! Queue arguments in the reference wire format, delay queues, and reading
//! back what the broker says about an existing queue.

use std::time::Duration;

use busway_core::{QueueName, QueueSpec};
use lapin::types::{AMQPValue, FieldTable};

use crate::wire::{int_value, str_value};

/// busway's attempt limit, stored with the queue (RabbitMQ ignores unknown
/// arguments when comparing declarations; busway compares them itself).
pub(crate) const ARG_MAX_ATTEMPTS: &str = "x-busway-max-attempts";

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The `queue.declare` arguments for `spec`, exactly as the reference code
/// declares its queues (plus the opt-in ones). `quorum` adds
/// `x-queue-type: quorum` and the broker-side attempt limit.
pub(crate) fn queue_arguments(
    spec: &QueueSpec,
    dead_letter_exchange: &str,
    quorum: bool,
) -> FieldTable {
    let mut args = FieldTable::default();
    if quorum {
        args.insert("x-queue-type".into(), str_value("quorum"));
        if let Some(n) = spec.max_attempts {
            args.insert("x-delivery-limit".into(), int_value(i64::from(n)));
        }
    }
    if let Some(ttl) = spec.message_ttl {
        args.insert("x-message-ttl".into(), int_value(millis(ttl)));
    }
    if let Some(dlq) = &spec.dead_letter {
        args.insert(
            "x-dead-letter-exchange".into(),
            str_value(dead_letter_exchange),
        );
        args.insert("x-dead-letter-routing-key".into(), str_value(dlq.as_str()));
    }
    if let Some(p) = spec.max_priority {
        args.insert("x-max-priority".into(), int_value(i64::from(p)));
    }
    if let Some(max) = spec.max_length {
        args.insert(
            "x-max-length".into(),
            int_value(i64::try_from(max).unwrap_or(i64::MAX)),
        );
        args.insert("x-overflow".into(), str_value("reject-publish"));
    }
    if let Some(n) = spec.max_attempts {
        args.insert(ARG_MAX_ATTEMPTS.into(), int_value(i64::from(n)));
    }
    args
}

/// Rounds a delay up to a small set of values, so jittered backoffs share
/// delay queues: two significant digits, at least 10 ms. Never shorter.
pub(crate) fn delay_tier(delay: Duration) -> u64 {
    let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX).max(1);
    let mut step = 10u64;
    while ms / step >= 100 {
        step = step.saturating_mul(10);
    }
    ms.div_ceil(step).saturating_mul(step)
}

/// How long an idle delay queue lives after its last declaration.
pub(crate) const DELAY_QUEUE_IDLE: Duration = Duration::from_secs(300);

/// A delay queue: messages wait `ttl_ms`, then the broker dead-letters them
/// to their destination.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct DelayQueue {
    /// Its name.
    pub(crate) name: String,
    /// The delay in milliseconds.
    pub(crate) ttl_ms: u64,
    /// Where messages go when due: (exchange, routing key).
    pub(crate) exchange: String,
    pub(crate) routing_key: String,
}

impl DelayQueue {
    /// The delay queue in front of `queue`.
    pub(crate) fn for_queue(queue: &QueueName, ttl_ms: u64) -> Self {
        Self {
            name: bounded(format!("busway.delay.{ttl_ms}.q.{queue}")),
            ttl_ms,
            exchange: String::new(),
            routing_key: queue.as_str().to_owned(),
        }
    }

    /// The delay queue in front of `topic` on `exchange`.
    pub(crate) fn for_topic(exchange: &str, topic: &str, ttl_ms: u64) -> Self {
        Self {
            name: bounded(format!("busway.delay.{ttl_ms}.t.{exchange}.{topic}")),
            ttl_ms,
            exchange: exchange.to_owned(),
            routing_key: topic.to_owned(),
        }
    }

    pub(crate) fn arguments(&self) -> FieldTable {
        let mut args = FieldTable::default();
        args.insert(
            "x-message-ttl".into(),
            int_value(i64::try_from(self.ttl_ms).unwrap_or(i64::MAX)),
        );
        args.insert(
            "x-expires".into(),
            int_value(
                i64::try_from(self.ttl_ms)
                    .unwrap_or(i64::MAX)
                    .saturating_add(millis(DELAY_QUEUE_IDLE)),
            ),
        );
        args.insert("x-dead-letter-exchange".into(), str_value(&self.exchange));
        args.insert(
            "x-dead-letter-routing-key".into(),
            str_value(&self.routing_key),
        );
        args
    }
}

/// Names longer than AMQP allows are shortened with a hash of the whole.
fn bounded(name: String) -> String {
    if name.len() <= 255 {
        return name;
    }
    // FNV-1a: stable across processes and versions.
    let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let hash = format!("{hash:016x}");
    let mut cut = 200;
    while !name.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}.{hash}", &name[..cut])
}

/// Describes the existing queue from a PRECONDITION_FAILED reply such as
/// `inequivalent arg 'x-max-priority' for queue 'q' in vhost '/': received
/// the value '9' of type 'signedint' but current is none`.
pub(crate) fn existing_from_reply(requested: &QueueSpec, reply: &str) -> Option<QueueSpec> {
    let arg = between(reply, "inequivalent arg '", "'")?;
    let current = reply.split("but current is ").nth(1)?;
    let value = if current.starts_with("none") {
        None
    } else {
        between(current, "'", "'")
    };
    let number = |v: Option<&str>| v.and_then(|v| v.parse::<u64>().ok());
    let mut existing = requested.clone();
    match arg {
        "durable" => existing.durable = value.is_some_and(|v| v == "true"),
        "x-max-priority" => {
            existing.max_priority = number(value).and_then(|n| u8::try_from(n).ok())
        }
        "x-message-ttl" => existing.message_ttl = number(value).map(Duration::from_millis),
        "x-max-length" => existing.max_length = number(value),
        "x-dead-letter-exchange" if value.is_none() => existing.dead_letter = None,
        "x-dead-letter-routing-key" => {
            existing.dead_letter = value.and_then(|v| QueueName::new(v).ok())
        }
        _ => return None,
    }
    Some(existing)
}

fn between<'a>(s: &'a str, start: &str, end: &str) -> Option<&'a str> {
    let rest = &s[s.find(start)? + start.len()..];
    Some(&rest[..rest.find(end)?])
}

/// Reads busway's arguments back (for tests and tooling).
#[allow(dead_code)]
pub(crate) fn arg_int(args: &FieldTable, key: &str) -> Option<i64> {
    match args.inner().get(key)? {
        AMQPValue::LongInt(n) => Some(i64::from(*n)),
        AMQPValue::LongLongInt(n) => Some(*n),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quorum_queue_arguments() -> Result<(), Box<dyn std::error::Error>> {
        let spec = QueueSpec::new(QueueName::new("orders")?).with_max_attempts(5);
        let args = queue_arguments(&spec, "dead_letter_exchange", true);
        assert_eq!(args.inner().get("x-queue-type"), Some(&str_value("quorum")));
        assert_eq!(args.inner().get("x-delivery-limit"), Some(&int_value(5)));
        let classic = queue_arguments(&spec, "dead_letter_exchange", false);
        assert!(classic.inner().get("x-queue-type").is_none());
        Ok(())
    }

    #[test]
    fn reference_task_queue_arguments() -> Result<(), Box<dyn std::error::Error>> {
        let spec = QueueSpec::new(QueueName::new("task_queue")?)
            .with_message_ttl(Duration::from_secs(86_400));
        let args = queue_arguments(&spec, "dead_letter_exchange", false);
        let keys: Vec<&str> = args.inner().keys().map(|k| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "x-dead-letter-exchange",
                "x-dead-letter-routing-key",
                "x-message-ttl"
            ]
        );
        assert_eq!(
            args.inner().get("x-message-ttl"),
            Some(&AMQPValue::LongInt(86_400_000))
        );
        assert_eq!(
            args.inner()
                .get("x-dead-letter-routing-key")
                .and_then(crate::wire::value_text)
                .as_deref(),
            Some("dead_letter_task_queue")
        );
        Ok(())
    }

    #[test]
    fn tiers_never_shorten() {
        for ms in [
            1u64, 9, 10, 11, 99, 100, 101, 600, 999, 1001, 1234, 86_400_001,
        ] {
            let t = delay_tier(Duration::from_millis(ms));
            assert!(t >= ms, "{ms} -> {t}");
            assert!(t <= ms + ms / 10 + 10, "{ms} -> {t}");
        }
    }

    #[test]
    fn existing_spec_from_broker_reply() -> Result<(), Box<dyn std::error::Error>> {
        let requested = QueueSpec::new(QueueName::new("q")?).with_max_priority(9);
        let reply = "PRECONDITION_FAILED - inequivalent arg 'x-max-priority' for queue 'q' in vhost '/': received the value '9' of type 'signedint' but current is none";
        let existing = existing_from_reply(&requested, reply).ok_or("not parsed")?;
        assert_eq!(existing.max_priority, None);
        let reply = "PRECONDITION_FAILED - inequivalent arg 'x-message-ttl' for queue 'q' in vhost '/': received none but current is the value '86400000' of type 'signedint'";
        let existing = existing_from_reply(&requested, reply).ok_or("not parsed")?;
        assert_eq!(existing.message_ttl, Some(Duration::from_secs(86_400)));
        Ok(())
    }
}
