#![doc = include_str!("../../../docs/guide/metrics.md")]

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use ::metrics::{Counter, Gauge, Histogram};
use busway_core::{Message, QueueName, StatsError};

#[cfg(feature = "prometheus")]
pub use metrics_exporter_prometheus::{BuildError, PrometheusBuilder, PrometheusHandle};

/// Histogram buckets, in seconds, for every `busway_*_seconds` histogram.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// A Prometheus recorder builder with [`LATENCY_BUCKETS`] for every
/// `*_seconds` histogram, for applications that configure it further or
/// build the recorder without installing it.
#[cfg(feature = "prometheus")]
pub fn prometheus_builder() -> PrometheusBuilder {
    let builder = PrometheusBuilder::new();
    // Only fails on an empty bucket list.
    match builder.set_buckets_for_metric(
        metrics_exporter_prometheus::Matcher::Suffix("_seconds".to_owned()),
        LATENCY_BUCKETS,
    ) {
        Ok(builder) => builder,
        Err(_) => PrometheusBuilder::new(),
    }
}

/// Installs a Prometheus recorder as the process-wide `metrics` recorder and
/// returns its handle; `handle.render()` is the text exposition format to serve
/// on `/metrics`. Histograms named `*_seconds` get [`LATENCY_BUCKETS`].
///
/// Fails if a recorder is already installed in this process.
///
/// ```
/// let handle = busway::metrics::install_prometheus()?;
/// metrics::counter!("busway_example_total").increment(1);
/// assert!(handle.render().contains("busway_example_total 1"));
/// # Ok::<(), busway::metrics::BuildError>(())
/// ```
#[cfg(feature = "prometheus")]
pub fn install_prometheus() -> Result<PrometheusHandle, BuildError> {
    prometheus_builder().install_recorder()
}

/// Why the bus dead-lettered a delivery: the `reason` label, kept to a few values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DeadLetterReason {
    /// A retryable failure on the last allowed attempt.
    Failed,
    /// The handler returned a permanent error.
    Permanent,
    /// The body could not be decoded.
    Malformed,
    /// No handler for the task type.
    UnknownType,
    /// Delivered more often than the retry policy allows.
    MaxAttempts,
    /// Other bad input (an invalid or corrupt stream chunk).
    Invalid,
}

impl DeadLetterReason {
    const ALL: [Self; 6] = [
        Self::Failed,
        Self::Permanent,
        Self::Malformed,
        Self::UnknownType,
        Self::MaxAttempts,
        Self::Invalid,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Self::Failed => "failed",
            Self::Permanent => "permanent",
            Self::Malformed => "malformed",
            Self::UnknownType => "unknown_type",
            Self::MaxAttempts => "max_attempts",
            Self::Invalid => "invalid",
        }
    }
}

/// The label of a queue: its name, less the random part of the temporary
/// queues the bus makes for itself.
fn queue_label(queue: &str) -> String {
    for prefix in ["rpc_reply", "query_cache"] {
        if queue
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('_'))
        {
            return prefix.to_owned();
        }
    }
    queue.to_owned()
}

tokio::task_local! {
    /// The metrics of the consumer whose delivery this task is handling.
    static CONSUMER: Arc<ConsumerMetrics>;
}

/// The handles of one consumer's queue, resolved when it starts.
pub(crate) struct ConsumerMetrics {
    queue: String,
    consumed: Counter,
    acked: Counter,
    retried: Counter,
    dead_lettered: [Counter; DeadLetterReason::ALL.len()],
    latency: Histogram,
    handlers: RwLock<HashMap<Box<str>, Arc<HandlerMetrics>>>,
}

impl std::fmt::Debug for ConsumerMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsumerMetrics")
            .field("queue", &self.queue)
            .finish_non_exhaustive()
    }
}

struct HandlerMetrics {
    ok: Histogram,
    error: Histogram,
}

impl ConsumerMetrics {
    pub(crate) fn new(queue: &QueueName) -> Arc<Self> {
        let queue = queue_label(queue.as_str());
        let counter = |name: &'static str| ::metrics::counter!(name, "queue" => queue.clone());
        Arc::new(Self {
            consumed: counter("busway_messages_consumed_total"),
            acked: counter("busway_messages_acked_total"),
            retried: counter("busway_messages_retried_total"),
            dead_lettered: DeadLetterReason::ALL.map(|reason| {
                ::metrics::counter!("busway_messages_dead_lettered_total",
                    "queue" => queue.clone(), "reason" => reason.as_str())
            }),
            latency: ::metrics::histogram!("busway_message_latency_seconds", "queue" => queue.clone()),
            handlers: RwLock::new(HashMap::new()),
            queue,
        })
    }

    /// Counts a delivery arriving, and its latency since it was created if
    /// this is its first delivery.
    pub(crate) fn received(&self, message: &Message, attempt: u32) {
        self.consumed.increment(1);
        if attempt <= 1 {
            if let Ok(age) = SystemTime::now().duration_since(message.timestamp) {
                self.latency.record(age.as_secs_f64());
            }
        }
    }

    fn handler(&self, name: &str) -> Arc<HandlerMetrics> {
        if let Some(found) = self
            .handlers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
        {
            return found.clone();
        }
        let histogram = |outcome: &'static str| {
            ::metrics::histogram!("busway_handler_duration_seconds",
                "queue" => self.queue.clone(), "handler" => name.to_owned(), "outcome" => outcome)
        };
        let made = Arc::new(HandlerMetrics {
            ok: histogram("ok"),
            error: histogram("error"),
        });
        self.handlers
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(name.into())
            .or_insert(made)
            .clone()
    }

    /// Runs `future` with these metrics as the current consumer's.
    pub(crate) async fn scope<F: std::future::Future>(self: Arc<Self>, future: F) -> F::Output {
        CONSUMER.scope(self, future).await
    }
}

fn with_consumer(f: impl FnOnce(&ConsumerMetrics)) {
    let _ = CONSUMER.try_with(|consumer| f(consumer));
}

/// Counts an ack of the current consumer's delivery.
pub(crate) fn acked() {
    with_consumer(|c| c.acked.increment(1));
}

/// Counts a retry (nack) of the current consumer's delivery.
pub(crate) fn retried() {
    with_consumer(|c| c.retried.increment(1));
}

/// Counts a dead-lettering of the current consumer's delivery.
pub(crate) fn dead_lettered(reason: DeadLetterReason) {
    with_consumer(|c| {
        if let Some(i) = DeadLetterReason::ALL.iter().position(|r| *r == reason) {
            c.dead_lettered[i].increment(1);
        }
    });
}

/// Times one handler call of the current consumer; [`finish`](Self::finish) records it.
pub(crate) struct HandlerTimer(Option<(Arc<HandlerMetrics>, Instant)>);

impl HandlerTimer {
    /// Starts timing handler `name` (the task type, event type or method).
    pub(crate) fn start(name: &str) -> Self {
        Self(
            CONSUMER
                .try_with(|c| (c.handler(name), Instant::now()))
                .ok(),
        )
    }

    /// Records the call's duration with its outcome.
    pub(crate) fn finish(self, ok: bool) {
        if let Some((handler, started)) = self.0 {
            let histogram = if ok { &handler.ok } else { &handler.error };
            histogram.record(started.elapsed().as_secs_f64());
        }
    }
}

/// The handles of one service's methods, by method.
type RpcMethods = HashMap<Box<str>, Arc<RpcMetrics>>;

/// The handles a bus resolves by name on first use.
#[derive(Default)]
pub(crate) struct BusMetrics {
    published: RwLock<HashMap<Box<str>, Counter>>,
    rpc: RwLock<HashMap<Box<str>, RpcMethods>>,
    late_replies: std::sync::OnceLock<Counter>,
    consumed_queues: std::sync::Mutex<Vec<QueueName>>,
}

impl std::fmt::Debug for BusMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BusMetrics").finish_non_exhaustive()
    }
}

impl BusMetrics {
    /// The metrics of a consumer starting on `queue`.
    pub(crate) fn consumer(&self, queue: &QueueName) -> Arc<ConsumerMetrics> {
        let mut queues = self
            .consumed_queues
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if !queues.contains(queue) {
            queues.push(queue.clone());
        }
        ConsumerMetrics::new(queue)
    }

    /// Counts a message published to `destination` (a queue or topic name).
    pub(crate) fn published(&self, destination: &str) {
        if let Some(counter) = self
            .published
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(destination)
        {
            return counter.increment(1);
        }
        let counter = ::metrics::counter!("busway_messages_published_total",
            "destination" => destination.to_owned());
        counter.increment(1);
        self.published
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(destination.into(), counter);
    }

    /// The handles of calls to `method` of `service`.
    pub(crate) fn rpc(&self, service: &str, method: &str) -> Arc<RpcMetrics> {
        if let Some(found) = self
            .rpc
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(service)
            .and_then(|methods| methods.get(method))
        {
            return found.clone();
        }
        let made = Arc::new(RpcMetrics::new(service, method));
        self.rpc
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(service.into())
            .or_default()
            .entry(method.into())
            .or_insert(made)
            .clone()
    }

    /// Counts a reply that found no call waiting for it.
    pub(crate) fn late_reply(&self) {
        self.late_replies
            .get_or_init(|| ::metrics::counter!("busway_rpc_late_replies_total"))
            .increment(1);
    }

    fn consumed_queues(&self) -> Vec<QueueName> {
        self.consumed_queues
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// How an RPC call ended, for the `outcome` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RpcOutcome {
    Ok,
    Error,
    Timeout,
    Unavailable,
}

impl RpcOutcome {
    const ALL: [Self; 4] = [Self::Ok, Self::Error, Self::Timeout, Self::Unavailable];

    fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Error => "error",
            Self::Timeout => "timeout",
            Self::Unavailable => "unavailable",
        }
    }

    pub(crate) fn of<T>(result: &Result<T, crate::RpcError>) -> Self {
        use crate::RpcError;
        match result {
            Ok(_) => Self::Ok,
            Err(RpcError::Timeout { .. }) => Self::Timeout,
            Err(RpcError::Remote { .. } | RpcError::Decode { .. } | RpcError::Encode(_)) => {
                Self::Error
            }
            Err(_) => Self::Unavailable,
        }
    }
}

/// The handles of one (service, method) a client calls.
pub(crate) struct RpcMetrics {
    calls: [Counter; RpcOutcome::ALL.len()],
    duration: [Histogram; RpcOutcome::ALL.len()],
}

impl RpcMetrics {
    fn new(service: &str, method: &str) -> Self {
        Self {
            calls: RpcOutcome::ALL.map(|outcome| {
                ::metrics::counter!("busway_rpc_client_calls_total",
                    "service" => service.to_owned(), "method" => method.to_owned(), "outcome" => outcome.as_str())
            }),
            duration: RpcOutcome::ALL.map(|outcome| {
                ::metrics::histogram!("busway_rpc_client_duration_seconds",
                    "service" => service.to_owned(), "method" => method.to_owned(), "outcome" => outcome.as_str())
            }),
        }
    }

    /// Records one call.
    pub(crate) fn record(&self, outcome: RpcOutcome, elapsed: Duration) {
        let i = outcome as usize;
        self.calls[i].increment(1);
        self.duration[i].record(elapsed.as_secs_f64());
    }
}

/// The queue gauges of one queue.
struct QueueGauges {
    depth: Gauge,
    delayed: Gauge,
    in_flight: Gauge,
    consumers: Gauge,
    dead_letters: Gauge,
}

impl QueueGauges {
    fn new(queue: &QueueName) -> Self {
        let queue = queue_label(queue.as_str());
        let gauge = |name: &'static str| ::metrics::gauge!(name, "queue" => queue.clone());
        Self {
            depth: gauge("busway_queue_depth"),
            delayed: gauge("busway_queue_delayed"),
            in_flight: gauge("busway_queue_in_flight"),
            consumers: gauge("busway_queue_consumers"),
            dead_letters: gauge("busway_queue_dead_letters"),
        }
    }

    fn set(&self, stats: &busway_core::QueueStats) {
        self.depth.set(stats.ready as f64);
        self.delayed.set(stats.delayed as f64);
        self.in_flight.set(stats.in_flight as f64);
        self.consumers.set(stats.consumers as f64);
        self.dead_letters.set(stats.dead_lettered as f64);
    }
}

impl crate::Bus {
    /// Starts polling the transport every `interval` for the depth, consumers
    /// and dead letters of every queue it has (or, on a backend that cannot
    /// list its queues, of the queues this bus consumes) into the
    /// `busway_queue_*` gauges, until the bus shuts down. Polls once before
    /// returning.
    ///
    /// ```
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// let bus = busway::Bus::connect("memory://").await?;
    /// bus.poll_queue_metrics(std::time::Duration::from_secs(15)).await;
    /// # bus.shutdown().await;
    /// # Ok(())
    /// # }
    /// # tokio::runtime::Runtime::new().unwrap().block_on(run()).unwrap();
    /// ```
    pub async fn poll_queue_metrics(&self, interval: Duration) {
        let bus = self.clone();
        let mut gauges: HashMap<QueueName, QueueGauges> = HashMap::new();
        poll_queues(&bus, &mut gauges).await;
        let interval = interval.max(Duration::from_millis(10));
        self.spawn_worker(async move {
            loop {
                tokio::time::sleep(interval).await;
                poll_queues(&bus, &mut gauges).await;
            }
        });
    }
}

async fn poll_queues(bus: &crate::Bus, gauges: &mut HashMap<QueueName, QueueGauges>) {
    let transport = bus.transport();
    let queues = match transport.list_queues().await {
        Ok(queues) => queues,
        Err(StatsError::Unsupported(_)) => bus.inner.metrics.consumed_queues(),
        Err(e) => {
            tracing::debug!(error = %e, "listing queues for metrics failed");
            return;
        }
    };
    for queue in queues {
        match transport.queue_stats(&queue).await {
            Ok(stats) => gauges
                .entry(queue)
                .or_insert_with_key(QueueGauges::new)
                .set(&stats),
            Err(e) => tracing::debug!(queue = %queue, error = %e, "queue stats for metrics failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporary_queues_are_labelled_by_their_prefix() {
        assert_eq!(queue_label("rpc_reply_0123456789abcdef"), "rpc_reply");
        assert_eq!(queue_label("query_cache_deadbeef"), "query_cache");
        assert_eq!(queue_label("task_queue"), "task_queue");
        assert_eq!(queue_label("rpc_replyish"), "rpc_replyish");
    }
}
