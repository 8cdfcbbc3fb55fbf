//! The layers on plain services, in paused (virtual) time: nothing here
//! depends on the speed of the machine.

#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use busway_core::Message;
use busway_middleware::dedup::{DedupStore, Seen};
use busway_middleware::{
    Backoff, CircuitBreakerConfig, CircuitBreakerLayer, CircuitState, ConcurrencyLimitLayer,
    CorrelationLayer, DedupLayer, Envelope, LayerError, MemoryDedupStore, MessageContext,
    RateLimitLayer, RetryLayer, Retryable, TimeoutLayer,
};
use tokio::time::Instant;
use tower::{service_fn, Layer, Service, ServiceExt};

/// A handler error: transient or not, or raised by a layer.
#[derive(Debug, PartialEq)]
enum TestError {
    Transient,
    Permanent,
    Layer(LayerError),
}

impl From<LayerError> for TestError {
    fn from(e: LayerError) -> Self {
        Self::Layer(e)
    }
}

impl Retryable for TestError {
    fn is_retryable(&self) -> bool {
        match self {
            Self::Transient => true,
            Self::Permanent => false,
            Self::Layer(e) => e.is_retryable(),
        }
    }
}

/// A service failing with `error` for its first `failures` calls, counting calls.
fn flaky(
    failures: u32,
    error: fn() -> TestError,
    calls: Arc<AtomicU32>,
) -> impl Service<u32, Response = u32, Error = TestError, Future = impl Send> + Clone {
    service_fn(move |n: u32| {
        let call = calls.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            if call <= failures {
                Err(error())
            } else {
                Ok(n)
            }
        }
    })
}

#[tokio::test(start_paused = true)]
async fn retry_retries_transient_errors_with_growing_waits() {
    let calls = Arc::new(AtomicU32::new(0));
    let policy = Backoff::default()
        .with_max_attempts(5)
        .with_backoff(Duration::from_millis(100), Duration::from_secs(10))
        .with_jitter(0.0);
    let service = RetryLayer::new(policy).layer(flaky(3, || TestError::Transient, calls.clone()));
    let start = Instant::now();
    assert_eq!(service.oneshot(7).await, Ok(7));
    assert_eq!(calls.load(Ordering::SeqCst), 4);
    // 100 + 200 + 400 ms of virtual time.
    assert_eq!(start.elapsed(), Duration::from_millis(700));
}

#[tokio::test(start_paused = true)]
async fn retry_stops_at_max_attempts_and_on_permanent_errors() {
    let calls = Arc::new(AtomicU32::new(0));
    let policy = Backoff::default().with_max_attempts(3);
    let service =
        RetryLayer::new(policy.clone()).layer(flaky(10, || TestError::Transient, calls.clone()));
    assert_eq!(service.oneshot(1).await, Err(TestError::Transient));
    assert_eq!(calls.load(Ordering::SeqCst), 3);

    let calls = Arc::new(AtomicU32::new(0));
    let service = RetryLayer::new(policy).layer(flaky(10, || TestError::Permanent, calls.clone()));
    assert_eq!(service.oneshot(1).await, Err(TestError::Permanent));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn retry_uses_a_custom_classifier() {
    let calls = Arc::new(AtomicU32::new(0));
    // Retry even "permanent" errors, as this classifier says.
    let policy = Backoff::default()
        .with_max_attempts(4)
        .retry_if(|e: &TestError| *e == TestError::Permanent);
    let service = RetryLayer::new(policy).layer(flaky(2, || TestError::Permanent, calls.clone()));
    assert_eq!(service.oneshot(3).await, Ok(3));
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

#[test]
fn backoff_jitter_stays_within_its_share() {
    let policy = Backoff::default()
        .with_backoff(Duration::from_millis(100), Duration::from_millis(250))
        .with_jitter(0.5);
    for _ in 0..1000 {
        let first = policy.delay(1);
        assert!(first <= Duration::from_millis(100) && first >= Duration::from_millis(50));
        let capped = policy.delay(10);
        assert!(capped <= Duration::from_millis(250) && capped >= Duration::from_millis(125));
    }
}

#[tokio::test(start_paused = true)]
async fn timeout_fails_slow_calls_with_the_services_error() {
    let slow = service_fn(|d: u64| async move {
        tokio::time::sleep(Duration::from_millis(d)).await;
        Ok::<_, TestError>(d)
    });
    let service = TimeoutLayer::new(Duration::from_millis(500)).layer(slow);
    assert_eq!(service.clone().oneshot(100).await, Ok(100));
    assert_eq!(
        service.oneshot(1000).await,
        Err(TestError::Layer(LayerError::TimedOut {
            after: Duration::from_millis(500)
        }))
    );
}

#[tokio::test(start_paused = true)]
async fn timeout_inside_retry_makes_a_hung_call_retryable() {
    let calls = Arc::new(AtomicU32::new(0));
    let counter = calls.clone();
    // The first call hangs, the second answers.
    let hangs_once = service_fn(move |n: u32| {
        let call = counter.fetch_add(1, Ordering::SeqCst);
        async move {
            if call == 0 {
                std::future::pending::<()>().await;
            }
            Ok::<_, TestError>(n)
        }
    });
    let service = tower::ServiceBuilder::new()
        .layer(RetryLayer::new(Backoff::default()))
        .layer(TimeoutLayer::new(Duration::from_secs(1)))
        .service(hangs_once);
    assert_eq!(service.oneshot(5).await, Ok(5));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// A service whose outcome the test switches.
fn switchable(
    failing: Arc<std::sync::atomic::AtomicBool>,
    calls: Arc<AtomicU32>,
) -> impl Service<(), Response = (), Error = TestError, Future = impl Send> + Clone {
    service_fn(move |()| {
        calls.fetch_add(1, Ordering::SeqCst);
        let fail = failing.load(Ordering::SeqCst);
        async move {
            if fail {
                Err(TestError::Transient)
            } else {
                Ok(())
            }
        }
    })
}

#[tokio::test(start_paused = true)]
async fn circuit_breaker_opens_half_opens_and_closes_like_the_reference() {
    let failing = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let calls = Arc::new(AtomicU32::new(0));
    let layer = CircuitBreakerLayer::new(CircuitBreakerConfig {
        failure_threshold: 3,
        recovery_timeout: Duration::from_secs(30),
        success_threshold: 2,
    });
    let health = layer.handle();
    let mut states = health.subscribe();
    let service = layer.layer(switchable(failing.clone(), calls.clone()));

    // Closed: failures go through until the threshold.
    for _ in 0..3 {
        assert_eq!(service.clone().oneshot(()).await, Err(TestError::Transient));
    }
    assert_eq!(health.state(), CircuitState::Open);
    assert!(states.has_changed().unwrap());
    assert_eq!(*states.borrow_and_update(), CircuitState::Open);
    assert_eq!(calls.load(Ordering::SeqCst), 3);

    // Open: rejected without calling the service.
    let rejected = service.clone().oneshot(()).await;
    assert!(
        matches!(rejected, Err(TestError::Layer(LayerError::CircuitOpen { retry_in })) if retry_in == Duration::from_secs(30)),
        "{rejected:?}"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 3);

    // After the recovery timeout a trial goes through; a failure reopens.
    tokio::time::advance(Duration::from_secs(30)).await;
    assert_eq!(service.clone().oneshot(()).await, Err(TestError::Transient));
    assert_eq!(health.state(), CircuitState::Open);
    assert_eq!(calls.load(Ordering::SeqCst), 4);
    assert!(service.clone().oneshot(()).await.is_err());
    assert_eq!(calls.load(Ordering::SeqCst), 4);

    // Recovered: two successful trials close it.
    tokio::time::advance(Duration::from_secs(30)).await;
    failing.store(false, Ordering::SeqCst);
    assert_eq!(service.clone().oneshot(()).await, Ok(()));
    assert_eq!(health.state(), CircuitState::HalfOpen);
    assert_eq!(service.clone().oneshot(()).await, Ok(()));
    assert_eq!(health.state(), CircuitState::Closed);

    let stats = health.stats();
    assert_eq!(stats.opened, 2);
    assert_eq!(stats.failures, 4);
    assert_eq!(stats.successes, 2);
    assert_eq!(stats.rejected, 2);
}

#[tokio::test(start_paused = true)]
async fn circuit_breaker_success_resets_the_failure_count() {
    let failing = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let calls = Arc::new(AtomicU32::new(0));
    let layer = CircuitBreakerLayer::new(CircuitBreakerConfig {
        failure_threshold: 2,
        ..CircuitBreakerConfig::default()
    });
    let health = layer.handle();
    let service = layer.layer(switchable(failing.clone(), calls));
    let _ = service.clone().oneshot(()).await;
    failing.store(false, Ordering::SeqCst);
    let _ = service.clone().oneshot(()).await;
    failing.store(true, Ordering::SeqCst);
    let _ = service.clone().oneshot(()).await;
    assert_eq!(
        health.state(),
        CircuitState::Closed,
        "failures were not consecutive"
    );
    let _ = service.oneshot(()).await;
    assert_eq!(health.state(), CircuitState::Open);
}

#[tokio::test(start_paused = true)]
async fn circuit_breaker_counts_only_classified_failures() {
    let calls = Arc::new(AtomicU32::new(0));
    let layer = CircuitBreakerLayer::new(CircuitBreakerConfig {
        failure_threshold: 1,
        ..CircuitBreakerConfig::default()
    })
    .count_failures_if(|e: &TestError| *e == TestError::Transient);
    let health = layer.handle();
    let service = layer.layer(flaky(5, || TestError::Permanent, calls));
    for _ in 0..5 {
        assert_eq!(service.clone().oneshot(1).await, Err(TestError::Permanent));
    }
    assert_eq!(health.state(), CircuitState::Closed);
}

#[tokio::test(start_paused = true)]
async fn bulkhead_caps_calls_in_flight() {
    let running = Arc::new(AtomicU32::new(0));
    let peak = Arc::new(AtomicU32::new(0));
    let (r, p) = (running.clone(), peak.clone());
    let work = service_fn(move |_: u32| {
        let (r, p) = (r.clone(), p.clone());
        async move {
            let now = r.fetch_add(1, Ordering::SeqCst) + 1;
            p.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(10)).await;
            r.fetch_sub(1, Ordering::SeqCst);
            Ok::<_, TestError>(())
        }
    });
    let service = ConcurrencyLimitLayer::new(2).layer(work);
    let calls = (0..10).map(|i| service.clone().oneshot(i));
    let results = futures::future::join_all(calls).await;
    assert!(results.iter().all(Result::is_ok));
    assert_eq!(peak.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn rate_limit_spaces_calls_across_clones() {
    let service = RateLimitLayer::new(10, Duration::from_secs(1))
        .with_burst(2)
        .layer(service_fn(|_: u32| async {
            Ok::<_, TestError>(Instant::now())
        }));
    let start = Instant::now();
    let calls = (0..6).map(|i| service.clone().oneshot(i));
    let mut started: Vec<Duration> = futures::future::try_join_all(calls)
        .await
        .unwrap()
        .into_iter()
        .map(|at| at - start)
        .collect();
    started.sort();
    let ms = |n| Duration::from_millis(n);
    // Two at once (the burst), then one every 100 ms.
    assert_eq!(
        started,
        vec![ms(0), ms(0), ms(100), ms(200), ms(300), ms(400)]
    );
}

#[tokio::test(start_paused = true)]
async fn rate_limit_can_reject_instead_of_waiting() {
    let service = RateLimitLayer::new(1, Duration::from_secs(1))
        .rejecting()
        .layer(service_fn(|_: u32| async { Ok::<_, TestError>(()) }));
    assert_eq!(service.clone().oneshot(1).await, Ok(()));
    assert_eq!(
        service.clone().oneshot(2).await,
        Err(TestError::Layer(LayerError::RateLimited {
            retry_in: Duration::from_secs(1)
        }))
    );
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(service.oneshot(3).await, Ok(()));
}

/// A handler of messages that counts calls per message and fails while told to.
fn message_handler(
    calls: Arc<AtomicU32>,
    failing: Arc<std::sync::atomic::AtomicBool>,
) -> impl Service<Envelope<()>, Response = (), Error = TestError, Future = impl Send> + Clone {
    service_fn(move |_: Envelope<()>| {
        calls.fetch_add(1, Ordering::SeqCst);
        let fail = failing.load(Ordering::SeqCst);
        async move {
            if fail {
                Err(TestError::Transient)
            } else {
                Ok(())
            }
        }
    })
}

#[tokio::test(start_paused = true)]
async fn dedup_runs_a_message_once_but_reruns_after_a_failure() {
    let calls = Arc::new(AtomicU32::new(0));
    let failing = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let store = Arc::new(MemoryDedupStore::new(100, Duration::from_secs(60)));
    let dedup = DedupLayer::new(store);
    let service = dedup.layer(message_handler(calls.clone(), failing.clone()));
    let message = Arc::new(Message::new("charge", "{}"));
    let delivery = |attempt| Envelope::new(message.clone(), attempt, "charge", ());

    // A failed attempt is forgotten, so the redelivery runs.
    assert_eq!(
        service.clone().oneshot(delivery(1)).await,
        Err(TestError::Transient)
    );
    failing.store(false, Ordering::SeqCst);
    assert_eq!(service.clone().oneshot(delivery(2)).await, Ok(()));
    // Done: later deliveries are skipped.
    assert_eq!(service.clone().oneshot(delivery(3)).await, Ok(()));
    assert_eq!(service.clone().oneshot(delivery(4)).await, Ok(()));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(dedup.duplicates_skipped(), 2);

    // Another message runs.
    let other = Envelope::new(Message::new("charge", "{}"), 1, "charge", ());
    assert_eq!(service.oneshot(other).await, Ok(()));
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

#[tokio::test(start_paused = true)]
async fn dedup_fails_a_concurrent_duplicate_as_retryable() {
    let store = Arc::new(MemoryDedupStore::new(100, Duration::from_secs(60)));
    let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
    let release_rx = Arc::new(tokio::sync::Mutex::new(Some(release_rx)));
    let slow = service_fn(move |_: Message| {
        let release_rx = release_rx.clone();
        async move {
            if let Some(rx) = release_rx.lock().await.take() {
                let _ = rx.await;
            }
            Ok::<_, TestError>(())
        }
    });
    let service = DedupLayer::new(store).layer(slow);
    let message = Message::new("charge", "{}");
    let first = tokio::spawn(service.clone().oneshot(message.clone()));
    tokio::task::yield_now().await;
    let second = service.clone().oneshot(message.clone()).await;
    let Err(TestError::Layer(error)) = second else {
        panic!("expected a layer error, got {second:?}");
    };
    assert!(matches!(error, LayerError::DuplicateInProgress { .. }));
    assert!(error.is_retryable());
    release_tx.send(()).unwrap();
    assert_eq!(first.await.unwrap(), Ok(()));
}

#[tokio::test(start_paused = true)]
async fn memory_dedup_store_forgets_after_ttl_and_past_capacity() {
    let store = MemoryDedupStore::new(3, Duration::from_secs(60));
    for key in ["a", "b", "c"] {
        assert_eq!(store.begin(key).await, Ok(Seen::New));
        store.finish(key, true).await.unwrap();
    }
    assert_eq!(store.begin("a").await, Ok(Seen::Done));
    // A fourth key evicts the oldest.
    assert_eq!(store.begin("d").await, Ok(Seen::New));
    store.finish("d", true).await.unwrap();
    assert_eq!(store.len(), 3);
    assert_eq!(store.begin("a").await, Ok(Seen::New));
    store.finish("a", false).await.unwrap();
    // Everything expires.
    tokio::time::advance(Duration::from_secs(61)).await;
    assert_eq!(store.begin("d").await, Ok(Seen::New));
    assert_eq!(store.len(), 1);
}

#[tokio::test]
async fn correlation_flows_from_the_handled_message_to_what_it_sends() {
    let handler = CorrelationLayer.layer(service_fn(|_: Envelope<()>| async {
        let out = MessageContext::stamp(Message::new("reserve_stock", "{}"));
        let rpc = MessageContext::stamp_header(
            Message::new("rpc_request", "{}").with_correlation_id("call-1"),
        );
        Ok::<_, TestError>((out, rpc))
    }));
    // A message that starts a conversation: its id becomes the correlation id.
    let first = Message::new("order.placed", "{}");
    let (out, rpc) = handler
        .clone()
        .oneshot(Envelope::new(first.clone(), 1, "order.placed", ()))
        .await
        .unwrap();
    assert_eq!(out.correlation_id, Some(first.id.to_string()));
    assert_eq!(out.causation_id, Some(first.id.to_string()));
    assert_eq!(rpc.correlation_id.as_deref(), Some("call-1"));
    assert_eq!(
        rpc.headers
            .get(busway_middleware::correlation::CORRELATION_HEADER),
        Some(first.id.to_string().as_str())
    );
    // The next hop keeps the conversation and names its own cause.
    let (next, _) = handler
        .oneshot(Envelope::new(out.clone(), 1, "reserve_stock", ()))
        .await
        .unwrap();
    assert_eq!(next.correlation_id, Some(first.id.to_string()));
    assert_eq!(next.causation_id, Some(out.id.to_string()));
    // Outside a handler nothing is stamped.
    assert_eq!(
        MessageContext::stamp(Message::new("x", "")).correlation_id,
        None
    );
}
