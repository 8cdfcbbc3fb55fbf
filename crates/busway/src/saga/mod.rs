//! Sagas: durable orchestration of steps run by participant services, with
//! retries, timeouts, compensation in reverse order, crash recovery,
//! idempotent steps, metrics and an operator API.
//!
//! - A [`SagaDefinition`] lists [`SagaStep`]s: an action on a participant
//!   service, the compensation that undoes it, a timeout per attempt and
//!   retry policies. [`build`](SagaDefinitionBuilder::build) rejects
//!   definitions that cannot run (duplicate step ids, zero timeouts, …).
//! - Participants ([`SagaParticipant`]) register action and compensation
//!   handlers in their own process. Each handler gets a [`StepContext`]:
//!   the saga's input and the outputs of earlier steps. Results are stored
//!   by idempotency key, so a replayed step command does not repeat its effect.
//!   A participant whose effects are writes to its own SQLite database runs
//!   them in the transaction that stores the result
//!   ([`on_action_in_transaction`](SagaParticipant::on_action_in_transaction)):
//!   exactly once even when the participant is killed mid-step.
//! - The [`SagaOrchestrator`] (any process) keeps each saga in a
//!   [`SagaStore`](crate::saga_store::SagaStore) (SQLite, memory, …),
//!   dispatches the steps over the bus as RPC calls to the services that
//!   own them, and drives every saga to COMPLETED or COMPENSATED, or to
//!   FAILED (a compensation kept failing) where an operator lists, shows,
//!   retries or aborts it.
//!
//! The statuses are the reference `SagaManager`'s: PENDING, RUNNING,
//! COMPLETED, FAILED, COMPENSATING, COMPENSATED.
//!
//! On the wire, a step command is a request in the reference RPC format to
//! queue `rpc_{service}` with `"method"` the action (or compensation) name
//! and `"params"` `{"saga_id", "saga", "step_id", "phase", "attempt",
//! "idempotency_key", "action_key", "input", "outputs"}`; the reply's
//! `data` is `{"outcome": "completed", "output": …}` or
//! `{"outcome": "failed", "error": str, "retryable": bool}`.
//!
//! Metrics are listed in [`metrics`](self::metrics).

mod clock;
mod definition;
pub mod metrics;
mod orchestrator;
mod participant;
#[cfg(feature = "sqlite")]
mod transactional;
pub(crate) mod wire;

pub use definition::{
    DefinitionError, SagaDefinition, SagaDefinitionBuilder, SagaStep, DEFAULT_STEP_TIMEOUT,
};
pub use metrics::SagaStats;
pub use orchestrator::{
    OrchestratorConfig, SagaDetails, SagaOrchestrator, SagaQueryError, StartSagaError,
};
pub use participant::{SagaParticipant, StepContext};

impl crate::Bus {
    /// `Some(true)` if service `service` runs on this bus and handles
    /// `method`, `Some(false)` if it runs here without that method, `None`
    /// if it does not run on this bus.
    pub(crate) fn local_method(&self, service: &str, method: &str) -> Option<bool> {
        let table = crate::bus::lock(&self.inner.services).get(service).cloned();
        table.map(|t| t.contains(method))
    }
}
