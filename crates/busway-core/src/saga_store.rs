//! The persisted state of sagas and the [`SagaStore`] trait that keeps it.
//!
//! A saga orchestrator (in the `busway` crate) advances sagas one step at a
//! time and saves each change with [`SagaStore::update`], which only succeeds
//! if nobody saved the saga since it was loaded (optimistic versioning): two
//! orchestrators never both advance one saga. Step results of participants
//! are kept by idempotency key ([`SagaStore::save_step_result`]), so a step
//! command delivered twice returns the first result instead of repeating its
//! effect.
//!
//! Backends: `busway_memory::MemorySagaStore` (tests, one process),
//! `busway_sqlite::SqliteSagaStore` (durable, the default).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::BoxError;

/// Where a saga is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SagaStatus {
    /// Created, no step dispatched yet.
    Pending,
    /// Steps are being executed in order.
    Running,
    /// Every step completed.
    Completed,
    /// A compensation kept failing (or an operator aborted the saga): it
    /// needs an operator. The reason is in [`SagaRecord::error`].
    Failed,
    /// A step failed for good; completed steps are being compensated in reverse order.
    Compensating,
    /// Every completed step was compensated.
    Compensated,
}

impl SagaStatus {
    /// Every status, in life order.
    pub const ALL: [SagaStatus; 6] = [
        Self::Pending,
        Self::Running,
        Self::Completed,
        Self::Failed,
        Self::Compensating,
        Self::Compensated,
    ];

    /// The lowercase name (`"running"`), as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Compensating => "compensating",
            Self::Compensated => "compensated",
        }
    }

    /// Whether the orchestrator is done with the saga (COMPLETED, COMPENSATED, FAILED).
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Compensated | Self::Failed)
    }
}

impl fmt::Display for SagaStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A saga or step status name that is not known.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown status `{0}`")]
pub struct UnknownStatus(pub String);

impl FromStr for SagaStatus {
    type Err = UnknownStatus;
    /// Parses a status name, case-insensitively (`RUNNING`, `running`).
    ///
    /// ```
    /// use busway_core::saga_store::SagaStatus;
    /// assert_eq!("FAILED".parse::<SagaStatus>(), Ok(SagaStatus::Failed));
    /// assert!("stuck".parse::<SagaStatus>().is_err());
    /// ```
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|status| status.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| UnknownStatus(s.to_owned()))
    }
}

/// Where one step of a saga is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    /// Not dispatched yet.
    NotStarted,
    /// The action was dispatched (or a retry of it is scheduled).
    Running,
    /// The action succeeded; its output is in [`StepRecord::output`].
    Completed,
    /// The action failed for good, or its compensation did.
    Failed,
    /// The compensation was dispatched (or a retry of it is scheduled).
    Compensating,
    /// The compensation succeeded.
    Compensated,
}

impl StepStatus {
    /// The snake_case name (`"not_started"`), as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotStarted => "not_started",
            Self::Running => "running",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Compensating => "compensating",
            Self::Compensated => "compensated",
        }
    }
}

impl fmt::Display for StepStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The persisted state of one step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// The step's id in its definition.
    pub step_id: String,
    /// Where the step is.
    pub status: StepStatus,
    /// Action attempts dispatched so far.
    pub attempts: u32,
    /// Compensation attempts dispatched so far.
    pub compensation_attempts: u32,
    /// What the action returned, fed to later steps and to the compensation.
    pub output: Option<Value>,
    /// The last failure of the action or compensation.
    pub error: Option<String>,
}

impl StepRecord {
    /// A step that has not started.
    pub fn new(step_id: impl Into<String>) -> Self {
        Self {
            step_id: step_id.into(),
            status: StepStatus::NotStarted,
            attempts: 0,
            compensation_attempts: 0,
            output: None,
            error: None,
        }
    }
}

/// The persisted state of one saga.
///
/// Times are milliseconds since the Unix epoch, as the orchestrator's clock
/// reads them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SagaRecord {
    /// Unique id.
    pub id: String,
    /// The name of the saga definition it runs.
    pub definition: String,
    /// Where it is.
    pub status: SagaStatus,
    /// Bumped by one on every save; a save names the version it read.
    pub version: u64,
    /// The data the saga was started with, given to every step.
    pub input: Value,
    /// One record per step of the definition, in order.
    pub steps: Vec<StepRecord>,
    /// Why it is compensating, compensated or failed.
    pub error: Option<String>,
    /// When it was created.
    pub created_at_ms: i64,
    /// When it was last saved.
    pub updated_at_ms: i64,
    /// When an orchestrator should act on it next: a scheduled retry, or the
    /// deadline of a dispatched step after which another orchestrator may
    /// take over. `None` once terminal.
    pub due_at_ms: Option<i64>,
}

/// What happened to a saga, one line of its history.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SagaEventKind {
    /// The saga was created.
    Created,
    /// An action was dispatched.
    ActionDispatched,
    /// An action succeeded.
    ActionCompleted,
    /// An action failed (a retry may follow).
    ActionFailed,
    /// A compensation was dispatched.
    CompensationDispatched,
    /// A compensation succeeded.
    CompensationCompleted,
    /// A compensation failed (a retry may follow).
    CompensationFailed,
    /// Every step completed.
    Completed,
    /// Compensation started.
    CompensationStarted,
    /// Every completed step was compensated.
    Compensated,
    /// The saga failed and needs an operator.
    Failed,
    /// An operator retried the saga.
    Retried,
    /// An operator aborted the saga.
    Aborted,
}

impl SagaEventKind {
    /// The snake_case name, as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::ActionDispatched => "action_dispatched",
            Self::ActionCompleted => "action_completed",
            Self::ActionFailed => "action_failed",
            Self::CompensationDispatched => "compensation_dispatched",
            Self::CompensationCompleted => "compensation_completed",
            Self::CompensationFailed => "compensation_failed",
            Self::Completed => "completed",
            Self::CompensationStarted => "compensation_started",
            Self::Compensated => "compensated",
            Self::Failed => "failed",
            Self::Retried => "retried",
            Self::Aborted => "aborted",
        }
    }
}

impl fmt::Display for SagaEventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SagaEventKind {
    type Err = UnknownStatus;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        serde_json::from_value(Value::String(s.to_owned())).map_err(|_| UnknownStatus(s.to_owned()))
    }
}

/// One line of a saga's step history.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SagaEvent {
    /// When it happened (ms since the Unix epoch).
    pub at_ms: i64,
    /// What happened.
    pub kind: SagaEventKind,
    /// The step it concerns, if any.
    pub step_id: Option<String>,
    /// The attempt number, for dispatches and failures.
    pub attempt: u32,
    /// Error text or an operator's reason.
    pub detail: Option<String>,
}

impl SagaEvent {
    /// An event of `kind` at `at_ms`.
    pub fn new(at_ms: i64, kind: SagaEventKind) -> Self {
        Self {
            at_ms,
            kind,
            step_id: None,
            attempt: 0,
            detail: None,
        }
    }
    /// Names the step.
    pub fn step(mut self, step_id: impl Into<String>, attempt: u32) -> Self {
        self.step_id = Some(step_id.into());
        self.attempt = attempt;
        self
    }
    /// Adds a detail.
    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }
}

/// Which sagas to list.
///
/// ```
/// use busway_core::saga_store::{SagaQuery, SagaStatus};
/// let failed = SagaQuery::status(SagaStatus::Failed).limit(50);
/// assert_eq!(failed.status, Some(SagaStatus::Failed));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SagaQuery {
    /// Only sagas with this status.
    pub status: Option<SagaStatus>,
    /// Only sagas last saved before this time (ms): stale ones.
    pub updated_before_ms: Option<i64>,
    /// Only sagas that are not terminal.
    pub active_only: bool,
    /// At most this many, oldest first.
    pub limit: usize,
}

impl Default for SagaQuery {
    fn default() -> Self {
        Self {
            status: None,
            updated_before_ms: None,
            active_only: false,
            limit: 100,
        }
    }
}

impl SagaQuery {
    /// Sagas with `status`.
    pub fn status(status: SagaStatus) -> Self {
        Self {
            status: Some(status),
            ..Self::default()
        }
    }
    /// Sets the largest number returned.
    pub fn limit(mut self, limit: usize) -> Self {
        self.limit = limit;
        self
    }

    /// Whether `saga` matches (for stores that filter in memory).
    pub fn matches(&self, saga: &SagaRecord) -> bool {
        self.status.is_none_or(|s| s == saga.status)
            && self
                .updated_before_ms
                .is_none_or(|t| saga.updated_at_ms < t)
            && (!self.active_only || !saga.status.is_terminal())
    }
}

macro_rules! backend_error {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident $({ $($(#[$fdoc:meta])* $field:ident : $ty:ty),* $(,)? })? => $msg:literal),* $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, thiserror::Error)]
        #[non_exhaustive]
        pub enum $name {
            $(
                $(#[$vdoc])*
                #[error($msg)]
                $variant $({ $($(#[$fdoc])* $field: $ty),* })?,
            )*
            /// The store is closed.
            #[error("the saga store is closed")]
            Closed,
            /// The backend failed.
            #[error("saga store backend error")]
            Backend {
                /// The cause.
                #[source]
                source: BoxError,
                /// Whether retrying may succeed.
                retryable: bool,
            },
        }

        impl $name {
            /// Whether trying the same call again may succeed.
            pub fn is_retryable(&self) -> bool {
                match self {
                    Self::Backend { retryable, .. } => *retryable,
                    _ => false,
                }
            }
            /// Wraps a backend failure.
            pub fn backend(source: impl Into<BoxError>, retryable: bool) -> Self {
                Self::Backend { source: source.into(), retryable }
            }
        }
    };
}

backend_error! {
    /// Creating a saga failed.
    CreateSagaError {
        /// A saga with this id exists already.
        AlreadyExists {
            /// The id.
            id: String
        } => "saga `{id}` already exists",
    }
}

backend_error! {
    /// Saving a saga failed.
    UpdateSagaError {
        /// No saga has this id.
        NotFound {
            /// The id.
            id: String
        } => "saga `{id}` does not exist",
        /// Someone saved the saga since it was loaded: reload it and decide again.
        Conflict {
            /// The id.
            id: String,
            /// The version the caller read.
            expected: u64,
            /// The version stored now.
            actual: u64
        } => "saga `{id}` is at version {actual}, not {expected}: another orchestrator advanced it",
    }
}

backend_error! {
    /// Reading sagas, their history or counts failed.
    LoadSagaError {
        /// A stored record could not be decoded.
        Corrupt {
            /// The saga id.
            id: String,
            /// What is wrong.
            reason: String
        } => "saga `{id}` is stored in a form that cannot be read: {reason}",
    }
}

backend_error! {
    /// Reading or saving a step result failed.
    StepResultError {}
}

/// Durable storage of sagas, their history and step results.
///
/// Dyn-compatible: orchestrators and participants hold an `Arc<dyn SagaStore>`.
///
/// ```
/// use busway_core::saga_store::SagaStore;
/// fn assert_object_safe(_: &dyn SagaStore) {}
/// ```
#[async_trait]
pub trait SagaStore: Send + Sync + 'static {
    /// Stores a new saga (its `version` as given, normally 1) with its first history lines.
    async fn create(&self, saga: &SagaRecord, events: &[SagaEvent]) -> Result<(), CreateSagaError>;

    /// Replaces a saga if its stored version is `expected_version`, and appends
    /// `events` to its history, atomically. `saga.version` is stored as is
    /// (normally `expected_version + 1`).
    async fn update(
        &self,
        saga: &SagaRecord,
        expected_version: u64,
        events: &[SagaEvent],
    ) -> Result<(), UpdateSagaError>;

    /// The saga with this id.
    async fn load(&self, id: &str) -> Result<Option<SagaRecord>, LoadSagaError>;

    /// Up to `limit` non-terminal sagas whose `due_at_ms` is at or before `now_ms`, earliest first.
    async fn due(&self, now_ms: i64, limit: usize) -> Result<Vec<SagaRecord>, LoadSagaError>;

    /// Sagas matching `query`, oldest first.
    async fn list(&self, query: &SagaQuery) -> Result<Vec<SagaRecord>, LoadSagaError>;

    /// How many sagas have each status (statuses with none are absent).
    async fn count_by_status(&self) -> Result<BTreeMap<SagaStatus, u64>, LoadSagaError>;

    /// The history of a saga, oldest first (empty if it does not exist).
    async fn history(&self, id: &str) -> Result<Vec<SagaEvent>, LoadSagaError>;

    /// The result stored under an idempotency key.
    async fn step_result(&self, key: &str) -> Result<Option<Value>, StepResultError>;

    /// Stores `result` under `key` unless a result is stored there already,
    /// and returns the stored one (the first writer wins).
    async fn save_step_result(&self, key: &str, result: &Value) -> Result<Value, StepResultError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for status in SagaStatus::ALL {
            assert_eq!(status.as_str().parse::<SagaStatus>(), Ok(status));
            let json = serde_json::to_value(status).ok();
            assert_eq!(json, Some(Value::String(status.as_str().into())));
        }
        let kind: Result<SagaEventKind, _> = "compensation_failed".parse();
        assert_eq!(kind, Ok(SagaEventKind::CompensationFailed));
        assert!("nope".parse::<SagaEventKind>().is_err());
    }

    #[test]
    fn conflict_is_not_retryable_but_says_why() {
        let e = UpdateSagaError::Conflict {
            id: "s1".into(),
            expected: 3,
            actual: 4,
        };
        assert!(!e.is_retryable());
        assert!(e.to_string().contains("version 4"), "{e}");
        assert!(UpdateSagaError::backend("disk busy", true).is_retryable());
    }
}
