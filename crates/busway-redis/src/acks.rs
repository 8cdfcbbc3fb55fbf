//! Acknowledgements, sent to the server in batches.
//!
//! Each ack is one atomic step per entry: `XACK`, then `XDEL` if the entry
//! was still pending (see [`scripts::ACK_MANY`]). Acks settled at about the
//! same time share one script call per stream: a task takes every ack
//! queued while the previous call was on its way (as a group commit does),
//! so a busy consumer pays one round trip and one script run per batch
//! rather than per message, and a lone ack still gets its answer after one
//! round trip. Each ack's future resolves once the server has applied it,
//! exactly as an ack of its own would.

use std::sync::Arc;

use futures::future::join_all;
use redis::aio::ConnectionManager;
use redis::RedisError;
use tokio::sync::{mpsc, oneshot};

use crate::scripts;
use crate::transport::GROUP;

/// Most acks in one script call.
const MAX_BATCH: usize = 1024;

/// One ack waiting for its batch.
struct Ack {
    stream: Arc<str>,
    id: String,
    /// Whether the entry was still pending (and is now acknowledged and deleted).
    reply: oneshot::Sender<Result<bool, RedisError>>,
}

/// The handle that queues acks for the batching task. The task ends once
/// every handle is dropped and the queued acks are answered.
pub(crate) struct AckBatcher {
    tx: mpsc::UnboundedSender<Ack>,
}

impl AckBatcher {
    /// Starts the batching task on `conn` (a multiplexed connection that
    /// carries no other traffic, so acks never queue behind publishes).
    pub(crate) fn spawn(conn: ConnectionManager) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(conn, rx));
        Self { tx }
    }

    /// Queues the ack of entry `id` of `stream` at once (not when the
    /// future is first polled). The future resolves to whether the entry was
    /// still pending: `false` means its lease was lost.
    pub(crate) fn ack(
        &self,
        stream: Arc<str>,
        id: String,
    ) -> impl std::future::Future<Output = Result<bool, RedisError>> + Send + 'static {
        let (reply, answer) = oneshot::channel();
        let queued = self.tx.send(Ack { stream, id, reply }).is_ok();
        async move {
            if !queued {
                return Err(stopped());
            }
            answer.await.unwrap_or_else(|_| Err(stopped()))
        }
    }
}

fn stopped() -> RedisError {
    RedisError::from(std::io::Error::new(
        std::io::ErrorKind::BrokenPipe,
        "the acknowledgement task stopped",
    ))
}

async fn run(conn: ConnectionManager, mut rx: mpsc::UnboundedReceiver<Ack>) {
    let mut queued = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut queued, MAX_BATCH).await > 0 {
        // Acks come in bursts (a consumer acks what it was handed
        // together): let the rest of the burst arrive before sending.
        tokio::task::yield_now().await;
        while queued.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(ack) => queued.push(ack),
                Err(_) => break,
            }
        }
        // One script call per stream, all on their way at once.
        let mut by_stream: Vec<(Arc<str>, Vec<Ack>)> = Vec::new();
        for ack in queued.drain(..) {
            match by_stream.iter_mut().find(|(s, _)| *s == ack.stream) {
                Some((_, acks)) => acks.push(ack),
                None => by_stream.push((ack.stream.clone(), vec![ack])),
            }
        }
        join_all(
            by_stream
                .into_iter()
                .map(|(stream, acks)| send(conn.clone(), stream, acks)),
        )
        .await;
    }
}

/// Runs one batch of acks of one stream and answers each.
async fn send(mut conn: ConnectionManager, stream: Arc<str>, acks: Vec<Ack>) {
    let mut invocation = scripts::ACK_MANY.key(&*stream);
    invocation.arg(GROUP);
    for ack in &acks {
        invocation.arg(&ack.id);
    }
    let result: Result<Vec<i64>, RedisError> = invocation.invoke_async(&mut conn).await;
    match result {
        Ok(done) if done.len() == acks.len() => {
            for (ack, n) in acks.into_iter().zip(done) {
                let _ = ack.reply.send(Ok(n == 1));
            }
        }
        Ok(done) => {
            let e = RedisError::from(std::io::Error::other(format!(
                "the ack script answered {} results for {} entries",
                done.len(),
                acks.len()
            )));
            for ack in acks {
                let _ = ack.reply.send(Err(e.clone()));
            }
        }
        Err(e) => {
            for ack in acks {
                let _ = ack.reply.send(Err(e.clone()));
            }
        }
    }
}
