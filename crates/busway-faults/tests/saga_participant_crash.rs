//! SIGKILL the saga participants over and over while an orchestrator in this
//! process runs 1,000 sagas; then let a last participant process finish.
//! The participants write each effect in the transaction that stores the
//! step's result (`on_action_in_transaction`), so every saga must end
//! COMPLETED or COMPENSATED with each effect recorded exactly once, however
//! the kills fell between effect, stored result and reply.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context};
use busway::saga::{OrchestratorConfig, SagaOrchestrator};
use busway::saga_store::{SagaQuery, SagaStatus, SagaStore};
use busway::sqlite::{SqliteConfig, SqliteSagaStore, SqliteTransport};
use busway::Bus;
use busway_faults::saga::{
    check_outcomes, definition, input, wait_until_all_ended, DEFINITION, SAGAS,
};
use futures::StreamExt;
use rand::Rng;

const CHILD: &str = env!("CARGO_BIN_EXE_busway-saga-participant-child");

/// Kills: at least 10, more with `BUSWAY_SAGA_CRASH_CYCLES`.
fn cycles() -> usize {
    std::env::var("BUSWAY_SAGA_CRASH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10)
        .max(10)
}

fn spawn(url: &str) -> anyhow::Result<Child> {
    Command::new(CHILD)
        .arg(url)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("spawning the saga participant child")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_participants_repeat_no_effect() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let url = format!(
        "sqlite://{}?lease_ms=1000",
        dir.path().join("sagas.db").display()
    );
    let (path, config) = SqliteConfig::from_url(&url)?;
    let transport = SqliteTransport::open_with(path.clone(), config)?;
    let store = Arc::new(SqliteSagaStore::open(transport.clone()).await?);
    let bus = Bus::new(Arc::new(transport));
    let orchestrator = SagaOrchestrator::with_config(
        bus.clone(),
        store.clone(),
        OrchestratorConfig::default()
            .with_poll_interval(Duration::from_millis(100))
            .with_lease_grace(Duration::from_millis(500)),
    );
    orchestrator.register(definition(Duration::from_secs(1), 50)?)?;

    // Before each kill a wave of sagas starts, so every kill lands while
    // steps are in flight: between effects, stored results and replies.
    let waves = cycles();
    let mut child = spawn(&url)?;
    let mut rng = rand::rng();
    let mut kills_mid_flight = 0;
    for wave in 0..waves {
        futures::stream::iter(wave * SAGAS / waves..(wave + 1) * SAGAS / waves)
            .map(|i| {
                let orchestrator = orchestrator.clone();
                async move {
                    orchestrator
                        .start(DEFINITION, &format!("saga-{i}"), &input(i))
                        .await
                }
            })
            .buffer_unordered(32)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<Vec<()>, _>>()?;
        tokio::time::sleep(Duration::from_millis(rng.random_range(5..60))).await;
        child.kill()?; // SIGKILL
        child.wait()?;
        let counts = store.count_by_status().await?;
        let finished: u64 = [SagaStatus::Completed, SagaStatus::Compensated]
            .iter()
            .filter_map(|s| counts.get(s))
            .sum();
        if finished < counts.values().sum::<u64>() {
            kills_mid_flight += 1;
        }
        println!("kill {wave}: {counts:?}");
        child = spawn(&url)?;
    }

    // The last participant process serves until every saga has ended.
    let finished = wait_until_all_ended(&*store).await;
    child.kill()?;
    child.wait()?;
    orchestrator.shutdown().await;
    bus.shutdown().await;
    let counts = finished?;
    ensure!(
        kills_mid_flight >= 3,
        "only {kills_mid_flight} kills landed while sagas were running"
    );
    println!("final: {counts:?}");

    let sagas = store.list(&SagaQuery::default().limit(SAGAS * 2)).await?;
    // Step commands a killed process held came back to the next one (and
    // some steps timed out and were dispatched again): either way each
    // found the stored result or ran a step whose first run rolled back.
    let redispatched: u32 = sagas
        .iter()
        .flat_map(|s| &s.steps)
        .map(|step| step.attempts.saturating_sub(1))
        .sum();
    println!("{kills_mid_flight} kills mid-flight; {redispatched} step attempts dispatched again");
    // The effects as the participants committed them, one row each.
    let effects: HashMap<(String, String), u32> = {
        let db = rusqlite::Connection::open(&path)?;
        let mut statement =
            db.prepare("SELECT effect, saga_id, count(*) FROM effects GROUP BY effect, saga_id")?;
        let rows = statement.query_map([], |r| Ok(((r.get(0)?, r.get(1)?), r.get(2)?)))?;
        rows.collect::<Result<_, _>>()?
    };
    check_outcomes(&sagas, &effects)
}
