//! The raw redis-rs baseline for `redis://`: `XADD` with `window` in flight
//! per publisher; consumers in one consumer group reading `prefetch`
//! entries per blocking `XREADGROUP` and settling each with `XACK` and
//! `XDEL` (one round trip): like busway's ack, which removes the entry, so
//! both do the same work and the stream does not grow by every message.

use std::time::Instant;

use anyhow::Context;
use futures::stream::{self, FuturesUnordered, StreamExt, TryStreamExt};
use redis::streams::{StreamReadOptions, StreamReadReply};
use redis::AsyncCommands;

use crate::bench::{latency_us, new_histogram, stamped_payload, BenchArgs, Measured};

const GROUP: &str = "raw";

pub(super) async fn run(args: &BenchArgs) -> anyhow::Result<Measured> {
    let url = args.url.split('?').next().unwrap_or(&args.url).to_owned();
    let client = redis::Client::open(url.as_str())?;
    let conn = client
        .get_connection_manager()
        .await
        .with_context(|| format!("connecting to {}", busway::redact_url(&url)))?;
    let id = uuid::Uuid::new_v4().simple().to_string();
    let stream = format!("bench_raw_{}", &id[..12]);
    let mut setup = conn.clone();
    let _: () = setup.xgroup_create_mkstream(&stream, GROUP, "0").await?;

    let start = Instant::now();
    let consume = |c: usize| {
        let (client, stream) = (client.clone(), stream.clone());
        let (prefetch, share) = (args.prefetch, args.messages / args.consumers as u64);
        async move {
            // A connection of its own: a blocking read holds it.
            let mut reader = client.get_connection_manager().await?;
            let acker = reader.clone();
            let name = format!("c{c}");
            let options = StreamReadOptions::default()
                .group(GROUP, &name)
                .count(usize::from(prefetch))
                .block(1000);
            let mut latencies = new_histogram()?;
            let mut seen = 0u64;
            while seen < share {
                let reply: StreamReadReply =
                    reader.xread_options(&[&stream], &[">"], &options).await?;
                let mut acks = FuturesUnordered::new();
                for key in reply.keys {
                    for entry in key.ids {
                        if let Some(redis::Value::BulkString(payload)) = entry.map.get("p") {
                            latencies.record(latency_us(start, payload))?;
                        }
                        let (mut conn, stream, id) = (acker.clone(), stream.clone(), entry.id);
                        acks.push(async move {
                            redis::pipe()
                                .xack(&stream, GROUP, &[&id])
                                .ignore()
                                .xdel(&stream, &[&id])
                                .ignore()
                                .query_async::<()>(&mut conn)
                                .await
                        });
                        seen += 1;
                    }
                }
                while let Some(r) = acks.next().await {
                    r?;
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
            let (conn, stream, n) = (conn.clone(), stream.clone(), args.share_of(p));
            let (size, window) = (args.size, args.window);
            tokio::spawn(async move {
                stream::iter(0..n)
                    .map(|_| {
                        let (mut conn, stream) = (conn.clone(), stream.clone());
                        async move {
                            let payload = stamped_payload(start, size);
                            conn.xadd::<_, _, _, _, String>(&stream, "*", &[("p", &payload[..])])
                                .await
                        }
                    })
                    .buffer_unordered(window)
                    .try_collect::<Vec<String>>()
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
    let _: () = setup.del(&stream).await?;
    Ok(measured)
}
