//! A saga orchestrator for the saga crash test to kill: starts sagas
//! `saga-0` … `saga-{N-1}` (skipping those that exist) on the SQLite file
//! and drives them, resuming whatever an earlier, killed run left, until
//! it is killed. The participants run in the test process.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use busway::saga::{
    OrchestratorConfig, SagaDefinition, SagaOrchestrator, SagaStep, StartSagaError,
};
use busway::sqlite::{SqliteConfig, SqliteSagaStore, SqliteTransport};
use busway::{Bus, RetryPolicy};
use futures::StreamExt;

/// The saga the crash test runs: three steps on three services.
fn definition() -> anyhow::Result<SagaDefinition> {
    let retry = RetryPolicy::default()
        .with_max_attempts(20)
        .with_backoff(Duration::from_millis(50), Duration::from_millis(500));
    let step = |id: &str, service: &str, compensation: &str| {
        SagaStep::new(id, service, id)
            .compensate_with(compensation)
            .timeout(Duration::from_secs(2))
            .retry(retry.clone())
            .compensation_retry(retry.clone())
    };
    Ok(SagaDefinition::builder("crash_order")
        .step(step("create_order", "crash_orders", "cancel_order"))
        .step(step(
            "reserve_inventory",
            "crash_inventory",
            "release_inventory",
        ))
        .step(step("charge_payment", "crash_payments", "refund_payment"))
        .build()?)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (url, count) = match args.as_slice() {
        [url, count] => (url.as_str(), count.parse::<usize>().context("COUNT")?),
        _ => bail!("usage: busway-saga-crash-child URL COUNT"),
    };
    let (path, config) = SqliteConfig::from_url(url)?;
    let transport = SqliteTransport::open_with(path, config)?;
    let store = Arc::new(SqliteSagaStore::open(transport.clone()).await?);
    let bus = Bus::new(Arc::new(transport));
    let orchestrator = SagaOrchestrator::with_config(
        bus,
        store,
        OrchestratorConfig::default()
            .with_poll_interval(Duration::from_millis(100))
            .with_lease_grace(Duration::from_millis(500)),
    );
    orchestrator.register(definition()?)?;
    futures::stream::iter(0..count)
        .map(|i| {
            let orchestrator = orchestrator.clone();
            async move {
                // Every tenth order is over the payment limit: it compensates.
                let amount = if i % 10 == 0 { 20_000 } else { 100 };
                let input = serde_json::json!({ "order": i, "amount": amount });
                match orchestrator
                    .start("crash_order", &format!("saga-{i}"), &input)
                    .await
                {
                    Ok(()) | Err(StartSagaError::AlreadyExists(_)) => Ok(()),
                    Err(e) => Err(e),
                }
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<()>, _>>()?;
    println!("started all");
    // Drive (and resume) sagas until killed.
    std::future::pending::<()>().await;
    Ok(())
}
