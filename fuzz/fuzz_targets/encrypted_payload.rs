//! Protected messages: arbitrary headers and payloads must be rejected with
//! a typed error; a valid sealed message with any change must never open.
#![no_main]

use std::sync::OnceLock;

use busway_core::Message;
use busway_protect::{
    headers, Algorithm, ContentEncoding, Keyring, PayloadProtection, SecretKey,
};
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fn protections() -> &'static [PayloadProtection; 3] {
    static P: OnceLock<[PayloadProtection; 3]> = OnceLock::new();
    P.get_or_init(|| {
        let keyring = || Keyring::new().with_key("k1", SecretKey::from([9u8; 32]));
        [Algorithm::Aes256Gcm, Algorithm::ChaCha20Poly1305, Algorithm::HmacSha256]
            .map(|a| PayloadProtection::new(keyring(), a).compress(ContentEncoding::Zstd))
    })
}

fuzz_target!(|data: &[u8]| {
    // Arbitrary input posing as a protected message.
    for protection in protections() {
        let message = common::message(data);
        let _ = protection.unprotect(message);
    }
    // A genuine message, then one byte of it changed as the input says.
    let Some((&selector, rest)) = data.split_first() else { return };
    let protection = &protections()[usize::from(selector) % 3];
    let original = Message::new("fuzz", rest.to_vec()).with_header("tenant", "acme");
    let Ok(sealed) = protection.protect(original.clone()) else { return };
    let mut tampered = sealed.clone();
    let at = usize::from(selector);
    if !tampered.payload.is_empty() && selector & 1 == 0 {
        let mut payload = tampered.payload.to_vec();
        let i = at % payload.len();
        payload[i] ^= 1 << (selector % 8);
        tampered.payload = payload.into();
    } else {
        let name = [headers::KEY_ID, headers::NONCE, headers::SENT_AT, "tenant"][at % 4];
        if let Some(value) = tampered.headers.get(name) {
            let mut value = value.to_owned();
            value.push('0');
            tampered.headers.insert(name, value);
        }
    }
    if tampered != sealed {
        assert!(protection.unprotect(tampered).is_err(), "a changed message opened");
    }
    let opened = protection.unprotect(sealed).ok();
    assert_eq!(opened.map(|m| m.payload), Some(original.payload));
});
