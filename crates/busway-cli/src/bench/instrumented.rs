//! `busway bench --metrics` and `--tracing`: the same pattern run twice in
//! one process, first bare, then with the instrumentation installed (a
//! metrics recorder or a tracing subscriber), and the ratio of the two.
//!
//! Neither a recorder nor a subscriber can be removed once installed, so the
//! bare run goes first, after an untimed warm-up run.

use anyhow::{bail, Context};

use super::{peak_rss_bytes, reset_peak_rss, rpc, work_queue, BenchArgs, Pattern};

/// What the second run has that the first has not.
pub(super) struct Instrumentation {
    /// The flag that asked for it (`--metrics`).
    pub(super) flag: &'static str,
    /// Why the bare transport cannot be measured with it.
    pub(super) transport_has_none: &'static str,
    /// Installs it process-wide; returns its name for the report.
    pub(super) install: fn() -> anyhow::Result<&'static str>,
}

pub(super) async fn run(args: &BenchArgs, with: Instrumentation) -> anyhow::Result<()> {
    if args.baseline.is_some() {
        bail!(
            "{} compares with the run without it; leave out --baseline",
            with.flag
        );
    }
    match args.pattern {
        Pattern::Transport => bail!(
            "{} measures --pattern rpc or --pattern work-queue ({})",
            with.flag,
            with.transport_has_none
        ),
        Pattern::Rpc => rpc::run_tracing(args, with.install).await,
        Pattern::WorkQueue => run_work_queue(args, with.install).await,
    }
}

async fn run_work_queue(
    args: &BenchArgs,
    install: fn() -> anyhow::Result<&'static str>,
) -> anyhow::Result<()> {
    let redacted = busway::redact_url(&args.url);
    work_queue::run_work_queue(&args.warm_up())
        .await
        .context("warm-up")?;
    reset_peak_rss();
    let off = work_queue::run_work_queue(args)
        .await
        .with_context(|| format!("work-queue benchmark of {redacted} failed"))?;
    let off = args.report("work-queue", &redacted, off, peak_rss_bytes());
    let name = install()?;
    reset_peak_rss();
    let on = work_queue::run_work_queue(args)
        .await
        .with_context(|| format!("work-queue benchmark of {redacted} with {name} failed"))?;
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
