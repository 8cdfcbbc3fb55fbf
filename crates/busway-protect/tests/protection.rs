//! Round trips, rotation, tampering, limits and replay for `PayloadProtection`.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, SystemTime};

use busway_core::Message;
use busway_protect::{
    headers, Algorithm, ContentEncoding, Keyring, Limits, PayloadProtection, ProtectError,
    SecretKey,
};
use rand::{Rng, SeedableRng};

fn key(byte: u8) -> SecretKey {
    SecretKey::from([byte; 32])
}

fn message(size: usize) -> Message {
    let body: Vec<u8> = (0..size)
        .map(|i| b"{\"order\": 17, \"items\": [] }"[i % 27])
        .collect();
    Message::new("order.created", body)
        .with_content_type("application/json")
        .with_correlation_id("c-1")
        .with_header("tenant", "acme")
}

const ALGORITHMS: [Algorithm; 3] = [
    Algorithm::Aes256Gcm,
    Algorithm::ChaCha20Poly1305,
    Algorithm::HmacSha256,
];

#[test]
fn every_algorithm_and_encoding_round_trips() {
    for algorithm in ALGORITHMS {
        for encoding in [
            None,
            Some(ContentEncoding::Zstd),
            Some(ContentEncoding::Lz4),
        ] {
            let mut protection =
                PayloadProtection::new(Keyring::new().with_key("k1", key(1)), algorithm);
            if let Some(encoding) = encoding {
                protection = protection.compress(encoding);
            }
            for size in [0, 1, 15, 16, 17, 1024, 70_000] {
                let original = message(size);
                let sealed = protection.protect(original.clone()).unwrap();
                assert_eq!(
                    sealed.headers.get(headers::ALGORITHM),
                    Some(algorithm.as_str())
                );
                assert_eq!(sealed.headers.get(headers::KEY_ID), Some("k1"));
                if algorithm.encrypts() && size > 0 {
                    assert_ne!(sealed.payload, original.payload);
                }
                if encoding.is_some() && size >= 1024 {
                    assert!(sealed.headers.get(headers::CONTENT_ENCODING).is_some());
                    assert!(sealed.payload.len() < size);
                }
                let opened = protection.unprotect(sealed).unwrap();
                assert_eq!(opened, original, "{algorithm} {encoding:?} {size}");
            }
        }
    }
}

#[test]
fn rotation_old_keys_open_new_key_protects() {
    let old = PayloadProtection::encrypt(Keyring::new().with_key("2026-01", key(1)));
    let before = old.protect(message(100)).unwrap();

    let rotated = Keyring::new()
        .with_key("2026-01", key(1))
        .with_key("2026-02", key(2))
        .encrypt_with("2026-02");
    let protection = PayloadProtection::encrypt(rotated);
    let after = protection.protect(message(100)).unwrap();
    assert_eq!(after.headers.get(headers::KEY_ID), Some("2026-02"));
    assert!(protection.unprotect(before.clone()).is_ok());
    assert!(protection.unprotect(after.clone()).is_ok());

    // The old-only consumer cannot open messages under the new key yet.
    let error = old.unprotect(after).unwrap_err();
    assert_eq!(
        error,
        ProtectError::UnknownKey {
            key_id: "2026-02".into()
        }
    );
    assert!(error.is_retryable());

    // Retiring the old key; and rotating at run time with set_keyring.
    protection.set_keyring(protection.keyring().as_ref().clone().without_key("2026-01"));
    assert!(matches!(
        protection.unprotect(before),
        Err(ProtectError::UnknownKey { .. })
    ));
}

#[test]
fn a_missing_current_key_is_a_publish_error() {
    let protection =
        PayloadProtection::encrypt(Keyring::new().with_key("k1", key(1)).encrypt_with("k9"));
    assert_eq!(
        protection.protect(message(10)),
        Err(ProtectError::NoCurrentKey {
            current: Some("k9".into())
        })
    );
}

#[test]
fn ten_thousand_single_bit_flips_are_all_rejected() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    for algorithm in ALGORITHMS {
        let protection = PayloadProtection::new(Keyring::new().with_key("k1", key(3)), algorithm)
            .compress(ContentEncoding::Zstd);
        let sealed = protection.protect(message(1024)).unwrap();
        // Everything an attacker could alter: payload bytes, id, kind,
        // content type, correlation id, and every authenticated header.
        let header_names: Vec<String> = sealed
            .headers
            .iter()
            .map(|(name, _)| name.to_owned())
            .collect();
        let mut rejected = 0;
        for flip in 0..10_000 {
            let mut tampered = sealed.clone();
            match rng.random_range(0..10) {
                0 => {
                    let mut id = *tampered.id.as_bytes();
                    id[rng.random_range(0..16)] ^= 1 << rng.random_range(0..8);
                    tampered.id = uuid::Uuid::from_bytes(id);
                }
                1 => tampered.kind = flip_bit(&tampered.kind, &mut rng),
                2 => tampered.content_type = flip_bit(&tampered.content_type, &mut rng),
                3 => {
                    let name = &header_names[rng.random_range(0..header_names.len())];
                    let value = tampered.headers.get(name).unwrap().to_owned();
                    tampered
                        .headers
                        .insert(name.clone(), flip_bit(&value, &mut rng));
                }
                _ => {
                    let mut payload = tampered.payload.to_vec();
                    let at = rng.random_range(0..payload.len());
                    payload[at] ^= 1 << rng.random_range(0..8);
                    tampered.payload = payload.into();
                }
            }
            assert_ne!(tampered, sealed);
            let result = protection.unprotect(tampered);
            let error = result
                .err()
                .unwrap_or_else(|| panic!("{algorithm}: flip {flip} was accepted"));
            // A flipped key id names an unknown key; anything else is final.
            assert!(!error.is_retryable() || matches!(error, ProtectError::UnknownKey { .. }));
            rejected += 1;
        }
        assert_eq!(rejected, 10_000);
    }
}

/// Flips one bit of one byte of `text`; returns it unchanged if the result
/// is not UTF-8 (headers are strings, so a transport could not carry it).
fn flip_bit(text: &str, rng: &mut impl Rng) -> String {
    if text.is_empty() {
        return "x".into();
    }
    let mut bytes = text.as_bytes().to_vec();
    let at = rng.random_range(0..bytes.len());
    bytes[at] ^= 1 << rng.random_range(0..7);
    String::from_utf8(bytes).unwrap_or_else(|_| format!("{text}!"))
}

#[test]
fn moving_a_ciphertext_into_another_message_fails() {
    let protection = PayloadProtection::encrypt(Keyring::new().with_key("k1", key(1)));
    let a = protection.protect(message(64)).unwrap();
    let b = protection
        .protect(message(64).with_header("tenant", "other"))
        .unwrap();
    let mut swapped = b.clone();
    swapped.payload = a.payload.clone();
    swapped
        .headers
        .insert(headers::NONCE, a.headers.get(headers::NONCE).unwrap());
    assert!(matches!(
        protection.unprotect(swapped),
        Err(ProtectError::Tampered { .. })
    ));
    let mut retitled = a.clone();
    retitled.id = b.id;
    assert!(matches!(
        protection.unprotect(retitled),
        Err(ProtectError::Tampered { .. })
    ));
    // A header added by a broker (x- prefix) is not part of the identity.
    let mut dead_lettered = a;
    dead_lettered
        .headers
        .insert("x-dead-letter-reason", "handler failed");
    assert!(protection.unprotect(dead_lettered).is_ok());
}

#[test]
fn bad_input_is_a_typed_error() {
    let protection = PayloadProtection::encrypt(Keyring::new().with_key("k1", key(1)));
    let sealed = protection.protect(message(64)).unwrap();

    let mut truncated = sealed.clone();
    truncated.payload = truncated.payload.slice(..10);
    assert_eq!(
        protection.unprotect(truncated),
        Err(ProtectError::Truncated { len: 10, min: 16 })
    );
    let mut shortened = sealed.clone();
    shortened.payload = shortened.payload.slice(..sealed.payload.len() - 1);
    assert!(matches!(
        protection.unprotect(shortened),
        Err(ProtectError::Tampered { .. })
    ));

    let mut unknown = sealed.clone();
    unknown.headers.insert(headers::KEY_ID, "k2");
    assert!(matches!(
        protection.unprotect(unknown),
        Err(ProtectError::UnknownKey { .. })
    ));

    let mut no_nonce = sealed.clone();
    no_nonce.headers.remove(headers::NONCE);
    assert!(matches!(
        protection.unprotect(no_nonce),
        Err(ProtectError::MalformedHeader {
            header: headers::NONCE,
            ..
        })
    ));

    let mut upper = sealed.clone();
    let nonce = upper.headers.get(headers::NONCE).unwrap().to_uppercase();
    upper.headers.insert(headers::NONCE, nonce);
    assert!(protection.unprotect(upper).is_err());

    let mut other_algorithm = sealed.clone();
    other_algorithm.headers.insert(headers::ALGORITHM, "rot13");
    assert!(matches!(
        protection.unprotect(other_algorithm),
        Err(ProtectError::UnsupportedAlgorithm { .. })
    ));

    let mut downgraded = sealed.clone();
    downgraded.headers.insert(headers::ALGORITHM, "hmac-sha256");
    assert!(matches!(
        protection.unprotect(downgraded),
        Err(ProtectError::AlgorithmMismatch { .. })
    ));

    let mut stripped = message(64);
    stripped.payload = sealed.payload.clone();
    assert_eq!(
        protection.unprotect(stripped),
        Err(ProtectError::Unprotected)
    );

    let signer = PayloadProtection::sign(Keyring::new().with_key("k1", key(1)));
    let mut signed = signer.protect(message(64)).unwrap();
    signed.headers.insert(headers::SIGNATURE, "00".repeat(32));
    assert!(matches!(
        signer.unprotect(signed),
        Err(ProtectError::BadSignature { .. })
    ));
}

#[test]
fn compression_bombs_are_rejected_on_receive() {
    let limits = Limits::default().with_max_decompressed_bytes(64 * 1024);
    let sender = PayloadProtection::encrypt(Keyring::new().with_key("k1", key(1)))
        .compress(ContentEncoding::Zstd);
    let receiver = PayloadProtection::encrypt(Keyring::new().with_key("k1", key(1)))
        .compress(ContentEncoding::Zstd)
        .with_limits(limits);
    // 8 MiB of zeros: a few hundred bytes on the wire.
    let bomb = Message::new("bomb", vec![0u8; 8 * 1024 * 1024]);
    let sealed = sender.protect(bomb).unwrap();
    assert!(sealed.payload.len() < 4096);
    assert_eq!(
        receiver.unprotect(sealed),
        Err(ProtectError::DecompressedTooLarge { max: 64 * 1024 })
    );
    // The same limit refuses to publish it.
    assert!(matches!(
        receiver.protect(Message::new("bomb", vec![0u8; 8 * 1024 * 1024])),
        Err(ProtectError::TooLarge { .. })
    ));
    // Compression alone (no keys) enforces it too, for both encodings.
    for encoding in [ContentEncoding::Zstd, ContentEncoding::Lz4] {
        let packed = PayloadProtection::none()
            .compress(encoding)
            .protect(Message::new("bomb", vec![0u8; 1024 * 1024]))
            .unwrap();
        assert_eq!(
            PayloadProtection::none()
                .with_limits(limits)
                .unprotect(packed),
            Err(ProtectError::DecompressedTooLarge { max: 64 * 1024 })
        );
    }
}

#[test]
fn limits_apply_on_publish_and_receive() {
    let limits = Limits::default()
        .with_max_message_bytes(1024)
        .with_max_headers(8)
        .with_max_header_bytes(512);
    let protection =
        PayloadProtection::encrypt(Keyring::new().with_key("k1", key(1))).with_limits(limits);
    assert!(matches!(
        protection.protect(message(2000)),
        Err(ProtectError::TooLarge { .. })
    ));
    let mut crowded = message(10);
    for i in 0..10 {
        crowded.headers.insert(format!("h{i}"), "v");
    }
    assert!(matches!(
        protection.protect(crowded),
        Err(ProtectError::TooManyHeaders { .. })
    ));
    let big_header = message(10).with_header("h", "v".repeat(600));
    assert!(matches!(
        protection.protect(big_header),
        Err(ProtectError::HeadersTooLarge { .. })
    ));

    // A message that a more permissive sender protected is refused on receive.
    let permissive = PayloadProtection::encrypt(Keyring::new().with_key("k1", key(1)));
    let large = permissive.protect(message(2000)).unwrap();
    assert!(matches!(
        protection.unprotect(large),
        Err(ProtectError::TooLarge { .. })
    ));
}

#[test]
fn replay_window_and_ids() {
    let protection = PayloadProtection::sign(Keyring::new().with_key("k1", key(1)))
        .with_replay_window(Duration::from_secs(60));
    let sealed = protection.protect(message(32)).unwrap();
    assert!(protection
        .unprotect_delivery(sealed.clone(), "orders", 1)
        .is_ok());
    assert_eq!(
        protection.unprotect_delivery(sealed.clone(), "orders", 1),
        Err(ProtectError::Replayed { id: sealed.id })
    );
    // A redelivery by the transport is not a replay; another queue has its own copy.
    assert!(protection
        .unprotect_delivery(sealed.clone(), "orders", 2)
        .is_ok());
    assert!(protection
        .unprotect_delivery(sealed.clone(), "audit", 1)
        .is_ok());
    // Outside the window, both ways.
    let late = SystemTime::now() + Duration::from_secs(120);
    assert!(matches!(
        protection.unprotect_at(sealed.clone(), late),
        Err(ProtectError::Expired { .. })
    ));
    let early = SystemTime::now() - Duration::from_secs(120);
    assert!(matches!(
        protection.unprotect_at(sealed.clone(), early),
        Err(ProtectError::Expired { .. })
    ));
    // The send time is authenticated: moving it back into the window fails.
    let mut forged = sealed;
    forged.headers.insert(headers::SENT_AT, "0");
    assert!(matches!(
        protection.unprotect(forged),
        Err(ProtectError::BadSignature { .. })
    ));
}

#[test]
fn arbitrary_bytes_never_panic() {
    let protection = PayloadProtection::encrypt(Keyring::new().with_key("k1", key(1)))
        .with_replay_window(Duration::from_secs(60));
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for _ in 0..2_000 {
        let len = rng.random_range(0..200);
        let payload: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        let mut m = Message::new("x", payload);
        m.headers.insert(headers::ALGORITHM, "aes-256-gcm");
        m.headers.insert(headers::KEY_ID, "k1");
        m.headers.insert(headers::NONCE, "00".repeat(12));
        m.headers.insert(headers::SENT_AT, "1");
        if rng.random_bool(0.5) {
            m.headers.insert(headers::CONTENT_ENCODING, "zstd");
        }
        assert!(protection.unprotect(m).is_err());
    }
}
