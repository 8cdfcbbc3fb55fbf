//! Waking consumers when a commit may have made messages ready.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use busway_core::QueueName;
use tokio::sync::watch;

/// One counter per queue with waiting consumers; the writer bumps it after a
/// commit that touched the queue, and bumps all of them when another process
/// committed.
#[derive(Default)]
pub(crate) struct Wakers {
    queues: Mutex<HashMap<QueueName, watch::Sender<u64>>>,
}

impl Wakers {
    /// A receiver that changes whenever `queue` may have new ready messages.
    pub(crate) fn subscribe(&self, queue: &QueueName) -> watch::Receiver<u64> {
        let mut queues = self.queues.lock().unwrap_or_else(PoisonError::into_inner);
        queues
            .entry(queue.clone())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }

    /// Wakes the consumers of `queue`.
    pub(crate) fn bump(&self, queue: &QueueName) {
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
