//! `busway bench --metrics`: the instrumentation is the Prometheus recorder
//! (`busway::metrics::install_prometheus`) recording every metric busway
//! emits, scraped once a second (see [`super::instrumented`]).

use std::time::Duration;

use anyhow::Context;

/// Installs the Prometheus recorder, scraped (rendered) once a second as a
/// server would be; returns its name.
pub(super) fn install() -> anyhow::Result<&'static str> {
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
