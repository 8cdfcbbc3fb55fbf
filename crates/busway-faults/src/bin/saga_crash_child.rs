//! A saga orchestrator for the saga crash test to kill: starts sagas
//! `saga-0` … `saga-{N-1}` (skipping those that exist) on the SQLite file
//! and drives them, resuming whatever an earlier, killed run left, until
//! it is killed. The participants run in the test process.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use busway::saga::{OrchestratorConfig, SagaOrchestrator, StartSagaError};
use busway::sqlite::{SqliteConfig, SqliteSagaStore, SqliteTransport};
use busway::Bus;
use busway_faults::saga::{definition, input, DEFINITION};
use futures::StreamExt;

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
    orchestrator.register(definition(Duration::from_secs(2), 20)?)?;
    futures::stream::iter(0..count)
        .map(|i| {
            let orchestrator = orchestrator.clone();
            async move {
                match orchestrator
                    .start(DEFINITION, &format!("saga-{i}"), &input(i))
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
