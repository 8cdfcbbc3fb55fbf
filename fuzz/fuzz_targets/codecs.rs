//! The payload codecs (JSON, MessagePack) and the decompressors (zstd,
//! lz4), which must stop at their output limit.
#![no_main]

use busway_core::Codec;
use busway_protect::{ContentEncoding, ProtectError};
use libfuzzer_sys::fuzz_target;

const LIMIT: usize = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let _ = Codec::Json.decode::<serde_json::Value>(data);
    let _ = Codec::for_content_type("application/msgpack")
        .map(|codec| codec.decode::<serde_json::Value>(data));
    for encoding in [ContentEncoding::Zstd, ContentEncoding::Lz4] {
        match encoding.decompress(data, LIMIT) {
            Ok(out) => assert!(out.len() <= LIMIT),
            Err(ProtectError::DecompressedTooLarge { .. } | ProtectError::CorruptCompression { .. }) => {}
            Err(other) => panic!("unexpected error {other:?}"),
        }
    }
});
