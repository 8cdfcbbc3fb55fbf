//! `busway bench --tracing`: the instrumentation is a tracing subscriber
//! recording every span busway opens (see [`super::instrumented`]): the
//! `tracing-subscriber` registry with, when the CLI is built with the `otel`
//! feature, the OpenTelemetry layer (a tracer provider with no exporter:
//! spans are built, sampled and dropped), and otherwise a formatting layer
//! writing to nowhere.

use anyhow::Context;
use tracing_subscriber::layer::SubscriberExt;

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
