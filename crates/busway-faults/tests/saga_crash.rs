//! SIGKILL a saga orchestrator over and over while it runs 1,000 sagas whose
//! participants live in this process; then let a last orchestrator finish.
//! Every saga must end COMPLETED or COMPENSATED (0 lost, 0 stuck), and every
//! effect must have happened at most once, and exactly as the outcome says
//! (0 double effects).

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use busway::saga::{SagaParticipant, StepContext};
use busway::saga_store::{SagaQuery, SagaStatus, SagaStore};
use busway::sqlite::{SqliteConfig, SqliteSagaStore, SqliteTransport};
use busway::{Bus, HandlerError};
use rand::Rng;
use serde_json::Value;

const CHILD: &str = env!("CARGO_BIN_EXE_busway-saga-crash-child");
const SAGAS: usize = 1_000;

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
    let services = [
        ("crash_orders", "create_order", "cancel_order"),
        ("crash_inventory", "reserve_inventory", "release_inventory"),
        ("crash_payments", "charge_payment", "refund_payment"),
    ];
    for (service, action, compensation) in services {
        let participant = SagaParticipant::new(bus, service, store.clone()).concurrency(64);
        let e = effects.clone();
        participant
            .on_action(action, move |ctx: StepContext<Value>| {
                let e = e.clone();
                async move {
                    if action == "charge_payment" && ctx.input["amount"].as_i64() > Some(10_000) {
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
    let deadline = Instant::now() + Duration::from_secs(600);
    let finished = loop {
        let counts = store.count_by_status().await?;
        let terminal: u64 = [
            SagaStatus::Completed,
            SagaStatus::Compensated,
            SagaStatus::Failed,
        ]
        .iter()
        .filter_map(|s| counts.get(s))
        .sum();
        if terminal == SAGAS as u64 {
            break Ok(counts);
        }
        if Instant::now() > deadline {
            break Err(counts);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    child.kill()?;
    child.wait()?;
    let counts = finished.map_err(|c| anyhow::anyhow!("sagas still not finished: {c:?}"))?;
    println!("final: {counts:?}");

    let sagas = store.list(&SagaQuery::default().limit(SAGAS * 2)).await?;
    ensure!(sagas.len() == SAGAS, "{} sagas stored", sagas.len());
    let effects = effects.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let count = |effect: &str, id: &str| {
        effects
            .get(&(effect.to_owned(), id.to_owned()))
            .copied()
            .unwrap_or(0)
    };
    for (key, n) in &effects {
        ensure!(*n == 1, "{key:?} happened {n} times");
    }
    for saga in &sagas {
        let i: usize = saga.id.trim_start_matches("saga-").parse()?;
        let id = saga.id.as_str();
        let observed = [
            count("create_order", id),
            count("reserve_inventory", id),
            count("charge_payment", id),
            count("cancel_order", id),
            count("release_inventory", id),
            count("refund_payment", id),
        ];
        let (status, expected) = if i % 10 == 0 {
            (SagaStatus::Compensated, [1, 1, 0, 1, 1, 0])
        } else {
            (SagaStatus::Completed, [1, 1, 1, 0, 0, 0])
        };
        ensure!(
            saga.status == status,
            "{id} is {} ({:?})",
            saga.status,
            saga.error
        );
        ensure!(
            observed == expected,
            "{id}: effects {observed:?}, expected {expected:?}"
        );
    }
    Ok(())
}
