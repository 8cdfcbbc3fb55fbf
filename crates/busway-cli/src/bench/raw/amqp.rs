//! The raw lapin baseline for `amqp://`.

use std::time::Instant;

use anyhow::Context;
use futures::stream::{self, StreamExt, TryStreamExt};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};

use crate::bench::{latency_us, new_histogram, stamped_payload, BenchArgs, Measured};

pub(super) async fn run(args: &BenchArgs) -> anyhow::Result<Measured> {
    let connection = std::sync::Arc::new(
        Connection::connect(&args.url, ConnectionProperties::default())
            .await
            .with_context(|| format!("connecting to {}", busway::redact_url(&args.url)))?,
    );
    let id = uuid::Uuid::new_v4().simple().to_string();
    let queue = format!("bench_raw_{}", &id[..12]);
    let setup = connection.create_channel().await?;
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    setup
        .queue_declare(queue.as_str().into(), durable, FieldTable::default())
        .await?;

    let start = Instant::now();
    let consume = || {
        let (connection, queue) = (connection.clone(), queue.clone());
        let (prefetch, total) = (args.prefetch, args.messages);
        let consumers = args.consumers as u64;
        async move {
            let ch = connection.create_channel().await?;
            ch.basic_qos(prefetch, BasicQosOptions::default()).await?;
            let tag = format!("raw-{}", uuid::Uuid::new_v4().simple());
            let mut consumer = ch
                .basic_consume(
                    queue.as_str().into(),
                    tag.as_str().into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            let mut latencies = new_histogram()?;
            // Each consumer takes its share; the broker balances by prefetch.
            let mut seen = 0u64;
            while seen < total / consumers {
                let delivery = consumer.next().await.context("consumer ended")??;
                latencies.record(latency_us(start, &delivery.data))?;
                delivery.ack(BasicAckOptions::default()).await?;
                seen += 1;
            }
            ch.close(200, "done".into()).await?;
            Ok::<_, anyhow::Error>(latencies)
        }
    };
    let mut consumers = Vec::new();
    if !args.sequential {
        consumers = (0..args.consumers)
            .map(|_| tokio::spawn(consume()))
            .collect();
    }
    let publishers: Vec<_> = (0..args.publishers)
        .map(|p| {
            let (connection, queue, n) = (connection.clone(), queue.clone(), args.share_of(p));
            let (size, window) = (args.size, args.window);
            tokio::spawn(async move {
                let ch = connection.create_channel().await?;
                ch.confirm_select(ConfirmSelectOptions::default()).await?;
                let ch = &ch;
                let queue = queue.as_str();
                stream::iter(0..n)
                    .map(|_| async move {
                        let confirm = ch
                            .basic_publish(
                                "".into(),
                                queue.into(),
                                BasicPublishOptions::default(),
                                &stamped_payload(start, size),
                                BasicProperties::default().with_delivery_mode(2),
                            )
                            .await?;
                        let confirmation = confirm.await?;
                        anyhow::ensure!(!confirmation.is_nack(), "the broker nacked a publish");
                        Ok::<_, anyhow::Error>(())
                    })
                    .buffer_unordered(window)
                    .try_collect::<Vec<()>>()
                    .await?;
                Ok::<_, anyhow::Error>(())
            })
        })
        .collect();
    for p in publishers {
        p.await??;
    }
    let publish_elapsed = start.elapsed();
    let consume_start = Instant::now();
    if args.sequential {
        consumers = (0..args.consumers)
            .map(|_| tokio::spawn(consume()))
            .collect();
    }
    let mut latencies = new_histogram()?;
    for c in consumers {
        latencies.add(c.await??)?;
    }
    let measured = Measured::stop(
        start,
        publish_elapsed,
        args.sequential.then_some(consume_start),
        latencies,
    );
    setup
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await?;
    connection.close(200, "bench done".into()).await?;
    Ok(measured)
}
