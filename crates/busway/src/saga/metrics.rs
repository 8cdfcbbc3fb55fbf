//! Saga metrics, through the `metrics` facade (install any recorder, such as
//! a Prometheus exporter, to collect them) and as a [`SagaStats`] snapshot.
//!
//! The `busway_saga_*` metrics (sagas started, completed, compensated and
//! failed, durations, step attempts and failures, compensations, conflicts,
//! stuck sagas) are listed with every other busway metric in one table, in
//! [`busway::metrics`](crate::metrics).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::wire::Phase;

/// What an orchestrator has counted since it started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SagaStats {
    /// Sagas started here.
    pub started: u64,
    /// Sagas this orchestrator brought to COMPLETED.
    pub completed: u64,
    /// Sagas this orchestrator brought to COMPENSATED.
    pub compensated: u64,
    /// Sagas this orchestrator brought to FAILED.
    pub failed: u64,
    /// Action and compensation attempts dispatched.
    pub step_attempts: u64,
    /// Attempts that failed (error reply, timeout, transport error).
    pub step_failures: u64,
    /// Compensations that succeeded.
    pub compensations: u64,
    /// Saves refused because another orchestrator advanced the saga first.
    pub conflicts: u64,
    /// Sagas taken over from the store (crash recovery, operator retries).
    pub recovered: u64,
    /// Active sagas without progress past the stuck threshold, at the last check.
    pub stuck: u64,
}

impl SagaStats {
    /// Completed ÷ (completed + compensated + failed); 1 when nothing finished yet.
    pub fn completion_rate(&self) -> f64 {
        let finished = self.completed + self.compensated + self.failed;
        if finished == 0 {
            1.0
        } else {
            self.completed as f64 / finished as f64
        }
    }
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    started: AtomicU64,
    completed: AtomicU64,
    compensated: AtomicU64,
    failed: AtomicU64,
    step_attempts: AtomicU64,
    step_failures: AtomicU64,
    compensations: AtomicU64,
    conflicts: AtomicU64,
    recovered: AtomicU64,
    stuck: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// How a saga ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    Completed,
    Compensated,
    Failed,
}

impl Counters {
    pub(crate) fn snapshot(&self) -> SagaStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        SagaStats {
            started: get(&self.started),
            completed: get(&self.completed),
            compensated: get(&self.compensated),
            failed: get(&self.failed),
            step_attempts: get(&self.step_attempts),
            step_failures: get(&self.step_failures),
            compensations: get(&self.compensations),
            conflicts: get(&self.conflicts),
            recovered: get(&self.recovered),
            stuck: get(&self.stuck),
        }
    }

    pub(crate) fn started(&self, saga: &str) {
        bump(&self.started);
        metrics::counter!("busway_saga_started_total", "saga" => saga.to_owned()).increment(1);
    }

    pub(crate) fn finished(&self, saga: &str, outcome: Outcome, duration: Duration) {
        let (counter, name, label) = match outcome {
            Outcome::Completed => (&self.completed, "busway_saga_completed_total", "completed"),
            Outcome::Compensated => (
                &self.compensated,
                "busway_saga_compensated_total",
                "compensated",
            ),
            Outcome::Failed => (&self.failed, "busway_saga_failed_total", "failed"),
        };
        bump(counter);
        metrics::counter!(name, "saga" => saga.to_owned()).increment(1);
        metrics::histogram!("busway_saga_duration_seconds", "saga" => saga.to_owned(), "outcome" => label)
            .record(duration.as_secs_f64());
        metrics::gauge!("busway_saga_completion_ratio").set(self.snapshot().completion_rate());
    }

    pub(crate) fn attempt(&self, saga: &str, step: &str, phase: Phase) {
        bump(&self.step_attempts);
        metrics::counter!("busway_saga_step_attempts_total", "saga" => saga.to_owned(), "step" => step.to_owned(), "phase" => phase.as_str())
            .increment(1);
    }

    pub(crate) fn failure(&self, saga: &str, step: &str, phase: Phase) {
        bump(&self.step_failures);
        metrics::counter!("busway_saga_step_failures_total", "saga" => saga.to_owned(), "step" => step.to_owned(), "phase" => phase.as_str())
            .increment(1);
    }

    pub(crate) fn compensated_step(&self, saga: &str, step: &str) {
        bump(&self.compensations);
        metrics::counter!("busway_saga_compensations_total", "saga" => saga.to_owned(), "step" => step.to_owned())
            .increment(1);
    }

    pub(crate) fn conflict(&self) {
        bump(&self.conflicts);
        metrics::counter!("busway_saga_conflicts_total").increment(1);
    }

    pub(crate) fn recovered(&self) {
        bump(&self.recovered);
    }

    pub(crate) fn stuck(&self, n: u64) {
        self.stuck.store(n, Ordering::Relaxed);
        metrics::gauge!("busway_saga_stuck").set(n as f64);
    }
}
