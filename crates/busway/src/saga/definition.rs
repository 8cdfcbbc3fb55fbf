//! Saga definitions: the steps, who runs them, how they are retried.

use std::collections::HashSet;
use std::time::Duration;

use crate::handler::RetryPolicy;

/// How long a step waits for its participant unless told otherwise (the reference's 300 s).
pub const DEFAULT_STEP_TIMEOUT: Duration = Duration::from_secs(300);

/// A definition that cannot run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DefinitionError {
    /// The saga has no name.
    #[error("a saga definition needs a name")]
    EmptyName,
    /// The saga has no steps.
    #[error("saga `{saga}` has no steps")]
    NoSteps {
        /// The saga.
        saga: String,
    },
    /// Two steps have the same id.
    #[error("saga `{saga}` has two steps with the id `{step}`")]
    DuplicateStep {
        /// The saga.
        saga: String,
        /// The id used twice.
        step: String,
    },
    /// A step id, service or action name is empty.
    #[error("step `{step}` of saga `{saga}` has an empty {what}")]
    EmptyField {
        /// The saga.
        saga: String,
        /// The step.
        step: String,
        /// Which field.
        what: &'static str,
    },
    /// A timeout of zero would fail every attempt.
    #[error("step `{step}` of saga `{saga}` has a timeout of zero")]
    ZeroTimeout {
        /// The saga.
        saga: String,
        /// The step.
        step: String,
    },
    /// A retry policy allows no attempt.
    #[error("step `{step}` of saga `{saga}` allows zero attempts")]
    ZeroAttempts {
        /// The saga.
        saga: String,
        /// The step.
        step: String,
    },
    /// The participant service runs in this process and has no such handler.
    #[error("step `{step}` of saga `{saga}` names {what} `{name}`, which service `{service}` does not handle")]
    UnknownAction {
        /// The saga.
        saga: String,
        /// The step.
        step: String,
        /// `"action"` or `"compensation"`.
        what: &'static str,
        /// The service.
        service: String,
        /// The unknown name.
        name: String,
    },
}

impl DefinitionError {
    /// Never: a definition has to be fixed.
    pub fn is_retryable(&self) -> bool {
        false
    }
}

/// One step: an action on a participant service, the compensation that
/// undoes it, a timeout per attempt and retry policies.
///
/// ```
/// use busway::saga::SagaStep;
/// use busway::RetryPolicy;
/// use std::time::Duration;
///
/// let step = SagaStep::new("charge_payment", "payment_service", "charge_payment")
///     .compensate_with("refund_payment")
///     .timeout(Duration::from_secs(10))
///     .retry(RetryPolicy::default().with_max_attempts(4));
/// assert_eq!(step.id(), "charge_payment");
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct SagaStep {
    pub(crate) id: String,
    pub(crate) service: String,
    pub(crate) action: String,
    pub(crate) compensation: Option<String>,
    pub(crate) timeout: Duration,
    pub(crate) retry: RetryPolicy,
    pub(crate) compensation_retry: RetryPolicy,
}

impl SagaStep {
    /// A step `id` that calls `action` on `service`. By default: no
    /// compensation, a [`DEFAULT_STEP_TIMEOUT`] per attempt, 4 attempts (the
    /// reference's `max_retries = 3`) with exponential backoff, and 10
    /// attempts for the compensation.
    pub fn new(
        id: impl Into<String>,
        service: impl Into<String>,
        action: impl Into<String>,
    ) -> Self {
        let retry = RetryPolicy::default()
            .with_max_attempts(4)
            .with_backoff(Duration::from_secs(2), Duration::from_secs(60));
        Self {
            id: id.into(),
            service: service.into(),
            action: action.into(),
            compensation: None,
            timeout: DEFAULT_STEP_TIMEOUT,
            compensation_retry: retry.clone().with_max_attempts(10),
            retry,
        }
    }
    /// The action of `service` that undoes this step.
    pub fn compensate_with(mut self, compensation: impl Into<String>) -> Self {
        self.compensation = Some(compensation.into());
        self
    }
    /// How long one attempt (of the action or the compensation) may take.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
    /// How the action is retried.
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }
    /// How the compensation is retried before the saga is marked FAILED.
    pub fn compensation_retry(mut self, retry: RetryPolicy) -> Self {
        self.compensation_retry = retry;
        self
    }

    /// The step id.
    pub fn id(&self) -> &str {
        &self.id
    }
    /// The participant service.
    pub fn service(&self) -> &str {
        &self.service
    }
    /// The action name.
    pub fn action(&self) -> &str {
        &self.action
    }
    /// The compensation name, if any.
    pub fn compensation(&self) -> Option<&str> {
        self.compensation.as_deref()
    }
}

/// A saga definition: a name and its steps, in order. Build it with
/// [`SagaDefinition::builder`]; [`build`](SagaDefinitionBuilder::build)
/// rejects definitions that cannot run.
///
/// ```
/// use busway::saga::{DefinitionError, SagaDefinition, SagaStep};
/// use std::time::Duration;
///
/// let order = SagaDefinition::builder("order_saga")
///     .step(SagaStep::new("create_order", "order_service", "create_order").compensate_with("cancel_order"))
///     .step(SagaStep::new("charge_payment", "payment_service", "charge_payment").compensate_with("refund_payment"))
///     .build()?;
/// assert_eq!(order.steps().len(), 2);
///
/// let bad = SagaDefinition::builder("bad")
///     .step(SagaStep::new("a", "svc", "do_a").timeout(Duration::ZERO))
///     .build();
/// assert!(matches!(bad, Err(DefinitionError::ZeroTimeout { .. })));
/// # Ok::<(), DefinitionError>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct SagaDefinition {
    name: String,
    steps: Vec<SagaStep>,
}

impl SagaDefinition {
    /// Starts a definition called `name`.
    pub fn builder(name: impl Into<String>) -> SagaDefinitionBuilder {
        SagaDefinitionBuilder {
            name: name.into(),
            steps: Vec::new(),
        }
    }
    /// The name.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The steps, in order.
    pub fn steps(&self) -> &[SagaStep] {
        &self.steps
    }
    pub(crate) fn step(&self, index: usize) -> Option<&SagaStep> {
        self.steps.get(index)
    }
}

/// Builds a [`SagaDefinition`].
#[derive(Debug)]
#[must_use = "call build() to get the definition"]
pub struct SagaDefinitionBuilder {
    name: String,
    steps: Vec<SagaStep>,
}

impl SagaDefinitionBuilder {
    /// Appends a step.
    pub fn step(mut self, step: SagaStep) -> Self {
        self.steps.push(step);
        self
    }

    /// Checks the definition: a name, at least one step, unique non-empty
    /// step ids, non-empty service and action names, non-zero timeouts and
    /// at least one attempt.
    pub fn build(self) -> Result<SagaDefinition, DefinitionError> {
        let saga = self.name.clone();
        if saga.trim().is_empty() {
            return Err(DefinitionError::EmptyName);
        }
        if self.steps.is_empty() {
            return Err(DefinitionError::NoSteps { saga });
        }
        let mut ids = HashSet::new();
        for step in &self.steps {
            let empty = |what| DefinitionError::EmptyField {
                saga: saga.clone(),
                step: step.id.clone(),
                what,
            };
            if step.id.trim().is_empty() {
                return Err(empty("id"));
            }
            if step.service.trim().is_empty() {
                return Err(empty("service"));
            }
            if step.action.trim().is_empty() {
                return Err(empty("action"));
            }
            if step
                .compensation
                .as_deref()
                .is_some_and(|c| c.trim().is_empty())
            {
                return Err(empty("compensation"));
            }
            if step.timeout.is_zero() {
                return Err(DefinitionError::ZeroTimeout {
                    saga,
                    step: step.id.clone(),
                });
            }
            if step.retry.max_attempts == 0 || step.compensation_retry.max_attempts == 0 {
                return Err(DefinitionError::ZeroAttempts {
                    saga,
                    step: step.id.clone(),
                });
            }
            if !ids.insert(step.id.as_str()) {
                return Err(DefinitionError::DuplicateStep {
                    saga,
                    step: step.id.clone(),
                });
            }
        }
        Ok(SagaDefinition {
            name: self.name,
            steps: self.steps,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(id: &str) -> SagaStep {
        SagaStep::new(id, "svc", "act")
    }

    #[test]
    fn bad_definitions_are_rejected_with_the_reason() {
        let dup = SagaDefinition::builder("s")
            .step(step("a"))
            .step(step("a"))
            .build();
        assert_eq!(
            dup,
            Err(DefinitionError::DuplicateStep {
                saga: "s".into(),
                step: "a".into()
            })
        );
        assert!(matches!(
            SagaDefinition::builder("s").build(),
            Err(DefinitionError::NoSteps { .. })
        ));
        assert!(matches!(
            SagaDefinition::builder(" ").step(step("a")).build(),
            Err(DefinitionError::EmptyName)
        ));
        assert!(matches!(
            SagaDefinition::builder("s")
                .step(SagaStep::new("a", "svc", ""))
                .build(),
            Err(DefinitionError::EmptyField { what: "action", .. })
        ));
        let zero = RetryPolicy {
            max_attempts: 0,
            ..RetryPolicy::default()
        };
        assert!(matches!(
            SagaDefinition::builder("s")
                .step(step("a").retry(zero))
                .build(),
            Err(DefinitionError::ZeroAttempts { .. })
        ));
        assert!(matches!(
            SagaDefinition::builder("s")
                .step(step("a").timeout(Duration::ZERO))
                .build(),
            Err(DefinitionError::ZeroTimeout { .. })
        ));
        assert!(SagaDefinition::builder("s")
            .step(step("a"))
            .step(step("b"))
            .build()
            .is_ok());
    }
}
