//! Participants whose effects are writes to their own SQLite database: the
//! effect and the step's stored result commit in one transaction, so a
//! participant killed at any point never repeats an effect.

use std::sync::Arc;

use busway_sqlite::{SqliteSagaStore, WriteError, WriteTx};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use super::participant::{completed, context, decode_stored, failed, fence, store_failure};
use super::wire::{Phase, StepCommand, StepReply};
use super::{SagaParticipant, StepContext};
use crate::bus::{Bus, SetupError};
use crate::handler::HandlerError;

impl SagaParticipant {
    /// A participant keeping its step results in `store` (a SQLite
    /// database), which can also run transactional handlers:
    /// [`on_action_in_transaction`](Self::on_action_in_transaction) and
    /// [`on_compensation_in_transaction`](Self::on_compensation_in_transaction).
    pub fn with_sqlite_store(
        bus: &Bus,
        service: impl Into<String>,
        store: SqliteSagaStore,
    ) -> Self {
        let mut participant = Self::new(bus, service, Arc::new(store.clone()));
        participant.sqlite = Some(store);
        participant
    }

    /// Runs `handler` for the action `action` inside a write transaction of
    /// the participant's SQLite database: what the handler writes through
    /// the [`WriteTx`] (its effect, and messages it publishes with
    /// [`WriteTx::publish`]) commits together with the step's result, or
    /// not at all. A participant killed before the commit runs the step
    /// again from scratch; one killed after it answers a replayed command
    /// with the stored result. So the effect happens exactly once.
    ///
    /// A [`HandlerError`] rolls the handler's writes back. The handler runs
    /// on the database's writer thread, between other writes: keep it to
    /// a few statements, with no waiting. Effects outside this database go
    /// in [`on_action`](Self::on_action) handlers, made idempotent with
    /// [`StepContext::idempotency_key`].
    ///
    /// Needs a participant made by [`with_sqlite_store`](Self::with_sqlite_store);
    /// any other fails with [`SetupError::NotTransactional`].
    ///
    /// ```
    /// use busway::saga::{SagaParticipant, StepContext};
    /// use busway::sqlite::{SqliteSagaStore, SqliteTransport, WriteTx};
    /// use busway::{Bus, HandlerError};
    /// use std::sync::Arc;
    ///
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// let dir = tempfile::tempdir()?;
    /// let transport = SqliteTransport::open(dir.path().join("inventory.db"))?;
    /// let store = SqliteSagaStore::open(transport.clone()).await?;
    /// transport.write(|tx| {
    ///     tx.connection().execute_batch("CREATE TABLE reservations (saga_id TEXT PRIMARY KEY, quantity INTEGER)")?;
    ///     Ok::<_, busway::sqlite::WriteError>(())
    /// }).await?;
    /// let bus = Bus::new(Arc::new(transport));
    /// let inventory = SagaParticipant::with_sqlite_store(&bus, "inventory_service", store);
    /// inventory
    ///     .on_action_in_transaction("reserve_inventory", |ctx: &StepContext<serde_json::Value>, tx: &mut WriteTx<'_>| {
    ///         tx.connection()
    ///             .execute(
    ///                 "INSERT INTO reservations (saga_id, quantity) VALUES (?1, ?2)",
    ///                 (ctx.saga_id(), ctx.input["quantity"].as_i64()),
    ///             )
    ///             .map_err(|e| HandlerError::new(e.to_string()))?;
    ///         Ok(serde_json::json!({"reserved": true}))
    ///     })
    ///     .await?;
    /// # bus.shutdown().await;
    /// # Ok(())
    /// # }
    /// # tokio::runtime::Runtime::new().unwrap().block_on(run()).unwrap();
    /// ```
    pub async fn on_action_in_transaction<I, R, F>(
        &self,
        action: &str,
        handler: F,
    ) -> Result<(), SetupError>
    where
        I: DeserializeOwned + Send + 'static,
        R: Serialize + Send + 'static,
        F: Fn(&StepContext<I>, &mut WriteTx<'_>) -> Result<R, HandlerError> + Send + Sync + 'static,
    {
        self.register_transactional(action, Phase::Action, handler)
            .await
    }

    /// Runs `handler` for the compensation `compensation` inside a write
    /// transaction, like [`on_action_in_transaction`](Self::on_action_in_transaction).
    /// A compensation that arrives before its action ever completed fences
    /// the action off in the same transaction and succeeds without running.
    pub async fn on_compensation_in_transaction<I, R, F>(
        &self,
        compensation: &str,
        handler: F,
    ) -> Result<(), SetupError>
    where
        I: DeserializeOwned + Send + 'static,
        R: Serialize + Send + 'static,
        F: Fn(&StepContext<I>, &mut WriteTx<'_>) -> Result<R, HandlerError> + Send + Sync + 'static,
    {
        self.register_transactional(compensation, Phase::Compensation, handler)
            .await
    }

    async fn register_transactional<I, R, F>(
        &self,
        name: &str,
        phase: Phase,
        handler: F,
    ) -> Result<(), SetupError>
    where
        I: DeserializeOwned + Send + 'static,
        R: Serialize + Send + 'static,
        F: Fn(&StepContext<I>, &mut WriteTx<'_>) -> Result<R, HandlerError> + Send + Sync + 'static,
    {
        let Some(store) = self.sqlite.clone() else {
            return Err(SetupError::NotTransactional {
                service: self.service.clone(),
            });
        };
        let handler = Arc::new(handler);
        self.serve(name, phase, move |name, command| {
            let store = store.clone();
            let handler = handler.clone();
            async move { run_in_transaction(&store, name, command, handler).await }
        })
        .await
    }
}

/// Why a transactional step's job stopped before committing: its savepoint
/// (the handler's writes included) is rolled back.
enum Abort {
    Write(WriteError),
    Reply(StepReply),
}

impl From<WriteError> for Abort {
    fn from(e: WriteError) -> Self {
        Abort::Write(e)
    }
}

impl From<busway_sqlite::rusqlite::Error> for Abort {
    fn from(e: busway_sqlite::rusqlite::Error) -> Self {
        Abort::Write(WriteError::from(e))
    }
}

fn encode(reply: &StepReply) -> Result<String, Abort> {
    serde_json::to_string(reply).map_err(|e| {
        Abort::Reply(StepReply::Failed {
            error: format!("encoding the step result failed: {e}"),
            retryable: false,
        })
    })
}

/// Checks for a stored result, runs the handler and stores its result, all
/// in one job of the writer: one transaction.
async fn run_in_transaction<I, R, F>(
    store: &SqliteSagaStore,
    name: String,
    command: StepCommand,
    handler: Arc<F>,
) -> StepReply
where
    I: DeserializeOwned + Send + 'static,
    R: Serialize + Send + 'static,
    F: Fn(&StepContext<I>, &mut WriteTx<'_>) -> Result<R, HandlerError> + Send + Sync + 'static,
{
    let outcome = store
        .transport()
        .write(move |tx| {
            let key = command.idempotency_key.clone();
            if let Some(stored) = SqliteSagaStore::step_result_in(tx, &key)? {
                return Ok(stored);
            }
            if command.phase == Phase::Compensation {
                let fence = encode(&fence())?;
                let stored = SqliteSagaStore::save_step_result_in(tx, &command.action_key, &fence)?;
                if stored == fence {
                    // The action never ran and now never will: nothing to undo.
                    let done = encode(&StepReply::Completed {
                        output: Value::Null,
                    })?;
                    return Ok(SqliteSagaStore::save_step_result_in(tx, &key, &done)?);
                }
            }
            let context = context::<I>(&name, command).map_err(Abort::Reply)?;
            let reply = match handler(&context, tx) {
                Ok(output) => completed(&name, output),
                Err(e) => return Err(Abort::Reply(failed(&e))),
            };
            if matches!(reply, StepReply::Failed { .. }) {
                return Err(Abort::Reply(reply));
            }
            Ok(SqliteSagaStore::save_step_result_in(
                tx,
                &key,
                &encode(&reply)?,
            )?)
        })
        .await;
    match outcome {
        Ok(stored) => match serde_json::from_str(&stored) {
            Ok(stored) => decode_stored(stored),
            Err(e) => StepReply::Failed {
                error: format!("the stored step result cannot be read: {e}"),
                retryable: false,
            },
        },
        Err(Abort::Reply(reply)) => reply,
        Err(Abort::Write(e)) => store_failure(&e),
    }
}
