//! Payload codecs, chosen by content type.

use bytes::Bytes;
use serde::{de::DeserializeOwned, Serialize};

/// The JSON content type, the default.
pub const CONTENT_TYPE_JSON: &str = "application/json";
/// The MessagePack content type (needs the `msgpack` feature).
pub const CONTENT_TYPE_MSGPACK: &str = "application/msgpack";

/// A payload encoding.
///
/// ```
/// use busway_core::Codec;
/// let codec = Codec::for_content_type("application/json; charset=utf-8")?;
/// let bytes = codec.encode(&vec![1, 2, 3])?;
/// assert_eq!(codec.decode::<Vec<u8>>(&bytes)?, vec![1, 2, 3]);
/// # Ok::<(), busway_core::CodecError>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Codec {
    /// `application/json`.
    Json,
    /// `application/msgpack` (also accepts `application/x-msgpack`).
    #[cfg(feature = "msgpack")]
    MessagePack,
}

/// Encoding or decoding a payload failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// No codec handles this content type.
    #[error("unsupported content type `{0}`")]
    UnsupportedContentType(String),
    /// The value could not be encoded.
    #[error("could not encode payload as {content_type}: {message}")]
    Encode {
        /// The content type.
        content_type: &'static str,
        /// What went wrong.
        message: String,
    },
    /// The payload is not valid for its content type or does not fit the expected shape.
    #[error("could not decode {content_type} payload: {message}")]
    Decode {
        /// The content type.
        content_type: &'static str,
        /// What went wrong.
        message: String,
    },
}

impl CodecError {
    /// Codec errors never succeed on retry: the bytes will not change.
    pub fn is_retryable(&self) -> bool {
        false
    }
}

impl Codec {
    /// The codec for a content type; parameters such as `; charset=utf-8` are ignored.
    pub fn for_content_type(content_type: &str) -> Result<Self, CodecError> {
        // Read for every message received: compared without allocating.
        let essence = content_type.split(';').next().unwrap_or("").trim();
        let is = |names: &[&str]| names.iter().any(|n| essence.eq_ignore_ascii_case(n));
        if is(&["application/json", "text/json", ""]) {
            return Ok(Self::Json);
        }
        #[cfg(feature = "msgpack")]
        if is(&[
            "application/msgpack",
            "application/x-msgpack",
            "application/vnd.msgpack",
        ]) {
            return Ok(Self::MessagePack);
        }
        Err(CodecError::UnsupportedContentType(content_type.to_owned()))
    }

    /// The content type this codec writes.
    pub fn content_type(&self) -> &'static str {
        match self {
            Self::Json => CONTENT_TYPE_JSON,
            #[cfg(feature = "msgpack")]
            Self::MessagePack => CONTENT_TYPE_MSGPACK,
        }
    }

    /// Encodes `value`.
    pub fn encode<T: Serialize + ?Sized>(&self, value: &T) -> Result<Bytes, CodecError> {
        let content_type = self.content_type();
        let encoded = match self {
            Self::Json => serde_json::to_vec(value).map_err(|e| e.to_string()),
            #[cfg(feature = "msgpack")]
            Self::MessagePack => rmp_serde::to_vec_named(value).map_err(|e| e.to_string()),
        };
        encoded
            .map(Bytes::from)
            .map_err(|message| CodecError::Encode {
                content_type,
                message,
            })
    }

    /// Decodes `bytes`.
    pub fn decode<T: DeserializeOwned>(&self, bytes: &[u8]) -> Result<T, CodecError> {
        let content_type = self.content_type();
        let decoded = match self {
            Self::Json => serde_json::from_slice(bytes).map_err(|e| e.to_string()),
            #[cfg(feature = "msgpack")]
            Self::MessagePack => rmp_serde::from_slice(bytes).map_err(|e| e.to_string()),
        };
        decoded.map_err(|message| CodecError::Decode {
            content_type,
            message,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_json_is_a_decode_error() {
        let err = Codec::Json.decode::<serde_json::Value>(b"{not json");
        assert!(matches!(err, Err(CodecError::Decode { .. })));
    }

    #[test]
    fn unknown_content_type_is_an_error() {
        assert!(matches!(
            Codec::for_content_type("text/csv"),
            Err(CodecError::UnsupportedContentType(_))
        ));
    }

    #[cfg(feature = "msgpack")]
    #[test]
    fn msgpack_round_trip() -> Result<(), CodecError> {
        let codec = Codec::for_content_type("application/x-msgpack")?;
        let value = serde_json::json!({"a": 1, "b": [true, null]});
        let back: serde_json::Value = codec.decode(&codec.encode(&value)?)?;
        assert_eq!(back, value);
        Ok(())
    }
}
