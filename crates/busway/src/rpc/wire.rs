//! The reference RPC bodies.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
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

/// A request as read from JSON: the params left encoded, the method and
/// timestamp borrowed where the body allows.
#[derive(Debug, Deserialize)]
pub(crate) struct RequestIn<'a> {
    #[serde(borrow)]
    pub(crate) method: Cow<'a, str>,
    #[serde(borrow, default)]
    pub(crate) params: Option<&'a RawValue>,
    /// Read (and checked to be a string) like [`RequestBody::timestamp`], not used.
    #[serde(rename = "timestamp", borrow, default)]
    _timestamp: Option<Cow<'a, str>>,
}

/// A reply: `{"status": "success", "data": any}` or `{"status": "error", "message": str}`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub(crate) enum ResponseBody<D = Value> {
    Success {
        #[serde(default)]
        data: D,
    },
    Error {
        message: String,
    },
}

/// The queue a service listens on: `rpc_{service}`.
pub(crate) fn service_queue(
    service: &str,
) -> Result<busway_core::QueueName, busway_core::NameError> {
    // Built for every call: without the formatting machinery.
    let mut name = String::with_capacity(4 + service.len());
    name.push_str("rpc_");
    name.push_str(service);
    busway_core::QueueName::new(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_shapes() -> Result<(), serde_json::Error> {
        let ok = serde_json::to_value(ResponseBody::<Value>::Success { data: 7.into() })?;
        assert_eq!(ok, serde_json::json!({"status": "success", "data": 7}));
        let raw = serde_json::value::to_raw_value(&[1, 2])?;
        let ok = serde_json::to_string(&ResponseBody::Success { data: raw })?;
        assert_eq!(ok, r#"{"status":"success","data":[1,2]}"#);
        let err = serde_json::to_value(ResponseBody::<Value>::Error {
            message: "no".into(),
        })?;
        assert_eq!(err, serde_json::json!({"status": "error", "message": "no"}));
        let req: RequestBody = serde_json::from_str(
            r#"{"method":"get_user","params":{"user_id":1},"timestamp":"2024-01-01T00:00:00"}"#,
        )?;
        assert_eq!(req.method, "get_user");
        let req: RequestIn<'_> = serde_json::from_str(
            r#"{"method":"get_user","params":{"user_id":1},"timestamp":"2024-01-01T00:00:00"}"#,
        )?;
        assert_eq!(req.method, "get_user");
        assert_eq!(req.params.map(RawValue::get), Some(r#"{"user_id":1}"#));
        assert!(serde_json::from_str::<RequestIn<'_>>(r#"{"method":"m","timestamp":7}"#).is_err());
        Ok(())
    }
}
