//! The participant side: services that run saga steps.

use std::collections::BTreeMap;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use busway_core::saga_store::SagaStore;
use futures::FutureExt;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::Mutex;
use tracing::Instrument;

use super::wire::{Phase, StepCommand, StepReply};
use crate::bus::{Bus, SetupError};
use crate::handler::{panic_message, HandlerError};

/// What a step handler is given: the saga's input, decoded as `I`, and the
/// outputs of the steps completed before it (for a compensation: including
/// its own step's output).
#[derive(Clone, Debug)]
pub struct StepContext<I> {
    saga_id: String,
    saga: String,
    step_id: String,
    attempt: u32,
    idempotency_key: String,
    outputs: BTreeMap<String, Value>,
    /// The data the saga was started with.
    pub input: I,
}

impl<I> StepContext<I> {
    /// The saga's id.
    pub fn saga_id(&self) -> &str {
        &self.saga_id
    }
    /// The saga definition's name.
    pub fn saga(&self) -> &str {
        &self.saga
    }
    /// The step's id.
    pub fn step_id(&self) -> &str {
        &self.step_id
    }
    /// Which attempt this is (1 on the first).
    pub fn attempt(&self) -> u32 {
        self.attempt
    }
    /// The same for every replay of this command: use it to make external
    /// calls idempotent too.
    pub fn idempotency_key(&self) -> &str {
        &self.idempotency_key
    }
    /// Every output so far, as JSON, by step id.
    pub fn outputs(&self) -> &BTreeMap<String, Value> {
        &self.outputs
    }
    /// The output of step `step_id`, decoded as `T`. A missing or
    /// undecodable output is a permanent failure (no retry can fix it).
    pub fn output<T: DeserializeOwned>(&self, step_id: &str) -> Result<T, HandlerError> {
        let value = self.outputs.get(step_id).ok_or_else(|| {
            HandlerError::permanent(format!("step `{step_id}` has no output in this saga"))
        })?;
        T::deserialize(value).map_err(|e| {
            HandlerError::permanent(format!(
                "the output of step `{step_id}` does not decode: {e}"
            ))
        })
    }
}

const LOCK_STRIPES: usize = 64;

/// A service that runs saga steps: its action and compensation handlers are
/// served over the bus (as RPC methods of the service, in the reference
/// format), and every result is stored by idempotency key so that a step
/// command delivered again (after a timeout, or by an orchestrator that
/// restarted) returns the stored result instead of running again.
///
/// A compensation that arrives before its action ever completed fences the
/// action off: the action, if it arrives later, fails without running, and
/// the compensation succeeds without running (there is nothing to undo).
///
/// ```
/// use busway::saga::{SagaParticipant, StepContext};
/// use busway::{Bus, HandlerError};
/// use busway::memory::MemorySagaStore;
/// use serde::Deserialize;
/// use std::sync::Arc;
///
/// #[derive(Deserialize)]
/// struct Order { order_id: String }
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let bus = Bus::connect("memory://").await?;
/// let orders = SagaParticipant::new(&bus, "order_service", Arc::new(MemorySagaStore::new()));
/// orders.on_action("create_order", |ctx: StepContext<Order>| async move {
///     if ctx.input.order_id == "existing_order" {
///         return Err(HandlerError::permanent("order exists already"));
///     }
///     Ok(serde_json::json!({"order_id": ctx.input.order_id}))
/// }).await?;
/// orders.on_compensation("cancel_order", |_ctx: StepContext<Order>| async move { Ok(()) }).await?;
/// # Ok(())
/// # }
/// # tokio::runtime::Runtime::new().unwrap().block_on(run()).unwrap();
/// ```
#[derive(Clone)]
pub struct SagaParticipant {
    bus: Bus,
    pub(super) service: String,
    store: Arc<dyn SagaStore>,
    /// Set by [`with_sqlite_store`](Self::with_sqlite_store): the database
    /// transactional handlers write their effects to.
    #[cfg(feature = "sqlite")]
    pub(super) sqlite: Option<busway_sqlite::SqliteSagaStore>,
    locks: Arc<Vec<Mutex<()>>>,
    concurrency: usize,
}

impl std::fmt::Debug for SagaParticipant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SagaParticipant")
            .field("service", &self.service)
            .finish_non_exhaustive()
    }
}

impl SagaParticipant {
    /// The participant `service` on `bus`, keeping step results in `store`.
    pub fn new(bus: &Bus, service: impl Into<String>, store: Arc<dyn SagaStore>) -> Self {
        Self {
            bus: bus.clone(),
            service: service.into(),
            store,
            #[cfg(feature = "sqlite")]
            sqlite: None,
            locks: Arc::new((0..LOCK_STRIPES).map(|_| Mutex::new(())).collect()),
            concurrency: crate::rpc::DEFAULT_RPC_CONCURRENCY,
        }
    }

    /// How many step commands the service runs at once (default
    /// [`DEFAULT_RPC_CONCURRENCY`](crate::rpc::DEFAULT_RPC_CONCURRENCY)).
    /// Takes effect when the service's first handler is registered.
    pub fn concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = concurrency.max(1);
        self
    }

    /// The service name.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// Runs `handler` for the action `action`. Its output (any `Serialize`)
    /// is stored and fed to later steps. A [`HandlerError`] fails the
    /// attempt: retried if [`retryable`](HandlerError::is_retryable), else
    /// the saga starts compensating at once.
    pub async fn on_action<I, R, F, Fut>(&self, action: &str, handler: F) -> Result<(), SetupError>
    where
        I: DeserializeOwned + Send + 'static,
        R: Serialize + Send + 'static,
        F: Fn(StepContext<I>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, HandlerError>> + Send + 'static,
    {
        self.register(action, Phase::Action, handler).await
    }

    /// Runs `handler` for the compensation `compensation`.
    pub async fn on_compensation<I, R, F, Fut>(
        &self,
        compensation: &str,
        handler: F,
    ) -> Result<(), SetupError>
    where
        I: DeserializeOwned + Send + 'static,
        R: Serialize + Send + 'static,
        F: Fn(StepContext<I>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, HandlerError>> + Send + 'static,
    {
        self.register(compensation, Phase::Compensation, handler)
            .await
    }

    /// The reference name for [`on_action`](Self::on_action).
    pub async fn register_action_handler<I, R, F, Fut>(
        &self,
        action: &str,
        handler: F,
    ) -> Result<(), SetupError>
    where
        I: DeserializeOwned + Send + 'static,
        R: Serialize + Send + 'static,
        F: Fn(StepContext<I>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, HandlerError>> + Send + 'static,
    {
        self.on_action(action, handler).await
    }

    /// The reference name for [`on_compensation`](Self::on_compensation).
    pub async fn register_compensate_handler<I, R, F, Fut>(
        &self,
        compensation: &str,
        handler: F,
    ) -> Result<(), SetupError>
    where
        I: DeserializeOwned + Send + 'static,
        R: Serialize + Send + 'static,
        F: Fn(StepContext<I>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, HandlerError>> + Send + 'static,
    {
        self.on_compensation(compensation, handler).await
    }

    async fn register<I, R, F, Fut>(
        &self,
        name: &str,
        phase: Phase,
        handler: F,
    ) -> Result<(), SetupError>
    where
        I: DeserializeOwned + Send + 'static,
        R: Serialize + Send + 'static,
        F: Fn(StepContext<I>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, HandlerError>> + Send + 'static,
    {
        let handler = Arc::new(handler);
        let participant = self.clone();
        self.serve(name, phase, move |name, command| {
            let participant = participant.clone();
            let handler = handler.clone();
            async move { participant.run(&name, command, handler.as_ref()).await }
        })
        .await
    }

    /// Serves `name` as this service's `phase` handler: `run` answers each
    /// command of that phase (given the handler's name); a command of the
    /// other phase is refused.
    pub(super) async fn serve<F, Fut>(
        &self,
        name: &str,
        phase: Phase,
        run: F,
    ) -> Result<(), SetupError>
    where
        F: Fn(String, StepCommand) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = StepReply> + Send + 'static,
    {
        let run = Arc::new(run);
        let name_owned = name.to_owned();
        self.bus
            .register_request_handler(&self.service, name, move |command: StepCommand| {
                let run = run.clone();
                let name = name_owned.clone();
                let span = crate::trace::saga_step_span(
                    &command.saga_id,
                    &command.saga,
                    &command.step_id,
                    command.phase.as_str(),
                    command.attempt,
                );
                async move {
                    let reply = if command.phase == phase {
                        run(name, command).await
                    } else {
                        wrong_phase(&name, phase, command.phase)
                    };
                    if matches!(reply, StepReply::Failed { .. }) {
                        crate::trace::record_error(&tracing::Span::current());
                    }
                    Ok::<_, HandlerError>(reply)
                }
                .instrument(span)
            })
            .concurrency(self.concurrency)
            .await
    }

    fn lock_for(&self, key: &str) -> &Mutex<()> {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut hasher);
        let stripe = usize::try_from(hasher.finish() % LOCK_STRIPES as u64).unwrap_or(0);
        &self.locks[stripe]
    }

    /// Runs one command with deduplication: never fails, every problem is a
    /// [`StepReply::Failed`].
    async fn run<I, R, F, Fut>(&self, name: &str, command: StepCommand, handler: &F) -> StepReply
    where
        I: DeserializeOwned,
        R: Serialize,
        F: Fn(StepContext<I>) -> Fut,
        Fut: Future<Output = Result<R, HandlerError>>,
    {
        // One lock for both halves of a step, so an action and its
        // compensation never run at once in this process.
        let _guard = self.lock_for(&command.action_key).lock().await;
        let key = command.idempotency_key.clone();
        match self.store.step_result(&key).await {
            Ok(Some(stored)) => return decode_stored(stored),
            Ok(None) => {}
            Err(e) => return store_failure(&e),
        }
        if command.phase == Phase::Compensation {
            // Fence the action off; if it never completed, there is nothing to undo.
            let fence = serde_json::to_value(fence()).unwrap_or(Value::Null);
            match self
                .store
                .save_step_result(&command.action_key, &fence)
                .await
            {
                Ok(stored) if stored == fence => {
                    return self
                        .save(
                            &key,
                            StepReply::Completed {
                                output: Value::Null,
                            },
                        )
                        .await;
                }
                Ok(_) => {}
                Err(e) => return store_failure(&e),
            }
        }
        let context = match context(name, command) {
            Ok(context) => context,
            Err(reply) => return reply,
        };
        let outcome = AssertUnwindSafe(handler(context)).catch_unwind().await;
        let reply = match outcome {
            Ok(Ok(output)) => completed(name, output),
            Ok(Err(e)) => return failed(&e),
            Err(panic) => {
                return StepReply::Failed {
                    error: panic_message(panic.as_ref()),
                    retryable: true,
                }
            }
        };
        self.save(&key, reply).await
    }

    /// Stores a completed result; returns the stored one (the first wins).
    async fn save(&self, key: &str, reply: StepReply) -> StepReply {
        let value = match serde_json::to_value(&reply) {
            Ok(value) => value,
            Err(e) => {
                return StepReply::Failed {
                    error: format!("encoding the step result failed: {e}"),
                    retryable: false,
                }
            }
        };
        match self.store.save_step_result(key, &value).await {
            Ok(stored) => decode_stored(stored),
            Err(e) => store_failure(&e),
        }
    }
}

/// The context a handler of `name` is given for `command`, or the failure
/// to answer when the saga's input does not fit the handler.
pub(super) fn context<I: DeserializeOwned>(
    name: &str,
    command: StepCommand,
) -> Result<StepContext<I>, StepReply> {
    let input = I::deserialize(&command.input).map_err(|e| StepReply::Failed {
        error: format!("the saga input does not fit `{name}`: {e}"),
        retryable: false,
    })?;
    Ok(StepContext {
        saga_id: command.saga_id,
        saga: command.saga,
        step_id: command.step_id,
        attempt: command.attempt,
        idempotency_key: command.idempotency_key,
        outputs: command.outputs,
        input,
    })
}

/// The reply for a handler of `name` that returned `output`.
pub(super) fn completed(name: &str, output: impl Serialize) -> StepReply {
    match serde_json::to_value(output) {
        Ok(output) => StepReply::Completed { output },
        Err(e) => StepReply::Failed {
            error: format!("the output of `{name}` could not be encoded: {e}"),
            retryable: false,
        },
    }
}

/// The reply for a handler that failed with `e` (not stored: a retry runs it again).
pub(super) fn failed(e: &HandlerError) -> StepReply {
    StepReply::Failed {
        error: e.message().to_owned(),
        retryable: e.is_retryable(),
    }
}

/// The reply when a command of `called` reaches a handler of `phase`.
fn wrong_phase(name: &str, phase: Phase, called: Phase) -> StepReply {
    StepReply::Failed {
        error: format!(
            "`{name}` is a {} handler, called as a {}",
            phase.as_str(),
            called.as_str()
        ),
        retryable: false,
    }
}

/// The result a compensation stores under its action's key when it arrives
/// first: the action, if it arrives later, fails without running.
pub(super) fn fence() -> StepReply {
    StepReply::Failed {
        error: "the step was compensated before its action ran".into(),
        retryable: false,
    }
}

pub(super) fn decode_stored(stored: Value) -> StepReply {
    serde_json::from_value(stored).unwrap_or_else(|e| StepReply::Failed {
        error: format!("the stored step result cannot be read: {e}"),
        retryable: false,
    })
}

pub(super) fn store_failure(e: &dyn std::error::Error) -> StepReply {
    StepReply::Failed {
        error: format!("the participant's saga store failed: {e}"),
        retryable: true,
    }
}
