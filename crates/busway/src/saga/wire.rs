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

/// A [`StepCommand`] as the orchestrator sends it: the same JSON, encoded
/// from the saga as it is, without copying its input and outputs.
#[derive(Debug, Serialize)]
pub(crate) struct StepCommandRef<'a> {
    pub(crate) saga_id: &'a str,
    pub(crate) saga: &'a str,
    pub(crate) step_id: &'a str,
    pub(crate) phase: Phase,
    pub(crate) attempt: u32,
    pub(crate) idempotency_key: String,
    pub(crate) action_key: String,
    pub(crate) input: &'a Value,
    pub(crate) outputs: BTreeMap<&'a str, &'a Value>,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_borrowed_command_encodes_like_an_owned_one() -> Result<(), serde_json::Error> {
        let input = serde_json::json!({"order_id": "o-1", "amount": 30});
        let output = serde_json::json!({"reserved": true});
        let borrowed = StepCommandRef {
            saga_id: "s-1",
            saga: "order",
            step_id: "charge",
            phase: Phase::Compensation,
            attempt: 2,
            idempotency_key: idempotency_key("s-1", "charge", Phase::Compensation),
            action_key: idempotency_key("s-1", "charge", Phase::Action),
            input: &input,
            outputs: BTreeMap::from([("reserve", &output)]),
        };
        let decoded: StepCommand = serde_json::from_str(&serde_json::to_string(&borrowed)?)?;
        assert_eq!(decoded.saga_id, "s-1");
        assert_eq!(decoded.phase, Phase::Compensation);
        assert_eq!(decoded.attempt, 2);
        assert_eq!(decoded.idempotency_key, "s-1/charge/compensation");
        assert_eq!(decoded.action_key, "s-1/charge/action");
        assert_eq!(decoded.input, input);
        assert_eq!(decoded.outputs.get("reserve"), Some(&output));
        Ok(())
    }
}
