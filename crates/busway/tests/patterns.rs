//! The messaging patterns on every backend: each case is a plain async
//! function run on memory, SQLite (a temporary file) and RabbitMQ (when
//! `BUSWAY_TEST_AMQP_URL` is set). Names are unique per test, so the cases
//! run in parallel on a shared broker. Nothing here asserts on timing.

mod support;

use std::future::IntoFuture;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context};
use busway::headers::DEAD_LETTER_REASON;
use busway::{
    Bus, Event, HandlerError, Message, Publish, QueueName, RetryPolicy, RpcError, Topic, Transport,
};
use serde::{Deserialize, Serialize};
use support::{next_dead_letter, unique, PATIENCE};
use tokio::sync::mpsc;

type T = Arc<dyn Transport>;

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct User {
    id: u64,
    name: String,
}

fn fast_retry(max_attempts: u32) -> RetryPolicy {
    RetryPolicy::default()
        .with_max_attempts(max_attempts)
        .with_backoff(Duration::from_millis(10), Duration::from_millis(50))
}

async fn rpc_round_trip(t: T) -> anyhow::Result<()> {
    let service = unique("users");
    let server = Bus::new(t.clone());
    let client = Bus::new(t);
    server
        .register_request_handler(&service, "get_user", |q: serde_json::Value| async move {
            let id = q["user_id"]
                .as_u64()
                .ok_or(HandlerError::new("user_id missing"))?;
            Ok(User {
                id,
                name: "Ann".into(),
            })
        })
        .await?;
    let user: User = client
        .request(&service, "get_user", &serde_json::json!({"user_id": 7}))
        .timeout(PATIENCE)
        .await?;
    ensure!(
        user == User {
            id: 7,
            name: "Ann".into()
        },
        "{user:?}"
    );
    let err = client
        .request::<User>(&service, "get_user", &serde_json::json!({}))
        .timeout(PATIENCE)
        .await;
    ensure!(
        matches!(&err, Err(RpcError::Remote { message, .. }) if message.contains("user_id missing")),
        "{err:?}"
    );
    client.shutdown().await;
    server.shutdown().await;
    Ok(())
}

async fn rpc_many_in_flight(t: T) -> anyhow::Result<()> {
    let service = unique("math");
    let server = Bus::new(t.clone());
    let client = Bus::new(t);
    server
        .register_request_handler(&service, "square", |n: u64| async move { Ok(n * n) })
        .concurrency(8)
        .await?;
    let calls = (0..50u64).map(|n| {
        client
            .request::<u64>(&service, "square", &n)
            .timeout(PATIENCE)
            .into_future()
    });
    let results = futures::future::try_join_all(calls).await?;
    for (n, r) in results.iter().enumerate() {
        let n = n as u64;
        ensure!(*r == n * n, "call {n} got {r}");
    }
    // Spawned calls work too (the reference `call_async`).
    let spawned = tokio::spawn(client.request::<u64>(&service, "square", &9).into_future());
    ensure!(spawned.await?? == 81);
    client.shutdown().await;
    server.shutdown().await;
    Ok(())
}

async fn rpc_timeout_and_late_reply(t: T) -> anyhow::Result<()> {
    let service = unique("slow");
    let server = Bus::new(t.clone());
    let client = Bus::new(t);
    let (release_tx, release_rx) = tokio::sync::watch::channel(false);
    server
        .register_request_handler(&service, "wait", move |_: serde_json::Value| {
            let mut release = release_rx.clone();
            async move {
                let _ = release.wait_for(|r| *r).await;
                Ok("done")
            }
        })
        .await?;
    let err = client
        .request::<String>(&service, "wait", &serde_json::json!({}))
        .timeout(Duration::from_millis(200))
        .await;
    ensure!(
        matches!(&err, Err(RpcError::Timeout { method, .. }) if method == "wait"),
        "{err:?}"
    );
    ensure!(err.as_ref().err().is_some_and(RpcError::is_retryable));
    // Let the handler answer now: the reply is late, dropped and counted.
    release_tx.send_replace(true);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while client.stats().late_replies == 0 {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "late reply never counted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    client.shutdown().await;
    server.shutdown().await;
    Ok(())
}

async fn rpc_errors_keep_the_server_serving(t: T) -> anyhow::Result<()> {
    let service = unique("fragile");
    let server = Bus::new(t.clone());
    let client = Bus::new(t);
    server
        .register_request_handler(&service, "boom", |_: serde_json::Value| async move {
            if true {
                panic!("kaboom");
            }
            Ok(())
        })
        .await?;
    server
        .register_request_handler(&service, "double", |n: i64| async move { Ok(n * 2) })
        .await?;
    let remote = |r: Result<serde_json::Value, RpcError>| match r {
        Err(RpcError::Remote { message, .. }) => Ok(message),
        other => Err(anyhow::anyhow!("expected an error response, got {other:?}")),
    };
    let m = remote(
        client
            .send_request(&service, "boom", &())
            .timeout(PATIENCE)
            .await,
    )?;
    ensure!(m.contains("panicked") && m.contains("kaboom"), "{m}");
    let m = remote(
        client
            .send_request(&service, "nope", &())
            .timeout(PATIENCE)
            .await,
    )?;
    ensure!(m.contains("unknown method") && m.contains("nope"), "{m}");
    let m = remote(
        client
            .send_request(&service, "double", &"x")
            .timeout(PATIENCE)
            .await,
    )?;
    ensure!(m.contains("invalid params"), "{m}");
    // Still serving after a panic, an unknown method and bad params.
    let four: i64 = client
        .request(&service, "double", &2)
        .timeout(PATIENCE)
        .await?;
    ensure!(four == 4);
    ensure!(server.stats().panics == 1, "{:?}", server.stats());
    client.shutdown().await;
    server.shutdown().await;
    Ok(())
}

async fn event_fan_out_to_groups(t: T) -> anyhow::Result<()> {
    let prefix = unique("shop");
    let bus = Bus::new(t);
    let (orders_tx, mut orders) = mpsc::unbounded_channel();
    let (audit_tx, mut audit) = mpsc::unbounded_channel();
    bus.register_event_handler(
        &format!("{prefix}.order.*"),
        &unique("orders"),
        move |e: Event| {
            let tx = orders_tx.clone();
            async move {
                let _ = tx.send(e);
                Ok(())
            }
        },
    )
    .await?;
    bus.register_event_handler(&format!("{prefix}.#"), &unique("audit"), move |e: Event| {
        let tx = audit_tx.clone();
        async move {
            let _ = tx.send(e);
            Ok(())
        }
    })
    .await?;
    let created = Event::new(
        format!("{prefix}.order.created"),
        "order_1",
        serde_json::json!({"total": 12.5}),
    );
    bus.publish_event(&created).await?;
    bus.publish_event(&Event::new(
        format!("{prefix}.user.registered"),
        "user_1",
        serde_json::json!({"email": "a@b.test"}),
    ))
    .await?;
    let got = tokio::time::timeout(PATIENCE, orders.recv())
        .await?
        .context("orders closed")?;
    ensure!(got == created, "{got:?}");
    let mut types = Vec::new();
    for _ in 0..2 {
        let e = tokio::time::timeout(PATIENCE, audit.recv())
            .await?
            .context("audit closed")?;
        types.push(e.event_type);
    }
    types.sort();
    ensure!(
        types
            == [
                format!("{prefix}.order.created"),
                format!("{prefix}.user.registered")
            ],
        "{types:?}"
    );
    ensure!(
        orders.try_recv().is_err(),
        "the orders group got a user event"
    );
    bus.shutdown().await;
    Ok(())
}

async fn event_failure_and_malformed_go_to_dead_letters(t: T) -> anyhow::Result<()> {
    let prefix = unique("ev");
    let group = unique("failing");
    let bus = Bus::new(t.clone());
    bus.register_event_handler(&format!("{prefix}.#"), &group, |_: Event| async move {
        Err::<(), _>(HandlerError::new("always fails"))
    })
    .retry(fast_retry(2))
    .await?;
    bus.publish_event(&Event::new(
        format!("{prefix}.x"),
        "a",
        serde_json::json!({}),
    ))
    .await?;
    let queue = QueueName::new(&group)?;
    let dead = next_dead_letter(&t, &queue).await?;
    let reason = dead.message().headers.get(DEAD_LETTER_REASON).unwrap_or("");
    ensure!(
        reason.contains("always fails") && reason.contains("2 attempts"),
        "{reason}"
    );
    dead.ack().await?;
    // A body that is not an event is dead-lettered at once.
    t.publish(Publish::to_topic(
        Topic::new(format!("{prefix}.y"))?,
        Message::new("junk", "not json"),
    ))
    .await?;
    let dead = next_dead_letter(&t, &queue).await?;
    let reason = dead.message().headers.get(DEAD_LETTER_REASON).unwrap_or("");
    ensure!(reason.contains("malformed event"), "{reason}");
    dead.ack().await?;
    bus.shutdown().await;
    Ok(())
}

async fn task_retry_then_success(t: T) -> anyhow::Result<()> {
    let bus = Bus::new(t);
    let tasks = bus.task_queue(&unique("tasks"))?;
    let attempts = Arc::new(AtomicU32::new(0));
    let (done_tx, mut done) = mpsc::unbounded_channel();
    let seen = attempts.clone();
    tasks.register_handler("flaky", move |p: serde_json::Value| {
        let seen = seen.clone();
        let done = done_tx.clone();
        async move {
            if seen.fetch_add(1, Ordering::SeqCst) < 2 {
                return Err(HandlerError::new("not yet"));
            }
            let _ = done.send(p);
            Ok(())
        }
    });
    tasks
        .start_workers()
        .workers(2)
        .retry(fast_retry(5))
        .await?;
    tasks
        .submit("flaky", &serde_json::json!({"n": 1}))
        .priority(3)
        .await?;
    let p = tokio::time::timeout(PATIENCE, done.recv())
        .await?
        .context("closed")?;
    ensure!(p["n"] == 1, "{p}");
    ensure!(attempts.load(Ordering::SeqCst) == 3);
    ensure!(bus.stats().retried == 2, "{:?}", bus.stats());
    bus.shutdown().await;
    Ok(())
}

async fn task_delay(t: T) -> anyhow::Result<()> {
    let bus = Bus::new(t);
    let tasks = bus.task_queue(&unique("later"))?;
    let (done_tx, mut done) = mpsc::unbounded_channel();
    tasks.register_handler("ping", move |_: serde_json::Value| {
        let done = done_tx.clone();
        async move {
            let _ = done.send(());
            Ok(())
        }
    });
    tasks.start_workers().workers(1).await?;
    tasks
        .submit("ping", &())
        .delay(Duration::from_millis(50))
        .await?;
    tokio::time::timeout(PATIENCE, done.recv())
        .await?
        .context("closed")?;
    bus.shutdown().await;
    Ok(())
}

async fn task_max_attempts_to_dead_letter(t: T) -> anyhow::Result<()> {
    let bus = Bus::new(t.clone());
    let tasks = bus.task_queue(&unique("doomed"))?;
    tasks.register_handler("fail", |_: serde_json::Value| async move {
        Err::<(), _>(HandlerError::new("smtp refused"))
    });
    tasks
        .start_workers()
        .workers(1)
        .retry(fast_retry(3))
        .await?;
    tasks.submit("fail", &serde_json::json!({})).await?;
    let dead = next_dead_letter(&t, tasks.name()).await?;
    let reason = dead.message().headers.get(DEAD_LETTER_REASON).unwrap_or("");
    ensure!(
        reason.contains("smtp refused") && reason.contains("3 attempts"),
        "{reason}"
    );
    let body: serde_json::Value = dead.message().decode()?;
    ensure!(body["type"] == "fail", "{body}");
    dead.ack().await?;
    bus.shutdown().await;
    Ok(())
}

async fn task_unknown_type_and_malformed_to_dead_letter(t: T) -> anyhow::Result<()> {
    let bus = Bus::new(t.clone());
    let tasks = bus.task_queue(&unique("mixed"))?;
    tasks.register_handler("known", |_: serde_json::Value| async move { Ok(()) });
    tasks.start_workers().workers(1).await?;
    tasks.submit("mystery", &serde_json::json!({})).await?;
    let dead = next_dead_letter(&t, tasks.name()).await?;
    let reason = dead.message().headers.get(DEAD_LETTER_REASON).unwrap_or("");
    ensure!(reason.contains("unknown task type: mystery"), "{reason}");
    ensure!(dead.attempt() <= 1 || reason.contains("mystery"));
    dead.ack().await?;
    t.publish(Publish::to_queue(
        tasks.name().clone(),
        Message::new("junk", "{not json"),
    ))
    .await?;
    let dead = next_dead_letter(&t, tasks.name()).await?;
    let reason = dead.message().headers.get(DEAD_LETTER_REASON).unwrap_or("");
    ensure!(reason.contains("malformed task"), "{reason}");
    dead.ack().await?;
    ensure!(bus.stats().malformed == 1, "{:?}", bus.stats());
    bus.shutdown().await;
    Ok(())
}

/// Params whose decoding panics: the task is retried and dead-lettered
/// like one whose handler panics, and the worker keeps serving.
struct PanickyParams;

impl<'de> serde::Deserialize<'de> for PanickyParams {
    fn deserialize<D: serde::Deserializer<'de>>(_: D) -> Result<Self, D::Error> {
        panic!("params decoder blew up")
    }
}

async fn task_params_decoding_panic_to_dead_letter(t: T) -> anyhow::Result<()> {
    let bus = Bus::new(t.clone());
    let tasks = bus.task_queue(&unique("panicky"))?;
    tasks.register_handler("panicky", |_: PanickyParams| async move { Ok(()) });
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
    tasks.register_handler("fine", move |n: u32| {
        let _ = done_tx.send(n);
        async move { Ok(()) }
    });
    tasks
        .start_workers()
        .workers(1)
        .retry(fast_retry(2))
        .await?;
    tasks.submit("panicky", &serde_json::json!({})).await?;
    let dead = next_dead_letter(&t, tasks.name()).await?;
    let reason = dead.message().headers.get(DEAD_LETTER_REASON).unwrap_or("");
    ensure!(
        reason.contains("panicked") && reason.contains("params decoder blew up"),
        "{reason}"
    );
    dead.ack().await?;
    ensure!(bus.stats().panics == 2, "{:?}", bus.stats());
    tasks.submit("fine", &7u32).await?;
    let n = tokio::time::timeout(PATIENCE, done_rx.recv()).await?;
    ensure!(n == Some(7), "{n:?}");
    bus.shutdown().await;
    Ok(())
}

support::on_every_backend!(
    rpc_round_trip,
    rpc_many_in_flight,
    rpc_timeout_and_late_reply,
    rpc_errors_keep_the_server_serving,
    event_fan_out_to_groups,
    event_failure_and_malformed_go_to_dead_letters,
    task_retry_then_success,
    task_delay,
    task_max_attempts_to_dead_letter,
    task_unknown_type_and_malformed_to_dead_letter,
    task_params_decoding_panic_to_dead_letter,
);
