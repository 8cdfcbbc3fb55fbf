//! The serving side: method routing on queue `rpc_{service}`.

use std::collections::HashMap;
use std::future::{Future, IntoFuture};
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::{Arc, RwLock};

use busway_core::{
    CodecError, ConsumeOptions, Delivery, Durability, Message, Publish, QueueName, QueueSpec,
};
use futures::future::BoxFuture;
use futures::FutureExt;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::Value;

use super::wire::{service_queue, RequestBody, RequestIn, ResponseBody};
use crate::bus::{lock, Bus, Counters, SetupError};
use crate::handler::{panic_message, HandlerError};
use crate::middleware::{Envelope, HandlerLayers, HandlerService, MethodRequest};
use crate::params::Params;

/// A handler called with the params as JSON (what layers see).
type ValueMethod =
    Arc<dyn Fn(MethodRequest) -> BoxFuture<'static, Result<Value, HandlerError>> + Send + Sync>;

/// A handler called with the params as JSON text, answering with its
/// result as JSON text: the params are decoded straight into the handler's
/// type and its result encoded straight from it, with no JSON tree between.
type RawMethod =
    Arc<dyn Fn(&str) -> BoxFuture<'static, Result<Box<RawValue>, HandlerError>> + Send + Sync>;

/// One method of a service.
#[derive(Clone)]
struct Method {
    value: ValueMethod,
    /// Set when no layers need the params as a [`Value`].
    raw: Option<RawMethod>,
}

/// A request as read: the method, and the params (left encoded in the
/// payload when the body is JSON).
struct Request {
    method: String,
    params: Params,
}

/// A method's result, as it goes into the response's `data`.
#[derive(Serialize)]
#[serde(untagged)]
enum Data {
    Raw(Box<RawValue>),
    Value(Value),
}

/// Reads a request body: JSON without building a tree of its params,
/// other codecs through [`RequestBody`].
fn decode_request(message: &Message) -> Result<Request, CodecError> {
    if let Some(body) = crate::params::read_json::<RequestIn<'_>>(message)? {
        return Ok(Request {
            method: body.method.into_owned(),
            params: Params::located(&message.payload, body.params),
        });
    }
    let body: RequestBody = message.decode()?;
    Ok(Request {
        method: body.method,
        params: Params::Value(body.params),
    })
}

impl Method {
    /// Runs the handler on `request` (of `message`, delivered for the `attempt`th time).
    async fn call(
        &self,
        message: &Message,
        attempt: u32,
        request: Request,
    ) -> Result<Data, HandlerError> {
        let params = match request.params {
            Params::Raw(range) => crate::params::text(message, &range)?,
            Params::Value(params) => {
                return self
                    .call_value(message, attempt, request.method, params)
                    .await
            }
        };
        if let Some(raw) = &self.raw {
            return raw(params).await.map(Data::Raw);
        }
        let params = serde_json::from_str(params)
            .map_err(|e| HandlerError::permanent(format!("invalid params: {e}")))?;
        self.call_value(message, attempt, request.method, params)
            .await
    }

    async fn call_value(
        &self,
        message: &Message,
        attempt: u32,
        method: String,
        params: Value,
    ) -> Result<Data, HandlerError> {
        let envelope = Envelope::new(message.clone(), attempt, method, params);
        (self.value)(envelope).await.map(Data::Value)
    }
}

/// The methods of one service on this bus.
#[derive(Default)]
pub(crate) struct MethodTable {
    methods: RwLock<HashMap<String, Method>>,
}

impl MethodTable {
    fn get(&self, method: &str) -> Option<Method> {
        self.methods
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(method)
            .cloned()
    }
    /// Whether `method` has a handler.
    pub(crate) fn contains(&self, method: &str) -> bool {
        self.get(method).is_some()
    }
    fn insert(&self, name: String, method: Method) {
        self.methods
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name, method);
    }
}

/// How long a reply outlives its request's deadline.
const LATE_REPLY_GRACE: std::time::Duration = std::time::Duration::from_secs(60);

/// The default number of requests a service handles at once.
pub const DEFAULT_RPC_CONCURRENCY: usize = 16;

/// Registering a request handler: optionally set the service's
/// [`concurrency`](Self::concurrency), then `.await` it.
#[must_use = "the handler is registered when this is awaited"]
pub struct RegisterRequestHandler {
    bus: Bus,
    service: String,
    method: String,
    handler: Method,
    concurrency: usize,
    layers: HandlerLayers<MethodRequest, Value>,
}

impl std::fmt::Debug for RegisterRequestHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegisterRequestHandler")
            .field("service", &self.service)
            .field("method", &self.method)
            .field("concurrency", &self.concurrency)
            .finish_non_exhaustive()
    }
}

impl RegisterRequestHandler {
    /// How many requests of this service run at once (default
    /// [`DEFAULT_RPC_CONCURRENCY`]). Takes effect with the service's first
    /// handler, which starts its consumer.
    pub fn concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = concurrency.max(1);
        self
    }
    /// Runs this method's requests through `layer` (see
    /// [`middleware`](crate::middleware)); the first layer added is the
    /// outermost. A layer's request is a [`MethodRequest`] (the params as
    /// JSON, the method in `kind`); its errors are answered as error responses.
    ///
    /// ```
    /// use busway::middleware::{CircuitBreakerLayer, RateLimitLayer};
    /// use std::time::Duration;
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// let bus = busway::Bus::connect("memory://").await?;
    /// bus.register_request_handler("geo", "lookup", |ip: String| async move { Ok(ip.len()) })
    ///     .layer(RateLimitLayer::new(100, Duration::from_secs(1)).rejecting())
    ///     .layer(CircuitBreakerLayer::default())
    ///     .await?;
    /// # bus.shutdown().await;
    /// # Ok(())
    /// # }
    /// # tokio::runtime::Runtime::new().unwrap().block_on(run()).unwrap();
    /// ```
    pub fn layer<L>(mut self, layer: L) -> Self
    where
        L: tower::Layer<HandlerService<MethodRequest, Value>> + Send + Sync + 'static,
        L::Service: tower::Service<MethodRequest, Response = Value, Error = HandlerError>
            + Clone
            + Send
            + Sync
            + 'static,
        <L::Service as tower::Service<MethodRequest>>::Future: Send + 'static,
    {
        self.layers.push(layer);
        self
    }
}

impl IntoFuture for RegisterRequestHandler {
    type Output = Result<(), SetupError>;
    type IntoFuture = Pin<Box<dyn Future<Output = Result<(), SetupError>> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(register(self))
    }
}

impl Bus {
    /// Serves `method` of `service`: requests arriving on queue
    /// `rpc_{service}` (declared as the reference does: not durable, no
    /// arguments) with `"method": method` have their `params` decoded as `P`
    /// and passed to `handler`; its result is sent back as
    /// `{"status":"success","data":…}`. Unknown methods, params that do not
    /// decode, handler errors and panics are answered with
    /// `{"status":"error","message":…}`, and the service keeps serving.
    ///
    /// ```
    /// use busway::{Bus, HandlerError};
    /// use serde::{Deserialize, Serialize};
    ///
    /// #[derive(Deserialize)]
    /// struct GetUser { user_id: u64 }
    /// #[derive(Serialize, Deserialize)]
    /// struct User { id: u64, name: String }
    ///
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// let bus = Bus::connect("memory://").await?;
    /// bus.register_request_handler("user_service", "get_user", |q: GetUser| async move {
    ///     if q.user_id == 0 {
    ///         return Err(HandlerError::new("no such user"));
    ///     }
    ///     Ok(User { id: q.user_id, name: "Ann".into() })
    /// })
    /// .concurrency(4)
    /// .await?;
    /// let user: User = bus.request("user_service", "get_user", &serde_json::json!({"user_id": 7})).await?;
    /// assert_eq!(user.name, "Ann");
    /// # Ok(())
    /// # }
    /// # tokio::runtime::Runtime::new().unwrap().block_on(run()).unwrap();
    /// ```
    pub fn register_request_handler<P, R, F, Fut>(
        &self,
        service: &str,
        method: &str,
        handler: F,
    ) -> RegisterRequestHandler
    where
        P: DeserializeOwned + Send + 'static,
        R: Serialize + Send + 'static,
        F: Fn(P) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, HandlerError>> + Send + 'static,
    {
        let handler = Arc::new(handler);
        let name: Arc<str> = Arc::from(method);
        let value: ValueMethod = {
            let (handler, name) = (handler.clone(), name.clone());
            Arc::new(move |request: MethodRequest| {
                let handler = handler.clone();
                let name = name.clone();
                async move {
                    let params: P = serde_json::from_value(request.body).map_err(|e| {
                        HandlerError::permanent(format!("invalid params for `{name}`: {e}"))
                    })?;
                    let result = handler(params).await?;
                    serde_json::to_value(result).map_err(|e| {
                        HandlerError::permanent(format!(
                            "could not encode the result of `{name}`: {e}"
                        ))
                    })
                }
                .boxed()
            })
        };
        let raw: RawMethod = Arc::new(move |params: &str| {
            let params: Result<P, _> = serde_json::from_str(params);
            let handler = handler.clone();
            let name = name.clone();
            async move {
                let params = params.map_err(|e| {
                    HandlerError::permanent(format!("invalid params for `{name}`: {e}"))
                })?;
                let result = handler(params).await?;
                serde_json::value::to_raw_value(&result).map_err(|e| {
                    HandlerError::permanent(format!("could not encode the result of `{name}`: {e}"))
                })
            }
            .boxed()
        });
        let erased = Method {
            value,
            raw: Some(raw),
        };
        RegisterRequestHandler {
            bus: self.clone(),
            service: service.to_owned(),
            method: method.to_owned(),
            handler: erased,
            concurrency: DEFAULT_RPC_CONCURRENCY,
            layers: HandlerLayers::default(),
        }
    }
}

async fn register(reg: RegisterRequestHandler) -> Result<(), SetupError> {
    let bus = reg.bus;
    if bus.is_shut_down() {
        return Err(SetupError::ShutDown);
    }
    let queue = service_queue(&reg.service)?;
    let (table, start) = {
        let mut services = lock(&bus.inner.services);
        match services.get(&reg.service) {
            Some(table) => (table.clone(), false),
            None => {
                let table = Arc::new(MethodTable::default());
                services.insert(reg.service.clone(), table.clone());
                (table, true)
            }
        }
    };
    let handler = if reg.layers.is_empty() {
        reg.handler
    } else {
        let erased = reg.handler.value;
        let base = HandlerService::new(tower::service_fn(move |request: MethodRequest| {
            erased(request)
        }));
        let service = reg.layers.wrap(base);
        let layered: ValueMethod = Arc::new(move |request: MethodRequest| {
            use tower::ServiceExt;
            service.clone().oneshot(request).boxed()
        });
        Method {
            value: layered,
            raw: None,
        }
    };
    table.insert(reg.method, handler);
    if !start {
        return Ok(());
    }
    let started = async {
        let transport = &bus.inner.transport;
        transport
            .declare_queue(
                &QueueSpec::new(queue.clone())
                    .with_durable(false)
                    .with_dead_letter(None),
            )
            .await?;
        let prefetch = u16::try_from(reg.concurrency).unwrap_or(u16::MAX);
        Ok::<_, SetupError>(
            transport
                .consume(&queue, ConsumeOptions::with_prefetch(prefetch))
                .await?,
        )
    }
    .await;
    let stream = match started {
        Ok(stream) => stream,
        Err(e) => {
            lock(&bus.inner.services).remove(&reg.service);
            return Err(e);
        }
    };
    let server = bus.clone();
    bus.spawn_consumer(queue, stream, reg.concurrency, move |delivery| {
        serve(server.clone(), table.clone(), delivery)
    });
    Ok(())
}

/// Answers one request, then acks it. Never fails: every problem becomes an
/// error response (or, without a `reply_to`, a log line and a count).
async fn serve(bus: Bus, table: Arc<MethodTable>, delivery: Delivery) {
    let message = delivery.message();
    let request = decode_request(message);
    let incoming = crate::trace::extract(message);
    let span = crate::trace::rpc_serve_span(
        delivery.queue().as_str(),
        request.as_ref().map(|r| r.method.as_str()).ok(),
        message,
        incoming.as_ref(),
    );
    crate::trace::process(span, incoming, answer(bus, table, delivery, request)).await
}

async fn answer(
    bus: Bus,
    table: Arc<MethodTable>,
    delivery: Delivery,
    request: Result<Request, CodecError>,
) {
    let counters = &bus.inner.counters;
    let message = delivery.message();
    let response = match request {
        Err(e) => {
            Counters::bump(&counters.malformed);
            ResponseBody::Error {
                message: format!("malformed request: {e}"),
            }
        }
        Ok(request) => match table.get(&request.method) {
            None => ResponseBody::Error {
                message: format!("unknown method: {}", request.method),
            },
            Some(method) => {
                let timer = crate::metrics::HandlerTimer::start(&request.method);
                let response =
                    match AssertUnwindSafe(method.call(message, delivery.attempt(), request))
                        .catch_unwind()
                        .await
                    {
                        Ok(Ok(data)) => ResponseBody::Success { data },
                        Ok(Err(error)) => ResponseBody::Error {
                            message: error.to_string(),
                        },
                        Err(panic) => {
                            Counters::bump(&counters.panics);
                            ResponseBody::Error {
                                message: panic_message(panic.as_ref()),
                            }
                        }
                    };
                timer.finish(matches!(response, ResponseBody::Success { .. }));
                response
            }
        },
    };
    if matches!(response, ResponseBody::Error { .. }) {
        crate::trace::record_error(&tracing::Span::current());
        Counters::bump(&counters.rpc_errors);
    }
    reply(&bus, message, &response).await;
    crate::handler::ack(delivery, "acking a request").await;
}

async fn reply(bus: &Bus, request: &Message, response: &ResponseBody<Data>) {
    let Some(reply_to) = request.reply_to.as_deref() else {
        tracing::warn!(kind = %request.kind, "request without reply_to; nothing to answer");
        return;
    };
    // Not a queue name of ours: brokers generate reply addresses
    // (RabbitMQ's direct reply-to) with characters queue names may not have.
    let queue = match QueueName::reply_address(reply_to) {
        Ok(q) => q,
        Err(e) => {
            tracing::warn!(reply_to, error = %e, "cannot reply to this address");
            return;
        }
    };
    let mut message = match Message::json("rpc_response", response) {
        Ok(m) => m,
        Err(e) => {
            tracing::error!(error = %e, "encoding a response failed");
            return;
        }
    };
    message.correlation_id = request.correlation_id.clone();
    crate::trace::inject(&tracing::Span::current(), &mut message.headers);
    // Kept a while past the caller's deadline so a late reply is still seen
    // (and counted) by a live caller, but never piles up for a gone one.
    message.expires_at = request.expires_at.map(|at| at + LATE_REPLY_GRACE);
    let sent = bus
        .inner
        .transport
        .publish_batch(
            vec![Publish::to_queue(queue, message)],
            Durability::Buffered,
        )
        .await;
    if let Err(e) = sent {
        // The caller is gone (its reply queue with it) or the transport failed.
        tracing::debug!(reply_to, error = %e, "a reply could not be delivered");
    }
}
