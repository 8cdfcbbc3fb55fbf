//! The command bus and the query bus, on the [`Bus`]'s request-response.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use busway_core::{Binding, ConsumeOptions, QueueName, TopicPattern};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::watch;

use super::projection::{ProjectionHandle, ProjectionStatus};
use crate::bus::lock;
use crate::{Bus, HandlerError, RpcError, SetupError};

/// The service commands are sent to by default (queue `rpc_command_bus`).
pub const COMMAND_SERVICE: &str = "command_bus";
/// The service queries are sent to by default (queue `rpc_query_bus`).
pub const QUERY_SERVICE: &str = "query_bus";

/// Sends commands, routed by their type, to the handler registered for it
/// (in any process on the same transport) and returns its result.
///
/// A result that is a JSON object with a numeric `position` field (the
/// position of the last event the command appended, as
/// [`Executed::position`](super::Executed)) tells a linked [`QueryBus`]
/// how far its read models must be before it answers: see
/// [`invalidates`](Self::invalidates).
///
/// ```
/// use busway::Bus;
/// use busway::es::{CommandBus, QueryBus};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let bus = Bus::connect("memory://").await?;
/// let queries = QueryBus::new(&bus);
/// let commands = CommandBus::new(&bus).invalidates(&queries);
/// commands.register("create_user", |c: serde_json::Value| async move {
///     Ok(serde_json::json!({"user_id": c["user_id"], "status": "created"}))
/// }).await?;
/// let result: serde_json::Value =
///     commands.send("create_user", &serde_json::json!({"user_id": "u1"})).await?;
/// assert_eq!(result["status"], "created");
/// # Ok(())
/// # }
/// # tokio::runtime::Runtime::new().unwrap().block_on(run()).unwrap();
/// ```
#[derive(Clone, Debug)]
pub struct CommandBus {
    bus: Bus,
    service: String,
    queries: Option<QueryBus>,
    timeout: Duration,
}

impl CommandBus {
    /// A command bus on `bus`, service [`COMMAND_SERVICE`].
    pub fn new(bus: &Bus) -> Self {
        Self {
            bus: bus.clone(),
            service: COMMAND_SERVICE.to_owned(),
            queries: None,
            timeout: Duration::from_secs(30),
        }
    }
    /// Uses another service name (one command bus per bounded context).
    pub fn with_service(mut self, service: &str) -> Self {
        self.service = service.to_owned();
        self
    }
    /// Gives up on a command's result after `timeout` (default 30 s).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
    /// After each successful command sent through this bus, `queries`
    /// drops its cached results and, if the result carries a `position`,
    /// waits for its followed projections to reach it before answering:
    /// a read after a write through the same buses is never stale.
    pub fn invalidates(mut self, queries: &QueryBus) -> Self {
        self.queries = Some(queries.clone());
        self
    }

    /// Handles commands of type `command_type`.
    pub async fn register<C, R, F, Fut>(
        &self,
        command_type: &str,
        handler: F,
    ) -> Result<(), SetupError>
    where
        C: DeserializeOwned + Send + 'static,
        R: Serialize + Send + 'static,
        F: Fn(C) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, HandlerError>> + Send + 'static,
    {
        self.bus
            .register_request_handler(&self.service, command_type, handler)
            .await
    }

    /// Sends `command` of type `command_type` and decodes the handler's result.
    pub async fn send<R: DeserializeOwned>(
        &self,
        command_type: &str,
        command: &(impl Serialize + ?Sized),
    ) -> Result<R, RpcError> {
        let result: Value = self
            .bus
            .request(&self.service, command_type, command)
            .timeout(self.timeout)
            .await?;
        if let Some(queries) = &self.queries {
            let position = result.get("position").and_then(Value::as_u64).unwrap_or(0);
            queries.note_write(position);
        }
        serde_json::from_value(result).map_err(|e| RpcError::Decode {
            service: self.service.clone(),
            method: command_type.to_owned(),
            message: e.to_string(),
        })
    }
}

#[derive(Default)]
struct QueryState {
    cache: Mutex<HashMap<(String, String), (Value, Instant)>>,
    min_position: AtomicU64,
    followed: Mutex<Vec<watch::Receiver<ProjectionStatus>>>,
    hits: AtomicU64,
    misses: AtomicU64,
    invalidations: AtomicU64,
}

/// Counters of a query bus's cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct QueryCacheStats {
    /// Queries answered from the cache.
    pub hits: u64,
    /// Queries sent to their handler.
    pub misses: u64,
    /// Times the cache was cleared, in whole or for some query types.
    pub invalidations: u64,
}

/// Sends queries, routed by type, to their handler and returns the reply,
/// with a cache of replies kept for a TTL and dropped when events arrive
/// ([`invalidate_on`](Self::invalidate_on)) or commands succeed through a
/// linked [`CommandBus`].
///
/// ```
/// use busway::Bus;
/// use busway::es::QueryBus;
/// use std::time::Duration;
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let bus = Bus::connect("memory://").await?;
/// let queries = QueryBus::new(&bus).with_ttl(Duration::from_secs(60));
/// queries.register("get_user", |q: serde_json::Value| async move {
///     Ok(serde_json::json!({"user_id": q["user_id"], "name": "Ann"}))
/// }).await?;
/// queries.invalidate_on("user.*", &["get_user"]).await?;
/// let q = serde_json::json!({"user_id": "u1"});
/// let first: serde_json::Value = queries.query("get_user", &q).await?;
/// let second: serde_json::Value = queries.query("get_user", &q).await?;
/// assert_eq!(first, second);
/// assert_eq!(queries.stats().hits, 1);
/// # Ok(())
/// # }
/// # tokio::runtime::Runtime::new().unwrap().block_on(run()).unwrap();
/// ```
#[derive(Clone)]
pub struct QueryBus {
    bus: Bus,
    service: String,
    ttl: Duration,
    consistency_timeout: Duration,
    state: Arc<QueryState>,
}

impl std::fmt::Debug for QueryBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueryBus")
            .field("service", &self.service)
            .field("ttl", &self.ttl)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl QueryBus {
    /// A query bus on `bus`, service [`QUERY_SERVICE`], caching replies for 5 minutes.
    pub fn new(bus: &Bus) -> Self {
        Self {
            bus: bus.clone(),
            service: QUERY_SERVICE.to_owned(),
            ttl: Duration::from_secs(300),
            consistency_timeout: Duration::from_secs(10),
            state: Arc::new(QueryState::default()),
        }
    }
    /// Uses another service name.
    pub fn with_service(mut self, service: &str) -> Self {
        self.service = service.to_owned();
        self
    }
    /// How long a reply is cached (zero: no cache).
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// What the cache has done.
    pub fn stats(&self) -> QueryCacheStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        QueryCacheStats {
            hits: get(&self.state.hits),
            misses: get(&self.state.misses),
            invalidations: get(&self.state.invalidations),
        }
    }

    /// Answers queries of type `query_type`.
    pub async fn register<Q, R, F, Fut>(
        &self,
        query_type: &str,
        handler: F,
    ) -> Result<(), SetupError>
    where
        Q: DeserializeOwned + Send + 'static,
        R: Serialize + Send + 'static,
        F: Fn(Q) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, HandlerError>> + Send + 'static,
    {
        self.bus
            .register_request_handler(&self.service, query_type, handler)
            .await
    }

    /// Makes queries wait, after a write through a linked command bus, until
    /// `projection` has reached the write's position.
    pub fn follow(&self, projection: &ProjectionHandle) {
        lock(&self.state.followed).push(projection.watch());
    }

    /// Drops every cached reply.
    pub fn invalidate_all(&self) {
        lock(&self.state.cache).clear();
        self.state.invalidations.fetch_add(1, Ordering::Relaxed);
    }

    /// Drops the cached replies of these query types.
    pub fn invalidate(&self, query_types: &[&str]) {
        lock(&self.state.cache).retain(|(kind, _), _| !query_types.contains(&kind.as_str()));
        self.state.invalidations.fetch_add(1, Ordering::Relaxed);
    }

    fn note_write(&self, position: u64) {
        self.state
            .min_position
            .fetch_max(position, Ordering::SeqCst);
        self.invalidate_all();
    }

    /// Drops the cached replies of `query_types` whenever an event whose
    /// type matches `pattern` is published on the bus (from any process).
    /// Listens on a temporary queue of this process.
    pub async fn invalidate_on(
        &self,
        pattern: &str,
        query_types: &[&str],
    ) -> Result<(), SetupError> {
        let pattern = TopicPattern::new(pattern)?;
        let queue = QueueName::new(format!("query_cache_{}", uuid::Uuid::new_v4().simple()))?;
        let transport = self.bus.transport();
        transport.declare_temporary_queue(&queue).await?;
        transport
            .bind(&Binding::new(queue.clone(), pattern))
            .await?;
        let stream = transport
            .consume(&queue, ConsumeOptions::with_prefetch(64))
            .await?;
        let this = self.clone();
        let kinds: Arc<Vec<String>> =
            Arc::new(query_types.iter().map(|s| (*s).to_owned()).collect());
        self.bus.spawn_consumer(queue, stream, 1, move |delivery| {
            let this = this.clone();
            let kinds = kinds.clone();
            async move {
                let kinds: Vec<&str> = kinds.iter().map(String::as_str).collect();
                this.invalidate(&kinds);
                crate::handler::ack(delivery, "acking an invalidation").await;
            }
        });
        Ok(())
    }

    async fn wait_for_projections(&self) {
        let position = self.state.min_position.load(Ordering::SeqCst);
        if position == 0 {
            return;
        }
        let followed = lock(&self.state.followed).clone();
        for mut status in followed {
            let reached = tokio::time::timeout(
                self.consistency_timeout,
                status.wait_for(|s| s.position >= position),
            )
            .await;
            if !matches!(reached, Ok(Ok(_))) {
                tracing::warn!(
                    position,
                    "a followed projection did not reach the last write in time"
                );
            }
        }
    }

    /// Sends query `query_type` with `params` (or answers from the cache) and decodes the reply.
    pub async fn query<R: DeserializeOwned>(
        &self,
        query_type: &str,
        params: &(impl Serialize + ?Sized),
    ) -> Result<R, RpcError> {
        self.wait_for_projections().await;
        let params = serde_json::to_value(params).map_err(|e| {
            RpcError::Encode(busway_core::CodecError::Encode {
                content_type: busway_core::CONTENT_TYPE_JSON,
                message: e.to_string(),
            })
        })?;
        let key = (query_type.to_owned(), params.to_string());
        let cached = if self.ttl.is_zero() {
            None
        } else {
            lock(&self.state.cache)
                .get(&key)
                .filter(|(_, at)| at.elapsed() < self.ttl)
                .map(|(value, _)| value.clone())
        };
        let value = match cached {
            Some(value) => {
                self.state.hits.fetch_add(1, Ordering::Relaxed);
                value
            }
            None => {
                self.state.misses.fetch_add(1, Ordering::Relaxed);
                let generation = self.state.invalidations.load(Ordering::SeqCst);
                let value: Value = self.bus.request(&self.service, query_type, &params).await?;
                // A reply that raced with an invalidation may be stale: do not keep it.
                if !self.ttl.is_zero()
                    && generation == self.state.invalidations.load(Ordering::SeqCst)
                {
                    lock(&self.state.cache).insert(key, (value.clone(), Instant::now()));
                }
                value
            }
        };
        serde_json::from_value(value).map_err(|e| RpcError::Decode {
            service: self.service.clone(),
            method: query_type.to_owned(),
            message: e.to_string(),
        })
    }
}
