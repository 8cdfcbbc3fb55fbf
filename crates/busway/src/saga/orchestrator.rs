//! The orchestrator: persists sagas, dispatches their steps, retries,
//! compensates, and resumes what a crashed orchestrator left.

use std::collections::{HashMap, HashSet};
use std::future::IntoFuture;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use busway_core::saga_store::{
    CreateSagaError, LoadSagaError, SagaEvent, SagaEventKind, SagaQuery, SagaRecord, SagaStatus,
    SagaStore, StepRecord, StepStatus, UpdateSagaError,
};
use serde::Serialize;
use serde_json::Value;
use tokio::sync::{oneshot, watch, Semaphore};
use tokio::task::JoinHandle;
use tracing::Instrument;

use super::clock::{millis, Clock};
use super::definition::{DefinitionError, SagaDefinition};
use super::metrics::{Counters, Outcome, SagaStats};
use super::wire::{idempotency_key, Phase, StepCommandRef, StepReply};
use crate::bus::{lock, Bus};
use crate::rpc::RpcError;

/// How an orchestrator behaves.
///
/// ```
/// use busway::saga::OrchestratorConfig;
/// use std::time::Duration;
///
/// let config = OrchestratorConfig::default()
///     .with_poll_interval(Duration::from_millis(200))
///     .with_stuck_after(Duration::from_secs(60));
/// assert_eq!(config.poll_interval, Duration::from_millis(200));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct OrchestratorConfig {
    /// How often the store is asked for due sagas (retries scheduled by
    /// another process, sagas left by a crashed orchestrator, operator retries).
    pub poll_interval: Duration,
    /// How long past a step's timeout a dispatched step stays owned by the
    /// orchestrator that dispatched it; after that, any orchestrator may
    /// take the saga over.
    pub lease_grace: Duration,
    /// A saga that is not terminal and was not saved for this long counts as stuck.
    pub stuck_after: Duration,
    /// Step commands awaiting their reply at once, across all sagas.
    pub max_in_flight: usize,
    /// Whether to poll the store and resume due sagas (on by default).
    pub recover: bool,
}

impl Default for OrchestratorConfig {
    fn default() -> Self {
        Self {
            poll_interval: Duration::from_secs(1),
            lease_grace: Duration::from_secs(5),
            stuck_after: Duration::from_secs(300),
            max_in_flight: 4096,
            recover: true,
        }
    }
}

impl OrchestratorConfig {
    /// Sets [`poll_interval`](Self::poll_interval).
    pub fn with_poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval.max(Duration::from_millis(1));
        self
    }
    /// Sets [`lease_grace`](Self::lease_grace).
    pub fn with_lease_grace(mut self, grace: Duration) -> Self {
        self.lease_grace = grace;
        self
    }
    /// Sets [`stuck_after`](Self::stuck_after).
    pub fn with_stuck_after(mut self, after: Duration) -> Self {
        self.stuck_after = after;
        self
    }
    /// Sets [`max_in_flight`](Self::max_in_flight).
    pub fn with_max_in_flight(mut self, n: usize) -> Self {
        self.max_in_flight = n.max(1);
        self
    }
    /// Sets [`recover`](Self::recover).
    pub fn with_recovery(mut self, recover: bool) -> Self {
        self.recover = recover;
        self
    }
}

/// Starting a saga failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartSagaError {
    /// No definition with this name is registered with the orchestrator.
    #[error("no saga definition named `{0}` is registered")]
    UnknownDefinition(String),
    /// The input could not be encoded as JSON.
    #[error("encoding the saga input failed: {0}")]
    Encode(#[source] serde_json::Error),
    /// A saga with this id exists already.
    #[error("saga `{0}` already exists")]
    AlreadyExists(String),
    /// The saga to execute does not exist.
    #[error("saga `{0}` does not exist")]
    NotFound(String),
    /// The saga to execute is not PENDING.
    #[error("saga `{id}` is {status}, not pending")]
    NotPending {
        /// The saga.
        id: String,
        /// Its status.
        status: SagaStatus,
    },
    /// The store failed.
    #[error("the saga store failed")]
    Store(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The orchestrator has been shut down.
    #[error("the saga orchestrator has been shut down")]
    ShutDown,
}

impl StartSagaError {
    /// Whether trying again may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Store(e) => {
                if let Some(e) = e.downcast_ref::<CreateSagaError>() {
                    e.is_retryable()
                } else if let Some(e) = e.downcast_ref::<UpdateSagaError>() {
                    e.is_retryable()
                } else if let Some(e) = e.downcast_ref::<LoadSagaError>() {
                    e.is_retryable()
                } else {
                    false
                }
            }
            _ => false,
        }
    }
}

/// Waiting for a saga, or an operator action, failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SagaQueryError {
    /// No saga has this id.
    #[error("saga `{0}` does not exist")]
    NotFound(String),
    /// Retry and abort apply to FAILED sagas only.
    #[error("saga `{id}` is {status}; only a failed saga can be retried or aborted")]
    NotFailed {
        /// The saga.
        id: String,
        /// Its status.
        status: SagaStatus,
    },
    /// Another orchestrator or operator changed the saga meanwhile; try again.
    #[error("saga `{0}` changed meanwhile; try again")]
    Conflict(String),
    /// The store failed.
    #[error("the saga store failed")]
    Store(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The orchestrator has been shut down.
    #[error("the saga orchestrator has been shut down")]
    ShutDown,
}

impl SagaQueryError {
    /// Whether trying again may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Conflict(_) => true,
            Self::Store(e) => e
                .downcast_ref::<LoadSagaError>()
                .map(LoadSagaError::is_retryable)
                .or_else(|| {
                    e.downcast_ref::<UpdateSagaError>()
                        .map(UpdateSagaError::is_retryable)
                })
                .unwrap_or(false),
            _ => false,
        }
    }
}

fn store_error(e: impl std::error::Error + Send + Sync + 'static) -> SagaQueryError {
    SagaQueryError::Store(Box::new(e))
}

/// A saga with its step history, for operators.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct SagaDetails {
    /// The saga as stored.
    pub saga: SagaRecord,
    /// What happened to it, oldest first.
    pub history: Vec<SagaEvent>,
}

pub(crate) struct Inner {
    bus: Bus,
    store: Arc<dyn SagaStore>,
    definitions: RwLock<HashMap<String, Arc<SagaDefinition>>>,
    config: OrchestratorConfig,
    clock: Clock,
    /// Sagas driven (or waiting for a retry) in this process.
    active: Mutex<HashSet<String>>,
    waiters: Mutex<HashMap<String, Vec<oneshot::Sender<SagaRecord>>>>,
    slots: Arc<Semaphore>,
    counters: Counters,
    shutdown: watch::Sender<bool>,
    poller: Mutex<Option<JoinHandle<()>>>,
}

/// Runs sagas: persists each one in a [`SagaStore`], dispatches its steps
/// over the [`Bus`] to the participant services that own them (see
/// [`SagaParticipant`](super::SagaParticipant)), and awaits each result
/// with the step's timeout.
///
/// - A failed attempt is retried after an exponential backoff, scheduled
///   as a due time in the store and a timer in this process: nothing
///   sleeps in the way of other sagas.
/// - When a step fails for good, the completed steps (and a step whose
///   outcome is unknown, such as one that timed out) are compensated in
///   reverse order. A compensation is retried; if it keeps failing the
///   saga ends FAILED with the reason and waits for an operator
///   ([`retry`](Self::retry), [`abort`](Self::abort)).
/// - Every change is saved with the version it was read at, so two
///   orchestrators never both advance one saga, and a saga whose
///   orchestrator died is resumed by any orchestrator (this one after a
///   restart, or another) once its step's timeout has passed.
///
/// ```
/// use busway::saga::{SagaDefinition, SagaOrchestrator, SagaParticipant, SagaStep, StepContext};
/// use busway::saga_store::SagaStatus;
/// use busway::memory::MemorySagaStore;
/// use busway::Bus;
/// use std::sync::Arc;
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let bus = Bus::connect("memory://").await?;
/// let store = Arc::new(MemorySagaStore::new());
/// let payments = SagaParticipant::new(&bus, "payment_service", store.clone());
/// payments.on_action("charge_payment", |ctx: StepContext<serde_json::Value>| async move {
///     Ok(serde_json::json!({"charged": ctx.input["amount"]}))
/// }).await?;
/// payments.on_compensation("refund_payment", |_: StepContext<serde_json::Value>| async move { Ok(()) }).await?;
///
/// let orchestrator = SagaOrchestrator::new(bus.clone(), store);
/// orchestrator.register(
///     SagaDefinition::builder("payment")
///         .step(SagaStep::new("charge", "payment_service", "charge_payment").compensate_with("refund_payment"))
///         .build()?,
/// )?;
/// orchestrator.start("payment", "payment-1", &serde_json::json!({"amount": 30})).await?;
/// let saga = orchestrator.wait("payment-1").await?;
/// assert_eq!(saga.status, SagaStatus::Completed);
/// assert_eq!(saga.steps[0].output, Some(serde_json::json!({"charged": 30})));
/// orchestrator.shutdown().await;
/// bus.shutdown().await;
/// # Ok(())
/// # }
/// # tokio::runtime::Runtime::new().unwrap().block_on(run()).unwrap();
/// ```
#[derive(Clone)]
pub struct SagaOrchestrator {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for SagaOrchestrator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SagaOrchestrator")
            .field("config", &self.inner.config)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

/// What became of one pass over a saga.
enum Next {
    /// Terminal, taken over by someone else, or this orchestrator stopped.
    Done,
    /// A retry is due at this time (ms).
    RetryAt(i64),
}

/// A failed attempt.
struct Failure {
    error: String,
    retryable: bool,
    /// The participant may have run the step (timeout, lost reply).
    uncertain: bool,
    /// The orchestrator is stopping: record nothing.
    stopped: bool,
}

impl SagaOrchestrator {
    /// An orchestrator with the default [`OrchestratorConfig`]; starts
    /// polling the store for due sagas at once (needs a tokio runtime).
    pub fn new(bus: Bus, store: Arc<dyn SagaStore>) -> Self {
        Self::with_config(bus, store, OrchestratorConfig::default())
    }

    /// An orchestrator with `config`.
    pub fn with_config(bus: Bus, store: Arc<dyn SagaStore>, config: OrchestratorConfig) -> Self {
        let inner = Arc::new(Inner {
            bus,
            store,
            definitions: RwLock::new(HashMap::new()),
            slots: Arc::new(Semaphore::new(config.max_in_flight.max(1))),
            config,
            clock: Clock::new(),
            active: Mutex::new(HashSet::new()),
            waiters: Mutex::new(HashMap::new()),
            counters: Counters::default(),
            shutdown: watch::channel(false).0,
            poller: Mutex::new(None),
        });
        if inner.config.recover {
            let poller = tokio::spawn(poll(inner.clone()));
            *lock(&inner.poller) = Some(poller);
        }
        Self { inner }
    }

    /// Registers a definition, replacing one of the same name. Steps whose
    /// service runs on this orchestrator's bus are checked: an action or
    /// compensation that service does not handle is rejected here (services
    /// in other processes are checked when the step runs: the saga then
    /// fails that step with the reason and compensates).
    pub fn register(&self, definition: SagaDefinition) -> Result<(), DefinitionError> {
        for step in definition.steps() {
            let names = std::iter::once(("action", step.action()))
                .chain(step.compensation().map(|c| ("compensation", c)));
            for (what, name) in names {
                if self.inner.bus.local_method(step.service(), name) == Some(false) {
                    return Err(DefinitionError::UnknownAction {
                        saga: definition.name().to_owned(),
                        step: step.id().to_owned(),
                        what,
                        service: step.service().to_owned(),
                        name: name.to_owned(),
                    });
                }
            }
        }
        self.inner
            .definitions
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(definition.name().to_owned(), Arc::new(definition));
        Ok(())
    }

    /// The store the sagas are kept in.
    pub fn store(&self) -> &Arc<dyn SagaStore> {
        &self.inner.store
    }

    /// What this orchestrator has counted.
    pub fn stats(&self) -> SagaStats {
        self.inner.counters.snapshot()
    }

    /// Creates saga `saga_id` running definition `definition` with `input`
    /// (given to every step) and starts it. Returns once the saga is stored;
    /// [`wait`](Self::wait) for its end.
    pub async fn start(
        &self,
        definition: &str,
        saga_id: &str,
        input: &(impl Serialize + ?Sized),
    ) -> Result<(), StartSagaError> {
        let saga = self
            .create(definition, saga_id, input, SagaStatus::Running)
            .await?;
        self.inner.counters.started(&saga.definition);
        spawn_drive(&self.inner, saga);
        Ok(())
    }

    /// The reference `create_saga`: stores saga `saga_id` as PENDING without
    /// starting it; [`execute_saga`](Self::execute_saga) starts it.
    pub async fn create_saga(
        &self,
        definition: &str,
        saga_id: &str,
        input: &(impl Serialize + ?Sized),
    ) -> Result<SagaRecord, StartSagaError> {
        self.create(definition, saga_id, input, SagaStatus::Pending)
            .await
    }

    /// The reference `execute_saga`: starts a PENDING saga.
    pub async fn execute_saga(&self, saga_id: &str) -> Result<(), StartSagaError> {
        let store_err = |e| StartSagaError::Store(Box::new(e));
        let mut saga = self
            .inner
            .store
            .load(saga_id)
            .await
            .map_err(store_err)?
            .ok_or_else(|| StartSagaError::NotFound(saga_id.to_owned()))?;
        if saga.status != SagaStatus::Pending {
            return Err(StartSagaError::NotPending {
                id: saga.id,
                status: saga.status,
            });
        }
        let expected = saga.version;
        saga.version += 1;
        saga.status = SagaStatus::Running;
        saga.updated_at_ms = self.inner.clock.now_ms();
        saga.due_at_ms = Some(saga.updated_at_ms + millis(self.inner.config.lease_grace));
        self.inner
            .store
            .update(&saga, expected, &[])
            .await
            .map_err(|e| StartSagaError::Store(Box::new(e)))?;
        self.inner.counters.started(&saga.definition);
        spawn_drive(&self.inner, saga);
        Ok(())
    }

    async fn create(
        &self,
        definition: &str,
        saga_id: &str,
        input: &(impl Serialize + ?Sized),
        status: SagaStatus,
    ) -> Result<SagaRecord, StartSagaError> {
        if *self.inner.shutdown.borrow() {
            return Err(StartSagaError::ShutDown);
        }
        let def = self
            .inner
            .definition(definition)
            .ok_or_else(|| StartSagaError::UnknownDefinition(definition.to_owned()))?;
        let input = serde_json::to_value(input).map_err(StartSagaError::Encode)?;
        let now = self.inner.clock.now_ms();
        let saga = SagaRecord {
            id: saga_id.to_owned(),
            definition: def.name().to_owned(),
            status,
            version: 1,
            input,
            steps: def
                .steps()
                .iter()
                .map(|s| StepRecord::new(s.id()))
                .collect(),
            error: None,
            created_at_ms: now,
            updated_at_ms: now,
            // Owned by this orchestrator for a while; another one may take it
            // over if this one dies before dispatching the first step.
            due_at_ms: (status == SagaStatus::Running)
                .then(|| now + millis(self.inner.config.lease_grace)),
        };
        let created = SagaEvent::new(now, SagaEventKind::Created);
        match self.inner.store.create(&saga, &[created]).await {
            Ok(()) => Ok(saga),
            Err(CreateSagaError::AlreadyExists { id }) => Err(StartSagaError::AlreadyExists(id)),
            Err(e) => Err(StartSagaError::Store(Box::new(e))),
        }
    }

    /// Waits until saga `saga_id` is COMPLETED, COMPENSATED or FAILED, and
    /// returns it. Works for sagas run by other orchestrators too (it then
    /// checks the store every poll interval).
    pub async fn wait(&self, saga_id: &str) -> Result<SagaRecord, SagaQueryError> {
        let (tx, mut rx) = oneshot::channel();
        lock(&self.inner.waiters)
            .entry(saga_id.to_owned())
            .or_default()
            .push(tx);
        let mut shutdown = self.inner.shutdown.subscribe();
        loop {
            match self.inner.store.load(saga_id).await {
                Ok(Some(saga)) if saga.status.is_terminal() => return Ok(saga),
                Ok(Some(_)) => {}
                Ok(None) => return Err(SagaQueryError::NotFound(saga_id.to_owned())),
                Err(e) => return Err(store_error(e)),
            }
            tokio::select! {
                done = &mut rx => {
                    if let Ok(saga) = done {
                        return Ok(saga);
                    }
                    return Err(SagaQueryError::ShutDown);
                }
                _ = shutdown.wait_for(|stop| *stop) => return Err(SagaQueryError::ShutDown),
                _ = tokio::time::sleep(self.inner.config.poll_interval) => {}
            }
        }
    }

    /// Sagas matching `query` (operator API: list by status).
    pub async fn list(&self, query: &SagaQuery) -> Result<Vec<SagaRecord>, SagaQueryError> {
        self.inner.store.list(query).await.map_err(store_error)
    }

    /// One saga with its step history (operator API).
    pub async fn show(&self, saga_id: &str) -> Result<SagaDetails, SagaQueryError> {
        let saga = self
            .inner
            .store
            .load(saga_id)
            .await
            .map_err(store_error)?
            .ok_or_else(|| SagaQueryError::NotFound(saga_id.to_owned()))?;
        let history = self
            .inner
            .store
            .history(saga_id)
            .await
            .map_err(store_error)?;
        Ok(SagaDetails { saga, history })
    }

    /// Active sagas without progress for longer than
    /// [`stuck_after`](OrchestratorConfig::stuck_after).
    pub async fn stuck(&self, limit: usize) -> Result<Vec<SagaRecord>, SagaQueryError> {
        let query = SagaQuery {
            active_only: true,
            updated_before_ms: Some(
                self.inner.clock.now_ms() - millis(self.inner.config.stuck_after),
            ),
            ..SagaQuery::default().limit(limit)
        };
        self.list(&query).await
    }

    /// Operator API: runs a FAILED saga's compensation again, from the
    /// compensation that failed (its attempts start over), then the rest.
    pub async fn retry(&self, saga_id: &str) -> Result<(), SagaQueryError> {
        let mut saga = self.failed(saga_id).await?;
        for step in &mut saga.steps {
            if step.status == StepStatus::Failed && step.compensation_attempts > 0 {
                // Its compensation failed: make it a compensation target again.
                step.status = StepStatus::Compensating;
                step.compensation_attempts = 0;
            }
        }
        let now = self.inner.clock.now_ms();
        saga.status = SagaStatus::Compensating;
        saga.due_at_ms = Some(now + millis(self.inner.config.lease_grace));
        let event = SagaEvent::new(now, SagaEventKind::Retried);
        let saga = self.operator_save(saga, event).await?;
        spawn_drive(&self.inner, saga);
        Ok(())
    }

    /// Operator API: closes a FAILED saga for good with `reason` (recorded
    /// in its error and history); it stays FAILED and is never retried automatically.
    pub async fn abort(&self, saga_id: &str, reason: &str) -> Result<(), SagaQueryError> {
        let mut saga = self.failed(saga_id).await?;
        let now = self.inner.clock.now_ms();
        let previous = saga.error.take().unwrap_or_default();
        saga.error = Some(format!(
            "aborted by an operator: {reason} (was: {previous})"
        ));
        saga.due_at_ms = None;
        let event = SagaEvent::new(now, SagaEventKind::Aborted).detail(reason);
        self.operator_save(saga, event).await.map(|_| ())
    }

    async fn failed(&self, saga_id: &str) -> Result<SagaRecord, SagaQueryError> {
        let saga = self
            .inner
            .store
            .load(saga_id)
            .await
            .map_err(store_error)?
            .ok_or_else(|| SagaQueryError::NotFound(saga_id.to_owned()))?;
        if saga.status != SagaStatus::Failed {
            return Err(SagaQueryError::NotFailed {
                id: saga.id,
                status: saga.status,
            });
        }
        Ok(saga)
    }

    async fn operator_save(
        &self,
        mut saga: SagaRecord,
        event: SagaEvent,
    ) -> Result<SagaRecord, SagaQueryError> {
        let expected = saga.version;
        saga.version += 1;
        saga.updated_at_ms = event.at_ms;
        match self.inner.store.update(&saga, expected, &[event]).await {
            Ok(()) => Ok(saga),
            Err(UpdateSagaError::Conflict { id, .. }) => Err(SagaQueryError::Conflict(id)),
            Err(UpdateSagaError::NotFound { id }) => Err(SagaQueryError::NotFound(id)),
            Err(e) => Err(store_error(e)),
        }
    }

    /// Stops polling and scheduling: sagas in flight stop after their
    /// current step (their state is in the store; any orchestrator resumes
    /// them). Idempotent.
    pub async fn shutdown(&self) {
        self.inner.shutdown.send_replace(true);
        let poller = lock(&self.inner.poller).take();
        if let Some(poller) = poller {
            let _ = poller.await;
        }
        lock(&self.inner.waiters).clear();
    }
}

impl Inner {
    fn definition(&self, name: &str) -> Option<Arc<SagaDefinition>> {
        self.definitions
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    fn is_shut_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Saves `saga` at its next version with `events`; `false` if someone
    /// else saved it first or the store keeps failing (the saga is then
    /// left to whoever finds it due).
    async fn save(&self, saga: &mut SagaRecord, events: &mut Vec<SagaEvent>) -> bool {
        let expected = saga.version;
        saga.version += 1;
        saga.updated_at_ms = self.clock.now_ms();
        let mut backoff = Duration::from_millis(20);
        for _ in 0..6 {
            match self.store.update(saga, expected, events).await {
                Ok(()) => {
                    events.clear();
                    return true;
                }
                Err(UpdateSagaError::Conflict { .. }) => {
                    self.counters.conflict();
                    tracing::debug!(saga = %saga.id, "another orchestrator advanced this saga");
                    return false;
                }
                Err(e) if e.is_retryable() => {
                    tracing::warn!(saga = %saga.id, error = %e, "saving the saga failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                }
                Err(e) => {
                    tracing::error!(saga = %saga.id, error = %e, "saving the saga failed");
                    return false;
                }
            }
        }
        false
    }

    /// Sends one step command and awaits its reply with the step's timeout.
    async fn dispatch(
        &self,
        def: &SagaDefinition,
        saga: &SagaRecord,
        index: usize,
        phase: Phase,
        attempt: u32,
    ) -> Result<Value, Failure> {
        let Some(step) = def.step(index) else {
            return Err(permanent("the step is missing from the definition"));
        };
        let method = match phase {
            Phase::Action => step.action(),
            Phase::Compensation => step.compensation().unwrap_or_default(),
        };
        let command = StepCommandRef {
            saga_id: &saga.id,
            saga: &saga.definition,
            step_id: step.id(),
            phase,
            attempt,
            idempotency_key: idempotency_key(&saga.id, step.id(), phase),
            action_key: idempotency_key(&saga.id, step.id(), Phase::Action),
            input: &saga.input,
            outputs: saga
                .steps
                .iter()
                .filter_map(|s| s.output.as_ref().map(|o| (s.step_id.as_str(), o)))
                .collect(),
        };
        let _slot = self.slots.acquire().await;
        self.counters.attempt(&saga.definition, step.id(), phase);
        let span = crate::trace::saga_step_span(
            &saga.id,
            &saga.definition,
            step.id(),
            phase.as_str(),
            attempt,
        );
        let reply = self
            .bus
            .request::<StepReply>(step.service(), method, &command)
            .timeout(step.timeout)
            .into_future()
            .instrument(span.clone())
            .await;
        if !matches!(reply, Ok(StepReply::Completed { .. })) {
            crate::trace::record_error(&span);
        }
        match reply {
            Ok(StepReply::Completed { output }) => Ok(output),
            Ok(StepReply::Failed { error, retryable }) => Err(Failure {
                error,
                retryable,
                uncertain: false,
                stopped: false,
            }),
            Err(RpcError::ShutDown) => Err(Failure {
                error: "the bus was shut down".into(),
                retryable: true,
                uncertain: true,
                stopped: true,
            }),
            Err(e @ RpcError::Timeout { .. }) => Err(Failure {
                error: e.to_string(),
                retryable: true,
                uncertain: true,
                stopped: false,
            }),
            // Unknown action, params the participant cannot read.
            Err(e @ RpcError::Remote { .. }) => Err(permanent(e.to_string())),
            Err(e @ RpcError::Decode { .. }) => Err(Failure {
                error: e.to_string(),
                retryable: false,
                uncertain: true,
                stopped: false,
            }),
            Err(e) => Err(Failure {
                retryable: e.is_retryable(),
                error: e.to_string(),
                uncertain: false,
                stopped: false,
            }),
        }
    }

    fn finish(&self, saga: &SagaRecord, outcome: Outcome) {
        let duration = Duration::from_millis(
            u64::try_from(saga.updated_at_ms - saga.created_at_ms).unwrap_or(0),
        );
        self.counters.finished(&saga.definition, outcome, duration);
    }
}

fn permanent(error: impl Into<String>) -> Failure {
    Failure {
        error: error.into(),
        retryable: false,
        uncertain: false,
        stopped: false,
    }
}

/// Drives `saga` in a task of its own, unless this process drives it already.
fn spawn_drive(inner: &Arc<Inner>, saga: SagaRecord) -> bool {
    if !lock(&inner.active).insert(saga.id.clone()) {
        return false;
    }
    let span = crate::trace::saga_span(&saga.id, &saga.definition);
    tokio::spawn(drive(inner.clone(), saga).instrument(span));
    true
}

/// Advances a saga until it is terminal, lost, or the orchestrator stops;
/// sleeps (as a timer of its own, not blocking anyone) until scheduled retries.
async fn drive(inner: Arc<Inner>, mut saga: SagaRecord) {
    let mut shutdown = inner.shutdown.subscribe();
    loop {
        match advance(&inner, &mut saga).await {
            Next::Done => break,
            Next::RetryAt(at_ms) => {
                let wake = inner.clock.instant_at(at_ms);
                tokio::select! {
                    _ = tokio::time::sleep_until(wake) => {}
                    _ = shutdown.wait_for(|stop| *stop) => break,
                }
            }
        }
    }
    lock(&inner.active).remove(&saga.id);
    if saga.status.is_terminal() {
        let waiters = lock(&inner.waiters).remove(&saga.id).unwrap_or_default();
        for waiter in waiters {
            let _ = waiter.send(saga.clone());
        }
    }
}

/// One pass: runs steps until the saga ends or must wait.
async fn advance(inner: &Inner, saga: &mut SagaRecord) -> Next {
    let mut events = Vec::new();
    let Some(def) = inner.definition(&saga.definition) else {
        let now = inner.clock.now_ms();
        let reason = format!(
            "no saga definition named `{}` is registered with this orchestrator",
            saga.definition
        );
        return fail(inner, saga, &mut events, now, reason).await;
    };
    let ids_match = def.steps().len() == saga.steps.len()
        && def
            .steps()
            .iter()
            .zip(&saga.steps)
            .all(|(d, s)| d.id() == s.step_id);
    if !ids_match {
        let now = inner.clock.now_ms();
        let reason = format!(
            "the steps of definition `{}` no longer match the stored saga",
            saga.definition
        );
        return fail(inner, saga, &mut events, now, reason).await;
    }
    loop {
        if inner.is_shut_down() {
            return Next::Done;
        }
        let now = inner.clock.now_ms();
        match saga.status {
            SagaStatus::Completed | SagaStatus::Compensated | SagaStatus::Failed => {
                return Next::Done
            }
            SagaStatus::Pending => saga.status = SagaStatus::Running,
            SagaStatus::Running => {
                let Some(index) = saga
                    .steps
                    .iter()
                    .position(|s| s.status != StepStatus::Completed)
                else {
                    saga.status = SagaStatus::Completed;
                    saga.due_at_ms = None;
                    events.push(SagaEvent::new(now, SagaEventKind::Completed));
                    if inner.save(saga, &mut events).await {
                        inner.finish(saga, Outcome::Completed);
                    }
                    return Next::Done;
                };
                let Some(step_def) = def.step(index) else {
                    return Next::Done;
                };
                let step = &mut saga.steps[index];
                step.status = StepStatus::Running;
                step.attempts += 1;
                let attempt = step.attempts;
                events.push(
                    SagaEvent::new(now, SagaEventKind::ActionDispatched)
                        .step(step_def.id(), attempt),
                );
                saga.due_at_ms =
                    Some(now + millis(step_def.timeout) + millis(inner.config.lease_grace));
                if !inner.save(saga, &mut events).await {
                    return Next::Done;
                }
                let reply = inner
                    .dispatch(&def, saga, index, Phase::Action, attempt)
                    .await;
                let now = inner.clock.now_ms();
                let step = &mut saga.steps[index];
                match reply {
                    Ok(output) => {
                        step.status = StepStatus::Completed;
                        step.output = Some(output);
                        step.error = None;
                        events.push(
                            SagaEvent::new(now, SagaEventKind::ActionCompleted)
                                .step(step_def.id(), attempt),
                        );
                    }
                    Err(failure) if failure.stopped => return Next::Done,
                    Err(failure) => {
                        inner
                            .counters
                            .failure(&saga.definition, step_def.id(), Phase::Action);
                        step.error = Some(failure.error.clone());
                        events.push(
                            SagaEvent::new(now, SagaEventKind::ActionFailed)
                                .step(step_def.id(), attempt)
                                .detail(failure.error.clone()),
                        );
                        if failure.retryable && attempt < step_def.retry.max_attempts {
                            let due = now + millis(step_def.retry.backoff(attempt));
                            saga.due_at_ms = Some(due);
                            if !inner.save(saga, &mut events).await {
                                return Next::Done;
                            }
                            return Next::RetryAt(due);
                        }
                        if !failure.uncertain {
                            // It did not happen: nothing to compensate for this step.
                            step.status = StepStatus::Failed;
                        }
                        saga.status = SagaStatus::Compensating;
                        saga.error = Some(format!(
                            "step `{}` failed after {attempt} attempt(s): {}",
                            step_def.id(),
                            failure.error
                        ));
                        events.push(
                            SagaEvent::new(now, SagaEventKind::CompensationStarted)
                                .detail(failure.error),
                        );
                    }
                }
            }
            SagaStatus::Compensating => {
                let target = saga.steps.iter().rposition(|s| {
                    matches!(
                        s.status,
                        StepStatus::Completed | StepStatus::Running | StepStatus::Compensating
                    )
                });
                let Some(index) = target else {
                    saga.status = SagaStatus::Compensated;
                    saga.due_at_ms = None;
                    events.push(SagaEvent::new(now, SagaEventKind::Compensated));
                    if inner.save(saga, &mut events).await {
                        inner.finish(saga, Outcome::Compensated);
                    }
                    return Next::Done;
                };
                let Some(step_def) = def.step(index) else {
                    return Next::Done;
                };
                let step = &mut saga.steps[index];
                if step_def.compensation().is_none() {
                    // Nothing undoes this step.
                    step.status = StepStatus::Compensated;
                    continue;
                }
                step.status = StepStatus::Compensating;
                step.compensation_attempts += 1;
                let attempt = step.compensation_attempts;
                events.push(
                    SagaEvent::new(now, SagaEventKind::CompensationDispatched)
                        .step(step_def.id(), attempt),
                );
                saga.due_at_ms =
                    Some(now + millis(step_def.timeout) + millis(inner.config.lease_grace));
                if !inner.save(saga, &mut events).await {
                    return Next::Done;
                }
                let reply = inner
                    .dispatch(&def, saga, index, Phase::Compensation, attempt)
                    .await;
                let now = inner.clock.now_ms();
                let step = &mut saga.steps[index];
                match reply {
                    Ok(_) => {
                        step.status = StepStatus::Compensated;
                        inner
                            .counters
                            .compensated_step(&saga.definition, step_def.id());
                        events.push(
                            SagaEvent::new(now, SagaEventKind::CompensationCompleted)
                                .step(step_def.id(), attempt),
                        );
                    }
                    Err(failure) if failure.stopped => return Next::Done,
                    Err(failure) => {
                        inner.counters.failure(
                            &saga.definition,
                            step_def.id(),
                            Phase::Compensation,
                        );
                        step.error = Some(failure.error.clone());
                        events.push(
                            SagaEvent::new(now, SagaEventKind::CompensationFailed)
                                .step(step_def.id(), attempt)
                                .detail(failure.error.clone()),
                        );
                        // Compensations are retried whatever the error says:
                        // the saga cannot end consistent without them.
                        if attempt < step_def.compensation_retry.max_attempts {
                            let due = now + millis(step_def.compensation_retry.backoff(attempt));
                            saga.due_at_ms = Some(due);
                            if !inner.save(saga, &mut events).await {
                                return Next::Done;
                            }
                            return Next::RetryAt(due);
                        }
                        step.status = StepStatus::Failed;
                        let reason = format!(
                            "compensation `{}` of step `{}` failed after {attempt} attempt(s): {}",
                            step_def.compensation().unwrap_or_default(),
                            step_def.id(),
                            failure.error
                        );
                        return fail(inner, saga, &mut events, now, reason).await;
                    }
                }
            }
        }
    }
}

/// Ends `saga` FAILED with `reason`.
async fn fail(
    inner: &Inner,
    saga: &mut SagaRecord,
    events: &mut Vec<SagaEvent>,
    now: i64,
    reason: String,
) -> Next {
    saga.status = SagaStatus::Failed;
    saga.due_at_ms = None;
    let reason = match saga.error.take() {
        Some(cause) => format!("{reason} (while compensating: {cause})"),
        None => reason,
    };
    saga.error = Some(reason.clone());
    events.push(SagaEvent::new(now, SagaEventKind::Failed).detail(reason));
    if inner.save(saga, events).await {
        inner.finish(saga, Outcome::Failed);
    }
    Next::Done
}

/// Resumes due sagas (crash recovery, retries scheduled elsewhere, operator
/// retries) and counts stuck ones, until the orchestrator shuts down.
async fn poll(inner: Arc<Inner>) {
    let mut shutdown = inner.shutdown.subscribe();
    let mut last_stuck_check: Option<i64> = None;
    loop {
        tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => return,
            _ = tokio::time::sleep(inner.config.poll_interval) => {}
        }
        let now = inner.clock.now_ms();
        match inner.store.due(now, 256).await {
            Ok(due) => {
                for saga in due {
                    if inner.definition(&saga.definition).is_none() {
                        // Another orchestrator's saga: leave it to them.
                        continue;
                    }
                    if spawn_drive(&inner, saga) {
                        inner.counters.recovered();
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "looking for due sagas failed"),
        }
        let check_every = millis(inner.config.stuck_after / 4).max(1);
        if last_stuck_check.is_none_or(|at| now - at >= check_every) {
            last_stuck_check = Some(now);
            let query = SagaQuery {
                active_only: true,
                updated_before_ms: Some(now - millis(inner.config.stuck_after)),
                ..SagaQuery::default().limit(100_000)
            };
            match inner.store.list(&query).await {
                Ok(stuck) => inner.counters.stuck(stuck.len() as u64),
                Err(e) => tracing::warn!(error = %e, "counting stuck sagas failed"),
            }
        }
    }
}
