//! Tracing: [`tracing`] spans around what the bus does, and the W3C trace
//! context in message headers, so one trace follows a conversation across
//! services and brokers.
//!
//! | span | kind | when |
//! |---|---|---|
//! | `publish` | producer | an event, a task or an RPC reply is published |
//! | `consume` | consumer | a delivered event or task is processed (decode, handlers, settle) |
//! | `handle` | internal | one handler runs on it |
//! | `rpc.call` | client | a call, from sending the request to its reply |
//! | `rpc.serve` | server | a request is answered |
//! | `saga` / `saga.step` | internal | an orchestrator drives a saga and dispatches a step; a participant runs one |
//!
//! Spans are at level `INFO`, target `busway`, with fields named after the
//! OpenTelemetry messaging conventions (`messaging.system`,
//! `messaging.destination.name`, `messaging.operation`,
//! `messaging.message.id`, `otel.kind`, `otel.name`) plus `kind`,
//! `correlation_id` and `causation_id`, so every log line a handler writes
//! names the conversation it belongs to. With no subscriber interested,
//! they cost a check each and nothing is formatted or allocated.
//!
//! Every message published (events, tasks, RPC requests and replies, saga
//! commands) carries the [`TRACEPARENT`] and [`TRACESTATE`] headers of the
//! span that sent it; a consumer makes its span a child of them. With the
//! `otel` feature and a `tracing-opentelemetry` layer installed, the context
//! is the OpenTelemetry context of the current span, written and read with
//! the W3C `TraceContextPropagator`. Without one, an incoming trace is
//! passed through: what a handler sends carries the trace id it received,
//! with a fresh span id. A malformed `traceparent` is ignored (with a debug
//! log), never a failure. A `traceparent` the caller set on a message is
//! left alone.
//!
//! See the [guide](https://github.com/busway-rs/busway/blob/main/docs/guide/tracing.md)
//! for installing a subscriber and exporting to OpenTelemetry.

use std::future::Future;

use busway_core::{Headers, Message};
use tracing::field::Empty;
use tracing::{Instrument, Span};

use crate::middleware::correlation::CORRELATION_HEADER;
pub use busway_middleware::trace_context::{
    TraceContext, TraceParent, TraceParentError, TRACEPARENT, TRACESTATE,
};

/// The value of `messaging.system` and `rpc.system` on busway's spans.
pub const MESSAGING_SYSTEM: &str = "busway";

/// The conversation a message belongs to, as far as logs care: the
/// correlation header (RPC requests) or its correlation id.
fn conversation(message: &Message) -> Option<&str> {
    message
        .headers
        .get(CORRELATION_HEADER)
        .or(message.correlation_id.as_deref())
}

/// A producer span for publishing `message` to `destination`.
pub(crate) fn publish_span(destination: &str, message: &Message) -> Span {
    tracing::info_span!(
        target: "busway",
        "publish",
        otel.name = %format_args!("publish {destination}"),
        otel.kind = "producer",
        messaging.system = MESSAGING_SYSTEM,
        messaging.operation = "publish",
        messaging.destination.name = destination,
        messaging.message.id = %message.id,
        kind = %message.kind,
        correlation_id = conversation(message),
        causation_id = message.causation_id.as_deref(),
    )
}

/// A consumer span for processing `message`, delivered from `queue`
/// (published to `destination`: its topic, or the queue itself).
pub(crate) fn consume_span(
    destination: &str,
    queue: &str,
    message: &Message,
    attempt: u32,
    incoming: Option<&TraceContext>,
) -> Span {
    let span = tracing::info_span!(
        target: "busway",
        "consume",
        otel.name = %format_args!("process {destination}"),
        otel.kind = "consumer",
        otel.status_code = Empty,
        messaging.system = MESSAGING_SYSTEM,
        messaging.operation = "process",
        messaging.destination.name = destination,
        messaging.consumer.group.name = queue,
        messaging.message.id = %message.id,
        attempt,
        kind = %message.kind,
        correlation_id = conversation(message),
        causation_id = message.causation_id.as_deref(),
        trace_id = incoming.map(|c| tracing::field::display(c.parent.trace_id_hex())),
    );
    with_remote_parent(span, message, incoming)
}

/// An internal span for one handler (`what`: `event`, `task`) of `name`.
pub(crate) fn handle_span(what: &'static str, name: &str) -> Span {
    tracing::info_span!(
        target: "busway",
        "handle",
        otel.name = %format_args!("handle {what} {name}"),
        otel.status_code = Empty,
        handler = what,
        kind = name,
    )
}

/// A client span for calling `method` of `service` with `request`.
pub(crate) fn rpc_call_span(service: &str, method: &str, queue: &str, request: &Message) -> Span {
    tracing::info_span!(
        target: "busway",
        "rpc.call",
        otel.name = %format_args!("{service}/{method}"),
        otel.kind = "client",
        otel.status_code = Empty,
        rpc.system = MESSAGING_SYSTEM,
        rpc.service = service,
        rpc.method = method,
        messaging.system = MESSAGING_SYSTEM,
        messaging.destination.name = queue,
        messaging.message.id = %request.id,
        correlation_id = conversation(request),
        causation_id = request.causation_id.as_deref(),
    )
}

/// A server span for answering `request` (for `method`, if it decoded)
/// from `queue`.
pub(crate) fn rpc_serve_span(
    queue: &str,
    method: Option<&str>,
    request: &Message,
    incoming: Option<&TraceContext>,
) -> Span {
    let span = tracing::info_span!(
        target: "busway",
        "rpc.serve",
        otel.name = match method {
            Some(method) => format!("{queue}/{method}"),
            None => queue.to_owned(),
        },
        otel.kind = "server",
        otel.status_code = Empty,
        rpc.system = MESSAGING_SYSTEM,
        rpc.method = method,
        messaging.system = MESSAGING_SYSTEM,
        messaging.operation = "process",
        messaging.destination.name = queue,
        messaging.message.id = %request.id,
        correlation_id = conversation(request),
        causation_id = request.causation_id.as_deref(),
        trace_id = incoming.map(|c| tracing::field::display(c.parent.trace_id_hex())),
    );
    with_remote_parent(span, request, incoming)
}

/// An internal span around a saga driven by an orchestrator.
pub(crate) fn saga_span(saga_id: &str, saga: &str) -> Span {
    tracing::info_span!(
        target: "busway",
        "saga",
        otel.name = %format_args!("saga {saga}"),
        saga.id = saga_id,
        saga.name = saga,
    )
}

/// An internal span around one step command of a saga: dispatched by the
/// orchestrator, or run by a participant.
pub(crate) fn saga_step_span(
    saga_id: &str,
    saga: &str,
    step: &str,
    phase: &'static str,
    attempt: u32,
) -> Span {
    tracing::info_span!(
        target: "busway",
        "saga.step",
        otel.name = %format_args!("saga {saga} {step} {phase}"),
        otel.status_code = Empty,
        saga.id = saga_id,
        saga.name = saga,
        saga.step = step,
        saga.phase = phase,
        attempt,
    )
}

/// Makes `span` a child of the remote span that sent `message`.
fn with_remote_parent(span: Span, message: &Message, incoming: Option<&TraceContext>) -> Span {
    #[cfg(feature = "otel")]
    if incoming.is_some() && !span.is_disabled() {
        otel::set_parent(&span, &message.headers);
    }
    let _ = (message, incoming);
    span
}

/// Marks `span` as failed (`otel.status_code = ERROR`), if it is recorded.
pub(crate) fn record_error(span: &Span) {
    if !span.is_disabled() {
        span.record("otel.status_code", "ERROR");
    }
}

/// Writes the trace context of `span` into `headers`: its OpenTelemetry
/// context when there is one, else the incoming trace being handled (same
/// trace id, fresh span id). Leaves a `traceparent` already there alone.
pub(crate) fn inject(span: &Span, headers: &mut Headers) {
    if headers.get(TRACEPARENT).is_some() {
        return;
    }
    #[cfg(feature = "otel")]
    if !span.is_disabled() && otel::inject(span, headers) {
        return;
    }
    let _ = span;
    TraceContext::inject_current(headers);
}

/// The trace context `message` carries, if well-formed (a malformed one is
/// logged at debug level and ignored).
pub(crate) fn extract(message: &Message) -> Option<TraceContext> {
    TraceContext::from_headers(&message.headers)
}

/// Runs `future` in `span` and inside the incoming trace context (which
/// what the handler sends passes on when there is no OpenTelemetry layer).
pub(crate) fn process<F: Future>(
    span: Span,
    incoming: Option<TraceContext>,
    future: F,
) -> impl Future<Output = F::Output> {
    TraceContext::scope(incoming, future.instrument(span))
}

#[cfg(feature = "otel")]
mod otel {
    use busway_core::Headers;
    use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
    use opentelemetry::trace::TraceContextExt;
    use opentelemetry_sdk::propagation::TraceContextPropagator;
    use tracing::Span;
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    struct Inject<'a>(&'a mut Headers);

    impl Injector for Inject<'_> {
        fn set(&mut self, key: &str, value: String) {
            self.0.insert(key, value);
        }
    }

    struct Extract<'a>(&'a Headers);

    impl Extractor for Extract<'_> {
        fn get(&self, key: &str) -> Option<&str> {
            self.0.get(key)
        }
        fn keys(&self) -> Vec<&str> {
            self.0.iter().map(|(k, _)| k).collect()
        }
    }

    /// Writes `span`'s OpenTelemetry context; `false` if it has none (no
    /// OpenTelemetry layer in the subscriber).
    pub(super) fn inject(span: &Span, headers: &mut Headers) -> bool {
        let context = span.context();
        if !context.span().span_context().is_valid() {
            return false;
        }
        TraceContextPropagator::new().inject_context(&context, &mut Inject(headers));
        true
    }

    /// Makes `span` a child of the remote span `headers` name.
    pub(super) fn set_parent(span: &Span, headers: &Headers) {
        let context = TraceContextPropagator::new().extract(&Extract(headers));
        if context.span().span_context().is_valid() {
            // Fails only without an OpenTelemetry layer, or once started.
            let _ = span.set_parent(context);
        }
    }
}
