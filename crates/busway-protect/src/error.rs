//! What can go wrong while protecting or opening a message.

use std::time::Duration;

/// Protecting a message (on publish) or opening one (on receive) failed.
///
/// On receive every variant means the message must not be processed: the
/// `Bus` dead-letters it with [`Display`](std::fmt::Display) as the reason
/// and counts it under [`reason`](Self::reason). Messages never contain key
/// material, and the errors never include payload bytes.
///
/// ```
/// use busway_protect::ProtectError;
/// let error = ProtectError::UnknownKey { key_id: "2025-12".into() };
/// assert_eq!(error.reason(), "unknown_key");
/// assert!(error.to_string().contains("2025-12"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtectError {
    /// The keyring has no key to encrypt or sign with (no key, or
    /// [`encrypt_with`](crate::Keyring::encrypt_with) names a missing id).
    /// A configuration error on the publishing side.
    #[error("the keyring has no key to protect messages with (current key: {current:?})")]
    NoCurrentKey {
        /// The id the keyring was told to use, if any.
        current: Option<String>,
    },
    /// The message names a key this keyring does not hold: it was protected
    /// with a key not yet (or no longer) distributed to this consumer.
    #[error("unknown key id `{key_id}`")]
    UnknownKey {
        /// The key id from the message.
        key_id: String,
    },
    /// The message is not protected although protection is required.
    #[error(
        "the message is not protected (no `{}` header) and protection is required",
        crate::headers::ALGORITHM
    )]
    Unprotected,
    /// The message names an algorithm this crate does not know.
    #[error("unsupported protection algorithm `{algorithm}`")]
    UnsupportedAlgorithm {
        /// The algorithm from the message.
        algorithm: String,
    },
    /// The message uses an algorithm other than the one configured.
    #[error("the message is protected with `{found}`, but this consumer expects `{expected}`")]
    AlgorithmMismatch {
        /// The configured algorithm (`none` without one).
        expected: &'static str,
        /// The algorithm of the message.
        found: &'static str,
    },
    /// The message names a content encoding this crate does not know.
    #[error("unsupported content encoding `{encoding}`")]
    UnsupportedEncoding {
        /// The encoding from the message.
        encoding: String,
    },
    /// A protection header is missing or not well formed.
    #[error("protection header `{header}` is {problem}")]
    MalformedHeader {
        /// The header.
        header: &'static str,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// The ciphertext is shorter than an authentication tag.
    #[error("the ciphertext is truncated ({len} bytes; at least {min} expected)")]
    Truncated {
        /// The payload's length.
        len: usize,
        /// The shortest valid ciphertext.
        min: usize,
    },
    /// Decryption failed: the payload, a header or the message's identity was
    /// altered, or the ciphertext was moved from another message.
    #[error("decryption failed with key `{key_id}`: the message was tampered with or moved")]
    Tampered {
        /// The key id from the message.
        key_id: String,
    },
    /// The HMAC signature does not match the message.
    #[error("bad signature for key `{key_id}`: the message was tampered with")]
    BadSignature {
        /// The key id from the message.
        key_id: String,
    },
    /// The message was sent longer ago than the replay window allows, or too
    /// far in the future.
    #[error("the message is outside the replay window: sent {age_ms} ms ago, window {window:?}")]
    Expired {
        /// How long ago it was sent, in milliseconds (negative: in the future).
        age_ms: i64,
        /// The replay window.
        window: Duration,
    },
    /// A message with this id was already received on this queue within the
    /// replay window.
    #[error("message `{id}` was already received within the replay window")]
    Replayed {
        /// The message id.
        id: uuid::Uuid,
    },
    /// The payload is larger than allowed.
    #[error("payload of {size} bytes exceeds the maximum of {max} bytes")]
    TooLarge {
        /// The payload's size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The payload decompresses to more than allowed (a compression bomb).
    #[error("payload decompresses to more than the maximum of {max} bytes")]
    DecompressedTooLarge {
        /// The limit.
        max: usize,
    },
    /// The compressed payload is corrupt.
    #[error("the {encoding} payload is corrupt: {problem}")]
    CorruptCompression {
        /// The encoding.
        encoding: &'static str,
        /// What the decoder said.
        problem: String,
    },
    /// More headers than allowed.
    #[error("{count} headers exceed the maximum of {max}")]
    TooManyHeaders {
        /// How many there are.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// The headers' names and values together are larger than allowed.
    #[error("headers of {size} bytes exceed the maximum of {max} bytes")]
    HeadersTooLarge {
        /// Their total size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The cipher refused to encrypt (the payload is beyond the algorithm's limits).
    #[error("encryption failed")]
    EncryptionFailed,
}

impl ProtectError {
    /// Whether trying again may succeed. Only an unknown key may: the key can
    /// be distributed later and the dead letter replayed. Tampering, bad
    /// signatures, replays and oversized payloads never succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::UnknownKey { .. })
    }

    /// A short, fixed label for metrics (`busway_messages_rejected_total{reason}`).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NoCurrentKey { .. } => "no_current_key",
            Self::UnknownKey { .. } => "unknown_key",
            Self::Unprotected => "unprotected",
            Self::UnsupportedAlgorithm { .. } | Self::AlgorithmMismatch { .. } => "algorithm",
            Self::UnsupportedEncoding { .. } => "encoding",
            Self::MalformedHeader { .. } => "malformed_header",
            Self::Truncated { .. } => "truncated",
            Self::Tampered { .. } => "tampered",
            Self::BadSignature { .. } => "bad_signature",
            Self::Expired { .. } => "expired",
            Self::Replayed { .. } => "replayed",
            Self::TooLarge { .. } => "too_large",
            Self::DecompressedTooLarge { .. } => "decompression_bomb",
            Self::CorruptCompression { .. } => "corrupt_compression",
            Self::TooManyHeaders { .. } => "too_many_headers",
            Self::HeadersTooLarge { .. } => "headers_too_large",
            Self::EncryptionFailed => "encryption_failed",
        }
    }
}
