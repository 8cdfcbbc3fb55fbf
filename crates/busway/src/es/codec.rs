//! Typed events to stored events and back, with upcasting.

use std::collections::HashMap;
use std::sync::Arc;

use busway_core::event_store::{NewEvent, StoredEvent};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

/// A typed event could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot encode event: {reason}")]
#[non_exhaustive]
pub struct EncodeError {
    /// What is wrong.
    pub reason: String,
}

impl EncodeError {
    pub(crate) fn from_reason(reason: String) -> Self {
        Self::new(reason)
    }
    fn new(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
        }
    }
    /// Never: the event type itself is wrong.
    pub fn is_retryable(&self) -> bool {
        false
    }
}

/// A stored event could not be turned into the type the reader asked for
/// (unknown type, corrupted payload, failing upcaster). Names the event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot decode event `{event_type}` (schema {schema_version}) at stream `{stream}` version {version}, position {position}: {reason}")]
#[non_exhaustive]
pub struct DecodeError {
    /// The event's stream.
    pub stream: String,
    /// Its version in the stream.
    pub version: u64,
    /// Its global position.
    pub position: u64,
    /// Its stored type.
    pub event_type: String,
    /// Its stored schema version.
    pub schema_version: u32,
    /// What went wrong.
    pub reason: String,
}

impl DecodeError {
    fn new(event: &StoredEvent, reason: impl Into<String>) -> Self {
        Self {
            stream: event.stream.clone(),
            version: event.version,
            position: event.position,
            event_type: event.event_type.clone(),
            schema_version: event.schema_version,
            reason: reason.into(),
        }
    }
    /// Never: decoding the same bytes fails the same way.
    pub fn is_retryable(&self) -> bool {
        false
    }
}

type UpcastFn = Arc<dyn Fn(Value) -> Result<Value, String> + Send + Sync>;

struct Upcaster {
    to_type: String,
    convert: UpcastFn,
}

/// Registered conversions from old event shapes to new ones, applied on
/// read: an event stored as `(type, schema version)` passes through every
/// upcaster registered for it, in turn, until none applies. New events are
/// written with the current schema version of their type (one more than
/// the highest upcaster registered from it, or 1).
///
/// ```
/// use busway::es::Upcasters;
/// use serde_json::json;
///
/// // Version 1 of `user.registered` had `name`; version 2 splits it.
/// let upcasters = Upcasters::new().register("user.registered", 1, |mut data| {
///     let name = data["name"].take();
///     Ok(json!({"first_name": name, "last_name": ""}))
/// });
/// assert_eq!(upcasters.current_version("user.registered"), 2);
/// let (event_type, data) = upcasters.upcast("user.registered", 1, json!({"name": "Ann"}))?;
/// assert_eq!(event_type, "user.registered");
/// assert_eq!(data["first_name"], "Ann");
/// # Ok::<(), String>(())
/// ```
#[derive(Clone, Default)]
pub struct Upcasters {
    steps: HashMap<(String, u32), Arc<Upcaster>>,
    current: HashMap<String, u32>,
}

impl std::fmt::Debug for Upcasters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upcasters")
            .field("current", &self.current)
            .finish_non_exhaustive()
    }
}

impl Upcasters {
    /// No upcasters: every type is at schema version 1.
    pub fn new() -> Self {
        Self::default()
    }

    /// Converts `event_type` at schema `from_version` to `from_version + 1`.
    pub fn register(
        self,
        event_type: &str,
        from_version: u32,
        convert: impl Fn(Value) -> Result<Value, String> + Send + Sync + 'static,
    ) -> Self {
        self.register_renamed(event_type, from_version, event_type, convert)
    }

    /// Converts `event_type` at schema `from_version` into `to_type` at
    /// schema `from_version + 1` (a renamed event).
    pub fn register_renamed(
        mut self,
        event_type: &str,
        from_version: u32,
        to_type: &str,
        convert: impl Fn(Value) -> Result<Value, String> + Send + Sync + 'static,
    ) -> Self {
        self.steps.insert(
            (event_type.to_owned(), from_version),
            Arc::new(Upcaster {
                to_type: to_type.to_owned(),
                convert: Arc::new(convert),
            }),
        );
        let next = from_version + 1;
        let current = self.current.entry(to_type.to_owned()).or_insert(1);
        *current = (*current).max(next);
        self
    }

    /// The schema version new events of `event_type` are written with.
    pub fn current_version(&self, event_type: &str) -> u32 {
        self.current.get(event_type).copied().unwrap_or(1)
    }

    /// Applies the upcasters for `(event_type, version)` in turn.
    pub fn upcast(
        &self,
        event_type: &str,
        version: u32,
        mut data: Value,
    ) -> Result<(String, Value), String> {
        let mut event_type = event_type.to_owned();
        // Each step raises the version, so this ends; the bound guards against a cycle.
        for version in version..version.saturating_add(1024) {
            let Some(step) = self.steps.get(&(event_type.clone(), version)) else {
                return Ok((event_type, data));
            };
            data = (step.convert)(data).map_err(|e| {
                format!("upcasting `{event_type}` from schema {version} failed: {e}")
            })?;
            event_type.clone_from(&step.to_type);
        }
        Err(format!("upcasters for `{event_type}` form a cycle"))
    }
}

/// Encodes a typed event as a [`NewEvent`]. Event types are enums tagged
/// adjacently, `#[serde(tag = "type", content = "data")]`, each variant
/// renamed to its event type (`#[serde(rename = "user.registered")]`): the
/// tag becomes the stored type and the content the stored data.
///
/// ```
/// use busway::es::{decode_event, encode_event, Upcasters};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Serialize, Deserialize, Debug, PartialEq)]
/// #[serde(tag = "type", content = "data")]
/// enum UserEvent {
///     #[serde(rename = "user.registered")]
///     Registered { email: String },
///     #[serde(rename = "user.deactivated")]
///     Deactivated,
/// }
///
/// let event = encode_event(&UserEvent::Registered { email: "a@b.test".into() }, &Upcasters::new())?;
/// assert_eq!(event.event_type, "user.registered");
/// assert_eq!(&event.data[..], br#"{"email":"a@b.test"}"#);
/// # Ok::<(), busway::es::EncodeError>(())
/// ```
pub fn encode_event<E: Serialize>(
    event: &E,
    upcasters: &Upcasters,
) -> Result<NewEvent, EncodeError> {
    let value = serde_json::to_value(event).map_err(|e| EncodeError::new(e.to_string()))?;
    let Value::Object(mut map) = value else {
        return Err(EncodeError::new(
            "an event must serialize as {\"type\", \"data\"}: use #[serde(tag = \"type\", content = \"data\")]",
        ));
    };
    let Some(Value::String(event_type)) = map.remove("type") else {
        return Err(EncodeError::new(
            "an event must have a string `type`: use #[serde(tag = \"type\", content = \"data\")]",
        ));
    };
    let data = map.remove("data").unwrap_or(Value::Null);
    if !map.is_empty() {
        return Err(EncodeError::new(format!(
            "an event must have only `type` and `data`, `{event_type}` also has {:?}",
            map.keys().collect::<Vec<_>>()
        )));
    }
    let bytes = serde_json::to_vec(&data).map_err(|e| EncodeError::new(e.to_string()))?;
    let version = upcasters.current_version(&event_type);
    Ok(NewEvent::new(event_type, bytes).with_schema_version(version))
}

/// The stored event's payload, upcast to the current schema: `(type, data)`.
pub fn upcast_stored(
    stored: &StoredEvent,
    upcasters: &Upcasters,
) -> Result<(String, Value), DecodeError> {
    let data: Value = serde_json::from_slice(&stored.data)
        .map_err(|e| DecodeError::new(stored, format!("the payload is not JSON: {e}")))?;
    upcasters
        .upcast(&stored.event_type, stored.schema_version, data)
        .map_err(|e| DecodeError::new(stored, e))
}

/// Decodes a stored event as `E` (see [`encode_event`] for the shape),
/// upcasting it first.
pub fn decode_event<E: DeserializeOwned>(
    stored: &StoredEvent,
    upcasters: &Upcasters,
) -> Result<E, DecodeError> {
    let (event_type, data) = upcast_stored(stored, upcasters)?;
    let tagged = if data.is_null() {
        serde_json::json!({ "type": event_type })
    } else {
        serde_json::json!({"type": event_type, "data": data})
    };
    serde_json::from_value(tagged).map_err(|e| DecodeError::new(stored, e.to_string()))
}
