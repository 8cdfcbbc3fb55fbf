//! `Bus::health`: liveness and readiness on the memory and SQLite backends.

mod support;

use std::sync::Arc;

use anyhow::ensure;
use busway::middleware::{CircuitBreakerConfig, CircuitBreakerLayer, LayerError};
use busway::{Bus, Transport};
use support::unique;
use tower::{Layer, ServiceExt};

type T = Arc<dyn Transport>;

/// A bus with a consumer on a working backend is live and ready; every check passes.
async fn ready_with_consumers(t: T) -> anyhow::Result<()> {
    let bus = Bus::new(t);
    let tasks = bus.task_queue(&unique("health"))?;
    tasks.register_handler("noop", |_: serde_json::Value| async { Ok(()) });
    tasks.start_workers().await?;
    let health = bus.health().await;
    ensure!(health.live && health.ready, "{health:?}");
    let names: Vec<&str> = health.checks.iter().map(|c| c.name.as_str()).collect();
    ensure!(names == ["backend", "consumers", "circuits"], "{names:?}");
    ensure!(health.checks.iter().all(|c| c.ok), "{health:?}");
    ensure!(
        health
            .check("consumers")
            .is_some_and(|c| c.detail != "0 running"),
        "{health:?}"
    );
    bus.shutdown().await;
    let after = bus.health().await;
    ensure!(!after.live && !after.ready, "{after:?}");
    Ok(())
}

/// An open circuit breaker makes the bus not ready (still live); closed again, ready.
async fn open_circuit_is_not_ready(t: T) -> anyhow::Result<()> {
    let bus = Bus::new(t);
    let layer = CircuitBreakerLayer::new(CircuitBreakerConfig {
        failure_threshold: 2,
        recovery_timeout: std::time::Duration::from_secs(3600),
        success_threshold: 1,
    });
    bus.watch_circuit_breaker("payments", layer.handle());
    ensure!(bus.health().await.ready);
    let mut service = layer.layer(tower::service_fn(|_: ()| async {
        Err::<(), _>(LayerError::TimedOut {
            after: std::time::Duration::from_secs(1),
        })
    }));
    for _ in 0..2 {
        let _ = (&mut service).oneshot(()).await;
    }
    let health = bus.health().await;
    ensure!(health.live && !health.ready, "{health:?}");
    let circuits = health.check("circuits");
    ensure!(
        circuits.is_some_and(|c| !c.ok && c.detail.contains("payments")),
        "{health:?}"
    );
    ensure!(bus.circuit_breakers()[0].state == "open");
    bus.shutdown().await;
    Ok(())
}

/// A backend that is gone: not ready, the backend and consumer checks fail.
async fn dead_backend_is_not_ready(t: T) -> anyhow::Result<()> {
    let bus = Bus::new(t.clone());
    let tasks = bus.task_queue(&unique("health_dead"))?;
    tasks.register_handler("noop", |_: serde_json::Value| async { Ok(()) });
    tasks.start_workers().await?;
    ensure!(bus.health().await.ready);
    t.close().await;
    let deadline = tokio::time::Instant::now() + support::PATIENCE;
    let health = loop {
        let health = bus.health().await;
        let consumers_down = health.check("consumers").is_some_and(|c| !c.ok);
        if consumers_down || tokio::time::Instant::now() > deadline {
            break health;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    ensure!(health.live && !health.ready, "{health:?}");
    ensure!(health.check("backend").is_some_and(|c| !c.ok), "{health:?}");
    ensure!(
        health.check("consumers").is_some_and(|c| !c.ok),
        "{health:?}"
    );
    let json = serde_json::to_value(&health)?;
    ensure!(json["ready"] == false && json["checks"][0]["name"] == "backend");
    bus.shutdown().await;
    Ok(())
}

mod memory {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ready_with_consumers() -> anyhow::Result<()> {
        super::ready_with_consumers(super::support::memory().transport).await
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn open_circuit_is_not_ready() -> anyhow::Result<()> {
        super::open_circuit_is_not_ready(super::support::memory().transport).await
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dead_backend_is_not_ready() -> anyhow::Result<()> {
        super::dead_backend_is_not_ready(super::support::memory().transport).await
    }
}

mod sqlite {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ready_with_consumers() -> anyhow::Result<()> {
        let backend = super::support::sqlite().await?;
        let result = super::ready_with_consumers(backend.transport.clone()).await;
        backend.transport.close().await;
        result
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn open_circuit_is_not_ready() -> anyhow::Result<()> {
        let backend = super::support::sqlite().await?;
        let result = super::open_circuit_is_not_ready(backend.transport.clone()).await;
        backend.transport.close().await;
        result
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dead_backend_is_not_ready() -> anyhow::Result<()> {
        let backend = super::support::sqlite().await?;
        super::dead_backend_is_not_ready(backend.transport.clone()).await
    }
}
