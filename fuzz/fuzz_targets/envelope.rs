//! The message envelopes a consumer decodes: events, RPC requests and
//! replies, saga step commands and replies, and JSON bodies in general.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let message = common::message(data).with_content_type("application/json");
    let _ = busway::fuzzing::event(&message);
    let _ = busway::fuzzing::rpc_request(data);
    let _ = busway::fuzzing::rpc_response(data);
    let _ = busway::fuzzing::saga_step(data);
    let _ = message.decode::<serde_json::Value>();
});
