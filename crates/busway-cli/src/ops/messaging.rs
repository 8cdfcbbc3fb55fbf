//! Messaging from the shell: `publish`, `subscribe`, `request`, `task submit`,
//! all through the [`Bus`](busway::Bus), so they speak the reference wire format.

use std::time::Duration;

use anyhow::Context;
use busway::{
    Binding, Bus, ConsumeOptions, Event, Message, Publish, QueueName, QueueSpec, Topic,
    TopicPattern,
};
use clap::{Args, Subcommand};
use futures::StreamExt;
use serde_json::Value;

use super::exit::{Exit, Failure};
use super::settings::{parse_duration, Conn};
use super::Connection;

/// `busway publish`.
#[derive(Args, Debug)]
#[command(after_help = "Examples:
  busway publish user.registered --json '{\"email\": \"ann@example.com\"}' --aggregate-id user_1
  busway publish order.created --json '{\"total\": 12.5}' --header tenant=acme
  busway publish order.paid --json '{}' --url amqp://guest:guest@127.0.0.1:5672/%2f

The body is the reference event: {\"event_id\", \"event_type\", \"aggregate_id\",
\"data\", \"timestamp\", \"version\", \"metadata\"}, published to the topic (on
RabbitMQ: the `event_bus` exchange, routing key TOPIC). Prints the event id.")]
pub(crate) struct PublishArgs {
    #[command(flatten)]
    conn: Conn,
    /// The topic (dot-separated words: `order.created`).
    topic: String,
    /// The event's `data`, as JSON.
    #[arg(long = "json", value_name = "JSON", default_value = "{}")]
    data: String,
    /// The event type in the body (default: the topic).
    #[arg(long = "type", value_name = "TYPE")]
    kind: Option<String>,
    /// The event's `aggregate_id`.
    #[arg(long, default_value = "")]
    aggregate_id: String,
    /// The event's `version`.
    #[arg(long, default_value_t = 1)]
    version: u64,
    /// A message header, `name=value` (repeatable).
    #[arg(long = "header", value_name = "NAME=VALUE", value_parser = parse_header)]
    headers: Vec<(String, String)>,
}

/// `busway subscribe`.
#[derive(Args, Debug)]
#[command(after_help = "Examples:
  busway subscribe 'order.*'
  busway subscribe '#' --count 10 | jq .event_type
  busway subscribe 'user.#' --group audit --count 1

Prints each event as one JSON line (the reference event, plus `message_id`). Without --group, a temporary queue sees the events published
from now on and goes away afterwards; with --group, this joins that durable
subscription group (declaring it if needed) and takes its share of the events,
each acknowledged once printed. Ctrl-C stops; --count stops after N events,
and events not printed stay in the group's queue.")]
pub(crate) struct SubscribeArgs {
    #[command(flatten)]
    conn: Conn,
    /// The topic pattern (`*` one word, `#` any number).
    pattern: String,
    /// Join this durable subscription group instead of a temporary queue.
    #[arg(long)]
    group: Option<String>,
    /// Stop after this many events.
    #[arg(long)]
    count: Option<u64>,
}

/// `busway request`.
#[derive(Args, Debug)]
#[command(after_help = "Examples:
  busway request user_service get_user --json '{\"user_id\": \"user_1\"}'
  busway request inventory check_stock --json '{\"sku\": \"A1\"}' --timeout 2s

Sends the reference request {\"method\", \"params\", \"timestamp\"} to queue
rpc_SERVICE and prints the reply's `data` as JSON. An error reply exits 3,
no reply in time exits 5.")]
pub(crate) struct RequestArgs {
    #[command(flatten)]
    conn: Conn,
    /// The service (its queue is `rpc_{service}`).
    service: String,
    /// The method.
    method: String,
    /// The params, as JSON.
    #[arg(long = "json", value_name = "JSON", default_value = "{}")]
    params: String,
    /// How long to wait for the reply (default 5s, or BUSWAY_TIMEOUT / `timeout`).
    #[arg(long, value_parser = parse_duration)]
    timeout: Option<Duration>,
}

/// `busway task`.
#[derive(Args, Debug)]
pub(crate) struct TaskArgs {
    #[command(subcommand)]
    command: TaskCommand,
}

#[derive(Subcommand, Debug)]
enum TaskCommand {
    /// Submit a task to a work queue; prints its message id.
    #[command(after_help = "Examples:
  busway task submit send_email --json '{\"to\": \"ann@example.com\"}'
  busway task submit generate_report --json '{\"report_type\": \"daily\"}' --priority 5 --queue reports

The body is the reference task {\"type\", \"params\", \"timestamp\", \"priority\"};
the queue is declared with the reference arguments if it does not exist.")]
    Submit {
        #[command(flatten)]
        conn: Conn,
        /// The task type.
        task_type: String,
        /// The params, as JSON.
        #[arg(long = "json", value_name = "JSON", default_value = "{}")]
        params: String,
        /// The priority, 0 to 9 (honoured by queues with a max priority).
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=9))]
        priority: u8,
        /// Run it no earlier than this from now (`30s`, `5m`).
        #[arg(long, value_parser = parse_duration)]
        delay: Option<Duration>,
        /// The work queue.
        #[arg(long, default_value = busway::TASK_QUEUE)]
        queue: String,
    },
}

fn parse_header(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((name, value)) if !name.is_empty() => Ok((name.to_owned(), value.to_owned())),
        _ => Err(format!("`{text}` is not a header like name=value")),
    }
}

fn parse_json(what: &str, text: &str) -> anyhow::Result<Value> {
    serde_json::from_str(text)
        .map_err(|e| Failure::msg(Exit::Usage, format!("{what} is not valid JSON: {e}")))
}

async fn bus(conn: &Conn) -> anyhow::Result<(Bus, super::settings::Settings)> {
    let settings = conn.settings()?;
    let connection = Connection::open(&settings).await?;
    Ok((Bus::new(connection.transport), settings))
}

/// Shuts the bus down and closes its transport, whatever `result` is.
async fn finish<T>(bus: Bus, result: anyhow::Result<T>) -> anyhow::Result<T> {
    bus.shutdown().await;
    bus.transport().close().await;
    result
}

pub(crate) async fn publish(args: PublishArgs) -> anyhow::Result<()> {
    let data = parse_json("--json", &args.data)?;
    let topic = Topic::new(&args.topic).map_err(|e| Failure::wrap(Exit::Usage, e.into()))?;
    let kind = args.kind.clone().unwrap_or_else(|| args.topic.clone());
    let event =
        Event::new(kind.clone(), args.aggregate_id.clone(), data).with_version(args.version);
    let (bus, _) = bus(&args.conn).await?;
    let result = async {
        if args.headers.is_empty() && kind == args.topic {
            bus.publish_event(&event).await?;
        } else {
            // Same body as `publish_event`, with the headers and topic asked for.
            let mut message = Message::json(kind, &event)?;
            for (name, value) in &args.headers {
                message = message.with_header(name.clone(), value.clone());
            }
            bus.transport()
                .publish(Publish::to_topic(topic, message))
                .await?;
        }
        println!("{}", event.event_id);
        anyhow::Ok(())
    }
    .await;
    finish(bus, result).await
}

pub(crate) async fn subscribe(args: SubscribeArgs) -> anyhow::Result<()> {
    let pattern =
        TopicPattern::new(&args.pattern).map_err(|e| Failure::wrap(Exit::Usage, e.into()))?;
    let (bus, _) = bus(&args.conn).await?;
    let result = async {
        let transport = bus.transport().clone();
        let queue = match &args.group {
            Some(group) => {
                // What `Bus::register_event_handler` declares for a group.
                let queue = QueueName::new(group)?;
                transport
                    .declare_queue(&QueueSpec::new(queue.clone()))
                    .await?;
                queue
            }
            None => {
                let id = uuid::Uuid::new_v4().simple().to_string();
                let queue = QueueName::new(format!("busway_subscribe_{}", &id[..12]))?;
                transport.declare_temporary_queue(&queue).await?;
                queue
            }
        };
        transport
            .bind(&Binding::new(queue.clone(), pattern.clone()))
            .await?;
        let mut deliveries = transport
            .consume(&queue, ConsumeOptions::with_prefetch(1))
            .await?;
        let mut printed = 0u64;
        let interrupted = tokio::signal::ctrl_c();
        tokio::pin!(interrupted);
        while args.count.is_none_or(|n| printed < n) {
            let delivery = tokio::select! {
                next = deliveries.next() => match next {
                    Some(delivery) => delivery?,
                    None => break,
                },
                _ = &mut interrupted => break,
            };
            let message = delivery.message().clone();
            match serde_json::from_slice::<Event<Value>>(&message.payload) {
                Ok(event) => {
                    let mut line = serde_json::to_value(&event)?;
                    line["message_id"] = Value::String(message.id.to_string());
                    println!("{}", serde_json::to_string(&line)?);
                    delivery.ack().await?;
                    printed += 1;
                }
                Err(e) => {
                    let reason = format!("not a reference event: {e}");
                    eprintln!("skipping message {}: {reason}", message.id);
                    if args.group.is_some() {
                        delivery.dead_letter(reason).await?;
                    } else {
                        delivery.ack().await?;
                    }
                }
            }
        }
        anyhow::Ok(())
    }
    .await;
    finish(bus, result).await
}

pub(crate) async fn request(args: RequestArgs) -> anyhow::Result<()> {
    let params = parse_json("--json", &args.params)?;
    let (bus, settings) = bus(&args.conn).await?;
    let timeout = args.timeout.unwrap_or(settings.timeout);
    let result = async {
        let reply: Value = bus
            .request(&args.service, &args.method, &params)
            .timeout(timeout)
            .await?;
        println!("{}", serde_json::to_string_pretty(&reply)?);
        anyhow::Ok(())
    }
    .await;
    finish(bus, result).await
}

pub(crate) async fn task(args: TaskArgs) -> anyhow::Result<()> {
    match args.command {
        TaskCommand::Submit {
            conn,
            task_type,
            params,
            priority,
            delay,
            queue,
        } => {
            let params = parse_json("--json", &params)?;
            let (bus, _) = bus(&conn).await?;
            let result = async {
                let queue = bus
                    .task_queue(&queue)
                    .map_err(|e| Failure::wrap(Exit::Usage, e.into()))?;
                let mut submit = queue.submit(&task_type, &params).priority(priority);
                if let Some(delay) = delay {
                    submit = submit.delay(delay);
                }
                let id = submit.await.context("submitting the task")?;
                println!("{id}");
                anyhow::Ok(())
            }
            .await;
            finish(bus, result).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_parse() {
        assert_eq!(
            parse_header("tenant=acme"),
            Ok(("tenant".into(), "acme".into()))
        );
        assert_eq!(parse_header("a=b=c"), Ok(("a".into(), "b=c".into())));
        assert!(parse_header("=x").is_err());
        assert!(parse_header("novalue").is_err());
    }
}
