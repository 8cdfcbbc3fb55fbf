//! How busway names become stream names, subjects and subject tokens.

use busway_core::{QueueName, QueueSpec};

/// Header: deliveries counted before this copy of the message was stored.
pub(crate) const ATTEMPTS: &str = "Busway-Attempts";
/// Header of a delayed message: when it is due, in Unix milliseconds.
pub(crate) const DUE: &str = "Busway-Due";
/// Header of a delayed message: the priority level it goes to when due.
pub(crate) const LEVEL: &str = "Busway-Level";
/// Header of a dead letter: why (also in the message's own headers).
pub(crate) const REASON: &str = "Busway-Dead-Letter-Reason";

/// The durable consumer of the delayed messages of a queue.
pub(crate) const DELAYED_CONSUMER: &str = "delayed";

/// A queue name as one stream-name part and one subject token: letters,
/// digits and `-` kept; `_` → `__`, `.` → `_d`, `:` → `_c`.
pub(crate) fn encode_queue(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 4);
    for c in name.chars() {
        match c {
            '_' => out.push_str("__"),
            '.' => out.push_str("_d"),
            ':' => out.push_str("_c"),
            c => out.push(c),
        }
    }
    out
}

/// Reverses [`encode_queue`]; `None` for what it cannot have written.
pub(crate) fn decode_queue(encoded: &str) -> Option<String> {
    let mut out = String::with_capacity(encoded.len());
    let mut chars = encoded.chars();
    while let Some(c) = chars.next() {
        if c == '_' {
            match chars.next()? {
                '_' => out.push('_'),
                'd' => out.push('.'),
                'c' => out.push(':'),
                _ => return None,
            }
        } else {
            out.push(c);
        }
    }
    Some(out)
}

/// Lowercase hex, for binding patterns in subject tokens.
pub(crate) fn hex(text: &str) -> String {
    text.bytes().map(|b| format!("{b:02x}")).collect()
}

/// Reverses [`hex`].
pub(crate) fn unhex(token: &str) -> Option<String> {
    if !token.len().is_multiple_of(2) {
        return None;
    }
    let bytes = (0..token.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(token.get(i..i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    String::from_utf8(bytes).ok()
}

/// What a transport knows about a declared queue.
#[derive(Debug)]
pub(crate) struct QueueInfo {
    pub(crate) name: QueueName,
    pub(crate) spec: QueueSpec,
    /// The stream: `{prefix}_{encoded queue}`.
    pub(crate) stream: String,
    /// `{prefix}.q.{encoded queue}`; levels are `….p0`…`….p9`, delays `….delayed`.
    pub(crate) subject_base: String,
    /// `{prefix}.live.{encoded queue}`: one subject per live consumer under it.
    pub(crate) live_base: String,
    /// Priority levels (1 without priorities).
    pub(crate) levels: usize,
}

impl QueueInfo {
    pub(crate) fn new(prefix: &str, spec: QueueSpec) -> Self {
        let encoded = encode_queue(spec.name.as_str());
        Self {
            name: spec.name.clone(),
            stream: stream_name(prefix, spec.name.as_str()),
            subject_base: format!("{prefix}.q.{encoded}"),
            live_base: format!("{prefix}.live.{encoded}"),
            levels: spec.max_priority.map_or(1, |m| usize::from(m) + 1),
            spec,
        }
    }

    /// The level a message of priority `p` goes to.
    pub(crate) fn level(&self, p: u8) -> usize {
        usize::from(p).min(self.levels - 1)
    }

    pub(crate) fn level_subject(&self, level: usize) -> String {
        format!("{}.p{level}", self.subject_base)
    }

    pub(crate) fn delayed_subject(&self) -> String {
        format!("{}.delayed", self.subject_base)
    }

    pub(crate) fn level_consumer(level: usize) -> String {
        format!("p{level}")
    }
}

/// The stream of queue `name`.
pub(crate) fn stream_name(prefix: &str, name: &str) -> String {
    format!("{prefix}_{}", encode_queue(name))
}

/// The queue a stream of this prefix holds, if it is one.
pub(crate) fn queue_of_stream(prefix: &str, stream: &str) -> Option<QueueName> {
    let encoded = stream.strip_prefix(prefix)?.strip_prefix('_')?;
    QueueName::new(decode_queue(encoded)?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_names_round_trip() {
        for name in ["a", "task_queue", "orders.dlq", "a:b.c_d-e", "__", "_d"] {
            let e = encode_queue(name);
            assert!(!e.contains(['.', ':', '*', '>', ' ']), "{e}");
            assert_eq!(decode_queue(&e).as_deref(), Some(name));
        }
        assert_ne!(encode_queue("a.b"), encode_queue("a_b"));
        assert_eq!(decode_queue("a_x"), None);
    }

    #[test]
    fn hex_round_trips() {
        assert_eq!(unhex(&hex("order.#")).as_deref(), Some("order.#"));
        assert_eq!(unhex("zz"), None);
    }

    #[test]
    fn streams_map_back_to_queues() -> Result<(), busway_core::NameError> {
        let q = QueueName::new("orders.dlq")?;
        let s = stream_name("busway", q.as_str());
        assert_eq!(queue_of_stream("busway", &s), Some(q));
        assert_eq!(queue_of_stream("busway", "busway-bindings"), None);
        assert_eq!(queue_of_stream("other", &s), None);
        Ok(())
    }
}
