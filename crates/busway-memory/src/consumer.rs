//! Consumers: a stream of deliveries per `consume` call, and the acker that
//! settles each delivery.
//!
//! The stream takes up to `prefetch - unsettled` messages per lock of the
//! queue and hands them out from its own buffer. With nothing to take it
//! parks on the queue (a publisher wakes the longest-parked consumer), with
//! no room it waits for a settlement, and it sleeps until the next delayed
//! message is due. Nothing polls.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use busway_core::{Acker, ConsumeError, Delivery, SettleError, Settlement};
use futures::future::BoxFuture;
use futures::Stream;
use tokio::time::{Instant, Sleep};

use crate::queue::{DeadReason, Entry, Queue, Signal};

/// What one consumer holds of its queue: up to `prefetch` unsettled
/// messages. Shared with the ackers of its deliveries.
struct Lease {
    queue: Arc<Queue>,
    prefetch: usize,
    /// Buffered in the stream plus delivered and not yet settled.
    unsettled: AtomicUsize,
    /// Wakes the stream: a message is ready, room was freed, or the
    /// transport closed.
    signal: Arc<Signal>,
}

impl Lease {
    fn release(&self, n: usize) {
        if n == 0 {
            return;
        }
        let before = self.unsettled.fetch_sub(n, Ordering::AcqRel);
        if before >= self.prefetch {
            // The stream may be waiting for room.
            self.signal.wake();
        }
    }
}

/// One consumer's stream of deliveries.
pub(crate) struct ConsumerStream {
    lease: Arc<Lease>,
    /// Taken from the queue (counted in flight), not yet handed out.
    buffer: VecDeque<Entry>,
    /// Scratch space for messages to dead-letter, reused across batches.
    dead: Vec<(Entry, DeadReason)>,
    /// Wakes the stream when the earliest delayed message is due.
    timer: Option<Pin<Box<Sleep>>>,
}

impl ConsumerStream {
    /// Starts a consumer on `queue`; `signal` must be registered with the
    /// transport so that closing it wakes the stream.
    pub(crate) fn new(queue: Arc<Queue>, prefetch: usize, signal: Arc<Signal>) -> Self {
        queue.lock().consumers += 1;
        Self {
            lease: Arc::new(Lease {
                queue,
                prefetch,
                unsettled: AtomicUsize::new(0),
                signal,
            }),
            buffer: VecDeque::with_capacity(prefetch.min(1024)),
            dead: Vec::new(),
            timer: None,
        }
    }

    /// Takes what the queue can give. Returns `Ready` if the stream should
    /// look at its buffer again, `Pending` once parked.
    fn fill(&mut self, room: usize, cx: &mut Context<'_>) -> Poll<()> {
        let lease = &self.lease;
        let queue = &lease.queue;
        let now = Instant::now();
        let mut state = queue.lock();
        state.unpark(&lease.signal);
        let taken = state.take_batch(
            now,
            room,
            queue.spec.max_attempts,
            &mut self.buffer,
            &mut self.dead,
        );
        let next_visible = if taken > 0 {
            queue.add_in_flight(taken);
            lease.unsettled.fetch_add(taken, Ordering::AcqRel);
            None
        } else {
            // Registered before the lock is released, so a publisher that
            // picks this consumer wakes the current task.
            lease.signal.register(cx.waker());
            state.park(&lease.signal);
            state.next_visible()
        };
        queue.finish(state);
        if !self.dead.is_empty() {
            queue.dead_letter(self.dead.drain(..));
        }
        if taken > 0 || queue.shared.is_closed() {
            return Poll::Ready(());
        }
        match next_visible {
            // Without a tokio runtime there is no timer; the message is
            // picked up on the next wake.
            Some(at) if tokio::runtime::Handle::try_current().is_ok() => {
                let timer = self
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
                timer.as_mut().reset(at);
                timer.as_mut().poll(cx)
            }
            _ => Poll::Pending,
        }
    }
}

impl Stream for ConsumerStream {
    type Item = Result<Delivery, ConsumeError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            let lease = &this.lease;
            let queue = &lease.queue;
            if queue.shared.is_closed() {
                return Poll::Ready(None);
            }
            if let Some(entry) = this.buffer.pop_front() {
                if entry.expires.is_some() && entry.is_expired(Instant::now()) {
                    queue.sub_in_flight(1);
                    lease.release(1);
                    queue.dead_letter([(entry, DeadReason::Expired)]);
                    continue;
                }
                return Poll::Ready(Some(Ok(deliver(lease, entry))));
            }
            let unsettled = lease.unsettled.load(Ordering::Acquire);
            if unsettled >= lease.prefetch {
                lease.signal.register(cx.waker());
                if lease.unsettled.load(Ordering::Acquire) >= lease.prefetch
                    && !queue.shared.is_closed()
                {
                    return Poll::Pending;
                }
                continue;
            }
            let room = lease.prefetch - unsettled;
            if this.fill(room, cx).is_pending() {
                return Poll::Pending;
            }
        }
    }
}

impl Drop for ConsumerStream {
    fn drop(&mut self) {
        // Buffered messages were never handed out: back to the head of the
        // queue, in order, without counting an attempt.
        let queue = &self.lease.queue;
        let returned = self.buffer.len();
        let now = Instant::now();
        let mut state = queue.lock();
        state.unpark(&self.lease.signal);
        state.consumers = state.consumers.saturating_sub(1);
        while let Some(entry) = self.buffer.pop_back() {
            state.insert(entry, None, now, true);
        }
        // A wake meant for this consumer may have been lost with it.
        state.wake_one();
        queue.sub_in_flight(returned);
        queue.finish(state);
        self.lease.release(returned);
    }
}

fn deliver(lease: &Arc<Lease>, mut entry: Entry) -> Delivery {
    entry.attempts = entry.attempts.saturating_add(1);
    let attempt = entry.attempts;
    let message = entry.message.clone();
    let topic = entry.topic.clone();
    let queue = lease.queue.name.clone();
    let acker = MemoryAcker {
        lease: Arc::clone(lease),
        entry,
    };
    Delivery::new(message, attempt, queue, topic, Box::new(acker))
}

/// Settles one delivery; holds the message so it can go back or on.
struct MemoryAcker {
    lease: Arc<Lease>,
    entry: Entry,
}

impl MemoryAcker {
    fn apply(self, settlement: Settlement) -> Result<(), SettleError> {
        let Self { lease, entry } = self;
        let queue = &lease.queue;
        let result = if queue.shared.is_closed() {
            // Closing returned every unsettled delivery to its queue.
            queue.requeue(entry, None);
            Err(SettleError::Closed)
        } else {
            match settlement {
                Settlement::Ack => {
                    queue.sub_in_flight(1);
                    Ok(())
                }
                Settlement::Nack { retry_after } => {
                    match queue.spec.max_attempts {
                        Some(max) if entry.attempts >= max => {
                            queue.sub_in_flight(1);
                            queue.dead_letter([(entry, DeadReason::MaxAttempts(max))]);
                        }
                        _ => queue.requeue(entry, retry_after),
                    }
                    Ok(())
                }
                Settlement::DeadLetter { reason } => {
                    if queue.dlq.is_some() {
                        queue.sub_in_flight(1);
                        queue.dead_letter([(entry, DeadReason::Rejected(reason))]);
                        Ok(())
                    } else {
                        queue.requeue(entry, None);
                        Err(SettleError::NoDeadLetterQueue(queue.name.clone()))
                    }
                }
            }
        };
        lease.release(1);
        result
    }
}

/// An already recorded, successful settlement. Zero-sized, so boxing it
/// does not allocate.
struct Settled;

impl Future for Settled {
    type Output = Result<(), SettleError>;

    fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Self::Output> {
        Poll::Ready(Ok(()))
    }
}

impl Acker for MemoryAcker {
    fn settle(
        self: Box<Self>,
        settlement: Settlement,
    ) -> BoxFuture<'static, Result<(), SettleError>> {
        match (*self).apply(settlement) {
            Ok(()) => Box::pin(Settled),
            Err(e) => Box::pin(futures::future::ready(Err(e))),
        }
    }

    fn release(self: Box<Self>) {
        let Self { lease, entry } = *self;
        // Back at once; max attempts is enforced when it is next taken.
        lease.queue.requeue(entry, None);
        lease.release(1);
    }
}
