//! The raw async-nats baseline for `nats://`: a work-queue stream of its
//! own with one durable pull consumer; publishers keep `window` publishes
//! in flight, each awaiting its JetStream ack; consumers pull `prefetch`
//! messages per request and acknowledge each with a confirmed ack
//! (`double_ack`), the same guarantees busway gives.

use std::time::{Duration, Instant};

use anyhow::Context;
use async_nats::jetstream::{self, consumer::pull, stream};
use futures::stream::{self as fstream, FuturesUnordered, StreamExt, TryStreamExt};

use crate::bench::{latency_us, new_histogram, stamped_payload, BenchArgs, Measured};

pub(super) async fn run(args: &BenchArgs) -> anyhow::Result<Measured> {
    let url = args.url.split('?').next().unwrap_or(&args.url).to_owned();
    let client = async_nats::connect(url.as_str())
        .await
        .with_context(|| format!("connecting to {}", busway::redact_url(&url)))?;
    let js = jetstream::new(client);
    let id = uuid::Uuid::new_v4().simple().to_string();
    let name = format!("bench_raw_{}", &id[..12]);
    let stream = js
        .create_stream(stream::Config {
            name: name.clone(),
            subjects: vec![name.clone()],
            retention: stream::RetentionPolicy::WorkQueue,
            ..Default::default()
        })
        .await?;
    let consumer: jetstream::consumer::PullConsumer = stream
        .create_consumer(pull::Config {
            durable_name: Some("raw".into()),
            max_ack_pending: -1,
            ..Default::default()
        })
        .await?;

    let start = Instant::now();
    let consume = |_c: usize| {
        let consumer = consumer.clone();
        let (prefetch, share) = (
            usize::from(args.prefetch),
            args.messages / args.consumers as u64,
        );
        async move {
            let mut latencies = new_histogram()?;
            let mut seen = 0u64;
            while seen < share {
                let mut batch = consumer
                    .batch()
                    .max_messages(prefetch)
                    .expires(Duration::from_secs(1))
                    .messages()
                    .await?;
                let mut acks = FuturesUnordered::new();
                while let Some(m) = batch.next().await {
                    let m = m.map_err(|e| anyhow::anyhow!(e))?;
                    latencies.record(latency_us(start, &m.payload))?;
                    acks.push(async move { m.double_ack().await });
                    seen += 1;
                }
                while let Some(r) = acks.next().await {
                    r.map_err(|e| anyhow::anyhow!(e))?;
                }
            }
            Ok::<_, anyhow::Error>(latencies)
        }
    };
    let mut consumers = Vec::new();
    if !args.sequential {
        consumers = (0..args.consumers)
            .map(|c| tokio::spawn(consume(c)))
            .collect();
    }
    let publishers: Vec<_> = (0..args.publishers)
        .map(|p| {
            let (js, subject, n) = (js.clone(), name.clone(), args.share_of(p));
            let (size, window) = (args.size, args.window);
            tokio::spawn(async move {
                fstream::iter(0..n)
                    .map(|_| {
                        let (js, subject) = (js.clone(), subject.clone());
                        async move {
                            let payload = stamped_payload(start, size);
                            js.publish(subject, payload)
                                .await
                                .map_err(|e| anyhow::anyhow!(e))?
                                .await
                                .map_err(|e| anyhow::anyhow!(e))
                        }
                    })
                    .buffer_unordered(window)
                    .try_collect::<Vec<_>>()
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
            .map(|c| tokio::spawn(consume(c)))
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
    js.delete_stream(&name).await?;
    Ok(measured)
}
