//! Metrics through the `metrics` facade, counted by a real recorder on real
//! transports (memory and SQLite): every count matches what happened.
//!
//! The recorder is global to the process, so the tests that read it take
//! turns (`serial`); the Prometheus test uses a recorder local to its thread.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{ensure, Context};
use busway::dead_letters::{DeadLetterFilter, Replay};
use busway::middleware::{CircuitBreakerConfig, CircuitBreakerLayer};
use busway::{Bus, HandlerError, Message, Publish, QueueName, RetryPolicy, RpcError, Transport};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use metrics_util::MetricKind;
use tokio::sync::{Mutex, MutexGuard};

const PATIENCE: Duration = Duration::from_secs(30);

fn unique(prefix: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("t_{prefix}_{}", &id[..12])
}

/// The process's recorder, installed once, and the turn of the calling test.
/// Registers `flaky` (fails its first call, then succeeds) and `bad`
/// (always fails permanently) on `tasks`; returns the count of `flaky` calls.
fn register_flaky_and_bad(tasks: &busway::tasks::TaskQueue) -> Arc<AtomicU32> {
    let calls = Arc::new(AtomicU32::new(0));
    let counted = calls.clone();
    tasks.register_handler("flaky", move |_: serde_json::Value| {
        let first = counted.fetch_add(1, Ordering::SeqCst) == 0;
        async move {
            if first {
                Err(HandlerError::new("not yet"))
            } else {
                Ok(())
            }
        }
    });
    tasks.register_handler("bad", |_: serde_json::Value| async {
        Err::<(), _>(HandlerError::permanent("never"))
    });
    calls
}

async fn serial() -> (MutexGuard<'static, ()>, &'static Snapshotter) {
    static TURN: Mutex<()> = Mutex::const_new(());
    static SNAPSHOTTER: OnceLock<Snapshotter> = OnceLock::new();
    let turn = TURN.lock().await;
    let snapshotter = SNAPSHOTTER.get_or_init(|| {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        recorder
            .install()
            .expect("the only recorder of this process");
        snapshotter
    });
    (turn, snapshotter)
}

/// What has been recorded since the test began (snapshots drain the
/// recorder, so they are summed here).
#[derive(Default)]
struct Recorded {
    counters: HashMap<String, u64>,
    gauges: HashMap<String, f64>,
    histograms: HashMap<String, usize>,
}

fn key(name: &str, labels: &[(&str, &str)]) -> String {
    let mut labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    labels.sort();
    format!("{name}{{{}}}", labels.join(","))
}

impl Recorded {
    /// Starts afresh: drops whatever earlier tests left.
    fn start(snapshotter: &Snapshotter) -> Self {
        let _ = snapshotter.snapshot();
        Self::default()
    }

    fn take(&mut self, snapshotter: &Snapshotter) {
        for (composite, _, _, value) in snapshotter.snapshot().into_vec() {
            let k = composite.key();
            let labels: Vec<(&str, &str)> = k.labels().map(|l| (l.key(), l.value())).collect();
            let name = key(k.name(), &labels);
            match (composite.kind(), value) {
                (MetricKind::Counter, DebugValue::Counter(n)) => {
                    *self.counters.entry(name).or_default() += n;
                }
                (MetricKind::Gauge, DebugValue::Gauge(v)) => {
                    self.gauges.insert(name, v.into_inner());
                }
                (MetricKind::Histogram, DebugValue::Histogram(values)) => {
                    *self.histograms.entry(name).or_default() += values.len();
                }
                _ => {}
            }
        }
    }

    fn counter(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        self.counters.get(&key(name, labels)).copied().unwrap_or(0)
    }

    fn gauge(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.gauges.get(&key(name, labels)).copied()
    }

    fn observations(&self, name: &str, labels: &[(&str, &str)]) -> usize {
        self.histograms
            .get(&key(name, labels))
            .copied()
            .unwrap_or(0)
    }

    /// Takes snapshots until `done` holds.
    async fn until(
        &mut self,
        snapshotter: &Snapshotter,
        what: &str,
        done: impl Fn(&Self) -> bool,
    ) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            self.take(snapshotter);
            if done(self) {
                return Ok(());
            }
            ensure!(tokio::time::Instant::now() < deadline, "waited for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Tasks that succeed, fail once, fail for good, have no handler or no
/// valid body: published, consumed, acked, retried and dead-lettered (by
/// reason) count exactly that; the handler histogram has a call per attempt.
async fn task_counts(
    transport: Arc<dyn Transport>,
    snapshotter: &Snapshotter,
) -> anyhow::Result<()> {
    let mut recorded = Recorded::start(snapshotter);
    let queue = unique("metrics");
    let bus = Bus::new(transport.clone());
    let tasks = bus.task_queue(&queue)?;
    tasks.register_handler("ok", |_: serde_json::Value| async { Ok(()) });
    register_flaky_and_bad(&tasks);
    tasks
        .start_workers()
        .workers(1)
        .retry(
            RetryPolicy::default()
                .with_max_attempts(3)
                .with_backoff(Duration::from_millis(1), Duration::from_millis(1)),
        )
        .await?;
    for _ in 0..3 {
        tasks.submit("ok", &serde_json::json!({})).await?;
    }
    tasks.submit("flaky", &serde_json::json!({})).await?;
    tasks.submit("bad", &serde_json::json!({})).await?;
    tasks
        .submit("nobody_handles_this", &serde_json::json!({}))
        .await?;
    // Not through the bus (not counted as published): a body that is no task.
    transport
        .publish(Publish::to_queue(
            QueueName::new(&queue)?,
            Message::new("junk", "not json"),
        ))
        .await?;

    let q = queue.as_str();
    let dead = |r: &Recorded, reason: &str| {
        r.counter(
            "busway_messages_dead_lettered_total",
            &[("queue", q), ("reason", reason)],
        )
    };
    recorded
        .until(snapshotter, "4 acks and 3 dead letters", |r| {
            r.counter("busway_messages_acked_total", &[("queue", q)]) >= 4
                && dead(r, "permanent") + dead(r, "unknown_type") + dead(r, "malformed") >= 3
        })
        .await?;
    // Anything counted twice would show up by now.
    tokio::time::sleep(Duration::from_millis(200)).await;
    recorded.take(snapshotter);

    let counter = |name: &str| recorded.counter(name, &[("queue", q)]);
    ensure!(
        recorded.counter("busway_messages_published_total", &[("destination", q)]) == 6,
        "published {:?}",
        recorded.counters
    );
    ensure!(
        counter("busway_messages_consumed_total") == 8,
        "{:?}",
        recorded.counters
    );
    ensure!(
        counter("busway_messages_acked_total") == 4,
        "{:?}",
        recorded.counters
    );
    ensure!(
        counter("busway_messages_retried_total") == 1,
        "{:?}",
        recorded.counters
    );
    ensure!(dead(&recorded, "permanent") == 1, "{:?}", recorded.counters);
    ensure!(
        dead(&recorded, "unknown_type") == 1,
        "{:?}",
        recorded.counters
    );
    ensure!(dead(&recorded, "malformed") == 1, "{:?}", recorded.counters);
    ensure!(dead(&recorded, "failed") == 0, "{:?}", recorded.counters);
    let calls = |handler: &str, outcome: &str| {
        recorded.observations(
            "busway_handler_duration_seconds",
            &[("queue", q), ("handler", handler), ("outcome", outcome)],
        )
    };
    ensure!(calls("ok", "ok") == 3, "{:?}", recorded.histograms);
    ensure!(calls("flaky", "error") == 1 && calls("flaky", "ok") == 1);
    ensure!(calls("bad", "error") == 1, "{:?}", recorded.histograms);
    // First deliveries only: 7 messages.
    ensure!(
        recorded.observations("busway_message_latency_seconds", &[("queue", q)]) == 7,
        "{:?}",
        recorded.histograms
    );

    // The poller: nothing waiting, one consumer, three dead letters.
    bus.poll_queue_metrics(Duration::from_secs(3600)).await;
    recorded.take(snapshotter);
    let gauge = |name: &str| recorded.gauge(name, &[("queue", q)]);
    ensure!(
        gauge("busway_queue_depth") == Some(0.0),
        "{:?}",
        recorded.gauges
    );
    ensure!(
        gauge("busway_queue_consumers") == Some(1.0),
        "{:?}",
        recorded.gauges
    );
    ensure!(
        gauge("busway_queue_dead_letters") == Some(3.0),
        "{:?}",
        recorded.gauges
    );
    bus.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn task_counts_on_memory() -> anyhow::Result<()> {
    let (_turn, snapshotter) = serial().await;
    task_counts(busway::connect("memory://").await?, snapshotter).await
}

#[tokio::test]
async fn task_counts_on_sqlite() -> anyhow::Result<()> {
    let (_turn, snapshotter) = serial().await;
    let dir = tempfile::tempdir()?;
    let url = format!("sqlite://{}", dir.path().join("bus.db").display());
    task_counts(busway::connect(&url).await?, snapshotter).await
}

/// An answered call, an error reply, a timeout, and the reply to the timed
/// out call arriving late: each counted under its outcome.
#[tokio::test]
async fn rpc_outcomes_and_late_replies_are_counted() -> anyhow::Result<()> {
    let (_turn, snapshotter) = serial().await;
    let mut recorded = Recorded::start(snapshotter);
    let transport = busway::connect("memory://").await?;
    let service = unique("svc");
    let server = Bus::new(transport.clone());
    let client = Bus::new(transport);
    server
        .register_request_handler(&service, "echo", |s: String| async move { Ok(s) })
        .await?;
    server
        .register_request_handler(&service, "slow", |s: String| async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            Ok(s)
        })
        .await?;
    let echoed: String = client.request(&service, "echo", &"hi").await?;
    ensure!(echoed == "hi");
    let err = client
        .request::<String>(&service, "missing", &"hi")
        .await
        .err()
        .context("an unknown method must fail")?;
    ensure!(matches!(err, RpcError::Remote { .. }), "{err:?}");
    let err = client
        .request::<String>(&service, "slow", &"hi")
        .timeout(Duration::from_millis(50))
        .await
        .err()
        .context("the slow call must time out")?;
    ensure!(matches!(err, RpcError::Timeout { .. }), "{err:?}");
    recorded
        .until(snapshotter, "the late reply", |r| {
            r.counter("busway_rpc_late_replies_total", &[]) >= 1
        })
        .await?;
    recorded.take(snapshotter);
    let s = service.as_str();
    let calls = |method: &str, outcome: &str| {
        recorded.counter(
            "busway_rpc_client_calls_total",
            &[("service", s), ("method", method), ("outcome", outcome)],
        )
    };
    ensure!(calls("echo", "ok") == 1, "{:?}", recorded.counters);
    ensure!(calls("missing", "error") == 1, "{:?}", recorded.counters);
    ensure!(calls("slow", "timeout") == 1, "{:?}", recorded.counters);
    ensure!(calls("slow", "ok") == 0, "{:?}", recorded.counters);
    ensure!(recorded.counter("busway_rpc_late_replies_total", &[]) == 1);
    ensure!(client.stats().late_replies == 1);
    let durations = recorded.observations(
        "busway_rpc_client_duration_seconds",
        &[("service", s), ("method", "slow"), ("outcome", "timeout")],
    );
    ensure!(durations == 1, "{:?}", recorded.histograms);
    // The server side: three requests on its queue, each acked, the
    // unknown method not a handler call.
    let queue = format!("rpc_{service}");
    ensure!(
        recorded.counter("busway_messages_acked_total", &[("queue", &queue)]) == 3,
        "{:?}",
        recorded.counters
    );
    client.shutdown().await;
    server.shutdown().await;
    Ok(())
}

/// A named breaker's gauge follows it: closed, open after a failure.
#[tokio::test]
async fn a_named_circuit_breaker_reports_its_state() -> anyhow::Result<()> {
    use tower::{Layer, Service, ServiceExt};
    let (_turn, snapshotter) = serial().await;
    let mut recorded = Recorded::start(snapshotter);
    let name = unique("breaker");
    let layer = CircuitBreakerLayer::new(CircuitBreakerConfig {
        failure_threshold: 1,
        recovery_timeout: Duration::from_secs(3600),
        success_threshold: 1,
    })
    .with_name(name.clone());
    recorded.take(snapshotter);
    let state = |r: &Recorded| r.gauge("busway_circuit_breaker_state", &[("breaker", &name)]);
    ensure!(state(&recorded) == Some(0.0), "{:?}", recorded.gauges);
    let mut service = layer.layer(tower::service_fn(|_: ()| async {
        Err::<(), _>(HandlerError::new("down"))
    }));
    let failed = service
        .ready()
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .call(())
        .await;
    ensure!(failed.is_err());
    recorded.take(snapshotter);
    ensure!(state(&recorded) == Some(2.0), "{:?}", recorded.gauges);
    Ok(())
}

/// Dead letters replayed and purged are counted.
#[tokio::test]
async fn dead_letter_replays_and_purges_are_counted() -> anyhow::Result<()> {
    let (_turn, snapshotter) = serial().await;
    let mut recorded = Recorded::start(snapshotter);
    let bus = Bus::connect("memory://").await?;
    let queue = unique("dlq");
    let tasks = bus.task_queue(&queue)?;
    tasks.register_handler("bad", |_: serde_json::Value| async {
        Err::<(), _>(HandlerError::permanent("never"))
    });
    tasks.start_workers().workers(1).await?;
    for _ in 0..3 {
        tasks.submit("bad", &serde_json::json!({})).await?;
    }
    let dead = bus.dead_letters(&queue)?;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while dead.count().await? < 3 {
        ensure!(tokio::time::Instant::now() < deadline, "no dead letters");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let to = QueueName::new(unique("elsewhere"))?;
    dead.replay(
        &DeadLetterFilter::default().limit(1),
        &Replay::default().to(to),
    )
    .await?;
    dead.purge(&DeadLetterFilter::default(), false).await?;
    recorded.take(snapshotter);
    // Labelled by the dead-letter queue.
    let q = [("queue", dead.queue().as_str())];
    ensure!(
        recorded.counter("busway_dead_letters_replayed_total", &q) == 1,
        "{:?}",
        recorded.counters
    );
    ensure!(
        recorded.counter("busway_dead_letters_purged_total", &q) == 2,
        "{:?}",
        recorded.counters
    );
    bus.shutdown().await;
    Ok(())
}

/// A projection that only counts.
struct Counting;

#[async_trait::async_trait]
impl busway::es::Projection for Counting {
    type Event = serde_json::Value;
    fn name(&self) -> &str {
        "counting"
    }
    async fn apply(
        &self,
        _: Vec<busway::es::Envelope<serde_json::Value>>,
        _: u64,
    ) -> Result<(), String> {
        Ok(())
    }
    async fn reset(&self) -> Result<(), String> {
        Ok(())
    }
}

#[cfg(feature = "prometheus")]
fn prometheus() -> metrics_exporter_prometheus::PrometheusRecorder {
    busway::metrics::prometheus_builder().build_recorder()
}

#[cfg(not(feature = "prometheus"))]
fn prometheus() -> metrics_exporter_prometheus::PrometheusRecorder {
    metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder()
}

/// Every pattern once, on a Prometheus recorder: the text it renders has
/// every metric the module docs list (but those noted below).
#[test]
fn prometheus_render_has_the_documented_names() -> anyhow::Result<()> {
    let recorder = prometheus();
    let handle = recorder.handle();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // The local recorder serves this thread; a current-thread runtime runs
    // every task of the bus here.
    metrics::with_local_recorder(&recorder, || runtime.block_on(every_pattern()))?;
    let text = handle.render();

    let docs = include_str!("../../../docs/guide/metrics.md");
    let documented: Vec<&str> = docs
        .lines()
        .filter_map(|line| line.strip_prefix("| `"))
        .filter_map(|rest| rest.split('`').next())
        .filter(|name| name.starts_with("busway_"))
        .collect();
    ensure!(documented.len() >= 20, "the table lists {documented:?}");
    // Sagas are measured by their own tests (tests/saga.rs); protection
    // rejections need a protected bus (tests/protection.rs).
    for name in documented {
        if name.starts_with("busway_saga_") || name == "busway_messages_rejected_total" {
            continue;
        }
        ensure!(
            text.contains(&format!("# TYPE {name} ")),
            "`{name}` is documented but not rendered:\n{text}"
        );
    }
    #[cfg(feature = "prometheus")]
    ensure!(
        text.contains("busway_handler_duration_seconds_bucket{"),
        "{text}"
    );
    Ok(())
}

async fn every_pattern() -> anyhow::Result<()> {
    let transport = busway::connect("memory://").await?;
    let bus = Bus::new(transport.clone());
    let queue = unique("prom");
    let tasks = bus.task_queue(&queue)?;
    let flaky = register_flaky_and_bad(&tasks);
    tasks
        .start_workers()
        .workers(1)
        .retry(
            RetryPolicy::default().with_backoff(Duration::from_millis(1), Duration::from_millis(1)),
        )
        .await?;
    tasks.submit("flaky", &serde_json::json!({})).await?;
    tasks.submit("bad", &serde_json::json!({})).await?;
    tasks.submit("bad", &serde_json::json!({})).await?;

    let service = unique("psvc");
    bus.register_request_handler(&service, "slow", |s: String| async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        Ok(s)
    })
    .await?;
    let late = bus
        .request::<String>(&service, "slow", &"x")
        .timeout(Duration::from_millis(10))
        .await;
    ensure!(matches!(late, Err(RpcError::Timeout { .. })), "{late:?}");

    let _breaker = CircuitBreakerLayer::named(unique("payments"));

    let store: Arc<dyn busway::es::EventStore> = Arc::new(busway::memory::MemoryEventStore::new());
    store
        .append(
            "thing-1",
            busway::es::ExpectedVersion::Any,
            vec![busway::es::NewEvent::new("thing.made", "{}")],
        )
        .await?;
    let projection = busway::es::ProjectionRunner::new(store).spawn(Arc::new(Counting));

    let dead = bus.dead_letters(&queue)?;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while dead.count().await? < 2
        || bus.stats().late_replies < 1
        || flaky.load(Ordering::SeqCst) < 2
    {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "the pattern run did not finish"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    dead.replay(
        &DeadLetterFilter::default().limit(1),
        &Replay::default().to(QueueName::new(unique("elsewhere"))?),
    )
    .await?;
    dead.purge(&DeadLetterFilter::default(), false).await?;
    bus.poll_queue_metrics(Duration::from_secs(3600)).await;
    let _ = projection.stop().await;
    bus.shutdown().await;
    Ok(())
}
