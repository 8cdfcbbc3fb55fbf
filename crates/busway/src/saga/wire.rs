//! What the orchestrator sends a participant and what it answers.
//!
//! A step command is an RPC request (reference RPC format) to service
//! `{service}`, method `{action}` or `{compensation}`, with these params;
//! the reply's `data` is a [`StepReply`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Which half of a step a command runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Phase {
    Action,
    Compensation,
}

impl Phase {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Phase::Action => "action",
            Phase::Compensation => "compensation",
        }
    }
}

/// The params of a step command.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct StepCommand {
    pub(crate) saga_id: String,
    pub(crate) saga: String,
    pub(crate) step_id: String,
    pub(crate) phase: Phase,
    pub(crate) attempt: u32,
    /// Replays of this command carry the same key; the participant answers
    /// them with the result it stored the first time.
    pub(crate) idempotency_key: String,
    /// The key of this step's action (for a compensation: so the action can
    /// be fenced off if it never ran).
    pub(crate) action_key: String,
    pub(crate) input: Value,
    /// Outputs of the steps completed so far, by step id.
    #[serde(default)]
    pub(crate) outputs: BTreeMap<String, Value>,
}

/// The reply to a step command.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "lowercase")]
pub(crate) enum StepReply {
    /// Done; `output` feeds later steps and the compensation.
    Completed {
        #[serde(default)]
        output: Value,
    },
    /// Not done. `retryable: false` means retrying cannot help.
    Failed { error: String, retryable: bool },
}

/// The idempotency key of one half of one step of one saga.
pub(crate) fn idempotency_key(saga_id: &str, step_id: &str, phase: Phase) -> String {
    format!("{saga_id}/{step_id}/{}", phase.as_str())
}
