//! The cases. Each is a plain async function taking the [`Harness`]; the
//! [`conformance_tests!`](crate::conformance_tests) macro gives each its own test.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use busway_core::{
    headers, Binding, ConsumeError, ConsumeOptions, DeclareError, Delivery, Durability, Message,
    NameError, Priority, Publish, PublishError, QueueName, QueueSpec, Support, TopicPattern,
};
use bytes::Bytes;
use futures::{stream, StreamExt, TryStreamExt};

use crate::support::{declare, eventually, next, nothing_within, pattern, topic, topic_prefix};
use crate::Harness;

type Result = anyhow::Result<()>;

fn prefetch(n: u16) -> ConsumeOptions {
    ConsumeOptions::with_prefetch(n)
}

fn text(d: &Delivery) -> String {
    String::from_utf8_lossy(&d.message().payload).into_owned()
}

/// Published messages arrive intact, once, with attempt 1; acked ones are gone.
pub async fn publish_consume(h: &dyn Harness) -> Result {
    let t = h.open().await?;
    let q = declare(&*t, "basic", |s| s).await?;
    let sent = Message::new("greeting", "hello")
        .with_correlation_id("corr-1")
        .with_causation_id("cause-1")
        .with_reply_to("replies")
        .with_header("tenant", "acme")
        .with_content_type("text/plain");
    t.publish(Publish::to_queue(q.clone(), sent.clone()))
        .await?;

    let mut s = t.consume(&q, prefetch(10)).await?;
    let d = next(&mut s).await?;
    let got = d.message();
    ensure!(got.id == sent.id, "id changed: {} != {}", got.id, sent.id);
    ensure!(got.kind == "greeting", "kind: {}", got.kind);
    ensure!(got.payload == sent.payload, "payload changed");
    ensure!(
        got.correlation_id.as_deref() == Some("corr-1"),
        "correlation id lost"
    );
    ensure!(
        got.causation_id.as_deref() == Some("cause-1"),
        "causation id lost"
    );
    ensure!(got.reply_to.as_deref() == Some("replies"), "reply_to lost");
    ensure!(
        got.headers.get("tenant") == Some("acme"),
        "header lost: {:?}",
        got.headers
    );
    ensure!(
        got.content_type == "text/plain",
        "content type: {}",
        got.content_type
    );
    let drift = got
        .timestamp
        .duration_since(sent.timestamp)
        .or_else(|e| Ok::<_, anyhow::Error>(e.duration()))?;
    ensure!(
        drift < Duration::from_secs(1),
        "timestamp changed by {drift:?}"
    );
    ensure!(
        d.attempt() == 1,
        "first delivery has attempt {}",
        d.attempt()
    );
    ensure!(d.queue() == &q, "queue: {}", d.queue());
    ensure!(d.topic().is_none(), "direct message has a topic");
    d.ack().await?;

    nothing_within(&mut s, Duration::from_millis(200)).await?;
    let stats = t.queue_stats(&q).await?;
    ensure!(
        stats.ready == 0 && stats.in_flight == 0,
        "after ack: {stats:?}"
    );
    Ok(())
}

/// A topic message reaches every bound group once.
pub async fn fan_out_to_groups(h: &dyn Harness) -> Result {
    let t = h.open().await?;
    let p = topic_prefix();
    let a = declare(&*t, "fan_a", |s| s).await?;
    let b = declare(&*t, "fan_b", |s| s).await?;
    let unrelated = declare(&*t, "fan_c", |s| s).await?;
    t.bind(&Binding::new(a.clone(), pattern(&format!("{p}.order.*"))?))
        .await?;
    t.bind(&Binding::new(
        b.clone(),
        pattern(&format!("{p}.order.created"))?,
    ))
    .await?;
    // Binding twice is idempotent: still one copy.
    t.bind(&Binding::new(
        b.clone(),
        pattern(&format!("{p}.order.created"))?,
    ))
    .await?;
    t.bind(&Binding::new(
        unrelated.clone(),
        pattern(&format!("{p}.user.*"))?,
    ))
    .await?;

    let created = topic(&format!("{p}.order.created"))?;
    for i in 0..5 {
        t.publish(Publish::to_topic(
            created.clone(),
            Message::new("order.created", format!("{i}")),
        ))
        .await?;
    }
    for q in [&a, &b] {
        let mut s = t.consume(q, prefetch(10)).await?;
        for i in 0..5 {
            let d = next(&mut s)
                .await
                .with_context(|| format!("queue {q}, message {i}"))?;
            ensure!(
                d.topic() == Some(&created),
                "topic on delivery: {:?}",
                d.topic()
            );
            ensure!(
                text(&d) == i.to_string(),
                "queue {q}: got {} expected {i}",
                text(&d)
            );
            d.ack().await?;
        }
        nothing_within(&mut s, Duration::from_millis(200)).await?;
    }
    ensure!(
        t.queue_stats(&unrelated).await?.ready == 0,
        "unmatched group got a copy"
    );
    // Publishing to a topic nobody listens to is not an error.
    t.publish(Publish::to_topic(
        topic(&format!("{p}.nobody"))?,
        Message::new("x", "y"),
    ))
    .await?;
    Ok(())
}

/// Members of one group share the work: each message goes to exactly one.
pub async fn competing_consumers(h: &dyn Harness) -> Result {
    let t = h.open().await?;
    let q = declare(&*t, "compete", |s| s).await?;
    const N: usize = 300;
    let batch = (0..N)
        .map(|i| Publish::to_queue(q.clone(), Message::new("job", i.to_string())))
        .collect();
    t.publish_batch(batch, Durability::Durable).await?;

    let mut workers = Vec::new();
    let remaining = Arc::new(std::sync::atomic::AtomicUsize::new(N));
    for _ in 0..3 {
        let mut s = t.consume(&q, prefetch(5)).await?;
        let remaining = remaining.clone();
        workers.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            while remaining.load(std::sync::atomic::Ordering::SeqCst) > 0 {
                match tokio::time::timeout(Duration::from_millis(300), s.next()).await {
                    Ok(Some(d)) => {
                        let d = d?;
                        seen.push(text(&d));
                        d.ack().await?;
                        remaining.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                    }
                    Ok(None) => bail!("stream ended"),
                    Err(_) => {}
                }
            }
            Ok::<_, anyhow::Error>(seen)
        }));
    }
    let mut all = Vec::new();
    for w in workers {
        all.extend(tokio::time::timeout(Duration::from_secs(60), w).await???);
    }
    let unique: HashSet<_> = all.iter().collect();
    ensure!(all.len() == N, "{} deliveries for {N} messages", all.len());
    ensure!(
        unique.len() == N,
        "duplicates: {} unique of {}",
        unique.len(),
        all.len()
    );
    Ok(())
}

/// A single consumer sees messages of equal priority in publish order.
pub async fn per_consumer_ordering(h: &dyn Harness) -> Result {
    let t = h.open().await?;
    if t.capabilities().ordering == Support::Unsupported {
        // Nothing to check but that the backend says so.
        return Ok(());
    }
    let q = declare(&*t, "order", |s| s).await?;
    for chunk in (0..200).collect::<Vec<_>>().chunks(50) {
        let batch = chunk
            .iter()
            .map(|i| Publish::to_queue(q.clone(), Message::new("n", i.to_string())))
            .collect();
        t.publish_batch(batch, Durability::Durable).await?;
    }
    let mut s = t.consume(&q, prefetch(20)).await?;
    for i in 0..200 {
        let d = next(&mut s).await?;
        ensure!(text(&d) == i.to_string(), "expected {i}, got {}", text(&d));
        d.ack().await?;
    }
    Ok(())
}

/// A nacked message comes back with the same id and attempt + 1.
pub async fn nack_redelivers_with_next_attempt(h: &dyn Harness) -> Result {
    let t = h.open().await?;
    let q = declare(&*t, "nack", |s| s).await?;
    let m = Message::new("job", "retry me");
    t.publish(Publish::to_queue(q.clone(), m.clone())).await?;
    let mut s = t.consume(&q, prefetch(1)).await?;
    for attempt in 1..=3 {
        let d = next(&mut s).await?;
        ensure!(d.message().id == m.id, "different message");
        ensure!(
            d.attempt() == attempt,
            "attempt {} expected {attempt}",
            d.attempt()
        );
        if attempt < 3 {
            d.nack(None).await?;
        } else {
            d.ack().await?;
        }
    }
    nothing_within(&mut s, Duration::from_millis(200)).await
}

/// `nack(retry_after)` holds the message back for at least that long.
pub async fn nack_with_delay_is_not_delivered_early(h: &dyn Harness) -> Result {
    let t = h.open().await?;
    let q = declare(&*t, "nack_delay", |s| s).await?;
    t.publish(Publish::to_queue(q.clone(), Message::new("job", "later")))
        .await?;
    let mut s = t.consume(&q, prefetch(1)).await?;
    let d = next(&mut s).await?;
    let delay = Duration::from_millis(600);
    let nacked_at = Instant::now();
    d.nack(Some(delay)).await?;
    let stats = t.queue_stats(&q).await?;
    ensure!(
        stats.delayed == 1 && stats.ready == 0,
        "after delayed nack: {stats:?}"
    );
    let d = next(&mut s).await?;
    let waited = nacked_at.elapsed();
    // Millisecond clocks may round the due time down by up to 1 ms.
    ensure!(
        waited + Duration::from_millis(2) >= delay,
        "redelivered after {waited:?}, before the {delay:?} retry delay"
    );
    ensure!(d.attempt() == 2, "attempt {}", d.attempt());
    d.ack().await?;
    Ok(())
}

/// A delayed publish becomes visible only after its delay.
pub async fn delayed_publish_is_not_delivered_early(h: &dyn Harness) -> Result {
    let t = h.open().await?;
    let q = declare(&*t, "delay", |s| s).await?;
    let delay = Duration::from_millis(500);
    let published = Instant::now();
    t.publish(Publish::to_queue(q.clone(), Message::new("job", "delayed")).with_delay(delay))
        .await?;
    t.publish(Publish::to_queue(q.clone(), Message::new("job", "now")))
        .await?;
    let mut s = t.consume(&q, prefetch(10)).await?;
    let first = next(&mut s).await?;
    ensure!(
        text(&first) == "now",
        "the undelayed message comes first, got {}",
        text(&first)
    );
    first.ack().await?;
    let d = next(&mut s).await?;
    let waited = published.elapsed();
    ensure!(text(&d) == "delayed", "got {}", text(&d));
    ensure!(
        waited + Duration::from_millis(2) >= delay,
        "delivered after {waited:?}, before its {delay:?} delay"
    );
    d.ack().await?;
    Ok(())
}

/// A delivery dropped without settling is redelivered.
pub async fn dropped_delivery_is_redelivered(h: &dyn Harness) -> Result {
    let t = h.open().await?;
    let q = declare(&*t, "drop", |s| s).await?;
    t.publish(Publish::to_queue(q.clone(), Message::new("job", "dropped")))
        .await?;
    let mut s = t.consume(&q, prefetch(1)).await?;
    let d = next(&mut s).await?;
    ensure!(d.attempt() == 1, "attempt {}", d.attempt());
    drop(d);
    let d = next(&mut s).await?;
    ensure!(text(&d) == "dropped", "got {}", text(&d));
    ensure!(d.attempt() == 2, "redelivery has attempt {}", d.attempt());
    d.ack().await?;
    Ok(())
}

/// Past max attempts a message moves to the dead-letter queue, with the
/// reason, its original topic and queue, and the attempt count.
pub async fn max_attempts_dead_letters_with_reason(h: &dyn Harness) -> Result {
    let t = h.open().await?;
    let p = topic_prefix();
    let q = declare(&*t, "maxatt", |s| s.with_max_attempts(2)).await?;
    t.bind(&Binding::new(q.clone(), pattern(&format!("{p}.task.*"))?))
        .await?;
    let original = topic(&format!("{p}.task.failing"))?;
    let m = Message::new("task", "poison");
    t.publish(Publish::to_topic(original.clone(), m.clone()))
        .await?;

    let mut s = t.consume(&q, prefetch(1)).await?;
    next(&mut s).await?.nack(None).await?;
    // The second delivery is dropped (a crashed handler): that is an attempt too.
    let d = next(&mut s).await?;
    ensure!(d.attempt() == 2, "attempt {}", d.attempt());
    d.nack(None).await?;
    nothing_within(&mut s, Duration::from_millis(300)).await?;

    let dlq = q.dead_letter_queue();
    let mut dead = t.consume(&dlq, prefetch(1)).await?;
    let d = next(&mut dead).await?;
    let dm = d.message();
    ensure!(
        dm.id == m.id && dm.payload == m.payload,
        "dead letter is not the original message"
    );
    let reason = dm
        .headers
        .get(headers::DEAD_LETTER_REASON)
        .unwrap_or_default();
    ensure!(reason.contains("max attempts"), "reason: {reason:?}");
    ensure!(
        dm.headers.get(headers::ORIGINAL_TOPIC) == Some(original.as_str()),
        "original topic: {:?}",
        dm.headers
    );
    ensure!(
        dm.headers.get(headers::ORIGINAL_QUEUE) == Some(q.as_str()),
        "original queue: {:?}",
        dm.headers
    );
    ensure!(
        dm.headers.get(headers::ATTEMPTS) == Some("2"),
        "attempts: {:?}",
        dm.headers
    );
    d.ack().await?;
    let stats = t.queue_stats(&q).await?;
    ensure!(
        stats.ready == 0 && stats.in_flight == 0,
        "source queue after: {stats:?}"
    );
    Ok(())
}

/// `dead_letter(reason)` moves the message at once, keeping the reason.
pub async fn explicit_dead_letter_keeps_reason(h: &dyn Harness) -> Result {
    let t = h.open().await?;
    let q = declare(&*t, "deadletter", |s| s).await?;
    t.publish(Publish::to_queue(
        q.clone(),
        Message::new("unknown_type", "{}"),
    ))
    .await?;
    let mut s = t.consume(&q, prefetch(1)).await?;
    next(&mut s)
        .await?
        .dead_letter("unknown message type `unknown_type`")
        .await?;
    let stats = t.queue_stats(&q).await?;
    ensure!(
        stats.dead_lettered == 1,
        "stats after dead-letter: {stats:?}"
    );
    let mut dead = t.consume(&q.dead_letter_queue(), prefetch(1)).await?;
    let d = next(&mut dead).await?;
    ensure!(
        d.message().headers.get(headers::DEAD_LETTER_REASON)
            == Some("unknown message type `unknown_type`"),
        "headers: {:?}",
        d.message().headers
    );
    ensure!(
        d.message().headers.get(headers::ORIGINAL_TOPIC).is_none(),
        "no topic was used"
    );
    ensure!(
        d.message().headers.get(headers::ATTEMPTS) == Some("1"),
        "{:?}",
        d.message().headers
    );
    d.ack().await?;
    Ok(())
}

/// A priority queue delivers higher priorities first, FIFO within one priority.
pub async fn priority_order(h: &dyn Harness) -> Result {
    let t = h.open().await?;
    if t.capabilities().priority == Support::Unsupported {
        let q = busway_core::QueueName::new(crate::support::unique("prio"))?;
        let refused = t
            .declare_queue(&QueueSpec::new(q).with_max_priority(9))
            .await;
        ensure!(
            refused.is_err(),
            "a backend without priorities accepted a priority queue"
        );
        return Ok(());
    }
    let q = declare(&*t, "prio", |s| s.with_max_priority(9)).await?;
    let sent = [(1, "a"), (5, "b"), (9, "c"), (0, "d"), (5, "e"), (9, "f")];
    let batch = sent
        .iter()
        .map(|(p, name)| {
            Publish::to_queue(
                q.clone(),
                Message::new("job", *name).with_priority(Priority::saturating(*p)),
            )
        })
        .collect();
    t.publish_batch(batch, Durability::Durable).await?;
    let mut s = t.consume(&q, prefetch(1)).await?;
    let mut order = Vec::new();
    for _ in 0..sent.len() {
        let d = next(&mut s).await?;
        order.push(text(&d));
        d.ack().await?;
    }
    ensure!(
        order == ["c", "f", "b", "e", "a", "d"],
        "delivery order {order:?}"
    );
    Ok(())
}

/// Expired messages are never delivered; they are dead-lettered as `expired`.
pub async fn ttl_expiry_dead_letters(h: &dyn Harness) -> Result {
    let t = h.open().await?;
    if t.capabilities().ttl == Support::Unsupported {
        let q = busway_core::QueueName::new(crate::support::unique("ttl"))?;
        let spec = QueueSpec::new(q).with_message_ttl(Duration::from_secs(1));
        ensure!(
            t.declare_queue(&spec).await.is_err(),
            "TTL accepted without support"
        );
        return Ok(());
    }
    let q = declare(&*t, "ttl", |s| {
        s.with_message_ttl(Duration::from_millis(200))
    })
    .await?;
    let plain = declare(&*t, "ttl_msg", |s| s).await?;
    t.publish(Publish::to_queue(
        q.clone(),
        Message::new("job", "queue-ttl"),
    ))
    .await?;
    let short = Message::new("job", "message-ttl").with_ttl(Duration::from_millis(200));
    t.publish(Publish::to_queue(plain.clone(), short)).await?;
    tokio::time::sleep(Duration::from_millis(400)).await;
    t.publish(Publish::to_queue(q.clone(), Message::new("job", "fresh")))
        .await?;
    t.publish(Publish::to_queue(
        plain.clone(),
        Message::new("job", "fresh"),
    ))
    .await?;

    for (queue, expired) in [(&q, "queue-ttl"), (&plain, "message-ttl")] {
        let mut s = t.consume(queue, prefetch(10)).await?;
        let d = next(&mut s).await?;
        ensure!(text(&d) == "fresh", "{queue}: delivered {}", text(&d));
        d.ack().await?;
        nothing_within(&mut s, Duration::from_millis(200)).await?;
        let mut dead = t.consume(&queue.dead_letter_queue(), prefetch(1)).await?;
        let d = next(&mut dead).await?;
        ensure!(text(&d) == expired, "dead letter {}", text(&d));
        let reason = d.message().headers.get(headers::DEAD_LETTER_REASON);
        ensure!(reason == Some("expired"), "reason {reason:?}");
        d.ack().await?;
    }
    Ok(())
}

/// `*` matches one word, `#` zero or more, as in AMQP.
pub async fn topic_wildcards(h: &dyn Harness) -> Result {
    let t = h.open().await?;
    let p = topic_prefix();
    let star = declare(&*t, "star", |s| s).await?;
    let hash = declare(&*t, "hash", |s| s).await?;
    let all = declare(&*t, "all", |s| s).await?;
    t.bind(&Binding::new(
        star.clone(),
        pattern(&format!("{p}.*.created"))?,
    ))
    .await?;
    t.bind(&Binding::new(
        hash.clone(),
        pattern(&format!("{p}.order.#"))?,
    ))
    .await?;
    t.bind(&Binding::new(all.clone(), pattern(&format!("{p}.#"))?))
        .await?;
    let topics = ["order.created", "user.created", "order", "order.item.added"];
    for name in topics {
        let to = topic(&format!("{p}.{name}"))?;
        t.publish(Publish::to_topic(to, Message::new("e", name)))
            .await?;
    }
    let expect: [(&QueueName, &[&str]); 3] = [
        (&star, &["order.created", "user.created"]),
        (&hash, &["order.created", "order", "order.item.added"]),
        (&all, &topics),
    ];
    for (q, wanted) in expect {
        let mut s = t.consume(q, prefetch(10)).await?;
        let mut got = Vec::new();
        for _ in 0..wanted.len() {
            let d = next(&mut s).await?;
            got.push(text(&d));
            d.ack().await?;
        }
        nothing_within(&mut s, Duration::from_millis(200)).await?;
        ensure!(got == wanted, "{q}: got {got:?}, expected {wanted:?}");
    }
    Ok(())
}

/// 8 publishers publishing concurrently: every message arrives exactly once.
pub async fn concurrent_publishers_lose_nothing(h: &dyn Harness) -> Result {
    let t = h.open().await?;
    let q = declare(&*t, "bulk", |s| s).await?;
    let per = h.messages_per_publisher();
    const PUBLISHERS: usize = 8;
    let mut tasks = Vec::new();
    for p in 0..PUBLISHERS {
        let (t, q) = (t.clone(), q.clone());
        tasks.push(tokio::spawn(async move {
            // Many publishes in flight per publisher, as a real service would.
            stream::iter(0..per)
                .map(|i| {
                    let m = Message::new("bulk", format!("{p}:{i}"));
                    t.publish(Publish::to_queue(q.clone(), m))
                })
                .buffer_unordered(64)
                .try_collect::<Vec<()>>()
                .await
        }));
    }
    let mut s = t.consume(&q, prefetch(200)).await?;
    let total = per * PUBLISHERS;
    let mut seen = HashSet::with_capacity(total);
    let mut acks = futures::stream::FuturesUnordered::new();
    while seen.len() < total {
        let d = next(&mut s)
            .await
            .with_context(|| format!("after {} of {total} messages", seen.len()))?;
        if !seen.insert(text(&d)) {
            bail!("duplicate delivery of {}", text(&d));
        }
        acks.push(d.ack());
        while acks.len() > 100 {
            if let Some(r) = acks.next().await {
                r?;
            }
        }
    }
    while let Some(r) = acks.next().await {
        r?;
    }
    for task in tasks {
        task.await??;
    }
    nothing_within(&mut s, Duration::from_millis(300)).await?;
    let stats = t.queue_stats(&q).await?;
    ensure!(
        stats.ready == 0 && stats.in_flight == 0,
        "left over: {stats:?}"
    );
    Ok(())
}

/// A payload over the configured maximum is refused with a clear error and
/// nothing of its batch is stored.
pub async fn oversized_payload_is_refused(h: &dyn Harness) -> Result {
    let t = h.open().await?;
    let q = declare(&*t, "oversize", |s| s).await?;
    let max = t.capabilities().max_payload_bytes;
    let big = Message::new("blob", Bytes::from(vec![7u8; max + 1]));
    let batch = vec![
        Publish::to_queue(q.clone(), Message::new("small", "ok")),
        Publish::to_queue(q.clone(), big),
    ];
    match t.publish_batch(batch, Durability::Durable).await {
        Err(PublishError::PayloadTooLarge { size, max: m }) => {
            ensure!(size == max + 1 && m == max, "error reports {size} > {m}");
        }
        other => bail!("expected PayloadTooLarge, got {other:?}"),
    }
    ensure!(
        t.queue_stats(&q).await?.ready == 0,
        "part of a refused batch was stored"
    );
    t.publish(Publish::to_queue(
        q.clone(),
        Message::new("blob", vec![1u8; 1024]),
    ))
    .await?;
    ensure!(
        t.queue_stats(&q).await?.ready == 1,
        "a normal message was not stored"
    );
    Ok(())
}

/// Invalid names are refused when built; unknown queues are typed errors.
pub async fn invalid_names_and_unknown_queues_are_errors(h: &dyn Harness) -> Result {
    let t = h.open().await?;
    ensure!(matches!(
        QueueName::new("has space"),
        Err(NameError::InvalidCharacter { .. })
    ));
    ensure!(matches!(QueueName::new(""), Err(NameError::Empty { .. })));
    ensure!(matches!(
        TopicPattern::new("order.cre*"),
        Err(NameError::PartialWildcard { .. })
    ));
    ensure!(matches!(
        busway_core::Topic::new("order.#"),
        Err(NameError::WildcardInTopic { .. })
    ));

    let missing = QueueName::new(crate::support::unique("missing"))?;
    match t
        .publish(Publish::to_queue(missing.clone(), Message::new("x", "y")))
        .await
    {
        Err(PublishError::QueueNotFound(q)) if q == missing => {}
        other => bail!("publish to a missing queue: {other:?}"),
    }
    match t
        .bind(&Binding::new(missing.clone(), pattern("a.b")?))
        .await
    {
        Err(DeclareError::QueueNotFound(q)) if q == missing => {}
        other => bail!("bind of a missing queue: {other:?}"),
    }
    match t.consume(&missing, prefetch(1)).await {
        Err(ConsumeError::QueueNotFound(q)) if q == missing => {}
        Err(other) => bail!("consume of a missing queue: {other:?}"),
        Ok(_) => bail!("consume of a missing queue succeeded"),
    }
    let q = declare(&*t, "opts", |s| s).await?;
    ensure!(
        matches!(
            t.consume(&q, prefetch(0)).await,
            Err(ConsumeError::InvalidOptions(_))
        ),
        "prefetch 0 was accepted"
    );
    let invalid =
        QueueSpec::new(QueueName::new(crate::support::unique("bad"))?).with_max_priority(10);
    ensure!(
        matches!(
            t.declare_queue(&invalid).await,
            Err(DeclareError::InvalidSpec { .. })
        ),
        "max priority 10 was accepted"
    );
    Ok(())
}

/// Re-declaring the same spec is a no-op; a different one is an error naming both.
pub async fn conflicting_declare_names_both_specs(h: &dyn Harness) -> Result {
    let t = h.open().await?;
    let q = declare(&*t, "conflict", |s| s.with_max_attempts(3)).await?;
    t.declare_queue(&QueueSpec::new(q.clone()).with_max_attempts(3))
        .await?;
    match t
        .declare_queue(&QueueSpec::new(q.clone()).with_max_attempts(5))
        .await
    {
        Err(e @ DeclareError::Conflict { .. }) => {
            let text = e.to_string();
            ensure!(
                text.contains(q.as_str()),
                "error does not name the queue: {text}"
            );
            ensure!(
                text.contains("max_attempts=3") && text.contains("max_attempts=5"),
                "error does not show both specs: {text}"
            );
        }
        other => bail!("expected a conflict, got {other:?}"),
    }
    Ok(())
}

/// Whether a closed and reopened transport finds the messages again: the
/// backend stores them durably, or in a server shared by several processes
/// (a broker whose server keeps nothing on disk still outlives its clients).
fn keeps_messages_outside_the_process(c: &busway_core::Capabilities) -> bool {
    c.persistence == Support::Native || c.multi_process == Support::Native
}

/// Published messages survive closing and reopening the backend.
pub async fn durable_across_reopen(h: &dyn Harness) -> Result {
    let t = h.open().await?;
    if !keeps_messages_outside_the_process(&t.capabilities()) {
        return Ok(());
    }
    let q = declare(&*t, "durable", |s| s).await?;
    let batch = (0..10)
        .map(|i| Publish::to_queue(q.clone(), Message::new("d", i.to_string())))
        .collect();
    t.publish_batch(batch, Durability::Durable).await?;
    t.close().await;
    drop(t);

    let t = h.open().await?;
    let mut s = t.consume(&q, prefetch(10)).await?;
    for i in 0..10 {
        let d = next(&mut s).await?;
        ensure!(
            text(&d) == i.to_string(),
            "after reopen: {} expected {i}",
            text(&d)
        );
        d.ack().await?;
    }
    Ok(())
}

/// Deliveries unsettled when the backend closes come back after reopening.
pub async fn in_flight_redelivered_after_reopen(h: &dyn Harness) -> Result {
    let t = h.open().await?;
    if !keeps_messages_outside_the_process(&t.capabilities()) {
        return Ok(());
    }
    let q = declare(&*t, "inflight", |s| s).await?;
    t.publish(Publish::to_queue(q.clone(), Message::new("d", "held")))
        .await?;
    let mut s = t.consume(&q, prefetch(1)).await?;
    let held = next(&mut s).await?;
    t.close().await;
    drop(s);

    let reopened = h.open().await?;
    let mut s = reopened.consume(&q, prefetch(1)).await?;
    let d = next(&mut s).await?;
    ensure!(text(&d) == "held", "got {}", text(&d));
    ensure!(d.attempt() == 2, "attempt {}", d.attempt());
    // Settling through the closed transport must fail without touching the redelivery.
    ensure!(
        held.ack().await.is_err(),
        "ack through a closed transport succeeded"
    );
    d.ack().await?;
    nothing_within(&mut s, Duration::from_millis(200)).await?;
    Ok(())
}

/// Queue statistics count every state exactly.
pub async fn queue_stats_are_exact(h: &dyn Harness) -> Result {
    let t = h.open().await?;
    let q = declare(&*t, "stats", |s| s).await?;
    let mut batch: Vec<Publish> = (0..5)
        .map(|i| Publish::to_queue(q.clone(), Message::new("s", i.to_string())))
        .collect();
    batch.extend((0..2).map(|i| {
        Publish::to_queue(q.clone(), Message::new("s", format!("later {i}")))
            .with_delay(Duration::from_secs(3600))
    }));
    t.publish_batch(batch, Durability::Durable).await?;
    let stats = t.queue_stats(&q).await?;
    ensure!(
        (
            stats.ready,
            stats.delayed,
            stats.in_flight,
            stats.consumers,
            stats.dead_lettered
        ) == (5, 2, 0, 0, 0),
        "after publish: {stats:?}"
    );

    let mut s = t.consume(&q, prefetch(2)).await?;
    let first = next(&mut s).await?;
    let second = next(&mut s).await?;
    first.dead_letter("stats check").await?;
    let stats = t.queue_stats(&q).await?;
    ensure!(stats.consumers == 1, "consumers while consuming: {stats:?}");
    drop(s);
    eventually("the consumer is gone", || {
        let t = t.clone();
        let q = q.clone();
        async move { Ok(t.queue_stats(&q).await?.consumers == 0) }
    })
    .await?;
    let stats = t.queue_stats(&q).await?;
    ensure!(
        (
            stats.ready,
            stats.delayed,
            stats.in_flight,
            stats.dead_lettered
        ) == (3, 2, 1, 1),
        "with one in flight and one dead letter: {stats:?}"
    );
    second.ack().await?;
    let stats = t.queue_stats(&q).await?;
    ensure!(
        (
            stats.ready,
            stats.delayed,
            stats.in_flight,
            stats.dead_lettered
        ) == (3, 2, 0, 1),
        "after ack: {stats:?}"
    );
    let by_state: BTreeMap<&str, u64> = [("ready", stats.ready), ("delayed", stats.delayed)].into();
    ensure!(by_state.values().sum::<u64>() == 5, "{by_state:?}");
    Ok(())
}

/// `list_queues` names two freshly declared queues and their dead-letter
/// queues, sorted, and the stats of each listed queue can be read.
pub async fn list_queues_with_stats(h: &dyn Harness) -> Result {
    let t = h.open().await?;
    let a = declare(&*t, "list_a", |s| s).await?;
    let b = declare(&*t, "list_b", |s| s).await?;
    let mut batch: Vec<Publish> = (0..2)
        .map(|i| Publish::to_queue(a.clone(), Message::new("l", i.to_string())))
        .collect();
    batch.push(Publish::to_queue(b.clone(), Message::new("l", "b")));
    t.publish_batch(batch, Durability::Durable).await?;

    let wanted = [
        a.clone(),
        a.dead_letter_queue(),
        b.clone(),
        b.dead_letter_queue(),
    ];
    // Brokers may show a new queue in their listing a moment later.
    let deadline = Instant::now() + Duration::from_secs(15);
    let listed = loop {
        let listed = t.list_queues().await.context("list_queues")?;
        if wanted.iter().all(|q| listed.contains(q)) {
            break listed;
        }
        ensure!(
            Instant::now() < deadline,
            "{wanted:?} not all listed within 15 s: {listed:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    ensure!(
        listed.windows(2).all(|w| w[0] < w[1]),
        "not sorted or with duplicates: {listed:?}"
    );
    let mut ready = BTreeMap::new();
    for queue in listed.iter().filter(|q| wanted.contains(q)) {
        ready.insert(queue.as_str(), t.queue_stats(queue).await?.ready);
    }
    let expected: BTreeMap<&str, u64> = [
        (a.as_str(), 2),
        (b.as_str(), 1),
        (wanted[1].as_str(), 0),
        (wanted[3].as_str(), 0),
    ]
    .into();
    ensure!(ready == expected, "ready per listed queue: {ready:?}");
    Ok(())
}

/// Closing the transport ends its delivery streams.
pub async fn close_ends_consumers(h: &dyn Harness) -> Result {
    let t = h.open().await?;
    let q = declare(&*t, "close", |s| s).await?;
    let mut s = t.consume(&q, prefetch(1)).await?;
    t.close().await;
    match tokio::time::timeout(Duration::from_secs(10), s.next()).await {
        Ok(None) => {}
        Ok(Some(Err(_))) => {}
        Ok(Some(Ok(d))) => bail!("delivery after close: {d:?}"),
        Err(_) => bail!("the stream did not end within 10 s of close"),
    }
    let refused = t
        .publish(Publish::to_queue(q.clone(), Message::new("x", "y")))
        .await;
    ensure!(
        matches!(refused, Err(PublishError::Closed)),
        "publish after close: {refused:?}"
    );
    Ok(())
}
