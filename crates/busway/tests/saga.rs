//! Sagas on the memory backend with virtual time (retries, timeouts,
//! backoff, compensation, recovery, operator API), and the reference order
//! saga end to end on memory and SQLite.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{ensure, Context};
use busway::memory::MemorySagaStore;
use busway::saga::{
    DefinitionError, OrchestratorConfig, SagaDefinition, SagaOrchestrator, SagaParticipant,
    SagaQueryError, SagaStep, StepContext,
};
use busway::saga_store::{SagaEventKind, SagaQuery, SagaStatus, SagaStore, StepStatus};
use busway::{Bus, HandlerError, RetryPolicy};
use serde_json::{json, Value};
use tokio::time::Instant;

#[allow(dead_code, unreachable_pub)]
#[path = "../examples/order_saga.rs"]
mod order_saga;

use order_saga::{OrderInput, SharedLedger, ORDER_SAGA};

/// A retry policy without jitter, so virtual time is exact.
fn retry(attempts: u32, initial_ms: u64) -> RetryPolicy {
    RetryPolicy::default()
        .with_max_attempts(attempts)
        .with_backoff(Duration::from_millis(initial_ms), Duration::from_secs(3600))
        .with_jitter(0.0)
}

fn config() -> OrchestratorConfig {
    OrchestratorConfig::default()
        .with_poll_interval(Duration::from_millis(100))
        .with_lease_grace(Duration::from_secs(1))
}

struct Harness {
    bus: Bus,
    store: Arc<MemorySagaStore>,
    orchestrator: SagaOrchestrator,
}

impl Harness {
    async fn new() -> anyhow::Result<Self> {
        let bus = Bus::connect("memory://").await?;
        let store = Arc::new(MemorySagaStore::new());
        let orchestrator = SagaOrchestrator::with_config(bus.clone(), store.clone(), config());
        Ok(Self {
            bus,
            store,
            orchestrator,
        })
    }
    fn participant(&self, service: &str) -> SagaParticipant {
        SagaParticipant::new(&self.bus, service, self.store.clone())
    }
    async fn stop(self) {
        self.orchestrator.shutdown().await;
        self.bus.shutdown().await;
    }
}

/// Counts handler runs per `(name, saga_id)`.
#[derive(Clone, Default)]
struct Runs(Arc<Mutex<HashMap<(String, String), u32>>>);

impl Runs {
    fn bump(&self, name: &str, saga_id: &str) -> u32 {
        let mut runs = self.0.lock().unwrap();
        let n = runs
            .entry((name.to_owned(), saga_id.to_owned()))
            .or_insert(0);
        *n += 1;
        *n
    }
    fn get(&self, name: &str, saga_id: &str) -> u32 {
        self.0
            .lock()
            .unwrap()
            .get(&(name.to_owned(), saga_id.to_owned()))
            .copied()
            .unwrap_or(0)
    }
}

/// Registers `action` and `undo` on `participant`: the action fails (retryably)
/// on its first `failures` runs per saga; the undo fails on its first
/// `undo_failures` runs.
async fn flaky(
    participant: &SagaParticipant,
    action: &str,
    undo: &str,
    failures: u32,
    undo_failures: u32,
    runs: &Runs,
) -> anyhow::Result<()> {
    let r = runs.clone();
    let name = action.to_owned();
    participant
        .on_action(action, move |ctx: StepContext<Value>| {
            let n = r.bump(&name, ctx.saga_id());
            let name = name.clone();
            async move {
                if n <= failures {
                    return Err(HandlerError::new(format!("{name} failed on run {n}")));
                }
                Ok(json!({ "done_by": name, "run": n }))
            }
        })
        .await?;
    let r = runs.clone();
    let name = undo.to_owned();
    participant
        .on_compensation(undo, move |ctx: StepContext<Value>| {
            let n = r.bump(&name, ctx.saga_id());
            let name = name.clone();
            async move {
                if n <= undo_failures {
                    return Err(HandlerError::new(format!("{name} failed on run {n}")));
                }
                Ok(())
            }
        })
        .await?;
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn failed_attempts_are_retried_with_exponential_backoff_in_virtual_time() -> anyhow::Result<()>
{
    let h = Harness::new().await?;
    let runs = Runs::default();
    flaky(&h.participant("svc"), "act", "undo", 2, 0, &runs).await?;
    h.orchestrator.register(
        SagaDefinition::builder("flaky")
            .step(
                SagaStep::new("a", "svc", "act")
                    .compensate_with("undo")
                    .timeout(Duration::from_secs(5))
                    .retry(retry(3, 1_000)),
            )
            .build()?,
    )?;
    let started = Instant::now();
    h.orchestrator.start("flaky", "s1", &json!({})).await?;
    let saga = h.orchestrator.wait("s1").await?;
    let elapsed = started.elapsed();
    assert_eq!(saga.status, SagaStatus::Completed, "{saga:?}");
    assert_eq!(saga.steps[0].attempts, 3);
    assert_eq!(
        saga.steps[0].output,
        Some(json!({"done_by": "act", "run": 3}))
    );
    assert_eq!(runs.get("act", "s1"), 3);
    // Backoffs of 1 s then 2 s passed on the virtual clock, and not much more.
    assert!(elapsed >= Duration::from_secs(3), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(4), "{elapsed:?}");
    let history = h.orchestrator.show("s1").await?.history;
    let failed = history
        .iter()
        .filter(|e| e.kind == SagaEventKind::ActionFailed)
        .count();
    assert_eq!(failed, 2);
    assert_eq!(h.orchestrator.stats().step_failures, 2);
    h.stop().await;
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn a_saga_waiting_for_its_backoff_does_not_hold_up_others() -> anyhow::Result<()> {
    let h = Harness::new().await?;
    let runs = Runs::default();
    let slow = h.participant("slow_svc");
    flaky(&slow, "act", "undo", 1, 0, &runs).await?;
    let fast = h.participant("fast_svc");
    flaky(&fast, "go", "back", 0, 0, &runs).await?;
    h.orchestrator.register(
        SagaDefinition::builder("slow")
            .step(
                SagaStep::new("a", "slow_svc", "act")
                    .compensate_with("undo")
                    .retry(retry(2, 3_600_000)),
            )
            .build()?,
    )?;
    h.orchestrator.register(
        SagaDefinition::builder("fast")
            .step(SagaStep::new("a", "fast_svc", "go").compensate_with("back"))
            .build()?,
    )?;
    let started = Instant::now();
    h.orchestrator.start("slow", "slow-1", &json!({})).await?;
    // Let the slow saga fail once and schedule its retry an hour away.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for i in 0..20 {
        h.orchestrator
            .start("fast", &format!("fast-{i}"), &json!({}))
            .await?;
    }
    for i in 0..20 {
        let saga = h.orchestrator.wait(&format!("fast-{i}")).await?;
        assert_eq!(saga.status, SagaStatus::Completed);
    }
    assert!(started.elapsed() < Duration::from_secs(60));
    let slow_saga = h.store.load("slow-1").await?.context("slow-1")?;
    assert_eq!(slow_saga.status, SagaStatus::Running);
    assert_eq!(slow_saga.steps[0].attempts, 1);
    let due = slow_saga.due_at_ms.context("a retry is scheduled")?;
    assert!(due - slow_saga.updated_at_ms >= 3_600_000 - 1);
    // The hour passes (virtually) and the retry runs.
    let saga = h.orchestrator.wait("slow-1").await?;
    assert_eq!(saga.status, SagaStatus::Completed);
    assert!(started.elapsed() >= Duration::from_secs(3600));
    h.stop().await;
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn a_step_that_times_out_is_retried_and_its_late_effect_happens_once() -> anyhow::Result<()> {
    let h = Harness::new().await?;
    let runs = Runs::default();
    let svc = h.participant("svc").concurrency(8);
    let r = runs.clone();
    // The first run takes 10 s; the step's timeout is 2 s.
    svc.on_action("slow_act", move |ctx: StepContext<Value>| {
        let n = r.bump("slow_act", ctx.saga_id());
        async move {
            if n == 1 {
                tokio::time::sleep(Duration::from_secs(10)).await;
            }
            Ok(json!({ "run": n }))
        }
    })
    .await?;
    let r = runs.clone();
    svc.on_compensation("undo", move |ctx: StepContext<Value>| {
        r.bump("undo", ctx.saga_id());
        async move { Ok(()) }
    })
    .await?;
    h.orchestrator.register(
        SagaDefinition::builder("timeouts")
            .step(
                SagaStep::new("a", "svc", "slow_act")
                    .compensate_with("undo")
                    .timeout(Duration::from_secs(2))
                    .retry(retry(10, 500)),
            )
            .build()?,
    )?;
    h.orchestrator.start("timeouts", "t1", &json!({})).await?;
    let saga = h.orchestrator.wait("t1").await?;
    assert_eq!(saga.status, SagaStatus::Completed, "{saga:?}");
    // The retries were answered with the result of the first run, which
    // finished late: the action ran once.
    assert_eq!(runs.get("slow_act", "t1"), 1);
    assert_eq!(saga.steps[0].output, Some(json!({"run": 1})));
    assert!(saga.steps[0].attempts >= 2, "{saga:?}");
    let history = h.orchestrator.show("t1").await?.history;
    assert!(history.iter().any(|e| e.kind == SagaEventKind::ActionFailed
        && e.detail.as_deref().unwrap_or("").contains("did not reply")));
    h.stop().await;
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn a_step_that_always_times_out_is_compensated_after_its_attempts() -> anyhow::Result<()> {
    let h = Harness::new().await?;
    let runs = Runs::default();
    let first = h.participant("first");
    flaky(&first, "one", "undo_one", 0, 0, &runs).await?;
    let stuck = h.participant("stuck").concurrency(32);
    let r = runs.clone();
    stuck
        .on_action("hang", move |ctx: StepContext<Value>| {
            r.bump("hang", ctx.saga_id());
            async move {
                // Far longer than the step's timeout (1 s) and all its attempts.
                tokio::time::sleep(Duration::from_secs(30)).await;
                Ok(())
            }
        })
        .await?;
    let r = runs.clone();
    stuck
        .on_compensation("unhang", move |ctx: StepContext<Value>| {
            r.bump("unhang", ctx.saga_id());
            async move { Ok(()) }
        })
        .await?;
    h.orchestrator.register(
        SagaDefinition::builder("hanging")
            .step(SagaStep::new("one", "first", "one").compensate_with("undo_one"))
            .step(
                SagaStep::new("two", "stuck", "hang")
                    .compensate_with("unhang")
                    .timeout(Duration::from_secs(1))
                    .retry(retry(3, 100)),
            )
            .build()?,
    )?;
    h.orchestrator.start("hanging", "h1", &json!({})).await?;
    let saga = h.orchestrator.wait("h1").await?;
    assert_eq!(saga.status, SagaStatus::Compensated, "{saga:?}");
    assert_eq!(saga.steps[1].attempts, 3);
    assert!(saga.error.as_deref().unwrap_or("").contains("step `two`"));
    // Step one was undone. Step two's outcome was unknown, so its
    // compensation was sent too; it waited for the hanging action (same
    // step, same participant) and then undid it.
    assert_eq!(runs.get("undo_one", "h1"), 1);
    assert_eq!(runs.get("hang", "h1"), 1);
    assert_eq!(runs.get("unhang", "h1"), 1);
    assert_eq!(saga.steps[1].status, StepStatus::Compensated);
    h.stop().await;
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn a_compensation_that_keeps_failing_ends_failed_and_an_operator_retries_it(
) -> anyhow::Result<()> {
    let h = Harness::new().await?;
    let runs = Runs::default();
    flaky(&h.participant("a_svc"), "a", "undo_a", 0, 5, &runs).await?;
    let b = h.participant("b_svc");
    b.on_action("b", |_: StepContext<Value>| async move {
        Err::<(), _>(HandlerError::permanent("b refuses"))
    })
    .await?;
    h.orchestrator.register(
        SagaDefinition::builder("stubborn")
            .step(
                SagaStep::new("a", "a_svc", "a")
                    .compensate_with("undo_a")
                    .compensation_retry(retry(3, 100)),
            )
            .step(SagaStep::new("b", "b_svc", "b").retry(retry(5, 100)))
            .build()?,
    )?;
    h.orchestrator.start("stubborn", "f1", &json!({})).await?;
    let saga = h.orchestrator.wait("f1").await?;
    assert_eq!(saga.status, SagaStatus::Failed, "{saga:?}");
    // A permanent failure is not retried.
    assert_eq!(saga.steps[1].attempts, 1);
    assert_eq!(saga.steps[1].status, StepStatus::Failed);
    assert_eq!(saga.steps[0].status, StepStatus::Failed);
    assert_eq!(saga.steps[0].compensation_attempts, 3);
    let reason = saga.error.clone().unwrap_or_default();
    assert!(reason.contains("compensation `undo_a`"), "{reason}");
    assert!(reason.contains("b refuses"), "{reason}");
    assert_eq!(h.orchestrator.stats().failed, 1);

    // Visible to an operator.
    let failed = h
        .orchestrator
        .list(&SagaQuery::status(SagaStatus::Failed))
        .await?;
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].id, "f1");
    let details = h.orchestrator.show("f1").await?;
    assert!(details
        .history
        .iter()
        .any(|e| e.kind == SagaEventKind::Failed));

    // Retry: the compensation runs again (and now succeeds on its 5th..6th run).
    h.orchestrator.retry("f1").await?;
    let saga = h.orchestrator.wait("f1").await?;
    assert_eq!(saga.status, SagaStatus::Compensated, "{saga:?}");
    assert_eq!(runs.get("undo_a", "f1"), 6);
    let retried = h.orchestrator.retry("f1").await;
    assert!(matches!(retried, Err(SagaQueryError::NotFailed { .. })));
    h.stop().await;
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn an_operator_aborts_a_failed_saga() -> anyhow::Result<()> {
    let h = Harness::new().await?;
    let runs = Runs::default();
    flaky(&h.participant("a_svc"), "a", "undo_a", 0, 100, &runs).await?;
    flaky(&h.participant("b_svc"), "b", "undo_b", 100, 0, &runs).await?;
    h.orchestrator.register(
        SagaDefinition::builder("doomed")
            .step(
                SagaStep::new("a", "a_svc", "a")
                    .compensate_with("undo_a")
                    .compensation_retry(retry(2, 100)),
            )
            .step(
                SagaStep::new("b", "b_svc", "b")
                    .compensate_with("undo_b")
                    .retry(retry(2, 100)),
            )
            .build()?,
    )?;
    h.orchestrator.start("doomed", "d1", &json!({})).await?;
    assert_eq!(h.orchestrator.wait("d1").await?.status, SagaStatus::Failed);
    h.orchestrator.abort("d1", "refunded by hand").await?;
    let details = h.orchestrator.show("d1").await?;
    assert_eq!(details.saga.status, SagaStatus::Failed);
    assert!(details
        .saga
        .error
        .as_deref()
        .unwrap_or("")
        .contains("refunded by hand"));
    assert_eq!(details.saga.due_at_ms, None);
    assert!(details
        .history
        .iter()
        .any(|e| e.kind == SagaEventKind::Aborted));
    assert!(matches!(
        h.orchestrator.abort("nope", "x").await,
        Err(SagaQueryError::NotFound(_))
    ));
    h.stop().await;
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn bad_definitions_and_bad_steps() -> anyhow::Result<()> {
    let h = Harness::new().await?;
    let runs = Runs::default();
    flaky(&h.participant("local"), "known", "undo_known", 0, 0, &runs).await?;

    // Unknown action of a service running on this bus: refused at registration.
    let unknown = SagaDefinition::builder("unknown")
        .step(SagaStep::new("a", "local", "unknown_action"))
        .build()?;
    let err = h.orchestrator.register(unknown).unwrap_err();
    assert!(
        matches!(err, DefinitionError::UnknownAction { ref name, .. } if name == "unknown_action"),
        "{err}"
    );
    let dup = SagaDefinition::builder("dup")
        .step(SagaStep::new("a", "local", "known"))
        .step(SagaStep::new("a", "local", "known"))
        .build();
    assert!(matches!(dup, Err(DefinitionError::DuplicateStep { .. })));

    // A service in another process (here: another bus on the same
    // transport): checked when the step runs; the saga fails the step
    // with the reason and compensates.
    let remote_bus = Bus::new(h.bus.transport().clone());
    let remote = SagaParticipant::new(&remote_bus, "remote", h.store.clone());
    remote
        .on_action("real", |_: StepContext<Value>| async move { Ok(()) })
        .await?;
    // A raw RPC method whose reply is not a step result.
    remote_bus
        .register_request_handler("remote", "garbage", |_: Value| async move {
            Ok(json!([1, 2, 3]))
        })
        .await?;
    for (saga, action) in [("typo", "reel"), ("undecodable", "garbage")] {
        h.orchestrator.register(
            SagaDefinition::builder(saga)
                .step(SagaStep::new("first", "local", "known").compensate_with("undo_known"))
                .step(SagaStep::new("second", "remote", action).retry(retry(3, 100)))
                .build()?,
        )?;
        h.orchestrator.start(saga, saga, &json!({})).await?;
        let done = h.orchestrator.wait(saga).await?;
        assert_eq!(done.status, SagaStatus::Compensated, "{done:?}");
        assert_eq!(done.steps[1].attempts, 1, "not retried: {done:?}");
        assert_eq!(runs.get("undo_known", saga), 1);
        let reason = done.error.unwrap_or_default();
        let expected = if action == "reel" {
            "unknown method"
        } else {
            "could not be decoded"
        };
        assert!(reason.contains(expected), "{reason}");
    }

    // A saga input that does not fit the handler's type: a permanent failure.
    let typed = h.participant("typed");
    typed
        .on_action("needs_amount", |ctx: StepContext<OrderInput>| async move {
            Ok(ctx.input.amount)
        })
        .await?;
    h.orchestrator.register(
        SagaDefinition::builder("typed")
            .step(SagaStep::new("a", "typed", "needs_amount"))
            .build()?,
    )?;
    h.orchestrator
        .start("typed", "typed-1", &json!({"amount": "lots"}))
        .await?;
    let done = h.orchestrator.wait("typed-1").await?;
    assert_eq!(done.status, SagaStatus::Compensated);
    assert!(done
        .error
        .unwrap_or_default()
        .contains("does not fit `needs_amount`"));

    let missing = h
        .orchestrator
        .start("never_registered", "x", &json!({}))
        .await;
    assert!(missing.is_err());
    remote_bus.shutdown().await;
    h.stop().await;
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn another_orchestrator_resumes_a_saga_whose_orchestrator_stopped() -> anyhow::Result<()> {
    let bus = Bus::connect("memory://").await?;
    let store = Arc::new(MemorySagaStore::new());
    let runs = Runs::default();
    let participant = SagaParticipant::new(&bus, "svc", store.clone()).concurrency(8);
    let r = runs.clone();
    participant
        .on_action("act", move |ctx: StepContext<Value>| {
            r.bump("act", ctx.saga_id());
            async move {
                tokio::time::sleep(Duration::from_secs(3)).await;
                Ok(json!("done"))
            }
        })
        .await?;
    let definition = SagaDefinition::builder("resumable")
        .step(SagaStep::new("a", "svc", "act").timeout(Duration::from_secs(10)))
        .step(SagaStep::new("b", "svc", "act").timeout(Duration::from_secs(10)))
        .build()?;

    // The first orchestrator dispatches step a, then stops (as if killed)
    // before it sees the reply.
    let first_bus = Bus::new(bus.transport().clone());
    let first = SagaOrchestrator::with_config(first_bus.clone(), store.clone(), config());
    first.register(definition.clone())?;
    first.start("resumable", "r1", &json!({})).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    first.shutdown().await;
    first_bus.shutdown().await;

    // The second one takes it over once the dispatch's lease has passed,
    // and step a's replayed command is answered from the stored result.
    let second = SagaOrchestrator::with_config(bus.clone(), store.clone(), config());
    second.register(definition)?;
    let saga = second.wait("r1").await?;
    assert_eq!(saga.status, SagaStatus::Completed, "{saga:?}");
    assert_eq!(runs.get("act", "r1"), 2, "one run per step");
    assert!(second.stats().recovered >= 1);
    second.shutdown().await;
    bus.shutdown().await;
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn two_orchestrators_on_one_store_never_advance_the_same_saga_twice() -> anyhow::Result<()> {
    let bus = Bus::connect("memory://").await?;
    let store = Arc::new(MemorySagaStore::new());
    let effects = Arc::new(AtomicU32::new(0));
    let participant = SagaParticipant::new(&bus, "svc", store.clone()).concurrency(64);
    let e = effects.clone();
    participant
        .on_action("act", move |_: StepContext<Value>| {
            e.fetch_add(1, Ordering::SeqCst);
            async move { Ok(()) }
        })
        .await?;
    let definition = SagaDefinition::builder("shared")
        .step(SagaStep::new("a", "svc", "act"))
        .step(SagaStep::new("b", "svc", "act"))
        .build()?;
    // No grace and a 1 ms poll: each orchestrator sees the other's new
    // sagas as due at once and races it for them.
    let fast = config()
        .with_lease_grace(Duration::ZERO)
        .with_poll_interval(Duration::from_millis(1));
    let one = SagaOrchestrator::with_config(bus.clone(), store.clone(), fast.clone());
    let two = SagaOrchestrator::with_config(bus.clone(), store.clone(), fast);
    one.register(definition.clone())?;
    two.register(definition)?;
    for i in 0..100 {
        let starter = if i % 2 == 0 { &one } else { &two };
        starter
            .start("shared", &format!("s{i}"), &json!({}))
            .await?;
    }
    for i in 0..100 {
        assert_eq!(
            one.wait(&format!("s{i}")).await?.status,
            SagaStatus::Completed
        );
    }
    assert_eq!(effects.load(Ordering::SeqCst), 200, "one effect per step");
    for i in 0..100 {
        let history = store.history(&format!("s{i}")).await?;
        let dispatched = history
            .iter()
            .filter(|e| e.kind == SagaEventKind::ActionDispatched)
            .count();
        assert_eq!(dispatched, 2, "s{i} was advanced twice: {history:?}");
    }
    one.shutdown().await;
    two.shutdown().await;
    bus.shutdown().await;
    Ok(())
}

/// The reference order saga: one happy path and the three reference failures.
async fn order_saga_cases(bus: Bus, store: Arc<dyn SagaStore>) -> anyhow::Result<()> {
    let ledger = SharedLedger::default();
    order_saga::register_participants(&bus, store.clone(), ledger.clone(), 16).await?;
    let orchestrator = SagaOrchestrator::with_config(bus.clone(), store, config());
    orchestrator.register(order_saga::order_saga_definition(Duration::from_secs(10))?)?;

    let mut out_of_stock = OrderInput::example("order_oos");
    out_of_stock.items[0].quantity = 101;
    let mut over_limit = OrderInput::example("order_big");
    over_limit.amount = 10_000.01;
    let cases = [
        (OrderInput::example("order_123"), SagaStatus::Completed, ""),
        (
            OrderInput::example("existing_order"),
            SagaStatus::Compensated,
            "already exists",
        ),
        (out_of_stock, SagaStatus::Compensated, "out of stock"),
        (over_limit, SagaStatus::Compensated, "payment limit"),
    ];
    for (input, _, _) in &cases {
        orchestrator
            .start(ORDER_SAGA, &format!("saga_{}", input.order_id), input)
            .await?;
    }
    for (input, status, reason) in &cases {
        let saga = orchestrator
            .wait(&format!("saga_{}", input.order_id))
            .await?;
        ensure!(saga.status == *status, "{}: {saga:?}", input.order_id);
        let error = saga.error.unwrap_or_default();
        ensure!(error.contains(reason), "{}: {error}", input.order_id);
    }
    let effects = |id: &str| -> Vec<u32> {
        let ledger = ledger.lock().unwrap();
        [
            "create_order",
            "reserve_inventory",
            "charge_payment",
            "refund_payment",
            "release_inventory",
            "cancel_order",
        ]
        .iter()
        .map(|e| ledger.count(e, id))
        .collect()
    };
    assert_eq!(effects("order_123"), [1, 1, 1, 0, 0, 0]);
    assert_eq!(effects("existing_order"), [0, 0, 0, 0, 0, 0]);
    assert_eq!(effects("order_oos"), [1, 0, 0, 0, 0, 1]);
    assert_eq!(effects("order_big"), [1, 1, 0, 0, 1, 1]);
    let completed = orchestrator
        .list(&SagaQuery::status(SagaStatus::Completed))
        .await?;
    assert_eq!(completed.len(), 1);
    let compensated = orchestrator
        .list(&SagaQuery::status(SagaStatus::Compensated))
        .await?;
    assert_eq!(compensated.len(), 3);
    let stats = orchestrator.stats();
    assert_eq!((stats.completed, stats.compensated), (1, 3));
    assert_eq!(stats.compensations, 3);
    orchestrator.shutdown().await;
    bus.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn the_reference_order_saga_on_memory() -> anyhow::Result<()> {
    let bus = Bus::connect("memory://").await?;
    order_saga_cases(bus, Arc::new(MemorySagaStore::new())).await
}

#[tokio::test]
async fn the_reference_order_saga_on_sqlite() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let transport = busway::sqlite::SqliteTransport::open(dir.path().join("sagas.db"))?;
    let store = busway::sqlite::SqliteSagaStore::open(transport.clone()).await?;
    order_saga_cases(Bus::new(Arc::new(transport)), Arc::new(store)).await?;

    // The sagas are durable: a new transport on the file sees them.
    let reopened = busway::sqlite::SqliteTransport::open(dir.path().join("sagas.db"))?;
    let store = busway::sqlite::SqliteSagaStore::open(reopened).await?;
    let counts = store.count_by_status().await?;
    assert_eq!(counts.get(&SagaStatus::Completed), Some(&1));
    assert_eq!(counts.get(&SagaStatus::Compensated), Some(&3));
    let history = store.history("saga_order_big").await?;
    assert!(history
        .iter()
        .any(|e| e.kind == SagaEventKind::CompensationCompleted));
    Ok(())
}

#[tokio::test]
async fn transactional_steps_commit_their_effect_with_their_result() -> anyhow::Result<()> {
    use busway::sqlite::{SqliteSagaStore, SqliteTransport, WriteError, WriteTx};

    let dir = tempfile::tempdir()?;
    let transport = SqliteTransport::open(dir.path().join("sagas.db"))?;
    let store = SqliteSagaStore::open(transport.clone()).await?;
    transport
        .write(|tx| {
            tx.connection().execute_batch(
                "CREATE TABLE ledger (saga_id TEXT NOT NULL, entry TEXT NOT NULL)",
            )?;
            Ok::<_, WriteError>(())
        })
        .await?;
    let bus = Bus::new(Arc::new(transport.clone()));

    // A plain participant has no database to run them in.
    let plain = SagaParticipant::new(&bus, "plain_service", Arc::new(MemorySagaStore::new()));
    let refused = plain
        .on_action_in_transaction("act", |_: &StepContext<Value>, _: &mut WriteTx<'_>| Ok(()))
        .await;
    assert!(
        matches!(refused, Err(busway::SetupError::NotTransactional { .. })),
        "{refused:?}"
    );

    let runs = Arc::new(AtomicU32::new(0));
    let payments = SagaParticipant::with_sqlite_store(&bus, "tx_payments", store.clone());
    let counted = runs.clone();
    payments
        .on_action_in_transaction(
            "charge",
            move |ctx: &StepContext<Value>, tx: &mut WriteTx<'_>| {
                counted.fetch_add(1, Ordering::SeqCst);
                tx.connection()
                    .execute(
                        "INSERT INTO ledger (saga_id, entry) VALUES (?1, 'charged')",
                        [ctx.saga_id()],
                    )
                    .map_err(|e| HandlerError::new(e.to_string()))?;
                // Over the limit: fail after writing; the write must roll back.
                if ctx.input["amount"].as_i64() > Some(100) {
                    return Err(HandlerError::permanent("over the limit"));
                }
                Ok(json!({"charged": ctx.input["amount"]}))
            },
        )
        .await?;
    payments
        .on_compensation_in_transaction(
            "refund",
            |ctx: &StepContext<Value>, tx: &mut WriteTx<'_>| {
                tx.connection()
                    .execute(
                        "INSERT INTO ledger (saga_id, entry) VALUES (?1, 'refunded')",
                        [ctx.saga_id()],
                    )
                    .map_err(|e| HandlerError::new(e.to_string()))?;
                Ok(())
            },
        )
        .await?;
    let orchestrator = SagaOrchestrator::new(bus.clone(), Arc::new(store.clone()));
    orchestrator.register(
        SagaDefinition::builder("tx_payment")
            .step(SagaStep::new("charge", "tx_payments", "charge").compensate_with("refund"))
            .step(SagaStep::new("charge_again", "tx_payments", "charge"))
            .build()?,
    )?;
    orchestrator
        .start("tx_payment", "small", &json!({"amount": 30}))
        .await?;
    orchestrator
        .start("tx_payment", "big", &json!({"amount": 300}))
        .await?;
    assert_eq!(
        orchestrator.wait("small").await?.status,
        SagaStatus::Completed
    );
    assert_eq!(
        orchestrator.wait("big").await?.status,
        SagaStatus::Compensated
    );

    let ledger = |saga: &'static str| {
        let transport = transport.clone();
        async move {
            transport
                .read(move |conn| {
                    let mut s =
                        conn.prepare("SELECT entry FROM ledger WHERE saga_id = ?1 ORDER BY rowid")?;
                    let rows = s.query_map([saga], |r| r.get::<_, String>(0))?;
                    rows.collect::<Result<Vec<_>, _>>()
                })
                .await
        }
    };
    // Two steps charged the small saga; the big one's failed charge left nothing.
    assert_eq!(ledger("small").await?, ["charged", "charged"]);
    assert_eq!(ledger("big").await?, Vec::<String>::new());
    let runs_before = runs.load(Ordering::SeqCst);

    // A replayed command (same idempotency key) answers the stored result
    // without running the handler again.
    let replay = json!({
        "saga_id": "small", "saga": "tx_payment", "step_id": "charge", "phase": "action",
        "attempt": 2, "idempotency_key": "small/charge/action", "action_key": "small/charge/action",
        "input": {"amount": 30}, "outputs": {}
    });
    let reply: Value = bus.request("tx_payments", "charge", &replay).await?;
    assert_eq!(
        reply,
        json!({"outcome": "completed", "output": {"charged": 30}})
    );
    assert_eq!(runs.load(Ordering::SeqCst), runs_before);
    assert_eq!(ledger("small").await?, ["charged", "charged"]);

    // A compensation that arrives before its action fences the action off.
    let early = json!({
        "saga_id": "early", "saga": "tx_payment", "step_id": "charge", "phase": "compensation",
        "attempt": 1, "idempotency_key": "early/charge/compensation", "action_key": "early/charge/action",
        "input": {"amount": 30}, "outputs": {}
    });
    let reply: Value = bus.request("tx_payments", "refund", &early).await?;
    assert_eq!(reply, json!({"outcome": "completed", "output": null}));
    let late_action = json!({
        "saga_id": "early", "saga": "tx_payment", "step_id": "charge", "phase": "action",
        "attempt": 1, "idempotency_key": "early/charge/action", "action_key": "early/charge/action",
        "input": {"amount": 30}, "outputs": {}
    });
    let reply: Value = bus.request("tx_payments", "charge", &late_action).await?;
    assert_eq!(reply["outcome"], "failed");
    assert_eq!(ledger("early").await?, Vec::<String>::new());

    orchestrator.shutdown().await;
    bus.shutdown().await;
    Ok(())
}
