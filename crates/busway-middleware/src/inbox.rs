//! A backend's durable [`Inbox`] as the dedup layer's store: every inbox is
//! a [`DedupStore`], so `DedupLayer::new(Arc::new(inbox))` makes a handler
//! idempotent across restarts and processes.

use busway_core::inbox::{Claim, Inbox, InboxError};
use futures::future::BoxFuture;

use crate::dedup::{DedupStore, Seen};
use crate::error::LayerError;

fn store_error(e: InboxError) -> LayerError {
    LayerError::Store(e.to_string())
}

impl<I: Inbox> DedupStore for I {
    fn begin<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Seen, LayerError>> {
        Box::pin(async move {
            Ok(match Inbox::begin(self, key).await.map_err(store_error)? {
                Claim::New => Seen::New,
                Claim::InProgress => Seen::InProgress,
                Claim::Done => Seen::Done,
            })
        })
    }

    fn finish<'a>(
        &'a self,
        key: &'a str,
        succeeded: bool,
    ) -> BoxFuture<'a, Result<(), LayerError>> {
        Box::pin(async move {
            Inbox::finish(self, key, succeeded)
                .await
                .map_err(store_error)
        })
    }
}
