//! Stream chunk frames: headers (`x-stream-*`) and payload of one chunk.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let message = common::message(data);
    let _ = busway::fuzzing::stream_chunk(&message);
});
