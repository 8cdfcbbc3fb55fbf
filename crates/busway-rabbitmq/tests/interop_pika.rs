//! The reference wire format both ways, against the Python `pika` client
//! the reference services use.

mod support;

use std::time::Duration;

use anyhow::{ensure, Context};
use busway_core::{
    Binding, ConsumeOptions, Message, Priority, Publish, QueueName, QueueSpec, Topic, TopicPattern,
    Transport,
};
use busway_rabbitmq::RabbitMqTransport;
use futures::StreamExt;

/// The reference code's task publisher and event publisher, and a consumer
/// that prints what it got as JSON.
const PIKA: &str = r#"
import json, sys, pika
url, mode, queue = sys.argv[1], sys.argv[2], sys.argv[3]
conn = pika.BlockingConnection(pika.URLParameters(url))
ch = conn.channel()
if mode == "publish_task":
    # Exactly the reference TaskQueue declaration: must be equivalent to busway's.
    ch.queue_declare(queue=queue, durable=True, arguments={
        'x-message-ttl': 86400000,
        'x-dead-letter-exchange': 'dead_letter_exchange',
        'x-dead-letter-routing-key': f'dead_letter_{queue}'})
    ch.confirm_delivery()
    body = json.dumps({"type": "send_email", "params": {"email": "a@b.test"},
                       "timestamp": "2024-01-01T00:00:00", "priority": 3})
    ch.basic_publish(exchange='', routing_key=queue, body=body,
                     properties=pika.BasicProperties(priority=3, delivery_mode=2))
    print(body)
elif mode == "publish_event":
    ch.exchange_declare(exchange='event_bus', exchange_type='topic', durable=True)
    ch.confirm_delivery()
    body = json.dumps({"event_id": "e1", "event_type": "user.registered", "aggregate_id": "u1",
                       "data": {"name": "Ann"}, "timestamp": "2024-01-01T00:00:00",
                       "version": 1, "metadata": {}})
    ch.basic_publish(exchange='event_bus', routing_key=sys.argv[4], body=body,
                     properties=pika.BasicProperties(delivery_mode=2, content_type='application/json'))
    print(body)
elif mode == "get":
    method, props, body = ch.basic_get(queue=queue, auto_ack=True)
    if method is None:
        print(json.dumps(None))
    else:
        print(json.dumps({"body": json.loads(body), "content_type": props.content_type,
            "delivery_mode": props.delivery_mode, "type": props.type,
            "message_id": props.message_id, "priority": props.priority,
            "correlation_id": props.correlation_id,
            "headers": sorted((props.headers or {}).keys())}))
conn.close()
"#;

/// Runs the script; `None` when Python or pika is missing and brokers are
/// not required.
fn pika(args: &[&str]) -> anyhow::Result<Option<String>> {
    busway_conformance::environment::run_python(PIKA, args)
}

fn unique(prefix: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("interop_{prefix}_{}", &id[..12])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pika_task_reaches_busway_consumer() -> anyhow::Result<()> {
    let Some(url) = support::amqp_url()? else {
        return Ok(());
    };
    let t = RabbitMqTransport::connect(&url).await?;
    let q = QueueName::new(unique("task"))?;
    t.declare_queue(&QueueSpec::new(q.clone()).with_message_ttl(Duration::from_secs(86_400)))
        .await?;
    let Some(body) = pika(&[&url, "publish_task", q.as_str()])? else {
        return Ok(());
    };
    let mut s = t.consume(&q, ConsumeOptions::with_prefetch(1)).await?;
    let d = tokio::time::timeout(Duration::from_secs(15), s.next())
        .await
        .context("no delivery")?
        .context("stream ended")??;
    ensure!(d.message().payload == body.as_bytes(), "body changed");
    ensure!(d.message().priority == Priority::saturating(3), "priority");
    ensure!(d.attempt() == 1, "attempt {}", d.attempt());
    ensure!(d.message().kind == q.as_str(), "kind {}", d.message().kind);
    let task: serde_json::Value = d.message().decode()?;
    ensure!(task["type"] == "send_email", "{task}");
    d.ack().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pika_event_reaches_busway_group() -> anyhow::Result<()> {
    let Some(url) = support::amqp_url()? else {
        return Ok(());
    };
    let t = RabbitMqTransport::connect(&url).await?;
    let q = QueueName::new(unique("group"))?;
    let prefix = unique("ev").replace('_', "");
    let topic = format!("{prefix}.user.registered");
    t.declare_queue(&QueueSpec::new(q.clone())).await?;
    t.bind(&Binding::new(
        q.clone(),
        TopicPattern::new(format!("{prefix}.user.*"))?,
    ))
    .await?;
    let Some(body) = pika(&[&url, "publish_event", "-", &topic])? else {
        return Ok(());
    };
    let mut s = t.consume(&q, ConsumeOptions::with_prefetch(1)).await?;
    let d = tokio::time::timeout(Duration::from_secs(15), s.next())
        .await
        .context("no delivery")?
        .context("stream ended")??;
    ensure!(d.message().payload == body.as_bytes(), "body changed");
    ensure!(
        d.topic().map(Topic::as_str) == Some(topic.as_str()),
        "topic"
    );
    ensure!(d.message().kind == topic, "kind {}", d.message().kind);
    ensure!(d.message().content_type == "application/json");
    d.ack().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busway_task_is_read_by_pika_in_reference_shape() -> anyhow::Result<()> {
    let Some(url) = support::amqp_url()? else {
        return Ok(());
    };
    let t = RabbitMqTransport::connect(&url).await?;
    let q = QueueName::new(unique("out"))?;
    t.declare_queue(&QueueSpec::new(q.clone()).with_message_ttl(Duration::from_secs(86_400)))
        .await?;
    let body = serde_json::json!({"type": "send_email", "params": {"email": "a@b.test"},
        "timestamp": "2024-01-01T00:00:00", "priority": 5});
    let m = Message::json("send_email", &body)?
        .with_priority(Priority::saturating(5))
        .with_correlation_id("c-1");
    t.publish(Publish::to_queue(q.clone(), m.clone())).await?;
    let Some(out) = pika(&[&url, "get", q.as_str()])? else {
        return Ok(());
    };
    let got: serde_json::Value = serde_json::from_str(&out)?;
    ensure!(got["body"] == body, "body {}", got["body"]);
    ensure!(got["delivery_mode"] == 2, "{got}");
    ensure!(got["priority"] == 5, "{got}");
    ensure!(got["type"] == "send_email", "{got}");
    ensure!(got["content_type"] == "application/json", "{got}");
    ensure!(got["correlation_id"] == "c-1", "{got}");
    ensure!(got["message_id"] == m.id.to_string(), "{got}");
    Ok(())
}
