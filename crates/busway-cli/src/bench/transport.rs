//! The busway side of the benchmark: publishers and consumers on a `Transport`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use busway::protect::PayloadProtection;
use busway::protection::ProtectedTransport;
use busway::{ConsumeOptions, Message, Publish, QueueName, QueueSpec, Transport};
use futures::stream::{self, FuturesUnordered};
use futures::{StreamExt, TryStreamExt};
use hdrhistogram::Histogram;
use indicatif::ProgressBar;
use tokio::sync::watch;

use super::{latency_us, new_histogram, stamped_payload, BenchArgs, Measured};

/// Runs the benchmark on the transport `args.url` names, wrapped in
/// `protection` if given (every message protected on publish and opened on
/// receive, as under a protected `Bus`).
pub(super) async fn run(
    args: &BenchArgs,
    protection: Option<Arc<PayloadProtection>>,
) -> anyhow::Result<Measured> {
    let transport = busway::connect(&args.url).await?;
    let transport: Arc<dyn Transport> = match protection {
        Some(protection) => Arc::new(ProtectedTransport::new(transport, protection)),
        None => transport,
    };
    let id = uuid::Uuid::new_v4().simple().to_string();
    let queue = QueueName::new(format!("bench_{}", &id[..12]))?;
    transport
        .declare_queue(&QueueSpec::new(queue.clone()))
        .await?;

    let progress = args.progress();
    let acked = Arc::new(AtomicU64::new(0));
    let (stop_tx, stop_rx) = watch::channel(false);
    let stop_tx = Arc::new(stop_tx);
    let start = Instant::now();

    let consumers = || -> Vec<_> {
        (0..args.consumers)
            .map(|_| {
                let c = Consumer {
                    transport: transport.clone(),
                    queue: queue.clone(),
                    prefetch: args.prefetch,
                    total: args.messages,
                    acked: acked.clone(),
                    stop_tx: stop_tx.clone(),
                    stop_rx: stop_rx.clone(),
                    progress: progress.clone(),
                    start,
                };
                tokio::spawn(c.run())
            })
            .collect()
    };

    let mut consumer_tasks = if args.sequential {
        Vec::new()
    } else {
        consumers()
    };
    let publishers: Vec<_> = (0..args.publishers)
        .map(|p| {
            let (t, q, n) = (transport.clone(), queue.clone(), args.share_of(p));
            let (size, window) = (args.size, args.window);
            tokio::spawn(async move {
                stream::iter(0..n)
                    .map(|_| {
                        let m = Message::new("bench", stamped_payload(start, size));
                        t.publish(Publish::to_queue(q.clone(), m))
                    })
                    .buffer_unordered(window)
                    .try_collect::<Vec<()>>()
                    .await
            })
        })
        .collect();
    for p in publishers {
        p.await?.context("publisher failed")?;
    }
    let publish_elapsed = start.elapsed();
    let consume_start = Instant::now();
    if args.sequential {
        consumer_tasks = consumers();
    }

    let mut latencies = new_histogram()?;
    for c in consumer_tasks {
        latencies.add(c.await?.context("consumer failed")?)?;
    }
    let measured = Measured::stop(
        start,
        publish_elapsed,
        args.sequential.then_some(consume_start),
        latencies,
    );
    progress.finish_and_clear();
    transport.close().await;
    Ok(measured)
}

/// A consumer that acknowledges nothing for this long fails the run.
const STALL_LIMIT: Duration = Duration::from_secs(30);

struct Consumer {
    transport: Arc<dyn Transport>,
    queue: QueueName,
    prefetch: u16,
    total: u64,
    acked: Arc<AtomicU64>,
    stop_tx: Arc<watch::Sender<bool>>,
    stop_rx: watch::Receiver<bool>,
    progress: ProgressBar,
    start: Instant,
}

impl Consumer {
    /// Consumes and acknowledges, with up to `prefetch` acks in flight, until
    /// all messages of the run are acknowledged.
    async fn run(mut self) -> anyhow::Result<Histogram<u64>> {
        let mut latencies = new_histogram()?;
        let mut deliveries = self
            .transport
            .consume(&self.queue, ConsumeOptions::with_prefetch(self.prefetch))
            .await?;
        let mut acks = FuturesUnordered::new();
        let mut since_progress = 0u64;
        // One stop future and one stall timer for the whole run: creating them
        // per message would cost more than the work being measured.
        let stop = self.stop_rx.changed();
        tokio::pin!(stop);
        let stall = tokio::time::sleep(STALL_LIMIT);
        tokio::pin!(stall);
        loop {
            tokio::select! {
                biased;
                Some(result) = acks.next(), if !acks.is_empty() => {
                    result?;
                    since_progress += 1;
                    if since_progress == 1024 {
                        self.progress.inc(since_progress);
                        since_progress = 0;
                        stall.as_mut().reset(tokio::time::Instant::now() + STALL_LIMIT);
                    }
                    if self.acked.fetch_add(1, Ordering::Relaxed) + 1 == self.total {
                        let _ = self.stop_tx.send(true);
                    }
                }
                item = deliveries.next(), if acks.len() < usize::from(self.prefetch) => {
                    let Some(delivery) = item else { bail!("the delivery stream ended early") };
                    let delivery = delivery?;
                    latencies.record(latency_us(self.start, &delivery.message().payload))?;
                    acks.push(delivery.ack());
                }
                _ = &mut stop => break,
                _ = &mut stall => {
                    bail!(
                        "no progress for {STALL_LIMIT:?} ({} of {} acknowledged)",
                        self.acked.load(Ordering::Relaxed),
                        self.total
                    );
                }
            }
        }
        self.progress.inc(since_progress);
        Ok(latencies)
    }
}
