//! Liveness and readiness of a [`Bus`], for health endpoints and orchestrators.
//!
//! [`Bus::health`] runs three checks:
//!
//! | check | ok when |
//! |---|---|
//! | `backend` | a cheap call to the backend answers (listing its queues, or reading one queue's counts where listing is not supported) |
//! | `consumers` | every consumer and worker task the bus started is still running |
//! | `circuits` | no circuit breaker registered with [`Bus::watch_circuit_breaker`] is open |
//!
//! The bus is *live* until it is shut down, and *ready* when it is live and
//! every check passes.
//!
//! ```
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use busway::middleware::{CircuitBreakerConfig, CircuitBreakerLayer};
//!
//! let bus = busway::Bus::connect("memory://").await?;
//! let breaker = CircuitBreakerLayer::new(CircuitBreakerConfig::default());
//! bus.watch_circuit_breaker("payments", breaker.handle());
//!
//! let health = bus.health().await;
//! assert!(health.live && health.ready);
//! for check in &health.checks {
//!     println!("{}: {} ({})", check.name, if check.ok { "ok" } else { "FAILING" }, check.detail);
//! }
//! bus.shutdown().await;
//! # Ok(())
//! # }
//! # tokio::runtime::Runtime::new().unwrap().block_on(run()).unwrap();
//! ```

use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::bus::lock;
use crate::middleware::{CircuitBreakerHandle, CircuitState};
use crate::{Bus, QueueName, StatsError};

/// How long the backend check waits for an answer.
pub const BACKEND_CHECK_TIMEOUT: Duration = Duration::from_secs(3);

/// The circuit breakers a bus reports on (see [`Bus::watch_circuit_breaker`]).
#[derive(Default)]
pub(crate) struct Registry {
    circuits: Mutex<Vec<(String, CircuitBreakerHandle)>>,
}

/// The outcome of [`Bus::health`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// The bus has not been shut down.
    pub live: bool,
    /// Live, and every check passes: fit to take traffic.
    pub ready: bool,
    /// Each check, in a fixed order: `backend`, `consumers`, `circuits`.
    pub checks: Vec<Check>,
}

impl Health {
    /// The check called `name`, if it ran.
    pub fn check(&self, name: &str) -> Option<&Check> {
        self.checks.iter().find(|c| c.name == name)
    }
}

/// One named check.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    /// `backend`, `consumers` or `circuits`.
    pub name: String,
    /// Whether it passes.
    pub ok: bool,
    /// What was found, for people.
    pub detail: String,
}

impl Check {
    fn new(name: &str, ok: bool, detail: impl Into<String>) -> Self {
        Self {
            name: name.to_owned(),
            ok,
            detail: detail.into(),
        }
    }
}

/// A circuit breaker's name and state, as [`Bus::circuit_breakers`] reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CircuitReport {
    /// The name it was registered under.
    pub name: String,
    /// `closed`, `open` or `half_open`.
    pub state: String,
}

impl Bus {
    /// Reports `handle`'s circuit breaker in [`health`](Self::health) (not
    /// ready while it is open) and in [`circuit_breakers`](Self::circuit_breakers).
    /// Registering a name again replaces the earlier handle.
    pub fn watch_circuit_breaker(&self, name: impl Into<String>, handle: CircuitBreakerHandle) {
        let name = name.into();
        let mut circuits = lock(&self.inner.health.circuits);
        circuits.retain(|(n, _)| *n != name);
        circuits.push((name, handle));
        circuits.sort_by(|a, b| a.0.cmp(&b.0));
    }

    /// The registered circuit breakers and their states, by name.
    pub fn circuit_breakers(&self) -> Vec<CircuitReport> {
        lock(&self.inner.health.circuits)
            .iter()
            .map(|(name, handle)| CircuitReport {
                name: name.clone(),
                state: handle.state().as_str().to_owned(),
            })
            .collect()
    }

    /// Liveness and readiness: see the [module docs](crate::health).
    pub async fn health(&self) -> Health {
        let live = !self.is_shut_down();
        let checks = vec![
            self.backend_check().await,
            self.consumers_check(),
            self.circuits_check(),
        ];
        let ready = live && checks.iter().all(|c| c.ok);
        Health {
            live,
            ready,
            checks,
        }
    }

    async fn backend_check(&self) -> Check {
        let transport = self.transport().clone();
        let probe = async move {
            match transport.list_queues().await {
                Ok(queues) => Ok(format!("reachable ({} queues)", queues.len())),
                Err(StatsError::Unsupported(_)) => {
                    // Reading the counts of a queue that may not exist is cheap
                    // everywhere; "not found" is an answer too.
                    let probe = QueueName::new("busway_health_probe")
                        .map_err(|e| format!("unreachable: {e}"))?;
                    match transport.queue_stats(&probe).await {
                        Ok(_) | Err(StatsError::QueueNotFound(_)) => Ok("reachable".to_owned()),
                        Err(e) => Err(format!("unreachable: {e}")),
                    }
                }
                Err(e) => Err(format!("unreachable: {e}")),
            }
        };
        match tokio::time::timeout(BACKEND_CHECK_TIMEOUT, probe).await {
            Ok(Ok(detail)) => Check::new("backend", true, detail),
            Ok(Err(detail)) => Check::new("backend", false, detail),
            Err(_) => Check::new(
                "backend",
                false,
                format!("no answer within {}s", BACKEND_CHECK_TIMEOUT.as_secs_f64()),
            ),
        }
    }

    fn consumers_check(&self) -> Check {
        if self.is_shut_down() {
            return Check::new("consumers", false, "the bus is shut down");
        }
        let workers = lock(&self.inner.workers);
        let total = workers.len();
        let stopped = workers.iter().filter(|w| w.is_finished()).count();
        if stopped == 0 {
            Check::new("consumers", true, format!("{total} running"))
        } else {
            Check::new("consumers", false, format!("{stopped} of {total} stopped"))
        }
    }

    fn circuits_check(&self) -> Check {
        let circuits = lock(&self.inner.health.circuits);
        let open: Vec<&str> = circuits
            .iter()
            .filter(|(_, h)| h.state() == CircuitState::Open)
            .map(|(n, _)| n.as_str())
            .collect();
        if open.is_empty() {
            Check::new(
                "circuits",
                true,
                format!("{} watched, none open", circuits.len()),
            )
        } else {
            Check::new("circuits", false, format!("open: {}", open.join(", ")))
        }
    }
}
