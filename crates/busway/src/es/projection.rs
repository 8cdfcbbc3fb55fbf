//! Projections: read models built from the global log, with checkpoints.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use busway_core::event_store::{EventStore, ParkedEvent, ReadError, StoreWriteError, StoredEvent};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use uuid::Uuid;

use super::codec::{decode_event, DecodeError, Upcasters};

/// A decoded event with where it comes from.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct Envelope<E> {
    /// The stream.
    pub stream: String,
    /// Its version in the stream.
    pub version: u64,
    /// Its global position.
    pub position: u64,
    /// Its id.
    pub event_id: Uuid,
    /// When it was appended, milliseconds since the Unix epoch.
    pub recorded_at_ms: u64,
    /// Its metadata.
    pub metadata: Map<String, Value>,
    /// The event.
    pub event: E,
}

impl<E> Envelope<E> {
    fn new(stored: StoredEvent, event: E) -> Self {
        Self {
            stream: stored.stream,
            version: stored.version,
            position: stored.position,
            event_id: stored.id,
            recorded_at_ms: stored.recorded_at_ms,
            metadata: stored.metadata,
            event,
        }
    }
    /// The id after the stream's type prefix: `42` for `user-42`.
    pub fn aggregate_id(&self) -> &str {
        self.stream
            .split_once('-')
            .map_or(self.stream.as_str(), |(_, id)| id)
    }
}

/// A read model fed by the event log.
///
/// The runner reads the log from the projection's checkpoint, decodes the
/// events the projection [`handles`](Self::handles), and passes them in
/// batches to [`apply`](Self::apply) with the position they reach. Where
/// the read model lives next to the checkpoint (the same SQLite file:
/// [`SqliteEventStore::apply_projection`](crate::sqlite::SqliteEventStore::apply_projection)),
/// `apply` saves both in one transaction and says so with
/// [`saves_checkpoint`](Self::saves_checkpoint): exactly-once. Otherwise
/// the runner saves the checkpoint after `apply` returns: at-least-once, so
/// `apply` must be idempotent (upserts keyed by stream and version).
#[async_trait]
pub trait Projection: Send + Sync + 'static {
    /// The events it reads (see [`encode_event`](super::encode_event) for the shape).
    type Event: DeserializeOwned + Send + Sync + 'static;

    /// Its name: the key of its checkpoint.
    fn name(&self) -> &str;

    /// Whether it wants events of this type; others are skipped without
    /// being decoded. Default: all.
    fn handles(&self, event_type: &str) -> bool {
        let _ = event_type;
        true
    }

    /// Applies `events` (possibly none, when the batch held only skipped
    /// events) and, if [`saves_checkpoint`](Self::saves_checkpoint), records
    /// `checkpoint` with them.
    async fn apply(
        &self,
        events: Vec<Envelope<Self::Event>>,
        checkpoint: u64,
    ) -> Result<(), String>;

    /// Whether `apply` saves the checkpoint itself, atomically with the read
    /// model. Default `false`: the runner saves it in the event store.
    fn saves_checkpoint(&self) -> bool {
        false
    }

    /// Empties the read model, for a rebuild from the start.
    async fn reset(&self) -> Result<(), String>;
}

/// What to do with an event the projection cannot decode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum OnUndecodable {
    /// Stop the projection with an error naming the event (the default).
    #[default]
    Stop,
    /// Park it in the store with the reason (see
    /// [`EventStore::parked_events`]) and go on.
    Park,
}

/// A projection stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProjectionError {
    /// An event could not be decoded (and the projection does not park).
    #[error("projection `{projection}` stopped: {source}")]
    Undecodable {
        /// The projection.
        projection: String,
        /// Which event and why.
        #[source]
        source: DecodeError,
    },
    /// `apply` failed for the batch ending at `position`.
    #[error(
        "projection `{projection}` failed to apply events up to position {position}: {reason}"
    )]
    Apply {
        /// The projection.
        projection: String,
        /// The last position of the batch.
        position: u64,
        /// What `apply` said.
        reason: String,
    },
    /// Resetting the read model failed.
    #[error("resetting projection `{projection}` failed: {reason}")]
    Reset {
        /// The projection.
        projection: String,
        /// What `reset` said.
        reason: String,
    },
    /// Reading the log or the checkpoint failed.
    #[error("reading the event log failed")]
    Read(#[from] ReadError),
    /// Saving the checkpoint or parking an event failed.
    #[error("writing to the event store failed")]
    Write(#[from] StoreWriteError),
}

impl ProjectionError {
    /// Whether restarting the projection may get further.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Read(e) => e.is_retryable(),
            Self::Write(e) => e.is_retryable(),
            Self::Apply { .. } => true,
            _ => false,
        }
    }
}

/// Where a running projection is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ProjectionStatus {
    /// The position it has handled up to.
    pub position: u64,
    /// The last position of the log it has seen.
    pub head: u64,
    /// Whether it has caught up with the log once and now follows live appends.
    pub live: bool,
}

impl ProjectionStatus {
    /// How many positions it is behind the log (the lag metric).
    pub fn lag(&self) -> u64 {
        self.head.saturating_sub(self.position)
    }
}

/// Runs projections over an [`EventStore`].
///
/// ```
/// use std::sync::{Arc, Mutex};
/// use busway::es::{Envelope, Projection, ProjectionRunner};
/// use busway::memory::MemoryEventStore;
/// use busway_core::event_store::{EventStore, ExpectedVersion, NewEvent};
///
/// #[derive(serde::Deserialize)]
/// #[serde(tag = "type", content = "data")]
/// enum UserEvent { #[serde(rename = "user.registered")] Registered { name: String } }
///
/// #[derive(Default)]
/// struct Names(Mutex<Vec<String>>);
///
/// #[async_trait::async_trait]
/// impl Projection for Names {
///     type Event = UserEvent;
///     fn name(&self) -> &str { "names" }
///     async fn apply(&self, events: Vec<Envelope<UserEvent>>, _: u64) -> Result<(), String> {
///         let mut names = self.0.lock().unwrap();
///         for e in events { let UserEvent::Registered { name } = e.event; names.push(name); }
///         Ok(())
///     }
///     async fn reset(&self) -> Result<(), String> { self.0.lock().unwrap().clear(); Ok(()) }
/// }
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let store = Arc::new(MemoryEventStore::new());
/// let event = NewEvent::json("user.registered", &serde_json::json!({"name": "Ann"}))?;
/// store.append("user-1", ExpectedVersion::NoStream, vec![event]).await?;
/// let names = Arc::new(Names::default());
/// let runner = ProjectionRunner::new(store.clone());
/// assert_eq!(runner.catch_up(names.as_ref()).await?, 1);
/// assert_eq!(*names.0.lock().unwrap(), ["Ann"]);
/// # Ok(())
/// # }
/// # tokio::runtime::Runtime::new().unwrap().block_on(run()).unwrap();
/// ```
#[derive(Clone)]
pub struct ProjectionRunner {
    store: Arc<dyn EventStore>,
    upcasters: Arc<Upcasters>,
    batch_size: usize,
    poll_interval: Duration,
    on_undecodable: OnUndecodable,
}

impl std::fmt::Debug for ProjectionRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProjectionRunner")
            .field("batch_size", &self.batch_size)
            .field("poll_interval", &self.poll_interval)
            .field("on_undecodable", &self.on_undecodable)
            .finish_non_exhaustive()
    }
}

impl ProjectionRunner {
    /// A runner reading `store` in batches of 1,000, polling every 100 ms
    /// for appends it is not told about (other processes), stopping on
    /// undecodable events.
    pub fn new(store: Arc<dyn EventStore>) -> Self {
        Self {
            store,
            upcasters: Arc::new(Upcasters::new()),
            batch_size: 1000,
            poll_interval: Duration::from_millis(100),
            on_undecodable: OnUndecodable::Stop,
        }
    }
    /// Applies `upcasters` before decoding.
    pub fn with_upcasters(mut self, upcasters: Upcasters) -> Self {
        self.upcasters = Arc::new(upcasters);
        self
    }
    /// How many events to read and apply at once.
    pub fn with_batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size.max(1);
        self
    }
    /// How often a live projection looks for appends of other processes.
    pub fn with_poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }
    /// What to do with an event that does not decode.
    pub fn on_undecodable(mut self, policy: OnUndecodable) -> Self {
        self.on_undecodable = policy;
        self
    }

    /// Applies one batch after `position`; returns the new position, or
    /// `None` when the log has nothing after it.
    async fn step<P: Projection + ?Sized>(
        &self,
        projection: &P,
        position: u64,
    ) -> Result<Option<u64>, ProjectionError> {
        let batch = self.store.read_all(position, self.batch_size).await?;
        let Some(last) = batch.last().map(|e| e.position) else {
            return Ok(None);
        };
        let mut decoded = Vec::with_capacity(batch.len());
        for stored in batch {
            if !projection.handles(&stored.event_type) {
                continue;
            }
            match decode_event::<P::Event>(&stored, &self.upcasters) {
                Ok(event) => decoded.push(Envelope::new(stored, event)),
                Err(source) => match self.on_undecodable {
                    OnUndecodable::Stop => {
                        return Err(ProjectionError::Undecodable {
                            projection: projection.name().to_owned(),
                            source,
                        })
                    }
                    OnUndecodable::Park => {
                        tracing::warn!(projection = projection.name(), error = %source, "parking an undecodable event");
                        self.store
                            .park_event(ParkedEvent::new(
                                projection.name(),
                                &stored,
                                source.to_string(),
                            ))
                            .await?;
                    }
                },
            }
        }
        projection
            .apply(decoded, last)
            .await
            .map_err(|reason| ProjectionError::Apply {
                projection: projection.name().to_owned(),
                position: last,
                reason,
            })?;
        if !projection.saves_checkpoint() {
            self.store.save_checkpoint(projection.name(), last).await?;
        }
        Ok(Some(last))
    }

    /// Applies every event after the projection's checkpoint up to the
    /// current end of the log; returns the position reached.
    pub async fn catch_up<P: Projection + ?Sized>(
        &self,
        projection: &P,
    ) -> Result<u64, ProjectionError> {
        let mut position = self
            .store
            .load_checkpoint(projection.name())
            .await?
            .unwrap_or(0);
        while let Some(next) = self.step(projection, position).await? {
            position = next;
        }
        Ok(position)
    }

    /// Empties the read model and its checkpoint, then replays the whole log.
    pub async fn rebuild<P: Projection + ?Sized>(
        &self,
        projection: &P,
    ) -> Result<u64, ProjectionError> {
        self.store.save_checkpoint(projection.name(), 0).await?;
        projection
            .reset()
            .await
            .map_err(|reason| ProjectionError::Reset {
                projection: projection.name().to_owned(),
                reason,
            })?;
        self.catch_up(projection).await
    }

    /// Starts `projection` on a task: it catches up, then follows appends
    /// until [`ProjectionHandle::stop`]. Several projections run side by
    /// side, each on its own task and checkpoint.
    pub fn spawn<P: Projection>(&self, projection: Arc<P>) -> ProjectionHandle {
        let (status_tx, status) = watch::channel(ProjectionStatus::default());
        let (stop_tx, mut stop) = watch::channel(false);
        let runner = self.clone();
        let name = projection.name().to_owned();
        let lag = ::metrics::gauge!("busway_projection_lag", "projection" => name.clone());
        let reached = ::metrics::gauge!("busway_projection_position", "projection" => name.clone());
        let task = tokio::spawn(async move {
            let store = runner.store.clone();
            let mut position = store.load_checkpoint(projection.name()).await?.unwrap_or(0);
            loop {
                if *stop.borrow() {
                    return Ok(position);
                }
                match runner.step(projection.as_ref(), position).await? {
                    Some(next) => {
                        position = next;
                        let head = store.head_position().await?.max(position);
                        status_tx.send_modify(|s| {
                            s.position = position;
                            s.head = head;
                        });
                        reached.set(position as f64);
                        lag.set(head.saturating_sub(position) as f64);
                    }
                    None => {
                        status_tx.send_modify(|s| {
                            s.position = position;
                            s.head = s.head.max(position);
                            s.live = true;
                        });
                        reached.set(position as f64);
                        lag.set(0.0);
                        tokio::select! {
                            _ = stop.wait_for(|stop| *stop) => return Ok(position),
                            () = store.appended_after(position) => {}
                            () = tokio::time::sleep(runner.poll_interval) => {}
                        }
                    }
                }
            }
        });
        ProjectionHandle {
            name,
            status,
            stop: stop_tx,
            task,
        }
    }
}

/// A projection running on a task.
#[derive(Debug)]
pub struct ProjectionHandle {
    name: String,
    status: watch::Receiver<ProjectionStatus>,
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<u64, ProjectionError>>,
}

impl ProjectionHandle {
    /// The projection's name.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// Where it is now.
    pub fn status(&self) -> ProjectionStatus {
        *self.status.borrow()
    }
    /// A receiver of its status, to watch it.
    pub fn watch(&self) -> watch::Receiver<ProjectionStatus> {
        self.status.clone()
    }
    /// Waits until it has handled everything up to `position` (`false`:
    /// it stopped first).
    pub async fn wait_for(&self, position: u64) -> bool {
        let mut status = self.status.clone();
        let reached = status.wait_for(|s| s.position >= position).await.is_ok();
        reached
    }
    /// Whether its task has ended (stopped, or failed).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
    /// Stops it after the batch in progress; returns the position reached,
    /// or the error that had stopped it.
    pub async fn stop(self) -> Result<u64, ProjectionError> {
        self.stop.send_replace(true);
        self.join().await
    }
    /// Waits for it to end by itself (it only does on an error).
    pub async fn join(self) -> Result<u64, ProjectionError> {
        match self.task.await {
            Ok(result) => result,
            Err(e) => Err(ProjectionError::Apply {
                projection: self.name,
                position: self.status.borrow().position,
                reason: format!("the projection task failed: {e}"),
            }),
        }
    }
}
