//! The reference RPC bodies.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A request: `{"method": str, "params": object, "timestamp": ISO-8601}`.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct RequestBody {
    pub(crate) method: String,
    #[serde(default)]
    pub(crate) params: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) timestamp: Option<String>,
}

/// A reply: `{"status": "success", "data": any}` or `{"status": "error", "message": str}`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub(crate) enum ResponseBody {
    Success {
        #[serde(default)]
        data: Value,
    },
    Error {
        message: String,
    },
}

/// The queue a service listens on: `rpc_{service}`.
pub(crate) fn service_queue(
    service: &str,
) -> Result<busway_core::QueueName, busway_core::NameError> {
    busway_core::QueueName::new(format!("rpc_{service}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_shapes() -> Result<(), serde_json::Error> {
        let ok = serde_json::to_value(ResponseBody::Success { data: 7.into() })?;
        assert_eq!(ok, serde_json::json!({"status": "success", "data": 7}));
        let err = serde_json::to_value(ResponseBody::Error {
            message: "no".into(),
        })?;
        assert_eq!(err, serde_json::json!({"status": "error", "message": "no"}));
        let req: RequestBody = serde_json::from_str(
            r#"{"method":"get_user","params":{"user_id":1},"timestamp":"2024-01-01T00:00:00"}"#,
        )?;
        assert_eq!(req.method, "get_user");
        Ok(())
    }
}
