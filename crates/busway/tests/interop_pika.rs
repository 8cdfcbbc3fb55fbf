//! The Bus against the reference Python (pika) code on RabbitMQ: a pika RPC
//! client calls a busway service and a busway client calls a pika service,
//! a pika-published event reaches a busway group, a pika-submitted task runs
//! on a busway worker and a busway-submitted task on a pika worker.

mod support;

use std::sync::Arc;

use anyhow::{ensure, Context};
use busway::{Bus, Event, RpcError, Transport};
use serde::Deserialize;
use support::{unique, PATIENCE};
use tokio::sync::mpsc;

/// The reference client code, trimmed to what the tests need.
const PIKA: &str = r#"
import json, sys, uuid, pika
from datetime import datetime
url, mode, target = sys.argv[1], sys.argv[2], sys.argv[3]
conn = pika.BlockingConnection(pika.URLParameters(url))
ch = conn.channel()
if mode == "rpc_call":
    # RequestResponseClient.call: exclusive reply queue, correlation id.
    reply_queue = f"rpc_reply_{target}_{uuid.uuid4().hex[:8]}"
    ch.queue_declare(queue=reply_queue, exclusive=True)
    correlation_id = str(uuid.uuid4())
    message = {"method": sys.argv[4], "params": json.loads(sys.argv[5]),
               "timestamp": datetime.utcnow().isoformat()}
    ch.basic_publish(exchange='', routing_key=f"rpc_{target}", body=json.dumps(message),
                     properties=pika.BasicProperties(reply_to=reply_queue,
                         correlation_id=correlation_id, content_type='application/json',
                         delivery_mode=2))
    for method, props, body in ch.consume(reply_queue, auto_ack=True, inactivity_timeout=20):
        if method is None:
            print(json.dumps({"timeout": True}))
            break
        if props.correlation_id == correlation_id:
            print(body.decode())
            break
elif mode == "publish_event":
    ch.exchange_declare(exchange='event_bus', exchange_type='topic', durable=True)
    ch.confirm_delivery()
    event = {"event_id": str(uuid.uuid4()), "event_type": target, "aggregate_id": "user_123",
             "data": {"email": "user@example.com", "name": "Ann"},
             "timestamp": datetime.utcnow().isoformat(), "version": 1, "metadata": None}
    ch.basic_publish(exchange='event_bus', routing_key=target, body=json.dumps(event),
                     properties=pika.BasicProperties(delivery_mode=2, content_type='application/json'))
elif mode == "submit_task":
    # TaskQueue.connect + submit_task, exactly.
    ch.queue_declare(queue=target, durable=True, arguments={
        'x-message-ttl': 86400000,
        'x-dead-letter-exchange': 'dead_letter_exchange',
        'x-dead-letter-routing-key': f"dead_letter_{target}"})
    ch.confirm_delivery()
    task = {"type": "send_email", "params": {"email": "user1@example.com", "subject": "hi"},
            "timestamp": datetime.utcnow().isoformat(), "priority": 0}
    ch.basic_publish(exchange='', routing_key=target, body=json.dumps(task),
                     properties=pika.BasicProperties(priority=0, delivery_mode=2))
elif mode == "rpc_serve":
    # RPCServer.start_server + on_request, exactly; stops after `count`
    # requests (or 30 s) and reports what it was sent.
    def get_user_info(user_id):
        return {"user_id": user_id, "name": "Ann"}
    service_methods = {"get_user_info": get_user_info}
    count, seen = int(sys.argv[4]), []
    ch.queue_declare(queue=f"rpc_{target}")
    def on_request(ch, method, props, body):
        try:
            request = json.loads(body)
            method_name = request["method"]
            params = request["params"]
            if method_name in service_methods:
                result = service_methods[method_name](**params)
                response = {"status": "success", "data": result}
            else:
                response = {"status": "error", "message": f"方法不存在: {method_name}"}
        except Exception as e:
            response = {"status": "error", "message": str(e)}
        ch.basic_publish(exchange='', routing_key=props.reply_to,
                         properties=pika.BasicProperties(correlation_id=props.correlation_id,
                                                         content_type='application/json'),
                         body=json.dumps(response))
        ch.basic_ack(delivery_tag=method.delivery_tag)
        seen.append({"reply_to": props.reply_to, "body": body.decode()})
        if len(seen) == count:
            ch.stop_consuming()
    ch.basic_qos(prefetch_count=1)
    ch.basic_consume(queue=f"rpc_{target}", on_message_callback=on_request)
    conn.call_later(30, ch.stop_consuming)
    ch.start_consuming()
    ch.queue_delete(queue=f"rpc_{target}")
    print(json.dumps(seen))
elif mode == "work_task":
    # TaskQueue.connect + worker_process, exactly; takes one task (or gives
    # up after 30 s) and reports the task and its properties.
    ch.queue_declare(queue=target, durable=True, arguments={
        'x-message-ttl': 86400000,
        'x-dead-letter-exchange': 'dead_letter_exchange',
        'x-dead-letter-routing-key': f"dead_letter_{target}"})
    handled, seen = [], []
    def send_email(email: str, subject: str, content: str):
        handled.append({"email": email, "subject": subject, "content": content})
    task_handlers = {"send_email": send_email}
    def callback(ch, method, properties, body):
        try:
            task_data = json.loads(body)
            task_type = task_data.get("type")
            task_params = task_data.get("params", {})
            if task_type in task_handlers:
                task_handlers[task_type](**task_params)
                ch.basic_ack(delivery_tag=method.delivery_tag)
            else:
                ch.basic_nack(delivery_tag=method.delivery_tag, requeue=False)
        except Exception as e:
            ch.basic_nack(delivery_tag=method.delivery_tag, requeue=True)
        seen.append({"body": body.decode(), "priority": properties.priority,
                     "delivery_mode": properties.delivery_mode})
        ch.stop_consuming()
    ch.basic_qos(prefetch_count=1)
    ch.basic_consume(queue=target, on_message_callback=callback)
    conn.call_later(30, ch.stop_consuming)
    ch.start_consuming()
    ch.queue_delete(queue=target)
    ch.queue_delete(queue=f"dead_letter_{target}")
    print(json.dumps({"seen": seen, "handled": handled}))
conn.close()
"#;

/// Runs the script off the runtime's threads (the busway side of the test
/// keeps running); `None` when Python or pika is missing and brokers are not required.
async fn pika(args: &[&str]) -> anyhow::Result<Option<String>> {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        busway_conformance::environment::run_python(PIKA, &args)
    })
    .await?
}

async fn broker() -> anyhow::Result<Option<(String, Arc<dyn Transport>)>> {
    let Some(url) = support::amqp_url()? else {
        return Ok(None);
    };
    let transport: Arc<dyn Transport> =
        Arc::new(busway_rabbitmq::RabbitMqTransport::connect(&url).await?);
    Ok(Some((url, transport)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pika_rpc_client_calls_busway_service() -> anyhow::Result<()> {
    let Some((url, transport)) = broker().await? else {
        return Ok(());
    };
    let service = unique("user_service");
    let bus = Bus::new(transport.clone());
    bus.register_request_handler(
        &service,
        "get_user_info",
        |q: serde_json::Value| async move {
            Ok(serde_json::json!({"user_id": q["user_id"], "name": "Ann"}))
        },
    )
    .await?;
    let Some(out) = pika(&[
        &url,
        "rpc_call",
        &service,
        "get_user_info",
        r#"{"user_id": 12345}"#,
    ])
    .await?
    else {
        return Ok(());
    };
    let reply: serde_json::Value = serde_json::from_str(&out).context(out.clone())?;
    ensure!(
        reply
            == serde_json::json!({"status": "success", "data": {"user_id": 12345, "name": "Ann"}}),
        "{reply}"
    );
    let Some(out) = pika(&[&url, "rpc_call", &service, "missing", "{}"]).await? else {
        return Ok(());
    };
    let reply: serde_json::Value = serde_json::from_str(&out).context(out.clone())?;
    ensure!(reply["status"] == "error", "{reply}");
    ensure!(
        reply["message"]
            .as_str()
            .is_some_and(|m| m.contains("missing")),
        "{reply}"
    );
    bus.shutdown().await;
    transport.close().await;
    Ok(())
}

#[derive(Debug, Deserialize)]
struct Registered {
    email: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pika_event_reaches_busway_subscriber() -> anyhow::Result<()> {
    let Some((url, transport)) = broker().await? else {
        return Ok(());
    };
    let event_type = format!("{}.user.registered", unique("interop"));
    let bus = Bus::new(transport.clone());
    let (tx, mut rx) = mpsc::unbounded_channel();
    bus.register_event_handler(
        &event_type,
        &unique("welcome"),
        move |e: Event<Registered>| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(e);
                Ok(())
            }
        },
    )
    .await?;
    if pika(&[&url, "publish_event", &event_type]).await?.is_none() {
        return Ok(());
    }
    let event = tokio::time::timeout(PATIENCE, rx.recv())
        .await?
        .context("closed")?;
    ensure!(event.event_type == event_type, "{event:?}");
    ensure!(
        event.aggregate_id == "user_123" && event.version == 1,
        "{event:?}"
    );
    ensure!(event.data.email == "user@example.com", "{event:?}");
    ensure!(event.metadata.is_empty(), "{event:?}");
    bus.shutdown().await;
    transport.close().await;
    Ok(())
}

#[derive(Debug, Deserialize)]
struct SendEmail {
    email: String,
    subject: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pika_task_runs_on_busway_worker() -> anyhow::Result<()> {
    let Some((url, transport)) = broker().await? else {
        return Ok(());
    };
    let bus = Bus::new(transport.clone());
    let tasks = bus.task_queue(&unique("task_queue"))?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    tasks.register_handler("send_email", move |t: SendEmail| {
        let tx = tx.clone();
        async move {
            let _ = tx.send(t);
            Ok(())
        }
    });
    // busway declares first; the reference declaration must be equivalent.
    tasks.start_workers().workers(2).await?;
    if pika(&[&url, "submit_task", tasks.name().as_str()])
        .await?
        .is_none()
    {
        return Ok(());
    }
    let task = tokio::time::timeout(PATIENCE, rx.recv())
        .await?
        .context("closed")?;
    ensure!(
        task.email == "user1@example.com" && task.subject == "hi",
        "{task:?}"
    );
    bus.shutdown().await;
    transport.close().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busway_rpc_client_calls_pika_service() -> anyhow::Result<()> {
    let Some((url, transport)) = broker().await? else {
        return Ok(());
    };
    let service = unique("user_service");
    let server = {
        let (url, service) = (url.clone(), service.clone());
        tokio::spawn(async move { pika(&[&url, "rpc_serve", &service, "2"]).await })
    };
    let bus = Bus::new(transport.clone());
    // The pika service declares its queue when it starts: until then the
    // call is refused as going to no service.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let user = loop {
        let call = bus
            .request::<serde_json::Value>(
                &service,
                "get_user_info",
                &serde_json::json!({"user_id": 12345}),
            )
            .timeout(PATIENCE)
            .await;
        match call {
            Err(RpcError::NoSuchService(_)) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            other => break other?,
        }
    };
    ensure!(
        user == serde_json::json!({"user_id": 12345, "name": "Ann"}),
        "{user}"
    );
    let unknown = bus
        .request::<serde_json::Value>(&service, "delete_everything", &serde_json::json!({}))
        .timeout(PATIENCE)
        .await;
    ensure!(
        matches!(&unknown, Err(RpcError::Remote { message, .. }) if message.contains("delete_everything")),
        "{unknown:?}"
    );
    let Some(out) = server.await?? else {
        return Ok(());
    };
    // What the pika service was sent: reference request bodies, replies
    // routed by RabbitMQ's direct reply-to (no reply queue).
    let seen: Vec<serde_json::Value> = serde_json::from_str(&out).context(out.clone())?;
    ensure!(seen.len() == 2, "{out}");
    for request in &seen {
        let reply_to = request["reply_to"].as_str().unwrap_or_default();
        ensure!(reply_to.starts_with("amq.rabbitmq.reply-to."), "{out}");
        let body: serde_json::Value =
            serde_json::from_str(request["body"].as_str().unwrap_or_default())?;
        let keys: Vec<&str> = body
            .as_object()
            .map(|o| o.keys().map(String::as_str).collect())
            .unwrap_or_default();
        ensure!(keys == ["method", "params", "timestamp"], "{body}");
    }
    bus.shutdown().await;
    transport.close().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busway_task_runs_on_pika_worker() -> anyhow::Result<()> {
    let Some((url, transport)) = broker().await? else {
        return Ok(());
    };
    let bus = Bus::new(transport.clone());
    let tasks = bus.task_queue(&unique("task_queue"))?;
    let params =
        serde_json::json!({"email": "user1@example.com", "subject": "hi", "content": "welcome"});
    tasks.submit("send_email", &params).priority(3).await?;
    let Some(out) = pika(&[&url, "work_task", tasks.name().as_str()]).await? else {
        return Ok(());
    };
    let report: serde_json::Value = serde_json::from_str(&out).context(out.clone())?;
    // The reference worker ran its handler with the params as keywords...
    ensure!(report["handled"] == serde_json::json!([params]), "{out}");
    // ...on a persistent message with the AMQP priority set and exactly the
    // reference body.
    let seen = &report["seen"][0];
    ensure!(seen["delivery_mode"] == 2 && seen["priority"] == 3, "{out}");
    let body: serde_json::Value = serde_json::from_str(seen["body"].as_str().unwrap_or_default())?;
    let mut keys: Vec<&str> = body
        .as_object()
        .map(|o| o.keys().map(String::as_str).collect())
        .unwrap_or_default();
    keys.sort_unstable();
    ensure!(
        keys == ["params", "priority", "timestamp", "type"],
        "{body}"
    );
    ensure!(
        body["type"] == "send_email" && body["params"] == params && body["priority"] == 3,
        "{body}"
    );
    ensure!(
        body["timestamp"].as_str().is_some_and(|t| t.contains('T')),
        "{body}"
    );
    bus.shutdown().await;
    transport.close().await;
    Ok(())
}
