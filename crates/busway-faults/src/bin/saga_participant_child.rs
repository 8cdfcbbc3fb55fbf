//! Saga participants for the participant crash test to kill: three services
//! whose actions and compensations write their effect to table `effects` of
//! the SQLite file, in the transaction that stores the step's result. Runs
//! until it is killed; the orchestrator runs in the test process.

use std::sync::Arc;

use anyhow::{bail, Context};
use busway::saga::{SagaParticipant, StepContext};
use busway::sqlite::{SqliteConfig, SqliteSagaStore, SqliteTransport, WriteError, WriteTx};
use busway::{Bus, HandlerError};
use busway_faults::saga::{over_the_limit, SERVICES};
use serde_json::Value;

/// Records `effect` for the saga (no unique key: a repeat would show as a second row).
fn record(
    effect: &str,
    ctx: &StepContext<Value>,
    tx: &mut WriteTx<'_>,
) -> Result<(), HandlerError> {
    tx.connection()
        .prepare_cached("INSERT INTO effects (effect, saga_id) VALUES (?1, ?2)")
        .and_then(|mut s| s.execute((effect, ctx.saga_id())))
        .map_err(|e| HandlerError::new(e.to_string()))?;
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [url] = args.as_slice() else {
        bail!("usage: busway-saga-participant-child URL");
    };
    let (path, config) = SqliteConfig::from_url(url).context("URL")?;
    let transport = SqliteTransport::open_with(path, config)?;
    let store = SqliteSagaStore::open(transport.clone()).await?;
    transport
        .write(|tx| {
            tx.connection().execute_batch(
                "CREATE TABLE IF NOT EXISTS effects (effect TEXT NOT NULL, saga_id TEXT NOT NULL)",
            )?;
            Ok::<_, WriteError>(())
        })
        .await?;
    let bus = Bus::new(Arc::new(transport));
    for (service, action, compensation) in SERVICES {
        let participant =
            SagaParticipant::with_sqlite_store(&bus, service, store.clone()).concurrency(64);
        participant
            .on_action_in_transaction(
                action,
                move |ctx: &StepContext<Value>, tx: &mut WriteTx<'_>| {
                    if action == "charge_payment" && over_the_limit(&ctx.input) {
                        return Err(HandlerError::permanent("amount exceeds the payment limit"));
                    }
                    record(action, ctx, tx)
                },
            )
            .await?;
        participant
            .on_compensation_in_transaction(
                compensation,
                move |ctx: &StepContext<Value>, tx: &mut WriteTx<'_>| record(compensation, ctx, tx),
            )
            .await?;
    }
    println!("serving");
    std::future::pending::<()>().await;
    Ok(())
}
