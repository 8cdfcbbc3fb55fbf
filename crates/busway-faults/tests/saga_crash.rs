//! SIGKILL a saga orchestrator over and over while it runs 1,000 sagas whose
//! participants live in this process; then let a last orchestrator finish.
//! Every saga must end COMPLETED or COMPENSATED (0 lost, 0 stuck), and every
//! effect must have happened at most once, and exactly as the outcome says
//! (0 double effects).

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use busway::saga::{SagaParticipant, StepContext};
use busway::saga_store::{SagaQuery, SagaStore};
use busway::sqlite::{SqliteConfig, SqliteSagaStore, SqliteTransport};
use busway::{Bus, HandlerError};
use busway_faults::saga::{check_outcomes, over_the_limit, wait_until_all_ended, SAGAS, SERVICES};
use rand::Rng;
use serde_json::Value;

const CHILD: &str = env!("CARGO_BIN_EXE_busway-saga-crash-child");

/// Kills: at least 10, more with `BUSWAY_SAGA_CRASH_CYCLES`.
fn cycles() -> usize {
    std::env::var("BUSWAY_SAGA_CRASH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10)
        .max(10)
}

type Effects = Arc<Mutex<HashMap<(String, String), u32>>>;

fn record(effects: &Effects, effect: &str, saga_id: &str) {
    let mut effects = effects.lock().unwrap_or_else(|e| e.into_inner());
    *effects
        .entry((effect.to_owned(), saga_id.to_owned()))
        .or_insert(0) += 1;
}

async fn participants(
    bus: &Bus,
    store: Arc<dyn SagaStore>,
    effects: &Effects,
) -> anyhow::Result<()> {
    for (service, action, compensation) in SERVICES {
        let participant = SagaParticipant::new(bus, service, store.clone()).concurrency(64);
        let e = effects.clone();
        participant
            .on_action(action, move |ctx: StepContext<Value>| {
                let e = e.clone();
                async move {
                    if action == "charge_payment" && over_the_limit(&ctx.input) {
                        return Err(HandlerError::permanent("amount exceeds the payment limit"));
                    }
                    record(&e, action, ctx.saga_id());
                    Ok(())
                }
            })
            .await?;
        let e = effects.clone();
        participant
            .on_compensation(compensation, move |ctx: StepContext<Value>| {
                let e = e.clone();
                async move {
                    record(&e, compensation, ctx.saga_id());
                    Ok(())
                }
            })
            .await?;
    }
    Ok(())
}

fn spawn(url: &str) -> anyhow::Result<Child> {
    Command::new(CHILD)
        .args([url, &SAGAS.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("spawning the saga crash child")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_orchestrators_lose_no_saga_and_repeat_no_effect() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let url = format!(
        "sqlite://{}?lease_ms=1000",
        dir.path().join("sagas.db").display()
    );
    let (path, config) = SqliteConfig::from_url(&url)?;
    let transport = SqliteTransport::open_with(path, config)?;
    let store: Arc<dyn SagaStore> = Arc::new(SqliteSagaStore::open(transport.clone()).await?);
    let bus = Bus::new(Arc::new(transport));
    let effects = Effects::default();
    participants(&bus, store.clone(), &effects).await?;

    let mut rng = rand::rng();
    for cycle in 0..cycles() {
        let mut child = spawn(&url)?;
        tokio::time::sleep(Duration::from_millis(rng.random_range(300..1500))).await;
        child.kill()?; // SIGKILL
        child.wait()?;
        let counts = store.count_by_status().await?;
        println!("kill {cycle}: {counts:?}");
    }

    // A last orchestrator finishes what the killed ones left.
    let mut child = spawn(&url)?;
    let finished = wait_until_all_ended(&*store).await;
    child.kill()?;
    child.wait()?;
    let counts = finished?;
    println!("final: {counts:?}");

    let sagas = store.list(&SagaQuery::default().limit(SAGAS * 2)).await?;
    let effects = effects.lock().unwrap_or_else(|e| e.into_inner()).clone();
    check_outcomes(&sagas, &effects)
}
