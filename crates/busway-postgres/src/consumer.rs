//! Consumers: a task per consumer leases ready rows into a buffer with one
//! `UPDATE ... FOR UPDATE SKIP LOCKED` statement; the stream hands them to
//! the application as deliveries.
//!
//! A consumer holds at most `prefetch` unsettled deliveries, buffered ones
//! included: each carries one of `prefetch` semaphore permits until it is
//! settled or released. When fewer rows are ready than it could take, the
//! task sleeps until a `NOTIFY` names its queue, the next row of the queue
//! becomes visible (a delay, a retry backoff, or the lease of a crashed
//! consumer running out), or the transport closes. Rows still in the buffer
//! when the stream is dropped never reached the application: their lease is
//! returned without counting as an attempt.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use busway_core::{
    headers, Acker, ConsumeError, Delivery, QueueName, QueueSpec, SettleError, Settlement,
};
use futures::future::BoxFuture;
use futures::task::AtomicWaker;
use futures::Stream;
use sqlx::Row;
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use crate::error::{is_retryable, FromSql};
use crate::publish::lane;
use crate::row::{millis, StoredRow, ROW_COLUMNS};
use crate::settle::{LeaseId, Move, SettleOp, SettleRequest};
use crate::transport::{lock, Shared};

/// The longest a waiting consumer sleeps without being woken: a backstop
/// for wake-ups lost in ways the listener cannot notice.
const MAX_SLEEP: Duration = Duration::from_secs(10);
/// Pause after a failed lease before trying again.
const ERROR_PAUSE: Duration = Duration::from_millis(250);

/// What a consumer needs to know about its queue.
pub(crate) struct QueueInfo {
    pub(crate) spec: QueueSpec,
    /// The dead-letter queue's spec, if the queue has one.
    pub(crate) dead_letter: Option<QueueSpec>,
}

impl QueueInfo {
    /// The move of a leased row to the dead-letter queue, with `reason`.
    fn dead_letter_move(&self, row: &RowMeta, reason: &str, attempts: i32) -> Move {
        let mut headers = match row.headers.as_deref() {
            Some(json) => serde_json::from_str(json).unwrap_or_default(),
            None => busway_core::Headers::new(),
        };
        headers.insert(headers::DEAD_LETTER_REASON, reason);
        if let Some(topic) = &row.topic {
            headers.insert(headers::ORIGINAL_TOPIC, topic.as_str());
        }
        headers.insert(headers::ORIGINAL_QUEUE, self.spec.name.as_str());
        headers.insert(headers::ATTEMPTS, attempts.to_string());
        headers.insert(
            headers::DEAD_LETTERED_AT,
            busway_core::unix_millis(std::time::SystemTime::now()).to_string(),
        );
        Move {
            from: self.spec.name.clone(),
            to: self.dead_letter.as_ref().map(|s| s.name.clone()),
            headers: serde_json::to_string(&headers).unwrap_or_else(|_| "{}".into()),
            lane: self
                .dead_letter
                .as_ref()
                .map_or(0, |s| lane(s, row.priority)),
        }
    }
}

/// What settling needs of a row besides its lease.
struct RowMeta {
    headers: Option<String>,
    topic: Option<String>,
    priority: i16,
    attempt: i32,
}

/// What a consumer's task and its stream share.
pub(crate) struct ConsumerState {
    pub(crate) id: String,
    pub(crate) info: Arc<QueueInfo>,
    buffer: Mutex<VecDeque<Result<Leased, ConsumeError>>>,
    waker: AtomicWaker,
    /// No more items will be added (the transport closed or the task ended).
    ended: AtomicBool,
    /// The stream was dropped.
    stopped: AtomicBool,
    /// Wakes the task when the consumer ends or stops.
    stop: tokio::sync::Notify,
    /// Leases the stream gave back unused, for the task to return.
    returned: Mutex<Vec<LeaseId>>,
}

impl ConsumerState {
    pub(crate) fn new(id: String, info: Arc<QueueInfo>) -> Self {
        Self {
            id,
            info,
            buffer: Mutex::new(VecDeque::new()),
            waker: AtomicWaker::new(),
            ended: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            stop: tokio::sync::Notify::new(),
            returned: Mutex::new(Vec::new()),
        }
    }

    fn queue(&self) -> &QueueName {
        &self.info.spec.name
    }

    fn is_done(&self) -> bool {
        self.ended.load(Ordering::SeqCst) || self.stopped.load(Ordering::SeqCst)
    }

    /// Ends the consumer because the transport is closing. Returns the
    /// leases of the buffered deliveries, which the close returns without
    /// counting an attempt.
    pub(crate) fn end(&self) -> Vec<LeaseId> {
        let drained: Vec<_> = {
            let mut buffer = lock(&self.buffer);
            self.ended.store(true, Ordering::SeqCst);
            buffer.drain(..).collect()
        };
        self.waker.wake();
        self.stop.notify_one();
        let mut leases: Vec<LeaseId> = drained
            .into_iter()
            .filter_map(|item| item.ok().map(Leased::disarm))
            .collect();
        leases.append(&mut lock(&self.returned));
        leases
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

    /// Buffers freshly leased rows, each with a prefetch permit; rows the
    /// consumer no longer wants are kept for the task to return.
    fn push_rows(&self, rows: Vec<(StoredRow, OwnedSemaphorePermit)>, token: i64) {
        {
            let mut buffer = lock(&self.buffer);
            if self.is_done() {
                let mut returned = lock(&self.returned);
                returned.extend(rows.iter().map(|(row, _)| LeaseId {
                    seq: row.seq,
                    token,
                }));
                return;
            }
            for (row, permit) in rows {
                buffer.push_back(Ok(Leased {
                    lease: LeaseId {
                        seq: row.seq,
                        token,
                    },
                    row: Some(row),
                    permit: Some(permit),
                }));
            }
        }
        self.waker.wake();
    }
}

/// A leased row waiting in a consumer's buffer.
pub(crate) struct Leased {
    lease: LeaseId,
    row: Option<StoredRow>,
    permit: Option<OwnedSemaphorePermit>,
}

impl Leased {
    fn disarm(mut self) -> LeaseId {
        self.row = None;
        self.lease
    }

    fn into_delivery(mut self, shared: &Arc<Shared>, info: &Arc<QueueInfo>) -> Option<Delivery> {
        let row = self.row.take()?;
        let topic = row.topic();
        let attempt = row.attempt();
        let meta = RowMeta {
            headers: row.headers.clone(),
            topic: row.topic.clone(),
            priority: row.priority,
            attempt: row.attempt,
        };
        let message = row.into_message();
        let acker = PgAcker {
            shared: shared.clone(),
            info: info.clone(),
            lease: self.lease,
            meta,
            permit: self.permit.take(),
        };
        Some(Delivery::new(
            message,
            attempt,
            info.spec.name.clone(),
            topic,
            Box::new(acker),
        ))
    }
}

/// Settles a delivery through the settle workers.
struct PgAcker {
    shared: Arc<Shared>,
    info: Arc<QueueInfo>,
    lease: LeaseId,
    meta: RowMeta,
    /// The consumer's prefetch slot, freed when the delivery is settled.
    permit: Option<OwnedSemaphorePermit>,
}

impl Acker for PgAcker {
    fn settle(
        self: Box<Self>,
        settlement: Settlement,
    ) -> BoxFuture<'static, Result<(), SettleError>> {
        let this = *self;
        if this.shared.is_closed() {
            return Box::pin(async { Err(SettleError::Closed) });
        }
        let info = &this.info;
        let mut refusal = None;
        let op = match settlement {
            Settlement::Ack => SettleOp::Ack,
            Settlement::Nack { retry_after } => match info.spec.max_attempts {
                Some(max) if i64::from(this.meta.attempt) >= i64::from(max) => {
                    let reason = format!("max attempts ({max}) exceeded");
                    SettleOp::DeadLetter(info.dead_letter_move(
                        &this.meta,
                        &reason,
                        this.meta.attempt,
                    ))
                }
                _ => SettleOp::Requeue {
                    delay: retry_after,
                    undelivered: false,
                },
            },
            Settlement::DeadLetter { reason } => {
                if info.dead_letter.is_some() {
                    SettleOp::DeadLetter(info.dead_letter_move(
                        &this.meta,
                        &reason,
                        this.meta.attempt,
                    ))
                } else {
                    refusal = Some(SettleError::NoDeadLetterQueue(info.spec.name.clone()));
                    SettleOp::Requeue {
                        delay: None,
                        undelivered: false,
                    }
                }
            }
        };
        let (reply, rx) = oneshot::channel();
        let sent = this.shared.settle(SettleRequest {
            lease: this.lease,
            op,
            reply: Some(reply),
        });
        // Settled as far as prefetch goes.
        drop(this.permit);
        Box::pin(async move {
            if !sent {
                return Err(SettleError::Closed);
            }
            let result = rx.await.unwrap_or(Err(SettleError::Closed));
            match refusal {
                Some(refusal) => result.and(Err(refusal)),
                None => result,
            }
        })
    }

    fn release(self: Box<Self>) {
        self.shared.settle(SettleRequest {
            lease: self.lease,
            op: SettleOp::Requeue {
                delay: None,
                undelivered: false,
            },
            reply: None,
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
                    if let Some(delivery) = leased.into_delivery(&self.shared, &self.state.info) {
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
        // The task returns these, then removes the consumer: once the
        // consumer is gone, its rows are back.
        lock(&self.state.returned).extend(
            drained
                .into_iter()
                .filter_map(|item| item.ok().map(Leased::disarm)),
        );
        self.state.stop.notify_one();
    }
}

/// Rows leased by one statement.
struct LeaseBatch {
    rows: Vec<StoredRow>,
    token: i64,
    /// The database's clock when the rows were leased.
    now: i64,
    /// When fewer rows were leased than asked for: when the next row of the
    /// queue becomes visible (a delay, a retry backoff, a lease running
    /// out), if any is waiting.
    next: Option<i64>,
}

/// Leases up to `$2` ready rows of queue `$1` for `$3` ms with token `$4`.
/// Always answers at least one row: with nothing leased, a row of NULLs
/// but `now` and `next`. `next` (looked up only when fewer rows than asked
/// for were leased) is the earliest `visible_at` still ahead, so a short
/// lease needs no second statement to know how long to sleep.
static LEASE_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH picked AS (
             SELECT seq, visible_at AS was_visible_at, lane AS was_lane
             FROM busway_messages
             WHERE queue = $1 AND visible_at <= busway_now_ms()
             ORDER BY lane DESC, visible_at, seq
             LIMIT $2
             FOR UPDATE SKIP LOCKED
         ), leased AS (
             UPDATE busway_messages m
             SET visible_at = busway_now_ms() + $3, attempt = m.attempt + 1, lease_token = $4
             FROM picked WHERE m.seq = picked.seq
             RETURNING {ROW_COLUMNS}, picked.was_visible_at, picked.was_lane
         ), counted AS (
             SELECT count(*) AS n FROM leased
         )
         SELECT leased.*, busway_now_ms() AS now,
             CASE WHEN counted.n < $2 THEN (
                 SELECT min(visible_at) FROM busway_messages
                 WHERE queue = $1 AND visible_at > busway_now_ms()
             ) END AS next
         FROM counted LEFT JOIN leased ON true"
    )
});

/// Leases up to `max` ready rows of `queue`, in delivery order.
async fn lease(shared: &Shared, queue: &QueueName, max: usize) -> Result<LeaseBatch, sqlx::Error> {
    let token = shared.next_token();
    let rows = sqlx::query(LEASE_SQL.as_str())
        .bind(queue.as_str())
        .bind(i64::try_from(max).unwrap_or(i64::MAX))
        .bind(millis(shared.config.lease))
        .bind(token)
        .fetch_all(&shared.pool)
        .await?;
    let mut now = 0;
    let mut next = None;
    let mut keyed = Vec::with_capacity(rows.len());
    for r in &rows {
        now = r.try_get("now")?;
        next = r.try_get("next")?;
        let leased: Option<i64> = r.try_get("seq")?;
        if leased.is_none() {
            continue;
        }
        let lane: i16 = r.try_get("was_lane")?;
        let was_visible_at: i64 = r.try_get("was_visible_at")?;
        let row = StoredRow::from_row(r)?;
        keyed.push(((std::cmp::Reverse(lane), was_visible_at, row.seq), row));
    }
    keyed.sort_by_key(|(key, _)| *key);
    Ok(LeaseBatch {
        rows: keyed.into_iter().map(|(_, row)| row).collect(),
        token,
        now,
        next,
    })
}

/// The consumer's task: keeps its buffer filled up to `prefetch` unsettled
/// deliveries, and sleeps while there is nothing to lease.
pub(crate) async fn feed(shared: Arc<Shared>, state: Arc<ConsumerState>, prefetch: usize) {
    let queue = state.queue().clone();
    let slots = Arc::new(Semaphore::new(prefetch));
    let mut version = shared.wakers.subscribe(queue.as_str());
    let mut shutdown = shared.shutdown.subscribe();
    loop {
        if state.is_done() || *shutdown.borrow() {
            break;
        }
        tokio::select! {
            biased;
            _ = shutdown.wait_for(|closed| *closed) => break,
            _ = state.stop.notified() => continue,
            free = slots.clone().acquire_owned() => match free {
                Ok(free) => drop(free),
                Err(_) => break,
            },
        }
        // Slots come back in bursts (deliveries settled together): let the
        // rest of the burst arrive, so one statement leases for all of it.
        tokio::task::yield_now().await;
        let mut permits = Vec::new();
        while let Ok(permit) = slots.clone().try_acquire_owned() {
            permits.push(permit);
        }
        let requested = permits.len();
        if requested == 0 {
            continue;
        }
        // Anything committed from here on wakes the wait below.
        version.mark_unchanged();
        let batch = match lease(&shared, &queue, requested).await {
            Ok(batch) => batch,
            Err(e) => {
                if is_retryable(&e) {
                    tracing::warn!(queue = %queue, error = %e, "leasing messages failed; trying again");
                } else {
                    tracing::warn!(queue = %queue, error = %e, "leasing messages failed");
                    state.push_error(ConsumeError::from_sql(e));
                }
                drop(permits);
                tokio::select! {
                    _ = shutdown.wait_for(|closed| *closed) => break,
                    _ = state.stop.notified() => {}
                    _ = tokio::time::sleep(ERROR_PAUSE) => {}
                }
                continue;
            }
        };
        let (leased, now, next) = (batch.rows.len(), batch.now, batch.next);
        let mut deliver = Vec::with_capacity(leased);
        for row in batch.rows {
            let lease = LeaseId {
                seq: row.seq,
                token: batch.token,
            };
            // Attempts before this lease.
            let attempts = row.attempt.saturating_sub(1);
            let doomed = if row.expires_at.is_some_and(|at| at <= now) {
                Some("expired".to_owned())
            } else {
                match state.info.spec.max_attempts {
                    Some(max) if i64::from(attempts) >= i64::from(max) => {
                        Some(format!("max attempts ({max}) exceeded"))
                    }
                    _ => None,
                }
            };
            match doomed {
                Some(reason) => {
                    let meta = RowMeta {
                        headers: row.headers,
                        topic: row.topic,
                        priority: row.priority,
                        attempt: row.attempt,
                    };
                    let m = state.info.dead_letter_move(&meta, &reason, attempts);
                    shared.settle(SettleRequest {
                        lease,
                        op: SettleOp::DeadLetter(m),
                        reply: None,
                    });
                }
                None => {
                    shared.hold(lease);
                    if let Some(permit) = permits.pop() {
                        deliver.push((row, permit));
                    }
                }
            }
        }
        state.push_rows(deliver, batch.token);
        drop(permits);
        if leased < requested {
            let sleep = match next {
                Some(at) => Duration::from_millis(
                    u64::try_from(at.saturating_sub(now))
                        .unwrap_or(0)
                        .saturating_add(1),
                )
                .min(MAX_SLEEP),
                None => MAX_SLEEP,
            };
            tokio::select! {
                biased;
                _ = shutdown.wait_for(|closed| *closed) => break,
                _ = state.stop.notified() => {}
                _ = version.changed() => {}
                _ = tokio::time::sleep(sleep) => {}
            }
        }
    }
    state.ended.store(true, Ordering::SeqCst);
    state.waker.wake();
    if !shared.is_closed() {
        // The stream was dropped: return what it never handed out, then
        // deregister. (A close does both itself.)
        let returned: Vec<LeaseId> = std::mem::take(&mut *lock(&state.returned));
        shared.return_undelivered(&returned).await;
        shared.remove_consumer(&state.id).await;
    }
}
