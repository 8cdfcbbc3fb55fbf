//! Names of the headers busway itself sets on messages.
//!
//! Dead letters carry the reason they were dead-lettered and where they came
//! from, so an operator can inspect and replay them.

/// Why the message was dead-lettered (`max attempts (5) exceeded`, `expired`, a handler's reason).
pub const DEAD_LETTER_REASON: &str = "x-dead-letter-reason";
/// The topic the message was originally published to, if any.
pub const ORIGINAL_TOPIC: &str = "x-original-topic";
/// The queue the message was dead-lettered from.
pub const ORIGINAL_QUEUE: &str = "x-original-queue";
/// How many times the message had been delivered when it was dead-lettered.
pub const ATTEMPTS: &str = "x-attempts";
/// When the message was dead-lettered, in milliseconds since the Unix epoch.
pub const DEAD_LETTERED_AT: &str = "x-dead-lettered-at";
