//! OpenTelemetry export of busway's spans, and the W3C trace context that
//! carries one trace from a publisher to its consumers, across backends.
//!
//! One OpenTelemetry pipeline (a `tracing-opentelemetry` layer exporting to
//! memory) serves every test of this file; each test finds its own spans
//! by the trace id of the span it starts.

mod support;

use std::future::IntoFuture;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use busway::trace::{TraceParent, TRACEPARENT};
use busway::{Bus, ConsumeOptions, Event, Message, Publish, QueueName};
use futures::StreamExt;
use opentelemetry::trace::{SpanId, SpanKind, TraceContextExt, TraceId, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;

use support::{unique, PATIENCE};

/// The exporter every span of this test binary goes to.
fn exporter() -> &'static InMemorySpanExporter {
    static PIPELINE: OnceLock<(InMemorySpanExporter, SdkTracerProvider)> = OnceLock::new();
    &PIPELINE
        .get_or_init(|| {
            let exporter = InMemorySpanExporter::default();
            let provider = SdkTracerProvider::builder()
                .with_simple_exporter(exporter.clone())
                .build();
            let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("busway-tests"));
            let subscriber = tracing_subscriber::registry().with(layer);
            if tracing::subscriber::set_global_default(subscriber).is_err() {
                panic!("another subscriber was installed first");
            }
            (exporter, provider)
        })
        .0
}

/// The trace id and span id of `span`'s OpenTelemetry context.
fn ids(span: &tracing::Span) -> (TraceId, SpanId) {
    let context = span.context();
    let span_context = context.span().span_context().clone();
    (span_context.trace_id(), span_context.span_id())
}

/// The trace the code running now belongs to.
fn current_trace() -> TraceId {
    ids(&tracing::Span::current()).0
}

/// Waits until a finished span of `trace` is named `name`.
/// Handles `resize` tasks on `tasks`, reporting the trace each one ran in.
fn report_resize_traces(tasks: &busway::tasks::TaskQueue) -> mpsc::UnboundedReceiver<TraceId> {
    let (seen, handled) = mpsc::unbounded_channel();
    tasks.register_handler("resize", move |_: Value| {
        let seen = seen.clone();
        async move {
            let _ = seen.send(current_trace());
            Ok(())
        }
    });
    handled
}

async fn finished_span(trace: TraceId, name: &str) -> anyhow::Result<SpanData> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let spans = exporter().get_finished_spans()?;
        if let Some(span) = spans
            .into_iter()
            .find(|s| s.span_context.trace_id() == trace && s.name == name)
        {
            return Ok(span);
        }
        if Instant::now() > deadline {
            let names: Vec<_> = exporter()
                .get_finished_spans()?
                .into_iter()
                .filter(|s| s.span_context.trace_id() == trace)
                .map(|s| s.name)
                .collect();
            bail!("no span `{name}` in trace {trace}; it has {names:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn attribute(span: &SpanData, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.to_string())
}

/// Checks producer → (remote) consumer → handler for one message of `trace`.
async fn assert_producer_consumer_handler(
    trace: TraceId,
    parent: SpanId,
    destination: &str,
    handler: &str,
) -> anyhow::Result<()> {
    let publish = finished_span(trace, &format!("publish {destination}")).await?;
    assert_eq!(publish.span_kind, SpanKind::Producer);
    assert_eq!(
        publish.parent_span_id, parent,
        "publish is a child of the caller's span"
    );
    assert!(!publish.parent_span_is_remote);
    assert_eq!(
        attribute(&publish, "messaging.system").as_deref(),
        Some("busway")
    );
    assert_eq!(
        attribute(&publish, "messaging.destination.name").as_deref(),
        Some(destination)
    );

    let consume = finished_span(trace, &format!("process {destination}")).await?;
    assert_eq!(consume.span_kind, SpanKind::Consumer);
    assert_eq!(
        consume.parent_span_id,
        publish.span_context.span_id(),
        "the consumer's parent is the publisher's span"
    );
    assert!(
        consume.parent_span_is_remote,
        "that parent came in the message"
    );
    assert_eq!(
        attribute(&consume, "messaging.operation").as_deref(),
        Some("process")
    );

    let handle = finished_span(trace, handler).await?;
    assert_eq!(handle.parent_span_id, consume.span_context.span_id());
    assert!(!handle.parent_span_is_remote);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_is_handled_in_a_child_of_the_publishers_span() -> anyhow::Result<()> {
    exporter();
    let bus = Bus::connect("memory://").await?;
    let prefix = unique("traced");
    let event_type = format!("{prefix}.created");
    let (seen, mut handled) = mpsc::unbounded_channel();
    bus.register_event_handler(&format!("{prefix}.*"), &unique("group"), move |_: Event| {
        let seen = seen.clone();
        async move {
            let _ = seen.send(current_trace());
            Ok(())
        }
    })
    .await?;

    let checkout = tracing::info_span!("checkout");
    let (trace, parent) = ids(&checkout);
    assert_ne!(trace, TraceId::INVALID);
    bus.publish_event(&Event::new(
        event_type.clone(),
        "order_1",
        json!({"total": 3}),
    ))
    .instrument(checkout.clone())
    .await?;
    let handled_in = tokio::time::timeout(PATIENCE, handled.recv())
        .await
        .context("the event was not handled")?;
    assert_eq!(
        handled_in,
        Some(trace),
        "the handler runs in the publisher's trace"
    );

    let handler = format!("handle event {event_type}");
    assert_producer_consumer_handler(trace, parent, &event_type, &handler).await?;
    bus.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_rpc_call_is_served_in_a_child_of_the_client_span() -> anyhow::Result<()> {
    exporter();
    let bus = Bus::connect("memory://").await?;
    let service = unique("traced_service");
    bus.register_request_handler(&service, "whoami", |_: Value| async move {
        Ok(current_trace().to_string())
    })
    .await?;

    let caller = tracing::info_span!("caller");
    let (trace, parent) = ids(&caller);
    let served_in: String = bus
        .request(&service, "whoami", &json!({}))
        .into_future()
        .instrument(caller.clone())
        .await?;
    assert_eq!(
        served_in,
        trace.to_string(),
        "the server runs in the caller's trace"
    );

    let client = finished_span(trace, &format!("{service}/whoami")).await?;
    assert_eq!(client.span_kind, SpanKind::Client);
    assert_eq!(client.parent_span_id, parent);
    assert_eq!(attribute(&client, "rpc.method").as_deref(), Some("whoami"));

    let server = finished_span(trace, &format!("rpc_{service}/whoami")).await?;
    assert_eq!(server.span_kind, SpanKind::Server);
    assert_eq!(server.parent_span_id, client.span_context.span_id());
    assert!(server.parent_span_is_remote);
    bus.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_rpc_reply_carries_the_server_span() -> anyhow::Result<()> {
    exporter();
    let bus = Bus::connect("memory://").await?;
    let service = unique("traced_replies");
    bus.register_request_handler(&service, "ping", |_: Value| async move { Ok("pong") })
        .await?;

    // A request from outside, as another service would send it.
    let transport = bus.transport().clone();
    let replies = QueueName::new(unique("replies"))?;
    transport.declare_temporary_queue(&replies).await?;
    let mut stream = transport
        .consume(&replies, ConsumeOptions::with_prefetch(1))
        .await?;
    let sent = TraceParent::parse("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")?;
    let request = Message::json("rpc_request", &json!({"method": "ping", "params": {}}))?
        .with_correlation_id("call-1")
        .with_reply_to(replies.as_str())
        .with_header(TRACEPARENT, sent.to_string());
    transport
        .publish(Publish::to_queue(
            QueueName::new(format!("rpc_{service}"))?,
            request,
        ))
        .await?;
    let reply = tokio::time::timeout(PATIENCE, stream.next())
        .await
        .context("no reply")?
        .context("the reply stream ended")??;
    let carried = TraceParent::parse(reply.message().headers.get(TRACEPARENT).unwrap_or(""))?;
    assert_eq!(
        carried.trace_id(),
        sent.trace_id(),
        "the reply stays in the caller's trace"
    );

    let trace = TraceId::from_bytes(sent.trace_id());
    let server = finished_span(trace, &format!("rpc_{service}/ping")).await?;
    assert_eq!(server.parent_span_id, SpanId::from_bytes(sent.parent_id()));
    assert_eq!(
        SpanId::from_bytes(carried.parent_id()),
        server.span_context.span_id(),
        "the reply's parent is the server span"
    );
    reply.ack().await?;
    bus.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_traceparent_is_ignored() -> anyhow::Result<()> {
    exporter();
    let bus = Bus::connect("memory://").await?;
    let tasks = bus.task_queue(&unique("untraced"))?;
    let mut handled = report_resize_traces(&tasks);
    tasks.start_workers().workers(1).await?;
    // Straight to the queue, as a foreign producer would send it.
    let message = Message::json("resize", &json!({"type": "resize", "params": {}}))?
        .with_header(TRACEPARENT, "00-this-is-not-a-trace-01");
    bus.transport()
        .publish(Publish::to_queue(tasks.name().clone(), message))
        .await?;
    let trace = tokio::time::timeout(PATIENCE, handled.recv())
        .await
        .context("the task was not handled")?
        .context("the handler is gone")?;
    assert_ne!(
        trace,
        TraceId::INVALID,
        "the consumer starts a trace of its own"
    );
    let consume = finished_span(trace, &format!("process {}", tasks.name())).await?;
    assert_eq!(consume.parent_span_id, SpanId::INVALID, "a root span");
    bus.shutdown().await;
    Ok(())
}

/// A task submitted inside a span is handled in a child of its producer span.
async fn traced_task(bus: Bus) -> anyhow::Result<()> {
    let tasks = bus.task_queue(&unique("traced_tasks"))?;
    let mut handled = report_resize_traces(&tasks);
    tasks.start_workers().workers(1).await?;

    let upload = tracing::info_span!("upload");
    let (trace, parent) = ids(&upload);
    tasks
        .submit("resize", &json!({"width": 64}))
        .into_future()
        .instrument(upload.clone())
        .await?;
    let handled_in = tokio::time::timeout(PATIENCE, handled.recv())
        .await
        .context("the task was not handled")?;
    assert_eq!(handled_in, Some(trace));
    let queue = tasks.name().as_str().to_owned();
    assert_producer_consumer_handler(trace, parent, &queue, "handle task resize").await?;
    bus.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_through_sqlite_keeps_its_trace() -> anyhow::Result<()> {
    exporter();
    let dir = tempfile::tempdir()?;
    let url = format!("sqlite://{}", dir.path().join("bus.db").display());
    let bus = Bus::builder(busway::connect(&url).await?)
        .owns_transport(true)
        .build();
    traced_task(bus).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_through_rabbitmq_keeps_its_trace() -> anyhow::Result<()> {
    exporter();
    let Some(url) = support::amqp_url()? else {
        return Ok(());
    };
    let transport = busway_rabbitmq::RabbitMqTransport::connect(&url).await?;
    let bus = Bus::builder(Arc::new(transport))
        .owns_transport(true)
        .build();
    traced_task(bus).await
}
