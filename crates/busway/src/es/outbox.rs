//! The relay that drains an event store's outbox to a transport.

use std::sync::Arc;
use std::time::Duration;

use busway_core::event_store::{EventStore, ReadError, StoreWriteError};
use busway_core::{PublishError, Transport};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Relaying failed; the entries stay in the outbox and are tried again.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RelayError {
    /// Reading the outbox failed.
    #[error("reading the outbox failed")]
    Read(#[from] ReadError),
    /// The transport refused or lost a message.
    #[error("publishing an announcement failed")]
    Publish(#[from] PublishError),
    /// Removing published entries failed (they will be published again:
    /// consumers see the same message id twice).
    #[error("removing published entries failed")]
    Remove(#[from] StoreWriteError),
}

impl RelayError {
    /// Whether relaying again may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Read(e) => e.is_retryable(),
            Self::Publish(e) => e.is_retryable(),
            Self::Remove(e) => e.is_retryable(),
        }
    }
}

/// Publishes what [`EventStore::append_announced`] committed to a store's
/// outbox, for stores whose outbox is not the transport's own queue (the
/// in-memory store, PostgreSQL, or SQLite events announced on RabbitMQ).
/// An entry is removed only after the transport confirmed it, so a crash
/// between commit and publish loses nothing; a crash between publish and
/// removal publishes it again (at least once, same message id).
///
/// On SQLite with the SQLite transport no relay is needed: the
/// announcements are enqueued in the same transaction as the events.
///
/// ```
/// use std::sync::Arc;
/// use busway::es::OutboxRelay;
/// use busway::memory::{MemoryEventStore, MemoryTransport};
/// use busway_core::event_store::{EventStore, ExpectedVersion, NewEvent};
/// use busway_core::{Message, Publish, QueueName, QueueSpec, Transport};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let store = Arc::new(MemoryEventStore::new());
/// let transport = Arc::new(MemoryTransport::new());
/// let queue = QueueName::new("user_events")?;
/// transport.declare_queue(&QueueSpec::new(queue.clone())).await?;
/// let announce = Publish::to_queue(queue.clone(), Message::new("user.registered", "{}"));
/// store.append_announced("user-1", ExpectedVersion::NoStream,
///     vec![NewEvent::new("user.registered", "{}")], vec![announce]).await?;
/// let relay = OutboxRelay::new(store.clone(), transport.clone());
/// assert_eq!(relay.relay_once().await?, 1);
/// assert_eq!(transport.queue_stats(&queue).await?.ready, 1);
/// assert_eq!(relay.relay_once().await?, 0);
/// # Ok(())
/// # }
/// # tokio::runtime::Runtime::new().unwrap().block_on(run()).unwrap();
/// ```
#[derive(Clone)]
pub struct OutboxRelay {
    store: Arc<dyn EventStore>,
    transport: Arc<dyn Transport>,
    batch_size: usize,
    poll_interval: Duration,
    max_backoff: Duration,
}

impl std::fmt::Debug for OutboxRelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboxRelay")
            .field("batch_size", &self.batch_size)
            .field("poll_interval", &self.poll_interval)
            .finish_non_exhaustive()
    }
}

impl OutboxRelay {
    /// A relay from `store`'s outbox to `transport`: batches of 100, polling
    /// every 50 ms when idle, backing off up to 5 s while publishing fails.
    pub fn new(store: Arc<dyn EventStore>, transport: Arc<dyn Transport>) -> Self {
        Self {
            store,
            transport,
            batch_size: 100,
            poll_interval: Duration::from_millis(50),
            max_backoff: Duration::from_secs(5),
        }
    }
    /// How often an idle relay looks at the outbox.
    pub fn with_poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// Publishes one batch of the outbox in order and removes it; returns
    /// how many entries were published.
    pub async fn relay_once(&self) -> Result<usize, RelayError> {
        let entries = self.store.fetch_outbox(self.batch_size).await?;
        let mut published = Vec::with_capacity(entries.len());
        let mut failure = None;
        for entry in entries {
            match self.transport.publish(entry.publish).await {
                Ok(()) => published.push(entry.id),
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        if !published.is_empty() {
            self.store.remove_from_outbox(&published).await?;
        }
        match failure {
            Some(e) => Err(e.into()),
            None => Ok(published.len()),
        }
    }

    /// Relays on a task until [`RelayHandle::stop`], retrying failures with
    /// exponential backoff.
    pub fn spawn(&self) -> RelayHandle {
        let (stop_tx, mut stop) = watch::channel(false);
        let relay = self.clone();
        let task = tokio::spawn(async move {
            let mut backoff = relay.poll_interval;
            loop {
                let wait = match relay.relay_once().await {
                    Ok(n) if n > 0 => {
                        backoff = relay.poll_interval;
                        continue;
                    }
                    Ok(_) => relay.poll_interval,
                    Err(e) => {
                        tracing::warn!(error = %e, "outbox relay failed; retrying");
                        backoff = (backoff * 2).min(relay.max_backoff);
                        backoff
                    }
                };
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => return,
                    () = tokio::time::sleep(wait) => {}
                }
            }
        });
        RelayHandle {
            stop: stop_tx,
            task,
        }
    }
}

/// A relay running on a task.
#[derive(Debug)]
pub struct RelayHandle {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl RelayHandle {
    /// Stops it after the batch in progress.
    pub async fn stop(self) {
        self.stop.send_replace(true);
        let _ = self.task.await;
    }
}
