//! Middleware on the bus's handlers and calls, on memory and SQLite: each
//! case checks what a layer must change in what handlers see and do.
//! Nothing here asserts on timing.

#[allow(unused_macros, unused_imports)]
mod support;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context};
use busway::headers::DEAD_LETTER_REASON;
use busway::middleware::{
    Backoff, CircuitBreakerConfig, CircuitBreakerLayer, CircuitState, ConcurrencyLimitLayer,
    CorrelationLayer, DedupLayer, LayerError, MemoryDedupStore, RetryLayer, TaskRequest,
    TimeoutLayer,
};
use busway::rpc::{RpcCall, RpcError};
use busway::{Bus, Event, HandlerError, Message, Publish, QueueName, RetryPolicy, Transport};
use support::{next_dead_letter, unique, PATIENCE};
use tokio::sync::mpsc;
use tower::ServiceExt;

type T = Arc<dyn Transport>;

fn no_redelivery() -> RetryPolicy {
    RetryPolicy::default().with_max_attempts(1)
}

/// Waits until `done` holds.
async fn eventually(what: &str, done: impl Fn() -> bool) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !done() {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "never happened: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// A task message in the reference shape with a chosen id, so it can be published twice.
fn task_message(kind: &str, params: serde_json::Value) -> anyhow::Result<Message> {
    let body = serde_json::json!({"type": kind, "params": params, "priority": 0});
    Ok(Message::json(kind, &body)?)
}

async fn task_dedup_runs_a_duplicate_once(t: T) -> anyhow::Result<()> {
    let bus = Bus::new(t.clone());
    let queue = bus.task_queue(&unique("dedup"))?;
    let runs = Arc::new(AtomicU32::new(0));
    let r = runs.clone();
    queue.register_handler("charge", move |_: serde_json::Value| {
        let r = r.clone();
        async move {
            r.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    });
    let dedup = DedupLayer::new(Arc::new(MemoryDedupStore::new(
        1000,
        Duration::from_secs(600),
    )));
    queue
        .start_workers()
        .workers(1)
        .layer(dedup.clone())
        .await?;
    // The same message twice (a producer retrying a publish whose confirm it lost).
    let message = task_message("charge", serde_json::json!({"cents": 100}))?;
    for _ in 0..2 {
        t.publish(Publish::to_queue(queue.name().clone(), message.clone()))
            .await?;
    }
    // A different message still runs.
    queue
        .submit("charge", &serde_json::json!({"cents": 5}))
        .await?;
    eventually("the duplicate skipped", || dedup.duplicates_skipped() == 1).await?;
    eventually("both distinct tasks ran", || {
        runs.load(Ordering::SeqCst) == 2
    })
    .await?;
    ensure!(runs.load(Ordering::SeqCst) == 2);
    ensure!(bus.stats().dead_lettered == 0, "{:?}", bus.stats());
    bus.shutdown().await;
    Ok(())
}

async fn task_retry_layer_retries_in_process(t: T) -> anyhow::Result<()> {
    let bus = Bus::new(t);
    let queue = bus.task_queue(&unique("retry"))?;
    let attempts = Arc::new(AtomicU32::new(0));
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    let a = attempts.clone();
    queue.register_handler("flaky", move |_: serde_json::Value| {
        let (a, done_tx) = (a.clone(), done_tx.clone());
        async move {
            if a.fetch_add(1, Ordering::SeqCst) < 2 {
                return Err(HandlerError::new("not yet"));
            }
            let _ = done_tx.send(());
            Ok(())
        }
    });
    queue
        .start_workers()
        .workers(1)
        // No redelivery by the transport: only the layer's retries can save it.
        .retry(no_redelivery())
        .layer(RetryLayer::new(
            Backoff::default()
                .with_max_attempts(3)
                .with_backoff(Duration::from_millis(1), Duration::from_millis(5)),
        ))
        .await?;
    queue.submit("flaky", &serde_json::json!({})).await?;
    tokio::time::timeout(PATIENCE, done_rx.recv())
        .await
        .context("task never succeeded")?;
    ensure!(attempts.load(Ordering::SeqCst) == 3);
    let stats = bus.stats();
    ensure!(stats.retried == 0 && stats.dead_lettered == 0, "{stats:?}");
    bus.shutdown().await;
    Ok(())
}

async fn task_permanent_errors_are_not_retried_by_the_layer(t: T) -> anyhow::Result<()> {
    let bus = Bus::new(t.clone());
    let queue = bus.task_queue(&unique("perm"))?;
    let attempts = Arc::new(AtomicU32::new(0));
    let a = attempts.clone();
    queue.register_handler("bad", move |_: serde_json::Value| {
        a.fetch_add(1, Ordering::SeqCst);
        async { Err::<(), _>(HandlerError::permanent("card declined")) }
    });
    queue
        .start_workers()
        .layer(RetryLayer::new(Backoff::default().with_max_attempts(5)))
        .await?;
    queue.submit("bad", &serde_json::json!({})).await?;
    let dead = next_dead_letter(&t, queue.name()).await?;
    let reason = dead.message().headers.get(DEAD_LETTER_REASON).unwrap_or("");
    ensure!(reason.contains("card declined"), "{reason}");
    dead.ack().await?;
    ensure!(attempts.load(Ordering::SeqCst) == 1);
    bus.shutdown().await;
    Ok(())
}

async fn task_timeout_layer_dead_letters_a_hung_task(t: T) -> anyhow::Result<()> {
    let bus = Bus::new(t.clone());
    let queue = bus.task_queue(&unique("hung"))?;
    queue.register_handler("hang", |_: serde_json::Value| async {
        std::future::pending::<()>().await;
        Ok(())
    });
    queue
        .start_workers()
        .retry(no_redelivery())
        .layer(TimeoutLayer::new(Duration::from_millis(50)))
        .await?;
    queue.submit("hang", &serde_json::json!({})).await?;
    let dead = next_dead_letter(&t, queue.name()).await?;
    let reason = dead.message().headers.get(DEAD_LETTER_REASON).unwrap_or("");
    ensure!(reason.contains("timed out"), "{reason}");
    dead.ack().await?;
    bus.shutdown().await;
    Ok(())
}

async fn task_bulkhead_caps_work_across_workers(t: T) -> anyhow::Result<()> {
    let bus = Bus::new(t);
    let queue = bus.task_queue(&unique("bulkhead"))?;
    let running = Arc::new(AtomicU32::new(0));
    let peak = Arc::new(AtomicU32::new(0));
    let finished = Arc::new(AtomicU32::new(0));
    let (r, p, f) = (running.clone(), peak.clone(), finished.clone());
    queue.register_handler("work", move |_: serde_json::Value| {
        let (r, p, f) = (r.clone(), p.clone(), f.clone());
        async move {
            let now = r.fetch_add(1, Ordering::SeqCst) + 1;
            p.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(5)).await;
            r.fetch_sub(1, Ordering::SeqCst);
            f.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    });
    queue
        .start_workers()
        .workers(3)
        .prefetch(4)
        .concurrency(4)
        .layer(ConcurrencyLimitLayer::new(2))
        .await?;
    for _ in 0..30 {
        queue.submit("work", &serde_json::json!({})).await?;
    }
    eventually("all tasks done", || finished.load(Ordering::SeqCst) == 30).await?;
    let peak = peak.load(Ordering::SeqCst);
    ensure!(peak <= 2, "{peak} ran at once");
    bus.shutdown().await;
    Ok(())
}

async fn correlation_flows_from_event_to_task(t: T) -> anyhow::Result<()> {
    let bus = Bus::new(t);
    let group = unique("orders");
    let tasks = bus.task_queue(&unique("fulfil"))?;
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel::<TaskRequest>();
    tasks.register_handler("ship", |_: serde_json::Value| async { Ok(()) });
    // A layer that shows the test what the task handler received.
    let spy = tower::layer::layer_fn(
        move |inner: busway::middleware::HandlerService<TaskRequest, ()>| {
            let seen_tx = seen_tx.clone();
            tower::service_fn(move |request: TaskRequest| {
                let _ = seen_tx.send(request.clone());
                inner.clone().oneshot(request)
            })
        },
    );
    tasks.start_workers().layer(spy).await?;
    let submit = tasks.clone();
    bus.register_event_handler("order.placed", &group, move |_: Event| {
        let submit = submit.clone();
        async move {
            submit.submit("ship", &serde_json::json!({})).await?;
            Ok(())
        }
    })
    .layer(CorrelationLayer)
    .await?;
    let event = Event::new("order.placed", "order_1", serde_json::json!({}));
    bus.publish_event(&event).await?;
    let task = tokio::time::timeout(PATIENCE, seen_rx.recv())
        .await
        .context("no task")?
        .context("spy gone")?;
    // The event started the conversation: its message id is both the
    // correlation id and the cause of the task.
    let causation = task
        .message
        .causation_id
        .clone()
        .context("no causation id")?;
    ensure!(
        task.message.correlation_id.as_deref() == Some(causation.as_str()),
        "{:?}",
        task.message
    );
    ensure!(task.kind == "ship");
    bus.shutdown().await;
    Ok(())
}

async fn event_layer_errors_go_through_retry_and_dead_letter(t: T) -> anyhow::Result<()> {
    let bus = Bus::new(t.clone());
    let group = unique("audit");
    bus.register_event_handler("audit.#", &group, |_: Event| async {
        tokio::time::sleep(Duration::from_secs(3600)).await;
        Ok(())
    })
    .retry(no_redelivery())
    .layer(TimeoutLayer::new(Duration::from_millis(20)))
    .await?;
    bus.publish_event(&Event::new("audit.login", "u1", serde_json::json!({})))
        .await?;
    let dead = next_dead_letter(&t, &QueueName::new(&group)?).await?;
    let reason = dead.message().headers.get(DEAD_LETTER_REASON).unwrap_or("");
    ensure!(reason.contains("timed out"), "{reason}");
    dead.ack().await?;
    bus.shutdown().await;
    Ok(())
}

async fn rpc_server_circuit_breaker_answers_errors_while_open(t: T) -> anyhow::Result<()> {
    let service = unique("fragile");
    let server = Bus::new(t.clone());
    let client = Bus::new(t);
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let breaker = CircuitBreakerLayer::new(CircuitBreakerConfig {
        failure_threshold: 2,
        recovery_timeout: Duration::from_secs(3600),
        success_threshold: 1,
    });
    let health = breaker.handle();
    server
        .register_request_handler(&service, "fail", move |_: serde_json::Value| {
            c.fetch_add(1, Ordering::SeqCst);
            async { Err::<(), _>(HandlerError::new("database down")) }
        })
        .layer(breaker)
        .await?;
    for _ in 0..2 {
        let err = client
            .request::<()>(&service, "fail", &serde_json::json!({}))
            .timeout(PATIENCE)
            .await;
        ensure!(
            matches!(&err, Err(RpcError::Remote { message, .. }) if message.contains("database down")),
            "{err:?}"
        );
    }
    ensure!(health.state() == CircuitState::Open);
    let err = client
        .request::<()>(&service, "fail", &serde_json::json!({}))
        .timeout(PATIENCE)
        .await;
    ensure!(
        matches!(&err, Err(RpcError::Remote { message, .. }) if message.contains("circuit breaker is open")),
        "{err:?}"
    );
    ensure!(
        calls.load(Ordering::SeqCst) == 2,
        "the open circuit let a call through"
    );
    client.shutdown().await;
    server.shutdown().await;
    Ok(())
}

async fn rpc_outgoing_layers_retry_and_break(t: T) -> anyhow::Result<()> {
    let service = unique("flaky");
    let server = Bus::new(t.clone());
    let client = Bus::new(t);
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    server
        .register_request_handler(&service, "get", move |_: serde_json::Value| {
            let n = c.fetch_add(1, Ordering::SeqCst);
            async move {
                if n == 0 {
                    // The first call is too slow for the caller.
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                Ok(n)
            }
        })
        .await?;
    // The caller times out the slow first call, retries, and gets the second answer.
    let retrying = tower::ServiceBuilder::new()
        .layer(RetryLayer::new(Backoff::default().with_backoff(
            Duration::from_millis(1),
            Duration::from_millis(5),
        )))
        .service(client.rpc_service());
    let call = RpcCall::new(&service, "get", serde_json::json!({}))
        .with_timeout(Duration::from_millis(100));
    let answer = retrying.oneshot(call).await?;
    ensure!(answer == serde_json::json!(1), "{answer}");

    // Calls to a service nobody serves trip the caller's breaker.
    let breaker = CircuitBreakerLayer::new(CircuitBreakerConfig {
        failure_threshold: 2,
        recovery_timeout: Duration::from_secs(3600),
        success_threshold: 1,
    });
    let health = breaker.handle();
    let guarded = tower::ServiceBuilder::new()
        .layer(breaker)
        .service(client.rpc_service());
    let nowhere = RpcCall::new(unique("absent"), "get", serde_json::json!({}))
        .with_timeout(Duration::from_millis(50));
    for _ in 0..2 {
        ensure!(guarded.clone().oneshot(nowhere.clone()).await.is_err());
    }
    ensure!(health.state() == CircuitState::Open);
    let rejected = guarded.oneshot(nowhere).await;
    ensure!(
        matches!(
            rejected,
            Err(RpcError::Layer(LayerError::CircuitOpen { .. }))
        ),
        "{rejected:?}"
    );
    client.shutdown().await;
    server.shutdown().await;
    Ok(())
}

macro_rules! on_memory_and_sqlite {
    ($($case:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() -> anyhow::Result<()> {
                    let backend = super::support::memory();
                    super::$case(backend.transport.clone()).await
                }
            )*
        }
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() -> anyhow::Result<()> {
                    let backend = super::support::sqlite().await?;
                    let result = super::$case(backend.transport.clone()).await;
                    backend.transport.close().await;
                    result
                }
            )*
        }
    };
}

on_memory_and_sqlite!(
    task_dedup_runs_a_duplicate_once,
    task_retry_layer_retries_in_process,
    task_permanent_errors_are_not_retried_by_the_layer,
    task_timeout_layer_dead_letters_a_hung_task,
    task_bulkhead_caps_work_across_workers,
    correlation_flows_from_event_to_task,
    event_layer_errors_go_through_retry_and_dead_letter,
    rpc_server_circuit_breaker_answers_errors_while_open,
    rpc_outgoing_layers_retry_and_break,
);
