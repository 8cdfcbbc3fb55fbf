//! Payload protection for busway messages: compression, AEAD encryption with
//! key ids and rotation, HMAC signing, size limits and replay protection.
//! This crate does no I/O; the `Bus` applies it on publish and on receive.
//!
//! A [`PayloadProtection`] turns a plain [`Message`](busway_core::Message)
//! into a protected one (compress → encrypt or sign) and back, authenticating
//! the message's identity (id, kind, content type, correlation and causation
//! ids, and every header whose name does not start with `x-`) as associated
//! data, so a ciphertext moved into another message is rejected.
//!
//! ```
//! use busway_core::Message;
//! use busway_protect::{ContentEncoding, Keyring, PayloadProtection, SecretKey};
//!
//! let keyring = Keyring::new()
//!     .with_key("2026-01", SecretKey::from([7u8; 32]))
//!     .encrypt_with("2026-01");
//! let protection = PayloadProtection::encrypt(keyring).compress(ContentEncoding::Zstd);
//!
//! let message = Message::json("order.created", &serde_json::json!({"order_id": 7}))?;
//! let sealed = protection.protect(message.clone())?;
//! assert_ne!(sealed.payload, message.payload);
//! assert_eq!(sealed.headers.get(busway_protect::headers::KEY_ID), Some("2026-01"));
//!
//! let opened = protection.unprotect(sealed)?;
//! assert_eq!(opened.payload, message.payload);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Every failure is a typed [`ProtectError`]; [`ProtectError::reason`] gives
//! a short label for metrics, and no input makes this crate panic.

mod audit;
mod compression;
mod error;
mod hex;
mod key;
mod limits;
mod protection;
mod replay;

pub mod headers;

pub use audit::{AuditAction, AuditRecord, AuditSink, MemoryAuditLog, TracingAuditLog};
pub use compression::ContentEncoding;
pub use error::ProtectError;
pub use key::{Algorithm, KeyError, Keyring, SecretKey};
pub use limits::Limits;
pub use protection::PayloadProtection;
pub use replay::ReplayGuard;
