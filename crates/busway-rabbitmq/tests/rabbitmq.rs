//! RabbitMQ-specific behaviour: ack coalescing never acks an unsettled
//! delivery, the reference topology, quorum queues, and recovery after the
//! broker drops every connection or restarts, counting every message.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use busway_core::{
    headers, ConsumeOptions, DeclareError, Delivery, DeliveryStream, Message, Publish, QueueName,
    QueueSpec, Support, Transport,
};
use busway_rabbitmq::{QueueType, RabbitMqConfig, RabbitMqTransport};
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

async fn quorum(url: &str) -> anyhow::Result<RabbitMqTransport> {
    let config = RabbitMqConfig::default().with_queue_type(QueueType::Quorum);
    Ok(RabbitMqTransport::connect_with(url, config).await?)
}

/// `(type, arguments)` of each queue named, as the broker reports them.
fn queue_types(names: &[&QueueName]) -> anyhow::Result<Vec<(String, String, serde_json::Value)>> {
    let out = std::process::Command::new("rabbitmqctl")
        .args([
            "list_queues",
            "name",
            "type",
            "arguments",
            "-q",
            "--formatter",
            "json",
        ])
        .output()
        .context("running rabbitmqctl")?;
    ensure!(
        out.status.success(),
        "rabbitmqctl list_queues: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let all: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout)?;
    names
        .iter()
        .map(|name| {
            let q = all
                .iter()
                .find(|q| q["name"] == name.as_str())
                .with_context(|| format!("queue {name} not listed"))?;
            Ok((
                name.as_str().to_owned(),
                q["type"].as_str().unwrap_or_default().to_owned(),
                q["arguments"].clone(),
            ))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_declares_replicated_queues_and_refuses_what_they_lack() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let Some(url) = support::amqp_url()? else {
        return Ok(());
    };
    let t = quorum(&url).await?;
    ensure!(t.capabilities().priority == Support::Unsupported);
    let classic = RabbitMqTransport::connect(&url).await?;
    ensure!(classic.capabilities().priority == Support::Native);

    let q = unique("quorum")?;
    t.declare_queue(&QueueSpec::new(q.clone()).with_max_attempts(3))
        .await?;
    let reply = unique("reply")?;
    t.declare_temporary_queue(&reply).await?;
    let dlq = q.dead_letter_queue();
    let listed = queue_types(&[&q, &dlq, &reply])?;
    let types: Vec<&str> = listed.iter().map(|(_, ty, _)| ty.as_str()).collect();
    ensure!(types == ["quorum", "quorum", "classic"], "{listed:?}");
    let args = listed[0].2.to_string();
    ensure!(
        args.contains(r#"["x-delivery-limit","signedint",3]"#),
        "{args}"
    );

    for (spec, why) in [
        (
            QueueSpec::new(unique("transient")?).with_durable(false),
            "durable",
        ),
        (
            QueueSpec::new(unique("prio")?).with_max_priority(9),
            "max_priority=9",
        ),
    ] {
        match t.declare_queue(&spec).await {
            Err(DeclareError::InvalidSpec { queue, reason }) => {
                ensure!(queue == spec.name, "names {queue}");
                ensure!(
                    reason.contains("quorum") && reason.contains(why),
                    "{reason}"
                );
            }
            other => bail!("{spec} on quorum queues: {other:?}"),
        }
    }

    // Another process asking for another attempt limit: the broker's
    // x-delivery-limit tells what the queue has.
    match quorum(&url)
        .await?
        .declare_queue(&QueueSpec::new(q.clone()).with_max_attempts(5))
        .await
    {
        Err(e @ DeclareError::Conflict { .. }) => {
            let text = e.to_string();
            ensure!(
                text.contains("max_attempts=3") && text.contains("max_attempts=5"),
                "{text}"
            );
        }
        other => bail!("expected a conflict, got {other:?}"),
    }
    // A classic transport meeting the quorum queue is told so.
    match classic
        .declare_queue(&QueueSpec::new(q.clone()).with_max_attempts(3))
        .await
    {
        Err(e @ DeclareError::Backend { .. }) => {
            let text = format!("{:?}", std::error::Error::source(&e));
            ensure!(
                text.contains("exists as a quorum queue") && text.contains("classic"),
                "{text}"
            );
        }
        other => bail!("expected a queue type error, got {other:?}"),
    }
    t.close().await;
    classic.close().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_counts_every_return_as_an_attempt() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let Some(url) = support::amqp_url()? else {
        return Ok(());
    };
    let t = quorum(&url).await?;
    let q = unique("returns")?;
    t.declare_queue(&QueueSpec::new(q.clone()).with_max_attempts(3))
        .await?;
    t.publish(Publish::to_queue(q.clone(), Message::new("job", "crashes")))
        .await?;
    let mut s = t.consume(&q, ConsumeOptions::with_prefetch(1)).await?;
    for attempt in 1..=3 {
        let d = next(&mut s).await?;
        ensure!(
            d.attempt() == attempt,
            "attempt {} not {attempt}",
            d.attempt()
        );
        // A handler that crashes: the delivery is dropped unsettled.
        drop(d);
    }
    let mut dead = t
        .consume(&q.dead_letter_queue(), ConsumeOptions::with_prefetch(1))
        .await?;
    let d = next(&mut dead).await?;
    let reason = d.message().headers.get(headers::DEAD_LETTER_REASON);
    ensure!(reason == Some("max attempts (3) exceeded"), "{reason:?}");
    d.ack().await?;
    t.close().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_delivery_limit_dead_letters_for_other_consumers() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let Some(url) = support::amqp_url()? else {
        return Ok(());
    };
    let t = quorum(&url).await?;
    let q = unique("limit")?;
    t.declare_queue(&QueueSpec::new(q.clone()).with_max_attempts(1))
        .await?;
    t.publish(Publish::to_queue(q.clone(), Message::new("job", "poison")))
        .await?;
    // A consumer that is not busway returns the message every time.
    let conn = lapin::Connection::connect(&url, lapin::ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    let mut returned = 0;
    while let Some(got) = ch
        .basic_get(
            q.as_str().into(),
            lapin::options::BasicGetOptions::default(),
        )
        .await?
    {
        ensure!(returned < 5, "the delivery limit never applied");
        ch.basic_nack(
            got.delivery.delivery_tag,
            lapin::options::BasicNackOptions {
                requeue: true,
                multiple: false,
            },
        )
        .await?;
        returned += 1;
    }
    ensure!(returned == 2, "returned {returned} times");
    let _ = conn.close(200, "done".into()).await;

    let mut dead = t
        .consume(&q.dead_letter_queue(), ConsumeOptions::with_prefetch(1))
        .await?;
    let d = next(&mut dead).await?;
    ensure!(text(&d) == "poison", "{}", text(&d));
    let reason = d
        .message()
        .headers
        .get(headers::DEAD_LETTER_REASON)
        .unwrap_or_default();
    ensure!(reason.starts_with("max attempts exceeded"), "{reason:?}");
    ensure!(
        d.message().headers.get(headers::ORIGINAL_QUEUE) == Some(q.as_str()),
        "{:?}",
        d.message().headers
    );
    d.ack().await?;
    t.close().await;
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
