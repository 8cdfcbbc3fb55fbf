//! `--pattern work-queue`: tasks submitted through the `Bus` and run by its
//! workers, with the middleware `--layers` names on every task, side by
//! side (in the same run) with the bare transport doing the same work.
//!
//! The figures are the transport bench's: publishers submit tasks
//! (`--window` in flight each), `--consumers` workers with `--prefetch`
//! run them (as many at once as their prefetch), and each task's latency is
//! measured from its submission to the end of its handler.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use busway::middleware::{
    Backoff, CircuitBreakerLayer, CorrelationLayer, DedupLayer, MemoryDedupStore, RetryLayer,
    TimeoutLayer,
};
use busway::{Bus, HandlerError};
use clap::ValueEnum;
use futures::future::FutureExt;
use futures::stream::{self, StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use super::{new_histogram, side_by_side, transport, BenchArgs, Measured};

/// A middleware layer the work-queue bench can put on its tasks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum BenchLayer {
    /// Retry with exponential backoff (3 attempts).
    Retry,
    /// Dedup by message id in memory (one entry per task of the run).
    Dedup,
    /// A 30 s timeout per task.
    Timeout,
    /// A circuit breaker with the reference thresholds.
    CircuitBreaker,
    /// Correlation and causation propagation.
    Correlation,
}

/// A task that fails the run if it has not finished by then.
const STALL_LIMIT: Duration = Duration::from_secs(60);

#[derive(Serialize, Deserialize)]
struct BenchTask {
    /// Nanoseconds since the start of the run when it was submitted.
    sent_ns: u64,
    /// Padding up to `--size`.
    pad: String,
}

pub(super) async fn run(args: &BenchArgs) -> anyhow::Result<()> {
    if args.publishers == 0 || args.consumers == 0 || args.prefetch == 0 || args.window == 0 {
        bail!("--publishers, --consumers, --prefetch and --window must be at least 1");
    }
    if args.messages == 0 {
        bail!("--messages must be at least 1");
    }
    let redacted = busway::redact_url(&args.url);
    let tasks = |sliced: BenchArgs| async move { run_work_queue(&sliced).await }.boxed_local();
    let bare = |sliced: BenchArgs| async move { transport::run(&sliced, None).await }.boxed_local();
    let ((measured, rss), (bare, bare_rss)) = side_by_side(args, &tasks, &bare)
        .await
        .with_context(|| format!("work-queue benchmark of {redacted} failed"))?;
    let baseline = args.report("transport", &redacted, bare, bare_rss);
    let names: Vec<String> = args
        .layers
        .iter()
        .filter_map(|l| l.to_possible_value().map(|v| v.get_name().to_owned()))
        .collect();
    let system = if names.is_empty() {
        "work-queue".to_owned()
    } else {
        format!("work-queue+{}", names.join("+"))
    };
    let mut report = args.report(&system, &redacted, measured, rss);
    report.ratio = Some(report.e2e_rate / baseline.e2e_rate);
    report.baseline = Some(Box::new(baseline));
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        super::print_table(&report);
    }
    Ok(())
}

pub(super) async fn run_work_queue(args: &BenchArgs) -> anyhow::Result<Measured> {
    let bus = Bus::connect(&args.url).await?;
    let id = uuid::Uuid::new_v4().simple().to_string();
    let queue = bus.task_queue(&format!("bench_tasks_{}", &id[..12]))?;
    let start = Instant::now();
    let latencies = Arc::new(Mutex::new(new_histogram()?));
    let done = Arc::new(AtomicU64::new(0));
    let finished = Arc::new(Notify::new());
    let total = args.messages;
    {
        let (latencies, done, finished) = (latencies.clone(), done.clone(), finished.clone());
        queue.register_handler("bench", move |task: BenchTask| {
            let now = start.elapsed().as_nanos() as u64;
            let latency_us = now.saturating_sub(task.sent_ns) / 1_000;
            if let Ok(mut h) = latencies.lock() {
                let _ = h.record(latency_us);
            }
            if done.fetch_add(1, Ordering::Relaxed) + 1 == total {
                finished.notify_one();
            }
            async { Ok::<_, HandlerError>(()) }
        });
    }
    let mut workers = queue
        .start_workers()
        .workers(args.consumers)
        .prefetch(args.prefetch)
        .concurrency(usize::from(args.prefetch));
    for layer in &args.layers {
        workers = match layer {
            BenchLayer::Retry => workers.layer(RetryLayer::new(Backoff::default())),
            BenchLayer::Dedup => workers.layer(DedupLayer::new(Arc::new(MemoryDedupStore::new(
                usize::try_from(args.messages).unwrap_or(usize::MAX),
                Duration::from_secs(3600),
            )))),
            BenchLayer::Timeout => workers.layer(TimeoutLayer::new(Duration::from_secs(30))),
            BenchLayer::CircuitBreaker => workers.layer(CircuitBreakerLayer::default()),
            BenchLayer::Correlation => workers.layer(CorrelationLayer),
        };
    }
    workers.await?;

    let pad_len = args.size.saturating_sub(40);
    let publishers: Vec<_> = (0..args.publishers)
        .map(|p| {
            let (queue, n, window) = (queue.clone(), args.share_of(p), args.window);
            let pad = "x".repeat(pad_len);
            tokio::spawn(async move {
                stream::iter(0..n)
                    .map(|_| {
                        let task = BenchTask {
                            sent_ns: start.elapsed().as_nanos() as u64,
                            pad: pad.clone(),
                        };
                        let submit = queue.submit("bench", &task);
                        async move { submit.await.map(|_| ()) }
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
    loop {
        let waiting = finished.notified();
        if done.load(Ordering::Relaxed) >= total {
            break;
        }
        let before = done.load(Ordering::Relaxed);
        if tokio::time::timeout(STALL_LIMIT, waiting).await.is_err()
            && done.load(Ordering::Relaxed) == before
        {
            bail!("no progress for {STALL_LIMIT:?} ({before} of {total} tasks done)");
        }
    }
    let histogram = latencies
        .lock()
        .map(|h| h.clone())
        .map_err(|_| anyhow::anyhow!("latency histogram poisoned"))?;
    let measured = Measured::stop(start, publish_elapsed, None, histogram);
    let stats = bus.stats();
    if stats.dead_lettered > 0 || stats.retried > 0 {
        bail!(
            "{} tasks dead-lettered and {} retried in a run where none fail",
            stats.dead_lettered,
            stats.retried
        );
    }
    bus.shutdown().await;
    Ok(measured)
}
