//! Names of the headers a [`PayloadProtection`](crate::PayloadProtection)
//! sets on protected messages.
//!
//! All of them are authenticated except [`SIGNATURE`] (which carries the
//! authentication itself). Headers whose names start with `x-` belong to
//! transports and brokers (dead-letter reasons, attempt counts; the RabbitMQ
//! transport keeps `x-busway-*` for itself) and are not authenticated; every
//! other header is.

/// The prefix of every protection header.
pub const PREFIX: &str = "busway-protect-";
/// The algorithm: `aes-256-gcm`, `chacha20-poly1305` or `hmac-sha256`.
pub const ALGORITHM: &str = "busway-protect-algorithm";
/// The id of the key in the [`Keyring`](crate::Keyring) that protected the message.
pub const KEY_ID: &str = "busway-protect-key-id";
/// The AEAD nonce, 12 bytes as lowercase hex.
pub const NONCE: &str = "busway-protect-nonce";
/// The HMAC-SHA256 tag of a signed message, 32 bytes as lowercase hex.
pub const SIGNATURE: &str = "busway-protect-signature";
/// How the payload was compressed before encryption: `zstd` or `lz4`.
pub const CONTENT_ENCODING: &str = "busway-protect-content-encoding";
/// When the message was protected, in milliseconds since the Unix epoch
/// (the replay window is measured from it).
pub const SENT_AT: &str = "busway-protect-sent-at";

/// The headers [`PayloadProtection::unprotect`](crate::PayloadProtection::unprotect) removes.
pub const ALL: [&str; 6] = [
    ALGORITHM,
    KEY_ID,
    NONCE,
    SIGNATURE,
    CONTENT_ENCODING,
    SENT_AT,
];

/// Whether a header takes part in the associated data.
pub(crate) fn is_authenticated(name: &str) -> bool {
    if name.starts_with(PREFIX) {
        name != SIGNATURE
    } else {
        !name.starts_with("x-")
    }
}
