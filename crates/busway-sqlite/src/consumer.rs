//! Consumers: a task per consumer leases messages from the writer into a
//! buffer; the stream hands them to the application as deliveries.
//!
//! A consumer holds at most `prefetch` unsettled deliveries, buffered ones
//! included: each carries one of `prefetch` semaphore permits until it is
//! settled or released. Rows still in the buffer when the stream is dropped or
//! the transport closes never reached the application, so their lease is
//! returned without counting as an attempt.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use busway_core::{unix_millis, Acker, ConsumeError, Delivery, QueueName, SettleError, Settlement};
use futures::future::BoxFuture;
use futures::task::AtomicWaker;
use futures::Stream;
use tokio::sync::{oneshot, watch, Notify, OwnedSemaphorePermit, Semaphore};

use crate::row::StoredRow;
use crate::transport::Shared;
use crate::writer::{Command, LeaseId};

/// The longest a waiting consumer sleeps without being woken.
const MAX_SLEEP: Duration = Duration::from_secs(30);
/// Pause after a failed lease before trying again.
const ERROR_PAUSE: Duration = Duration::from_millis(200);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What a consumer's task and its stream share.
pub(crate) struct ConsumerState {
    pub(crate) id: String,
    queue: QueueName,
    buffer: Mutex<VecDeque<Result<Leased, ConsumeError>>>,
    waker: AtomicWaker,
    /// No more items will be added (the transport closed or the task ended).
    ended: AtomicBool,
    /// The stream was dropped.
    stopped: AtomicBool,
    /// Wakes the task when the consumer ends or stops.
    stop: Notify,
}

impl ConsumerState {
    pub(crate) fn new(id: String, queue: QueueName) -> Self {
        Self {
            id,
            queue,
            buffer: Mutex::new(VecDeque::new()),
            waker: AtomicWaker::new(),
            ended: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            stop: Notify::new(),
        }
    }

    fn is_done(&self) -> bool {
        self.ended.load(Ordering::SeqCst) || self.stopped.load(Ordering::SeqCst)
    }

    /// Ends the consumer because the transport is closing. Returns the leases
    /// of the buffered deliveries, which the close returns without counting
    /// an attempt.
    pub(crate) fn end(&self) -> Vec<LeaseId> {
        let drained: Vec<_> = {
            let mut buffer = lock(&self.buffer);
            self.ended.store(true, Ordering::SeqCst);
            buffer.drain(..).collect()
        };
        self.waker.wake();
        self.stop.notify_one();
        drained
            .into_iter()
            .filter_map(|item| item.ok().map(Leased::disarm))
            .collect()
    }

    fn pop(&self) -> Option<Result<Leased, ConsumeError>> {
        lock(&self.buffer).pop_front()
    }

    fn push_error(&self, e: ConsumeError) {
        {
            let mut buffer = lock(&self.buffer);
            if self.is_done() {
                return;
            }
            buffer.push_back(Err(e));
        }
        self.waker.wake();
    }

    /// Buffers freshly leased rows, each with one prefetch permit; returns
    /// them at once if the consumer is gone.
    fn push_rows(
        &self,
        rows: Vec<StoredRow>,
        token: i64,
        permits: &mut Vec<OwnedSemaphorePermit>,
        tx: &Sender<Command>,
    ) {
        let mut refused = Vec::new();
        {
            let mut buffer = lock(&self.buffer);
            let open = !self.is_done();
            for row in rows {
                let leased = Leased {
                    parts: Some(LeasedParts {
                        lease: LeaseId {
                            seq: row.seq,
                            token,
                        },
                        row,
                        queue: self.queue.clone(),
                        permit: permits.pop(),
                        tx: tx.clone(),
                    }),
                };
                if open {
                    buffer.push_back(Ok(leased));
                } else {
                    refused.push(leased);
                }
            }
        }
        drop(refused);
        self.waker.wake();
    }
}

/// A leased row waiting in a consumer's buffer. Dropped, it returns the
/// row to its queue without counting the attempt.
pub(crate) struct Leased {
    parts: Option<LeasedParts>,
}

struct LeasedParts {
    lease: LeaseId,
    row: StoredRow,
    queue: QueueName,
    permit: Option<OwnedSemaphorePermit>,
    tx: Sender<Command>,
}

impl Leased {
    /// Forgets the row without releasing it (the close releases it).
    fn disarm(mut self) -> LeaseId {
        match self.parts.take() {
            Some(parts) => parts.lease,
            None => LeaseId { seq: 0, token: 0 },
        }
    }

    fn into_delivery(mut self) -> Option<Delivery> {
        let parts = self.parts.take()?;
        let (message, attempt, topic) = parts.row.into_message();
        let acker = SqliteAcker {
            tx: parts.tx,
            lease: parts.lease,
            queue: parts.queue.clone(),
            permit: parts.permit,
        };
        Some(Delivery::new(
            message,
            attempt,
            parts.queue,
            topic,
            Box::new(acker),
        ))
    }
}

impl Drop for Leased {
    fn drop(&mut self) {
        if let Some(parts) = self.parts.take() {
            let _ = parts.tx.send(Command::Release {
                lease: parts.lease,
                queue: parts.queue,
                undelivered: true,
            });
        }
    }
}

/// Settles a delivery through the writer.
struct SqliteAcker {
    tx: Sender<Command>,
    lease: LeaseId,
    queue: QueueName,
    /// The consumer's prefetch slot, freed when the delivery is settled.
    permit: Option<OwnedSemaphorePermit>,
}

impl Acker for SqliteAcker {
    fn settle(
        self: Box<Self>,
        settlement: Settlement,
    ) -> BoxFuture<'static, Result<(), SettleError>> {
        let this = *self;
        // Sent now, not when the future is first polled: a settlement that is
        // never awaited still happens.
        let (reply, rx) = oneshot::channel();
        let sent = this
            .tx
            .send(Command::Settle {
                lease: this.lease,
                queue: this.queue,
                settlement,
                reply,
            })
            .is_ok();
        // The delivery is settled as far as prefetch goes: the writer applies
        // commands in order, so this settlement precedes the consumer's next
        // lease and the consumer never holds more than `prefetch` rows.
        drop(this.permit);
        Box::pin(async move {
            if !sent {
                return Err(SettleError::Closed);
            }
            rx.await.unwrap_or(Err(SettleError::Closed))
        })
    }

    fn release(self: Box<Self>) {
        let _ = self.tx.send(Command::Release {
            lease: self.lease,
            queue: self.queue,
            undelivered: false,
        });
    }
}

/// The delivery stream returned by `consume`.
pub(crate) struct ConsumerStream {
    pub(crate) shared: Arc<Shared>,
    pub(crate) state: Arc<ConsumerState>,
}

impl ConsumerStream {
    fn take_next(&self) -> Option<Result<Delivery, ConsumeError>> {
        while let Some(item) = self.state.pop() {
            match item {
                Ok(leased) => {
                    if let Some(delivery) = leased.into_delivery() {
                        return Some(Ok(delivery));
                    }
                }
                Err(e) => return Some(Err(e)),
            }
        }
        None
    }
}

impl Stream for ConsumerStream {
    type Item = Result<Delivery, ConsumeError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Some(item) = self.take_next() {
            return Poll::Ready(Some(item));
        }
        self.state.waker.register(cx.waker());
        if let Some(item) = self.take_next() {
            return Poll::Ready(Some(item));
        }
        if self.state.ended.load(Ordering::SeqCst) {
            return Poll::Ready(None);
        }
        Poll::Pending
    }
}

impl Drop for ConsumerStream {
    fn drop(&mut self) {
        let drained: Vec<_> = {
            let mut buffer = lock(&self.state.buffer);
            self.state.stopped.store(true, Ordering::SeqCst);
            buffer.drain(..).collect()
        };
        // Dropping the buffered rows returns them before the task removes
        // the consumer, so once the consumer is gone its rows are back.
        drop(drained);
        self.state.stop.notify_one();
        lock(&self.shared.consumers).remove(&self.state.id);
    }
}

/// Ends the consumer's registration when its task ends, however it ends.
struct TaskGuard {
    state: Arc<ConsumerState>,
    tx: Sender<Command>,
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.state.ended.store(true, Ordering::SeqCst);
        self.state.waker.wake();
        let _ = self.tx.send(Command::RemoveConsumer {
            id: self.state.id.clone(),
        });
    }
}

/// The consumer's task: keeps its buffer filled up to `prefetch` unsettled
/// deliveries, and sleeps while there is nothing to lease.
pub(crate) async fn feed(shared: Arc<Shared>, state: Arc<ConsumerState>, prefetch: usize) {
    let _guard = TaskGuard {
        state: state.clone(),
        tx: shared.tx.clone(),
    };
    let slots = Arc::new(Semaphore::new(prefetch));
    let mut version = shared.wakers.subscribe(&state.queue);
    let mut shutdown = shared.shutdown.subscribe();
    loop {
        if state.is_done() || is_closed(&shutdown) {
            break;
        }
        // Wait for a free prefetch slot; the writer takes the free slots
        // when the lease runs.
        tokio::select! {
            biased;
            _ = closed(&mut shutdown) => break,
            _ = state.stop.notified() => continue,
            free = slots.acquire() => match free {
                Ok(free) => drop(free),
                Err(_) => break,
            },
        }
        // Anything committed from here on wakes the wait below.
        version.mark_unchanged();
        let (reply, rx) = oneshot::channel();
        let lease = Command::Lease {
            queue: state.queue.clone(),
            slots: slots.clone(),
            reply,
        };
        if shared.tx.send(lease).is_err() {
            break;
        }
        let batch = match rx.await {
            Ok(Ok(batch)) => batch,
            Ok(Err(ConsumeError::Closed)) | Err(_) => break,
            Ok(Err(e)) => {
                tracing::warn!(queue = %state.queue, error = %e, "leasing messages failed");
                state.push_error(e);
                tokio::select! {
                    _ = closed(&mut shutdown) => break,
                    _ = state.stop.notified() => {}
                    _ = tokio::time::sleep(ERROR_PAUSE) => {}
                }
                continue;
            }
        };
        let (requested, got) = (batch.requested, batch.rows.len());
        if requested == 0 {
            continue;
        }
        let mut permits = batch.permits;
        state.push_rows(batch.rows, batch.token, &mut permits, &shared.tx);
        if got < requested {
            let sleep = batch.next_visible_at.map_or(MAX_SLEEP, |at| {
                let ms = at.saturating_sub(unix_millis(SystemTime::now())).max(0);
                Duration::from_millis(u64::try_from(ms).unwrap_or(u64::MAX).saturating_add(1))
                    .min(MAX_SLEEP)
            });
            tokio::select! {
                biased;
                _ = closed(&mut shutdown) => break,
                _ = state.stop.notified() => {}
                changed = version.changed() => {
                    if changed.is_err() {
                        tokio::time::sleep(shared.config.poll_interval).await;
                    }
                }
                _ = tokio::time::sleep(sleep) => {}
            }
        }
    }
}

/// Resolves once the transport closes.
async fn closed(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|closed| *closed).await;
}

fn is_closed(shutdown: &watch::Receiver<bool>) -> bool {
    *shutdown.borrow()
}
