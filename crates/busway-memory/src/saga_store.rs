//! [`MemorySagaStore`]: sagas kept in process memory.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
use busway_core::saga_store::{
    CreateSagaError, LoadSagaError, SagaEvent, SagaQuery, SagaRecord, SagaStatus, SagaStore,
    StepResultError, UpdateSagaError,
};
use serde_json::Value;

/// A [`SagaStore`] in process memory: fast, and gone with the process. For
/// tests and single-process applications.
///
/// ```
/// use busway_core::saga_store::{SagaQuery, SagaRecord, SagaStatus, SagaStore};
/// use busway_memory::MemorySagaStore;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store = MemorySagaStore::new();
/// let saga = SagaRecord {
///     id: "order_saga_123".into(), definition: "order".into(), status: SagaStatus::Running,
///     version: 1, input: serde_json::json!({}), steps: vec![], error: None,
///     created_at_ms: 0, updated_at_ms: 0, due_at_ms: Some(0),
/// };
/// store.create(&saga, &[]).await?;
/// assert_eq!(store.due(10, 100).await?.len(), 1);
/// assert_eq!(store.list(&SagaQuery::status(SagaStatus::Running)).await?[0].id, "order_saga_123");
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Default)]
pub struct MemorySagaStore {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    sagas: HashMap<String, Stored>,
    /// `(due_at_ms, id)` of the sagas that have a due time.
    due: BTreeSet<(i64, String)>,
    /// `(created_at_ms, sequence, id)`: creation order for listing.
    created: BTreeSet<(i64, u64, String)>,
    sequence: u64,
    step_results: HashMap<String, Value>,
}

#[derive(Debug)]
struct Stored {
    saga: SagaRecord,
    history: Vec<SagaEvent>,
}

impl MemorySagaStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl State {
    fn index_due(&mut self, saga: &SagaRecord) {
        if let (Some(at), false) = (saga.due_at_ms, saga.status.is_terminal()) {
            self.due.insert((at, saga.id.clone()));
        }
    }
    fn unindex_due(&mut self, saga: &SagaRecord) {
        if let Some(at) = saga.due_at_ms {
            self.due.remove(&(at, saga.id.clone()));
        }
    }
}

#[async_trait]
impl SagaStore for MemorySagaStore {
    async fn create(&self, saga: &SagaRecord, events: &[SagaEvent]) -> Result<(), CreateSagaError> {
        let mut state = self.state();
        if state.sagas.contains_key(&saga.id) {
            return Err(CreateSagaError::AlreadyExists {
                id: saga.id.clone(),
            });
        }
        state.sequence += 1;
        let sequence = state.sequence;
        state
            .created
            .insert((saga.created_at_ms, sequence, saga.id.clone()));
        state.index_due(saga);
        state.sagas.insert(
            saga.id.clone(),
            Stored {
                saga: saga.clone(),
                history: events.to_vec(),
            },
        );
        Ok(())
    }

    async fn update(
        &self,
        saga: &SagaRecord,
        expected_version: u64,
        events: &[SagaEvent],
    ) -> Result<(), UpdateSagaError> {
        let mut state = self.state();
        let state = &mut *state;
        let Some(stored) = state.sagas.get_mut(&saga.id) else {
            return Err(UpdateSagaError::NotFound {
                id: saga.id.clone(),
            });
        };
        if stored.saga.version != expected_version {
            return Err(UpdateSagaError::Conflict {
                id: saga.id.clone(),
                expected: expected_version,
                actual: stored.saga.version,
            });
        }
        let previous = std::mem::replace(&mut stored.saga, saga.clone());
        stored.history.extend_from_slice(events);
        state.unindex_due(&previous);
        state.index_due(saga);
        Ok(())
    }

    async fn load(&self, id: &str) -> Result<Option<SagaRecord>, LoadSagaError> {
        Ok(self.state().sagas.get(id).map(|s| s.saga.clone()))
    }

    async fn due(&self, now_ms: i64, limit: usize) -> Result<Vec<SagaRecord>, LoadSagaError> {
        let state = self.state();
        Ok(state
            .due
            .iter()
            .take_while(|(at, _)| *at <= now_ms)
            .filter_map(|(_, id)| state.sagas.get(id))
            .map(|s| s.saga.clone())
            .take(limit)
            .collect())
    }

    async fn list(&self, query: &SagaQuery) -> Result<Vec<SagaRecord>, LoadSagaError> {
        let state = self.state();
        Ok(state
            .created
            .iter()
            .filter_map(|(_, _, id)| state.sagas.get(id))
            .filter(|s| query.matches(&s.saga))
            .map(|s| s.saga.clone())
            .take(query.limit)
            .collect())
    }

    async fn count_by_status(&self) -> Result<BTreeMap<SagaStatus, u64>, LoadSagaError> {
        let mut counts = BTreeMap::new();
        for stored in self.state().sagas.values() {
            *counts.entry(stored.saga.status).or_insert(0) += 1;
        }
        Ok(counts)
    }

    async fn history(&self, id: &str) -> Result<Vec<SagaEvent>, LoadSagaError> {
        Ok(self
            .state()
            .sagas
            .get(id)
            .map(|s| s.history.clone())
            .unwrap_or_default())
    }

    async fn step_result(&self, key: &str) -> Result<Option<Value>, StepResultError> {
        Ok(self.state().step_results.get(key).cloned())
    }

    async fn save_step_result(&self, key: &str, result: &Value) -> Result<Value, StepResultError> {
        Ok(self
            .state()
            .step_results
            .entry(key.to_owned())
            .or_insert_with(|| result.clone())
            .clone())
    }
}
