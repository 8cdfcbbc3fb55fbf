//! The PostgreSQL saga store: versioned saves, history, due sagas, listing
//! and step results, on a schema of its own.

#![allow(clippy::unwrap_used)]

mod support;

use anyhow::Context;
use busway_core::saga_store::{
    CreateSagaError, SagaEvent, SagaEventKind, SagaQuery, SagaRecord, SagaStatus, SagaStore,
    StepRecord, StepStatus, UpdateSagaError,
};
use busway_postgres::{PostgresSagaStore, PostgresTransport};
use serde_json::json;
use support::TestSchema;

fn saga(id: &str, due: Option<i64>) -> SagaRecord {
    SagaRecord {
        id: id.into(),
        definition: "order".into(),
        status: SagaStatus::Running,
        version: 1,
        input: json!({"amount": 5}),
        steps: vec![StepRecord::new("a"), StepRecord::new("b")],
        error: None,
        created_at_ms: 10,
        updated_at_ms: 10,
        due_at_ms: due,
    }
}

#[tokio::test]
async fn versions_history_due_lists_and_step_results() -> anyhow::Result<()> {
    let Some(url) = support::postgres_url()? else {
        return Ok(());
    };
    let schema = TestSchema::new(&url);
    let transport = PostgresTransport::connect(&schema.transport_url("")).await?;
    let store = PostgresSagaStore::open(transport.clone()).await?;
    // Opening again (another process) is harmless.
    PostgresSagaStore::open(transport.clone()).await?;

    let created = SagaEvent::new(10, SagaEventKind::Created);
    store
        .create(&saga("s1", Some(100)), std::slice::from_ref(&created))
        .await?;
    store.create(&saga("s2", None), &[]).await?;
    let again = store.create(&saga("s1", None), &[]).await;
    assert!(matches!(again, Err(CreateSagaError::AlreadyExists { .. })));

    let mut s1 = store.load("s1").await?.context("s1 missing")?;
    s1.version = 2;
    s1.steps[0].status = StepStatus::Completed;
    s1.steps[0].output = Some(json!({"order_id": "o-1"}));
    let done = SagaEvent::new(20, SagaEventKind::ActionCompleted)
        .step("a", 1)
        .detail("ok");
    store.update(&s1, 1, std::slice::from_ref(&done)).await?;
    let stale = store.update(&s1, 1, &[]).await;
    assert!(
        matches!(stale, Err(UpdateSagaError::Conflict { actual: 2, .. })),
        "{stale:?}"
    );
    let missing = store.update(&saga("nope", None), 1, &[]).await;
    assert!(matches!(missing, Err(UpdateSagaError::NotFound { .. })));
    assert_eq!(store.load("s1").await?, Some(s1.clone()));
    assert_eq!(store.history("s1").await?, vec![created, done]);

    assert!(store.due(99, 10).await?.is_empty());
    assert_eq!(store.due(100, 10).await?.len(), 1);
    let running = store.list(&SagaQuery::status(SagaStatus::Running)).await?;
    assert_eq!(
        running.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(),
        ["s1", "s2"]
    );
    assert!(store
        .list(&SagaQuery::status(SagaStatus::Failed))
        .await?
        .is_empty());
    assert_eq!(
        store.count_by_status().await?.get(&SagaStatus::Running),
        Some(&2)
    );

    let first = json!({"charged": 1});
    let second = json!({"charged": 2});
    assert_eq!(store.step_result("k").await?, None);
    assert_eq!(store.save_step_result("k", &first).await?, first);
    assert_eq!(store.save_step_result("k", &second).await?, first);
    assert_eq!(store.step_result("k").await?, Some(first));
    Ok(())
}
