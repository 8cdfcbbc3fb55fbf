//! The order saga the saga crash tests run, and the check of how each saga
//! ended: the orchestrator crash test (`tests/saga_crash.rs`) and the
//! participant crash test (`tests/saga_participant_crash.rs`) share them.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use anyhow::ensure;
use busway::saga::{SagaDefinition, SagaStep};
use busway::saga_store::{SagaRecord, SagaStatus, SagaStore};
use busway::RetryPolicy;
use serde_json::Value;

/// Sagas each crash test runs: `saga-0` … `saga-999`.
pub const SAGAS: usize = 1_000;

/// The definition's name.
pub const DEFINITION: &str = "crash_order";

/// `(service, action, compensation)` of the three steps, in order.
pub const SERVICES: [(&str, &str, &str); 3] = [
    ("crash_orders", "create_order", "cancel_order"),
    ("crash_inventory", "reserve_inventory", "release_inventory"),
    ("crash_payments", "charge_payment", "refund_payment"),
];

/// Three steps on three services, each attempt limited to `step_timeout`,
/// actions and compensations tried up to `attempts` times.
pub fn definition(step_timeout: Duration, attempts: u32) -> anyhow::Result<SagaDefinition> {
    let retry = RetryPolicy::default()
        .with_max_attempts(attempts)
        .with_backoff(Duration::from_millis(50), Duration::from_millis(500));
    let mut builder = SagaDefinition::builder(DEFINITION);
    for (service, action, compensation) in SERVICES {
        builder = builder.step(
            SagaStep::new(action, service, action)
                .compensate_with(compensation)
                .timeout(step_timeout)
                .retry(retry.clone())
                .compensation_retry(retry.clone()),
        );
    }
    Ok(builder.build()?)
}

/// The input of saga `i`: every tenth order is over the payment limit, so
/// its payment fails and it compensates.
pub fn input(i: usize) -> Value {
    let amount = if i % 10 == 0 { 20_000 } else { 100 };
    serde_json::json!({ "order": i, "amount": amount })
}

/// Whether `charge_payment` refuses this input (the payment limit).
pub fn over_the_limit(input: &Value) -> bool {
    input["amount"].as_i64() > Some(10_000)
}

/// Waits (up to 10 minutes) until all [`SAGAS`] sagas in `store` have
/// ended, and returns their counts by status.
pub async fn wait_until_all_ended(
    store: &dyn SagaStore,
) -> anyhow::Result<BTreeMap<SagaStatus, u64>> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let counts = store.count_by_status().await?;
        let ended: u64 = [
            SagaStatus::Completed,
            SagaStatus::Compensated,
            SagaStatus::Failed,
        ]
        .iter()
        .filter_map(|s| counts.get(s))
        .sum();
        if ended == SAGAS as u64 {
            return Ok(counts);
        }
        ensure!(
            Instant::now() < deadline,
            "sagas still not finished: {counts:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Checks that all [`SAGAS`] sagas ended as their input says, and that
/// `effects` (`(effect, saga id)` → how often it happened) holds each
/// effect of that outcome exactly once and no other.
pub fn check_outcomes(
    sagas: &[SagaRecord],
    effects: &HashMap<(String, String), u32>,
) -> anyhow::Result<()> {
    ensure!(sagas.len() == SAGAS, "{} sagas stored", sagas.len());
    for (key, n) in effects {
        ensure!(*n == 1, "{key:?} happened {n} times");
    }
    let count = |effect: &str, id: &str| {
        effects
            .get(&(effect.to_owned(), id.to_owned()))
            .copied()
            .unwrap_or(0)
    };
    for saga in sagas {
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
        let (status, expected) = if over_the_limit(&input(i)) {
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
