//! `busway bench --metrics`: the same pattern run twice in one process,
//! first with no metrics recorder, then with the Prometheus recorder
//! (`busway::metrics::install_prometheus`) recording every metric busway
//! emits, and scraped once a second, and the ratio of the two.
//!
//! A recorder cannot be removed once installed, so the run without one goes
//! first.

use std::time::Duration;

use anyhow::{bail, Context};

use super::{peak_rss_bytes, reset_peak_rss, rpc, work_queue, BenchArgs, Pattern};

pub(super) async fn run(args: &BenchArgs) -> anyhow::Result<()> {
    match args.pattern {
        Pattern::Transport => bail!(
            "--metrics measures --pattern rpc or --pattern work-queue (the bare transport records no metrics)"
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
        .with_context(|| format!("metered work-queue benchmark of {redacted} failed"))?;
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

/// Installs the Prometheus recorder, scraped (rendered) once a second as a
/// server would be; returns its name.
fn install() -> anyhow::Result<&'static str> {
    let handle =
        busway::metrics::install_prometheus().context("a metrics recorder is installed already")?;
    std::thread::Builder::new()
        .name("metrics-scrape".into())
        .spawn(move || loop {
            std::thread::sleep(Duration::from_secs(1));
            let _ = handle.render();
        })
        .context("starting the scrape thread failed")?;
    Ok("prometheus")
}
