//! The reference order saga: create the order, reserve the inventory, charge
//! the payment; on a failure, undo what was done in reverse order.
//!
//! ```text
//! cargo run -p busway --example order_saga                    # in memory
//! cargo run -p busway --example order_saga -- sqlite://orders.db
//! ```
//!
//! Three participant services (`order_service`, `inventory_service`,
//! `payment_service`) apply the reference failure rules: order id
//! `existing_order` exists already, a quantity above 100 is out of stock, an
//! amount above 10000 exceeds the payment limit. The domain (participants,
//! definition, ledger) is reusable: `register_participants` and
//! `order_saga_definition`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use busway::saga::{
    DefinitionError, SagaDefinition, SagaOrchestrator, SagaParticipant, SagaStep, StepContext,
};
use busway::saga_store::SagaStore;
use busway::{Bus, HandlerError, RetryPolicy, SetupError};
use serde::{Deserialize, Serialize};

/// The saga's name.
pub const ORDER_SAGA: &str = "order_saga";

/// One line of an order.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Item {
    /// The product.
    pub id: String,
    /// How many.
    pub quantity: u32,
}

/// What an order saga is started with.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OrderInput {
    /// The order's id.
    pub order_id: String,
    /// What is ordered.
    pub items: Vec<Item>,
    /// What is charged.
    pub amount: f64,
}

impl OrderInput {
    /// The reference example: order_123, 5 × item1, 299.99.
    pub fn example(order_id: &str) -> Self {
        Self {
            order_id: order_id.to_owned(),
            items: vec![Item {
                id: "item1".into(),
                quantity: 5,
            }],
            amount: 299.99,
        }
    }
}

/// Effects applied by the participants, counted per order, so a test can
/// check that every effect happened once and was undone when it should be.
#[derive(Debug, Default)]
pub struct Ledger {
    /// `(effect, order_id)` → how many times it was applied.
    pub effects: BTreeMap<(String, String), u32>,
}

impl Ledger {
    /// How many times `effect` (`"create_order"`, `"refund_payment"`, …) ran for `order_id`.
    pub fn count(&self, effect: &str, order_id: &str) -> u32 {
        self.effects
            .get(&(effect.to_owned(), order_id.to_owned()))
            .copied()
            .unwrap_or(0)
    }
}

/// The shared ledger of the three services.
pub type SharedLedger = Arc<Mutex<Ledger>>;

fn record(ledger: &SharedLedger, effect: &str, order_id: &str) {
    let mut ledger = ledger.lock().unwrap_or_else(|e| e.into_inner());
    *ledger
        .effects
        .entry((effect.to_owned(), order_id.to_owned()))
        .or_insert(0) += 1;
}

/// The order saga: three steps, each with its compensation.
pub fn order_saga_definition(timeout: Duration) -> Result<SagaDefinition, DefinitionError> {
    let retry = RetryPolicy::default()
        .with_max_attempts(4)
        .with_backoff(Duration::from_millis(100), Duration::from_secs(5));
    let step = |id: &str, service: &str, compensation: &str| {
        SagaStep::new(id, service, id)
            .compensate_with(compensation)
            .timeout(timeout)
            .retry(retry.clone())
            .compensation_retry(retry.clone().with_max_attempts(10))
    };
    SagaDefinition::builder(ORDER_SAGA)
        .step(step("create_order", "order_service", "cancel_order"))
        .step(step(
            "reserve_inventory",
            "inventory_service",
            "release_inventory",
        ))
        .step(step("charge_payment", "payment_service", "refund_payment"))
        .build()
}

/// Registers the three participant services on `bus`, recording their
/// effects in `ledger`.
pub async fn register_participants(
    bus: &Bus,
    store: Arc<dyn SagaStore>,
    ledger: SharedLedger,
    concurrency: usize,
) -> Result<(), SetupError> {
    let orders = SagaParticipant::new(bus, "order_service", store.clone()).concurrency(concurrency);
    let l = ledger.clone();
    orders
        .register_action_handler("create_order", move |ctx: StepContext<OrderInput>| {
            let l = l.clone();
            async move {
                let order_id = ctx.input.order_id;
                if order_id == "existing_order" {
                    return Err(HandlerError::permanent(format!(
                        "order {order_id} already exists"
                    )));
                }
                record(&l, "create_order", &order_id);
                Ok(serde_json::json!({ "order_id": order_id }))
            }
        })
        .await?;
    let l = ledger.clone();
    orders
        .register_compensate_handler("cancel_order", move |ctx: StepContext<OrderInput>| {
            let l = l.clone();
            async move {
                record(&l, "cancel_order", &ctx.input.order_id);
                Ok(())
            }
        })
        .await?;

    let inventory =
        SagaParticipant::new(bus, "inventory_service", store.clone()).concurrency(concurrency);
    let l = ledger.clone();
    inventory
        .register_action_handler("reserve_inventory", move |ctx: StepContext<OrderInput>| {
            let l = l.clone();
            async move {
                if let Some(item) = ctx.input.items.iter().find(|i| i.quantity > 100) {
                    return Err(HandlerError::permanent(format!(
                        "item {} is out of stock",
                        item.id
                    )));
                }
                record(&l, "reserve_inventory", &ctx.input.order_id);
                Ok(serde_json::json!({ "reserved": ctx.input.items.len() }))
            }
        })
        .await?;
    let l = ledger.clone();
    inventory
        .register_compensate_handler("release_inventory", move |ctx: StepContext<OrderInput>| {
            let l = l.clone();
            async move {
                record(&l, "release_inventory", &ctx.input.order_id);
                Ok(())
            }
        })
        .await?;

    let payments = SagaParticipant::new(bus, "payment_service", store).concurrency(concurrency);
    let l = ledger.clone();
    payments
        .register_action_handler("charge_payment", move |ctx: StepContext<OrderInput>| {
            let l = l.clone();
            async move {
                // The order id comes from the output of the first step.
                let order: serde_json::Value = ctx.output("create_order")?;
                if ctx.input.amount > 10_000.0 {
                    return Err(HandlerError::permanent(format!(
                        "amount {} exceeds the payment limit",
                        ctx.input.amount
                    )));
                }
                record(&l, "charge_payment", &ctx.input.order_id);
                Ok(serde_json::json!({ "payment_for": order["order_id"], "amount": ctx.input.amount }))
            }
        })
        .await?;
    let l = ledger;
    payments
        .register_compensate_handler("refund_payment", move |ctx: StepContext<OrderInput>| {
            let l = l.clone();
            async move {
                record(&l, "refund_payment", &ctx.input.order_id);
                Ok(())
            }
        })
        .await?;
    Ok(())
}

#[allow(dead_code)]
#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "memory://".into());
    let (bus, store): (Bus, Arc<dyn SagaStore>) = if let Some(path) = url.strip_prefix("sqlite://")
    {
        let transport = busway::sqlite::SqliteTransport::open(path)?;
        let store = busway::sqlite::SqliteSagaStore::open(transport.clone()).await?;
        (Bus::new(Arc::new(transport)), Arc::new(store))
    } else {
        (
            Bus::connect(&url).await?,
            Arc::new(busway::memory::MemorySagaStore::new()),
        )
    };
    let ledger = SharedLedger::default();
    register_participants(&bus, store.clone(), ledger.clone(), 16).await?;
    let orchestrator = SagaOrchestrator::new(bus.clone(), store);
    orchestrator.register(order_saga_definition(Duration::from_secs(10))?)?;

    let run = uuid::Uuid::new_v4().simple().to_string();
    let mut too_many = OrderInput::example("order_456");
    too_many.items[0].quantity = 500;
    let mut too_expensive = OrderInput::example("order_789");
    too_expensive.amount = 25_000.0;
    let cases = [
        OrderInput::example("order_123"),
        OrderInput::example("existing_order"),
        too_many,
        too_expensive,
    ];
    for input in cases {
        let saga_id = format!("order_saga_{}_{}", input.order_id, &run[..8]);
        orchestrator.start(ORDER_SAGA, &saga_id, &input).await?;
        let details = {
            orchestrator.wait(&saga_id).await?;
            orchestrator.show(&saga_id).await?
        };
        println!(
            "{saga_id}: {} {}",
            details.saga.status,
            details.saga.error.as_deref().unwrap_or("")
        );
        for event in &details.history {
            println!(
                "    {:<24} {:<18} {}",
                event.kind.as_str(),
                event.step_id.as_deref().unwrap_or(""),
                event.detail.as_deref().unwrap_or("")
            );
        }
    }
    orchestrator.shutdown().await;
    bus.shutdown().await;
    Ok(())
}
