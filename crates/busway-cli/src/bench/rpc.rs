//! `--pattern rpc`: request-response calls through the `Bus`, `--in-flight`
//! at once, against an echo service; each call's round trip is timed.
//!
//! The service and the caller each get a transport of their own (as two
//! services would), except on backends that live in one process
//! (`memory://`), where they share it.

use std::future::IntoFuture;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use busway::{Bus, Transport};
use futures::stream::{self, StreamExt};
use hdrhistogram::Histogram;
use serde::Serialize;

use super::{emit, new_histogram, raw, Baseline, BenchArgs};

/// A call that takes longer than this fails the run.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The figures of one RPC run.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct RpcReport {
    /// What ran: `busway` or a baseline's name.
    system: String,
    url: String,
    pattern: &'static str,
    calls: u64,
    in_flight: usize,
    /// Bytes of the string each request carries (and each reply returns).
    size: usize,
    calls_per_s: f64,
    rpc_p50_us: u64,
    rpc_p99_us: u64,
    rpc_max_us: u64,
    elapsed_secs: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    baseline: Option<Box<RpcReport>>,
    /// Why there is no baseline although one was asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    baseline_note: Option<String>,
    /// `calls_per_s / baseline.calls_per_s`.
    #[serde(skip_serializing_if = "Option::is_none")]
    ratio: Option<f64>,
    /// `rpc_p50_us / baseline.rpc_p50_us` (lower is better).
    #[serde(skip_serializing_if = "Option::is_none")]
    p50_ratio: Option<f64>,
}

/// What an RPC run measured.
pub(crate) struct RpcMeasured {
    pub(crate) elapsed: Duration,
    /// Round trip of each call, in microseconds.
    pub(crate) latencies_us: Histogram<u64>,
}

pub(super) async fn run(args: &BenchArgs) -> anyhow::Result<()> {
    if args.in_flight == 0 || args.messages == 0 {
        bail!("--in-flight and --messages must be at least 1");
    }
    let redacted = busway::redact_url(&args.url);
    let (baseline, baseline_note) = match args.baseline {
        Some(Baseline::Raw) => match raw::run_rpc(args).await.context("raw baseline failed")? {
            raw::RpcBaseline::Measured(name, m) => (Some(report(args, name, &redacted, m)), None),
            raw::RpcBaseline::None(why) => (None, Some(why)),
        },
        None => (None, None),
    };
    let measured = run_busway(args)
        .await
        .with_context(|| format!("RPC benchmark of {redacted} failed"))?;
    let mut report = report(args, "busway", &redacted, measured);
    if let Some(b) = baseline {
        report.ratio = Some(report.calls_per_s / b.calls_per_s);
        report.p50_ratio = Some(report.rpc_p50_us as f64 / (b.rpc_p50_us as f64).max(1.0));
        report.baseline = Some(Box::new(b));
    }
    report.baseline_note = baseline_note;
    emit(args.json, &report, print_table)
}

/// `--tracing`: the calls with no subscriber, then with the one `install`
/// sets up, side by side.
pub(super) async fn run_tracing(
    args: &BenchArgs,
    install: fn() -> anyhow::Result<&'static str>,
) -> anyhow::Result<()> {
    if args.in_flight == 0 || args.messages == 0 {
        bail!("--in-flight and --messages must be at least 1");
    }
    let redacted = busway::redact_url(&args.url);
    let off = run_busway(args)
        .await
        .with_context(|| format!("RPC benchmark of {redacted} failed"))?;
    let off = report(args, "busway", &redacted, off);
    let name = install()?;
    let on = run_busway(args)
        .await
        .with_context(|| format!("traced RPC benchmark of {redacted} failed"))?;
    let mut traced = report(args, &format!("busway+{name}"), &redacted, on);
    traced.ratio = Some(traced.calls_per_s / off.calls_per_s);
    traced.p50_ratio = Some(traced.rpc_p50_us as f64 / (off.rpc_p50_us as f64).max(1.0));
    traced.baseline = Some(Box::new(off));
    emit(args.json, &traced, print_table)
}

fn report(args: &BenchArgs, system: &str, url: &str, m: RpcMeasured) -> RpcReport {
    RpcReport {
        system: system.into(),
        url: url.into(),
        pattern: "rpc",
        calls: args.messages,
        in_flight: args.in_flight,
        size: args.size,
        calls_per_s: args.messages as f64 / m.elapsed.as_secs_f64().max(1e-9),
        rpc_p50_us: m.latencies_us.value_at_quantile(0.50),
        rpc_p99_us: m.latencies_us.value_at_quantile(0.99),
        rpc_max_us: m.latencies_us.max(),
        elapsed_secs: m.elapsed.as_secs_f64(),
        baseline: None,
        baseline_note: None,
        ratio: None,
        p50_ratio: None,
    }
}

fn print_table(r: &RpcReport) {
    println!(
        "busway bench --pattern rpc: {} calls of {} B, {} in flight, on {}",
        r.calls, r.size, r.in_flight, r.url
    );
    println!(
        "{:<22} {:>10} {:>10} {:>10} {:>10}",
        "system", "calls/s", "p50 us", "p99 us", "max us"
    );
    let mut rows = vec![r];
    if let Some(b) = &r.baseline {
        rows.push(b);
    }
    for r in rows {
        println!(
            "{:<22} {:>10.0} {:>10} {:>10} {:>10}",
            r.system, r.calls_per_s, r.rpc_p50_us, r.rpc_p99_us, r.rpc_max_us
        );
    }
    if let (Some(ratio), Some(p50)) = (r.ratio, r.p50_ratio) {
        println!("ratio (busway calls/s / baseline calls/s): {ratio:.2}; p50 busway / baseline: {p50:.2}");
    }
    if let Some(note) = &r.baseline_note {
        println!("no baseline: {note}");
    }
}

/// The request (and reply) of every call: a string of `size` bytes.
pub(crate) fn echo_text(size: usize) -> String {
    "x".repeat(size)
}

/// Runs `calls` calls of `call`, `in_flight` at once, timing each.
pub(crate) async fn timed_calls<F, Fut>(
    calls: u64,
    in_flight: usize,
    call: F,
) -> anyhow::Result<RpcMeasured>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let mut latencies = new_histogram()?;
    let start = Instant::now();
    let mut results = stream::iter(0..calls)
        .map(|_| {
            let call = call();
            async move {
                let sent = Instant::now();
                tokio::time::timeout(CALL_TIMEOUT, call)
                    .await
                    .map_err(|_| anyhow::anyhow!("a call took longer than {CALL_TIMEOUT:?}"))??;
                Ok::<_, anyhow::Error>(sent.elapsed())
            }
        })
        .buffer_unordered(in_flight);
    while let Some(took) = results.next().await {
        latencies.record(u64::try_from(took?.as_micros()).unwrap_or(u64::MAX))?;
    }
    Ok(RpcMeasured {
        elapsed: start.elapsed(),
        latencies_us: latencies,
    })
}

async fn run_busway(args: &BenchArgs) -> anyhow::Result<RpcMeasured> {
    let server_transport = busway::connect(&args.url).await?;
    // Two services would not share a connection; in-process backends must.
    let client_transport: Arc<dyn Transport> =
        if server_transport.capabilities().multi_process.is_supported() {
            busway::connect(&args.url).await?
        } else {
            server_transport.clone()
        };
    let (server, client) = (
        Bus::new(server_transport.clone()),
        Bus::new(client_transport.clone()),
    );
    let id = uuid::Uuid::new_v4().simple().to_string();
    let service = format!("bench_{}", &id[..12]);
    server
        .register_request_handler(&service, "echo", |text: String| async move { Ok(text) })
        .concurrency(args.in_flight.max(busway::rpc::DEFAULT_RPC_CONCURRENCY))
        .await?;
    let text = echo_text(args.size);
    // One call first: the caller's reply channel is set up outside the clock.
    client
        .request::<String>(&service, "echo", &text)
        .timeout(CALL_TIMEOUT)
        .await?;
    let measured = timed_calls(args.messages, args.in_flight, || {
        let reply = client
            .request::<String>(&service, "echo", &text)
            .timeout(CALL_TIMEOUT)
            .into_future();
        let expected = text.len();
        async move {
            let reply = reply.await?;
            anyhow::ensure!(reply.len() == expected, "the echo came back altered");
            Ok(())
        }
    })
    .await;
    client.shutdown().await;
    server.shutdown().await;
    raw::delete_rpc_queue(&args.url, &format!("rpc_{service}")).await;
    client_transport.close().await;
    server_transport.close().await;
    measured
}
