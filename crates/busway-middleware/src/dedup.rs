//! Dedup by message id: a message handled once is not handled again when it
//! is delivered again (a redelivery after a lost ack, a duplicate publish).
//!
//! The layer asks a [`DedupStore`] before calling the handler and tells it
//! the outcome after. [`MemoryDedupStore`] keeps ids in memory, bounded in
//! number and age; a durable store (an inbox table in the backend's
//! database) plugs in through the same trait.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::time::Instant;
use tower::{Layer, Service};

use busway_core::Message;

use crate::envelope::MessageInfo;
use crate::error::LayerError;

/// What a store knows about a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    /// Never seen (or forgotten): the caller now holds it and must [`finish`](DedupStore::finish) it.
    New,
    /// Another caller holds it right now.
    InProgress,
    /// Handled successfully before.
    Done,
}

/// Where dedup keys are remembered.
///
/// `begin` atomically checks a key and, if it is new, marks it in progress;
/// `finish` records the outcome: a success makes the key done, a failure
/// forgets it so a later delivery runs again.
pub trait DedupStore: Send + Sync + 'static {
    /// Checks `key` and claims it if new.
    fn begin<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Seen, LayerError>>;
    /// Records how the handling of a claimed `key` ended.
    fn finish<'a>(&'a self, key: &'a str, succeeded: bool)
        -> BoxFuture<'a, Result<(), LayerError>>;
}

#[derive(Debug)]
struct Entry {
    done: bool,
    at: Instant,
}

#[derive(Debug, Default)]
struct Remembered {
    entries: HashMap<Arc<str>, Entry>,
    /// Keys in the order they were last touched, with that time; stale
    /// pairs (touched again since) are skipped when evicting.
    order: VecDeque<(Arc<str>, Instant)>,
}

/// Keys in memory: at most `capacity` of them, each forgotten `ttl` after it
/// was last recorded (oldest evicted first). Not durable: a restart forgets
/// everything, and each process has its own.
///
/// ```
/// use std::time::Duration;
/// use busway_middleware::dedup::{DedupStore, MemoryDedupStore, Seen};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), busway_middleware::LayerError> {
/// let store = MemoryDedupStore::new(10_000, Duration::from_secs(3600));
/// assert_eq!(store.begin("m1").await?, Seen::New);
/// store.finish("m1", true).await?;
/// assert_eq!(store.begin("m1").await?, Seen::Done);
/// # Ok(())
/// # }
/// ```
pub struct MemoryDedupStore {
    capacity: usize,
    ttl: Duration,
    remembered: Mutex<Remembered>,
}

impl fmt::Debug for MemoryDedupStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryDedupStore")
            .field("capacity", &self.capacity)
            .field("ttl", &self.ttl)
            .field("len", &self.len())
            .finish()
    }
}

impl MemoryDedupStore {
    /// Remembers up to `capacity` keys (at least 1), each for `ttl`.
    pub fn new(capacity: usize, ttl: Duration) -> Self {
        Self {
            capacity: capacity.max(1),
            ttl,
            remembered: Mutex::new(Remembered::default()),
        }
    }

    /// How many keys are remembered now.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }
    /// Whether no key is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Remembered> {
        self.remembered.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn evict(&self, r: &mut Remembered, now: Instant) {
        while let Some((key, at)) = r.order.front() {
            let expired = now.saturating_duration_since(*at) >= self.ttl;
            if !expired && r.entries.len() <= self.capacity && r.order.len() <= 2 * self.capacity {
                break;
            }
            let current = r.entries.get(key).is_some_and(|e| e.at == *at);
            if current && (expired || r.entries.len() > self.capacity) {
                r.entries.remove(key);
            }
            r.order.pop_front();
        }
    }

    fn touch(&self, r: &mut Remembered, key: &str, done: bool, now: Instant) {
        let shared = match r.entries.get_key_value(key) {
            Some((shared, _)) => shared.clone(),
            None => Arc::from(key),
        };
        r.entries.insert(shared.clone(), Entry { done, at: now });
        r.order.push_back((shared, now));
        self.evict(r, now);
    }
}

impl DedupStore for MemoryDedupStore {
    fn begin<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Seen, LayerError>> {
        let now = Instant::now();
        let mut r = self.lock();
        self.evict(&mut r, now);
        let seen = match r.entries.get(key) {
            Some(e) if now.saturating_duration_since(e.at) < self.ttl => {
                if e.done {
                    Seen::Done
                } else {
                    Seen::InProgress
                }
            }
            _ => {
                self.touch(&mut r, key, false, now);
                Seen::New
            }
        };
        Box::pin(std::future::ready(Ok(seen)))
    }

    fn finish<'a>(
        &'a self,
        key: &'a str,
        succeeded: bool,
    ) -> BoxFuture<'a, Result<(), LayerError>> {
        let mut r = self.lock();
        if succeeded {
            self.touch(&mut r, key, true, Instant::now());
        } else {
            r.entries.remove(key);
        }
        Box::pin(std::future::ready(Ok(())))
    }
}

type KeyFn = Arc<dyn Fn(&Message) -> Option<String> + Send + Sync>;

/// Skips requests whose message was already handled successfully,
/// answering them with `Response::default()` (for handlers, `()`), and
/// fails a request whose message is being handled right now with
/// [`LayerError::DuplicateInProgress`] (retryable: by the time it is
/// retried the first one has finished). A failed handling is forgotten, so
/// the redelivery runs.
///
/// The key is the message id ([`MessageInfo`]); [`with_key`](Self::with_key)
/// derives another from the message (an idempotency-key header, say). A
/// request without a key goes through.
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use busway_core::Message;
/// use busway_middleware::{DedupLayer, LayerError, MemoryDedupStore};
/// use tower::{service_fn, Layer, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), LayerError> {
/// let dedup = DedupLayer::new(Arc::new(MemoryDedupStore::new(1000, Duration::from_secs(60))));
/// let handler = dedup.layer(service_fn(|_m: Message| async { Ok::<_, LayerError>(()) }));
/// let message = Message::new("charge_card", "{}");
/// handler.clone().oneshot(message.clone()).await?;
/// handler.oneshot(message).await?; // not charged twice
/// assert_eq!(dedup.duplicates_skipped(), 1);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct DedupLayer {
    store: Arc<dyn DedupStore>,
    key: Option<KeyFn>,
    skipped: Arc<AtomicU64>,
}

impl fmt::Debug for DedupLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DedupLayer")
            .field("skipped", &self.duplicates_skipped())
            .finish_non_exhaustive()
    }
}

impl DedupLayer {
    /// Dedup by message id in `store`.
    pub fn new(store: Arc<dyn DedupStore>) -> Self {
        Self {
            store,
            key: None,
            skipped: Arc::new(AtomicU64::new(0)),
        }
    }
    /// Keys messages with `key` instead of their id (`None`: no dedup for that message).
    ///
    /// ```
    /// # use std::{sync::Arc, time::Duration};
    /// # use busway_middleware::{DedupLayer, MemoryDedupStore};
    /// let store = Arc::new(MemoryDedupStore::new(1000, Duration::from_secs(60)));
    /// let by_header = DedupLayer::new(store)
    ///     .with_key(|m| m.headers.get("idempotency-key").map(str::to_owned));
    /// # let _ = by_header;
    /// ```
    pub fn with_key(
        mut self,
        key: impl Fn(&Message) -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        self.key = Some(Arc::new(key));
        self
    }
    /// How many duplicates were skipped so far (by every service of this layer).
    pub fn duplicates_skipped(&self) -> u64 {
        self.skipped.load(Ordering::Relaxed)
    }
    fn key_of(&self, message: &Message) -> Option<String> {
        match &self.key {
            Some(key) => key(message),
            None => Some(message.id.to_string()),
        }
    }
}

impl<S> Layer<S> for DedupLayer {
    type Service = Dedup<S>;
    fn layer(&self, inner: S) -> Dedup<S> {
        Dedup {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service [`DedupLayer`] builds.
#[derive(Clone)]
pub struct Dedup<S> {
    inner: S,
    layer: DedupLayer,
}

impl<S: fmt::Debug> fmt::Debug for Dedup<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dedup")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S, Req> Service<Req> for Dedup<S>
where
    S: Service<Req> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Response: Default + Send + 'static,
    S::Error: From<LayerError> + Send + 'static,
    Req: MessageInfo + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let Some(key) = self.layer.key_of(req.message()) else {
            return Box::pin(self.inner.call(req));
        };
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let store = self.layer.store.clone();
        let skipped = self.layer.skipped.clone();
        Box::pin(async move {
            match store.begin(&key).await? {
                Seen::Done => {
                    skipped.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(%key, "duplicate skipped");
                    return Ok(S::Response::default());
                }
                Seen::InProgress => return Err(LayerError::DuplicateInProgress { key }.into()),
                Seen::New => {}
            }
            let result = inner.call(req).await;
            if let Err(e) = store.finish(&key, result.is_ok()).await {
                tracing::warn!(%key, error = %e, "recording a handled message failed");
            }
            result
        })
    }
}
