//! Keys, key ids and the keyring that rotates them.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, OnceLock};

use hmac::digest::KeyInit;
use hmac::Hmac;
use rand::RngCore;
use ring::aead::{LessSafeKey, UnboundKey, AES_256_GCM, CHACHA20_POLY1305};
use sha2::Sha256;
use zeroize::{Zeroize, ZeroizeOnDrop};

/// A 256-bit secret key, wiped from memory when dropped. Its `Debug` output
/// never shows the key.
///
/// ```
/// use busway_protect::SecretKey;
/// let key = SecretKey::from_hex("000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f")?;
/// assert_eq!(format!("{key:?}"), "SecretKey(***)");
/// let fresh = SecretKey::generate();
/// # let _ = fresh;
/// # Ok::<(), busway_protect::KeyError>(())
/// ```
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct SecretKey([u8; 32]);

/// A key could not be built from the given bytes or text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The key is not 32 bytes long.
    #[error("a key is 32 bytes; got {0}")]
    WrongLength(usize),
    /// The text is not 64 lowercase hex digits.
    #[error("a key in hex is 64 lowercase hex digits")]
    NotHex,
}

impl SecretKey {
    /// A key from its 32 bytes. The caller's copy is not wiped; prefer
    /// [`from_slice`](Self::from_slice) on a buffer you then zeroize.
    pub fn new(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// A fresh random key from the operating system's generator.
    pub fn generate() -> Self {
        let mut bytes = [0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        Self(bytes)
    }

    /// A key from a 32-byte slice.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, KeyError> {
        let array: [u8; 32] = bytes
            .try_into()
            .map_err(|_| KeyError::WrongLength(bytes.len()))?;
        Ok(Self(array))
    }

    /// A key from 64 lowercase hex digits (as kept in a secret store).
    pub fn from_hex(text: &str) -> Result<Self, KeyError> {
        crate::hex::decode::<32>(text.trim())
            .map(Self)
            .ok_or(KeyError::NotHex)
    }

    pub(crate) fn bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl From<[u8; 32]> for SecretKey {
    fn from(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey(***)")
    }
}

/// How a message is protected.
///
/// ```
/// use busway_protect::Algorithm;
/// assert_eq!(Algorithm::parse("aes-256-gcm"), Some(Algorithm::Aes256Gcm));
/// assert!(Algorithm::ChaCha20Poly1305.encrypts());
/// assert!(!Algorithm::HmacSha256.encrypts());
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Algorithm {
    /// AES-256 in Galois/Counter Mode: secrecy and integrity (fast with AES-NI).
    Aes256Gcm,
    /// ChaCha20-Poly1305: secrecy and integrity (fast without AES hardware).
    ChaCha20Poly1305,
    /// HMAC-SHA256 over the payload and the message's identity: integrity
    /// without secrecy (the payload stays readable).
    HmacSha256,
}

impl Algorithm {
    /// The name carried in the [`ALGORITHM`](crate::headers::ALGORITHM) header.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Aes256Gcm => "aes-256-gcm",
            Self::ChaCha20Poly1305 => "chacha20-poly1305",
            Self::HmacSha256 => "hmac-sha256",
        }
    }

    /// The algorithm named `name` (exact match).
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "aes-256-gcm" => Some(Self::Aes256Gcm),
            "chacha20-poly1305" => Some(Self::ChaCha20Poly1305),
            "hmac-sha256" => Some(Self::HmacSha256),
            _ => None,
        }
    }

    /// Whether it hides the payload (AEAD) rather than only signing it.
    pub fn encrypts(self) -> bool {
        !matches!(self, Self::HmacSha256)
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Keys by id: one current key protects new messages, every key opens
/// the messages protected with it. Rotate by adding a new key and making it
/// current; keep the old one until its messages have drained, then remove it.
///
/// ```
/// use busway_protect::{Keyring, SecretKey};
///
/// let keyring = Keyring::new().with_key("k1", SecretKey::generate());
/// assert_eq!(keyring.current_key_id(), Some("k1"));
///
/// // Rotation: k2 protects from now on, k1 still opens older messages.
/// let keyring = keyring.with_key("k2", SecretKey::generate()).encrypt_with("k2");
/// assert_eq!(keyring.current_key_id(), Some("k2"));
/// assert!(keyring.contains("k1"));
///
/// // Retirement, once no message protected with k1 is left.
/// let keyring = keyring.without_key("k1");
/// assert_eq!(keyring.key_ids().collect::<Vec<_>>(), ["k2"]);
/// ```
#[derive(Clone, Default)]
pub struct Keyring {
    keys: BTreeMap<String, Arc<KeyState>>,
    current: Option<String>,
}

/// A key with what each algorithm derives from it (the AES key schedule,
/// the HMAC pads), derived on first use and kept, so protecting a message
/// does not derive it again. Clones of a keyring share them.
pub(crate) struct KeyState {
    key: SecretKey,
    aes: OnceLock<Option<LessSafeKey>>,
    chacha: OnceLock<Option<LessSafeKey>>,
    hmac: OnceLock<Hmac<Sha256>>,
}

impl KeyState {
    fn new(key: SecretKey) -> Self {
        Self {
            key,
            aes: OnceLock::new(),
            chacha: OnceLock::new(),
            hmac: OnceLock::new(),
        }
    }

    /// The AEAD key of this key for `algorithm` (none for a signature).
    pub(crate) fn aead(&self, algorithm: Algorithm) -> Option<&LessSafeKey> {
        let (cell, aead) = match algorithm {
            Algorithm::Aes256Gcm => (&self.aes, &AES_256_GCM),
            Algorithm::ChaCha20Poly1305 => (&self.chacha, &CHACHA20_POLY1305),
            Algorithm::HmacSha256 => return None,
        };
        // Both take 32-byte keys, so building one cannot fail.
        cell.get_or_init(|| {
            UnboundKey::new(aead, self.key.bytes())
                .ok()
                .map(LessSafeKey::new)
        })
        .as_ref()
    }

    /// A fresh HMAC-SHA256 of this key, ready for input.
    pub(crate) fn hmac(&self) -> Hmac<Sha256> {
        self.hmac
            .get_or_init(|| <Hmac<Sha256> as KeyInit>::new(&pad_hmac_key(self.key.bytes())))
            .clone()
    }
}

/// A 32-byte key as the 64-byte HMAC-SHA256 key it is equivalent to (keys
/// shorter than the block are zero-padded, RFC 2104).
fn pad_hmac_key(
    key: &[u8; 32],
) -> hmac::digest::generic_array::GenericArray<u8, hmac::digest::consts::U64> {
    let mut padded = hmac::digest::generic_array::GenericArray::default();
    padded[..32].copy_from_slice(key);
    padded
}

impl Keyring {
    /// An empty keyring.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) the key `id`. The first key added becomes the
    /// current one unless [`encrypt_with`](Self::encrypt_with) says otherwise;
    /// later keys only open messages until made current.
    pub fn with_key(mut self, id: impl Into<String>, key: impl Into<SecretKey>) -> Self {
        let id = id.into();
        if self.current.is_none() {
            self.current = Some(id.clone());
        }
        self.keys.insert(id, Arc::new(KeyState::new(key.into())));
        self
    }

    /// Protects new messages with the key `id`. If the keyring holds no such
    /// key, protecting fails with [`ProtectError::NoCurrentKey`](crate::ProtectError::NoCurrentKey).
    pub fn encrypt_with(mut self, id: impl Into<String>) -> Self {
        self.current = Some(id.into());
        self
    }

    /// Removes the key `id` (messages protected with it no longer open).
    pub fn without_key(mut self, id: &str) -> Self {
        self.keys.remove(id);
        self
    }

    /// The id of the key that protects new messages.
    pub fn current_key_id(&self) -> Option<&str> {
        self.current.as_deref()
    }

    /// Whether the keyring holds the key `id`.
    pub fn contains(&self, id: &str) -> bool {
        self.keys.contains_key(id)
    }

    /// The ids of the keys held, in order.
    pub fn key_ids(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str)
    }

    pub(crate) fn current(&self) -> Option<(&str, &KeyState)> {
        let id = self.current.as_deref()?;
        self.keys.get_key_value(id).map(|(k, v)| (k.as_str(), &**v))
    }

    pub(crate) fn get(&self, id: &str) -> Option<&KeyState> {
        self.keys.get(id).map(|state| &**state)
    }
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field("key_ids", &self.keys.keys().collect::<Vec<_>>())
            .field("current", &self.current)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use hmac::Mac;

    use super::*;

    #[test]
    fn the_kept_hmac_is_hmac_sha256_of_the_key() {
        let key = SecretKey::generate();
        let mut expected =
            <Hmac<Sha256> as Mac>::new_from_slice(key.bytes()).unwrap_or_else(|_| {
                panic!("HMAC takes keys of any length");
            });
        expected.update(b"message");
        let state = KeyState::new(key);
        for _ in 0..2 {
            let mut mac = state.hmac();
            mac.update(b"message");
            assert_eq!(
                mac.finalize().into_bytes(),
                expected.clone().finalize().into_bytes()
            );
        }
    }
}
