//! Settling deliveries: acks, nacks, releases and dead letters go to a few
//! worker tasks that apply everything queued at that moment with one
//! statement per kind (all acks of a group are one `DELETE`).
//!
//! Every statement checks the lease token, so a delivery whose lease ran
//! out (and that may be redelivered elsewhere) cannot settle its successor.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use busway_core::{QueueName, SettleError};
use sqlx::{PgConnection, Row};
use tokio::sync::{mpsc, oneshot, Mutex};

use crate::error::{is_connection_lost, FromSql};
use crate::publish::sqlx_copy;
use crate::row::millis;
use crate::transport::Shared;

/// Identifies one lease of one row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct LeaseId {
    pub(crate) seq: i64,
    pub(crate) token: i64,
}

/// A message moved to a dead-letter queue (or dropped, with `to: None`).
pub(crate) struct Move {
    pub(crate) from: QueueName,
    pub(crate) to: Option<QueueName>,
    /// The dead letter's headers (JSON), reason included.
    pub(crate) headers: String,
    /// The dead letter's lane in its queue.
    pub(crate) lane: i16,
}

/// What to do with a leased row.
pub(crate) enum SettleOp {
    /// Delete it.
    Ack,
    /// Return it to its queue: after `delay`, or at its old place. With
    /// `undelivered`, the delivery never reached the application and does
    /// not count as an attempt.
    Requeue {
        delay: Option<Duration>,
        undelivered: bool,
    },
    /// Move it to a dead-letter queue.
    DeadLetter(Move),
}

/// One settlement, answered on `reply` if someone waits.
pub(crate) struct SettleRequest {
    pub(crate) lease: LeaseId,
    pub(crate) op: SettleOp,
    pub(crate) reply: Option<oneshot::Sender<Result<(), SettleError>>>,
}

/// How often a group is tried again after its connection was lost.
const SETTLE_RETRIES: u32 = 5;

/// A settle worker.
pub(crate) async fn worker(
    shared: Arc<Shared>,
    requests: Arc<Mutex<mpsc::UnboundedReceiver<SettleRequest>>>,
) {
    let mut shutdown = shared.shutdown.subscribe();
    loop {
        let mut group = Vec::new();
        {
            let mut rx = tokio::select! {
                _ = shutdown.wait_for(|closed| *closed) => return,
                rx = requests.lock() => rx,
            };
            let first = tokio::select! {
                _ = shutdown.wait_for(|closed| *closed) => return,
                first = rx.recv() => first,
            };
            let Some(first) = first else { return };
            group.push(Some(first));
            // Settlements come in bursts (a consumer acks what it was
            // handed together): let the rest of the burst arrive, so it
            // shares one statement and one commit rather than a few.
            tokio::task::yield_now().await;
            while group.len() < shared.config.max_batch {
                match rx.try_recv() {
                    Ok(request) => group.push(Some(request)),
                    Err(_) => break,
                }
            }
        }
        let mut tries = 0;
        loop {
            match settle_group(&shared, &mut group).await {
                Ok(()) => break,
                Err(e) if is_connection_lost(&e) && tries < SETTLE_RETRIES => {
                    tries += 1;
                    tracing::warn!(error = %e, tries, "settling lost its connection; trying again");
                    tokio::time::sleep(Duration::from_millis(50 * u64::from(tries))).await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "settling failed; the leases run out and the messages come back");
                    for request in group.drain(..).flatten() {
                        shared.forget(request.lease);
                        if let Some(reply) = request.reply {
                            let _ = reply.send(Err(SettleError::from_sql(sqlx_copy(&e))));
                        }
                    }
                    break;
                }
            }
        }
    }
}

/// Applies a group; answered requests leave their slot empty.
async fn settle_group(
    shared: &Shared,
    group: &mut [Option<SettleRequest>],
) -> Result<(), sqlx::Error> {
    let mut conn = shared.pool.acquire().await?;
    let acks: Vec<usize> = indexes(group, |op| matches!(op, SettleOp::Ack));
    if !acks.is_empty() {
        let leases = leases_of(group, &acks);
        let done = ack(&mut conn, &leases).await?;
        answer(shared, group, &acks, &done);
    }
    let requeues: Vec<usize> = indexes(group, |op| matches!(op, SettleOp::Requeue { .. }));
    if !requeues.is_empty() {
        let done = requeue(&mut conn, group, &requeues, &shared.channel).await?;
        answer(shared, group, &requeues, &done);
    }
    let moves: Vec<usize> = indexes(group, |op| matches!(op, SettleOp::DeadLetter(_)));
    for i in moves {
        let Some(request) = &group[i] else { continue };
        let SettleOp::DeadLetter(m) = &request.op else {
            continue;
        };
        let moved = dead_letter(&mut conn, request.lease, m, &shared.channel).await?;
        let done: HashSet<i64> = if moved {
            [request.lease.seq].into()
        } else {
            HashSet::new()
        };
        answer(shared, group, &[i], &done);
    }
    Ok(())
}

fn indexes(group: &[Option<SettleRequest>], f: impl Fn(&SettleOp) -> bool) -> Vec<usize> {
    group
        .iter()
        .enumerate()
        .filter(|(_, r)| r.as_ref().is_some_and(|r| f(&r.op)))
        .map(|(i, _)| i)
        .collect()
}

fn leases_of(group: &[Option<SettleRequest>], which: &[usize]) -> Vec<LeaseId> {
    which
        .iter()
        .filter_map(|&i| group[i].as_ref().map(|r| r.lease))
        .collect()
}

/// Answers the requests at `which`: done if their row is in `done`, else
/// their lease was lost.
fn answer(
    shared: &Shared,
    group: &mut [Option<SettleRequest>],
    which: &[usize],
    done: &HashSet<i64>,
) {
    for &i in which {
        if let Some(request) = group[i].take() {
            shared.forget(request.lease);
            if let Some(reply) = request.reply {
                let result = if done.contains(&request.lease.seq) {
                    Ok(())
                } else {
                    Err(SettleError::LeaseLost)
                };
                let _ = reply.send(result);
            }
        }
    }
}

/// Deletes the rows of `leases`; returns the rows deleted.
pub(crate) async fn ack(
    conn: &mut PgConnection,
    leases: &[LeaseId],
) -> Result<HashSet<i64>, sqlx::Error> {
    let seqs: Vec<i64> = leases.iter().map(|l| l.seq).collect();
    let tokens: Vec<i64> = leases.iter().map(|l| l.token).collect();
    let rows = sqlx::query(
        "DELETE FROM busway_messages m USING unnest($1::bigint[], $2::bigint[]) AS a(seq, token) \
         WHERE m.seq = a.seq AND m.lease_token = a.token RETURNING m.seq",
    )
    .bind(&seqs)
    .bind(&tokens)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter().map(|r| r.try_get::<i64, _>(0)).collect()
}

/// Returns rows to their queues (nack, release) and wakes their consumers.
async fn requeue(
    conn: &mut PgConnection,
    group: &[Option<SettleRequest>],
    which: &[usize],
    channel: &str,
) -> Result<HashSet<i64>, sqlx::Error> {
    let mut seqs = Vec::new();
    let mut tokens = Vec::new();
    let mut delays: Vec<Option<i64>> = Vec::new();
    let mut undo = Vec::new();
    for &i in which {
        let Some(request) = &group[i] else { continue };
        if let SettleOp::Requeue {
            delay, undelivered, ..
        } = &request.op
        {
            seqs.push(request.lease.seq);
            tokens.push(request.lease.token);
            delays.push(delay.map(millis));
            undo.push(i32::from(*undelivered));
        }
    }
    requeue_rows(conn, &seqs, &tokens, &delays, &undo, channel).await
}

/// Returns rows to their queues: `delays[i]` from now, or at their old
/// place (`None`); `undo[i] = 1` takes back the attempt of the lease.
pub(crate) async fn requeue_rows(
    conn: &mut PgConnection,
    seqs: &[i64],
    tokens: &[i64],
    delays: &[Option<i64>],
    undo: &[i32],
    channel: &str,
) -> Result<HashSet<i64>, sqlx::Error> {
    let rows = sqlx::query(
        "WITH done AS (
             UPDATE busway_messages m
             SET lease_token = NULL,
                 visible_at = CASE WHEN a.delay IS NULL THEN m.enqueued_at
                                   ELSE busway_now_ms() + a.delay END,
                 attempt = GREATEST(m.attempt - a.undo, 0)
             FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::int4[])
                  AS a(seq, token, delay, undo)
             WHERE m.seq = a.seq AND m.lease_token = a.token
             RETURNING m.seq, m.queue
         ), woken AS (
             SELECT count(pg_notify($5, q.queue)) AS n FROM (SELECT DISTINCT queue FROM done) q
         )
         SELECT done.seq FROM done, woken",
    )
    .bind(seqs)
    .bind(tokens)
    .bind(delays)
    .bind(undo)
    .bind(channel)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter().map(|r| r.try_get::<i64, _>(0)).collect()
}

/// Moves a leased row to its dead-letter queue (or deletes it when `to`
/// is `None`). Returns whether the lease was still held.
pub(crate) async fn dead_letter(
    conn: &mut PgConnection,
    lease: LeaseId,
    m: &Move,
    channel: &str,
) -> Result<bool, sqlx::Error> {
    let row = sqlx::query(
        "WITH moved AS (
             DELETE FROM busway_messages WHERE seq = $1 AND lease_token = $2 RETURNING *
         ), ins AS (
             INSERT INTO busway_messages (queue, id, kind, correlation_id, causation_id, reply_to,
                 content_type, headers, timestamp, priority, lane, expires_at, topic, payload,
                 enqueued_at, visible_at)
             SELECT $3::text, id, kind, correlation_id, causation_id, reply_to, content_type, $4,
                 timestamp, priority, $5, NULL, NULL, payload, busway_now_ms(), busway_now_ms()
             FROM moved WHERE $3::text IS NOT NULL
             RETURNING queue
         )
         SELECT (SELECT count(*) FROM moved) AS moved,
                (SELECT count(pg_notify($6, queue)) FROM ins) AS woken",
    )
    .bind(lease.seq)
    .bind(lease.token)
    .bind(m.to.as_ref().map(|q| q.as_str()))
    .bind(&m.headers)
    .bind(m.lane)
    .bind(channel)
    .fetch_one(&mut *conn)
    .await?;
    let moved: i64 = row.try_get("moved")?;
    if moved > 0 && m.to.is_none() {
        tracing::warn!(queue = %m.from, seq = lease.seq, "dropped a message: its queue has no dead-letter queue");
    }
    Ok(moved > 0)
}
