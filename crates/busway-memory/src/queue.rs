//! One queue: its messages in delivery order, plus the bookkeeping for
//! delays, expiry and dead-lettering.
//!
//! Messages live in a slab; the ready lanes (one per priority level), the
//! delay heap and the expiry heap hold keys into it. A key whose slot was
//! emptied or reused is stale and skipped, so removing an expired message
//! from the middle of a lane costs `O(log n)`, not a scan. Stale keys are
//! compacted away once they outnumber the live ones.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::fmt;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, SystemTime};

use busway_core::{
    headers, unix_millis, Message, Priority, QueueName, QueueSpec, QueueStats, Topic,
};
use futures::task::AtomicWaker;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::transport::Shared;

/// Stands in for "never" when a delay overflows the clock.
const FAR_FUTURE: Duration = Duration::from_secs(86_400 * 365 * 30);
/// Stale keys tolerated before a compaction is considered.
const STALE_SLACK: usize = 64;

/// `now + d`, saturating at a far-future instant instead of overflowing.
pub(crate) fn instant_after(now: Instant, d: Duration) -> Instant {
    now.checked_add(d)
        .or_else(|| now.checked_add(FAR_FUTURE))
        .unwrap_or(now)
}

/// A message stored in a queue (or held by a delivery, ready to go back).
pub(crate) struct Entry {
    pub(crate) message: Message,
    /// The topic it was published to; `None` when sent to the queue directly.
    pub(crate) topic: Option<Topic>,
    /// Deliveries so far.
    pub(crate) attempts: u32,
    /// When it expires: the earlier of the message's own expiry and the
    /// queue's TTL counted from the first enqueue.
    pub(crate) expires: Option<Instant>,
}

impl Entry {
    pub(crate) fn new(
        message: Message,
        topic: Option<Topic>,
        now: Instant,
        queue_ttl: Option<Duration>,
    ) -> Self {
        let from_queue = queue_ttl.and_then(|ttl| now.checked_add(ttl));
        let from_message =
            message
                .expires_at
                .and_then(|at| match at.duration_since(SystemTime::now()) {
                    Ok(left) => now.checked_add(left),
                    Err(_) => Some(now),
                });
        let expires = match (from_queue, from_message) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        Self {
            message,
            topic,
            attempts: 0,
            expires,
        }
    }

    pub(crate) fn is_expired(&self, now: Instant) -> bool {
        self.expires.is_some_and(|at| at <= now)
    }
}

/// Why a message is moved to the dead-letter queue.
pub(crate) enum DeadReason {
    Expired,
    MaxAttempts(u32),
    Rejected(String),
}

impl fmt::Display for DeadReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Expired => f.write_str("expired"),
            Self::MaxAttempts(max) => write!(f, "max attempts ({max}) exceeded"),
            Self::Rejected(reason) => f.write_str(reason),
        }
    }
}

/// How a queue wakes one parked consumer.
#[derive(Default)]
pub(crate) struct Signal {
    waker: AtomicWaker,
    /// Whether it is in its queue's `waiters` (changed only under that lock).
    parked: AtomicBool,
}

impl Signal {
    /// Registers the task to wake; call before checking the condition waited for.
    pub(crate) fn register(&self, waker: &std::task::Waker) {
        self.waker.register(waker);
    }

    pub(crate) fn wake(&self) {
        self.waker.wake();
    }
}

/// Identifies one stored message: its slot and the sequence number it was
/// stored under (which also orders equal delays by publish order).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    seq: u64,
    idx: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Place {
    Ready,
    Delayed,
}

struct Slot {
    seq: u64,
    place: Place,
    entry: Option<Entry>,
}

/// Slots per slab page. Pages never move once allocated, so a deep queue
/// grows without copying the messages it already holds.
const PAGE: usize = 1024;

#[derive(Default)]
struct Slab {
    pages: Vec<Vec<Slot>>,
    /// Slots ever used: every index below this one exists.
    len: usize,
    free: Vec<usize>,
    next_seq: u64,
}

impl Slab {
    fn slot(&self, idx: usize) -> Option<&Slot> {
        self.pages.get(idx / PAGE)?.get(idx % PAGE)
    }

    fn slot_mut(&mut self, idx: usize) -> Option<&mut Slot> {
        self.pages.get_mut(idx / PAGE)?.get_mut(idx % PAGE)
    }

    fn insert(&mut self, entry: Entry, place: Place) -> Key {
        self.next_seq += 1;
        let seq = self.next_seq;
        let slot = Slot {
            seq,
            place,
            entry: Some(entry),
        };
        if let Some(idx) = self.free.pop() {
            if let Some(free) = self.slot_mut(idx) {
                *free = slot;
                return Key { seq, idx };
            }
        }
        let idx = self.len;
        if self.pages.last().is_none_or(|page| page.len() == PAGE) {
            self.pages.push(Vec::with_capacity(PAGE));
        }
        if let Some(page) = self.pages.last_mut() {
            page.push(slot);
        }
        self.len += 1;
        Key { seq, idx }
    }

    fn get_mut(&mut self, key: Key) -> Option<&mut Slot> {
        self.slot_mut(key.idx)
            .filter(|slot| slot.seq == key.seq && slot.entry.is_some())
    }

    fn is_live(&self, key: Key) -> bool {
        self.slot(key.idx)
            .is_some_and(|slot| slot.seq == key.seq && slot.entry.is_some())
    }

    fn take(&mut self, key: Key) -> Option<(Entry, Place)> {
        let slot = self.get_mut(key)?;
        let place = slot.place;
        let entry = slot.entry.take()?;
        self.free.push(key.idx);
        Some((entry, place))
    }
}

/// What to do about the expiry task once the queue lock is released.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
enum ReaperAction {
    #[default]
    Nothing,
    Wake,
    Start,
}

/// Everything behind a queue's lock.
pub(crate) struct QueueState {
    slab: Slab,
    /// One lane per priority level, highest last.
    ready: Vec<VecDeque<Key>>,
    ready_len: usize,
    ready_stale: usize,
    delayed: BinaryHeap<Reverse<(Instant, Key)>>,
    delayed_len: usize,
    expiries: BinaryHeap<Reverse<(Instant, Key)>>,
    expiring_live: usize,
    /// Consumers parked until a message is ready, longest-waiting first.
    waiters: VecDeque<Arc<Signal>>,
    /// Live consumer streams.
    pub(crate) consumers: u64,
    reaper_started: bool,
    /// A consumer to wake once the lock is released.
    pending_wake: Option<Arc<Signal>>,
    pending_reaper: ReaperAction,
}

impl QueueState {
    fn new(levels: usize) -> Self {
        Self {
            slab: Slab::default(),
            ready: (0..levels.max(1)).map(|_| VecDeque::new()).collect(),
            ready_len: 0,
            ready_stale: 0,
            delayed: BinaryHeap::new(),
            delayed_len: 0,
            expiries: BinaryHeap::new(),
            expiring_live: 0,
            waiters: VecDeque::new(),
            consumers: 0,
            reaper_started: false,
            pending_wake: None,
            pending_reaper: ReaperAction::Nothing,
        }
    }

    /// Messages stored and not delivered (ready or delayed).
    pub(crate) fn len(&self) -> usize {
        self.ready_len + self.delayed_len
    }

    fn lane(ready: &mut Vec<VecDeque<Key>>, priority: Priority) -> &mut VecDeque<Key> {
        if ready.is_empty() {
            ready.push(VecDeque::new());
        }
        let last = ready.len() - 1;
        &mut ready[usize::from(priority.get()).min(last)]
    }

    /// Stores `entry`: visible from `visible_at` if that is later than `now`,
    /// otherwise ready at once (at the head of its lane if `front`).
    pub(crate) fn insert(
        &mut self,
        entry: Entry,
        visible_at: Option<Instant>,
        now: Instant,
        front: bool,
    ) {
        let expires = entry.expires;
        let priority = entry.message.priority;
        let key = match visible_at.filter(|at| *at > now) {
            Some(at) => {
                let key = self.slab.insert(entry, Place::Delayed);
                self.delayed.push(Reverse((at, key)));
                self.delayed_len += 1;
                key
            }
            None => {
                let key = self.slab.insert(entry, Place::Ready);
                let lane = Self::lane(&mut self.ready, priority);
                if front {
                    lane.push_front(key);
                } else {
                    lane.push_back(key);
                }
                self.ready_len += 1;
                key
            }
        };
        self.wake_one();
        if let Some(at) = expires {
            let earliest = self
                .expiries
                .peek()
                .is_none_or(|Reverse((first, _))| at < *first);
            self.expiries.push(Reverse((at, key)));
            self.expiring_live += 1;
            if earliest {
                self.note_reaper();
            }
            if self.expiries.len() > 2 * self.expiring_live + STALE_SLACK {
                let slab = &self.slab;
                self.expiries.retain(|Reverse((_, key))| slab.is_live(*key));
            }
        }
    }

    fn note_reaper(&mut self) {
        let action = if self.reaper_started {
            ReaperAction::Wake
        } else {
            self.reaper_started = true;
            ReaperAction::Start
        };
        self.pending_reaper = self.pending_reaper.max(action);
    }

    /// Moves delayed messages whose time has come to their ready lanes.
    fn promote(&mut self, now: Instant) {
        while let Some(&Reverse((at, key))) = self.delayed.peek() {
            if at > now {
                break;
            }
            self.delayed.pop();
            let Some(slot) = self.slab.get_mut(key) else {
                continue;
            };
            if slot.place != Place::Delayed {
                continue;
            }
            slot.place = Place::Ready;
            let priority = slot
                .entry
                .as_ref()
                .map_or(Priority::MIN, |e| e.message.priority);
            Self::lane(&mut self.ready, priority).push_back(key);
            self.delayed_len -= 1;
            self.ready_len += 1;
        }
    }

    /// Removes every message that has expired by `now` into `dead`.
    fn expire(&mut self, now: Instant, dead: &mut Vec<(Entry, DeadReason)>) {
        while let Some(&Reverse((at, key))) = self.expiries.peek() {
            if at > now {
                break;
            }
            self.expiries.pop();
            let Some((entry, place)) = self.slab.take(key) else {
                continue;
            };
            self.expiring_live -= 1;
            match place {
                Place::Ready => {
                    self.ready_len -= 1;
                    self.ready_stale += 1;
                }
                Place::Delayed => self.delayed_len -= 1,
            }
            dead.push((entry, DeadReason::Expired));
        }
        self.compact();
    }

    fn compact(&mut self) {
        let slab = &self.slab;
        if self.ready_len == 0 && self.ready_stale > 0 {
            self.ready.iter_mut().for_each(VecDeque::clear);
            self.ready_stale = 0;
        } else if self.ready_stale > STALE_SLACK && self.ready_stale > self.ready_len {
            for lane in &mut self.ready {
                lane.retain(|key| slab.is_live(*key));
            }
            self.ready_stale = 0;
        }
        if self.delayed.len() > 2 * self.delayed_len + STALE_SLACK {
            self.delayed.retain(|Reverse((_, key))| slab.is_live(*key));
        }
    }

    /// The next ready message: highest priority first, FIFO within one.
    fn pop(&mut self) -> Option<Entry> {
        if self.ready_len == 0 {
            return None;
        }
        for lane in self.ready.iter_mut().rev() {
            while let Some(key) = lane.pop_front() {
                match self.slab.take(key) {
                    Some((entry, _)) => {
                        self.ready_len -= 1;
                        if entry.expires.is_some() {
                            self.expiring_live -= 1;
                        }
                        return Some(entry);
                    }
                    None => self.ready_stale = self.ready_stale.saturating_sub(1),
                }
            }
        }
        None
    }

    /// Moves up to `room` deliverable messages into `out`; messages that
    /// expired or used up their attempts go to `dead` instead.
    pub(crate) fn take_batch(
        &mut self,
        now: Instant,
        room: usize,
        max_attempts: Option<u32>,
        out: &mut VecDeque<Entry>,
        dead: &mut Vec<(Entry, DeadReason)>,
    ) -> usize {
        self.promote(now);
        self.expire(now, dead);
        let mut taken = 0;
        while taken < room {
            let Some(entry) = self.pop() else { break };
            match max_attempts {
                Some(max) if entry.attempts >= max => {
                    dead.push((entry, DeadReason::MaxAttempts(max)));
                }
                _ => {
                    out.push_back(entry);
                    taken += 1;
                }
            }
        }
        if self.ready_len > 0 {
            // More than this consumer could take: pass the baton.
            self.wake_one();
        }
        taken
    }

    /// Arranges for the longest-parked consumer to be woken after unlocking.
    pub(crate) fn wake_one(&mut self) {
        if self.pending_wake.is_none() {
            self.pending_wake = self.waiters.pop_front();
            if let Some(signal) = &self.pending_wake {
                signal.parked.store(false, Ordering::Relaxed);
            }
        }
    }

    /// Parks a consumer until a message is ready (its waker must already be registered).
    pub(crate) fn park(&mut self, signal: &Arc<Signal>) {
        if !signal.parked.swap(true, Ordering::Relaxed) {
            self.waiters.push_back(Arc::clone(signal));
        }
    }

    /// Takes a consumer off the parked list, if it is on it.
    pub(crate) fn unpark(&mut self, signal: &Arc<Signal>) {
        if signal.parked.swap(false, Ordering::Relaxed) {
            self.waiters.retain(|w| !Arc::ptr_eq(w, signal));
        }
    }

    /// Whether `n` more messages fit under `max_length` (after dropping
    /// expired ones into `dead` if that makes the difference).
    pub(crate) fn has_room(
        &mut self,
        max_length: Option<u64>,
        n: usize,
        now: Instant,
        dead: &mut Vec<(Entry, DeadReason)>,
    ) -> bool {
        let Some(max) = max_length else { return true };
        let fits = |s: &Self| (s.len() as u64).saturating_add(n as u64) <= max;
        if fits(self) {
            return true;
        }
        self.expire(now, dead);
        fits(self)
    }

    /// When the earliest delayed message becomes visible.
    pub(crate) fn next_visible(&self) -> Option<Instant> {
        self.delayed.peek().map(|Reverse((at, _))| *at)
    }
}

/// A declared queue.
pub(crate) struct Queue {
    id: u64,
    pub(crate) name: QueueName,
    pub(crate) spec: QueueSpec,
    pub(crate) dlq: Option<Arc<Queue>>,
    state: Mutex<QueueState>,
    /// Delivered (or buffered in a consumer) and not yet settled.
    in_flight: AtomicU64,
    /// Wakes the expiry task when an earlier expiry arrives.
    reaper: Arc<Notify>,
    pub(crate) shared: Arc<Shared>,
    me: Weak<Queue>,
}

impl Queue {
    pub(crate) fn new(
        id: u64,
        spec: QueueSpec,
        dlq: Option<Arc<Queue>>,
        shared: Arc<Shared>,
    ) -> Arc<Self> {
        let levels = spec.max_priority.map_or(1, |max| usize::from(max) + 1);
        Arc::new_cyclic(|me| Self {
            id,
            name: spec.name.clone(),
            spec,
            dlq,
            state: Mutex::new(QueueState::new(levels)),
            in_flight: AtomicU64::new(0),
            reaper: Arc::new(Notify::new()),
            shared,
            me: me.clone(),
        })
    }

    /// Unique within the transport; locks are taken in id order.
    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Releases the lock, then wakes whoever the changes made under it concern.
    pub(crate) fn finish(&self, mut state: MutexGuard<'_, QueueState>) {
        let wake = state.pending_wake.take();
        let reaper = std::mem::take(&mut state.pending_reaper);
        drop(state);
        if let Some(signal) = wake {
            signal.wake();
        }
        match reaper {
            ReaperAction::Nothing => {}
            ReaperAction::Wake => self.reaper.notify_one(),
            ReaperAction::Start => self.start_reaper(),
        }
    }

    pub(crate) fn add_in_flight(&self, n: usize) {
        self.in_flight.fetch_add(n as u64, Ordering::AcqRel);
    }

    pub(crate) fn sub_in_flight(&self, n: usize) {
        self.in_flight.fetch_sub(n as u64, Ordering::AcqRel);
    }

    /// Puts an in-flight message back: ready at once at the head of its
    /// lane, or after `retry_after`.
    pub(crate) fn requeue(&self, entry: Entry, retry_after: Option<Duration>) {
        let now = Instant::now();
        let visible_at = retry_after
            .filter(|d| !d.is_zero())
            .map(|d| instant_after(now, d));
        let mut state = self.lock();
        state.insert(entry, visible_at, now, true);
        self.sub_in_flight(1);
        self.finish(state);
    }

    /// Moves `entries` (already removed from this queue) to its dead-letter
    /// queue, or drops them with a warning if it has none.
    pub(crate) fn dead_letter(&self, entries: impl IntoIterator<Item = (Entry, DeadReason)>) {
        let mut entries = entries.into_iter().peekable();
        if entries.peek().is_none() {
            return;
        }
        let Some(dlq) = &self.dlq else {
            for (entry, reason) in entries {
                tracing::warn!(
                    queue = %self.name,
                    message_id = %entry.message.id,
                    kind = %entry.message.kind,
                    %reason,
                    "message dropped: the queue has no dead-letter queue"
                );
            }
            return;
        };
        let at = unix_millis(SystemTime::now()).to_string();
        let now = Instant::now();
        let mut state = dlq.lock();
        for (entry, reason) in entries {
            tracing::debug!(
                queue = %self.name,
                dead_letter_queue = %dlq.name,
                message_id = %entry.message.id,
                %reason,
                "message dead-lettered"
            );
            let message = self.dead_letter_message(entry, &reason, &at);
            state.insert(
                Entry::new(message, None, now, dlq.spec.message_ttl),
                None,
                now,
                false,
            );
        }
        dlq.finish(state);
    }

    fn dead_letter_message(&self, entry: Entry, reason: &DeadReason, at: &str) -> Message {
        let Entry {
            mut message,
            topic,
            attempts,
            ..
        } = entry;
        // A dead letter must not expire again on its way to an operator.
        message.expires_at = None;
        let h = &mut message.headers;
        h.insert(headers::DEAD_LETTER_REASON, reason.to_string());
        if let Some(topic) = topic {
            h.insert(headers::ORIGINAL_TOPIC, topic.as_str());
        }
        h.insert(headers::ORIGINAL_QUEUE, self.name.as_str());
        h.insert(headers::ATTEMPTS, attempts.to_string());
        h.insert(headers::DEAD_LETTERED_AT, at);
        message
    }

    /// Exact counts, after settling what the clock has already decided.
    pub(crate) fn stats(&self) -> QueueStats {
        let now = Instant::now();
        let mut dead = Vec::new();
        let mut state = self.lock();
        state.promote(now);
        state.expire(now, &mut dead);
        let ready = state.ready_len as u64;
        let delayed = state.delayed_len as u64;
        let consumers = state.consumers;
        let in_flight = self.in_flight.load(Ordering::Acquire);
        self.finish(state);
        self.dead_letter(dead);
        QueueStats {
            ready,
            delayed,
            in_flight,
            consumers,
            dead_lettered: self.dlq.as_ref().map_or(0, |dlq| dlq.total()),
        }
    }

    /// Every message the queue holds: ready, delayed and in flight.
    fn total(&self) -> u64 {
        let state = self.lock();
        state.len() as u64 + self.in_flight.load(Ordering::Acquire)
    }

    /// Dead-letters what has expired; returns when to look again.
    fn expire_due(&self) -> Option<Instant> {
        let mut dead = Vec::new();
        let mut state = self.lock();
        state.expire(Instant::now(), &mut dead);
        let next = state.expiries.peek().map(|Reverse((at, _))| *at);
        self.finish(state);
        self.dead_letter(dead);
        next
    }

    fn start_reaper(&self) {
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(reap(
                    self.me.clone(),
                    Arc::clone(&self.reaper),
                    Arc::clone(&self.shared),
                ));
            }
            // No runtime here (a delivery dropped outside one): expired
            // messages are still caught when the queue is next read, and the
            // task is started by the next insert made inside a runtime.
            Err(_) => self.lock().reaper_started = false,
        }
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        // Lets the expiry task notice the queue is gone.
        self.reaper.notify_one();
    }
}

/// Dead-letters a queue's messages as they expire, whether or not anyone
/// consumes from it, so that its dead-letter queue receives them on time.
async fn reap(queue: Weak<Queue>, wake: Arc<Notify>, shared: Arc<Shared>) {
    loop {
        let mut closed = pin!(shared.close.notified());
        closed.as_mut().enable();
        if shared.is_closed() {
            return;
        }
        let next = match queue.upgrade() {
            Some(queue) => queue.expire_due(),
            None => return,
        };
        match next {
            Some(at) => tokio::select! {
                () = tokio::time::sleep_until(at) => {}
                () = wake.notified() => {}
                () = closed => return,
            },
            None => tokio::select! {
                () = wake.notified() => {}
                () = closed => return,
            },
        }
    }
}
