//! Dead-letter inspection and replay, the same on every backend.
//!
//! A queue's dead letters sit in its dead-letter queue (`dead_letter_{queue}`
//! by default), each with the reason, the original queue or topic, the
//! attempt count and the time in its headers. [`DeadLetters`] lists them,
//! moves them back to where they came from (or elsewhere) and purges them,
//! filtered by reason, message type and age.
//!
//! It works through the transport's ordinary consume: a pass leases every
//! message of the dead-letter queue, settles those that match and returns the
//! others when it ends. Run one pass at a time per queue; a consumer of the
//! dead-letter queue running meanwhile competes for the same messages.
//!
//! ```
//! use std::time::Duration;
//! use busway::dead_letters::{DeadLetterFilter, Replay};
//! use busway::{Bus, HandlerError};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let bus = Bus::connect("memory://").await?;
//! bus.register_task_handler("send_email", |_p: serde_json::Value| async {
//!     Err::<(), _>(HandlerError::permanent("mailbox does not exist"))
//! });
//! bus.start_task_workers().await?;
//! bus.submit_task("send_email", &serde_json::json!({"email": "a@bounce.test"})).await?;
//!
//! let dead = bus.dead_letters("task_queue")?;
//! # for _ in 0..500 { if dead.count().await? == 1 { break } tokio::time::sleep(Duration::from_millis(10)).await }
//! let listed = dead.list(&DeadLetterFilter::default()).await?;
//! assert_eq!(
//!     listed[0].reason.as_deref(),
//!     Some("task `send_email` failed permanently: mailbox does not exist")
//! );
//!
//! // Fixed the bug? Send them back to `task_queue`.
//! let report = dead.replay(&DeadLetterFilter::default(), &Replay::default()).await?;
//! assert_eq!(report.moved, 1);
//! # bus.shutdown().await;
//! # Ok(())
//! # }
//! ```

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use busway_core::{
    headers, unix_millis, ConsumeError, ConsumeOptions, DeclareError, Delivery, DeliveryStream,
    Message, NameError, Publish, PublishError, QueueName, QueueSpec, SettleError, StatsError,
    Transport,
};
use futures::StreamExt;

/// Header set on a replayed message: how many times it was replayed.
pub const REPLAYED: &str = "x-replayed";

/// How long a pass waits for one more message before it decides the queue
/// holds no more.
const IDLE: Duration = Duration::from_millis(300);

/// The most messages one pass leases at once.
const MAX_PASS: usize = u16::MAX as usize;

/// A dead-letter operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeadLetterError {
    /// A queue name is not valid.
    #[error(transparent)]
    InvalidName(#[from] NameError),
    /// Reading the dead-letter queue failed.
    #[error("reading the dead-letter queue failed")]
    Consume(#[from] ConsumeError),
    /// Counting the dead-letter queue failed.
    #[error("counting the dead-letter queue failed")]
    Stats(#[from] StatsError),
    /// Moving a message back failed; it stays in the dead-letter queue.
    #[error("republishing a dead letter failed")]
    Publish(#[from] PublishError),
    /// Declaring the queue given to replay to failed.
    #[error("declaring the replay target failed")]
    Declare(#[from] DeclareError),
    /// Removing a message from the dead-letter queue failed.
    #[error("settling a dead letter failed")]
    Settle(#[from] SettleError),
    /// The message names no queue to go back to and no `--to` was given.
    #[error("dead letter {id} records no original queue; say where to replay it")]
    NoDestination {
        /// The message id.
        id: String,
    },
}

/// One dead letter, with what its headers say of it.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct DeadLetter {
    /// The message as it was dead-lettered.
    pub message: Message,
    /// Why it was dead-lettered.
    pub reason: Option<String>,
    /// The queue it was consumed from.
    pub original_queue: Option<String>,
    /// The topic it was published to, if any.
    pub original_topic: Option<String>,
    /// How many deliveries it had.
    pub attempts: Option<u32>,
    /// When it was dead-lettered (milliseconds since the Unix epoch).
    pub dead_lettered_at: Option<i64>,
}

impl DeadLetter {
    fn new(message: Message) -> Self {
        let get = |name: &str| message.headers.get(name).map(str::to_owned);
        Self {
            reason: get(headers::DEAD_LETTER_REASON),
            original_queue: get(headers::ORIGINAL_QUEUE),
            original_topic: get(headers::ORIGINAL_TOPIC),
            attempts: get(headers::ATTEMPTS).and_then(|a| a.parse().ok()),
            dead_lettered_at: get(headers::DEAD_LETTERED_AT).and_then(|a| a.parse().ok()),
            message,
        }
    }

    /// How long ago it was dead-lettered (or published, if the time was not recorded).
    pub fn age(&self) -> Duration {
        let at = self
            .dead_lettered_at
            .unwrap_or_else(|| unix_millis(self.message.timestamp));
        let now = unix_millis(SystemTime::now());
        Duration::from_millis(u64::try_from(now.saturating_sub(at)).unwrap_or(0))
    }
}

/// Which dead letters an operation takes; every condition set must hold.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct DeadLetterFilter {
    /// The reason contains this text.
    pub reason: Option<String>,
    /// The message type (`kind`) is exactly this.
    pub kind: Option<String>,
    /// Dead-lettered at least this long ago.
    pub older_than: Option<Duration>,
    /// Dead-lettered at most this long ago.
    pub newer_than: Option<Duration>,
    /// Take at most this many.
    pub limit: Option<usize>,
}

impl DeadLetterFilter {
    /// Only those whose reason contains `text`.
    pub fn reason(mut self, text: impl Into<String>) -> Self {
        self.reason = Some(text.into());
        self
    }
    /// Only those of message type `kind`.
    pub fn kind(mut self, kind: impl Into<String>) -> Self {
        self.kind = Some(kind.into());
        self
    }
    /// Only those dead-lettered at least `age` ago.
    pub fn older_than(mut self, age: Duration) -> Self {
        self.older_than = Some(age);
        self
    }
    /// Only those dead-lettered at most `age` ago.
    pub fn newer_than(mut self, age: Duration) -> Self {
        self.newer_than = Some(age);
        self
    }
    /// At most `n` of them.
    pub fn limit(mut self, n: usize) -> Self {
        self.limit = Some(n);
        self
    }

    /// Whether `dead` passes every condition but the limit.
    pub fn matches(&self, dead: &DeadLetter) -> bool {
        let reason_ok = self.reason.as_ref().is_none_or(|text| {
            dead.reason
                .as_deref()
                .is_some_and(|reason| reason.contains(text.as_str()))
        });
        let kind_ok = self.kind.as_ref().is_none_or(|k| &dead.message.kind == k);
        let age = dead.age();
        reason_ok
            && kind_ok
            && self.older_than.is_none_or(|min| age >= min)
            && self.newer_than.is_none_or(|max| age <= max)
    }
}

/// Where and how [`DeadLetters::replay`] sends messages.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct Replay {
    /// Send them here instead of their original queue.
    pub to: Option<QueueName>,
    /// Only count what would move; change nothing.
    pub dry_run: bool,
}

impl Replay {
    /// Send them to `queue` instead of their original queue.
    pub fn to(mut self, queue: QueueName) -> Self {
        self.to = Some(queue);
        self
    }
    /// Change nothing, only count.
    pub fn dry_run(mut self, dry_run: bool) -> Self {
        self.dry_run = dry_run;
        self
    }
}

/// What a replay or purge did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PassReport {
    /// Messages that matched and were moved (replay), removed (purge), or
    /// would have been (dry run).
    pub moved: u64,
    /// Messages that did not match and stay.
    pub kept: u64,
}

/// The dead letters of one queue. See the [module docs](self).
#[derive(Clone)]
pub struct DeadLetters {
    transport: Arc<dyn Transport>,
    queue: QueueName,
}

impl std::fmt::Debug for DeadLetters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeadLetters")
            .field("queue", &self.queue)
            .finish_non_exhaustive()
    }
}

impl DeadLetters {
    /// The dead letters of `queue`: its dead-letter queue `dead_letter_{queue}`,
    /// or `queue` itself when it already is one (its name starts with
    /// `dead_letter_`).
    pub fn new(transport: Arc<dyn Transport>, queue: &str) -> Result<Self, NameError> {
        let queue = QueueName::new(queue)?;
        let queue = if queue.as_str().starts_with("dead_letter_") {
            queue
        } else {
            queue.dead_letter_queue()
        };
        Ok(Self { transport, queue })
    }

    /// The dead-letter queue this reads.
    pub fn queue(&self) -> &QueueName {
        &self.queue
    }

    /// How many dead letters wait (0 if the queue was never declared).
    pub async fn count(&self) -> Result<u64, DeadLetterError> {
        match self.transport.queue_stats(&self.queue).await {
            Ok(stats) => Ok(stats.ready + stats.delayed),
            Err(StatsError::QueueNotFound(_)) => Ok(0),
            Err(e) => Err(e.into()),
        }
    }

    /// The dead letters that match `filter`, oldest first. They stay in the queue.
    pub async fn list(
        &self,
        filter: &DeadLetterFilter,
    ) -> Result<Vec<DeadLetter>, DeadLetterError> {
        let pass = self.take(filter).await?;
        Ok(pass.matched.into_iter().map(|(_, dead)| dead).collect())
    }

    /// Moves the matching dead letters back to their original queue (or to
    /// `replay.to`, declared with the defaults if it does not exist), with their attempt count reset and [`REPLAYED`] counted
    /// up. Each is republished before it leaves the dead-letter queue, so a
    /// failure can duplicate one but never lose one.
    pub async fn replay(
        &self,
        filter: &DeadLetterFilter,
        replay: &Replay,
    ) -> Result<PassReport, DeadLetterError> {
        let pass = self.take(filter).await?;
        let report = pass.report();
        if replay.dry_run {
            return Ok(report);
        }
        let replayed = ::metrics::counter!("busway_dead_letters_replayed_total",
            "queue" => self.queue.as_str().to_owned());
        for (delivery, dead) in pass.matched {
            let destination = match (&replay.to, &dead.original_queue) {
                (Some(q), _) => q.clone(),
                (None, Some(q)) => QueueName::new(q.as_str())?,
                (None, None) => {
                    return Err(DeadLetterError::NoDestination {
                        id: dead.message.id.to_string(),
                    })
                }
            };
            let message = revived(dead.message);
            match self
                .transport
                .publish(Publish::to_queue(destination.clone(), message.clone()))
                .await
            {
                // A new target queue: declare it with the defaults, once.
                Err(PublishError::QueueNotFound(_)) if replay.to.is_some() => {
                    self.transport
                        .declare_queue(&QueueSpec::new(destination.clone()))
                        .await?;
                    self.transport
                        .publish(Publish::to_queue(destination, message))
                        .await?;
                }
                other => other?,
            }
            delivery.ack().await?;
            replayed.increment(1);
        }
        Ok(report)
    }

    /// Removes the matching dead letters for good (or only counts them with `dry_run`).
    pub async fn purge(
        &self,
        filter: &DeadLetterFilter,
        dry_run: bool,
    ) -> Result<PassReport, DeadLetterError> {
        let pass = self.take(filter).await?;
        let report = pass.report();
        if !dry_run {
            let purged = ::metrics::counter!("busway_dead_letters_purged_total",
                "queue" => self.queue.as_str().to_owned());
            for (delivery, _) in pass.matched {
                delivery.ack().await?;
                purged.increment(1);
            }
        }
        Ok(report)
    }

    /// Leases every message the queue holds when the pass begins (up to
    /// 65,535) and sorts them into those that match `filter` and the others.
    /// Everything not settled goes back to the queue, in its place, when the
    /// pass is dropped.
    async fn take(&self, filter: &DeadLetterFilter) -> Result<Pass, DeadLetterError> {
        let total = usize::try_from(self.count().await?).unwrap_or(usize::MAX);
        let mut pass = Pass {
            matched: Vec::new(),
            others: Vec::new(),
            _stream: None,
        };
        if total == 0 {
            return Ok(pass);
        }
        let want = total.min(MAX_PASS);
        let prefetch = u16::try_from(want).unwrap_or(u16::MAX);
        let mut stream = self
            .transport
            .consume(&self.queue, ConsumeOptions::with_prefetch(prefetch))
            .await?;
        let limit = filter.limit.unwrap_or(usize::MAX);
        while pass.matched.len() + pass.others.len() < want {
            let delivery = match tokio::time::timeout(IDLE, stream.next()).await {
                Ok(Some(delivery)) => delivery?,
                Ok(None) | Err(_) => break,
            };
            let dead = DeadLetter::new(delivery.message().clone());
            if pass.matched.len() < limit && filter.matches(&dead) {
                pass.matched.push((delivery, dead));
            } else {
                pass.others.push(delivery);
            }
        }
        pass._stream = Some(stream);
        Ok(pass)
    }
}

impl crate::Bus {
    /// The dead letters of `queue` (see [`DeadLetters::new`]).
    pub fn dead_letters(&self, queue: &str) -> Result<DeadLetters, NameError> {
        DeadLetters::new(self.transport().clone(), queue)
    }
}

/// The message to send back: same id, type and body; dead-letter headers
/// gone, attempts reset, replays counted.
fn revived(mut message: Message) -> Message {
    let replays = message
        .headers
        .get(REPLAYED)
        .and_then(|n| n.parse::<u32>().ok())
        .unwrap_or(0);
    for name in [
        headers::DEAD_LETTER_REASON,
        headers::ORIGINAL_QUEUE,
        headers::ORIGINAL_TOPIC,
        headers::ATTEMPTS,
        headers::DEAD_LETTERED_AT,
    ] {
        message.headers.remove(name);
    }
    message.headers.insert(REPLAYED, (replays + 1).to_string());
    message.expires_at = None;
    message
}

/// The leased messages of one pass. Fields drop in order: unsettled
/// deliveries go back before the consumer ends.
struct Pass {
    matched: Vec<(Delivery, DeadLetter)>,
    others: Vec<Delivery>,
    _stream: Option<DeliveryStream>,
}

impl Pass {
    fn report(&self) -> PassReport {
        PassReport {
            moved: self.matched.len() as u64,
            kept: self.others.len() as u64,
        }
    }
}
