//! Behaviour specific to the in-process transport, beyond the shared suite.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure};
use busway_core::{
    headers, Binding, ConsumeOptions, DeclareError, Delivery, DeliveryStream, Durability, Message,
    Priority, Publish, PublishError, QueueName, QueueSpec, SettleError, Topic, TopicPattern,
    Transport,
};
use busway_memory::{MemoryConfig, MemoryTransport};
use futures::StreamExt;

type Result = anyhow::Result<()>;

const WAIT: Duration = Duration::from_secs(5);

async fn next(stream: &mut DeliveryStream) -> anyhow::Result<Delivery> {
    match tokio::time::timeout(WAIT, stream.next()).await {
        Err(_) => bail!("no delivery within {WAIT:?}"),
        Ok(None) => bail!("the stream ended"),
        Ok(Some(delivery)) => Ok(delivery?),
    }
}

async fn nothing_within(stream: &mut DeliveryStream, wait: Duration) -> Result {
    match tokio::time::timeout(wait, stream.next()).await {
        Err(_) => Ok(()),
        Ok(None) => bail!("the stream ended"),
        Ok(Some(delivery)) => bail!("unexpected delivery {:?}", delivery?),
    }
}

fn text(d: &Delivery) -> String {
    String::from_utf8_lossy(&d.message().payload).into_owned()
}

async fn setup(
    spec: impl FnOnce(QueueSpec) -> QueueSpec,
) -> anyhow::Result<(MemoryTransport, QueueName)> {
    let t = MemoryTransport::new();
    let q = QueueName::new("q")?;
    t.declare_queue(&spec(QueueSpec::new(q.clone()))).await?;
    Ok((t, q))
}

fn job(q: &QueueName, body: &str) -> Publish {
    Publish::to_queue(q.clone(), Message::new("job", body.to_owned()))
}

#[test]
fn handles_are_send_and_sync() {
    fn check<T: Send + Sync + Clone + Default + 'static>() {}
    check::<MemoryTransport>();
}

#[tokio::test]
async fn priorities_are_clamped_to_the_queue_maximum() -> Result {
    let (t, q) = setup(|s| s.with_max_priority(2)).await?;
    // 9 and 2 are the same level on a queue whose maximum is 2: FIFO between them.
    for (p, body) in [(0, "low"), (9, "nine"), (1, "one"), (2, "two")] {
        let m = Message::new("job", body).with_priority(Priority::saturating(p));
        t.publish(Publish::to_queue(q.clone(), m)).await?;
    }
    let mut s = t.consume(&q, ConsumeOptions::with_prefetch(1)).await?;
    let mut order = Vec::new();
    for _ in 0..4 {
        let d = next(&mut s).await?;
        order.push(text(&d));
        d.ack().await?;
    }
    ensure!(order == ["nine", "two", "one", "low"], "{order:?}");
    Ok(())
}

#[tokio::test]
async fn without_max_priority_order_is_fifo() -> Result {
    let (t, q) = setup(|s| s).await?;
    for (p, body) in [(0, "a"), (9, "b"), (5, "c")] {
        let m = Message::new("job", body).with_priority(Priority::saturating(p));
        t.publish(Publish::to_queue(q.clone(), m)).await?;
    }
    let mut s = t.consume(&q, ConsumeOptions::default()).await?;
    let mut order = Vec::new();
    for _ in 0..3 {
        let d = next(&mut s).await?;
        order.push(text(&d));
        d.ack().await?;
    }
    ensure!(order == ["a", "b", "c"], "{order:?}");
    Ok(())
}

#[tokio::test]
async fn delayed_messages_wake_a_parked_consumer() -> Result {
    let (t, q) = setup(|s| s).await?;
    let mut s = t.consume(&q, ConsumeOptions::default()).await?;
    // The consumer parks on an empty queue first.
    nothing_within(&mut s, Duration::from_millis(50)).await?;
    let start = Instant::now();
    t.publish(job(&q, "late").with_delay(Duration::from_millis(300)))
        .await?;
    t.publish(job(&q, "early").with_delay(Duration::from_millis(100)))
        .await?;
    let stats = t.queue_stats(&q).await?;
    ensure!(stats.delayed == 2 && stats.ready == 0, "{stats:?}");
    let first = next(&mut s).await?;
    ensure!(text(&first) == "early" && start.elapsed() >= Duration::from_millis(100));
    let second = next(&mut s).await?;
    ensure!(text(&second) == "late" && start.elapsed() >= Duration::from_millis(300));
    first.ack().await?;
    second.ack().await?;
    Ok(())
}

#[tokio::test]
async fn dropped_deliveries_count_towards_max_attempts() -> Result {
    let (t, q) = setup(|s| s.with_max_attempts(2)).await?;
    t.publish(job(&q, "crashy")).await?;
    let mut s = t.consume(&q, ConsumeOptions::with_prefetch(1)).await?;
    drop(next(&mut s).await?);
    let d = next(&mut s).await?;
    ensure!(d.attempt() == 2, "attempt {}", d.attempt());
    drop(d);
    // The third delivery would exceed the limit: dead-lettered instead.
    nothing_within(&mut s, Duration::from_millis(100)).await?;
    let stats = t.queue_stats(&q).await?;
    ensure!(
        (stats.ready, stats.in_flight, stats.dead_lettered) == (0, 0, 1),
        "{stats:?}"
    );
    let mut dead = t
        .consume(&q.dead_letter_queue(), ConsumeOptions::default())
        .await?;
    let d = next(&mut dead).await?;
    ensure!(d.attempt() == 1 && d.topic().is_none());
    let h = &d.message().headers;
    ensure!(
        h.get(headers::DEAD_LETTER_REASON) == Some("max attempts (2) exceeded"),
        "{h:?}"
    );
    ensure!(h.get(headers::ATTEMPTS) == Some("2"), "{h:?}");
    ensure!(h.get(headers::ORIGINAL_QUEUE) == Some("q"), "{h:?}");
    ensure!(
        h.get(headers::DEAD_LETTERED_AT)
            .is_some_and(|v| v.parse::<i64>().is_ok()),
        "{h:?}"
    );
    d.ack().await?;
    Ok(())
}

#[tokio::test]
async fn expired_messages_are_dead_lettered_without_a_consumer() -> Result {
    let (t, q) = setup(|s| s.with_message_ttl(Duration::from_millis(100))).await?;
    let topic = Topic::new("a.b")?;
    t.bind(&Binding::new(q.clone(), TopicPattern::new("a.*")?))
        .await?;
    t.publish(Publish::to_topic(topic, Message::new("job", "stale")))
        .await?;
    t.publish(job(&q, "delayed past its ttl").with_delay(Duration::from_secs(60)))
        .await?;
    let mut dead = t
        .consume(&q.dead_letter_queue(), ConsumeOptions::default())
        .await?;
    let mut reasons = Vec::new();
    for _ in 0..2 {
        let d = next(&mut dead).await?;
        let h = &d.message().headers;
        ensure!(
            h.get(headers::DEAD_LETTER_REASON) == Some("expired"),
            "{h:?}"
        );
        ensure!(h.get(headers::ATTEMPTS) == Some("0"), "{h:?}");
        ensure!(
            d.message().expires_at.is_none(),
            "a dead letter must not expire again"
        );
        reasons.push((text(&d), h.get(headers::ORIGINAL_TOPIC).map(str::to_owned)));
        d.ack().await?;
    }
    reasons.sort();
    ensure!(
        reasons
            == [
                ("delayed past its ttl".to_owned(), None),
                ("stale".to_owned(), Some("a.b".to_owned()))
            ],
        "{reasons:?}"
    );
    let stats = t.queue_stats(&q).await?;
    ensure!((stats.ready, stats.delayed) == (0, 0), "{stats:?}");
    Ok(())
}

#[tokio::test]
async fn a_full_queue_refuses_the_whole_batch() -> Result {
    let t = MemoryTransport::new();
    let small = QueueName::new("small")?;
    let big = QueueName::new("big")?;
    t.declare_queue(&QueueSpec::new(small.clone()).with_max_length(2))
        .await?;
    t.declare_queue(&QueueSpec::new(big.clone())).await?;
    for q in [&small, &big] {
        t.bind(&Binding::new(q.clone(), TopicPattern::new("#")?))
            .await?;
    }
    let to_topic = |body: &str| -> anyhow::Result<Publish> {
        Ok(Publish::to_topic(
            Topic::new("x")?,
            Message::new("e", body.to_owned()),
        ))
    };
    t.publish_batch(vec![to_topic("1")?, to_topic("2")?], Durability::Durable)
        .await?;
    match t.publish(to_topic("3")?).await {
        Err(PublishError::QueueFull {
            queue,
            max_length: 2,
        }) if queue == small => {}
        other => bail!("expected QueueFull, got {other:?}"),
    }
    ensure!(
        t.queue_stats(&big).await?.ready == 2,
        "the other queue got a copy anyway"
    );
    Ok(())
}

#[tokio::test]
async fn explicit_dead_letter_without_a_dead_letter_queue_returns_the_message() -> Result {
    let (t, q) = setup(|s| s.with_dead_letter(None)).await?;
    t.publish(job(&q, "keep me")).await?;
    let mut s = t.consume(&q, ConsumeOptions::with_prefetch(1)).await?;
    match next(&mut s).await?.dead_letter("bad").await {
        Err(SettleError::NoDeadLetterQueue(name)) if name == q => {}
        other => bail!("expected NoDeadLetterQueue, got {other:?}"),
    }
    let d = next(&mut s).await?;
    ensure!(text(&d) == "keep me" && d.attempt() == 2);
    d.ack().await?;
    Ok(())
}

#[tokio::test]
async fn prefetch_bounds_unsettled_deliveries() -> Result {
    let (t, q) = setup(|s| s).await?;
    for i in 0..5 {
        t.publish(job(&q, &i.to_string())).await?;
    }
    let mut s = t.consume(&q, ConsumeOptions::with_prefetch(2)).await?;
    let a = next(&mut s).await?;
    let b = next(&mut s).await?;
    nothing_within(&mut s, Duration::from_millis(100)).await?;
    let stats = t.queue_stats(&q).await?;
    ensure!((stats.ready, stats.in_flight) == (3, 2), "{stats:?}");
    a.ack().await?;
    let c = next(&mut s).await?;
    ensure!(text(&c) == "2", "got {}", text(&c));
    b.ack().await?;
    c.ack().await?;
    Ok(())
}

#[tokio::test]
async fn competing_consumers_are_both_woken() -> Result {
    let (t, q) = setup(|s| s).await?;
    let mut a = t.consume(&q, ConsumeOptions::with_prefetch(1)).await?;
    let mut b = t.consume(&q, ConsumeOptions::with_prefetch(1)).await?;
    let (first, second) = tokio::join!(next(&mut a), async {
        tokio::time::sleep(Duration::from_millis(20)).await;
        t.publish_batch(vec![job(&q, "x"), job(&q, "y")], Durability::Durable)
            .await?;
        next(&mut b).await
    });
    let (first, second) = (first?, second?);
    let mut got = [text(&first), text(&second)];
    got.sort();
    ensure!(got == ["x", "y"], "{got:?}");
    Ok(())
}

#[tokio::test]
async fn dead_letter_queue_declarations_must_agree() -> Result {
    let t = MemoryTransport::new();
    let q = QueueName::new("orders")?;
    // The dead-letter queue declared on its own, with its own dead-letter queue.
    t.declare_queue(&QueueSpec::new(q.dead_letter_queue()))
        .await?;
    match t.declare_queue(&QueueSpec::new(q.clone())).await {
        Err(DeclareError::Conflict { existing, .. }) if existing.name == q.dead_letter_queue() => {}
        other => bail!("expected a conflict on the dead-letter queue, got {other:?}"),
    }
    // Nothing was created by the refused declaration.
    ensure!(t.queue_stats(&q).await.is_err());

    // Declared with the dead-letter spec beforehand, it is accepted.
    let other = QueueName::new("payments")?;
    t.declare_queue(&QueueSpec::dead_letter_queue(other.dead_letter_queue()))
        .await?;
    t.declare_queue(&QueueSpec::new(other.clone())).await?;
    t.declare_queue(&QueueSpec::new(other)).await?;
    Ok(())
}

#[tokio::test]
async fn close_returns_buffered_messages_and_refuses_later_calls() -> Result {
    let (t, q) = setup(|s| s).await?;
    t.publish_batch(
        vec![job(&q, "a"), job(&q, "b"), job(&q, "c")],
        Durability::Durable,
    )
    .await?;
    let mut s = t.consume(&q, ConsumeOptions::with_prefetch(3)).await?;
    let held = next(&mut s).await?;
    t.close().await;
    ensure!(s.next().await.is_none(), "stream still open after close");
    ensure!(matches!(held.ack().await, Err(SettleError::Closed)));
    ensure!(t.queue_stats(&q).await.is_err());
    ensure!(t.consume(&q, ConsumeOptions::default()).await.is_err());
    ensure!(t
        .declare_queue(&QueueSpec::new(QueueName::new("z")?))
        .await
        .is_err());
    Ok(())
}

#[tokio::test]
async fn payload_limit_comes_from_the_config() -> Result {
    let t = MemoryTransport::with_config(MemoryConfig {
        max_payload_bytes: 4,
    });
    let q = QueueName::new("q")?;
    t.declare_queue(&QueueSpec::new(q.clone())).await?;
    t.publish(job(&q, "four")).await?;
    ensure!(matches!(
        t.publish(job(&q, "fives")).await,
        Err(PublishError::PayloadTooLarge { size: 5, max: 4 })
    ));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wake_meant_for_a_dropped_consumer_is_passed_on() -> Result {
    let (t, q) = setup(|s| s).await?;
    let mut first = t.consume(&q, ConsumeOptions::with_prefetch(1)).await?;
    // `first` parks before `second`, so it is the one a publish wakes.
    nothing_within(&mut first, Duration::from_millis(50)).await?;
    let mut second = t.consume(&q, ConsumeOptions::with_prefetch(1)).await?;
    let waiting = tokio::spawn(async move {
        let d = next(&mut second).await?;
        let body = text(&d);
        d.ack().await?;
        anyhow::Ok(body)
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    t.publish(job(&q, "for whoever is left")).await?;
    drop(first);
    // Well before the receive timeout, which would hide a lost wake.
    let body = tokio::time::timeout(Duration::from_secs(1), waiting).await???;
    ensure!(body == "for whoever is left");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_small_consumers_never_stall() -> Result {
    const N: usize = 2_000;
    let (t, q) = setup(|s| s).await?;
    let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = Vec::new();
    for w in 0..6_usize {
        let mut s = t
            .consume(&q, ConsumeOptions::with_prefetch(1 + (w % 3) as u16))
            .await?;
        let done = done.clone();
        workers.push(tokio::spawn(async move {
            while done.load(std::sync::atomic::Ordering::SeqCst) < N {
                let Ok(Some(d)) = tokio::time::timeout(Duration::from_millis(100), s.next()).await
                else {
                    continue;
                };
                let d = d?;
                // Every seventh first delivery is abandoned, as by a crashed handler.
                let n: usize = text(&d).parse()?;
                if d.attempt() == 1 && n % 7 == w % 7 {
                    drop(d);
                    continue;
                }
                d.ack().await?;
                done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            anyhow::Ok(())
        }));
    }
    for chunk in (0..N).collect::<Vec<_>>().chunks(37) {
        let batch = chunk.iter().map(|i| job(&q, &i.to_string())).collect();
        t.publish_batch(batch, Durability::Durable).await?;
        tokio::task::yield_now().await;
    }
    for w in workers {
        tokio::time::timeout(Duration::from_secs(30), w).await???;
    }
    let stats = t.queue_stats(&q).await?;
    ensure!((stats.ready, stats.in_flight) == (0, 0), "{stats:?}");
    ensure!(done.load(std::sync::atomic::Ordering::SeqCst) == N);
    Ok(())
}
