//! Params read from a JSON body without building a tree of them: where
//! they are in the payload is kept, and a handler decodes that text
//! straight into its own type (RPC requests and tasks).

use std::ops::Range;

use busway_core::{Codec, CodecError, Message, CONTENT_TYPE_JSON};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

use crate::HandlerError;

/// The params of a received body.
pub(crate) enum Params {
    /// Where the params' JSON text is in the payload; `None` when the body
    /// has no `params` (or `null`).
    Raw(Option<Range<usize>>),
    /// Params decoded from a body in another encoding than JSON.
    Value(Value),
}

impl Params {
    /// Where `raw`, read from `payload`, is in it.
    pub(crate) fn located(payload: &[u8], raw: Option<&RawValue>) -> Self {
        Self::Raw(raw.map(|raw| {
            let start = (raw.get().as_ptr() as usize).saturating_sub(payload.as_ptr() as usize);
            start..start + raw.get().len()
        }))
    }
}

/// `message`'s body read as `T`, borrowing from the payload, when the
/// payload is JSON; `Ok(None)` for other encodings.
pub(crate) fn read_json<'a, T: Deserialize<'a>>(
    message: &'a Message,
) -> Result<Option<T>, CodecError> {
    if !matches!(
        Codec::for_content_type(&message.content_type),
        Ok(Codec::Json)
    ) {
        return Ok(None);
    }
    serde_json::from_slice(&message.payload)
        .map(Some)
        .map_err(|e| CodecError::Decode {
            content_type: CONTENT_TYPE_JSON,
            message: e.to_string(),
        })
}

/// The JSON text of params left in `message`'s payload at `range`
/// (`null` for none).
pub(crate) fn text<'a>(
    message: &'a Message,
    range: &Option<Range<usize>>,
) -> Result<&'a str, HandlerError> {
    match range {
        None => Ok("null"),
        Some(range) => message
            .payload
            .get(range.clone())
            .and_then(|text| std::str::from_utf8(text).ok())
            .ok_or_else(|| HandlerError::permanent("invalid params: not JSON text")),
    }
}
