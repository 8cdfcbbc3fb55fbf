//! W3C Trace Context (`traceparent` / `tracestate`) in message headers.
//!
//! A message carries the trace it belongs to in two headers, as HTTP
//! requests do ([W3C Trace Context](https://www.w3.org/TR/trace-context/)):
//! `traceparent` (`00-{trace id}-{parent span id}-{flags}`) and, optionally,
//! `tracestate` (vendor data, passed on unchanged). Every backend keeps them.
//!
//! This module parses and formats them without any tracing system. A
//! handler runs inside the [`TraceContext`] of the message it handles, and
//! messages it sends carry the same trace id with a fresh span id, so a
//! trace crosses services even where no OpenTelemetry layer is installed.
//! (With one, `busway` takes the trace from the current span instead.)
//!
//! A malformed `traceparent` is ignored with a debug log: tracing never
//! makes a message fail.
//!
//! ```
//! use busway_middleware::trace_context::TraceParent;
//!
//! let parent: TraceParent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".parse()?;
//! assert!(parent.is_sampled());
//! let child = parent.with_new_parent_id();
//! assert_eq!(child.trace_id(), parent.trace_id());
//! assert_ne!(child.parent_id(), parent.parent_id());
//! assert!(child.to_string().starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
//! # Ok::<(), busway_middleware::trace_context::TraceParentError>(())
//! ```

use std::fmt;
use std::future::Future;
use std::str::FromStr;

use busway_core::Headers;

/// The header that carries the trace id, the sender's span id and flags.
pub const TRACEPARENT: &str = "traceparent";
/// The header that carries vendor-specific trace data, passed on unchanged.
pub const TRACESTATE: &str = "tracestate";

/// The longest `tracestate` passed on (the W3C limit is 512 characters).
const MAX_TRACESTATE: usize = 512;

/// A parsed `traceparent`: trace id, parent span id and trace flags.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceParent {
    trace_id: [u8; 16],
    parent_id: [u8; 8],
    flags: u8,
}

/// Why a `traceparent` header was not accepted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TraceParentError {
    /// Not `version-traceid-parentid-flags` of the right lengths.
    #[error("traceparent is not `vv-<32 hex>-<16 hex>-<2 hex>`")]
    Shape,
    /// A field is not lowercase hexadecimal.
    #[error("traceparent has a character that is not lowercase hex")]
    NotHex,
    /// Version `ff`, which the specification forbids.
    #[error("traceparent version ff is invalid")]
    InvalidVersion,
    /// A trace id of all zeros.
    #[error("traceparent has an all-zero trace id")]
    ZeroTraceId,
    /// A parent id of all zeros.
    #[error("traceparent has an all-zero parent id")]
    ZeroParentId,
}

impl TraceParent {
    /// A trace parent from its parts; `None` if either id is all zeros.
    pub fn new(trace_id: [u8; 16], parent_id: [u8; 8], flags: u8) -> Option<Self> {
        (trace_id != [0; 16] && parent_id != [0; 8]).then_some(Self {
            trace_id,
            parent_id,
            flags,
        })
    }

    /// Parses a `traceparent` header value.
    ///
    /// Version `00` must be exactly 55 characters; a later version may
    /// append fields after a `-`, which are ignored (as the specification
    /// asks of version-00 parsers).
    pub fn parse(value: &str) -> Result<Self, TraceParentError> {
        let value = value.trim_matches(|c| c == ' ' || c == '\t');
        let bytes = value.as_bytes();
        if bytes.len() < 55 || bytes[2] != b'-' || bytes[35] != b'-' || bytes[52] != b'-' {
            return Err(TraceParentError::Shape);
        }
        let mut version = [0u8; 1];
        decode_hex(&bytes[0..2], &mut version)?;
        match version[0] {
            0xff => return Err(TraceParentError::InvalidVersion),
            0 if bytes.len() != 55 => return Err(TraceParentError::Shape),
            _ if bytes.len() > 55 && bytes[55] != b'-' => return Err(TraceParentError::Shape),
            _ => {}
        }
        let mut trace_id = [0u8; 16];
        decode_hex(&bytes[3..35], &mut trace_id)?;
        let mut parent_id = [0u8; 8];
        decode_hex(&bytes[36..52], &mut parent_id)?;
        let mut flags = [0u8; 1];
        decode_hex(&bytes[53..55], &mut flags)?;
        if trace_id == [0; 16] {
            return Err(TraceParentError::ZeroTraceId);
        }
        if parent_id == [0; 8] {
            return Err(TraceParentError::ZeroParentId);
        }
        Ok(Self {
            trace_id,
            parent_id,
            flags: flags[0],
        })
    }

    /// The trace id (16 bytes, never all zeros).
    pub fn trace_id(&self) -> [u8; 16] {
        self.trace_id
    }
    /// The id of the span that sent the message (8 bytes, never all zeros).
    pub fn parent_id(&self) -> [u8; 8] {
        self.parent_id
    }
    /// The trace flags.
    pub fn flags(&self) -> u8 {
        self.flags
    }
    /// Whether the sender recorded its span (flag `01`).
    pub fn is_sampled(&self) -> bool {
        self.flags & 1 == 1
    }

    /// The same trace, the same flags, and a fresh random parent id: what
    /// a message sent on behalf of this one carries.
    pub fn with_new_parent_id(self) -> Self {
        let mut parent_id = [0u8; 8];
        while parent_id == [0; 8] {
            parent_id = rand::random::<u64>().to_be_bytes();
        }
        Self { parent_id, ..self }
    }

    /// The trace id as 32 lowercase hex digits (for log fields).
    pub fn trace_id_hex(&self) -> impl fmt::Display + '_ {
        Hex(&self.trace_id)
    }
}

impl FromStr for TraceParent {
    type Err = TraceParentError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// Formats as a version-00 `traceparent`.
impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{}-{}-{:02x}",
            Hex(&self.trace_id),
            Hex(&self.parent_id),
            self.flags
        )
    }
}

impl fmt::Debug for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TraceParent({self})")
    }
}

struct Hex<'a>(&'a [u8]);

impl fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

fn decode_hex(hex: &[u8], out: &mut [u8]) -> Result<(), TraceParentError> {
    fn nibble(c: u8) -> Result<u8, TraceParentError> {
        match c {
            b'0'..=b'9' => Ok(c - b'0'),
            b'a'..=b'f' => Ok(c - b'a' + 10),
            _ => Err(TraceParentError::NotHex),
        }
    }
    for (byte, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        *byte = nibble(pair[0])? << 4 | nibble(pair[1])?;
    }
    Ok(())
}

tokio::task_local! {
    static INCOMING: Option<TraceContext>;
}

/// The trace context a message carries: its `traceparent` and `tracestate`.
///
/// ```
/// use busway_core::Message;
/// use busway_middleware::trace_context::{TraceContext, TRACEPARENT};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let incoming = Message::new("order.placed", "{}")
///     .with_header(TRACEPARENT, "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
/// let context = TraceContext::from_headers(&incoming.headers);
/// TraceContext::scope(context, async {
///     let mut outgoing = Message::new("reserve_stock", "{}");
///     TraceContext::inject_current(&mut outgoing.headers);
///     let sent = outgoing.headers.get(TRACEPARENT).unwrap_or_default();
///     assert!(sent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
///     assert!(!sent.contains("00f067aa0ba902b7"));
/// }).await;
/// # }
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct TraceContext {
    /// The trace and the sending span.
    pub parent: TraceParent,
    /// The vendor data, if any, passed on unchanged.
    pub state: Option<String>,
}

impl TraceContext {
    /// A context from its parts.
    pub fn new(parent: TraceParent, state: Option<String>) -> Self {
        Self { parent, state }
    }

    /// The context in `headers`, if they carry a well-formed `traceparent`.
    /// A malformed one is ignored with a debug log; an over-long
    /// `tracestate` is dropped.
    pub fn from_headers(headers: &Headers) -> Option<Self> {
        let value = headers.get(TRACEPARENT)?;
        match TraceParent::parse(value) {
            Ok(parent) => {
                let state = headers
                    .get(TRACESTATE)
                    .filter(|s| !s.is_empty() && s.len() <= MAX_TRACESTATE)
                    .map(str::to_owned);
                Some(Self { parent, state })
            }
            Err(error) => {
                tracing::debug!(traceparent = value, %error, "ignoring a malformed traceparent");
                None
            }
        }
    }

    /// Writes this context into `headers` as a child: same trace, fresh
    /// parent id. Existing trace headers are replaced.
    pub fn inject_child(&self, headers: &mut Headers) {
        headers.insert(TRACEPARENT, self.parent.with_new_parent_id().to_string());
        match &self.state {
            Some(state) => headers.insert(TRACESTATE, state.clone()),
            None => headers.remove(TRACESTATE),
        };
    }

    /// The context of the message being handled now, if the handler runs
    /// inside one (see [`scope`](Self::scope)).
    pub fn current() -> Option<Self> {
        INCOMING.try_with(Clone::clone).ok().flatten()
    }

    /// Whether a context is in scope, without cloning it.
    pub fn is_current() -> bool {
        INCOMING.try_with(Option::is_some).unwrap_or(false)
    }

    /// Writes the current context (if any) into `headers` as a child,
    /// unless they already carry a `traceparent`. Returns whether it wrote.
    pub fn inject_current(headers: &mut Headers) -> bool {
        if headers.get(TRACEPARENT).is_some() {
            return false;
        }
        INCOMING
            .try_with(|current| match current {
                Some(context) => {
                    context.inject_child(headers);
                    true
                }
                None => false,
            })
            .unwrap_or(false)
    }

    /// Runs `future` inside `context` (or inside none, hiding an outer one).
    pub fn scope<F: Future>(context: Option<Self>, future: F) -> impl Future<Output = F::Output> {
        INCOMING.scope(context, future)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_header_round_trips() {
        let parent = TraceParent::parse(VALID).expect("valid");
        assert_eq!(parent.to_string(), VALID);
        assert_eq!(parent.flags(), 1);
        assert_eq!(
            parent.trace_id_hex().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(parent.parent_id()[0], 0x00);
        assert_eq!(parent.parent_id()[1], 0xf0);
    }

    #[test]
    fn malformed_headers_are_refused() {
        let cases = [
            ("", TraceParentError::Shape),
            ("garbage", TraceParentError::Shape),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
                TraceParentError::Shape,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
                TraceParentError::Shape,
            ),
            (
                "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                TraceParentError::Shape,
            ),
            (
                "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
                TraceParentError::NotHex,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
                TraceParentError::NotHex,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-zz",
                TraceParentError::NotHex,
            ),
            (
                "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                TraceParentError::InvalidVersion,
            ),
            (
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                TraceParentError::ZeroTraceId,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
                TraceParentError::ZeroParentId,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\u{e9}",
                TraceParentError::Shape,
            ),
        ];
        for (value, expected) in cases {
            assert_eq!(TraceParent::parse(value), Err(expected), "{value:?}");
        }
    }

    #[test]
    fn a_later_version_may_carry_more_fields() {
        let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-comes-next";
        let parent = TraceParent::parse(later).expect("later version");
        assert_eq!(parent.to_string(), VALID);
        let glued = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x";
        assert_eq!(TraceParent::parse(glued), Err(TraceParentError::Shape));
    }

    #[test]
    fn a_multibyte_character_does_not_panic() {
        // Non-ASCII bytes where the dashes or hex digits should be.
        let weird = "00-4bf92f3577b34da6a3ce929d0e0e47\u{e9}-00f067aa0ba902b7-01";
        assert!(TraceParent::parse(weird).is_err());
        let weird = "\u{1f600}\u{1f600}\u{1f600}\u{1f600}\u{1f600}\u{1f600}\u{1f600}\u{1f600}\u{1f600}\u{1f600}\u{1f600}\u{1f600}\u{1f600}\u{1f600}";
        assert!(TraceParent::parse(weird).is_err());
    }

    #[test]
    fn a_bad_header_is_ignored_not_an_error() {
        let mut headers = Headers::new();
        headers.insert(TRACEPARENT, "00-not-a-trace");
        headers.insert(TRACESTATE, "vendor=1");
        assert_eq!(TraceContext::from_headers(&headers), None);
        assert_eq!(TraceContext::from_headers(&Headers::new()), None);
    }

    #[test]
    fn tracestate_is_kept_unless_too_long() {
        let mut headers = Headers::new();
        headers.insert(TRACEPARENT, VALID);
        headers.insert(TRACESTATE, "congo=t61rcWkgMzE");
        let context = TraceContext::from_headers(&headers).expect("valid");
        assert_eq!(context.state.as_deref(), Some("congo=t61rcWkgMzE"));
        headers.insert(TRACESTATE, "x".repeat(MAX_TRACESTATE + 1));
        let context = TraceContext::from_headers(&headers).expect("valid");
        assert_eq!(context.state, None);
    }

    #[test]
    fn a_child_keeps_the_trace_and_flags_with_a_fresh_parent() {
        let parent = TraceParent::parse(VALID).expect("valid");
        let child = parent.with_new_parent_id();
        assert_eq!(child.trace_id(), parent.trace_id());
        assert_eq!(child.flags(), parent.flags());
        assert_ne!(child.parent_id(), parent.parent_id());
        assert_ne!(child.parent_id(), [0; 8]);
        assert_eq!(TraceParent::parse(&child.to_string()), Ok(child));
    }

    #[test]
    fn new_refuses_zero_ids() {
        assert!(TraceParent::new([0; 16], [1; 8], 1).is_none());
        assert!(TraceParent::new([1; 16], [0; 8], 1).is_none());
        assert!(TraceParent::new([1; 16], [1; 8], 0).is_some_and(|p| !p.is_sampled()));
    }

    #[tokio::test]
    async fn outgoing_messages_carry_the_handled_trace() {
        let mut incoming = Headers::new();
        incoming.insert(TRACEPARENT, VALID);
        incoming.insert(TRACESTATE, "congo=t61rcWkgMzE");
        let context = TraceContext::from_headers(&incoming);
        let mut outgoing = Headers::new();
        assert!(
            !TraceContext::inject_current(&mut outgoing),
            "no context yet"
        );
        let wrote = TraceContext::scope(context, async {
            assert!(TraceContext::is_current());
            TraceContext::inject_current(&mut outgoing)
        })
        .await;
        assert!(wrote);
        let sent = TraceParent::parse(outgoing.get(TRACEPARENT).unwrap_or_default())
            .expect("a well-formed traceparent");
        assert_eq!(
            sent.trace_id(),
            TraceParent::parse(VALID).expect("valid").trace_id()
        );
        assert_eq!(outgoing.get(TRACESTATE), Some("congo=t61rcWkgMzE"));

        // An explicit traceparent is left alone.
        let mut explicit = Headers::new();
        explicit.insert(TRACEPARENT, "set-by-the-caller");
        let context = TraceContext::from_headers(&incoming);
        let wrote = TraceContext::scope(context, async {
            TraceContext::inject_current(&mut explicit)
        })
        .await;
        assert!(!wrote);
        assert_eq!(explicit.get(TRACEPARENT), Some("set-by-the-caller"));
    }
}
