//! The internal decoders, exposed for `cargo fuzz` (feature `fuzzing`; see
//! `fuzz/` at the repository root). Not a stable API.
//!
//! Each function decodes untrusted bytes the way a consumer does and
//! returns whether they were accepted; none may panic.

use busway_core::Message;

/// Parses a stream chunk frame (headers and payload of one chunk message).
pub fn stream_chunk(message: &Message) -> bool {
    crate::stream::wire::Chunk::parse(message).is_ok()
}

/// Decodes an RPC request body.
pub fn rpc_request(body: &[u8]) -> bool {
    serde_json::from_slice::<crate::rpc::wire::RequestBody>(body).is_ok()
}

/// Decodes an RPC reply body.
pub fn rpc_response(body: &[u8]) -> bool {
    serde_json::from_slice::<crate::rpc::wire::ResponseBody>(body).is_ok()
}

/// Decodes a saga step command and a saga step reply.
pub fn saga_step(body: &[u8]) -> bool {
    let command = serde_json::from_slice::<crate::saga::wire::StepCommand>(body).is_ok();
    let reply = serde_json::from_slice::<crate::saga::wire::StepReply>(body).is_ok();
    command || reply
}

/// Decodes an event envelope as a pub/sub consumer does.
pub fn event(message: &Message) -> bool {
    message.decode::<crate::Event>().is_ok()
}
