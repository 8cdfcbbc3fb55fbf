//! Saga throughput and latency: a 3-step saga, participants in this
//! process, a fixed number of sagas in flight.
//!
//! ```text
//! cargo bench -p busway --bench saga -- [--sagas N] [--in-flight N] [--store memory|sqlite|all] [--bus memory|sqlite]
//! ```
//!
//! Each run prints completed sagas per second and p50/p99 saga latency
//! (start to COMPLETED), next to a baseline: the same three calls as plain
//! RPC requests, with no saga state kept.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use busway::saga::{SagaDefinition, SagaOrchestrator, SagaParticipant, SagaStep, StepContext};
use busway::saga_store::{SagaStatus, SagaStore};
use busway::Bus;
use futures::StreamExt;
use serde_json::{json, Value};

struct Args {
    sagas: usize,
    in_flight: usize,
    stores: Vec<String>,
    bus: String,
}

fn args() -> Args {
    let mut args = Args {
        sagas: 20_000,
        in_flight: 64,
        stores: vec!["memory".into(), "sqlite".into()],
        bus: "memory".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--sagas" => args.sagas = it.next().and_then(|v| v.parse().ok()).unwrap_or(args.sagas),
            "--in-flight" => {
                args.in_flight = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(args.in_flight)
            }
            "--store" => match it.next().as_deref() {
                Some("all") | None => {}
                Some(s) => args.stores = vec![s.to_owned()],
            },
            "--bus" => args.bus = it.next().unwrap_or(args.bus),
            // Flags cargo bench passes to every bench binary.
            _ => {}
        }
    }
    args
}

struct Report {
    name: String,
    count: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

impl Report {
    fn print(mut self) {
        self.latencies.sort();
        let pct = |p: f64| {
            let i = ((self.latencies.len() as f64 - 1.0) * p).round() as usize;
            self.latencies.get(i).copied().unwrap_or_default()
        };
        println!(
            "{:<44} {:>9.0}/s   p50 {:>8.2} ms   p99 {:>8.2} ms   ({} in {:.2} s)",
            self.name,
            self.count as f64 / self.elapsed.as_secs_f64(),
            pct(0.50).as_secs_f64() * 1e3,
            pct(0.99).as_secs_f64() * 1e3,
            self.count,
            self.elapsed.as_secs_f64(),
        );
    }
}

async fn register_participants(bus: &Bus, store: Arc<dyn SagaStore>, concurrency: usize) {
    for service in ["order_service", "inventory_service", "payment_service"] {
        let participant =
            SagaParticipant::new(bus, service, store.clone()).concurrency(concurrency);
        participant
            .on_action("act", |ctx: StepContext<Value>| async move {
                Ok(json!({ "step": ctx.step_id() }))
            })
            .await
            .unwrap();
        participant
            .on_compensation("undo", |_: StepContext<Value>| async move { Ok(()) })
            .await
            .unwrap();
    }
}

fn definition() -> SagaDefinition {
    let step = |id: &str, service: &str| {
        SagaStep::new(id, service, "act")
            .compensate_with("undo")
            .timeout(Duration::from_secs(30))
    };
    SagaDefinition::builder("bench_saga")
        .step(step("create_order", "order_service"))
        .step(step("reserve_inventory", "inventory_service"))
        .step(step("charge_payment", "payment_service"))
        .build()
        .unwrap()
}

async fn run_sagas(name: &str, bus: Bus, store: Arc<dyn SagaStore>, args: &Args) -> Report {
    register_participants(&bus, store.clone(), args.in_flight).await;
    let orchestrator = SagaOrchestrator::new(bus.clone(), store);
    orchestrator.register(definition()).unwrap();
    let run = uuid::Uuid::new_v4().simple().to_string();
    let one = |i: usize| {
        let orchestrator = orchestrator.clone();
        let id = format!("{}-{i}", &run[..8]);
        async move {
            let start = Instant::now();
            orchestrator
                .start("bench_saga", &id, &json!({"order_id": id, "amount": 10}))
                .await
                .unwrap();
            let saga = orchestrator.wait(&id).await.unwrap();
            assert_eq!(saga.status, SagaStatus::Completed);
            start.elapsed()
        }
    };
    // Warm up.
    futures::stream::iter(0..args.in_flight.min(200))
        .map(|i| one(args.sagas + i))
        .buffer_unordered(args.in_flight)
        .collect::<Vec<_>>()
        .await;
    let started = Instant::now();
    let latencies: Vec<Duration> = futures::stream::iter(0..args.sagas)
        .map(one)
        .buffer_unordered(args.in_flight)
        .collect()
        .await;
    let elapsed = started.elapsed();
    orchestrator.shutdown().await;
    bus.shutdown().await;
    Report {
        name: name.to_owned(),
        count: args.sagas,
        elapsed,
        latencies,
    }
}

/// The baseline: three RPC calls in a row per unit, nothing persisted.
async fn run_baseline(name: &str, bus: Bus, args: &Args) -> Report {
    for service in ["b_order", "b_inventory", "b_payment"] {
        bus.register_request_handler(service, "act", |v: Value| async move { Ok(v) })
            .concurrency(args.in_flight)
            .await
            .unwrap();
    }
    let one = |i: usize| {
        let bus = bus.clone();
        async move {
            let start = Instant::now();
            for service in ["b_order", "b_inventory", "b_payment"] {
                let _: Value = bus.request(service, "act", &json!({"i": i})).await.unwrap();
            }
            start.elapsed()
        }
    };
    let started = Instant::now();
    let latencies: Vec<Duration> = futures::stream::iter(0..args.sagas)
        .map(one)
        .buffer_unordered(args.in_flight)
        .collect()
        .await;
    let elapsed = started.elapsed();
    bus.shutdown().await;
    Report {
        name: name.to_owned(),
        count: args.sagas,
        elapsed,
        latencies,
    }
}

async fn bus_for(
    kind: &str,
    dir: &std::path::Path,
) -> (Bus, Option<busway::sqlite::SqliteTransport>) {
    match kind {
        "sqlite" => {
            let transport = busway::sqlite::SqliteTransport::open(
                dir.join(format!("bus-{}.db", uuid::Uuid::new_v4())),
            )
            .unwrap();
            (Bus::new(Arc::new(transport.clone())), Some(transport))
        }
        _ => (Bus::connect("memory://").await.unwrap(), None),
    }
}

#[tokio::main]
async fn main() {
    let args = args();
    let dir = tempfile::tempdir().unwrap();
    println!(
        "3-step saga, participants in process, {} sagas, {} in flight, bus on {}",
        args.sagas, args.in_flight, args.bus
    );
    let (bus, _) = bus_for(&args.bus, dir.path()).await;
    run_baseline(
        &format!("baseline: 3 RPC calls, no saga ({} bus)", args.bus),
        bus,
        &args,
    )
    .await
    .print();
    for store in &args.stores {
        let (bus, bus_transport) = bus_for(&args.bus, dir.path()).await;
        let (store_handle, label): (Arc<dyn SagaStore>, String) = match store.as_str() {
            "sqlite" => {
                // Same file as the bus when the bus is on SQLite, as an
                // application would have it; synchronous = FULL (the default).
                let transport = match bus_transport {
                    Some(t) => t,
                    None => {
                        busway::sqlite::SqliteTransport::open(dir.path().join("sagas.db")).unwrap()
                    }
                };
                (
                    Arc::new(
                        busway::sqlite::SqliteSagaStore::open(transport)
                            .await
                            .unwrap(),
                    ),
                    "saga store sqlite (FULL)".into(),
                )
            }
            _ => (
                Arc::new(busway::memory::MemorySagaStore::new()),
                "saga store memory".into(),
            ),
        };
        run_sagas(
            &format!("{label}, {} bus", args.bus),
            bus,
            store_handle,
            &args,
        )
        .await
        .print();
    }
}
