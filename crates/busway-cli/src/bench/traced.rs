//! `busway bench --tracing`: the same pattern run twice in one process,
//! first with no subscriber, then with a tracing subscriber recording every
//! span busway opens, and the ratio of the two.
//!
//! The subscriber is the `tracing-subscriber` registry with, when the CLI
//! is built with the `otel` feature, the OpenTelemetry layer (a tracer
//! provider with no exporter: spans are built, sampled and dropped), and
//! otherwise a formatting layer writing to nowhere. It cannot be removed
//! once installed, so the untraced run goes first.

use anyhow::{bail, Context};
use tracing_subscriber::layer::SubscriberExt;

use super::{peak_rss_bytes, reset_peak_rss, rpc, work_queue, BenchArgs, Pattern};

pub(super) async fn run(args: &BenchArgs) -> anyhow::Result<()> {
    match args.pattern {
        Pattern::Transport => bail!(
            "--tracing measures --pattern rpc or --pattern work-queue (the bare transport opens no spans)"
        ),
        Pattern::Rpc => rpc::run_tracing(args, install).await,
        Pattern::WorkQueue => run_work_queue(args).await,
    }
}

async fn run_work_queue(args: &BenchArgs) -> anyhow::Result<()> {
    let redacted = busway::redact_url(&args.url);
    reset_peak_rss();
    let off = work_queue::run_work_queue(args)
        .await
        .with_context(|| format!("work-queue benchmark of {redacted} failed"))?;
    let off = args.report("work-queue", &redacted, off, peak_rss_bytes());
    let name = install()?;
    reset_peak_rss();
    let on = work_queue::run_work_queue(args)
        .await
        .with_context(|| format!("traced work-queue benchmark of {redacted} failed"))?;
    let mut report = args.report(
        &format!("work-queue+{name}"),
        &redacted,
        on,
        peak_rss_bytes(),
    );
    report.ratio = Some(report.e2e_rate / off.e2e_rate);
    report.baseline = Some(Box::new(off));
    super::emit(args.json, &report, super::print_table)
}

/// Installs the subscriber for the traced run; returns its name.
pub(super) fn install() -> anyhow::Result<&'static str> {
    #[cfg(feature = "otel")]
    {
        use opentelemetry::trace::TracerProvider as _;
        // No exporter: spans are recorded and dropped, which is the cost
        // busway adds; exporting is the exporter's own.
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("busway-bench"));
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::set_global_default(subscriber)
            .context("a tracing subscriber is installed already")?;
        Ok("otel")
    }
    #[cfg(not(feature = "otel"))]
    {
        let layer = tracing_subscriber::fmt::layer().with_writer(std::io::sink);
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::set_global_default(subscriber)
            .context("a tracing subscriber is installed already")?;
        Ok("tracing")
    }
}
