//! Waking consumers: `LISTEN` on the schema's channel; every commit that
//! may make messages ready (publish, nack, release, dead-letter) sends a
//! `NOTIFY` with the queue's name.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::watch;

/// One counter per queue with waiting consumers; bumped when a
/// notification names the queue, and all at once when notifications may
/// have been missed (the listening connection was lost).
#[derive(Default)]
pub(crate) struct Wakers {
    queues: Mutex<HashMap<String, watch::Sender<u64>>>,
}

impl Wakers {
    /// A receiver that changes whenever `queue` may have new ready messages.
    pub(crate) fn subscribe(&self, queue: &str) -> watch::Receiver<u64> {
        let mut queues = self.queues.lock().unwrap_or_else(PoisonError::into_inner);
        queues
            .entry(queue.to_owned())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }

    /// Wakes the consumers of `queue`.
    pub(crate) fn bump(&self, queue: &str) {
        let queues = self.queues.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(tx) = queues.get(queue) {
            tx.send_modify(|v| *v = v.wrapping_add(1));
        }
    }

    /// Wakes every consumer.
    pub(crate) fn bump_all(&self) {
        let queues = self.queues.lock().unwrap_or_else(PoisonError::into_inner);
        for tx in queues.values() {
            tx.send_modify(|v| *v = v.wrapping_add(1));
        }
    }
}

/// Pause before listening again after the listener failed.
const RELISTEN_PAUSE: Duration = Duration::from_millis(500);

/// Listens on `channel` until `shutdown` turns true, bumping `wakers`.
/// Reconnects by itself; whenever notifications may have been lost, wakes
/// every consumer so they look for themselves.
pub(crate) async fn listen(
    pool: PgPool,
    channel: String,
    wakers: Arc<Wakers>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let connected = tokio::select! {
            _ = shutdown.wait_for(|closed| *closed) => return,
            connected = connect(&pool, &channel) => connected,
        };
        let mut listener = match connected {
            Ok(listener) => listener,
            Err(e) => {
                tracing::warn!(error = %e, "could not LISTEN for wake-ups; retrying");
                wakers.bump_all();
                tokio::select! {
                    _ = shutdown.wait_for(|closed| *closed) => return,
                    _ = tokio::time::sleep(RELISTEN_PAUSE) => continue,
                }
            }
        };
        // Anything committed before the LISTEN took effect is found by the
        // consumers' own look.
        wakers.bump_all();
        loop {
            let next = tokio::select! {
                _ = shutdown.wait_for(|closed| *closed) => return,
                next = listener.try_recv() => next,
            };
            match next {
                Ok(Some(notification)) => wakers.bump(notification.payload()),
                Ok(None) => {
                    // The connection was lost and is re-established on the
                    // next call; notifications in between are gone.
                    tracing::debug!("wake-up listener reconnecting");
                    wakers.bump_all();
                }
                Err(e) => {
                    tracing::warn!(error = %e, "wake-up listener failed; listening again");
                    wakers.bump_all();
                    break;
                }
            }
        }
        tokio::select! {
            _ = shutdown.wait_for(|closed| *closed) => return,
            _ = tokio::time::sleep(RELISTEN_PAUSE) => {}
        }
    }
}

async fn connect(pool: &PgPool, channel: &str) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(channel).await?;
    Ok(listener)
}
