//! Metrics: what busway measures, through the [`metrics`](https://docs.rs/metrics)
//! facade.
//!
//! busway records into whatever recorder the application installs; with none
//! installed every measurement is a no-op. Feature `prometheus` adds
//! [`install_prometheus`], which installs a Prometheus recorder and returns the
//! handle whose `render()` gives the text exposition format.

#[cfg(feature = "prometheus")]
pub use metrics_exporter_prometheus::{BuildError, PrometheusHandle};

/// Histogram buckets, in seconds, for every `busway_*_seconds` histogram.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// Installs a Prometheus recorder as the process-wide `metrics` recorder and
/// returns its handle; `handle.render()` is the text exposition format to serve
/// on `/metrics`. Histograms named `*_seconds` get [`LATENCY_BUCKETS`].
///
/// Fails if a recorder is already installed in this process.
///
/// ```
/// let handle = busway::metrics::install_prometheus()?;
/// metrics::counter!("busway_example_total").increment(1);
/// assert!(handle.render().contains("busway_example_total 1"));
/// # Ok::<(), busway::metrics::BuildError>(())
/// ```
#[cfg(feature = "prometheus")]
pub fn install_prometheus() -> Result<PrometheusHandle, BuildError> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Suffix("_seconds".to_owned()),
            LATENCY_BUCKETS,
        )?
        .install_recorder()
}
