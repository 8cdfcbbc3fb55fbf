//! The calling side: one reply route per bus (direct reply-to where the
//! backend has it, else a reply queue), many calls in flight.

use std::collections::HashMap;
use std::future::{Future, IntoFuture};
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use busway_core::{
    Codec, ConsumeOptions, DirectReplyChannel, Durability, Message, Publish, PublishError,
    QueueName, CONTENT_TYPE_JSON,
};
use futures::stream::BoxStream;
use futures::StreamExt;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;
use tokio::sync::oneshot;
use tracing::Instrument;

use super::wire::{service_queue, ResponseBody};
use super::RpcError;
use crate::bus::{lock, Bus, Counters};

/// How long a call waits for its reply unless told otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Where replies come back: straight to this client (RabbitMQ's direct
/// reply-to) or through a reply queue of its own (every other backend).
enum ReplyRoute {
    Direct(Arc<dyn DirectReplyChannel>),
    Queue(QueueName),
}

type Pending = Arc<Mutex<HashMap<String, oneshot::Sender<Message>>>>;

/// How replies come back, and the calls waiting for them.
pub(crate) struct RpcClient {
    route: ReplyRoute,
    pending: Pending,
}

impl RpcClient {
    async fn start(bus: &Bus) -> Result<Arc<Self>, RpcError> {
        let transport = &bus.inner.transport;
        let pending: Pending = Arc::new(Mutex::new(HashMap::new()));
        if let Some(direct) = transport.direct_replies().await? {
            bus.spawn_reply_listener(direct.replies, pending.clone());
            return Ok(Arc::new(Self {
                route: ReplyRoute::Direct(direct.channel),
                pending,
            }));
        }
        let id = uuid::Uuid::new_v4().simple().to_string();
        let reply_queue = QueueName::new(format!("rpc_reply_{}", &id[..16]))?;
        transport.declare_temporary_queue(&reply_queue).await?;
        let stream = transport
            .consume(&reply_queue, ConsumeOptions::with_prefetch(256))
            .await?;
        let client = Arc::new(Self {
            route: ReplyRoute::Queue(reply_queue.clone()),
            pending,
        });
        let pending = client.pending.clone();
        let counters = bus.inner.counters.clone();
        let metrics = bus.clone();
        bus.spawn_consumer(reply_queue, stream, 256, move |delivery| {
            let waiter = delivery
                .message()
                .correlation_id
                .as_deref()
                .and_then(|id| lock(&pending).remove(id));
            let counters = counters.clone();
            let metrics = metrics.clone();
            async move {
                let metrics = &metrics.inner.metrics;
                let queue = delivery.queue().clone();
                // The caller first, then the ack: a reply is read-only, and
                // a lost ack only means it comes back once more, unwanted.
                let delivered = match waiter {
                    Some(waiter) => waiter.send(delivery.message().clone()).is_ok(),
                    None => false,
                };
                crate::handler::ack(delivery, "acking a reply").await;
                if !delivered {
                    Counters::bump(&counters.late_replies);
                    metrics.late_reply();
                    tracing::debug!(queue = %queue, "dropped a late or unknown reply");
                }
            }
        });
        Ok(client)
    }

    /// The `reply_to` of this client's requests.
    fn reply_to(&self) -> &str {
        match &self.route {
            ReplyRoute::Direct(channel) => channel.reply_to(),
            ReplyRoute::Queue(queue) => queue.as_str(),
        }
    }

    /// Sends a request on this client's route.
    async fn send(&self, bus: &Bus, publish: Publish) -> Result<(), PublishError> {
        match &self.route {
            ReplyRoute::Direct(channel) => channel.send(publish).await,
            ReplyRoute::Queue(_) => {
                bus.inner
                    .transport
                    .publish_batch(vec![publish], Durability::Buffered)
                    .await
            }
        }
    }

    /// Fails every waiting call (their senders are dropped).
    pub(crate) fn fail_pending(&self) {
        lock(&self.pending).clear();
    }
}

impl Bus {
    /// Hands each direct reply to the call waiting for it, until the bus
    /// shuts down or the transport closes.
    fn spawn_reply_listener(&self, mut replies: BoxStream<'static, Message>, pending: Pending) {
        let counters = self.inner.counters.clone();
        let bus = self.clone();
        self.spawn_worker(async move {
            while let Some(reply) = replies.next().await {
                let waiter = reply
                    .correlation_id
                    .as_deref()
                    .and_then(|id| lock(&pending).remove(id));
                let delivered = match waiter {
                    Some(waiter) => waiter.send(reply).is_ok(),
                    None => false,
                };
                if !delivered {
                    Counters::bump(&counters.late_replies);
                    bus.inner.metrics.late_reply();
                    tracing::debug!("dropped a late or unknown reply");
                }
            }
        });
    }
}

/// Removes a call's entry however its future ends (reply, timeout, drop).
struct PendingGuard {
    pending: Pending,
    correlation_id: String,
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        lock(&self.pending).remove(&self.correlation_id);
    }
}

/// A call being prepared: set a [`timeout`](Self::timeout), then `.await` it
/// for the typed result. It owns what it needs, so it can also be spawned
/// or joined with others (the reference `call_async` / `call_batch`).
///
/// ```
/// use busway::{Bus, RpcError};
/// use std::future::IntoFuture;
/// use std::time::Duration;
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let bus = Bus::connect("memory://").await?;
/// bus.register_request_handler("echo", "say", |s: String| async move { Ok(s) }).await?;
/// let calls = (0..3).map(|i| bus.request::<String>("echo", "say", &format!("hi {i}")).timeout(Duration::from_secs(5)).into_future());
/// let replies = futures::future::try_join_all(calls).await?;
/// assert_eq!(replies[2], "hi 2");
///
/// let err = bus.request::<String>("echo", "shout", &"hi").await.unwrap_err();
/// assert!(matches!(err, RpcError::Remote { .. }));
/// # Ok(())
/// # }
/// # tokio::runtime::Runtime::new().unwrap().block_on(run()).unwrap();
/// ```
#[must_use = "a request does nothing until it is awaited"]
pub struct Request<T> {
    bus: Bus,
    service: String,
    method: String,
    /// Encoded once, straight from the caller's type (no JSON tree between).
    params: Result<Box<RawValue>, serde_json::Error>,
    timeout: Duration,
    _reply: PhantomData<fn() -> T>,
}

impl<T> std::fmt::Debug for Request<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request")
            .field("service", &self.service)
            .field("method", &self.method)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl<T> Request<T> {
    /// Gives up with [`RpcError::Timeout`] after `timeout` (default 30 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
}

impl<T: DeserializeOwned + Send + 'static> IntoFuture for Request<T> {
    type Output = Result<T, RpcError>;
    type IntoFuture = Pin<Box<dyn Future<Output = Result<T, RpcError>> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(call(self))
    }
}

impl Bus {
    /// Calls `method` of `service` with `params` and decodes the reply's
    /// `data` as `T`. Sent in the reference format to queue `rpc_{service}`
    /// with a correlation id and this bus's reply queue; see [`Request`].
    pub fn request<T: DeserializeOwned>(
        &self,
        service: &str,
        method: &str,
        params: &(impl Serialize + ?Sized),
    ) -> Request<T> {
        Request {
            bus: self.clone(),
            service: service.to_owned(),
            method: method.to_owned(),
            params: serde_json::value::to_raw_value(params),
            timeout: DEFAULT_TIMEOUT,
            _reply: PhantomData,
        }
    }

    /// The reference name for [`request`](Self::request), untyped: the reply's `data` as JSON.
    pub fn send_request(
        &self,
        service: &str,
        method: &str,
        params: &(impl Serialize + ?Sized),
    ) -> Request<Value> {
        self.request(service, method, params)
    }

    async fn rpc_client(&self) -> Result<&Arc<RpcClient>, RpcError> {
        self.inner
            .rpc_client
            .get_or_try_init(|| RpcClient::start(self))
            .await
    }
}

/// Makes the call, counting it and timing it by outcome.
async fn call<T: DeserializeOwned>(request: Request<T>) -> Result<T, RpcError> {
    let metrics = request
        .bus
        .inner
        .metrics
        .rpc(&request.service, &request.method);
    let started = std::time::Instant::now();
    let result = call_uncounted(request).await;
    metrics.record(crate::metrics::RpcOutcome::of(&result), started.elapsed());
    result
}

async fn call_uncounted<T: DeserializeOwned>(request: Request<T>) -> Result<T, RpcError> {
    let Request {
        bus,
        service,
        method,
        params,
        timeout,
        ..
    } = request;
    if bus.is_shut_down() {
        return Err(RpcError::ShutDown);
    }
    let params = params.map_err(|e| {
        RpcError::Encode(busway_core::CodecError::Encode {
            content_type: CONTENT_TYPE_JSON,
            message: e.to_string(),
        })
    })?;
    let queue = service_queue(&service)?;
    let client = bus.rpc_client().await?;
    let correlation_id = uuid::Uuid::new_v4().to_string();
    let body = RequestOut {
        method: &method,
        params: &params,
        timestamp: crate::time::now_iso8601(),
    };
    let message = Message::json("rpc_request", &body)
        .map_err(RpcError::Encode)?
        .with_correlation_id(correlation_id.clone())
        .with_reply_to(client.reply_to())
        .with_ttl(timeout);
    let mut message = crate::middleware::MessageContext::stamp_header(message);
    let span = crate::trace::rpc_call_span(&service, &method, queue.as_str(), &message);
    crate::trace::inject(&span, &mut message.headers);
    let (tx, rx) = oneshot::channel();
    lock(&client.pending).insert(correlation_id.clone(), tx);
    let _guard = PendingGuard {
        pending: client.pending.clone(),
        correlation_id,
    };
    let exchange = async {
        let sent = client.send(&bus, Publish::to_queue(queue, message));
        // The reply may arrive before the backend has confirmed the
        // request; either settles the call as soon as it says enough.
        tokio::pin!(sent, rx);
        let mut sent_done = false;
        loop {
            tokio::select! {
                result = &mut sent, if !sent_done => {
                    result.map_err(|e| match e {
                        PublishError::QueueNotFound(_) => RpcError::NoSuchService(service.clone()),
                        e => RpcError::Publish(e),
                    })?;
                    sent_done = true;
                }
                reply = &mut rx => return reply.map_err(|_| RpcError::ShutDown),
            }
        }
    };
    let reply = match tokio::time::timeout(timeout, exchange)
        .instrument(span.clone())
        .await
    {
        Ok(reply) => reply.inspect_err(|_| crate::trace::record_error(&span))?,
        Err(_) => {
            crate::trace::record_error(&span);
            return Err(RpcError::Timeout {
                service,
                method,
                timeout,
            });
        }
    };
    let decode_error = |message: String| RpcError::Decode {
        service: service.clone(),
        method: method.clone(),
        message,
    };
    if !matches!(
        Codec::for_content_type(&reply.content_type),
        Ok(Codec::Json)
    ) {
        let response: ResponseBody = reply.decode().map_err(|e| decode_error(e.to_string()))?;
        return match response {
            ResponseBody::Success { data } => {
                serde_json::from_value(data).map_err(|e| decode_error(e.to_string()))
            }
            ResponseBody::Error { message } => Err(RpcError::Remote {
                service,
                method,
                message,
            }),
        };
    }
    // JSON: `data` is decoded straight into `T`, with no JSON tree between.
    let response: ResponseIn<'_> =
        serde_json::from_slice(&reply.payload).map_err(|e| decode_error(e.to_string()))?;
    match (response.status.as_ref(), response.data, response.message) {
        ("success", data, _) => {
            let data = data.map_or("null", RawValue::get);
            serde_json::from_str(data).map_err(|e| decode_error(e.to_string()))
        }
        ("error", _, Some(message)) => Err(RpcError::Remote {
            service,
            method,
            message,
        }),
        (status, _, _) => Err(decode_error(format!(
            "not a reference response (status `{status}`, or an error without a message)"
        ))),
    }
}

/// A request as sent: the reference body with the params already encoded.
#[derive(Serialize)]
struct RequestOut<'a> {
    method: &'a str,
    params: &'a RawValue,
    timestamp: String,
}

/// A JSON reply as read: the reference body with `data` left encoded.
#[derive(Deserialize)]
struct ResponseIn<'a> {
    #[serde(borrow)]
    status: std::borrow::Cow<'a, str>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
    #[serde(default)]
    message: Option<String>,
}
