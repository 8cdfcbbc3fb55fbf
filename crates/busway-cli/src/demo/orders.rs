//! `order_service` and the order saga: create the order, reserve the
//! inventory, charge the payment; on a failure, undo in reverse order.
//!
//! The failure rules are the reference example's
//! (`crates/busway/examples/order_saga.rs`): an order id starting with
//! `existing_order` exists already, a quantity above 100 is out of stock, an
//! amount above 10000 exceeds the payment limit. The steps run on services
//! of their own (`order_records`, `inventory_service`, `payment_service`):
//! `order_service` is the client-facing RPC service whose `create_order`
//! starts the saga.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use busway::saga::{
    DefinitionError, SagaDefinition, SagaOrchestrator, SagaParticipant, SagaQueryError, SagaStep,
    StartSagaError, StepContext,
};
use busway::saga_store::{SagaQuery, SagaStatus, SagaStore};
use busway::sqlite::{SqliteTransport, WriteError};
use busway::{Bus, Event, HandlerError, RetryPolicy, SetupError};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::services::{bump, lock, DemoState};

/// The saga's name.
pub(crate) const ORDER_SAGA: &str = "order_saga";
/// The service running the `create_order` / `cancel_order` steps.
const ORDER_RECORDS: &str = "order_records";

/// One line of an order.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Item {
    pub(crate) id: String,
    pub(crate) quantity: u32,
}

/// `create_order` params, and the saga's input.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct OrderInput {
    pub(crate) order_id: String,
    pub(crate) user_id: String,
    pub(crate) items: Vec<Item>,
    pub(crate) amount: f64,
}

#[derive(Deserialize)]
struct GetOrder {
    order_id: String,
}

/// The saga of order `order_id`.
pub(crate) fn saga_id(order_id: &str) -> String {
    format!("order_saga_{order_id}")
}

/// The reference status name: `COMPLETED`, `COMPENSATED`, `RUNNING`, …
pub(crate) fn status_name(status: SagaStatus) -> String {
    status.as_str().to_uppercase()
}

fn definition() -> Result<SagaDefinition, DefinitionError> {
    let retry = RetryPolicy::default()
        .with_max_attempts(4)
        .with_backoff(Duration::from_millis(100), Duration::from_secs(2));
    let step = |id: &str, service: &str, compensation: &str| {
        SagaStep::new(id, service, id)
            .compensate_with(compensation)
            .timeout(Duration::from_secs(10))
            .retry(retry.clone())
            .compensation_retry(retry.clone().with_max_attempts(10))
    };
    SagaDefinition::builder(ORDER_SAGA)
        .step(step("create_order", ORDER_RECORDS, "cancel_order"))
        .step(step(
            "reserve_inventory",
            "inventory_service",
            "release_inventory",
        ))
        .step(step("charge_payment", "payment_service", "refund_payment"))
        .build()
}

/// Registers the participants, the orchestrator and `order_service`;
/// resumes watching the orders whose saga is still running.
pub(crate) async fn start(
    bus: &Bus,
    store: Arc<dyn SagaStore>,
    db: &SqliteTransport,
    state: &Arc<DemoState>,
) -> anyhow::Result<SagaOrchestrator> {
    db.write(|tx| {
        tx.connection().execute_batch(ANNOUNCED_SCHEMA)?;
        Ok::<_, WriteError>(())
    })
    .await?;
    register_participants(bus, store.clone()).await?;
    let orchestrator = SagaOrchestrator::new(bus.clone(), store);
    orchestrator.register(definition()?)?;
    let watcher = Arc::new(Watcher {
        orchestrator: orchestrator.clone(),
        bus: bus.clone(),
        state: state.clone(),
        db: db.clone(),
    });
    let w = watcher.clone();
    bus.register_request_handler("order_service", "create_order", move |input: OrderInput| {
        let (watcher, orchestrator, state) = (w.clone(), w.orchestrator.clone(), w.state.clone());
        async move {
            if input.items.is_empty() {
                return Err(HandlerError::permanent("an order needs at least one item"));
            }
            let saga_id = saga_id(&input.order_id);
            match orchestrator.start(ORDER_SAGA, &saga_id, &input).await {
                Ok(()) => {}
                Err(StartSagaError::AlreadyExists(_)) => {
                    return Err(HandlerError::permanent(format!(
                        "order {} already exists",
                        input.order_id
                    )))
                }
                Err(e) if e.is_retryable() => return Err(HandlerError::new(e.to_string())),
                Err(e) => return Err(HandlerError::permanent(e.to_string())),
            }
            bump(&state.orders_created);
            watcher.watch(saga_id.clone());
            Ok(json!({"saga_id": saga_id, "order_id": input.order_id, "status": "RUNNING"}))
        }
    })
    .await?;
    let o = orchestrator.clone();
    bus.register_request_handler("order_service", "get_order", move |q: GetOrder| {
        let orchestrator = o.clone();
        async move {
            let saga_id = saga_id(&q.order_id);
            match orchestrator.show(&saga_id).await {
                Ok(details) => Ok(json!({
                    "order_id": q.order_id,
                    "saga_id": saga_id,
                    "status": status_name(details.saga.status),
                    "error": details.saga.error,
                    "steps": details.saga.steps.iter().map(|s| json!({
                        "step_id": s.step_id, "status": s.status.as_str(),
                    })).collect::<Vec<_>>(),
                })),
                Err(SagaQueryError::NotFound(_)) => Err(HandlerError::permanent("order not found")),
                Err(e) => Err(HandlerError::new(e.to_string())),
            }
        }
    })
    .await?;
    // Orders whose saga was still running when the last process stopped
    // resume and are announced when they end; orders whose saga ended
    // unannounced (the process stopped in between) are announced now.
    let announced: HashSet<String> = db
        .read(|conn| {
            conn.prepare("SELECT saga_id FROM demo_order_announced")?
                .query_map([], |r| r.get(0))?
                .collect()
        })
        .await?;
    let mut ended = Vec::new();
    for status in [
        SagaStatus::Completed,
        SagaStatus::Compensated,
        SagaStatus::Failed,
    ] {
        ended.extend(
            orchestrator
                .list(&SagaQuery::status(status).limit(1_000_000))
                .await?,
        );
    }
    let active = SagaQuery {
        active_only: true,
        limit: 1_000_000,
        ..SagaQuery::default()
    };
    ended.extend(orchestrator.list(&active).await?);
    for saga in ended {
        if saga.definition == ORDER_SAGA && !announced.contains(&saga.id) {
            watcher.watch(saga.id);
        }
    }
    Ok(orchestrator)
}

const ANNOUNCED_SCHEMA: &str = "CREATE TABLE IF NOT EXISTS demo_order_announced (
    saga_id TEXT PRIMARY KEY, event_type TEXT NOT NULL)";

/// Announces the end of order sagas.
struct Watcher {
    orchestrator: SagaOrchestrator,
    bus: Bus,
    state: Arc<DemoState>,
    /// Table `demo_order_announced`: the sagas whose end was published.
    db: SqliteTransport,
}

impl Watcher {
    /// Waits (in a task that [`System::stop`](super::services::System::stop)
    /// joins) for the saga to end, publishes `order.shipped` (COMPLETED) or
    /// `order.cancelled` (COMPENSATED), counts it and records it as announced.
    fn watch(self: &Arc<Self>, saga_id: String) {
        let this = self.clone();
        let mut watchers = lock(&self.state.watchers);
        while watchers.try_join_next().is_some() {}
        watchers.spawn(async move {
            if let Err(e) = this.announce(&saga_id).await {
                eprintln!("order saga {saga_id}: {e:#}");
            }
        });
    }

    async fn announce(&self, saga_id: &str) -> anyhow::Result<()> {
        let saga = match self.orchestrator.wait(saga_id).await {
            Ok(saga) => saga,
            // Announced at the next start.
            Err(SagaQueryError::ShutDown) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        let input: OrderInput = serde_json::from_value(saga.input.clone())?;
        let data = json!({
            "order_id": input.order_id,
            "user_id": input.user_id,
            "amount": input.amount,
            "saga_id": saga_id,
            "reason": saga.error,
        });
        let (event_type, counter) = match saga.status {
            SagaStatus::Completed => ("order.shipped", &self.state.orders_completed),
            SagaStatus::Compensated => ("order.cancelled", &self.state.orders_compensated),
            _ => ("order.failed", &self.state.orders_failed),
        };
        self.bus
            .publish_event(&Event::new(event_type, input.order_id.clone(), data))
            .await?;
        bump(counter);
        let saga_id = saga_id.to_owned();
        self.db
            .write(move |tx| {
                tx.connection().execute(
                    "INSERT OR IGNORE INTO demo_order_announced (saga_id, event_type) VALUES (?1, ?2)",
                    [saga_id.as_str(), event_type],
                )?;
                Ok::<_, WriteError>(())
            })
            .await?;
        Ok(())
    }
}

async fn publish(bus: &Bus, event_type: &str, input: &OrderInput) -> Result<(), HandlerError> {
    let data = json!({
        "order_id": input.order_id,
        "user_id": input.user_id,
        "items": input.items,
        "amount": input.amount,
    });
    bus.publish_event(&Event::new(event_type, input.order_id.clone(), data))
        .await?;
    Ok(())
}

async fn register_participants(bus: &Bus, store: Arc<dyn SagaStore>) -> Result<(), SetupError> {
    let orders = SagaParticipant::new(bus, ORDER_RECORDS, store.clone()).concurrency(16);
    let b = bus.clone();
    orders
        .register_action_handler("create_order", move |ctx: StepContext<OrderInput>| {
            let bus = b.clone();
            async move {
                let order = ctx.input;
                if order.order_id.starts_with("existing_order") {
                    return Err(HandlerError::permanent(format!(
                        "order {} already exists",
                        order.order_id
                    )));
                }
                publish(&bus, "order.created", &order).await?;
                Ok(json!({ "order_id": order.order_id }))
            }
        })
        .await?;
    orders
        .register_compensate_handler("cancel_order", |_ctx: StepContext<OrderInput>| async {
            Ok(())
        })
        .await?;

    let inventory = SagaParticipant::new(bus, "inventory_service", store.clone()).concurrency(16);
    inventory
        .register_action_handler(
            "reserve_inventory",
            |ctx: StepContext<OrderInput>| async move {
                if let Some(item) = ctx.input.items.iter().find(|i| i.quantity > 100) {
                    return Err(HandlerError::permanent(format!(
                        "item {} is out of stock",
                        item.id
                    )));
                }
                Ok(json!({ "reserved": ctx.input.items.len() }))
            },
        )
        .await?;
    inventory
        .register_compensate_handler("release_inventory", |_ctx: StepContext<OrderInput>| async {
            Ok(())
        })
        .await?;

    let payments = SagaParticipant::new(bus, "payment_service", store).concurrency(16);
    let b = bus.clone();
    payments
        .register_action_handler("charge_payment", move |ctx: StepContext<OrderInput>| {
            let bus = b.clone();
            async move {
                if ctx.input.amount > 10_000.0 {
                    return Err(HandlerError::permanent(format!(
                        "amount {} exceeds the payment limit",
                        ctx.input.amount
                    )));
                }
                publish(&bus, "order.paid", &ctx.input).await?;
                Ok(json!({ "charged": ctx.input.amount }))
            }
        })
        .await?;
    payments
        .register_compensate_handler("refund_payment", |_ctx: StepContext<OrderInput>| async {
            Ok(())
        })
        .await?;
    Ok(())
}
