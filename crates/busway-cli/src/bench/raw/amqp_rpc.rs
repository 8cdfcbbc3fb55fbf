//! The raw lapin RPC baseline for `amqp://`: the textbook RabbitMQ RPC with
//! direct reply-to, as an expert would write it with lapin alone.
//!
//! - Server (a connection of its own): a non-durable queue of its own,
//!   `basic.qos(prefetch)`, each request answered on the default exchange to
//!   its `reply_to` with the same correlation id, then acknowledged.
//! - Client (another connection): one channel consuming
//!   `amq.rabbitmq.reply-to` without acks, requests published on that same
//!   channel (no confirms) with `reply_to: amq.rabbitmq.reply-to` and a
//!   correlation id; a dispatcher hands each reply to its waiting call.
//!
//! The request body is a reference-shaped JSON request of the same size as
//! busway's, echoed back byte for byte (no JSON work on either side).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, Context};
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use tokio::sync::oneshot;

use crate::bench::rpc::{echo_text, timed_calls, RpcMeasured};
use crate::bench::BenchArgs;

const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";

type Waiting = Arc<Mutex<HashMap<String, oneshot::Sender<Vec<u8>>>>>;

async fn connect(url: &str) -> anyhow::Result<Connection> {
    Connection::connect(url, ConnectionProperties::default())
        .await
        .with_context(|| format!("connecting to {}", busway::redact_url(url)))
}

pub(super) async fn run(args: &BenchArgs) -> anyhow::Result<RpcMeasured> {
    let server = connect(&args.url).await?;
    let client = connect(&args.url).await?;
    let id = uuid::Uuid::new_v4().simple().to_string();
    let queue = format!("bench_raw_rpc_{}", &id[..12]);

    // The server.
    let sch = server.create_channel().await?;
    sch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await?;
    let prefetch = u16::try_from(args.in_flight.max(16)).unwrap_or(u16::MAX);
    sch.basic_qos(prefetch, BasicQosOptions::default()).await?;
    let mut requests = sch
        .basic_consume(
            queue.as_str().into(),
            "raw-rpc-server".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let serving = {
        let sch = sch.clone();
        tokio::spawn(async move {
            while let Some(Ok(request)) = requests.next().await {
                let sch = sch.clone();
                tokio::spawn(async move {
                    if let Some(reply_to) = request.properties.reply_to().clone() {
                        let mut props =
                            BasicProperties::default().with_content_type("application/json".into());
                        if let Some(c) = request.properties.correlation_id().clone() {
                            props = props.with_correlation_id(c);
                        }
                        let _ = sch
                            .basic_publish(
                                "".into(),
                                reply_to,
                                BasicPublishOptions::default(),
                                &request.data,
                                props,
                            )
                            .await;
                    }
                    let _ = request.ack(BasicAckOptions::default()).await;
                });
            }
        })
    };

    // The client.
    let cch = client.create_channel().await?;
    let mut replies = cch
        .basic_consume(
            DIRECT_REPLY_TO.into(),
            "raw-rpc-client".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    let waiting: Waiting = Arc::default();
    let dispatching = {
        let waiting = waiting.clone();
        tokio::spawn(async move {
            while let Some(Ok(reply)) = replies.next().await {
                let waiter = reply
                    .properties
                    .correlation_id()
                    .as_ref()
                    .and_then(|c| lock(&waiting).remove(c.as_str()));
                if let Some(w) = waiter {
                    let _ = w.send(reply.data);
                }
            }
        })
    };
    let body = serde_json::to_vec(&serde_json::json!({
        "method": "echo",
        "params": echo_text(args.size),
        "timestamp": "2024-01-01T00:00:00.000000",
    }))?;
    let call = || {
        let (cch, body, waiting, queue) = (&cch, &body, &waiting, queue.as_str());
        async move {
            let correlation_id = uuid::Uuid::new_v4().to_string();
            let (tx, rx) = oneshot::channel();
            lock(waiting).insert(correlation_id.clone(), tx);
            cch.basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default()
                    .with_reply_to(DIRECT_REPLY_TO.into())
                    .with_correlation_id(correlation_id.as_str().into())
                    .with_content_type("application/json".into()),
            )
            .await?;
            let reply = rx
                .await
                .map_err(|_| anyhow!("the reply dispatcher stopped"))?;
            anyhow::ensure!(reply.len() == body.len(), "the echo came back altered");
            Ok(())
        }
    };
    // One call first, as on the busway side.
    call().await?;
    let measured = timed_calls(args.messages, args.in_flight, call).await;

    sch.queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await?;
    client.close(200, "bench done".into()).await?;
    server.close(200, "bench done".into()).await?;
    dispatching.abort();
    serving.abort();
    measured
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Deletes `queue` (if it exists).
pub(super) async fn delete_queue(url: &str, queue: &str) -> anyhow::Result<()> {
    let connection = connect(url).await?;
    let ch = connection.create_channel().await?;
    ch.queue_delete(queue.into(), QueueDeleteOptions::default())
        .await?;
    connection.close(200, "bench done".into()).await?;
    Ok(())
}
