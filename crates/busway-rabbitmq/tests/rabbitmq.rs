//! RabbitMQ-specific behaviour: ack coalescing never acks an unsettled
//! delivery, the reference topology, and recovery after the broker drops
//! every connection or restarts, counting every message.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use busway_core::{
    ConsumeOptions, DeclareError, Delivery, DeliveryStream, Message, Publish, PublishError,
    QueueName, QueueSpec, Transport,
};
use busway_rabbitmq::{RabbitMqConfig, RabbitMqTransport};
use futures::StreamExt;

/// The tests here run one at a time: the recovery tests drop every
/// connection on the broker, which would disturb the others.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn unique(prefix: &str) -> anyhow::Result<QueueName> {
    let id = uuid::Uuid::new_v4().simple().to_string();
    Ok(QueueName::new(format!("rmq_{prefix}_{}", &id[..12]))?)
}

async fn next(s: &mut DeliveryStream) -> anyhow::Result<Delivery> {
    match tokio::time::timeout(Duration::from_secs(30), s.next()).await {
        Ok(Some(d)) => Ok(d?),
        Ok(None) => bail!("stream ended"),
        Err(_) => bail!("no delivery in time"),
    }
}

fn text(d: &Delivery) -> String {
    String::from_utf8_lossy(&d.message().payload).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_order_acks_never_cover_an_unsettled_delivery() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let Some(url) = support::amqp_url()? else {
        return Ok(());
    };
    let t = RabbitMqTransport::connect(&url).await?;
    let q = unique("ooo")?;
    t.declare_queue(&QueueSpec::new(q.clone())).await?;
    for i in 0..3 {
        t.publish(Publish::to_queue(
            q.clone(),
            Message::new("n", i.to_string()),
        ))
        .await?;
    }
    let mut s = t.consume(&q, ConsumeOptions::with_prefetch(3)).await?;
    let first = next(&mut s).await?;
    let second = next(&mut s).await?;
    let third = next(&mut s).await?;
    third.ack().await?;
    second.ack().await?;
    drop(first);
    let again = next(&mut s).await?;
    ensure!(text(&again) == "0", "redelivered {}", text(&again));
    ensure!(again.attempt() == 2, "attempt {}", again.attempt());
    again.ack().await?;
    ensure!(
        tokio::time::timeout(Duration::from_millis(500), s.next())
            .await
            .is_err(),
        "an acked message came back"
    );
    t.close().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_queue_conflict_names_both_argument_sets() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let Some(url) = support::amqp_url()? else {
        return Ok(());
    };
    let q = unique("ref")?;
    let reference = QueueSpec::new(q.clone()).with_message_ttl(Duration::from_secs(86_400));
    RabbitMqTransport::connect(&url)
        .await?
        .declare_queue(&reference)
        .await?;
    // Another process (a fresh transport) asks for a priority queue.
    let other = RabbitMqTransport::connect(&url).await?;
    other.declare_queue(&reference).await?;
    match other
        .declare_queue(&reference.clone().with_max_priority(9))
        .await
    {
        Err(e @ DeclareError::Conflict { .. }) => {
            let text = e.to_string();
            ensure!(
                text.contains("max_priority=none") && text.contains("max_priority=9"),
                "{text}"
            );
        }
        other => bail!("expected a conflict, got {other:?}"),
    }
    // The channel closed by the broker was replaced: the transport still works.
    other
        .publish(Publish::to_queue(q.clone(), Message::new("x", "y")))
        .await?;
    Ok(())
}

/// Direct reply-to: a request to a queue nobody declared is refused by
/// name (the broker returns it), and requests to a live queue are each
/// confirmed and answered on the reply stream, by correlation id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_reply_requests_are_refused_or_answered() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let Some(url) = support::amqp_url()? else {
        return Ok(());
    };
    let t = RabbitMqTransport::connect(&url).await?;
    let direct = t
        .direct_replies()
        .await?
        .context("RabbitMQ has direct reply-to")?;
    let reply_to = direct.channel.reply_to().to_owned();
    let missing = unique("direct_missing")?;
    let refused = direct
        .channel
        .send(Publish::to_queue(
            missing.clone(),
            Message::new("req", "x").with_reply_to(reply_to.clone()),
        ))
        .await;
    ensure!(
        matches!(&refused, Err(PublishError::QueueNotFound(q)) if *q == missing),
        "expected the request to be refused by name, got {refused:?}"
    );
    let q = unique("direct")?;
    t.declare_queue(&QueueSpec::new(q.clone()).with_durable(false))
        .await?;
    let mut requests = t.consume(&q, ConsumeOptions::with_prefetch(32)).await?;
    let n = 20;
    for i in 0..n {
        direct
            .channel
            .send(Publish::to_queue(
                q.clone(),
                Message::new("req", i.to_string())
                    .with_reply_to(reply_to.clone())
                    .with_correlation_id(i.to_string()),
            ))
            .await?;
    }
    for _ in 0..n {
        let d = next(&mut requests).await?;
        let address = d.message().reply_to.clone().context("no reply_to")?;
        let reply = Message::new("resp", text(&d))
            .with_correlation_id(d.message().correlation_id.clone().context("no id")?);
        t.publish(Publish::to_queue(
            QueueName::reply_address(&address)?,
            reply,
        ))
        .await?;
        d.ack().await?;
    }
    let mut replies = direct.replies;
    let mut answered = HashSet::new();
    for _ in 0..n {
        let reply = tokio::time::timeout(Duration::from_secs(30), replies.next())
            .await
            .context("no reply in time")?
            .context("the reply stream ended")?;
        let body = String::from_utf8_lossy(&reply.payload).into_owned();
        ensure!(
            reply.correlation_id.as_deref() == Some(body.as_str()),
            "reply {body} came with correlation id {:?}",
            reply.correlation_id
        );
        answered.insert(body);
    }
    ensure!(answered.len() == n, "replies: {answered:?}");
    Ok(())
}

fn rabbitmqctl(args: &[&str]) -> anyhow::Result<()> {
    let out = std::process::Command::new("rabbitmqctl")
        .args(args)
        .output()
        .context("running rabbitmqctl")?;
    ensure!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Publishes `n` messages while `disrupt` runs, consuming throughout; every
/// message must arrive (duplicates allowed: delivery is at least once).
async fn survive(tag: &str, n: usize, disrupt: fn() -> anyhow::Result<()>) -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let Some(url) = support::amqp_url()? else {
        return Ok(());
    };
    let config = RabbitMqConfig::default().with_reconnect_timeout(Duration::from_secs(60));
    let t = RabbitMqTransport::connect_with(&url, config).await?;
    let q = unique(tag)?;
    t.declare_queue(&QueueSpec::new(q.clone())).await?;
    let mut s = t.consume(&q, ConsumeOptions::with_prefetch(20)).await?;

    let publisher = {
        let (t, q) = (t.clone(), q.clone());
        tokio::spawn(async move {
            let mut failed = 0usize;
            for i in 0..n {
                loop {
                    match t
                        .publish(Publish::to_queue(
                            q.clone(),
                            Message::new("n", i.to_string()),
                        ))
                        .await
                    {
                        Ok(()) => break,
                        Err(e) if e.is_retryable() => {
                            failed += 1;
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        Err(e) => return Err(anyhow::Error::from(e)),
                    }
                }
                if i == n / 4 {
                    tokio::task::spawn_blocking(disrupt).await??;
                }
            }
            Ok::<_, anyhow::Error>(failed)
        })
    };
    let mut seen = HashSet::new();
    while seen.len() < n {
        let d = next(&mut s)
            .await
            .with_context(|| format!("after {} of {n}", seen.len()))?;
        seen.insert(text(&d));
        // An ack on a connection that died is refused; the broker redelivers.
        let _ = d.ack().await;
    }
    publisher.await??;
    ensure!(seen.len() == n, "{} of {n}", seen.len());
    ensure!(t.connections_opened() >= 2, "no reconnect happened");
    t.close().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovers_after_close_all_connections() -> anyhow::Result<()> {
    survive("closeall", 400, || {
        rabbitmqctl(&["close_all_connections", "busway recovery test"])
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovers_after_broker_restart() -> anyhow::Result<()> {
    survive("restart", 400, || {
        rabbitmqctl(&["stop_app"])?;
        std::thread::sleep(Duration::from_secs(2));
        rabbitmqctl(&["start_app"])
    })
    .await
}
