//! Payload protection on the bus, end to end: encrypted events round trip,
//! a tampered stored message is dead-lettered with the reason, key rotation,
//! the replay window, and compression bombs.

mod support;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{ensure, Context};
use busway::headers::DEAD_LETTER_REASON;
use busway::protect::{
    headers, ContentEncoding, Keyring, Limits, MemoryAuditLog, PayloadProtection, SecretKey,
};
use busway::{Bus, Event, Publish, QueueName, SendError, Transport};
use support::{next_dead_letter, next_message, unique, PATIENCE};

type T = Arc<dyn Transport>;

fn keyring() -> Keyring {
    Keyring::new().with_key("k1", SecretKey::from([1u8; 32]))
}

async fn wait_until(what: &str, done: impl Fn() -> bool) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !done() {
        ensure!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// Counts the tasks of type `job` a bus handles on `queue`.
async fn start_counting_workers(bus: &Bus, queue: &str) -> anyhow::Result<Arc<AtomicU32>> {
    let handled = Arc::new(AtomicU32::new(0));
    let tasks = bus.task_queue(queue)?;
    let counter = handled.clone();
    tasks.register_handler("job", move |_: serde_json::Value| {
        let counter = counter.clone();
        async move {
            counter.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    });
    tasks.start_workers().workers(1).await?;
    Ok(handled)
}

/// Encrypted events reach their handler intact; the audit log names who
/// published and consumed them.
async fn encrypted_events_round_trip(t: T) -> anyhow::Result<()> {
    let audit = Arc::new(MemoryAuditLog::default());
    let protection = PayloadProtection::encrypt(keyring())
        .compress(ContentEncoding::Zstd)
        .with_audit("orders-service", audit.clone());
    let bus = Bus::builder(t.clone()).protect(protection).build();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    bus.register_event_handler("order.*", &unique("audit"), move |e: Event| {
        let sink = sink.clone();
        async move {
            sink.lock().unwrap_or_else(|e| e.into_inner()).push(e.data);
            Ok(())
        }
    })
    .await?;
    let data = serde_json::json!({"order_id": 7, "note": "x".repeat(2000)});
    bus.publish_event(&Event::new("order.created", "order_7", data.clone()))
        .await?;
    wait_until("the event", || {
        !seen.lock().unwrap_or_else(|e| e.into_inner()).is_empty()
    })
    .await?;
    ensure!(seen.lock().unwrap_or_else(|e| e.into_inner())[0] == data);
    let actions: Vec<_> = audit.records().iter().map(|r| r.action.as_str()).collect();
    ensure!(actions == ["published", "consumed"], "{actions:?}");
    ensure!(audit.records()[0].principal == "orders-service");
    bus.shutdown().await;
    Ok(())
}

/// A stored message whose ciphertext is altered (through the transport,
/// underneath the bus) never reaches the handler: it is dead-lettered
/// with the reason, still encrypted.
async fn tampered_message_is_dead_lettered(t: T) -> anyhow::Result<()> {
    let queue = unique("tamper");
    let bus = Bus::builder(t.clone())
        .protect(PayloadProtection::encrypt(keyring()))
        .build();
    bus.task_queue(&queue)?
        .submit("job", &serde_json::json!({"secret": "s3cr3t"}))
        .await?;
    let queue_name = QueueName::new(&queue)?;
    let stored = next_message(&t, &queue_name).await?;
    let mut message = stored.message().clone();
    ensure!(message.headers.get(headers::KEY_ID) == Some("k1"));
    ensure!(!String::from_utf8_lossy(&message.payload).contains("s3cr3t"));
    let mut payload = message.payload.to_vec();
    payload[3] ^= 0x10;
    message.payload = payload.into();
    t.publish(Publish::to_queue(queue_name.clone(), message))
        .await?;
    stored.ack().await?;

    let handled = start_counting_workers(&bus, &queue).await?;
    let dead = next_dead_letter(&t, &queue_name).await?;
    let reason = dead
        .message()
        .headers
        .get(DEAD_LETTER_REASON)
        .context("no reason")?;
    ensure!(reason.contains("tampered"), "reason: {reason}");
    ensure!(dead.message().headers.get(headers::NONCE).is_some());
    dead.ack().await?;
    ensure!(handled.load(Ordering::SeqCst) == 0);
    bus.shutdown().await;
    Ok(())
}

/// After rotation, messages under the old key and the new key are both
/// handled; a consumer without the new key dead-letters it as unknown.
async fn rotation(t: T) -> anyhow::Result<()> {
    let queue = unique("rotate");
    let old = Bus::builder(t.clone())
        .protect(PayloadProtection::encrypt(keyring()))
        .build();
    old.task_queue(&queue)?.submit("job", &1).await?;
    let rotated = keyring()
        .with_key("k2", SecretKey::from([2u8; 32]))
        .encrypt_with("k2");
    let new = Bus::builder(t.clone())
        .protect(PayloadProtection::encrypt(rotated))
        .build();
    new.task_queue(&queue)?.submit("job", &2).await?;
    let handled = start_counting_workers(&new, &queue).await?;
    wait_until("both tasks", || handled.load(Ordering::SeqCst) == 2).await?;
    new.shutdown().await;

    // A consumer still on the old keyring cannot open k2 messages.
    let other = unique("rotate_old");
    let publisher = Bus::builder(t.clone())
        .protect(PayloadProtection::encrypt(
            keyring()
                .with_key("k2", SecretKey::from([2u8; 32]))
                .encrypt_with("k2"),
        ))
        .build();
    publisher.task_queue(&other)?.submit("job", &3).await?;
    let handled = start_counting_workers(&old, &other).await?;
    let dead = next_dead_letter(&t, &QueueName::new(&other)?).await?;
    let reason = dead.message().headers.get(DEAD_LETTER_REASON).unwrap_or("");
    ensure!(reason.contains("unknown key id `k2`"), "reason: {reason}");
    dead.ack().await?;
    ensure!(handled.load(Ordering::SeqCst) == 0);
    old.shutdown().await;
    Ok(())
}

/// A captured message published again is not processed twice.
async fn replay_is_dead_lettered(t: T) -> anyhow::Result<()> {
    let queue = unique("replay");
    let queue_name = QueueName::new(&queue)?;
    let bus = Bus::builder(t.clone())
        .protect(PayloadProtection::sign(keyring()).with_replay_window(Duration::from_secs(600)))
        .build();
    bus.task_queue(&queue)?.submit("job", &1).await?;
    let stored = next_message(&t, &queue_name).await?;
    let captured = stored.message().clone();
    t.publish(Publish::to_queue(queue_name.clone(), captured.clone()))
        .await?;
    t.publish(Publish::to_queue(queue_name.clone(), captured))
        .await?;
    stored.ack().await?;

    let handled = start_counting_workers(&bus, &queue).await?;
    let dead = next_dead_letter(&t, &queue_name).await?;
    let reason = dead.message().headers.get(DEAD_LETTER_REASON).unwrap_or("");
    ensure!(reason.contains("replayed"), "reason: {reason}");
    dead.ack().await?;
    ensure!(handled.load(Ordering::SeqCst) == 1);
    bus.shutdown().await;
    Ok(())
}

/// A payload that decompresses beyond the limit is dead-lettered, and a
/// bus with the limit refuses to publish one.
async fn compression_bomb_is_dead_lettered(t: T) -> anyhow::Result<()> {
    let queue = unique("bomb");
    let limits = Limits::default().with_max_decompressed_bytes(64 * 1024);
    let sender = Bus::builder(t.clone())
        .protect(PayloadProtection::encrypt(keyring()).compress(ContentEncoding::Zstd))
        .build();
    let receiver = Bus::builder(t.clone())
        .protect(PayloadProtection::encrypt(keyring()).with_limits(limits))
        .build();
    let zeros = "0".repeat(2 * 1024 * 1024);
    sender
        .task_queue(&queue)?
        .submit("job", &serde_json::json!({ "blob": zeros }))
        .await?;
    let refused = receiver
        .task_queue(&queue)?
        .submit("job", &serde_json::json!({ "blob": zeros }))
        .await;
    ensure!(matches!(refused, Err(SendError::Publish(_))), "{refused:?}");
    let handled = start_counting_workers(&receiver, &queue).await?;
    let dead = next_dead_letter(&t, &QueueName::new(&queue)?).await?;
    let reason = dead.message().headers.get(DEAD_LETTER_REASON).unwrap_or("");
    ensure!(reason.contains("decompression_bomb"), "reason: {reason}");
    dead.ack().await?;
    ensure!(handled.load(Ordering::SeqCst) == 0);
    receiver.shutdown().await;
    Ok(())
}

support::on_every_backend!(
    encrypted_events_round_trip,
    tampered_message_is_dead_lettered,
    rotation,
    replay_is_dead_lettered,
    compression_bomb_is_dead_lettered,
);
