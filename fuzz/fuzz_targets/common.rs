//! Builds a message from fuzz input.
//!
//! Layout: a head, a NUL byte, then the payload. The head's lines are the
//! kind, then `name=value` headers.

use busway_core::Message;

#[allow(dead_code)]
pub fn message(data: &[u8]) -> Message {
    let mut parts = data.splitn(2, |b| *b == 0);
    let head = parts.next().unwrap_or_default();
    let payload = parts.next().unwrap_or_default().to_vec();
    let head = String::from_utf8_lossy(head);
    let mut lines = head.split('\n');
    let kind = lines.next().unwrap_or_default().to_owned();
    let mut message = Message::new(kind, payload);
    for line in lines {
        if let Some((name, value)) = line.split_once('=') {
            message.headers.insert(name, value);
        }
    }
    message
}
